//! `index.html`: one self-contained page (inline SVG and CSS, no scripts,
//! no network assets) that shows what happened in a run.
//!
//! - the verdicts of every checker, with witnesses;
//! - a timeline: one row per process, a bar per op from invoke to
//!   completion (green ok, red fail, orange info, grey never completed),
//!   fault intervals shaded behind (a client fault also outlines the row
//!   of the process it hit), and the leader as the observer saw it;
//! - latency over time (log scale) and throughput per second;
//! - the nemesis's steps, and the command line and seed to rerun.
//!
//! # Not done yet
//! - Each node's clock rate over time has no track of its own (the clock
//!   band's description names the rates).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use serde_json::Value;

use super::run::{verdict, RunInfo};
use crate::check::{Results, Validity};
use crate::history::{Op, OpType, Process};

const WIDTH: f64 = 1100.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
/// Rows drawn at most in the timeline; later processes are summarised.
const MAX_TIMELINE_ROWS: usize = 200;

/// An op from invoke to completion.
struct Span<'a> {
    invoke: &'a Op,
    completion: Option<&'a Op>,
}

/// A fault from the moment it was in place to the moment it was healed.
struct Interval {
    kind: &'static str,
    start: u64,
    end: u64,
    label: String,
    /// The client process a client fault hit, when the step names it.
    process: Option<u64>,
}

pub fn render(ops: &[Op], results: &Results, info: &RunInfo) -> String {
    let end = ops.last().map(|op| op.time).unwrap_or(0).max(1);
    let (spans, standalone) = pair(ops);
    let intervals = intervals(ops, end);
    let mut html = String::new();
    html.push_str(HEAD);
    let _ = write!(
        html,
        "<h1>latchkey-jepsen: {} <span class=\"verdict {}\">{}</span></h1>",
        escape(&info.workload),
        verdict_class(results.valid),
        verdict(results.valid)
    );
    summary_table(&mut html, info, ops.len());
    checker_table(&mut html, results);
    html.push_str("<h2>Timeline</h2><p class=\"legend\"><span class=\"ok\">■ ok</span> <span class=\"fail\">■ fail</span> <span class=\"info\">■ info</span> <span class=\"open\">■ never completed</span> · shaded: <span style=\"color:#3b6fd6\">partition</span>, <span style=\"color:#d63b3b\">kill</span>, <span style=\"color:#8e44ad\">pause</span>, <span style=\"color:#16a085\">client partition</span>, <span style=\"color:#6b4f2a\">disk stall</span>, <span style=\"color:#c9a227\">clock (restart skew or clock rate)</span>. Hover a band for the fault, a bar for the op.</p>");
    timeline(&mut html, &spans, &standalone, &intervals, ops, end);
    html.push_str("<h2>Latency</h2>");
    latency(&mut html, &spans, &intervals, end);
    html.push_str("<h2>Throughput (completions per second)</h2>");
    throughput(&mut html, &spans, &intervals, end);
    nemesis_table(&mut html, ops);
    op_counts(&mut html, &spans);
    html.push_str("</body></html>\n");
    html
}

const HEAD: &str = "<!doctype html><html><head><meta charset=\"utf-8\"><title>latchkey-jepsen report</title><style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top;font-size:13px}
code,pre{font-family:ui-monospace,monospace;font-size:12px}pre{white-space:pre-wrap;max-height:300px;overflow:auto;background:#f6f6f6;padding:4px}
.verdict{padding:0 .4em;border-radius:4px}.valid{background:#c8efc8}.invalid{background:#f7c0c0}.unknown{background:#f7e3a8}
.ok{color:#2e9e44}.fail{color:#d13b3b}.info{color:#e08a00}.open{color:#999}.legend{font-size:13px}
svg text{font-size:10px;font-family:system-ui,sans-serif}
</style></head><body>\n";

fn verdict_class(valid: Validity) -> &'static str {
    match valid {
        Validity::Valid => "valid",
        Validity::Invalid => "invalid",
        Validity::Unknown => "unknown",
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn summary_table(html: &mut String, info: &RunInfo, ops: usize) {
    let network = match &info.network_note {
        Some(note) => format!("{} — fallback: {}", info.network, note),
        None => info.network.clone(),
    };
    let faults = info
        .nemesis
        .by_variant
        .iter()
        .map(|(k, v)| format!("{k} ×{v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = [
        ("rerun", format!("<code>{}</code>", escape(&info.rerun))),
        ("seed", info.seed.to_string()),
        ("run directory", format!("<code>{}</code>", escape(&info.run_dir.display().to_string()))),
        ("network", escape(&network)),
        (
            "cluster",
            format!(
                "{} nodes, {} workers, lease TTL {} ms{}{}",
                info.nodes,
                info.concurrency,
                info.ttl_ms,
                if info.unsafe_no_fencing { ", <b>--unsafe-no-fencing</b>" } else { "" },
                if info.unsafe_unconfirmed_renewals { ", <b>--unsafe-unconfirmed-renewals</b>" } else { "" }
            ),
        ),
        ("duration", format!("{:.1} s of {:.0} s workload; checking took {:.1} s", info.duration_s, info.time_limit_s, info.check_s)),
        ("ops recorded", ops.to_string()),
        ("faults", format!("{} ({})", info.nemesis.faults, escape(&faults))),
        ("nemesis", escape(&info.nemeses.join(", "))),
        ("clocks", clocks(info)),
        ("nemesis notes", escape(&info.nemesis.notes.join("; "))),
        ("nodes that exited on their own", escape(&info.node_crashes.join("; "))),
        ("files", "<a href=\"history.jsonl\">history.jsonl</a>, <a href=\"results.json\">results.json</a>, <a href=\"nodes/\">nodes/</a> (logs), <a href=\"workers/\">workers/</a>".into()),
    ];
    html.push_str("<table>");
    for (name, value) in rows {
        let _ = write!(html, "<tr><th>{name}</th><td>{value}</td></tr>");
    }
    html.push_str("</table>\n");
}

/// The drift bound and the rates the clock faults drew from.
fn clocks(info: &RunInfo) -> String {
    let rates: Vec<String> = info.clock_rates.iter().map(|r| format!("x{r}")).collect();
    let mut text = format!(
        "drift bound {} ppm; clock faults draw rates {}",
        info.max_clock_drift_ppm,
        rates.join(", ")
    );
    if info.clock_rates_beyond_bound {
        text.push_str(" — <b>beyond the bound: lease overlaps are expected</b>");
    }
    text
}

fn checker_table(html: &mut String, results: &Results) {
    html.push_str("<h2>Checkers</h2>");
    if results.checkers.is_empty() {
        html.push_str("<p>No checker applied to this history.</p>");
        return;
    }
    html.push_str(
        "<table><tr><th>checker</th><th>verdict</th><th>summary</th><th>witness</th></tr>",
    );
    for checker in &results.checkers {
        let witness = checker
            .witness
            .as_ref()
            .map(|w| {
                let text = serde_json::to_string_pretty(w).unwrap_or_default();
                format!(
                    "<details><summary>witness</summary><pre>{}</pre></details>",
                    escape(&text)
                )
            })
            .unwrap_or_default();
        let _ = write!(
            html,
            "<tr><td>{}</td><td><span class=\"verdict {}\">{}</span></td><td>{}</td><td>{}</td></tr>",
            escape(&checker.name),
            verdict_class(checker.valid),
            verdict(checker.valid),
            escape(&checker.summary),
            witness
        );
    }
    html.push_str("</table>\n");
}

/// Matches each client invoke with the next op of its process that has the
/// same `f`; other client `info` ops (hold-lost, observe) stand alone.
fn pair(ops: &[Op]) -> (Vec<Span<'_>>, Vec<&Op>) {
    let mut open: HashMap<Process, usize> = HashMap::new();
    let mut spans: Vec<Span<'_>> = Vec::new();
    let mut standalone = Vec::new();
    for op in ops {
        if op.process == Process::Nemesis {
            continue;
        }
        if op.kind == OpType::Invoke {
            open.insert(op.process, spans.len());
            spans.push(Span {
                invoke: op,
                completion: None,
            });
            continue;
        }
        match open.get(&op.process) {
            Some(&at) if spans[at].invoke.f == op.f => {
                spans[at].completion = Some(op);
                open.remove(&op.process);
            }
            _ => standalone.push(op),
        }
    }
    (spans, standalone)
}

fn value_str(value: &Value, field: &str) -> Option<String> {
    value.get(field).map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

fn intervals(ops: &[Op], end: u64) -> Vec<Interval> {
    let mut open: BTreeMap<String, Interval> = BTreeMap::new();
    let mut done = Vec::new();
    for op in ops
        .iter()
        .filter(|op| op.process == Process::Nemesis && op.kind == OpType::Info)
    {
        for (key, kind, opens) in fault_edges(op) {
            if opens {
                let interval = Interval {
                    kind,
                    start: op.time,
                    end,
                    label: value_str(&op.value, "description").unwrap_or_else(|| op.f.clone()),
                    process: op.value.get("process").and_then(Value::as_u64),
                };
                open.insert(key, interval);
            } else if let Some(interval) = open.remove(&key) {
                done.push(Interval {
                    end: op.time,
                    ..interval
                });
            }
        }
    }
    // Still open at the end of the history: they run to its end.
    done.extend(open.into_values());
    done
}

/// The fault intervals a nemesis `info` op opens or closes: `(key, kind,
/// opens)`, where an op closes the interval its key opened. Arming a
/// client fault opens nothing: the `client-pause` or `client-cut` that
/// follows when it fires does.
fn fault_edges(op: &Op) -> Vec<(String, &'static str, bool)> {
    let client = value_str(&op.value, "target").as_deref() == Some("client");
    let variant = value_str(&op.value, "variant");
    let slot = value_str(&op.value, "slot").unwrap_or_default();
    let edge = |key: String, kind, opens| vec![(key, kind, opens)];
    match op.f.as_str() {
        "partition" => edge("net".into(), "partition", true),
        "heal" => edge("net".into(), "partition", false),
        "kill" => edge("kill".into(), "kill", true),
        "start" => edge("kill".into(), "kill", false),
        "clock" => edge("clock".into(), "clock", true),
        "clock-reset" => edge("clock".into(), "clock", false),
        "clock-rate" => edge("clock-rate".into(), "clock", true),
        "clock-rate-reset" => edge("clock-rate".into(), "clock", false),
        "disk-stall" => edge("disk".into(), "disk", true),
        "disk-stall-end" => edge("disk".into(), "disk", false),
        "pause" if variant.as_deref() == Some("client-at-write") => Vec::new(),
        "client-partition" if variant.as_deref() == Some("holder") => Vec::new(),
        "client-pause" => edge(format!("client-{slot}"), "pause", true),
        "client-resume" => edge(format!("client-{slot}"), "pause", false),
        "pause" if client => edge(format!("client-{slot}"), "pause", true),
        "resume" if client => edge(format!("client-{slot}"), "pause", false),
        "pause" => edge("node-pause".into(), "pause", true),
        "resume" => edge("node-pause".into(), "pause", false),
        "client-partition" | "client-cut" => {
            edge(format!("client-net-{slot}"), "client-partition", true)
        }
        // The schedule's heal names every slot it reconnects.
        "client-heal" => match op.value.get("slots").and_then(Value::as_array) {
            Some(slots) => slots
                .iter()
                .map(|s| (format!("client-net-{s}"), "client-partition", false))
                .collect(),
            None => edge(format!("client-net-{slot}"), "client-partition", false),
        },
        _ => Vec::new(),
    }
}

fn interval_color(kind: &str) -> &'static str {
    match kind {
        "partition" => "#3b6fd6",
        "kill" => "#d63b3b",
        "pause" => "#8e44ad",
        "client-partition" => "#16a085",
        "disk" => "#6b4f2a",
        _ => "#c9a227",
    }
}

fn x_of(time: u64, end: u64) -> f64 {
    LEFT + (time as f64 / end as f64) * (WIDTH - LEFT - RIGHT)
}

fn shade(html: &mut String, intervals: &[Interval], end: u64, top: f64, height: f64) {
    for interval in intervals {
        let x = x_of(interval.start, end);
        let w = (x_of(interval.end, end) - x).max(1.0);
        let _ = write!(
            html,
            "<rect x=\"{x:.1}\" y=\"{top:.1}\" width=\"{w:.1}\" height=\"{height:.1}\" fill=\"{}\" fill-opacity=\"0.13\"><title>{}</title></rect>",
            interval_color(interval.kind),
            escape(&interval.label)
        );
    }
}

fn time_axis(html: &mut String, end: u64, y: f64, top: f64) {
    let seconds = end as f64 / 1e9;
    let step = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]
        .into_iter()
        .find(|s| seconds / s <= 15.0)
        .unwrap_or(600.0);
    let mut t = 0.0;
    while t <= seconds {
        let x = x_of((t * 1e9) as u64, end);
        let _ = write!(
            html,
            "<line x1=\"{x:.1}\" y1=\"{top:.1}\" x2=\"{x:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/><text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{t}s</text>",
            y + 12.0
        );
        t += step;
    }
}

fn span_color(span: &Span<'_>) -> &'static str {
    match span.completion.map(|c| c.kind) {
        Some(OpType::Ok) => "#2e9e44",
        Some(OpType::Fail) => "#d13b3b",
        Some(OpType::Info) => "#e08a00",
        _ => "#999",
    }
}

fn describe_span(span: &Span<'_>) -> String {
    let invoke = span.invoke;
    let mut text = format!(
        "process {} {} {} {}",
        invoke.process,
        invoke.f,
        invoke.key.as_deref().unwrap_or(""),
        invoke.value
    );
    match span.completion {
        Some(done) => {
            let _ = write!(
                text,
                " → {:?} {} ({:.1} ms)",
                done.kind,
                done.value,
                (done.time - invoke.time) as f64 / 1e6
            );
            if let Some(error) = &done.error {
                let _ = write!(text, " error: {error}");
            }
        }
        None => text.push_str(" → never completed"),
    }
    escape(&text)
}

fn timeline(
    html: &mut String,
    spans: &[Span<'_>],
    standalone: &[&Op],
    intervals: &[Interval],
    ops: &[Op],
    end: u64,
) {
    let processes: BTreeSet<Process> = spans.iter().map(|s| s.invoke.process).collect();
    let rows: Vec<Process> = processes.into_iter().take(MAX_TIMELINE_ROWS).collect();
    let row_height = if rows.len() > 60 { 5.0 } else { 11.0 };
    let leader_row = 16.0;
    let top = 10.0;
    let height = top + leader_row + rows.len() as f64 * row_height + 20.0;
    let _ = write!(
        html,
        "<svg width=\"{WIDTH}\" height=\"{height:.0}\" viewBox=\"0 0 {WIDTH} {height:.0}\">"
    );
    let bottom = height - 20.0;
    time_axis(html, end, bottom, top);
    shade(html, intervals, end, top, bottom - top);
    leader_track(html, ops, end, top + 10.0);
    let row_of: HashMap<Process, usize> = rows.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    let first_row = top + leader_row;
    for (i, process) in rows.iter().enumerate() {
        if row_height >= 10.0 || i % 10 == 0 {
            let _ = write!(
                html,
                "<text x=\"2\" y=\"{:.1}\">p{process}</text>",
                first_row + i as f64 * row_height + row_height - 2.0
            );
        }
    }
    for span in spans {
        let Some(&row) = row_of.get(&span.invoke.process) else {
            continue;
        };
        let x = x_of(span.invoke.time, end);
        let done = span.completion.map(|c| c.time).unwrap_or(end);
        let w = (x_of(done, end) - x).max(1.0);
        let y = first_row + row as f64 * row_height + 1.0;
        let _ = write!(
            html,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{}</title></rect>",
            row_height - 2.0,
            span_color(span),
            describe_span(span)
        );
    }
    let rows_at = Rows {
        of: &row_of,
        top: first_row,
        height: row_height,
    };
    outline_client_faults(html, intervals, &rows_at, end);
    for op in standalone {
        let Some(&row) = row_of.get(&op.process) else {
            continue;
        };
        let x = x_of(op.time, end);
        let y = first_row + row as f64 * row_height;
        let _ = write!(
            html,
            "<line x1=\"{x:.1}\" y1=\"{y:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#000\" stroke-width=\"2\"><title>{}</title></line>",
            y + row_height,
            escape(&format!("process {} {} {} {}", op.process, op.f, op.key.as_deref().unwrap_or(""), op.value))
        );
    }
    html.push_str("</svg>\n");
}

/// Who the observer saw leading, and in which term, along baseline `y`.
fn leader_track(html: &mut String, ops: &[Op], end: u64, y: f64) {
    let _ = write!(html, "<text x=\"2\" y=\"{y:.1}\">leader</text>");
    for op in ops
        .iter()
        .filter(|op| op.f == "status" && value_str(&op.value, "role").as_deref() == Some("leader"))
    {
        let x = x_of(op.time, end);
        let node = value_str(&op.value, "node").unwrap_or_default();
        let term = value_str(&op.value, "term").unwrap_or_default();
        let _ = write!(
            html,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" fill=\"#555\">n{node}<title>node {node} leads in term {term}</title></text>"
        );
    }
}

/// Where each process's timeline row is.
struct Rows<'a> {
    of: &'a HashMap<Process, usize>,
    top: f64,
    height: f64,
}

/// Outlines, on the row of the process a client fault hit, the time it
/// was stopped or cut off.
fn outline_client_faults(html: &mut String, intervals: &[Interval], rows: &Rows<'_>, end: u64) {
    for interval in intervals {
        let Some(&row) = interval
            .process
            .and_then(|p| rows.of.get(&Process::Client(p)))
        else {
            continue;
        };
        let x = x_of(interval.start, end);
        let w = (x_of(interval.end, end) - x).max(1.0);
        let (y, height) = (rows.top + row as f64 * rows.height, rows.height);
        let _ = write!(
            html,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{height:.1}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"><title>{}</title></rect>",
            interval_color(interval.kind),
            escape(&interval.label)
        );
    }
}

fn latency(html: &mut String, spans: &[Span<'_>], intervals: &[Interval], end: u64) {
    let height = 260.0;
    let (top, bottom) = (10.0, height - 20.0);
    let points: Vec<(u64, f64, &str)> = spans
        .iter()
        .filter_map(|s| {
            let done = s.completion?;
            let ms = (done.time - s.invoke.time) as f64 / 1e6;
            Some((s.invoke.time, ms.max(0.01), span_color(s)))
        })
        .collect();
    let max_ms = points.iter().map(|p| p.1).fold(1.0, f64::max);
    let (low, high) = (0.1f64.log10(), max_ms.log10().ceil().max(1.0));
    let y_of =
        |ms: f64| bottom - (ms.log10().clamp(low, high) - low) / (high - low) * (bottom - top);
    let _ = write!(html, "<svg width=\"{WIDTH}\" height=\"{height:.0}\">");
    time_axis(html, end, bottom, top);
    shade(html, intervals, end, top, bottom - top);
    let mut decade = low;
    while decade <= high {
        let ms = 10f64.powf(decade);
        let y = y_of(ms);
        let _ = write!(html, "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/><text x=\"2\" y=\"{:.1}\">{} ms</text>", WIDTH - RIGHT, y + 3.0, format_ms(ms));
        decade += 1.0;
    }
    for (time, ms, color) in points {
        let _ = write!(
            html,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"1.6\" fill=\"{color}\"/>",
            x_of(time, end),
            y_of(ms)
        );
    }
    html.push_str("</svg>\n");
}

fn format_ms(ms: f64) -> String {
    if ms < 1.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

fn throughput(html: &mut String, spans: &[Span<'_>], intervals: &[Interval], end: u64) {
    let height = 200.0;
    let (top, bottom) = (10.0, height - 20.0);
    let seconds = (end / 1_000_000_000 + 1) as usize;
    let mut buckets: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for span in spans {
        let Some(done) = span.completion else {
            continue;
        };
        let color = span_color(span);
        let series = buckets.entry(color).or_insert_with(|| vec![0; seconds]);
        series[(done.time / 1_000_000_000) as usize] += 1;
    }
    let max = buckets
        .values()
        .flatten()
        .copied()
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let _ = write!(html, "<svg width=\"{WIDTH}\" height=\"{height:.0}\">");
    time_axis(html, end, bottom, top);
    shade(html, intervals, end, top, bottom - top);
    let _ = write!(
        html,
        "<text x=\"2\" y=\"{:.1}\">{max:.0}/s</text><text x=\"2\" y=\"{bottom:.1}\">0</text>",
        top + 8.0
    );
    for (color, series) in buckets {
        let points = series
            .iter()
            .enumerate()
            .map(|(second, count)| {
                let x = x_of(second as u64 * 1_000_000_000 + 500_000_000, end).min(WIDTH - RIGHT);
                let y = bottom - *count as f64 / max * (bottom - top);
                format!("{x:.1},{y:.1}")
            })
            .collect::<Vec<_>>()
            .join(" ");
        let _ = write!(
            html,
            "<polyline points=\"{points}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\"/>"
        );
    }
    html.push_str("</svg>\n");
}

fn nemesis_table(html: &mut String, ops: &[Op]) {
    html.push_str(
        "<h2>Nemesis</h2><table><tr><th>time</th><th>type</th><th>f</th><th>what</th></tr>",
    );
    for op in ops
        .iter()
        .filter(|op| op.process == Process::Nemesis && op.f != "status")
    {
        let what = value_str(&op.value, "description").unwrap_or_else(|| op.value.to_string());
        let _ = write!(
            html,
            "<tr><td>{:.3}s</td><td>{:?}</td><td>{}</td><td>{}</td></tr>",
            op.time as f64 / 1e9,
            op.kind,
            escape(&op.f),
            escape(&what)
        );
    }
    html.push_str("</table>\n");
}

fn op_counts(html: &mut String, spans: &[Span<'_>]) {
    let mut counts: BTreeMap<(String, &str), u64> = BTreeMap::new();
    for span in spans {
        let kind = match span.completion.map(|c| c.kind) {
            Some(OpType::Ok) => "ok",
            Some(OpType::Fail) => "fail",
            Some(OpType::Info) => "info",
            _ => "open",
        };
        *counts.entry((span.invoke.f.clone(), kind)).or_default() += 1;
    }
    let fs: BTreeSet<&String> = counts.keys().map(|(f, _)| f).collect();
    html.push_str("<h2>Operations</h2><table><tr><th>f</th><th>ok</th><th>fail</th><th>info</th><th>never completed</th></tr>");
    for f in fs {
        let get = |kind: &str| counts.get(&(f.clone(), kind)).copied().unwrap_or(0);
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(f),
            get("ok"),
            get("fail"),
            get("info"),
            get("open")
        );
    }
    html.push_str("</table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn op(index: u64, time: u64, process: Process, kind: OpType, f: &str, value: Value) -> Op {
        Op {
            index,
            time,
            process,
            kind,
            f: f.into(),
            key: None,
            value,
            term: None,
            raft_index: None,
            error: None,
        }
    }

    #[test]
    fn completions_pair_with_invokes_of_the_same_process_and_f() {
        let ops = vec![
            op(
                0,
                10,
                Process::Client(0),
                OpType::Invoke,
                "write",
                json!({"value": 1}),
            ),
            op(
                1,
                20,
                Process::Client(0),
                OpType::Info,
                "hold-lost",
                json!({"token": 1}),
            ),
            op(
                2,
                30,
                Process::Client(0),
                OpType::Ok,
                "write",
                json!({"value": 1}),
            ),
        ];
        let (spans, standalone) = pair(&ops);
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].completion.map(|c| c.index), Some(2));
        assert_eq!(standalone.len(), 1);
    }

    #[test]
    fn fault_intervals_run_from_fault_to_heal_and_open_ones_to_the_end() {
        let ops = vec![
            op(
                0,
                10,
                Process::Nemesis,
                OpType::Info,
                "partition",
                json!({"description": "isolate n1"}),
            ),
            op(1, 50, Process::Nemesis, OpType::Info, "heal", json!({})),
            op(2, 60, Process::Nemesis, OpType::Info, "kill", json!({})),
        ];
        let found = intervals(&ops, 100);
        assert_eq!(found.len(), 2);
        assert_eq!(
            (found[0].start, found[0].end, found[0].kind),
            (10, 50, "partition")
        );
        assert_eq!((found[1].start, found[1].end), (60, 100));
    }

    #[test]
    fn client_cuts_and_clock_rate_steps_shade_until_their_own_heals() {
        let info = |time, f: &str, value| op(0, time, Process::Nemesis, OpType::Info, f, value);
        let ops = vec![
            info(
                5,
                "client-partition",
                json!({"target": "client", "variant": "holder"}),
            ),
            info(
                10,
                "client-cut",
                json!({"target": "client", "slot": 3, "process": 7, "description": "cut 3"}),
            ),
            info(
                20,
                "clock-rate",
                json!({"rate": 2.0, "description": "n1 x2"}),
            ),
            info(
                30,
                "client-partition",
                json!({"target": "client", "variant": "random", "slot": 4}),
            ),
            info(40, "client-heal", json!({"target": "client", "slot": 3})),
            info(50, "clock-rate-reset", json!({"rate": 1.0})),
            info(60, "client-heal", json!({"target": "client", "slots": [4]})),
        ];
        let found = intervals(&ops, 100);
        let spans: Vec<(&str, u64, u64)> = found.iter().map(|i| (i.kind, i.start, i.end)).collect();
        assert_eq!(
            spans,
            vec![
                ("client-partition", 10, 40),
                ("clock", 20, 50),
                ("client-partition", 30, 60)
            ]
        );
        assert_eq!(found[1].label, "n1 x2");
        assert_eq!(found[0].process, Some(7), "a holder cut names its process");
    }

    #[test]
    fn the_page_has_no_external_assets() {
        let results = Results {
            valid: Validity::Valid,
            checkers: Vec::new(),
        };
        let info = RunInfo {
            run_dir: "/tmp/x".into(),
            workload: "register".into(),
            seed: 1,
            rerun: "latchkey-jepsen test --seed 1".into(),
            network: "loopback-proxy".into(),
            network_note: Some("not root".into()),
            nodes: 5,
            concurrency: 1,
            time_limit_s: 1.0,
            ttl_ms: 2000,
            unsafe_no_fencing: false,
            unsafe_unconfirmed_renewals: false,
            max_clock_drift_ppm: 10_000,
            clock_rates: vec![0.99, 1.01],
            clock_rates_beyond_bound: false,
            nemeses: Vec::new(),
            nemesis: Default::default(),
            node_crashes: Vec::new(),
            ops: 0,
            duration_s: 1.0,
            check_s: 0.0,
        };
        let ops = vec![op(
            0,
            10,
            Process::Client(0),
            OpType::Invoke,
            "read",
            Value::Null,
        )];
        let page = render(&ops, &results, &info);
        assert!(page.contains("<svg"));
        assert!(page.contains("--seed 1"));
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "external asset"
        );
    }
}
