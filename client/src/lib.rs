//! latchkey client: locks, leases and leader election with fencing tokens.
//!
//! ```no_run
//! use std::time::Duration;
//! use latchkey_client::Client;
//!
//! # async fn example() -> Result<(), latchkey_client::Error> {
//! let client = Client::connect(["127.0.0.1:2379", "127.0.0.1:2479"]).await?;
//! let lease = client.grant_lease(Duration::from_secs(10)).await?;
//! let guard = lease.lock("reports").await?;
//! tokio::select! {
//!     _ = guard.lost() => eprintln!("lost the lock; stopping"),
//!     written = client.put("reports/last", "done").fence(&guard) => {
//!         written?;
//!     }
//! }
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! The safe path is the easy one: every grant carries a fencing token
//! ([`LockGuard::token`], [`Leadership::token`]); a guard knows when its
//! lease can no longer be trusted ([`LockGuard::lost`], judged on this
//! process's monotonic clock, never later than the cluster expires it); and
//! writes fenced with the guard are refused once a newer holder exists.
//!
//! # Layout
//! - [`client`]: [`Client`] and [`ClientBuilder`]: endpoints, following the
//!   leader, retries with backoff, exactly-once request ids.
//! - `retry` (private): which failures to retry, where, and
//!   after what pause.
//! - [`session`]: the exactly-once session: opened with the first write,
//!   sequence numbers, what the server may forget, expiry.
//! - [`lease`]: [`Lease`], its local deadline and [`LeaseState`].
//! - `keepalive` (private): the task that renews a lease.
//! - `renewals` (private): the `KeepAlive` streams a client's leases share,
//!   one per node.
//! - [`lock`]: `Lease::lock` / `try_lock` / `lock_with_timeout` and
//!   [`LockGuard`].
//! - `pipeline` (private): the `Lock.Pipeline` streams lock acquires and
//!   releases go on, one per node, with unary calls where a node lacks it.
//! - [`cluster`]: membership and leadership for operators: list, add,
//!   promote and remove members, transfer leadership.
//! - [`election`]: [`Election`] (campaign, leader, observe) and
//!   [`Leadership`].
//! - `observe` (private): the leader-change stream that
//!   survives node loss.
//! - [`kv`]: the fenced key-value store: `put`, `get`, `delete` builders.
//! - [`maintenance`]: backups ([`Client::save_snapshot`]).
//! - [`raw`]: calls by lease id and token ([`Client::raw`]) for scripts
//!   and tools; nothing is kept alive or released for the caller.
//! - [`fence`]: [`fence::FenceGate`], the same fencing check for stores
//!   outside latchkey.
//! - [`error`]: [`Error`], typed from the server's error details.
//! - [`types`]: newtypes ([`LeaseId`], [`FencingToken`], [`Revision`]) and
//!   [`Fence`].

pub mod auth;
pub mod client;
pub mod cluster;
pub mod election;
pub mod error;
pub mod fence;
pub(crate) mod keepalive;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub(crate) mod observe;
pub(crate) mod pipeline;
pub mod raw;
pub(crate) mod renewals;
pub(crate) mod retry;
pub mod session;
#[cfg(test)]
pub(crate) mod test_server;
pub mod tls;
pub mod types;

pub use client::{Client, ClientBuilder};
pub use election::{Election, Leadership};
pub use error::Error;
pub use kv::{Deleted, KeyValue, RangeAnswer};
pub use lease::{Lease, LeaseLost, LeaseState};
pub use lock::LockGuard;
/// How the client reads an endpoint; public for the server's CLI parser
/// fuzz tests, which check that every endpoint the CLI accepts connects.
#[doc(hidden)]
pub use retry::normalize_endpoint;
pub use tls::TlsConfig;
pub use types::{Fence, FenceKind, Fenced, FencingToken, GrantInfo, LeaseId, Revision};
