//! The verdict of a rule-based checker: a list of violations, each with the
//! handful of ops that shows it.

use serde_json::{json, Value};

use super::calls::Unreadable;
use super::{CheckerResult, Validity};

/// One broken rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// One line: what is wrong, naming ops by index.
    pub message: String,
    /// The ops that show it, in history order.
    pub ops: Vec<Value>,
}

/// Invalid when there is a violation (the witness is the first one found),
/// unknown when some ops could not be read, valid otherwise. `checked`
/// says what was looked at, e.g. "40 grants of 3 locks".
pub fn result(
    name: &str,
    checked: &str,
    violations: Vec<Violation>,
    unreadable: &Unreadable,
) -> CheckerResult {
    let count = violations.len();
    let (valid, summary, witness) = match violations.into_iter().next() {
        Some(first) => {
            let summary = format!("{checked}: {count} violation(s); first: {}", first.message);
            let witness = json!({
                "violation": first.message,
                "ops": first.ops,
                "other_violations": count - 1,
            });
            (Validity::Invalid, summary, Some(witness))
        }
        None => match &unreadable.first {
            Some(why) => {
                let summary = format!(
                    "{checked}: no violation, but {} ops could not be read (first: {why})",
                    unreadable.count
                );
                (Validity::Unknown, summary, None)
            }
            None => (Validity::Valid, format!("{checked}: no violation"), None),
        },
    };
    CheckerResult {
        name: name.to_string(),
        valid,
        summary,
        witness,
    }
}
