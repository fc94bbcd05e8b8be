//! Workload `lease`: leases by id, through `Client::raw`, so that nothing
//! renews them behind the history's back.
//!
//! A worker `grant`s a lease, renews it with a few `keepalive`s, then ends
//! it one of two ways ([`Ending`]): it `revoke`s it, or it stops renewing
//! and waits [`EXPIRY_WAITS`] TTLs plus [`EXPIRY_MARGIN`]; either way it
//! then sends one more `keepalive`, which the server should refuse (`fail`:
//! it no longer has the lease). Then it grants a new one. A keepalive that
//! fails ends the lease's cycle early.

use std::time::Duration;

use latchkey_client::{Client, LeaseId};
use rand::rngs::StdRng;
use rand::Rng;
use serde_json::json;

use super::{think, Finished, Link, Outcome, WorkerSpec};
use crate::history::OpType;

/// Most renewals of one lease before it is ended.
const KEEPALIVES_MAX: u32 = 4;
/// TTLs a worker waits for an unrenewed lease to expire…
const EXPIRY_WAITS: u32 = 1;
/// …plus this, for the server's deadline to pass on every node's clock.
const EXPIRY_MARGIN: Duration = Duration::from_millis(500);

/// How a worker ends a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Revoke,
    Expire,
}

pub(super) async fn lease(
    spec: &WorkerSpec,
    client: &Client,
    link: &mut Link,
    rng: &mut StdRng,
) -> Result<std::convert::Infallible, Finished> {
    let ttl = Duration::from_millis(spec.ttl_ms);
    // Bounded by the harness: it sends `finish` at the end of the run.
    loop {
        think(rng).await;
        let Some(lease) = grant(client, link, ttl).await? else {
            continue;
        };
        let mut alive = true;
        for _ in 0..rng.gen_range(1..=KEEPALIVES_MAX) {
            // Well inside the TTL, so that renewals keep the lease alive.
            tokio::time::sleep(rng.gen_range(Duration::ZERO..ttl / 3)).await;
            if keepalive(client, link, lease).await? == OpType::Fail {
                alive = false;
                break;
            }
        }
        if !alive {
            continue;
        }
        match ending(rng) {
            Ending::Revoke => revoke(client, link, lease).await?,
            Ending::Expire => tokio::time::sleep(ttl * EXPIRY_WAITS + EXPIRY_MARGIN).await,
        }
        keepalive(client, link, lease).await?;
    }
}

fn ending(rng: &mut StdRng) -> Ending {
    if rng.gen_bool(0.5) {
        Ending::Revoke
    } else {
        Ending::Expire
    }
}

async fn grant(
    client: &Client,
    link: &mut Link,
    ttl: Duration,
) -> Result<Option<LeaseId>, Finished> {
    let ttl_ms = ttl.as_millis() as u64;
    link.invoke("grant", None, json!({"ttl_ms": ttl_ms}))
        .await?;
    match client.raw().grant_lease(ttl).await {
        Ok((lease, granted)) => {
            let value = json!({"lease": lease.0, "ttl_ms": granted.as_millis() as u64});
            link.complete("grant", None, Outcome::ok(value));
            Ok(Some(lease))
        }
        Err(error) => {
            link.complete(
                "grant",
                None,
                Outcome::error(&error, json!({"ttl_ms": ttl_ms})),
            );
            Ok(None)
        }
    }
}

/// Renews `lease` once; returns how the op ended.
async fn keepalive(client: &Client, link: &mut Link, lease: LeaseId) -> Result<OpType, Finished> {
    let record = json!({"lease": lease.0});
    link.invoke("keepalive", None, record.clone()).await?;
    let outcome = match client.raw().keepalive(lease).await {
        Ok(remaining) => {
            Outcome::ok(json!({"lease": lease.0, "remaining_ms": remaining.as_millis() as u64}))
        }
        Err(error) => Outcome::error(&error, record),
    };
    let kind = outcome.kind;
    link.complete("keepalive", None, outcome);
    Ok(kind)
}

async fn revoke(client: &Client, link: &mut Link, lease: LeaseId) -> Result<(), Finished> {
    let record = json!({"lease": lease.0});
    link.invoke("revoke", None, record.clone()).await?;
    let outcome = match client.raw().revoke_lease(lease).await {
        Ok(()) => Outcome::ok(record),
        Err(error) => Outcome::error(&error, record),
    };
    link.complete("revoke", None, outcome);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn both_endings_are_drawn() {
        let mut rng = StdRng::seed_from_u64(7);
        let endings: Vec<Ending> = (0..64).map(|_| ending(&mut rng)).collect();
        assert!(endings.contains(&Ending::Revoke) && endings.contains(&Ending::Expire));
    }
}
