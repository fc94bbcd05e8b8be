//! Leaders: of the Raft group (`raft-leaders`) and of elections
//! (`election-leaders`).
//!
//! **raft-leaders.** The harness polls every node and records `status`
//! events `{"node", "role", "term"}`. Raft elects at most one leader per
//! term, so two different nodes reported as leader in the same term is a
//! violation (whenever each report was taken).
//!
//! **election-leaders.** An election's leadership is a grant with a token.
//! - Each token belongs to one leadership: an `observe` that shows token T
//!   must show the lease that T's `campaign` returned, and the same
//!   election.
//! - Leaderships succeed each other with growing tokens: each observer
//!   (process and election) sees tokens that never go down.
//! - An observed value must be one the leader published under that token
//!   (its campaign value or a `proclaim` that did not fail).
//! - A campaign's value is the one its `ok` reports: a lease that already
//!   leads (an earlier campaign of it ended `info` but won) gets its
//!   leadership back with the value it leads with, and campaigning again
//!   publishes nothing. So an `ok` may report another value than its
//!   invoke's, but only one that its lease campaigned with (in that
//!   election) or that was proclaimed under its token.
//!
//! Uniqueness of campaign tokens and their real-time order are checked by
//! `fencing-tokens`, the mutual exclusion of leaderships by `fenced-mutex`.

use std::collections::HashMap;

use serde_json::Value;

use super::calls::{field, field_u64, in_history_order, Call, Event, Outcome, Paired, Unreadable};
use super::register::unwrap_value;
use super::tokens::{grants, Grant};
use super::violations::{self, Violation};
use super::CheckerResult;

/// `None` when the history has no leader `status` events.
pub fn check_raft(paired: &Paired<'_>) -> Option<CheckerResult> {
    let statuses: Vec<&Event<'_>> = paired
        .events
        .iter()
        .filter(|event| event.op.f == "status")
        .collect();
    if statuses.is_empty() {
        return None;
    }
    let mut unreadable = Unreadable::default();
    let mut leaders: HashMap<u64, &Event<'_>> = HashMap::new();
    let mut violations = Vec::new();
    for event in statuses {
        let value = &event.op.value;
        if field(value, "role").and_then(Value::as_str) != Some("leader") {
            continue;
        }
        let (Some(term), Some(node)) = (field_u64(value, "term"), field(value, "node")) else {
            unreadable.note(event.op, "leader status without term and node");
            continue;
        };
        let first = *leaders.entry(term).or_insert(event);
        if field(&first.op.value, "node") != Some(node) {
            violations.push(Violation {
                message: format!(
                    "two leaders in term {term}: node {} (op {}) and node {node} (op {})",
                    field(&first.op.value, "node").unwrap_or(&Value::Null),
                    first.op.index,
                    event.op.index
                ),
                ops: in_history_order(&[], &[first, event]),
            });
        }
    }
    let checked = format!("leaders of {} terms", leaders.len());
    Some(violations::result(
        "raft-leaders",
        &checked,
        violations,
        &unreadable,
    ))
}

/// `None` when the history has no campaigns or observations.
pub fn check_elections(paired: &Paired<'_>) -> Option<CheckerResult> {
    let observations: Vec<&Event<'_>> = paired
        .events
        .iter()
        .filter(|event| event.op.f == "observe")
        .collect();
    let mut unreadable = Unreadable::default();
    let campaigns: HashMap<u64, Grant<'_>> = grants(&paired.calls, &mut unreadable)
        .into_iter()
        .filter(|grant| grant.namespace == "election")
        .map(|grant| (grant.token, grant))
        .collect();
    if observations.is_empty() && campaigns.is_empty() {
        return None;
    }
    let published = published_values(paired);
    let mut last_seen: HashMap<(String, &str), &Event<'_>> = HashMap::new();
    let mut violations = answers_from_nowhere(paired);
    for event in &observations {
        let value = &event.op.value;
        if value.is_null() {
            continue; // "no leader"
        }
        let Some(token) = field_u64(value, "token") else {
            unreadable.note(event.op, "observation without an unsigned token");
            continue;
        };
        let election = event.op.key.as_deref().unwrap_or("");
        let observer = (event.op.process.to_string(), election);
        if let Some(previous) = last_seen.insert(observer, event) {
            let before = field_u64(&previous.op.value, "token").unwrap_or(0);
            if token < before {
                violations.push(Violation {
                    message: format!(
                        "election {election:?}: observer {} saw token {token} (op {}) after token {before} (op {})",
                        event.op.process, event.op.index, previous.op.index
                    ),
                    ops: in_history_order(&[], &[previous, event]),
                });
            }
        }
        if let Some(grant) = campaigns.get(&token) {
            violations.extend(disagreement(event, grant, &published));
        }
    }
    let checked = format!(
        "{} campaigns won, {} observations",
        campaigns.len(),
        observations.len()
    );
    Some(violations::result(
        "election-leaders",
        &checked,
        violations,
        &unreadable,
    ))
}

/// Values published under each election token: the values campaign `ok`s
/// report (their invoke's when they report none) and proclaims that did
/// not fail.
fn published_values<'a>(paired: &'a Paired<'a>) -> HashMap<u64, Vec<&'a Value>> {
    let mut published: HashMap<u64, Vec<&Value>> = HashMap::new();
    for call in &paired.calls {
        let (token, value) = match (call.f(), call.outcome()) {
            ("campaign", Outcome::Ok) => {
                let answer = call.completion.map(|op| &op.value);
                (
                    answer.and_then(|value| field_u64(value, "token")),
                    answer
                        .and_then(|value| field(value, "value"))
                        .or_else(|| field(&call.invoke.value, "value")),
                )
            }
            ("proclaim", Outcome::Ok | Outcome::Unknown) => (
                field_u64(&call.invoke.value, "token"),
                field(&call.invoke.value, "value"),
            ),
            _ => (None, None),
        };
        if let (Some(token), Some(value)) = (token, value) {
            published.entry(token).or_default().push(value);
        }
    }
    published
}

/// Campaign `ok`s that report a value other than their own which neither
/// their lease campaigned with in that election nor anyone proclaimed
/// under their token: a value from nowhere.
fn answers_from_nowhere(paired: &Paired<'_>) -> Vec<Violation> {
    let campaigns: Vec<&Call<'_>> = paired
        .calls
        .iter()
        .filter(|call| call.f() == "campaign")
        .collect();
    let mut violations = Vec::new();
    for call in &campaigns {
        let Some(answer) = call.completion.filter(|_| call.outcome() == Outcome::Ok) else {
            continue;
        };
        let (Some(shown), Some(token)) = (
            field(&answer.value, "value"),
            field_u64(&answer.value, "token"),
        ) else {
            continue;
        };
        if field(&call.invoke.value, "value") == Some(shown) {
            continue;
        }
        let lease = field(&call.invoke.value, "lease");
        let campaigned = campaigns.iter().any(|other| {
            other.key() == call.key()
                && field(&other.invoke.value, "lease") == lease
                && field(&other.invoke.value, "value") == Some(shown)
        });
        let proclaimed = paired.calls.iter().any(|other| {
            other.f() == "proclaim"
                && field_u64(&other.invoke.value, "token") == Some(token)
                && field(&other.invoke.value, "value") == Some(shown)
        });
        if !campaigned && !proclaimed {
            violations.push(Violation {
                message: format!(
                    "campaign op {} was answered with token {token} and value {shown}, which its lease never campaigned with and nobody proclaimed",
                    answer.index
                ),
                ops: in_history_order(&[call], &[]),
            });
        }
    }
    violations
}

/// What an observation of `grant`'s token shows that the grant does not.
fn disagreement(
    event: &Event<'_>,
    grant: &Grant<'_>,
    published: &HashMap<u64, Vec<&Value>>,
) -> Option<Violation> {
    let value = &event.op.value;
    let election = event.op.key.as_deref().unwrap_or("");
    let lease = field(value, "lease");
    let shown = field(value, "value").map(unwrap_value);
    let why = if grant.name != election {
        format!("token {} belongs to election {:?}", grant.token, grant.name)
    } else if lease.is_some() && grant.lease.is_some() && lease != grant.lease {
        format!(
            "it shows lease {}, but {}",
            lease.unwrap_or(&Value::Null),
            grant.describe()
        )
    } else if shown.is_some_and(|shown| {
        !published
            .get(&grant.token)
            .is_some_and(|values| values.contains(&shown))
    }) {
        format!("its value was never published under token {}", grant.token)
    } else {
        return None;
    };
    Some(Violation {
        message: format!(
            "observation op {} of election {election:?}: {why}",
            event.op.index
        ),
        ops: in_history_order(&[grant.call], &[event]),
    })
}
