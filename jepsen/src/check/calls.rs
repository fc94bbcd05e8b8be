//! Pairs each invoke with its completion, and reads op values.
//!
//! A history interleaves processes; checkers want whole operations. A
//! completion (`ok`, `fail`, `info`) closes the outstanding invoke of its
//! process when `f` matches. Three `f`s are single `info` events rather than
//! completions — `hold-lost`, `observe` and `status` — and so is any other
//! `info` that closes nothing (a nemesis note). An invoke left open at the
//! end counts as `info`, as the history format says.
//!
//! Positions in the input slice are the event order the checkers use: the
//! recorder numbers ops in time order, and the readers for outside formats
//! keep file order.
//!
//! Oddities of client processes (a completion with nothing to close, a
//! second invoke while one is open) are collected as problems; the checkers
//! still run on what could be paired, and the overall verdict cannot be
//! `valid`. The nemesis's steps may interleave (a fault and a timer-driven
//! resume), and no checker needs them paired, so its oddities are not
//! problems: what closes nothing is kept as an event.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::history::{Op, OpType, Process};

/// `f`s that are single `info` events, never completions.
pub const EVENT_FS: &[&str] = &["hold-lost", "observe", "status"];

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It happened and returned the completion's value.
    Ok,
    /// It definitely did not happen (for a compare-and-set: its
    /// comparison did not hold).
    Fail,
    /// It may have happened at any time after its invoke, or never.
    Unknown,
}

/// One operation: an invoke and, if there was one, its completion.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    pub invoke: &'a Op,
    pub completion: Option<&'a Op>,
    /// Position of the invoke in the history.
    pub invoke_at: u64,
    /// Position of the completion in the history.
    pub complete_at: Option<u64>,
}

impl<'a> Call<'a> {
    pub fn f(&self) -> &'a str {
        &self.invoke.f
    }

    pub fn key(&self) -> Option<&'a str> {
        self.invoke.key.as_deref()
    }

    pub fn outcome(&self) -> Outcome {
        match self.completion.map(|op| op.kind) {
            Some(OpType::Ok) => Outcome::Ok,
            Some(OpType::Fail) => Outcome::Fail,
            _ => Outcome::Unknown,
        }
    }

    /// Position of an `ok` or `fail` completion; `None` when unknown.
    pub fn known_return(&self) -> Option<u64> {
        match self.outcome() {
            Outcome::Unknown => None,
            Outcome::Ok | Outcome::Fail => self.complete_at,
        }
    }

    /// Time (ns) of the completion, if any.
    pub fn complete_time(&self) -> Option<u64> {
        self.completion.map(|op| op.time)
    }

    /// Time (ns) of the invoke.
    pub fn invoke_time(&self) -> u64 {
        self.invoke.time
    }
}

/// A single `info` event: `hold-lost`, `observe`, `status`, nemesis notes.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub op: &'a Op,
    pub at: u64,
}

/// A history cut into operations and events.
#[derive(Debug, Default)]
pub struct Paired<'a> {
    /// In invoke order.
    pub calls: Vec<Call<'a>>,
    pub events: Vec<Event<'a>>,
    /// One line each: what could not be paired.
    pub problems: Vec<String>,
    /// Time (ns) of the last op.
    pub end_time: u64,
}

/// Cuts `ops` into calls and events.
pub fn pair(ops: &[Op]) -> Paired<'_> {
    let mut paired = Paired::default();
    let mut open: HashMap<Process, usize> = HashMap::new();
    for (position, op) in ops.iter().enumerate() {
        let at = position as u64;
        paired.end_time = paired.end_time.max(op.time);
        if op.kind == OpType::Invoke {
            let previous = open.insert(op.process, paired.calls.len());
            if let Some(previous) = previous.filter(|_| op.process != Process::Nemesis) {
                let earlier = paired.calls[previous].invoke;
                paired.problems.push(format!(
                    "op {}: process {} invoked {} while op {} ({}) was still open",
                    op.index, op.process, op.f, earlier.index, earlier.f
                ));
            }
            paired.calls.push(Call {
                invoke: op,
                completion: None,
                invoke_at: at,
                complete_at: None,
            });
            continue;
        }
        let closes = open
            .get(&op.process)
            .copied()
            .filter(|&call| closes_call(paired.calls[call].invoke, op));
        match closes {
            Some(call) => {
                open.remove(&op.process);
                paired.calls[call].completion = Some(op);
                paired.calls[call].complete_at = Some(at);
            }
            None if op.kind == OpType::Info || op.process == Process::Nemesis => {
                paired.events.push(Event { op, at })
            }
            None => paired.problems.push(format!(
                "op {}: {:?} completion of {} by process {} closes no invoke",
                op.index, op.kind, op.f, op.process
            )),
        }
    }
    paired
}

fn closes_call(invoke: &Op, completion: &Op) -> bool {
    invoke.f == completion.f
        && !(completion.kind == OpType::Info && EVENT_FS.contains(&completion.f.as_str()))
}

/// Indices of the calls whose `f` is one of `fs`, grouped by key (`None`:
/// the call has no key, as in a Jepsen etcd log's single register).
pub fn by_key(calls: &[Call<'_>], fs: &[&str]) -> BTreeMap<Option<String>, Vec<usize>> {
    let mut keys: BTreeMap<Option<String>, Vec<usize>> = BTreeMap::new();
    for (i, call) in calls.iter().enumerate() {
        if fs.contains(&call.f()) {
            keys.entry(call.key().map(str::to_string))
                .or_default()
                .push(i);
        }
    }
    keys
}

/// Ops a checker could not interpret (a write without a value, a token that
/// is not a number). A checker that skipped some cannot say `valid`.
#[derive(Debug, Default, Clone)]
pub struct Unreadable {
    pub count: usize,
    /// The first one, as "op N: why".
    pub first: Option<String>,
}

impl Unreadable {
    pub fn note(&mut self, op: &Op, why: &str) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(format!("op {}: {why}", op.index));
        }
    }
}

/// Small ids for JSON values, so that model states stay `Copy` and cheap to
/// hash. Equal values (by their JSON text) get equal ids.
#[derive(Debug, Default)]
pub struct Interner {
    ids: HashMap<String, u32>,
}

impl Interner {
    pub fn id(&mut self, value: &Value) -> u32 {
        let next = self.ids.len() as u32;
        *self.ids.entry(value.to_string()).or_insert(next)
    }
}

/// The ops of `calls` and `events` as JSON, in history order: a witness.
pub fn in_history_order(calls: &[&Call<'_>], events: &[&Event<'_>]) -> Vec<Value> {
    let mut ops: Vec<(u64, &Op)> = Vec::new();
    for call in calls {
        ops.push((call.invoke_at, call.invoke));
        ops.extend(call.complete_at.zip(call.completion));
    }
    ops.extend(events.iter().map(|event| (event.at, event.op)));
    ops.sort_by_key(|(at, _)| *at);
    ops.dedup_by_key(|(at, _)| *at);
    ops.into_iter().map(|(_, op)| op_json(op)).collect()
}

/// An op as JSON (serialising an `Op` cannot fail: every field is plain
/// data, and map keys are strings).
pub fn op_json(op: &Op) -> Value {
    serde_json::to_value(op).unwrap_or(Value::Null)
}

/// The fencing token a `write` carried: `Ok(None)` for an unfenced write.
///
/// The harness records a write's arguments in its invoke and echoes them
/// in its completion, so for an acknowledged write the completion's
/// `token` is the token the store acknowledged. The two agree in every
/// history the harness records (`fenced-writes` reports a completion that
/// disagrees); where they do not, the lower one is returned, because every
/// rule about a fenced write's token is about it being too low.
pub fn write_token(call: &Call<'_>) -> Result<Option<u64>, &'static str> {
    let completion = call.completion.map(|op| &op.value);
    let mut token = None;
    for value in std::iter::once(&call.invoke.value).chain(completion) {
        if let Some(carried) = field(value, "token") {
            let carried = carried.as_u64().ok_or("token is not an unsigned integer")?;
            token = Some(token.map_or(carried, |lower: u64| lower.min(carried)));
        }
    }
    // A completion alone cannot make a write fenced: its invoke says
    // what was sent.
    Ok(token.filter(|_| field(&call.invoke.value, "token").is_some()))
}

/// `value[name]` when `value` is an object.
pub fn field<'v>(value: &'v Value, name: &str) -> Option<&'v Value> {
    value.as_object().and_then(|object| object.get(name))
}

/// `value[name]` as an unsigned integer.
pub fn field_u64(value: &Value, name: &str) -> Option<u64> {
    field(value, name).and_then(Value::as_u64)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn op(index: u64, process: Process, kind: OpType, f: &str, value: Value) -> Op {
        Op {
            index,
            time: index * 10,
            process,
            kind,
            f: f.into(),
            key: None,
            value,
            term: None,
            raft_index: None,
            error: None,
        }
    }

    #[test]
    fn completions_close_their_process_invoke_and_events_stand_alone() {
        let ops = vec![
            op(
                0,
                Process::Client(1),
                OpType::Invoke,
                "write",
                json!({"value": 1}),
            ),
            op(
                1,
                Process::Client(1),
                OpType::Info,
                "hold-lost",
                json!({"token": 3}),
            ),
            op(
                2,
                Process::Client(1),
                OpType::Ok,
                "write",
                json!({"value": 1}),
            ),
            op(3, Process::Client(2), OpType::Invoke, "read", Value::Null),
            op(
                4,
                Process::Nemesis,
                OpType::Info,
                "status",
                json!({"term": 2}),
            ),
        ];
        let paired = pair(&ops);
        assert_eq!(paired.calls.len(), 2);
        assert_eq!(paired.calls[0].outcome(), Outcome::Ok);
        assert_eq!(paired.calls[0].complete_at, Some(2));
        assert_eq!(
            paired.calls[1].outcome(),
            Outcome::Unknown,
            "never completed"
        );
        let events: Vec<&str> = paired.events.iter().map(|e| e.op.f.as_str()).collect();
        assert_eq!(events, ["hold-lost", "status"]);
        assert!(paired.problems.is_empty(), "{:?}", paired.problems);
        assert_eq!(paired.end_time, 40);
    }

    #[test]
    fn interleaved_nemesis_steps_are_not_problems() {
        let ops = vec![
            op(0, Process::Nemesis, OpType::Invoke, "pause", json!({})),
            op(1, Process::Nemesis, OpType::Invoke, "resume", json!({})),
            op(2, Process::Nemesis, OpType::Info, "resume", json!({})),
            op(3, Process::Nemesis, OpType::Info, "pause", json!({})),
        ];
        let paired = pair(&ops);
        assert!(paired.problems.is_empty(), "{:?}", paired.problems);
        assert_eq!(paired.calls.len(), 2);
        assert_eq!(paired.events.len(), 1, "the pause info closes nothing");
    }

    #[test]
    fn a_writes_token_is_the_lower_of_what_its_invoke_and_acknowledgement_carry() {
        let write = |sent: Value, acknowledged: Value| {
            vec![
                op(0, Process::Client(1), OpType::Invoke, "write", sent),
                op(1, Process::Client(1), OpType::Ok, "write", acknowledged),
            ]
        };
        let token = |ops: &[Op]| write_token(&pair(ops).calls[0]);
        let fenced = json!({"value": 1, "token": 9});
        assert_eq!(token(&write(fenced.clone(), fenced.clone())), Ok(Some(9)));
        let lowered = json!({"value": 1, "token": 4});
        assert_eq!(token(&write(fenced.clone(), lowered.clone())), Ok(Some(4)));
        assert_eq!(token(&write(lowered, fenced.clone())), Ok(Some(4)));
        assert_eq!(
            token(&write(json!({"value": 1}), fenced)),
            Ok(None),
            "an acknowledgement alone does not make a write fenced"
        );
        let negative = json!({"value": 1, "token": -1});
        assert!(token(&write(json!({"value": 1, "token": 9}), negative)).is_err());
    }

    #[test]
    fn a_completion_without_an_invoke_is_a_problem() {
        let ops = vec![op(
            0,
            Process::Client(1),
            OpType::Ok,
            "read",
            json!({"value": 1}),
        )];
        let paired = pair(&ops);
        assert_eq!(paired.problems.len(), 1, "{:?}", paired.problems);
        assert!(paired.problems[0].contains("closes no invoke"));
    }
}
