//! Identifiers and records of the coordination state: leases, locks,
//! elections and their grants.
//!
//! Everything here is plain data. The rules that tie the records together
//! (a holder's lease exists, a lease's `held` set names exactly the locks it
//! holds, ...) are owned by [`super::Coordination`] and checked by
//! [`super::Coordination::validate`].

use std::collections::VecDeque;
use std::fmt;

use crate::types::LogIndex;

/// A lease, named by the Raft index of the entry that granted it.
///
/// Indexes are applied once each, so ids are unique and never reused: an
/// expiry proposed for an old lease can never remove a newer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseId(pub u64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The number handed out with a grant. Drawn from one cluster-wide counter,
/// so it is strictly increasing per lock and unique across locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Locks and elections live in two namespaces: a lock and an election may
/// share a name without sharing anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Lock,
    Election,
}

impl Kind {
    /// The byte that stands for the kind in stored keys.
    pub(super) fn key_byte(self) -> u8 {
        match self {
            Kind::Lock => b'l',
            Kind::Election => b'e',
        }
    }

    pub(super) fn from_key_byte(byte: u8) -> Option<Kind> {
        match byte {
            b'l' => Some(Kind::Lock),
            b'e' => Some(Kind::Election),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Lock => "lock",
            Kind::Election => "election",
        })
    }
}

/// The full name of a lock or an election.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LockKey {
    pub kind: Kind,
    pub name: String,
}

impl LockKey {
    pub fn new(kind: Kind, name: impl Into<String>) -> LockKey {
        LockKey {
            kind,
            name: name.into(),
        }
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.kind, self.name)
    }
}

/// A live lease and what hangs off it.
///
/// Only `id`, `ttl_ms` and `owner` are stored in the lease's record; `held`
/// and `waiting` are indexes rebuilt from the lock and waiter records on load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub ttl_ms: u64,
    /// The identity that granted it (`None`: anonymous, authentication
    /// off). Shared with the other leases of the same owner.
    pub owner: Option<std::sync::Arc<str>>,
    /// Locks and elections this lease currently holds.
    pub held: LockSet,
    /// Locks and elections this lease is queued for.
    pub waiting: LockSet,
}

impl Lease {
    /// The index of the entry that granted the lease (its id, by construction).
    pub fn granted_index(&self) -> LogIndex {
        LogIndex(self.id.0)
    }
}

/// A lease's set of lock keys, in order: a sorted vector.
///
/// Almost every lease holds one lock or none, and a `BTreeSet` allocates a
/// whole node (eleven keys) for its first key, which made it the largest
/// part of a lease's memory. Here one key costs one key's allocation.
/// Insert and remove shift the keys after the position, which stays cheap
/// up to `MAX_LOCKS_PER_LEASE` (10 000 keys of 32 bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockSet(Vec<LockKey>);

impl LockSet {
    pub fn new() -> LockSet {
        LockSet(Vec::new())
    }

    /// Adds `key`; false when it was already there.
    pub fn insert(&mut self, key: LockKey) -> bool {
        match self.0.binary_search(&key) {
            Ok(_) => false,
            Err(at) => {
                if self.0.capacity() == 0 {
                    // The common single key, without the vector's default
                    // room for four.
                    self.0.reserve_exact(1);
                }
                self.0.insert(at, key);
                true
            }
        }
    }

    /// Removes `key`; false when it was not there.
    pub fn remove(&mut self, key: &LockKey) -> bool {
        match self.0.binary_search(key) {
            Ok(at) => {
                self.0.remove(at);
                if self.0.is_empty() {
                    self.0 = Vec::new();
                }
                true
            }
            Err(_) => false,
        }
    }

    pub fn contains(&self, key: &LockKey) -> bool {
        self.0.binary_search(key).is_ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The keys in order.
    pub fn iter(&self) -> std::slice::Iter<'_, LockKey> {
        self.0.iter()
    }
}

impl<'a> IntoIterator for &'a LockSet {
    type Item = &'a LockKey;
    type IntoIter = std::slice::Iter<'a, LockKey>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl IntoIterator for LockSet {
    type Item = LockKey;
    type IntoIter = std::vec::IntoIter<LockKey>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// The current holder of a lock or an election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub lease: LeaseId,
    pub token: FencingToken,
    /// The published value of an election's leader; always empty for a lock.
    pub value: Vec<u8>,
    /// The index of the entry that made this grant.
    pub granted_index: LogIndex,
}

/// A lease queued for a lock or an election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiter {
    pub lease: LeaseId,
    /// The value the candidate will publish once elected; empty for a lock.
    pub value: Vec<u8>,
    /// The index of the entry that queued it; unique per lock and increasing
    /// along the queue, so it also orders the stored waiter records.
    pub enqueued_index: LogIndex,
    /// The index of the latest waiting acquire that found this lease queued
    /// (or queued it). A `CancelWait` naming an older attempt is ignored:
    /// the caller that gave up was replaced by a resent request that still
    /// waits.
    pub attempt: LogIndex,
}

/// A held lock or election. A lock that nobody holds has no record: when its
/// holder goes, the first waiter is granted in the same entry, so a lock
/// with waiters and no holder cannot exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    pub holder: Grant,
    /// First in line at the front.
    pub waiters: VecDeque<Waiter>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_set_keeps_keys_in_order_once_each_like_a_btree_set() {
        let keys = [
            LockKey::new(Kind::Lock, "b"),
            LockKey::new(Kind::Election, "a"),
            LockKey::new(Kind::Lock, "a"),
            LockKey::new(Kind::Lock, "c"),
        ];
        let mut set = LockSet::new();
        let mut model = std::collections::BTreeSet::new();
        for key in keys.iter().chain(&keys) {
            assert_eq!(set.insert(key.clone()), model.insert(key.clone()));
            assert!(set.iter().eq(model.iter()));
        }
        assert_eq!(set.len(), 4);
        for key in [&keys[2], &keys[2], &keys[0], &keys[3], &keys[1]] {
            assert_eq!(set.remove(key), model.remove(key));
            assert_eq!(set.contains(key), model.contains(key));
            assert!(set.iter().eq(model.iter()));
        }
        assert!(set.is_empty());
    }
}
