//! Backups: [`Client::save_snapshot`] writes a consistent snapshot of the
//! cluster's state to a file, as `latchkey snapshot save` does.
//!
//! The cluster takes the snapshot at a linearizable read point (it holds
//! every write acknowledged before the call) and streams it in chunks. The
//! file is written as it arrives; the caller should check it before use
//! (the `latchkey` CLI verifies its checksum and renames it into place).

use std::path::Path;

use latchkey_proto::v1::maintenance_client::MaintenanceClient;
use latchkey_proto::v1::{snapshot_save_chunk, SnapshotSaveRequest};
use tokio::io::AsyncWriteExt;

use crate::client::{CallSpec, Client};
use crate::error::Error;

/// What a saved snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedSnapshot {
    /// The log position the state is at.
    pub index: u64,
    pub term: u64,
    pub records: u64,
    pub bytes: u64,
    /// The file's crc32, as the server computed it.
    pub checksum: u32,
}

impl Client {
    /// Streams a consistent snapshot of the cluster's state into `path`
    /// (created or truncated).
    pub async fn save_snapshot(&self, path: &Path) -> Result<SavedSnapshot, Error> {
        let inner = &self.inner;
        let mut spec = CallSpec::read(&inner.options);
        // The server writes the whole snapshot before the first chunk.
        spec.attempt_timeout = None;
        let mut stream = inner
            .call(spec, |channel| async move {
                MaintenanceClient::new(channel)
                    .max_decoding_message_size(4 * 1024 * 1024)
                    .snapshot(SnapshotSaveRequest {})
                    .await
            })
            .await?;
        let failed = |status: tonic::Status| Error::from_status(&status);
        let info = match stream.message().await.map_err(failed)? {
            Some(chunk) => match chunk.chunk {
                Some(snapshot_save_chunk::Chunk::Info(info)) => info,
                _ => return Err(protocol("the snapshot did not start with its facts")),
            },
            None => return Err(protocol("the snapshot stream ended at once")),
        };
        let io = |e: std::io::Error| Error::Config(format!("writing {}: {e}", path.display()));
        let mut file = tokio::fs::File::create(path).await.map_err(io)?;
        let mut written = 0u64;
        // Bounded by the server's stream, checked against the announced size.
        while let Some(chunk) = stream.message().await.map_err(failed)? {
            let Some(snapshot_save_chunk::Chunk::Data(data)) = chunk.chunk else {
                return Err(protocol("only data may follow the snapshot's facts"));
            };
            written += data.len() as u64;
            if written > info.bytes {
                return Err(protocol("more bytes than announced"));
            }
            file.write_all(&data).await.map_err(io)?;
        }
        if written != info.bytes {
            return Err(protocol(&format!(
                "{written} of the {} bytes announced arrived",
                info.bytes
            )));
        }
        file.sync_all().await.map_err(io)?;
        Ok(SavedSnapshot {
            index: info.index,
            term: info.term,
            records: info.records,
            bytes: info.bytes,
            checksum: info.checksum,
        })
    }
}

fn protocol(message: &str) -> Error {
    Error::Unavailable {
        message: format!("snapshot transfer broke off: {message}"),
    }
}
