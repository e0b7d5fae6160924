//! Fault injection for the integration tests, compiled into debug builds only.
//!
//! A test that runs the real binary cannot move its clock or shrink its disk from outside, so a debug build
//! reads `key=value` lines from the file named by `MCT_TEST_HOOKS` (reread at each use, so a test can change
//! them while the process runs; the test replaces the file by a rename, never half-written):
//! - `clock_offset_ms=N`: [`crate::timefmt::now_ms`] adds N (negative: the clock jumped back).
//! - `max_page_count=N`: the writer caps its database at N pages (SQLite's `max_page_count`), a full
//!   disk on demand; `0` lifts the cap.
//! - `max_held_changes=N`: what the writer keeps in memory while it cannot write (default `store::writer::MAX_HELD_CHANGES`).
//!
//! Why not libfaketime: it needs a system package (CI installs nothing for it), by default it also moves the
//! monotonic clock that our timeouts use, and it cannot work for the static musl binary. In release builds every
//! function here returns `None` and the environment variable is never read, so nothing in production can
//! reach these knobs by accident.

/// The value of `key` in the hooks file, if this is a debug build and the file sets it. The file is read at
/// each call (a test changes it while the process runs; a cached value would lag behind the change).
#[cfg(debug_assertions)]
pub fn get(key: &str) -> Option<i64> {
    use std::sync::OnceLock;
    static PATH: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    let path = PATH
        .get_or_init(|| std::env::var_os("MCT_TEST_HOOKS").map(Into::into))
        .as_ref()?;
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().parse().ok())?
    })
}

/// Release builds: no hooks.
#[cfg(not(debug_assertions))]
pub fn get(_key: &str) -> Option<i64> {
    None
}
