//! The history recorder: one place that stamps, numbers and writes ops.
//!
//! Every event of a run — a worker's invoke or completion, a nemesis step,
//! a node status change — goes through [`Recorder::record`], which takes
//! the time on the run's monotonic clock, gives the op the next index, and
//! appends it to `history.jsonl` (flushed per line, so a run that dies
//! still leaves its history behind). Because stamping and numbering happen
//! under one lock, `index` order is `time` order.
//!
//! Ops are recorded *before* they are sent (invoke) and *after* the answer
//! arrived (completion), so the recorded window of an op always contains
//! its real one; see `worker` for how a child process keeps to that.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::history::{write_jsonl, Op, OpType, Process};

/// What the caller supplies; index and time are filled in by the recorder.
#[derive(Debug, Clone)]
pub struct Event {
    pub process: Process,
    pub kind: OpType,
    pub f: String,
    pub key: Option<String>,
    pub value: serde_json::Value,
    pub term: Option<u64>,
    pub raft_index: Option<u64>,
    pub error: Option<String>,
}

impl Event {
    /// An event with no key, term, index or error.
    pub fn new(process: Process, kind: OpType, f: &str, value: serde_json::Value) -> Event {
        Event {
            process,
            kind,
            f: f.to_string(),
            key: None,
            value,
            term: None,
            raft_index: None,
            error: None,
        }
    }
}

struct State {
    ops: Vec<Op>,
    file: BufWriter<File>,
    /// The first write error, reported once by [`Recorder::finish`].
    write_error: Option<std::io::Error>,
}

/// Shared by every task of a run; cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    start: Instant,
    /// `start` as CLOCK_MONOTONIC nanoseconds, which every process on this
    /// host shares: workers convert their own instants with it.
    start_monotonic_ns: u64,
    state: Arc<Mutex<State>>,
}

/// CLOCK_MONOTONIC now, in nanoseconds (what `std::time::Instant` reads on
/// Linux, and the same in every process of the host).
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

impl Recorder {
    /// Creates (truncates) `path` and starts the run's clock.
    pub fn create(path: &Path) -> std::io::Result<Recorder> {
        let file = BufWriter::new(File::create(path)?);
        Ok(Recorder {
            start: Instant::now(),
            start_monotonic_ns: monotonic_ns(),
            state: Arc::new(Mutex::new(State {
                ops: Vec::new(),
                file,
                write_error: None,
            })),
        })
    }

    /// Nanoseconds since the run started.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The run's start as CLOCK_MONOTONIC nanoseconds.
    pub fn start_monotonic_ns(&self) -> u64 {
        self.start_monotonic_ns
    }

    /// Stamps, numbers, stores and writes one event; returns the op.
    pub fn record(&self, event: Event) -> Op {
        // A poisoned lock means a recording thread panicked mid-write; the
        // ops stored so far are still whole, so keep going.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let op = Op {
            index: state.ops.len() as u64,
            time: self.now_ns(),
            process: event.process,
            kind: event.kind,
            f: event.f,
            key: event.key,
            value: event.value,
            term: event.term,
            raft_index: event.raft_index,
            error: event.error,
        };
        let written = write_jsonl(&mut state.file, &op).and_then(|()| state.file.flush());
        if let Err(error) = written {
            state.write_error.get_or_insert(error);
        }
        state.ops.push(op.clone());
        op
    }

    /// A copy of every op recorded so far.
    pub fn ops(&self) -> Vec<Op> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.ops.clone()
    }

    /// Flushes the file and reports the first write error, if any.
    pub fn finish(&self) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(error) = state.write_error.take() {
            return Err(error);
        }
        state.file.flush()?;
        state.file.get_ref().sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_ops_are_numbered_in_time_order_and_written_per_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("history.jsonl");
        let recorder = Recorder::create(&path).expect("create");
        let first = recorder.record(Event::new(
            Process::Client(0),
            OpType::Invoke,
            "read",
            serde_json::Value::Null,
        ));
        let second = recorder.record(Event::new(
            Process::Nemesis,
            OpType::Info,
            "heal",
            serde_json::json!("all links"),
        ));
        assert_eq!((first.index, second.index), (0, 1));
        assert!(first.time <= second.time);
        // Written before finish: a run that dies leaves its history.
        let text = std::fs::read_to_string(&path).expect("read");
        let ops = crate::history::read_jsonl(text.as_bytes()).expect("parse");
        assert_eq!(ops, vec![first, second]);
        recorder.finish().expect("finish");
    }
}
