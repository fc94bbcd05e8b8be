//! `latchkey snapshot restore`: seeds one member of a new cluster from a
//! backup file, offline.
//!
//! Every member of the new cluster is restored from the same file with the
//! same `--initial-cluster`, so all start from identical state: the file's
//! records at its index and term, with the new membership, as if each had
//! just installed that snapshot (log empty from the next index on, commit
//! at the snapshot). The state is marked *restore pending*: the first
//! leader raises the fencing-token floor through Raft before anything else
//! is applied, so no token the old cluster may have issued after the backup
//! is ever issued again (`docs/semantics.md`, Invariant 1).
//!
//! The file is checked in full (structure, every record, its checksum)
//! before anything is written, and the data directory must be new: a
//! corrupt or truncated file, or a directory that already holds data, is
//! refused with one line and nothing written.

use std::collections::BTreeMap;
use std::path::Path;

use raft::prelude::{ConfState, HardState};

use crate::coordination::{encode_restore_pending, RESTORE_PENDING_KEY};
use crate::membership;
use crate::storage::snapshot_file::{self, SnapshotInfo};
use crate::storage::{keys, Batch, Engine, LogPosition, CF_RAFT_STATE, CF_STATE};
use crate::types::NodeId;

/// What a restore wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Restored {
    pub snapshot: SnapshotInfo,
    pub voters: Vec<u64>,
}

/// Restores member `id` of the cluster `peers` into `data_dir` from `file`.
pub fn restore(
    file: &Path,
    data_dir: &Path,
    id: NodeId,
    peers: &BTreeMap<NodeId, String>,
) -> Result<Restored, String> {
    if !peers.contains_key(&id) {
        return Err(format!("--id {id} is not in --initial-cluster"));
    }
    let snapshot = snapshot_file::verify(file).map_err(|e| e.to_string())?;
    let occupied = std::fs::read_dir(data_dir).is_ok_and(|mut entries| entries.next().is_some());
    if occupied {
        return Err(format!(
            "data dir {} is not empty; restore only into a new one (each member gets its own)",
            data_dir.display()
        ));
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create data dir {}: {e}", data_dir.display()))?;
    let written = write_member(file, data_dir, peers, &snapshot);
    if let Err(error) = written {
        // Nothing half-restored is left behind.
        let _ = std::fs::remove_dir_all(data_dir);
        return Err(error);
    }
    Ok(Restored {
        snapshot,
        voters: peers.keys().map(|id| id.0).collect(),
    })
}

fn write_member(
    file: &Path,
    data_dir: &Path,
    peers: &BTreeMap<NodeId, String>,
    snapshot: &SnapshotInfo,
) -> Result<(), String> {
    let engine = Engine::open(&data_dir.join("db")).map_err(|e| e.to_string())?;
    let mut batch = Batch::new(&engine);
    let replaced = [keys::APPLIED, keys::CONF_STATE, keys::MEMBERS];
    let mut failure = None;
    snapshot_file::read(file, |key, raw| {
        if !replaced.contains(&key) {
            if let Err(e) = batch.put_framed(CF_STATE, key, raw) {
                failure.get_or_insert(e.to_string());
            }
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    if let Some(failure) = failure {
        return Err(failure);
    }
    let position = LogPosition {
        index: snapshot.index,
        term: snapshot.term,
    };
    let mut conf_state = ConfState::default();
    conf_state.set_voters(peers.keys().map(|id| id.0).collect());
    let conf_state = encode(&conf_state)?;
    let hard_state = HardState {
        term: snapshot.term,
        commit: snapshot.index,
        ..HardState::default()
    };
    batch.put_message(CF_STATE, keys::APPLIED, &position);
    batch.put(CF_STATE, keys::CONF_STATE, &conf_state);
    let members = membership::encode(&membership::from_peers(peers));
    batch.put(CF_STATE, keys::MEMBERS, &members);
    batch.put(CF_STATE, RESTORE_PENDING_KEY, &encode_restore_pending());
    batch.put(CF_RAFT_STATE, keys::raft_state::CONF_STATE, &conf_state);
    batch.put(
        CF_RAFT_STATE,
        keys::raft_state::HARD_STATE,
        &encode(&hard_state)?,
    );
    batch.put_message(CF_RAFT_STATE, keys::raft_state::TRUNCATED, &position);
    engine.write(batch, true).map_err(|e| e.to_string())?;
    engine.flush().map_err(|e| e.to_string())
}

fn encode(message: &impl protobuf::Message) -> Result<Vec<u8>, String> {
    message.write_to_bytes().map_err(|e| e.to_string())
}
