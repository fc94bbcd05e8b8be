//! Target 1: committed entries' bytes through the real apply path.
//!
//! A case is a run of entries applied in order to one state machine on an
//! in-memory engine, the way the node applies them (`apply_encoded`, the
//! applied position in the same batch, the batch written): valid commands
//! (so that leases, locks, sessions and keys exist to be hit), arbitrary
//! bytes, and valid encodings with mutations. No entry may panic; bytes
//! that do not decode give a recorded `INTERNAL` result and change nothing
//! but the applied position; a command without a body stops the node with
//! a corruption error naming the index (see `state_machine.rs`); and
//! whatever apply wrote must load again into the same state.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message as _;
use tonic::Code;

use latchkey_proto::state::v1::{
    auth_change, command, command_result, Acquire, AuthChange, AuthDisable, AuthRolePermission,
    AuthUser, AuthUserRole, CancelWait, CloseSession, Command, Delete, ExpireLeases,
    ExpireSessions, GrantLease, OpenSession, Proclaim, Put, RaiseTokenFloor, Release, RevokeLease,
};
use latchkey_proto::v1::{Fence, Permission, RequestId};
use latchkey_server::config::UnsafeSwitches;
use latchkey_server::error::FatalError;
use latchkey_server::state_machine::StateMachine;
use latchkey_server::storage::{Batch, Engine, LogPosition, MemoryDisk, CF_RAFT_LOG};

use crate::mutate::{self, Mutation};

/// Small domains, so that generated commands meet each other's leases,
/// names and sessions.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["a", "b", "lock/x", ""]).prop_map(String::from),
        1 => ".{0,10}",
    ]
}

fn small_id() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..24, 1 => any::<u64>()]
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..12)
}

fn kind() -> impl Strategy<Value = i32> {
    prop_oneof![4 => 0i32..2, 1 => any::<i32>()]
}

fn fence() -> impl Strategy<Value = Option<Fence>> {
    prop::option::of(
        (name(), small_id(), kind()).prop_map(|(name, token, kind)| Fence { name, token, kind }),
    )
}

/// User and role names: a few that meet each other, and anything.
fn identity() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["root", "app", ""]).prop_map(String::from),
        1 => ".{0,8}",
    ]
}

fn permission() -> impl Strategy<Value = Option<Permission>> {
    prop::option::of(
        (prop_oneof![4 => 0i32..7, 1 => any::<i32>()], name())
            .prop_map(|(kind, prefix)| Permission { kind, prefix }),
    )
}

fn auth_change() -> impl Strategy<Value = AuthChange> {
    use auth_change::Change as A;
    let change = prop_oneof![
        // The token key must be 32 bytes or more; shorter ones are refused.
        vec(any::<u8>(), 30..34).prop_map(A::Enable),
        Just(A::Disable(AuthDisable {})),
        (identity(), ".{0,8}", any::<bool>()).prop_map(|(name, password_hash, replace)| {
            A::PutUser(AuthUser {
                name,
                password_hash,
                replace,
            })
        }),
        identity().prop_map(A::DeleteUser),
        (identity(), identity()).prop_map(|(user, role)| A::GrantRole(AuthUserRole { user, role })),
        (identity(), identity())
            .prop_map(|(user, role)| A::RevokeRole(AuthUserRole { user, role })),
        identity().prop_map(A::AddRole),
        identity().prop_map(A::DeleteRole),
        (identity(), permission()).prop_map(|(role, permission)| {
            A::GrantPermission(AuthRolePermission { role, permission })
        }),
        (identity(), permission()).prop_map(|(role, permission)| {
            A::RevokePermission(AuthRolePermission { role, permission })
        }),
    ];
    prop::option::of(change).prop_map(|change| AuthChange { change })
}

fn ttl_ms() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..200, 100u64..100_000, any::<u64>()]
}

fn body() -> impl Strategy<Value = Option<command::Command>> {
    use command::Command as C;
    let body = prop_oneof![
        (bytes(), bytes(), fence(), prop::option::of(small_id()))
            .prop_map(|(key, value, fence, expected_mod_revision)| {
                C::Put(Put {
                    key,
                    value,
                    fence,
                    expected_mod_revision,
                })
            })
            .boxed(),
        (bytes(), fence(), prop::option::of(small_id()))
            .prop_map(|(key, fence, expected_mod_revision)| {
                C::Delete(Delete {
                    key,
                    fence,
                    expected_mod_revision,
                })
            })
            .boxed(),
        (ttl_ms(), identity(), prop_oneof![0u64..4, any::<u64>()])
            .prop_map(|(ttl_ms, owner, max_owner_leases)| {
                C::GrantLease(GrantLease {
                    ttl_ms,
                    owner,
                    max_owner_leases,
                })
            })
            .boxed(),
        (small_id(), prop::option::of(identity()))
            .prop_map(|(lease, caller)| C::RevokeLease(RevokeLease { lease, caller }))
            .boxed(),
        vec(small_id(), 0..4)
            .prop_map(|leases| C::ExpireLeases(ExpireLeases { leases }))
            .boxed(),
        (
            (kind(), name(), small_id(), any::<bool>(), bytes()),
            (
                prop::option::of(identity()),
                prop_oneof![0u64..3, any::<u64>()]
            ),
        )
            .prop_map(
                |((kind, name, lease, wait, value), (caller, max_waiters))| {
                    C::Acquire(Acquire {
                        kind,
                        name,
                        lease,
                        wait,
                        value,
                        caller,
                        max_waiters,
                    })
                }
            )
            .boxed(),
        (kind(), name(), small_id())
            .prop_map(|(kind, name, token)| C::Release(Release { kind, name, token }))
            .boxed(),
        (kind(), name(), small_id(), small_id())
            .prop_map(|(kind, name, lease, attempt)| {
                C::CancelWait(CancelWait {
                    kind,
                    name,
                    lease,
                    attempt,
                })
            })
            .boxed(),
        (name(), small_id(), bytes())
            .prop_map(|(name, token, value)| C::Proclaim(Proclaim { name, token, value }))
            .boxed(),
        Just(C::OpenSession(OpenSession {})).boxed(),
        small_id()
            .prop_map(|session| C::CloseSession(CloseSession { session }))
            .boxed(),
        vec(small_id(), 0..4)
            .prop_map(|sessions| C::ExpireSessions(ExpireSessions { sessions }))
            .boxed(),
        small_id()
            .prop_map(|floor| C::RaiseTokenFloor(RaiseTokenFloor { floor }))
            .boxed(),
        auth_change().prop_map(C::AuthChange).boxed(),
    ];
    prop_oneof![30 => body.prop_map(Some), 1 => Just(None)]
}

fn request() -> impl Strategy<Value = Option<RequestId>> {
    prop::option::of((0u64..24, 0u64..8, 0u64..8).prop_map(
        |(client_id, seq, oldest_pending_seq)| RequestId {
            client_id,
            seq,
            oldest_pending_seq,
        },
    ))
}

pub fn command() -> impl Strategy<Value = Command> {
    (body(), request()).prop_map(|(command, request)| Command { command, request })
}

/// One committed entry's bytes.
#[derive(Debug, Clone)]
pub enum EntryBytes {
    Valid(Command),
    Arbitrary(Vec<u8>),
    /// A valid command's encoding, mutated.
    Mutated(Command, Vec<Mutation>),
    /// Two valid encodings joined at a point of each.
    Spliced(Command, Command, Index, Index),
}

impl EntryBytes {
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            EntryBytes::Valid(command) => command.encode_to_vec(),
            EntryBytes::Arbitrary(bytes) => bytes.clone(),
            EntryBytes::Mutated(command, mutations) => {
                let mut bytes = command.encode_to_vec();
                mutate::apply(&mut bytes, mutations);
                bytes
            }
            EntryBytes::Spliced(a, b, at_a, at_b) => {
                let (a, b) = (a.encode_to_vec(), b.encode_to_vec());
                let cut_a = at_a.index(a.len() + 1);
                let cut_b = at_b.index(b.len() + 1);
                [&a[..cut_a], &b[cut_b..]].concat()
            }
        }
    }
}

fn entry_bytes() -> impl Strategy<Value = EntryBytes> {
    prop_oneof![
        3 => command().prop_map(EntryBytes::Valid),
        1 => vec(any::<u8>(), 0..64).prop_map(EntryBytes::Arbitrary),
        3 => (command(), mutate::mutations()).prop_map(|(c, m)| EntryBytes::Mutated(c, m)),
        1 => (command(), command(), any::<Index>(), any::<Index>())
            .prop_map(|(a, b, i, j)| EntryBytes::Spliced(a, b, i, j)),
    ]
}

pub fn entries() -> impl Strategy<Value = Vec<EntryBytes>> {
    vec(entry_bytes(), 1..16)
}

/// Applies every entry as the node does; checks each outcome and that the
/// state written loads back equal.
pub fn apply_entries(entries: &[EntryBytes]) -> Result<(), TestCaseError> {
    let disk = MemoryDisk::new();
    let engine = Engine::open_memory(&disk).expect("a new memory disk opens");
    let switches = UnsafeSwitches::default();
    let mut machine = StateMachine::open(engine.clone(), &switches).expect("an empty state opens");
    for (offset, entry) in entries.iter().enumerate() {
        let index = offset as u64 + 1;
        let data = entry.bytes();
        let decoded = Command::decode(data.as_slice());
        let before = (
            machine.coordination().read().clone(),
            machine.auth().read().clone(),
        );
        let mut batch = Batch::new(&engine);
        match machine.apply_encoded(&mut batch, index, &data) {
            Ok(output) => {
                if decoded.is_err() {
                    let code = match &output.result.result {
                        Some(command_result::Result::Error(error)) => error.code,
                        other => {
                            return Err(TestCaseError::fail(format!(
                                "entry {index} does not decode but gave {other:?}"
                            )))
                        }
                    };
                    prop_assert_eq!(code, Code::Internal as i32);
                    let after = (
                        machine.coordination().read().clone(),
                        machine.auth().read().clone(),
                    );
                    prop_assert_eq!(after, before, "an undecodable entry changed the state");
                }
            }
            Err(FatalError::Corruption { cf, key, reason }) => {
                // Only a command without a known body stops the node.
                let no_body = decoded.as_ref().is_ok_and(|c| c.command.is_none());
                prop_assert!(no_body, "entry {} stopped the node: {}", index, reason);
                prop_assert_eq!(cf, CF_RAFT_LOG);
                prop_assert_eq!(key, index.to_string());
                return Ok(());
            }
            Err(other) => {
                return Err(TestCaseError::fail(format!(
                    "entry {index} stopped the node: {other}"
                )))
            }
        }
        if machine.finish_batch(&mut batch, LogPosition { index, term: 1 }) {
            engine.write(batch, false).expect("a memory write");
        }
        machine.batch_written();
    }
    // What a clean stop writes: a checkpoint of everything applied.
    let mut batch = Batch::new(&engine);
    machine.checkpoint(&mut batch);
    engine.write(batch, false).expect("a memory write");
    machine.batch_written();
    let applied = machine.coordination().read().clone();
    if let Err(e) = applied.validate() {
        return Err(TestCaseError::fail(format!(
            "applied state breaks an invariant: {e}"
        )));
    }
    let reloaded = StateMachine::open(engine, &switches)
        .map_err(|e| TestCaseError::fail(format!("the state apply wrote does not load: {e}")))?;
    let loaded = reloaded.coordination().read().clone();
    prop_assert_eq!(loaded, applied, "the state apply wrote loads differently");
    let auth = machine.auth().read().clone();
    let loaded_auth = reloaded.auth().read().clone();
    prop_assert_eq!(
        loaded_auth,
        auth,
        "the auth state apply wrote loads differently"
    );
    prop_assert_eq!(reloaded.applied().index, entries.len() as u64);
    Ok(())
}

#[test]
fn fuzz_committed_entries_never_panic_and_undecodable_ones_fail_deterministically() {
    crate::runner::run(
        "commands::fuzz_committed_entries_never_panic_and_undecodable_ones_fail_deterministically",
        512,
        entries(),
        |entries| apply_entries(&entries),
    );
}

#[test]
fn an_undecodable_entry_is_recorded_as_failed_and_the_next_one_applies() {
    let grant = Command {
        command: Some(command::Command::GrantLease(GrantLease {
            ttl_ms: 10_000,
            ..GrantLease::default()
        })),
        request: None,
    };
    let entries = [
        EntryBytes::Arbitrary(vec![0xff, 0xff, 0xff]),
        EntryBytes::Valid(grant),
    ];
    apply_entries(&entries).expect("both entries apply");
    let disk = MemoryDisk::new();
    let engine = Engine::open_memory(&disk).expect("opens");
    let mut machine =
        StateMachine::open(engine.clone(), &UnsafeSwitches::default()).expect("opens");
    let mut batch = Batch::new(&engine);
    let output = machine
        .apply_encoded(&mut batch, 1, &[0xff, 0xff, 0xff])
        .expect("not fatal");
    match output.result.result {
        Some(command_result::Result::Error(error)) => {
            assert_eq!(error.code, Code::Internal as i32);
            assert!(
                error.message.contains("entry 1 does not decode"),
                "{}",
                error.message
            );
        }
        other => panic!("not a recorded failure: {other:?}"),
    }
}

#[test]
fn a_command_without_a_body_stops_the_node_at_its_index() {
    let disk = MemoryDisk::new();
    let engine = Engine::open_memory(&disk).expect("opens");
    let mut machine =
        StateMachine::open(engine.clone(), &UnsafeSwitches::default()).expect("opens");
    let mut batch = Batch::new(&engine);
    // Field 16, length 0: what a newer version's command could look like
    // here (fields up to 15 are taken).
    match machine.apply_encoded(&mut batch, 7, &[0x82, 0x01, 0x00]) {
        Err(FatalError::Corruption { cf, key, .. }) => {
            assert_eq!((cf, key.as_str()), (CF_RAFT_LOG, "7"))
        }
        Err(other) => panic!("not corruption: {other}"),
        Ok(_) => panic!("a command this binary does not know was skipped"),
    }
}

#[test]
fn a_command_that_ends_its_own_session_applies() {
    // Found by fuzzing: recording the result in the session the command
    // had just expired panicked ("session 5 recorded while not open").
    let own = |body| Command {
        command: Some(body),
        request: Some(RequestId {
            client_id: 1,
            seq: 1,
            oldest_pending_seq: 0,
        }),
    };
    let open = Command {
        command: Some(command::Command::OpenSession(OpenSession {})),
        request: None,
    };
    for ending in [
        command::Command::ExpireSessions(ExpireSessions { sessions: vec![1] }),
        command::Command::CloseSession(CloseSession { session: 1 }),
    ] {
        let entries = [
            EntryBytes::Valid(open.clone()),
            EntryBytes::Valid(own(ending)),
        ];
        apply_entries(&entries).expect("the session ends and the state loads");
    }
}
