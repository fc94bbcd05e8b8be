//! latchkey through `latchkey-client`.
//!
//! Every simulated client is its own [`Client`] (own connections, own
//! exactly-once session), built with the crate's defaults.
//!
//! Keepalives: the client crate renews a [`latchkey_client::Lease`] in a
//! private task that reports no latency, so [`keepalive`] renews through
//! `Raw::keepalive`, which goes the same way as that task: on the
//! `KeepAlive` stream to the leader that all leases of one client share,
//! one renewal of each lease in flight at a time.

use std::time::Duration;

use latchkey_client::{Client, Fence, FenceKind, LeaseId};

use super::{QueueEntry, RawLease};

pub async fn connect(endpoints: &[String]) -> Result<Client, String> {
    Client::builder(endpoints.to_vec())
        .connect()
        .await
        .map_err(|e| e.to_string())
}

pub async fn raw_lease(client: &Client, ttl: Duration) -> Result<RawLease, String> {
    let (id, granted) = client
        .raw()
        .grant_lease(ttl)
        .await
        .map_err(|e| e.to_string())?;
    Ok(RawLease {
        id: id.0,
        granted_ttl: granted,
    })
}

/// Waits for `name` with a raw lease (a waiting acquire by lease id);
/// the grant is released by name and token.
pub async fn lock_raw(client: &Client, name: &str, lease: u64) -> Result<Fence, String> {
    let grant = client
        .raw()
        .acquire(name, LeaseId(lease), true, None)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Fence {
        name: name.to_string(),
        token: grant.token,
        kind: FenceKind::Lock,
    })
}

pub async fn queue(client: &Client, name: &str) -> Result<Vec<QueueEntry>, String> {
    let info = client
        .raw()
        .describe_lock(name)
        .await
        .map_err(|e| e.to_string())?;
    let mut entries = Vec::with_capacity(info.waiters.len() + 1);
    if let Some(holder) = info.holder {
        entries.push(QueueEntry {
            lease: holder.lease.0,
            mark: holder.token.0,
        });
    }
    entries.extend(info.waiters.into_iter().map(|lease| QueueEntry {
        lease: lease.0,
        mark: 0,
    }));
    Ok(entries)
}

/// Renews `lease` once through `client`'s shared `KeepAlive` stream
/// (`Raw::keepalive`); returns the time the answer grants.
pub async fn keepalive(client: &Client, lease: u64) -> Result<Duration, String> {
    match client.raw().keepalive(LeaseId(lease)).await {
        Ok(left) => Ok(left),
        Err(latchkey_client::Error::LeaseNotFound { .. }) => Err(super::lease_gone_error(lease)),
        Err(e) => Err(e.to_string()),
    }
}
