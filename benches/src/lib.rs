//! latchkey-bench: latchkey against etcd, same workloads, same run.
//!
//! # Layout
//! - [`cli`]: the flags of `latchkey-bench compare` and `floor`, parsed into options.
//! - [`compare`]: one `compare` run: machine, floor, each workload on each system in turn, the report.
//! - [`workloads`]: the workload definitions, shared by both systems.
//! - [`driver`]: one vocabulary (connection, lease, lock, fenced put, keepalive stream) over both clients.
//! - [`cluster`]: starting, killing and restarting the 5-node clusters (`latchkey dev`, `etcd`).
//! - [`processes`]: child processes and directories, and their cleanup on every exit path.
//! - [`floor`]: the measured floor: one and two synced RocksDB writes on the data disk,
//!   and one synced overwrite of a preallocated file.
//! - [`stats`]: latency histograms (hdrhistogram) and measurement windows.
//! - [`procfs`]: CPU, memory, disk and load readings from `/proc`, to say what limited a run.
//! - [`machine`]: the description of the machine the report prints.
//! - [`report`]: the table, the ratios, what limited each number, and the JSON file.
//! - [`rounds`]: `--rounds N`: the median round of each workload, and every round's ratio.
//! - [`targets`]: the pass/fail lines against the optimisation targets.

pub mod cli;
pub mod cluster;
pub mod compare;
pub mod driver;
pub mod floor;
pub mod machine;
pub mod processes;
pub mod procfs;
pub mod report;
pub mod rounds;
pub mod stats;
pub mod targets;
pub mod workloads;

/// `latchkey-bench compare`: runs, prints the report, writes the JSON file.
pub async fn run_compare(args: Box<cli::CompareArgs>, command: String) -> Result<(), String> {
    let options = (*args).resolve()?;
    let json = options.json.clone();
    let report = compare::compare(options, command).await?;
    println!("{}", report.render());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("latchkey-bench: wrote {}", path.display());
    }
    Ok(())
}

/// `latchkey-bench floor`: measures and prints the floor alone.
pub async fn run_floor(args: cli::FloorArgs) -> Result<(), String> {
    let parent = args.data_dir.unwrap_or_else(std::env::temp_dir);
    let machine = machine::Machine::describe(&parent);
    let samples = args.samples.max(1);
    let floor = tokio::task::spawn_blocking(move || floor::measure(&parent, samples))
        .await
        .map_err(|e| e.to_string())??;
    for line in machine.lines().into_iter().chain(floor.lines()) {
        println!("{line}");
    }
    Ok(())
}
