//! `Lock.Pipeline`: lock acquires and releases as messages on one stream.
//!
//! A unary call costs its client and this server an HTTP/2 stream of its
//! own: headers encoded and decoded, a stream opened and closed, a task
//! spawned, the routing and the trailers. On one long-lived stream a
//! request is one message each way. Each request is served exactly as its
//! unary call: identified from the stream's metadata again for every
//! request (so a token that expires or a role that changes applies at
//! once), checked, proposed with its request id, and answered with the
//! same response or the same status, carried as a [`PipelineError`].
//!
//! Requests run concurrently and are answered as each completes, so a
//! waiting acquire holds up nothing sent after it. A `cancel` drops the
//! request in flight with its `seq`, as a unary caller going away drops
//! its call: a waiting acquire then leaves the queue. When the stream
//! breaks, everything in flight is dropped the same way. At most
//! `--max-streams-per-connection` requests run at once on one stream, the
//! bound unary calls have on one connection; past it the stream is not
//! read until one completes.
//!
//! The response stream is polled by the task that writes it: no task or
//! channel of its own per request.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use futures::future::{AbortHandle, Abortable, BoxFuture};
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt as _};
use tonic::{Request, Status, Streaming};

use latchkey_proto::v1::{
    pipeline_request, pipeline_response, AcquireRequest, PipelineError, PipelineRequest,
    PipelineResponse, ReleaseRequest,
};

use super::Api;

pub(super) type PipelineStream =
    Pin<Box<dyn futures::Stream<Item = Result<PipelineResponse, Status>> + Send>>;

/// The answer to one request, or `None` if it was cancelled.
type InFlight = BoxFuture<'static, (u64, Option<pipeline_response::Result>)>;

pub(super) fn serve(api: &Api, request: Request<Streaming<PipelineRequest>>) -> PipelineStream {
    let (metadata, extensions, incoming) = request.into_parts();
    let pipeline = Pipeline {
        api: api.clone(),
        caller: Request::from_parts(metadata, extensions, ()),
        incoming: Some(incoming),
        in_flight: FuturesUnordered::new(),
        cancels: HashMap::new(),
        limit: api.limits.max_streams_per_connection.max(1),
        stopping: Box::pin(api.stopping()),
        ended: false,
    };
    Box::pin(futures::stream::unfold(
        pipeline,
        |mut pipeline| async move {
            let answer = pipeline.next().await?;
            Some((answer, pipeline))
        },
    ))
}

struct Pipeline {
    api: Api,
    /// The stream's metadata and connection: who sends each request.
    caller: Request<()>,
    /// `None` once the client has closed its side.
    incoming: Option<Streaming<PipelineRequest>>,
    in_flight: FuturesUnordered<InFlight>,
    /// How to drop each request in flight, by `seq`.
    cancels: HashMap<u64, AbortHandle>,
    limit: usize,
    stopping: Pin<Box<dyn Future<Output = ()> + Send>>,
    ended: bool,
}

impl Pipeline {
    /// The next answer; `None` once the stream is over.
    async fn next(&mut self) -> Option<Result<PipelineResponse, Status>> {
        // Bounded: each turn reads a request or completes one, and the
        // stream ends once the client's side is closed and all are answered.
        loop {
            if self.ended || (self.incoming.is_none() && self.in_flight.is_empty()) {
                self.ended = true;
                return None;
            }
            let reading = self.incoming.is_some() && self.in_flight.len() < self.limit;
            tokio::select! {
                // `Streaming::message` is cancel safe: a request is never
                // lost to another branch winning.
                message = next_message(&mut self.incoming), if reading => match message {
                    Ok(Some(request)) => {
                        if let Some(answer) = self.start(request) {
                            return Some(Ok(answer));
                        }
                    }
                    // Closed, or broken: a broken stream is dropped by the
                    // server as soon as it notices, with what is in flight.
                    Ok(None) | Err(_) => self.incoming = None,
                },
                Some((seq, result)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.cancels.remove(&seq);
                    if let Some(result) = result {
                        return Some(Ok(PipelineResponse { seq, result: Some(result) }));
                    }
                }
                () = &mut self.stopping => {
                    self.ended = true;
                    return Some(Err(Status::unavailable("the node is shutting down")));
                }
            }
        }
    }

    /// Starts `request`, or answers it at once when it cannot start.
    fn start(&mut self, request: PipelineRequest) -> Option<PipelineResponse> {
        let seq = request.seq;
        let refused = |status: Status| {
            Some(PipelineResponse {
                seq,
                result: Some(pipeline_response::Result::Error(error_of(&status))),
            })
        };
        let work = match request.op {
            None => {
                return refused(Status::invalid_argument(
                    "a pipeline request names no operation",
                ))
            }
            Some(pipeline_request::Op::Cancel(_)) => {
                if let Some(cancel) = self.cancels.remove(&seq) {
                    cancel.abort();
                }
                return None;
            }
            Some(_) if self.cancels.contains_key(&seq) => {
                return refused(Status::invalid_argument(format!(
                    "seq {seq} is already in flight on this stream"
                )))
            }
            Some(pipeline_request::Op::Acquire(request)) => Work::Acquire(request),
            Some(pipeline_request::Op::Release(request)) => Work::Release(request),
        };
        let method = work.method();
        let identity = match self.api.identify(&self.caller) {
            Ok(identity) => identity,
            Err(status) => {
                self.api.count(method, status.code());
                return refused(status);
            }
        };
        let api = self.api.clone();
        let work = async move {
            let outcome = match work {
                Work::Acquire(request) => api
                    .acquire_lock(&identity, request)
                    .await
                    .map(pipeline_response::Result::Acquire),
                Work::Release(request) => api
                    .release_lock(&identity, request)
                    .await
                    .map(pipeline_response::Result::Release),
            };
            api.count(
                method,
                outcome
                    .as_ref()
                    .map_or_else(Status::code, |_| tonic::Code::Ok),
            );
            outcome.unwrap_or_else(|status| pipeline_response::Result::Error(error_of(&status)))
        };
        let (cancel, registration) = AbortHandle::new_pair();
        let work = Abortable::new(work, registration);
        self.in_flight
            .push(async move { (seq, work.await.ok()) }.boxed());
        self.cancels.insert(seq, cancel);
        None
    }
}

/// What a request that starts does.
enum Work {
    Acquire(AcquireRequest),
    Release(ReleaseRequest),
}

impl Work {
    /// The path of the unary call that does the same.
    fn method(&self) -> &'static str {
        match self {
            Work::Acquire(_) => "/latchkey.v1.Lock/Acquire",
            Work::Release(_) => "/latchkey.v1.Lock/Release",
        }
    }
}

impl Api {
    fn count(&self, method: &str, code: tonic::Code) {
        if let Some(metrics) = &self.metrics {
            metrics.count_request(method, code);
        }
    }
}

async fn next_message(
    incoming: &mut Option<Streaming<PipelineRequest>>,
) -> Result<Option<PipelineRequest>, Status> {
    match incoming {
        Some(incoming) => incoming.message().await,
        None => std::future::pending().await,
    }
}

/// `status` as a message: code, message, details and ASCII metadata.
fn error_of(status: &Status) -> PipelineError {
    let metadata = status
        .metadata()
        .iter()
        .filter_map(|entry| match entry {
            tonic::metadata::KeyAndValueRef::Ascii(key, value) => {
                Some((key.as_str().to_string(), value.to_str().ok()?.to_string()))
            }
            tonic::metadata::KeyAndValueRef::Binary(..) => None,
        })
        .collect();
    PipelineError {
        code: status.code() as i32,
        message: status.message().to_string(),
        details: status.details().to_vec(),
        metadata,
    }
}
