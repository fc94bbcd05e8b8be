//! TLS on the client and peer ports, with rustls.
//!
//! - **Client port**: TLS when `--cert-file`/`--key-file` are given;
//!   mutual TLS (a client certificate signed by `--client-ca` is required)
//!   when `--client-ca` is given too.
//! - **Peer port**: with `--peer-cert-file`/`--peer-key-file`/`--peer-ca`,
//!   always mutual: a node accepts Raft streams only from a node whose
//!   certificate the cluster CA signed, and verifies the certificate of
//!   every node it dials against the same CA.
//! - `--crl-file` (PEM, one or more lists) revokes certificates on both
//!   ports, in both directions.
//!
//! Every file is re-read on SIGHUP ([`TlsReloader::reload`]): connections
//! made afterwards use the new certificates, keys, CAs and CRLs; those
//! already open carry on. A reload that fails (a missing file, a key that
//! does not match) changes nothing and is logged.
//!
//! Handshakes run off the accept loop, each bounded by
//! [`HANDSHAKE_TIMEOUT`] and at most [`MAX_PENDING_HANDSHAKES`] at once, so
//! plaintext or a stalled client on a TLS port is refused without holding
//! up anyone else. Each refusal is logged once with the peer's address.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most handshakes in progress on one port; further connections wait in
/// the kernel's backlog.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// The files of one port's TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA whose client certificates are required (mutual TLS); `None`: no
    /// client certificate is asked for.
    pub client_ca: Option<PathBuf>,
    pub crl: Option<PathBuf>,
}

/// TLS of the client and peer ports, as configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub client: Option<TlsFiles>,
    /// Always with `client_ca` (the cluster CA): peers are mutual.
    pub peer: Option<TlsFiles>,
}

/// One port's server configuration, swapped whole on reload.
#[derive(Clone)]
pub struct ServerTls {
    files: TlsFiles,
    /// The application protocols the port speaks, preferred first.
    alpn: Vec<&'static [u8]>,
    current: Arc<RwLock<Arc<ServerConfig>>>,
}

impl ServerTls {
    /// The client port's: gRPC only.
    pub fn load(files: TlsFiles) -> Result<ServerTls, String> {
        ServerTls::load_for(files, vec![b"h2"])
    }

    /// The peer port's: gRPC, and the framed Raft protocol
    /// (`crate::transport::framed`).
    pub fn load_peer(files: TlsFiles) -> Result<ServerTls, String> {
        ServerTls::load_for(files, vec![b"h2", crate::transport::framed::ALPN])
    }

    fn load_for(files: TlsFiles, alpn: Vec<&'static [u8]>) -> Result<ServerTls, String> {
        let config = server_config(&files, &alpn)?;
        Ok(ServerTls {
            files,
            alpn,
            current: Arc::new(RwLock::new(Arc::new(config))),
        })
    }

    fn reload(&self) -> Result<(), String> {
        let config = server_config(&self.files, &self.alpn)?;
        *self.current.write() = Arc::new(config);
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().clone())
    }
}

/// The peer port's client side: what a node presents and trusts when it
/// dials another, re-read on reload.
#[derive(Clone)]
pub struct PeerClientTls {
    files: TlsFiles,
    current: Arc<RwLock<latchkey_client::TlsConfig>>,
}

impl PeerClientTls {
    pub fn load(files: TlsFiles) -> Result<PeerClientTls, String> {
        let config = peer_client_config(&files)?;
        Ok(PeerClientTls {
            files,
            current: Arc::new(RwLock::new(config)),
        })
    }

    fn reload(&self) -> Result<(), String> {
        *self.current.write() = peer_client_config(&self.files)?;
        Ok(())
    }

    /// The settings for the next connection.
    pub fn current(&self) -> latchkey_client::TlsConfig {
        self.current.read().clone()
    }
}

fn peer_client_config(files: &TlsFiles) -> Result<latchkey_client::TlsConfig, String> {
    let ca = files
        .client_ca
        .as_ref()
        .ok_or("the peer port needs --peer-ca")?;
    let mut config =
        latchkey_client::TlsConfig::from_files(ca, Some(&files.cert), Some(&files.key))
            .map_err(|e| e.to_string())?;
    if let Some(crl) = &files.crl {
        let pem = read(crl, "CRL")?;
        config = config.crl(&pem).map_err(|e| e.to_string())?;
    }
    Ok(config)
}

/// Everything re-read on SIGHUP.
#[derive(Clone, Default)]
pub struct TlsReloader {
    servers: Vec<(&'static str, ServerTls)>,
    peer_client: Option<PeerClientTls>,
}

impl TlsReloader {
    pub fn new(
        client: Option<ServerTls>,
        peer: Option<ServerTls>,
        peer_client: Option<PeerClientTls>,
    ) -> TlsReloader {
        let servers = [("client", client), ("peer", peer)]
            .into_iter()
            .filter_map(|(name, tls)| tls.map(|tls| (name, tls)))
            .collect();
        TlsReloader {
            servers,
            peer_client,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty() && self.peer_client.is_none()
    }

    /// Re-reads every file; all or nothing per port. Returns what failed.
    pub fn reload(&self) -> Result<(), String> {
        let mut failures = Vec::new();
        for (name, tls) in &self.servers {
            if let Err(e) = tls.reload() {
                failures.push(format!("{name} port: {e}"));
            }
        }
        if let Some(peer) = &self.peer_client {
            if let Err(e) = peer.reload() {
                failures.push(format!("peer links: {e}"));
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("; "))
        }
    }
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

fn certificates(
    path: &std::path::Path,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the {what} {} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "the {what} {} holds no certificate",
            path.display()
        ));
    }
    Ok(certs)
}

fn crls(path: &Option<PathBuf>) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let pem = read(path, "CRL")?;
    let crls = CertificateRevocationListDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the CRL {} is not PEM: {e}", path.display()))?;
    if crls.is_empty() {
        return Err(format!(
            "the CRL {} holds no revocation list",
            path.display()
        ));
    }
    Ok(crls)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds one port's rustls configuration from its files, checking that
/// the key matches the certificate, for the application protocols `alpn`.
pub fn server_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<ServerConfig, String> {
    let chain = certificates(&files.cert, "certificate")?;
    let key_pem = read(&files.key, "key")?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "the key {} is not a PEM private key: {e}",
            files.key.display()
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = match &files.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca, "CA certificate")? {
                roots.add(cert).map_err(|e| {
                    format!("the CA certificate {} is not usable: {e}", ca.display())
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .with_crls(crls(&files.crl)?)
                .build()
                .map_err(|e| format!("cannot verify clients with {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "certificate {} and key {} do not go together: {e}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(config)
}

/// Accepts TCP connections on `listener` and hands on those whose TLS
/// handshake succeeds. Ends when the receiver is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: ServerTls,
    port: &'static str,
) -> impl tokio_stream::Stream<Item = std::io::Result<TlsStream<TcpStream>>> {
    let (sender, receiver) = mpsc::channel(64);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                permit = pending.clone().acquire_owned() => permit.expect("never closed"),
                () = sender.closed() => return,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(port, "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = sender.closed() => return,
            };
            let _ = stream.set_nodelay(true);
            let acceptor = tls.acceptor();
            let sender = sender.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = sender.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => refused(port, peer, &e.to_string()),
                    Err(_) => refused(port, peer, "handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

fn refused(port: &str, peer: SocketAddr, why: &str) {
    tracing::warn!(port, %peer, "TLS connection refused: {why}");
}
