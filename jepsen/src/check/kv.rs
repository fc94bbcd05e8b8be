//! String key-value store (`linearizable-kv`): `get`, `put`, `append`.
//!
//! The model of Porcupine's KV tests (MIT 6.824's key-value service): each
//! key holds a string, initially empty; `put` replaces it, `append` adds to
//! its end, `get` returns it (a missing key reads as `""`; a `null` result
//! is taken as `""` too). Failed ops did not happen; a `get` that failed or
//! timed out constrains nothing.
//!
//! Values are JSON strings, bare or as `{"value": S}`.

use std::collections::BTreeMap;

use serde_json::Value;

use super::calls::{by_key, Call, Outcome};
use super::linearizable::{self, Spec};
use super::register::{key_label, unwrap_value};
use super::search::{Model, Timed};
use super::{CheckOptions, CheckerResult};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    Get(String),
    Put(String),
    Append(String),
}

pub struct KvModel;

/// Bound on [`KvModel::any_state`]'s set.
const MAX_KV_ANY_STATES: usize = 64;

impl Model for KvModel {
    type State = String;
    type Op = KvOp;

    fn step(&self, state: &String, op: &KvOp) -> Option<String> {
        match op {
            KvOp::Get(value) => (value == state).then(|| state.clone()),
            KvOp::Put(value) => Some(value.clone()),
            KvOp::Append(value) => Some(format!("{state}{value}")),
        }
    }

    fn is_read_only(&self, op: &KvOp) -> bool {
        matches!(op, KvOp::Get(_))
    }

    /// A start state matters only through the gets it lets succeed: a
    /// `get` of G after appends can match a start S only when S is G
    /// itself, or a prefix of G followed by the value of an append of
    /// `ops`. Every other start is like one no get can match (it holds a
    /// NUL, which no value here has). `None` past `MAX_KV_ANY_STATES` (64).
    fn any_state(&self, ops: &[Timed<KvOp>]) -> Option<Vec<String>> {
        let appends: Vec<&str> = ops
            .iter()
            .filter_map(|timed| match &timed.op {
                KvOp::Append(value) if !value.is_empty() => Some(value.as_str()),
                _ => None,
            })
            .collect();
        let mut states = vec![String::new(), "\0".to_string()];
        for timed in ops {
            let KvOp::Get(seen) = &timed.op else { continue };
            for (cut, _) in seen.char_indices().chain([(seen.len(), ' ')]) {
                let rest = &seen[cut..];
                if rest.is_empty() || appends.iter().any(|value| rest.starts_with(value)) {
                    states.push(seen[..cut].to_string());
                }
            }
            states.sort_unstable();
            states.dedup();
            if states.len() > MAX_KV_ANY_STATES {
                return None;
            }
        }
        Some(states)
    }

    fn state_heap_bytes(&self, state: &String) -> usize {
        state.capacity()
    }
}

/// Indices of KV calls (`get`, `put`, `append`) by key.
pub fn kv_keys(calls: &[Call<'_>]) -> BTreeMap<Option<String>, Vec<usize>> {
    by_key(calls, &["get", "put", "append"])
}

/// Runs the KV search on `keys` (from [`kv_keys`]).
pub fn check(
    calls: &[Call<'_>],
    keys: &BTreeMap<Option<String>, Vec<usize>>,
    options: &CheckOptions,
) -> CheckerResult {
    let groups = keys
        .iter()
        .map(|(key, indices)| (key_label(key.as_deref()), indices.clone()));
    let (objects, unreadable) = linearizable::build_objects(calls, groups, kv_op);
    let spec = Spec {
        name: "linearizable-kv",
        model: &KvModel,
        init: String::new(),
        nouns: "keys",
    };
    linearizable::check_objects(&spec, objects, calls, &unreadable, options)
}

fn kv_op(call: &Call<'_>) -> Result<Option<KvOp>, &'static str> {
    let text = |value: &Value| match unwrap_value(value) {
        Value::Null => Ok(String::new()),
        Value::String(text) => Ok(text.clone()),
        _ => Err("kv value is not a string"),
    };
    let op = match (call.f(), call.outcome()) {
        ("get", Outcome::Ok) => {
            KvOp::Get(text(call.completion.map_or(&Value::Null, |op| &op.value))?)
        }
        ("get", _) | (_, Outcome::Fail) => return Ok(None),
        ("put", _) => KvOp::Put(text(&call.invoke.value)?),
        ("append", _) => KvOp::Append(text(&call.invoke.value)?),
        _ => return Ok(None),
    };
    Ok(Some(op))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timed(op: KvOp) -> Timed<KvOp> {
        Timed {
            op,
            call: 0,
            ret: Some(1),
            source: 0,
        }
    }

    #[test]
    fn gets_see_puts_and_appends_in_order() {
        let state = KvModel.step(&String::new(), &KvOp::Put("x".into()));
        let state = KvModel.step(&state.expect("put"), &KvOp::Append("y".into()));
        assert_eq!(state.as_deref(), Some("xy"));
        assert_eq!(
            KvModel.step(&"xy".to_string(), &KvOp::Get("x".into())),
            None
        );
    }

    #[test]
    fn any_state_holds_the_prefixes_an_append_could_complete() {
        let ops = [
            timed(KvOp::Append("b".into())),
            timed(KvOp::Get("ab".into())),
        ];
        let states = KvModel.any_state(&ops).expect("small");
        for expected in ["", "a", "ab", "\0"] {
            assert!(
                states.iter().any(|s| s == expected),
                "{expected:?} in {states:?}"
            );
        }
        assert!(!states.iter().any(|s| s == "x"), "{states:?}");
    }
}
