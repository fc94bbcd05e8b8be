//! The Maintenance service: backups (`latchkey snapshot save`).
//!
//! A backup is taken at a linearizable read point — a ReadIndex round, then
//! the local state machine once it has applied that far — so it holds
//! every write acknowledged before the request. The state is written to a
//! snapshot file (the same format followers receive, with its checksum) on
//! a blocking thread from one RocksDB snapshot, then streamed to the client
//! in chunks, and the file is removed.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use latchkey_proto::v1::maintenance_server::Maintenance;
use latchkey_proto::v1::{
    snapshot_save_chunk, SnapshotSaveChunk, SnapshotSaveInfo, SnapshotSaveRequest,
};

use super::Api;
use crate::storage::snapshot_file;

/// Bytes of one chunk.
const CHUNK_BYTES: usize = 1024 * 1024;
/// Chunks queued ahead of the client.
const CHUNKS_IN_FLIGHT: usize = 4;
/// Names backup files so that two backups never share one.
static NEXT_BACKUP: AtomicU64 = AtomicU64::new(1);

type ChunkStream = Pin<Box<dyn Stream<Item = Result<SnapshotSaveChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for Api {
    type SnapshotStream = ChunkStream;

    async fn snapshot(
        &self,
        request: Request<SnapshotSaveRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        self.identify(&request)?.require_admin()?;
        self.read_point(false).await?;
        // The file is read from the engine, which holds the state as of the
        // last checkpoint: have one written of everything applied so far.
        self.node.checkpoint().await.map_err(|e| self.status(e))?;
        let number = NEXT_BACKUP.fetch_add(1, Ordering::Relaxed);
        let path = self
            .snapshot_dir
            .join(format!("backup-{}-{number}.snap", std::process::id()));
        let engine = self.reader.engine().clone();
        let written = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || snapshot_file::write_from_engine(&engine, &path))
        }
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| self.fatal(e))?;
        let info = SnapshotSaveInfo {
            index: written.index,
            term: written.term,
            records: written.records,
            bytes: written.bytes,
            checksum: written.checksum,
        };
        let (chunks, queue) = mpsc::channel(CHUNKS_IN_FLIGHT);
        tokio::spawn(async move {
            let _ = stream_file(&path, info, &chunks).await;
            let _ = tokio::fs::remove_file(&path).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(queue))))
    }
}

/// Sends `info`, then the file in chunks; stops when the client goes away.
async fn stream_file(
    path: &std::path::Path,
    info: SnapshotSaveInfo,
    chunks: &mpsc::Sender<Result<SnapshotSaveChunk, Status>>,
) -> Result<(), ()> {
    let first = SnapshotSaveChunk {
        chunk: Some(snapshot_save_chunk::Chunk::Info(info)),
    };
    chunks.send(Ok(first)).await.map_err(|_| ())?;
    let mut file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(e) => {
            let _ = chunks.send(Err(Status::internal(e.to_string()))).await;
            return Err(());
        }
    };
    // Bounded by the file: each pass reads at least one byte or stops.
    loop {
        let mut buffer = vec![0u8; CHUNK_BYTES];
        let read = match file.read(&mut buffer).await {
            Ok(0) => return Ok(()),
            Ok(read) => read,
            Err(e) => {
                let _ = chunks.send(Err(Status::internal(e.to_string()))).await;
                return Err(());
            }
        };
        buffer.truncate(read);
        let chunk = SnapshotSaveChunk {
            chunk: Some(snapshot_save_chunk::Chunk::Data(buffer)),
        };
        chunks.send(Ok(chunk)).await.map_err(|_| ())?;
    }
}
