//! Lease real-time overlap (`lease-overlap`): no two holders of a lock at
//! once, by the clock, beyond a drift bound.
//!
//! # Rule
//! A grant of lock L (an `acquire` ok with token T) is *believed held*
//! from the time its `ok` was recorded until the earliest of:
//! - the invoke of a `release` of T on L (the holder stops relying on the
//!   lock before it asks to let go);
//! - a `hold-lost` event for T on L — the client's lease deadline passed.
//!   If the event's value carries `"deadline"` (history ns at which the
//!   client's local deadline fell), that time is used when it is earlier;
//! - the end of the history.
//!
//! Two grants of the same lock with different tokens must not be believed
//! held at the same time for longer than [`CheckOptions::drift_bound`].
//! latchkey's client reports a lease lost from its own monotonic deadline,
//! which the server never undercuts (`docs/semantics.md`, invariant 4), so
//! an overlap means the client trusted a lock that was already someone
//! else's. A holder that neither releases nor reports a loss is taken to
//! believe it holds the lock to the end of the history.
//!
//! - a client `pause` (nemesis event, `"target": "client"`) whose value
//!   names the held `token`: a stopped process acts on nothing, and when it
//!   resumes past its deadline it is the stale holder that fencing, not
//!   the lease, must stop (`fenced-writes` checks that it was stopped).
//!
//! # Limits
//! The check trusts the harness to record `hold-lost` promptly. A client
//! stopped without the event naming its token records its loss only when
//! it resumes, and that shows up here as an overlap. Elections are not
//! checked: there is no `hold-lost` for leadership.

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

/// `None` when no lock was ever granted.
pub fn check(paired: &Paired<'_>, options: &CheckOptions) -> Option<CheckerResult> {
    let mut unreadable = Unreadable::default();
    let lock_grants: Vec<Grant<'_>> = grants(&paired.calls, &mut unreadable)
        .into_iter()
        .filter(|grant| grant.namespace == "lock")
        .collect();
    if lock_grants.is_empty() {
        return None;
    }
    let ends = hold_ends(paired, &mut unreadable);
    let mut locks: BTreeMap<&str, Vec<Hold<'_>>> = BTreeMap::new();
    let mut seen: HashMap<(&str, u64), usize> = HashMap::new();
    for grant in lock_grants {
        let holds = locks.entry(grant.name).or_default();
        let start_ns = grant
            .call
            .complete_time()
            .unwrap_or(grant.call.invoke_time());
        if let Some(&i) = seen.get(&(grant.name, grant.token)) {
            // The same grant again (an idempotent acquire).
            holds[i].start_ns = holds[i].start_ns.min(start_ns);
            continue;
        }
        let end = ends.end_of(&grant).unwrap_or(End {
            time_ns: paired.end_time,
            evidence: None,
            what: "the end of the history, never released or lost",
        });
        seen.insert((grant.name, grant.token), holds.len());
        holds.push(Hold {
            grant,
            start_ns,
            end_ns: end.time_ns.max(start_ns),
            end,
        });
    }
    let mut violations = Vec::new();
    for (name, holds) in &mut locks {
        violations.extend(overlaps(name, holds, options.drift_bound));
    }
    let count: usize = locks.values().map(Vec::len).sum();
    let checked = format!(
        "{count} grants of {} locks, drift bound {:?}",
        locks.len(),
        options.drift_bound
    );
    Some(violations::result(
        "lease-overlap",
        &checked,
        violations,
        &unreadable,
    ))
}

/// The earliest end of each hold: releases and `hold-lost` by lock and
/// token, client pauses by token (tokens are unique across locks).
#[derive(Default)]
struct Ends<'a> {
    by_grant: HashMap<(&'a str, u64), End<'a>>,
    by_token: HashMap<u64, End<'a>>,
}

impl<'a> Ends<'a> {
    fn end_of(&self, grant: &Grant<'_>) -> Option<End<'a>> {
        let by_grant = self.by_grant.get(&(grant.name, grant.token));
        let by_token = self.by_token.get(&grant.token);
        by_grant
            .into_iter()
            .chain(by_token)
            .min_by_key(|end| end.time_ns)
            .copied()
    }
}

fn earliest<'a, K: std::hash::Hash + Eq>(ends: &mut HashMap<K, End<'a>>, key: K, end: End<'a>) {
    let current = ends.entry(key).or_insert(end);
    if end.time_ns < current.time_ns {
        *current = end;
    }
}

fn hold_ends<'a>(paired: &'a Paired<'a>, unreadable: &mut Unreadable) -> Ends<'a> {
    let mut ends = Ends::default();
    for call in paired.calls.iter().filter(|call| call.f() == "release") {
        let Some(token) = field_u64(&call.invoke.value, "token") else {
            unreadable.note(call.invoke, "release without an unsigned token");
            continue;
        };
        let end = End {
            time_ns: call.invoke_time(),
            evidence: Some(Event {
                op: call.invoke,
                at: call.invoke_at,
            }),
            what: "its release",
        };
        earliest(&mut ends.by_grant, (call.key().unwrap_or(""), token), end);
    }
    // A client pause is a single event, or either half of a nemesis call.
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
    for event in paired.events.iter().copied().chain(pause_halves) {
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
            ("pause", Some(token)) if is_client(value) => {
                (token, event.op.time, "a pause of its client")
            }
            _ => continue,
        };
        let end = End {
            time_ns,
            evidence: Some(event),
            what,
        };
        if event.op.f == "hold-lost" {
            let lock = event.op.key.as_deref().unwrap_or("");
            earliest(&mut ends.by_grant, (lock, token), end);
        } else {
            earliest(&mut ends.by_token, token, end);
        }
    }
    ends
}

fn is_client(value: &Value) -> bool {
    field(value, "target").and_then(Value::as_str) == Some("client")
}

/// Pairs of holds of one lock that overlap by more than `drift`: each hold
/// is compared with the earlier-starting hold that ends last, which is the
/// one it overlaps most.
fn overlaps(name: &str, holds: &mut [Hold<'_>], drift: Duration) -> Vec<Violation> {
    holds.sort_by_key(|hold| (hold.start_ns, hold.grant.call.invoke_at));
    let drift_ns = u64::try_from(drift.as_nanos()).unwrap_or(u64::MAX);
    let mut violations = Vec::new();
    let mut longest: Option<&Hold<'_>> = None;
    for hold in holds.iter() {
        if let Some(earlier) = longest {
            let overlap_ns = earlier
                .end_ns
                .min(hold.end_ns)
                .saturating_sub(hold.start_ns);
            if overlap_ns > drift_ns {
                violations.push(violation(name, earlier, hold, overlap_ns));
            }
        }
        if longest.is_none_or(|earlier| hold.end_ns > earlier.end_ns) {
            longest = Some(hold);
        }
    }
    violations
}

fn violation(name: &str, earlier: &Hold<'_>, later: &Hold<'_>, overlap_ns: u64) -> Violation {
    let evidence: Vec<&Event<'_>> = earlier.end.evidence.iter().collect();
    Violation {
        message: format!(
            "lock {name:?}: {} was believed held until {}, {:?} after {} was granted",
            earlier.grant.describe(),
            earlier.end.what,
            Duration::from_nanos(overlap_ns),
            later.grant.describe()
        ),
        ops: in_history_order(&[earlier.grant.call, later.grant.call], &evidence),
    }
}
