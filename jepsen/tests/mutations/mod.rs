//! Edits of a recorded history, for the mutation suite
//! (`check_mutations.rs`).
//!
//! A [`History`] is a recorded run's ops. Its edits are the small ones a
//! broken server or client would leave in a history: change a field of
//! one op's value, turn a completion's type, move a completion earlier,
//! add one op. After each edit `index` is renumbered from 0 and `time`
//! stays non-decreasing (a moved or added op takes the time of the op
//! before it), so the result is a well-formed history that differs from
//! the recorded one in exactly that edit.
//!
//! Finding *where* to plant a violation is the suite's business; this
//! module only lists operations ([`Site`]s: positions, so that edits need
//! no borrows) and performs edits.
//!
//! # Not done yet
//! - Only JSON-lines histories are read (the recorded ones are).

use std::path::PathBuf;

use latchkey_jepsen::check::calls::{pair, Outcome};
use latchkey_jepsen::check::formats::{self, Format};
use latchkey_jepsen::history::{Op, OpType, Process};
use serde_json::Value;

/// One operation of the history, by the positions of its lines.
#[derive(Debug, Clone, Copy)]
pub struct Site {
    pub invoke: usize,
    pub completion: Option<usize>,
    pub outcome: Outcome,
}

impl Site {
    /// The completion's position; the suite only asks for completed ops.
    pub fn completed(&self) -> usize {
        self.completion
            .unwrap_or_else(|| panic!("op at line {} has no completion", self.invoke))
    }
}

/// A history being edited.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    pub ops: Vec<Op>,
}

impl History {
    /// Reads `jepsen/testdata/<file>`.
    pub fn load(file: &str) -> History {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(file);
        let ops = formats::read_history(&path, Format::Jsonl)
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        History { ops }
    }

    /// Operations whose `f` is `f`, in invoke order.
    pub fn calls(&self, f: &str) -> Vec<Site> {
        let paired = pair(&self.ops);
        paired
            .calls
            .iter()
            .filter(|call| call.f() == f)
            .map(|call| Site {
                invoke: position(call.invoke_at),
                completion: call.complete_at.map(position),
                outcome: call.outcome(),
            })
            .collect()
    }

    /// Operations whose `f` is `f` that completed with `outcome`.
    pub fn calls_ending(&self, f: &str, outcome: Outcome) -> Vec<Site> {
        let mut calls = self.calls(f);
        calls.retain(|call| call.outcome == outcome && call.completion.is_some());
        calls
    }

    /// Positions of the single `info` events whose `f` is `f`.
    pub fn events(&self, f: &str) -> Vec<usize> {
        let paired = pair(&self.ops);
        let events = paired.events.iter().filter(|event| event.op.f == f);
        events.map(|event| position(event.at)).collect()
    }

    /// `value[name]` of the op at `at`; panics (naming the op) without it.
    pub fn field(&self, at: usize, name: &str) -> &Value {
        let op = &self.ops[at];
        op.value
            .get(name)
            .unwrap_or_else(|| panic!("op {} ({}) has no {name:?}", op.index, op.f))
    }

    /// `value[name]` of the op at `at` as an unsigned integer.
    pub fn u64(&self, at: usize, name: &str) -> u64 {
        let value = self.field(at, name);
        value
            .as_u64()
            .unwrap_or_else(|| panic!("op at line {at}: {name} = {value} is not unsigned"))
    }

    /// Sets `value[name]` of the op at `at`.
    pub fn set(&mut self, at: usize, name: &str, value: Value) {
        let op = &mut self.ops[at];
        let index = op.index;
        let object = op
            .value
            .as_object_mut()
            .unwrap_or_else(|| panic!("op {index}'s value is not an object"));
        object.insert(name.to_string(), value);
    }

    /// Makes the completion at `at` an `ok` (it was `fail`), error gone.
    pub fn acknowledge(&mut self, at: usize) {
        let op = &mut self.ops[at];
        assert_ne!(op.kind, OpType::Invoke, "op {} is an invoke", op.index);
        op.kind = OpType::Ok;
        op.error = None;
    }

    /// Moves the op at `from` to position `to` (`to < from`), taking the
    /// time of the op that now precedes it.
    pub fn move_earlier(&mut self, from: usize, to: usize) {
        assert!(0 < to && to < from, "move {from} -> {to} is not earlier");
        let mut op = self.ops.remove(from);
        op.time = self.ops[to - 1].time;
        self.ops.insert(to, op);
        self.renumber();
    }

    /// Inserts `ops` at position `at`, each taking the time of the op
    /// before it.
    pub fn insert(&mut self, at: usize, ops: Vec<Op>) {
        let time = self.ops[at - 1].time;
        for (offset, mut op) in ops.into_iter().enumerate() {
            op.time = time;
            self.ops.insert(at + offset, op);
        }
        self.renumber();
    }

    /// A client process number no op of the history uses.
    pub fn fresh_process(&self) -> Process {
        let used = self.ops.iter().filter_map(|op| match op.process {
            Process::Client(n) => Some(n),
            Process::Nemesis => None,
        });
        Process::Client(used.max().map_or(0, |max| max + 1))
    }

    fn renumber(&mut self) {
        for (index, op) in self.ops.iter_mut().enumerate() {
            op.index = index as u64;
        }
    }
}

/// A history position as an index into `ops` (positions come from a
/// `Vec` of ops, so they fit).
fn position(at: u64) -> usize {
    usize::try_from(at).expect("a position in a Vec fits usize")
}

/// A client op for [`History::insert`] (index and time are set there).
pub fn client_op(process: Process, kind: OpType, f: &str, key: Option<&str>, value: Value) -> Op {
    Op {
        index: 0,
        time: 0,
        process,
        kind,
        f: f.to_string(),
        key: key.map(str::to_string),
        value,
        term: None,
        raft_index: None,
        error: None,
    }
}
