//! Fencing tokens (`fencing-tokens`): unique, and increasing in real time.
//!
//! A *grant* is an `acquire` or `campaign` that completed `ok` with a
//! `token`. latchkey draws every token from one counter (`docs/semantics.md`,
//! invariant 1), so:
//! - **unique**: two grants with the same token are the same grant — same
//!   lock or election, same lease (an acquire by a lease that already holds
//!   the lock returns its grant again);
//! - **increasing in real time, per lock**: when grant A completed before
//!   grant B was invoked, B's token is above A's (or B is A again).
//!
//! Both are consequences of `fenced-mutex`'s model, but they need no
//! search, and their witnesses are two ops.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use super::calls::{field, field_u64, in_history_order, Call, Outcome, Paired, Unreadable};
use super::violations::{self, Violation};
use super::CheckerResult;

/// A successful acquire or campaign.
#[derive(Debug, Clone, Copy)]
pub struct Grant<'a> {
    pub call: &'a Call<'a>,
    /// `"lock"` or `"election"`.
    pub namespace: &'static str,
    pub name: &'a str,
    pub token: u64,
    pub lease: Option<&'a Value>,
}

impl Grant<'_> {
    fn same_grant(&self, other: &Grant<'_>) -> bool {
        (self.namespace, self.name, self.token, self.lease)
            == (other.namespace, other.name, other.token, other.lease)
    }

    pub fn describe(&self) -> String {
        let lease = self.lease.map_or("?".to_string(), Value::to_string);
        format!(
            "op {} ({} {:?}, token {}, lease {lease})",
            self.call.invoke.index, self.namespace, self.name, self.token
        )
    }
}

/// Every grant in `calls`, in invoke order.
pub fn grants<'a>(calls: &'a [Call<'a>], unreadable: &mut Unreadable) -> Vec<Grant<'a>> {
    let mut grants = Vec::new();
    for call in calls {
        let namespace = match call.f() {
            "acquire" => "lock",
            "campaign" => "election",
            _ => continue,
        };
        let Some(completion) = call.completion.filter(|_| call.outcome() == Outcome::Ok) else {
            continue;
        };
        let Some(token) = field_u64(&completion.value, "token") else {
            unreadable.note(completion, "grant without an unsigned token");
            continue;
        };
        grants.push(Grant {
            call,
            namespace,
            name: call.key().unwrap_or(""),
            token,
            lease: field(&completion.value, "lease").or_else(|| field(&call.invoke.value, "lease")),
        });
    }
    grants
}

/// `None` when the history has no grants.
pub fn check(paired: &Paired<'_>) -> Option<CheckerResult> {
    let mut unreadable = Unreadable::default();
    let grants = grants(&paired.calls, &mut unreadable);
    if grants.is_empty() && unreadable.count == 0 {
        return None;
    }
    let mut violations = duplicates(&grants);
    let mut objects: BTreeMap<(&str, &str), Vec<Grant<'_>>> = BTreeMap::new();
    for grant in &grants {
        objects
            .entry((grant.namespace, grant.name))
            .or_default()
            .push(*grant);
    }
    for object in objects.values() {
        violations.extend(backwards(object));
    }
    let checked = format!(
        "{} grants of {} locks and elections",
        grants.len(),
        objects.len()
    );
    Some(violations::result(
        "fencing-tokens",
        &checked,
        violations,
        &unreadable,
    ))
}

fn duplicates(grants: &[Grant<'_>]) -> Vec<Violation> {
    let mut first: HashMap<u64, &Grant<'_>> = HashMap::new();
    let mut violations = Vec::new();
    for grant in grants {
        let earlier = *first.entry(grant.token).or_insert(grant);
        if !earlier.same_grant(grant) {
            violations.push(Violation {
                message: format!(
                    "token {} granted twice: {} and {}",
                    grant.token,
                    earlier.describe(),
                    grant.describe()
                ),
                ops: in_history_order(&[earlier.call, grant.call], &[]),
            });
        }
    }
    violations
}

/// Grants of one object whose token is below that of a grant that had
/// completed before they were invoked.
fn backwards(object: &[Grant<'_>]) -> Vec<Violation> {
    let mut by_completion: Vec<&Grant<'_>> = object.iter().collect();
    by_completion.sort_by_key(|grant| grant.call.complete_at);
    let mut by_invoke: Vec<&Grant<'_>> = object.iter().collect();
    by_invoke.sort_by_key(|grant| grant.call.invoke_at);
    let mut highest: Option<&Grant<'_>> = None;
    let mut completed = by_completion.iter().peekable();
    let mut violations = Vec::new();
    for later in by_invoke {
        while let Some(done) =
            completed.next_if(|g| g.call.complete_at < Some(later.call.invoke_at))
        {
            if highest.is_none_or(|high| done.token > high.token) {
                highest = Some(done);
            }
        }
        let Some(high) = highest else { continue };
        if high.token > later.token {
            violations.push(Violation {
                message: format!(
                    "token went backwards: {} was invoked after {} had completed",
                    later.describe(),
                    high.describe()
                ),
                ops: in_history_order(&[high.call, later.call], &[]),
            });
        }
    }
    violations
}
