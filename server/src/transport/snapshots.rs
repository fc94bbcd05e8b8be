//! Snapshot files on the peer transport: streamed in chunks on a call of
//! their own (`Peer.Snapshot`), so that heartbeats and appends keep flowing
//! on the main stream while a large snapshot is on its way.
//!
//! Sender: [`send`] reads the file the MsgSnapshot describes and sends it
//! in [`CHUNK_BYTES`] pieces through a channel of [`CHUNKS_IN_FLIGHT`]:
//! HTTP/2 flow control holds the reader back when the receiver or the
//! network is slower. The node is told whether the transfer succeeded, as
//! raft-rs requires.
//!
//! Receiver: [`receive`] writes the chunks to a `.part` file next to the
//! node's own snapshot files, refuses more bytes than announced, and checks
//! the whole file (structure, every record's frame, the file checksum)
//! before it renames it into place and hands the message, now naming the
//! local copy, to its node. A transfer that fails leaves nothing behind.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

use latchkey_proto::peer::v1::peer_client::PeerClient;
use latchkey_proto::peer::v1::{snapshot_chunk, Hello, SnapshotChunk, SnapshotHeader};

use crate::node::NodeHandle;
use crate::storage::raft_log::snapshots::{descriptor, with_local_path};
use crate::storage::snapshot_file::{self, part_path};
use crate::types::NodeId;

/// Bytes of one chunk.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Chunks queued ahead of the network.
const CHUNKS_IN_FLIGHT: usize = 4;
/// Largest snapshot accepted (a sanity bound far above any real state).
pub const MAX_SNAPSHOT_BYTES: u64 = 64 * 1024 * 1024 * 1024;
/// Names received files so that two transfers never share one.
static NEXT_RECEIVED: AtomicU64 = AtomicU64::new(1);

/// Whether `message` is a snapshot that travels as a file.
pub fn is_file_snapshot(message: &Message) -> bool {
    message.get_msg_type() == MessageType::MsgSnapshot
        && descriptor(message.get_snapshot()).is_some()
}

/// Streams the file of `message` to the peer behind `client`.
pub async fn send(
    mut client: PeerClient<Channel>,
    hello: Hello,
    message: Message,
) -> Result<(), String> {
    let file = descriptor(message.get_snapshot()).ok_or("the message names no file")?;
    let mut reader = tokio::fs::File::open(&file.path)
        .await
        .map_err(|e| format!("opening {}: {e}", file.path))?;
    let (chunks, queue) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let header = SnapshotChunk {
        chunk: Some(snapshot_chunk::Chunk::Header(SnapshotHeader {
            hello: Some(hello),
            raft_message: message.write_to_bytes().map_err(|e| e.to_string())?,
        })),
    };
    chunks
        .send(header)
        .await
        .map_err(|_| "stream closed".to_string())?;
    let feeder = tokio::spawn(async move {
        // Bounded by the file: each pass reads at least one byte or stops.
        loop {
            let mut buffer = vec![0u8; CHUNK_BYTES];
            let read = reader.read(&mut buffer).await.map_err(|e| e.to_string())?;
            if read == 0 {
                return Ok::<(), String>(());
            }
            buffer.truncate(read);
            let chunk = SnapshotChunk {
                chunk: Some(snapshot_chunk::Chunk::Data(buffer)),
            };
            if chunks.send(chunk).await.is_err() {
                return Err("the receiver stopped reading".to_string());
            }
        }
    });
    let call = client
        .snapshot(Request::new(ReceiverStream::new(queue)))
        .await;
    let fed = feeder.await.map_err(|e| e.to_string())?;
    call.map_err(|status| status.message().to_string())?;
    fed
}

/// Receives one snapshot into `dir` and hands it to `node`; `accept`
/// checks the header's `Hello` and returns the sender.
pub async fn receive(
    mut stream: Streaming<SnapshotChunk>,
    dir: &Path,
    me: NodeId,
    node: &NodeHandle,
    accept: impl FnOnce(Hello) -> Result<NodeId, Status>,
) -> Result<(), Status> {
    let header = match stream.message().await?.and_then(|chunk| chunk.chunk) {
        Some(snapshot_chunk::Chunk::Header(header)) => header,
        _ => {
            return Err(Status::invalid_argument(
                "a snapshot stream opens with a header",
            ))
        }
    };
    let from = accept(header.hello.unwrap_or_default())?;
    let mut message = Message::parse_from_bytes(&header.raft_message)
        .map_err(|e| Status::invalid_argument(format!("raft message does not decode: {e}")))?;
    let file = descriptor(message.get_snapshot())
        .filter(|_| message.from == from.0 && message.to == me.0)
        .ok_or_else(|| {
            Status::invalid_argument("not a snapshot file from this sender to this node")
        })?;
    if file.bytes > MAX_SNAPSHOT_BYTES {
        return Err(Status::resource_exhausted(format!(
            "a snapshot of {} bytes (at most {MAX_SNAPSHOT_BYTES})",
            file.bytes
        )));
    }
    let number = NEXT_RECEIVED.fetch_add(1, Ordering::Relaxed);
    let index = message.get_snapshot().get_metadata().index;
    let path = dir.join(format!("received-{from}-{index}-{number}.snap"));
    let written = write_chunks(&mut stream, &path, file.bytes).await;
    let checked = match written {
        Ok(()) => check(&path, file.checksum).await,
        Err(e) => Err(e),
    };
    if let Err(status) = checked {
        let _ = tokio::fs::remove_file(part_path(&path)).await;
        let _ = tokio::fs::remove_file(&path).await;
        tracing::warn!(%from, "refused a snapshot: {}", status.message());
        return Err(status);
    }
    with_local_path(message.mut_snapshot(), &path);
    tracing::info!(%from, index, bytes = file.bytes, "received a snapshot");
    node.step(message)
        .await
        .map_err(|_| Status::unavailable("node is shutting down"))
}

/// Writes the data chunks to `<path>.part`, no more than `expected` bytes,
/// and renames it to `path` once all arrived and are synced.
async fn write_chunks(
    stream: &mut Streaming<SnapshotChunk>,
    path: &Path,
    expected: u64,
) -> Result<(), Status> {
    let part: PathBuf = part_path(path);
    let io = |e: std::io::Error| Status::internal(format!("writing {}: {e}", part.display()));
    let mut out = tokio::fs::File::create(&part).await.map_err(io)?;
    let mut received = 0u64;
    // Bounded by `expected`: more bytes end the transfer.
    while let Some(chunk) = stream.message().await? {
        let Some(snapshot_chunk::Chunk::Data(data)) = chunk.chunk else {
            return Err(Status::invalid_argument("only data may follow the header"));
        };
        received += data.len() as u64;
        if received > expected {
            return Err(Status::invalid_argument(format!(
                "more than the {expected} bytes announced"
            )));
        }
        out.write_all(&data).await.map_err(io)?;
    }
    if received != expected {
        return Err(Status::invalid_argument(format!(
            "{received} of the {expected} bytes announced arrived"
        )));
    }
    out.sync_all().await.map_err(io)?;
    drop(out);
    tokio::fs::rename(&part, path).await.map_err(io)
}

/// Checks the whole received file before anything acts on it.
async fn check(path: &Path, checksum: u32) -> Result<(), Status> {
    let path = path.to_path_buf();
    let verified = tokio::task::spawn_blocking(move || snapshot_file::verify(&path))
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    match verified {
        Ok(info) if info.checksum == checksum => Ok(()),
        Ok(info) => Err(Status::data_loss(format!(
            "the file's checksum is {:#010x}, the sender announced {checksum:#010x}",
            info.checksum
        ))),
        Err(e) => Err(Status::data_loss(e.to_string())),
    }
}
