//! The writer thread: the only code that writes the database.
//!
//! It receives [`WriteCmd`]s over a bounded channel, coalesces connection diffs in memory (latest totals per
//! connection, byte deltas per connection and minute) and commits them in one transaction every
//! `flush_every` or when `max_pending` changes are waiting, whichever comes first. A full channel blocks the
//! collector: back-pressure instead of unbounded memory. Other work (a master's sync batches, retention, the
//! agent's sync cursor) arrives as [`WriteCmd::Run`] closures, run after pending diffs are committed, so
//! every closure sees all earlier writes. When every sender is gone the writer commits what it holds and
//! returns: nothing received is lost on a clean stop.

use crate::error::{Error, Result};
use crate::model::{placeholders, Bytes, Closed, ConnMeta, ConnectionDiff, Flow};
use crate::store::rollup::{host_key, RollupDelta};
use crate::timefmt::{DAY_MS, MINUTE_MS};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::HashMap;
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
    let from_ms = from_ms.max(to_ms - MAX_SPREAD_MS);
    if to_ms <= from_ms {
        return vec![(to_ms.div_euclid(MINUTE_MS), delta)];
    }
    let first = from_ms.div_euclid(MINUTE_MS);
    // the minute holding the span's last instant (`to_ms` itself is excluded)
    let last = (to_ms - 1).div_euclid(MINUTE_MS);
    if first == last {
        return vec![(last, delta)];
    }
    let minutes = last - first + 1;
    let step = (minutes + MAX_SPREAD_BUCKETS - 1) / MAX_SPREAD_BUCKETS;
    let span = (to_ms - from_ms) as u128;
    let mut out = Vec::with_capacity((minutes / step + 1) as usize);
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
            out.push((minute, share));
        }
        minute += step;
    }
    out
}

/// Diffs received but not yet committed, coalesced.
#[derive(Default)]
struct Pending {
    opened: Vec<(ConnMeta, Bytes, i64)>,
    reopened: Vec<(String, i64)>,
    /// Per connection: one entry (and one copy of its id) however many minutes its bytes spread over.
    flows: HashMap<String, PendingFlow>,
    closed: Vec<Closed>,
    /// Diff entries and traffic buckets waiting: bounds the memory a burst can take (`max_pending`).
    changes: usize,
}

/// A connection's latest totals and the bytes per minute not yet written.
#[derive(Default)]
struct PendingFlow {
    totals: Bytes,
    at_ms: i64,
    buckets: Vec<(i64, Bytes)>,
}

impl Pending {
    fn add(&mut self, diff: ConnectionDiff) {
        let at = diff.at_ms;
        crate::metrics::add(&crate::metrics::DIFFS, 1);
        crate::metrics::add(&crate::metrics::OPENED, diff.opened.len());
        crate::metrics::add(&crate::metrics::REOPENED, diff.reopened.len());
        crate::metrics::add(&crate::metrics::FLOWS, diff.flows.len());
        crate::metrics::add(&crate::metrics::CLOSED, diff.closed.len());
        self.changes +=
            diff.opened.len() + diff.reopened.len() + diff.flows.len() + diff.closed.len();
        for (meta, bytes) in diff.opened {
            self.opened.push((meta, bytes, at));
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
                for (minute, share) in spread(from_ms, to_ms, delta) {
                    // a connection's pending minutes are few (one or two while tracking live): a scan is cheap
                    match f.buckets.iter_mut().find(|(m, _)| *m == minute) {
                        Some((_, b)) => {
                            b.upload += share.upload;
                            b.download += share.download;
                        }
                        None => {
                            f.buckets.push((minute, share));
                            self.changes += 1;
                        }
                    }
                }
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
            match cmd {
                Ok(WriteCmd::Grouped(g)) => {
                    self.flush_logged();
                    deadline = None;
                    next = self.group_commit(g, &rx);
                }
                Ok(WriteCmd::Diff(diff)) => {
                    if !diff.is_empty() {
                        self.pending.add(diff);
                        deadline.get_or_insert_with(|| Instant::now() + self.cfg.flush_every);
                    }
                    if self.pending.changes >= self.cfg.max_pending {
                        self.flush_logged();
                        deadline = None;
                    }
                }
                Ok(WriteCmd::Run(f)) => {
                    self.flush_logged();
                    deadline = None;
                    f(&mut self.conn);
                }
                Ok(WriteCmd::Flush(reply)) => {
                    self.flush_logged();
                    deadline = None;
                    let _ = reply.send(());
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.flush_logged();
                    deadline = None;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return self.flush();
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
            tx.commit().map_err(Error::db("commit group"))
        };
        match run(&mut self.conn, &group) {
            Ok(()) => group.into_iter().for_each(|w| (w.done)(Ok(()))),
            Err(e) if group.len() == 1 => group.into_iter().for_each(|w| (w.done)(Err(&e))),
            Err(e) => {
                crate::warn!(
                    "writer: a group of {} writes failed ({e}); retrying them one by one",
                    group.len()
                );
                for w in group {
                    let outcome = run(&mut self.conn, std::slice::from_ref(&w));
                    (w.done)(outcome.as_ref().map(|_| ()));
                }
            }
        }
        next
    }

    /// Commits, logging (not propagating) a failure: the data stays pending and is retried at the next
    /// flush, so a full disk loses nothing that fits in memory.
    fn flush_logged(&mut self) {
        if let Err(e) = self.flush() {
            crate::error!(
                "writer: {e}; {} changes kept in memory, retrying",
                self.pending.changes
            );
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
                crate::metrics::observe_commit(started.elapsed());
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
                     VALUES ({}) RETURNING pk",
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
                let (up, down) = (clamp(b.upload), clamp(b.download));
                if let Some(mut l) = find(&m.id, live)? {
                    // known already (a glitch hid it, or it came through another path): reopen the same row
                    raise(&mut l, up, down, &mut rollup);
                    reopen
                        .execute(params![l.pk, l.upload, l.download, at, seq])
                        .map_err(Error::db("reopen connection"))?;
                    live.insert(m.id.clone(), l);
                    continue;
                }
                let head: [&dyn rusqlite::ToSql; 7] =
                    [&agent, &m.id, &rusqlite::types::Null, at, &up, &down, &seq];
                let pk: i64 = insert
                    .query_row(
                        rusqlite::params_from_iter(head.into_iter().chain(m.sql_values())),
                        |r| r.get(0),
                    )
                    .map_err(|e| Error::Db(format!("insert connection {}", m.id), e))?;
                let key = host_key(&m.host, &m.destination_ip);
                rollup.conn(agent, m.start_ms, key, 1, up, down);
                live.insert(
                    m.id.clone(),
                    Live {
                        pk,
                        start_ms: m.start_ms,
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
            for (id, f) in &p.flows {
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
                for (minute, b) in &f.buckets {
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
