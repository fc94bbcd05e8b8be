//! Key layout of the `state` column family.
//!
//! Metadata keys start with a 0x00 byte so they sort before, and can never
//! collide with, data keys, which start with a printable tag and `/`.

/// The state machine's applied position ([`super::LogPosition`]); written in
/// the same batch as every change it covers.
pub const APPLIED: &[u8] = b"\x00applied";
/// The membership at the applied index (raft-rs `ConfState`).
pub const CONF_STATE: &[u8] = b"\x00conf_state";
/// Every member's addresses (`latchkey.state.v1.Members`); which of them
/// vote is in [`CONF_STATE`].
pub const MEMBERS: &[u8] = b"\x00members";
/// Prefix of key-value records.
pub const KV_PREFIX: &[u8] = b"k/";
/// Prefix of users, roles and the authentication switch (`crate::auth`).
pub const AUTH_PREFIX: &[u8] = b"a/";
/// Upper bound of every key in the family, for range deletes.
pub const END: &[u8] = b"\xff";

/// The stored key of user key `key`.
pub fn kv(key: &[u8]) -> Vec<u8> {
    let mut stored = Vec::with_capacity(KV_PREFIX.len() + key.len());
    stored.extend_from_slice(KV_PREFIX);
    stored.extend_from_slice(key);
    stored
}

/// Keys of the `raft_state` column family.
pub mod raft_state {
    pub const HARD_STATE: &[u8] = b"hard_state";
    pub const CONF_STATE: &[u8] = b"conf_state";
    /// Position of the last entry removed by compaction.
    pub const TRUNCATED: &[u8] = b"truncated";
}

/// The `raft_log` key of entry `index`: big-endian so keys sort by index.
pub fn log_entry(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}
