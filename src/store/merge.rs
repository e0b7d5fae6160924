//! Merging connection rows and their traffic into the database: the one place that does it, for the writer's
//! commit of tracked diffs ([`crate::store::writer`]) and for a master's sync batches ([`merge_batch`]).
//! A [`Merge`] holds the statements, prepared once per transaction, and the rollup deltas of what it changed
//! ([`crate::store::rollup`]), applied by [`Merge::finish`] in the same transaction.
//!
//! # The rules
//! - A row is keyed by `(agent_id, id)`. Its metadata is written once, by the insert; a row that exists keeps
//!   the metadata of its first insert.
//! - Totals and `last_updated` only grow: a change raises them to at least what it saw ([`Merge::update`]),
//!   and the rollups get the increase.
//! - `end` ([`End`]): the collector is the authority on its own connections, so tracking sets it on a close
//!   and clears it on a reopen; a sync record's end merges (a non-null value wins over null, the later of two
//!   wins), so that re-sending a batch changes nothing.
//! - Traffic: tracking spreads each byte delta over the minutes in which it flowed ([`spread`]) and adds the
//!   shares to the buckets ([`Merge::add_traffic`]). A sync record's buckets merge with `max()` (a bucket only
//!   grows on the agent: [`Merge::max_traffic`]); a record without buckets (the earlier tool's agents) gets
//!   buckets derived here, the increase of the totals over what is stored spread over `[stored last_updated,
//!   new last_updated]` (from `start` for a new row), and added; a replay increases nothing, so it adds
//!   nothing.
//! - The writer's commits stamp every row and bucket they change with the commit's `seq` (the agent's sync
//!   cursor); a master's sync batches leave `seq` as it is.
//!
//! # Why these statements
//! Plain statements and no `ON CONFLICT ... DO UPDATE` or `RETURNING` (which would say the same in fewer
//! lines): SQLite runs a `RETURNING` clause through a temporary table with its own page cache, created and
//! freed per row (musl's allocator answers that with an `mmap`/`munmap` pair), and an upsert into a table
//! with a foreign key keeps a statement journal: a copy of every page it touches. Both cost more than the
//! writes themselves. An `INSERT ... DO NOTHING` (it only skips: no statement journal), then for a row that
//! was there a lookup and an `UPDATE`, does the same merge without either; a new connection, the common case,
//! costs one index search instead of two. Buckets likewise: an `UPDATE`, and an `INSERT` when it found none
//! (or at once for a row that cannot have the bucket yet).

use crate::error::{Error, Result};
use crate::model::{Bytes, ConnMeta, Field, Metadata, RecordMeta};
use crate::store::rollup::{host_key, RollupDelta};
use crate::timefmt::{DAY_MS, MINUTE_MS};
use rusqlite::types::ToSqlOutput;
use rusqlite::{params, Connection, OptionalExtension, Statement};

/// One validated sync record (built by `crate::api::ingest`), ready to merge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestRow {
    pub agent_id: String,
    pub meta: RecordMeta,
    pub end_ms: Option<i64>,
    pub last_updated_ms: i64,
    pub totals: Bytes,
    /// `(minute index, bytes)`; `None` when the agent sent no buckets (they are derived on merge).
    pub traffic: Option<Vec<(i64, Bytes)>>,
}

/// A validated sync batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestBatch {
    pub agent_id: String,
    pub rows: Vec<IngestRow>,
}

/// A stored connection as merging needs it: its key, what the rollups group it by, and the values that changes
/// merge with. The writer keeps these of the connections it writes to, so that tracking needs no reads.
#[derive(Clone, Debug)]
pub struct Row {
    pub pk: i64,
    pub start_ms: i64,
    pub host_key: Box<str>,
    pub upload: i64,
    pub download: i64,
    pub last_updated_ms: i64,
    pub end_ms: Option<i64>,
}

impl Row {
    /// The row [`Merge::insert`] just wrote as `pk`.
    pub fn inserted(pk: i64, meta: &impl Metadata, seen: &Seen) -> Row {
        Row {
            pk,
            start_ms: meta.start_ms(),
            host_key: meta_host_key(meta).into(),
            upload: clamp(seen.totals.upload),
            download: clamp(seen.totals.download),
            last_updated_ms: seen.last_updated_ms,
            end_ms: seen.end.apply(None),
        }
    }
}

/// What a change saw of a connection: its totals, when, and what becomes of its end.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub totals: Bytes,
    pub last_updated_ms: i64,
    pub end: End,
}

/// What a change does to a connection's `end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Leaves it (tracking: bytes moved).
    Keep,
    /// Clears it (tracking: a connection seen again after its close).
    Reopen,
    /// Sets it (tracking: the collector saw the connection end then).
    Close(i64),
    /// Merges a sync record's end: a non-null value wins over null, the later of two wins.
    Merge(Option<i64>),
}

impl End {
    /// The end after this change of a row whose end was `old`.
    pub fn apply(self, old: Option<i64>) -> Option<i64> {
        match (self, old) {
            (End::Keep, old) => old,
            (End::Reopen, _) => None,
            (End::Close(at), _) => Some(at),
            (End::Merge(Some(new)), Some(old)) => Some(old.max(new)),
            (End::Merge(new), old) => old.or(new),
        }
    }
}

/// Bytes as the columns hold them.
fn clamp(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// The rollups' host key of a connection ([`host_key`]).
fn meta_host_key(meta: &impl Metadata) -> &str {
    host_key(meta.text(Field::Host), meta.text(Field::DestinationIp))
}

/// `?1, ?2, ... ?n`: the placeholders of an insert.
fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The update of a row's totals and `last_updated` (`?1` its pk, `?2`..`?4`), its `seq` (`?5`) only in a
/// writer's commit and its `end_ms` (`?6`) only when `end` changes: SQLite maintains every index whose
/// columns (or partial-index condition) an `UPDATE` names, changed or not (`connections_seq`,
/// `connections_open`). `max()` again in SQL: a row changed behind the writer's cache (another agent
/// syncing under the same id) is never lowered.
fn update_sql(seq: Option<i64>, end: bool) -> String {
    format!(
        "UPDATE connections SET upload = max(upload, ?2), download = max(download, ?3),
            last_updated_ms = max(last_updated_ms, ?4){}{} WHERE pk = ?1",
        if seq.is_some() { ", seq = ?5" } else { "" },
        if end { ", end_ms = ?6" } else { "" },
    )
}

/// The columns [`Merge::insert`] binds before the metadata.
const INSERT_HEAD: &str = "agent_id, id, end_ms, last_updated_ms, upload, download, seq";
const INSERT_HEAD_COUNT: usize = 7;

/// The merging of one transaction (see the module doc): its statements, its rollup deltas and its `seq`.
pub struct Merge<'c> {
    tx: &'c Connection,
    /// The writer's commit's change counter, or `None` (a master's sync batches: `seq` is left as it is).
    seq: Option<i64>,
    /// The first row this transaction inserted: every row from it on is new here.
    first_insert: Option<i64>,
    rollup: RollupDelta,
    find: Statement<'c>,
    insert: Statement<'c>,
    /// Raises a row's totals and `last_updated` ([`update_sql`]); `update_end` also sets its end.
    update: Statement<'c>,
    update_end: Statement<'c>,
    bucket_find: Statement<'c>,
    bucket_insert: Statement<'c>,
    bucket_set: Statement<'c>,
    bucket_add: Statement<'c>,
}

impl<'c> Merge<'c> {
    /// Prepares the statements inside the caller's transaction `tx`; `seq` stamps what it changes.
    pub fn prepare(tx: &'c Connection, seq: Option<i64>) -> Result<Merge<'c>> {
        let p = |sql: &str, what: &'static str| tx.prepare(sql).map_err(Error::db(what));
        Ok(Merge {
            tx,
            seq,
            first_insert: None,
            rollup: RollupDelta::default(),
            find: p(
                "SELECT pk, start_ms, host, destination_ip, upload, download, last_updated_ms, end_ms
                 FROM connections WHERE agent_id = ?1 AND id = ?2",
                "prepare connection lookup",
            )?,
            insert: p(
                &format!(
                    "INSERT INTO connections ({INSERT_HEAD}, {}) VALUES ({})
                     ON CONFLICT (agent_id, id) DO NOTHING",
                    ConnMeta::SQL_COLUMNS,
                    placeholders(INSERT_HEAD_COUNT + 1 + Field::COUNT)
                ),
                "prepare connection insert",
            )?,
            update: p(&update_sql(seq, false), "prepare connection update")?,
            update_end: p(&update_sql(seq, true), "prepare connection update")?,
            bucket_find: p(
                "SELECT upload, download FROM traffic WHERE conn = ?1 AND minute = ?2",
                "prepare traffic lookup",
            )?,
            bucket_insert: p(
                "INSERT INTO traffic (conn, minute, upload, download, seq) VALUES (?1, ?2, ?3, ?4, ?5)",
                "prepare traffic insert",
            )?,
            bucket_set: p(
                "UPDATE traffic SET upload = ?3, download = ?4 WHERE conn = ?1 AND minute = ?2",
                "prepare traffic update",
            )?,
            bucket_add: p(
                "UPDATE traffic SET upload = upload + ?3, download = download + ?4, seq = coalesce(?5, seq)
                 WHERE conn = ?1 AND minute = ?2",
                "prepare traffic add",
            )?,
        })
    }

    /// The stored row of `(agent, id)`.
    pub fn find(&mut self, agent: &str, id: &str) -> Result<Option<Row>> {
        self.find
            .query_row(params![agent, id], |r| {
                let text = |i: usize| {
                    r.get_ref(i)?.as_str().map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            i,
                            rusqlite::types::Type::Text,
                            Box::new(e),
                        )
                    })
                };
                Ok(Row {
                    pk: r.get(0)?,
                    start_ms: r.get(1)?,
                    host_key: host_key(text(2)?, text(3)?).into(),
                    upload: r.get(4)?,
                    download: r.get(5)?,
                    last_updated_ms: r.get(6)?,
                    end_ms: r.get(7)?,
                })
            })
            .optional()
            .map_err(|e| Error::Db(format!("look up connection {id}"), e))
    }

    /// Inserts connection `meta` of `agent` as `seen` unless `(agent, id)` is stored already. The new row's
    /// pk ([`Row::inserted`] is the row), or `None` when it was there: nothing was written, and the caller
    /// merges into it ([`Merge::find`], [`Merge::update`]).
    pub fn insert(
        &mut self,
        agent: &str,
        meta: &impl Metadata,
        seen: &Seen,
    ) -> Result<Option<i64>> {
        let (up, down) = (clamp(seen.totals.upload), clamp(seen.totals.download));
        let st = &mut self.insert;
        let bind = |st: &mut Statement<'_>| -> rusqlite::Result<usize> {
            st.raw_bind_parameter(1, agent)?;
            st.raw_bind_parameter(2, meta.id())?;
            st.raw_bind_parameter(3, seen.end.apply(None))?;
            st.raw_bind_parameter(4, seen.last_updated_ms)?;
            st.raw_bind_parameter(5, up)?;
            st.raw_bind_parameter(6, down)?;
            st.raw_bind_parameter(7, self.seq.unwrap_or(0))?;
            st.raw_bind_parameter(8, meta.start_ms())?;
            for (i, v) in meta.sql_values().enumerate() {
                st.raw_bind_parameter(INSERT_HEAD_COUNT + 2 + i, ToSqlOutput::Borrowed(v))?;
            }
            st.raw_execute()
        };
        let inserted =
            bind(st).map_err(|e| Error::Db(format!("store connection {}", meta.id()), e))?;
        if inserted == 0 {
            return Ok(None);
        }
        self.rollup
            .conn(agent, meta.start_ms(), meta_host_key(meta), 1, up, down);
        // the new rowid, not `RETURNING pk`: that builds a temporary table per row (with musl, an mmap/munmap
        // pair each), which cost more than the insert
        let pk = self.tx.last_insert_rowid();
        self.first_insert.get_or_insert(pk);
        Ok(Some(pk))
    }

    /// True when row `pk` was inserted by this transaction: it has no traffic but what this transaction
    /// wrote. (Rowids only grow while a transaction only inserts, as both merges do.)
    pub fn inserted_here(&self, pk: i64) -> bool {
        self.first_insert.is_some_and(|first| pk >= first)
    }

    /// Merges `seen` into stored `row` of `agent` (see the module doc): raises its totals and `last_updated`,
    /// applies `seen.end`, counts the increase in the rollups. Writes the row when it changed, and always in a
    /// writer's commit (which stamps its `seq`).
    pub fn update(&mut self, agent: &str, row: &mut Row, seen: &Seen) -> Result<()> {
        let up = clamp(seen.totals.upload).max(row.upload);
        let down = clamp(seen.totals.download).max(row.download);
        let last = seen.last_updated_ms.max(row.last_updated_ms);
        let end = seen.end.apply(row.end_ms);
        self.rollup.conn(
            agent,
            row.start_ms,
            &row.host_key,
            0,
            up - row.upload,
            down - row.download,
        );
        let old = (row.upload, row.download, row.last_updated_ms, row.end_ms);
        if (up, down, last, end) != old || self.seq.is_some() {
            let st = match end == row.end_ms {
                true => &mut self.update,
                false => &mut self.update_end,
            };
            let bind = |st: &mut Statement<'_>| -> rusqlite::Result<usize> {
                for (i, v) in [row.pk, up, down, last].into_iter().enumerate() {
                    st.raw_bind_parameter(i + 1, v)?;
                }
                if let Some(seq) = self.seq {
                    st.raw_bind_parameter(5, seq)?;
                }
                if end != row.end_ms {
                    st.raw_bind_parameter(6, end)?;
                }
                st.raw_execute()
            };
            bind(st).map_err(|e| Error::Db(format!("update connection {}", row.pk), e))?;
        }
        (row.upload, row.download, row.last_updated_ms, row.end_ms) = (up, down, last, end);
        Ok(())
    }

    /// Adds `b` to `minute` of row `pk`'s traffic (tracking, and the buckets derived for a sync record
    /// without them). `fresh`: the row cannot have this bucket yet, it is inserted at once.
    pub fn add_traffic(
        &mut self,
        agent: &str,
        pk: i64,
        minute: i64,
        b: Bytes,
        fresh: bool,
    ) -> Result<()> {
        let (up, down) = (clamp(b.upload), clamp(b.download));
        self.rollup.traffic(agent, minute, up, down);
        let added = match fresh {
            true => 0,
            false => self
                .bucket_add
                .execute(params![pk, minute, up, down, self.seq])
                .map_err(|e| Error::Db(format!("store traffic of connection {pk}"), e))?,
        };
        if added == 0 {
            self.insert_bucket(pk, minute, up, down)?;
        }
        Ok(())
    }

    /// Merges a sync record's bucket `b` of `minute` into row `pk`'s traffic: the larger value of each
    /// direction. `fresh` as for [`Merge::add_traffic`].
    pub fn max_traffic(
        &mut self,
        agent: &str,
        pk: i64,
        minute: i64,
        b: Bytes,
        fresh: bool,
    ) -> Result<()> {
        let (up, down) = (clamp(b.upload), clamp(b.download));
        let old: Option<(i64, i64)> = match fresh {
            true => None,
            false => self
                .bucket_find
                .query_row(params![pk, minute], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(|e| Error::Db(format!("look up traffic of connection {pk}"), e))?,
        };
        match old {
            None => {
                self.rollup.traffic(agent, minute, up, down);
                self.insert_bucket(pk, minute, up, down)
            }
            Some((u0, d0)) => {
                let (nu, nd) = (up.max(u0), down.max(d0));
                if (nu, nd) != (u0, d0) {
                    self.rollup.traffic(agent, minute, nu - u0, nd - d0);
                    self.bucket_set
                        .execute(params![pk, minute, nu, nd])
                        .map_err(|e| Error::Db(format!("store traffic of connection {pk}"), e))?;
                }
                Ok(())
            }
        }
    }

    fn insert_bucket(&mut self, pk: i64, minute: i64, up: i64, down: i64) -> Result<()> {
        self.bucket_insert
            .execute(params![pk, minute, up, down, self.seq.unwrap_or(0)])
            .map(drop)
            .map_err(|e| Error::Db(format!("store traffic of connection {pk}"), e))
    }

    /// Applies the rollup deltas of everything merged (still inside the caller's transaction).
    pub fn finish(self) -> Result<()> {
        self.rollup.apply(self.tx)
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
pub fn spread_each(from_ms: i64, to_ms: i64, delta: Bytes, mut f: impl FnMut(i64, Bytes)) {
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

/// Merges a validated sync batch in one transaction of its own; returns the number of records. Tests use it;
/// the master merges through the writer ([`merge_batch`] in a group commit).
pub fn apply_batch(conn: &mut Connection, batch: &IngestBatch, now_ms: i64) -> Result<usize> {
    let tx = conn.transaction().map_err(Error::db("begin sync batch"))?;
    merge_batch(&tx, batch, now_ms)?;
    tx.commit().map_err(Error::db("commit sync batch"))?;
    Ok(batch.rows.len())
}

/// Merges a validated sync batch inside the caller's transaction (see the module doc for the rules), and
/// records the sync in table `agents`: `first_seen_ms`, `last_sync_ms` (every batch), `last_data_ms`
/// (batches with rows) and `sync_count`.
pub fn merge_batch(tx: &Connection, batch: &IngestBatch, now_ms: i64) -> Result<()> {
    let mut merge = Merge::prepare(tx, None)?;
    let mut other_agents: Vec<&str> = Vec::new();
    for row in &batch.rows {
        if row.agent_id != batch.agent_id && !other_agents.contains(&row.agent_id.as_str()) {
            other_agents.push(&row.agent_id);
        }
        merge_record(&mut merge, row)?;
    }
    let has_data = !batch.rows.is_empty();
    tx.execute(
        "INSERT INTO agents (agent_id, first_seen_ms, last_sync_ms, last_data_ms, sync_count)
         VALUES (?1, ?2, ?2, CASE WHEN ?3 THEN ?2 END, 1)
         ON CONFLICT (agent_id) DO UPDATE SET last_sync_ms = ?2,
            last_data_ms = CASE WHEN ?3 THEN ?2 ELSE last_data_ms END, sync_count = sync_count + 1",
        params![batch.agent_id, now_ms, has_data],
    )
    .map_err(Error::db("record agent sync"))?;
    // Rows an agent forwards under another id (kept from before an --agent-id change): that agent exists and
    // has data, but did not sync itself.
    for other in other_agents {
        tx.execute(
            "INSERT INTO agents (agent_id, first_seen_ms, last_data_ms) VALUES (?1, ?2, ?2)
             ON CONFLICT (agent_id) DO UPDATE SET last_data_ms = ?2",
            params![other, now_ms],
        )
        .map_err(Error::db("record agent data"))?;
    }
    merge.finish()
}

/// Merges one sync record: its row, then its buckets (or the ones derived for it).
fn merge_record(merge: &mut Merge<'_>, row: &IngestRow) -> Result<()> {
    let agent = row.agent_id.as_str();
    let seen = Seen {
        totals: row.totals,
        last_updated_ms: row.last_updated_ms,
        end: End::Merge(row.end_ms),
    };
    // A new connection is the common case: insert first, and read what was stored (to merge, to derive
    // buckets for records that carry none, and for the rollup deltas) only when nothing was inserted.
    let (pk, prior) = match merge.insert(agent, &row.meta, &seen)? {
        Some(pk) => (pk, None),
        None => {
            let id = row.meta.id();
            let mut stored = merge.find(agent, id)?.ok_or_else(|| {
                Error::Db(
                    format!("look up connection {id}"),
                    rusqlite::Error::QueryReturnedNoRows,
                )
            })?;
            let prior = (stored.upload, stored.download, stored.last_updated_ms);
            merge.update(agent, &mut stored, &seen)?;
            (stored.pk, Some(prior))
        }
    };
    match &row.traffic {
        Some(buckets) => {
            // A new connection has no buckets yet, unless this record lists a minute twice (our agents send
            // them in order, once each).
            let fresh = prior.is_none() && buckets.windows(2).all(|w| w[0].0 < w[1].0);
            for &(minute, b) in buckets {
                merge.max_traffic(agent, pk, minute, b, fresh)?;
            }
        }
        None => {
            let (up0, down0, from) = prior.unwrap_or((0, 0, row.meta.start_ms()));
            let delta = Bytes {
                upload: (clamp(row.totals.upload) - up0).max(0) as u64,
                download: (clamp(row.totals.download) - down0).max(0) as u64,
            };
            if delta != Bytes::default() {
                // an agent whose clock went back: its bytes stay after what is stored
                let to = row.last_updated_ms.max(from);
                // `spread` gives each minute once: a new connection has none of them yet
                for (minute, b) in spread(from, to, delta) {
                    merge.add_traffic(agent, pk, minute, b, prior.is_none())?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(upload: u64, download: u64) -> Bytes {
        Bytes { upload, download }
    }

    #[test]
    fn end_rules() {
        assert_eq!(End::Keep.apply(Some(5)), Some(5));
        assert_eq!(End::Keep.apply(None), None);
        assert_eq!(End::Reopen.apply(Some(5)), None);
        assert_eq!(End::Close(3).apply(Some(5)), Some(3));
        assert_eq!(End::Close(3).apply(None), Some(3));
        assert_eq!(End::Merge(None).apply(Some(5)), Some(5));
        assert_eq!(End::Merge(Some(3)).apply(Some(5)), Some(5));
        assert_eq!(End::Merge(Some(7)).apply(Some(5)), Some(7));
        assert_eq!(End::Merge(Some(7)).apply(None), Some(7));
        assert_eq!(End::Merge(None).apply(None), None);
    }

    #[test]
    fn an_inserted_row_is_grouped_by_host_or_destination() {
        let meta = |host: &str| {
            crate::model::PackedMeta::new(&ConnMeta {
                id: "c".into(),
                start_ms: 7,
                host: host.into(),
                destination_ip: "203.0.113.9".into(),
                ..ConnMeta::default()
            })
        };
        let seen = Seen {
            totals: b(u64::MAX, 2),
            last_updated_ms: 9,
            end: End::Close(9),
        };
        let row = Row::inserted(3, &meta("example.org"), &seen);
        assert_eq!(
            (row.pk, row.start_ms, &*row.host_key),
            (3, 7, "example.org")
        );
        assert_eq!((row.upload, row.download), (i64::MAX, 2));
        assert_eq!((row.last_updated_ms, row.end_ms), (9, Some(9)));
        assert_eq!(&*Row::inserted(3, &meta(""), &seen).host_key, "203.0.113.9");
    }

    #[test]
    fn spread_keeps_sums_and_shape() {
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
}
