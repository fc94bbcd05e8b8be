//! Hand-written histories under `testdata/`: each bad one breaks one rule
//! and must be caught by the checker that owns the rule, with a witness;
//! each good one must pass every checker that runs on it.

use std::path::PathBuf;
use std::time::Duration;

use latchkey_jepsen::check::formats::{self, Format};
use latchkey_jepsen::check::{check_history, CheckOptions, CheckerResult, Results, Validity};
use latchkey_jepsen::history::{Op, OpType, Process};
use serde_json::{json, Value};

fn check(file: &str) -> Results {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(file);
    let ops = formats::read_history(&path, Format::Jsonl).expect("readable testdata");
    check_history(&ops, &CheckOptions::default())
}

fn checker<'r>(results: &'r Results, name: &str) -> &'r CheckerResult {
    results
        .checkers
        .iter()
        .find(|checker| checker.name == name)
        .unwrap_or_else(|| panic!("checker {name} did not run: {results:#?}"))
}

/// Every checker in `expected` ran, and all that ran said valid.
fn assert_valid(file: &str, expected: &[&str]) {
    let results = check(file);
    for name in expected {
        checker(&results, name);
    }
    assert_eq!(results.valid, Validity::Valid, "{file}: {results:#?}");
}

/// `name` says invalid, with a witness of at least one op.
fn assert_caught(file: &str, name: &str) -> CheckerResult {
    let results = check(file);
    assert_eq!(results.valid, Validity::Invalid, "{file}: {results:#?}");
    let result = checker(&results, name).clone();
    assert_eq!(result.valid, Validity::Invalid, "{file}: {result:#?}");
    let ops = result
        .witness
        .as_ref()
        .and_then(|witness| witness.get("ops"))
        .and_then(|ops| ops.as_array())
        .unwrap_or_else(|| panic!("{file}: {name} gave no witness ops: {result:#?}"));
    assert!(!ops.is_empty(), "{file}: empty witness");
    result
}

fn witness_indices(result: &CheckerResult) -> Vec<u64> {
    let ops = result.witness.as_ref().and_then(|w| w.get("ops"));
    ops.and_then(|ops| ops.as_array())
        .into_iter()
        .flatten()
        .filter_map(|op| op.get("index").and_then(|index| index.as_u64()))
        .collect()
}

#[test]
fn lock_fenced_run_with_a_paused_holder_fenced_off_passes_every_checker() {
    assert_valid(
        "good-lock-fenced.jsonl",
        &[
            "fenced-registers",
            "fenced-writes",
            "fenced-mutex",
            "fencing-tokens",
            "lease-overlap",
            "raft-leaders",
            "leases",
        ],
    );
}

#[test]
fn register_run_with_unknown_and_failed_ops_is_linearizable() {
    assert_valid("good-register.jsonl", &["linearizable-registers"]);
}

#[test]
fn election_run_with_observers_passes_every_checker() {
    assert_valid(
        "good-election.jsonl",
        &[
            "fenced-mutex",
            "fencing-tokens",
            "lease-overlap",
            "election-leaders",
            "raft-leaders",
        ],
    );
}

/// A campaign that timed out but won, then the same lease campaigning
/// again with a new value: the server gives the leadership back with the
/// first value, and the ok reports that value (campaign `election` seed 4
/// of the first campaign, reduced).
#[test]
fn a_leadership_given_back_with_its_first_value_passes_every_checker() {
    assert_valid(
        "good-election-campaign-given-back.jsonl",
        &[
            "fenced-mutex",
            "fencing-tokens",
            "lease-overlap",
            "election-leaders",
        ],
    );
}

#[test]
fn a_campaign_answered_with_a_value_its_lease_never_campaigned_with_is_caught() {
    let result = assert_caught(
        "bad-election-campaign-answer-from-nowhere.jsonl",
        "election-leaders",
    );
    assert!(
        result.summary.contains("never campaigned with"),
        "{result:#?}"
    );
}

#[test]
fn a_token_granted_to_two_leases_is_caught() {
    let result = assert_caught("bad-duplicate-token.jsonl", "fencing-tokens");
    assert_eq!(witness_indices(&result), [0, 1, 4, 5], "the two grants");
}

#[test]
fn a_token_going_backwards_in_real_time_is_caught() {
    let result = assert_caught("bad-token-backwards.jsonl", "fencing-tokens");
    assert_eq!(witness_indices(&result), [0, 1, 4, 5], "the two grants");
}

#[test]
fn two_holders_without_release_or_expiry_are_caught_by_the_clock() {
    let result = assert_caught("bad-two-holders.jsonl", "lease-overlap");
    assert_eq!(
        witness_indices(&result),
        [0, 1, 2, 3, 4],
        "both grants and the late hold-lost"
    );
}

#[test]
fn a_release_after_the_lock_changed_hands_is_caught() {
    assert_caught("bad-release-after-handover.jsonl", "fenced-mutex");
}

#[test]
fn a_release_by_a_lease_that_does_not_hold_the_lock_is_caught() {
    let result = assert_caught("bad-release-by-non-owner.jsonl", "fenced-mutex");
    assert_eq!(witness_indices(&result), [2, 3], "the foreign release");
}

#[test]
fn an_acknowledged_fenced_write_that_is_lost_is_caught() {
    let result = assert_caught("bad-lost-acknowledged-write.jsonl", "fenced-writes");
    assert!(
        result.summary.contains("acknowledged write lost"),
        "{result:#?}"
    );
    assert_caught("bad-lost-acknowledged-write.jsonl", "fenced-registers");
}

#[test]
fn two_acknowledged_writes_of_one_counter_value_are_a_lost_increment() {
    let result = assert_caught("bad-lost-increment.jsonl", "fenced-writes");
    assert!(result.summary.contains("lost increment"), "{result:#?}");
    // Per key the register history alone is fine: only the counter rule sees it.
    let results = check("bad-lost-increment.jsonl");
    assert_eq!(checker(&results, "fenced-registers").valid, Validity::Valid);
}

#[test]
fn a_stale_read_is_caught_with_the_overwrite_and_the_read() {
    let result = assert_caught("bad-stale-read.jsonl", "linearizable-registers");
    assert_eq!(witness_indices(&result), [2, 3, 4, 5]);
}

#[test]
fn a_stale_fenced_write_that_was_accepted_is_caught() {
    let result = assert_caught("bad-stale-fenced-write-accepted.jsonl", "fenced-writes");
    assert!(
        result.summary.contains("stale write accepted"),
        "{result:#?}"
    );
    assert_caught("bad-stale-fenced-write-accepted.jsonl", "fenced-registers");
}

#[test]
fn an_acknowledgement_carrying_a_token_below_the_writers_grant_is_caught() {
    let result = assert_caught("bad-acknowledged-token-lowered.jsonl", "fenced-writes");
    assert!(
        result
            .summary
            .contains("op 4 wrote key \"counter\" with token 2 of lock \"job\": below the token of grant op 0"),
        "{result:#?}"
    );
    assert_eq!(
        witness_indices(&result),
        [0, 1, 4, 5],
        "the grant and the write"
    );
    assert!(
        result.summary.contains("2 violation(s)"),
        "the acknowledgement also disagrees with its invoke: {result:#?}"
    );
}

#[test]
fn a_fenced_write_below_a_token_already_written_to_its_key_is_caught() {
    // Two locks guard one key: no grant of the stale write's own lock is
    // newer, only the write acknowledged under the other lock.
    let file = "bad-stale-write-below-acknowledged-write.jsonl";
    let result = assert_caught(file, "fenced-writes");
    assert!(
        result
            .summary
            .contains("below token 4 of write op 4 to the same key"),
        "{result:#?}"
    );
    assert_eq!(witness_indices(&result), [4, 5, 6, 7], "the two writes");
    assert_caught(file, "fenced-registers");
}

#[test]
fn two_leaderships_believed_held_at_once_are_caught_by_the_clock() {
    let result = assert_caught("bad-two-leaders.jsonl", "lease-overlap");
    assert!(
        result.summary.contains("two leaders at once"),
        "{result:#?}"
    );
    assert_eq!(
        witness_indices(&result),
        [0, 1, 2, 3, 4],
        "both campaigns and the late hold-lost"
    );
    let results = check("bad-two-leaders.jsonl");
    assert_eq!(
        checker(&results, "fenced-mutex").valid,
        Validity::Valid,
        "expiry is invisible to the order of ops: only the clock shows it"
    );
}

#[test]
fn two_raft_leaders_in_one_term_are_caught() {
    assert_caught("bad-two-raft-leaders.jsonl", "raft-leaders");
}

#[test]
fn an_observer_seeing_an_older_leadership_is_caught() {
    assert_caught("bad-election-observer-goes-back.jsonl", "election-leaders");
}

#[test]
fn a_lease_that_answers_keepalives_after_revoke_is_caught() {
    assert_caught("bad-lease-comes-back.jsonl", "leases");
}

#[test]
fn every_testdata_history_survives_an_edn_round_trip() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("testdata") {
        let path = entry.expect("entry").path();
        let ops = formats::read_history(&path, Format::Jsonl).expect("readable");
        let mut edn = Vec::new();
        formats::edn::write(&mut edn, &ops).expect("export");
        let text = String::from_utf8(edn).expect("utf-8");
        let back = formats::parse_history(&text, Format::Auto).expect("EDN reads back");
        assert_eq!(back, ops, "{}", path.display());
        count += 1;
    }
    assert!(count >= 10, "only {count} testdata files");
}

fn op(index: u64, process: u64, kind: OpType, f: &str, value: Value) -> Op {
    Op {
        index,
        time: index,
        process: Process::Client(process),
        kind,
        f: f.into(),
        key: Some("k".into()),
        value,
        term: None,
        raft_index: None,
        error: None,
    }
}

/// Twenty writes whose outcome is unknown, each value then read once, and
/// a final read of a value nobody wrote: the search must try every order
/// of the writes before it can say no.
fn hard_history() -> Vec<Op> {
    let mut ops = Vec::new();
    for value in 0..20u64 {
        ops.push(op(
            ops.len() as u64,
            value,
            OpType::Invoke,
            "write",
            json!({"value": value}),
        ));
    }
    for value in 0..20u64 {
        let process = 100 + value;
        ops.push(op(
            ops.len() as u64,
            process,
            OpType::Invoke,
            "read",
            Value::Null,
        ));
        ops.push(op(
            ops.len() as u64,
            process,
            OpType::Ok,
            "read",
            json!({"value": value}),
        ));
    }
    ops.push(op(
        ops.len() as u64,
        200,
        OpType::Invoke,
        "read",
        Value::Null,
    ));
    ops.push(op(
        ops.len() as u64,
        200,
        OpType::Ok,
        "read",
        json!({"value": 99}),
    ));
    ops
}

#[test]
fn a_search_past_its_budget_is_unknown_never_valid() {
    let options = CheckOptions {
        budget: Duration::ZERO,
        ..CheckOptions::default()
    };
    let results = check_history(&hard_history(), &options);
    assert_eq!(results.valid, Validity::Unknown, "{results:#?}");
    let result = checker(&results, "linearizable-registers");
    assert!(result.summary.contains("undecided"), "{result:#?}");
}
