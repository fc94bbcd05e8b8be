//! The HTTP port (`--listen-http`): what monitoring and people read.
//!
//! | path | answer |
//! |---|---|
//! | `/` | the live status page: one self-contained HTML file that reads `/api/status` every second |
//! | `/api/status` | JSON: this node, every member, every lock, election and lease (see `status.rs`) |
//! | `/metrics` | Prometheus text format ([`crate::metrics`]) |
//! | `/healthz` | 200 while the node's task runs and it is not stopping; 503 otherwise |
//! | `/readyz` | 200 when [`readiness`] holds: a leader is known and apply has caught up with commit |
//!
//! Everything here reads; no request changes anything. Other paths get 404,
//! other methods on these paths 405. When the node stops, the listener
//! closes, requests in flight are answered (the status page's calls to
//! other members have deadlines), and `/healthz` and `/readyz` answer 503
//! from the moment the stop begins.
//!
//! # Layout
//! - this file: the router, the health rules, serving and stopping.
//! - `status.rs`: the `/api/status` document.
//! - `status_page.html`: the page at `/`.

mod status;

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::node::{NodeHandle, Standing};
use crate::transport::PeerDirectory;
use crate::types::NodeId;

pub use status::{StatusDocument, MAX_LISTED};

/// The page at `/`, compiled in: no file to install, no asset to fetch.
const STATUS_PAGE: &str = include_str!("http/status_page.html");

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub id: NodeId,
    pub node: NodeHandle,
    pub directory: PeerDirectory,
    pub metrics: Arc<Metrics>,
    /// True once the node has begun to stop.
    pub stopping: watch::Receiver<bool>,
    /// How this node dials the other members' client ports, when they
    /// have TLS: the client CA (or the cluster CA) and its own certificate.
    pub member_tls: Option<latchkey_client::TlsConfig>,
}

/// Why a node is not ready, or `Ok` if it is: its task runs, it knows a
/// leader, and it has applied everything it knows committed. Shared by
/// `/readyz`, the `node_ready` metric and the gRPC health service.
pub fn readiness(status: &Standing, stopping: bool) -> Result<(), &'static str> {
    if stopping || !status.running {
        Err("the node is stopping")
    } else if status.sync_stalled {
        Err("a sync of the Raft log has hung; requests are refused until it ends")
    } else if status.leader_id == 0 {
        Err("no leader known")
    } else if !status.caught_up {
        Err("apply has not caught up with commit")
    } else {
        Ok(())
    }
}

/// The router of the HTTP port.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/status", get(status_json))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `stop` resolves, then stops
/// accepting and finishes the requests in flight.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(stop)
        .await
}

async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        STATUS_PAGE,
    )
        .into_response()
}

async fn status_json(State(state): State<HttpState>) -> Response {
    let document = status::collect(&state).await;
    match serde_json::to_string(&document) {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let status = state.node.status();
    let ready = readiness(&status.standing(), *state.stopping.borrow()).is_ok();
    let body = {
        let coordination = state.node.coordination();
        let coordination = coordination.read();
        state.metrics.render(&status, ready, &coordination)
    };
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response()
}

async fn healthz(State(state): State<HttpState>) -> Response {
    if *state.stopping.borrow() || !state.node.status().running {
        text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n")
    } else {
        text(StatusCode::OK, "ok\n")
    }
}

async fn readyz(State(state): State<HttpState>) -> Response {
    match readiness(&state.node.status().standing(), *state.stopping.borrow()) {
        Ok(()) => text(StatusCode::OK, "ready\n"),
        Err(why) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn not_found() -> Response {
    text(
        StatusCode::NOT_FOUND,
        "not found; this port serves /, /api/status, /metrics, /healthz and /readyz\n",
    )
}

fn text(code: StatusCode, body: impl Into<String>) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::NodeStatus;

    fn status(leader_id: u64, commit_index: u64, applied_index: u64) -> Standing {
        NodeStatus {
            leader_id,
            commit_index,
            applied_index,
            running: true,
            ..NodeStatus::default()
        }
        .standing()
    }

    #[test]
    fn ready_only_with_a_leader_and_apply_caught_up() {
        assert_eq!(readiness(&status(2, 10, 10), false), Ok(()));
        assert_eq!(readiness(&status(0, 10, 10), false), Err("no leader known"));
        assert_eq!(
            readiness(&status(2, 10, 9), false),
            Err("apply has not caught up with commit")
        );
        assert_eq!(
            readiness(&status(2, 10, 10), true),
            Err("the node is stopping")
        );
        let stopped = Standing {
            running: false,
            ..status(2, 10, 10)
        };
        assert_eq!(readiness(&stopped, false), Err("the node is stopping"));
    }
}
