//! Locks and elections as fenced mutexes (`fenced-mutex`).
//!
//! # Model
//! One object per lock (and per election: a campaign is an acquire, a
//! resign a release). The state is the holder — a grant `(token, lease)` —
//! and the highest token granted so far:
//! - `acquire` ok `{token, lease}`: legal when `token` is above every
//!   earlier grant of this lock, or when the same lease already holds this
//!   very grant (latchkey's acquire is idempotent per lease). A lease that
//!   holds a *different* grant of the lock cannot be granted another.
//!   If another lease holds the lock, its lease must have expired first:
//!   expiry is a step the checker cannot see, so it is allowed here, and the
//!   real-time side of it is `lease-overlap`'s job.
//! - `release` ok `{token}`: legal only while that grant holds the lock
//!   (and, when the lease is given, by that lease); frees it. Once a grant
//!   has expired or a newer one exists, its release must fail.
//! - `release` fail: the grant was not current. If it was the holder, its
//!   lease expired just before: the lock becomes free.
//! - `proclaim` ok `{token}` (elections): the grant is current.
//! - `proclaim`/`resign` fail: as a failed release.
//!
//! Acquires that failed or whose outcome is unknown are left out: a grant
//! nobody learned the token of can only make later ops harder to explain,
//! so leaving it out never hides a violation that the ops show.
//!
//! Tokens are compared in linearization order here; `fencing-tokens`
//! checks the simpler real-time and uniqueness rules with crisp witnesses.

use std::collections::BTreeMap;

use serde_json::Value;

use super::calls::{field, field_u64, Call, Interner, Outcome};
use super::linearizable::{self, Spec};
use super::search::Model;
use super::{CheckOptions, CheckerResult};

/// An op on one lock or election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MutexOp {
    Grant {
        token: u64,
        lease: Option<u32>,
    },
    Release {
        token: u64,
        lease: Option<u32>,
    },
    /// A release, resign or proclaim refused as stale.
    Refused {
        token: u64,
    },
    /// A proclaim that succeeded: the grant was current.
    Holds {
        token: u64,
    },
}

/// The current grant and the highest token ever granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MutexState {
    pub holder: Option<(u64, Option<u32>)>,
    pub max_token: Option<u64>,
}

pub struct MutexModel;

impl Model for MutexModel {
    type State = MutexState;
    type Op = MutexOp;

    fn step(&self, state: &MutexState, op: &MutexOp) -> Option<MutexState> {
        match *op {
            MutexOp::Grant { token, lease } => grant(state, token, lease),
            MutexOp::Release { token, lease } => {
                let (held, held_lease) = state.holder?;
                let same_lease = lease.is_none() || held_lease.is_none() || lease == held_lease;
                (held == token && same_lease).then_some(MutexState {
                    holder: None,
                    ..*state
                })
            }
            MutexOp::Refused { token } => Some(match state.holder {
                Some((held, _)) if held == token => MutexState {
                    holder: None,
                    ..*state
                },
                _ => *state,
            }),
            MutexOp::Holds { token } => {
                (state.holder.map(|(held, _)| held) == Some(token)).then_some(*state)
            }
        }
    }

    /// Only `Holds` is a pure constraint; a refusal may free the lock.
    fn is_read_only(&self, op: &MutexOp) -> bool {
        matches!(op, MutexOp::Holds { .. })
    }
}

fn grant(state: &MutexState, token: u64, lease: Option<u32>) -> Option<MutexState> {
    if let Some((held, held_lease)) = state.holder {
        if held == token && held_lease == lease {
            return Some(*state);
        }
        if lease.is_some() && held_lease == lease {
            return None;
        }
    }
    if state.max_token.is_some_and(|max| token <= max) {
        return None;
    }
    Some(MutexState {
        holder: Some((token, lease)),
        max_token: Some(token),
    })
}

/// Lock and election calls by object label (`lock "a"`, `election "b"`).
pub fn mutex_objects(calls: &[Call<'_>]) -> BTreeMap<String, Vec<usize>> {
    let mut objects: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, call) in calls.iter().enumerate() {
        let namespace = match call.f() {
            "acquire" | "release" => "lock",
            "campaign" | "resign" | "proclaim" => "election",
            _ => continue,
        };
        let label = format!("{namespace} {:?}", call.key().unwrap_or(""));
        objects.entry(label).or_default().push(i);
    }
    objects
}

/// Runs the mutex search; `None` when there are no lock or election ops.
pub fn check(calls: &[Call<'_>], options: &CheckOptions) -> Option<CheckerResult> {
    let labelled = mutex_objects(calls);
    if labelled.is_empty() {
        return None;
    }
    let mut leases = Interner::default();
    let (objects, unreadable) =
        linearizable::build_objects(calls, labelled, |call| mutex_op(call, &mut leases));
    let spec = Spec {
        name: "fenced-mutex",
        model: &MutexModel,
        init: MutexState {
            holder: None,
            max_token: None,
        },
        nouns: "locks and elections",
    };
    Some(linearizable::check_objects(
        &spec,
        objects,
        calls,
        &unreadable,
        options,
    ))
}

fn mutex_op(call: &Call<'_>, leases: &mut Interner) -> Result<Option<MutexOp>, &'static str> {
    let input = &call.invoke.value;
    let output = call.completion.map_or(&Value::Null, |op| &op.value);
    let token = |value: &Value| field_u64(value, "token").ok_or("no unsigned token");
    let mut lease = |value: &Value| field(value, "lease").map(|lease| leases.id(lease));
    let op = match (call.f(), call.outcome()) {
        ("acquire" | "campaign", Outcome::Ok) => MutexOp::Grant {
            token: token(output)?,
            lease: lease(output).or_else(|| lease(input)),
        },
        ("acquire" | "campaign", _) => return Ok(None),
        ("release" | "resign", Outcome::Ok | Outcome::Unknown) => MutexOp::Release {
            token: token(input)?,
            lease: lease(input),
        },
        ("proclaim", Outcome::Ok) => MutexOp::Holds {
            token: token(input)?,
        },
        ("proclaim", Outcome::Unknown) => return Ok(None),
        (_, Outcome::Fail) => MutexOp::Refused {
            token: token(input)?,
        },
        _ => return Ok(None),
    };
    Ok(Some(op))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FREE: MutexState = MutexState {
        holder: None,
        max_token: None,
    };

    fn run(ops: &[MutexOp]) -> Option<MutexState> {
        ops.iter()
            .try_fold(FREE, |state, op| MutexModel.step(&state, op))
    }

    #[test]
    fn grants_need_increasing_tokens_and_releases_need_the_holder() {
        use MutexOp::*;
        let a = Some(1);
        let b = Some(2);
        assert!(run(&[Grant { token: 5, lease: a }, Release { token: 5, lease: a }]).is_some());
        assert!(run(&[Grant { token: 5, lease: a }, Grant { token: 4, lease: b }]).is_none());
        assert!(
            run(&[Grant { token: 5, lease: a }, Release { token: 5, lease: b }]).is_none(),
            "release by a lease that does not hold the grant"
        );
        assert!(
            run(&[
                Grant { token: 5, lease: a },
                Grant { token: 6, lease: b },
                Release { token: 5, lease: a }
            ])
            .is_none(),
            "a release after the lock changed hands"
        );
    }

    #[test]
    fn an_acquire_by_the_holding_lease_returns_the_same_grant() {
        use MutexOp::*;
        let a = Some(1);
        assert!(run(&[Grant { token: 5, lease: a }, Grant { token: 5, lease: a }]).is_some());
        assert!(run(&[Grant { token: 5, lease: a }, Grant { token: 6, lease: a }]).is_none());
    }

    #[test]
    fn a_refused_release_of_the_holder_means_its_lease_expired() {
        use MutexOp::*;
        let a = Some(1);
        let state = run(&[Grant { token: 5, lease: a }, Refused { token: 5 }]).expect("legal");
        assert_eq!(state.holder, None);
        assert!(run(&[
            Grant { token: 5, lease: a },
            Refused { token: 5 },
            Release { token: 5, lease: a }
        ])
        .is_none());
    }
}
