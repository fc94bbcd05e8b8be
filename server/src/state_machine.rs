//! The replicated state machine: a deterministic function from committed
//! commands to state changes.
//!
//! Apply reads no clock, no randomness and does no I/O beyond the `state`
//! column family: every replica that applies the same entries reaches the
//! same state. The caller applies one or more consecutive entries into a
//! batch and then finishes it ([`StateMachine::finish_batch`]); until it
//! reports the batch written ([`StateMachine::batch_written`]), the
//! key-value records those entries wrote are read from an overlay, so each
//! entry sees the ones before it.
//!
//! Checkpoints. The coordination and auth state lives in memory; the
//! `state` column family holds a copy of it as of a *checkpoint*, an
//! applied position written in the same atomic batch as every record
//! changed up to it ([`keys::APPLIED`]). The records the entries change
//! wait for the next checkpoint, which writes each at its latest value
//! (coordination records are noted as changed and encoded from the
//! in-memory state only then; auth records are kept encoded): a record
//! that many entries change (the token counter, a session, a lock taken
//! and released) is written once per checkpoint rather than once per
//! entry, and one taken and released between two checkpoints not at all.
//! A batch is a checkpoint when it has anything to write of its own (a
//! key-value record, a membership change), when [`CHECKPOINT_ENTRIES`]
//! entries, [`CHECKPOINT_RECORDS`] changed records or [`CHECKPOINT_BYTES`]
//! of applied commands have gathered since the last one, or when the node
//! asks for one (before it compacts the log, for a backup, at a clean
//! stop).
//! Between checkpoints the engine holds an older but whole state, so a
//! crash loses nothing: the node restarts from the last checkpoint and
//! Raft applies the committed entries after it again (the node writes a
//! checkpoint before it compacts the log, so the log keeps every entry
//! after [`StateMachine::checkpointed`]), reaching the same state, because
//! apply is deterministic. Key-value records are never deferred: API reads
//! of the fenced store go to the engine, so the batch that changes one is a
//! checkpoint.
//!
//! Committed entries that are not a command this binary can apply
//! ([`StateMachine::apply_encoded`]) fall in two kinds:
//! - bytes that are not a protobuf `Command` at all: no correct proposer,
//!   of this version or any other (fields are only ever added), writes
//!   them, and every replica reads the same bytes from the log and fails
//!   to decode them the same way. Apply records a deterministic failure
//!   (`INTERNAL`, "does not decode") as the entry's result, changes
//!   nothing else, and goes on: stopping would take down every replica at
//!   the same index, and again at every restart, for an entry whose outcome
//!   all of them agree on;
//! - a `Command` that decodes but carries no body this binary knows: that
//!   is what a newer version's new command looks like to an older replica,
//!   which would diverge from the newer ones if it skipped it. It stays a
//!   fatal error naming the index: upgrade this node.
//!
//! It holds two things:
//! - the fenced key-value store, records under [`keys::KV_PREFIX`]; their
//!   revisions are the Raft indexes of the entries that wrote them;
//! - the [`Coordination`] state (leases, locks, elections, sessions), kept
//!   in memory and persisted as records under [`coordination::RECORD_PREFIX`];
//! - the [`AuthState`] (users, roles, the authentication switch), kept in
//!   memory and persisted as records under [`keys::AUTH_PREFIX`].
//!
//! Exactly-once (Invariant 5): a command with a [`RequestId`] is first
//! looked up in the session table; a duplicate returns the recorded result
//! and changes nothing. The result of a new one is recorded in the same
//! batch as its effects.
//!
//! Fenced writes (Invariant 3): a `Put`/`Delete` with a fence is applied
//! only if the fence's token is the current grant of its lock (or election)
//! at this index and not lower than the token stored on the key. An
//! unfenced write is allowed and keeps the key's stored token, so a later
//! fenced write must still present at least that token.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;
use prost::Message as _;
use tonic::Code;

use latchkey_proto::state::v1::{
    command, command_result, Command, CommandError, CommandResult, DeleteResult, Done, GrantKind,
    KvRecord, LeaseGranted, PutResult, Queued, SessionOpened,
};
use latchkey_proto::v1::{error_details, fence, ErrorDetails, Fence, RequestId};

use crate::auth::{AuthState, SharedAuth};
use crate::config::UnsafeSwitches;
use crate::coordination::{
    self, Caller, Coordination, CoordinationError, Event, FencingToken, Kind, LeaseId, Op, Outcome,
    SequenceNumber, SessionCheck, SessionId, TtlBounds,
};
use crate::error::FatalError;
use crate::storage::{keys, Batch, Engine, LogPosition, CF_STATE};
use crate::types::LogIndex;

/// Applied entries after which the next batch is a checkpoint (see the
/// module docs): what a restart applies again at most, beside the entries
/// committed after the last apply.
pub const CHECKPOINT_ENTRIES: u64 = 4096;
/// Changed records after which the next batch is a checkpoint: bounds the
/// memory the records waiting for it take, with [`CHECKPOINT_BYTES`].
pub const CHECKPOINT_RECORDS: usize = 8192;
/// Bytes of the commands applied since the last checkpoint after which the
/// next batch is a checkpoint: what a record holds beyond a few fixed-width
/// fields (a name, an election's value, a result) comes from a command, so
/// this bounds what the checkpoint writes, with [`CHECKPOINT_RECORDS`].
pub const CHECKPOINT_BYTES: usize = 4 * 1024 * 1024;

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value accepted, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Most keys one `Range` returns.
pub const MAX_RANGE_KEYS: usize = 10_000;
/// Shortest lease TTL apply accepts. The API enforces a higher floor
/// derived from the election timeout; this one is the same on every replica.
pub const MIN_LEASE_TTL_MS: u64 = 100;
/// Longest lease TTL accepted (one day).
pub const MAX_LEASE_TTL_MS: u64 = 24 * 60 * 60 * 1000;

/// The TTL bounds apply uses; identical on every replica.
pub const TTL_BOUNDS: TtlBounds = TtlBounds {
    min_ttl_ms: MIN_LEASE_TTL_MS,
    max_ttl_ms: MAX_LEASE_TTL_MS,
};

/// Shared, read-mostly coordination state; written only by the node task.
pub type SharedCoordination = Arc<RwLock<Coordination>>;

/// The applying side of the state machine, owned by the node task.
pub struct StateMachine {
    engine: Engine,
    applied: LogPosition,
    /// The position of the last checkpoint: what the engine holds.
    checkpointed: LogPosition,
    coordination: SharedCoordination,
    auth: SharedAuth,
    /// Invariants broken on purpose for tests (all off in production):
    /// `no_fencing` skips the token check, `volatile_token_counter` never
    /// writes the token counter.
    switches: UnsafeSwitches,
    /// Key-value records (by stored key; `None`: deleted) written into the
    /// batch being built and not yet in the engine.
    unwritten_kv: std::collections::HashMap<Vec<u8>, Option<KvRecord>>,
    /// Auth records (stored key → encoded value; `None`: deleted) that the
    /// entries applied since the last checkpoint changed, at their latest
    /// value; they go into the next checkpoint's batch, with the rendered
    /// coordination records of `touched`.
    unwritten_records: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Coordination records the entries applied since the last checkpoint
    /// changed; rendered at the checkpoint, from the state then, so a
    /// record that many entries change is encoded once.
    touched: coordination::Touched,
    /// Bytes of the commands applied since the last checkpoint and of the
    /// records in `unwritten_records`: what the next checkpoint writes is
    /// made of these.
    unwritten_bytes: usize,
}

/// What applying one command produced.
pub struct ApplyOutput {
    pub result: CommandResult,
    pub events: Vec<Event>,
    /// The client id of the command's request (0: none, or the entry did
    /// not decode); its session is active.
    pub session: u64,
}

impl StateMachine {
    /// Loads the applied position and the coordination state.
    pub fn open(engine: Engine, switches: &UnsafeSwitches) -> Result<StateMachine, FatalError> {
        let (coordination, auth, applied) = load_state(&engine, switches)?;
        Ok(StateMachine {
            engine,
            applied,
            checkpointed: applied,
            coordination: Arc::new(RwLock::new(coordination)),
            auth: Arc::new(RwLock::new(auth)),
            switches: switches.clone(),
            unwritten_kv: std::collections::HashMap::new(),
            unwritten_records: BTreeMap::new(),
            touched: coordination::Touched::default(),
            unwritten_bytes: 0,
        })
    }

    /// The caller wrote the batch it has been building (or dropped it,
    /// empty, when it was no checkpoint): reads go to the engine again.
    pub fn batch_written(&mut self) {
        self.unwritten_kv.clear();
    }

    /// The stored record of a key, as of the entries applied so far (the
    /// batch being built included).
    fn read_kv(&self, stored_key: &[u8]) -> Result<Option<KvRecord>, FatalError> {
        match self.unwritten_kv.get(stored_key) {
            Some(record) => Ok(record.clone()),
            None => self.engine.get_message::<KvRecord>(CF_STATE, stored_key),
        }
    }

    pub fn applied(&self) -> LogPosition {
        self.applied
    }

    /// The applied position the engine holds: a restart resumes from here,
    /// so the log must keep every entry after it.
    pub fn checkpointed(&self) -> LogPosition {
        self.checkpointed
    }

    pub fn coordination(&self) -> SharedCoordination {
        self.coordination.clone()
    }

    pub fn auth(&self) -> SharedAuth {
        self.auth.clone()
    }

    /// Re-reads the state after a snapshot replaced it. Records changed
    /// since the last checkpoint are dropped: the snapshot is of a later
    /// position, and replaces them.
    pub fn reload(&mut self) -> Result<(), FatalError> {
        assert!(
            self.unwritten_kv.is_empty(),
            "a snapshot is installed only between written batches"
        );
        let (coordination, auth, applied) = load_state(&self.engine, &self.switches)?;
        *self.coordination.write() = coordination;
        *self.auth.write() = auth;
        self.applied = applied;
        self.checkpointed = applied;
        self.unwritten_records.clear();
        self.touched = coordination::Touched::default();
        self.unwritten_bytes = 0;
        Ok(())
    }

    /// Decodes a committed entry's bytes and applies the command at
    /// `index`. Bytes that do not decode are a deterministic failure,
    /// recorded as the result with nothing else changed (see the module
    /// docs); a command without a known body is a fatal error.
    pub fn apply_encoded(
        &mut self,
        batch: &mut Batch,
        index: u64,
        data: &[u8],
    ) -> Result<ApplyOutput, FatalError> {
        match Command::decode(data) {
            Ok(command) => self.apply(batch, index, command),
            Err(e) => {
                tracing::error!(
                    index,
                    bytes = data.len(),
                    "committed entry does not decode as a command; recorded as failed: {e}"
                );
                let message = format!("committed entry {index} does not decode as a command: {e}");
                Ok(ApplyOutput {
                    result: error_result(Code::Internal, message, None),
                    events: Vec::new(),
                    session: 0,
                })
            }
        }
    }

    /// Applies one command at `index`, adding its changes to `batch`.
    pub fn apply(
        &mut self,
        batch: &mut Batch,
        index: u64,
        command: Command,
    ) -> Result<ApplyOutput, FatalError> {
        self.unwritten_bytes += command.encoded_len();
        let session = command.request.as_ref().map_or(0, |r| r.client_id);
        let request = command.request.filter(|r| r.client_id != 0 && r.seq != 0);
        if let Some(request) = &request {
            if let Some(refusal) = self.check_session(request)? {
                return Ok(ApplyOutput {
                    result: refusal,
                    events: Vec::new(),
                    session,
                });
            }
        }
        let mut output = self.apply_new(batch, index, command)?;
        output.session = session;
        if let Some(request) = request {
            self.coordination.write().record_session_touching(
                SessionId(request.client_id),
                SequenceNumber(request.seq),
                SequenceNumber(request.oldest_pending_seq),
                output.result.encode_to_vec(),
                &mut self.touched,
            );
        }
        Ok(output)
    }

    /// The answer to a request that must not be applied: the recorded
    /// result of a duplicate, or a refusal. `None`: apply it.
    fn check_session(&self, request: &RequestId) -> Result<Option<CommandResult>, FatalError> {
        let (session, seq) = (SessionId(request.client_id), SequenceNumber(request.seq));
        let coordination = self.coordination.read();
        let answer = match coordination.check_session(session, seq) {
            SessionCheck::New => None,
            SessionCheck::Duplicate(bytes) => {
                let result = CommandResult::decode(bytes).map_err(|e| FatalError::Corruption {
                    cf: CF_STATE,
                    key: format!("session {session} result {seq}"),
                    reason: format!("recorded result does not decode: {e}"),
                })?;
                Some(result)
            }
            SessionCheck::TooOld { oldest_kept } => {
                let message = format!(
                    "request {seq} of session {session} is older than the oldest remembered ({oldest_kept}); its outcome is unknown"
                );
                Some(error_result(Code::FailedPrecondition, message, None))
            }
            SessionCheck::Expired => {
                let message = format!(
                    "session {session} has expired or was closed; request {seq} was not applied now, but an earlier attempt of it may have been"
                );
                let details =
                    error_details::Detail::SessionExpired(latchkey_proto::v1::SessionExpired {
                        session: session.0,
                        seq: seq.0,
                    });
                Some(error_result(
                    Code::FailedPrecondition,
                    message,
                    Some(details),
                ))
            }
        };
        Ok(answer)
    }

    fn apply_new(
        &mut self,
        batch: &mut Batch,
        index: u64,
        command: Command,
    ) -> Result<ApplyOutput, FatalError> {
        let no_events = |result| {
            Ok(ApplyOutput {
                result,
                events: Vec::new(),
                session: 0,
            })
        };
        let mut caller = Caller::default();
        let op = match command.command {
            Some(command::Command::Put(put)) => return no_events(self.put(batch, index, put)?),
            Some(command::Command::AuthChange(change)) => {
                let applied = self.auth.write().apply(index, change);
                let result = match applied {
                    Ok(changes) => {
                        self.stage_changes(changes);
                        done()
                    }
                    Err(e) => error_result(e.code(), e.to_string(), None),
                };
                return no_events(result);
            }
            Some(command::Command::Delete(delete)) => {
                return no_events(self.delete(batch, index, delete)?)
            }
            Some(command::Command::GrantLease(c)) => {
                caller.identity = Some(c.owner).filter(|o| !o.is_empty());
                caller.max_owner_leases = c.max_owner_leases;
                Op::GrantLease { ttl_ms: c.ttl_ms }
            }
            Some(command::Command::RevokeLease(c)) => {
                caller.check_owner = c.caller.is_some();
                caller.identity = c.caller.filter(|o| !o.is_empty());
                Op::RevokeLease {
                    lease: LeaseId(c.lease),
                }
            }
            Some(command::Command::ExpireLeases(c)) => Op::ExpireLeases {
                leases: c.leases.into_iter().map(LeaseId).collect(),
            },
            Some(command::Command::Acquire(c)) => {
                caller.check_owner = c.caller.is_some();
                caller.identity = c.caller.filter(|o| !o.is_empty());
                caller.max_waiters = c.max_waiters;
                Op::Acquire {
                    kind: kind_of(c.kind),
                    name: c.name,
                    lease: LeaseId(c.lease),
                    wait: c.wait,
                    value: c.value,
                }
            }
            Some(command::Command::Release(c)) => Op::Release {
                kind: kind_of(c.kind),
                name: c.name,
                token: FencingToken(c.token),
            },
            Some(command::Command::CancelWait(c)) => Op::CancelWait {
                kind: kind_of(c.kind),
                name: c.name,
                lease: LeaseId(c.lease),
                attempt: (c.attempt != 0).then_some(LogIndex(c.attempt)),
            },
            Some(command::Command::Proclaim(c)) => Op::Proclaim {
                name: c.name,
                token: FencingToken(c.token),
                value: c.value,
            },
            Some(command::Command::OpenSession(_)) => Op::OpenSession,
            Some(command::Command::CloseSession(c)) => Op::CloseSession {
                session: SessionId(c.session),
            },
            Some(command::Command::ExpireSessions(c)) => Op::ExpireSessions {
                sessions: c.sessions.into_iter().map(SessionId).collect(),
            },
            Some(command::Command::RaiseTokenFloor(c)) => Op::RaiseTokenFloor {
                floor: FencingToken(c.floor),
            },
            None => {
                return Err(FatalError::Corruption {
                    cf: crate::storage::CF_RAFT_LOG,
                    key: index.to_string(),
                    reason: "committed command has no body".into(),
                })
            }
        };
        let name = op_name(&op);
        let applied = self.coordination.write().apply_touching(
            LogIndex(index),
            op,
            &caller,
            &mut self.touched,
        );
        let result = match applied.result {
            Ok(outcome) => outcome_result(&name, outcome),
            Err(error) => coordination_error(&name, error),
        };
        Ok(ApplyOutput {
            result,
            events: applied.events,
            session: 0,
        })
    }

    /// Checks a write's fence and compare-and-set condition against the key's
    /// current record. `Err` is the (deterministic) refusal.
    fn check_write(
        &self,
        key: &[u8],
        existing: Option<&KvRecord>,
        fence: Option<&Fence>,
        expected_mod_revision: Option<u64>,
    ) -> Result<(), CommandResult> {
        if let Some(expected) = expected_mod_revision {
            let actual = existing.map_or(0, |r| r.mod_revision);
            if actual != expected {
                let details =
                    error_details::Detail::RevisionMismatch(latchkey_proto::v1::RevisionMismatch {
                        key: key.to_vec(),
                        expected,
                        actual,
                    });
                let message = format!("mod revision is {actual}, expected {expected}");
                return Err(error_result(
                    Code::FailedPrecondition,
                    message,
                    Some(details),
                ));
            }
        }
        let Some(fence) = fence else { return Ok(()) };
        if self.switches.no_fencing {
            return Ok(());
        }
        let token = FencingToken(fence.token);
        let coordination = self.coordination.read();
        let checked = match fence.kind() {
            fence::Kind::Lock => coordination.check_fence(&fence.name, token),
            fence::Kind::Election => coordination.check_election_fence(&fence.name, token),
        };
        if let Err(error) = checked {
            return Err(stale(
                &fence.name,
                error.presented.0,
                error.current.map_or(0, |t| t.0),
            ));
        }
        let stored = existing.map_or(0, |r| r.token);
        if fence.token < stored {
            return Err(stale(&fence.name, fence.token, stored));
        }
        Ok(())
    }

    fn put(
        &mut self,
        batch: &mut Batch,
        index: u64,
        put: latchkey_proto::state::v1::Put,
    ) -> Result<CommandResult, FatalError> {
        let stored_key = keys::kv(&put.key);
        let existing = self.read_kv(&stored_key)?;
        if let Err(refusal) = self.check_write(
            &put.key,
            existing.as_ref(),
            put.fence.as_ref(),
            put.expected_mod_revision,
        ) {
            return Ok(refusal);
        }
        let (token, fence_name) = match (&put.fence, &existing) {
            (Some(fence), _) => (fence.token, fence.name.clone()),
            (None, Some(existing)) => (existing.token, existing.fence_name.clone()),
            (None, None) => (0, String::new()),
        };
        let record = KvRecord {
            value: put.value,
            create_revision: existing.as_ref().map_or(index, |r| r.create_revision),
            mod_revision: index,
            token,
            fence_name,
        };
        batch.put_message(CF_STATE, &stored_key, &record);
        self.unwritten_kv.insert(stored_key, Some(record));
        Ok(result(command_result::Result::Put(PutResult {
            revision: index,
        })))
    }

    fn delete(
        &mut self,
        batch: &mut Batch,
        index: u64,
        delete: latchkey_proto::state::v1::Delete,
    ) -> Result<CommandResult, FatalError> {
        let stored_key = keys::kv(&delete.key);
        let existing = self.read_kv(&stored_key)?;
        if let Err(refusal) = self.check_write(
            &delete.key,
            existing.as_ref(),
            delete.fence.as_ref(),
            delete.expected_mod_revision,
        ) {
            return Ok(refusal);
        }
        let deleted = existing.is_some();
        if deleted {
            batch.delete(CF_STATE, &stored_key);
            self.unwritten_kv.insert(stored_key, None);
        }
        Ok(result(command_result::Result::Delete(DeleteResult {
            deleted,
            revision: index,
        })))
    }

    /// Finishes the batch being built, whose last entry is at `position`:
    /// everything up to it is applied. Returns whether the caller must
    /// write the batch: `true` when it is a checkpoint (see the module
    /// docs), which it then holds; `false` when it stays empty and the
    /// records its entries changed wait for a later checkpoint.
    pub fn finish_batch(&mut self, batch: &mut Batch, position: LogPosition) -> bool {
        assert!(
            position.index > self.applied.index,
            "applied index must grow: {} after {}",
            position.index,
            self.applied.index
        );
        self.applied = position;
        let due = !batch.is_empty()
            || self.touched.len() + self.unwritten_records.len() >= CHECKPOINT_RECORDS
            || self.unwritten_bytes >= CHECKPOINT_BYTES
            || position.index - self.checkpointed.index >= CHECKPOINT_ENTRIES;
        if due {
            self.checkpoint(batch);
        }
        due
    }

    /// Makes `batch` a checkpoint of the applied position: every record
    /// changed since the last one, at its latest value, and the position.
    /// The caller writes it.
    pub fn checkpoint(&mut self, batch: &mut Batch) {
        let touched = std::mem::take(&mut self.touched);
        let changes = self.coordination.read().render_touched(&touched);
        self.stage_changes(changes);
        for (key, value) in std::mem::take(&mut self.unwritten_records) {
            match value {
                Some(value) => batch.put(CF_STATE, &key, &value),
                None => batch.delete(CF_STATE, &key),
            }
        }
        batch.put_message(CF_STATE, keys::APPLIED, &self.applied);
        self.checkpointed = self.applied;
        self.unwritten_bytes = 0;
    }

    /// Keeps changed records for the next checkpoint, replacing any
    /// earlier value of the same record since the last one.
    fn stage_changes(&mut self, changes: coordination::Changes) {
        for (key, value) in changes {
            if self.switches.volatile_token_counter && key == coordination::NEXT_TOKEN_KEY {
                // Broken on purpose (test switch): the counter stays in memory.
                continue;
            }
            self.unwritten_bytes += key.len() + value.as_ref().map_or(0, Vec::len);
            self.unwritten_records.insert(key, value);
        }
    }
}

fn load_applied(engine: &Engine) -> Result<LogPosition, FatalError> {
    Ok(engine
        .get_message::<LogPosition>(CF_STATE, keys::APPLIED)?
        .unwrap_or_default())
}

/// Everything the state machine keeps in memory, read from the engine and
/// checked against the applied position.
fn load_state(
    engine: &Engine,
    switches: &UnsafeSwitches,
) -> Result<(Coordination, AuthState, LogPosition), FatalError> {
    let coordination = load_coordination(engine, switches)?;
    let auth = load_auth(engine)?;
    let applied = load_applied(engine)?;
    check_applied(&coordination, applied)?;
    Ok((coordination, auth, applied))
}

/// The state is not ahead of its applied position (a missing or damaged
/// position would make the node apply entries twice, which apply asserts
/// never happens).
fn check_applied(coordination: &Coordination, applied: LogPosition) -> Result<(), FatalError> {
    let latest = coordination.latest_index();
    if latest.0 > applied.index {
        return Err(FatalError::Corruption {
            cf: CF_STATE,
            key: crate::storage::display_key(keys::APPLIED),
            reason: format!(
                "the applied position is {}, but the state holds records of index {latest}",
                applied.index
            ),
        });
    }
    Ok(())
}

fn load_coordination(
    engine: &Engine,
    switches: &UnsafeSwitches,
) -> Result<Coordination, FatalError> {
    let mut records = Vec::new();
    engine.scan_prefix(CF_STATE, coordination::RECORD_PREFIX, |key, payload| {
        records.push((key.to_vec(), payload));
        true
    })?;
    let loaded = if switches.volatile_token_counter {
        Coordination::load_recomputing_counter(TTL_BOUNDS, records)
    } else {
        Coordination::load(TTL_BOUNDS, records)
    };
    loaded.map_err(|e| FatalError::Corruption {
        cf: CF_STATE,
        key: "coordination records".into(),
        reason: e.to_string(),
    })
}

fn load_auth(engine: &Engine) -> Result<AuthState, FatalError> {
    let mut records = Vec::new();
    engine.scan_prefix(CF_STATE, keys::AUTH_PREFIX, |key, payload| {
        records.push((key.to_vec(), payload));
        true
    })?;
    AuthState::load(records).map_err(|(key, reason)| FatalError::Corruption {
        cf: CF_STATE,
        key: crate::storage::display_key(&key),
        reason: format!("auth record does not decode: {reason}"),
    })
}

fn kind_of(kind: i32) -> Kind {
    match GrantKind::try_from(kind) {
        Ok(GrantKind::Election) => Kind::Election,
        _ => Kind::Lock,
    }
}

fn op_name(op: &Op) -> String {
    match op {
        Op::Acquire { name, .. }
        | Op::Release { name, .. }
        | Op::CancelWait { name, .. }
        | Op::Proclaim { name, .. } => name.clone(),
        _ => String::new(),
    }
}

fn result(result: command_result::Result) -> CommandResult {
    CommandResult {
        result: Some(result),
    }
}

fn done() -> CommandResult {
    result(command_result::Result::Done(Done {}))
}

/// The wire form of a grant of lock or election `name`.
pub fn grant_proto(name: &str, grant: &coordination::Grant) -> latchkey_proto::v1::Grant {
    latchkey_proto::v1::Grant {
        name: name.to_string(),
        lease: grant.lease.0,
        token: grant.token.0,
        value: grant.value.clone(),
        revision: grant.granted_index.0,
    }
}

fn outcome_result(name: &str, outcome: Outcome) -> CommandResult {
    match outcome {
        Outcome::LeaseGranted { lease, ttl_ms } => {
            result(command_result::Result::LeaseGranted(LeaseGranted {
                lease: lease.0,
                ttl_ms,
            }))
        }
        Outcome::LeaseRevoked { .. }
        | Outcome::LeasesExpired { .. }
        | Outcome::Released { .. }
        | Outcome::SessionsEnded { .. }
        | Outcome::TokenFloorRaised { .. } => done(),
        Outcome::SessionOpened { session } => {
            result(command_result::Result::SessionOpened(SessionOpened {
                session: session.0,
            }))
        }
        Outcome::Acquired { grant, .. } | Outcome::Proclaimed { leader: grant } => {
            result(command_result::Result::Granted(grant_proto(name, &grant)))
        }
        Outcome::WaitCancelled {
            held: Some(grant), ..
        } => result(command_result::Result::Granted(grant_proto(name, &grant))),
        Outcome::WaitCancelled { held: None, .. } => done(),
        Outcome::Queued { position } => result(command_result::Result::Queued(Queued {
            position: u32::try_from(position).unwrap_or(u32::MAX),
        })),
    }
}

fn error_result(
    code: Code,
    message: String,
    details: Option<error_details::Detail>,
) -> CommandResult {
    result(command_result::Result::Error(CommandError {
        code: code as i32,
        message,
        details: details.map(|detail| ErrorDetails {
            detail: Some(detail),
        }),
    }))
}

fn stale(name: &str, presented: u64, current: u64) -> CommandResult {
    let message = if current == 0 {
        format!("stale fencing token {presented} for {name:?}: it is not held")
    } else {
        format!("stale fencing token {presented} for {name:?}: current token is {current}")
    };
    let details = error_details::Detail::StaleToken(latchkey_proto::v1::StaleToken {
        name: name.to_string(),
        presented,
        current,
    });
    error_result(Code::FailedPrecondition, message, Some(details))
}

/// The recorded result of a refused coordination op: a gRPC code, a
/// message and typed details. Also used for refusals found before proposing.
pub(crate) fn coordination_error(name: &str, error: CoordinationError) -> CommandResult {
    let message = error.to_string();
    match error {
        CoordinationError::InvalidArgument { field, reason } => {
            let details = error_details::Detail::InvalidField(latchkey_proto::v1::InvalidField {
                field: field.to_string(),
                reason,
            });
            error_result(Code::InvalidArgument, message, Some(details))
        }
        CoordinationError::LeaseNotFound { lease } => {
            let details = error_details::Detail::LeaseNotFound(latchkey_proto::v1::LeaseNotFound {
                lease: lease.0,
            });
            error_result(Code::NotFound, message, Some(details))
        }
        CoordinationError::Held {
            holder_lease,
            holder_token,
        } => {
            let details = error_details::Detail::LockHeld(latchkey_proto::v1::LockHeld {
                name: name.to_string(),
                holder_lease: holder_lease.0,
                holder_token: holder_token.0,
            });
            error_result(
                Code::FailedPrecondition,
                format!("{name:?} is {message}"),
                Some(details),
            )
        }
        CoordinationError::StaleToken { presented, current } => {
            stale(name, presented.0, current.map_or(0, |t| t.0))
        }
        CoordinationError::ResourceExhausted { what, limit } => {
            let details = error_details::Detail::LimitExceeded(latchkey_proto::v1::LimitExceeded {
                limit: what.to_string(),
                allowed: limit,
                requested: limit.saturating_add(1),
            });
            error_result(Code::ResourceExhausted, message, Some(details))
        }
        CoordinationError::NotOwner { lease, caller } => {
            let details =
                error_details::Detail::PermissionDenied(latchkey_proto::v1::PermissionDenied {
                    user: caller,
                    permission: "lease owner".into(),
                    resource: format!("lease {lease}"),
                });
            error_result(Code::PermissionDenied, message, Some(details))
        }
        CoordinationError::RestoreInProgress => error_result(Code::Unavailable, message, None),
    }
}

/// A user key and its record.
pub type KeyRecord = (Vec<u8>, KvRecord);

/// Read-only queries over the state machine, usable from any task.
#[derive(Clone)]
pub struct Reader {
    engine: Engine,
    coordination: SharedCoordination,
    auth: SharedAuth,
}

impl Reader {
    /// The engine the reader reads (for backups, which read a snapshot of it).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn new(engine: Engine, coordination: SharedCoordination, auth: SharedAuth) -> Reader {
        Reader {
            engine,
            coordination,
            auth,
        }
    }

    /// Users, roles and the authentication switch, as applied here.
    pub fn auth(&self) -> SharedAuth {
        self.auth.clone()
    }

    /// The coordination state, for queries. Hold the guard briefly.
    pub fn coordination(&self) -> parking_lot::RwLockReadGuard<'_, Coordination> {
        self.coordination.read()
    }

    /// The record of `key`, if present.
    pub fn get(&self, key: &[u8]) -> Result<Option<KvRecord>, FatalError> {
        self.engine.get_message(CF_STATE, &keys::kv(key))
    }

    /// Up to `limit` records whose keys start with `prefix`, and whether
    /// more matched.
    pub fn range(&self, prefix: &[u8], limit: usize) -> Result<(Vec<KeyRecord>, bool), FatalError> {
        let mut found = Vec::new();
        let mut more = false;
        let mut failure = None;
        self.engine
            .scan_prefix(CF_STATE, &keys::kv(prefix), |key, payload| {
                if found.len() == limit {
                    more = true;
                    return false;
                }
                match crate::storage::decode::<KvRecord>(CF_STATE, key, &payload) {
                    Ok(record) => found.push((key[keys::KV_PREFIX.len()..].to_vec(), record)),
                    Err(e) => {
                        failure = Some(e);
                        return false;
                    }
                }
                true
            })?;
        match failure {
            Some(e) => Err(e),
            None => Ok((found, more)),
        }
    }
}

#[cfg(test)]
mod tests;
