//! The operation record shared by the harness and the checkers.
//!
//! A history is a file of JSON lines, one [`Op`] per line, in the order the
//! events happened (`index` counts up from 0, `time` never goes down). The
//! field names are Jepsen's, so a history reads like a Jepsen one and the
//! EDN exporter is a direct mapping:
//!
//! ```json
//! {"index":0,"time":1200,"process":3,"type":"invoke","f":"acquire","key":"job","value":null}
//! {"index":1,"time":9300,"process":3,"type":"ok","f":"acquire","key":"job","value":{"token":17,"lease":5}}
//! {"index":2,"time":9500,"process":"nemesis","type":"info","f":"partition","value":"isolate n2"}
//! ```
//!
//! # Types
//! Every client operation is an `invoke` followed, in the same process, by
//! exactly one completion:
//! - `ok`: it happened, and `value` says what it returned;
//! - `fail`: it definitely did not happen (the server refused it before
//!   applying anything: a stale token, a held lock with `--no-wait`);
//! - `info`: unknown — a timeout or a broken connection. It may have taken
//!   effect at any time after its invoke, or never. A process whose op ended
//!   `info` is retired, and its work continues under a new process number,
//!   as in Jepsen.
//!
//! A process has at most one operation outstanding. An invoke with no
//! completion by the end of the history counts as `info`.
//!
//! Nemesis events use process `"nemesis"` and type `info`: an `invoke` when
//! the fault starts being applied and an `info` completion once it is in
//! place (`f` is the fault, e.g. `partition`, `kill`, `pause`, `heal`).
//!
//! # Vocabulary (`f`, `key`, `value`)
//! Registers (workload `register`, and the fenced store of `lock-fenced`);
//! `key` is the register's key, values are integers:
//! - `read`: invoke `null`; ok `{"value": V}` with `V` an integer or `null`
//!   for a key that does not exist.
//! - `write`: `{"value": V}`, plus `"token": T, "lock": NAME` when fenced.
//!   A fenced write that the store refused as stale completes `fail`.
//! - `cas`: `{"from": A, "to": B}` (compare on the value); `fail` when the
//!   comparison did not hold.
//!
//! Locks (workload `lock-fenced`); `key` is the lock name:
//! - `acquire`: invoke `{"lease": L}`; ok `{"token": T, "lease": L}`;
//!   fail when not granted (held, or the lease ended while waiting).
//! - `release`: `{"token": T, "lease": L}`; fail when the grant had
//!   already ended (stale token).
//! - `hold-lost`: info `{"token": T, "lease": L}`, recorded by a holder
//!   the moment its client reports the lease lost; when its local deadline
//!   is what passed, `"deadline"` is the history time (ns) at which it fell.
//!
//! Leases (workload `lease`); `key` is absent:
//! - `grant`: invoke `{"ttl_ms": N}`; ok `{"lease": L, "ttl_ms": N}`.
//! - `keepalive`: `{"lease": L}`; ok `{"lease": L, "remaining_ms": N}`;
//!   fail when the server no longer has the lease.
//! - `revoke`: `{"lease": L}`.
//!
//! Elections (workload `election`); `key` is the election name:
//! - `campaign`: invoke `{"lease": L, "value": S}`; ok
//!   `{"token": T, "lease": L, "value": S'}`, where S' is the value the
//!   server answered with: S, or, when the lease already led (an earlier
//!   campaign of it that ended `info` won after all), the value it led with.
//! - `proclaim`: `{"token": T, "value": S}`.
//! - `resign`: `{"token": T, "lease": L}`.
//! - `observe`: info `{"token": T, "lease": L, "value": S}` or `null` (no
//!   leader), one per change an observer saw, in the order it saw them.
//! - `hold-lost`: info `{"token": T, "lease": L, "namespace": "election"}`,
//!   recorded by a leader the moment its client reports the leadership's
//!   lease lost; as for locks, `"deadline"` is added when the local
//!   deadline is what passed.
//!
//! Cluster (harness): `status`, process `"nemesis"`, info
//! `{"node": N, "role": "leader", "term": T}` from polling the nodes.
//!
//! Completions may add `"term"` and `"raft_index"` (the server's Raft term
//! and the log index of the entry that applied the op) when the server
//! reported them, and `"error"` (one line) on `fail` and `info`.

use std::fmt;
use std::io::{self, BufRead, Write};

use serde::{Deserialize, Serialize};

/// Who performed an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Process {
    /// A client worker, numbered from 0.
    Client(u64),
    /// The fault injector and cluster observer.
    Nemesis,
}

impl fmt::Display for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Process::Client(n) => write!(f, "{n}"),
            Process::Nemesis => f.write_str("nemesis"),
        }
    }
}

impl Serialize for Process {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Process::Client(n) => serializer.serialize_u64(*n),
            Process::Nemesis => serializer.serialize_str("nemesis"),
        }
    }
}

impl<'de> Deserialize<'de> for Process {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(n) => Ok(Process::Client(n)),
            Raw::Text(text) if text == "nemesis" => Ok(Process::Nemesis),
            Raw::Text(text) => text.parse().map(Process::Client).map_err(|_| {
                serde::de::Error::custom(format!(
                    "process {text:?} is neither a number nor \"nemesis\""
                ))
            }),
        }
    }
}

/// The kind of event; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpType {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// One event of a history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// Position in the history, from 0.
    pub index: u64,
    /// Nanoseconds on the recorder's monotonic clock since the run started.
    pub time: u64,
    pub process: Process,
    #[serde(rename = "type")]
    pub kind: OpType,
    /// The operation (`read`, `acquire`, `partition`, …).
    pub f: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default)]
    pub value: serde_json::Value,
    /// The server's Raft term, when it reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,
    /// The log index of the entry that applied the op, when reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raft_index: Option<u64>,
    /// Why an op failed or is unknown, in one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Reads a JSON-lines history. Blank lines are skipped; a malformed line is
/// an error naming its line number.
pub fn read_jsonl(reader: impl BufRead) -> io::Result<Vec<Op>> {
    let mut ops = Vec::new();
    for (number, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let op: Op = serde_json::from_str(&line).map_err(|err| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("line {}: {err}", number + 1),
            )
        })?;
        ops.push(op);
    }
    Ok(ops)
}

/// Writes one op as a JSON line.
pub fn write_jsonl(mut writer: impl Write, op: &Op) -> io::Result<()> {
    serde_json::to_writer(&mut writer, op)?;
    writer.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip_through_json_lines_with_jepsen_field_names() {
        let op = Op {
            index: 1,
            time: 9300,
            process: Process::Client(3),
            kind: OpType::Ok,
            f: "acquire".into(),
            key: Some("job".into()),
            value: serde_json::json!({"token": 17, "lease": 5}),
            term: Some(2),
            raft_index: None,
            error: None,
        };
        let mut buffer = Vec::new();
        write_jsonl(&mut buffer, &op).expect("write");
        let text = String::from_utf8(buffer.clone()).expect("utf-8");
        assert!(text.contains("\"type\":\"ok\""), "{text}");
        assert!(text.contains("\"process\":3"), "{text}");
        assert_eq!(read_jsonl(&buffer[..]).expect("read"), vec![op]);
    }

    #[test]
    fn nemesis_process_is_a_string() {
        let line =
            r#"{"index":0,"time":0,"process":"nemesis","type":"info","f":"kill","value":"n1"}"#;
        let ops = read_jsonl(line.as_bytes()).expect("read");
        assert_eq!(ops[0].process, Process::Nemesis);
    }

    #[test]
    fn a_malformed_line_is_an_error_that_names_it() {
        let text =
            "{\"index\":0,\"time\":0,\"process\":1,\"type\":\"invoke\",\"f\":\"read\"}\nnot json\n";
        let err = read_jsonl(text.as_bytes()).expect_err("line 2 is bad");
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
