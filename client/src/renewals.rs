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
        let channel = router.channel_for_call(target)?;
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
    let mut check = tokio::time::interval((stall / 2).max(Duration::from_millis(1)));
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
                        let expected = oldest.as_ref().map(|(_, r)| r.lease.to_string());
                        let broken = tonic::Status::internal(format!(
                            "keepalive answer for lease {} where the oldest renewal waiting was for {}: the server broke the answer order",
                            LeaseId(answer.lease),
                            expected.as_deref().unwrap_or("none"),
                        ));
                        // Put back, to fail with the others.
                        if let Some(oldest) = oldest {
                            waiting.push_front(oldest);
                        }
                        return Ended::Stream(broken);
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::pin::Pin;

    use latchkey_proto::v1::lease_server::{Lease, LeaseServer};
    use latchkey_proto::v1::{
        LeaseGrantRequest, LeaseGrantResponse, LeaseListRequest, LeaseListResponse,
        LeaseRevokeRequest, LeaseRevokeResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
    };
    use tokio_stream::{Stream, StreamExt};
    use tonic::{Request, Response, Status, Streaming};

    use super::*;
    use crate::client::Credentials;
    use crate::test_server::serve_on_loopback;

    /// A Lease service whose `KeepAlive` reads `batch` renewals, then
    /// answers them last first (out of the order the protocol promises),
    /// or, if `refuse`, fails the stream in place of the first answer.
    struct Reversing {
        batch: usize,
        refuse: bool,
    }

    type Answers = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

    #[tonic::async_trait]
    impl Lease for Reversing {
        async fn grant(
            &self,
            _: Request<LeaseGrantRequest>,
        ) -> Result<Response<LeaseGrantResponse>, Status> {
            Err(Status::unimplemented("grant"))
        }

        async fn revoke(
            &self,
            _: Request<LeaseRevokeRequest>,
        ) -> Result<Response<LeaseRevokeResponse>, Status> {
            Err(Status::unimplemented("revoke"))
        }

        type KeepAliveStream = Answers;

        async fn keep_alive(
            &self,
            request: Request<Streaming<LeaseKeepAliveRequest>>,
        ) -> Result<Response<Answers>, Status> {
            let requests = request.into_inner();
            if self.refuse {
                let read = requests.take(self.batch).collect::<Vec<_>>();
                let refused = async move {
                    read.await;
                    Err(Status::permission_denied("not your lease"))
                };
                return Ok(Response::new(Box::pin(futures::stream::once(refused))));
            }
            let answers = reversed_answers(requests, self.batch);
            Ok(Response::new(Box::pin(answers)))
        }

        async fn time_to_live(
            &self,
            _: Request<LeaseTimeToLiveRequest>,
        ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
            Err(Status::unimplemented("time_to_live"))
        }

        async fn list(
            &self,
            _: Request<LeaseListRequest>,
        ) -> Result<Response<LeaseListResponse>, Status> {
            Err(Status::unimplemented("list"))
        }
    }

    /// The first `batch` renewals read, answered last first.
    fn reversed_answers(
        requests: Streaming<LeaseKeepAliveRequest>,
        batch: usize,
    ) -> impl Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send {
        futures::StreamExt::flatten(futures::stream::once(async move {
            let read: Vec<LeaseKeepAliveRequest> =
                requests.take(batch).filter_map(Result::ok).collect().await;
            futures::stream::iter(read.into_iter().rev().map(|r| {
                Ok(LeaseKeepAliveResponse {
                    lease: r.lease,
                    found: true,
                    remaining_ms: 10_000,
                    ttl_ms: 10_000,
                    ..LeaseKeepAliveResponse::default()
                })
            }))
        }))
    }

    async fn serve_reversing(batch: usize, refuse: bool) -> SocketAddr {
        let service = LeaseServer::new(Reversing { batch, refuse });
        serve_on_loopback(tonic::transport::Server::builder().add_service(service)).await
    }

    fn conn(addr: SocketAddr) -> Conn {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_lazy();
        tonic::service::interceptor::InterceptedService::new(channel, Credentials::default())
    }

    /// One stream's handle to submit on (its task ends once that is
    /// dropped) and its task.
    type TestStream = (Submit, tokio::task::JoinHandle<()>);

    /// Runs one stream to `addr` and hands it a renewal of each of
    /// `leases`, in order; returns the stream and where each answer comes.
    fn renew_on_one_stream<const N: usize>(
        addr: SocketAddr,
        leases: [u64; N],
    ) -> (TestStream, [oneshot::Receiver<Answer>; N]) {
        let (submit, submitted) = mpsc::unbounded_channel();
        let task = tokio::spawn(serve(conn(addr), submitted, Duration::from_secs(10)));
        let answers = leases.map(|lease| {
            let (reply, answer) = oneshot::channel();
            let renewal = Submitted {
                lease: LeaseId(lease),
                reply,
            };
            submit.send(renewal).expect("the stream task is running");
            answer
        });
        ((submit, task), answers)
    }

    /// Answers out of order end the stream: no renewal takes an answer
    /// meant for another, which would extend its lease from the wrong
    /// send time.
    #[tokio::test]
    async fn answers_out_of_order_end_the_stream_instead_of_reaching_the_wrong_renewal() {
        let addr = serve_reversing(2, false).await;
        let ((_submit, task), [first_answer, second_answer]) = renew_on_one_stream(addr, [1, 2]);
        let first = first_answer.await.expect("an outcome");
        let second = second_answer.await.expect("an outcome");
        for outcome in [&first, &second] {
            let status = outcome
                .as_ref()
                .expect_err("no answer is taken out of order");
            assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
            assert!(status.message().contains("order"), "{status:?}");
        }
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the stream task ends")
            .expect("no panic");
    }

    /// In order, each renewal gets its own lease's answer.
    #[tokio::test]
    async fn answers_in_order_reach_their_renewals() {
        // Batches of one: reversing one renewal keeps the order.
        let addr = serve_reversing(1, false).await;
        let (_stream, [answer]) = renew_on_one_stream(addr, [7]);
        let answer = answer.await.expect("an outcome").expect("renewed");
        assert_eq!((answer.lease, answer.found), (7, true));
    }

    /// A stream the server fails in place of an answer: the status is the
    /// oldest renewal's own; the ones after it fail as unavailable, to be
    /// sent again.
    #[tokio::test]
    async fn a_failed_answer_is_the_oldest_renewals_and_the_rest_are_retried() {
        let addr = serve_reversing(2, true).await;
        let (_stream, [first_answer, second_answer]) = renew_on_one_stream(addr, [1, 2]);
        let first = first_answer
            .await
            .expect("an outcome")
            .expect_err("refused");
        assert_eq!(first.code(), tonic::Code::PermissionDenied, "{first:?}");
        let second = second_answer
            .await
            .expect("an outcome")
            .expect_err("not answered");
        assert_eq!(second.code(), tonic::Code::Unavailable, "{second:?}");
        assert!(second.message().contains("not your lease"), "{second:?}");
    }
}
