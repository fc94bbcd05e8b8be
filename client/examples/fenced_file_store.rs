//! Fencing a store outside latchkey: a small file-backed key-value store
//! that refuses writes from a lock holder that has been superseded, even
//! after the store restarts.
//!
//! latchkey's own store checks fencing tokens itself; any other store
//! written under a latchkey lock must do the same check, or a holder that
//! was paused past its lease overwrites the next holder's work.
//! [`FenceGate`] is that check. [`FileStore`] below embeds one:
//! - the check and the write are one step ([`FenceGate::write_fenced`] runs
//!   the write while holding the gate);
//! - a write goes to a temporary file that is then renamed over the data
//!   file, so a crash leaves the old or the new contents, never half;
//! - the highest admitted token is saved in the same file as the data and
//!   loaded back with [`FenceGate::restore`] when the store is opened, so
//!   fencing survives a restart.
//!
//! The demonstration: holder A takes lock `file-store-demo` and writes; its
//! lease then ends; holder B gets the lock with a higher token and writes;
//! A's late write is refused; the store is reopened from disk and A is
//! still refused, while B can go on writing.
//!
//! # Running
//! ```sh
//! # latchkey is in target/debug, or in $CARGO_TARGET_DIR/debug if that is set.
//! target/debug/latchkey dev --data-dir /tmp/latchkey-dev &
//! export LATCHKEY_ENDPOINTS=127.0.0.1:41001,...   # the line `latchkey dev` prints
//! cargo run --example fenced_file_store   # from the workspace root; see client/README.md
//! ```
//! It exits 0 when every claim it prints held, and 1 with the reason
//! otherwise; it takes about a second. The store lives in a temporary
//! directory that is removed at the end.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use latchkey_client::fence::{FenceGate, FenceRejected, FencedWriteError};
use latchkey_client::{Client, FencingToken};
use parking_lot::Mutex;

mod common;

use common::{describe_token, endpoints_from_env, ensure, BoxError};

/// The latchkey lock that guards the store, and the gate's resource name.
const LOCK: &str = "file-store-demo";
const KEY: &str = "report";
/// Must be at least twice the cluster's election timeout (1 s with
/// `latchkey dev`).
const LEASE_TTL: Duration = Duration::from_secs(2);
/// How long the example waits for a lock before it gives up.
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fenced_file_store: FAILED: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let endpoints = endpoints_from_env()?;
    let dir = tempfile::tempdir()?;
    println!("store in {}", dir.path().display());
    let store = FileStore::open(dir.path(), LOCK)?;

    // Holder A: a client of its own, as a separate process would have.
    let client_a = Client::connect(endpoints.clone()).await?;
    let lease_a = client_a.grant_lease(LEASE_TTL).await?;
    let guard_a = lease_a.lock_with_timeout(LOCK, LOCK_TIMEOUT).await?;
    let token_a = guard_a.token();
    store.put(KEY, "written by A", token_a)?;
    println!("A holds {LOCK:?} with token {token_a} and writes: ok");

    // Holder B queues for the lock.
    let client_b = Client::connect(endpoints).await?;
    let lease_b = client_b.grant_lease(LEASE_TTL).await?;
    let waiting_b = tokio::spawn({
        let lease_b = lease_b.clone();
        async move { lease_b.lock_with_timeout(LOCK, LOCK_TIMEOUT).await }
    });

    // A's lease ends. Revoking it here stands in for an operator revoking
    // it, or for it expiring while A was paused (`fenced_counter` shows a
    // real pause). A's code below keeps its guard and does not look at its
    // lease, as a process that has just woken up would not have yet.
    lease_a.revoke().await?;
    let guard_b = waiting_b.await??;
    let token_b = guard_b.token();
    ensure(
        token_b > token_a,
        format!("B's token {token_b} is not above A's {token_a}"),
    )?;
    store.put(KEY, "written by B", token_b)?;
    println!("A's lease ended; B holds {LOCK:?} with token {token_b} and writes: ok");

    expect_refused(&store, "A's late write", token_a)?;
    ensure_value(&store, "written by B")?;

    drop(store);
    let store = FileStore::open(dir.path(), LOCK)?;
    println!(
        "store reopened from {}; highest token restored: {}",
        store.path.display(),
        describe_token(store.gate.highest(LOCK))
    );
    ensure_value(&store, "written by B")?;
    expect_refused(&store, "A's write after the restart", token_a)?;
    store.put(KEY, "written by B after the restart", token_b)?;
    println!("B writes again with token {token_b}: ok");
    // What restoring is for: a gate that had forgotten would let A in.
    let forgetful = FenceGate::new();
    ensure(
        forgetful.check_and_advance(LOCK, token_a).is_ok(),
        "a fresh gate refused A",
    )?;
    println!("(for contrast: a gate that was not restored would have admitted token {token_a})");

    guard_b.release().await?;
    lease_b.revoke().await?;
    drop(guard_a);
    println!("all claims held");
    Ok(())
}

/// Checks that a write with `token` is refused as stale.
fn expect_refused(store: &FileStore, what: &str, token: FencingToken) -> Result<(), BoxError> {
    match store.put(KEY, "late write by A", token) {
        Err(PutError::Rejected(rejected @ FenceRejected::Stale { .. })) => {
            println!("{what} with token {token} refused: {rejected}");
            Ok(())
        }
        Ok(()) => Err(format!("{what} with token {token} was accepted").into()),
        Err(other) => Err(format!("{what}: expected a stale-token refusal, got: {other}").into()),
    }
}

fn ensure_value(store: &FileStore, expected: &str) -> Result<(), BoxError> {
    let value = store.get(KEY);
    println!("{KEY} = {value:?}");
    ensure(
        value.as_deref() == Some(expected),
        format!("{KEY} should be {expected:?}"),
    )
}

/// A key-value store in one file, fenced by one latchkey lock.
///
/// The file holds the highest token admitted and every entry; it is only
/// ever replaced whole (write a temporary file, sync, rename). Invariant:
/// the token in the file is the gate's highest token for the lock.
struct FileStore {
    path: PathBuf,
    /// The lock whose tokens fence the store (the gate's resource).
    lock: String,
    gate: FenceGate,
    entries: Mutex<BTreeMap<String, String>>,
}

/// Why a write to a [`FileStore`] failed.
#[derive(Debug, thiserror::Error)]
enum PutError {
    #[error(transparent)]
    Rejected(FenceRejected),
    #[error("writing the store failed: {0}")]
    Io(#[from] io::Error),
    #[error("keys and values must not contain tabs or newlines")]
    Unstorable,
}

/// First line of the data file.
const FILE_HEADER: &str = "latchkey-fenced-file-store v1";
const DATA_FILE: &str = "store.txt";

impl FileStore {
    /// Opens the store in `dir` (empty if there is no data file yet) and
    /// restores the gate from the token saved with the data.
    fn open(dir: &Path, lock: &str) -> io::Result<FileStore> {
        let path = dir.join(DATA_FILE);
        let (token, entries) = match fs::read_to_string(&path) {
            Ok(text) => parse_store(&text, lock)?,
            Err(error) if error.kind() == io::ErrorKind::NotFound => (None, BTreeMap::new()),
            Err(error) => return Err(error),
        };
        let gate = FenceGate::with_max_resources(1);
        if let Some(token) = token {
            // Cannot fail: the gate is empty and may track one resource.
            gate.restore(lock, token).map_err(io::Error::other)?;
        }
        Ok(FileStore {
            path,
            lock: lock.to_string(),
            gate,
            entries: Mutex::new(entries),
        })
    }

    fn get(&self, key: &str) -> Option<String> {
        self.entries.lock().get(key).cloned()
    }

    /// Writes `key = value` if `token` is not lower than the highest token
    /// admitted so far. The check, the file write and the gate's advance
    /// happen under the gate, as one step.
    fn put(&self, key: &str, value: &str, token: FencingToken) -> Result<(), PutError> {
        if [key, value].iter().any(|s| s.contains(['\t', '\n'])) {
            return Err(PutError::Unstorable);
        }
        let written = self.gate.write_fenced(&self.lock, token, || {
            let mut entries = self.entries.lock();
            let mut next = entries.clone();
            next.insert(key.to_string(), value.to_string());
            // The gate admitted `token`, so it is the new highest.
            replace_file(&self.path, &render_store(&self.lock, token, &next))?;
            *entries = next;
            Ok::<(), io::Error>(())
        });
        match written {
            Ok(()) => Ok(()),
            Err(FencedWriteError::Rejected(rejected)) => Err(PutError::Rejected(rejected)),
            Err(FencedWriteError::Write(error)) => Err(PutError::Io(error)),
        }
    }
}

fn render_store(lock: &str, token: FencingToken, entries: &BTreeMap<String, String>) -> String {
    let mut text = format!("{FILE_HEADER}\nfence\t{lock}\t{token}\n");
    for (key, value) in entries {
        text.push_str(&format!("entry\t{key}\t{value}\n"));
    }
    text
}

/// Reads a data file written by [`render_store`] for `lock`.
fn parse_store(
    text: &str,
    lock: &str,
) -> io::Result<(Option<FencingToken>, BTreeMap<String, String>)> {
    let corrupt = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut lines = text.lines();
    if lines.next() != Some(FILE_HEADER) {
        return Err(corrupt(format!(
            "not a store file: no {FILE_HEADER:?} line"
        )));
    }
    let mut token = None;
    let mut entries = BTreeMap::new();
    for line in lines {
        match line.split('\t').collect::<Vec<_>>().as_slice() {
            ["fence", name, saved] if *name == lock => {
                let saved = saved
                    .parse()
                    .map_err(|_| corrupt(format!("bad token in {line:?}")))?;
                token = Some(FencingToken(saved));
            }
            ["fence", name, _] => {
                return Err(corrupt(format!("fenced by lock {name:?}, not {lock:?}")));
            }
            ["entry", key, value] => {
                entries.insert(key.to_string(), value.to_string());
            }
            _ => return Err(corrupt(format!("unreadable line {line:?}"))),
        }
    }
    if token.is_none() && !entries.is_empty() {
        return Err(corrupt("entries without a fencing token".into()));
    }
    Ok((token, entries))
}

/// Replaces `path` with `contents` atomically: a temporary file in the same
/// directory, synced, then renamed over it, then the directory synced.
fn replace_file(path: &Path, contents: &str) -> io::Result<()> {
    let temporary = path.with_extension("tmp");
    let mut file = File::create(&temporary)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}
