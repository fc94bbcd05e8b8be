//! One vocabulary for both systems: connections, leases, locks, fenced
//! writes, keepalive streams and queue snapshots.
//!
//! # Layout
//! - this file: the enums the workloads use ([`Conn`], [`Lease`],
//!   [`Held`], [`KeepaliveStream`]); each method dispatches to the
//!   system's module.
//! - [`latchkey`]: through `latchkey-client` (guards, raw calls; timed
//!   keepalives through `Raw::keepalive`, see [`KeepaliveStream`]).
//! - [`etcd`]: through the `etcd-client` crate's Lease, Lock and KV APIs.
//!
//! # What each operation is on each system
//! | operation | latchkey | etcd |
//! |---|---|---|
//! | lease | `Client::grant_lease` (the client renews it) | `LeaseGrant`, renewed by a task at TTL/3 on its own `LeaseKeepAlive` stream |
//! | lock | `Lease::lock` (queues FIFO, blocks) | `Lock` with the lease (creates `name/<lease>`, waits for older keys) |
//! | release | `LockGuard::release` | `Unlock` (deletes the key) |
//! | fenced put | `put(k, v).fence(&guard)`: checked against the grant's token in apply | `Txn` if `create_revision(lock key) == R` then `Put`: R is the lock key's create revision |
//! | queue | `Lock.Describe`: holder and waiters in queue order | `Range name/` sorted by create revision: the order etcd's lock grants in |
//!
//! Both count as two Raft commits per lock-and-release cycle.

pub mod etcd;
pub mod latchkey;

use std::time::Duration;

use crate::cluster::System;

/// A connection to one cluster, as one client application has it.
#[derive(Clone)]
pub enum Conn {
    Latchkey(latchkey_client::Client),
    /// Boxed: an etcd client is a few kilobytes of service stacks.
    Etcd(Box<etcd_client::Client>),
}

/// A lease that is kept alive until dropped.
pub enum Lease {
    Latchkey(latchkey_client::Lease),
    Etcd(etcd::EtcdLease),
}

/// A held lock.
pub enum Held {
    Latchkey(latchkey_client::LockGuard),
    /// A grant taken by lease id ([`Conn::lock_raw`]).
    LatchkeyRaw(latchkey_client::Fence),
    Etcd(etcd::EtcdHeld),
}

/// One entry of a lock's queue: the holder first, then the waiters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueEntry {
    pub lease: u64,
    /// latchkey: the holder's fencing token (0 for waiters); etcd: the
    /// create revision of the entry's key.
    pub mark: u64,
}

/// A lease id and the TTL the server granted for it.
#[derive(Debug, Clone, Copy)]
pub struct RawLease {
    pub id: u64,
    pub granted_ttl: Duration,
}

/// How one lease is renewed: on etcd, a stream of its own (the
/// `etcd-client` crate opens one per lease); on latchkey, the stream its
/// client's leases share.
pub enum KeepaliveStream {
    Latchkey {
        client: latchkey_client::Client,
        lease: u64,
    },
    /// Boxed: a stream and its sender are a few hundred bytes.
    Etcd(Box<etcd::EtcdKeepalive>),
}

impl Conn {
    pub async fn connect(system: System, endpoints: &[String]) -> Result<Conn, String> {
        match system {
            System::Latchkey => latchkey::connect(endpoints).await.map(Conn::Latchkey),
            System::Etcd => etcd::connect(endpoints)
                .await
                .map(|c| Conn::Etcd(Box::new(c))),
        }
    }

    /// A lease of `ttl`, renewed in the background while it lives.
    pub async fn lease(&self, ttl: Duration) -> Result<Lease, String> {
        match self {
            Conn::Latchkey(c) => c
                .grant_lease(ttl)
                .await
                .map(Lease::Latchkey)
                .map_err(|e| e.to_string()),
            Conn::Etcd(c) => etcd::EtcdLease::grant(c, ttl).await.map(Lease::Etcd),
        }
    }

    /// A lease nobody renews; says which TTL the server granted.
    pub async fn raw_lease(&self, ttl: Duration) -> Result<RawLease, String> {
        match self {
            Conn::Latchkey(c) => latchkey::raw_lease(c, ttl).await,
            Conn::Etcd(c) => etcd::raw_lease(c, ttl).await,
        }
    }

    /// Renews a raw lease once and waits for the answer.
    pub async fn keepalive_once(&self, lease: u64) -> Result<(), String> {
        match self {
            Conn::Latchkey(c) => c
                .raw()
                .keepalive(latchkey_client::LeaseId(lease))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Conn::Etcd(c) => etcd::keepalive_once(c, lease).await,
        }
    }

    /// Waits for lock `name` with raw lease `lease`; returns the grant's mark.
    pub async fn lock_raw(&self, name: &str, lease: u64) -> Result<Held, String> {
        match self {
            Conn::Latchkey(c) => latchkey::lock_raw(c, name, lease)
                .await
                .map(Held::LatchkeyRaw),
            Conn::Etcd(c) => etcd::lock(c, name, lease as i64).await.map(Held::Etcd),
        }
    }

    /// The queue of lock `name`: holder first, then waiters in order.
    pub async fn queue(&self, name: &str) -> Result<Vec<QueueEntry>, String> {
        match self {
            Conn::Latchkey(c) => latchkey::queue(c, name).await,
            Conn::Etcd(c) => etcd::queue(c, name).await,
        }
    }
}

impl Lease {
    pub fn id(&self) -> u64 {
        match self {
            Lease::Latchkey(l) => l.id().0,
            Lease::Etcd(l) => l.id as u64,
        }
    }

    /// Waits until this lease holds lock `name`.
    pub async fn lock(&self, conn: &Conn, name: &str) -> Result<Held, String> {
        match (self, conn) {
            (Lease::Latchkey(l), _) => l
                .lock(name)
                .await
                .map(Held::Latchkey)
                .map_err(|e| e.to_string()),
            (Lease::Etcd(l), Conn::Etcd(c)) => etcd::lock(c, name, l.id).await.map(Held::Etcd),
            (Lease::Etcd(_), Conn::Latchkey(_)) => {
                Err("etcd lease on a latchkey connection".into())
            }
        }
    }
}

impl Held {
    /// latchkey: the fencing token; etcd: the revision of the lock
    /// response's header (at or after the lock key's create revision, and
    /// below the create revision of the same lease's next key).
    pub fn mark(&self) -> u64 {
        match self {
            Held::Latchkey(g) => g.token().0,
            Held::LatchkeyRaw(f) => f.token.0,
            Held::Etcd(h) => h.header_revision,
        }
    }

    pub async fn release(self, conn: &Conn) -> Result<(), String> {
        match (self, conn) {
            (Held::Latchkey(g), _) => g.release().await.map_err(|e| e.to_string()),
            (Held::LatchkeyRaw(f), Conn::Latchkey(c)) => c
                .raw()
                .release(&f.name, f.token)
                .await
                .map_err(|e| e.to_string()),
            (Held::Etcd(h), Conn::Etcd(c)) => etcd::unlock(c, h).await,
            _ => Err("grant and connection of different systems".into()),
        }
    }

    /// Readies fenced writes (etcd: reads the lock key's create revision).
    pub async fn prepare_fence(&mut self, conn: &Conn) -> Result<(), String> {
        match (self, conn) {
            (Held::Latchkey(_) | Held::LatchkeyRaw(_), _) => Ok(()),
            (Held::Etcd(h), Conn::Etcd(c)) => h.read_create_revision(c).await,
            (Held::Etcd(_), Conn::Latchkey(_)) => Err("etcd lock on a latchkey connection".into()),
        }
    }

    /// Writes `value` under `key`, fenced by this grant.
    pub async fn fenced_put(&self, conn: &Conn, key: &str, value: &[u8]) -> Result<(), String> {
        match (self, conn) {
            (Held::Latchkey(g), Conn::Latchkey(c)) => c
                .put(key, value)
                .fence(g)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            (Held::LatchkeyRaw(f), Conn::Latchkey(c)) => c
                .put(key, value)
                .fence(f)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            (Held::Etcd(h), Conn::Etcd(c)) => h.fenced_put(c, key, value).await,
            _ => Err("grant and connection of different systems".into()),
        }
    }
}

impl KeepaliveStream {
    /// Opens a stream for `lease` on `target`; says whether opening it
    /// renewed the lease already (etcd's client renews once while opening).
    pub async fn open(
        target: &KeepaliveTarget,
        lease: u64,
    ) -> Result<(KeepaliveStream, bool), String> {
        match target {
            KeepaliveTarget::Latchkey(client) => Ok((
                KeepaliveStream::Latchkey {
                    client: client.clone(),
                    lease,
                },
                false,
            )),
            KeepaliveTarget::Etcd(client) => etcd::EtcdKeepalive::open(client, lease as i64)
                .await
                .map(|s| (KeepaliveStream::Etcd(Box::new(s)), true)),
        }
    }

    /// Sends one renewal and waits for its answer; returns the TTL the
    /// answer grants.
    pub async fn renew(&mut self) -> Result<Duration, String> {
        match self {
            KeepaliveStream::Latchkey { client, lease } => {
                latchkey::keepalive(client, *lease).await
            }
            KeepaliveStream::Etcd(s) => s.renew().await,
        }
    }
}

/// A renewal's error when the server answered that `lease` does not exist.
pub fn lease_gone_error(lease: impl std::fmt::Display) -> String {
    format!("lease {lease} not found")
}

/// Whether a renewal's error says that the lease no longer exists (it
/// expired or was revoked), so renewing it again is pointless: the
/// drivers' [`lease_gone_error`], or etcd's own "requested lease not
/// found" when opening a stream for a lease it no longer has.
pub fn lease_is_gone(error: &str) -> bool {
    error.contains("not found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gone_lease_is_recognised_from_either_system() {
        assert!(lease_is_gone(&lease_gone_error(58)));
        assert!(lease_is_gone(&lease_gone_error(format!("{:x}", 58))));
        assert!(lease_is_gone(
            "grpc request error: status: NotFound, message: \"etcdserver: requested lease not found\""
        ));
        assert!(!lease_is_gone("renewal unanswered within 3 intervals"));
        assert!(!lease_is_gone("keepalive stream ended"));
    }
}

/// Where keepalive streams are opened: one HTTP/2 connection.
#[derive(Clone)]
pub enum KeepaliveTarget {
    /// A latchkey client: its leases' renewals share one stream to the
    /// leader (only the leader renews).
    Latchkey(latchkey_client::Client),
    /// An etcd client over the cluster's endpoints (boxed, as in [`Conn`]).
    Etcd(Box<etcd_client::Client>),
}
