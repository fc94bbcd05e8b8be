//! TLS for connections to the cluster: the CA that signed the servers'
//! certificates, optionally a client certificate and key (mutual TLS), and
//! optionally certificate revocation lists. Everything is read from PEM.
//!
//! The server's certificate must name the address dialed (an IP address
//! SAN for `127.0.0.1:2379`, a DNS SAN for `db1:2379`), unless
//! [`TlsConfig::domain_name`] names what to expect instead.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use tonic::transport::{ClientTlsConfig, Endpoint, Identity};

use crate::Error;

/// TLS settings of a client (or of a node dialing its peers).
#[derive(Clone)]
pub struct TlsConfig {
    ca: Vec<CertificateDer<'static>>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    domain_name: Option<String>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never prints the key.
        f.debug_struct("TlsConfig")
            .field("ca_certificates", &self.ca.len())
            .field("client_certificate", &self.identity.is_some())
            .field("crls", &self.crls.len())
            .field("domain_name", &self.domain_name)
            .finish()
    }
}

impl TlsConfig {
    /// Trusts the CA certificates in `ca_pem` (one or more).
    pub fn new(ca_pem: &[u8]) -> Result<TlsConfig, Error> {
        Ok(TlsConfig {
            ca: read_certificates("CA certificate", ca_pem)?,
            identity: None,
            crls: Vec::new(),
            domain_name: None,
        })
    }

    /// Reads the CA, and the client certificate and key if given, from files.
    pub fn from_files(
        ca: &Path,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<TlsConfig, Error> {
        let config = TlsConfig::new(&read_file(ca, "CA certificate")?)?;
        match (cert, key) {
            (Some(cert), Some(key)) => {
                config.identity(&read_file(cert, "certificate")?, &read_file(key, "key")?)
            }
            (None, None) => Ok(config),
            _ => Err(Error::Config(
                "a client certificate needs its key, and a key its certificate".into(),
            )),
        }
    }

    /// Presents this certificate (chain) and key to the server (mutual TLS).
    pub fn identity(mut self, cert_pem: &[u8], key_pem: &[u8]) -> Result<TlsConfig, Error> {
        read_certificates("client certificate", cert_pem)?;
        PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| Error::Config(format!("the client key is not a PEM private key: {e}")))?;
        self.identity = Some((cert_pem.to_vec(), key_pem.to_vec()));
        Ok(self)
    }

    /// Refuses server certificates that a CRL in `crl_pem` revokes.
    pub fn crl(mut self, crl_pem: &[u8]) -> Result<TlsConfig, Error> {
        let crls = CertificateRevocationListDer::pem_slice_iter(crl_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Config(format!("the CRL is not PEM: {e}")))?;
        if crls.is_empty() {
            return Err(Error::Config(
                "the CRL file holds no revocation list".into(),
            ));
        }
        self.crls.extend(crls);
        Ok(self)
    }

    /// Expects the server's certificate to name `name` rather than the host dialed.
    pub fn domain_name(mut self, name: impl Into<String>) -> TlsConfig {
        self.domain_name = Some(name.into());
        self
    }

    /// Applies the settings to a `https://` endpoint.
    pub fn apply(&self, endpoint: Endpoint) -> Result<Endpoint, Error> {
        let verifier = self.verifier()?;
        let mut tls = ClientTlsConfig::new().assume_http2(true);
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.domain_name {
            tls = tls.domain_name(name.clone());
        }
        endpoint
            .tls_config_with_verifier(tls, verifier)
            .map_err(|e| Error::Config(format!("TLS settings: {e}")))
    }
}

impl TlsConfig {
    fn verifier(&self) -> Result<Arc<WebPkiServerVerifier>, Error> {
        let mut roots = RootCertStore::empty();
        for cert in &self.ca {
            roots
                .add(cert.clone())
                .map_err(|e| Error::Config(format!("the CA certificate is not usable: {e}")))?;
        }
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .with_crls(self.crls.clone())
            .build()
            .map_err(|e| Error::Config(format!("cannot verify servers with this CA or CRL: {e}")))
    }

    /// The same settings as a rustls configuration, for a connection that
    /// does not go through tonic: offers `alpn`, and returns the name the
    /// server's certificate must carry when `host` (a DNS name or an IP
    /// address, without port) is dialed.
    pub fn rustls_config(
        &self,
        host: &str,
        alpn: &[&[u8]],
    ) -> Result<(rustls::ClientConfig, ServerName<'static>), Error> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS versions: {e}")))?
            .with_webpki_verifier(self.verifier()?);
        let mut config = match &self.identity {
            Some((cert, key)) => {
                let chain = read_certificates("client certificate", cert)?;
                let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
                    Error::Config(format!("the client key is not a PEM private key: {e}"))
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| Error::Config(format!("the client certificate and key: {e}")))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = self.domain_name.as_deref().unwrap_or(host);
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| Error::Config(format!("{name} is not a server name: {e}")))?;
        Ok((config, name))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path)
        .map_err(|e| Error::Config(format!("cannot read the {what} {}: {e}", path.display())))
}

fn read_certificates(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("the {what} is not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "the {what} file holds no certificate"
        )));
    }
    Ok(certs)
}
