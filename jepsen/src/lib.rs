//! latchkey's fault-injection harness and history checkers.
//!
//! # Layout
//! - [`history`]: the operation record shared by the harness and the
//!   checkers, one JSON object per line, with Jepsen's field names.
//! - [`check`]: checkers that read a history and give a verdict
//!   (`valid`, `invalid` with a witness, or `unknown`), and readers for
//!   histories written by other tools (Jepsen logs, EDN op maps).
//! - [`harness`]: cluster control (processes in network namespaces),
//!   nemeses, workloads, and the report.

pub mod check;
pub mod harness;
pub mod history;
