//! The latchkey server.
//!
//! # Layout
//! - [`config`]: flags, environment and TOML file resolved into a validated [`config::Config`].
//! - [`types`]: newtypes (`NodeId`, `LogIndex`, `Term`).
//! - [`error`]: startup errors, fatal (node-stopping) errors and request errors.
//! - [`storage`]: `raft::Storage` over RocksDB; every record checksummed.
//! - [`state_machine`]: the deterministic apply of committed commands.
//! - [`auth`]: users, roles, permissions and bearer tokens, replicated.
//! - [`tls`]: TLS on the client and peer ports, re-read on SIGHUP.
//! - [`coordination`]: leases, locks, elections and exactly-once sessions as a pure, deterministic state machine.
//! - [`lease_clock`]: the leader's lease deadlines, the confirmation rounds
//!   that renewals wait for, and expiry.
//! - [`session_clock`]: the leader's idle times of exactly-once sessions.
//! - [`membership`]: who the members are, where they listen, and the rules
//!   a membership change must pass.
//! - [`metrics`]: the node's Prometheus metrics and the gRPC call counter.
//! - [`http`]: the HTTP port: `/metrics`, `/healthz`, `/readyz` and the status page.
//! - [`join`]: `serve --join`, a new node joining a running cluster.
//! - [`node`]: the task that owns `RawNode` and runs the Ready loop.
//! - [`restore`]: seeding a new cluster's member from a backup, offline.
//! - [`transport`]: the peer gRPC service and one outbound stream per peer.
//! - [`api`]: the client gRPC services.
//! - [`server`]: wires the pieces together, binds listeners, shuts down.
//! - [`logging`]: routes raft-rs's slog output into `tracing`.
//! - [`dev`]: `latchkey dev`, a local cluster of child processes.
//! - [`cli`]: the client-side commands of the binary (`status`, `kv`).

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod coordination;
pub mod dev;
pub mod error;
pub mod http;
pub mod join;
pub mod lease_clock;
pub mod logging;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod restore;
pub mod server;
pub mod session_clock;
pub mod state_machine;
pub mod storage;
pub mod tls;
pub mod transport;
pub mod types;
