//! History files: latchkey's JSON lines, Jepsen logs and EDN op maps.
//!
//! Outside histories are mapped into [`Op`]s with latchkey's vocabulary
//! (`history` module docs), so the same checkers read all of them:
//! - `read`/`get` results become `{"value": V}`, `write`/`put`/`append`
//!   arguments `{"value": V}`, and Jepsen's cas `[A B]` becomes
//!   `{"from": A, "to": B}`;
//! - a keyword in place of a `fail`/`info` value (Jepsen's `:timed-out`)
//!   becomes the op's `error`, and the value `null`;
//! - `index` and `time` are the op's position in the file unless the file
//!   gives them (so `time` is then an order, not nanoseconds).

pub mod edn;
pub mod jepsen_log;

use std::path::Path;

use serde_json::{json, Value};

use crate::history::{read_jsonl, Op, OpType};
use edn::Edn;

/// A history file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Guess from the first non-blank line.
    Auto,
    /// latchkey's JSON lines.
    Jsonl,
    /// A Jepsen log (`INFO  jepsen.util - 3 :invoke :write 4`).
    JepsenLog,
    /// EDN op maps, one per form, or one vector of them.
    Edn,
}

/// Reads the history at `path`; the error is one line.
pub fn read_history(path: &Path, format: Format) -> Result<Vec<Op>, String> {
    let text = std::fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))?;
    parse_history(&text, format).map_err(|err| format!("{}: {err}", path.display()))
}

/// Parses a history held in memory.
pub fn parse_history(text: &str, format: Format) -> Result<Vec<Op>, String> {
    let format = match format {
        Format::Auto => detect(text)?,
        format => format,
    };
    match format {
        Format::Auto | Format::Jsonl => read_jsonl(text.as_bytes()).map_err(|err| err.to_string()),
        Format::JepsenLog => jepsen_log::read(text),
        Format::Edn => edn::read(text),
    }
}

/// How many lines [`detect`] looks at for a Jepsen log's marker.
const LOG_SNIFF_LINES: usize = 100;

/// The format of `text`: a Jepsen log when one of its first lines has the
/// `jepsen.util -` marker (logs start with other output), otherwise by the
/// first non-blank line. An empty text is an empty JSON-lines history.
pub fn detect(text: &str) -> Result<Format, String> {
    let mut lines = text.lines().map(str::trim).filter(|line| !line.is_empty());
    let Some(line) = lines.next() else {
        return Ok(Format::Jsonl);
    };
    let after_brace = line.strip_prefix('{').map(str::trim_start);
    if std::iter::once(line)
        .chain(lines.take(LOG_SNIFF_LINES))
        .any(|line| line.contains(jepsen_log::MARKER))
    {
        Ok(Format::JepsenLog)
    } else if after_brace.is_some_and(|rest| rest.starts_with('"') || rest.starts_with('}')) {
        Ok(Format::Jsonl)
    } else if after_brace.is_some() || line.starts_with('[') || line.starts_with('(') {
        Ok(Format::Edn)
    } else {
        Err("cannot tell the format from the first line; pass --format".to_string())
    }
}

/// A Jepsen op value in latchkey's vocabulary, and the error it stands for
/// (see the module docs).
pub fn jepsen_value(f: &str, kind: OpType, value: &Edn) -> (Value, Option<String>) {
    if let (OpType::Fail | OpType::Info, Edn::Keyword(error)) = (kind, value) {
        return (Value::Null, Some(error.clone()));
    }
    let value = value.to_json();
    let shaped = match (f, kind, &value) {
        (_, _, Value::Object(_)) => value,
        ("read" | "get", OpType::Ok, _) => json!({ "value": value }),
        (_, _, Value::Null) => value,
        ("write" | "put" | "append", _, _) => json!({ "value": value }),
        ("cas", _, Value::Array(pair)) if pair.len() == 2 => {
            json!({ "from": pair[0], "to": pair[1] })
        }
        _ => value,
    };
    (shaped, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_told_apart_by_their_first_line() {
        let detect = |text: &str| detect(text).expect("detected");
        assert_eq!(
            detect("INFO  jepsen.util - 3\t:invoke\t:read\tnil\n"),
            Format::JepsenLog
        );
        assert_eq!(detect("\n{:process 0, :type :invoke}\n"), Format::Edn);
        assert_eq!(detect("[{:process 0}]"), Format::Edn);
        let log = "INFO  jepsen.core - starting\nINFO  jepsen.util - 0 :invoke :read nil\n";
        assert_eq!(detect(log), Format::JepsenLog);
        assert_eq!(detect("{\"index\":0}\n"), Format::Jsonl);
        assert_eq!(detect(""), Format::Jsonl);
        assert!(super::detect("hello").is_err());
    }

    #[test]
    fn a_timed_out_completion_becomes_an_error_with_no_value() {
        let (value, error) = jepsen_value("write", OpType::Info, &Edn::Keyword("timed-out".into()));
        assert_eq!(value, Value::Null);
        assert_eq!(error.as_deref(), Some("timed-out"));
    }

    #[test]
    fn jepsen_values_take_latchkey_shapes() {
        let cas = Edn::Sequence(vec![Edn::Integer(1), Edn::Integer(4)]);
        assert_eq!(
            jepsen_value("cas", OpType::Invoke, &cas).0,
            json!({"from": 1, "to": 4})
        );
        assert_eq!(
            jepsen_value("read", OpType::Ok, &Edn::Integer(3)).0,
            json!({"value": 3})
        );
        assert_eq!(
            jepsen_value("read", OpType::Invoke, &Edn::Nil).0,
            Value::Null
        );
        let text = Edn::String("x 0 1 y".into());
        assert_eq!(
            jepsen_value("append", OpType::Info, &text).0,
            json!({"value": "x 0 1 y"})
        );
    }
}
