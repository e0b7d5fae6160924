//! A small cache of query answers: `GET` replies keyed by the request target (path and query exactly as sent,
//! looked up only after the token was checked), kept for a few seconds, bounded in bytes, and single-flight:
//! a request identical to one running waits for that one's answer instead of running the same SQL again.
//!
//! Why: the dashboard asks every user the same questions (its ranges are whole buckets, `to` the end of the
//! current one, so 20 users on the 24 h view send byte-identical targets for an hour), and a ranged top list
//! costs about a second of CPU; under load identical requests pile up in the query queue, and each used to
//! run again.
//!
//! Read after write: an answer never predates a write that a client was told of before its request arrived.
//! Each answer carries the writer's commit generation from when its computation started
//! ([`crate::counters::commit_generation`]; every commit counted there is in its snapshot), each request the
//! generation it saw on arrival ([`crate::counters::commit_generation_begun`]), and a request takes only an
//! answer at least that new. It still runs each question once at a time: a request that finds an identical
//! one running waits for it, and takes its answer when that is new enough; when not, the first waiter runs the
//! question again for all the others. So however often the writer commits, identical requests cost at most
//! two runs at once rather than one each.
//!
//! A client that is told of no write and polls anyway may say how old an answer it accepts, with the standard
//! request directive `Cache-Control: max-age=N`: it then takes any answer younger than N seconds (and than
//! [`TTL`]), whatever was committed since. The dashboard does (`max-age=4`): 20 users on one view then cost one
//! run per question every 4 s, not one per user and commit while agents sync several times a second.

use super::handler::Reply;
use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long an answer is reused: shorter than the dashboard's 5 s refresh of the open connections.
pub const TTL: Duration = Duration::from_secs(4);
/// Bytes of answers (and their keys) kept at most.
pub const MAX_BYTES: usize = 2 << 20;
/// A request waits this long at most for an identical one to finish, then runs itself.
const MAX_WAIT: Duration = Duration::from_secs(30);

enum Entry {
    /// Some thread is computing it.
    Running,
    Done {
        reply: Reply,
        at: Instant,
        /// The commit generation when its computation started.
        generation: u64,
    },
}

#[derive(Default)]
struct Inner {
    entries: HashMap<String, Entry>,
    /// Bytes of the `Done` entries (key and body).
    bytes: usize,
}

/// The cache; shared by the query threads.
pub struct Cache {
    inner: Mutex<Inner>,
    done: Condvar,
    ttl: Duration,
    max_bytes: usize,
    /// The commit generation a computation starting now is sure to include.
    generation: fn() -> u64,
}

fn size(key: &str, reply: &Reply) -> usize {
    key.len() + reply.body.len() + 64
}

/// Takes the `Running` mark away if the computation panicked, so waiters run it themselves.
struct Mark<'a> {
    cache: &'a Cache,
    key: &'a str,
    armed: bool,
}

impl Drop for Mark<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Ok(mut inner) = self.cache.inner.lock() {
                inner.entries.remove(self.key);
            }
            self.cache.done.notify_all();
        }
    }
}

/// Which answers a request accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// The commit generation the request saw on arrival
    /// ([`crate::counters::commit_generation_begun`]): an answer must include at least those commits...
    pub generation: u64,
    /// ... unless it is younger than this: the client's `Cache-Control: max-age=N` (the dashboard's, which
    /// refreshes every few seconds and is told of no write) accepts an answer up to N seconds old.
    pub max_age: Option<Duration>,
}

impl Wanted {
    /// Whether an answer computed from generation `generation`, `age` ago, will do.
    fn accepts(&self, generation: u64, age: Duration) -> bool {
        generation >= self.generation || self.max_age.is_some_and(|m| age < m)
    }
}

impl Cache {
    /// A cache whose answers start at the commit generation `generation()` gives (the writer's:
    /// [`crate::counters::commit_generation`]).
    pub fn new(ttl: Duration, max_bytes: usize, generation: fn() -> u64) -> Cache {
        Cache {
            inner: Mutex::new(Inner::default()),
            done: Condvar::new(),
            ttl,
            max_bytes,
            generation,
        }
    }

    /// The fresh answer for `key` that `wanted` accepts, waiting for a running identical request, or
    /// `run()`'s (kept when it is a `200` small enough). The second value tells whether the answer came from
    /// the cache.
    pub fn get_or_run(
        &self,
        key: &str,
        wanted: Wanted,
        run: impl FnOnce() -> Reply,
    ) -> (Reply, bool) {
        let waited_from = Instant::now();
        let generation;
        {
            let Ok(mut inner) = self.inner.lock() else {
                return (run(), false);
            };
            loop {
                match inner.entries.get(key) {
                    Some(Entry::Done {
                        reply,
                        at,
                        generation,
                    }) if at.elapsed() < self.ttl && wanted.accepts(*generation, at.elapsed()) => {
                        return (reply.clone(), true);
                    }
                    Some(Entry::Running) if waited_from.elapsed() < MAX_WAIT => {
                        let wait = MAX_WAIT.saturating_sub(waited_from.elapsed());
                        inner = match self.done.wait_timeout(inner, wait) {
                            Ok((g, _)) => g,
                            Err(_) => return (run(), false),
                        };
                    }
                    Some(Entry::Running) => return (run(), false),
                    _ => break,
                }
            }
            if let Some(Entry::Done { reply, .. }) = inner.entries.remove(key) {
                inner.bytes -= size(key, &reply);
            }
            // read under the lock, before the computation starts: its snapshot will be at least this new
            generation = (self.generation)();
            inner.entries.insert(key.to_string(), Entry::Running);
        }
        let started = Instant::now();
        let mut mark = Mark {
            cache: self,
            key,
            armed: true,
        };
        let reply = run();
        mark.armed = false;
        if let Ok(mut inner) = self.inner.lock() {
            inner.entries.remove(key);
            let n = size(key, &reply);
            if reply.status == 200 && n <= self.max_bytes / 8 {
                self.make_room(&mut inner, n);
                inner.bytes += n;
                inner.entries.insert(
                    key.to_string(),
                    Entry::Done {
                        reply: reply.clone(),
                        at: started,
                        generation,
                    },
                );
            }
        }
        self.done.notify_all();
        (reply, false)
    }

    /// Drops stale answers, then the oldest, until `n` more bytes fit.
    fn make_room(&self, inner: &mut Inner, n: usize) {
        let ttl = self.ttl;
        let mut freed = 0;
        inner.entries.retain(|k, e| match e {
            Entry::Done { reply, at, .. } if at.elapsed() >= ttl => {
                freed += size(k, reply);
                false
            }
            _ => true,
        });
        inner.bytes -= freed;
        while inner.bytes + n > self.max_bytes {
            let oldest = inner
                .entries
                .iter()
                .filter_map(|(k, e)| match e {
                    Entry::Done { at, .. } => Some((*at, k.clone())),
                    Entry::Running => None,
                })
                .min();
            let Some((_, k)) = oldest else { return };
            if let Some(Entry::Done { reply, .. }) = inner.entries.remove(&k) {
                inner.bytes -= size(&k, &reply);
            }
        }
    }

    /// Bytes held now (tests).
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.inner.lock().map(|i| i.bytes).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;

    /// What a request that arrived at commit generation `generation`, with no `max-age`, accepts.
    fn at_gen(generation: u64) -> Wanted {
        Wanted {
            generation,
            max_age: None,
        }
    }

    fn reply(status: u16, body: &str) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: body.as_bytes().to_vec(),
            headers: Vec::new(),
        }
    }

    #[test]
    fn a_fresh_answer_is_reused_and_a_stale_one_recomputed() {
        let c = Cache::new(Duration::from_millis(200), 1 << 20, || 0);
        let (a, hit) = c.get_or_run("/x?a=1", at_gen(0), || reply(200, "one"));
        assert_eq!((a.text(), hit), ("one", false));
        let (b, hit) = c.get_or_run("/x?a=1", at_gen(0), || reply(200, "two"));
        assert_eq!((b.text(), hit), ("one", true));
        // another key is another question
        assert_eq!(
            c.get_or_run("/x?a=2", at_gen(0), || reply(200, "three"))
                .0
                .text(),
            "three"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while c
            .get_or_run("/x?a=1", at_gen(0), || reply(200, "four"))
            .0
            .text()
            != "four"
        {
            assert!(Instant::now() < deadline, "never went stale");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn errors_and_large_answers_are_not_kept_and_the_bytes_stay_bounded() {
        let c = Cache::new(Duration::from_secs(60), 8 * 1024, || 0);
        c.get_or_run("/e", at_gen(0), || reply(400, "bad"));
        assert_eq!(
            c.get_or_run("/e", at_gen(0), || reply(200, "ok")).0.text(),
            "ok"
        );
        let big = "x".repeat(2000);
        assert!(!c.get_or_run("/big", at_gen(0), || reply(200, &big)).1);
        assert!(
            !c.get_or_run("/big", at_gen(0), || reply(200, &big)).1,
            "kept over max/8"
        );
        for i in 0..100 {
            c.get_or_run(&format!("/k{i}"), at_gen(0), || {
                reply(200, &"y".repeat(500))
            });
            assert!(c.bytes() <= 8 * 1024, "{} bytes", c.bytes());
        }
        // the newest is still there
        assert!(c.get_or_run("/k99", at_gen(0), || reply(200, "z")).1);
    }

    /// One request for `/slow` (arrived at generation 0) held in its computation while `meanwhile()` runs and
    /// gives the generation at which four identical requests then arrive; the answers of the first and of
    /// the four (they compute "again"), and how many computations ran.
    fn one_slow_then_four(
        c: Cache,
        meanwhile: impl FnOnce() -> u64,
    ) -> (String, Vec<String>, usize) {
        let (c, runs) = (Arc::new(c), Arc::new(AtomicUsize::new(0)));
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
        let (go_tx, go_rx) = std::sync::mpsc::sync_channel::<()>(1);
        let first = {
            let (c, runs) = (Arc::clone(&c), Arc::clone(&runs));
            std::thread::spawn(move || {
                c.get_or_run("/slow", at_gen(0), || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    started_tx.send(()).unwrap();
                    go_rx.recv_timeout(Duration::from_secs(10)).unwrap();
                    reply(200, "first")
                })
            })
        };
        started_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        let arrived = meanwhile();
        let others: Vec<_> = (0..4)
            .map(|_| {
                let (c, runs) = (Arc::clone(&c), Arc::clone(&runs));
                std::thread::spawn(move || {
                    c.get_or_run("/slow", at_gen(arrived), || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        reply(200, "again")
                    })
                })
            })
            .collect();
        go_tx.send(()).unwrap();
        let text =
            |h: std::thread::JoinHandle<(Reply, bool)>| h.join().unwrap().0.text().to_string();
        let first = text(first);
        let others = others.into_iter().map(text).collect();
        (first, others, runs.load(Ordering::SeqCst))
    }

    #[test]
    fn identical_requests_wait_for_the_one_running() {
        let c = Cache::new(Duration::from_secs(60), 1 << 20, || 0);
        let (first, others, runs) = one_slow_then_four(c, || 0);
        assert_eq!((first.as_str(), runs), ("first", 1));
        assert_eq!(others, ["first"; 4]);
    }

    #[test]
    fn an_answer_never_predates_a_commit_the_request_saw() {
        static GENERATION: AtomicU64 = AtomicU64::new(0);
        let now = || GENERATION.load(Ordering::SeqCst);
        let c = Cache::new(Duration::from_secs(60), 1 << 20, now);
        assert!(!c.get_or_run("/s", at_gen(now()), || reply(200, "before")).1);
        assert_eq!(
            c.get_or_run("/s", at_gen(now()), || reply(200, "x"))
                .0
                .text(),
            "before"
        );
        // a commit is acknowledged: a request arriving after it needs a new answer
        GENERATION.fetch_add(1, Ordering::SeqCst);
        let (r, hit) = c.get_or_run("/s", at_gen(now()), || reply(200, "after"));
        assert_eq!((r.text(), hit), ("after", false));
        assert_eq!(
            c.get_or_run("/s", at_gen(now()), || reply(200, "x"))
                .0
                .text(),
            "after"
        );
        // one that arrived before the commit may take the newer answer
        assert_eq!(
            c.get_or_run("/s", at_gen(0), || reply(200, "x")).0.text(),
            "after"
        );
    }

    /// `Cache-Control: max-age=N`: an answer younger than N seconds will do, commits or not; an older one
    /// (or none given) must be newer than the commits.
    #[test]
    fn max_age_accepts_a_young_answer_from_before_a_commit() {
        static GENERATION: AtomicU64 = AtomicU64::new(0);
        let now = || GENERATION.load(Ordering::SeqCst);
        let c = Cache::new(Duration::from_secs(60), 1 << 20, now);
        c.get_or_run("/m", at_gen(now()), || reply(200, "before"));
        GENERATION.fetch_add(1, Ordering::SeqCst);
        let polling = |max_age: u64| Wanted {
            generation: now(),
            max_age: Some(Duration::from_secs(max_age)),
        };
        let (r, hit) = c.get_or_run("/m", polling(30), || reply(200, "x"));
        assert_eq!((r.text(), hit), ("before", true));
        let (r, hit) = c.get_or_run("/m", polling(0), || reply(200, "after"));
        assert_eq!((r.text(), hit), ("after", false));
        let (r, hit) = c.get_or_run("/m", at_gen(now()), || reply(200, "x"));
        assert_eq!((r.text(), hit), ("after", true));
    }

    #[test]
    fn identical_requests_after_a_commit_share_one_more_run() {
        static GENERATION: AtomicU64 = AtomicU64::new(0);
        let c = Cache::new(Duration::from_secs(60), 1 << 20, || {
            GENERATION.load(Ordering::SeqCst)
        });
        // a commit while the first runs: the next four may not take its answer, and share one
        let (first, others, runs) = one_slow_then_four(c, || {
            GENERATION.store(1, Ordering::SeqCst);
            1
        });
        assert_eq!((first.as_str(), runs), ("first", 2));
        assert_eq!(others, ["again"; 4]);
    }

    #[test]
    fn a_panicking_computation_lets_the_waiters_run_it() {
        let c = Cache::new(Duration::from_secs(60), 1 << 20, || 0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            c.get_or_run("/p", at_gen(0), || panic!("boom"))
        }));
        assert!(r.is_err());
        assert_eq!(
            c.get_or_run("/p", at_gen(0), || reply(200, "ok")).0.text(),
            "ok"
        );
    }
}
