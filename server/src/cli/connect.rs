//! Dialing one endpoint, and describing what went wrong in one line.
//!
//! Endpoints are plain `HOST:PORT`; they are dialed as `http://HOST:PORT`,
//! or `https://HOST:PORT` with TLS settings. Every dial and every call has a deadline, because a node
//! that is stopped (SIGSTOP) or partitioned accepts nothing and refuses
//! nothing: without a deadline the command would hang.

use std::error::Error;
use std::time::Duration;

use latchkey_proto::v1::cluster_client::ClusterClient;
use latchkey_proto::v1::{StatusRequest, StatusResponse};
use tonic::transport::{Channel, Endpoint};

use super::format_duration;

/// Opens a connection (TCP and HTTP/2 handshake) to `endpoint` within `timeout`.
pub async fn connect(endpoint: &str, timeout: Duration) -> Result<Channel, String> {
    connect_tls(endpoint, timeout, None).await
}

/// [`connect`], with TLS when `tls` is given.
pub async fn connect_tls(
    endpoint: &str,
    timeout: Duration,
    tls: Option<&latchkey_client::TlsConfig>,
) -> Result<Channel, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut target = Endpoint::from_shared(format!("{scheme}://{endpoint}"))
        .map_err(|err| format!("{endpoint} is not a valid HOST:PORT: {}", describe(&err)))?;
    if let Some(tls) = tls {
        target = tls.apply(target).map_err(|e| e.to_string())?;
    }
    let target = target.connect_timeout(timeout).tcp_nodelay(true);
    match tokio::time::timeout(timeout, target.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(err)) => Err(describe(&err)),
        Err(_) => Err(format!("no answer within {}", format_duration(timeout))),
    }
}

/// Asks `endpoint` for its `Cluster.Status`, connection included, within `timeout`.
pub async fn fetch_status(endpoint: &str, timeout: Duration) -> Result<StatusResponse, String> {
    fetch_status_tls(endpoint, timeout, None).await
}

/// [`fetch_status`], with TLS when `tls` is given.
pub async fn fetch_status_tls(
    endpoint: &str,
    timeout: Duration,
    tls: Option<&latchkey_client::TlsConfig>,
) -> Result<StatusResponse, String> {
    let call = async {
        let channel = connect_tls(endpoint, timeout, tls).await?;
        ClusterClient::new(channel)
            .status(StatusRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| describe_status(&status))
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {}", format_duration(timeout))),
    }
}

/// The most specific message in an error's source chain, e.g.
/// `Connection refused (os error 111)` rather than `transport error`.
pub fn describe(err: &(dyn Error + 'static)) -> String {
    let mut innermost = err;
    // Bounded: source chains are a handful of links, and this walks each once.
    while let Some(source) = innermost.source() {
        innermost = source;
    }
    let message = innermost.to_string();
    if message.is_empty() {
        err.to_string()
    } else {
        message
    }
}

/// A gRPC status as one line: the server's message and the code name.
pub fn describe_status(status: &tonic::Status) -> String {
    if let Some(source) = status.source() {
        return describe(source);
    }
    let message = status.message().trim();
    if message.is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{message} ({:?})", status.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_closed_port_is_reported_as_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local addr");
        drop(listener);
        let err = fetch_status(&addr.to_string(), Duration::from_secs(2))
            .await
            .expect_err("nothing listens there");
        assert!(err.to_lowercase().contains("refused"), "{err}");
    }

    #[tokio::test]
    async fn a_silent_listener_times_out_instead_of_hanging() {
        // Accepts TCP connections (the kernel does) but never speaks HTTP/2.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let err = fetch_status(&addr.to_string(), Duration::from_millis(300))
            .await
            .expect_err("no HTTP/2 handshake");
        assert!(err.contains("300ms") || err.contains("timed out"), "{err}");
        drop(listener);
    }

    #[test]
    fn server_status_shows_message_and_code() {
        let status = tonic::Status::unavailable("not the leader");
        assert_eq!(describe_status(&status), "not the leader (Unavailable)");
    }
}
