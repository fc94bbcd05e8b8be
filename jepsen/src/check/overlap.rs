//! Lease real-time overlap (`lease-overlap`): no two holders of a lock,
//! and no two leaders of an election, at once by the clock, beyond a drift
//! bound.
//!
//! # Rule
//! A grant with token T — an `acquire` ok of lock L, or a `campaign` ok of
//! election E (a leadership) — is *believed held* from the time its `ok`
//! was recorded until the earliest of:
//! - the invoke of a `release` of T on L, or of a `resign` of T on E (the
//!   holder stops relying on the grant before it asks to let go);
//! - a `hold-lost` event for T on L or E — the client's lease deadline
//!   passed. If the event's value carries `"deadline"` (history ns at which
//!   the client's local deadline fell), that time is used when it is
//!   earlier. A `hold-lost` belongs to an election when its value says
//!   `"namespace": "election"`, to a lock otherwise;
//! - a client pause (a nemesis event `pause` or `client-pause` whose value
//!   has `"target": "client"`) that names the held `token`: a stopped
//!   process acts on nothing, and when it resumes past its deadline it is
//!   the stale holder that fencing, not the lease, must stop
//!   (`fenced-writes` checks that it was stopped);
//! - the end of the history.
//!
//! No grant of a lock or election may be made while an earlier grant of
//! it, with another token, is still believed held, more than
//! [`CheckOptions::drift_bound`] before that belief ends: the overlap is
//! measured from the later grant to the end of the earlier belief, however
//! soon the later holder lets go. (A stale holder trusting its lock for a
//! second while twenty short holds come and go has overlapped every one of
//! them; measuring each pair's common time alone, as this checker did
//! until the harness could cut a live holder off, let holds shorter than
//! the bound hide it.) latchkey's client reports a lease lost
//! from its own monotonic deadline, which the server never undercuts
//! (`docs/semantics.md`, invariant 4), so an overlap means the client
//! trusted a lock or leadership that was already someone else's. A holder
//! that neither releases nor reports a loss is taken to believe it holds
//! the grant to the end of the history. Tokens are unique across locks and
//! elections, so a pause naming a token names one grant.
//!
//! # Limits
//! The check trusts the harness to record `hold-lost` promptly. A client
//! stopped without the event naming its token records its loss only when
//! it resumes; with `deadline` in its `hold-lost` that is still the right
//! time, without it this shows up as an overlap.
//!
//! # Not done yet
//! - Leases held without a lock or leadership (workload `lease`) are not
//!   checked for time: there is nothing a second holder could overlap.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;

use super::calls::{field, field_u64, in_history_order, Event, Paired, Unreadable};
use super::tokens::{grants, Grant};
use super::violations::{self, Violation};
use super::{CheckOptions, CheckerResult};

/// What ended a believed hold, and when (history ns).
#[derive(Debug, Clone, Copy)]
struct End<'a> {
    time_ns: u64,
    /// The op that shows it; `None` for the end of the history.
    evidence: Option<Event<'a>>,
    what: &'static str,
}

#[derive(Debug, Clone, Copy)]
struct Hold<'a> {
    grant: Grant<'a>,
    start_ns: u64,
    end_ns: u64,
    end: End<'a>,
}

/// A lock or an election: (namespace, name).
type Object<'a> = (&'a str, &'a str);

/// `None` when no lock or election was ever granted.
pub fn check(paired: &Paired<'_>, options: &CheckOptions) -> Option<CheckerResult> {
    let mut unreadable = Unreadable::default();
    let all_grants = grants(&paired.calls, &mut unreadable);
    if all_grants.is_empty() {
        return None;
    }
    let ends = hold_ends(paired, &mut unreadable);
    let mut objects: BTreeMap<Object<'_>, Vec<Hold<'_>>> = BTreeMap::new();
    let mut seen: HashMap<(Object<'_>, u64), usize> = HashMap::new();
    for grant in all_grants {
        let object = (grant.namespace, grant.name);
        let holds = objects.entry(object).or_default();
        let start_ns = grant
            .call
            .complete_time()
            .unwrap_or(grant.call.invoke_time());
        if let Some(&i) = seen.get(&(object, grant.token)) {
            // The same grant again (an idempotent acquire).
            holds[i].start_ns = holds[i].start_ns.min(start_ns);
            continue;
        }
        let end = ends.end_of(&grant).unwrap_or(End {
            time_ns: paired.end_time,
            evidence: None,
            what: "the end of the history, never released or lost",
        });
        seen.insert((object, grant.token), holds.len());
        holds.push(Hold {
            grant,
            start_ns,
            end_ns: end.time_ns.max(start_ns),
            end,
        });
    }
    let mut violations = Vec::new();
    for ((namespace, name), holds) in &mut objects {
        violations.extend(overlaps(namespace, name, holds, options.drift_bound));
    }
    let count: usize = objects.values().map(Vec::len).sum();
    let locks = objects.keys().filter(|(namespace, _)| *namespace == "lock");
    let locks = locks.count();
    let checked = format!(
        "{count} grants of {locks} locks and {} elections, drift bound {:?}",
        objects.len() - locks,
        options.drift_bound
    );
    Some(violations::result(
        "lease-overlap",
        &checked,
        violations,
        &unreadable,
    ))
}

/// The earliest end of each hold: releases, resigns and `hold-lost` by
/// object and token, client pauses by token (tokens are unique across
/// locks and elections).
#[derive(Default)]
struct Ends<'a> {
    by_grant: HashMap<(Object<'a>, u64), End<'a>>,
    by_token: HashMap<u64, End<'a>>,
}

impl<'a> Ends<'a> {
    fn end_of(&self, grant: &Grant<'_>) -> Option<End<'a>> {
        let by_grant = self
            .by_grant
            .get(&((grant.namespace, grant.name), grant.token));
        let by_token = self.by_token.get(&grant.token);
        by_grant
            .into_iter()
            .chain(by_token)
            .min_by_key(|end| end.time_ns)
            .copied()
    }

    fn note(&mut self, key: Option<Object<'a>>, token: u64, end: End<'a>) {
        let current = match key {
            Some(object) => self.by_grant.entry((object, token)).or_insert(end),
            None => self.by_token.entry(token).or_insert(end),
        };
        if end.time_ns < current.time_ns {
            *current = end;
        }
    }
}

fn hold_ends<'a>(paired: &'a Paired<'a>, unreadable: &mut Unreadable) -> Ends<'a> {
    let mut ends = Ends::default();
    for call in &paired.calls {
        let (namespace, what) = match call.f() {
            "release" => ("lock", "its release"),
            "resign" => ("election", "its resign"),
            _ => continue,
        };
        let Some(token) = field_u64(&call.invoke.value, "token") else {
            unreadable.note(call.invoke, "release or resign without an unsigned token");
            continue;
        };
        let end = End {
            time_ns: call.invoke_time(),
            evidence: Some(Event {
                op: call.invoke,
                at: call.invoke_at,
            }),
            what,
        };
        ends.note(Some((namespace, call.key().unwrap_or(""))), token, end);
    }
    for event in events_and_pauses(paired) {
        let value = &event.op.value;
        let (token, time_ns, what) = match (event.op.f.as_str(), field_u64(value, "token")) {
            ("hold-lost", Some(token)) => {
                let deadline = field_u64(value, "deadline").unwrap_or(u64::MAX);
                (token, event.op.time.min(deadline), "its hold-lost")
            }
            ("hold-lost", None) => {
                unreadable.note(event.op, "hold-lost without an unsigned token");
                continue;
            }
            ("pause" | "client-pause", Some(token)) if is_client(value) => {
                (token, event.op.time, "a pause of its client")
            }
            _ => continue,
        };
        let end = End {
            time_ns,
            evidence: Some(event),
            what,
        };
        let object = (event.op.f == "hold-lost").then(|| {
            let namespace = match field(value, "namespace").and_then(Value::as_str) {
                Some("election") => "election",
                _ => "lock",
            };
            (namespace, event.op.key.as_deref().unwrap_or(""))
        });
        ends.note(object, token, end);
    }
    ends
}

/// Every single event, and both halves of each nemesis `pause` call (a
/// client pause is a single event, or either half of a nemesis call).
fn events_and_pauses<'a>(paired: &'a Paired<'a>) -> impl Iterator<Item = Event<'a>> + 'a {
    let pause_halves = paired
        .calls
        .iter()
        .filter(|call| call.f() == "pause")
        .flat_map(|call| {
            let invoke = Event {
                op: call.invoke,
                at: call.invoke_at,
            };
            let completion = call.completion.zip(call.complete_at);
            std::iter::once(invoke).chain(completion.map(|(op, at)| Event { op, at }))
        });
    paired.events.iter().copied().chain(pause_halves)
}

fn is_client(value: &Value) -> bool {
    field(value, "target").and_then(Value::as_str) == Some("client")
}

/// Holds of one lock or election granted more than `drift` before an
/// earlier hold's belief ended: each hold is compared with the
/// earlier-starting hold that ends last, whose belief it undercuts most.
fn overlaps(
    namespace: &str,
    name: &str,
    holds: &mut [Hold<'_>],
    drift: Duration,
) -> Vec<Violation> {
    holds.sort_by_key(|hold| (hold.start_ns, hold.grant.call.invoke_at));
    let drift_ns = u64::try_from(drift.as_nanos()).unwrap_or(u64::MAX);
    let mut violations = Vec::new();
    let mut longest: Option<&Hold<'_>> = None;
    for hold in holds.iter() {
        if let Some(earlier) = longest {
            // Not `min(earlier.end, hold.end)`: see the module docs.
            let overlap_ns = earlier.end_ns.saturating_sub(hold.start_ns);
            if overlap_ns > drift_ns {
                violations.push(violation(namespace, name, earlier, hold, overlap_ns));
            }
        }
        if longest.is_none_or(|earlier| hold.end_ns > earlier.end_ns) {
            longest = Some(hold);
        }
    }
    violations
}

fn violation(
    namespace: &str,
    name: &str,
    earlier: &Hold<'_>,
    later: &Hold<'_>,
    overlap_ns: u64,
) -> Violation {
    let evidence: Vec<&Event<'_>> = earlier.end.evidence.iter().collect();
    let held = if namespace == "election" {
        "two leaders at once"
    } else {
        "two holders at once"
    };
    Violation {
        message: format!(
            "{namespace} {name:?}, {held}: {} was believed held until {}, {:?} after {} was granted",
            earlier.grant.describe(),
            earlier.end.what,
            Duration::from_nanos(overlap_ns),
            later.grant.describe()
        ),
        ops: in_history_order(&[earlier.grant.call, later.grant.call], &evidence),
    }
}

#[cfg(test)]
mod tests {
    use crate::check::{check_history, CheckOptions, Validity};
    use crate::history::{Op, OpType, Process};
    use serde_json::{json, Value};

    fn op(time_ms: u64, process: u64, kind: OpType, f: &str, value: Value) -> Op {
        Op {
            index: 0,
            time: time_ms * 1_000_000,
            process: Process::Client(process),
            kind,
            f: f.into(),
            key: Some("L".into()),
            value,
            term: None,
            raft_index: None,
            error: None,
        }
    }

    /// Holder 0 trusts token 1 until its deadline at 1 000 ms; holder 1 is
    /// granted token 2 at `granted_ms` and releases it 20 ms later.
    fn history(granted_ms: u64) -> Vec<Op> {
        let mut ops = vec![
            op(0, 0, OpType::Invoke, "acquire", json!({"lease": 1})),
            op(
                10,
                0,
                OpType::Ok,
                "acquire",
                json!({"lease": 1, "token": 1}),
            ),
            op(20, 1, OpType::Invoke, "acquire", json!({"lease": 2})),
            op(
                granted_ms,
                1,
                OpType::Ok,
                "acquire",
                json!({"lease": 2, "token": 2}),
            ),
            op(
                granted_ms + 20,
                1,
                OpType::Invoke,
                "release",
                json!({"lease": 2, "token": 2}),
            ),
            op(
                granted_ms + 25,
                1,
                OpType::Ok,
                "release",
                json!({"lease": 2, "token": 2}),
            ),
            op(
                1200,
                0,
                OpType::Info,
                "hold-lost",
                json!({"lease": 1, "token": 1, "deadline": 1_000_000_000}),
            ),
            op(
                1210,
                0,
                OpType::Invoke,
                "release",
                json!({"lease": 1, "token": 1}),
            ),
            op(
                1220,
                0,
                OpType::Fail,
                "release",
                json!({"lease": 1, "token": 1}),
            ),
        ];
        ops.sort_by_key(|op| op.time);
        for (index, op) in ops.iter_mut().enumerate() {
            op.index = index as u64;
        }
        ops
    }

    fn verdict(ops: &[Op]) -> Validity {
        let results = check_history(ops, &CheckOptions::default());
        results
            .checkers
            .iter()
            .find(|c| c.name == "lease-overlap")
            .map(|c| c.valid)
            .expect("lease-overlap ran")
    }

    #[test]
    fn a_short_hold_granted_while_an_earlier_holder_still_trusts_its_lock_is_an_overlap() {
        // Token 2 is held for 20 ms only, well under the 50 ms bound, but
        // granted 700 ms before holder 0 stopped trusting token 1.
        assert_eq!(verdict(&history(300)), Validity::Invalid);
    }

    #[test]
    fn a_grant_within_the_drift_bound_of_the_earlier_deadline_is_no_overlap() {
        assert_eq!(verdict(&history(960)), Validity::Valid);
    }
}
