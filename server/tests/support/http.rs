//! A plain HTTP/1.1 client for the HTTP port, on hyper: one connection per
//! request, every request bounded by a deadline.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Longest a request may take, connection included.
pub const HTTP_DEADLINE: Duration = Duration::from_secs(10);

/// `GET path` on `addr`: the status code and the body.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    request("GET", addr, path).await
}

/// `method path` on `addr` with an empty body: the status code and the body.
pub async fn request(method: &str, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    tokio::time::timeout(HTTP_DEADLINE, exchange(method, addr, path))
        .await
        .map_err(|_| format!("{method} {path} on {addr}: no answer in {HTTP_DEADLINE:?}"))?
}

async fn exchange(method: &str, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake with {addr}: {e}"))?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("{method} {path} on {addr}: {e}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body of {method} {path}: {e}"))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The value of the sample `name` (exactly, labels included) in a
/// Prometheus text exposition, if present.
pub fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == name).then(|| value.parse().ok()).flatten()
    })
}

/// Polls `addr`'s `/metrics` until sample `name` satisfies `wanted`, and
/// returns that exposition; fails the test after `deadline` with the last
/// answer.
pub async fn wait_for_sample(
    addr: SocketAddr,
    name: &str,
    wanted: impl Fn(f64) -> bool,
    deadline: Duration,
) -> String {
    let start = std::time::Instant::now();
    loop {
        let answer = get(addr, "/metrics").await;
        if let Ok((200, text)) = &answer {
            if sample(text, name).is_some_and(&wanted) {
                return text.clone();
            }
        }
        assert!(
            start.elapsed() < deadline,
            "{name} on {addr} never as wanted within {deadline:?}; last answer: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
