//! The background task that keeps one lease alive.
//!
//! Every keepalive interval (a third of the TTL, or less if configured) it sends one renewal on the
//! client's `KeepAlive` stream to the leader, which the client's other
//! leases share (`crate::renewals`), and waits for its answer before
//! sending the next, so each answer is matched to the send time it extends
//! the deadline from. An acknowledged renewal sent at `t` moves the deadline to
//! `t + TTL × (1 − drift) − margin` (see `crate::lease`); it never moves it
//! back. The answer also lists the lease's grants, which the lock guards
//! and leaderships watch.
//!
//! A failed renewal (broken stream, no answer in time, not the leader) marks
//! the lease failing — [`crate::LeaseState::Jeopardy`] — and retries after
//! a short jittered pause: at the leader a follower named, or else at the
//! next endpoint. An answer that the lease is not
//! found ends it. The task returns when the lease ends, when the deadline
//! passes with no acknowledged renewal, or when it is aborted because the
//! last lease handle was dropped.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use latchkey_proto::v1::LeaseKeepAliveResponse;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::{Inner, BACKOFF_FIRST, BACKOFF_LONGEST};
use crate::error::describe_status;
use crate::lease::{HeldGrants, LeaseLost, LeaseStatus};
use crate::retry::{classify, Backoff, Verdict};
use crate::types::LeaseId;

pub(crate) struct Keepalive {
    pub(crate) client: Arc<Inner>,
    pub(crate) lease: LeaseId,
    /// Time between renewals.
    pub(crate) interval: Duration,
    pub(crate) status: Arc<watch::Sender<LeaseStatus>>,
}

/// The outcome of one acknowledged renewal.
enum Renewal {
    /// Renewed: the sent-at time and the TTL the server counts from then.
    Renewed {
        sent: Instant,
        ttl: Duration,
        /// Tokens of the grants the lease holds.
        grants: BTreeSet<u64>,
    },
    NotFound,
}

impl Keepalive {
    pub(crate) async fn run(self) {
        let interval = self.interval;
        let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_LONGEST);
        let mut target = self.client.router.first_target();
        let mut next_send = self.status.borrow().last_ack_sent + interval;
        // Bounded: each pass waits until the next renewal or a pause, and
        // the loop ends once the deadline passes with nothing acknowledged.
        loop {
            let deadline = self.status.borrow().deadline;
            tokio::time::sleep_until(next_send.min(deadline)).await;
            if Instant::now() >= deadline {
                self.end(LeaseLost::DeadlinePassed);
                return;
            }
            let renewed = self.renew(&target, interval).await;
            match renewed {
                Ok(Renewal::Renewed { sent, ttl, grants }) => {
                    self.acknowledged(sent, ttl, grants);
                    backoff.reset(BACKOFF_FIRST);
                    next_send = sent + interval;
                }
                Ok(Renewal::NotFound) => {
                    self.end(LeaseLost::NotFound);
                    return;
                }
                Err(status) => {
                    self.status
                        .send_if_modified(|s| !std::mem::replace(&mut s.failing, true));
                    let (next, pause) = self.after_failure(&target, &status, &mut backoff);
                    target = next;
                    next_send = Instant::now() + pause;
                }
            }
        }
    }

    /// Sends one renewal on the client's stream to `target` and waits for
    /// its answer.
    async fn renew(&self, target: &str, interval: Duration) -> Result<Renewal, tonic::Status> {
        let deadline = self.status.borrow().deadline;
        let bound = self.client.options.call_timeout.min(interval);
        let until = (Instant::now() + bound).min(deadline);
        let attempt = async {
            // Taken before the renewal is handed to the stream: the answer
            // is counted from no later than the server received it.
            let sent = Instant::now();
            let answer = self
                .client
                .renewals
                .renew(&self.client.router, target, self.lease)
                .await?;
            self.client.cluster_drift(answer.max_clock_drift_ppm);
            Ok(renewal(sent, answer))
        };
        match tokio::time::timeout_at(until, attempt).await {
            Ok(result) => result,
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no keepalive answer from {target} within {bound:?}"
            ))),
        }
    }

    fn acknowledged(&self, sent: Instant, ttl: Duration, grants: BTreeSet<u64>) {
        let trusted = self.client.trusted_for(ttl);
        self.status.send_modify(|status| {
            status.deadline = status.deadline.max(sent + trusted);
            status.last_ack_sent = status.last_ack_sent.max(sent);
            status.failing = false;
            if status.held.as_of_sent.is_none_or(|as_of| as_of < sent) {
                status.held = HeldGrants {
                    as_of_sent: Some(sent),
                    tokens: Arc::new(grants),
                };
            }
        });
    }

    fn end(&self, reason: LeaseLost) {
        self.status.send_modify(|status| {
            status.ended.get_or_insert(reason);
        });
    }

    /// Where to send the next renewal after a failure, and after what pause.
    fn after_failure(
        &self,
        target: &str,
        status: &tonic::Status,
        backoff: &mut Backoff,
    ) -> (String, Duration) {
        tracing::debug!(
            lease = %self.lease,
            %target,
            "keepalive failed: {}",
            describe_status(status)
        );
        let router = &self.client.router;
        match classify(status) {
            Verdict::FollowLeader(leader) => {
                // Paused too (briefly at first), so that two nodes naming
                // each other during an election are not polled in a loop.
                router.set_leader(leader.clone());
                (leader, backoff.next_pause(&mut rand::thread_rng()))
            }
            Verdict::TryElsewhere | Verdict::Fail => (
                router.after_failure(target, status),
                backoff.next_pause(&mut rand::thread_rng()),
            ),
        }
    }
}

fn renewal(sent: Instant, answer: LeaseKeepAliveResponse) -> Renewal {
    if !answer.found {
        return Renewal::NotFound;
    }
    // The server counts `remaining_ms` from when it received the renewal;
    // counting it from the send time instead can only be earlier.
    let ttl_ms = answer.remaining_ms.min(answer.ttl_ms);
    Renewal::Renewed {
        sent,
        ttl: Duration::from_millis(ttl_ms),
        grants: answer.grants.iter().map(|fence| fence.token).collect(),
    }
}
