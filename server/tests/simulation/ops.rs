//! What simulated clients do: the operations, how a client picks the next
//! one, and the commands they propose.
//!
//! Names are few on purpose, so that clients contend: two locks, one
//! election, three plain keys; fenced writes go to a key per grant name
//! and, a fifth of the time, to one key shared by every lock and the
//! election (so that a lower token of another grant is refused there).
//!
//! Not done yet: deletes, compare-and-set, `CloseSession`, `TimeToLive`,
//! `Describe` and range reads are not issued.

use rand::seq::SliceRandom;
use rand::Rng;

use latchkey_proto::state::v1::{
    command, Acquire, CancelWait, GrantKind, GrantLease, OpenSession, Proclaim, Put, Release,
    RevokeLease,
};
use latchkey_proto::v1::{fence, Fence};
use latchkey_server::coordination::Kind;

use crate::world::{World, MS};

pub const LOCKS: [&str; 2] = ["a", "b"];
pub const ELECTIONS: [&str; 1] = ["e"];
const KEYS: [&str; 3] = ["k0", "k1", "k2"];
/// The key every fenced grant writes to now and then.
const SHARED_FENCED_KEY: &[u8] = b"f/shared";
/// Stale grants a client remembers, to write with on purpose.
const MAX_OLD_GRANTS: usize = 8;

/// A lock or leadership a client believes it holds (or held).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    pub kind: Kind,
    pub name: &'static str,
    pub token: u64,
}

#[derive(Debug, Clone)]
pub enum Op {
    /// Opens the client's exactly-once session (first, and again after it ended).
    OpenSession,
    Grant {
        ttl_ms: u64,
    },
    KeepAlive {
        lease: u64,
    },
    Revoke {
        lease: u64,
    },
    /// A lock acquire (waiting or not) or, for an election, a campaign
    /// (always waiting).
    Acquire {
        kind: Kind,
        name: &'static str,
        lease: u64,
        wait: bool,
        value: Vec<u8>,
    },
    /// A release, or a resignation.
    Release {
        holding: Holding,
    },
    Proclaim {
        holding: Holding,
        value: Vec<u8>,
    },
    FencedPut {
        holding: Holding,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Put {
        key: &'static str,
        value: Vec<u8>,
    },
    Get {
        key: &'static str,
    },
    /// A linearizable "who leads?" query.
    Leader {
        name: &'static str,
    },
    /// Starts an observer of an election for a while.
    Observe {
        name: &'static str,
        duration_us: u64,
    },
}

impl Op {
    /// Reads go to any member; everything else to the client's target.
    pub fn is_read(&self) -> bool {
        matches!(self, Op::Get { .. } | Op::Leader { .. })
    }

    /// Waits for its grant on the server (a waiting acquire or campaign).
    pub fn waits(&self) -> bool {
        matches!(self, Op::Acquire { wait: true, .. })
    }
}

/// What a client knows when it picks its next op.
pub struct ClientView<'a> {
    pub index: usize,
    pub lease: Option<u64>,
    pub holdings: &'a [Holding],
    pub old_grants: &'a [Holding],
}

/// Picks the next op of a client that has a session.
pub fn choose(world: &mut World, client: &ClientView<'_>) -> Op {
    let roll = world.rng.gen_range(0..100);
    let Some(lease) = client.lease else {
        return match roll {
            0..=59 => Op::Grant {
                ttl_ms: world.rng.gen_range(1_500..4_000),
            },
            60..=69 => election_read(world),
            _ => plain_op(world),
        };
    };
    let value = value(world, client.index);
    let held = client.holdings.choose(&mut world.rng).copied();
    match (roll, held) {
        (0..=2, _) => Op::Revoke { lease },
        (3..=20, _) => {
            let name = *LOCKS.choose(&mut world.rng).expect("locks are listed");
            Op::Acquire {
                kind: Kind::Lock,
                name,
                lease,
                wait: world.rng.gen_bool(0.5),
                value: Vec::new(),
            }
        }
        (21..=28, _) => Op::Acquire {
            kind: Kind::Election,
            name: ELECTIONS
                .choose(&mut world.rng)
                .expect("elections are listed"),
            lease,
            wait: true,
            value,
        },
        (29..=44, Some(holding)) => fenced_put(world, holding, value),
        (45..=52, Some(holding)) => Op::Release { holding },
        (53..=56, Some(holding)) if holding.kind == Kind::Election => {
            Op::Proclaim { holding, value }
        }
        (57..=64, _) if !client.old_grants.is_empty() => {
            let old = *client.old_grants.choose(&mut world.rng).expect("not empty");
            fenced_put(world, old, value)
        }
        (65..=70, _) => election_read(world),
        _ => plain_op(world),
    }
}

fn fenced_put(world: &mut World, holding: Holding, value: Vec<u8>) -> Op {
    let key = if world.rng.gen_range(0..5) == 0 {
        SHARED_FENCED_KEY.to_vec()
    } else {
        format!("f/{}", holding.name).into_bytes()
    };
    Op::FencedPut {
        holding,
        key,
        value,
    }
}

fn election_read(world: &mut World) -> Op {
    let name = *ELECTIONS
        .choose(&mut world.rng)
        .expect("elections are listed");
    if world.rng.gen_bool(0.5) {
        Op::Leader { name }
    } else {
        Op::Observe {
            name,
            duration_us: world.rng.gen_range(2_000 * MS..10_000 * MS),
        }
    }
}

fn plain_op(world: &mut World) -> Op {
    let key = *KEYS.choose(&mut world.rng).expect("keys are listed");
    if world.rng.gen_range(0..2) == 0 {
        Op::Get { key }
    } else {
        Op::Put {
            key,
            value: format!("v{}", world.rng.gen::<u32>()).into_bytes(),
        }
    }
}

fn value(world: &mut World, index: usize) -> Vec<u8> {
    format!("c{index}-{}", world.rng.gen::<u32>()).into_bytes()
}

/// Remembers a grant that ended, for stale writes later.
pub fn remember_old(old_grants: &mut Vec<Holding>, holding: Holding) {
    if old_grants.len() >= MAX_OLD_GRANTS {
        old_grants.remove(0);
    }
    old_grants.push(holding);
}

/// The static name a server-reported grant name stands for.
pub fn known_name(kind: Kind, name: &str) -> Option<&'static str> {
    let names: &[&'static str] = match kind {
        Kind::Lock => &LOCKS,
        Kind::Election => &ELECTIONS,
    };
    names.iter().copied().find(|known| *known == name)
}

fn grant_kind(kind: Kind) -> i32 {
    match kind {
        Kind::Lock => GrantKind::Lock as i32,
        Kind::Election => GrantKind::Election as i32,
    }
}

/// The command an op proposes; `None` for keepalives, reads and observers.
pub fn op_command(op: &Op) -> Option<command::Command> {
    Some(match op {
        Op::OpenSession => command::Command::OpenSession(OpenSession {}),
        Op::Grant { ttl_ms } => command::Command::GrantLease(GrantLease {
            ttl_ms: *ttl_ms,
            ..Default::default()
        }),
        Op::Revoke { lease } => command::Command::RevokeLease(RevokeLease {
            lease: *lease,
            ..Default::default()
        }),
        Op::Acquire {
            kind,
            name,
            lease,
            wait,
            value,
        } => command::Command::Acquire(Acquire {
            kind: grant_kind(*kind),
            name: name.to_string(),
            lease: *lease,
            wait: *wait,
            value: value.clone(),
            ..Default::default()
        }),
        Op::Release { holding } => command::Command::Release(Release {
            kind: grant_kind(holding.kind),
            name: holding.name.to_string(),
            token: holding.token,
        }),
        Op::Proclaim { holding, value } => command::Command::Proclaim(Proclaim {
            name: holding.name.to_string(),
            token: holding.token,
            value: value.clone(),
        }),
        Op::FencedPut {
            holding,
            key,
            value,
        } => command::Command::Put(Put {
            key: key.clone(),
            value: value.clone(),
            fence: Some(Fence {
                name: holding.name.to_string(),
                token: holding.token,
                kind: match holding.kind {
                    Kind::Lock => fence::Kind::Lock as i32,
                    Kind::Election => fence::Kind::Election as i32,
                },
            }),
            expected_mod_revision: None,
        }),
        Op::Put { key, value } => command::Command::Put(Put {
            key: key.as_bytes().to_vec(),
            value: value.clone(),
            fence: None,
            expected_mod_revision: None,
        }),
        Op::KeepAlive { .. } | Op::Get { .. } | Op::Leader { .. } | Op::Observe { .. } => {
            return None
        }
    })
}

/// The command a client that gave up waiting proposes (as the API does
/// when a waiting caller goes away): no request id, answer ignored.
pub fn cancel_wait(kind: Kind, name: &str, lease: u64, attempt: u64) -> command::Command {
    command::Command::CancelWait(CancelWait {
        kind: grant_kind(kind),
        name: name.to_string(),
        lease,
        attempt,
    })
}
