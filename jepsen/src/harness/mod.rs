//! The fault-injection harness: a real cluster under real faults, a
//! recorded history, the checkers' verdict, and a report.
//!
//! # Layout
//! - [`cli`]: `latchkey-jepsen test` flags and exit codes.
//! - [`run`]: one run start to finish, including teardown on errors and
//!   Ctrl-C.
//! - [`net`]: network namespaces (one per node and per client worker),
//!   veths, a bridge and iptables rules; or the loopback fallback; cut
//!   layers.
//! - [`proxy`]: the loopback fallback's per-link TCP proxies.
//! - [`cluster`]: the `latchkey serve` processes (kill -9, SIGSTOP, restart
//!   under libfaketime) and their `Cluster.Status`.
//! - [`observer`]: status polling → `status` ops; who leads; crashed nodes.
//! - [`nemesis`]: the seeded fault schedule: which faults, their
//!   variants and mixes, applied and healed.
//! - [`spawn`]: how child processes start (process group, namespace,
//!   death with the harness).
//! - [`worker`]: the client worker process (workloads through the real
//!   client crate) and its protocol.
//! - [`workers`]: the harness's side of the workers: spawning, recording,
//!   process numbers, client pauses.
//! - [`recorder`]: stamps, numbers and writes `history.jsonl`.
//! - [`report`]: the report page, `index.html`.
//!
//! See docs/jepsen.md for how to run it and read the results.
//!
//! # Not done yet
//! - One cluster size and topology per run: no membership changes under
//!   faults.
//! - Disk faults (slow or failing fsync, torn writes) are not injected.

pub mod cli;
pub mod cluster;
pub mod nemesis;
pub mod net;
pub mod observer;
pub mod proxy;
pub mod recorder;
pub mod report;
pub mod run;
pub mod spawn;
pub mod worker;
pub mod workers;
