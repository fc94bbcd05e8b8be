//! Node configuration: flags, environment and an optional TOML file.
//!
//! Precedence, highest first: command-line flag, environment variable
//! (`LATCHKEY_*`), the `--config` TOML file, built-in default. The resolved
//! [`Config`] is validated once here, so the rest of the server can trust it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::StartupError;
use crate::types::NodeId;

/// Flags of `latchkey serve`; each one also reads `LATCHKEY_<NAME>`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags and env override it).
    #[arg(long, env = "LATCHKEY_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id; must appear in --initial-cluster.
    #[arg(long, env = "LATCHKEY_ID")]
    pub id: Option<u64>,
    /// Directory for the RocksDB data of this node (created if missing).
    #[arg(long, env = "LATCHKEY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// HOST:PORT to serve the client API on.
    #[arg(long, env = "LATCHKEY_LISTEN_CLIENT")]
    pub listen_client: Option<String>,
    /// HOST:PORT to serve the peer (Raft) transport on.
    #[arg(long, env = "LATCHKEY_LISTEN_PEER")]
    pub listen_peer: Option<String>,
    /// HOST:PORT to serve HTTP on: Prometheus `/metrics`, `/healthz`,
    /// `/readyz` and the status page at `/`. Off unless given; it serves
    /// reads only, but shows lock names and lease ids: keep it on a
    /// monitoring network.
    #[arg(long, env = "LATCHKEY_LISTEN_HTTP")]
    pub listen_http: Option<String>,
    /// Client address other nodes hand out as this node's (default: --listen-client).
    #[arg(long, env = "LATCHKEY_ADVERTISE_CLIENT")]
    pub advertise_client: Option<String>,
    /// Every member's peer address: `1=HOST:PORT,2=HOST:PORT,...`.
    #[arg(long, env = "LATCHKEY_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Join a running cluster instead of starting a new one: client
    /// endpoints of some of its members (HOST:PORT,...). The node asks to be
    /// added as a learner (unless it already was, with `latchkey member
    /// add`) and catches up from a snapshot. Only on a new data dir.
    #[arg(long, env = "LATCHKEY_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,
    /// Peer address other members reach this node at (default: --listen-peer).
    #[arg(long, env = "LATCHKEY_ADVERTISE_PEER")]
    pub advertise_peer: Option<String>,
    /// Length of one Raft tick in milliseconds.
    #[arg(long, env = "LATCHKEY_TICK_INTERVAL_MS")]
    pub tick_interval_ms: Option<u64>,
    /// Ticks without a heartbeat before a follower campaigns (randomised up to 2x).
    #[arg(long, env = "LATCHKEY_ELECTION_TICKS")]
    pub election_ticks: Option<usize>,
    /// Ticks between leader heartbeats.
    #[arg(long, env = "LATCHKEY_HEARTBEAT_TICKS")]
    pub heartbeat_ticks: Option<usize>,
    /// Compact the Raft log once this many applied entries sit before the applied index.
    #[arg(long, env = "LATCHKEY_COMPACT_LOG_AFTER_ENTRIES")]
    pub compact_log_after_entries: Option<u64>,
    /// Largest rate difference between any clock in the system (servers and
    /// clients) and real time, in parts per million (10000 = 1 %). Leases
    /// are expired no earlier than TTL × (1 + drift) on the leader's clock,
    /// and clients stop trusting them TTL × (1 − drift) after sending a
    /// keepalive; see docs/semantics.md, Invariant 4.
    #[arg(long, env = "LATCHKEY_MAX_CLOCK_DRIFT_PPM")]
    pub max_clock_drift_ppm: Option<u64>,
    /// A client session (the exactly-once table entry of a long-lived client)
    /// that makes no request for this long is expired through Raft.
    #[arg(long, env = "LATCHKEY_SESSION_IDLE_TIMEOUT_MS")]
    pub session_idle_timeout_ms: Option<u64>,
    /// Serve the client port with TLS: this node's certificate (PEM chain).
    #[arg(long, env = "LATCHKEY_CERT_FILE")]
    pub cert_file: Option<PathBuf>,
    /// The private key (PEM) of --cert-file.
    #[arg(long, env = "LATCHKEY_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Require client certificates signed by this CA on the client port
    /// (mutual TLS); the certificate's common name is the client's user.
    #[arg(long, env = "LATCHKEY_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// Serve and dial the peer port with mutual TLS: this node's
    /// certificate (PEM chain), used as server and as client.
    #[arg(long, env = "LATCHKEY_PEER_CERT_FILE")]
    pub peer_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --peer-cert-file.
    #[arg(long, env = "LATCHKEY_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,
    /// The cluster CA: peers must present a certificate it signed.
    #[arg(long, env = "LATCHKEY_PEER_CA")]
    pub peer_ca: Option<PathBuf>,
    /// Certificate revocation lists (PEM) checked on both ports.
    #[arg(long, env = "LATCHKEY_CRL_FILE")]
    pub crl_file: Option<PathBuf>,
    /// Lifetime of the bearer tokens `latchkey auth login` hands out, in seconds.
    #[arg(long, env = "LATCHKEY_AUTH_TOKEN_TTL_SECS")]
    pub auth_token_ttl_secs: Option<u64>,
    /// Largest client request, in bytes (default 1 MiB + 64 KiB).
    #[arg(long, env = "LATCHKEY_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Longest key, in bytes (default and maximum 1024).
    #[arg(long, env = "LATCHKEY_MAX_KEY_BYTES")]
    pub max_key_bytes: Option<usize>,
    /// Largest value, in bytes (default and maximum 1 MiB).
    #[arg(long, env = "LATCHKEY_MAX_VALUE_BYTES")]
    pub max_value_bytes: Option<usize>,
    /// Most live leases one identity (user, or all anonymous clients
    /// together) may hold (default 250000).
    #[arg(long, env = "LATCHKEY_MAX_LEASES_PER_IDENTITY")]
    pub max_leases_per_identity: Option<u64>,
    /// Most waiters one lock or election may queue (default and maximum 10000).
    #[arg(long, env = "LATCHKEY_MAX_WAITERS_PER_LOCK")]
    pub max_waiters_per_lock: Option<u64>,
    /// Most calls and streams open at once on one client connection
    /// (default 100000).
    #[arg(long, env = "LATCHKEY_MAX_STREAMS_PER_CONNECTION")]
    pub max_streams_per_connection: Option<usize>,
    /// Accept fenced writes without checking their tokens. Breaks Invariant
    /// 3 on purpose: it exists so that fault-injection tests can show what
    /// fencing prevents. Never use it for anything else.
    #[arg(long, env = "LATCHKEY_UNSAFE_NO_FENCING", hide = true)]
    pub unsafe_no_fencing: bool,
    /// Renew leases without first confirming leadership with a quorum.
    /// Breaks Invariant 4 on purpose, for fault-injection tests only.
    #[arg(long, env = "LATCHKEY_UNSAFE_UNCONFIRMED_RENEWALS", hide = true)]
    pub unsafe_unconfirmed_renewals: bool,
    /// Run this node's clock (lease deadlines and Raft ticks) at the rate
    /// written in this file (a decimal such as `1.05`), re-read every 100
    /// ms. For fault-injection tests only.
    #[arg(long, env = "LATCHKEY_UNSAFE_CLOCK_RATE_FILE", hide = true)]
    pub unsafe_clock_rate_file: Option<PathBuf>,
    /// While this file exists, every sync of this node's Raft log and
    /// state waits for it to be removed, as on a disk whose flushes hang.
    /// For fault-injection tests only.
    #[arg(long, env = "LATCHKEY_UNSAFE_DISK_STALL_FILE", hide = true)]
    pub unsafe_disk_stall_file: Option<PathBuf>,
}

/// The same settings as a TOML file (`--config`).
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    id: Option<u64>,
    data_dir: Option<PathBuf>,
    listen_client: Option<String>,
    listen_peer: Option<String>,
    listen_http: Option<String>,
    advertise_client: Option<String>,
    advertise_peer: Option<String>,
    initial_cluster: Option<String>,
    tick_interval_ms: Option<u64>,
    election_ticks: Option<usize>,
    heartbeat_ticks: Option<usize>,
    compact_log_after_entries: Option<u64>,
    max_clock_drift_ppm: Option<u64>,
    session_idle_timeout_ms: Option<u64>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    peer_cert_file: Option<PathBuf>,
    peer_key_file: Option<PathBuf>,
    peer_ca: Option<PathBuf>,
    crl_file: Option<PathBuf>,
    auth_token_ttl_secs: Option<u64>,
    max_request_bytes: Option<usize>,
    max_key_bytes: Option<usize>,
    max_value_bytes: Option<usize>,
    max_leases_per_identity: Option<u64>,
    max_waiters_per_lock: Option<u64>,
    max_streams_per_connection: Option<usize>,
}

/// Raft timing. Defaults: a follower campaigns after 200–400 ms without
/// hearing from a leader (a heartbeat every 40 ms), which makes failover
/// take about 250 ms; chosen by measurement, see docs/performance.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftTiming {
    pub tick_interval_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming {
            tick_interval_ms: 20,
            election_ticks: 10,
            heartbeat_ticks: 2,
        }
    }
}

impl RaftTiming {
    /// The shortest time after which a healthy follower may start an election.
    pub fn election_timeout_ms(&self) -> u64 {
        self.tick_interval_ms * self.election_ticks as u64
    }
}

/// Default for [`Config::compact_log_after_entries`].
pub const DEFAULT_COMPACT_LOG_AFTER_ENTRIES: u64 = 10_000;
/// Default for [`Config::max_clock_drift_ppm`]: 1 %.
pub const DEFAULT_MAX_CLOCK_DRIFT_PPM: u64 = 10_000;
/// Largest drift bound accepted: 10 %. Past it a lease's trusted time
/// shrinks by a fifth and more, and the bound is a misconfiguration.
pub const MAX_MAX_CLOCK_DRIFT_PPM: u64 = 100_000;
/// Default for [`Config::session_idle_timeout_ms`]: ten minutes.
pub const DEFAULT_SESSION_IDLE_TIMEOUT_MS: u64 = 10 * 60 * 1000;
/// Shortest session idle timeout accepted.
pub const MIN_SESSION_IDLE_TIMEOUT_MS: u64 = 100;

/// Default for [`Config::auth_token_ttl`]: ten minutes.
pub const DEFAULT_AUTH_TOKEN_TTL_SECS: u64 = 600;

/// Resource limits a node enforces on its clients; each has a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub max_leases_per_identity: u64,
    pub max_waiters_per_lock: u64,
    pub max_streams_per_connection: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: crate::api::MAX_REQUEST_BYTES,
            max_key_bytes: crate::state_machine::MAX_KEY_BYTES,
            max_value_bytes: crate::state_machine::MAX_VALUE_BYTES,
            max_leases_per_identity: 250_000,
            max_waiters_per_lock: crate::coordination::MAX_WAITERS_PER_LOCK as u64,
            max_streams_per_connection: 100_000,
        }
    }
}

/// Switches that break an invariant on purpose, so that tests can show
/// the invariant's mechanism matters and that the checkers notice. All off
/// in production; only the first three have (hidden) flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnsafeSwitches {
    /// Fenced writes are applied without their tokens being checked (Invariant 3).
    pub no_fencing: bool,
    /// The leader renews leases without a confirmation round (Invariant 4).
    pub unconfirmed_renewals: bool,
    /// The node's clock runs at the rate written in this file.
    pub clock_rate_file: Option<PathBuf>,
    /// The node's syncs wait while this file exists.
    pub disk_stall_file: Option<PathBuf>,
    /// Linearizable reads are served from local state without ReadIndex
    /// (Invariant 6).
    pub local_reads: bool,
    /// The leader removes overdue leases from its own state instead of
    /// proposing their expiry through Raft (Invariant 4).
    pub local_expiry: bool,
    /// The fencing-token counter is not written to disk; a restarted node
    /// recomputes it from the locks it finds (Invariant 1).
    pub volatile_token_counter: bool,
}

impl UnsafeSwitches {
    /// Whether any switch is on.
    pub fn any(&self) -> bool {
        *self != UnsafeSwitches::default()
    }

    /// Whether a switch that breaks an invariant is on. The two files
    /// inject faults (a clock rate, stalled syncs) that the invariants must
    /// survive; they break none.
    pub fn breaks_invariants(&self) -> bool {
        let faults_only = UnsafeSwitches {
            clock_rate_file: self.clock_rate_file.clone(),
            disk_stall_file: self.disk_stall_file.clone(),
            ..UnsafeSwitches::default()
        };
        *self != faults_only
    }

    /// The line a node logs at start when a switch is on: which kind.
    pub fn warning(&self) -> Option<&'static str> {
        if self.breaks_invariants() {
            Some("invariants are broken on purpose: test use only")
        } else if self.any() {
            Some("faults are injected on purpose (clock rate or stalled syncs): test use only")
        } else {
            None
        }
    }
}

/// A validated node configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub id: NodeId,
    pub data_dir: PathBuf,
    pub listen_client: SocketAddr,
    pub listen_peer: SocketAddr,
    /// The HTTP port (metrics, health, status page); `None`: not served.
    pub listen_http: Option<SocketAddr>,
    /// The client address this node announces to its peers.
    pub advertise_client: String,
    /// Peer address of every member this node knows at start, itself
    /// included: `--initial-cluster`, or (joining) what the cluster said.
    pub peers: BTreeMap<NodeId, String>,
    /// Client endpoints of the cluster this node joins; empty: it starts a
    /// new cluster (or restarts).
    pub join: Vec<String>,
    pub timing: RaftTiming,
    pub compact_log_after_entries: u64,
    /// See [`ServeArgs::max_clock_drift_ppm`].
    pub max_clock_drift_ppm: u64,
    /// See [`ServeArgs::session_idle_timeout_ms`].
    pub session_idle_timeout_ms: u64,
    /// TLS of the client and peer ports (default: none).
    pub tls: crate::tls::TlsSettings,
    /// Lifetime of bearer tokens.
    pub auth_token_ttl: std::time::Duration,
    pub limits: Limits,
    /// Test-only breakage; all off in production.
    pub unsafe_switches: UnsafeSwitches,
}

impl Config {
    /// A configuration with every optional setting at its default, for
    /// programs that start nodes themselves (tests, the simulator).
    pub fn with_defaults(
        id: NodeId,
        data_dir: PathBuf,
        listen_client: SocketAddr,
        listen_peer: SocketAddr,
        peers: BTreeMap<NodeId, String>,
    ) -> Config {
        Config {
            id,
            data_dir,
            listen_client,
            listen_peer,
            listen_http: None,
            advertise_client: listen_client.to_string(),
            peers,
            join: Vec::new(),
            timing: RaftTiming::default(),
            compact_log_after_entries: DEFAULT_COMPACT_LOG_AFTER_ENTRIES,
            max_clock_drift_ppm: DEFAULT_MAX_CLOCK_DRIFT_PPM,
            session_idle_timeout_ms: DEFAULT_SESSION_IDLE_TIMEOUT_MS,
            tls: crate::tls::TlsSettings::default(),
            auth_token_ttl: std::time::Duration::from_secs(DEFAULT_AUTH_TOKEN_TTL_SECS),
            limits: Limits::default(),
            unsafe_switches: UnsafeSwitches::default(),
        }
    }

    /// Resolves flags, environment and the optional file into a [`Config`].
    pub fn resolve(args: &ServeArgs) -> Result<Config, StartupError> {
        let file = match &args.config {
            Some(path) => read_file_config(path)?,
            None => FileConfig::default(),
        };
        let id = args.id.or(file.id).ok_or_else(|| {
            StartupError::config("missing --id (or LATCHKEY_ID, or `id` in the config file)")
        })?;
        let data_dir = args
            .data_dir
            .clone()
            .or(file.data_dir.clone())
            .ok_or_else(|| {
                StartupError::config("missing --data-dir (or LATCHKEY_DATA_DIR, or `data-dir`)")
            })?;
        let listen_client = pick(&args.listen_client, &file.listen_client, "listen-client")?;
        let listen_peer = pick(&args.listen_peer, &file.listen_peer, "listen-peer")?;
        let id = NodeId(id);
        let join: Vec<String> = args
            .join
            .iter()
            .map(|endpoint| endpoint.trim().to_string())
            .filter(|endpoint| !endpoint.is_empty())
            .collect();
        let advertise_peer = args
            .advertise_peer
            .clone()
            .or_else(|| file.advertise_peer.clone())
            .unwrap_or_else(|| listen_peer.clone());
        let peers = initial_peers(args, &file, id, &join, &advertise_peer)?;
        let listen_client = parse_socket_addr("--listen-client", &listen_client)?;
        let listen_peer = parse_socket_addr("--listen-peer", &listen_peer)?;
        let listen_http = args
            .listen_http
            .clone()
            .or(file.listen_http.clone())
            .map(|addr| parse_socket_addr("--listen-http", &addr))
            .transpose()?;
        let advertise_client = args
            .advertise_client
            .clone()
            .or(file.advertise_client.clone())
            .unwrap_or_else(|| listen_client.to_string());
        let defaults = RaftTiming::default();
        let timing = RaftTiming {
            tick_interval_ms: args
                .tick_interval_ms
                .or(file.tick_interval_ms)
                .unwrap_or(defaults.tick_interval_ms),
            election_ticks: args
                .election_ticks
                .or(file.election_ticks)
                .unwrap_or(defaults.election_ticks),
            heartbeat_ticks: args
                .heartbeat_ticks
                .or(file.heartbeat_ticks)
                .unwrap_or(defaults.heartbeat_ticks),
        };
        validate_timing(&timing)?;
        let compact_log_after_entries = args
            .compact_log_after_entries
            .or(file.compact_log_after_entries)
            .unwrap_or(DEFAULT_COMPACT_LOG_AFTER_ENTRIES);
        if compact_log_after_entries == 0 {
            return Err(StartupError::config(
                "--compact-log-after-entries must be at least 1",
            ));
        }
        let max_clock_drift_ppm = args
            .max_clock_drift_ppm
            .or(file.max_clock_drift_ppm)
            .unwrap_or(DEFAULT_MAX_CLOCK_DRIFT_PPM);
        if max_clock_drift_ppm > MAX_MAX_CLOCK_DRIFT_PPM {
            return Err(StartupError::config(format!(
                "--max-clock-drift-ppm {max_clock_drift_ppm} is above {MAX_MAX_CLOCK_DRIFT_PPM} (10 %); clocks that drift that much need a fix, not a bound"
            )));
        }
        let session_idle_timeout_ms = args
            .session_idle_timeout_ms
            .or(file.session_idle_timeout_ms)
            .unwrap_or(DEFAULT_SESSION_IDLE_TIMEOUT_MS);
        if session_idle_timeout_ms < MIN_SESSION_IDLE_TIMEOUT_MS {
            return Err(StartupError::config(format!(
                "--session-idle-timeout-ms {session_idle_timeout_ms} is below {MIN_SESSION_IDLE_TIMEOUT_MS}"
            )));
        }
        let tls = resolve_tls(args, &file)?;
        let auth_token_ttl_secs = args
            .auth_token_ttl_secs
            .or(file.auth_token_ttl_secs)
            .unwrap_or(DEFAULT_AUTH_TOKEN_TTL_SECS);
        if !(1..=86_400).contains(&auth_token_ttl_secs) {
            return Err(StartupError::config(format!(
                "--auth-token-ttl-secs {auth_token_ttl_secs} is outside 1..=86400"
            )));
        }
        let limits = resolve_limits(args, &file)?;
        Ok(Config {
            id,
            data_dir,
            listen_client,
            listen_peer,
            listen_http,
            advertise_client,
            peers,
            join,
            timing,
            compact_log_after_entries,
            max_clock_drift_ppm,
            session_idle_timeout_ms,
            tls,
            auth_token_ttl: std::time::Duration::from_secs(auth_token_ttl_secs),
            limits,
            unsafe_switches: UnsafeSwitches {
                no_fencing: args.unsafe_no_fencing,
                unconfirmed_renewals: args.unsafe_unconfirmed_renewals,
                clock_rate_file: args.unsafe_clock_rate_file.clone(),
                disk_stall_file: args.unsafe_disk_stall_file.clone(),
                ..UnsafeSwitches::default()
            },
        })
    }
}

/// The members a node knows at start: `--initial-cluster` (which must name
/// this node), or, for a node that joins, itself alone (the rest comes from
/// the cluster it joins).
fn initial_peers(
    args: &ServeArgs,
    file: &FileConfig,
    id: NodeId,
    join: &[String],
    advertise_peer: &str,
) -> Result<BTreeMap<NodeId, String>, StartupError> {
    if !join.is_empty() {
        if args.initial_cluster.is_some() || file.initial_cluster.is_some() {
            return Err(StartupError::config(
                "--join and --initial-cluster exclude each other: a joining node learns the members from the cluster",
            ));
        }
        if crate::membership::check_address("--advertise-peer", advertise_peer).is_err() {
            return Err(StartupError::config(format!(
                "--advertise-peer {advertise_peer:?} is not HOST:PORT"
            )));
        }
        return Ok(BTreeMap::from([(id, advertise_peer.to_string())]));
    }
    let initial_cluster = pick(
        &args.initial_cluster,
        &file.initial_cluster,
        "initial-cluster",
    )?;
    let peers = parse_initial_cluster(&initial_cluster)?;
    if !peers.contains_key(&id) {
        return Err(StartupError::config(format!(
            "--id {id} is not in --initial-cluster ({initial_cluster}); add `{id}=HOST:PORT` or fix --id"
        )));
    }
    Ok(peers)
}

fn resolve_tls(
    args: &ServeArgs,
    file: &FileConfig,
) -> Result<crate::tls::TlsSettings, StartupError> {
    let either = |flag: &Option<PathBuf>, file: &Option<PathBuf>| flag.clone().or(file.clone());
    let cert = either(&args.cert_file, &file.cert_file);
    let key = either(&args.key_file, &file.key_file);
    let client_ca = either(&args.client_ca, &file.client_ca);
    let peer_cert = either(&args.peer_cert_file, &file.peer_cert_file);
    let peer_key = either(&args.peer_key_file, &file.peer_key_file);
    let peer_ca = either(&args.peer_ca, &file.peer_ca);
    let crl = either(&args.crl_file, &file.crl_file);
    let client = match (cert, key) {
        (Some(cert), Some(key)) => Some(crate::tls::TlsFiles {
            cert,
            key,
            client_ca,
            crl: crl.clone(),
        }),
        (None, None) if client_ca.is_none() => None,
        (None, None) => {
            return Err(StartupError::config(
                "--client-ca needs TLS on the client port: give --cert-file and --key-file too",
            ))
        }
        _ => {
            return Err(StartupError::config(
                "--cert-file and --key-file go together: give both or neither",
            ))
        }
    };
    let peer = match (peer_cert, peer_key, peer_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(crate::tls::TlsFiles {
            cert,
            key,
            client_ca: Some(ca),
            crl: crl.clone(),
        }),
        (None, None, None) => None,
        _ => {
            return Err(StartupError::config(
                "peer TLS is always mutual: give --peer-cert-file, --peer-key-file and --peer-ca together",
            ))
        }
    };
    if crl.is_some() && client.is_none() && peer.is_none() {
        return Err(StartupError::config(
            "--crl-file needs TLS on a port (--cert-file or --peer-cert-file)",
        ));
    }
    Ok(crate::tls::TlsSettings { client, peer })
}

fn resolve_limits(args: &ServeArgs, file: &FileConfig) -> Result<Limits, StartupError> {
    let defaults = Limits::default();
    let limits = Limits {
        max_request_bytes: args
            .max_request_bytes
            .or(file.max_request_bytes)
            .unwrap_or(defaults.max_request_bytes),
        max_key_bytes: args
            .max_key_bytes
            .or(file.max_key_bytes)
            .unwrap_or(defaults.max_key_bytes),
        max_value_bytes: args
            .max_value_bytes
            .or(file.max_value_bytes)
            .unwrap_or(defaults.max_value_bytes),
        max_leases_per_identity: args
            .max_leases_per_identity
            .or(file.max_leases_per_identity)
            .unwrap_or(defaults.max_leases_per_identity),
        max_waiters_per_lock: args
            .max_waiters_per_lock
            .or(file.max_waiters_per_lock)
            .unwrap_or(defaults.max_waiters_per_lock),
        max_streams_per_connection: args
            .max_streams_per_connection
            .or(file.max_streams_per_connection)
            .unwrap_or(defaults.max_streams_per_connection),
    };
    let checks: [(&str, u64, u64, u64); 6] = [
        (
            "--max-request-bytes",
            limits.max_request_bytes as u64,
            1024,
            64 * 1024 * 1024,
        ),
        (
            "--max-key-bytes",
            limits.max_key_bytes as u64,
            1,
            defaults.max_key_bytes as u64,
        ),
        (
            "--max-value-bytes",
            limits.max_value_bytes as u64,
            0,
            defaults.max_value_bytes as u64,
        ),
        (
            "--max-leases-per-identity",
            limits.max_leases_per_identity,
            1,
            crate::coordination::MAX_LEASES as u64,
        ),
        (
            "--max-waiters-per-lock",
            limits.max_waiters_per_lock,
            1,
            defaults.max_waiters_per_lock,
        ),
        (
            "--max-streams-per-connection",
            limits.max_streams_per_connection as u64,
            1,
            1_000_000,
        ),
    ];
    for (flag, value, min, max) in checks {
        if !(min..=max).contains(&value) {
            return Err(StartupError::config(format!(
                "{flag} {value} is outside {min}..={max}"
            )));
        }
    }
    Ok(limits)
}

fn read_file_config(path: &Path) -> Result<FileConfig, StartupError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        StartupError::config(format!("cannot read config file {}: {e}", path.display()))
    })?;
    toml::from_str(&text).map_err(|e| {
        let message = e.message().to_string();
        StartupError::config(format!(
            "config file {} is invalid: {message}",
            path.display()
        ))
    })
}

fn pick(flag: &Option<String>, file: &Option<String>, name: &str) -> Result<String, StartupError> {
    flag.clone().or_else(|| file.clone()).ok_or_else(|| {
        StartupError::config(format!(
            "missing --{name} (or LATCHKEY_{}, or `{name}` in the config file)",
            name.to_uppercase().replace('-', "_")
        ))
    })
}

fn parse_socket_addr(flag: &str, value: &str) -> Result<SocketAddr, StartupError> {
    value.parse().map_err(|_| {
        StartupError::config(format!(
            "{flag} {value:?} is not an IP:PORT address (for example 127.0.0.1:7001)"
        ))
    })
}

/// Parses `1=HOST:PORT,2=HOST:PORT,...`.
pub fn parse_initial_cluster(value: &str) -> Result<BTreeMap<NodeId, String>, StartupError> {
    let mut peers = BTreeMap::new();
    for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| {
            StartupError::config(format!(
                "--initial-cluster entry {part:?} is not ID=HOST:PORT"
            ))
        })?;
        let id: u64 = id.trim().parse().map_err(|_| {
            StartupError::config(format!(
                "--initial-cluster entry {part:?}: node id {id:?} is not a positive integer"
            ))
        })?;
        if id == 0 {
            return Err(StartupError::config(
                "--initial-cluster: node id 0 is reserved; ids start at 1",
            ));
        }
        let addr = addr.trim();
        if addr
            .rsplit_once(':')
            .is_none_or(|(_, port)| port.parse::<u16>().is_err())
        {
            return Err(StartupError::config(format!(
                "--initial-cluster entry {part:?}: {addr:?} is not HOST:PORT"
            )));
        }
        if peers.insert(NodeId(id), addr.to_string()).is_some() {
            return Err(StartupError::config(format!(
                "--initial-cluster names node {id} twice"
            )));
        }
    }
    if peers.is_empty() {
        return Err(StartupError::config("--initial-cluster is empty"));
    }
    Ok(peers)
}

fn validate_timing(timing: &RaftTiming) -> Result<(), StartupError> {
    if timing.tick_interval_ms == 0 {
        return Err(StartupError::config(
            "--tick-interval-ms must be at least 1",
        ));
    }
    if timing.heartbeat_ticks == 0 || timing.election_ticks <= timing.heartbeat_ticks {
        return Err(StartupError::config(format!(
            "--election-ticks ({}) must be greater than --heartbeat-ticks ({}), and both at least 1",
            timing.election_ticks, timing.heartbeat_ticks
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs {
            id: Some(2),
            data_dir: Some("/tmp/x".into()),
            listen_client: Some("127.0.0.1:7001".into()),
            listen_peer: Some("127.0.0.1:7002".into()),
            initial_cluster: Some("1=127.0.0.1:8001,2=127.0.0.1:8002".into()),
            ..ServeArgs::default()
        }
    }

    #[test]
    fn resolves_flags_with_default_timing() {
        let config = Config::resolve(&args()).unwrap();
        assert_eq!(config.id, NodeId(2));
        assert_eq!(config.peers.len(), 2);
        assert_eq!(config.timing, RaftTiming::default());
        assert_eq!(config.advertise_client, "127.0.0.1:7001");
    }

    #[test]
    fn id_missing_from_initial_cluster_is_rejected() {
        let mut a = args();
        a.id = Some(9);
        let err = Config::resolve(&a).unwrap_err().to_string();
        assert!(err.contains("--id 9 is not in --initial-cluster"), "{err}");
    }

    #[test]
    fn malformed_initial_cluster_is_rejected() {
        for bad in ["1", "x=127.0.0.1:1", "1=host", "1=a:1,1=b:2", "0=a:1", ""] {
            assert!(parse_initial_cluster(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn flags_override_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "id = 1\ndata-dir = \"/tmp/y\"\nlisten-client = \"127.0.0.1:1\"\n\
             listen-peer = \"127.0.0.1:2\"\ninitial-cluster = \"1=127.0.0.1:2,2=127.0.0.1:3\"\n\
             election-ticks = 20\n",
        )
        .unwrap();
        let a = ServeArgs {
            config: Some(path),
            id: Some(2),
            ..ServeArgs::default()
        };
        let config = Config::resolve(&a).unwrap();
        assert_eq!(config.id, NodeId(2));
        assert_eq!(config.timing.election_ticks, 20);
        assert_eq!(config.data_dir, PathBuf::from("/tmp/y"));
    }

    #[test]
    fn drift_bound_and_session_timeout_have_defaults_and_limits() {
        let config = Config::resolve(&args()).unwrap();
        assert_eq!(config.max_clock_drift_ppm, DEFAULT_MAX_CLOCK_DRIFT_PPM);
        assert_eq!(
            config.session_idle_timeout_ms,
            DEFAULT_SESSION_IDLE_TIMEOUT_MS
        );
        assert!(!config.unsafe_switches.any());
        assert_eq!(config.unsafe_switches.warning(), None);
        let mut a = args();
        a.max_clock_drift_ppm = Some(MAX_MAX_CLOCK_DRIFT_PPM + 1);
        let err = Config::resolve(&a).unwrap_err().to_string();
        assert!(err.contains("--max-clock-drift-ppm"), "{err}");
        let mut a = args();
        a.session_idle_timeout_ms = Some(1);
        let err = Config::resolve(&a).unwrap_err().to_string();
        assert!(err.contains("--session-idle-timeout-ms"), "{err}");
    }

    #[test]
    fn unknown_config_file_key_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "idd = 1\n").unwrap();
        let a = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        let err = Config::resolve(&a).unwrap_err().to_string();
        assert!(err.contains("invalid"), "{err}");
    }

    #[test]
    fn fault_files_inject_faults_and_the_other_switches_break_invariants() {
        let stall = UnsafeSwitches {
            disk_stall_file: Some(PathBuf::from("/tmp/stall")),
            ..UnsafeSwitches::default()
        };
        assert!(stall.any() && !stall.breaks_invariants());
        assert!(stall
            .warning()
            .is_some_and(|w| w.starts_with("faults are injected")));
        let clock = UnsafeSwitches {
            clock_rate_file: Some(PathBuf::from("/tmp/rate")),
            ..stall.clone()
        };
        assert!(!clock.breaks_invariants());
        let broken = UnsafeSwitches {
            no_fencing: true,
            ..clock
        };
        assert!(broken.breaks_invariants());
        assert!(broken
            .warning()
            .is_some_and(|w| w.starts_with("invariants are broken")));
        let breakers: [fn(&mut UnsafeSwitches); 4] = [
            |s| s.unconfirmed_renewals = true,
            |s| s.local_reads = true,
            |s| s.local_expiry = true,
            |s| s.volatile_token_counter = true,
        ];
        for turn_on in breakers {
            let mut switches = UnsafeSwitches::default();
            turn_on(&mut switches);
            assert!(switches.breaks_invariants(), "{switches:?}");
        }
    }
}
