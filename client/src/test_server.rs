//! A gRPC server on a loopback port, for the unit tests that fake a
//! node's service.

use std::net::SocketAddr;

/// Serves `router` on an OS-assigned loopback port until the test's
/// runtime ends; returns its address.
pub(crate) async fn serve_on_loopback(router: tonic::transport::server::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("bound address");
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    tokio::spawn(router.serve_with_incoming(incoming));
    addr
}
