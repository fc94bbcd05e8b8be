//! `latchkey-jepsen check`: check a saved history.
//!
//! Exit status: 0 when every checker says valid, 1 when one says invalid,
//! 3 when none is invalid but one is unknown, 2 for usage errors and
//! unreadable input (one line on stderr: `latchkey-jepsen: error: …`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use super::formats::{self, Format};
use super::{check_history_with, CheckOptions, Results, Selection, Validity};

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The history: latchkey JSON lines, a Jepsen log, or EDN op maps.
    pub history: PathBuf,
    /// Which checkers to run.
    #[arg(long, value_enum, default_value_t = Selection::Auto)]
    pub model: Selection,
    /// Wall-clock budget of each search-based checker (e.g. 60s, 500ms, 2m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub budget: Duration,
    /// How far clocks may disagree about when a lease ended.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub drift_bound: Duration,
    /// The history's format.
    #[arg(long, value_enum, default_value_t = Format::Auto)]
    pub format: Format,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write the history as Jepsen EDN op maps to this file.
    #[arg(long, value_name = "OUT")]
    pub export_edn: Option<PathBuf>,
}

/// Witness ops printed per failing checker; the rest are in `--out`.
const MAX_PRINTED_WITNESS_OPS: usize = 12;

pub fn run(args: CheckArgs) -> ExitCode {
    match check(&args) {
        Ok(results) => exit_code(results.valid),
        Err(message) => {
            eprintln!("latchkey-jepsen: error: {message}");
            ExitCode::from(2)
        }
    }
}

fn check(args: &CheckArgs) -> Result<Results, String> {
    let ops = formats::read_history(&args.history, args.format)?;
    if let Some(path) = &args.export_edn {
        write_file(path, |out| formats::edn::write(out, &ops))?;
    }
    let options = CheckOptions {
        budget: args.budget,
        drift_bound: args.drift_bound,
    };
    let results = check_history_with(&ops, &options, args.model);
    print_summary(&args.history, ops.len(), &results);
    if let Some(path) = &args.out {
        write_file(path, |out| {
            serde_json::to_writer_pretty(&mut *out, &results)?;
            out.write_all(b"\n")
        })?;
    }
    Ok(results)
}

fn write_file(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<(), String> {
    let mut out =
        BufWriter::new(File::create(path).map_err(|e| format!("{}: {e}", path.display()))?);
    write(&mut out)
        .and_then(|()| out.flush())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn print_summary(path: &Path, op_count: usize, results: &Results) {
    println!("{}: {op_count} ops", path.display());
    for checker in &results.checkers {
        println!(
            "  {:<7} {}: {}",
            verdict(checker.valid),
            checker.name,
            checker.summary
        );
        let ops = checker
            .witness
            .as_ref()
            .and_then(|witness| witness.get("ops"))
            .and_then(|ops| ops.as_array());
        for op in ops.into_iter().flatten().take(MAX_PRINTED_WITNESS_OPS) {
            println!("            {op}");
        }
    }
    println!("{}", verdict(results.valid));
}

fn verdict(validity: Validity) -> &'static str {
    match validity {
        Validity::Valid => "valid",
        Validity::Invalid => "INVALID",
        Validity::Unknown => "unknown",
    }
}

fn exit_code(validity: Validity) -> ExitCode {
    ExitCode::from(match validity {
        Validity::Valid => 0,
        Validity::Invalid => 1,
        Validity::Unknown => 3,
    })
}

/// `60s`, `500ms`, `2m`, `1h`, `250us`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 60s or 500ms"))?;
    let seconds_per_unit = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} (use ns, us, ms, s, m, h)"
            ))
        }
    };
    Duration::try_from_secs_f64(number * seconds_per_unit).map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_units_or_as_seconds() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }
}
