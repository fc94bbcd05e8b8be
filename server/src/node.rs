//! The Raft node: one task owns `RawNode` and everything it touches.
//!
//! Other tasks talk to it only through a bounded inbox ([`NodeHandle`]) and
//! read its published [`NodeStatus`] from a `watch` channel. The loop:
//!
//! 1. wait for a tick or an inbox message, then drain up to
//!    [`MAX_INBOX_BATCH`] more messages without waiting, so that many
//!    proposals share one Ready and one fsync (group commit);
//! 2. handle the Ready in the order raft-rs documents: send messages; apply
//!    a snapshot; apply committed entries (many to one unsynced RocksDB
//!    write, see `ready.rs`) and persist entries and hard state in
//!    one batch, then send persisted messages. A leader or a follower
//!    writes without syncing and leaves the fsync to a thread of its own,
//!    which reports back through the inbox (`log_sync.rs`; raft-rs's
//!    `advance_append_async` and `on_persist_ready`): a leader applies
//!    (answers) first and goes on stepping acknowledgements during the
//!    fsync; a follower asks for the sync first, applies during it, and its
//!    acks leave once it is done. A Ready that installs a snapshot or
//!    changes the term or the vote, and a candidate's, fsyncs when
//!    `must_sync` and acknowledges before it applies, yielding once in
//!    between in the production loop so that the link task it just woke
//!    writes the ack first; then `advance`, send the light ready's
//!    messages, record its commit index and apply its committed entries;
//!    `advance_apply`;
//! 3. publish the status (and its [`Standing`], when that changed) and
//!    compact the log if it has grown past the configured bound.
//!
//! Proposals carry a `ProposalContext` (node id, a random per-process boot
//! id, and a request id) in the entry context; when the entry is applied the
//! proposer finds its caller by that id, never by queue position. When this
//! node stops being leader, every pending proposal fails with
//! [`RequestError::LeadershipLost`]: its entry may or may not commit later.
//!
//! Linearizable reads use ReadIndex: the caller gets the commit index that
//! the leader confirmed with a quorum, and waits until the local applied
//! index reaches it (see [`NodeHandle::read_index`]; contexts and resends
//! are in `reads.rs`).
//!
//! Keepalives are answered by the leader from its lease clock, each only
//! after a confirmation round (a ReadIndex of the node's own) that started
//! after it arrived; see `crate::lease_clock` for why, and `leases.rs` for
//! the glue.
//!
//! # Seams for the deterministic simulator
//!
//! [`Node::run`] is the production loop: a tokio `select!` between a ticker,
//! the inbox and shutdown. A driver that owns the schedule itself (the simulator in
//! `server/tests/simulation.rs`) instead calls [`Node::tick`] and
//! [`Node::handle_inbox`], which run exactly the same code as one iteration
//! of that loop. [`NodeOptions`] replaces what would otherwise come from the
//! environment: the clock ([`Clock`]), the boot id, the election timeout
//! range (raft-rs draws it from `rand::thread_rng`, which cannot be seeded)
//! and an observer of applied entries. [`Node::new`] uses the production
//! defaults.
//!
//! # Layout
//! - this file: the handle, the loop, proposals, the Ready, apply.
//! - `log_sync.rs`: the Raft log's fsync on a thread of its own (leader and
//!   followers).
//! - `reads.rs`: ReadIndex contexts, pending reads and their resends.
//! - `leases.rs`: keepalives, confirmation rounds, expiry proposals.
//! - `sessions.rs`: expiry of idle exactly-once sessions.
//! - `restore.rs`: a restored cluster raises its token floor first.
//! - [`peer_messages`]: what a peer's message must be before raft-rs steps it.
//! - `membership.rs`: conf changes (proposed after `crate::membership`'s
//!   checks, applied with the member table), peers, leader transfer.
//! - `options.rs`: [`NodeOptions`] and the clocks.
//!
//! Not done yet: entries are read from RocksDB synchronously on the loop.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::FutureExt as _;
use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeSingle, ConfChangeV2, Entry, EntryType, Message, Snapshot,
};
use raft::{RawNode, SnapshotStatus, StateRole};
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use latchkey_proto::state::v1::{command_result, Command, CommandResult};

use crate::config::{Config, UnsafeSwitches};
use crate::coordination::{Event, LeaseId};
use crate::error::{FatalError, RequestError};
use crate::lease_clock::{LeaseClock, LeaseClockSettings};
use crate::metrics::Metrics;
use crate::session_clock::SessionClock;
use crate::state_machine::{SharedCoordination, StateMachine};
use crate::storage::raft_log::FatalSlot;
use crate::storage::{Batch, Engine, LogPosition, RaftLog};
use crate::types::{LogIndex, NodeId};

mod leases;
mod log_sync;
mod membership;
mod options;
pub mod peer_messages;
mod reads;
mod ready;
mod restore;
mod sessions;

pub use leases::{HeldGrant, KeepAliveAnswer};
pub use membership::MembershipView;
pub use options::{ApplyObserver, Clock, MonotonicClock, NodeOptions, RateFileClock};
pub use reads::READ_RESEND_INTERVAL;

use leases::KeepAliveReply;
use log_sync::LogSync;
use membership::MembersReply;
use reads::{PendingRead, ReadReply};
use ready::Pause;

/// Capacity of the node's inbox; senders wait when it is full.
pub const INBOX_CAPACITY: usize = 4096;
/// Most inbox messages handled before the next Ready.
pub const MAX_INBOX_BATCH: usize = 1024;
/// A ReadIndex request not answered within this time fails.
pub const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(5);
/// Applied-event batches buffered for slow subscribers; a subscriber that
/// falls further behind sees `Lagged` and must re-read the state.
pub const EVENT_BUFFER: usize = 4096;
/// Largest batch of entries raft-rs puts in one append message.
const MAX_APPEND_BYTES: u64 = 1024 * 1024;
/// Most append messages in flight to one follower.
const MAX_INFLIGHT_APPENDS: usize = 256;

/// Outbound side of the peer transport, as the node sees it.
pub trait Transport: Send + 'static {
    /// Queues messages for their recipients; never blocks. Messages that
    /// cannot be queued are dropped: Raft retransmits.
    fn send(&mut self, messages: Vec<Message>);

    /// The members changed: `members` is every member's record (this
    /// node's included). Called at start and after every applied conf
    /// change or installed snapshot.
    fn set_peers(&mut self, _members: &crate::membership::MemberTable) {}
}

/// The role of a node, as published in its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    #[default]
    Follower,
    Candidate,
    PreCandidate,
    Leader,
}

impl From<StateRole> for Role {
    fn from(role: StateRole) -> Role {
        match role {
            StateRole::Follower => Role::Follower,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Leader => Role::Leader,
        }
    }
}

/// A snapshot of the node's Raft position, republished after every Ready.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: NodeId,
    pub role: Role,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    /// The applied index the disk holds (the last checkpoint, see
    /// [`crate::state_machine`]): a restart applies the entries after it
    /// again.
    pub checkpoint_index: u64,
    /// 0 when no leader is known.
    pub leader_id: u64,
    pub first_index: u64,
    pub last_index: u64,
    /// False once the node task has stopped.
    pub running: bool,
    /// A sync of the Raft log has hung for longer than twice the election
    /// timeout (see `Node::wait_out_stalled_sync`): the node takes no input
    /// and refuses new requests until it ends.
    pub sync_stalled: bool,
}

impl NodeStatus {
    /// The part of this status that [`NodeHandle::watch_standing`] publishes.
    pub fn standing(&self) -> Standing {
        Standing {
            role: self.role,
            term: self.term,
            leader_id: self.leader_id,
            caught_up: self.applied_index >= self.commit_index,
            running: self.running,
            sync_stalled: self.sync_stalled,
        }
    }
}

/// What a node's status says about its standing: role, leader, whether
/// apply has caught up with commit, whether it runs. It changes with
/// elections and stops, not with every commit, and is published on a
/// channel of its own: a task that waits for such a change (the health
/// service, a queued acquire watching for its leader's fall) would
/// otherwise wake on every commit, apply and append, each a thread
/// wake-up on this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    pub role: Role,
    pub term: u64,
    /// 0 when no leader is known.
    pub leader_id: u64,
    /// The applied index has reached the commit index.
    pub caught_up: bool,
    /// False once the node task has stopped.
    pub running: bool,
    /// See [`NodeStatus::sync_stalled`].
    pub sync_stalled: bool,
}

/// The events of one applied entry, broadcast to watchers on this node.
#[derive(Debug, Clone)]
pub struct AppliedEvents {
    pub index: LogIndex,
    pub events: Vec<Event>,
}

/// What a successful proposal returns.
#[derive(Debug, Clone)]
pub struct Applied {
    pub index: LogIndex,
    pub term: u64,
    pub result: CommandResult,
}

type ProposalReply = oneshot::Sender<Result<Applied, RequestError>>;

/// A proposal in flight, waiting for its entry to apply.
struct Pending {
    reply: ProposalReply,
    /// Its command carries a session's request id, so a resend of it is
    /// applied at most once: its client may be told "outcome unknown"
    /// early (a leader whose disk hangs). One without cannot be resent
    /// safely, and waits for its outcome.
    resendable: bool,
}

/// Messages into the node task.
pub enum NodeMsg {
    /// A Raft message from a peer.
    Raft(Box<Message>),
    /// A command to replicate.
    Propose {
        command: Command,
        reply: ProposalReply,
    },
    /// A request for a linearizable read point.
    ReadIndex { reply: ReadReply },
    /// The transport could not reach a peer.
    Unreachable(NodeId),
    /// The transport finished (or failed) sending a snapshot.
    SnapshotSent { to: NodeId, ok: bool },
    /// Renew a lease (leader only, no Raft write; answered once a quorum
    /// confirmed a round that started after it arrived).
    KeepAlive {
        lease: LeaseId,
        reply: KeepAliveReply,
    },
    /// Time left on each lease, as this leader sees it (`None`: not
    /// leading, or unknown), in the order asked.
    LeasesRemaining {
        leases: Vec<LeaseId>,
        reply: oneshot::Sender<Vec<Option<Duration>>>,
    },
    /// The log sync thread made every Ready up to this number durable (0:
    /// it failed, and left its error in the node's fatal slot).
    LogSynced(u64),
    /// The membership and each member's progress (leader only).
    Members { reply: MembersReply },
    /// A membership change, checked, proposed, and answered once applied.
    ChangeMembers {
        change: crate::membership::Change,
        reply: ProposalReply,
    },
    /// Starts handing leadership to `to` (`None`: the best caught-up voter).
    TransferLeader {
        to: Option<NodeId>,
        reply: oneshot::Sender<Result<NodeId, RequestError>>,
    },
    /// Writes a checkpoint of everything applied so far, so that the engine
    /// holds it (a backup reads the engine); answers with its position.
    Checkpoint {
        reply: oneshot::Sender<Result<LogPosition, RequestError>>,
    },
}

/// The cloneable handle other tasks use to reach the node.
#[derive(Clone)]
pub struct NodeHandle {
    inbox: mpsc::Sender<NodeMsg>,
    status: watch::Receiver<NodeStatus>,
    standing: watch::Receiver<Standing>,
    fatal: FatalSlot,
    events: broadcast::Sender<Arc<AppliedEvents>>,
    coordination: SharedCoordination,
    auth: crate::auth::SharedAuth,
    metrics: Arc<Metrics>,
}

impl NodeHandle {
    /// The latest published status.
    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    /// Events of every entry applied from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<AppliedEvents>> {
        self.events.subscribe()
    }

    /// The coordination state as applied on this node.
    pub fn coordination(&self) -> SharedCoordination {
        self.coordination.clone()
    }

    /// Users, roles and the authentication switch, as applied on this node.
    pub fn auth(&self) -> crate::auth::SharedAuth {
        self.auth.clone()
    }

    /// A receiver that sees every status update: one per Ready that moved
    /// an index. To wait for a change of role or leader, use
    /// [`NodeHandle::watch_standing`].
    pub fn watch_status(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    /// A receiver that sees every change of this node's [`Standing`], and
    /// only those.
    pub fn watch_standing(&self) -> watch::Receiver<Standing> {
        self.standing.clone()
    }

    /// Delivers a peer's Raft message (waits if the inbox is full).
    pub async fn step(&self, message: Message) -> Result<(), RequestError> {
        self.send(NodeMsg::Raft(Box::new(message))).await
    }

    /// Stops the node: another task found that its data cannot be trusted.
    /// The node checks at least once per tick.
    pub fn report_fatal(&self, error: FatalError) {
        tracing::error!("{error}");
        self.fatal.lock().get_or_insert(error);
    }

    /// Non-blocking delivery of transport feedback.
    pub fn report(&self, message: NodeMsg) {
        // Feedback is advisory: if the inbox is full, Raft's own timers recover.
        let _ = self.inbox.try_send(message);
    }

    /// Hands a request to the node task, or refuses it at once while the
    /// node's sync is stalled: it would wait in the inbox until the stall
    /// ends, where another node can serve it now. Nothing was proposed, so
    /// the client may resend it anywhere.
    async fn send(&self, message: NodeMsg) -> Result<(), RequestError> {
        if self.standing.borrow().sync_stalled {
            return Err(RequestError::SyncStalled);
        }
        self.inbox
            .send(message)
            .await
            .map_err(|_| RequestError::ShuttingDown)
    }

    /// Replicates `command` and returns its result once applied here.
    pub async fn propose(&self, command: Command) -> Result<Applied, RequestError> {
        let started = std::time::Instant::now();
        let (reply, answer) = oneshot::channel();
        self.send(NodeMsg::Propose { command, reply }).await?;
        let result = answer.await.map_err(|_| RequestError::ShuttingDown)?;
        self.metrics.observe_proposal(started.elapsed());
        result
    }

    /// Hands a renewal of `lease` to the leader's node (waiting for room in
    /// its inbox) and returns where its answer will come, so that a caller
    /// can have many renewals in flight.
    pub async fn ask_keep_alive(
        &self,
        lease: LeaseId,
    ) -> Result<oneshot::Receiver<Result<KeepAliveAnswer, RequestError>>, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.send(NodeMsg::KeepAlive { lease, reply }).await?;
        Ok(answer)
    }

    /// The membership as the leader sees it.
    pub async fn members(&self) -> Result<MembershipView, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.send(NodeMsg::Members { reply }).await?;
        answer.await.map_err(|_| RequestError::ShuttingDown)?
    }

    /// Proposes a membership change; returns once it has applied here.
    pub async fn change_members(
        &self,
        change: crate::membership::Change,
    ) -> Result<Applied, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.send(NodeMsg::ChangeMembers { change, reply }).await?;
        answer.await.map_err(|_| RequestError::ShuttingDown)?
    }

    /// Has the node write a checkpoint of everything it has applied (see
    /// [`crate::state_machine`]); returns its position. A backup asks for
    /// one after its read point, so that the engine it reads is not older.
    pub async fn checkpoint(&self) -> Result<LogPosition, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.send(NodeMsg::Checkpoint { reply }).await?;
        answer.await.map_err(|_| RequestError::ShuttingDown)?
    }

    /// Starts a leader transfer; returns the node it goes to.
    pub async fn transfer_leader(&self, to: Option<NodeId>) -> Result<NodeId, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.send(NodeMsg::TransferLeader { to, reply }).await?;
        answer.await.map_err(|_| RequestError::ShuttingDown)?
    }

    /// Time left on `lease` if this node leads; `None` otherwise or if unknown.
    pub async fn lease_remaining(&self, lease: LeaseId) -> Result<Option<Duration>, RequestError> {
        let remaining = self.leases_remaining(vec![lease]).await?;
        Ok(remaining.into_iter().next().flatten())
    }

    /// Time left on each of `leases` if this node leads, in one message.
    pub async fn leases_remaining(
        &self,
        leases: Vec<LeaseId>,
    ) -> Result<Vec<Option<Duration>>, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.send(NodeMsg::LeasesRemaining { leases, reply })
            .await?;
        answer.await.map_err(|_| RequestError::ShuttingDown)
    }

    /// Waits until the local state reflects every write committed before
    /// this call: a ReadIndex round, then the local apply catching up.
    pub async fn read_index(&self) -> Result<LogIndex, RequestError> {
        let (reply, answer) = oneshot::channel();
        self.send(NodeMsg::ReadIndex { reply }).await?;
        let index = answer.await.map_err(|_| RequestError::ShuttingDown)??;
        self.wait_applied(index).await?;
        Ok(index)
    }

    /// Waits until the applied index reaches `index`.
    pub async fn wait_applied(&self, index: LogIndex) -> Result<(), RequestError> {
        let mut status = self.status.clone();
        let waited = tokio::time::timeout(
            READ_INDEX_TIMEOUT,
            status.wait_for(|s| s.applied_index >= index.0 || !s.running),
        )
        .await;
        match waited {
            Ok(Ok(s)) if s.running => Ok(()),
            Ok(_) => Err(RequestError::ShuttingDown),
            Err(_) => Err(RequestError::Timeout(format!(
                "local state did not reach index {index} in time"
            ))),
        }
    }
}

/// The task that owns `RawNode`.
pub struct Node {
    id: NodeId,
    boot_id: u64,
    raw: RawNode<RaftLog>,
    state_machine: StateMachine,
    transport: Box<dyn Transport>,
    inbox: mpsc::Receiver<NodeMsg>,
    status: watch::Sender<NodeStatus>,
    standing: watch::Sender<Standing>,
    events: broadcast::Sender<Arc<AppliedEvents>>,
    fatal: FatalSlot,
    next_request_id: u64,
    proposals: HashMap<u64, Pending>,
    /// Membership changes that reached this leader before it applied the
    /// entries of earlier terms (raft-rs holds back every conf change
    /// until then); proposed, or refused, once it has.
    deferred_changes: Vec<(crate::membership::Change, ProposalReply)>,
    /// Ordered, so that resends go out in the same order on every run
    /// (the deterministic simulator replays runs exactly).
    reads: BTreeMap<u64, PendingRead>,
    role: Role,
    /// The leader this node last knew of (0: none), to resend reads when it changes.
    known_leader: u64,
    lease_clock: LeaseClock<KeepAliveReply>,
    session_clock: SessionClock,
    /// Every member's addresses, as of the applied index.
    members: crate::membership::MemberTable,
    /// The members `--initial-cluster` names (for stores from before member
    /// tables were stored).
    config_members: crate::membership::MemberTable,
    /// A conf change was applied and the transport not yet told.
    members_changed: bool,
    /// This node is no longer a member.
    removed: bool,
    /// When each peer's last message arrived (for "answers now").
    last_heard: HashMap<NodeId, std::time::Instant>,
    /// When this leader last proposed a restored cluster's token floor.
    floor_proposed_at: Option<std::time::Instant>,
    unsafe_switches: UnsafeSwitches,
    tick_interval: Duration,
    compact_log_after_entries: u64,
    clock: Box<dyn Clock>,
    apply_observer: Option<ApplyObserver>,
    metrics: Arc<Metrics>,
    /// A sender into this node's own inbox (the log sync thread's way back).
    own_inbox: mpsc::Sender<NodeMsg>,
    /// The written, not yet synced Readies of a leader or a follower. Last,
    /// so that it is dropped (joining its thread) after the inbox the
    /// thread sends to.
    log_sync: LogSync,
}

impl Node {
    /// Opens the node's Raft state over `engine`; it records into `metrics`.
    pub fn new(
        config: &Config,
        engine: Engine,
        transport: Box<dyn Transport>,
        metrics: Arc<Metrics>,
    ) -> Result<(Node, NodeHandle), FatalError> {
        let mut options = NodeOptions {
            metrics,
            ..NodeOptions::default()
        };
        if let Some(path) = &config.unsafe_switches.clock_rate_file {
            tracing::warn!(file = %path.display(), "clock rate follows a file (--unsafe-clock-rate-file): test use only");
            options.clock = Box::new(RateFileClock::start(path.clone()));
        }
        Node::with_options(config, engine, transport, options)
    }

    /// [`Node::new`] with the environment made explicit (see [`NodeOptions`]).
    pub fn with_options(
        config: &Config,
        engine: Engine,
        transport: Box<dyn Transport>,
        options: NodeOptions,
    ) -> Result<(Node, NodeHandle), FatalError> {
        let fatal = FatalSlot::default();
        let voters: Vec<u64> = config.peers.keys().map(|id| id.0).collect();
        let config_members = crate::membership::from_peers(&config.peers);
        let bootstrap_voters: &[u64] = if config.join.is_empty() { &voters } else { &[] };
        let mut raft_log = RaftLog::open(
            engine.clone(),
            bootstrap_voters,
            &crate::membership::encode(&config_members),
            fatal.clone(),
        )?;
        let switches = &config.unsafe_switches;
        if let Some(warning) = switches.warning() {
            tracing::warn!(?switches, "{warning}");
        }
        raft_log.set_snapshot_dir(&config.data_dir.join("snapshots"))?;
        let state_machine = StateMachine::open(engine.clone(), switches)?;
        let applied = state_machine.applied();
        raft_log.repair_commit(applied.index)?;
        raft_log.check_commit()?;
        // (0, 0) is raft-rs's default range.
        let (min_election_tick, max_election_tick) = options.election_tick_range.unwrap_or((0, 0));
        let raft_config = raft::Config {
            id: config.id.0,
            election_tick: config.timing.election_ticks,
            heartbeat_tick: config.timing.heartbeat_ticks,
            min_election_tick,
            max_election_tick,
            applied: applied.index,
            pre_vote: true,
            check_quorum: true,
            max_size_per_msg: MAX_APPEND_BYTES,
            max_inflight_msgs: MAX_INFLIGHT_APPENDS,
            // The leader does not send an extra append to every follower
            // each time its commit index moves: followers learn it from
            // the next append or heartbeat (every `heartbeat_ticks`), and
            // a follower's ReadIndex round is itself a heartbeat that
            // carries it. Half the peer messages per commit; safety does
            // not depend on when a follower hears of a commit. raft-rs
            // still broadcasts while a conf change is pending.
            skip_bcast_commit: true,
            ..raft::Config::default()
        };
        raft_config
            .validate()
            .map_err(|e| FatalError::Raft(format!("invalid raft configuration: {e}")))?;
        let logger = options
            .raft_logger
            .unwrap_or_else(|| crate::logging::raft_logger(config.id.0));
        let raw = RawNode::new(&raft_config, raft_log, &logger)
            .map_err(|e| FatalError::Raft(format!("cannot start raft: {e}")))?;
        let (inbox_tx, inbox) = mpsc::channel(INBOX_CAPACITY);
        let (status, status_rx) = watch::channel(NodeStatus::default());
        let (standing, standing_rx) = watch::channel(Standing::default());
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let coordination = state_machine.coordination();
        let auth = state_machine.auth();
        let mut node = Node {
            id: config.id,
            boot_id: options.boot_id,
            raw,
            state_machine,
            transport,
            inbox,
            status,
            standing,
            events: events.clone(),
            fatal,
            next_request_id: 1,
            proposals: HashMap::new(),
            deferred_changes: Vec::new(),
            reads: BTreeMap::new(),
            role: Role::Follower,
            known_leader: raft::INVALID_ID,
            lease_clock: LeaseClock::new(LeaseClockSettings {
                max_clock_drift_ppm: config.max_clock_drift_ppm,
                unsafe_unconfirmed_renewals: switches.unconfirmed_renewals,
            }),
            session_clock: SessionClock::new(Duration::from_millis(config.session_idle_timeout_ms)),
            members: config_members.clone(),
            config_members,
            members_changed: false,
            removed: false,
            last_heard: HashMap::new(),
            floor_proposed_at: None,
            unsafe_switches: switches.clone(),
            tick_interval: Duration::from_millis(config.timing.tick_interval_ms),
            compact_log_after_entries: config.compact_log_after_entries,
            clock: options.clock,
            apply_observer: options.apply_observer,
            metrics: options.metrics.clone(),
            own_inbox: inbox_tx.clone(),
            log_sync: LogSync::new(),
        };
        node.members = node.load_members()?;
        // A member that was removed while it was down stops at once.
        node.removed = config.join.is_empty()
            && !node.members.is_empty()
            && !node.members.contains_key(&node.id);
        node.publish_members();
        node.publish_status(true);
        let handle = NodeHandle {
            inbox: inbox_tx,
            status: status_rx,
            standing: standing_rx,
            fatal: node.fatal.clone(),
            events,
            coordination,
            auth,
            metrics: options.metrics,
        };
        Ok((node, handle))
    }

    /// Runs until `shutdown` resolves or a fatal error occurs.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), FatalError> {
        let mut result = self.run_loop(shutdown).await;
        self.fail_all(RequestError::ShuttingDown);
        self.publish_status(false);
        if result.is_ok() {
            // A clean stop leaves nothing for the next start to apply again.
            result = self.write_checkpoint();
        }
        let flushed = self.raw.store().engine().flush();
        result.and(flushed)
    }

    /// Returns on a fatal error, or when `shutdown` resolves. Shutdown is
    /// only noticed at the input `select!`, between two iterations, so a
    /// graceful stop never leaves a Ready half handled.
    async fn run_loop(
        &mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), FatalError> {
        let mut next_tick = tokio::time::Instant::now();
        tokio::pin!(shutdown);
        loop {
            self.wait_out_stalled_sync().await?;
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep_until(next_tick) => {
                    // A clock that runs fast ticks more often (test clocks).
                    let interval = self.tick_interval.div_f64(self.clock.rate());
                    next_tick = tokio::time::Instant::now() + interval;
                    self.on_tick();
                }
                message = self.inbox.recv() => {
                    // The node holds a handle to itself (via the transport),
                    // so the inbox never closes while the loop runs.
                    let Some(message) = message else { return Ok(()) };
                    self.handle(message);
                    self.drain_inbox(MAX_INBOX_BATCH - 1);
                }
            }
            self.after_input(Pause::Yield).await?;
        }
    }

    /// One tick, for a driver that owns the schedule (the simulator): the
    /// same work as the ticker branch of one iteration of [`Node::run`].
    pub fn tick(&mut self) -> Result<(), FatalError> {
        self.on_tick();
        self.after_input_now()
    }

    /// Handles up to [`MAX_INBOX_BATCH`] queued messages without waiting,
    /// then the Ready: the same work as the inbox branch of one iteration
    /// of [`Node::run`].
    pub fn handle_inbox(&mut self) -> Result<(), FatalError> {
        self.drain_inbox(MAX_INBOX_BATCH);
        self.after_input_now()
    }

    /// The next message in the inbox, taken without handling it: for tests
    /// of what reaches the node.
    #[cfg(test)]
    pub(crate) fn take_inbox_message(&mut self) -> Option<NodeMsg> {
        self.inbox.try_recv().ok()
    }

    fn on_tick(&mut self) {
        self.raw.tick();
        self.tend_reads(false);
        self.refuse_unconfirmed();
        self.expire_idle_sessions();
        self.raise_token_floor_if_pending();
    }

    fn drain_inbox(&mut self, most: usize) {
        for _ in 0..most {
            match self.inbox.try_recv() {
                Ok(message) => self.handle(message),
                Err(_) => break,
            }
        }
    }

    /// Everything after the loop's input: the Ready, fatal errors, the
    /// status, compaction. With [`Pause::Never`] it completes in its first
    /// poll.
    async fn after_input(&mut self, pause: Pause) -> Result<(), FatalError> {
        if self.raw.raft.leader_id != self.known_leader {
            self.known_leader = self.raw.raft.leader_id;
            self.tend_reads(true);
        }
        self.maybe_start_round();
        self.resume_deferred_changes();
        self.on_ready(pause).await?;
        self.check_fatal()?;
        self.publish_status(true);
        self.maybe_compact()
    }

    /// [`Node::after_input`] for a synchronous driver.
    fn after_input_now(&mut self) -> Result<(), FatalError> {
        self.finish_deferred_sync()?;
        self.after_input(Pause::Never)
            .now_or_never()
            .expect("a Ready handled without pauses never waits")
    }

    fn check_fatal(&self) -> Result<(), FatalError> {
        if self.removed {
            return Err(FatalError::Removed(self.id.0));
        }
        match self.fatal.lock().take() {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    fn handle(&mut self, message: NodeMsg) {
        match message {
            NodeMsg::Raft(message) => {
                if let Err(refusal) = peer_messages::check(&self.raw.raft, &message) {
                    tracing::warn!(node = %self.id, peer = message.from, "dropped a raft message from a peer: {refusal}");
                    return;
                }
                self.heard_from(message.from);
                // Stale or misdirected messages are normal in Raft; drop them.
                if let Err(e) = self.raw.step(*message) {
                    tracing::debug!(node = %self.id, "dropped raft message: {e}");
                }
            }
            NodeMsg::Propose { command, reply } => self.propose(command, reply),
            NodeMsg::ReadIndex { reply } => self.read_index(reply),
            NodeMsg::Unreachable(peer) => self.raw.report_unreachable(peer.0),
            NodeMsg::SnapshotSent { to, ok } => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to.0, status);
            }
            NodeMsg::KeepAlive { lease, reply } => self.keep_alive(lease, reply),
            NodeMsg::LogSynced(number) => self.on_log_synced(number),
            NodeMsg::Members { reply } => self.membership_view(reply),
            NodeMsg::ChangeMembers { change, reply } => self.change_members(change, reply),
            NodeMsg::TransferLeader { to, reply } => {
                let _ = reply.send(self.start_transfer(to));
            }
            NodeMsg::Checkpoint { reply } => match self.write_checkpoint() {
                Ok(()) => {
                    let _ = reply.send(Ok(self.state_machine.checkpointed()));
                }
                Err(error) => {
                    let _ = reply.send(Err(RequestError::ShuttingDown));
                    self.report_fatal(error);
                }
            },
            NodeMsg::LeasesRemaining { leases, reply } => {
                let now = self.clock.now();
                let remaining = leases
                    .into_iter()
                    .map(|lease| self.lease_clock.remaining(now, lease))
                    .collect();
                let _ = reply.send(remaining);
            }
        }
    }

    /// A fresh id for a proposal or ReadIndex request of this process.
    fn take_request_id(&mut self) -> u64 {
        let id = self.next_request_id;
        self.next_request_id += 1;
        id
    }

    fn not_leader(&self) -> RequestError {
        let leader = self.raw.raft.leader_id;
        RequestError::NotLeader {
            leader_id: (leader != raft::INVALID_ID).then_some(leader),
            leader_client_addr: None,
        }
    }

    /// The context of this node's proposal `request_id`; 0 for a proposal
    /// nobody waits for.
    fn proposal_context(&self, request_id: u64) -> Vec<u8> {
        reads::ReadContext {
            node_id: self.id.0,
            boot_id: self.boot_id,
            request_id,
        }
        .encode()
    }

    /// Proposes a command of the leader's own (an expiry, the token floor),
    /// which nobody waits for; a dropped one is proposed again later.
    fn propose_own(&mut self, command: &Command) -> Result<(), raft::Error> {
        let context = self.proposal_context(0);
        self.raw.propose(context, command.encode_to_vec())
    }

    fn propose(&mut self, command: Command, reply: ProposalReply) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if !self.proposal_allowed(&command) {
            let _ = reply.send(Err(RequestError::Restoring));
            return;
        }
        let request_id = self.take_request_id();
        let resendable = command.request.is_some();
        match self
            .raw
            .propose(self.proposal_context(request_id), command.encode_to_vec())
        {
            Ok(()) => {
                self.proposals
                    .insert(request_id, Pending { reply, resendable });
            }
            Err(raft::Error::ProposalDropped) => {
                let _ = reply.send(Err(self.not_leader()));
            }
            Err(e) => {
                let _ = reply.send(Err(RequestError::Timeout(format!(
                    "proposal rejected: {e}"
                ))));
            }
        }
    }

    /// Writes a checkpoint of everything applied so far, unless the last
    /// one is already of it.
    fn write_checkpoint(&mut self) -> Result<(), FatalError> {
        if self.state_machine.checkpointed() == self.state_machine.applied() {
            return Ok(());
        }
        let mut batch = Batch::new(self.raw.store().engine());
        self.state_machine.checkpoint(&mut batch);
        self.raw.store().engine().write(batch, false)?;
        self.state_machine.batch_written();
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), FatalError> {
        let applied = self.state_machine.applied().index;
        let first = self.raw.store().first_index();
        if applied < first || applied - first + 1 < self.compact_log_after_entries {
            return Ok(());
        }
        // A restart resumes from the last checkpoint and applies the entries
        // after it again: the log must keep them. Compaction stays below
        // one written now.
        self.write_checkpoint()?;
        // Keep the most recent half so that a follower that is only a little
        // behind catches up from the log rather than a snapshot.
        let keep = self.compact_log_after_entries / 2;
        let compact_to = applied.saturating_sub(keep);
        if compact_to >= first {
            self.raw.mut_store().compact_to(compact_to)?;
        }
        Ok(())
    }

    fn publish_status(&mut self, running: bool) {
        let raft = &self.raw.raft;
        let store = self.raw.store();
        let status = NodeStatus {
            id: self.id,
            role: raft.state.into(),
            term: raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: self.state_machine.applied().index,
            checkpoint_index: self.state_machine.checkpointed().index,
            leader_id: raft.leader_id,
            first_index: store.first_index(),
            last_index: store.last_index(),
            running,
            sync_stalled: self.log_sync.refusing,
        };
        if status.leader_id != raft::INVALID_ID
            && status.leader_id != self.status.borrow().leader_id
        {
            self.metrics.leader_changed();
        }
        let standing = status.standing();
        self.standing.send_if_modified(|current| {
            let changed = *current != standing;
            *current = standing;
            changed
        });
        self.status.send_if_modified(|current| {
            let changed = *current != status;
            *current = status;
            changed
        });
    }
}
