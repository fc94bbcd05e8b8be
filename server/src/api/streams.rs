//! The bound on calls open at once on one client connection
//! (`--max-streams-per-connection`).
//!
//! A tower layer counts, per connection (its remote address), the calls
//! whose responses have not finished; a unary call counts until it is
//! answered, a stream until it ends. A call past the bound is answered at
//! once with `RESOURCE_EXHAUSTED` and `LimitExceeded` details naming the
//! setting, without reaching any service. `latchkey-client` holds one
//! stream per lease it keeps alive, so the default is generous.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use prost::Message as _;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The setting's name in errors.
pub const LIMIT_NAME: &str = "max-streams-per-connection";

/// Counts open calls per connection.
#[derive(Clone)]
pub struct StreamLimitLayer {
    limit: usize,
    open: Arc<Mutex<HashMap<SocketAddr, usize>>>,
}

impl StreamLimitLayer {
    pub fn new(limit: usize) -> StreamLimitLayer {
        StreamLimitLayer {
            limit,
            open: Arc::default(),
        }
    }

    /// Counts one more call on `addr`, unless it has `limit` already.
    fn open(&self, addr: SocketAddr) -> Option<OpenCall> {
        let mut open = self.open.lock();
        let count = open.entry(addr).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(OpenCall {
            addr,
            open: self.open.clone(),
        })
    }
}

/// One counted call; uncounted when dropped.
struct OpenCall {
    addr: SocketAddr,
    open: Arc<Mutex<HashMap<SocketAddr, usize>>>,
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        let mut open = self.open.lock();
        if let Some(count) = open.get_mut(&self.addr) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.addr);
            }
        }
    }
}

impl<S> tower::Layer<S> for StreamLimitLayer {
    type Service = StreamLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StreamLimit {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`StreamLimitLayer`] wraps around another.
#[derive(Clone)]
pub struct StreamLimit<S> {
    inner: S,
    layer: StreamLimitLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<Body>> for StreamLimit<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let Some(addr) = remote_addr(&request) else {
            return Box::pin(self.inner.call(request));
        };
        let Some(call) = self.layer.open(addr) else {
            let limit = self.layer.limit as u64;
            tracing::info!(peer = %addr, "call refused: {LIMIT_NAME} ({limit}) reached on this connection");
            return Box::pin(async move { Ok(refusal(limit).into_http()) });
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Body::new(Counted { body, _call: call })))
        })
    }
}

fn remote_addr<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

/// The status a call past the bound gets.
pub fn refusal(limit: u64) -> tonic::Status {
    let details = latchkey_proto::v1::ErrorDetails {
        detail: Some(latchkey_proto::v1::error_details::Detail::LimitExceeded(
            latchkey_proto::v1::LimitExceeded {
                limit: LIMIT_NAME.to_string(),
                allowed: limit,
                requested: limit + 1,
            },
        )),
    };
    tonic::Status::with_details(
        tonic::Code::ResourceExhausted,
        format!("{limit} calls are open on this connection; the limit is --{LIMIT_NAME} {limit}"),
        details.encode_to_vec().into(),
    )
}

/// A response body that keeps its call counted until it ends or is dropped.
struct Counted {
    body: Body,
    _call: OpenCall,
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
