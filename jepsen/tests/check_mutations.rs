//! The mutation suite: plant one violation in a recorded, valid history
//! and require the checker that claims the rule to report it.
//!
//! The bases are real runs of `latchkey-jepsen test` against a release
//! build (network namespaces, nemesis `partition,kill,pause`, seed 11),
//! cut to a prefix to keep them small; `docs/jepsen-checkers.md` says how
//! each was recorded. First, every base must pass every checker that runs
//! on it. Then each mutant makes one minimal, realistic edit ([`mutations`])
//! — change a token, a lease or a read's value, acknowledge an op the
//! server refused, move a grant earlier, add one op — and names the
//! checker that must catch it and the words its finding must contain. A
//! mutant that escapes fails its own test, named for what it plants.
//!
//! Sites are picked by rule (e.g. the middle acknowledged write), not by
//! line number, and each plant asserts that its site has the shape the
//! violation needs, so a re-recorded base fails loudly rather than
//! planting nothing.

mod mutations;

use latchkey_jepsen::check::calls::Outcome;
use latchkey_jepsen::check::{check_history, CheckOptions, Results, Validity};
use latchkey_jepsen::history::{OpType, Process};
use mutations::{client_op, History, Site};
use serde_json::{json, Value};
use std::time::Duration;

const LOCK_FENCED: &str = "recorded-lock-fenced.jsonl";
const ELECTION: &str = "recorded-election.jsonl";
const REGISTER: &str = "recorded-register.jsonl";
const LEASE: &str = "recorded-lease.jsonl";

/// Plants one violation in a history and says what it changed.
type Plant = fn(&mut History) -> String;

/// Every search here takes milliseconds; the budget bounds the witness
/// shrinking of an invalid verdict (a quarter of it), which would otherwise
/// spend its full 15 s on each `fenced-mutex` mutant.
fn check(history: &History) -> Results {
    let options = CheckOptions {
        budget: Duration::from_secs(4),
        ..CheckOptions::default()
    };
    check_history(&history.ops, &options)
}

/// `plant` on `base` must make each `(checker, finding)` of `expected`
/// report invalid with a summary containing `finding`.
fn assert_caught(mutant: &str, base: &str, plant: Plant, expected: &[(&str, &str)]) {
    let original = History::load(base);
    let mut history = original.clone();
    let edit = plant(&mut history);
    assert_ne!(
        history, original,
        "mutant {mutant}: the edit changed nothing"
    );
    let results = check(&history);
    for (name, finding) in expected {
        let checker = results.checkers.iter().find(|c| c.name == *name);
        let checker = checker.unwrap_or_else(|| {
            panic!("mutant {mutant} ({edit}): checker {name} did not run: {results:#?}")
        });
        assert_eq!(
            checker.valid,
            Validity::Invalid,
            "mutant {mutant} ({edit}) escaped {name}: {}",
            checker.summary
        );
        assert!(
            checker.summary.contains(finding),
            "mutant {mutant} ({edit}): {name} caught it, but not as {finding:?}: {}",
            checker.summary
        );
    }
}

#[test]
fn every_recorded_base_passes_every_checker_before_it_is_mutated() {
    let bases: [(&str, &[&str]); 4] = [
        (
            LOCK_FENCED,
            &[
                "fenced-registers",
                "fenced-writes",
                "fenced-mutex",
                "fencing-tokens",
                "lease-overlap",
                "raft-leaders",
                "leases",
            ],
        ),
        (
            ELECTION,
            &[
                "fenced-mutex",
                "fencing-tokens",
                "lease-overlap",
                "election-leaders",
                "raft-leaders",
            ],
        ),
        (REGISTER, &["linearizable-registers", "raft-leaders"]),
        (LEASE, &["leases", "raft-leaders"]),
    ];
    for (base, expected) in bases {
        let results = check(&History::load(base));
        for name in expected {
            assert!(
                results.checkers.iter().any(|c| c.name == *name),
                "{base}: {name} did not run: {results:#?}"
            );
        }
        assert_eq!(results.valid, Validity::Valid, "{base}: {results:#?}");
    }
}

/// One test per mutant: `name: base, plant => [(checker, finding), …];`.
macro_rules! mutants {
    ($($name:ident: $base:expr, $plant:expr => [$(($checker:expr, $finding:expr)),+ $(,)?];)+) => {
        $(
            #[test]
            fn $name() {
                assert_caught(stringify!($name), $base, $plant, &[$(($checker, $finding)),+]);
            }
        )+
    };
}

mutants! {
    // fenced-writes, rule 1(a): the mutant of issue 13.
    an_acknowledgement_with_a_token_5_below_the_writers_grant_is_caught:
        LOCK_FENCED, lower_acknowledged_token_by_5 => [
            ("fenced-writes", "below the token of grant"),
        ];
    a_fenced_write_sent_and_acknowledged_with_a_token_5_below_its_grant_is_caught:
        LOCK_FENCED, lower_fenced_write_token_by_5 => [
            ("fenced-writes", "below the token of grant"),
            ("fenced-registers", "is not linearizable"),
        ];
    // fenced-writes, rule 1(b).
    a_write_below_the_token_an_earlier_acknowledged_write_stored_is_caught:
        LOCK_FENCED, raise_earlier_write_token => [
            ("fenced-writes", "to the same key, which had been acknowledged before it was invoked"),
            ("fenced-registers", "is not linearizable"),
        ];
    // fenced-writes, rule 1(c).
    a_write_acknowledged_after_its_grant_was_released_is_caught:
        LOCK_FENCED, repeat_write_after_release => [
            ("fenced-writes", "invoked after its grant was released"),
        ];
    // fenced-writes, rule 2, and the fenced register model.
    a_read_of_the_value_before_an_acknowledged_write_is_caught:
        LOCK_FENCED, read_overwritten_counter_value => [
            ("fenced-writes", "acknowledged write lost"),
            ("fenced-registers", "is not linearizable"),
        ];
    // fenced-writes, rule 3.
    two_acknowledged_writes_of_one_counter_value_are_caught:
        LOCK_FENCED, write_previous_counter_value => [
            ("fenced-writes", "lost increment"),
        ];
    // fenced-writes, rule 4.
    an_acknowledgement_of_a_value_other_than_the_one_written_is_caught:
        LOCK_FENCED, acknowledge_another_value => [
            ("fenced-writes", "acknowledgement disagrees with its write"),
        ];
    // fencing-tokens.
    a_token_granted_to_two_leases_is_caught:
        LOCK_FENCED, duplicate_grant_token => [
            ("fencing-tokens", "granted twice"),
            ("fenced-mutex", "is not linearizable"),
        ];
    a_token_counter_that_restarts_from_zero_after_a_node_restart_is_caught:
        LOCK_FENCED, reset_token_after_restart => [
            ("fencing-tokens", "token went backwards"),
        ];
    // fenced-mutex.
    a_release_acknowledged_for_a_lease_that_does_not_hold_the_lock_is_caught:
        LOCK_FENCED, release_with_other_lease => [
            ("fenced-mutex", "is not linearizable"),
        ];
    a_release_acknowledged_after_the_lock_changed_hands_is_caught:
        LOCK_FENCED, acknowledge_refused_release => [
            ("fenced-mutex", "is not linearizable"),
        ];
    // lease-overlap.
    a_lock_granted_while_the_holder_still_trusted_its_lease_is_caught:
        LOCK_FENCED, |history: &mut History| hand_over_early(history, "acquire") => [
            ("lease-overlap", "two holders at once"),
        ];
    a_leadership_granted_while_the_leader_still_trusted_its_lease_is_caught:
        ELECTION, |history: &mut History| hand_over_early(history, "campaign") => [
            ("lease-overlap", "two leaders at once"),
        ];
    // raft-leaders.
    a_second_raft_leader_in_one_term_is_caught:
        LOCK_FENCED, add_second_raft_leader => [
            ("raft-leaders", "two leaders in term"),
        ];
    // election-leaders.
    an_observer_shown_an_older_leadership_is_caught:
        ELECTION, observe_older_leadership => [
            ("election-leaders", "after token"),
        ];
    an_observation_naming_another_lease_for_a_token_is_caught:
        ELECTION, observe_other_lease => [
            ("election-leaders", "it shows lease"),
        ];
    an_observed_value_no_leader_published_is_caught:
        ELECTION, observe_unpublished_value => [
            ("election-leaders", "never published"),
        ];
    // fenced-mutex, elections.
    a_proclaim_acknowledged_for_a_deposed_leader_is_caught:
        ELECTION, acknowledge_refused_proclaim => [
            ("fenced-mutex", "is not linearizable"),
        ];
    // linearizable-registers.
    a_register_read_of_an_overwritten_value_is_caught:
        REGISTER, read_overwritten_register_value => [
            ("linearizable-registers", "is not linearizable"),
        ];
    // leases.
    a_lease_id_granted_twice_is_caught:
        LEASE, duplicate_lease_id => [
            ("leases", "granted twice"),
        ];
    a_keepalive_acknowledged_after_its_lease_was_revoked_is_caught:
        LEASE, keepalive_after_revoke => [
            ("leases", "came back"),
        ];
}

// ---- Plants ----

/// The middle element: away from start-up and from the cut at the end.
fn middle<T: Copy>(items: &[T], what: &str) -> T {
    assert!(!items.is_empty(), "the base has no {what}");
    items[items.len() / 2]
}

fn index(history: &History, at: usize) -> u64 {
    history.ops[at].index
}

fn lower_acknowledged_token_by_5(history: &mut History) -> String {
    let write = middle(&history.calls_ending("write", Outcome::Ok), "write ok");
    let ack = write.completed();
    let token = history.u64(ack, "token");
    history.set(ack, "token", json!(token - 5));
    format!(
        "acknowledgement op {} of write op {}: token {token} -> {}",
        index(history, ack),
        index(history, write.invoke),
        token - 5
    )
}

fn lower_fenced_write_token_by_5(history: &mut History) -> String {
    let write = middle(&history.calls_ending("write", Outcome::Ok), "write ok");
    let token = history.u64(write.invoke, "token");
    for at in [write.invoke, write.completed()] {
        history.set(at, "token", json!(token - 5));
    }
    format!(
        "write op {}: token {token} -> {}",
        index(history, write.invoke),
        token - 5
    )
}

/// The store kept a higher token for the key than the next write's: the
/// middle acknowledged write carries a token above its successor's.
fn raise_earlier_write_token(history: &mut History) -> String {
    let writes = history.calls_ending("write", Outcome::Ok);
    let i = writes.len() / 2;
    let (earlier, later) = (writes[i], writes[i + 1]);
    assert!(
        earlier.completed() < later.invoke,
        "the successor write must be invoked after the earlier one was acknowledged"
    );
    let raised = history.u64(later.invoke, "token") + 1;
    for at in [earlier.invoke, earlier.completed()] {
        history.set(at, "token", json!(raised));
    }
    format!(
        "write op {}: token -> {raised}, above the next write op {}",
        index(history, earlier.invoke),
        index(history, later.invoke)
    )
}

/// A holder's write applied a second time after its release completed
/// (a retried write acknowledged again), before the next grant.
fn repeat_write_after_release(history: &mut History) -> String {
    let release = middle(&history.calls_ending("release", Outcome::Ok), "release ok");
    let token = history.u64(release.invoke, "token");
    let writes = history.calls_ending("write", Outcome::Ok);
    let write = writes
        .iter()
        .find(|write| history.u64(write.invoke, "token") == token)
        .unwrap_or_else(|| panic!("the holder of token {token} wrote nothing"));
    let invoke = history.ops[write.invoke].clone();
    let key = invoke.key.as_deref();
    let process = history.fresh_process();
    let added = vec![
        client_op(process, OpType::Invoke, "write", key, invoke.value.clone()),
        client_op(process, OpType::Ok, "write", key, invoke.value.clone()),
    ];
    let at = release.completed() + 1;
    history.insert(at, added);
    format!(
        "added a write with token {token} (as op {}) right after release op {} completed",
        index(history, write.invoke),
        index(history, release.invoke)
    )
}

fn counter_value(history: &History, at: usize) -> Option<u64> {
    history.ops[at].value.get("value").and_then(Value::as_u64)
}

fn read_overwritten_counter_value(history: &mut History) -> String {
    let reads = history.calls_ending("read", Outcome::Ok);
    let reads: Vec<Site> = reads
        .into_iter()
        .filter(|read| counter_value(history, read.completed()).is_some_and(|v| v >= 2))
        .collect();
    let read = middle(&reads, "read of a counter value of 2 or more");
    let at = read.completed();
    let value = counter_value(history, at).unwrap_or_default();
    history.set(at, "value", json!(value - 1));
    format!(
        "read op {} returns {} instead of {value}",
        index(history, read.invoke),
        value - 1
    )
}

fn write_previous_counter_value(history: &mut History) -> String {
    let writes = history.calls_ending("write", Outcome::Ok);
    let write = middle(&writes, "write ok");
    let value = counter_value(history, write.invoke).unwrap_or_default();
    let repeated = value - 1;
    assert!(
        writes
            .iter()
            .any(|other| counter_value(history, other.invoke) == Some(repeated)),
        "no acknowledged write of {repeated} to repeat"
    );
    for at in [write.invoke, write.completed()] {
        history.set(at, "value", json!(repeated));
    }
    format!(
        "write op {} writes {repeated} instead of {value}",
        index(history, write.invoke)
    )
}

fn acknowledge_another_value(history: &mut History) -> String {
    let write = middle(&history.calls_ending("write", Outcome::Ok), "write ok");
    let ack = write.completed();
    let value = counter_value(history, ack).unwrap_or_default();
    history.set(ack, "value", json!(value + 1000));
    format!(
        "acknowledgement op {} says value {} for a write of {value}",
        index(history, ack),
        value + 1000
    )
}

fn lease_of(history: &History, at: usize) -> u64 {
    history.u64(at, "lease")
}

/// The middle grant takes the token of the grant before it, held by
/// another lease.
fn duplicate_grant_token(history: &mut History) -> String {
    let grants = history.calls_ending("acquire", Outcome::Ok);
    let i = (grants.len() / 2..grants.len())
        .find(|&i| {
            lease_of(history, grants[i - 1].completed()) != lease_of(history, grants[i].completed())
        })
        .expect("consecutive grants to different leases");
    let (earlier, later) = (grants[i - 1], grants[i]);
    let token = history.u64(earlier.completed(), "token");
    history.set(later.completed(), "token", json!(token));
    format!(
        "acquire op {} is granted token {token}, as acquire op {} was",
        index(history, later.invoke),
        index(history, earlier.invoke)
    )
}

/// The first grant after a node restart gets token 0, as a counter that
/// was not persisted would give.
fn reset_token_after_restart(history: &mut History) -> String {
    let restart = history.calls("start");
    let restart = restart.first().expect("the base has a node restart");
    let grants = history.calls_ending("acquire", Outcome::Ok);
    assert!(
        grants
            .iter()
            .all(|grant| history.u64(grant.completed(), "token") != 0),
        "token 0 is already granted"
    );
    let grant = grants
        .iter()
        .find(|grant| grant.completed() > restart.completed())
        .expect("a grant after the restart");
    let token = history.u64(grant.completed(), "token");
    history.set(grant.completed(), "token", json!(0));
    format!(
        "acquire op {} after the restart is granted token 0 instead of {token}",
        index(history, grant.invoke)
    )
}

fn release_with_other_lease(history: &mut History) -> String {
    let release = middle(&history.calls_ending("release", Outcome::Ok), "release ok");
    let lease = lease_of(history, release.invoke);
    let grants = history.calls_ending("grant", Outcome::Ok);
    let other = grants
        .iter()
        .map(|grant| lease_of(history, grant.completed()))
        .find(|&other| other != lease)
        .expect("a second lease");
    for at in [release.invoke, release.completed()] {
        history.set(at, "lease", json!(other));
    }
    format!(
        "release op {} names lease {other} instead of {lease}",
        index(history, release.invoke)
    )
}

fn acknowledge_refused(history: &mut History, f: &str) -> String {
    let refused = history.calls_ending(f, Outcome::Fail);
    let refused = refused
        .first()
        .unwrap_or_else(|| panic!("the base has no refused {f}"));
    history.acknowledge(refused.completed());
    format!(
        "{f} op {} (refused as stale) is acknowledged",
        index(history, refused.invoke)
    )
}

fn acknowledge_refused_release(history: &mut History) -> String {
    acknowledge_refused(history, "release")
}

fn acknowledge_refused_proclaim(history: &mut History) -> String {
    acknowledge_refused(history, "proclaim")
}

/// Of the grants that waited for their predecessor (invoked before it was
/// granted), the one that waited longest is granted right after its
/// predecessor instead: the server handed over a lock or leadership its
/// holder still trusted.
fn hand_over_early(history: &mut History, f: &str) -> String {
    let mut grants = history.calls_ending(f, Outcome::Ok);
    grants.sort_by_key(Site::completed);
    let time = |at: usize| history.ops[at].time;
    // A holder whose client was stopped holding the grant no longer
    // trusts it (lease-overlap's rule): handing over early is no overlap.
    let paused: Vec<&Value> = history
        .ops
        .iter()
        .filter(|op| op.value.get("target") == Some(&json!("client")))
        .filter_map(|op| op.value.get("token"))
        .collect();
    let trusted = |grant: &Site| !paused.contains(&history.field(grant.completed(), "token"));
    let (before, after) = grants
        .windows(2)
        .map(|pair| (pair[0], pair[1]))
        .filter(|(before, after)| after.invoke < before.completed() && trusted(before))
        .max_by_key(|(before, after)| time(after.completed()) - time(before.completed()))
        .unwrap_or_else(|| panic!("no {f} waited for its predecessor"));
    let waited_ns = time(after.completed()) - time(before.completed());
    history.move_earlier(after.completed(), before.completed() + 1);
    format!(
        "{f} op {} is granted right after {f} op {}, not {waited_ns} ns later",
        index(history, after.invoke),
        index(history, before.invoke)
    )
}

fn add_second_raft_leader(history: &mut History) -> String {
    let statuses = history.events("status");
    let at = *statuses
        .iter()
        .find(|&&at| history.ops[at].value.get("role") == Some(&json!("leader")))
        .expect("a leader status");
    let node = history.u64(at, "node");
    let mut second = history.ops[at].clone();
    second.value["node"] = json!(node % 5 + 1);
    history.insert(at + 1, vec![second]);
    format!(
        "added a status naming node {} leader in the term of op {}",
        node % 5 + 1,
        index(history, at)
    )
}

/// Non-null observations of the observer with the most of them.
fn busiest_observer(history: &History) -> Vec<usize> {
    let shown: Vec<usize> = history
        .events("observe")
        .into_iter()
        .filter(|&at| !history.ops[at].value.is_null())
        .collect();
    let process = |at: usize| history.ops[at].process;
    let mut observers: Vec<Process> = shown.iter().map(|&at| process(at)).collect();
    observers.sort();
    observers.dedup();
    let count = |observer: &Process| shown.iter().filter(|&&at| process(at) == *observer).count();
    let busiest = observers
        .iter()
        .max_by_key(|o| count(o))
        .expect("observers");
    shown
        .into_iter()
        .filter(|&at| process(at) == *busiest)
        .collect()
}

fn observe_older_leadership(history: &mut History) -> String {
    let seen = busiest_observer(history);
    let (first, k) = (seen[0], seen.len() / 2);
    let older = history.u64(first, "token");
    assert!(
        older < history.u64(seen[k - 1], "token"),
        "the observer saw no newer leadership"
    );
    history.ops[seen[k]].value = history.ops[first].value.clone();
    format!(
        "observation op {} shows the leadership of op {} (token {older}) again",
        index(history, seen[k]),
        index(history, first)
    )
}

fn observe_other_lease(history: &mut History) -> String {
    let at = middle(&busiest_observer(history), "observation");
    let lease = lease_of(history, at);
    let campaigns = history.calls_ending("campaign", Outcome::Ok);
    let other = campaigns
        .iter()
        .map(|campaign| lease_of(history, campaign.completed()))
        .find(|&other| other != lease)
        .expect("a second candidate lease");
    history.set(at, "lease", json!(other));
    format!(
        "observation op {} shows lease {other} instead of {lease}",
        index(history, at)
    )
}

fn observe_unpublished_value(history: &mut History) -> String {
    let at = middle(&busiest_observer(history), "observation");
    history.set(at, "value", json!("never-published"));
    format!(
        "observation op {} shows a value nobody published",
        index(history, at)
    )
}

/// The value a register write or cas leaves.
fn written(history: &History, site: &Site) -> Value {
    let op = &history.ops[site.invoke];
    let name = if op.f == "cas" { "to" } else { "value" };
    history.field(site.invoke, name).clone()
}

/// Of `writers`, the last acknowledged before position `at`, and the last
/// acknowledged before that one was invoked.
fn last_two_in_order(writers: &[Site], at: usize) -> (Option<Site>, Option<Site>) {
    let last_before = |at: usize| {
        writers
            .iter()
            .filter(|w| w.outcome == Outcome::Ok && w.completed() < at)
            .max_by_key(|w| w.completed())
            .copied()
    };
    let second = last_before(at);
    (second, second.and_then(|second| last_before(second.invoke)))
}

/// A read whose key had exactly two writers from the earlier one's invoke
/// to the read's completion, one after the other, returns the first one's
/// value: it missed the second, acknowledged before it was invoked.
fn read_overwritten_register_value(history: &mut History) -> String {
    let mut writers: Vec<Site> = history.calls("write");
    writers.extend(history.calls("cas"));
    writers.retain(|site| site.outcome != Outcome::Fail);
    let key = |history: &History, site: &Site| history.ops[site.invoke].key.clone();
    let reads = history.calls_ending("read", Outcome::Ok);
    for read in &reads[reads.len() / 2..] {
        let on_key: Vec<Site> = writers
            .iter()
            .filter(|w| key(history, w) == key(history, read))
            .copied()
            .collect();
        let (Some(second), Some(first)) = last_two_in_order(&on_key, read.invoke) else {
            continue;
        };
        let quiet = on_key.iter().all(|w| {
            w.invoke == first.invoke
                || w.invoke == second.invoke
                || w.invoke > read.completed()
                || (w.outcome != Outcome::Unknown && w.completed() < first.invoke)
        });
        let (old, new) = (written(history, &first), written(history, &second));
        let returned = history.field(read.completed(), "value").clone();
        if !quiet || old == new || returned != new {
            continue;
        }
        history.set(read.completed(), "value", old.clone());
        return format!(
            "read op {} returns {old}, overwritten by op {} before it began",
            index(history, read.invoke),
            index(history, second.invoke)
        );
    }
    panic!("no read after two quiet writes of different values");
}

fn duplicate_lease_id(history: &mut History) -> String {
    let grants = history.calls_ending("grant", Outcome::Ok);
    let (first, second) = (grants[0], grants[1]);
    let lease = lease_of(history, first.completed());
    history.set(second.completed(), "lease", json!(lease));
    format!(
        "grant op {} returns lease {lease}, as grant op {} did",
        index(history, second.invoke),
        index(history, first.invoke)
    )
}

fn keepalive_after_revoke(history: &mut History) -> String {
    let revokes = history.calls_ending("revoke", Outcome::Ok);
    let revoke = revokes.first().expect("a revoke ok");
    let lease = lease_of(history, revoke.invoke);
    let process = history.fresh_process();
    let added = vec![
        client_op(
            process,
            OpType::Invoke,
            "keepalive",
            None,
            json!({"lease": lease}),
        ),
        client_op(
            process,
            OpType::Ok,
            "keepalive",
            None,
            json!({"lease": lease, "remaining_ms": 1000}),
        ),
    ];
    history.insert(revoke.completed() + 1, added);
    format!(
        "added a keepalive of lease {lease} acknowledged right after revoke op {}",
        index(history, revoke.invoke)
    )
}
