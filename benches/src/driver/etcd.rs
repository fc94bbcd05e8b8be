//! etcd through the `etcd-client` crate.
//!
//! Every simulated client is its own [`Client`], given every endpoint of
//! the cluster (the crate balances requests over them, as etcd's Go
//! client does; followers forward writes to the leader). etcd TTLs are
//! whole seconds: a TTL is rounded up to the next second before it is
//! asked for, and etcd itself silently raises any TTL below its minimum
//! (`ceil(1.5 × election timeout)`, 2 s with the defaults); the granted
//! TTL is read from the answer and reported.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LockOptions, SortOrder, SortTarget,
    Txn, TxnOp,
};
use tokio::task::JoinHandle;

use super::{QueueEntry, RawLease};

/// Bound on opening one connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Renewals a lease's background keepalive task sends at most (bounds the
/// task even if nobody drops the lease).
const MAX_BACKGROUND_RENEWALS: u64 = 1_000_000;

pub async fn connect(endpoints: &[String]) -> Result<Client, String> {
    let options = ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT);
    Client::connect(endpoints, Some(options))
        .await
        .map_err(|e| e.to_string())
}

/// Whole seconds, rounded up, at least 1.
fn ttl_seconds(ttl: Duration) -> i64 {
    (ttl.as_millis().div_ceil(1000) as i64).max(1)
}

pub async fn raw_lease(client: &Client, ttl: Duration) -> Result<RawLease, String> {
    let granted = client
        .clone()
        .lease_grant(ttl_seconds(ttl), None)
        .await
        .map_err(|e| e.to_string())?;
    Ok(RawLease {
        id: granted.id() as u64,
        granted_ttl: Duration::from_secs(granted.ttl().max(0) as u64),
    })
}

/// Opens a keepalive stream, which renews once and waits for the answer,
/// then closes it.
pub async fn keepalive_once(client: &Client, lease: u64) -> Result<(), String> {
    client
        .clone()
        .lease_keep_alive(lease as i64)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A lease renewed by a background task at a third of its granted TTL.
pub struct EtcdLease {
    pub id: i64,
    pub granted_ttl: Duration,
    renewer: JoinHandle<()>,
}

impl EtcdLease {
    pub async fn grant(client: &Client, ttl: Duration) -> Result<EtcdLease, String> {
        let raw = raw_lease(client, ttl).await?;
        let id = raw.id as i64;
        let interval = raw.granted_ttl / 3;
        let client = client.clone();
        let renewer = tokio::spawn(async move {
            let Ok(mut stream) = EtcdKeepalive::open(&client, id).await else {
                return;
            };
            // Bounded by MAX_BACKGROUND_RENEWALS; ends when the lease is dropped.
            for _ in 0..MAX_BACKGROUND_RENEWALS {
                tokio::time::sleep(interval).await;
                if stream.renew().await.is_err() {
                    match EtcdKeepalive::open(&client, id).await {
                        Ok(fresh) => stream = fresh,
                        Err(_) => tokio::time::sleep(interval / 10).await,
                    }
                }
            }
        });
        Ok(EtcdLease {
            id,
            granted_ttl: raw.granted_ttl,
            renewer,
        })
    }
}

impl Drop for EtcdLease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// A held etcd lock: its key, and what fenced writes compare.
pub struct EtcdHeld {
    pub key: Vec<u8>,
    pub header_revision: u64,
    create_revision: Option<i64>,
}

impl EtcdHeld {
    /// Reads the lock key's create revision, which fenced writes compare.
    pub async fn read_create_revision(&mut self, client: &Client) -> Result<(), String> {
        let answer = client
            .clone()
            .get(self.key.clone(), None)
            .await
            .map_err(|e| e.to_string())?;
        let kv = answer.kvs().first().ok_or("lock key vanished")?;
        self.create_revision = Some(kv.create_revision());
        Ok(())
    }

    /// `Txn`: if the lock key still has the create revision it was
    /// granted with, put `value` under `key`.
    pub async fn fenced_put(&self, client: &Client, key: &str, value: &[u8]) -> Result<(), String> {
        let revision = self.create_revision.ok_or("fence not prepared")?;
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.key.clone(),
                CompareOp::Equal,
                revision,
            )])
            .and_then([TxnOp::put(key, value.to_vec(), None)]);
        let answer = client.clone().txn(txn).await.map_err(|e| e.to_string())?;
        if answer.succeeded() {
            Ok(())
        } else {
            Err("fence compare failed: the lock key changed".into())
        }
    }
}

pub async fn lock(client: &Client, name: &str, lease: i64) -> Result<EtcdHeld, String> {
    let answer = client
        .clone()
        .lock(name, Some(LockOptions::new().with_lease(lease)))
        .await
        .map_err(|e| e.to_string())?;
    Ok(EtcdHeld {
        key: answer.key().to_vec(),
        header_revision: answer.header().map_or(0, |h| h.revision().max(0) as u64),
        create_revision: None,
    })
}

pub async fn unlock(client: &Client, held: EtcdHeld) -> Result<(), String> {
    client
        .clone()
        .unlock(held.key)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Keys under `name/` by create revision: the order etcd's lock grants in.
pub async fn queue(client: &Client, name: &str) -> Result<Vec<QueueEntry>, String> {
    let options = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend);
    let answer = client
        .clone()
        .get(format!("{name}/"), Some(options))
        .await
        .map_err(|e| e.to_string())?;
    Ok(answer
        .kvs()
        .iter()
        .map(|kv| QueueEntry {
            lease: kv.lease() as u64,
            mark: kv.create_revision().max(0) as u64,
        })
        .collect())
}

/// One lease's `LeaseKeepAlive` stream.
pub struct EtcdKeepalive {
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
}

impl EtcdKeepalive {
    /// Opens the stream; the crate renews once while opening it (and
    /// fails if the lease is gone).
    pub async fn open(client: &Client, lease: i64) -> Result<EtcdKeepalive, String> {
        let (keeper, stream) = client
            .clone()
            .lease_keep_alive(lease)
            .await
            .map_err(|e| e.to_string())?;
        Ok(EtcdKeepalive { keeper, stream })
    }

    pub async fn renew(&mut self) -> Result<Duration, String> {
        self.keeper.keep_alive().await.map_err(|e| e.to_string())?;
        match self.stream.message().await {
            Ok(Some(answer)) if answer.ttl() > 0 => Ok(Duration::from_secs(answer.ttl() as u64)),
            Ok(Some(_)) => Err(super::lease_gone_error(format!("{:x}", self.keeper.id()))),
            Ok(None) => Err("keepalive stream ended".into()),
            Err(e) => Err(e.to_string()),
        }
    }
}
