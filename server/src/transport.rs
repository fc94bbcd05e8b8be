//! The peer transport: raft-rs messages between nodes, on the peer port.
//!
//! Each node keeps one long-lived connection to every other node and
//! serves the same for the connections of the others, on the peer address
//! only. The Raft stream is the framed protocol of [`framed`]; a link that
//! finds a node of an earlier version uses that node's gRPC stream
//! (`Peer.Raft`, still served here) instead. The first frame of a stream is
//! a `Hello` that names the sender and its client address; that is how
//! every node learns where the others serve clients, so that a follower
//! can point a client at the leader.
//!
//! Outbound messages go into a bounded queue per peer
//! ([`PEER_QUEUE_CAPACITY`]). When the queue is full the message is dropped
//! and Raft's retransmission recovers it; the node never blocks on a slow
//! peer. A broken stream is reopened with exponential backoff between
//! [`RECONNECT_BACKOFF_MIN`] and [`RECONNECT_BACKOFF_MAX`], and the node is
//! told the peer was unreachable so raft-rs falls back to probing. A
//! snapshot file is streamed in chunks on a call of its own (`snapshots.rs`)
//! while the main stream goes on; an inline snapshot (the simulator's)
//! travels inside its Raft message (up to [`MAX_PEER_FRAME_BYTES`]). The
//! node is told whether each snapshot got through.
//!
//! A frame the service cannot use (not a raft message, undecodable, naming
//! another sender or recipient, a snapshot that names a file) is dropped
//! with a warning naming the peer, and the stream goes on
//! ([`check_frame`]); the node checks what it steps further
//! (`crate::node::peer_messages`).
//!
//! The set of peers follows the membership: the node calls
//! [`Transport::set_peers`] at start and after every applied conf change,
//! and the transport opens links to new members and closes those to
//! departed ones (dropping a link's queue ends its task). The
//! [`PeerDirectory`] follows too, so only members may open a stream here.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::RwLock;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

use latchkey_proto::peer::v1::peer_client::PeerClient;
use latchkey_proto::peer::v1::peer_server::{Peer, PeerServer};
use latchkey_proto::peer::v1::{peer_frame, Hello, PeerAck, PeerFrame, SnapshotChunk};

pub mod framed;
mod snapshots;

use std::path::PathBuf;

use crate::config::Config;
use crate::membership::MemberTable;
use crate::node::{NodeHandle, NodeMsg, Transport};
use crate::types::NodeId;

/// Raft messages queued for one peer before new ones are dropped.
pub const PEER_QUEUE_CAPACITY: usize = 1024;
/// Frames buffered between the queue and one gRPC stream.
const STREAM_BUFFER: usize = 64;
/// Largest frame on the peer transport (bounds snapshot size).
pub const MAX_PEER_FRAME_BYTES: usize = 256 * 1024 * 1024;
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A connection that has sent nothing for this long sends a keepalive (an
/// HTTP/2 ping on gRPC, an empty frame on the framed protocol).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// A connection silent for this long, or whose framed write has not
/// finished in this long, is dropped and dialed again.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Addresses of the members, as learnt from configuration and `Hello`s.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    pub peer_addr: String,
    /// Empty until the member has said hello.
    pub client_addr: String,
}

/// Shared, read-mostly map of member addresses. Written only by the
/// transport.
#[derive(Clone, Default)]
pub struct PeerDirectory {
    members: Arc<RwLock<BTreeMap<NodeId, PeerInfo>>>,
}

impl PeerDirectory {
    pub fn new(config: &Config) -> PeerDirectory {
        let members = config
            .peers
            .iter()
            .map(|(id, peer_addr)| {
                let client_addr = if *id == config.id {
                    config.advertise_client.clone()
                } else {
                    String::new()
                };
                let info = PeerInfo {
                    peer_addr: peer_addr.clone(),
                    client_addr,
                };
                (*id, info)
            })
            .collect();
        PeerDirectory {
            members: Arc::new(RwLock::new(members)),
        }
    }

    pub fn get(&self, id: NodeId) -> Option<PeerInfo> {
        self.members.read().get(&id).cloned()
    }

    pub fn all(&self) -> BTreeMap<NodeId, PeerInfo> {
        self.members.read().clone()
    }

    /// Follows the membership: members that left are forgotten, new ones
    /// added; a client address the record lacks keeps the one learnt.
    fn follow(&self, members: &MemberTable) {
        let mut directory = self.members.write();
        directory.retain(|id, _| members.contains_key(id));
        for (id, member) in members {
            let info = directory.entry(*id).or_default();
            info.peer_addr = member.peer_addr.clone();
            if !member.client_addr.is_empty() {
                info.client_addr = member.client_addr.clone();
            }
        }
    }

    fn learn_client_addr(&self, id: NodeId, client_addr: &str) {
        if let Some(info) = self.members.write().get_mut(&id) {
            if info.client_addr != client_addr {
                info.client_addr = client_addr.to_string();
            }
        }
    }
}

/// The node's side of the transport: one bounded queue per peer.
pub struct GrpcTransport {
    me: NodeId,
    /// Mutual TLS for the links, when the peer port has it.
    tls: Option<crate::tls::PeerClientTls>,
    queues: HashMap<NodeId, PeerQueue>,
    node: Arc<OnceLock<NodeHandle>>,
    hello: Hello,
    directory: PeerDirectory,
    /// Links made before the node's handle existed; started by
    /// [`spawn_outbound`].
    unstarted: Arc<parking_lot::Mutex<Vec<PeerLink>>>,
}

/// The sending end of one peer's queue, and the address its link dials.
struct PeerQueue {
    addr: String,
    sender: mpsc::Sender<Message>,
}

/// What [`spawn_outbound`] starts: the links made so far.
pub struct Outbound {
    node: Arc<OnceLock<NodeHandle>>,
    unstarted: Arc<parking_lot::Mutex<Vec<PeerLink>>>,
}

impl GrpcTransport {
    pub fn new(
        config: &Config,
        directory: PeerDirectory,
        tls: Option<crate::tls::PeerClientTls>,
    ) -> (GrpcTransport, Outbound) {
        let node = Arc::new(OnceLock::new());
        let unstarted = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let hello = Hello {
            from: config.id.0,
            to: 0,
            client_addr: config.advertise_client.clone(),
            peer_addr: config.peers[&config.id].clone(),
        };
        let mut transport = GrpcTransport {
            me: config.id,
            tls,
            queues: HashMap::new(),
            node: node.clone(),
            hello,
            directory,
            unstarted: unstarted.clone(),
        };
        for (id, addr) in config.peers.iter().filter(|(id, _)| **id != config.id) {
            transport.open(*id, addr);
        }
        (transport, Outbound { node, unstarted })
    }

    /// Makes the queue and link to `peer`; the link starts now if the node
    /// runs, else in [`spawn_outbound`].
    fn open(&mut self, peer: NodeId, addr: &str) {
        let (sender, queue) = mpsc::channel(PEER_QUEUE_CAPACITY);
        let mut hello = self.hello.clone();
        hello.to = peer.0;
        let link = PeerLink {
            peer,
            dialer: Dialer {
                tls: self.tls.clone(),
                addr: addr.to_string(),
            },
            hello,
            queue,
            node: self.node.clone(),
        };
        if self.node.get().is_some() {
            tokio::spawn(link.run());
        } else {
            self.unstarted.lock().push(link);
        }
        let queue = PeerQueue {
            addr: addr.to_string(),
            sender,
        };
        self.queues.insert(peer, queue);
    }
}

impl Transport for GrpcTransport {
    fn send(&mut self, messages: Vec<Message>) {
        for message in messages {
            let to = NodeId(message.to);
            let is_snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            let Some(queue) = self.queues.get(&to) else {
                tracing::debug!(to = %to, "message for a peer that is not a member dropped");
                continue;
            };
            if queue.sender.try_send(message).is_err() && is_snapshot {
                if let Some(node) = self.node.get() {
                    node.report(NodeMsg::SnapshotSent { to, ok: false });
                }
            }
        }
    }

    fn set_peers(&mut self, members: &MemberTable) {
        self.directory.follow(members);
        self.queues
            .retain(|id, _| members.contains_key(id) && *id != self.me);
        let me = self.me;
        for (id, member) in members.iter().filter(|(id, _)| **id != me) {
            let current = self.queues.get(id).map(|queue| queue.addr.as_str());
            if current != Some(member.peer_addr.as_str()) {
                self.open(*id, &member.peer_addr);
            }
        }
    }
}

/// Starts the links made before the node ran. Later ones start as they are
/// made; each stops when its queue is dropped (the peer left, or the node
/// stopped).
pub fn spawn_outbound(outbound: Outbound, node: NodeHandle) {
    // Set once here; `spawn_outbound` is called once per transport.
    let _ = outbound.node.set(node);
    for link in outbound.unstarted.lock().drain(..) {
        tokio::spawn(link.run());
    }
}

/// One outbound stream to one peer, reopened whenever it breaks.
struct PeerLink {
    peer: NodeId,
    dialer: Dialer,
    hello: Hello,
    queue: mpsc::Receiver<Message>,
    node: Arc<OnceLock<NodeHandle>>,
}

/// How a link reaches its peer.
#[derive(Clone)]
struct Dialer {
    tls: Option<crate::tls::PeerClientTls>,
    addr: String,
}

impl Dialer {
    /// A gRPC channel to the peer: for snapshot files, and for the Raft
    /// stream of a peer without the framed protocol.
    async fn grpc(&self) -> Result<PeerClient<Channel>, String> {
        let endpoint = match &self.tls {
            // The settings of the moment: a reload applies to the next connection.
            Some(tls) => tls
                .current()
                .apply(
                    Endpoint::from_shared(format!("https://{}", self.addr))
                        .map_err(|e| e.to_string())?,
                )
                .map_err(|e| e.to_string())?,
            None => {
                Endpoint::from_shared(format!("http://{}", self.addr)).map_err(|e| e.to_string())?
            }
        };
        let channel = endpoint
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect()
            .await
            .map_err(|e| crate::cli::connect::describe(&e))?;
        Ok(PeerClient::new(channel)
            .max_encoding_message_size(MAX_PEER_FRAME_BYTES)
            .max_decoding_message_size(MAX_PEER_FRAME_BYTES))
    }
}

impl PeerLink {
    async fn run(mut self) {
        let mut backoff = RECONNECT_BACKOFF_MIN;
        loop {
            let dialed = framed::dial(&self.dialer.addr, self.dialer.tls.as_ref(), &self.hello);
            let streamed = match dialed.await {
                Ok(connection) => {
                    backoff = RECONNECT_BACKOFF_MIN;
                    Ok(self.stream_framed(connection).await)
                }
                // A node of an earlier version: the gRPC stream.
                Err(framed::DialError::NotSpoken) => match self.dialer.grpc().await {
                    Ok(client) => {
                        tracing::info!(peer = %self.peer, "the peer has no framed protocol (an earlier version); using its gRPC stream");
                        backoff = RECONNECT_BACKOFF_MIN;
                        Ok(self.stream(client).await)
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(e.to_string()),
            };
            let flow = streamed.unwrap_or_else(|e| {
                tracing::debug!(peer = %self.peer, addr = %self.dialer.addr, "connect failed: {e}");
                std::ops::ControlFlow::Continue(())
            });
            if flow.is_break() {
                return;
            }
            self.report(NodeMsg::Unreachable(self.peer));
            // Messages queued while the link was down are stale; Raft resends.
            if self.drain_stale().is_break() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
        }
    }

    fn report(&self, message: NodeMsg) {
        if let Some(node) = self.node.get() {
            node.report(message);
        }
    }

    fn drain_stale(&mut self) -> std::ops::ControlFlow<()> {
        loop {
            match self.queue.try_recv() {
                Ok(message) if message.get_msg_type() == MessageType::MsgSnapshot => {
                    self.report(NodeMsg::SnapshotSent {
                        to: self.peer,
                        ok: false,
                    });
                }
                Ok(_) => {}
                Err(mpsc::error::TryRecvError::Empty) => return std::ops::ControlFlow::Continue(()),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return std::ops::ControlFlow::Break(())
                }
            }
        }
    }

    /// Writes queued messages to a framed connection, as many per write as
    /// have queued up, until it breaks (`Continue`) or the node is gone
    /// (`Break`).
    async fn stream_framed(
        &mut self,
        mut connection: framed::Connection,
    ) -> std::ops::ControlFlow<()> {
        loop {
            tokio::select! {
                message = self.queue.recv() => {
                    let Some(message) = message else { return std::ops::ControlFlow::Break(()) };
                    let mut inline_snapshots = self.push(&mut connection, message);
                    while !connection.is_full() {
                        let Ok(message) = self.queue.try_recv() else { break };
                        inline_snapshots += self.push(&mut connection, message);
                    }
                    let written = connection.write().await;
                    for _ in 0..inline_snapshots {
                        self.report(NodeMsg::SnapshotSent { to: self.peer, ok: written.is_ok() });
                    }
                    if let Err(e) = written {
                        tracing::debug!(peer = %self.peer, "link closed: {e}");
                        return std::ops::ControlFlow::Continue(());
                    }
                }
                event = connection.next_event() => {
                    let alive = match event {
                        framed::Event::Tick => connection.keep_alive().await,
                        framed::Event::Broken(e) => Err(e),
                    };
                    if let Err(e) = alive {
                        tracing::debug!(peer = %self.peer, "link closed: {e}");
                        return std::ops::ControlFlow::Continue(());
                    }
                }
            }
        }
    }

    /// Adds `message` to the connection's next write, or starts the
    /// transfer of its snapshot file. Returns 1 for an inline snapshot
    /// (whose delivery the node is told of), else 0.
    fn push(&self, connection: &mut framed::Connection, message: Message) -> usize {
        if snapshots::is_file_snapshot(&message) {
            self.spawn_snapshot(message);
            return 0;
        }
        let inline_snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
        connection.push(encode(&message));
        usize::from(inline_snapshot)
    }

    /// Forwards queued messages on a gRPC stream until it breaks
    /// (`Continue`) or the node is gone (`Break`).
    async fn stream(&mut self, mut client: PeerClient<Channel>) -> std::ops::ControlFlow<()> {
        let (frames, rx) = mpsc::channel(STREAM_BUFFER);
        let hello = PeerFrame {
            frame: Some(peer_frame::Frame::Hello(self.hello.clone())),
        };
        if frames.send(hello).await.is_err() {
            return std::ops::ControlFlow::Continue(());
        }
        let call = client.raft(Request::new(ReceiverStream::new(rx)));
        tokio::pin!(call);
        loop {
            tokio::select! {
                result = &mut call => {
                    if let Err(status) = result {
                        tracing::debug!(peer = %self.peer, "stream closed: {status}");
                    }
                    return std::ops::ControlFlow::Continue(());
                }
                message = self.queue.recv() => {
                    let Some(message) = message else { return std::ops::ControlFlow::Break(()) };
                    if snapshots::is_file_snapshot(&message) {
                        self.spawn_snapshot(message);
                        continue;
                    }
                    let is_snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
                    let frame = PeerFrame { frame: Some(peer_frame::Frame::RaftMessage(encode(&message))) };
                    let sent = frames.send(frame).await.is_ok();
                    if is_snapshot {
                        self.report(NodeMsg::SnapshotSent { to: self.peer, ok: sent });
                    }
                    if !sent {
                        return std::ops::ControlFlow::Continue(());
                    }
                }
            }
        }
    }

    /// Streams a snapshot file on a gRPC call of its own and tells the node
    /// how it went; raft-rs sends no other snapshot to this peer meanwhile.
    fn spawn_snapshot(&self, message: Message) {
        let peer = self.peer;
        let hello = self.hello.clone();
        let node = self.node.clone();
        let dialer = self.dialer.clone();
        tokio::spawn(async move {
            let sent = match dialer.grpc().await {
                Ok(client) => snapshots::send(client, hello, message).await,
                Err(e) => Err(e),
            };
            if let Err(e) = &sent {
                tracing::warn!(%peer, "snapshot transfer failed: {e}");
            }
            if let Some(node) = node.get() {
                node.report(NodeMsg::SnapshotSent {
                    to: peer,
                    ok: sent.is_ok(),
                });
            }
        });
    }
}

fn encode(message: &Message) -> Vec<u8> {
    // raft-rs messages have no required fields, so encoding cannot fail.
    message.write_to_bytes().expect("raft message encodes")
}

/// The receiving side of the peer port, shared by the gRPC service and the
/// framed protocol: who may open a stream, and where its messages go.
#[derive(Clone)]
pub struct Inbound {
    id: NodeId,
    node: NodeHandle,
    directory: PeerDirectory,
}

impl Inbound {
    pub fn new(id: NodeId, node: NodeHandle, directory: PeerDirectory) -> Inbound {
        Inbound {
            id,
            node,
            directory,
        }
    }

    fn accept_hello(&self, hello: Hello) -> Result<NodeId, Status> {
        let from = NodeId(hello.from);
        if hello.to != self.id.0 {
            return Err(Status::failed_precondition(format!(
                "this is node {}, not node {}; check --initial-cluster",
                self.id, hello.to
            )));
        }
        if self.directory.get(from).is_none() || from == self.id {
            return Err(Status::permission_denied(format!(
                "node {from} is not a member of this cluster"
            )));
        }
        self.directory.learn_client_addr(from, &hello.client_addr);
        Ok(from)
    }

    /// Steps the message a frame of `from`'s stream carries, or drops the
    /// frame with a warning ([`check_frame`]). Fails once the node is gone.
    async fn deliver(&self, from: NodeId, frame: Result<PeerFrame, String>) -> Result<(), ()> {
        match frame.and_then(|frame| check_frame(from, self.id, frame)) {
            Ok(message) => self.node.step(message).await.map_err(|_| ()),
            Err(reason) => {
                tracing::warn!(peer = %from, "dropped a frame from a peer: {reason}");
                Ok(())
            }
        }
    }
}

/// The peer gRPC service: snapshot files, and the Raft streams of nodes
/// without the framed protocol.
pub struct PeerService {
    inbound: Inbound,
    /// Where received snapshot files are written.
    snapshot_dir: PathBuf,
}

impl PeerService {
    pub fn new(inbound: Inbound, snapshot_dir: PathBuf) -> PeerServer<PeerService> {
        PeerServer::new(PeerService {
            inbound,
            snapshot_dir,
        })
        .max_decoding_message_size(MAX_PEER_FRAME_BYTES)
        .max_encoding_message_size(MAX_PEER_FRAME_BYTES)
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<PeerAck>, Status> {
        let stream = request.into_inner();
        let inbound = &self.inbound;
        snapshots::receive(
            stream,
            &self.snapshot_dir,
            inbound.id,
            &inbound.node,
            |hello| inbound.accept_hello(hello),
        )
        .await?;
        Ok(Response::new(PeerAck {}))
    }

    async fn raft(
        &self,
        request: Request<Streaming<PeerFrame>>,
    ) -> Result<Response<PeerAck>, Status> {
        let mut stream = request.into_inner();
        let from = match stream.message().await?.and_then(|f| f.frame) {
            Some(peer_frame::Frame::Hello(hello)) => self.inbound.accept_hello(hello)?,
            _ => {
                return Err(Status::invalid_argument(
                    "a peer stream must open with a Hello",
                ))
            }
        };
        while let Some(frame) = stream.message().await? {
            if self.inbound.deliver(from, Ok(frame)).await.is_err() {
                return Err(Status::unavailable("node is shutting down"));
            }
        }
        Ok(Response::new(PeerAck {}))
    }
}

/// The raft-rs message a frame that follows the `Hello` of `from`'s stream
/// to node `me` carries, or why it is refused: it is not a raft message, it
/// does not decode, it names another sender or recipient, or it is a
/// snapshot that names a file (files come on the `Snapshot` call, which
/// checks them and names the local copy; a path from the peer must never be
/// read). The caller drops a refused frame and keeps the stream.
pub fn check_frame(from: NodeId, me: NodeId, frame: PeerFrame) -> Result<Message, String> {
    let Some(peer_frame::Frame::RaftMessage(bytes)) = frame.frame else {
        return Err("only raft messages may follow the Hello".into());
    };
    let message = Message::parse_from_bytes(&bytes)
        .map_err(|e| format!("raft message does not decode: {e}"))?;
    if message.from != from.0 || message.to != me.0 {
        return Err(format!(
            "message from {} to {} on the stream of {from}",
            message.from, message.to
        ));
    }
    if snapshots::is_file_snapshot(&message) {
        return Err("a snapshot file must come on the Snapshot call".into());
    }
    Ok(message)
}
