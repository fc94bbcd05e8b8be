//! Prometheus metrics of one node, in a registry of its own (several nodes
//! may share a process in tests and the simulator).
//!
//! Three kinds of figures, each read where it is cheapest:
//! - **at scrape time**, from the published [`NodeStatus`] and the applied
//!   [`Coordination`] state: Raft term, indexes, leader, and the live
//!   leases, locks, waiters and elections. Nothing on the hot path keeps
//!   them up to date.
//! - **as things happen**, by the task that does them: the proposal, fsync
//!   and apply latency histograms, leader changes, grants, lease expiries
//!   and stale-token refusals (counted as this node applies entries, so
//!   every replica counts the same committed history).
//! - **per gRPC call**, by [`GrpcMetricsLayer`] around the client service:
//!   requests by method and status code. A unary call's code is read from
//!   its response (tonic puts errors in the headers of a trailers-only
//!   response); a stream is counted when it starts, with the code it
//!   started with.
//!
//! Label values are bounded: a method label is only ever one of the
//! service paths this node serves ([`MAX_METHOD_LABELS`] at most); any
//! other path counts as `unknown`.
//!
//! Not done yet: per-peer transport figures (queue depth, reconnects), and
//! process figures (open files, RSS), which the `prometheus` crate's
//! `process` feature would add.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use latchkey_proto::state::v1::{command_result, CommandResult};
use latchkey_proto::v1::error_details;

use crate::coordination::{Coordination, Event, Kind};
use crate::node::{NodeStatus, Role};

/// Most distinct `method` label values; past it, new paths count as `unknown`.
pub const MAX_METHOD_LABELS: usize = 128;
/// Histogram buckets, in seconds: 50 µs to about 3.3 s, doubling.
const LATENCY_BUCKET_START_SECONDS: f64 = 0.000_05;
const LATENCY_BUCKET_COUNT: usize = 17;

/// Every metric of one node.
pub struct Metrics {
    registry: Registry,
    raft_term: IntGauge,
    raft_commit_index: IntGauge,
    raft_applied_index: IntGauge,
    checkpoint_index: IntGauge,
    raft_first_index: IntGauge,
    raft_last_index: IntGauge,
    raft_leader_id: IntGauge,
    raft_is_leader: IntGauge,
    node_ready: IntGauge,
    leader_changes: IntCounter,
    proposal_seconds: Histogram,
    fsync_seconds: Histogram,
    apply_seconds: Histogram,
    leases: IntGauge,
    locks_held: IntGauge,
    lock_waiters: IntGauge,
    elections_led: IntGauge,
    grants: IntCounterVec,
    lease_expiries: IntCounter,
    stale_token_refusals: IntCounter,
    grpc_requests: IntCounterVec,
    /// Service names (`latchkey.v1.Lock`) whose methods may be labels.
    known_services: Mutex<HashSet<String>>,
    method_labels: Mutex<HashSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A fresh set in a fresh registry.
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some("latchkey".into()), None)
            // A fresh registry with a valid prefix cannot refuse.
            .expect("metrics registry");
        let gauge = |name: &str, help: &str| register(&registry, IntGauge::new(name, help));
        let counter = |name: &str, help: &str| register(&registry, IntCounter::new(name, help));
        let histogram = |name: &str, help: &str| {
            let buckets = prometheus::exponential_buckets(
                LATENCY_BUCKET_START_SECONDS,
                2.0,
                LATENCY_BUCKET_COUNT,
            )
            // Constant, valid arguments.
            .expect("histogram buckets");
            register(
                &registry,
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)),
            )
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(&registry, IntCounterVec::new(Opts::new(name, help), labels))
        };
        Metrics {
            raft_term: gauge("raft_term", "Current Raft term of this node."),
            raft_commit_index: gauge("raft_commit_index", "Highest log index known committed."),
            raft_applied_index: gauge(
                "raft_applied_index",
                "Highest log index applied to the state machine.",
            ),
            checkpoint_index: gauge(
                "checkpoint_index",
                "Applied index of the last checkpoint written to disk; a restart applies the entries after it again.",
            ),
            raft_first_index: gauge("raft_first_index", "First index still in the Raft log."),
            raft_last_index: gauge("raft_last_index", "Last index in this node's Raft log."),
            raft_leader_id: gauge("raft_leader_id", "Id of the leader this node knows; 0: none."),
            raft_is_leader: gauge("raft_is_leader", "1 if this node leads, else 0."),
            node_ready: gauge(
                "node_ready",
                "1 when /readyz answers 200: a leader is known and apply has caught up with commit.",
            ),
            leader_changes: counter(
                "raft_leader_changes_total",
                "Times this node learned of a leader it did not know the moment before.",
            ),
            proposal_seconds: histogram(
                "proposal_duration_seconds",
                "From a command handed to the node to its result, applied here (failures included).",
            ),
            fsync_seconds: histogram(
                "fsync_duration_seconds",
                "Write of one Ready's log entries and hard state, synced to disk.",
            ),
            apply_seconds: histogram(
                "apply_duration_seconds",
                "Apply of one batch of committed entries (one Ready's worth).",
            ),
            leases: gauge("leases", "Live leases."),
            locks_held: gauge("locks_held", "Locks that have a holder."),
            lock_waiters: gauge("lock_waiters", "Leases queued for a lock or an election."),
            elections_led: gauge("elections_led", "Elections that have a leader."),
            grants: counter_vec(
                "grants_total",
                "Grants applied (a lock or an election won), by kind.",
                &["kind"],
            ),
            lease_expiries: counter(
                "lease_expiries_total",
                "Leases expired (not revoked), as applied.",
            ),
            stale_token_refusals: counter(
                "stale_token_refusals_total",
                "Fenced writes refused because their token was not current.",
            ),
            grpc_requests: counter_vec(
                "grpc_requests_total",
                "Client gRPC calls, by method and status code (streams: when they start).",
                &["method", "code"],
            ),
            known_services: Mutex::new(HashSet::new()),
            method_labels: Mutex::new(HashSet::new()),
            registry,
        }
    }

    /// The Prometheus text format of every metric, with the scrape-time
    /// figures read from `status` and `state` first.
    pub fn render(&self, status: &NodeStatus, ready: bool, state: &Coordination) -> String {
        let gauge = |g: &IntGauge, v: u64| g.set(i64::try_from(v).unwrap_or(i64::MAX));
        gauge(&self.raft_term, status.term);
        gauge(&self.raft_commit_index, status.commit_index);
        gauge(&self.raft_applied_index, status.applied_index);
        gauge(&self.checkpoint_index, status.checkpoint_index);
        gauge(&self.raft_first_index, status.first_index);
        gauge(&self.raft_last_index, status.last_index);
        gauge(&self.raft_leader_id, status.leader_id);
        gauge(&self.raft_is_leader, u64::from(status.role == Role::Leader));
        gauge(&self.node_ready, u64::from(ready));
        let census = Census::of(state);
        gauge(&self.leases, census.leases);
        gauge(&self.locks_held, census.locks_held);
        gauge(&self.lock_waiters, census.waiters);
        gauge(&self.elections_led, census.elections_led);
        let mut out = Vec::new();
        // Encoding into a Vec only fails on invalid metric families, which
        // the registry refused at registration.
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding of registered metrics");
        String::from_utf8_lossy(&out).into_owned()
    }

    pub fn observe_proposal(&self, took: Duration) {
        self.proposal_seconds.observe(took.as_secs_f64());
    }

    pub fn observe_fsync(&self, took: Duration) {
        self.fsync_seconds.observe(took.as_secs_f64());
    }

    pub fn observe_apply(&self, took: Duration) {
        self.apply_seconds.observe(took.as_secs_f64());
    }

    pub fn leader_changed(&self) {
        self.leader_changes.inc();
    }

    /// Counts what one applied command did.
    pub fn applied(&self, events: &[Event], result: &CommandResult) {
        for event in events {
            match event {
                Event::Granted { kind, .. } => {
                    self.grants.with_label_values(&[kind_label(*kind)]).inc()
                }
                Event::LeaseRemoved { expired: true, .. } => self.lease_expiries.inc(),
                _ => {}
            }
        }
        if is_stale_token(result) {
            self.stale_token_refusals.inc();
        }
    }

    /// Allows the methods of `service` (a gRPC service name such as
    /// `latchkey.v1.Lock`) as `method` labels.
    pub fn serve_service(&self, service: &str) {
        self.known_services.lock().insert(service.to_string());
    }

    /// A layer that counts every call of the service it wraps.
    pub fn grpc_layer(self: &Arc<Self>) -> GrpcMetricsLayer {
        GrpcMetricsLayer {
            metrics: self.clone(),
        }
    }

    /// Counts one request that came as a message on a stream rather than
    /// as a call (`Lock.Pipeline`), under the method of its unary call.
    pub fn count_request(&self, path: &str, code: tonic::Code) {
        self.count_call(path, &format!("{code:?}"));
    }

    fn count_call(&self, path: &str, code: &str) {
        let method = self.method_label(path);
        self.grpc_requests
            .with_label_values(&[method.as_str(), code])
            .inc();
    }

    /// `path` if it names a method of a served service and the label set
    /// has room; otherwise `unknown`.
    fn method_label(&self, path: &str) -> String {
        let unknown = || "unknown".to_string();
        let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
            return unknown();
        };
        let plausible = !method.is_empty()
            && method.len() <= 64
            && method
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !plausible || !self.known_services.lock().contains(service) {
            return unknown();
        }
        let mut labels = self.method_labels.lock();
        if labels.contains(path) || labels.len() < MAX_METHOD_LABELS {
            labels.insert(path.to_string());
            path.to_string()
        } else {
            unknown()
        }
    }
}

/// Counts of the live coordination state.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Census {
    pub leases: u64,
    pub locks_held: u64,
    pub waiters: u64,
    pub elections_led: u64,
}

impl Census {
    pub fn of(state: &Coordination) -> Census {
        let mut census = Census {
            leases: state.leases().count() as u64,
            ..Census::default()
        };
        for (key, lock) in state.locks() {
            match key.kind {
                Kind::Lock => census.locks_held += 1,
                Kind::Election => census.elections_led += 1,
            }
            census.waiters += lock.waiters.len() as u64;
        }
        census
    }
}

fn kind_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Lock => "lock",
        Kind::Election => "election",
    }
}

fn is_stale_token(result: &CommandResult) -> bool {
    let Some(command_result::Result::Error(error)) = &result.result else {
        return false;
    };
    matches!(
        error.details.as_ref().and_then(|d| d.detail.as_ref()),
        Some(error_details::Detail::StaleToken(_))
    )
}

fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    // Names and labels are constants of this file, each registered once.
    let metric = metric.expect("valid metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

/// Counts client gRPC calls by method and status code; see the module docs.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around another.
#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, RequestBody, ResponseBody> tower::Service<http::Request<RequestBody>>
    for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResponseBody: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let path = request.uri().path().to_string();
        let metrics = self.metrics.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let code = match &response {
                // Absent from the headers: the call has not failed (yet);
                // its final code travels in the trailers.
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(tonic::Code::Ok, tonic::Code::from_i32),
                Err(_) => tonic::Code::Unknown,
            };
            metrics.count_call(&path, &format!("{code:?}"));
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded_to_served_services() {
        let metrics = Metrics::new();
        metrics.serve_service("latchkey.v1.Lock");
        assert_eq!(
            metrics.method_label("/latchkey.v1.Lock/Acquire"),
            "/latchkey.v1.Lock/Acquire"
        );
        assert_eq!(metrics.method_label("/evil.Service/Acquire"), "unknown");
        assert_eq!(metrics.method_label("/latchkey.v1.Lock/a b"), "unknown");
        assert_eq!(metrics.method_label("no-slash"), "unknown");
        for i in 0..2 * MAX_METHOD_LABELS {
            metrics.method_label(&format!("/latchkey.v1.Lock/M{i}"));
        }
        assert_eq!(metrics.method_labels.lock().len(), MAX_METHOD_LABELS);
        assert_eq!(metrics.method_label("/latchkey.v1.Lock/Another"), "unknown");
        // A label already in the set keeps being used.
        assert_eq!(
            metrics.method_label("/latchkey.v1.Lock/Acquire"),
            "/latchkey.v1.Lock/Acquire"
        );
    }

    #[test]
    fn render_shows_counters_and_scrape_time_figures() {
        let metrics = Metrics::new();
        metrics.leader_changed();
        metrics.observe_fsync(Duration::from_micros(300));
        metrics.count_call("/latchkey.v1.Lock/Acquire", "Ok");
        let status = NodeStatus {
            term: 7,
            leader_id: 3,
            commit_index: 42,
            applied_index: 41,
            checkpoint_index: 40,
            ..NodeStatus::default()
        };
        let state = Coordination::new(crate::coordination::TtlBounds {
            min_ttl_ms: 1,
            max_ttl_ms: 10,
        });
        let text = metrics.render(&status, false, &state);
        for line in [
            "latchkey_raft_term 7",
            "latchkey_raft_leader_id 3",
            "latchkey_raft_commit_index 42",
            "latchkey_raft_applied_index 41",
            "latchkey_checkpoint_index 40",
            "latchkey_raft_leader_changes_total 1",
            "latchkey_node_ready 0",
            "latchkey_leases 0",
            "latchkey_fsync_duration_seconds_count 1",
            "latchkey_grpc_requests_total{code=\"Ok\",method=\"unknown\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from:\n{text}"
            );
        }
    }
}
