//! Property-based fuzzing of everything that decodes bytes or text the
//! node did not just make itself (#11):
//!
//! | module | target |
//! |---|---|
//! | `commands` | committed entries' bytes through the real apply path |
//! | `storage` | stored records, the node's open path, the memory disk's log, snapshot files |
//! | `peer` | peers' frames through the transport's checks into a real node |
//! | `cli` | the CLI's duration and endpoint parsers, the client's endpoint normaliser |
//!
//! Each `fuzz_*` test runs a fixed seed and a small number of cases in CI;
//! `LATCHKEY_FUZZ_CASES`, `LATCHKEY_FUZZ_SEED` and `LATCHKEY_FUZZ_SECS`
//! (see `fuzz/runner.rs`) make it replay a failure or run for as long as
//! `scripts/fuzz` asks. The other tests are regressions: inputs that once
//! crashed, kept as they were found.

#[path = "fuzz/cli.rs"]
mod cli;
#[path = "fuzz/commands.rs"]
mod commands;
#[path = "fuzz/mutate.rs"]
mod mutate;
#[path = "fuzz/node.rs"]
mod node;
#[path = "fuzz/peer.rs"]
mod peer;
#[path = "fuzz/runner.rs"]
mod runner;
#[path = "fuzz/storage.rs"]
mod storage;
