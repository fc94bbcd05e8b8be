//! latchkey through `latchkey-client`.
//!
//! Every simulated client is its own [`Client`] (own connections, own
//! exactly-once session), built with the crate's defaults.
//!
//! Keepalive streams are the exception: the client crate renews a
//! [`latchkey_client::Lease`] in a private task that reports no latency,
//! so [`LatchkeyKeepalive`] drives the same `Lease.KeepAlive` RPC the
//! crate's task uses, the same way (one long-lived stream per lease, one
//! renewal in flight at a time, sent to the leader), and times each
//! answer.

use std::time::Duration;

use latchkey_client::{Client, Fence, FenceKind, LeaseId};
use latchkey_proto::v1::lease_client::LeaseClient;
use latchkey_proto::v1::{LeaseKeepAliveRequest, LeaseKeepAliveResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{QueueEntry, RawLease};

/// Renewals queued on one stream; one is in flight at a time.
const KEEPALIVE_QUEUE: usize = 2;

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

/// One lease's `KeepAlive` stream to the leader.
pub struct LatchkeyKeepalive {
    lease: u64,
    requests: mpsc::Sender<LeaseKeepAliveRequest>,
    responses: tonic::Streaming<LeaseKeepAliveResponse>,
}

impl LatchkeyKeepalive {
    pub async fn open(
        channel: tonic::transport::Channel,
        lease: u64,
    ) -> Result<LatchkeyKeepalive, String> {
        let (requests, queue) = mpsc::channel(KEEPALIVE_QUEUE);
        let responses = LeaseClient::new(channel)
            .keep_alive(ReceiverStream::new(queue))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        Ok(LatchkeyKeepalive {
            lease,
            requests,
            responses,
        })
    }

    pub async fn renew(&mut self) -> Result<Duration, String> {
        let request = LeaseKeepAliveRequest { lease: self.lease };
        self.requests
            .send(request)
            .await
            .map_err(|_| "keepalive stream closed".to_string())?;
        match self.responses.message().await {
            Ok(Some(answer)) if answer.found => Ok(Duration::from_millis(answer.ttl_ms)),
            Ok(Some(_)) => Err(super::lease_gone_error(self.lease)),
            Ok(None) => Err("keepalive stream ended".into()),
            Err(status) => Err(format!("{}: {}", status.code(), status.message())),
        }
    }
}
