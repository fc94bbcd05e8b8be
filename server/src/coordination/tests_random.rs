//! Seeded random op sequences, checked after every op: mutual exclusion
//! with live holders (Invariant 2), tokens strictly increasing per lock and
//! unique across locks, also across a restore (Invariant 1), refusals that
//! change nothing, and records that reload to the live state.
//!
//! A failure prints its seed; add it to [`SEEDS`] to replay it.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{self, AssertUnwindSafe};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::tests::{Harness, TTL_MS};
use super::*;

const SEEDS: [u64; 8] = [1, 2, 3, 42, 1_234, 0xdead_beef, 7_777_777, 20_240_601];
const OPS_PER_SEED: usize = 1_200;
/// Few names, so that locks are contended and queues form.
const NAMES: [&str; 4] = ["a", "b", "c", "d"];
/// How often the persisted records are reloaded and compared.
const RELOAD_EVERY_OPS: usize = 40;

/// What the test remembers across the whole run, including about locks
/// whose records are long gone.
#[derive(Default)]
struct Observer {
    /// Highest token ever granted per lock.
    last_token: BTreeMap<LockKey, FencingToken>,
    /// Every token ever granted.
    issued: BTreeSet<FencingToken>,
}

impl Observer {
    fn observe(&mut self, seed: u64, events: &[Event]) {
        for event in events {
            let Event::Granted {
                kind, name, token, ..
            } = event
            else {
                continue;
            };
            let key = LockKey::new(*kind, name.clone());
            if let Some(last) = self.last_token.get(&key) {
                assert!(
                    token > last,
                    "seed {seed}: {key} token {token} after {last}"
                );
            }
            assert!(
                self.issued.insert(*token),
                "seed {seed}: token {token} issued twice"
            );
            self.last_token.insert(key, *token);
        }
    }
}

fn pick_lease(rng: &mut StdRng, h: &Harness) -> LeaseId {
    let leases: Vec<LeaseId> = h.state.leases().map(|lease| lease.id).collect();
    if leases.is_empty() || rng.gen_bool(0.05) {
        return LeaseId(rng.gen_range(1..=h.index.0 + 2));
    }
    leases[rng.gen_range(0..leases.len())]
}

/// Mostly the current token (so releases succeed), sometimes an old or an
/// unknown one.
fn pick_token(rng: &mut StdRng, h: &Harness, key: &LockKey, seen: &Observer) -> FencingToken {
    let current = h
        .state
        .describe(key.kind, &key.name)
        .map(|lock| lock.holder.token);
    match (rng.gen_range(0..10), current) {
        (0..=5, Some(current)) => current,
        (0..=8, _) if !seen.issued.is_empty() => {
            let old: Vec<&FencingToken> = seen.issued.iter().collect();
            *old[rng.gen_range(0..old.len())]
        }
        _ => FencingToken(rng.gen_range(0..h.state.next_token().0 + 3)),
    }
}

fn pick_value(rng: &mut StdRng, kind: Kind) -> Vec<u8> {
    match (kind, rng.gen_range(0..50)) {
        (Kind::Lock, 0) => vec![1],
        (Kind::Lock, _) => Vec::new(),
        (Kind::Election, 0) => vec![0; MAX_ELECTION_VALUE_BYTES + 1],
        (Kind::Election, _) => (0..rng.gen_range(0..16)).map(|_| rng.gen()).collect(),
    }
}

fn random_op(rng: &mut StdRng, h: &Harness, seen: &Observer) -> Op {
    let lease = pick_lease(rng, h);
    let kind = if rng.gen_bool(0.5) {
        Kind::Lock
    } else {
        Kind::Election
    };
    let name = NAMES[rng.gen_range(0..NAMES.len())].to_string();
    let key = LockKey::new(kind, name.clone());
    match rng.gen_range(0..100) {
        0..=14 => Op::GrantLease {
            ttl_ms: if rng.gen_bool(0.05) { 1 } else { TTL_MS },
        },
        15..=18 => Op::RevokeLease { lease },
        19..=25 => Op::ExpireLeases {
            leases: (0..rng.gen_range(0..3))
                .map(|_| pick_lease(rng, h))
                .collect(),
        },
        26..=59 => Op::Acquire {
            kind,
            name,
            lease,
            wait: rng.gen_bool(0.7),
            value: pick_value(rng, kind),
        },
        60..=82 => Op::Release {
            kind,
            name,
            token: pick_token(rng, h, &key, seen),
        },
        83..=90 => Op::CancelWait {
            kind,
            name,
            lease,
            attempt: rng
                .gen_bool(0.5)
                .then(|| LogIndex(rng.gen_range(1..=h.index.0.max(1)))),
        },
        _ => Op::Proclaim {
            token: pick_token(rng, h, &LockKey::new(Kind::Election, name.clone()), seen),
            name,
            value: pick_value(rng, Kind::Election),
        },
    }
}

/// Invariant 2, stated directly: one holder per lock (the table holds one
/// grant per key), whose lease is alive and knows it.
fn assert_holders_alive(seed: u64, h: &Harness) {
    for (key, lock) in &h.state.locks {
        let lease = h.state.lease(lock.holder.lease);
        assert!(
            lease.is_some_and(|lease| lease.held.contains(key)),
            "seed {seed} index {}: {key} held by dead lease {}",
            h.index,
            lock.holder.lease
        );
    }
}

/// Checks a result against the state before the op: only the current token
/// releases or proclaims, and acquire answers according to who held the lock.
fn assert_result_matches_model(
    seed: u64,
    before: &Coordination,
    op: &Op,
    result: &Result<Outcome, CoordinationError>,
) {
    let holder = |kind, name: &str| before.describe(kind, name).map(|lock| lock.holder.clone());
    match (op, result) {
        (Op::Release { kind, name, token }, Ok(_)) => {
            assert_eq!(
                holder(*kind, name).map(|g| g.token),
                Some(*token),
                "seed {seed}: {op:?}"
            );
        }
        (Op::Proclaim { name, token, .. }, Ok(_)) => {
            assert_eq!(
                holder(Kind::Election, name).map(|g| g.token),
                Some(*token),
                "seed {seed}: {op:?}"
            );
        }
        (
            Op::Release { kind, name, .. },
            Err(CoordinationError::StaleToken { presented, current }),
        ) => {
            assert_eq!(
                holder(*kind, name).map(|g| g.token),
                *current,
                "seed {seed}: {op:?}"
            );
            assert_ne!(Some(*presented), *current, "seed {seed}: {op:?}");
        }
        (
            Op::Acquire {
                kind, name, lease, ..
            },
            Ok(Outcome::Acquired { already_held, .. }),
        ) => {
            let before_lease = holder(*kind, name).map(|g| g.lease);
            let expected = if *already_held { Some(*lease) } else { None };
            assert_eq!(before_lease, expected, "seed {seed}: {op:?}");
        }
        (
            Op::Acquire {
                kind, name, lease, ..
            },
            Ok(Outcome::Queued { .. }) | Err(CoordinationError::Held { .. }),
        ) => {
            let before_lease = holder(*kind, name).map(|g| g.lease);
            assert!(
                before_lease.is_some_and(|held_by| held_by != *lease),
                "seed {seed}: {op:?} -> {result:?}"
            );
        }
        _ => {}
    }
}

/// Runs one seed and returns every op it applied with its result.
fn run_seed(seed: u64) -> (Harness, Observer, Vec<(Op, Applied)>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut h = Harness::new();
    let mut seen = Observer::default();
    let mut history = Vec::new();
    for step in 0..OPS_PER_SEED {
        let op = random_op(&mut rng, &h, &seen);
        let before = h.state.clone();
        let applied = h.apply(op.clone());
        if applied.result.is_err() {
            assert_eq!(
                h.state, before,
                "seed {seed}: refused {op:?} changed the state"
            );
            assert!(applied.changes.is_empty() && applied.events.is_empty());
        }
        assert_result_matches_model(seed, &before, &op, &applied.result);
        seen.observe(seed, &applied.events);
        assert_holders_alive(seed, &h);
        if step % RELOAD_EVERY_OPS == 0 {
            assert_eq!(
                h.reload(),
                h.state,
                "seed {seed}: reload differs at index {}",
                h.index
            );
        }
        history.push((op, applied));
    }
    (h, seen, history)
}

/// Runs `test` for every seed, printing the seed that failed.
fn for_each_seed(test: impl Fn(u64)) {
    for seed in SEEDS {
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| test(seed)));
        if let Err(cause) = outcome {
            eprintln!("failing seed: {seed}");
            panic::resume_unwind(cause);
        }
    }
}

#[test]
fn random_ops_keep_one_live_holder_and_increasing_unique_tokens() {
    for_each_seed(|seed| {
        let (h, seen, history) = run_seed(seed);
        let granted = history
            .iter()
            .flat_map(|(_, applied)| &applied.events)
            .filter(|event| matches!(event, Event::Granted { .. }))
            .count();
        let refused = history.iter().filter(|(_, a)| a.result.is_err()).count();
        let handed_over = history
            .iter()
            .filter(|(op, _)| !matches!(op, Op::Acquire { .. }))
            .flat_map(|(_, applied)| &applied.events)
            .filter(|event| matches!(event, Event::Granted { .. }))
            .count();
        assert!(
            granted > 100 && handed_over > 20 && refused > 100,
            "seed {seed}: weak run, {granted} grants, {handed_over} to waiters, {refused} refusals"
        );
        assert_eq!(seen.issued.len(), granted);
        assert_eq!(h.state.next_token().0, granted as u64 + 1);
    });
}

#[test]
fn tokens_after_restoring_a_random_state_are_above_every_token_before() {
    for_each_seed(|seed| {
        let (h, mut seen, _) = run_seed(seed);
        let mut restored = Harness {
            state: h.reload(),
            index: h.index,
            store: h.store.clone(),
        };
        assert_eq!(restored.state, h.state, "seed {seed}");
        let highest = seen.issued.last().copied().unwrap_or(FencingToken(0));
        // Free every lock, then take each one again on the restored state.
        let leases = restored.state.leases().map(|lease| lease.id).collect();
        restored.apply(Op::ExpireLeases { leases });
        assert!(restored.state.locks.is_empty(), "seed {seed}");
        let lease = restored.grant_lease();
        for kind in [Kind::Lock, Kind::Election] {
            for name in NAMES {
                let token = restored.lock(kind, name, lease).token;
                assert!(
                    token > highest,
                    "seed {seed}: {kind} {name} got {token} after {highest}"
                );
                let granted = Event::Granted {
                    kind,
                    name: name.to_string(),
                    lease,
                    token,
                    value: restored
                        .state
                        .describe(kind, name)
                        .map(|l| l.holder.value.clone())
                        .unwrap_or_default(),
                };
                seen.observe(seed, &[granted]);
            }
        }
    });
}

#[test]
fn replicas_applying_the_same_ops_produce_identical_outputs() {
    for_each_seed(|seed| {
        let (h, _, history) = run_seed(seed);
        let mut replica = Coordination::new(super::tests::BOUNDS);
        for (index, (op, applied)) in history.into_iter().enumerate() {
            let again = replica.apply(LogIndex(index as u64 + 1), op);
            assert_eq!(
                again,
                applied,
                "seed {seed}: replica diverged at index {}",
                index + 1
            );
        }
        assert_eq!(replica, h.state);
    });
}
