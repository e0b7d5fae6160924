//! The poller thread: asks the core's REST endpoints ([`super::rest`]) on a schedule, beside the collector's
//! WebSocket. Each [`Job`] (the rule hit counts, the providers' subscriptions, ...) says how often it runs; the
//! thread runs every job once at start, then each at its interval, one at a time (every call has its own
//! timeout, so one slow endpoint delays the others by at most that), and notices the stop flag within
//! [`TICK`]. A job reports its own problems, once per change of state, never per try.

use super::rest::Rest;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the thread looks at the stop flag while it waits.
pub const TICK: Duration = Duration::from_millis(100);

/// One thing to ask the core on a schedule.
pub trait Job: Send {
    /// For the log.
    fn name(&self) -> &'static str;
    /// Time between two runs.
    fn every(&self) -> Duration;
    /// Asks the core and hands what it learnt on (to the writer, typically).
    fn run(&mut self, rest: &Rest);
}

/// Starts the poller thread; it returns when `stop` is set.
pub fn spawn(rest: Rest, jobs: Vec<Box<dyn Job>>, stop: Arc<AtomicBool>) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("poller".into())
        .stack_size(256 << 10)
        .spawn(move || run(&rest, jobs, &stop))
        .map_err(Error::io("spawn thread poller"))
}

/// Runs the jobs until `stop` is set: each at once, then every [`Job::every`].
pub fn run(rest: &Rest, mut jobs: Vec<Box<dyn Job>>, stop: &AtomicBool) {
    let start = Instant::now();
    let mut due: Vec<Instant> = vec![start; jobs.len()];
    while !stop.load(Ordering::SeqCst) {
        let Some((i, &at)) = due.iter().enumerate().min_by_key(|(_, at)| **at) else {
            return wait_for_stop(stop);
        };
        if Instant::now() < at {
            std::thread::sleep(at.saturating_duration_since(Instant::now()).min(TICK));
            continue;
        }
        let job = &mut jobs[i];
        crate::trace!("poller: {}", job.name());
        job.run(rest);
        // the next run keeps to the schedule, but never catches up on runs missed by a slow one
        due[i] = (at + job.every()).max(Instant::now());
    }
}

fn wait_for_stop(stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(TICK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{sync_channel, SyncSender};

    struct Counting {
        every: Duration,
        ran: SyncSender<&'static str>,
        name: &'static str,
    }

    impl Job for Counting {
        fn name(&self) -> &'static str {
            self.name
        }
        fn every(&self) -> Duration {
            self.every
        }
        fn run(&mut self, _: &Rest) {
            let _ = self.ran.try_send(self.name);
        }
    }

    fn rest() -> Rest {
        Rest::new(
            &crate::mihomo::collector::CollectorConfig {
                host: "127.0.0.1".into(),
                port: 9,
                token: None,
                interval_ms: 1000,
            },
            Duration::from_secs(1),
        )
    }

    #[test]
    fn every_job_runs_at_start_then_on_its_schedule_and_the_thread_stops() {
        let (tx, rx) = sync_channel(64);
        let jobs: Vec<Box<dyn Job>> = vec![
            Box::new(Counting {
                every: Duration::from_millis(50),
                ran: tx.clone(),
                name: "fast",
            }),
            Box::new(Counting {
                every: Duration::from_secs(3600),
                ran: tx,
                name: "slow",
            }),
        ];
        let stop = Arc::new(AtomicBool::new(false));
        let h = spawn(rest(), jobs, Arc::clone(&stop)).unwrap();
        let mut seen = Vec::new();
        while seen.iter().filter(|n| **n == "fast").count() < 3 {
            seen.push(rx.recv_timeout(Duration::from_secs(10)).unwrap());
        }
        assert_eq!(seen.iter().filter(|n| **n == "slow").count(), 1, "{seen:?}");
        stop.store(true, Ordering::SeqCst);
        h.join().unwrap();
    }

    #[test]
    fn no_jobs_waits_for_the_stop_flag() {
        let stop = Arc::new(AtomicBool::new(false));
        let h = spawn(rest(), Vec::new(), Arc::clone(&stop)).unwrap();
        stop.store(true, Ordering::SeqCst);
        h.join().unwrap();
    }
}
