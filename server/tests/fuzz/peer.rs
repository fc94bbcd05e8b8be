//! Target 3: peers' frames, from bytes to a real node stepping them.
//!
//! The path is the transport's: a `PeerFrame` decoded from bytes, checked
//! by `transport::check_frame` for the stream of its sender, handed to the
//! node's inbox as the peer service does, and handled by the node
//! (`Node::handle_inbox`: the checks in front of raft-rs's `step`, the
//! step, the Ready), followed by ticks. The node is node 1 of a three-voter
//! cluster on memory disks that has elected a leader and committed a few
//! commands; a case restarts it from a copy of its disk as a follower, a
//! pre-candidate, or the leader (elected with node 2's votes), and sends it
//! one to six messages: built field by field around its own term, log and
//! commit index; valid messages seen in the cluster, mutated byte by byte;
//! or arbitrary bytes. Nothing may panic. A node may stop with a fatal
//! error only for what a faulty peer that is the legitimate leader can
//! make it commit or install (see `fatal_stop_is_expected`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, EntryType, Message, MessageType, Snapshot};

use latchkey_proto::peer::v1::{peer_frame, PeerFrame};
use latchkey_proto::state::v1::{command, GrantLease, OpenSession};
use latchkey_server::error::FatalError;
use latchkey_server::node::Role;
use latchkey_server::storage::raft_log::FatalSlot;
use latchkey_server::storage::{Engine, MemoryDisk, RaftLog};
use latchkey_server::transport::check_frame;
use latchkey_server::types::NodeId;

use crate::commands;
use crate::mutate::{self, Mutation};
use crate::node::{TestNode, ELECTION_TICKS};

pub const VOTERS: [u64; 3] = [1, 2, 3];
/// Node 1 campaigns first; the others wait longer.
const SLOW_ELECTION_TICKS: usize = 4 * ELECTION_TICKS;

/// Cases that ended with the node stopping on a fatal error.
pub static FATAL_STOPS: AtomicU64 = AtomicU64::new(0);
/// Messages the node stepped (that passed the transport's check).
pub static STEPPED: AtomicU64 = AtomicU64::new(0);

/// The cluster's disks after it committed a few commands, and the valid
/// messages its members sent each other.
pub struct Fixture {
    disks: BTreeMap<u64, MemoryDisk>,
    templates: Vec<Message>,
}

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(build_fixture)
}

/// Delivers every sent message until none is left (bounded).
fn settle(nodes: &mut BTreeMap<u64, TestNode>, seen: &mut Vec<Message>) {
    for _ in 0..64 {
        let mut sent = Vec::new();
        for node in nodes.values_mut() {
            // A step with an empty inbox ends the sync deferred at the
            // node's last step, and sends what waited for it (an ack).
            node.node.handle_inbox().expect("a fixture node runs");
            sent.extend(node.take_sent());
        }
        if sent.is_empty() {
            return;
        }
        for message in sent {
            seen.push(message.clone());
            if let Some(node) = nodes.get_mut(&message.to) {
                node.deliver(message).expect("a fixture node runs");
            }
        }
    }
}

fn build_fixture() -> Fixture {
    let disks: BTreeMap<u64, MemoryDisk> =
        VOTERS.iter().map(|id| (*id, MemoryDisk::new())).collect();
    let mut nodes: BTreeMap<u64, TestNode> = BTreeMap::new();
    for (id, disk) in &disks {
        let ticks = if *id == 1 {
            ELECTION_TICKS
        } else {
            SLOW_ELECTION_TICKS
        };
        nodes.insert(
            *id,
            TestNode::start(disk, *id, &VOTERS, ticks).expect("a fixture node starts"),
        );
    }
    let mut seen = Vec::new();
    for _ in 0..8 * ELECTION_TICKS {
        for node in nodes.values_mut() {
            node.node.tick().expect("a fixture node runs");
        }
        settle(&mut nodes, &mut seen);
        if nodes[&1].role() == Role::Leader {
            break;
        }
    }
    assert_eq!(
        nodes[&1].role(),
        Role::Leader,
        "node 1 of the fixture leads"
    );
    let leader = nodes.get_mut(&1).expect("node 1");
    let mut answers = vec![
        leader.propose(command::Command::GrantLease(GrantLease {
            ttl_ms: 60_000,
            ..GrantLease::default()
        })),
        leader.propose(command::Command::OpenSession(OpenSession {})),
    ];
    for _ in 0..4 {
        settle(&mut nodes, &mut seen);
        for node in nodes.values_mut() {
            node.node.tick().expect("a fixture node runs");
        }
    }
    settle(&mut nodes, &mut seen);
    for answer in &mut answers {
        assert!(
            matches!(answer.try_recv(), Ok(Ok(_))),
            "a fixture proposal applied"
        );
    }
    let committed = nodes[&1].handle.status().commit_index;
    for node in nodes.values_mut() {
        node.checkpoint();
    }
    drop(nodes);
    let mut templates: Vec<Message> = seen;
    templates.push(snapshot_message(&disks[&1], committed));
    Fixture { disks, templates }
}

/// A MsgSnapshot as the leader builds it (inline, on a memory disk).
fn snapshot_message(disk: &MemoryDisk, index: u64) -> Message {
    let disk = disk.clone_for_test();
    let engine = Engine::open_memory(&disk).expect("the fixture opens");
    let log = RaftLog::open(engine, &[], &[], FatalSlot::default()).expect("the log opens");
    let snapshot = raft::Storage::snapshot(&log, index, 2).expect("a snapshot");
    let mut message = Message::default();
    message.set_msg_type(MessageType::MsgSnapshot);
    message.from = 1;
    message.to = 2;
    message.term = log.hard_state().term;
    message.set_snapshot(snapshot);
    message
}

// --- the node under test -------------------------------------------------------

#[derive(Debug, Clone, Copy)]
pub enum Start {
    Follower,
    PreCandidate,
    Leader,
}

fn start(start: Start) -> TestNode {
    let fixture = fixture();
    let disk = fixture.disks[&1].clone_for_test();
    let mut node = TestNode::start(&disk, 1, &VOTERS, ELECTION_TICKS).expect("node 1 restarts");
    match start {
        Start::Follower => {}
        Start::PreCandidate => campaign(&mut node),
        Start::Leader => {
            let disk = fixture.disks[&2].clone_for_test();
            let voter =
                TestNode::start(&disk, 2, &VOTERS, SLOW_ELECTION_TICKS).expect("node 2 restarts");
            let mut nodes = BTreeMap::from([(1, node), (2, voter)]);
            campaign(nodes.get_mut(&1).expect("node 1"));
            let mut seen = Vec::new();
            for _ in 0..ELECTION_TICKS {
                settle(&mut nodes, &mut seen);
                if nodes[&1].role() == Role::Leader {
                    break;
                }
                nodes
                    .get_mut(&1)
                    .expect("node 1")
                    .node
                    .tick()
                    .expect("node 1 runs");
            }
            node = nodes.remove(&1).expect("node 1");
            assert_eq!(node.role(), Role::Leader, "node 1 wins with node 2's vote");
            node.take_sent();
        }
    }
    node
}

/// Ticks until the node campaigns.
fn campaign(node: &mut TestNode) {
    for _ in 0..2 * ELECTION_TICKS + 2 {
        node.node.tick().expect("node 1 runs");
        if node.role() != Role::Follower {
            return;
        }
    }
    panic!("node 1 did not campaign");
}

// --- messages ------------------------------------------------------------------

/// A number relative to one of the node's positions, or any number.
#[derive(Debug, Clone, Copy)]
pub enum Near {
    Offset(i8),
    Any(u64),
}

impl Near {
    fn resolve(self, base: u64) -> u64 {
        match self {
            Near::Offset(delta) => base.saturating_add_signed(i64::from(delta)),
            Near::Any(n) => n,
        }
    }
}

fn near() -> impl Strategy<Value = Near> {
    prop_oneof![6 => (-3i8..4).prop_map(Near::Offset), 1 => any::<u64>().prop_map(Near::Any)]
}

#[derive(Debug, Clone)]
pub enum Data {
    Command(latchkey_proto::state::v1::Command),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
pub struct EntrySpec {
    entry_type: i32,
    /// `None`: the next index after the previous entry (as a leader sends).
    index: Option<Near>,
    term: Near,
    data: Data,
}

fn entry_spec() -> impl Strategy<Value = EntrySpec> {
    let data = prop_oneof![
        3 => commands::command().prop_map(Data::Command),
        1 => vec(any::<u8>(), 0..24).prop_map(Data::Bytes),
    ];
    let entry_type = prop_oneof![8 => Just(0), 1 => 0i32..3];
    (
        entry_type,
        prop::option::weighted(0.2, near()),
        near(),
        data,
    )
        .prop_map(|(entry_type, index, term, data)| EntrySpec {
            entry_type,
            index,
            term,
            data,
        })
}

#[derive(Debug, Clone)]
pub struct SnapshotSpec {
    index: Near,
    term: Near,
    voters: Vec<u64>,
    learners: Vec<u64>,
    voters_outgoing: Vec<u64>,
    learners_next: Vec<u64>,
    /// `None`: the fixture's snapshot data.
    data: Option<Vec<Mutation>>,
}

fn members() -> impl Strategy<Value = Vec<u64>> {
    prop_oneof![
        3 => Just(VOTERS.to_vec()),
        2 => vec(0u64..6, 0..4),
    ]
}

fn snapshot_spec() -> impl Strategy<Value = SnapshotSpec> {
    (
        near(),
        near(),
        members(),
        prop_oneof![3 => Just(vec![]), 1 => vec(0u64..6, 0..3)],
        prop_oneof![3 => Just(vec![]), 1 => vec(0u64..6, 0..3)],
        prop_oneof![3 => Just(vec![]), 1 => vec(0u64..6, 0..3)],
        prop::option::weighted(0.3, mutate::mutations()),
    )
        .prop_map(
            |(index, term, voters, learners, voters_outgoing, learners_next, data)| SnapshotSpec {
                index,
                term,
                voters,
                learners,
                voters_outgoing,
                learners_next,
                data,
            },
        )
}

/// A message built field by field, around the node's state when it is sent.
#[derive(Debug, Clone)]
pub struct MessageSpec {
    msg_type: i32,
    from: u64,
    term: Near,
    log_term: Near,
    index: Near,
    commit: Near,
    commit_term: Near,
    entries: Vec<EntrySpec>,
    snapshot: Option<SnapshotSpec>,
    reject: bool,
    reject_hint: Near,
    request_snapshot: Near,
    context: Vec<u8>,
}

fn message_spec() -> impl Strategy<Value = MessageSpec> {
    let from = prop_oneof![8 => 2u64..4, 1 => 0u64..6];
    let msg_type = prop::sample::select(vec![
        2, 3, 3, 3, 4, 5, 6, 7, 8, 8, 9, 13, 14, 15, 15, 16, 17, 18, 0, 1, 10, 11, 12,
    ]);
    (
        (msg_type, from, near(), near(), near(), near(), near()),
        (
            vec(entry_spec(), 0..4),
            prop::option::weighted(0.15, snapshot_spec()),
            any::<bool>(),
            near(),
            near(),
            prop_oneof![3 => Just(vec![]), 1 => vec(any::<u8>(), 0..8)],
        ),
    )
        .prop_map(
            |(
                (msg_type, from, term, log_term, index, commit, commit_term),
                (entries, snapshot, reject, reject_hint, request_snapshot, context),
            )| MessageSpec {
                msg_type,
                from,
                term,
                log_term,
                index,
                commit,
                commit_term,
                entries,
                snapshot,
                reject,
                reject_hint,
                request_snapshot,
                context,
            },
        )
}

/// What one frame carries.
#[derive(Debug, Clone)]
pub enum Frame {
    Built(Box<MessageSpec>),
    /// A message seen in the cluster, re-addressed to node 1 from `from`.
    Seen {
        template: Index,
        from: u64,
        term: Near,
        mutations: Vec<Mutation>,
    },
    Bytes(Vec<u8>),
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        6 => message_spec().prop_map(|spec| Frame::Built(Box::new(spec))),
        3 => (any::<Index>(), 2u64..4, near(), prop_oneof![1 => Just(vec![]), 2 => mutate::mutations()])
            .prop_map(|(template, from, term, mutations)| Frame::Seen { template, from, term, mutations }),
        1 => vec(any::<u8>(), 0..64).prop_map(Frame::Bytes),
    ]
}

#[derive(Debug, Clone)]
pub struct Case {
    start: Start,
    frames: Vec<(Frame, u8)>,
}

pub fn case() -> impl Strategy<Value = Case> {
    let start = prop::sample::select(vec![Start::Follower, Start::PreCandidate, Start::Leader]);
    (start, vec((frame(), 0u8..3), 1..7)).prop_map(|(start, frames)| Case { start, frames })
}

/// The node's positions a built message is placed around.
struct Position {
    term: u64,
    last: u64,
    commit: u64,
}

fn position(node: &TestNode) -> Position {
    let status = node.handle.status();
    Position {
        term: status.term,
        last: status.last_index,
        commit: status.commit_index,
    }
}

fn build(spec: &MessageSpec, at: &Position) -> Message {
    let mut message = Message {
        msg_type: MessageType::from_i32_or_hup(spec.msg_type),
        from: spec.from,
        to: 1,
        term: spec.term.resolve(at.term),
        log_term: spec.log_term.resolve(at.term),
        index: spec.index.resolve(at.last),
        commit: spec.commit.resolve(at.commit),
        commit_term: spec.commit_term.resolve(at.term),
        reject: spec.reject,
        reject_hint: spec.reject_hint.resolve(at.last),
        request_snapshot: spec.request_snapshot.resolve(0),
        context: spec.context.clone().into(),
        ..Message::default()
    };
    let mut next = message.index;
    let entries: Vec<Entry> = spec
        .entries
        .iter()
        .map(|e| {
            next = e.index.map_or(next.wrapping_add(1), |i| i.resolve(at.last));
            Entry {
                entry_type: entry_type(e.entry_type),
                index: next,
                term: e.term.resolve(at.term),
                data: match &e.data {
                    Data::Command(command) => command.encode_to_vec().into(),
                    Data::Bytes(bytes) => bytes.clone().into(),
                },
                ..Entry::default()
            }
        })
        .collect();
    message.set_entries(entries.into());
    if let Some(spec) = &spec.snapshot {
        message.set_snapshot(snapshot(spec, at));
    }
    message
}

fn entry_type(value: i32) -> EntryType {
    match value {
        1 => EntryType::EntryConfChange,
        2 => EntryType::EntryConfChangeV2,
        _ => EntryType::EntryNormal,
    }
}

fn snapshot(spec: &SnapshotSpec, at: &Position) -> Snapshot {
    let fixture = fixture();
    let template = fixture
        .templates
        .last()
        .expect("the snapshot template")
        .get_snapshot();
    let mut snapshot = template.clone();
    let meta = snapshot.mut_metadata();
    meta.index = spec.index.resolve(at.commit);
    meta.term = spec.term.resolve(at.term);
    meta.set_conf_state(ConfState {
        voters: spec.voters.clone(),
        learners: spec.learners.clone(),
        voters_outgoing: spec.voters_outgoing.clone(),
        learners_next: spec.learners_next.clone(),
        ..ConfState::default()
    });
    if let Some(mutations) = &spec.data {
        let mut data = snapshot.get_data().to_vec();
        mutate::apply(&mut data, mutations);
        snapshot.set_data(data.into());
    }
    snapshot
}

/// The bytes of a frame, and the stream (sender) it arrives on.
fn encode(frame: &Frame, at: &Position) -> (u64, Vec<u8>) {
    let (from, raft_message) = match frame {
        Frame::Built(spec) => {
            let message = build(spec, at);
            let stream = if (2..4).contains(&message.from) {
                message.from
            } else {
                2
            };
            (
                stream,
                message.write_to_bytes().expect("a raft message encodes"),
            )
        }
        Frame::Seen {
            template,
            from,
            term,
            mutations,
        } => {
            let templates = &fixture().templates;
            let mut message = templates[template.index(templates.len())].clone();
            message.from = *from;
            message.to = 1;
            if message.term != 0 {
                message.term = term.resolve(at.term);
            }
            let mut bytes = message.write_to_bytes().expect("a raft message encodes");
            mutate::apply(&mut bytes, mutations);
            (*from, bytes)
        }
        Frame::Bytes(bytes) => (2, bytes.clone()),
    };
    let frame = PeerFrame {
        frame: Some(peer_frame::Frame::RaftMessage(raft_message)),
    };
    (from, frame.encode_to_vec())
}

/// Sends every frame of `case` to node 1; panics propagate.
pub fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let mut node = start(case.start);
    for (frame, ticks) in &case.frames {
        let (from, bytes) = encode(frame, &position(&node));
        let Ok(frame) = PeerFrame::decode(bytes.as_slice()) else {
            continue;
        };
        let Ok(message) = check_frame(NodeId(from), NodeId(1), frame) else {
            continue;
        };
        STEPPED.fetch_add(1, Ordering::Relaxed);
        let mut handled = node.deliver(message);
        for _ in 0..*ticks {
            handled = handled.and_then(|()| node.node.tick());
        }
        if let Err(error) = handled {
            if fatal_stop_is_expected(&error) {
                FATAL_STOPS.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            return Err(TestCaseError::fail(format!("node 1 stopped: {error}")));
        }
        node.take_sent();
    }
    Ok(())
}

/// A peer that is the legitimate leader decides what the log holds: a
/// faulty one can make this node commit a conf change that does not decode
/// or that raft-rs refuses, or a command with no body this binary knows,
/// and the node stops on it by design (a replica must not skip what other
/// replicas, or newer versions, may have applied; see `state_machine.rs`).
fn fatal_stop_is_expected(error: &FatalError) -> bool {
    match error {
        FatalError::Corruption { reason, .. } => {
            reason.contains("committed conf change")
                || reason.contains("committed command has no body")
        }
        FatalError::Raft(reason) => reason.contains("applying a committed conf change"),
        _ => false,
    }
}

trait FromI32OrHup {
    fn from_i32_or_hup(value: i32) -> MessageType;
}

impl FromI32OrHup for MessageType {
    fn from_i32_or_hup(value: i32) -> MessageType {
        <MessageType as protobuf::ProtobufEnum>::from_i32(value).unwrap_or(MessageType::MsgHup)
    }
}

#[test]
fn fuzz_peer_frames_never_panic_the_node() {
    crate::runner::run(
        "peer::fuzz_peer_frames_never_panic_the_node",
        256,
        case(),
        |case| run_case(&case),
    );
    println!(
        "peer: {} messages stepped, {} cases ended in an expected fatal stop",
        STEPPED.load(Ordering::Relaxed),
        FATAL_STOPS.load(Ordering::Relaxed)
    );
}

// --- regressions: messages that crashed node 1 before `peer_messages` -----------

/// A message of `msg_type` from node 2 to node 1 at node 1's term.
fn message_from_2(node: &TestNode, msg_type: MessageType) -> Message {
    let mut message = Message::default();
    message.set_msg_type(msg_type);
    message.from = 2;
    message.to = 1;
    message.term = node.handle.status().term;
    message
}

/// Sends `message` the transport's way and checks that node 1 lives on:
/// the step, its Ready and a round of ticks all succeed.
fn survives(node: &mut TestNode, message: Message) {
    let frame = PeerFrame {
        frame: Some(peer_frame::Frame::RaftMessage(
            message.write_to_bytes().expect("a raft message encodes"),
        )),
    };
    let frame = PeerFrame::decode(frame.encode_to_vec().as_slice()).expect("a frame decodes");
    let message = check_frame(NodeId(2), NodeId(1), frame).expect("the transport passes it");
    node.deliver(message).expect("node 1 handles the message");
    for _ in 0..ELECTION_TICKS {
        node.node.tick().expect("node 1 ticks on");
    }
}

/// Node 1 as a follower that knows node 2 leads (a heartbeat of a newer term).
fn follower_of_2() -> TestNode {
    let mut node = start(Start::Follower);
    let mut heartbeat = message_from_2(&node, MessageType::MsgHeartbeat);
    heartbeat.term += 1;
    heartbeat.commit = node.handle.status().commit_index;
    node.deliver(heartbeat).expect("node 1 takes the heartbeat");
    assert_eq!(node.handle.status().leader_id, 2, "node 1 follows node 2");
    node
}

#[test]
fn a_heartbeat_that_commits_past_the_log_is_dropped() {
    // raft-rs: "to_commit 5 is out of range [last_index 4]".
    let mut node = start(Start::Follower);
    let mut heartbeat = message_from_2(&node, MessageType::MsgHeartbeat);
    heartbeat.commit = node.handle.status().last_index + 1;
    survives(&mut node, heartbeat);
}

#[test]
fn a_snapshot_message_of_term_zero_is_dropped() {
    // raft-rs took it for a local message: a pre-candidate stepped it
    // without comparing terms (a debug assertion; in release it would
    // have followed node 2 at term 0).
    let mut node = start(Start::PreCandidate);
    let mut message = message_from_2(&node, MessageType::MsgSnapshot);
    message.term = 0;
    survives(&mut node, message);
    assert!(
        node.handle.status().term > 0,
        "the term never goes back to 0"
    );
}

#[test]
fn an_empty_proposal_from_a_peer_is_dropped() {
    // raft-rs: "stepped empty MsgProp".
    let mut node = start(Start::Leader);
    let message = message_from_2(&node, MessageType::MsgPropose);
    survives(&mut node, message);
    assert_eq!(node.role(), Role::Leader);
}

#[test]
fn a_proposal_from_a_peer_never_reaches_the_log() {
    let mut node = start(Start::Leader);
    let last = node.handle.status().last_index;
    let mut message = message_from_2(&node, MessageType::MsgPropose);
    let entry = Entry {
        data: b"not a command".to_vec().into(),
        ..Entry::default()
    };
    message.set_entries(vec![entry].into());
    survives(&mut node, message);
    assert_eq!(
        node.handle.status().last_index,
        last,
        "nothing was appended"
    );
}

#[test]
fn a_read_request_without_its_context_entry_is_dropped() {
    // raft-rs: "index out of bounds: the len is 0 but the index is 0".
    let mut node = start(Start::Leader);
    let mut message = message_from_2(&node, MessageType::MsgReadIndex);
    message.term = 0;
    survives(&mut node, message);
}

#[test]
fn an_append_after_an_entry_of_term_zero_is_dropped() {
    // raft-rs reads the term of an index past the log as 0, took the
    // append as matching, and appended after a gap: "unstable.slice[5, 6]
    // out of bound[5, 5]".
    let mut node = start(Start::Follower);
    let status = node.handle.status();
    let mut message = message_from_2(&node, MessageType::MsgAppend);
    message.term = 2;
    message.index = status.last_index + 1;
    message.log_term = 0;
    message.commit = status.commit_index;
    let entry = Entry {
        index: message.index + 1,
        term: 2,
        ..Entry::default()
    };
    message.set_entries(vec![entry].into());
    survives(&mut node, message);
    assert_eq!(
        node.handle.status().last_index,
        status.last_index,
        "nothing was appended"
    );
}

#[test]
fn a_transfer_request_from_a_peer_is_dropped() {
    // A follower forwarded it with the term still set; raft-rs: "term
    // should not be set when sending MsgTransferLeader (was 2)".
    let mut node = follower_of_2();
    let message = message_from_2(&node, MessageType::MsgTransferLeader);
    survives(&mut node, message);
}

#[test]
fn a_read_request_with_a_term_is_dropped() {
    // A follower forwarded it with the term still set; raft-rs: "term
    // should not be set when sending MsgReadIndex (was 2)".
    let mut node = follower_of_2();
    let mut message = message_from_2(&node, MessageType::MsgReadIndex);
    message.set_entries(vec![Entry::default()].into());
    survives(&mut node, message);
}

#[test]
fn a_snapshot_file_named_on_the_raft_stream_is_refused_by_the_transport() {
    use latchkey_proto::state::v1::{snapshot_payload, SnapshotDescriptor, SnapshotPayload};
    let payload = SnapshotPayload {
        payload: Some(snapshot_payload::Payload::File(SnapshotDescriptor {
            path: "/etc/passwd".into(),
            bytes: 1,
            checksum: 0,
        })),
    };
    let mut message = Message::default();
    message.set_msg_type(MessageType::MsgSnapshot);
    message.from = 2;
    message.to = 1;
    message.term = 2;
    message
        .mut_snapshot()
        .set_data(payload.encode_to_vec().into());
    let frame = PeerFrame {
        frame: Some(peer_frame::Frame::RaftMessage(
            message.write_to_bytes().expect("encodes"),
        )),
    };
    let refused = check_frame(NodeId(2), NodeId(1), frame).expect_err("a file path from a peer");
    assert!(refused.contains("Snapshot call"), "{refused}");
}
