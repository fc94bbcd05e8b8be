//! `latchkey dev --tls`: a throwaway CA and certificates, made with rcgen
//! under the cluster directory's `tls/` folder:
//!
//! - `ca.pem`, `ca-key.pem`: the CA (for this dev cluster only);
//! - `node-N.pem`, `node-N-key.pem`: node N's certificate (common name
//!   `node-N`; names `localhost` and `127.0.0.1`; server and client use),
//!   used on its client and peer ports;
//! - `root.pem`, `root-key.pem` and `client.pem`, `client-key.pem`: client
//!   certificates whose common names are the users `root` and `client`.
//!
//! A cluster whose directory has `tls/ca.pem` runs with TLS on both ports
//! (mutual on both), so a restart keeps it. Nodes added later get their
//! certificates when they are first started.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The folder under the cluster directory.
pub const TLS_DIR: &str = "tls";
/// The client identities made for a new cluster.
pub const CLIENTS: [&str; 2] = ["root", "client"];

pub fn dir(cluster_dir: &Path) -> PathBuf {
    cluster_dir.join(TLS_DIR)
}

/// Whether the cluster in `cluster_dir` runs with TLS.
pub fn enabled(cluster_dir: &Path) -> bool {
    dir(cluster_dir).join("ca.pem").exists()
}

fn cert_path(cluster_dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let dir = dir(cluster_dir);
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    )
}

/// Makes the CA and the client certificates, unless they exist.
pub fn ensure_ca(cluster_dir: &Path) -> Result<(), String> {
    let dir = dir(cluster_dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    if !enabled(cluster_dir) {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "latchkey dev CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        write_private(&dir.join("ca-key.pem"), &key.serialize_pem())?;
        write(&dir.join("ca.pem"), &cert.pem())?;
    }
    for client in CLIENTS {
        ensure_leaf(cluster_dir, client, false)?;
    }
    Ok(())
}

/// Makes node `id`'s certificate, unless it exists.
pub fn ensure_node(cluster_dir: &Path, id: u64) -> Result<(PathBuf, PathBuf), String> {
    ensure_leaf(cluster_dir, &format!("node-{id}"), true)
}

fn ensure_leaf(cluster_dir: &Path, name: &str, server: bool) -> Result<(PathBuf, PathBuf), String> {
    let (cert_file, key_file) = cert_path(cluster_dir, name);
    if cert_file.exists() && key_file.exists() {
        return Ok((cert_file, key_file));
    }
    let dir = dir(cluster_dir);
    let ca_key_pem = std::fs::read_to_string(dir.join("ca-key.pem"))
        .map_err(|e| format!("cannot read the dev CA key: {e}"))?;
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem"))
        .map_err(|e| format!("cannot read the dev CA: {e}"))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| e.to_string())?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| e.to_string())?;
    let names = if server {
        vec!["localhost".to_string()]
    } else {
        Vec::new()
    };
    let mut params = CertificateParams::new(names).map_err(|e| e.to_string())?;
    params.distinguished_name.push(DnType::CommonName, name);
    if server {
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
    } else {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.signed_by(&key, &issuer).map_err(|e| e.to_string())?;
    write_private(&key_file, &key.serialize_pem())?;
    write(&cert_file, &cert.pem())?;
    Ok((cert_file, key_file))
}

/// The `serve` flags of node `id` (its certificate made if missing), or
/// none when the cluster has no TLS.
pub fn node_flags(cluster_dir: &Path, id: u64) -> Result<Vec<String>, String> {
    if !enabled(cluster_dir) {
        return Ok(Vec::new());
    }
    let (cert, key) = ensure_node(cluster_dir, id)?;
    let ca = dir(cluster_dir).join("ca.pem").display().to_string();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    Ok(vec![
        "--cert-file".into(),
        cert.clone(),
        "--key-file".into(),
        key.clone(),
        "--client-ca".into(),
        ca.clone(),
        "--peer-cert-file".into(),
        cert,
        "--peer-key-file".into(),
        key,
        "--peer-ca".into(),
        ca,
    ])
}

/// What `dev` itself (and the printed hint) connects with: the CA and the
/// `root` client certificate.
pub fn root_client(cluster_dir: &Path) -> Result<Option<latchkey_client::TlsConfig>, String> {
    if !enabled(cluster_dir) {
        return Ok(None);
    }
    let (cert, key) = cert_path(cluster_dir, "root");
    latchkey_client::TlsConfig::from_files(
        &dir(cluster_dir).join("ca.pem"),
        Some(&cert),
        Some(&key),
    )
    .map(Some)
    .map_err(|e| e.to_string())
}

/// The environment a client needs, as shell lines.
pub fn client_env(cluster_dir: &Path, client: &str) -> Vec<String> {
    let (cert, key) = cert_path(cluster_dir, client);
    vec![
        format!(
            "export LATCHKEY_CACERT={}",
            dir(cluster_dir).join("ca.pem").display()
        ),
        format!("export LATCHKEY_CERT={}", cert.display()),
        format!("export LATCHKEY_KEY={}", key.display()),
    ]
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn write_private(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(text.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}
