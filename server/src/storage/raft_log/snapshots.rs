//! Building and installing snapshots for [`RaftLog`].
//!
//! On RocksDB a snapshot is a file ([`super::super::snapshot_file`]),
//! written on a thread of its own from a RocksDB snapshot, so that a large
//! state machine never stalls the node's loop (and its heartbeats): until
//! the file is ready, raft-rs is told the snapshot is temporarily
//! unavailable and asks again. The raft-rs message then carries only a
//! descriptor of the file, and the peer transport streams the file itself
//! in chunks. The receiver checks the whole file's checksum before it is
//! installed, in one synced batch.
//!
//! On the simulator's memory disk the records travel inside the message,
//! built at once, as the deterministic simulator needs.
//!
//! Only the latest file is kept; an older one is deleted when a newer one
//! is ready (a transfer still reading it keeps its open file).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use prost::Message as _;
use raft::prelude::{ConfState, Snapshot};

use latchkey_proto::state::v1::{
    snapshot_payload, SnapshotData, SnapshotDescriptor, SnapshotPayload, SnapshotRecord,
};

use super::{decode_pb, RaftLog};
use crate::error::FatalError;
use crate::storage::snapshot_file::{self, SnapshotInfo};
use crate::storage::{keys, Batch, Engine, LogPosition, CF_STATE};

/// Names files this process builds, so that two builds never share one.
static NEXT_FILE: AtomicU64 = AtomicU64::new(1);

/// The state of the background build.
#[derive(Default)]
pub(super) enum Build {
    #[default]
    Idle,
    Running,
    Done(Result<(SnapshotInfo, PathBuf), FatalError>),
}

/// Where snapshot files go, and what has been built.
#[derive(Default)]
pub(super) struct Snapshots {
    /// `None`: snapshots are built inline (memory disks, or no directory).
    dir: Option<PathBuf>,
    cached: Option<(Snapshot, Option<PathBuf>)>,
    build: Arc<Mutex<Build>>,
}

impl RaftLog {
    /// Puts snapshot files in `dir` (created if missing; files left by an
    /// earlier run are removed). Without it snapshots are built inline.
    pub fn set_snapshot_dir(&mut self, dir: &Path) -> Result<(), FatalError> {
        if self.engine.is_memory() {
            return Ok(());
        }
        let io = |e: std::io::Error| FatalError::storage(format!("preparing {}", dir.display()), e);
        std::fs::create_dir_all(dir).map_err(io)?;
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.is_file() {
                std::fs::remove_file(&path).map_err(io)?;
            }
        }
        self.snapshots.borrow_mut().dir = Some(dir.to_path_buf());
        Ok(())
    }

    /// A snapshot at or past `request_index`, or `None` while one is built.
    pub(super) fn build_snapshot(
        &self,
        request_index: u64,
    ) -> Result<Option<Snapshot>, FatalError> {
        let mut snapshots = self.snapshots.borrow_mut();
        if let Some((cached, _)) = &snapshots.cached {
            let index = cached.get_metadata().index;
            if index >= request_index && index >= self.truncated.index {
                return Ok(Some(cached.clone()));
            }
        }
        let Some(dir) = snapshots.dir.clone() else {
            let snapshot = self.inline_snapshot()?;
            snapshots.cached = Some((snapshot.clone(), None));
            return Ok(Some(snapshot));
        };
        let finished = std::mem::take(&mut *snapshots.build.lock());
        match finished {
            Build::Running => {
                *snapshots.build.lock() = Build::Running;
                Ok(None)
            }
            Build::Done(Err(e)) => Err(e),
            Build::Done(Ok((info, path))) if info.index >= request_index => {
                let snapshot = file_snapshot(&info, &path);
                if let Some((_, Some(old))) =
                    snapshots.cached.replace((snapshot.clone(), Some(path)))
                {
                    // A transfer still reading the old file keeps it open.
                    let _ = std::fs::remove_file(old);
                }
                Ok(Some(snapshot))
            }
            Build::Done(Ok((_, stale))) => {
                let _ = std::fs::remove_file(stale);
                start_build(&self.engine, &dir, snapshots.build.clone());
                Ok(None)
            }
            Build::Idle => {
                start_build(&self.engine, &dir, snapshots.build.clone());
                Ok(None)
            }
        }
    }

    fn inline_snapshot(&self) -> Result<Snapshot, FatalError> {
        let records = self.engine.state_records()?;
        let mut applied = LogPosition::default();
        let mut conf_state = self.conf_state.clone();
        for (key, raw) in &records {
            if key.as_slice() == keys::APPLIED {
                applied = crate::storage::decode::<LogPosition>(CF_STATE, key, &raw[4..])?;
            } else if key.as_slice() == keys::CONF_STATE {
                conf_state = decode_pb::<ConfState>(CF_STATE, key, &raw[4..])?;
            }
        }
        let data = SnapshotData {
            records: records
                .into_iter()
                .map(|(key, value)| SnapshotRecord { key, value })
                .collect(),
        };
        let payload = SnapshotPayload {
            payload: Some(snapshot_payload::Payload::Inline(data)),
        };
        let mut snapshot = Snapshot::default();
        let meta = snapshot.mut_metadata();
        meta.index = applied.index;
        meta.term = applied.term;
        meta.set_conf_state(conf_state);
        snapshot.set_data(payload.encode_to_vec().into());
        Ok(snapshot)
    }

    /// The records of a received snapshot, added to `batch` once all of
    /// them (and, for a file, its checksum) checked out. A file is removed
    /// once read.
    pub(super) fn snapshot_records(
        &self,
        snapshot: &Snapshot,
        batch: &mut Batch,
    ) -> Result<(), FatalError> {
        let payload = SnapshotPayload::decode(snapshot.get_data())
            .map_err(|e| received(format!("snapshot does not decode: {e}")))?;
        match payload.payload {
            Some(snapshot_payload::Payload::Inline(data)) => {
                for record in &data.records {
                    batch.put_framed(CF_STATE, &record.key, &record.value)?;
                }
                Ok(())
            }
            Some(snapshot_payload::Payload::File(file)) => {
                let path = PathBuf::from(&file.path);
                // Written by the caller only if the whole file checks out.
                let info = snapshot_file::read(&path, |key, raw| {
                    batch.put_framed(CF_STATE, key, raw).map_err(|e| {
                        snapshot_file::SnapshotFileError::Malformed {
                            path: file.path.clone(),
                            reason: e.to_string(),
                        }
                    })
                })
                .map_err(|e| received(e.to_string()))?;
                if info.index != snapshot.get_metadata().index || info.checksum != file.checksum {
                    return Err(received(format!(
                        "file {} holds index {} (checksum {:#010x}), the message says {} ({:#010x})",
                        file.path,
                        info.index,
                        info.checksum,
                        snapshot.get_metadata().index,
                        file.checksum
                    )));
                }
                let _ = std::fs::remove_file(&path);
                Ok(())
            }
            None => Err(received("snapshot carries no payload".into())),
        }
    }
}

fn received(reason: String) -> FatalError {
    FatalError::Corruption {
        cf: CF_STATE,
        key: "<received snapshot>".into(),
        reason,
    }
}

fn start_build(engine: &Engine, dir: &Path, slot: Arc<Mutex<Build>>) {
    *slot.lock() = Build::Running;
    let number = NEXT_FILE.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("snapshot-{}-{number}.snap", std::process::id()));
    let engine = engine.clone();
    let spawned = std::thread::Builder::new().name("snapshot".into()).spawn({
        let slot = slot.clone();
        move || {
            let built = snapshot_file::write_from_engine(&engine, &path).map(|info| {
                tracing::info!(
                    index = info.index,
                    bytes = info.bytes,
                    "snapshot file ready"
                );
                (info, path)
            });
            *slot.lock() = Build::Done(built);
        }
    });
    if let Err(e) = spawned {
        *slot.lock() = Build::Done(Err(FatalError::storage("starting a snapshot build", e)));
    }
}

/// The raft-rs snapshot that names a file.
fn file_snapshot(info: &SnapshotInfo, path: &Path) -> Snapshot {
    let payload = SnapshotPayload {
        payload: Some(snapshot_payload::Payload::File(SnapshotDescriptor {
            path: path.display().to_string(),
            bytes: info.bytes,
            checksum: info.checksum,
        })),
    };
    let mut snapshot = Snapshot::default();
    let meta = snapshot.mut_metadata();
    meta.index = info.index;
    meta.term = info.term;
    meta.set_conf_state(info.conf_state.clone());
    snapshot.set_data(payload.encode_to_vec().into());
    snapshot
}

/// The file a snapshot message names, if it names one.
pub fn descriptor(snapshot: &Snapshot) -> Option<SnapshotDescriptor> {
    match SnapshotPayload::decode(snapshot.get_data()).ok()?.payload? {
        snapshot_payload::Payload::File(file) => Some(file),
        snapshot_payload::Payload::Inline(_) => None,
    }
}

/// `snapshot` with its file moved to `path` (the receiver's copy).
pub fn with_local_path(snapshot: &mut Snapshot, path: &Path) {
    if let Some(mut file) = descriptor(snapshot) {
        file.path = path.display().to_string();
        let payload = SnapshotPayload {
            payload: Some(snapshot_payload::Payload::File(file)),
        };
        snapshot.set_data(payload.encode_to_vec().into());
    }
}
