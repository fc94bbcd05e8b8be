//! The leader's lease clock: when each lease runs out, on this node's
//! monotonic clock, and which renewals a quorum has confirmed.
//!
//! Only the leader keeps deadlines; a keepalive renews one in memory, with
//! no Raft write. Expiry is decided here but takes effect only through a
//! committed `ExpireLeases` entry, proposed after a confirmation round has
//! shown that this node is still the leader (a deposed or paused leader
//! cannot revoke leases).
//!
//! # Confirmation rounds
//! A round is a ReadIndex request of the node's own: raft-rs broadcasts a
//! heartbeat carrying it and reports it confirmed once a quorum answered a
//! heartbeat sent after the request was made. Rounds are numbered in the
//! order they start; confirming one confirms every earlier one too.
//!
//! A keepalive is **answered only after a round that started after it
//! arrived is confirmed** ([`LeaseClock::keep_alive`] queues it;
//! [`LeaseClock::finish_round`] answers it). Why this closes the gap that a
//! leader cut off from its peers (but not from its clients) used to leave:
//! a successor is elected only with the votes of a majority, and every
//! majority shares a member with the quorum that confirmed the round. That
//! member answered the round's heartbeat while it still followed this
//! leader's term, and votes in a later term only after that. So any
//! successor took over *after the round started*, hence after the keepalive
//! arrived, hence after the client sent it. The successor restarts every
//! lease at its full TTL from when it takes over, which is then later than
//! the client's own starting point (its send time). No election timeout,
//! vote lease, tick phase or follower restart enters the argument. A
//! keepalive that no round confirms within [`CONFIRM_TIMEOUT`] is answered
//! "not confirmed" and the client tries elsewhere.
//!
//! # Clock drift
//! Clocks may run at rates that differ from real time by at most the
//! configured drift `ρ` ([`LeaseClock::new`]'s `max_clock_drift_ppm`). A
//! deadline here is `start + TTL × (1 + ρ)` on this node's clock, which is
//! at least `TTL` of real time; the client counts `TTL × (1 − ρ) − margin`
//! from its send time on its own clock, which is at most `TTL` of real
//! time. See `docs/semantics.md`, Invariant 4, for the whole argument.
//!
//! # A new leader, and leases past their deadline
//! A new leader restarts every lease at its full TTL when it takes over,
//! and answers keepalives only after it has applied an entry of its own term
//! ([`LeaseClock::ready`]): by then every expiry proposed by an earlier
//! leader has been applied, so no earlier leader's decision can land after a
//! keepalive this leader acknowledged.
//!
//! A lease past its deadline is never renewed (the answer is `NotFound`):
//! an `ExpireLeases` entry naming it may already be proposed, and a renewal
//! acknowledged now would be undone when that entry applies. Every lease in
//! a proposed expiry has a deadline at or before the proposal, so this
//! closes that race. (Found by the deterministic simulator, seed 15.)
//!
//! # Not done yet
//! - The number of keepalives waiting for a round is bounded only by the
//!   node's inbox and the keepalive streams feeding it.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::coordination::{Coordination, LeaseId};

/// Most leases expired by one entry.
pub const MAX_EXPIRED_PER_ENTRY: usize = 1000;
/// A round that gets no answer in this time is abandoned, and an expiry
/// proposal that has not applied in this time may be proposed again.
pub const EXPIRY_ROUND_TIMEOUT: Duration = Duration::from_secs(5);
/// A keepalive that no round confirms in this time is answered
/// [`KeepAlive::Unconfirmed`]: this node has probably lost its leadership.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(1);
/// Most confirmation rounds in flight at once.
pub const MAX_ROUNDS_IN_FLIGHT: usize = 8;
/// Parts per million: the unit of the drift bound.
const PPM: u64 = 1_000_000;

/// How the clock renews and how far clocks may drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseClockSettings {
    /// Largest difference between any clock's rate and real time, in parts
    /// per million.
    pub max_clock_drift_ppm: u64,
    /// Renew at once, without waiting for a confirmation round. Breaks
    /// Invariant 4 on purpose, for tests that must show the rounds matter.
    pub unsafe_unconfirmed_renewals: bool,
}

impl Default for LeaseClockSettings {
    fn default() -> Self {
        LeaseClockSettings {
            max_clock_drift_ppm: crate::config::DEFAULT_MAX_CLOCK_DRIFT_PPM,
            unsafe_unconfirmed_renewals: false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    ttl: Duration,
}

/// A confirmation round in flight.
#[derive(Debug, Clone, Copy)]
struct Round {
    /// The ReadIndex request id.
    id: u64,
    /// The order in which rounds started, counted from 0 in each term.
    number: u64,
    started: Instant,
}

/// A keepalive waiting for a round that started after it arrived.
#[derive(Debug)]
struct Waiting<R> {
    lease: LeaseId,
    received: Instant,
    /// The first round number that may confirm it.
    round_needed: u64,
    reply: R,
}

/// The answer to a keepalive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepAlive {
    Renewed {
        ttl_ms: u64,
    },
    NotFound,
    /// This node leads but has not yet applied an entry of its term.
    NotReady,
    /// No quorum confirmed this leader in time after the keepalive arrived.
    Unconfirmed,
}

/// A keepalive answered by a confirmed round.
#[derive(Debug, PartialEq, Eq)]
pub struct Answered<R> {
    pub lease: LeaseId,
    pub reply: R,
    pub answer: KeepAlive,
}

/// What a confirmed round decided.
#[derive(Debug)]
pub struct Confirmed<R> {
    /// Keepalives the round covered, with their answers.
    pub answers: Vec<Answered<R>>,
    /// Leases past their deadline and not yet proposed for expiry.
    pub expire: Vec<LeaseId>,
}

/// Lease deadlines while this node leads; empty otherwise. `R` is the
/// caller's handle for answering a keepalive later.
#[derive(Debug)]
pub struct LeaseClock<R> {
    settings: LeaseClockSettings,
    leading: bool,
    /// The index of this leader's first entry; keepalives wait until it is applied.
    ready_index: u64,
    ready: bool,
    deadlines: BTreeMap<LeaseId, Deadline>,
    /// No deadline is earlier than this; `None` when not known. Finding the
    /// overdue leases means a walk over every deadline, and this bound
    /// skips it until one may be due: renewals only move deadlines later,
    /// removals only drop them, and a grant lowers the bound to its own.
    earliest: Option<Instant>,
    /// Rounds in flight, oldest first.
    rounds: VecDeque<Round>,
    /// Rounds started in this term; the next round's number.
    rounds_started: u64,
    waiting: VecDeque<Waiting<R>>,
    /// Leases named in an expiry proposal that has not applied yet.
    expiring: BTreeMap<LeaseId, Instant>,
}

impl<R> LeaseClock<R> {
    pub fn new(settings: LeaseClockSettings) -> LeaseClock<R> {
        LeaseClock {
            settings,
            leading: false,
            ready_index: 0,
            ready: false,
            deadlines: BTreeMap::new(),
            earliest: None,
            rounds: VecDeque::new(),
            rounds_started: 0,
            waiting: VecDeque::new(),
            expiring: BTreeMap::new(),
        }
    }

    /// `ttl` stretched by the drift bound: at least `ttl` of real time on a
    /// clock that runs fast by up to the bound.
    fn stretched(&self, ttl: Duration) -> Duration {
        stretch(ttl, self.settings.max_clock_drift_ppm)
    }

    fn deadline_from(&self, start: Instant, ttl_ms: u64) -> Deadline {
        let ttl = Duration::from_millis(ttl_ms);
        Deadline {
            at: start + self.stretched(ttl),
            ttl,
        }
    }

    /// Starts leading: every lease gets its full TTL from `now`.
    pub fn lead(&mut self, now: Instant, ready_index: u64, state: &Coordination) {
        self.leading = true;
        self.ready = false;
        self.ready_index = ready_index;
        self.rounds.clear();
        self.rounds_started = 0;
        self.expiring.clear();
        self.deadlines = state
            .leases()
            .map(|lease| (lease.id, self.deadline_from(now, lease.ttl_ms)))
            .collect();
        self.earliest = None;
    }

    /// Stops leading: deadlines are meaningless on a follower. Returns the
    /// keepalives that were waiting, for the caller to refuse.
    pub fn follow(&mut self) -> Vec<R> {
        self.leading = false;
        self.ready = false;
        self.deadlines.clear();
        self.earliest = None;
        self.rounds.clear();
        self.expiring.clear();
        self.waiting
            .drain(..)
            .map(|waiting| waiting.reply)
            .collect()
    }

    /// The keepalives waiting for a round, taken unanswered for the caller
    /// to refuse (a leader whose disk hangs); their leases are not
    /// renewed. The clock goes on leading.
    pub fn take_waiting(&mut self) -> Vec<R> {
        self.waiting
            .drain(..)
            .map(|waiting| waiting.reply)
            .collect()
    }

    pub fn leading(&self) -> bool {
        self.leading
    }

    /// Called after each apply; the clock is ready once this leader's first
    /// entry is applied.
    pub fn applied(&mut self, applied_index: u64) {
        if self.leading && applied_index >= self.ready_index {
            self.ready = true;
        }
    }

    pub fn ready(&self) -> bool {
        self.leading && self.ready
    }

    /// A lease was granted (applied) while leading.
    pub fn granted(&mut self, now: Instant, lease: LeaseId, ttl_ms: u64) {
        if self.leading {
            let deadline = self.deadline_from(now, ttl_ms);
            self.deadlines.insert(lease, deadline);
            self.earliest = self.earliest.map(|earliest| earliest.min(deadline.at));
        }
    }

    /// A lease was revoked or expired (applied).
    pub fn removed(&mut self, lease: LeaseId) {
        self.deadlines.remove(&lease);
        self.expiring.remove(&lease);
    }

    /// A keepalive for `lease` arrived at `now`. Answered at once when this
    /// node cannot renew (not ready) or renews unconfirmed (test switch);
    /// otherwise queued until a round that starts after now is confirmed.
    pub fn keep_alive(&mut self, now: Instant, lease: LeaseId, reply: R) -> Option<(R, KeepAlive)> {
        if !self.ready() {
            return Some((reply, KeepAlive::NotReady));
        }
        if self.settings.unsafe_unconfirmed_renewals {
            let answer = self.renew(now, now, lease);
            return Some((reply, answer));
        }
        self.waiting.push_back(Waiting {
            lease,
            received: now,
            round_needed: self.rounds_started,
            reply,
        });
        None
    }

    /// Renews `lease` from `received` (the keepalive's arrival), judged at
    /// `now`: a lease already past its deadline stays doomed.
    fn renew(&mut self, now: Instant, received: Instant, lease: LeaseId) -> KeepAlive {
        let drift_ppm = self.settings.max_clock_drift_ppm;
        match self.deadlines.get_mut(&lease) {
            // Doomed: an expiry naming it may be in flight (see module docs).
            Some(deadline) if deadline.at <= now => KeepAlive::NotFound,
            Some(deadline) => {
                deadline.at = deadline.at.max(received + stretch(deadline.ttl, drift_ppm));
                KeepAlive::Renewed {
                    ttl_ms: deadline.ttl.as_millis() as u64,
                }
            }
            None => KeepAlive::NotFound,
        }
    }

    /// Time left on `lease`, if this node leads and knows it.
    pub fn remaining(&self, now: Instant, lease: LeaseId) -> Option<Duration> {
        self.deadlines
            .get(&lease)
            .map(|deadline| deadline.at.saturating_duration_since(now))
    }

    /// Whether a new round should start now: some keepalive waits that no
    /// round in flight covers, or a lease is overdue and no round is in
    /// flight. Rounds abandoned after [`EXPIRY_ROUND_TIMEOUT`] are dropped.
    pub fn round_wanted(&mut self, now: Instant) -> bool {
        if !self.ready() {
            return false;
        }
        while let Some(round) = self.rounds.front() {
            if now.duration_since(round.started) < EXPIRY_ROUND_TIMEOUT {
                break;
            }
            self.rounds.pop_front();
        }
        if self.rounds.len() >= MAX_ROUNDS_IN_FLIGHT {
            return false;
        }
        let uncovered = self
            .waiting
            .back()
            .is_some_and(|waiting| waiting.round_needed >= self.rounds_started);
        uncovered || (self.rounds.is_empty() && !self.overdue(now).is_empty())
    }

    /// Records that a round started with ReadIndex request `id`.
    pub fn start_round(&mut self, id: u64, now: Instant) {
        self.rounds.push_back(Round {
            id,
            number: self.rounds_started,
            started: now,
        });
        self.rounds_started += 1;
    }

    /// Whether `id` is a round in flight.
    pub fn is_round(&self, id: u64) -> bool {
        self.rounds.iter().any(|round| round.id == id)
    }

    /// Round `id` was confirmed by a quorum (with every earlier round):
    /// answers the keepalives that arrived before it started, and names the
    /// overdue leases to expire. `None` if `id` is not a round in flight.
    pub fn finish_round(&mut self, id: u64, now: Instant) -> Option<Confirmed<R>> {
        let position = self.rounds.iter().position(|round| round.id == id)?;
        let number = self.rounds[position].number;
        self.rounds.drain(..=position);
        let mut answers = Vec::new();
        while self
            .waiting
            .front()
            .is_some_and(|waiting| waiting.round_needed <= number)
        {
            // Checked just above.
            let waiting = self.waiting.pop_front().expect("front exists");
            let answer = self.renew(now, waiting.received, waiting.lease);
            answers.push(Answered {
                lease: waiting.lease,
                reply: waiting.reply,
                answer,
            });
        }
        let expire = self.overdue(now);
        Some(Confirmed { answers, expire })
    }

    /// Keepalives that waited longer than [`CONFIRM_TIMEOUT`], for the
    /// caller to answer [`KeepAlive::Unconfirmed`].
    pub fn unconfirmed(&mut self, now: Instant) -> Vec<R> {
        let mut stale = Vec::new();
        while self
            .waiting
            .front()
            .is_some_and(|waiting| now.duration_since(waiting.received) >= CONFIRM_TIMEOUT)
        {
            // Checked just above.
            stale.push(self.waiting.pop_front().expect("front exists").reply);
        }
        stale
    }

    /// Leases whose deadline has passed and that are not in an expiry
    /// proposal made within [`EXPIRY_ROUND_TIMEOUT`], at most
    /// [`MAX_EXPIRED_PER_ENTRY`]. Walks the deadlines only when the
    /// earliest may have passed, and learns the earliest as it walks.
    fn overdue(&mut self, now: Instant) -> Vec<LeaseId> {
        if self.earliest.is_some_and(|earliest| now < earliest) {
            return Vec::new();
        }
        let mut overdue = Vec::new();
        let mut earliest: Option<Instant> = None;
        for (lease, deadline) in &self.deadlines {
            earliest = Some(earliest.map_or(deadline.at, |e| e.min(deadline.at)));
            if deadline.at > now || overdue.len() == MAX_EXPIRED_PER_ENTRY {
                continue;
            }
            let proposed_recently = self
                .expiring
                .get(lease)
                .is_some_and(|at| now.duration_since(*at) < EXPIRY_ROUND_TIMEOUT);
            if !proposed_recently {
                overdue.push(*lease);
            }
        }
        self.earliest = earliest;
        overdue
    }

    /// The leases in an expiry just proposed; not named again until
    /// [`EXPIRY_ROUND_TIMEOUT`] passes without the entry applying.
    pub fn expiry_proposed(&mut self, leases: &[LeaseId], now: Instant) {
        for lease in leases {
            self.expiring.insert(*lease, now);
        }
    }
}

/// `ttl × (1 + drift)`, with the drift in parts per million.
fn stretch(ttl: Duration, drift_ppm: u64) -> Duration {
    let nanos = ttl.as_nanos() * u128::from(PPM + drift_ppm) / u128::from(PPM);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
