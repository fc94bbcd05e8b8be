//! The fenced key-value store.
//!
//! ```no_run
//! # async fn example(client: latchkey_client::Client, lease: latchkey_client::Lease)
//! # -> Result<(), latchkey_client::Error> {
//! let guard = lease.lock("orders").await?;
//! client.put("orders/next", "42").fence(&guard).await?;
//! let stored = client.get("orders/next").await?.expect("just written");
//! assert_eq!(stored.token, Some(guard.token()));
//! # Ok(()) }
//! ```
//!
//! A write fenced by a grant ([`Put::fence`], [`Delete::fence`]) is applied
//! only if the grant's token is the lock's current one *at the point in the
//! log where the write lands*, and not lower than the token of the last
//! fenced write to the key; otherwise it fails with [`Error::StaleToken`]
//! and nothing changes. So a holder that kept working after its lease
//! expired, and a deposed leader, are refused rather than trusted.
//!
//! Writes also take a compare-and-set condition on the key's modification
//! revision ([`Put::if_mod_revision`], [`Put::if_absent`]), failing with
//! [`Error::RevisionMismatch`]. Reads are linearizable unless
//! [`Get::serializable`] is asked for.
//!
//! Builders run when awaited (they implement [`IntoFuture`]).
//!
//! [`Client::range`] lists keys by prefix, in key order.
//!
//! # Not done yet
//! - Watches.

use std::future::IntoFuture;

use futures::future::BoxFuture;
use latchkey_proto::v1::kv_client::KvClient;
use latchkey_proto::v1::{DeleteRequest, GetRequest, PutRequest, RangeRequest};

use crate::client::{CallSpec, Client};
use crate::error::Error;
use crate::types::{Fence, Fenced, FencingToken, Revision};

/// A stored key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    /// Revision of the write that created the key (after its last delete).
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// Token of the last fenced write to the key; a later fenced write must
    /// carry one at least as high. `None` if it was never written fenced.
    pub token: Option<FencingToken>,
    /// The lock or election that token belongs to.
    pub fence_name: Option<String>,
}

impl From<latchkey_proto::v1::KeyValue> for KeyValue {
    fn from(kv: latchkey_proto::v1::KeyValue) -> Self {
        KeyValue {
            key: kv.key,
            value: kv.value,
            create_revision: Revision(kv.create_revision),
            mod_revision: Revision(kv.mod_revision),
            token: Some(FencingToken(kv.token)).filter(|t| t.0 != 0),
            fence_name: Some(kv.fence_name).filter(|n| !n.is_empty()),
        }
    }
}

/// The outcome of a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    /// Whether the key existed.
    pub existed: bool,
    /// Revision of the delete.
    pub revision: Revision,
}

impl Client {
    /// Writes `value` under `key`; add [`Put::fence`] to make it safe
    /// against stale holders.
    pub fn put(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Put {
        Put {
            client: self.clone(),
            key: key.into(),
            value: value.into(),
            fence: None,
            expected_mod_revision: None,
        }
    }

    /// Reads `key` (linearizable unless [`Get::serializable`]).
    pub fn get(&self, key: impl Into<Vec<u8>>) -> Get {
        Get {
            client: self.clone(),
            key: key.into(),
            serializable: false,
        }
    }

    /// Deletes `key`.
    pub fn delete(&self, key: impl Into<Vec<u8>>) -> Delete {
        Delete {
            client: self.clone(),
            key: key.into(),
            fence: None,
            expected_mod_revision: None,
        }
    }
}

/// A write, run when awaited. Resolves to the write's revision.
#[must_use = "a put does nothing until awaited"]
pub struct Put {
    client: Client,
    key: Vec<u8>,
    value: Vec<u8>,
    fence: Option<Fence>,
    expected_mod_revision: Option<Revision>,
}

impl Put {
    /// Applies the write only under the current grant of `grant`.
    pub fn fence(mut self, grant: &impl Fenced) -> Self {
        self.fence = Some(grant.fence());
        self
    }

    /// Applies the write only if the key was last modified at `revision`.
    pub fn if_mod_revision(mut self, revision: Revision) -> Self {
        self.expected_mod_revision = Some(revision);
        self
    }

    /// Applies the write only if the key does not exist.
    pub fn if_absent(self) -> Self {
        self.if_mod_revision(Revision(0))
    }

    async fn send(self) -> Result<Revision, Error> {
        let inner = &self.client.inner;
        let request = PutRequest {
            key: self.key,
            value: self.value,
            fence: self.fence.map(Fence::into_proto),
            request: None,
            expected_mod_revision: self.expected_mod_revision.map(|r| r.0),
        };
        let answer = inner
            .call_write(CallSpec::write(&inner.options), |channel, id| {
                let mut request = request.clone();
                request.request = id;
                async move { KvClient::new(channel).put(request).await }
            })
            .await?;
        Ok(Revision(answer.revision))
    }
}

impl IntoFuture for Put {
    type Output = Result<Revision, Error>;
    type IntoFuture = BoxFuture<'static, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

/// A read, run when awaited. Resolves to the key, if it exists.
#[must_use = "a get does nothing until awaited"]
pub struct Get {
    client: Client,
    key: Vec<u8>,
    serializable: bool,
}

impl Get {
    /// Answers from the local state of whichever node is asked, without
    /// confirming it is current: faster, possibly stale.
    pub fn serializable(mut self) -> Self {
        self.serializable = true;
        self
    }

    async fn send(self) -> Result<Option<KeyValue>, Error> {
        let inner = &self.client.inner;
        let request = GetRequest {
            key: self.key,
            serializable: self.serializable,
        };
        let answer = inner
            .call(CallSpec::read(&inner.options), |channel| {
                let request = request.clone();
                async move { KvClient::new(channel).get(request).await }
            })
            .await?;
        Ok(answer.kv.map(KeyValue::from))
    }
}

impl IntoFuture for Get {
    type Output = Result<Option<KeyValue>, Error>;
    type IntoFuture = BoxFuture<'static, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

/// A delete, run when awaited.
#[must_use = "a delete does nothing until awaited"]
pub struct Delete {
    client: Client,
    key: Vec<u8>,
    fence: Option<Fence>,
    expected_mod_revision: Option<Revision>,
}

impl Delete {
    /// Applies the delete only under the current grant of `grant`.
    pub fn fence(mut self, grant: &impl Fenced) -> Self {
        self.fence = Some(grant.fence());
        self
    }

    /// Applies the delete only if the key was last modified at `revision`.
    pub fn if_mod_revision(mut self, revision: Revision) -> Self {
        self.expected_mod_revision = Some(revision);
        self
    }

    async fn send(self) -> Result<Deleted, Error> {
        let inner = &self.client.inner;
        let request = DeleteRequest {
            key: self.key,
            fence: self.fence.map(Fence::into_proto),
            request: None,
            expected_mod_revision: self.expected_mod_revision.map(|r| r.0),
        };
        let answer = inner
            .call_write(CallSpec::write(&inner.options), |channel, id| {
                let mut request = request.clone();
                request.request = id;
                async move { KvClient::new(channel).delete(request).await }
            })
            .await?;
        Ok(Deleted {
            existed: answer.deleted,
            revision: Revision(answer.revision),
        })
    }
}

impl IntoFuture for Delete {
    type Output = Result<Deleted, Error>;
    type IntoFuture = BoxFuture<'static, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

/// The keys a [`Range`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeAnswer {
    /// In key order.
    pub kvs: Vec<KeyValue>,
    /// More keys match than were returned (the limit, or the server's own).
    pub more: bool,
}

impl Client {
    /// Lists the keys that start with `prefix` (every key for an empty one),
    /// in key order, up to the server's limit per call.
    pub fn range(&self, prefix: impl Into<Vec<u8>>) -> Range {
        Range {
            client: self.clone(),
            prefix: prefix.into(),
            limit: 0,
            serializable: false,
        }
    }
}

/// A range read, run when awaited.
#[must_use = "a range does nothing until awaited"]
pub struct Range {
    client: Client,
    prefix: Vec<u8>,
    limit: u32,
    serializable: bool,
}

impl Range {
    /// At most `limit` keys (0: the server's maximum).
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = limit;
        self
    }

    /// Answers from the local state of whichever node is asked, without
    /// confirming it is current: faster, possibly stale.
    pub fn serializable(mut self) -> Self {
        self.serializable = true;
        self
    }

    async fn send(self) -> Result<RangeAnswer, Error> {
        let inner = &self.client.inner;
        let request = RangeRequest {
            prefix: self.prefix,
            limit: self.limit,
            serializable: self.serializable,
        };
        let answer = inner
            .call(CallSpec::read(&inner.options), |channel| {
                let request = request.clone();
                async move { KvClient::new(channel).range(request).await }
            })
            .await?;
        Ok(RangeAnswer {
            kvs: answer.kvs.into_iter().map(KeyValue::from).collect(),
            more: answer.more,
        })
    }
}

impl IntoFuture for Range {
    type Output = Result<RangeAnswer, Error>;
    type IntoFuture = BoxFuture<'static, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}
