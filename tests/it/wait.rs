//! Waiting with a deadline: the one poll-until helper of the tests. The integration tests reach it through
//! `support`; unit tests under `src/` include this file by `#[path]` (it needs nothing but `std`).

use std::time::{Duration, Instant};

/// How long a test waits for something that takes milliseconds when all is well.
pub const WAIT: Duration = Duration::from_secs(20);
/// How often a poll looks again.
pub const POLL: Duration = Duration::from_millis(20);

/// What one poll of [`wait_until`] found: done, with a value, or not yet, with what it saw instead.
pub trait Polled {
    type Value;
    /// The state a poll observed when it was not done, for the message of a timeout.
    type Seen: std::fmt::Display;
    fn check(self) -> Result<Self::Value, Self::Seen>;
}

impl Polled for bool {
    type Value = ();
    type Seen = &'static str;
    fn check(self) -> Result<(), &'static str> {
        self.then_some(()).ok_or("false")
    }
}

impl<T> Polled for Option<T> {
    type Value = T;
    type Seen = &'static str;
    fn check(self) -> Result<T, &'static str> {
        self.ok_or("None")
    }
}

/// `Err` carries what the poll saw, formatted only if the wait times out.
impl<T, E: std::fmt::Display> Polled for Result<T, E> {
    type Value = T;
    type Seen = E;
    fn check(self) -> Result<T, E> {
        self
    }
}

/// Calls `poll` every `every` until it is done and returns its value; after `within`, panics naming `what`
/// and the state the last poll saw.
pub fn wait_until<P: Polled>(
    what: &str,
    within: Duration,
    every: Duration,
    mut poll: impl FnMut() -> P,
) -> P::Value {
    let deadline = Instant::now() + within;
    loop {
        let seen = match poll().check() {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting for {what}; last seen: {seen}");
        }
        std::thread::sleep(every);
    }
}

/// [`wait_until`] with the usual patience: [`WAIT`], polling every [`POLL`].
pub fn wait_for<P: Polled>(what: &str, poll: impl FnMut() -> P) -> P::Value {
    wait_until(what, WAIT, POLL, poll)
}
