//! The tracker's own health counters, and a writer of the Prometheus text exposition format (0.0.4).
//!
//! The counters are plain static atomics: incrementing one costs a relaxed add, no lock, no allocation, so
//! the collector and the writer count every frame and change without slowing down. `GET /metrics`
//! ([`crate::api::metrics`]) reads them together with what the database knows.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Frames (full snapshots) the collector received from mihomo and parsed.
pub static FRAMES: AtomicU64 = AtomicU64::new(0);
/// Diffs the writer received (one per frame that changed anything).
pub static DIFFS: AtomicU64 = AtomicU64::new(0);
/// Connections opened, as received by the writer.
pub static OPENED: AtomicU64 = AtomicU64::new(0);
/// Connections reopened (an id that vanished and came back).
pub static REOPENED: AtomicU64 = AtomicU64::new(0);
/// Byte updates (one per connection whose counters moved in a frame).
pub static FLOWS: AtomicU64 = AtomicU64::new(0);
/// Connections closed.
pub static CLOSED: AtomicU64 = AtomicU64::new(0);
/// New connections the writer dropped because the database could not be written for too long and holding
/// more would exceed its memory bound (`store::writer::MAX_HELD_CHANGES`).
pub static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Successful commits of the writer.
pub static COMMITS: AtomicU64 = AtomicU64::new(0);
/// Duration of the last successful commit, in microseconds.
pub static LAST_COMMIT_US: AtomicU64 = AtomicU64::new(0);
/// The longest commit since start, in microseconds.
pub static MAX_COMMIT_US: AtomicU64 = AtomicU64::new(0);
/// Lines logged at error level.
pub static ERRORS: AtomicU64 = AtomicU64::new(0);
/// When the last error was logged (UTC ms; 0: never).
pub static LAST_ERROR_MS: AtomicU64 = AtomicU64::new(0);

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

/// Records one writer commit that took `elapsed`.
pub fn observe_commit(elapsed: std::time::Duration) {
    let us = elapsed.as_micros().min(u64::MAX as u128) as u64;
    COMMITS.fetch_add(1, Ordering::Relaxed);
    LAST_COMMIT_US.store(us, Ordering::Relaxed);
    MAX_COMMIT_US.fetch_max(us, Ordering::Relaxed);
}

/// Records that an error was logged (called by the logger, so every `crate::error!` counts).
pub fn record_error() {
    ERRORS.fetch_add(1, Ordering::Relaxed);
    LAST_ERROR_MS.store(crate::timefmt::now_ms().max(0) as u64, Ordering::Relaxed);
}

/// Reads a counter.
pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// The writer's commit generation, so that a reader can tell whether an answer could predate a write that a
/// client was already told of (the API's answer cache, `api::cache`). It grows by 2 with each commit of the
/// writer's own (a flush, a group commit of sync batches), after the commit and before anyone is told, and by
/// 1 before and 1 after each `WriteCmd::Run` closure: such a closure may commit and report its outcome
/// itself, so while it runs the value is odd and a request arriving then asks for an answer from after it.
/// It assumes one writer per process (as the binary has): several, as in tests, only make readers ask for
/// newer answers, except while two closures run at once.
static COMMIT_GENERATION: AtomicU64 = AtomicU64::new(0);

/// The writer committed a transaction of its own; called before it tells anyone.
pub fn committed() {
    COMMIT_GENERATION.fetch_add(2, Ordering::SeqCst);
}

/// Held by the writer while it runs a `WriteCmd::Run` closure, which may commit: the commit generation is odd
/// from [`ClosureRunning::start`] until the guard is dropped.
pub struct ClosureRunning(());

impl ClosureRunning {
    pub fn start() -> ClosureRunning {
        COMMIT_GENERATION.fetch_add(1, Ordering::SeqCst);
        ClosureRunning(())
    }
}

impl Drop for ClosureRunning {
    fn drop(&mut self) {
        COMMIT_GENERATION.fetch_add(1, Ordering::SeqCst);
    }
}

/// Commits that are complete: a database snapshot taken from now on includes every one of them.
pub fn commit_generation() -> u64 {
    COMMIT_GENERATION.load(Ordering::SeqCst) / 2
}

/// Commits that are complete or under way in a `WriteCmd::Run` closure (whose outcome may already have been
/// reported): what an answer to a request arriving now must include.
pub fn commit_generation_begun() -> u64 {
    COMMIT_GENERATION.load(Ordering::SeqCst).div_ceil(2)
}

/// How `/metrics` bounds its series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Per dimension, the top N labels by bytes keep their own series; the rest are folded into `other`.
    pub max_series: usize,
    /// Also export the (capped) per-host dimension.
    pub hosts: bool,
}

/// 50 series per dimension, no hosts.
pub const DEFAULT_MAX_SERIES: usize = 50;

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            max_series: DEFAULT_MAX_SERIES,
            hosts: false,
        }
    }
}

/// The label value that collects everything beyond the top N of a dimension.
pub const OTHER: &str = "other";

/// Escapes a label value: `\` → `\\`, `"` → `\"`, newline → `\n`.
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes `# HELP` text: `\` → `\\`, newline → `\n`.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// The kind of a metric family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// Text in the exposition format, one family at a time: [`Exposition::family`] writes `# HELP` and
/// `# TYPE`, then [`Exposition::sample`] the samples of that family (all samples of a family must follow its
/// header, with no other family in between).
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    /// Starts a family (names are fixed strings of ours, always valid).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample; label values are escaped here.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e15 {
            writeln!(self.out, " {}", value as i64)
        } else if value.is_nan() {
            writeln!(self.out, " NaN")
        } else if value.is_infinite() {
            writeln!(self.out, " {}", if value > 0.0 { "+Inf" } else { "-Inf" })
        } else {
            writeln!(self.out, " {value}")
        };
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_label_values_and_help() {
        assert_eq!(escape_label("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        let mut e = Exposition::default();
        e.family("x_total", Kind::Counter, "line\\one\ntwo");
        e.sample("x_total", &[("k", "v\"1"), ("d", "up")], 3.0);
        e.sample("x_total", &[], 0.25);
        assert_eq!(
            e.finish(),
            "# HELP x_total line\\\\one\\ntwo\n# TYPE x_total counter\nx_total{k=\"v\\\"1\",d=\"up\"} 3\nx_total 0.25\n"
        );
    }

    #[test]
    fn commit_times_keep_last_and_max() {
        let before = get(&COMMITS);
        observe_commit(std::time::Duration::from_millis(7));
        observe_commit(std::time::Duration::from_millis(2));
        assert!(get(&COMMITS) >= before + 2);
        assert!(get(&MAX_COMMIT_US) >= 7_000);
    }
}
