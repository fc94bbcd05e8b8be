//! Registers: plain (`linearizable-registers`) and fenced
//! (`fenced-registers`).
//!
//! # Model
//! One register per key, starting absent (`nil`). The state is the value
//! and, for the fenced store, the token of the last fenced write:
//! - `read` ok → must return the current value; failed or unknown reads
//!   constrain nothing and are left out;
//! - `write` ok or unknown → sets the value; a failed write did not happen
//!   and is left out. In the **fenced** model a write carrying token `T` is
//!   legal only when `T` is not lower than the stored token, and stores
//!   `T`; an unfenced write keeps the stored token (latchkey's store does
//!   the same, `docs/semantics.md`, invariant 3). `T` is what the write's
//!   invoke and completion carry ([`super::calls::write_token`]: the
//!   lower, should they disagree);
//! - `cas {from, to}` ok or unknown → legal when the value equals `from`,
//!   and sets `to`; `fail` → the comparison did not hold: the value was not
//!   `from` (the history format's definition, and Porcupine's etcd model).
//!
//! The etcd model of Porcupine's test suite is this model without tokens.
//! (Reading a failed cas as Knossos does — it did not happen, no more —
//! gives the same verdict on every history of that suite; the stronger
//! reading also catches a store that refuses a cas whose comparison held.)
//!
//! # Not checked here
//! The store also requires a fenced write's token to be the lock's
//! *current* grant. That couples a key to a lock, which the per-key search
//! cannot see; `fenced-writes` ([`super::fenced_writes`]) checks the
//! real-time consequences of it.

use std::collections::BTreeMap;

use serde_json::Value;

use super::calls::{by_key, field, write_token, Call, Interner, Outcome};
use super::linearizable::{self, Spec};
use super::search::{Model, Timed};
use super::{CheckOptions, CheckerResult};

/// An op on one register, with what it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOp {
    Read(Option<u32>),
    Write {
        value: u32,
        token: Option<u64>,
    },
    Cas {
        from: Option<u32>,
        to: u32,
    },
    /// A `cas` that failed: the value was not `from`.
    CasRefused {
        from: Option<u32>,
    },
}

/// A value (by id) and the stored fencing token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegisterState {
    pub value: Option<u32>,
    pub token: Option<u64>,
}

/// The register model; `fenced` turns token checks on.
pub struct RegisterModel {
    pub fenced: bool,
}

impl Model for RegisterModel {
    type State = RegisterState;
    type Op = RegisterOp;

    fn step(&self, state: &RegisterState, op: &RegisterOp) -> Option<RegisterState> {
        match *op {
            RegisterOp::Read(value) => (state.value == value).then_some(*state),
            RegisterOp::Write { value, token } => match token.filter(|_| self.fenced) {
                Some(token) if state.token.is_some_and(|stored| token < stored) => None,
                Some(token) => Some(RegisterState {
                    value: Some(value),
                    token: Some(token),
                }),
                None => Some(RegisterState {
                    value: Some(value),
                    token: state.token,
                }),
            },
            RegisterOp::Cas { from, to } => (state.value == from).then_some(RegisterState {
                value: Some(to),
                token: state.token,
            }),
            RegisterOp::CasRefused { from } => (state.value != from).then_some(*state),
        }
    }

    fn is_read_only(&self, op: &RegisterOp) -> bool {
        matches!(op, RegisterOp::Read(_) | RegisterOp::CasRefused { .. })
    }

    /// Every value the ops mention, absent, and one value none of them
    /// mentions; for tokens, none stored, each token mentioned, and one
    /// above them all (comparisons `T ≥ stored` cannot tell apart two
    /// stored tokens between the same neighbours).
    fn any_state(&self, ops: &[Timed<RegisterOp>]) -> Option<Vec<RegisterState>> {
        let mut values = vec![None, Some(u32::MAX)];
        let mut tokens = vec![None];
        for timed in ops {
            match timed.op {
                RegisterOp::Read(value) | RegisterOp::CasRefused { from: value } => {
                    values.push(value)
                }
                RegisterOp::Write { value, token } => {
                    values.push(Some(value));
                    tokens.extend(token.filter(|_| self.fenced).map(Some));
                }
                RegisterOp::Cas { from, to } => values.extend([from, Some(to)]),
            }
        }
        if let Some(&Some(max)) = tokens.iter().max() {
            tokens.push(Some(max.saturating_add(1)));
        }
        values.sort_unstable();
        values.dedup();
        tokens.sort_unstable();
        tokens.dedup();
        let states = values.iter().flat_map(|&value| {
            tokens
                .iter()
                .map(move |&token| RegisterState { value, token })
        });
        Some(states.collect())
    }
}

/// Indices of register calls (`read`, `write`, `cas`), by key.
pub fn register_keys(calls: &[Call<'_>]) -> BTreeMap<Option<String>, Vec<usize>> {
    by_key(calls, &["read", "write", "cas"])
}

/// True when some write to the key carries a fencing token.
pub fn is_fenced(calls: &[Call<'_>], indices: &[usize]) -> bool {
    indices
        .iter()
        .any(|&i| calls[i].f() == "write" && field(&calls[i].invoke.value, "token").is_some())
}

/// Runs the register search on `keys` (from [`register_keys`]).
pub fn check(
    name: &str,
    fenced: bool,
    calls: &[Call<'_>],
    keys: &BTreeMap<Option<String>, Vec<usize>>,
    options: &CheckOptions,
) -> CheckerResult {
    let mut interner = Interner::default();
    let groups = keys
        .iter()
        .map(|(key, indices)| (key_label(key.as_deref()), indices.clone()));
    let (objects, unreadable) = linearizable::build_objects(calls, groups, |call| {
        register_op(call, fenced, &mut interner)
    });
    let model = RegisterModel { fenced };
    let spec = Spec {
        name,
        model: &model,
        init: RegisterState {
            value: None,
            token: None,
        },
        nouns: "keys",
    };
    linearizable::check_objects(&spec, objects, calls, &unreadable, options)
}

pub fn key_label(key: Option<&str>) -> String {
    match key {
        Some(key) => format!("key {key:?}"),
        None => "the register".to_string(),
    }
}

/// The search op for one call; `None` for calls that constrain nothing.
fn register_op(
    call: &Call<'_>,
    fenced: bool,
    interner: &mut Interner,
) -> Result<Option<RegisterOp>, &'static str> {
    let input = &call.invoke.value;
    let op = match (call.f(), call.outcome()) {
        ("read", Outcome::Ok) => {
            let output = call.completion.map_or(&Value::Null, |op| &op.value);
            RegisterOp::Read(value_id(unwrap_value(output), interner))
        }
        ("read", _) | ("write", Outcome::Fail) => return Ok(None),
        ("write", _) => {
            let value = value_id(unwrap_value(input), interner).ok_or("write without a value")?;
            let token = if fenced { write_token(call)? } else { None };
            RegisterOp::Write { value, token }
        }
        ("cas", outcome) => {
            let (from, to) = cas_arguments(input).ok_or("cas without {from, to}")?;
            let from = value_id(from, interner);
            match outcome {
                Outcome::Fail => RegisterOp::CasRefused { from },
                _ => RegisterOp::Cas {
                    from,
                    to: value_id(to, interner).ok_or("cas to nil")?,
                },
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(op))
}

/// `{"value": V}` → `V`; anything else is taken as the value itself.
pub fn unwrap_value(value: &Value) -> &Value {
    field(value, "value").unwrap_or(value)
}

fn value_id(value: &Value, interner: &mut Interner) -> Option<u32> {
    (!value.is_null()).then(|| interner.id(value))
}

/// `{"from": A, "to": B}` or Jepsen's `[A B]`.
fn cas_arguments(value: &Value) -> Option<(&Value, &Value)> {
    if let (Some(from), Some(to)) = (field(value, "from"), field(value, "to")) {
        return Some((from, to));
    }
    match value.as_array()?.as_slice() {
        [from, to] => Some((from, to)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(value: Option<u32>, token: Option<u64>) -> RegisterState {
        RegisterState { value, token }
    }

    #[test]
    fn a_fenced_write_with_a_lower_token_is_illegal_and_an_equal_one_is_legal() {
        let model = RegisterModel { fenced: true };
        let stored = state(Some(1), Some(5));
        let lower = RegisterOp::Write {
            value: 2,
            token: Some(4),
        };
        let equal = RegisterOp::Write {
            value: 2,
            token: Some(5),
        };
        assert_eq!(model.step(&stored, &lower), None);
        assert_eq!(model.step(&stored, &equal), Some(state(Some(2), Some(5))));
        let plain = RegisterModel { fenced: false };
        assert_eq!(plain.step(&stored, &lower), Some(state(Some(2), Some(5))));
    }

    #[test]
    fn an_unfenced_write_keeps_the_stored_token() {
        let model = RegisterModel { fenced: true };
        let write = RegisterOp::Write {
            value: 9,
            token: None,
        };
        assert_eq!(
            model.step(&state(Some(1), Some(5)), &write),
            Some(state(Some(9), Some(5)))
        );
    }

    #[test]
    fn a_failed_cas_requires_a_different_value() {
        let model = RegisterModel { fenced: false };
        let refused = RegisterOp::CasRefused { from: Some(1) };
        assert_eq!(model.step(&state(Some(1), None), &refused), None);
        assert!(model.step(&state(Some(2), None), &refused).is_some());
        assert!(model.step(&state(None, None), &refused).is_some());
    }
}
