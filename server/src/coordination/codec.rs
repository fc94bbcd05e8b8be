//! The stored form of the coordination state: keys and a small binary
//! value format.
//!
//! Keys (all under [`RECORD_PREFIX`]; integers big-endian so keys sort
//! numerically):
//! - `c/lease/<lease id: u64>` → `ttl_ms`
//! - `c/lock/<kind byte><name>` → the holder's [`Grant`]
//! - `c/wait/<kind byte><name>\0<enqueued index: u64>` → a [`Waiter`]
//! - `c/ses/<session id: u64>` → a [`Session`]'s header
//! - `c/res/<session id: u64><seq: u64>` → one remembered result of a session
//! - `c/meta/next_token` → the next fencing token
//! - `c/meta/restore_pending` → present (empty) from a restore until the
//!   first leader has raised the token floor
//!
//! `c/session/…` records of the earlier session format (one record per
//! client with all its results, before sessions were opened explicitly)
//! are recognised and ignored on load: those clients' ids name no open
//! session now, so their requests are refused as expired.
//!
//! The kind byte is `l` for a lock and `e` for an election. Names never
//! contain control characters, so the `\0` ends a name unambiguously.
//!
//! Values start with a format version byte (1), then fixed-width big-endian
//! integers and byte strings prefixed by their `u32` length:
//! - lease: `ttl_ms: u64`; with an owner, version 2: `ttl_ms: u64, owner:
//!   bytes` (an anonymous lease keeps version 1, so its bytes are unchanged)
//! - grant: `lease: u64, token: u64, granted_index: u64, value: bytes`
//! - waiter: `lease: u64, value: bytes, attempt: u64`
//! - session header: `opened_index: u64, forgotten_below: u64`
//! - session result: `result: bytes`
//! - next token: `token: u64`
//!
//! The encoding is a pure function of the record, so every replica writes
//! the same bytes.

use std::collections::BTreeMap;

use super::sessions::{SequenceNumber, Session, SessionId};
use super::types::{FencingToken, Grant, Kind, LeaseId, LockKey, Waiter};
use crate::types::LogIndex;

/// Prefix of every coordination record.
pub const RECORD_PREFIX: &[u8] = b"c/";
pub const LEASE_PREFIX: &[u8] = b"c/lease/";
pub const LOCK_PREFIX: &[u8] = b"c/lock/";
pub const WAITER_PREFIX: &[u8] = b"c/wait/";
pub const SESSION_PREFIX: &[u8] = b"c/ses/";
pub const SESSION_RESULT_PREFIX: &[u8] = b"c/res/";
/// Records of the earlier session format, ignored on load.
pub const LEGACY_SESSION_PREFIX: &[u8] = b"c/session/";
pub const NEXT_TOKEN_KEY: &[u8] = b"c/meta/next_token";
pub const RESTORE_PENDING_KEY: &[u8] = b"c/meta/restore_pending";

const FORMAT_VERSION: u8 = 1;
/// The lease record of a lease with an owner.
const OWNED_LEASE_VERSION: u8 = 2;
/// Ends the name inside a waiter key.
const NAME_END: u8 = 0;
const U64_BYTES: usize = 8;

pub fn lease_key(lease: LeaseId) -> Vec<u8> {
    [LEASE_PREFIX, &lease.0.to_be_bytes()].concat()
}

pub fn lock_key(key: &LockKey) -> Vec<u8> {
    [LOCK_PREFIX, &[key.kind.key_byte()], key.name.as_bytes()].concat()
}

pub fn waiter_key(key: &LockKey, enqueued_index: LogIndex) -> Vec<u8> {
    [
        WAITER_PREFIX,
        &[key.kind.key_byte()],
        key.name.as_bytes(),
        &[NAME_END],
        &enqueued_index.0.to_be_bytes(),
    ]
    .concat()
}

pub fn session_key(session: SessionId) -> Vec<u8> {
    [SESSION_PREFIX, &session.0.to_be_bytes()].concat()
}

pub fn session_result_key(session: SessionId, seq: SequenceNumber) -> Vec<u8> {
    [
        SESSION_RESULT_PREFIX,
        &session.0.to_be_bytes(),
        &seq.0.to_be_bytes(),
    ]
    .concat()
}

/// A decoded record.
#[derive(Debug)]
pub(super) enum Decoded {
    NextToken(FencingToken),
    RestorePending,
    Lease {
        lease: LeaseId,
        ttl_ms: u64,
        owner: Option<String>,
    },
    Lock {
        key: LockKey,
        holder: Grant,
    },
    Waiter {
        key: LockKey,
        waiter: Waiter,
    },
    /// A session header; its `results` are empty (they are records of their own).
    Session {
        id: SessionId,
        session: Session,
    },
    SessionResult {
        id: SessionId,
        seq: SequenceNumber,
        result: Vec<u8>,
    },
    /// A record of the earlier session format.
    LegacySession,
}

pub(super) fn encode_next_token(token: FencingToken) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    put_u64(&mut out, token.0);
    out
}

/// The value of [`RESTORE_PENDING_KEY`].
pub fn encode_restore_pending() -> Vec<u8> {
    vec![FORMAT_VERSION]
}

pub(super) fn encode_lease(ttl_ms: u64, owner: Option<&str>) -> Vec<u8> {
    match owner {
        None => {
            let mut out = vec![FORMAT_VERSION];
            put_u64(&mut out, ttl_ms);
            out
        }
        Some(owner) => {
            let mut out = vec![OWNED_LEASE_VERSION];
            put_u64(&mut out, ttl_ms);
            put_bytes(&mut out, owner.as_bytes());
            out
        }
    }
}

pub(super) fn encode_grant(grant: &Grant) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    put_u64(&mut out, grant.lease.0);
    put_u64(&mut out, grant.token.0);
    put_u64(&mut out, grant.granted_index.0);
    put_bytes(&mut out, &grant.value);
    out
}

pub(super) fn encode_waiter(waiter: &Waiter) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    put_u64(&mut out, waiter.lease.0);
    put_bytes(&mut out, &waiter.value);
    put_u64(&mut out, waiter.attempt.0);
    out
}

pub(super) fn encode_session(session: &Session) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    put_u64(&mut out, session.opened_index.0);
    put_u64(&mut out, session.forgotten_below.0);
    out
}

pub(super) fn encode_session_result(result: &[u8]) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    put_bytes(&mut out, result);
    out
}

/// Decodes one record; the error says what is wrong (the caller names the key).
pub(super) fn decode(key: &[u8], value: &[u8]) -> Result<Decoded, String> {
    if let Some(rest) = key.strip_prefix(LEASE_PREFIX) {
        return decode_lease(rest, value);
    }
    let mut reader = Reader::new(value)?;
    let decoded = if key == NEXT_TOKEN_KEY {
        Decoded::NextToken(FencingToken(reader.u64()?))
    } else if key == RESTORE_PENDING_KEY {
        Decoded::RestorePending
    } else if let Some(rest) = key.strip_prefix(LOCK_PREFIX) {
        let (kind, name) = rest.split_first().ok_or("lock key has no kind")?;
        Decoded::Lock {
            key: lock_key_parts(*kind, name)?,
            holder: Grant {
                lease: LeaseId(reader.u64()?),
                token: FencingToken(reader.u64()?),
                granted_index: LogIndex(reader.u64()?),
                value: reader.bytes()?,
            },
        }
    } else if let Some(rest) = key.strip_prefix(WAITER_PREFIX) {
        let (key, enqueued_index) = waiter_key_parts(rest)?;
        Decoded::Waiter {
            key,
            waiter: Waiter {
                lease: LeaseId(reader.u64()?),
                value: reader.bytes()?,
                enqueued_index,
                attempt: LogIndex(reader.u64()?),
            },
        }
    } else if let Some(rest) = key.strip_prefix(SESSION_PREFIX) {
        Decoded::Session {
            id: SessionId(key_u64(rest)?),
            session: Session {
                opened_index: LogIndex(reader.u64()?),
                forgotten_below: SequenceNumber(reader.u64()?),
                results: BTreeMap::new(),
            },
        }
    } else if let Some(rest) = key.strip_prefix(SESSION_RESULT_PREFIX) {
        if rest.len() != 2 * U64_BYTES {
            return Err(format!("session result key of {} bytes", rest.len()));
        }
        Decoded::SessionResult {
            id: SessionId(key_u64(&rest[..U64_BYTES])?),
            seq: SequenceNumber(key_u64(&rest[U64_BYTES..])?),
            result: reader.bytes()?,
        }
    } else if key.starts_with(LEGACY_SESSION_PREFIX) {
        return Ok(Decoded::LegacySession);
    } else {
        return Err("not a coordination key".into());
    };
    reader.finish()?;
    Ok(decoded)
}

fn decode_lease(key_rest: &[u8], value: &[u8]) -> Result<Decoded, String> {
    let lease = LeaseId(key_u64(key_rest)?);
    let (mut reader, owned) = match value.first() {
        Some(&OWNED_LEASE_VERSION) => (Reader::new_unversioned(&value[1..]), true),
        _ => (Reader::new(value)?, false),
    };
    let ttl_ms = reader.u64()?;
    let owner = if owned {
        let bytes = reader.bytes()?;
        let owner =
            String::from_utf8(bytes).map_err(|e| format!("lease owner is not UTF-8: {e}"))?;
        if owner.is_empty() {
            return Err("lease owner is empty".into());
        }
        Some(owner)
    } else {
        None
    };
    reader.finish()?;
    Ok(Decoded::Lease {
        lease,
        ttl_ms,
        owner,
    })
}

fn key_u64(bytes: &[u8]) -> Result<u64, String> {
    let array: [u8; U64_BYTES] = bytes
        .try_into()
        .map_err(|_| format!("expected 8 bytes, found {}", bytes.len()))?;
    Ok(u64::from_be_bytes(array))
}

fn lock_key_parts(kind: u8, name: &[u8]) -> Result<LockKey, String> {
    let kind = Kind::from_key_byte(kind).ok_or_else(|| format!("unknown kind byte {kind:#04x}"))?;
    let name = std::str::from_utf8(name).map_err(|e| format!("name is not UTF-8: {e}"))?;
    Ok(LockKey::new(kind, name))
}

/// Splits `<kind><name>\0<index>`.
fn waiter_key_parts(rest: &[u8]) -> Result<(LockKey, LogIndex), String> {
    let Some(name_end) = rest
        .len()
        .checked_sub(U64_BYTES + 1)
        .filter(|end| *end >= 1)
    else {
        return Err("waiter key too short".into());
    };
    if rest[name_end] != NAME_END {
        return Err("waiter key has no name terminator".into());
    }
    let key = lock_key_parts(rest[0], &rest[1..name_end])?;
    Ok((key, LogIndex(key_u64(&rest[name_end + 1..])?)))
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_be_bytes());
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    // Values are bounded (MAX_VALUE_BYTES, one encoded response per session
    // result) far below 4 GiB before they reach apply.
    assert!(
        len <= u32::MAX as usize,
        "record field of {len} bytes does not fit its u32 length prefix"
    );
    out.extend_from_slice(&(len as u32).to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// Reads a value front to back; every short read is an error, never a panic.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(value: &'a [u8]) -> Result<Reader<'a>, String> {
        match value.split_first() {
            Some((&FORMAT_VERSION, rest)) => Ok(Reader { rest }),
            Some((version, _)) => Err(format!("unknown format version {version}")),
            None => Err("empty value".into()),
        }
    }

    /// A reader of what follows a version byte already checked.
    fn new_unversioned(rest: &'a [u8]) -> Reader<'a> {
        Reader { rest }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], String> {
        if self.rest.len() < len {
            return Err(format!(
                "value truncated: wanted {len} more bytes, {} left",
                self.rest.len()
            ));
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(taken)
    }

    fn u64(&mut self) -> Result<u64, String> {
        key_u64(self.take(U64_BYTES)?)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let bytes = self.take(4)?;
        let array: [u8; 4] = bytes.try_into().map_err(|_| "short u32".to_string())?;
        Ok(u32::from_be_bytes(array))
    }

    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let len = self.u32()? as usize;
        Ok(self.take(len)?.to_vec())
    }

    fn finish(self) -> Result<(), String> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(format!("{} unexpected trailing bytes", self.rest.len()))
        }
    }
}
