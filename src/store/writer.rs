//! The writer thread: the only code that writes the database.
//!
//! It receives [`WriteCmd`]s over a bounded channel, coalesces connection diffs in memory (latest totals per
//! connection, byte deltas per connection and minute) and commits them in one transaction every
//! `flush_every` or when `max_pending` changes are waiting, whichever comes first. A full channel blocks the
//! collector: back-pressure instead of unbounded memory. Other work (a master's sync batches, retention, the
//! agent's sync cursor) arrives as [`WriteCmd::Run`] closures, run after pending diffs are committed, so
//! every closure sees all earlier writes. When every sender is gone the writer commits what it holds and
//! returns: nothing received is lost on a clean stop. Every other thread reaches the writer through a
//! [`WriterHandle`]; what a commit does to the rows is [`crate::store::merge`]'s.
//!
//! A database that cannot be written (disk full, I/O errors) is not fatal: the batch stays in memory and is
//! retried with backoff (0.5 s doubling to 30 s), logged once when it starts failing and once when it
//! recovers. What it holds is bounded by [`MAX_HELD_CHANGES`]; beyond that the oldest new connections are
//! dropped (the newest data is kept), logged and counted (`metrics::DROPPED`).

use crate::error::{Error, Result};
use crate::model::{Bytes, Closed, ConnectionDiff, Flow, Metadata, PackedMeta};
use crate::store::merge::{spread_each, End, Merge, Row, Seen};
use rusqlite::{params, Connection};
use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

/// A unit of work for the writer thread.
pub enum WriteCmd {
    /// Changes the collector saw in one snapshot.
    Diff(ConnectionDiff),
    /// Any other write, run on the writer's connection after pending diffs are committed. The closure
    /// reports its own result (typically over a reply channel it captured).
    Run(Box<dyn FnOnce(&mut Connection) + Send>),
    /// Commit everything pending now, then answer.
    Flush(SyncSender<()>),
    /// A write that shares one transaction with the `Grouped` writes queued right behind it (group commit:
    /// several agents' sync batches, one commit). See [`GroupedWrite`].
    Grouped(GroupedWrite),
}

/// At most this many [`WriteCmd::Grouped`] writes share a transaction (their dirty pages stay in memory
/// until the commit).
pub const MAX_GROUP: usize = 4;

/// A write for group commit. `apply` writes inside the shared transaction; `done` is told the outcome once
/// that transaction committed or failed. When the group fails, each of its writes is retried alone in its own
/// transaction (so `apply` may run twice) and told its own outcome: a bad write cannot fail its neighbours,
/// and each write stays all or nothing.
pub struct GroupedWrite {
    pub apply: GroupApply,
    pub done: GroupDone,
}

/// The write of a [`GroupedWrite`], run inside the group's transaction.
pub type GroupApply = Box<dyn Fn(&Connection) -> Result<()> + Send>;
/// Told the outcome of a [`GroupedWrite`] after its transaction.
pub type GroupDone = Box<dyn FnOnce(std::result::Result<(), &Error>) + Send>;

/// The way into the writer thread, for every thread that needs it (collector, sync, retention, the API's
/// ingest, the app's wiring, tests): a clone each. The channel is bounded; every wait here but the
/// collector's ends at a deadline, and the messages name the writer, not the caller (the caller says who it
/// is when it logs).
#[derive(Clone)]
pub struct WriterHandle(SyncSender<WriteCmd>);

impl WriterHandle {
    /// Wraps the sending end of the writer's channel (the receiving end goes to [`Writer::run`]).
    pub fn new(tx: SyncSender<WriteCmd>) -> WriterHandle {
        WriterHandle(tx)
    }

    /// Queues `cmd`, waiting for room until `deadline` (a deadline now or past: one try).
    pub fn send(&self, mut cmd: WriteCmd, deadline: Instant) -> Result<()> {
        loop {
            match self.0.try_send(cmd) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Full(c)) => {
                    if Instant::now() >= deadline {
                        return Err(Error::Timeout("writer: its queue stayed full".into()));
                    }
                    cmd = c;
                    // The writer drains in milliseconds; a short pause keeps this from spinning.
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(TrySendError::Disconnected(_)) => return Err(Error::Stopped("writer")),
            }
        }
    }

    /// Queues `cmd` if there is room now.
    pub fn try_send(&self, cmd: WriteCmd) -> Result<()> {
        self.send(cmd, Instant::now())
    }

    /// Queues `cmd`, waiting for room as long as it takes: the collector's back-pressure (a diff must not be
    /// lost, and the writer, while it lives, always drains). Errors only when the writer is gone.
    pub fn send_blocking(&self, cmd: WriteCmd) -> Result<()> {
        self.0.send(cmd).map_err(|_| Error::Stopped("writer"))
    }

    /// Runs `f` on the writer thread and waits for its result, at most `timeout` in all (waiting for room in
    /// the channel included). Errors when the writer is gone or too slow; `f` may still run later then.
    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> T + Send + 'static,
        timeout: Duration,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let (tx, rx) = sync_channel(1);
        let cmd = WriteCmd::Run(Box::new(move |conn| {
            let _ = tx.send(f(conn));
        }));
        self.send(cmd, deadline)?;
        answer(&rx, deadline, timeout)
    }

    /// Hands `apply` to the writer for group commit ([`GroupedWrite`]) and waits, at most `timeout`, for what
    /// `done` makes of its outcome.
    pub fn call_grouped<T: Send + 'static>(
        &self,
        apply: GroupApply,
        done: impl FnOnce(std::result::Result<(), &Error>) -> T + Send + 'static,
        timeout: Duration,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let (tx, rx) = sync_channel(1);
        let done: GroupDone = Box::new(move |outcome| {
            let _ = tx.send(done(outcome));
        });
        self.send(WriteCmd::Grouped(GroupedWrite { apply, done }), deadline)?;
        answer(&rx, deadline, timeout)
    }

    /// Commits everything the writer holds and waits for it, at most `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let (tx, rx) = sync_channel(1);
        self.send(WriteCmd::Flush(tx), deadline)?;
        answer(&rx, deadline, timeout)
    }
}

/// The writer's answer on `rx`, waited for until `deadline` (`timeout` after the request started).
fn answer<T>(rx: &Receiver<T>, deadline: Instant, timeout: Duration) -> Result<T> {
    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .map_err(|e| match e {
            RecvTimeoutError::Timeout => Error::Timeout(format!(
                "writer: no answer within {:.1} s",
                timeout.as_secs_f64()
            )),
            RecvTimeoutError::Disconnected => Error::Stopped("writer"),
        })
}

/// How the writer batches.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// The agent id written into rows that come from our own collector.
    pub agent_id: String,
    /// Commit at least this often while changes are pending.
    pub flush_every: Duration,
    /// Commit early once this many changes are pending.
    pub max_pending: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            agent_id: "local".into(),
            flush_every: Duration::from_secs(2),
            max_pending: 20_000,
        }
    }
}

/// While the database cannot be written, at most this many changes (new connections, byte updates,
/// per-minute buckets, closes) are held in memory: a new connection takes three, so about 7,000 new
/// connections, 15 minutes of a busy home router. Measured: resident memory grew by 10 MB at the bound
/// (3,000 live connections, 600 new a second; 50,000 took 25 MB). A test can lower it (`max_held_changes`,
/// [`crate::test_hooks`]).
pub const MAX_HELD_CHANGES: usize = 20_000;

const RETRY_MIN: Duration = Duration::from_millis(500);
// a retry replays the whole held batch (up to MAX_HELD_CHANGES): not more often than this on a router
const RETRY_MAX: Duration = Duration::from_secs(30);

/// True when `e` says the database cannot be written for lack of space or an I/O error: worth retrying
/// later, and not the caller's fault.
pub fn is_storage_error(e: &Error) -> bool {
    use rusqlite::ErrorCode as C;
    match e {
        Error::Db(_, rusqlite::Error::SqliteFailure(f, _)) => {
            matches!(f.code, C::DiskFull | C::SystemIoFailure | C::CannotOpen)
        }
        _ => false,
    }
}

/// Diffs received but not yet committed, coalesced.
#[derive(Default)]
struct Pending {
    opened: Vec<(PackedMeta, Bytes, i64)>,
    reopened: Vec<(String, i64)>,
    /// Per connection: one entry (and one copy of its id) however many minutes its bytes spread over.
    flows: HashMap<String, PendingFlow>,
    closed: Vec<Closed>,
    /// Diff entries and traffic buckets waiting: bounds the memory a burst can take (`max_pending`).
    changes: usize,
}

/// A connection's latest totals and the byte deltas not yet written. The deltas are kept as they came
/// (`from_ms`, `to_ms`, bytes) and spread over minutes only at commit, one connection at a time: the first
/// push after a start spreads every connection over up to 60 minutes, and holding those buckets here took
/// 1.5 KB per connection until the commit (and left the allocator fragmented after it).
#[derive(Default)]
struct PendingFlow {
    totals: Bytes,
    at_ms: i64,
    spans: Vec<(i64, i64, Bytes)>,
    /// The last minute counted in [`Pending::changes`].
    counted: Option<i64>,
}

impl Pending {
    fn add(&mut self, diff: ConnectionDiff) {
        let at = diff.at_ms;
        crate::counters::add(&crate::counters::DIFFS, 1);
        crate::counters::add(&crate::counters::OPENED, diff.opened.len());
        crate::counters::add(&crate::counters::REOPENED, diff.reopened.len());
        crate::counters::add(&crate::counters::FLOWS, diff.flows.len());
        crate::counters::add(&crate::counters::CLOSED, diff.closed.len());
        self.changes +=
            diff.opened.len() + diff.reopened.len() + diff.flows.len() + diff.closed.len();
        self.opened.reserve(diff.opened.len());
        for (meta, bytes) in diff.opened {
            self.opened.push((PackedMeta::new(&meta), bytes, at));
        }
        if !diff.reopened.is_empty() && !self.closed.is_empty() {
            // Closed by an earlier diff and back in this one, both before the commit: the commit applies
            // reopens before closes, so the stale close would leave an open connection closed.
            let back: std::collections::HashSet<&str> =
                diff.reopened.iter().map(String::as_str).collect();
            self.closed.retain(|c| !back.contains(c.id.as_str()));
        }
        self.reopened
            .extend(diff.reopened.into_iter().map(|id| (id, at)));
        for Flow {
            id,
            totals,
            delta,
            from_ms,
            to_ms,
        } in diff.flows
        {
            let f = self.flows.entry(id).or_default();
            if delta != Bytes::default() {
                // count the traffic rows this adds: minutes after those already counted (deltas come in
                // time order)
                spread_each(from_ms, to_ms, delta, |minute, _| {
                    if f.counted.map_or(true, |c| minute > c) {
                        f.counted = Some(minute);
                        self.changes += 1;
                    }
                });
                f.spans.push((from_ms, to_ms, delta));
            }
            f.totals.upload = f.totals.upload.max(totals.upload);
            f.totals.download = f.totals.download.max(totals.download);
            f.at_ms = f.at_ms.max(to_ms);
        }
        self.closed.extend(diff.closed);
    }

    fn is_empty(&self) -> bool {
        self.changes == 0
    }

    /// What is really held (`changes` counts every update, even those coalesced into one entry).
    fn held(&self) -> usize {
        self.opened.len()
            + self.reopened.len()
            + self.closed.len()
            + self
                .flows
                .values()
                .map(|f| 1 + f.spans.len())
                .sum::<usize>()
    }
}

/// The database has been refusing writes since `since`.
struct Failing {
    since: Instant,
    retry_at: Instant,
    backoff: Duration,
    /// New connections dropped (over [`MAX_HELD_CHANGES`]) since it started failing.
    dropped: u64,
    /// Times a connection's per-minute buckets were merged into one to save memory.
    merged: u64,
}

/// The writer's state: its connection, the pending batch and a cache of the open connections' rows.
pub struct Writer {
    conn: Connection,
    cfg: WriterConfig,
    pending: Pending,
    live: HashMap<String, Row>,
    next_seq: i64,
    failing: Option<Failing>,
    /// Open connections whose opening was dropped while the database was full: their later changes are
    /// dropped too (instead of warning about an unknown connection each time), until they close.
    dropped_ids: HashSet<String>,
    /// The page cap last set through [`crate::test_hooks`].
    page_cap: Option<i64>,
}

impl Writer {
    /// Wraps an open (migrated) writable connection.
    pub fn new(conn: Connection, cfg: WriterConfig) -> Result<Writer> {
        let max_seq: i64 = conn
            .query_row("SELECT coalesce(max(seq), 0) FROM connections", [], |r| {
                r.get(0)
            })
            .map_err(Error::db("read change counter"))?;
        Ok(Writer {
            conn,
            cfg,
            pending: Pending::default(),
            live: HashMap::new(),
            next_seq: max_seq + 1,
            failing: None,
            dropped_ids: HashSet::new(),
            page_cap: None,
        })
    }

    /// Starts the writer on a thread of its own (`writer`) behind a channel of `queue` commands: the handle
    /// for the other threads, and the thread to join once every handle is dropped.
    pub fn spawn(
        self,
        queue: usize,
    ) -> Result<(WriterHandle, std::thread::JoinHandle<Result<()>>)> {
        let (tx, rx) = sync_channel(queue);
        let thread = std::thread::Builder::new()
            .name("writer".into())
            .spawn(move || self.run(rx))
            .map_err(Error::io("spawn thread writer"))?;
        Ok((WriterHandle::new(tx), thread))
    }

    /// Runs until every sender is gone; commits what it holds before returning.
    pub fn run(mut self, rx: Receiver<WriteCmd>) -> Result<()> {
        let mut deadline: Option<Instant> = None;
        let mut next: Option<WriteCmd> = None;
        loop {
            let cmd = match (next.take(), deadline) {
                (Some(c), _) => Ok(c),
                (None, Some(d)) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
                (None, None) => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            self.apply_test_hooks();
            match cmd {
                Ok(WriteCmd::Grouped(g)) => {
                    self.flush_logged(true);
                    next = self.group_commit(g, &rx);
                    deadline = self.next_deadline();
                }
                Ok(WriteCmd::Diff(mut diff)) => {
                    if !self.dropped_ids.is_empty() {
                        self.forget_dropped(&mut diff);
                    }
                    if !diff.is_empty() {
                        self.pending.add(diff);
                        deadline.get_or_insert_with(|| Instant::now() + self.cfg.flush_every);
                    }
                    if self.pending.changes >= self.cfg.max_pending {
                        self.flush_logged(false);
                        deadline = self.next_deadline();
                    }
                    if self.failing.is_some() {
                        self.bound_held();
                    }
                }
                Ok(WriteCmd::Run(f)) => {
                    self.flush_logged(true);
                    deadline = self.next_deadline();
                    let _generation = crate::counters::ClosureRunning::start();
                    f(&mut self.conn);
                }
                Ok(WriteCmd::Flush(reply)) => {
                    self.flush_logged(true);
                    deadline = self.next_deadline();
                    let _ = reply.send(());
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.flush_logged(false);
                    deadline = self.next_deadline();
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let held = self.pending.held();
                    return self.flush().inspect_err(|e| {
                        crate::error!("writer: stopping with {held} changes that could not be written, now lost: {e}");
                    });
                }
            }
        }
    }

    /// Runs `first` and the [`WriteCmd::Grouped`] writes already queued behind it in one transaction, then
    /// tells each its outcome. Returns the first other command taken from the queue, to run next.
    fn group_commit(&mut self, first: GroupedWrite, rx: &Receiver<WriteCmd>) -> Option<WriteCmd> {
        let mut group = vec![first];
        let mut next = None;
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(WriteCmd::Grouped(g)) => group.push(g),
                Ok(other) => {
                    next = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        let run = |conn: &mut Connection, writes: &[GroupedWrite]| -> Result<()> {
            let tx = conn.transaction().map_err(Error::db("begin group"))?;
            for w in writes {
                (w.apply)(&tx)?;
            }
            tx.commit().map_err(Error::db("commit group"))?;
            crate::counters::committed();
            Ok(())
        };
        match run(&mut self.conn, &group) {
            Ok(()) => group.into_iter().for_each(|w| (w.done)(Ok(()))),
            Err(e) if group.len() == 1 => group.into_iter().for_each(|w| (w.done)(Err(&e))),
            Err(e) => {
                // (a full disk is said once, by whoever handed the writes over: not per group)
                if !is_storage_error(&e) {
                    crate::warn!(
                        "writer: a group of {} writes failed ({e}); retrying them one by one",
                        group.len()
                    );
                }
                for w in group {
                    let outcome = run(&mut self.conn, std::slice::from_ref(&w));
                    (w.done)(outcome.as_ref().map(|_| ()));
                }
            }
        }
        next
    }

    /// When to try the next commit: never with nothing pending, at the retry time while failing.
    fn next_deadline(&self) -> Option<Instant> {
        match (&self.failing, self.pending.is_empty()) {
            (_, true) => None,
            (Some(f), false) => Some(f.retry_at),
            (None, false) => Some(Instant::now() + self.cfg.flush_every),
        }
    }

    /// Commits, logging (not propagating) a failure: the data stays pending and is retried with backoff, so
    /// a full disk loses nothing that fits in memory. Logs once when writes start failing and once when
    /// they work again, never per try. While failing, only `force` tries before the retry time.
    fn flush_logged(&mut self, force: bool) {
        if let Some(f) = &self.failing {
            if !force && Instant::now() < f.retry_at {
                return;
            }
        }
        match self.flush() {
            Ok(()) => {
                if let Some(f) = self.failing.take() {
                    crate::info!(
                        "writer: the database accepts writes again after {:.1} s; what was held in memory is written",
                        f.since.elapsed().as_secs_f64()
                    );
                    if f.dropped > 0 {
                        crate::warn!(
                            "writer: while it could not write, {} new connections were dropped (over {} changes held)",
                            f.dropped,
                            self.held_bound()
                        );
                    }
                    if f.merged > 0 {
                        crate::warn!(
                            "writer: while it could not write, per-minute traffic was merged into the latest minute {} times (over {} changes held)",
                            f.merged,
                            self.held_bound()
                        );
                    }
                }
            }
            Err(e) => {
                let now = Instant::now();
                match &mut self.failing {
                    Some(f) => {
                        f.backoff = (f.backoff * 2).min(RETRY_MAX);
                        f.retry_at = now + f.backoff;
                    }
                    None => {
                        let why = if is_storage_error(&e) {
                            "the disk is full or failing"
                        } else {
                            "unexpected error"
                        };
                        crate::error!(
                            "writer: cannot write the database ({why}): {e}; holding up to {} changes in memory and retrying until it works",
                            self.held_bound()
                        );
                        self.failing = Some(Failing {
                            since: now,
                            retry_at: now + RETRY_MIN,
                            backoff: RETRY_MIN,
                            dropped: 0,
                            merged: 0,
                        });
                    }
                }
            }
        }
    }

    fn held_bound(&self) -> usize {
        crate::test_hooks::get("max_held_changes")
            .map(|n| n.max(0) as usize)
            .unwrap_or(MAX_HELD_CHANGES)
    }

    /// Keeps what is held while failing under the bound: first the per-minute buckets of each connection
    /// are merged into its latest minute (no byte lost, only when they flowed), then the oldest new
    /// connections are dropped with everything pending for them, so the newest data is kept.
    fn bound_held(&mut self) {
        let bound = self.held_bound();
        if self.pending.changes <= bound {
            return;
        }
        self.pending.changes = self.pending.held();
        if self.pending.changes <= bound {
            return;
        }
        let first_time = self
            .failing
            .as_ref()
            .is_some_and(|f| f.dropped + f.merged == 0);
        let (mut merged, mut dropped) = (0u64, 0u64);
        for f in self.pending.flows.values_mut() {
            if f.spans.len() > 1 {
                let sum = f.spans.iter().fold(Bytes::default(), |a, (_, _, b)| Bytes {
                    upload: a.upload + b.upload,
                    download: a.download + b.download,
                });
                // all of it in the minute of the latest instant
                let last = f.spans.iter().map(|s| s.1).max().unwrap_or(0);
                self.pending.changes = self.pending.changes.saturating_sub(f.spans.len() - 1);
                f.spans = vec![(last - 1, last, sum)];
                merged += 1;
            }
        }
        if self.pending.changes > bound {
            let mut cut: HashSet<String> = HashSet::new();
            let mut n = 0;
            while self.pending.changes > bound && n < self.pending.opened.len() {
                let id = self.pending.opened[n].0.id();
                self.pending.changes = self.pending.changes.saturating_sub(1);
                if let Some(f) = self.pending.flows.remove(id) {
                    self.pending.changes = self.pending.changes.saturating_sub(1 + f.spans.len());
                }
                cut.insert(id.to_string());
                n += 1;
            }
            self.pending.opened.drain(..n);
            self.pending.reopened.retain(|(id, _)| !cut.contains(id));
            // those closed already send nothing more; the others' later changes are dropped too
            let mut closed_ids = HashSet::new();
            self.pending.closed.retain(|c| {
                let ours = cut.contains(&c.id);
                if ours {
                    closed_ids.insert(c.id.clone());
                }
                !ours
            });
            self.dropped_ids
                .extend(cut.into_iter().filter(|id| !closed_ids.contains(id)));
            dropped = n as u64;
            crate::counters::add(&crate::counters::DROPPED, n);
            self.pending.changes = self.pending.held();
        }
        if let Some(f) = &mut self.failing {
            f.dropped += dropped;
            f.merged += merged;
        }
        if first_time && dropped + merged > 0 {
            crate::warn!(
                "writer: more than {bound} changes held while the database cannot be written: merging per-minute traffic, then dropping the oldest new connections (counted in mct_writer_dropped_connections_total)"
            );
        }
    }

    /// Drops the changes of connections whose opening was dropped; a close ends the watch on its id.
    fn forget_dropped(&mut self, diff: &mut ConnectionDiff) {
        let ids = &mut self.dropped_ids;
        diff.flows.retain(|f| !ids.contains(&f.id));
        diff.reopened.retain(|id| !ids.contains(id));
        diff.closed.retain(|c| !ids.remove(&c.id));
    }

    /// Debug builds: the database page cap a test asked for (a full disk on demand).
    fn apply_test_hooks(&mut self) {
        let cap = crate::test_hooks::get("max_page_count");
        if cap != self.page_cap {
            // SQLite never lowers the cap below the current size; 4294967294 is its maximum (no cap)
            let n = match cap {
                Some(n) if n > 0 => n,
                _ => 4_294_967_294,
            };
            if let Err(e) = self.conn.pragma_update(None, "max_page_count", n) {
                crate::warn!("writer: cannot set max_page_count {n}: {e}");
            }
            self.page_cap = cap;
        }
    }

    /// Commits everything pending in one transaction. On failure nothing is lost from memory.
    pub fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let seq = self.next_seq;
        let pending = std::mem::take(&mut self.pending);
        let result = Self::apply(
            &mut self.conn,
            &self.cfg.agent_id,
            seq,
            &pending,
            &mut self.live,
        );
        match result {
            Ok(()) => {
                crate::counters::observe_commit(started.elapsed());
                crate::counters::committed();
                self.next_seq += 1;
                for c in &pending.closed {
                    self.live.remove(&c.id);
                }
                crate::trace!(
                    "writer: committed {} changes in {} ms",
                    pending.changes,
                    started.elapsed().as_millis()
                );
                Ok(())
            }
            Err(e) => {
                // the cache may hold values of the rolled-back transaction: read them again next time
                self.live.clear();
                self.pending = pending;
                Err(e)
            }
        }
    }

    /// Writes the pending batch in one transaction (see [`crate::store::merge`] for the rules): new
    /// connections, reopened ones, byte updates (rows in pk order), then closes.
    fn apply(
        conn: &mut Connection,
        agent: &str,
        seq: i64,
        p: &Pending,
        live: &mut HashMap<String, Row>,
    ) -> Result<()> {
        let tx = conn.transaction().map_err(Error::db("begin write"))?;
        let mut merge = Merge::prepare(&tx, Some(seq))?;
        apply_opened(&mut merge, agent, &p.opened, live)?;
        for (id, at) in &p.reopened {
            if let Some(row) = cached(&mut merge, agent, id, live)? {
                let seen = Seen {
                    totals: Bytes::default(),
                    last_updated_ms: *at,
                    end: End::Reopen,
                };
                merge.update(agent, row, &seen)?;
            }
        }
        apply_flows(&mut merge, agent, &p.flows, live)?;
        for c in &p.closed {
            if let Some(row) = cached(&mut merge, agent, &c.id, live)? {
                let seen = Seen {
                    totals: c.totals,
                    last_updated_ms: c.end_ms,
                    end: End::Close(c.end_ms),
                };
                merge.update(agent, row, &seen)?;
            }
        }
        merge.finish()?;
        tx.commit().map_err(Error::db("commit"))
    }
}

/// The row of `agent`'s connection `id`: from the writer's cache, else from the database (and then cached).
fn cached<'l>(
    merge: &mut Merge<'_>,
    agent: &str,
    id: &str,
    live: &'l mut HashMap<String, Row>,
) -> Result<Option<&'l mut Row>> {
    if !live.contains_key(id) {
        match merge.find(agent, id)? {
            Some(row) => live.insert(id.to_string(), row),
            None => return Ok(None),
        };
    }
    Ok(live.get_mut(id))
}

/// New connections: inserted, or reopened when the row is known already (a glitch hid the connection, or it
/// came through another path).
fn apply_opened(
    merge: &mut Merge<'_>,
    agent: &str,
    opened: &[(PackedMeta, Bytes, i64)],
    live: &mut HashMap<String, Row>,
) -> Result<()> {
    for (meta, totals, at) in opened {
        let id = meta.id();
        let reopen = Seen {
            totals: *totals,
            last_updated_ms: *at,
            end: End::Reopen,
        };
        if !live.contains_key(id) {
            let new = Seen {
                // never updated before it started (a clock that went back)
                last_updated_ms: (*at).max(meta.start_ms()),
                ..reopen
            };
            if let Some(pk) = merge.insert(agent, meta, &new)? {
                live.insert(id.to_string(), Row::inserted(pk, meta, &new));
                continue;
            }
        }
        if let Some(row) = cached(merge, agent, id, live)? {
            merge.update(agent, row, &reopen)?;
        }
    }
    Ok(())
}

/// Byte updates: each connection's totals, and its deltas spread over the minutes in which they flowed.
fn apply_flows(
    merge: &mut Merge<'_>,
    agent: &str,
    flows: &HashMap<String, PendingFlow>,
    live: &mut HashMap<String, Row>,
) -> Result<()> {
    // in row order: each page of the table is then changed once in a row, so a small page cache (a
    // router's) spills it once instead of over and over
    let mut flows: Vec<(&String, &PendingFlow)> = flows.iter().collect();
    flows.sort_unstable_by_key(|(id, _)| live.get(*id).map_or(i64::MAX, |l| l.pk));
    let mut buckets: Vec<(i64, Bytes)> = Vec::new();
    for (id, f) in flows {
        let Some(row) = cached(merge, agent, id, live)? else {
            crate::warn!("writer: traffic for unknown connection {id} ignored");
            continue;
        };
        let seen = Seen {
            totals: f.totals,
            last_updated_ms: f.at_ms,
            end: End::Keep,
        };
        merge.update(agent, row, &seen)?;
        buckets.clear();
        for &(from_ms, to_ms, delta) in &f.spans {
            spread_each(from_ms, to_ms, delta, |minute, share| {
                // a connection's pending minutes are few (one or two while tracking live)
                match buckets.iter_mut().find(|(m, _)| *m == minute) {
                    Some((_, b)) => {
                        b.upload += share.upload;
                        b.download += share.download;
                    }
                    None => buckets.push((minute, share)),
                }
            });
        }
        // each minute once per commit: a row inserted by this one has none of them yet
        let fresh = merge.inserted_here(row.pk);
        for &(minute, b) in &buckets {
            merge.add_traffic(agent, row.pk, minute, b, fresh)?;
        }
    }
    Ok(())
}

/// Loads the connections of `agent_id` that the database still has open, for the collector to resume.
pub fn load_open(conn: &Connection, agent_id: &str) -> Result<Vec<crate::model::OpenRow>> {
    let mut stmt = conn
        .prepare("SELECT id, upload, download, last_updated_ms FROM connections WHERE agent_id = ?1 AND end_ms IS NULL")
        .map_err(Error::db("prepare open connections"))?;
    let rows = stmt
        .query_map(params![agent_id], |r| {
            Ok(crate::model::OpenRow {
                id: r.get(0)?,
                totals: Bytes {
                    upload: r.get::<_, i64>(1)?.max(0) as u64,
                    download: r.get::<_, i64>(2)?.max(0) as u64,
                },
                last_updated_ms: r.get(3)?,
            })
        })
        .map_err(Error::db("load open connections"))?;
    rows.collect::<std::result::Result<Vec<_>, _>>()
        .map_err(Error::db("load open connections"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ConnMeta;

    fn b(upload: u64, download: u64) -> Bytes {
        Bytes { upload, download }
    }

    #[test]
    fn closed_then_reopened_before_a_commit_stays_open() {
        let dir = std::env::temp_dir().join(format!("mct-writer-reopen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        let w = Writer::new(
            crate::store::open(&path, crate::store::Access::Write).unwrap(),
            WriterConfig::default(),
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel(4);
        let h = std::thread::spawn(move || w.run(rx));
        let meta = ConnMeta {
            id: "a".into(),
            start_ms: 1_000,
            ..ConnMeta::default()
        };
        let flow = |at: i64, totals: Bytes, delta: Bytes| Flow {
            id: "a".into(),
            totals,
            delta,
            from_ms: at - 1_000,
            to_ms: at,
        };
        // all three in one commit window (2 s): opened, closed by an empty push, back in the next one
        let diffs = [
            ConnectionDiff {
                at_ms: 2_000,
                opened: vec![(meta, b(1, 10))],
                flows: vec![flow(2_000, b(1, 10), b(1, 10))],
                ..ConnectionDiff::default()
            },
            ConnectionDiff {
                at_ms: 3_000,
                closed: vec![Closed {
                    id: "a".into(),
                    end_ms: 3_000,
                    totals: b(1, 10),
                }],
                ..ConnectionDiff::default()
            },
            ConnectionDiff {
                at_ms: 4_000,
                reopened: vec!["a".into()],
                flows: vec![flow(4_000, b(2, 20), b(1, 10))],
                ..ConnectionDiff::default()
            },
        ];
        for d in diffs {
            tx.send(WriteCmd::Diff(d)).unwrap();
        }
        drop(tx);
        h.join().unwrap().unwrap();
        let c = Connection::open(&path).unwrap();
        let row: (Option<i64>, i64, i64) = c
            .query_row(
                "SELECT end_ms, upload, download FROM connections WHERE id = 'a'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(row, (None, 2, 20));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Group commit: three sync-like writes queued together share a transaction; when one fails, the others
    /// are still stored (retried alone) and the failed one stored nothing.
    #[test]
    fn a_failed_write_in_a_group_fails_alone() {
        let dir = std::env::temp_dir().join(format!("mct-writer-group-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.db");
        let writer = Writer::new(
            crate::store::open(&path, crate::store::Access::Write).unwrap(),
            WriterConfig::default(),
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel(8);
        let (otx, orx) = std::sync::mpsc::channel();
        for i in 0..3 {
            let otx = otx.clone();
            tx.send(WriteCmd::Grouped(GroupedWrite {
                apply: Box::new(move |c| {
                    c.execute(
                        "INSERT INTO meta (key, value) VALUES (?1, 'x')",
                        params![format!("k{i}")],
                    )
                    .map_err(Error::db("insert"))?;
                    if i == 1 {
                        return Err(Error::Schema("write 1 fails".into()));
                    }
                    Ok(())
                }),
                done: Box::new(move |r| otx.send((i, r.map_err(|e| e.to_string()))).unwrap()),
            }))
            .unwrap();
        }
        drop(tx);
        writer.run(rx).unwrap();
        let mut outcomes: Vec<_> = orx.try_iter().collect();
        outcomes.sort_by_key(|o| o.0);
        assert_eq!(
            outcomes,
            vec![
                (0, Ok(())),
                (1, Err("database: write 1 fails".to_string())),
                (2, Ok(()))
            ]
        );
        let c = Connection::open(&path).unwrap();
        let keys: Vec<String> = c
            .prepare("SELECT key FROM meta WHERE key LIKE 'k%' ORDER BY key")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(keys, ["k0", "k2"]);
    }
}
