//! Leases (`leases`): a lease that is gone stays gone.
//!
//! - Every `grant` ok returns a lease id no other grant returned.
//! - Once a `revoke` of lease L completed `ok`, or a `keepalive` of L
//!   completed `fail` (the server no longer had it), no `keepalive` of L
//!   invoked afterwards may succeed.
//!
//! Expiry timing is `lease-overlap`'s business; this checker only needs
//! real-time order.

use std::collections::HashMap;

use serde_json::Value;

use super::calls::{field, in_history_order, Call, Outcome, Paired, Unreadable};
use super::violations::{self, Violation};
use super::CheckerResult;

/// `None` when the history has no lease ops.
pub fn check(paired: &Paired<'_>) -> Option<CheckerResult> {
    let mut unreadable = Unreadable::default();
    let lease_calls = lease_ids(paired, &mut unreadable);
    if lease_calls.is_empty() && unreadable.count == 0 {
        return None;
    }
    let mut violations = Vec::new();
    let mut granted: HashMap<&str, &Call<'_>> = HashMap::new();
    // The earliest completed proof, per lease, that the lease is gone.
    let mut gone: HashMap<&str, &Call<'_>> = HashMap::new();
    for (call, lease) in &lease_calls {
        match (call.f(), call.outcome()) {
            ("grant", Outcome::Ok) => {
                if let Some(first) = granted.insert(lease, call) {
                    violations.push(Violation {
                        message: format!(
                            "lease {lease} granted twice: ops {} and {}",
                            first.invoke.index, call.invoke.index
                        ),
                        ops: in_history_order(&[first, call], &[]),
                    });
                }
            }
            ("revoke", Outcome::Ok) | ("keepalive", Outcome::Fail) => {
                let earliest = gone.entry(lease).or_insert(call);
                if call.complete_at < earliest.complete_at {
                    *earliest = call;
                }
            }
            _ => {}
        }
    }
    for (call, lease) in &lease_calls {
        let Some(end) = gone.get(lease.as_str()) else {
            continue;
        };
        let alive = call.f() == "keepalive" && call.outcome() == Outcome::Ok;
        if alive && end.complete_at < Some(call.invoke_at) {
            violations.push(Violation {
                message: format!(
                    "lease {lease} came back: keepalive op {} succeeded after op {} ({} {:?}) showed it gone",
                    call.invoke.index,
                    end.invoke.index,
                    end.f(),
                    end.outcome()
                ),
                ops: in_history_order(&[end, call], &[]),
            });
        }
    }
    let checked = format!(
        "{} lease ops, {} leases granted",
        lease_calls.len(),
        granted.len()
    );
    Some(violations::result(
        "leases",
        &checked,
        violations,
        &unreadable,
    ))
}

/// Lease calls with the lease id they concern (the id a grant returned).
fn lease_ids<'a>(
    paired: &'a Paired<'a>,
    unreadable: &mut Unreadable,
) -> Vec<(&'a Call<'a>, String)> {
    let mut calls = Vec::new();
    for call in &paired.calls {
        let value = match call.f() {
            "grant" if call.outcome() == Outcome::Ok => {
                call.completion.map_or(&Value::Null, |op| &op.value)
            }
            "grant" => continue,
            "keepalive" | "revoke" => &call.invoke.value,
            _ => continue,
        };
        match field(value, "lease") {
            Some(lease) => calls.push((call, lease.to_string())),
            None => unreadable.note(call.invoke, "lease op without a lease id"),
        }
    }
    calls
}
