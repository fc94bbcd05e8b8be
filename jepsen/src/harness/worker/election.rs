//! Workload `election`: candidates campaign, proclaim and resign; observers
//! record every change of leader they are shown.
//!
//! A candidate keeps a lease (`grant`, reused until lost), `campaign`s on
//! the election with a value of its own (waiting at most [`ACQUIRE_WAIT`]),
//! and once elected `proclaim`s a few new values and `resign`s. Every
//! leadership it won ends in a recorded `resign`, even one whose lease was
//! lost: an unrecorded resignation (the client's best-effort one on drop)
//! would leave the checkers believing that lease still leads, so a later
//! campaign by it would look like a second leadership held at once.
//!
//! While it leads, a candidate records `hold-lost` the moment its client
//! reports the leadership's lease lost, as the lock worker does for a held
//! lock: key = the election, value `{"token", "lease", "deadline"?,
//! "namespace": "election"}`, where `deadline` is the history time at which
//! the client's local deadline fell (a stopped candidate notices late). The
//! watcher stops once the leadership's `resign` is recorded. This is what
//! lets `lease-overlap` judge leaderships by the clock.
//!
//! An observer follows [`latchkey_client::Election::observe`] and records
//! each change as an `observe` info event; when the stream gives up it
//! opens a new one after [`OBSERVE_RESTART`].

use std::time::Duration;

use futures::StreamExt;
use latchkey_client::{Client, GrantInfo, Leadership, Lease, LeaseState};
use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{json, Value};

use super::{
    grant, send, think, watch_lost, Finished, FromWorker, Link, Outcome, WorkerSpec, ACQUIRE_WAIT,
};

/// Most `proclaim`s of one leadership.
const PROCLAIMS_MAX: u32 = 3;
/// How often an observer waiting for news checks whether to finish.
const FINISH_POLL: Duration = Duration::from_millis(100);
/// Pause before an observer opens a new stream after one gave up.
const OBSERVE_RESTART: Duration = Duration::from_millis(200);

pub(super) async fn election(
    spec: &WorkerSpec,
    client: &Client,
    link: &mut Link,
    rng: &mut StdRng,
) -> Result<std::convert::Infallible, Finished> {
    if spec.observer {
        return observer(spec, client, link).await;
    }
    let mut values = Values::new(spec.slot);
    let mut lease: Option<Lease> = None;
    // Bounded by the harness: it sends `finish` at the end of the run.
    loop {
        think(rng).await;
        let current = match lease.take().filter(|l| l.state() != LeaseState::Lost) {
            Some(current) => current,
            None => match grant(spec, client, link).await? {
                Some(granted) => granted,
                None => continue,
            },
        };
        lease = Some(current.clone());
        let Some(leadership) = campaign(spec, client, link, &current, values.next()).await? else {
            continue;
        };
        let watcher = watch_leadership(spec, &leadership);
        let lead = match link.cut_if_armed(leadership.token().0).await {
            Ok(()) => lead(spec, link, rng, &leadership, &mut values).await,
            Err(finished) => Err(finished),
        };
        let resigned = resign(spec, link, leadership).await;
        watcher.abort();
        lead?;
        resigned?;
    }
}

/// Values a candidate publishes: `w<slot>-<n>`, never the same twice in a
/// run, so that an observed value names the publish it came from.
struct Values {
    slot: u64,
    next: u64,
}

impl Values {
    fn new(slot: u64) -> Values {
        Values { slot, next: 0 }
    }

    fn next(&mut self) -> String {
        self.next += 1;
        format!("w{}-{}", self.slot, self.next)
    }
}

async fn campaign(
    spec: &WorkerSpec,
    client: &Client,
    link: &mut Link,
    lease: &Lease,
    value: String,
) -> Result<Option<Leadership>, Finished> {
    let key = Some(spec.election.as_str());
    let lease_id = lease.id().0;
    link.invoke("campaign", key, json!({"lease": lease_id, "value": value}))
        .await?;
    let election = client.election(spec.election.as_str());
    match election
        .campaign_with_timeout(lease, value.clone(), ACQUIRE_WAIT)
        .await
    {
        Ok(leadership) => {
            // The value the server answered with: a lease that already led
            // (an earlier campaign that timed out but won) gets its
            // leadership back with the value it led with, not this one.
            let shown = String::from_utf8_lossy(leadership.value());
            let record = elected(leadership.token().0, lease_id, &shown);
            link.complete("campaign", key, Outcome::ok(record));
            Ok(Some(leadership))
        }
        Err(error) => {
            let record = json!({"lease": lease_id, "value": value});
            link.complete("campaign", key, Outcome::error(&error, record));
            Ok(None)
        }
    }
}

/// As leader: a few `proclaim`s, whether or not the lease still lives (a
/// proclaim by a deposed leader must fail).
async fn lead(
    spec: &WorkerSpec,
    link: &mut Link,
    rng: &mut StdRng,
    leadership: &Leadership,
    values: &mut Values,
) -> Result<(), Finished> {
    let key = Some(spec.election.as_str());
    for _ in 0..rng.gen_range(1..=PROCLAIMS_MAX) {
        think(rng).await;
        let value = values.next();
        let record = proclaimed(leadership.token().0, &value);
        link.invoke_always("proclaim", key, record.clone()).await?;
        let outcome = match leadership.proclaim(value).await {
            Ok(()) => Outcome::ok(record),
            Err(error) => Outcome::error(&error, record),
        };
        link.complete("proclaim", key, outcome);
    }
    Ok(())
}

async fn resign(
    spec: &WorkerSpec,
    link: &mut Link,
    leadership: Leadership,
) -> Result<(), Finished> {
    let key = Some(spec.election.as_str());
    let record = json!({"token": leadership.token().0, "lease": leadership.lease().id().0});
    link.invoke_always("resign", key, record.clone()).await?;
    let outcome = match leadership.resign().await {
        Ok(()) => Outcome::ok(record),
        Err(error) => Outcome::error(&error, record),
    };
    link.complete("resign", key, outcome);
    Ok(())
}

/// Records `hold-lost` (see the module docs) when `leadership`'s lease is
/// lost; the caller aborts the watcher once the leadership is over.
fn watch_leadership(spec: &WorkerSpec, leadership: &Leadership) -> tokio::task::JoinHandle<()> {
    let lease = leadership.lease();
    let value =
        json!({"token": leadership.token().0, "lease": lease.id().0, "namespace": "election"});
    let key = spec.election.clone();
    watch_lost(
        leadership.lost(),
        lease,
        key,
        value,
        spec.run_start_monotonic_ns,
    )
}

/// Records every change the observe stream shows until asked to finish.
async fn observer(
    spec: &WorkerSpec,
    client: &Client,
    link: &mut Link,
) -> Result<std::convert::Infallible, Finished> {
    let election = client.election(spec.election.as_str());
    // Bounded by the harness: it sends `finish` at the end of the run.
    loop {
        let mut changes = Box::pin(election.observe());
        // Bounded by the stream: it ends (or errs) after its own retries.
        loop {
            if link.finished() {
                return Err(Finished);
            }
            let change = tokio::select! {
                change = changes.next() => change,
                () = tokio::time::sleep(FINISH_POLL) => continue,
            };
            match change {
                Some(Ok(leader)) => send(&FromWorker::Event {
                    f: "observe".into(),
                    key: Some(spec.election.clone()),
                    value: observation(leader.as_ref()),
                }),
                Some(Err(error)) => {
                    eprintln!("observe stream gave up: {error}");
                    break;
                }
                None => break,
            }
        }
        tokio::time::sleep(OBSERVE_RESTART).await;
    }
}

/// A `campaign` ok value (history.rs: `{"token", "lease", "value"}`).
fn elected(token: u64, lease: u64, value: &str) -> Value {
    json!({"token": token, "lease": lease, "value": value})
}

/// A `proclaim` value: `{"token", "value"}`.
fn proclaimed(token: u64, value: &str) -> Value {
    json!({"token": token, "value": value})
}

/// An `observe` value: the leader's grant, or `null` for "no leader".
fn observation(leader: Option<&GrantInfo>) -> Value {
    match leader {
        Some(leader) => json!({
            "token": leader.token.0,
            "lease": leader.lease.0,
            "value": String::from_utf8_lossy(&leader.value),
        }),
        None => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{check_history, CheckOptions, Validity};
    use crate::history::{Op, OpType, Process};
    use latchkey_client::{FencingToken, LeaseId, Revision};

    fn leader(token: u64, lease: u64, value: &str) -> GrantInfo {
        GrantInfo {
            name: "e".into(),
            lease: LeaseId(lease),
            token: FencingToken(token),
            value: value.as_bytes().to_vec(),
            revision: Revision(0),
        }
    }

    /// A history as the workers record it: candidate 1 campaigns and
    /// proclaims, observer 0 sees `shown`.
    fn history(shown: &str) -> Vec<Op> {
        let op = |process, kind, f: &str, value: Value| (process, kind, f.to_string(), value);
        let events = [
            op(
                1,
                OpType::Invoke,
                "campaign",
                json!({"lease": 5, "value": "w1-1"}),
            ),
            op(1, OpType::Ok, "campaign", elected(10, 5, "w1-1")),
            op(
                0,
                OpType::Info,
                "observe",
                observation(Some(&leader(10, 5, "w1-1"))),
            ),
            op(1, OpType::Invoke, "proclaim", proclaimed(10, "w1-2")),
            op(1, OpType::Ok, "proclaim", proclaimed(10, "w1-2")),
            op(
                0,
                OpType::Info,
                "observe",
                observation(Some(&leader(10, 5, shown))),
            ),
            op(
                1,
                OpType::Invoke,
                "resign",
                json!({"token": 10, "lease": 5}),
            ),
            op(1, OpType::Ok, "resign", json!({"token": 10, "lease": 5})),
            op(0, OpType::Info, "observe", observation(None)),
        ];
        events
            .into_iter()
            .enumerate()
            .map(|(index, (process, kind, f, value))| Op {
                index: index as u64,
                time: index as u64 * 1000,
                process: Process::Client(process),
                kind,
                f,
                key: Some("e".into()),
                value,
                term: None,
                raft_index: None,
                error: None,
            })
            .collect()
    }

    fn election_leaders(ops: &[Op]) -> Validity {
        let results = check_history(ops, &CheckOptions::default());
        let checker = results
            .checkers
            .iter()
            .find(|c| c.name == "election-leaders")
            .expect("election-leaders ran on campaigns and observations");
        checker.valid
    }

    #[test]
    fn recorded_elections_are_read_by_the_checker_down_to_the_published_values() {
        assert_eq!(election_leaders(&history("w1-2")), Validity::Valid);
        assert_eq!(election_leaders(&history("w7-7")), Validity::Invalid);
    }

    #[test]
    fn an_observation_shows_token_lease_and_the_value_as_text() {
        let leader = GrantInfo {
            name: "jepsen-election".into(),
            lease: LeaseId(7),
            token: FencingToken(12),
            value: b"w3-4".to_vec(),
            revision: Revision(0),
        };
        assert_eq!(
            observation(Some(&leader)),
            json!({"token": 12, "lease": 7, "value": "w3-4"})
        );
        assert_eq!(observation(None), Value::Null);
    }

    #[test]
    fn published_values_are_never_repeated_across_candidates() {
        let (mut a, mut b) = (Values::new(1), Values::new(2));
        let seen: std::collections::HashSet<String> =
            (0..3).flat_map(|_| [a.next(), b.next()]).collect();
        assert_eq!(seen.len(), 6);
    }
}
