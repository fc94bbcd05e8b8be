//! The `KeepAlive` streams a client's leases share: one per node, carrying
//! the renewals of every lease renewed there, many in flight at once.
//!
//! The server answers a stream's renewals in the order they were sent
//! (`lease.proto`), so each answer belongs to the oldest renewal still
//! waiting on that stream; its lease is checked too, and an answer for
//! another lease ends the stream, since a renewal's answer is only
//! trusted from the time that renewal was sent. A renewal whose caller
//! stopped waiting (it timed out, or its lease handle was dropped) still
//! takes its own answer when it comes, so the answers after it stay
//! matched.
//!
//! A stream ends when the server ends it (a failed renewal, whose status
//! is that renewal's answer: the server fails a stream in its turn, so
//! it is the oldest renewal waiting, and the renewals after it fail as
//! unavailable and are retried), when it breaks, when its oldest renewal
//! has waited longer than the stall limit (a node that stopped answering),
//! or when the client is dropped. The next renewal for that node opens a
//! new one.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use latchkey_proto::v1::lease_client::LeaseClient;
use latchkey_proto::v1::{LeaseKeepAliveRequest, LeaseKeepAliveResponse};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::client::{Conn, Router};
use crate::types::LeaseId;

type Answer = Result<LeaseKeepAliveResponse, tonic::Status>;

/// One renewal handed to a stream's task.
struct Submitted {
    lease: LeaseId,
    reply: oneshot::Sender<Answer>,
}

/// Where renewals for one node's stream are handed over.
type Submit = mpsc::UnboundedSender<Submitted>;

/// A client's keepalive streams, by node endpoint.
pub(crate) struct Renewals {
    streams: Mutex<HashMap<String, Submit>>,
    /// How long a stream's oldest renewal may go unanswered before the
    /// stream is ended.
    stall_limit: Duration,
}

impl Renewals {
    pub(crate) fn new(stall_limit: Duration) -> Renewals {
        Renewals {
            streams: Mutex::new(HashMap::new()),
            stall_limit,
        }
    }

    /// Sends one renewal of `lease` on the stream to `target`, opening it
    /// if there is none, and waits for the answer.
    pub(crate) async fn renew(&self, router: &Router, target: &str, lease: LeaseId) -> Answer {
        let (reply, answer) = oneshot::channel();
        let mut renewal = Submitted { lease, reply };
        // A stream whose task just ended refuses the renewal: the second
        // pass opens a new one.
        for _ in 0..2 {
            let submit = self.stream_to(router, target)?;
            match submit.send(renewal) {
                Ok(()) => {
                    return answer.await.unwrap_or_else(|_| {
                        Err(tonic::Status::unavailable("keepalive stream ended"))
                    })
                }
                Err(mpsc::error::SendError(refused)) => {
                    renewal = refused;
                    let mut streams = self.streams.lock();
                    if streams.get(target).is_some_and(|s| s.same_channel(&submit)) {
                        streams.remove(target);
                    }
                }
            }
        }
        Err(tonic::Status::unavailable("keepalive stream ended"))
    }

    /// The open stream to `target`, or a new one.
    fn stream_to(&self, router: &Router, target: &str) -> Result<Submit, tonic::Status> {
        let mut streams = self.streams.lock();
        if let Some(submit) = streams.get(target).filter(|s| !s.is_closed()) {
            return Ok(submit.clone());
        }
        let channel = router
            .channel(target)
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let (submit, submitted) = mpsc::unbounded_channel();
        tokio::spawn(serve(channel, submitted, self.stall_limit));
        streams.insert(target.to_string(), submit.clone());
        Ok(submit)
    }
}

/// Runs one stream: opens it, sends each submitted renewal, and gives each
/// answer to the oldest renewal waiting. Returns when the stream ends,
/// after failing every renewal it still holds.
async fn serve(channel: Conn, mut submitted: mpsc::UnboundedReceiver<Submitted>, stall: Duration) {
    let mut waiting: VecDeque<(Instant, Submitted)> = VecDeque::new();
    let ended = run(channel, &mut submitted, &mut waiting, stall).await;
    submitted.close();
    let mut rest = waiting.into_iter().map(|(_, r)| r);
    let after_failure = match ended {
        Ended::Answered(status) => {
            if let Some(oldest) = rest.next() {
                let _ = oldest.reply.send(Err(status.clone()));
            }
            tonic::Status::unavailable(format!(
                "keepalive stream ended by an earlier renewal's failure: {}",
                status.message()
            ))
        }
        Ended::Stream(status) => status,
    };
    let pending = std::iter::from_fn(|| submitted.try_recv().ok());
    for renewal in rest.chain(pending) {
        let _ = renewal.reply.send(Err(after_failure.clone()));
    }
}

/// How a stream ended.
enum Ended {
    /// With an error status in place of the oldest waiting renewal's answer.
    Answered(tonic::Status),
    /// Otherwise: every renewal still waiting fails with this.
    Stream(tonic::Status),
}

/// The stream's loop; returns how it ended.
async fn run(
    channel: Conn,
    submitted: &mut mpsc::UnboundedReceiver<Submitted>,
    waiting: &mut VecDeque<(Instant, Submitted)>,
    stall: Duration,
) -> Ended {
    let (requests, queue) = mpsc::unbounded_channel();
    // Renewals submitted meanwhile wait in `submitted`, in order.
    let opened = LeaseClient::new(channel)
        .keep_alive(UnboundedReceiverStream::new(queue))
        .await;
    let mut answers = match opened {
        Ok(answers) => answers.into_inner(),
        Err(status) => return Ended::Stream(status),
    };
    let mut check = tokio::time::interval(stall / 2);
    check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // Bounded by the stream: it ends on an error, on its end, on a stall,
    // or once every handle to submit on it is gone.
    loop {
        tokio::select! {
            renewal = submitted.recv() => {
                let Some(renewal) = renewal else {
                    return Ended::Stream(tonic::Status::unavailable("keepalive stream closed"));
                };
                let request = LeaseKeepAliveRequest { lease: renewal.lease.0 };
                if requests.send(request).is_err() {
                    return Ended::Stream(tonic::Status::unavailable("keepalive stream closed"));
                }
                waiting.push_back((Instant::now(), renewal));
            }
            answer = answers.message() => {
                let answer = match answer {
                    Ok(Some(answer)) => answer,
                    Ok(None) => {
                        return Ended::Stream(tonic::Status::unavailable("keepalive stream ended"))
                    }
                    Err(status) => return Ended::Answered(status),
                };
                match waiting.pop_front() {
                    Some((_, renewal)) if renewal.lease.0 == answer.lease => {
                        let _ = renewal.reply.send(Ok(answer));
                    }
                    oldest => {
                        let expected = oldest.map(|(_, r)| r.lease.to_string());
                        return Ended::Stream(tonic::Status::internal(format!(
                            "keepalive answer for lease {} where the oldest renewal waiting was for {}: the server broke the answer order",
                            LeaseId(answer.lease),
                            expected.as_deref().unwrap_or("none"),
                        )));
                    }
                }
            }
            _ = check.tick() => {
                if waiting.front().is_some_and(|(sent, _)| sent.elapsed() > stall) {
                    return Ended::Stream(tonic::Status::deadline_exceeded(format!(
                        "a keepalive went unanswered for {stall:?}"
                    )));
                }
            }
        }
    }
}
