//! The loopback fallback's fault injector: a TCP proxy per directed link
//! (node to node, or client worker to node) that stops carrying bytes in a
//! cut direction.
//!
//! The proxy for `a → b` listens on 127.0.0.1 (port chosen by the kernel)
//! and is the address member `a` (a node, or a worker: `net` numbers them)
//! dials for node `b`. Each accepted connection
//! is joined to `b`'s real address (peer or client port) by two pumps: bytes from `a` to `b`
//! and the answers from `b` to `a`. A pump holds the chunk it has read
//! while its direction is cut and sends it once the cut is healed, and
//! stops reading meanwhile, so TCP back-pressure holds the rest: what a
//! dropped-then-retransmitted packet looks like to the application. A
//! one-way cut `a → b` stalls only the bytes that travel from `a` to `b`,
//! on the connections of either proxy.
//!
//! Not the same as the namespace network: new connections are accepted
//! even while cut (their handshake completes, their bytes wait), and
//! nothing ever times out at the TCP level, only in the applications.
//!
//! # Not done yet
//! - Bytes are held, never lost: a cut cannot reset a connection or make a
//!   write vanish, as a real network can.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// Bytes a pump reads at once.
const PUMP_CHUNK_BYTES: usize = 16 * 1024;
/// Connections one proxy carries at once; past this, new ones are refused.
const MAX_CONNECTIONS_PER_PROXY: usize = 64;

/// The set of cut directed links `(from, to)`, shared by every proxy.
#[derive(Clone)]
pub struct LinkTable {
    cuts: Arc<watch::Sender<BTreeSet<(u64, u64)>>>,
}

impl Default for LinkTable {
    fn default() -> Self {
        LinkTable {
            cuts: Arc::new(watch::Sender::new(BTreeSet::new())),
        }
    }
}

impl LinkTable {
    /// Replaces the set of cut links.
    pub fn set(&self, cuts: BTreeSet<(u64, u64)>) {
        self.cuts.send_replace(cuts);
    }

    /// The cut links in force.
    pub fn current(&self) -> BTreeSet<(u64, u64)> {
        self.cuts.borrow().clone()
    }

    /// Waits until bytes may travel from `from` to `to` (or the table is
    /// gone).
    async fn wait_open(&self, rx: &mut watch::Receiver<BTreeSet<(u64, u64)>>, from: u64, to: u64) {
        // Bounded by the nemesis: every cut is healed before the run ends,
        // and the proxy task is aborted at teardown.
        while rx.borrow_and_update().contains(&(from, to)) {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// One directed link's proxy; stopped by [`Proxy::stop`] or drop.
pub struct Proxy {
    listen: SocketAddr,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on 127.0.0.1 for node `from`'s connections to node `to`,
    /// whose real peer address is `target`.
    pub async fn spawn(
        from: u64,
        to: u64,
        target: SocketAddr,
        links: LinkTable,
    ) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let listen = listener.local_addr()?;
        let task = tokio::spawn(accept_loop(listener, from, to, target, links));
        Ok(Proxy { listen, task })
    }

    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// Closes the listener and every connection.
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    from: u64,
    to: u64,
    target: SocketAddr,
    links: LinkTable,
) {
    // Dropped with this task, which aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_CONNECTIONS_PER_PROXY {
            continue;
        }
        let links = links.clone();
        connections.spawn(async move {
            let Ok(outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            let forward = pump(in_read, out_write, from, to, links.clone());
            let backward = pump(out_read, in_write, to, from, links);
            tokio::join!(forward, backward);
        });
    }
}

/// Copies bytes travelling from member `from` to member `to`, holding them while
/// that direction is cut.
async fn pump(
    mut reader: OwnedReadHalf,
    mut writer: OwnedWriteHalf,
    from: u64,
    to: u64,
    links: LinkTable,
) {
    let mut rx = links.cuts.subscribe();
    let mut chunk = vec![0u8; PUMP_CHUNK_BYTES];
    loop {
        let read = match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        links.wait_open(&mut rx, from, to).await;
        if writer.write_all(&chunk[..read]).await.is_err() {
            break;
        }
    }
    let _ = writer.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_cut_direction_holds_bytes_until_healed() {
        let target = echo_server().await;
        let links = LinkTable::default();
        let proxy = Proxy::spawn(1, 2, target, links.clone())
            .await
            .expect("proxy");
        let mut socket = TcpStream::connect(proxy.listen_addr()).await.expect("dial");
        let mut answer = [0u8; 4];

        socket.write_all(b"ping").await.expect("write");
        socket.read_exact(&mut answer).await.expect("echo");
        assert_eq!(&answer, b"ping");

        links.set(BTreeSet::from([(1, 2)]));
        socket.write_all(b"pong").await.expect("write");
        let held = tokio::time::timeout(Duration::from_millis(300), socket.read_exact(&mut answer));
        assert!(held.await.is_err(), "bytes crossed a cut link");

        links.set(BTreeSet::new());
        tokio::time::timeout(Duration::from_secs(5), socket.read_exact(&mut answer))
            .await
            .expect("delivered after the heal")
            .expect("read");
        assert_eq!(&answer, b"pong");
        proxy.stop();
    }
}
