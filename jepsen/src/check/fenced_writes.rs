//! Fenced writes (`fenced-writes`): no stale write accepted, no
//! acknowledged write lost.
//!
//! A *fenced write* is a `write` whose value carries `token` (and `lock`,
//! the lock the token was granted by). Three rules, each needing only
//! real-time order:
//!
//! 1. **Stale write accepted.** A fenced write with token T for lock L that
//!    completed `ok` must not have been invoked after (a) a grant of L with
//!    a token above T completed, or (b) a release of T completed. Either
//!    way T was no longer L's current grant at any point the write could
//!    have been applied, and the store must refuse it.
//! 2. **Acknowledged write lost.** Let W be the acknowledged fenced write
//!    with the highest token among those to key K that completed before a
//!    read R of K was invoked. The store never lowers a key's token, so R
//!    must return a value written with a token of at least W's: R may not
//!    return "absent", nor a value that only writes with lower tokens wrote.
//!    (Reads of values that an unfenced write or a `cas` could have written
//!    are skipped: their token is not known. A read of a value nobody wrote
//!    is left to `fenced-registers`.) The final reads of a run are reads
//!    like any other, so they must reflect every acknowledged write.
//! 3. **Lost increment.** latchkey's `lock-fenced` workload is a counter:
//!    each holder reads V and writes V+1 under its token, so every value
//!    written to a key is new. Two acknowledged fenced writes of the same
//!    value to the same key mean two holders both read V and both writes
//!    were accepted: one increment is lost. This rule assumes that workload
//!    (values never legitimately repeat on a fenced key).

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use super::calls::{field, field_u64, in_history_order, Call, Outcome, Paired, Unreadable};
use super::register::unwrap_value;
use super::tokens::{grants, Grant};
use super::violations::{self, Violation};
use super::CheckerResult;

/// A write that carries a token.
#[derive(Debug, Clone, Copy)]
struct FencedWrite<'a> {
    call: &'a Call<'a>,
    key: &'a str,
    lock: Option<&'a str>,
    token: u64,
    value: &'a Value,
}

/// `None` when the history has no fenced writes.
pub fn check(paired: &Paired<'_>) -> Option<CheckerResult> {
    let mut unreadable = Unreadable::default();
    let writes = fenced_writes(&paired.calls, &mut unreadable);
    if writes.is_empty() && unreadable.count == 0 {
        return None;
    }
    let acknowledged: Vec<FencedWrite<'_>> = writes
        .iter()
        .filter(|write| write.call.outcome() == Outcome::Ok)
        .copied()
        .collect();
    let mut violations = stale_writes(paired, &acknowledged, &mut unreadable);
    let mut keys: BTreeMap<&str, Vec<FencedWrite<'_>>> = BTreeMap::new();
    for write in &acknowledged {
        keys.entry(write.key).or_default().push(*write);
    }
    let mut key_calls: HashMap<&str, Vec<&Call<'_>>> = HashMap::new();
    for call in &paired.calls {
        let key = call.key().unwrap_or("");
        if keys.contains_key(key) {
            key_calls.entry(key).or_default().push(call);
        }
    }
    for (key, writes) in &keys {
        let calls = key_calls.get(key).map_or(&[][..], Vec::as_slice);
        violations.extend(lost_writes(key, calls, writes));
        violations.extend(repeated_values(key, writes));
    }
    let checked = format!(
        "{} fenced writes ({} acknowledged) to {} keys",
        writes.len(),
        acknowledged.len(),
        keys.len()
    );
    Some(violations::result(
        "fenced-writes",
        &checked,
        violations,
        &unreadable,
    ))
}

fn fenced_writes<'a>(calls: &'a [Call<'a>], unreadable: &mut Unreadable) -> Vec<FencedWrite<'a>> {
    let mut writes = Vec::new();
    for call in calls.iter().filter(|call| call.f() == "write") {
        let input = &call.invoke.value;
        if field(input, "token").is_none() {
            continue;
        }
        let Some(token) = field_u64(input, "token") else {
            unreadable.note(call.invoke, "token is not an unsigned integer");
            continue;
        };
        writes.push(FencedWrite {
            call,
            key: call.key().unwrap_or(""),
            lock: field(input, "lock").and_then(Value::as_str),
            token,
            value: unwrap_value(input),
        });
    }
    writes
}

/// Rule 1.
fn stale_writes(
    paired: &Paired<'_>,
    acknowledged: &[FencedWrite<'_>],
    unreadable: &mut Unreadable,
) -> Vec<Violation> {
    let lock_grants: Vec<Grant<'_>> = grants(&paired.calls, unreadable)
        .into_iter()
        .filter(|grant| grant.namespace == "lock")
        .collect();
    let mut releases: HashMap<(&str, u64), &Call<'_>> = HashMap::new();
    for call in &paired.calls {
        let token = field_u64(&call.invoke.value, "token");
        if let (Some(token), "release", Outcome::Ok) = (token, call.f(), call.outcome()) {
            releases
                .entry((call.key().unwrap_or(""), token))
                .or_insert(call);
        }
    }
    let mut violations = Vec::new();
    for write in acknowledged {
        let Some(lock) = write.lock else { continue };
        let before = |call: &Call<'_>| call.complete_at < Some(write.call.invoke_at);
        let newer = lock_grants
            .iter()
            .find(|grant| grant.name == lock && grant.token > write.token && before(grant.call));
        let released = releases
            .get(&(lock, write.token))
            .filter(|call| before(call));
        let (why, call) = match (newer, released) {
            (Some(grant), _) => (format!("after {} completed", grant.describe()), grant.call),
            (None, Some(release)) => (
                format!(
                    "after its grant was released by op {}",
                    release.invoke.index
                ),
                *release,
            ),
            (None, None) => continue,
        };
        violations.push(Violation {
            message: format!(
                "stale write accepted: op {} wrote key {:?} with token {} of lock {lock:?}, invoked {why}",
                write.call.invoke.index, write.key, write.token
            ),
            ops: in_history_order(&[call, write.call], &[]),
        });
    }
    violations
}

/// Rule 2 for one key: `calls` are all its calls, `writes` its
/// acknowledged fenced writes.
fn lost_writes(key: &str, calls: &[&Call<'_>], writes: &[FencedWrite<'_>]) -> Vec<Violation> {
    let mut writers: HashMap<String, Vec<&Call<'_>>> = HashMap::new();
    for call in calls.iter().filter(|call| call.outcome() != Outcome::Fail) {
        if let Some(value) = written_value(call) {
            writers.entry(value.to_string()).or_default().push(call);
        }
    }
    // The highest-token acknowledged write among those completed so far.
    let mut by_completion: Vec<&FencedWrite<'_>> = writes.iter().collect();
    by_completion.sort_by_key(|write| write.call.complete_at);
    let mut highest_so_far: Vec<&FencedWrite<'_>> = Vec::with_capacity(by_completion.len());
    for write in by_completion {
        let highest = match highest_so_far.last() {
            Some(high) if high.token >= write.token => *high,
            _ => write,
        };
        highest_so_far.push(highest);
    }
    let mut violations = Vec::new();
    for read in calls
        .iter()
        .filter(|c| c.f() == "read" && c.outcome() == Outcome::Ok)
    {
        let done = highest_so_far.partition_point(|w| w.call.complete_at < Some(read.invoke_at));
        let Some(highest) = done.checked_sub(1).map(|i| highest_so_far[i]) else {
            continue;
        };
        let value = unwrap_value(read.completion.map_or(&Value::Null, |op| &op.value));
        let candidates: Vec<&Call<'_>> = writers
            .get(&value.to_string())
            .into_iter()
            .flatten()
            .copied()
            .filter(|call| Some(call.invoke_at) < read.complete_at)
            .collect();
        if !value.is_null() && candidates.is_empty() {
            continue; // nobody wrote it: fenced-registers reports that
        }
        let tokens: Option<Vec<u64>> = candidates
            .iter()
            .map(|call| field_u64(&call.invoke.value, "token"))
            .collect();
        // `None`: an unfenced write or a cas could have written it.
        let Some(best) = tokens.map(|tokens| tokens.into_iter().max()) else {
            continue;
        };
        if best.is_some_and(|token| token >= highest.token) {
            continue;
        }
        let mut witness = vec![highest.call, *read];
        witness.extend(
            candidates
                .iter()
                .max_by_key(|c| field_u64(&c.invoke.value, "token")),
        );
        violations.push(Violation {
            message: format!(
                "acknowledged write lost: read op {} of key {key:?} returned {value}, \
                 which only lower tokens wrote, after op {} (token {}) was acknowledged",
                read.invoke.index, highest.call.invoke.index, highest.token
            ),
            ops: in_history_order(&witness, &[]),
        });
    }
    violations
}

/// The value `call` (a write or cas) leaves in the register.
fn written_value<'a>(call: &Call<'a>) -> Option<&'a Value> {
    let input = &call.invoke.value;
    match call.f() {
        "write" => Some(unwrap_value(input)),
        "cas" => field(input, "to").or_else(|| input.as_array().and_then(|pair| pair.get(1))),
        _ => None,
    }
}

/// Rule 3 for one key.
fn repeated_values(key: &str, writes: &[FencedWrite<'_>]) -> Vec<Violation> {
    let mut first: HashMap<String, &FencedWrite<'_>> = HashMap::new();
    let mut violations = Vec::new();
    for write in writes {
        let earlier = *first.entry(write.value.to_string()).or_insert(write);
        if earlier.call.invoke_at != write.call.invoke_at {
            violations.push(Violation {
                message: format!(
                    "lost increment: ops {} (token {}) and {} (token {}) both wrote {} to key {key:?} and both were acknowledged",
                    earlier.call.invoke.index,
                    earlier.token,
                    write.call.invoke.index,
                    write.token,
                    write.value
                ),
                ops: in_history_order(&[earlier.call, write.call], &[]),
            });
        }
    }
    violations
}
