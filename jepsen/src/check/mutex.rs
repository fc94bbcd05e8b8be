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
//! # Grants in token order
//! Tokens only grow, and every grant whose outcome is known must be placed
//! somewhere, so every linearization places the known grants of a lock in
//! token order. Before each search, [`Model::prepare`] gives each grant the
//! highest known token below its own (`after`), and the model refuses a
//! grant until the highest token placed has reached it. This refuses only
//! orders that could never be completed, so no verdict changes; but the
//! search no longer tries, at every step, each subset of the acquires that
//! are still waiting — which on a lock ten workers contend for (a release
//! build's 60 s run: 3 000 grants, up to nine waiting at once) filled the
//! search's 1 GiB cache within three seconds and left the verdict unknown.
//!
//! Tokens are compared in linearization order here; `fencing-tokens`
//! checks the simpler real-time and uniqueness rules with crisp witnesses.

use std::collections::BTreeMap;

use serde_json::Value;

use super::calls::{field, field_u64, Call, Interner, Outcome};
use super::linearizable::{self, Spec};
use super::search::{Model, Timed};
use super::{CheckOptions, CheckerResult};

/// An op on one lock or election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MutexOp {
    Grant {
        token: u64,
        lease: Option<u32>,
        /// The highest token below `token` of a grant whose outcome is
        /// known; set by [`Model::prepare`] (module docs).
        after: Option<u64>,
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
            MutexOp::Grant {
                token,
                lease,
                after,
            } => grant(state, token, lease, after),
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

    /// Sets each grant's `after` from the grants whose outcome is known
    /// in this search (module docs).
    fn prepare(&self, ops: &mut [Timed<MutexOp>]) {
        let mut known: Vec<u64> = ops
            .iter()
            .filter(|timed| timed.ret.is_some())
            .filter_map(|timed| match timed.op {
                MutexOp::Grant { token, .. } => Some(token),
                _ => None,
            })
            .collect();
        known.sort_unstable();
        known.dedup();
        for timed in ops.iter_mut() {
            if let MutexOp::Grant { token, after, .. } = &mut timed.op {
                let below = known.partition_point(|&k| k < *token);
                *after = below.checked_sub(1).map(|i| known[i]);
            }
        }
    }
}

fn grant(
    state: &MutexState,
    token: u64,
    lease: Option<u32>,
    after: Option<u64>,
) -> Option<MutexState> {
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
    // A known grant with a lower token is still to be placed, and could
    // not be once this one is.
    if after.is_some_and(|after| state.max_token.is_none_or(|max| max < after)) {
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
            after: None,
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
        assert!(run(&[
            Grant {
                token: 5,
                lease: a,
                after: None
            },
            Release { token: 5, lease: a }
        ])
        .is_some());
        assert!(run(&[
            Grant {
                token: 5,
                lease: a,
                after: None
            },
            Grant {
                token: 4,
                lease: b,
                after: None
            }
        ])
        .is_none());
        assert!(
            run(&[
                Grant {
                    token: 5,
                    lease: a,
                    after: None
                },
                Release { token: 5, lease: b }
            ])
            .is_none(),
            "release by a lease that does not hold the grant"
        );
        assert!(
            run(&[
                Grant {
                    token: 5,
                    lease: a,
                    after: None
                },
                Grant {
                    token: 6,
                    lease: b,
                    after: None
                },
                Release { token: 5, lease: a }
            ])
            .is_none(),
            "a release after the lock changed hands"
        );
    }

    #[test]
    fn a_grant_waits_for_every_known_grant_with_a_lower_token() {
        use MutexOp::*;
        let (a, b) = (Some(1), Some(2));
        let timed = |op, call, ret| Timed {
            op,
            call,
            ret,
            source: 0,
        };
        let mut ops = vec![
            timed(
                Grant {
                    token: 9,
                    lease: b,
                    after: None,
                },
                0,
                Some(5),
            ),
            timed(
                Grant {
                    token: 5,
                    lease: a,
                    after: None,
                },
                1,
                Some(2),
            ),
            timed(
                Grant {
                    token: 7,
                    lease: a,
                    after: None,
                },
                3,
                None,
            ),
        ];
        MutexModel.prepare(&mut ops);
        let afters: Vec<Option<u64>> = ops
            .iter()
            .map(|t| match t.op {
                Grant { after, .. } => after,
                _ => None,
            })
            .collect();
        // Token 7's outcome is unknown: nothing has to wait for it.
        assert_eq!(afters, vec![Some(5), None, Some(5)]);
        assert!(
            MutexModel.step(&FREE, &ops[0].op).is_none(),
            "token 9 before the known token 5"
        );
        let five = MutexModel.step(&FREE, &ops[1].op).expect("5 first");
        assert!(MutexModel.step(&five, &ops[0].op).is_some());
    }

    /// The model without [`Model::prepare`], to compare verdicts with.
    struct Unprepared;

    impl Model for Unprepared {
        type State = MutexState;
        type Op = MutexOp;

        fn step(&self, state: &MutexState, op: &MutexOp) -> Option<MutexState> {
            MutexModel.step(state, op)
        }

        fn is_read_only(&self, op: &MutexOp) -> bool {
            MutexModel.is_read_only(op)
        }
    }

    /// Up to seven grants, releases and refusals of tokens 1–4 by leases
    /// 1–2, at random times, a quarter of them of unknown outcome.
    fn random_history(rng: &mut impl rand::Rng) -> Vec<Timed<MutexOp>> {
        use rand::seq::SliceRandom;
        let n = rng.gen_range(2..=7);
        let mut positions: Vec<u64> = (0..2 * n as u64).collect();
        positions.shuffle(rng);
        (0..n)
            .map(|i| {
                let (a, b) = (positions[2 * i], positions[2 * i + 1]);
                let token = rng.gen_range(1..=4);
                let lease = Some(rng.gen_range(1..=2));
                let op = match rng.gen_range(0..5) {
                    0..=2 => MutexOp::Grant {
                        token,
                        lease,
                        after: None,
                    },
                    3 => MutexOp::Release { token, lease },
                    _ => MutexOp::Refused { token },
                };
                Timed {
                    op,
                    call: a.min(b),
                    ret: rng.gen_bool(0.75).then_some(a.max(b)),
                    source: i,
                }
            })
            .collect()
    }

    #[test]
    fn ordering_grants_by_token_changes_no_verdict_on_random_small_histories() {
        use crate::check::search::{check, Limits, Verdict, MAX_CACHE_BYTES};
        use rand::SeedableRng;
        let limits = Limits {
            deadline: std::time::Instant::now() + std::time::Duration::from_secs(60),
            max_cache_bytes: MAX_CACHE_BYTES,
        };
        let mut linearizable = 0;
        for seed in 0..3000u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let ops = random_history(&mut rng);
            let pruned = check(&MutexModel, &FREE, &ops, &limits);
            let plain = check(&Unprepared, &FREE, &ops, &limits);
            assert_eq!(pruned, plain, "seed {seed}: {ops:?}");
            linearizable += usize::from(plain == Verdict::Linearizable);
        }
        assert!(
            (300..2700).contains(&linearizable),
            "both verdicts must be exercised: {linearizable} of 3000 linearizable"
        );
    }

    #[test]
    fn an_acquire_by_the_holding_lease_returns_the_same_grant() {
        use MutexOp::*;
        let a = Some(1);
        assert!(run(&[
            Grant {
                token: 5,
                lease: a,
                after: None
            },
            Grant {
                token: 5,
                lease: a,
                after: None
            }
        ])
        .is_some());
        assert!(run(&[
            Grant {
                token: 5,
                lease: a,
                after: None
            },
            Grant {
                token: 6,
                lease: a,
                after: None
            }
        ])
        .is_none());
    }

    #[test]
    fn a_refused_release_of_the_holder_means_its_lease_expired() {
        use MutexOp::*;
        let a = Some(1);
        let state = run(&[
            Grant {
                token: 5,
                lease: a,
                after: None,
            },
            Refused { token: 5 },
        ])
        .expect("legal");
        assert_eq!(state.holder, None);
        assert!(run(&[
            Grant {
                token: 5,
                lease: a,
                after: None
            },
            Refused { token: 5 },
            Release { token: 5, lease: a }
        ])
        .is_none());
    }
}
