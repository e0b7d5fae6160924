//! The writer thread: the only code that writes the database.
//!
//! It receives [`WriteCmd`]s over a bounded channel, coalesces connection diffs in memory (latest totals per
//! connection, byte deltas per connection and minute) and commits them in one transaction every
//! `flush_every` or when `max_pending` changes are waiting, whichever comes first. A full channel blocks the
//! collector: back-pressure instead of unbounded memory. Other work (a master's sync batches, retention, the
//! agent's sync cursor) arrives as [`WriteCmd::Run`] closures, run after pending diffs are committed, so
//! every closure sees all earlier writes. When every sender is gone the writer commits what it holds and
//! returns: nothing received is lost on a clean stop.
//!
//! A database that cannot be written (disk full, I/O errors) is not fatal: the batch stays in memory and is
//! retried with backoff (0.5 s doubling to 30 s), logged once when it starts failing and once when it
//! recovers. What it holds is bounded by [`MAX_HELD_CHANGES`]; beyond that the oldest new connections are
//! dropped (the newest data is kept), logged and counted (`metrics::DROPPED`).

use crate::error::{Error, Result};
use crate::model::{placeholders, Bytes, Closed, ConnMeta, ConnectionDiff, Flow};
use crate::store::rollup::{host_key, RollupDelta};
use crate::timefmt::{DAY_MS, MINUTE_MS};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::{HashMap, HashSet};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
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

/// Bytes that moved are spread over at most this span; older bytes land in its first minute.
pub const MAX_SPREAD_MS: i64 = DAY_MS;

/// At most this many buckets per spread: a long gap is cut into chunks of whole minutes, each chunk's share
/// stored in its first minute. A tracker starting next to 2,500 day-old connections writes 150,000 rows, not
/// 3.6 million.
pub const MAX_SPREAD_BUCKETS: i64 = 60;

/// Splits `delta` over the minutes of `[from_ms, to_ms]` in proportion to the time spent in each (in chunks
/// of several minutes when the span is longer than [`MAX_SPREAD_BUCKETS`] minutes), with exact integer sums.
/// An empty or backwards span puts everything in the minute of `to_ms`.
pub fn spread(from_ms: i64, to_ms: i64, delta: Bytes) -> Vec<(i64, Bytes)> {
    let mut out = Vec::new();
    spread_each(from_ms, to_ms, delta, |minute, share| {
        out.push((minute, share))
    });
    out
}

/// [`spread`], handing each `(minute, share)` to `f` instead of collecting them.
fn spread_each(from_ms: i64, to_ms: i64, delta: Bytes, mut f: impl FnMut(i64, Bytes)) {
    let from_ms = from_ms.max(to_ms - MAX_SPREAD_MS);
    if to_ms <= from_ms {
        return f(to_ms.div_euclid(MINUTE_MS), delta);
    }
    let first = from_ms.div_euclid(MINUTE_MS);
    // the minute holding the span's last instant (`to_ms` itself is excluded)
    let last = (to_ms - 1).div_euclid(MINUTE_MS);
    if first == last {
        return f(last, delta);
    }
    let minutes = last - first + 1;
    let step = (minutes + MAX_SPREAD_BUCKETS - 1) / MAX_SPREAD_BUCKETS;
    let span = (to_ms - from_ms) as u128;
    let (mut done_up, mut done_down) = (0u64, 0u64);
    let mut minute = first;
    while minute <= last {
        let end = ((minute + step) * MINUTE_MS).min(to_ms);
        let elapsed = (end - from_ms) as u128;
        let up = (delta.upload as u128 * elapsed / span) as u64;
        let down = (delta.download as u128 * elapsed / span) as u64;
        let share = Bytes {
            upload: up - done_up,
            download: down - done_down,
        };
        (done_up, done_down) = (up, down);
        if share != Bytes::default() {
            f(minute, share);
        }
        minute += step;
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

/// A new connection waiting in the pending batch, packed into one allocation: its id, `start_ms` and rollup
/// key, then the values of [`ConnMeta::SQL_COLUMNS`] (`u32` length + text, or a tag and 8 bytes). A start
/// next to 2,500 connections holds them all until the first commit, and that commit is the largest: about
/// 4 MB as `ConnMeta`s (33 strings each), a third of that packed.
struct PackedMeta(Box<[u8]>);

/// How [`PackedMeta`] tags a value.
const PACKED_TEXT: u8 = 0;
const PACKED_INT: u8 = 1;
const PACKED_REAL: u8 = 2;
const PACKED_NULL: u8 = 3;
const PACKED_BLOB: u8 = 4;

impl PackedMeta {
    fn new(m: &ConnMeta) -> PackedMeta {
        use rusqlite::types::{ToSqlOutput, Value, ValueRef};
        let mut out = Vec::with_capacity(512);
        // (a value longer than 4 GiB cannot come in: frames and request bodies are limited far below)
        let text = |out: &mut Vec<u8>, t: &[u8]| {
            out.extend_from_slice(&(t.len() as u32).to_le_bytes());
            out.extend_from_slice(t);
        };
        text(&mut out, m.id.as_bytes());
        out.extend_from_slice(&m.start_ms.to_le_bytes());
        text(&mut out, host_key(&m.host, &m.destination_ip).as_bytes());
        for v in m.view().sql_values() {
            let v = v.to_sql().unwrap_or(ToSqlOutput::Owned(Value::Null));
            let v = match &v {
                ToSqlOutput::Borrowed(v) => *v,
                ToSqlOutput::Owned(v) => ValueRef::from(v),
                // not produced by ConnMeta's fields (strings and integers)
                _ => ValueRef::Null,
            };
            match v {
                ValueRef::Text(t) => {
                    out.push(PACKED_TEXT);
                    text(&mut out, t);
                }
                ValueRef::Blob(t) => {
                    out.push(PACKED_BLOB);
                    text(&mut out, t);
                }
                ValueRef::Integer(i) => {
                    out.push(PACKED_INT);
                    out.extend_from_slice(&i.to_le_bytes());
                }
                ValueRef::Real(f) => {
                    out.push(PACKED_REAL);
                    out.extend_from_slice(&f.to_le_bytes());
                }
                ValueRef::Null => out.push(PACKED_NULL),
            }
        }
        PackedMeta(out.into_boxed_slice())
    }

    /// The text at `at` and where the next field starts.
    fn text_at(&self, at: usize) -> (&[u8], usize) {
        let len = u32::from_le_bytes(self.0[at..at + 4].try_into().unwrap_or_default()) as usize;
        (&self.0[at + 4..at + 4 + len], at + 4 + len)
    }

    fn id(&self) -> &str {
        std::str::from_utf8(self.text_at(0).0).unwrap_or_default()
    }

    fn start_ms(&self) -> i64 {
        let at = self.text_at(0).1;
        i64::from_le_bytes(self.0[at..at + 8].try_into().unwrap_or_default())
    }

    fn host_key(&self) -> &str {
        let at = self.text_at(0).1 + 8;
        std::str::from_utf8(self.text_at(at).0).unwrap_or_default()
    }

    /// The id and the values to bind, in [`ConnMeta::SQL_COLUMNS`] order (borrowed: nothing is copied).
    fn unpack(&self) -> (&str, Vec<rusqlite::types::ToSqlOutput<'_>>) {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        let mut at = self.text_at(self.text_at(0).1 + 8).1;
        let mut values = Vec::with_capacity(32);
        while at < self.0.len() {
            let tag = self.0[at];
            at += 1;
            let v = match tag {
                PACKED_TEXT | PACKED_BLOB => {
                    let (t, next) = self.text_at(at);
                    at = next;
                    if tag == PACKED_TEXT {
                        ValueRef::Text(t)
                    } else {
                        ValueRef::Blob(t)
                    }
                }
                PACKED_INT | PACKED_REAL => {
                    let b: [u8; 8] = self.0[at..at + 8].try_into().unwrap_or_default();
                    at += 8;
                    if tag == PACKED_INT {
                        ValueRef::Integer(i64::from_le_bytes(b))
                    } else {
                        ValueRef::Real(f64::from_le_bytes(b))
                    }
                }
                _ => ValueRef::Null,
            };
            values.push(ToSqlOutput::Borrowed(v));
        }
        (self.id(), values)
    }
}

/// What the writer remembers of a connection it writes to: its row key, what the rollups group it by,
/// and the totals stored in its row (so rollup deltas need no read).
#[derive(Clone, Debug)]
struct Live {
    pk: i64,
    start_ms: i64,
    host_key: Box<str>,
    upload: i64,
    download: i64,
}

/// The writer's state: its connection, the pending batch and a cache of the open connections' rows.
pub struct Writer {
    conn: Connection,
    cfg: WriterConfig,
    pending: Pending,
    live: HashMap<String, Live>,
    next_seq: i64,
    failing: Option<Failing>,
    /// Open connections whose opening was dropped while the database was full: their later changes are
    /// dropped too (instead of warning about an unknown connection each time), until they close.
    dropped_ids: HashSet<String>,
    /// The page cap last set through [`crate::test_hooks`].
    page_cap: Option<i64>,
}

fn clamp(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
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

    fn apply(
        conn: &mut Connection,
        agent: &str,
        seq: i64,
        p: &Pending,
        live: &mut HashMap<String, Live>,
    ) -> Result<()> {
        let tx = conn.transaction().map_err(Error::db("begin write"))?;
        let mut rollup = RollupDelta::default();
        {
            let mut lookup = tx
                .prepare(
                    "SELECT pk, start_ms, host, destination_ip, upload, download FROM connections
                     WHERE agent_id = ?1 AND id = ?2",
                )
                .map_err(Error::db("prepare lookup"))?;
            let mut find = |id: &str, live: &mut HashMap<String, Live>| -> Result<Option<Live>> {
                if let Some(l) = live.get(id) {
                    return Ok(Some(l.clone()));
                }
                let found = lookup
                    .query_row(params![agent, id], |r| {
                        Ok(Live {
                            pk: r.get(0)?,
                            start_ms: r.get(1)?,
                            host_key: host_key(&r.get::<_, String>(2)?, &r.get::<_, String>(3)?)
                                .into(),
                            upload: r.get(4)?,
                            download: r.get(5)?,
                        })
                    })
                    .optional()
                    .map_err(Error::db("look up connection"))?;
                if let Some(l) = &found {
                    live.insert(id.to_string(), l.clone());
                }
                Ok(found)
            };
            // Raises the stored totals to at least `up`/`down`; returns the row and the rollup delta.
            let raise = |l: &mut Live, up: i64, down: i64, rollup: &mut RollupDelta| {
                let (nu, nd) = (l.upload.max(up), l.download.max(down));
                rollup.conn(
                    agent,
                    l.start_ms,
                    &l.host_key,
                    0,
                    nu - l.upload,
                    nd - l.download,
                );
                (l.upload, l.download) = (nu, nd);
            };

            let mut insert = tx
                .prepare(&format!(
                    "INSERT INTO connections (agent_id, id, end_ms, last_updated_ms, upload, download, seq, {})
                     VALUES ({})",
                    ConnMeta::SQL_COLUMNS,
                    placeholders(7 + ConnMeta::SQL_COLUMNS.split(',').count())
                ))
                .map_err(Error::db("prepare insert"))?;
            let mut reopen = tx
                .prepare(
                    "UPDATE connections SET end_ms = NULL, upload = max(upload, ?2), download = max(download, ?3),
                        last_updated_ms = max(last_updated_ms, ?4), seq = ?5 WHERE pk = ?1",
                )
                .map_err(Error::db("prepare reopen"))?;
            for (m, b, at) in &p.opened {
                let (id, values) = m.unpack();
                let (up, down) = (clamp(b.upload), clamp(b.download));
                if let Some(mut l) = find(id, live)? {
                    // known already (a glitch hid it, or it came through another path): reopen the same row
                    raise(&mut l, up, down, &mut rollup);
                    reopen
                        .execute(params![l.pk, l.upload, l.download, at, seq])
                        .map_err(Error::db("reopen connection"))?;
                    live.insert(id.to_string(), l);
                    continue;
                }
                // never updated before it started (a clock that went back)
                let at = (*at).max(m.start_ms());
                let head: [&dyn rusqlite::ToSql; 7] =
                    [&agent, &id, &rusqlite::types::Null, &at, &up, &down, &seq];
                // the new rowid, not `RETURNING pk`: that builds a temporary table per row (with musl, an
                // mmap/munmap pair each), which cost more than the insert
                insert
                    .execute(rusqlite::params_from_iter(
                        head.into_iter()
                            .chain(values.iter().map(|v| v as &dyn rusqlite::ToSql)),
                    ))
                    .map_err(|e| Error::Db(format!("insert connection {id}"), e))?;
                let pk = tx.last_insert_rowid();
                let key = m.host_key();
                rollup.conn(agent, m.start_ms(), key, 1, up, down);
                live.insert(
                    id.to_string(),
                    Live {
                        pk,
                        start_ms: m.start_ms(),
                        host_key: key.into(),
                        upload: up,
                        download: down,
                    },
                );
            }

            let mut reopen_only = tx
                .prepare("UPDATE connections SET end_ms = NULL, last_updated_ms = max(last_updated_ms, ?2), seq = ?3 WHERE pk = ?1")
                .map_err(Error::db("prepare reopen"))?;
            for (id, at) in &p.reopened {
                if let Some(l) = find(id, live)? {
                    reopen_only
                        .execute(params![l.pk, at, seq])
                        .map_err(Error::db("reopen connection"))?;
                }
            }

            let mut totals = tx
                .prepare(
                    "UPDATE connections SET upload = max(upload, ?2), download = max(download, ?3), last_updated_ms = max(last_updated_ms, ?4),
                        seq = ?5 WHERE pk = ?1",
                )
                .map_err(Error::db("prepare totals"))?;
            let mut bucket = tx
                .prepare(
                    "INSERT INTO traffic (conn, minute, upload, download, seq) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (conn, minute) DO UPDATE SET upload = upload + excluded.upload,
                        download = download + excluded.download, seq = excluded.seq",
                )
                .map_err(Error::db("prepare traffic"))?;
            let mut buckets: Vec<(i64, Bytes)> = Vec::new();
            // in row order: each page of the table is then changed once in a row, so a small page cache
            // (a router's) spills it once instead of over and over
            let mut flows: Vec<(&String, &PendingFlow)> = p.flows.iter().collect();
            flows.sort_unstable_by_key(|(id, _)| live.get(*id).map_or(i64::MAX, |l| l.pk));
            for (id, f) in flows {
                let Some(mut l) = find(id, live)? else {
                    crate::warn!("writer: traffic for unknown connection {id} ignored");
                    continue;
                };
                raise(
                    &mut l,
                    clamp(f.totals.upload),
                    clamp(f.totals.download),
                    &mut rollup,
                );
                totals
                    .execute(params![l.pk, l.upload, l.download, f.at_ms, seq])
                    .map_err(Error::db("update totals"))?;
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
                for (minute, b) in &buckets {
                    let (up, down) = (clamp(b.upload), clamp(b.download));
                    bucket
                        .execute(params![l.pk, minute, up, down, seq])
                        .map_err(Error::db("write traffic"))?;
                    rollup.traffic(agent, *minute, up, down);
                }
                live.insert(id.clone(), l);
            }

            let mut close = tx
                .prepare(
                    "UPDATE connections SET end_ms = ?2, upload = max(upload, ?3), download = max(download, ?4),
                        last_updated_ms = max(last_updated_ms, ?2), seq = ?5 WHERE pk = ?1",
                )
                .map_err(Error::db("prepare close"))?;
            for c in &p.closed {
                if let Some(mut l) = find(&c.id, live)? {
                    raise(
                        &mut l,
                        clamp(c.totals.upload),
                        clamp(c.totals.download),
                        &mut rollup,
                    );
                    close
                        .execute(params![l.pk, c.end_ms, l.upload, l.download, seq])
                        .map_err(Error::db("close connection"))?;
                    live.insert(c.id.clone(), l);
                }
            }
        }
        rollup.apply(&tx)?;
        tx.commit().map_err(Error::db("commit"))
    }
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

    fn b(upload: u64, download: u64) -> Bytes {
        Bytes { upload, download }
    }

    #[test]
    fn packed_meta_gives_back_every_value() {
        use rusqlite::types::{ToSqlOutput, Value};
        let owned = |v: &ToSqlOutput<'_>| match v {
            ToSqlOutput::Borrowed(v) => Value::try_from(*v).unwrap(),
            ToSqlOutput::Owned(v) => v.clone(),
            _ => Value::Null,
        };
        let full = ConnMeta {
            id: "c-1".into(),
            start_ms: -5,
            network: "tcp".into(),
            source_ip: "10.0.0.2".into(),
            destination_ip: "203.0.113.9".into(),
            host: "example.org".into(),
            uid: i64::MAX,
            dscp: 46,
            chains: r#"["a","é"]"#.into(),
            rule_payload: "x".repeat(300),
            ..ConnMeta::default()
        };
        let no_host = ConnMeta {
            host: String::new(),
            ..full.clone()
        };
        for (m, key) in [(&full, "example.org"), (&no_host, "203.0.113.9")] {
            let p = PackedMeta::new(m);
            let (id, values) = p.unpack();
            assert_eq!((id, p.start_ms(), p.host_key()), ("c-1", -5, key));
            let want: Vec<Value> = m
                .view()
                .sql_values()
                .iter()
                .map(|v| owned(&v.to_sql().unwrap()))
                .collect();
            let got: Vec<Value> = values.iter().map(owned).collect();
            assert_eq!(got, want);
            assert_eq!(got.len(), ConnMeta::SQL_COLUMNS.split(',').count());
        }
    }

    #[test]
    fn spread_keeps_sums_and_shape() {
        // three hours, 1,800,000 bytes down: 10,000 per minute
        // one hour, 600,000 bytes down: 10,000 per minute
        let parts = spread(0, 3_600_000, b(0, 600_000));
        assert_eq!(parts.len(), 60);
        assert!(parts.iter().all(|(_, x)| x.download == 10_000));
        // three hours: 60 chunks of 3 minutes, 30,000 each, at each chunk's first minute
        let parts = spread(0, 3 * 3_600_000, b(0, 1_800_000));
        let sum: u64 = parts.iter().map(|(_, x)| x.download).sum();
        assert_eq!(sum, 1_800_000);
        assert_eq!(parts.len(), 60);
        assert!(
            parts
                .iter()
                .all(|(m, x)| x.download == 30_000 && m % 3 == 0),
            "{parts:?}"
        );
        // a day-old connection first seen: still at most 60 rows
        assert!(spread(0, 86_400_000, b(1, 1)).len() <= 60);
        // odd numbers still sum exactly
        let parts = spread(1_234, 500_001, b(7, 1_000_003));
        assert_eq!(parts.iter().map(|(_, x)| x.upload).sum::<u64>(), 7);
        assert_eq!(
            parts.iter().map(|(_, x)| x.download).sum::<u64>(),
            1_000_003
        );
        // backwards clock: one bucket at the end
        assert_eq!(spread(600_000, 0, b(1, 2)), vec![(0, b(1, 2))]);
        // within one minute
        assert_eq!(spread(60_001, 119_999, b(1, 2)), vec![(1, b(1, 2))]);
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
