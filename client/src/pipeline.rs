//! Lock acquires and releases as messages on one `Lock.Pipeline` stream per
//! node, instead of one HTTP/2 stream per call.
//!
//! Each call is still one attempt of the retry loop in [`crate::client`]:
//! it carries its request id, and its answer or status is the one the unary
//! call would have had (the server sends a failure's code, message, typed
//! details and metadata; see `lock.proto`). Calls run concurrently on the
//! stream and are matched to their answers by a `seq` the client picks. A
//! call whose caller stops waiting (a timeout, a dropped future) sends a
//! `cancel`, so a waiting acquire leaves the queue as it does when a unary
//! call goes away.
//!
//! A stream ends when it breaks, when the server ends it, or once nothing
//! is left to send on it or to wait for; every call still waiting then
//! fails with the stream's status and is retried by its caller's loop,
//! which opens a new one. A request refused as unauthenticated (a token
//! that expired or was revoked) retires its stream: the calls already on
//! it finish there, and the next calls open a stream that carries the
//! token the client logs in for. A node that does not know the call
//! (`UNIMPLEMENTED`: a server from before it, as in a rolling upgrade) gets
//! unary calls, and is asked again after [`RECHECK_UNSUPPORTED`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use latchkey_proto::v1::lock_client::LockClient;
use latchkey_proto::v1::{
    pipeline_request, pipeline_response, AcquireRequest, AcquireResponse, PipelineCancel,
    PipelineError, PipelineRequest, ReleaseRequest, ReleaseResponse,
};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::Code;

use crate::client::{Conn, Inner, Router};

/// How long a node that answered `UNIMPLEMENTED` gets unary calls before it
/// is asked for a pipeline again (it may have been upgraded since).
pub(crate) const RECHECK_UNSUPPORTED: Duration = Duration::from_secs(60);

type Answer = Result<pipeline_response::Result, tonic::Status>;

/// A call handed to a stream's task.
struct Call {
    seq: u64,
    op: pipeline_request::Op,
    reply: oneshot::Sender<Answer>,
}

/// Where one node's stream takes calls, and cancels of calls given up.
/// Calls stop being taken when the stream retires; cancels are taken for
/// as long as its task runs.
#[derive(Clone)]
struct Submit {
    calls: mpsc::UnboundedSender<Call>,
    cancels: mpsc::UnboundedSender<u64>,
}

/// A client's lock pipelines, by node endpoint.
pub(crate) struct Pipelines {
    streams: Mutex<HashMap<String, Submit>>,
    /// Nodes that answered `UNIMPLEMENTED`, and when.
    unsupported: Arc<Mutex<HashMap<String, Instant>>>,
    /// Unique across the client's streams, so unique on each.
    next_seq: AtomicU64,
    /// [`RECHECK_UNSUPPORTED`], but for tests.
    recheck: Duration,
}

impl Pipelines {
    pub(crate) fn new() -> Pipelines {
        Pipelines {
            streams: Mutex::new(HashMap::new()),
            unsupported: Arc::default(),
            next_seq: AtomicU64::new(1),
            recheck: RECHECK_UNSUPPORTED,
        }
    }

    /// Whether calls to `target` should go on its pipeline: it did not
    /// answer `UNIMPLEMENTED` within [`RECHECK_UNSUPPORTED`].
    pub(crate) fn usable(&self, target: &str) -> bool {
        let mut unsupported = self.unsupported.lock();
        match unsupported.get(target) {
            Some(since) if since.elapsed() < self.recheck => false,
            Some(_) => {
                unsupported.remove(target);
                true
            }
            None => true,
        }
    }

    /// Sends `op` on the stream to `target`, opening it if there is none,
    /// and waits for its answer. `UNIMPLEMENTED`, with [`Pipelines::usable`]
    /// now false, means nothing was sent: make the unary call instead.
    pub(crate) async fn call(
        &self,
        router: &Router,
        target: &str,
        op: pipeline_request::Op,
    ) -> Answer {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        let mut call = Call { seq, op, reply };
        // A stream whose task just ended or retired refuses the call: the
        // second pass opens a new one.
        for _ in 0..2 {
            let submit = self.stream_to(router, target)?;
            match submit.calls.send(call) {
                Ok(()) => {
                    let mut cancel = CancelOnDrop {
                        cancels: submit.cancels,
                        seq,
                        armed: true,
                    };
                    let answer = answer.await;
                    cancel.armed = false;
                    return answer.unwrap_or_else(|_| {
                        Err(tonic::Status::unavailable("the lock pipeline ended"))
                    });
                }
                Err(mpsc::error::SendError(refused)) => {
                    call = refused;
                    let mut streams = self.streams.lock();
                    if streams
                        .get(target)
                        .is_some_and(|s| s.calls.same_channel(&submit.calls))
                    {
                        streams.remove(target);
                    }
                }
            }
        }
        Err(tonic::Status::unavailable("the lock pipeline ended"))
    }

    /// The open stream to `target`, or a new one.
    fn stream_to(&self, router: &Router, target: &str) -> Result<Submit, tonic::Status> {
        let mut streams = self.streams.lock();
        if let Some(submit) = streams.get(target).filter(|s| !s.calls.is_closed()) {
            return Ok(submit.clone());
        }
        let channel = router.channel_for_call(target)?;
        let (calls, taken) = mpsc::unbounded_channel();
        let (cancels, cancelled) = mpsc::unbounded_channel();
        let stream = Stream {
            target: target.to_string(),
            unsupported: self.unsupported.clone(),
        };
        tokio::spawn(stream.serve(channel, taken, cancelled));
        let submit = Submit { calls, cancels };
        streams.insert(target.to_string(), submit.clone());
        Ok(submit)
    }
}

impl Inner {
    /// One attempt of an acquire at `target`: on its lock pipeline, or as
    /// a unary call where there is none.
    pub(crate) async fn acquire_at(
        &self,
        target: String,
        request: AcquireRequest,
    ) -> Result<tonic::Response<AcquireResponse>, tonic::Status> {
        let response = |result: pipeline_response::Result| match result {
            pipeline_response::Result::Acquire(response) => Some(response),
            _ => None,
        };
        let unary = |mut lock: LockClient<Conn>, request: AcquireRequest| async move {
            lock.acquire(request).await
        };
        self.lock_call_at(
            target,
            "an acquire",
            request,
            pipeline_request::Op::Acquire,
            response,
            unary,
        )
        .await
    }

    /// One attempt of a lock release at `target`, as [`Inner::acquire_at`].
    pub(crate) async fn release_at(
        &self,
        target: String,
        request: ReleaseRequest,
    ) -> Result<tonic::Response<ReleaseResponse>, tonic::Status> {
        let response = |result: pipeline_response::Result| match result {
            pipeline_response::Result::Release(response) => Some(response),
            _ => None,
        };
        let unary = |mut lock: LockClient<Conn>, request: ReleaseRequest| async move {
            lock.release(request).await
        };
        self.lock_call_at(
            target,
            "a release",
            request,
            pipeline_request::Op::Release,
            response,
            unary,
        )
        .await
    }

    /// `request` on the lock pipeline to `target` as `op`, its answer
    /// taken out of the result by `response`; or, when the pipeline is
    /// turned off or the node has none, the `unary` call.
    async fn lock_call_at<R: Clone, T, Fut>(
        &self,
        target: String,
        what: &str,
        request: R,
        op: fn(R) -> pipeline_request::Op,
        response: fn(pipeline_response::Result) -> Option<T>,
        unary: impl FnOnce(LockClient<Conn>, R) -> Fut,
    ) -> Result<tonic::Response<T>, tonic::Status>
    where
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        if self.options.lock_pipeline && self.pipelines.usable(&target) {
            let answer = self
                .pipelines
                .call(&self.router, &target, op(request.clone()))
                .await;
            match answer {
                Ok(result) => {
                    return response(result).map(tonic::Response::new).ok_or_else(|| {
                        tonic::Status::internal(format!(
                            "the lock pipeline answered {what} with another call's result"
                        ))
                    })
                }
                // A node without the pipeline: nothing was sent.
                Err(status)
                    if status.code() == Code::Unimplemented && !self.pipelines.usable(&target) => {}
                Err(status) => return Err(status),
            }
        }
        let channel = self.router.channel_for_call(&target)?;
        unary(LockClient::new(channel), request).await
    }
}

/// Sends a cancel for its call if dropped while armed: the caller gave up.
struct CancelOnDrop {
    cancels: mpsc::UnboundedSender<u64>,
    seq: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            // The stream's task is gone if this fails, and its calls with it.
            let _ = self.cancels.send(self.seq);
        }
    }
}

/// One node's stream.
struct Stream {
    target: String,
    unsupported: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Stream {
    /// Opens the stream, sends each call, and gives each answer to its
    /// call. Returns when the stream ends, after failing every call it
    /// still holds.
    async fn serve(
        self,
        channel: Conn,
        mut taken: mpsc::UnboundedReceiver<Call>,
        mut cancelled: mpsc::UnboundedReceiver<u64>,
    ) {
        let mut waiting = HashMap::new();
        let ended = run(channel, &mut taken, &mut cancelled, &mut waiting).await;
        taken.close();
        if ended.code() == Code::Unimplemented {
            self.unsupported
                .lock()
                .insert(self.target.clone(), Instant::now());
        }
        let pending = std::iter::from_fn(|| taken.try_recv().ok()).map(|call| call.reply);
        for reply in waiting.into_values().chain(pending) {
            let _ = reply.send(Err(ended.clone()));
        }
    }
}

/// The stream's loop; returns the status the calls still waiting fail with.
async fn run(
    channel: Conn,
    taken: &mut mpsc::UnboundedReceiver<Call>,
    cancelled: &mut mpsc::UnboundedReceiver<u64>,
    waiting: &mut HashMap<u64, oneshot::Sender<Answer>>,
) -> tonic::Status {
    let (requests, queue) = mpsc::unbounded_channel();
    // Calls handed over meanwhile wait in `taken`.
    let opened = LockClient::new(channel)
        .pipeline(UnboundedReceiverStream::new(queue))
        .await;
    let mut answers = match opened {
        Ok(answers) => answers.into_inner(),
        Err(status) => return status,
    };
    let mut retired = false;
    // Bounded by the stream: it ends on an error or its end, once every
    // handle to hand calls to it is gone, or once it is retired and the
    // calls on it are answered.
    loop {
        if retired && waiting.is_empty() {
            return tonic::Status::unavailable("the lock pipeline was retired");
        }
        tokio::select! {
            call = taken.recv(), if !retired => {
                let Some(Call { seq, op, reply }) = call else {
                    return tonic::Status::unavailable("the lock pipeline closed");
                };
                waiting.insert(seq, reply);
                if requests.send(PipelineRequest { seq, op: Some(op) }).is_err() {
                    return tonic::Status::unavailable("the lock pipeline closed");
                }
            }
            Some(seq) = cancelled.recv() => {
                if waiting.remove(&seq).is_some() {
                    let cancel = pipeline_request::Op::Cancel(PipelineCancel {});
                    let _ = requests.send(PipelineRequest { seq, op: Some(cancel) });
                }
            }
            answer = answers.message() => {
                let answer = match answer {
                    Ok(Some(answer)) => answer,
                    Ok(None) => return tonic::Status::unavailable("the node ended the lock pipeline"),
                    Err(status) => return status,
                };
                let result = match answer.result {
                    Some(pipeline_response::Result::Error(error)) => Err(status_of(error)),
                    Some(result) => Ok(result),
                    None => Err(tonic::Status::internal("a pipeline answer without a result")),
                };
                if result.as_ref().is_err_and(|s| s.code() == Code::Unauthenticated) {
                    // The stream's token no longer serves: new calls go to a
                    // new stream, with the token the caller logs in for.
                    retired = true;
                    taken.close();
                    while let Ok(call) = taken.try_recv() {
                        let _ = call.reply.send(Err(tonic::Status::unavailable(
                            "the lock pipeline was retired",
                        )));
                    }
                }
                if let Some(reply) = waiting.remove(&answer.seq) {
                    let _ = reply.send(result);
                }
            }
        }
    }
}

/// The status a unary call would have failed with.
fn status_of(error: PipelineError) -> tonic::Status {
    let mut status = tonic::Status::with_details(
        Code::from_i32(error.code),
        error.message,
        error.details.into(),
    );
    for (key, value) in error.metadata {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            status.metadata_mut().insert(key, value);
        }
    }
    status
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use latchkey_proto::v1::lock_server::{Lock, LockServer};
    use latchkey_proto::v1::{
        AcquireRequest, DescribeRequest, DescribeResponse, Grant, PipelineResponse,
    };
    use tokio_stream::{Stream, StreamExt};
    use tonic::{Request, Response, Status, Streaming};

    use super::*;
    use crate::client::Credentials;
    use crate::client::DEFAULT_CONNECT_TIMEOUT;
    use crate::test_server::serve_on_loopback;

    /// A Lock service whose `Pipeline` is either unknown (a server from
    /// before it) or reads `batch` requests and answers them last first:
    /// an acquire of "refuse" with a status carrying details and metadata,
    /// any other with a grant of its name. Cancels it reads are kept.
    struct Scripted {
        known: bool,
        batch: usize,
        cancels: Arc<Mutex<Vec<u64>>>,
    }

    type Answers = Pin<Box<dyn Stream<Item = Result<PipelineResponse, Status>> + Send>>;

    #[tonic::async_trait]
    impl Lock for Scripted {
        async fn acquire(
            &self,
            _: Request<AcquireRequest>,
        ) -> Result<Response<AcquireResponse>, Status> {
            Err(Status::unimplemented("acquire"))
        }

        async fn release(
            &self,
            _: Request<ReleaseRequest>,
        ) -> Result<Response<ReleaseResponse>, Status> {
            Err(Status::unimplemented("release"))
        }

        async fn describe(
            &self,
            _: Request<DescribeRequest>,
        ) -> Result<Response<DescribeResponse>, Status> {
            Err(Status::unimplemented("describe"))
        }

        type PipelineStream = Answers;

        async fn pipeline(
            &self,
            request: Request<Streaming<PipelineRequest>>,
        ) -> Result<Response<Answers>, Status> {
            if !self.known {
                return Err(Status::unimplemented("Lock.Pipeline"));
            }
            let (batch, cancels) = (self.batch, self.cancels.clone());
            let mut requests = request.into_inner();
            let answers = futures::StreamExt::flatten(futures::stream::once(async move {
                let mut read = Vec::new();
                // Bounded by the stream and the batch.
                while read.len() < batch {
                    let Some(Ok(request)) = requests.next().await else {
                        break;
                    };
                    match request.op {
                        Some(pipeline_request::Op::Cancel(_)) => cancels.lock().push(request.seq),
                        Some(op) => read.push((request.seq, op)),
                        None => {}
                    }
                }
                // Keep reading cancels until the client goes away.
                tokio::spawn(async move {
                    while let Some(Ok(request)) = requests.next().await {
                        if let Some(pipeline_request::Op::Cancel(_)) = request.op {
                            cancels.lock().push(request.seq);
                        }
                    }
                });
                futures::stream::iter(read.into_iter().rev().map(|(seq, op)| {
                    Ok(PipelineResponse {
                        seq,
                        result: Some(answer(op)),
                    })
                }))
            }));
            Ok(Response::new(Box::pin(answers)))
        }
    }

    fn answer(op: pipeline_request::Op) -> pipeline_response::Result {
        match op {
            pipeline_request::Op::Acquire(request) if request.name == "refuse" => {
                pipeline_response::Result::Error(PipelineError {
                    code: Code::Unavailable as i32,
                    message: "not here".into(),
                    details: vec![1, 2, 3],
                    metadata: [(
                        "latchkey-leader-addr".to_string(),
                        "127.0.0.1:1".to_string(),
                    )]
                    .into(),
                })
            }
            pipeline_request::Op::Acquire(request) => {
                pipeline_response::Result::Acquire(AcquireResponse {
                    header: None,
                    grant: Some(Grant {
                        name: request.name,
                        lease: request.lease,
                        ..Grant::default()
                    }),
                })
            }
            _ => pipeline_response::Result::Release(ReleaseResponse { header: None }),
        }
    }

    async fn serve(service: Scripted) -> String {
        let router = tonic::transport::Server::builder().add_service(LockServer::new(service));
        format!("http://{}", serve_on_loopback(router).await)
    }

    fn router(target: &str) -> Router {
        Router::new(
            vec![target.to_string()],
            DEFAULT_CONNECT_TIMEOUT,
            None,
            Credentials::default(),
        )
    }

    fn acquire(name: &str) -> pipeline_request::Op {
        pipeline_request::Op::Acquire(AcquireRequest {
            name: name.into(),
            lease: 7,
            wait: false,
            request: None,
        })
    }

    async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .unwrap_or_else(|_| panic!("{what} within 10 s"))
    }

    /// Answers out of order reach their own calls, and a refusal comes
    /// back as the status a unary call would have failed with.
    #[tokio::test]
    async fn answers_reach_their_calls_whatever_their_order() {
        let cancels = Arc::default();
        let target = serve(Scripted {
            known: true,
            batch: 3,
            cancels,
        })
        .await;
        let (router, pipelines) = (router(&target), Pipelines::new());
        let calls = futures::future::join3(
            pipelines.call(&router, &target, acquire("a")),
            pipelines.call(&router, &target, acquire("refuse")),
            pipelines.call(&router, &target, acquire("b")),
        );
        let (a, refused, b) = within("three answers", calls).await;
        for (answer, name) in [(a, "a"), (b, "b")] {
            match answer {
                Ok(pipeline_response::Result::Acquire(AcquireResponse {
                    grant: Some(grant),
                    ..
                })) => assert_eq!(grant.name, name),
                other => panic!("expected a grant of {name}, got {other:?}"),
            }
        }
        let status = refused.expect_err("refused");
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "not here");
        assert_eq!(status.details(), &[1, 2, 3]);
        assert_eq!(
            crate::retry::leader_hint(&status).as_deref(),
            Some("http://127.0.0.1:1")
        );
        assert!(pipelines.usable(&target));
    }

    /// A call given up before its answer sends a cancel for its seq.
    #[tokio::test]
    async fn a_call_given_up_is_cancelled_on_the_stream() {
        let cancels: Arc<Mutex<Vec<u64>>> = Arc::default();
        let target = serve(Scripted {
            known: true,
            batch: 2,
            cancels: cancels.clone(),
        })
        .await;
        let (router, pipelines) = (router(&target), Pipelines::new());
        // Never answered: the server waits for a second request first.
        let given_up = tokio::time::timeout(
            Duration::from_millis(200),
            pipelines.call(&router, &target, acquire("a")),
        )
        .await;
        assert!(
            given_up.is_err(),
            "no answer to one request of a batch of two"
        );
        within("the cancel", async {
            // Bounded by `within`.
            while cancels.lock().is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert_eq!(*cancels.lock(), vec![1]);
    }

    /// A node without the call: nothing is sent, the caller is told to make
    /// the unary call, and the node is not asked again at once.
    #[tokio::test]
    async fn a_node_without_the_pipeline_is_left_to_unary_calls() {
        let target = serve(Scripted {
            known: false,
            batch: 1,
            cancels: Arc::default(),
        })
        .await;
        let (router, pipelines) = (router(&target), Pipelines::new());
        let status = within("a refusal", pipelines.call(&router, &target, acquire("a")))
            .await
            .expect_err("unknown call");
        assert_eq!(status.code(), Code::Unimplemented);
        assert!(!pipelines.usable(&target));
        assert!(!pipelines.usable(&target), "not asked again at once");

        let rechecking = Pipelines {
            recheck: Duration::ZERO,
            ..Pipelines::new()
        };
        let status = within("a refusal", rechecking.call(&router, &target, acquire("a")))
            .await
            .expect_err("unknown call");
        assert_eq!(status.code(), Code::Unimplemented);
        assert!(rechecking.usable(&target), "asked again after a while");
    }
}
