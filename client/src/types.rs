//! Newtypes for the numbers the API hands out, so that a lease id, a
//! fencing token and a revision cannot be mixed up.

use std::fmt;

/// A lease granted by the cluster. Never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseId(pub u64);

/// A fencing token: strictly increasing per lock or election, unique across
/// all of them, never reused. Present it with every write made under the
/// grant it came with; a store that remembers the highest token it has seen
/// can then refuse a stale holder (see [`crate::fence`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

/// A Raft log index: the point in the cluster's history at which a write
/// was applied. Revisions of later writes are higher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub u64);

macro_rules! display_inner {
    ($($name:ident),*) => {$(
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    )*};
}

display_inner!(LeaseId, FencingToken, Revision);

/// What a grant is: a plain lock or an election's leadership. The server
/// keeps the two in separate namespaces, so a fence names which one it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FenceKind {
    Lock,
    Election,
}

/// The grant a fenced write is made under: a lock or election name and the
/// token of its grant. Obtained from a [`crate::LockGuard`] or a
/// [`crate::Leadership`], or built by hand for a token received from
/// elsewhere (for example from another process that holds the lock).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    pub name: String,
    pub token: FencingToken,
    pub kind: FenceKind,
}

impl Fence {
    pub(crate) fn into_proto(self) -> latchkey_proto::v1::Fence {
        let kind = match self.kind {
            FenceKind::Lock => latchkey_proto::v1::fence::Kind::Lock,
            FenceKind::Election => latchkey_proto::v1::fence::Kind::Election,
        };
        latchkey_proto::v1::Fence {
            name: self.name,
            token: self.token.0,
            kind: kind as i32,
        }
    }
}

/// Anything a write can be fenced by: a held lock, a leadership, or a
/// [`Fence`] itself.
pub trait Fenced {
    /// The name, token and kind of the grant.
    fn fence(&self) -> Fence;
}

impl Fenced for Fence {
    fn fence(&self) -> Fence {
        self.clone()
    }
}

/// A lock or election grant as the server reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantInfo {
    pub name: String,
    pub lease: LeaseId,
    pub token: FencingToken,
    /// The published value (elections); empty for plain locks.
    pub value: Vec<u8>,
    /// Revision of the entry that made the grant (0 when the server did not
    /// report it).
    pub revision: Revision,
}

impl From<latchkey_proto::v1::Grant> for GrantInfo {
    fn from(grant: latchkey_proto::v1::Grant) -> Self {
        GrantInfo {
            name: grant.name,
            lease: LeaseId(grant.lease),
            token: FencingToken(grant.token),
            value: grant.value,
            revision: Revision(grant.revision),
        }
    }
}
