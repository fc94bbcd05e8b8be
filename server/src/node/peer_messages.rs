//! What the node checks in a peer's raft-rs message before stepping it.
//!
//! raft-rs trusts its peers: it stops the process (`fatal!`, a panic) on
//! some messages that decode and carry a known type but that no correct
//! raft-rs peer sends, and this server's own code assumed the same of a
//! snapshot. A node must not die for a peer's bug or a stray frame, so
//! [`check`] refuses such messages before `RawNode::step`, and the node
//! drops them with a warning that names the peer.
//!
//! Every rule only refuses a message that a correct peer never sends, and
//! dropping a message is always safe in Raft (the network may lose any
//! message): the rules cannot change what is committed, only keep bad
//! input away from code that would crash on it. The rules:
//!
//! - **A term where raft-rs sets one.** Every message a peer sends
//!   carries its sender's term, except a read request a follower forwards,
//!   which raft-rs sends with term 0 and forwards as it is. raft-rs takes
//!   a message of term 0 for one of the node's own and steps it without
//!   comparing terms (a snapshot of term 0 would make a candidate a
//!   follower of term 0); a read request with a term makes raft-rs panic
//!   when a follower forwards it.
//! - **No proposals, no transfer requests.** This server proposes and
//!   starts leader transfers only on the leader, so raft-rs never forwards
//!   a `MsgPropose` or a `MsgTransferLeader` to a peer. A proposal from a
//!   peer would put its bytes (conf changes included, past
//!   `crate::membership`'s checks) into the log, and an empty one makes
//!   raft-rs panic; a follower forwards a transfer request with the
//!   sender's term still set, and raft-rs panics on sending it.
//! - **A read request carries one entry**, the reader's context, as
//!   raft-rs's `read_index` sends it; the leader reads `entries[0]`.
//! - **An append follows an entry**: every entry has a term of at least 1
//!   (a new cluster starts at term 1), so an append after index `i > 0`
//!   names a `log_term` of at least 1; raft-rs reads the term of an index
//!   past its log as 0, would take such an append as matching, and append
//!   after a gap.
//! - **An append's entries follow its position**: indexes `index + 1`,
//!   `index + 2`, … with terms that never go down, from at least
//!   `log_term` up to at most the message's term; a leader's log is
//!   always like that, and raft-rs appends what it is given without
//!   checking. (An append that overlaps this node's committed entries is
//!   answered by raft-rs without reading them, so a conflict with one
//!   never reaches the log.)
//! - **A heartbeat commits only what this node has**: a leader sends
//!   `min(match, committed)`, and this node keeps every entry it
//!   acknowledged; raft-rs panics on a commit index past the last entry.
//! - **An append response acknowledges only what this leader has**: a
//!   follower acknowledges entries it was sent; raft-rs would send from
//!   past the end of the log and panic.
//! - **A snapshot is one this node could install**: index and term at
//!   least 1, its term not above the message's, a configuration that
//!   raft-rs can restore exactly (raft-rs panics otherwise), and, for a
//!   snapshot that carries its records, records whose checksums hold and
//!   whose applied position is the snapshot's own (the node would install
//!   them and then find its state at another index). A snapshot file is
//!   checked by the transport before it gets here.

use prost::Message as _;
use raft::prelude::{Message, MessageType, Snapshot};
use raft::{Raft, StateRole};

use latchkey_proto::state::v1::{snapshot_payload, LogPosition, SnapshotPayload};

use crate::storage::raft_log::restorable_conf_state;
use crate::storage::{keys, RaftLog};

/// Why a message is refused; logged with the peer's id.
pub type Refusal = String;

/// Refuses `message` if no correct peer sends it to a node in `raft`'s
/// state (see the module docs).
pub fn check(raft: &Raft<RaftLog>, message: &Message) -> Result<(), Refusal> {
    let msg_type = message.get_msg_type();
    let forwarded_read = msg_type == MessageType::MsgReadIndex;
    if (message.term == 0) != forwarded_read {
        return Err(format!("a {msg_type:?} of term {}", message.term));
    }
    match msg_type {
        MessageType::MsgPropose | MessageType::MsgTransferLeader => Err(format!(
            "a {msg_type:?} from a peer (this server never forwards one)"
        )),
        MessageType::MsgReadIndex if message.entries.len() != 1 => Err(format!(
            "a read request with {} entries (raft-rs sends one)",
            message.entries.len()
        )),
        MessageType::MsgAppend => check_append(message),
        MessageType::MsgHeartbeat => check_heartbeat(raft, message),
        MessageType::MsgAppendResponse => check_append_response(raft, message),
        MessageType::MsgSnapshot => check_snapshot(message),
        _ => Ok(()),
    }
}

fn check_append(message: &Message) -> Result<(), Refusal> {
    if message.index > 0 && message.log_term == 0 {
        return Err(format!("an append after index {} of term 0", message.index));
    }
    let mut previous_term = message.log_term;
    for (offset, entry) in message.entries.iter().enumerate() {
        let expected = message
            .index
            .checked_add(offset as u64 + 1)
            .ok_or("entry indexes overflow")?;
        if entry.index != expected {
            return Err(format!(
                "entry {offset} of an append after {} has index {}",
                message.index, entry.index
            ));
        }
        if entry.term < previous_term || entry.term > message.term {
            return Err(format!(
                "entry {} has term {} (after term {previous_term}, in a message of term {})",
                entry.index, entry.term, message.term
            ));
        }
        previous_term = entry.term;
    }
    if message.log_term > message.term {
        return Err(format!(
            "an append after term {} in a message of term {}",
            message.log_term, message.term
        ));
    }
    Ok(())
}

fn check_heartbeat(raft: &Raft<RaftLog>, message: &Message) -> Result<(), Refusal> {
    let last = raft.raft_log.last_index();
    if message.commit > last {
        return Err(format!(
            "a heartbeat commits {} but this node's log ends at {last}",
            message.commit
        ));
    }
    Ok(())
}

fn check_append_response(raft: &Raft<RaftLog>, message: &Message) -> Result<(), Refusal> {
    let last = raft.raft_log.last_index();
    if raft.state == StateRole::Leader && !message.reject && message.index > last {
        return Err(format!(
            "an append response acknowledges {} but this leader's log ends at {last}",
            message.index
        ));
    }
    Ok(())
}

fn check_snapshot(message: &Message) -> Result<(), Refusal> {
    let snapshot = message.get_snapshot();
    let meta = snapshot.get_metadata();
    if meta.index == 0 || meta.term == 0 || meta.term > message.term {
        return Err(format!(
            "a snapshot at index {} term {} in a message of term {}",
            meta.index, meta.term, message.term
        ));
    }
    restorable_conf_state(meta.get_conf_state())
        .map_err(|e| format!("a snapshot's configuration {e}"))?;
    check_inline_records(snapshot)
}

/// For a snapshot that carries its records: they decode, their checksums
/// hold, and the applied position among them is the snapshot's.
fn check_inline_records(snapshot: &Snapshot) -> Result<(), Refusal> {
    let payload = SnapshotPayload::decode(snapshot.get_data())
        .map_err(|e| format!("a snapshot's data does not decode: {e}"))?;
    let data = match payload.payload {
        Some(snapshot_payload::Payload::Inline(data)) => data,
        Some(snapshot_payload::Payload::File(_)) => return Ok(()),
        None => return Err("a snapshot without a payload".into()),
    };
    let meta = snapshot.get_metadata();
    let mut applied = None;
    for record in &data.records {
        let payload = crate::storage::unframe(crate::storage::CF_STATE, &record.key, &record.value)
            .map_err(|e| format!("a snapshot record: {e}"))?;
        if record.key == keys::APPLIED {
            let position = LogPosition::decode(payload.as_slice())
                .map_err(|e| format!("a snapshot's applied position does not decode: {e}"))?;
            applied = Some((position.index, position.term));
        }
    }
    if applied != Some((meta.index, meta.term)) {
        return Err(format!(
            "a snapshot at index {} term {} holds the state applied at {applied:?}",
            meta.index, meta.term
        ));
    }
    Ok(())
}
