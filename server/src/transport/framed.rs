//! The framed peer protocol: the Raft stream between two nodes without
//! HTTP/2 in the way.
//!
//! On the gRPC stream a message crossed three tasks on each side (the
//! link, hyper's body pipe and the HTTP/2 connection; then the connection,
//! the handler and the node). Here the link writes its frames to the socket
//! itself, many per write when they queue up, and the task that reads a
//! connection hands each message to the node. The frames and their checks
//! are the gRPC stream's: a `PeerFrame` `Hello`, then `PeerFrame` raft
//! messages, each passed through [`super::check_frame`].
//!
//! It shares the peer port with the gRPC service (snapshot files, and the
//! Raft stream of nodes of earlier versions). A connection is framed when
//! its TLS handshake agreed on [`ALPN`], or, without TLS, when it opens with
//! [`MAGIC`]; every other connection goes to gRPC.
//!
//! On the wire (after TLS, if any):
//!
//! - the dialing node writes [`MAGIC`], then frames: a 4-byte big-endian
//!   length and a protobuf `PeerFrame`. The first is its `Hello`.
//! - the accepting node answers [`MAGIC`] and one frame: empty when the
//!   `Hello` is accepted, else why not (UTF-8), and then it closes.
//! - afterwards an empty frame is a keepalive. Each side sends one when it
//!   has sent nothing for [`KEEPALIVE_INTERVAL`], and drops the connection
//!   when it has heard nothing for [`KEEPALIVE_TIMEOUT`]; a write that does
//!   not finish within that time drops it too. That is how a link notices a
//!   peer cut off by a partition and dials again.
//!
//! A dialing node that finds no framed protocol on the other side (an older
//! node: plaintext that answers without [`MAGIC`], or TLS that refuses the
//! ALPN) is told [`DialError::NotSpoken`] and uses the gRPC stream.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use latchkey_proto::peer::v1::{peer_frame, Hello, PeerFrame};

use super::{
    Inbound, CONNECT_TIMEOUT, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_PEER_FRAME_BYTES,
};
use crate::tls::PeerClientTls;

/// First bytes of a framed connection, both ways.
pub const MAGIC: &[u8; 8] = b"LKRAFT/1";
/// The TLS application protocol of a framed connection.
pub const ALPN: &[u8] = b"latchkey-raft/1";
/// Longest the opening (TLS, magic, `Hello` and answer) may take.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest frame a dialing node reads: the answer to its `Hello`.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// The link stops gathering queued messages into one write at this size.
const WRITE_BATCH_BYTES: usize = 256 * 1024;
const KEEPALIVE_FRAME: [u8; 4] = [0; 4];

/// A peer-port connection the framed protocol or gRPC can take.
pub trait PeerConn: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Whether the connection speaks the framed protocol. Leaves the bytes
    /// unread.
    fn speaks_framed(&self) -> impl Future<Output = io::Result<bool>> + Send;
}

impl PeerConn for TcpStream {
    async fn speaks_framed(&self) -> io::Result<bool> {
        let deadline = Instant::now() + OPEN_TIMEOUT;
        let mut opening = [0u8; MAGIC.len()];
        loop {
            let read = tokio::time::timeout_at(deadline, self.peek(&mut opening))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "nothing sent"))??;
            if read == 0 || opening[..read] != MAGIC[..read] {
                return Ok(false);
            }
            if read == MAGIC.len() {
                return Ok(true);
            }
            // Part of the magic so far: wait for the rest.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

impl PeerConn for tokio_rustls::server::TlsStream<TcpStream> {
    fn speaks_framed(&self) -> impl Future<Output = io::Result<bool>> + Send {
        let framed = self.get_ref().1.alpn_protocol() == Some(ALPN);
        async move { Ok(framed) }
    }
}

/// Serves the framed connections among `incoming` and passes the others
/// on, for gRPC. Ends when the returned stream is dropped.
pub fn route<C, I>(incoming: I, inbound: Inbound) -> ReceiverStream<io::Result<C>>
where
    C: PeerConn,
    I: futures::Stream<Item = io::Result<C>> + Send + 'static,
{
    let (sender, receiver) = mpsc::channel(64);
    tokio::spawn(async move {
        tokio::pin!(incoming);
        loop {
            let accepted = tokio::select! {
                accepted = incoming.next() => match accepted {
                    Some(accepted) => accepted,
                    None => return,
                },
                () = sender.closed() => return,
            };
            let conn = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    let _ = sender.send(Err(e)).await;
                    continue;
                }
            };
            let sender = sender.clone();
            let inbound = inbound.clone();
            tokio::spawn(async move {
                match conn.speaks_framed().await {
                    Ok(true) => serve(inbound, conn).await,
                    Ok(false) => {
                        let _ = sender.send(Ok(conn)).await;
                    }
                    Err(e) => tracing::debug!("peer connection dropped before it spoke: {e}"),
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}

/// Reads one framed connection: checks its `Hello`, answers, then steps
/// every message that passes [`super::check_frame`] until the connection
/// ends.
async fn serve<C: PeerConn>(inbound: Inbound, conn: C) {
    let (mut read, mut write) = tokio::io::split(conn);
    let opened = timeout(OPEN_TIMEOUT, async {
        let mut magic = [0u8; MAGIC.len()];
        read.read_exact(&mut magic).await?;
        // Without TLS the router has seen it already; with TLS only the ALPN.
        if &magic != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the connection does not open with the framed protocol's magic",
            ));
        }
        let mut frames = FramedRead::new(read, codec(MAX_PEER_FRAME_BYTES));
        let first = frames.next().await.transpose()?;
        let hello = match first.map(PeerFrame::decode) {
            Some(Ok(PeerFrame {
                frame: Some(peer_frame::Frame::Hello(hello)),
            })) => Ok(hello),
            _ => Err("a peer stream must open with a Hello".to_string()),
        };
        let from = hello.and_then(|hello| {
            inbound
                .accept_hello(hello)
                .map_err(|status| status.message().to_string())
        });
        let refusal = from.as_ref().err().map(String::as_str).unwrap_or("");
        let mut answer = BytesMut::with_capacity(MAGIC.len() + 4 + refusal.len());
        answer.put_slice(MAGIC);
        answer.put_u32(refusal.len() as u32);
        answer.put_slice(refusal.as_bytes());
        write.write_all(&answer).await?;
        write.flush().await?;
        Ok::<_, io::Error>((from, frames))
    })
    .await;
    let (from, mut frames) = match opened {
        Ok(Ok((Ok(from), frames))) => (from, frames),
        Ok(Ok((Err(refusal), _))) => {
            tracing::debug!("refused a peer connection: {refusal}");
            let _ = write.shutdown().await;
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!("peer connection failed while opening: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!("peer connection did not open in time");
            return;
        }
    };
    let mut keepalive = tokio::time::interval(KEEPALIVE_INTERVAL);
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            frame = frames.next() => {
                let bytes = match frame {
                    Some(Ok(bytes)) => bytes,
                    Some(Err(e)) => {
                        tracing::debug!(peer = %from, "peer connection failed: {e}");
                        return;
                    }
                    None => return,
                };
                heard = Instant::now();
                if bytes.is_empty() {
                    continue;
                }
                let frame = PeerFrame::decode(bytes).map_err(|e| format!("frame does not decode: {e}"));
                if inbound.deliver(from, frame).await.is_err() {
                    return;
                }
            }
            _ = keepalive.tick() => {
                if heard.elapsed() > KEEPALIVE_TIMEOUT {
                    tracing::debug!(peer = %from, "peer connection silent; dropped");
                    return;
                }
                let sent = timeout(KEEPALIVE_TIMEOUT, write.write_all(&KEEPALIVE_FRAME)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    return;
                }
            }
        }
    }
}

fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(max_frame)
        .new_codec()
}

/// Why a framed connection could not be opened.
#[derive(Debug)]
pub enum DialError {
    /// The peer answered, but not in the framed protocol: use gRPC.
    NotSpoken,
    /// The peer refused our `Hello`, and said why.
    Refused(String),
    /// Anything else: unreachable, TLS failed, timed out.
    Failed(String),
}

impl std::fmt::Display for DialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DialError::NotSpoken => f.write_str("the peer does not speak the framed protocol"),
            DialError::Refused(why) => write!(f, "the peer refused this node: {why}"),
            DialError::Failed(why) => f.write_str(why),
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type BoxedIo = Box<dyn Io>;

/// An open framed connection to a peer, as the link uses it.
pub struct Connection {
    answers: FramedRead<ReadHalf<BoxedIo>, LengthDelimitedCodec>,
    write: WriteHalf<BoxedIo>,
    /// Frames gathered for the next write.
    pending: BytesMut,
    sent: Instant,
    heard: Instant,
    /// When [`Connection::next_event`] next returns [`Event::Tick`].
    tick: Instant,
}

/// Dials `addr`, says `hello` and waits for the answer.
pub async fn dial(
    addr: &str,
    tls: Option<&PeerClientTls>,
    hello: &Hello,
) -> Result<Connection, DialError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| DialError::Failed(format!("{what}: {e}"));
    timeout(OPEN_TIMEOUT, async {
        let tcp = timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| DialError::Failed("connect: timed out".into()))?
            .map_err(|e| failed("connect", &e))?;
        tcp.set_nodelay(true)
            .map_err(|e| failed("TCP_NODELAY", &e))?;
        let io: BoxedIo = match tls {
            Some(tls) => {
                let host = host_of(addr);
                let (config, name) = tls
                    .current()
                    .rustls_config(host, &[ALPN])
                    .map_err(|e| failed("TLS settings", &e))?;
                let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
                match connector.connect(name, tcp).await {
                    Ok(stream) => Box::new(stream),
                    Err(e) if refuses_alpn(&e) => return Err(DialError::NotSpoken),
                    Err(e) => return Err(failed("TLS", &e)),
                }
            }
            None => Box::new(tcp),
        };
        let (mut read, mut write) = tokio::io::split(io);
        let opening = opening(
            MAGIC,
            &PeerFrame {
                frame: Some(peer_frame::Frame::Hello(hello.clone())),
            },
        );
        write
            .write_all(&opening)
            .await
            .map_err(|e| failed("write", &e))?;
        write.flush().await.map_err(|e| failed("write", &e))?;
        let mut magic = [0u8; MAGIC.len()];
        match read.read_exact(&mut magic).await {
            Ok(_) if &magic == MAGIC => {}
            // An older node's HTTP/2 answers something else, or hangs up.
            Ok(_) => return Err(DialError::NotSpoken),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(DialError::NotSpoken),
            Err(e) => return Err(failed("read", &e)),
        }
        let mut answers = FramedRead::new(read, codec(MAX_ANSWER_BYTES));
        match answers.next().await {
            Some(Ok(answer)) if answer.is_empty() => {}
            Some(Ok(answer)) => {
                return Err(DialError::Refused(
                    String::from_utf8_lossy(&answer).into_owned(),
                ))
            }
            Some(Err(e)) => return Err(failed("read", &e)),
            None => return Err(DialError::Failed("the peer hung up".into())),
        }
        let now = Instant::now();
        Ok(Connection {
            answers,
            write,
            pending: BytesMut::with_capacity(64 * 1024),
            sent: now,
            heard: now,
            tick: now + KEEPALIVE_INTERVAL,
        })
    })
    .await
    .unwrap_or_else(|_| Err(DialError::Failed("timed out".into())))
}

/// Whether a TLS handshake failed because the server offers no protocol
/// we asked for (a node that predates the framed protocol).
fn refuses_alpn(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)
            )
        })
}

/// The host of `host:port` (`[v6]:port` too), as the certificate names it.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// What a dialing node sends first: `magic` (the framed protocol's
/// [`MAGIC`]), then `frame`.
fn opening(magic: &[u8], frame: &PeerFrame) -> BytesMut {
    let mut opening = BytesMut::new();
    opening.put_slice(magic);
    put_frame(&mut opening, frame);
    opening
}

fn put_frame(buf: &mut BytesMut, frame: &PeerFrame) {
    buf.put_u32(frame.encoded_len() as u32);
    // Into a `BytesMut`, which grows: encoding cannot fail.
    frame.encode(buf).expect("a BytesMut grows");
}

/// What [`Connection::next_event`] saw.
pub enum Event {
    /// A keepalive interval ended.
    Tick,
    /// The connection broke or went silent.
    Broken(String),
}

impl Connection {
    /// Adds a raft message, encoded, to the next write.
    pub fn push(&mut self, raft_message: Vec<u8>) {
        put_frame(
            &mut self.pending,
            &PeerFrame {
                frame: Some(peer_frame::Frame::RaftMessage(raft_message)),
            },
        );
    }

    /// Whether the next write is big enough to go now.
    pub fn is_full(&self) -> bool {
        self.pending.len() >= WRITE_BATCH_BYTES
    }

    /// Writes what [`Connection::push`] gathered.
    pub async fn write(&mut self) -> Result<(), String> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = self.pending.split().freeze();
        self.write_bytes(pending).await
    }

    async fn write_bytes(&mut self, bytes: Bytes) -> Result<(), String> {
        let written = timeout(KEEPALIVE_TIMEOUT, async {
            self.write.write_all(&bytes).await?;
            self.write.flush().await
        })
        .await;
        match written {
            Ok(Ok(())) => {
                self.sent = Instant::now();
                Ok(())
            }
            Ok(Err(e)) => Err(format!("write: {e}")),
            Err(_) => Err("write timed out".into()),
        }
    }

    /// Reads the peer's keepalives until the next keepalive interval ends
    /// (`Tick`: call [`Connection::keep_alive`]) or the connection breaks.
    /// Cancel-safe; the interval does not restart when cancelled.
    pub async fn next_event(&mut self) -> Event {
        loop {
            tokio::select! {
                answer = self.answers.next() => match answer {
                    Some(Ok(_)) => self.heard = Instant::now(),
                    Some(Err(e)) => return Event::Broken(format!("read: {e}")),
                    None => return Event::Broken("the peer hung up".into()),
                },
                () = tokio::time::sleep_until(self.tick) => {
                    self.tick = Instant::now() + KEEPALIVE_INTERVAL;
                    return Event::Tick;
                }
            }
        }
    }

    /// Sends a keepalive if nothing went out lately; fails if the peer has
    /// been silent too long.
    pub async fn keep_alive(&mut self) -> Result<(), String> {
        if self.heard.elapsed() > KEEPALIVE_TIMEOUT {
            return Err("the peer went silent".into());
        }
        if self.sent.elapsed() >= KEEPALIVE_INTERVAL {
            self.write_bytes(Bytes::from_static(&KEEPALIVE_FRAME))
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::StreamExt;
    use raft::prelude::{Message, MessageType};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_stream::wrappers::TcpListenerStream;

    use latchkey_proto::peer::v1::{peer_frame, Hello, PeerFrame};

    use super::{dial, host_of, opening, route, DialError, Event, KEEPALIVE_TIMEOUT, MAGIC};
    use crate::config::Config;
    use crate::node::{Node, NodeMsg, NodeOptions, Transport};
    use crate::storage::{Engine, MemoryDisk};
    use crate::tls::{PeerClientTls, ServerTls, TlsFiles};
    use crate::transport::{encode, Inbound, PeerDirectory};
    use crate::types::NodeId;

    struct Nowhere;

    impl Transport for Nowhere {
        fn send(&mut self, _: Vec<Message>) {}
    }

    /// Node 1 of the voters {1, 2}, not running (its inbox only fills),
    /// and the address of a loopback peer port that serves it framed
    /// connections, with `tls` if given; every other connection is closed.
    async fn node_one(tls: Option<ServerTls>) -> (Node, String) {
        let peers = [1, 2]
            .into_iter()
            .map(|id| (NodeId(id), format!("127.0.0.1:{id}")))
            .collect();
        let config = Config::with_defaults(
            NodeId(1),
            // Unused: the node's storage is a `MemoryDisk`.
            "/nonexistent/latchkey-framed-test".into(),
            "127.0.0.1:0".parse().expect("literal address"),
            "127.0.0.1:0".parse().expect("literal address"),
            peers,
        );
        let engine = Engine::open_memory(&MemoryDisk::new()).expect("memory engine");
        let options = NodeOptions {
            raft_logger: Some(slog::Logger::root(slog::Discard, slog::o!())),
            ..NodeOptions::default()
        };
        let (node, handle) =
            Node::with_options(&config, engine, Box::new(Nowhere), options).expect("node opens");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address").to_string();
        let inbound = Inbound::new(NodeId(1), handle, PeerDirectory::new(&config));
        match tls {
            Some(tls) => {
                let others = route(crate::tls::incoming(listener, tls, "peer"), inbound);
                tokio::spawn(others.for_each(|_| async {}));
            }
            None => {
                let others = route(TcpListenerStream::new(listener), inbound);
                tokio::spawn(others.for_each(|_| async {}));
            }
        }
        (node, addr)
    }

    /// [`node_one`] with mutual TLS on its peer port, and the TLS node 2
    /// dials it with; the directory holds the CA and certificates.
    async fn tls_node_one() -> (tempfile::TempDir, PeerClientTls, Node, String) {
        let dir = tempfile::tempdir().expect("temp dir");
        let dialer = PeerClientTls::load(tls_files(dir.path(), 2)).expect("node 2's TLS");
        let peer_port = ServerTls::load_peer(tls_files(dir.path(), 1)).expect("peer port TLS");
        let (node, addr) = node_one(Some(peer_port)).await;
        (dir, dialer, node, addr)
    }

    /// Node `id`'s certificate, signed by the CA in `dir` (made if missing).
    fn tls_files(dir: &std::path::Path, id: u64) -> TlsFiles {
        crate::dev::tls::ensure_ca(dir).expect("CA");
        let (cert, key) = crate::dev::tls::ensure_node(dir, id).expect("node certificate");
        TlsFiles {
            cert,
            key,
            client_ca: Some(crate::dev::tls::dir(dir).join("ca.pem")),
            crl: None,
        }
    }

    fn hello(from: u64, to: u64) -> Hello {
        Hello {
            from,
            to,
            client_addr: format!("127.0.0.1:{from}"),
            peer_addr: format!("127.0.0.1:{from}"),
        }
    }

    fn hello_frame(from: u64, to: u64) -> PeerFrame {
        PeerFrame {
            frame: Some(peer_frame::Frame::Hello(hello(from, to))),
        }
    }

    fn heartbeat(from: u64, to: u64) -> Message {
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgHeartbeat);
        message.from = from;
        message.to = to;
        message.term = 1;
        message
    }

    /// The next raft message in `node`'s inbox, waiting up to 5 s.
    async fn next_stepped(node: &mut Node) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            match node.take_inbox_message() {
                Some(NodeMsg::Raft(message)) => return Some(*message),
                Some(_) => {}
                None => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        None
    }

    #[tokio::test]
    async fn a_framed_link_delivers_its_senders_messages_and_drops_the_others() {
        let (mut node, addr) = node_one(None).await;
        let mut link = dial(&addr, None, &hello(2, 1))
            .await
            .expect("node 1 accepts node 2");
        // Names node 3 as its sender on node 2's stream: dropped.
        link.push(encode(&heartbeat(3, 1)));
        link.push(encode(&heartbeat(2, 1)));
        link.write().await.expect("written");
        let stepped = next_stepped(&mut node)
            .await
            .expect("a message reaches the node");
        assert_eq!((stepped.from, stepped.to), (2, 1));
        assert_eq!(stepped.get_msg_type(), MessageType::MsgHeartbeat);
        // The stream goes on after a dropped frame.
        link.push(encode(&heartbeat(2, 1)));
        link.write().await.expect("written");
        assert!(next_stepped(&mut node).await.is_some());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(node.take_inbox_message().is_none(), "nothing else stepped");
    }

    #[tokio::test]
    async fn a_hello_for_another_node_or_from_a_stranger_is_refused_with_the_reason() {
        let (mut node, addr) = node_one(None).await;
        match dial(&addr, None, &hello(2, 3)).await {
            Err(DialError::Refused(why)) => assert!(why.contains("this is node 1"), "{why}"),
            other => panic!("expected a refusal, got {:?}", other.err()),
        }
        match dial(&addr, None, &hello(7, 1)).await {
            Err(DialError::Refused(why)) => assert!(why.contains("not a member"), "{why}"),
            other => panic!("expected a refusal, got {:?}", other.err()),
        }
        assert!(node.take_inbox_message().is_none());
    }

    #[tokio::test]
    async fn a_connection_that_does_not_open_with_a_hello_is_refused_and_closed() {
        let (mut node, addr) = node_one(None).await;
        let mut tcp = TcpStream::connect(&addr).await.expect("connect");
        let frame = PeerFrame {
            frame: Some(peer_frame::Frame::RaftMessage(encode(&heartbeat(2, 1)))),
        };
        tcp.write_all(&opening(MAGIC, &frame)).await.expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut answer))
            .await
            .expect("the node closes the connection")
            .expect("read");
        let reason = b"a peer stream must open with a Hello";
        assert_eq!(&answer[..MAGIC.len()], MAGIC);
        assert_eq!(
            answer[MAGIC.len()..MAGIC.len() + 4],
            (reason.len() as u32).to_be_bytes()
        );
        assert_eq!(&answer[MAGIC.len() + 4..], reason);
        assert!(node.take_inbox_message().is_none());
    }

    #[tokio::test]
    async fn over_tls_alpn_agrees_the_framed_protocol_and_finds_a_grpc_only_port() {
        let (dir, dialer, mut node, addr) = tls_node_one().await;
        let mut link = dial(&addr, Some(&dialer), &hello(2, 1))
            .await
            .expect("framed over TLS");
        link.push(encode(&heartbeat(2, 1)));
        link.write().await.expect("written");
        assert!(next_stepped(&mut node).await.is_some());
        // The client port's TLS speaks gRPC only, as an older node's peer port.
        let grpc_only = ServerTls::load(tls_files(dir.path(), 1)).expect("gRPC-only TLS");
        let (_older, addr) = node_one(Some(grpc_only)).await;
        match dial(&addr, Some(&dialer), &hello(2, 1)).await {
            Err(DialError::NotSpoken) => {}
            other => panic!("expected NotSpoken, got {:?}", other.err()),
        }
    }

    #[tokio::test]
    async fn a_tls_connection_that_agrees_the_alpn_but_not_the_magic_is_closed_unanswered() {
        let (_dir, dialer, mut node, addr) = tls_node_one().await;
        let (config, name) = dialer
            .current()
            .rustls_config("127.0.0.1", &[super::ALPN])
            .expect("rustls config");
        let tcp = TcpStream::connect(&addr).await.expect("connect");
        let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("the handshake agrees the ALPN");
        tls.write_all(&opening(b"LKRAFT/0", &hello_frame(2, 1)))
            .await
            .expect("write");
        tls.flush().await.expect("flush");
        let mut answer = Vec::new();
        // The node closes without a TLS close_notify; an error is a close too.
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer))
            .await
            .expect("the node closes the connection");
        assert!(answer.is_empty(), "no answer: {answer:?}");
        assert!(node.take_inbox_message().is_none());
    }

    #[tokio::test]
    async fn a_peer_that_speaks_only_grpc_is_recognised() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address").to_string();
        let (_reporter, health) = tonic_health::server::health_reporter();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        match dial(&addr, None, &hello(2, 1)).await {
            Err(DialError::NotSpoken) => {}
            other => panic!("expected NotSpoken, got {:?}", other.err()),
        }
    }

    /// Opens a framed connection by hand as node 2 and reads the answer.
    async fn open_by_hand(addr: &str) -> TcpStream {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(&opening(MAGIC, &hello_frame(2, 1)))
            .await
            .expect("write");
        let mut answer = [0u8; MAGIC.len() + 4];
        tcp.read_exact(&mut answer).await.expect("the answer");
        assert_eq!(&answer[..MAGIC.len()], MAGIC);
        assert_eq!(answer[MAGIC.len()..], [0; 4], "accepted");
        tcp
    }

    #[tokio::test]
    async fn a_dialer_that_goes_silent_is_dropped_after_keepalives() {
        let (_node, addr) = node_one(None).await;
        let mut tcp = open_by_hand(&addr).await;
        // Send nothing more: the node sends keepalives, then hangs up.
        let mut rest = Vec::new();
        tokio::time::timeout(KEEPALIVE_TIMEOUT * 4, tcp.read_to_end(&mut rest))
            .await
            .expect("the node hangs up on a silent peer")
            .expect("read");
        assert!(!rest.is_empty(), "keepalives came first");
        assert!(rest.iter().all(|b| *b == 0), "only empty frames: {rest:?}");
        assert_eq!(rest.len() % 4, 0);
    }

    #[tokio::test]
    async fn a_link_whose_peer_goes_silent_breaks() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address").to_string();
        // Accepts, answers the Hello, reads everything, never writes again.
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            let mut answer = MAGIC.to_vec();
            answer.extend_from_slice(&[0; 4]);
            tcp.write_all(&answer).await.expect("answer");
            let mut sink = [0u8; 4096];
            while tcp.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        let mut link = dial(&addr, None, &hello(2, 1)).await.expect("opens");
        let broken = tokio::time::timeout(KEEPALIVE_TIMEOUT * 4, async {
            loop {
                match link.next_event().await {
                    Event::Tick => {
                        if let Err(e) = link.keep_alive().await {
                            return e;
                        }
                    }
                    Event::Broken(e) => panic!("broke another way: {e}"),
                }
            }
        })
        .await
        .expect("the link notices the silence");
        assert!(broken.contains("silent"), "{broken}");
    }

    #[test]
    fn host_of_strips_the_port_and_brackets() {
        assert_eq!(host_of("127.0.0.1:2380"), "127.0.0.1");
        assert_eq!(host_of("db1.example:2380"), "db1.example");
        assert_eq!(host_of("[::1]:2380"), "::1");
    }
}
