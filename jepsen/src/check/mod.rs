//! History checkers: each reads a history and gives a verdict.
//!
//! The interface the harness uses is [`check_history`]; the `check`
//! subcommand ([`cli`]) runs the same checkers on a saved file, which may
//! also be a Jepsen log or EDN ([`formats`]). What each checker proves,
//! and its limits, is in `docs/jepsen-checkers.md`.
//!
//! # Layout
//! - [`calls`]: pairs invokes with completions; reads op values.
//! - [`search`]: the linearizability search (Wing & Gong / Lowe, as in
//!   Porcupine) over any [`search::Model`]; [`linearizable`] runs it per
//!   object and words the verdict; [`witness`] shrinks a failure to the
//!   few ops that show it.
//! - Models searched: [`register`] (`linearizable-registers`,
//!   `fenced-registers`), [`kv`] (`linearizable-kv`), [`mutex`]
//!   (`fenced-mutex`).
//! - Rules without search, each a list of violations ([`violations`]):
//!   [`tokens`] (`fencing-tokens`), [`overlap`] (`lease-overlap`),
//!   [`fenced_writes`] (`fenced-writes`), [`leaders`] (`raft-leaders`,
//!   `election-leaders`), [`leases`] (`leases`).
//! - [`formats`]: readers for JSON lines, Jepsen logs and EDN, and the EDN
//!   exporter.
//!
//! # Which checkers run
//! [`check_history`] runs each checker whose ops the history contains and
//! leaves the others out of the results (a checker with nothing to check
//! proves nothing, so it does not report `valid`). A history that gives no
//! checker anything to do, or whose ops could not all be paired, gets a
//! `history` entry with verdict `unknown`.

pub mod calls;
pub mod cli;
pub mod fenced_writes;
pub mod formats;
pub mod kv;
pub mod leaders;
pub mod leases;
pub mod linearizable;
pub mod mutex;
pub mod overlap;
pub mod register;
pub mod search;
pub mod tokens;
pub mod violations;
pub mod witness;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::history::Op;

/// A checker's verdict. `Unknown` is honest: a budget ran out, or the
/// history lacks what the checker needs. It is never reported as valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    Valid,
    Invalid,
    Unknown,
}

impl Validity {
    /// The verdict of several checkers: invalid if any is, else unknown if
    /// any is, else valid.
    pub fn combine(verdicts: impl IntoIterator<Item = Validity>) -> Validity {
        let mut result = Validity::Valid;
        for verdict in verdicts {
            match verdict {
                Validity::Invalid => return Validity::Invalid,
                Validity::Unknown => result = Validity::Unknown,
                Validity::Valid => {}
            }
        }
        result
    }
}

/// JSON: `true`, `false` or `"unknown"`, as Jepsen's `:valid?`.
impl Serialize for Validity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Validity::Valid => serializer.serialize_bool(true),
            Validity::Invalid => serializer.serialize_bool(false),
            Validity::Unknown => serializer.serialize_str("unknown"),
        }
    }
}

impl<'de> Deserialize<'de> for Validity {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::Bool(true) => Ok(Validity::Valid),
            serde_json::Value::Bool(false) => Ok(Validity::Invalid),
            serde_json::Value::String(s) if s == "unknown" => Ok(Validity::Unknown),
            other => Err(serde::de::Error::custom(format!(
                "valid must be true, false or \"unknown\", not {other}"
            ))),
        }
    }
}

/// Limits and tolerances shared by the checkers.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// Wall-clock budget of each search-based checker; past it, `Unknown`.
    pub budget: Duration,
    /// How far two processes' clocks may disagree about when a lease ended.
    pub drift_bound: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            budget: Duration::from_secs(60),
            drift_bound: Duration::from_millis(50),
        }
    }
}

/// One checker's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckerResult {
    /// e.g. `linearizable-registers`, `fenced-mutex`.
    pub name: String,
    pub valid: Validity,
    /// One line: what was checked, or why the verdict is what it is.
    pub summary: String,
    /// For `Invalid`: a minimal set of ops that shows the violation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness: Option<serde_json::Value>,
}

/// Every checker's verdict; serialised as `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub valid: Validity,
    pub checkers: Vec<CheckerResult>,
}

/// Which checkers to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Selection {
    /// Every checker whose ops the history contains.
    #[default]
    Auto,
    /// Linearizability of read/write/cas registers, ignoring tokens.
    Register,
    /// Linearizability of a string key-value store (get/put/append).
    Kv,
    /// Registers under the fenced-store model, and `fenced-writes`.
    FencedRegister,
    /// Locks and elections: `fenced-mutex`, `fencing-tokens`,
    /// `lease-overlap`.
    Mutex,
}

/// Runs every checker that applies to what `ops` contains.
pub fn check_history(ops: &[Op], options: &CheckOptions) -> Results {
    check_history_with(ops, options, Selection::Auto)
}

/// Runs the checkers of `selection` that apply to what `ops` contains.
pub fn check_history_with(ops: &[Op], options: &CheckOptions, selection: Selection) -> Results {
    let paired = calls::pair(ops);
    let mut checkers = Vec::new();
    if let Some(first) = paired.problems.first() {
        checkers.push(CheckerResult {
            name: "history".to_string(),
            valid: Validity::Unknown,
            summary: format!(
                "{} ops could not be paired with an invoke or completion (first: {first})",
                paired.problems.len()
            ),
            witness: None,
        });
    }
    let registers = register::register_keys(&paired.calls);
    let kv_keys = kv::kv_keys(&paired.calls);
    let mut run_registers = |name: &str, fenced: bool, keys: &BTreeMap<_, _>| {
        if !keys.is_empty() {
            checkers.push(register::check(name, fenced, &paired.calls, keys, options));
        }
    };
    match selection {
        Selection::Auto => {
            let (fenced, plain): (BTreeMap<_, _>, BTreeMap<_, _>) = registers
                .into_iter()
                .partition(|(_, calls)| register::is_fenced(&paired.calls, calls));
            run_registers("linearizable-registers", false, &plain);
            run_registers("fenced-registers", true, &fenced);
        }
        Selection::Register => run_registers("linearizable-registers", false, &registers),
        Selection::FencedRegister => run_registers("fenced-registers", true, &registers),
        Selection::Kv | Selection::Mutex => {}
    }
    if matches!(selection, Selection::Auto | Selection::Kv) && !kv_keys.is_empty() {
        checkers.push(kv::check(&paired.calls, &kv_keys, options));
    }
    if matches!(selection, Selection::Auto | Selection::FencedRegister) {
        checkers.extend(fenced_writes::check(&paired));
    }
    if matches!(selection, Selection::Auto | Selection::Mutex) {
        checkers.extend(mutex::check(&paired.calls, options));
        checkers.extend(tokens::check(&paired));
        checkers.extend(overlap::check(&paired, options));
    }
    if selection == Selection::Auto {
        checkers.extend(leaders::check_elections(&paired));
        checkers.extend(leaders::check_raft(&paired));
        checkers.extend(leases::check(&paired));
    }
    if checkers.is_empty() {
        checkers.push(CheckerResult {
            name: "history".to_string(),
            valid: Validity::Unknown,
            summary: format!(
                "{} ops, none that the selected checkers understand",
                ops.len()
            ),
            witness: None,
        });
    }
    Results {
        valid: Validity::combine(checkers.iter().map(|c| c.valid)),
        checkers,
    }
}
