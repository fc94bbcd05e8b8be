//! Wiring: opens storage, binds both listeners, starts the node, the peer
//! transport and the client API, and stops them together.
//!
//! Startup checks everything that an operator can get wrong before the node
//! joins the cluster: the data directory, both listen addresses and the
//! stored data (every record's checksum). Each failure is a
//! [`StartupError`] with a one-line message.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt as _;

use crate::api::{Api, ApiSettings};
use crate::config::{Config, ServeArgs};
use crate::error::{FatalError, StartupError};
use crate::metrics::Metrics;
use crate::node::{Node, NodeHandle};
use crate::state_machine::Reader;
use crate::storage::Engine;
use crate::transport::{
    framed, spawn_outbound, GrpcTransport, Inbound, PeerDirectory, PeerService,
};

/// How long a leader that stops waits for its successor, in election timeouts.
const TRANSFER_WAIT_ELECTION_TIMEOUTS: u32 = 3;
/// How long a stop may take, leader transfer and flush included; past it
/// the process exits anyway.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(15);

/// Worker threads of the runtime that runs the node task and the peer
/// transport. One: the fsyncs of the Raft log run on the log sync thread
/// (`node/log_sync.rs`), so the node task no longer blocks in them, and a
/// second worker cost more than it bought. Every wake-up of a parked
/// worker is a context switch, and on a machine that runs several nodes
/// the two workers mostly woke each other to steal one short task; with
/// one, a task the node wakes runs on the same thread once the node task
/// yields. Measured in `docs/performance.md`.
pub const RAFT_WORKER_THREADS: usize = 1;

/// The runtime of the node task and the peer transport, apart from the
/// client API's: a flood of client streams (thousands of keepalives woken
/// by one confirmation round) would otherwise queue the node's ticks and
/// heartbeats behind them long enough for followers to start an election.
/// Dropped without blocking, so that a [`RunningServer`] may be dropped
/// inside a runtime.
struct RaftRuntime(Option<tokio::runtime::Runtime>);

impl RaftRuntime {
    fn new() -> Result<RaftRuntime, StartupError> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RAFT_WORKER_THREADS)
            .thread_name("latchkey-raft")
            .enable_all()
            .build()
            .map(|runtime| RaftRuntime(Some(runtime)))
            .map_err(|e| StartupError::Listen(format!("cannot start the raft runtime: {e}")))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        // Only `Drop` takes the runtime out.
        self.0.as_ref().expect("raft runtime present").handle()
    }
}

impl Drop for RaftRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A started node. Dropping it without [`RunningServer::shutdown`] stops
/// the node and the peer transport at once (their runtime is dropped) and
/// leaves the client API's tasks running until their runtime stops.
pub struct RunningServer {
    pub config: Config,
    /// Re-reads the TLS files (SIGHUP).
    pub tls: crate::tls::TlsReloader,
    pub client_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    /// Where `/metrics`, the health checks and the status page are served.
    pub http_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    pub node: NodeHandle,
    stop: Option<oneshot::Sender<()>>,
    /// Ends the client streams already accepted; see `Api`.
    stopping: watch::Sender<bool>,
    node_task: JoinHandle<Result<(), FatalError>>,
    servers: Vec<JoinHandle<()>>,
    /// Declared last: dropped after the tasks above are joined or aborted.
    _raft_runtime: RaftRuntime,
}

impl RunningServer {
    /// Starts a node from a validated configuration.
    pub async fn start(mut config: Config) -> Result<RunningServer, StartupError> {
        let client_listener = bind(config.listen_client, "--listen-client").await?;
        let peer_listener = bind(config.listen_peer, "--listen-peer").await?;
        let http_listener = match config.listen_http {
            Some(addr) => Some(bind(addr, "--listen-http").await?),
            None => None,
        };
        let tls_error = |e: String| StartupError::config(format!("TLS: {e}"));
        let client_tls = config
            .tls
            .client
            .clone()
            .map(crate::tls::ServerTls::load)
            .transpose()
            .map_err(tls_error)?;
        let peer_tls = config
            .tls
            .peer
            .clone()
            .map(crate::tls::ServerTls::load_peer)
            .transpose()
            .map_err(tls_error)?;
        let peer_client_tls = config
            .tls
            .peer
            .clone()
            .map(crate::tls::PeerClientTls::load)
            .transpose()
            .map_err(tls_error)?;
        if client_tls.is_some() && peer_tls.is_none() {
            tracing::warn!("the client port has TLS but the peer port has none: anyone who reaches the peer port can take part in Raft; give --peer-cert-file, --peer-key-file and --peer-ca");
        }
        let reloader = crate::tls::TlsReloader::new(
            client_tls.clone(),
            peer_tls.clone(),
            peer_client_tls.clone(),
        );
        let engine = open_engine(&config)?;
        let joining = crate::join::prepare(&mut config, &engine).await?;
        let directory = PeerDirectory::new(&config);
        let (transport, outbound) = GrpcTransport::new(&config, directory.clone(), peer_client_tls);
        let metrics = Arc::new(Metrics::new());
        let (node, handle) = Node::new(
            &config,
            engine.clone(),
            Box::new(transport),
            metrics.clone(),
        )?;
        let raft_runtime = RaftRuntime::new()?;
        let raft = raft_runtime.handle().clone();
        {
            // The links, and the connections they open, run on the raft runtime.
            let _raft = raft.enter();
            spawn_outbound(outbound, handle.clone());
        }

        let (stop, stopped) = oneshot::channel::<()>();
        let stopped = futures::future::FutureExt::shared(async move {
            let _ = stopped.await;
        });
        let reader = Reader::new(engine, handle.coordination(), handle.auth());
        let (stopping, stopping_rx) = watch::channel(false);
        let api = Api::new(
            config.id,
            handle.clone(),
            reader,
            directory.clone(),
            ApiSettings {
                min_lease_ttl_ms: 2 * config.timing.election_timeout_ms(),
                max_clock_drift_ppm: config.max_clock_drift_ppm,
                session_idle_timeout_ms: config.session_idle_timeout_ms,
                election_timeout_ms: config.timing.election_timeout_ms(),
                auth_token_ttl: config.auth_token_ttl,
                limits: config.limits,
            },
            config.data_dir.join("snapshots"),
            stopping_rx,
        )
        .with_metrics(metrics.clone());
        let client_addr = client_listener.local_addr().map_err(listen_error)?;
        let peer_addr = peer_listener.local_addr().map_err(listen_error)?;
        for service in Api::SERVICE_NAMES.into_iter().chain([HEALTH_SERVICE]) {
            metrics.serve_service(service);
        }
        let (health_reporter, health, reflection, reflection_v1alpha) = introspection_services();
        spawn_health_reporter(health_reporter, handle.clone(), stopping.subscribe());
        let mut servers = Vec::new();
        let http_addr = match http_listener {
            Some(listener) => {
                let addr = listener.local_addr().map_err(listen_error)?;
                let state = crate::http::HttpState {
                    id: config.id,
                    node: handle.clone(),
                    directory: directory.clone(),
                    metrics: metrics.clone(),
                    stopping: stopping.subscribe(),
                    member_tls: member_tls(&config),
                };
                let stop = stopped.clone();
                servers.push(tokio::spawn(async move {
                    if let Err(e) = crate::http::serve(listener, state, stop).await {
                        tracing::error!("http server stopped: {e}");
                    }
                }));
                Some(addr)
            }
            None => None,
        };
        let client_router = tonic::transport::Server::builder()
            .layer(metrics.grpc_layer())
            .layer(crate::api::streams::StreamLimitLayer::new(
                config.limits.max_streams_per_connection,
            ))
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(api.kv_service())
            .add_service(api.cluster_service())
            .add_service(api.lease_service())
            .add_service(api.lock_service())
            .add_service(api.election_service())
            .add_service(api.session_service())
            .add_service(api.maintenance_service())
            .add_service(api.auth_service());
        let client_server: BoxedServer = match client_tls {
            Some(tls) => Box::pin(client_router.serve_with_incoming_shutdown(
                crate::tls::incoming(client_listener, tls, "client"),
                stopped.clone(),
            )),
            None => Box::pin(
                client_router
                    .serve_with_incoming_shutdown(incoming(client_listener), stopped.clone()),
            ),
        };
        let inbound = Inbound::new(config.id, handle.clone(), directory);
        let peer_router = tonic::transport::Server::builder().add_service(PeerService::new(
            inbound.clone(),
            config.data_dir.join("snapshots"),
        ));
        // The peer listener, its accept loop (TLS starts one here) and the
        // connections it accepts all belong to the raft runtime. Framed
        // connections are served by `framed::route`; the rest go to gRPC.
        let peer_server: BoxedServer = {
            let _raft = raft.enter();
            let peer_listener = peer_listener
                .into_std()
                .and_then(TcpListener::from_std)
                .map_err(listen_error)?;
            match peer_tls {
                Some(tls) => Box::pin(peer_router.serve_with_incoming_shutdown(
                    framed::route(crate::tls::incoming(peer_listener, tls, "peer"), inbound),
                    stopped.clone(),
                )),
                None => Box::pin(peer_router.serve_with_incoming_shutdown(
                    framed::route(incoming(peer_listener), inbound),
                    stopped.clone(),
                )),
            }
        };
        servers.push(spawn_server(
            tokio::runtime::Handle::current(),
            "client",
            client_server,
        ));
        servers.push(spawn_server(raft.clone(), "peer", peer_server));
        let node_task = raft.spawn(node.run(stopped));
        if joining {
            crate::join::spawn_add_self(&config);
        }
        tracing::info!(node = %config.id, client = %client_addr, peer = %peer_addr, http = ?http_addr, "serving");
        Ok(RunningServer {
            config,
            tls: reloader,
            client_addr,
            peer_addr,
            http_addr,
            metrics,
            node: handle,
            stop: Some(stop),
            stopping,
            node_task,
            servers,
            _raft_runtime: raft_runtime,
        })
    }

    /// Resolves when the node stops by itself (a fatal error).
    pub async fn stopped(&mut self) -> Result<(), FatalError> {
        join_node(&mut self.node_task).await
    }

    /// Stops the way an operator wants a member to stop (SIGTERM): a node
    /// that leads first hands its leadership to the best caught-up voter
    /// and waits (a few election timeouts at most) for it to take over, so
    /// that clients see a leader change rather than an election; then as
    /// [`RunningServer::shutdown`]. Requests in flight fail with
    /// `UNAVAILABLE` and clients retry them elsewhere.
    pub async fn graceful_shutdown(self) -> Result<(), FatalError> {
        if self.node.status().role == crate::node::Role::Leader {
            match self.node.transfer_leader(None).await {
                Ok(to) => {
                    let wait = Duration::from_millis(self.config.timing.election_timeout_ms())
                        * TRANSFER_WAIT_ELECTION_TIMEOUTS;
                    let mut status = self.node.watch_standing();
                    let moved =
                        tokio::time::timeout(wait, status.wait_for(|s| s.leader_id == to.0)).await;
                    match moved {
                        Ok(Ok(_)) => tracing::info!(to = %to, "handed leadership on"),
                        _ => {
                            tracing::warn!(to = %to, "leadership did not move in {wait:?}; stopping anyway")
                        }
                    }
                }
                Err(e) => tracing::warn!("could not hand leadership on ({e}); stopping anyway"),
            }
        }
        self.shutdown().await
    }

    /// Stops serving and waits for the node to flush and stop. Streams
    /// already open (Observe, KeepAlive) and waiting acquires end with
    /// `UNAVAILABLE`; the connections themselves stay open until the
    /// runtime or the process ends.
    pub async fn shutdown(mut self) -> Result<(), FatalError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.stopping.send_replace(true);
        let result = join_node(&mut self.node_task).await;
        for server in &self.servers {
            server.abort();
        }
        // Once aborted they end at once; waiting closes the listeners
        // before a restart on the same ports binds them again.
        for server in self.servers.drain(..) {
            let _ = server.await;
        }
        result
    }
}

/// The standard `grpc.health.v1.Health` service, and server reflection
/// (v1 and v1alpha, for older tools) advertising the client services.
fn introspection_services() -> (
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let configure = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(latchkey_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(HEALTH_SERVICE);
        for service in Api::SERVICE_NAMES {
            builder = builder.with_service_name(service);
        }
        builder
    };
    // The descriptor sets are generated at build time from our own and
    // tonic-health's protos; they decode, or the build is broken.
    let v1 = configure().build_v1().expect("reflection descriptors");
    let v1alpha = configure().build_v1alpha().expect("reflection descriptors");
    let (reporter, health) = tonic_health::server::health_reporter();
    (reporter, health, v1, v1alpha)
}

/// The gRPC health service's own name.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// Keeps the gRPC health status in step with [`crate::http::readiness`]:
/// the whole server (`""`) and each client service are `SERVING` exactly
/// when `/readyz` would answer 200.
fn spawn_health_reporter(
    reporter: tonic_health::server::HealthReporter,
    node: NodeHandle,
    mut stopping: watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    let mut status = node.watch_standing();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let now = *status.borrow_and_update();
            let ready = crate::http::readiness(&now, *stopping.borrow()).is_ok();
            if last != Some(ready) {
                let serving = if ready {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                for service in std::iter::once("").chain(Api::SERVICE_NAMES) {
                    reporter.set_service_status(service, serving).await;
                }
                last = Some(ready);
            }
            tokio::select! {
                changed = status.changed() => if changed.is_err() { break },
                changed = stopping.changed() => if changed.is_err() { break },
            }
        }
        for service in std::iter::once("").chain(Api::SERVICE_NAMES) {
            reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
    });
}

async fn join_node(task: &mut JoinHandle<Result<(), FatalError>>) -> Result<(), FatalError> {
    match task.await {
        Ok(result) => result,
        Err(e) => Err(FatalError::Raft(format!("node task failed: {e}"))),
    }
}

/// What the status page dials other members' client ports with: their CA
/// (`--client-ca`, else `--peer-ca`) and this node's client-port
/// certificate. `None` without TLS on the client port, or when the files
/// do not make a client configuration (logged).
fn member_tls(config: &Config) -> Option<latchkey_client::TlsConfig> {
    let client = config.tls.client.as_ref()?;
    let ca = client.client_ca.as_ref().or(config
        .tls
        .peer
        .as_ref()
        .and_then(|p| p.client_ca.as_ref()))?;
    match latchkey_client::TlsConfig::from_files(ca, Some(&client.cert), Some(&client.key)) {
        Ok(tls) => Some(tls),
        Err(e) => {
            tracing::warn!("the status page cannot dial other members with TLS: {e}");
            None
        }
    }
}

type BoxedServer =
    std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

fn spawn_server(
    runtime: tokio::runtime::Handle,
    name: &'static str,
    server: impl Future<Output = Result<(), tonic::transport::Error>> + Send + 'static,
) -> JoinHandle<()> {
    runtime.spawn(async move {
        if let Err(e) = server.await {
            tracing::error!("{name} server stopped: {e}");
        }
    })
}

fn incoming(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    TcpListenerStream::new(listener).map(|stream| {
        let stream = stream?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

async fn bind(addr: SocketAddr, flag: &str) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr).await.map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                "another process uses it; stop it or pick another port"
            }
            std::io::ErrorKind::AddrNotAvailable => "no local interface has that address",
            std::io::ErrorKind::PermissionDenied => {
                "ports below 1024 need privileges; pick a higher port"
            }
            _ => "check the address",
        };
        StartupError::Listen(format!("cannot listen on {flag} {addr}: {e}; {hint}"))
    })
}

fn listen_error(e: std::io::Error) -> StartupError {
    StartupError::Listen(format!("cannot read the bound address: {e}"))
}

fn open_engine(config: &Config) -> Result<Engine, StartupError> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).map_err(|e| {
        StartupError::Storage(format!(
            "cannot create data dir {}: {e}; check --data-dir and its permissions",
            dir.display()
        ))
    })?;
    let db_dir = dir.join("db");
    let engine = Engine::open(&db_dir).map_err(|e| {
        let hint = match e {
            FatalError::Corruption { .. } => "",
            _ => "; if the data is damaged, restore this member from a healthy one (empty its data dir and let it catch up)",
        };
        StartupError::Storage(format!("cannot open data in {}: {e}{hint}", db_dir.display()))
    })?;
    Ok(match &config.unsafe_switches.disk_stall_file {
        Some(path) => {
            tracing::warn!(file = %path.display(), "syncs wait while a file exists (--unsafe-disk-stall-file): test use only");
            engine.stall_syncs_while_exists(path.clone())
        }
        None => engine,
    })
}

/// `latchkey serve`: runs one node until SIGINT/SIGTERM or a fatal error.
pub fn run_from_args(args: ServeArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let config = Config::resolve(&args)?;
    crate::logging::init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(config))
}

/// Re-reads the TLS files whenever the process gets SIGHUP.
fn spawn_reload_on_hangup(tls: crate::tls::TlsReloader) -> std::io::Result<()> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            if tls.is_empty() {
                tracing::info!("SIGHUP: no TLS configured; nothing to re-read");
                continue;
            }
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificates, keys, CAs and CRLs re-read"),
                Err(e) => {
                    tracing::error!("SIGHUP: TLS files not re-read, the old ones stay in use: {e}")
                }
            }
        }
    });
    Ok(())
}

async fn serve(config: Config) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let mut server = RunningServer::start(config).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    spawn_reload_on_hangup(server.tls.clone())?;
    let why = tokio::select! {
        result = server.stopped() => {
            return match result {
                Err(FatalError::Removed(id)) => {
                    tracing::warn!("node {id} was removed from the cluster; exiting");
                    Ok(ExitCode::SUCCESS)
                }
                other => other.map(|()| ExitCode::SUCCESS).map_err(Into::into),
            };
        }
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = terminate.recv() => "terminated",
    };
    tracing::info!("{why}; stopping");
    match tokio::time::timeout(SHUTDOWN_DEADLINE, server.graceful_shutdown()).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!("stopping took longer than {SHUTDOWN_DEADLINE:?}; exiting"),
    }
    Ok(ExitCode::SUCCESS)
}
