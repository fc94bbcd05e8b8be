use super::*;
use crate::coordination::{Op, TtlBounds};
use crate::types::LogIndex;

fn state_with_lease(ttl_ms: u64) -> (Coordination, LeaseId) {
    let mut state = Coordination::new(TtlBounds {
        min_ttl_ms: 1,
        max_ttl_ms: 1_000_000,
    });
    state.apply(LogIndex(1), Op::GrantLease { ttl_ms });
    (state, LeaseId(1))
}

/// A clock without drift, leading and ready at `start`.
fn leading(state: &Coordination, start: Instant, drift_ppm: u64) -> LeaseClock<u32> {
    let mut clock = LeaseClock::new(LeaseClockSettings {
        max_clock_drift_ppm: drift_ppm,
        unsafe_unconfirmed_renewals: false,
    });
    clock.lead(start, 1, state);
    clock.applied(1);
    clock
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Starts a round at `at` and confirms it at once; returns the answers.
fn confirm(clock: &mut LeaseClock<u32>, id: u64, at: Instant) -> Vec<(u32, KeepAlive)> {
    assert!(clock.round_wanted(at), "a round is wanted");
    clock.start_round(id, at);
    answers(clock.finish_round(id, at).expect("round in flight"))
}

fn answers(confirmed: Confirmed<u32>) -> Vec<(u32, KeepAlive)> {
    confirmed
        .answers
        .into_iter()
        .map(|answered| (answered.reply, answered.answer))
        .collect()
}

#[test]
fn new_leader_restarts_every_lease_at_its_full_ttl_stretched_by_the_drift_bound() {
    let (state, lease) = state_with_lease(1000);
    let start = Instant::now();
    let mut clock = leading(&state, start, 10_000);
    assert_eq!(clock.remaining(start, lease), Some(ms(1010)));
    assert!(clock.overdue(start + ms(1009)).is_empty());
    assert_eq!(clock.overdue(start + ms(1010)), vec![lease]);
}

#[test]
fn keepalives_wait_until_the_leaders_first_entry_is_applied() {
    let (state, lease) = state_with_lease(1000);
    let mut clock = LeaseClock::new(LeaseClockSettings::default());
    let start = Instant::now();
    clock.lead(start, 5, &state);
    clock.applied(4);
    assert_eq!(
        clock.keep_alive(start, lease, 1),
        Some((1, KeepAlive::NotReady))
    );
    assert!(
        !clock.round_wanted(start + Duration::from_secs(10)),
        "no rounds, and so no expiry, before ready"
    );
    clock.applied(5);
    assert_eq!(clock.keep_alive(start, lease, 2), None, "now it waits");
}

#[test]
fn a_keepalive_is_answered_only_by_a_round_that_started_after_it_arrived() {
    let (state, lease) = state_with_lease(1000);
    let start = Instant::now();
    let mut clock = leading(&state, start, 0);
    assert!(!clock.round_wanted(start), "nothing to confirm yet");
    clock.keep_alive(start, lease, 1);
    assert!(clock.round_wanted(start));
    clock.start_round(10, start);
    assert!(!clock.round_wanted(start), "the round covers it");
    // A second keepalive arrives while round 10 is in flight.
    let later = start + ms(5);
    clock.keep_alive(later, lease, 2);
    assert!(
        clock.round_wanted(later),
        "round 10 started too early for it"
    );
    clock.start_round(11, later);
    let confirmed = clock.finish_round(10, later + ms(1)).expect("round 10");
    assert_eq!(
        answers(confirmed),
        vec![(1, KeepAlive::Renewed { ttl_ms: 1000 })],
        "only the keepalive that arrived before round 10 started"
    );
    let confirmed = clock.finish_round(11, later + ms(2)).expect("round 11");
    assert_eq!(
        answers(confirmed),
        vec![(2, KeepAlive::Renewed { ttl_ms: 1000 })]
    );
    assert!(clock.finish_round(11, later).is_none(), "already finished");
}

#[test]
fn confirming_a_later_round_confirms_the_earlier_ones() {
    let (state, lease) = state_with_lease(1000);
    let start = Instant::now();
    let mut clock = leading(&state, start, 0);
    clock.keep_alive(start, lease, 1);
    clock.start_round(1, start);
    clock.keep_alive(start + ms(1), lease, 2);
    clock.start_round(2, start + ms(1));
    let confirmed = clock.finish_round(2, start + ms(2)).expect("round 2");
    assert_eq!(confirmed.answers.len(), 2);
    assert!(!clock.is_round(1), "round 1 ended with round 2");
}

#[test]
fn keepalive_pushes_the_deadline_back_from_its_arrival() {
    let (state, lease) = state_with_lease(1000);
    let start = Instant::now();
    let mut clock = leading(&state, start, 0);
    let arrival = start + ms(900);
    clock.keep_alive(arrival, lease, 1);
    // Confirmed later than it arrived: the deadline counts from arrival.
    confirm(&mut clock, 1, arrival + ms(50));
    assert_eq!(clock.remaining(arrival, lease), Some(ms(1000)));
    assert!(clock.overdue(start + ms(1899)).is_empty());
    assert_eq!(clock.overdue(start + ms(1900)), vec![lease]);
}

#[test]
fn a_lease_granted_after_a_walk_is_found_overdue_however_short_its_ttl() {
    let (state, long) = state_with_lease(10_000);
    let start = Instant::now();
    let mut clock = leading(&state, start, 0);
    // The walk learns that nothing is due before 10 s...
    assert!(clock.overdue(start + ms(100)).is_empty());
    // ...and a grant with an earlier deadline lowers that.
    let short = LeaseId(2);
    clock.granted(start + ms(100), short, 500);
    assert!(clock.overdue(start + ms(599)).is_empty());
    assert_eq!(clock.overdue(start + ms(600)), vec![short]);
    clock.removed(short);
    assert!(clock.overdue(start + ms(9_999)).is_empty());
    assert_eq!(clock.overdue(start + ms(10_000)), vec![long]);
}

#[test]
fn a_renewal_after_a_walk_is_still_seen_when_its_new_deadline_passes() {
    let (state, lease) = state_with_lease(1000);
    let start = Instant::now();
    let mut clock = leading(&state, start, 0);
    assert!(clock.overdue(start + ms(10)).is_empty());
    // Renewed at 900 ms: the deadline moves from 1000 to 1900 ms, after
    // the walk that learnt 1000 ms.
    clock.keep_alive(start + ms(900), lease, 1);
    confirm(&mut clock, 1, start + ms(900));
    assert!(clock.overdue(start + ms(1000)).is_empty());
    assert!(clock.overdue(start + ms(1899)).is_empty());
    assert_eq!(clock.overdue(start + ms(1900)), vec![lease]);
}

#[test]
fn a_new_term_walks_the_deadlines_again() {
    let (state, lease) = state_with_lease(1000);
    let start = Instant::now();
    let mut clock = leading(&state, start, 0);
    assert!(clock.overdue(start + ms(10)).is_empty());
    clock.follow();
    assert!(
        clock.overdue(start + ms(2000)).is_empty(),
        "a follower has no deadlines"
    );
    // Leading again restarts the lease from then.
    clock.lead(start + ms(2000), 2, &state);
    clock.applied(2);
    assert!(clock.overdue(start + ms(2999)).is_empty());
    assert_eq!(clock.overdue(start + ms(3000)), vec![lease]);
}

#[test]
fn keepalive_after_the_deadline_does_not_revive_the_lease() {
    let (state, lease) = state_with_lease(1000);
    let start = Instant::now();
    let mut clock = leading(&state, start, 0);
    let late = start + ms(1000);
    assert!(clock.round_wanted(late), "an overdue lease wants a round");
    clock.start_round(7, late);
    let confirmed = clock.finish_round(7, late).expect("round 7");
    assert_eq!(confirmed.expire, vec![lease]);
    clock.expiry_proposed(&confirmed.expire, late);
    // The expiry is proposed; its entry has not applied yet.
    let keepalive = late + ms(5);
    clock.keep_alive(keepalive, lease, 1);
    assert_eq!(
        confirm(&mut clock, 8, keepalive),
        vec![(1, KeepAlive::NotFound)]
    );
    assert_eq!(
        clock.remaining(keepalive, lease),
        Some(Duration::ZERO),
        "still doomed"
    );
}

#[test]
fn a_lease_that_runs_out_while_its_keepalive_waits_stays_doomed() {
    let (state, lease) = state_with_lease(1000);
    let start = Instant::now();
    let mut clock = leading(&state, start, 0);
    clock.keep_alive(start + ms(999), lease, 1);
    assert_eq!(
        confirm(&mut clock, 1, start + ms(1000)),
        vec![(1, KeepAlive::NotFound)]
    );
}

#[test]
fn overdue_leases_are_named_once_until_their_expiry_has_had_time_to_apply() {
    let (state, lease) = state_with_lease(10);
    let start = Instant::now();
    let mut clock = leading(&state, start, 0);
    let later = start + ms(20);
    clock.start_round(1, later);
    let confirmed = clock.finish_round(1, later).expect("round 1");
    assert_eq!(confirmed.expire, vec![lease]);
    clock.expiry_proposed(&confirmed.expire, later);
    assert!(!clock.round_wanted(later), "nothing new to expire");
    let retry = later + EXPIRY_ROUND_TIMEOUT;
    assert!(clock.round_wanted(retry), "the expiry never applied");
    clock.removed(lease);
    assert!(!clock.round_wanted(retry), "it applied");
}

#[test]
fn keepalives_no_round_confirms_in_time_are_answered_unconfirmed() {
    let (state, lease) = state_with_lease(10_000);
    let start = Instant::now();
    let mut clock = leading(&state, start, 0);
    clock.keep_alive(start, lease, 1);
    clock.keep_alive(start + ms(500), lease, 2);
    assert!(clock
        .unconfirmed(start + CONFIRM_TIMEOUT - ms(1))
        .is_empty());
    assert_eq!(clock.unconfirmed(start + CONFIRM_TIMEOUT), vec![1]);
}

#[test]
fn rounds_in_flight_are_bounded_and_abandoned_after_a_timeout() {
    let (state, lease) = state_with_lease(10_000);
    let start = Instant::now();
    let mut clock = leading(&state, start, 0);
    for id in 0..MAX_ROUNDS_IN_FLIGHT as u64 {
        clock.keep_alive(start, lease, id as u32);
        assert!(clock.round_wanted(start));
        clock.start_round(id, start);
    }
    clock.keep_alive(start, lease, 99);
    assert!(!clock.round_wanted(start), "too many in flight");
    assert!(clock.round_wanted(start + EXPIRY_ROUND_TIMEOUT));
    assert!(!clock.is_round(0), "abandoned");
}

#[test]
fn stepping_down_hands_back_every_waiting_keepalive() {
    let (state, lease) = state_with_lease(1000);
    let start = Instant::now();
    let mut clock = leading(&state, start, 0);
    clock.keep_alive(start, lease, 1);
    clock.keep_alive(start, lease, 2);
    assert_eq!(clock.follow(), vec![1, 2]);
    assert_eq!(
        clock.keep_alive(start, lease, 3),
        Some((3, KeepAlive::NotReady))
    );
    assert!(!clock.round_wanted(start + Duration::from_secs(60)));
}

#[test]
fn the_unsafe_switch_renews_without_a_round() {
    let (state, lease) = state_with_lease(1000);
    let mut clock = LeaseClock::new(LeaseClockSettings {
        max_clock_drift_ppm: 0,
        unsafe_unconfirmed_renewals: true,
    });
    let start = Instant::now();
    clock.lead(start, 1, &state);
    clock.applied(1);
    assert_eq!(
        clock.keep_alive(start + ms(500), lease, 1),
        Some((1, KeepAlive::Renewed { ttl_ms: 1000 }))
    );
    assert!(!clock.round_wanted(start + ms(500)));
}

#[test]
fn keepalives_taken_unanswered_renew_nothing_and_later_ones_still_do() {
    let (state, lease) = state_with_lease(1000);
    let start = Instant::now();
    let mut clock = leading(&state, start, 0);
    assert_eq!(clock.keep_alive(start + ms(500), lease, 1), None);
    assert_eq!(clock.take_waiting(), vec![1]);
    assert!(clock.leading());
    // A round confirmed after it answers nobody and renews nothing.
    clock.start_round(7, start + ms(600));
    let confirmed = clock.finish_round(7, start + ms(600)).expect("in flight");
    assert_eq!(answers(confirmed), vec![]);
    assert_eq!(clock.remaining(start + ms(600), lease), Some(ms(400)));
    assert_eq!(clock.keep_alive(start + ms(700), lease, 2), None);
    assert_eq!(
        confirm(&mut clock, 8, start + ms(800)),
        vec![(2, KeepAlive::Renewed { ttl_ms: 1000 })]
    );
    assert_eq!(clock.remaining(start + ms(800), lease), Some(ms(900)));
}
