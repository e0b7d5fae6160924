//! The tracker's own health counters: frames, diffs and changes processed, commits and their latency,
//! errors logged.
//!
//! They are plain static atomics: incrementing one costs a relaxed add, no lock, no allocation, so the
//! collector and the writer count every frame and change without slowing down. `GET /metrics`
//! ([`crate::api::metrics`]) reads them together with what the database knows, and writes the exposition.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_times_keep_last_and_max() {
        let before = get(&COMMITS);
        observe_commit(std::time::Duration::from_millis(7));
        observe_commit(std::time::Duration::from_millis(2));
        assert!(get(&COMMITS) >= before + 2);
        assert!(get(&MAX_COMMIT_US) >= 7_000);
    }
}
