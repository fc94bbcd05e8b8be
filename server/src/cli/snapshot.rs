//! `latchkey snapshot save|restore|info`: backups.
//!
//! - `save FILE`: a consistent snapshot of a running cluster (at a
//!   linearizable read point), through `latchkey-client`, written to
//!   `FILE.part`, checked in full (structure, every record, the checksum),
//!   then renamed to FILE. The file records its index, term and checksum.
//! - `restore FILE --data-dir D --id N --initial-cluster …`: offline, seeds
//!   one member of a new cluster (run it once per member, each with its own
//!   empty data dir and the same `--initial-cluster`); see
//!   `crate::restore`. The first leader then raises the fencing-token floor
//!   above anything the old cluster issued.
//! - `info FILE`: checks a file and prints what it holds.
//!
//! A corrupt or truncated file, or a data dir that is not empty, is refused
//! with one line (exit code 4) and nothing is written.

use std::path::PathBuf;

use serde::Serialize;

use super::session::{connect_once, failure, ClientArgs};
use super::{write_json, write_stdout, Failure, EXIT_OK};
use crate::config::parse_initial_cluster;
use crate::storage::snapshot_file::{self, part_path, SnapshotInfo};
use crate::types::NodeId;

/// Flags of `latchkey snapshot`.
#[derive(clap::Args, Debug)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

/// The `snapshot` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Save a consistent snapshot of the running cluster to FILE.
    Save { file: PathBuf },
    /// Seed one member of a new cluster from FILE (offline; once per member).
    Restore {
        file: PathBuf,
        /// The new member's data directory; must be empty or absent.
        #[arg(long)]
        data_dir: PathBuf,
        /// The new member's id.
        #[arg(long)]
        id: u64,
        /// Every member of the new cluster: `1=HOST:PORT,2=HOST:PORT,...`.
        #[arg(long)]
        initial_cluster: String,
    },
    /// Check FILE and print what it holds.
    Info { file: PathBuf },
}

/// What `snapshot save|info --json` print.
#[derive(Serialize, Debug)]
pub struct SnapshotOutput {
    pub file: String,
    pub index: u64,
    pub term: u64,
    pub records: u64,
    pub bytes: u64,
    pub checksum: String,
    pub voters: Vec<u64>,
}

impl SnapshotOutput {
    fn new(file: &std::path::Path, info: &SnapshotInfo) -> Self {
        SnapshotOutput {
            file: file.display().to_string(),
            index: info.index,
            term: info.term,
            records: info.records,
            bytes: info.bytes,
            checksum: format!("{:08x}", info.checksum),
            voters: info.conf_state.voters.clone(),
        }
    }
}

pub(crate) async fn run(args: SnapshotArgs) -> Result<u8, Failure> {
    let json = args.client.json;
    match args.command {
        SnapshotCommand::Save { file } => save(&args.client, &file, json).await,
        SnapshotCommand::Info { file } => {
            let info = snapshot_file::verify(&file).map_err(|e| Failure::failed(e.to_string()))?;
            print(&file, &info, "", json)
        }
        SnapshotCommand::Restore {
            file,
            data_dir,
            id,
            initial_cluster,
        } => {
            let peers = parse_initial_cluster(&initial_cluster)
                .map_err(|e| Failure::usage(e.to_string()))?;
            let restored = crate::restore::restore(&file, &data_dir, NodeId(id), &peers)
                .map_err(Failure::failed)?;
            let note = format!(
                "restored member {id} into {}; start every member, and the first leader raises the token floor",
                data_dir.display()
            );
            print(&file, &restored.snapshot, &note, json)
        }
    }
}

async fn save(client: &ClientArgs, file: &std::path::Path, json: bool) -> Result<u8, Failure> {
    let connected = connect_once(client).await?;
    let part = part_path(file);
    let saved = connected.save_snapshot(&part).await;
    let checked = match saved {
        Ok(saved) => snapshot_file::verify(&part)
            .map_err(|e| Failure::failed(e.to_string()))
            .and_then(|info| match info.checksum == saved.checksum {
                true => Ok(info),
                false => Err(Failure::failed(format!(
                    "the snapshot's checksum is {:08x}, the server announced {:08x}",
                    info.checksum, saved.checksum
                ))),
            }),
        Err(error) => Err(failure(error)),
    };
    let info = match checked {
        Ok(info) => info,
        Err(failed) => {
            let _ = std::fs::remove_file(&part);
            return Err(failed);
        }
    };
    std::fs::rename(&part, file)
        .map_err(|e| Failure::failed(format!("cannot rename {}: {e}", part.display())))?;
    print(file, &info, "saved", json)
}

fn print(
    file: &std::path::Path,
    info: &SnapshotInfo,
    note: &str,
    json: bool,
) -> Result<u8, Failure> {
    if json {
        write_json(&SnapshotOutput::new(file, info))?;
        return Ok(EXIT_OK);
    }
    let line = format!(
        "{} index {} term {} records {} bytes {} checksum {:08x}{}{}\n",
        file.display(),
        info.index,
        info.term,
        info.records,
        info.bytes,
        info.checksum,
        if note.is_empty() { "" } else { "; " },
        note
    );
    write_stdout(line.as_bytes())?;
    Ok(EXIT_OK)
}
