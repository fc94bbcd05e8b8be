//! Jepsen's console log of a run, as in Porcupine's etcd test data:
//!
//! ```text
//! INFO  jepsen.util - 3  :invoke  :cas    [1 4]
//! INFO  jepsen.util - 3  :fail    :cas    [1 4]
//! INFO  jepsen.util - 0  :info    :write  :timed-out
//! ```
//!
//! Fields are separated by tabs or spaces. Lines without `jepsen.util -`,
//! or whose fields do not read as process, `:type`, `:f` and a value, are
//! other log output and are skipped.

use super::edn::{Edn, Reader};
use super::jepsen_value;
use crate::history::{Op, OpType, Process};

/// What marks an op line.
pub const MARKER: &str = "jepsen.util - ";

/// Reads the ops of a Jepsen log; never fails, as unknown lines are skipped.
pub fn read(text: &str) -> Result<Vec<Op>, String> {
    let mut ops = Vec::new();
    for line in text.lines() {
        if let Some(op) = parse_line(line, ops.len() as u64) {
            ops.push(op);
        }
    }
    Ok(ops)
}

fn parse_line(line: &str, position: u64) -> Option<Op> {
    let (_, rest) = line.split_once(MARKER)?;
    let mut fields = rest.trim_start().splitn(2, char::is_whitespace);
    let process = match fields.next()? {
        ":nemesis" => Process::Nemesis,
        number => Process::Client(number.parse().ok()?),
    };
    let mut fields = fields.next()?.trim_start().splitn(2, char::is_whitespace);
    let kind = match fields.next()? {
        ":invoke" => OpType::Invoke,
        ":ok" => OpType::Ok,
        ":fail" => OpType::Fail,
        ":info" => OpType::Info,
        _ => return None,
    };
    let mut fields = fields.next()?.trim_start().splitn(2, char::is_whitespace);
    let f = fields.next()?.strip_prefix(':')?.to_string();
    let value_text = fields.next().unwrap_or("").trim();
    let value = match Reader::new(value_text).next_form() {
        Ok(Some(value)) => value,
        Ok(None) => Edn::Nil,
        Err(_) => Edn::String(value_text.to_string()),
    };
    let (value, error) = jepsen_value(&f, kind, &value);
    Some(Op {
        index: position,
        time: position,
        process,
        kind,
        f,
        key: None,
        value,
        term: None,
        raft_index: None,
        error,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn log_lines_with_tabs_or_spaces_become_ops_and_other_lines_are_skipped() {
        let text = "INFO  jepsen.util - 3\t:invoke\t:cas\t[1 4]\n\
                    INFO  jepsen.core - Worker 3 starting\n\
                    INFO  jepsen.util - 3   :fail   :cas    [1 4]\n\
                    INFO  jepsen.util - 0\t:info\t:write\t:timed-out\n";
        let ops = read(text).expect("read");
        assert_eq!(ops.len(), 3);
        assert_eq!(ops[0].value, json!({"from": 1, "to": 4}));
        assert_eq!(ops[1].kind, OpType::Fail);
        assert_eq!(ops[1].index, 1);
        assert_eq!(ops[2].error.as_deref(), Some("timed-out"));
        assert_eq!(ops[2].process, Process::Client(0));
    }
}
