//! Runs the search object by object and words the verdict.
//!
//! Linearizability is compositional (Herlihy & Wing's locality; Porcupine
//! calls it P-compositionality): a history is linearizable exactly when the
//! sub-history of each object is. So each register key, KV key or lock is
//! searched on its own, smallest first, under one shared deadline, and the
//! first object that fails is shrunk to a witness
//! ([`witness`]).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::calls::{in_history_order, op_json, Call, Unreadable};
use super::search::{self, Limit, Limits, Model, Timed, Verdict, MAX_CACHE_BYTES};
use super::witness::{self, Witness};
use super::{CheckOptions, CheckerResult, Validity};

/// The ops of one object.
#[derive(Debug, Clone)]
pub struct Object<O> {
    /// How the object is named in summaries, e.g. `key "x"`.
    pub label: String,
    pub ops: Vec<Timed<O>>,
}

/// One object per `(label, call indices)` group; `op_of` turns a call into
/// its search op, `None` for calls that constrain nothing, or says why it
/// cannot read the call.
pub fn build_objects<O>(
    calls: &[Call<'_>],
    groups: impl IntoIterator<Item = (String, Vec<usize>)>,
    mut op_of: impl FnMut(&Call<'_>) -> Result<Option<O>, &'static str>,
) -> (Vec<Object<O>>, Unreadable) {
    let mut unreadable = Unreadable::default();
    let mut objects = Vec::new();
    for (label, indices) in groups {
        let mut ops = Vec::with_capacity(indices.len());
        for i in indices {
            match op_of(&calls[i]) {
                Ok(Some(op)) => ops.push(Timed {
                    op,
                    call: calls[i].invoke_at,
                    ret: calls[i].known_return(),
                    source: i,
                }),
                Ok(None) => {}
                Err(why) => unreadable.note(calls[i].invoke, why),
            }
        }
        objects.push(Object { label, ops });
    }
    (objects, unreadable)
}

/// A checker built on the search.
pub struct Spec<'a, M: Model> {
    /// The checker's name in the results.
    pub name: &'a str,
    pub model: &'a M,
    pub init: M::State,
    /// Plural of what an object is ("keys", "locks").
    pub nouns: &'a str,
}

/// The longest a witness reduction may take.
const MAX_WITNESS_TIME: Duration = Duration::from_secs(20);

/// Checks every object; see the module docs.
pub fn check_objects<M: Model>(
    spec: &Spec<'_, M>,
    mut objects: Vec<Object<M::Op>>,
    calls: &[Call<'_>],
    unreadable: &Unreadable,
    options: &CheckOptions,
) -> CheckerResult {
    let started = Instant::now();
    let limits = Limits {
        deadline: started + options.budget,
        max_cache_bytes: MAX_CACHE_BYTES,
    };
    objects.sort_by_key(|object| object.ops.len());
    let op_count: usize = objects.iter().map(|object| object.ops.len()).sum();
    let mut exhausted: Vec<(&str, Limit)> = Vec::new();
    for object in &objects {
        match search::check(spec.model, &spec.init, &object.ops, &limits) {
            Verdict::Linearizable => {}
            Verdict::NotLinearizable => return invalid(spec, object, calls, options),
            Verdict::Exhausted(limit) => exhausted.push((&object.label, limit)),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let checked = format!(
        "{} {}, {op_count} ops, {seconds:.2} s",
        objects.len(),
        spec.nouns
    );
    let (valid, summary) = if let Some(&(label, limit)) = exhausted.first() {
        let bound = match limit {
            Limit::Time => format!("the time budget of {:?}", options.budget),
            Limit::Memory => format!("the cache bound of {} MiB", MAX_CACHE_BYTES >> 20),
        };
        let summary = format!(
            "{} of {checked} undecided: {label} ran out of {bound}; no violation found",
            exhausted.len()
        );
        (Validity::Unknown, summary)
    } else if let Some(first) = &unreadable.first {
        let summary = format!(
            "{checked}: linearizable without {} ops that could not be read (first: {first})",
            unreadable.count
        );
        (Validity::Unknown, summary)
    } else {
        (Validity::Valid, format!("{checked}: linearizable"))
    };
    CheckerResult {
        name: spec.name.to_string(),
        valid,
        summary,
        witness: None,
    }
}

fn invalid<M: Model>(
    spec: &Spec<'_, M>,
    object: &Object<M::Op>,
    calls: &[Call<'_>],
    options: &CheckOptions,
) -> CheckerResult {
    let limits = Limits {
        deadline: Instant::now() + (options.budget / 4).min(MAX_WITNESS_TIME),
        max_cache_bytes: MAX_CACHE_BYTES,
    };
    let reduced = witness::reduce(spec.model, &spec.init, &object.ops, limits);
    let summary = match &reduced {
        Some(witness) => format!(
            "{} is not linearizable; {} of its {} ops show it",
            object.label,
            witness.ops.len(),
            object.ops.len()
        ),
        None => format!(
            "{} is not linearizable ({} ops; no time left to shrink a witness)",
            object.label,
            object.ops.len()
        ),
    };
    CheckerResult {
        name: spec.name.to_string(),
        valid: Validity::Invalid,
        summary,
        witness: Some(witness_json(object, reduced.as_ref(), calls)),
    }
}

/// The witness ops in history order, with what they prove.
fn witness_json<O>(object: &Object<O>, reduced: Option<&Witness>, calls: &[Call<'_>]) -> Value {
    let Some(reduced) = reduced else {
        return json!({ "object": object.label });
    };
    let calls_of = |indices: &[usize]| -> Vec<&Call<'_>> {
        indices
            .iter()
            .map(|&i| &calls[object.ops[i].source])
            .collect()
    };
    let explanation = if reduced.from_any_state {
        "No order of `ops` is legal from any starting state, even if each of \
         `unknown_ops` took effect at any time after its invoke, or not at all. \
         Every other op of this object completed before the first of `ops` \
         began (the arbitrary start stands for it), or cannot change the outcome."
    } else {
        "No order of `ops` is legal from the initial state, even if each of \
         `unknown_ops` took effect at any time after its invoke, or not at all. \
         No other op of this object can change the outcome."
    };
    let culprit = reduced
        .culprit
        .map(|i| calls[object.ops[i].source].invoke.index);
    let unknown_invokes: Vec<Value> = calls_of(&reduced.unknown)
        .iter()
        .map(|call| op_json(call.invoke))
        .collect();
    json!({
        "object": object.label,
        "explanation": explanation,
        "culprit": culprit,
        "minimal": reduced.minimal,
        "ops": in_history_order(&calls_of(&reduced.ops), &[]),
        "unknown_ops": unknown_invokes,
    })
}
