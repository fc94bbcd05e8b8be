//! Target 2: stored records and the files and logs that hold them.
//!
//! - every record decoder (the engine's protobuf `decode`, the log's
//!   `decode_entry` and `decode_pb`, coordination records through
//!   `Coordination::load`) on arbitrary and mutated payloads: an error
//!   names the record's key, never a panic;
//! - a real node's data with one record damaged (its framed bytes, or its
//!   payload written back with a valid checksum, or removed), then the
//!   whole open path of the node and its first ticks: a broken checksum is
//!   corruption naming that key, and nothing panics;
//! - the memory disk's log replayed after a power loss, damaged, with and
//!   without fixed checksums: an error names the byte offset;
//! - snapshot files, damaged, with and without a fixed file checksum: an
//!   error names the byte offset (or the whole file's checksum).

use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState};

use latchkey_proto::state::v1::{
    auth_change, command, Acquire, AuthChange, AuthRolePermission, AuthUser, AuthUserRole,
    GrantKind, GrantLease, KvRecord, LogPosition, OpenSession, Put,
};
use latchkey_proto::v1::{Fence, Permission, PermissionKind};
use latchkey_server::auth::store::AuthState;
use latchkey_server::coordination::{self, Coordination};
use latchkey_server::error::FatalError;
use latchkey_server::state_machine::TTL_BOUNDS;
use latchkey_server::storage::raft_log::{decode_entry, decode_pb};
use latchkey_server::storage::snapshot_file::{self, SnapshotFileError};
use latchkey_server::storage::{
    decode, display_key, keys, Batch, Engine, MemoryDisk, PowerLoss, CF_RAFT_LOG, CF_RAFT_STATE,
    CF_STATE,
};

use crate::mutate::{self, Input, Mutation};
use crate::node::{lead_alone, result_of, TestNode, ELECTION_TICKS};

/// One stored record: column family, key, payload (without its frame).
#[derive(Debug, Clone)]
pub struct Record {
    pub cf: &'static str,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

/// A single-voter node's data after a few commands of every kind, and its
/// records.
pub struct Fixture {
    pub disk: MemoryDisk,
    pub records: Vec<Record>,
}

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(build_fixture)
}

fn build_fixture() -> Fixture {
    use command::Command as C;
    let disk = MemoryDisk::new();
    let mut node = TestNode::start(&disk, 1, &[1], ELECTION_TICKS).expect("a new node starts");
    lead_alone(&mut node).expect("the node leads");
    let lease = |node: &mut TestNode| {
        // An owned lease: its record is the owner-carrying format.
        let granted = result_of(node.propose(C::GrantLease(GrantLease {
            ttl_ms: 60_000,
            owner: "app".into(),
            max_owner_leases: 0,
        })));
        match granted.result {
            Some(latchkey_proto::state::v1::command_result::Result::LeaseGranted(g)) => g.lease,
            other => panic!("no lease: {other:?}"),
        }
    };
    let (first, second) = (lease(&mut node), lease(&mut node));
    let acquire = |kind: GrantKind, name: &str, lease: u64, wait: bool| {
        C::Acquire(Acquire {
            kind: kind as i32,
            name: name.into(),
            lease,
            wait,
            value: match kind {
                GrantKind::Election => b"value".to_vec(),
                GrantKind::Lock => Vec::new(),
            },
            caller: None,
            max_waiters: 0,
        })
    };
    let held = result_of(node.propose(acquire(GrantKind::Lock, "a", first, false)));
    let token = match held.result {
        Some(latchkey_proto::state::v1::command_result::Result::Granted(grant)) => grant.token,
        other => panic!("no grant: {other:?}"),
    };
    result_of(node.propose(acquire(GrantKind::Lock, "a", second, true)));
    result_of(node.propose(acquire(GrantKind::Election, "e", second, false)));
    let put = |key: &[u8], fence: Option<Fence>| {
        C::Put(Put {
            key: key.to_vec(),
            value: b"v".to_vec(),
            fence,
            expected_mod_revision: None,
        })
    };
    let fence = Fence {
        name: "a".into(),
        token,
        kind: 0,
    };
    result_of(node.propose(put(b"fenced", Some(fence))));
    result_of(node.propose(put(b"plain", None)));
    result_of(node.propose(C::OpenSession(OpenSession {})));
    // Auth records: a user, an admin role granted to it, and the switch.
    use auth_change::Change as A;
    let admin = Permission {
        kind: PermissionKind::Admin as i32,
        prefix: String::new(),
    };
    for change in [
        A::PutUser(AuthUser {
            name: "root".into(),
            password_hash: "$argon2id$fixture".into(),
            replace: false,
        }),
        A::AddRole("root".into()),
        A::GrantPermission(AuthRolePermission {
            role: "root".into(),
            permission: Some(admin),
        }),
        A::GrantRole(AuthUserRole {
            user: "root".into(),
            role: "root".into(),
        }),
        A::Enable(vec![7; 32]),
    ] {
        let done = result_of(node.propose(C::AuthChange(AuthChange {
            change: Some(change),
        })));
        assert!(
            matches!(
                done.result,
                Some(latchkey_proto::state::v1::command_result::Result::Done(_))
            ),
            "auth change refused: {done:?}"
        );
    }
    node.checkpoint();
    drop(node);
    let engine = Engine::open_memory(&disk).expect("the fixture reopens");
    let mut records = Vec::new();
    for cf in [CF_RAFT_LOG, CF_RAFT_STATE, CF_STATE] {
        engine
            .scan_from(cf, &[], |key, payload| {
                records.push(Record {
                    cf,
                    key: key.to_vec(),
                    payload,
                });
                true
            })
            .expect("the fixture reads");
    }
    drop(engine);
    Fixture { disk, records }
}

fn frame(key: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(key);
    hasher.update(payload);
    [&hasher.finalize().to_be_bytes()[..], payload].concat()
}

// --- decoders --------------------------------------------------------------

/// Which decoder a payload goes to.
#[derive(Debug, Clone, Copy)]
pub enum Decoder {
    KvRecord,
    LogPosition,
    Entry,
    HardState,
    ConfState,
    Coordination,
    Auth,
}

#[derive(Debug, Clone)]
pub struct DecoderCase {
    decoder: Decoder,
    /// A fixture record's key, or arbitrary bytes.
    key: Result<Index, Vec<u8>>,
    payload: Input,
}

pub fn decoder_case() -> impl Strategy<Value = DecoderCase> {
    let decoder = prop::sample::select(vec![
        Decoder::KvRecord,
        Decoder::LogPosition,
        Decoder::Entry,
        Decoder::HardState,
        Decoder::ConfState,
        Decoder::Coordination,
        Decoder::Auth,
    ]);
    let key = prop_oneof![
        3 => any::<Index>().prop_map(Ok),
        1 => prop::collection::vec(any::<u8>(), 0..24).prop_map(Err),
    ];
    (decoder, key, mutate::input()).prop_map(|(decoder, key, payload)| DecoderCase {
        decoder,
        key,
        payload,
    })
}

/// Every decoder refuses what it cannot read with an error naming the key.
pub fn check_decoder(case: &DecoderCase) -> Result<(), TestCaseError> {
    let records = &fixture().records;
    let key = match &case.key {
        Ok(index) => records[index.index(records.len())].key.clone(),
        Err(bytes) => bytes.clone(),
    };
    let valid: Vec<Vec<u8>> = records.iter().map(|r| r.payload.clone()).collect();
    let payload = case.payload.bytes(&valid);
    let named = |error: FatalError, cf: &'static str| -> Result<(), TestCaseError> {
        match error {
            FatalError::Corruption {
                cf: at, key: shown, ..
            } => {
                prop_assert_eq!(at, cf);
                prop_assert_eq!(shown, display_key(&key));
                Ok(())
            }
            other => Err(TestCaseError::fail(format!(
                "not a corruption error: {other}"
            ))),
        }
    };
    match case.decoder {
        Decoder::KvRecord => match decode::<KvRecord>(CF_STATE, &key, &payload) {
            Ok(_) => Ok(()),
            Err(e) => named(e, CF_STATE),
        },
        Decoder::LogPosition => match decode::<LogPosition>(CF_STATE, &key, &payload) {
            Ok(_) => Ok(()),
            Err(e) => named(e, CF_STATE),
        },
        Decoder::Entry => match decode_entry(&key, &payload) {
            Ok(entry) => {
                prop_assert_eq!(
                    &key[..],
                    &keys::log_entry(entry.index)[..],
                    "an entry under another index's key"
                );
                Ok(())
            }
            Err(e) => named(e, CF_RAFT_LOG),
        },
        Decoder::HardState => match decode_pb::<HardState>(CF_RAFT_STATE, &key, &payload) {
            Ok(_) => Ok(()),
            Err(e) => named(e, CF_RAFT_STATE),
        },
        Decoder::ConfState => match decode_pb::<ConfState>(CF_RAFT_STATE, &key, &payload) {
            Ok(_) => Ok(()),
            Err(e) => named(e, CF_RAFT_STATE),
        },
        Decoder::Coordination => {
            // The record on its own, and in place of its namesake among the
            // fixture's coordination records.
            let mut state: Vec<(Vec<u8>, Vec<u8>)> = records
                .iter()
                .filter(|r| r.cf == CF_STATE && r.key.starts_with(coordination::RECORD_PREFIX))
                .filter(|r| r.key != key)
                .map(|r| (r.key.clone(), r.payload.clone()))
                .collect();
            state.push((key.clone(), payload.clone()));
            // Alone, a record that does not load is refused at its key.
            if let Err(e) = Coordination::load(TTL_BOUNDS, [(key.clone(), payload.clone())]) {
                prop_assert_eq!(e.key, key.escape_ascii().to_string());
            }
            // Among the others, a load error names some record's key.
            if let Err(e) = Coordination::load(TTL_BOUNDS, state.clone()) {
                let named = state
                    .iter()
                    .any(|(k, _)| k.escape_ascii().to_string() == e.key)
                    || e.key.starts_with(
                        &String::from_utf8_lossy(coordination::RECORD_PREFIX).to_string(),
                    );
                prop_assert!(named, "a load error that names no record: {}", e);
            }
            Ok(())
        }
        Decoder::Auth => {
            // A user, role or switch record that does not load is refused
            // with its own key.
            if let Err((at, reason)) = AuthState::load([(key.clone(), payload.clone())]) {
                prop_assert_eq!(at, key, "{}", reason);
            }
            Ok(())
        }
    }
}

// --- a node's data, damaged ----------------------------------------------------

#[derive(Debug, Clone)]
pub enum Damage {
    /// The framed bytes changed: the checksum no longer matches.
    Raw(Vec<Mutation>),
    /// The payload changed and written back with a valid checksum, as a
    /// bug (not the disk) would have written it.
    Reframed(Vec<Mutation>),
    /// Arbitrary bytes with a valid checksum.
    Replaced(Vec<u8>),
    Removed,
}

pub fn damage_case() -> impl Strategy<Value = (Index, Damage)> {
    let damage = prop_oneof![
        2 => mutate::mutations().prop_map(Damage::Raw),
        4 => mutate::mutations().prop_map(Damage::Reframed),
        1 => prop::collection::vec(any::<u8>(), 0..32).prop_map(Damage::Replaced),
        1 => Just(Damage::Removed),
    ];
    (any::<Index>(), damage)
}

/// Opens the node on `disk` and lets it run a few elections' worth of ticks.
fn open_and_run(disk: &MemoryDisk) -> Result<(), FatalError> {
    let mut node = TestNode::start(disk, 1, &[1], ELECTION_TICKS)?;
    for _ in 0..3 * ELECTION_TICKS {
        node.node.tick()?;
    }
    Ok(())
}

pub fn check_damage(record: Index, damage: &Damage) -> Result<(), TestCaseError> {
    let fixture = fixture();
    let record = &fixture.records[record.index(fixture.records.len())];
    let disk = fixture.disk.clone_for_test();
    let engine = Engine::open_memory(&disk).expect("the fixture opens");
    let raw = frame(&record.key, &record.payload);
    let mut broken_frame = false;
    match damage {
        Damage::Raw(mutations) => {
            let mut damaged = raw.clone();
            mutate::apply(&mut damaged, mutations);
            broken_frame = damaged != raw;
            engine.put_raw_for_test(record.cf, &record.key, &damaged);
        }
        Damage::Reframed(mutations) => {
            let mut payload = record.payload.clone();
            mutate::apply(&mut payload, mutations);
            let mut batch = Batch::new(&engine);
            batch.put(record.cf, &record.key, &payload);
            engine.write(batch, true).expect("a memory write");
        }
        Damage::Replaced(payload) => {
            let mut batch = Batch::new(&engine);
            batch.put(record.cf, &record.key, payload);
            engine.write(batch, true).expect("a memory write");
        }
        Damage::Removed => {
            let mut batch = Batch::new(&engine);
            batch.delete(record.cf, &record.key);
            engine.write(batch, true).expect("a memory write");
        }
    }
    drop(engine);
    match open_and_run(&disk) {
        Ok(()) => {
            prop_assert!(
                !broken_frame,
                "a record with a broken checksum was accepted"
            );
            Ok(())
        }
        Err(FatalError::Corruption { cf, key, reason }) => {
            if broken_frame {
                prop_assert_eq!(cf, record.cf, "{}", reason);
                prop_assert_eq!(key, display_key(&record.key), "{}", reason);
            }
            Ok(())
        }
        Err(FatalError::Removed(_)) if !broken_frame => Ok(()),
        Err(other) => Err(TestCaseError::fail(format!(
            "not reported as corruption: {other}"
        ))),
    }
}

// --- the memory disk's log -----------------------------------------------------

/// The log a power loss leaves of a few unsynced batches of every kind.
fn surviving_log() -> &'static (MemoryDisk, Vec<u8>) {
    static LOG: OnceLock<(MemoryDisk, Vec<u8>)> = OnceLock::new();
    LOG.get_or_init(|| {
        let disk = fixture().disk.clone_for_test();
        let engine = Engine::open_memory(&disk).expect("the fixture opens");
        for round in 0u8..4 {
            let mut batch = Batch::new(&engine);
            batch.put(CF_STATE, &keys::kv(&[b'x', round]), &[round; 5]);
            batch.put(CF_RAFT_STATE, b"extra", &[round]);
            batch.delete(CF_STATE, &keys::kv(b"plain"));
            batch.delete_range(CF_STATE, &keys::kv(b"y"), &keys::kv(b"z"));
            engine.write(batch, false).expect("a memory write");
        }
        drop(engine);
        disk.lose_power(PowerLoss {
            kept_bytes: usize::MAX,
            torn_fill: None,
        });
        let log = disk.surviving_log_for_test();
        assert!(!log.is_empty(), "the unsynced batches survive");
        (disk, log)
    })
}

/// Splits a log into its records' payloads (length ‖ crc32 ‖ payload).
fn records_of_log(log: &[u8]) -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    let mut rest = log;
    while rest.len() >= 8 {
        let length = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let Some(payload) = rest.get(8..8 + length) else {
            break;
        };
        records.push(payload.to_vec());
        rest = &rest[8 + length..];
    }
    records
}

fn log_of_records(records: &[Vec<u8>]) -> Vec<u8> {
    let mut log = Vec::new();
    for payload in records {
        log.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        log.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
        log.extend_from_slice(payload);
    }
    log
}

#[derive(Debug, Clone)]
pub enum LogDamage {
    /// The log's bytes changed; checksums as they were.
    Raw(Vec<Mutation>),
    /// One record's payload changed, its length and checksum fixed.
    Record(Index, Vec<Mutation>),
}

pub fn log_damage() -> impl Strategy<Value = LogDamage> {
    prop_oneof![
        mutate::mutations().prop_map(LogDamage::Raw),
        (any::<Index>(), mutate::mutations()).prop_map(|(i, m)| LogDamage::Record(i, m)),
    ]
}

pub fn check_log(damage: &LogDamage) -> Result<(), TestCaseError> {
    let (disk, log) = surviving_log();
    let damaged = match damage {
        LogDamage::Raw(mutations) => {
            let mut bytes = log.clone();
            mutate::apply(&mut bytes, mutations);
            bytes
        }
        LogDamage::Record(index, mutations) => {
            let mut records = records_of_log(log);
            let at = index.index(records.len());
            mutate::apply(&mut records[at], mutations);
            log_of_records(&records)
        }
    };
    let disk = disk.clone_for_test();
    disk.set_surviving_log_for_test(damaged);
    match Engine::open_memory(&disk) {
        Ok(_) => Ok(()),
        Err(FatalError::Corruption { .. }) => Ok(()),
        Err(FatalError::Storage { context, message }) => {
            prop_assert!(
                context.contains("byte"),
                "a replay error without an offset: {}: {}",
                context,
                message
            );
            Ok(())
        }
        Err(other) => Err(TestCaseError::fail(format!("unexpected error: {other}"))),
    }
}

// --- snapshot files ------------------------------------------------------------

fn snapshot_bytes() -> &'static Vec<u8> {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let engine = Engine::open_memory(&fixture().disk.clone_for_test()).expect("fixture opens");
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("fixture.snap");
        snapshot_file::write_from_engine(&engine, &path).expect("a snapshot file");
        std::fs::read(&path).expect("the snapshot reads")
    })
}

#[derive(Debug, Clone)]
pub struct SnapshotDamage {
    mutations: Vec<Mutation>,
    /// Recompute the file's checksum after the damage.
    fix_checksum: bool,
}

pub fn snapshot_damage() -> impl Strategy<Value = SnapshotDamage> {
    (mutate::mutations(), any::<bool>()).prop_map(|(mutations, fix_checksum)| SnapshotDamage {
        mutations,
        fix_checksum,
    })
}

fn scratch_file() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("a temp dir"));
    dir.path()
        .join(format!("{:?}.snap", std::thread::current().id()).replace(['(', ')'], ""))
}

pub fn check_snapshot(damage: &SnapshotDamage) -> Result<(), TestCaseError> {
    let original = snapshot_bytes();
    let mut bytes = original.clone();
    mutate::apply(&mut bytes, &damage.mutations);
    if damage.fix_checksum && bytes.len() >= 4 {
        let body = bytes.len() - 4;
        let checksum = crc32fast::hash(&bytes[..body]);
        bytes[body..].copy_from_slice(&checksum.to_be_bytes());
    }
    let path = scratch_file();
    std::fs::write(&path, &bytes).expect("a scratch file");
    let mut records = 0u64;
    let read = snapshot_file::read(&path, |_, _| {
        records += 1;
        Ok(())
    });
    match read {
        Ok(info) => {
            prop_assert!(
                damage.fix_checksum || bytes == *original,
                "a damaged file with its old checksum was accepted"
            );
            prop_assert_eq!(info.records, records);
            prop_assert_eq!(info.bytes, bytes.len() as u64);
        }
        Err(SnapshotFileError::Malformed { reason, .. }) => {
            prop_assert!(reason.contains("at byte"), "no offset in {:?}", reason);
        }
        Err(SnapshotFileError::Truncated { at, .. }) => {
            prop_assert!(at <= bytes.len() as u64);
        }
        Err(SnapshotFileError::Checksum { .. } | SnapshotFileError::NotASnapshot { .. }) => {}
        Err(SnapshotFileError::Io { reason, .. }) => {
            return Err(TestCaseError::fail(format!("an I/O error: {reason}")))
        }
    }
    Ok(())
}

/// The fixture holds records of every kind the decoders read (a check of
/// the fixture itself, so that the targets cannot pass vacuously).
pub fn fixture_has_every_kind_of_record() {
    let records = &fixture().records;
    let entries = records.iter().filter(|r| r.cf == CF_RAFT_LOG).count();
    assert!(entries >= 8, "the fixture's log has {entries} entries");
    for record in records.iter().filter(|r| r.cf == CF_RAFT_LOG) {
        let entry = Entry::parse_from_bytes(&record.payload).expect("an entry");
        assert_eq!(&record.key[..], &keys::log_entry(entry.index)[..]);
    }
    let prefixes = [
        coordination::LEASE_PREFIX,
        coordination::LOCK_PREFIX,
        coordination::WAITER_PREFIX,
        coordination::SESSION_PREFIX,
        coordination::NEXT_TOKEN_KEY,
        keys::KV_PREFIX,
        b"a/meta",
        b"a/user/",
        b"a/role/",
        keys::APPLIED,
        keys::MEMBERS,
        keys::CONF_STATE,
    ];
    for prefix in prefixes {
        assert!(
            records.iter().any(|r| r.key.starts_with(prefix)),
            "no record under {}",
            prefix.escape_ascii()
        );
    }
    let kv = records
        .iter()
        .find(|r| r.key == keys::kv(b"fenced"))
        .expect("a fenced key");
    let record = KvRecord::decode(kv.payload.as_slice()).expect("a key-value record");
    assert!(record.token > 0, "the fenced write kept its token");
}

#[test]
fn the_fixture_holds_every_kind_of_record() {
    fixture_has_every_kind_of_record();
}

#[test]
fn fuzz_record_decoders_name_the_key_of_what_they_refuse() {
    crate::runner::run(
        "storage::fuzz_record_decoders_name_the_key_of_what_they_refuse",
        2000,
        decoder_case(),
        |case| check_decoder(&case),
    );
}

#[test]
fn fuzz_a_damaged_record_stops_the_node_as_corruption_at_its_key() {
    crate::runner::run(
        "storage::fuzz_a_damaged_record_stops_the_node_as_corruption_at_its_key",
        256,
        damage_case(),
        |(record, damage)| check_damage(record, &damage),
    );
}

#[test]
fn fuzz_a_damaged_memory_log_replays_or_names_the_offset() {
    crate::runner::run(
        "storage::fuzz_a_damaged_memory_log_replays_or_names_the_offset",
        1000,
        log_damage(),
        |damage| check_log(&damage),
    );
}

#[test]
fn fuzz_a_damaged_snapshot_file_is_refused_with_its_offset() {
    crate::runner::run(
        "storage::fuzz_a_damaged_snapshot_file_is_refused_with_its_offset",
        1000,
        snapshot_damage(),
        |damage| check_snapshot(&damage),
    );
}

// --- regressions ---------------------------------------------------------------

#[test]
fn a_delete_range_that_ends_before_it_starts_in_a_replayed_log_names_its_offset() {
    // Found by fuzzing: replaying such a record panicked in the table
    // ("range start is greater than range end in BTreeMap").
    let (disk, log) = surviving_log();
    let mut records = records_of_log(log);
    // One batch holding one range deletion of the state family, backwards.
    let mut payload = vec![3u8, 2];
    for key in [b"z".as_slice(), b"a".as_slice()] {
        payload.extend_from_slice(&(key.len() as u32).to_be_bytes());
        payload.extend_from_slice(key);
    }
    records.insert(1, payload);
    let offset = 8 + records[0].len();
    let disk = disk.clone_for_test();
    disk.set_surviving_log_for_test(log_of_records(&records));
    match Engine::open_memory(&disk) {
        Err(FatalError::Storage { context, message }) => {
            assert!(
                context.contains(&format!("byte {offset}")),
                "{context}: {message}"
            );
            assert!(
                message.contains("ends before it starts"),
                "{context}: {message}"
            );
        }
        Err(other) => panic!("not a replay error: {other}"),
        Ok(_) => panic!("a backwards range deletion was replayed"),
    }
}

/// Writes `payload` under `key` of `cf` with a valid checksum, on a copy of
/// the fixture, and opens the node on it.
fn open_with(cf: &'static str, key: &[u8], payload: Option<&[u8]>) -> Result<(), FatalError> {
    let disk = fixture().disk.clone_for_test();
    let engine = Engine::open_memory(&disk).expect("the fixture opens");
    let mut batch = Batch::new(&engine);
    match payload {
        Some(payload) => batch.put(cf, key, payload),
        None => batch.delete(cf, key),
    }
    engine.write(batch, true).expect("a memory write");
    drop(engine);
    open_and_run(&disk)
}

#[test]
fn a_hard_state_that_commits_past_the_log_is_corruption_at_its_key() {
    // Found by fuzzing: raft-rs stopped the process ("hs.commit 10 is out
    // of range [1, 9]").
    let hard_state = fixture()
        .records
        .iter()
        .find(|r| r.cf == CF_RAFT_STATE && r.key == keys::raft_state::HARD_STATE)
        .expect("a hard state");
    let mut damaged: HardState =
        decode_pb(CF_RAFT_STATE, &hard_state.key, &hard_state.payload).expect("decodes");
    damaged.commit += 100;
    let payload = damaged.write_to_bytes().expect("encodes");
    match open_with(CF_RAFT_STATE, keys::raft_state::HARD_STATE, Some(&payload)) {
        Err(FatalError::Corruption { cf, key, reason }) => {
            assert_eq!(
                (cf, key.as_str()),
                (CF_RAFT_STATE, "hard_state"),
                "{reason}"
            );
        }
        other => panic!("not corruption of the hard state: {other:?}"),
    }
}

#[test]
fn a_missing_applied_position_is_corruption_not_a_second_apply() {
    // Found by fuzzing: without it the node replayed the log over the
    // state it had applied, and apply asserted ("lease 3 granted twice").
    match open_with(CF_STATE, keys::APPLIED, None) {
        Err(FatalError::Corruption { cf, key, reason }) => {
            assert_eq!(
                (cf, key.as_str()),
                (CF_STATE, display_key(keys::APPLIED).as_str()),
                "{reason}"
            );
        }
        other => panic!("not corruption of the applied position: {other:?}"),
    }
}

#[test]
fn an_applied_position_behind_the_state_is_corruption() {
    let behind = LogPosition { index: 2, term: 1 }.encode_to_vec();
    assert!(matches!(
        open_with(CF_STATE, keys::APPLIED, Some(&behind)),
        Err(FatalError::Corruption { .. })
    ));
}

#[test]
fn a_configuration_raft_cannot_restore_is_corruption_at_its_key() {
    // Found by fuzzing: raft-rs stopped the process ("invalid restore:
    // voters: 1 learners: 0 != voters: 1").
    let conf_state = ConfState {
        voters: vec![1],
        learners: vec![0],
        ..ConfState::default()
    };
    let payload = conf_state.write_to_bytes().expect("encodes");
    match open_with(CF_RAFT_STATE, keys::raft_state::CONF_STATE, Some(&payload)) {
        Err(FatalError::Corruption { cf, key, reason }) => {
            assert_eq!(
                (cf, key.as_str()),
                (CF_RAFT_STATE, "conf_state"),
                "{reason}"
            );
        }
        other => panic!("not corruption of the configuration: {other:?}"),
    }
}
