//! The fault-injection harness: a real cluster under real faults, a
//! recorded history, the checkers' verdict, and a report.
//!
//! # Layout
//! - [`cli`]: `latchkey-jepsen test` flags and exit codes.
//! - [`run`]: one run start to finish, including teardown on errors and
//!   Ctrl-C.
//! - [`net`]: network namespaces, veths, a bridge and iptables rules; or
//!   the loopback fallback.
//! - [`proxy`]: the loopback fallback's per-link TCP proxies.
//! - [`cluster`]: the `latchkey serve` processes (kill -9, SIGSTOP, restart
//!   under libfaketime) and their `Cluster.Status`.
//! - [`observer`]: status polling → `status` ops; who leads; crashed nodes.
//! - [`nemesis`]: the seeded fault schedule.
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
//! - Clock skew changes need a node restart (libfaketime reads `FAKETIME`
//!   once), so a skew never hits a running leader mid-term.
//! - Partitions cut node-to-node traffic only; client traffic always flows.

pub mod cli;
pub mod cluster;
pub mod nemesis;
pub mod net;
pub mod observer;
pub mod proxy;
pub mod recorder;
pub mod report;
pub mod run;
pub mod worker;
pub mod workers;
