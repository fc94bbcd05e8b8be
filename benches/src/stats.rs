//! Latency histograms and the numbers a measurement reports.
//!
//! Every latency is recorded in microseconds into an `hdrhistogram`
//! histogram with three significant digits (so a reported percentile is
//! within 0.1 % of the recorded value), from 1 µs to [`MAX_RECORDED`];
//! longer values are clamped to it and counted in
//! [`LatencySummary::clamped`]. Each client task fills its own
//! [`Recorder`]; the workload merges them at the end. A recorder is about
//! 150 KB, zeroed when made, so `lease-keepalive`'s 10 000 lease tasks
//! share one per window instead.
//!
//! # Windows
//! A closed-loop workload runs its clients from the start of the warm-up
//! until the end of the measurement. [`Window`] says which operations
//! count: an operation is recorded if it *started* at or after the window's
//! start and *finished* at or before its end, and throughput is the number
//! of those operations divided by the window's length. Operations that
//! straddle either edge are dropped, so neither the warm-up nor the
//! stopping clients leak into the numbers.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::time::Instant;

/// Longest latency recorded as itself; longer ones are clamped.
pub const MAX_RECORDED: Duration = Duration::from_secs(120);
/// Significant digits kept by every histogram.
const SIGNIFICANT_DIGITS: u8 = 3;

/// The measured part of a run.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub start: Instant,
    pub end: Instant,
}

impl Window {
    /// A window that opens after `warmup` and stays open for `duration`.
    pub fn after(warmup: Duration, duration: Duration) -> Window {
        let start = Instant::now() + warmup;
        Window {
            start,
            end: start + duration,
        }
    }

    /// Whether an operation that ran from `started` to `finished` counts.
    pub fn contains(&self, started: Instant, finished: Instant) -> bool {
        started >= self.start && finished <= self.end
    }

    pub fn length(&self) -> Duration {
        self.end - self.start
    }
}

/// One client's latencies and error count.
#[derive(Debug, Clone)]
pub struct Recorder {
    histogram: Histogram<u64>,
    clamped: u64,
    pub errors: u64,
    /// The first few error messages, for the report.
    pub error_samples: Vec<String>,
}

/// Error messages kept per recorder.
const MAX_ERROR_SAMPLES: usize = 3;

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        let max_us = MAX_RECORDED.as_micros() as u64;
        // The bounds are constants that hdrhistogram accepts (1 ≤ low, high ≥ 2·low).
        let histogram = Histogram::new_with_bounds(1, max_us, SIGNIFICANT_DIGITS)
            .expect("valid histogram bounds");
        Recorder {
            histogram,
            clamped: 0,
            errors: 0,
            error_samples: Vec::new(),
        }
    }

    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let max_us = MAX_RECORDED.as_micros() as u64;
        let us = (latency.as_micros() as u64).max(1);
        if us > max_us {
            self.clamped += 1;
        }
        self.histogram.saturating_record(us.min(max_us));
    }

    /// Counts a failed operation and keeps its message if there is room.
    pub fn error(&mut self, message: impl std::fmt::Display) {
        self.errors += 1;
        if self.error_samples.len() < MAX_ERROR_SAMPLES {
            self.error_samples.push(message.to_string());
        }
    }

    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// Adds another recorder's samples and errors to this one.
    pub fn merge(&mut self, other: &Recorder) {
        // Both histograms have the same bounds, so adding cannot fail.
        self.histogram
            .add(&other.histogram)
            .expect("histograms with equal bounds");
        self.clamped += other.clamped;
        self.errors += other.errors;
        for sample in &other.error_samples {
            if self.error_samples.len() < MAX_ERROR_SAMPLES {
                self.error_samples.push(sample.clone());
            }
        }
    }

    /// Merges every recorder into one.
    pub fn merged<'a>(recorders: impl IntoIterator<Item = &'a Recorder>) -> Recorder {
        let mut total = Recorder::new();
        for recorder in recorders {
            total.merge(recorder);
        }
        total
    }

    /// Percentiles of what was recorded; `None` when nothing was.
    pub fn summary(&self) -> Option<LatencySummary> {
        if self.histogram.is_empty() {
            return None;
        }
        let ms = |q: f64| self.histogram.value_at_quantile(q) as f64 / 1000.0;
        Some(LatencySummary {
            count: self.histogram.len(),
            p50_ms: ms(0.50),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: self.histogram.max() as f64 / 1000.0,
            clamped: self.clamped,
        })
    }
}

/// Percentiles of one latency distribution, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Samples longer than [`MAX_RECORDED`], counted as that.
    pub clamped: u64,
}

/// Operations per second over `window`.
pub fn per_second(count: u64, window: Duration) -> f64 {
    if window.is_zero() {
        return 0.0;
    }
    count as f64 / window.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reports_percentiles_in_milliseconds() {
        let mut recorder = Recorder::new();
        for us in 1..=1000u64 {
            recorder.record(Duration::from_micros(us * 10));
        }
        let summary = recorder.summary().expect("samples recorded");
        assert_eq!(summary.count, 1000);
        assert!((summary.p50_ms - 5.0).abs() < 0.01, "{summary:?}");
        assert!((summary.p99_ms - 9.9).abs() < 0.02, "{summary:?}");
    }

    #[test]
    fn latencies_beyond_the_bound_are_clamped_and_counted() {
        let mut recorder = Recorder::new();
        recorder.record(MAX_RECORDED * 2);
        let summary = recorder.summary().expect("one sample");
        assert_eq!(summary.clamped, 1);
    }

    #[test]
    fn window_counts_only_operations_inside_it() {
        let window = Window::after(Duration::from_secs(1), Duration::from_secs(1));
        let before = window.start - Duration::from_millis(1);
        let inside = window.start + Duration::from_millis(10);
        assert!(!window.contains(before, inside));
        assert!(window.contains(inside, inside));
        assert!(!window.contains(inside, window.end + Duration::from_millis(1)));
    }
}
