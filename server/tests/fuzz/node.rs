//! Real nodes on memory disks, for the targets that need one: a node's
//! data to damage (storage) and a node to step peers' messages into
//! (peer). Nodes run the production code through the simulator's seams:
//! `Node::tick` and `Node::handle_inbox`, an outbox for a transport.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use raft::prelude::Message;
use tokio::sync::oneshot;

use latchkey_proto::state::v1::{command, Command, CommandResult};
use latchkey_server::config::{Config, RaftTiming};
use latchkey_server::error::{FatalError, RequestError};
use latchkey_server::node::{Applied, Node, NodeHandle, NodeMsg, NodeOptions, Role, Transport};
use latchkey_server::storage::{Engine, MemoryDisk};
use latchkey_server::types::NodeId;

pub const ELECTION_TICKS: usize = 6;

/// The node's transport: sent messages wait here.
pub struct Outbox(pub Arc<Mutex<Vec<Message>>>);

impl Transport for Outbox {
    fn send(&mut self, messages: Vec<Message>) {
        self.0.lock().extend(messages);
    }
}

pub fn config(id: u64, voters: &[u64]) -> Config {
    let peers: BTreeMap<NodeId, String> = voters
        .iter()
        .map(|v| (NodeId(*v), format!("fuzz-{v}:1")))
        .collect();
    Config {
        advertise_client: format!("fuzz-{id}"),
        timing: RaftTiming {
            tick_interval_ms: 50,
            election_ticks: ELECTION_TICKS,
            heartbeat_ticks: 2,
        },
        ..Config::with_defaults(
            NodeId(id),
            // Unused: the node's storage is a `MemoryDisk`.
            format!("/nonexistent/latchkey-fuzz-{id}").into(),
            "127.0.0.1:0".parse().expect("literal address"),
            "127.0.0.1:0".parse().expect("literal address"),
            peers,
        )
    }
}

/// A running node and what it sent.
pub struct TestNode {
    pub node: Node,
    pub handle: NodeHandle,
    pub outbox: Arc<Mutex<Vec<Message>>>,
}

impl TestNode {
    /// Opens `disk` (the whole open path: engine, log, state machine,
    /// raft-rs) as node `id` of `voters`; its election timeout is
    /// `election_ticks` exactly.
    pub fn start(
        disk: &MemoryDisk,
        id: u64,
        voters: &[u64],
        election_ticks: usize,
    ) -> Result<TestNode, FatalError> {
        TestNode::start_with(disk, &config(id, voters), election_ticks)
    }

    /// [`TestNode::start`] with a config of the caller's.
    pub fn start_with(
        disk: &MemoryDisk,
        config: &Config,
        election_ticks: usize,
    ) -> Result<TestNode, FatalError> {
        let id = config.id.0;
        let engine = Engine::open_memory(disk)?;
        let outbox = Arc::new(Mutex::new(Vec::new()));
        let options = NodeOptions {
            boot_id: id,
            election_tick_range: Some((election_ticks, election_ticks + 1)),
            raft_logger: Some(slog::Logger::root(slog::Discard, slog::o!())),
            ..NodeOptions::default()
        };
        let (node, handle) =
            Node::with_options(config, engine, Box::new(Outbox(outbox.clone())), options)?;
        Ok(TestNode {
            node,
            handle,
            outbox,
        })
    }

    /// Has the node write a checkpoint of everything it applied, so that
    /// its disk holds the whole state (a node dropped without a clean stop
    /// leaves the entries after its last one to be applied again).
    pub fn checkpoint(&mut self) {
        let (reply, mut answer) = oneshot::channel();
        self.handle.report(NodeMsg::Checkpoint { reply });
        self.node.handle_inbox().expect("the node runs");
        let applied = self.handle.status().applied_index;
        match answer.try_recv() {
            Ok(Ok(position)) => assert_eq!(position.index, applied),
            other => panic!("no checkpoint: {other:?}"),
        }
    }

    pub fn take_sent(&self) -> Vec<Message> {
        std::mem::take(&mut *self.outbox.lock())
    }

    pub fn role(&self) -> Role {
        self.handle.status().role
    }

    /// Delivers a message and handles it, as the inbox branch of the loop.
    pub fn deliver(&mut self, message: Message) -> Result<(), FatalError> {
        self.handle.report(NodeMsg::Raft(Box::new(message)));
        self.node.handle_inbox()
    }

    /// Proposes `body`; the answer arrives once it applied.
    pub fn propose(
        &mut self,
        body: command::Command,
    ) -> oneshot::Receiver<Result<Applied, RequestError>> {
        let (reply, answer) = oneshot::channel();
        let command = Command {
            command: Some(body),
            request: None,
        };
        self.handle.report(NodeMsg::Propose { command, reply });
        // Fatal errors surface on the next tick. The second step syncs the
        // leader's write (deferred to its next step under a synchronous
        // driver), and a single voter commits and applies it then.
        let _ = self.node.handle_inbox();
        let _ = self.node.handle_inbox();
        answer
    }
}

/// Ticks a single-voter node until it leads.
pub fn lead_alone(node: &mut TestNode) -> Result<(), FatalError> {
    for _ in 0..4 * ELECTION_TICKS {
        node.node.tick()?;
        if node.role() == Role::Leader {
            return Ok(());
        }
    }
    panic!("a single-voter node did not become leader");
}

/// The result of an answered proposal of a single-voter node.
pub fn result_of(mut answer: oneshot::Receiver<Result<Applied, RequestError>>) -> CommandResult {
    match answer.try_recv() {
        Ok(Ok(applied)) => applied.result,
        other => panic!("proposal not applied at once: {other:?}"),
    }
}
