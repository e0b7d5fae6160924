//! Retention: deleting old rows by age (`--data-retention-days` on an agent, `--retention-days` on a master)
//! and keeping the database under a size cap, on a schedule, through the writer thread.
//!
//! What may go:
//! - never an open connection (`end_ms IS NULL`), except on a master with [`RetentionPolicy::delete_stale_open`]:
//!   there an "open" row whose `last_updated` is older than the limit is stale (a live agent updates its open
//!   rows at every sync; the earlier tool's agents never send an end time at all);
//! - when [`RetentionPolicy::require_synced`] (an agent with a master): only rows the master has, i.e. whose
//!   `(seq, pk)` is at or before the stored sync cursor (see [`crate::sync`]); with no cursor, nothing;
//! - by age: rows whose `last_updated` (at or after their end) is older than `max_age`;
//! - by size: while the used size is above `max_db_bytes`, the eligible rows with the oldest `start`, in chunks.
//!
//! Traffic rows go with their connection (`ON DELETE CASCADE`; `foreign_keys` is switched on if it is off).
//!
//! About the file size: the used size is `(page_count - freelist_count) * page_size`. Deleting rows returns
//! pages to SQLite's free list, where new rows reuse them, so the cap stops the file from growing; it does
//! not shrink it. Our files are not created with `auto_vacuum` (so `PRAGMA incremental_vacuum` does nothing)
//! and a full `VACUUM` rewrites the whole file and needs as much free space again: too much for a router's
//! flash, so we do not run it. Expect the file to settle at about the cap plus the WAL.
//!
//! Each [`WriterHandle::call`] deletes at most [`CHUNK_ROWS`] rows in its own transaction, so the collector's
//! commits interleave with a large clean-up instead of waiting for it.

use crate::error::{Error, Result};
use crate::store::rollup::delete_connections;
use crate::store::schema::start_minute;
use crate::store::WriterHandle;
use rusqlite::{params, Connection};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Rows deleted per transaction.
pub const CHUNK_ROWS: usize = 5_000;

/// What retention may delete.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Delete rows older than this; `None` keeps them (the master's default).
    pub max_age: Option<Duration>,
    /// Keep the used size of the database under this many bytes; `None` for no cap.
    pub max_db_bytes: Option<u64>,
    /// Only delete rows the master has (an agent with `--master-url`).
    pub require_synced: bool,
    /// Also delete "open" rows not updated within `max_age` (master only; never on an agent).
    pub delete_stale_open: bool,
}

/// What one call deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub deleted_by_age: u64,
    pub deleted_by_size: u64,
    /// The used size after the call, in bytes.
    pub used_bytes: u64,
    /// True when the call stopped at its row limit and more rows are eligible.
    pub more: bool,
    /// True when the size cap is set and could not be met (every remaining row is open or unsynced).
    pub over_cap: bool,
}

/// The bytes the database uses: its pages minus the free ones.
pub fn used_bytes(conn: &Connection) -> Result<u64> {
    let q = |sql: &str| -> Result<i64> {
        conn.query_row(sql, [], |r| r.get(0))
            .map_err(Error::db("measure database size"))
    };
    let pages = q("PRAGMA page_count")?;
    let free = q("PRAGMA freelist_count")?;
    let size = q("PRAGMA page_size")?;
    Ok(((pages - free).max(0) * size) as u64)
}

/// Applies the policy until nothing more is eligible (in chunks of [`CHUNK_ROWS`], one transaction each).
pub fn apply(
    conn: &mut Connection,
    policy: &RetentionPolicy,
    now_ms: i64,
) -> Result<RetentionReport> {
    let mut total = RetentionReport::default();
    loop {
        let r = apply_chunk(conn, policy, now_ms, CHUNK_ROWS)?;
        total.deleted_by_age += r.deleted_by_age;
        total.deleted_by_size += r.deleted_by_size;
        total.used_bytes = r.used_bytes;
        total.over_cap = r.over_cap;
        if !r.more {
            return Ok(total);
        }
    }
}

/// The row keys a selection names.
/// The oldest closed and synced connections, for the size cap: `?1`, `?2` the sync cursor, `?3` how many,
/// `?4` the minute of the earliest time (every row). That condition is what makes SQLite walk the start
/// index by minute for the ORDER BY (it holds `start_ms / 60000`, schema v4); without one, it sorts every
/// closed row for each slice.
const OLDEST_CLOSED_SQL: &str = "SELECT pk FROM connections
     WHERE start_ms / 60000 >= ?4 AND end_ms IS NOT NULL AND (seq < ?1 OR (seq = ?1 AND pk <= ?2))
     ORDER BY start_ms / 60000, start_ms LIMIT ?3";

fn select_pks(tx: &Connection, sql: &str, args: impl rusqlite::Params) -> Result<Vec<i64>> {
    let mut stmt = tx
        .prepare(sql)
        .map_err(Error::db("prepare retention selection"))?;
    let rows = stmt
        .query_map(args, |r| r.get(0))
        .map_err(Error::db("select rows to delete"))?;
    rows.collect::<std::result::Result<Vec<i64>, _>>()
        .map_err(Error::db("select rows to delete"))
}

/// Deletes at most `max_rows` eligible rows in one transaction.
pub fn apply_chunk(
    conn: &mut Connection,
    policy: &RetentionPolicy,
    now_ms: i64,
    max_rows: usize,
) -> Result<RetentionReport> {
    let fk: i64 = conn
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .map_err(Error::db("read foreign_keys"))?;
    if fk == 0 {
        // Without it the cascade to `traffic` would not happen (must be set outside a transaction).
        conn.execute_batch("PRAGMA foreign_keys = ON")
            .map_err(Error::db("enable foreign_keys"))?;
    }
    // The synced limit: everything at or before the cursor; with no cursor nothing is synced.
    let synced = if policy.require_synced {
        match crate::sync::load_cursor(conn)? {
            Some(c) => Some(c),
            None => Some((i64::MIN, i64::MIN)),
        }
    } else {
        None
    };
    let (cs, cp) = synced.unwrap_or((i64::MAX, i64::MAX));
    let mut report = RetentionReport::default();
    let tx = conn.transaction().map_err(Error::db("begin retention"))?;
    let mut budget = max_rows;
    if let Some(age) = policy.max_age {
        let cutoff = now_ms.saturating_sub(age.as_millis().min(i64::MAX as u128) as i64);
        // start_ms <= last_updated_ms, so the start index (by minute: `start_minute`) narrows the scan.
        let pks = select_pks(
            &tx,
            "SELECT pk FROM connections
             WHERE start_ms / 60000 <= ?6 AND start_ms < ?1 AND last_updated_ms < ?1
               AND (end_ms IS NOT NULL OR ?2)
               AND (+seq < ?3 OR (+seq = ?3 AND pk <= ?4))
             LIMIT ?5",
            params![
                cutoff,
                policy.delete_stale_open,
                cs,
                cp,
                budget as i64,
                start_minute(cutoff.saturating_sub(1))
            ],
        )?;
        let n = delete_connections(&tx, &pks)?;
        report.deleted_by_age = n as u64;
        budget -= n;
        report.more = budget == 0;
    }
    report.used_bytes = used_bytes(&tx)?;
    if let Some(cap) = policy.max_db_bytes {
        // Deleting frees whole pages only once they are empty: delete a slice, measure, repeat.
        let step = 500.min(max_rows).max(1);
        while report.used_bytes > cap && budget > 0 {
            let pks = select_pks(
                &tx,
                OLDEST_CLOSED_SQL,
                params![cs, cp, step.min(budget) as i64, start_minute(i64::MIN / 4)],
            )?;
            let n = delete_connections(&tx, &pks)?;
            report.deleted_by_size += n as u64;
            budget -= n;
            report.used_bytes = used_bytes(&tx)?;
            if n == 0 {
                report.over_cap = true;
                break;
            }
        }
        if report.used_bytes > cap && budget == 0 {
            report.more = true;
        }
    }
    tx.commit().map_err(Error::db("commit retention"))?;
    Ok(report)
}

/// Runs retention at start and then every `every`, through the writer, until `stop` is set or the writer is
/// gone. Holds a writer sender: set `stop` and join this thread before waiting for the writer to end.
pub fn spawn_retention(
    policy: RetentionPolicy,
    every: Duration,
    writer: WriterHandle,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let body = move || {
        let mut warned_cap = false;
        loop {
            let started = Instant::now();
            let mut total = RetentionReport::default();
            loop {
                let p = policy.clone();
                let r = writer.call(
                    move |c| apply_chunk(c, &p, crate::timefmt::now_ms(), CHUNK_ROWS),
                    Duration::from_secs(120),
                );
                match r {
                    Ok(Ok(r)) => {
                        total.deleted_by_age += r.deleted_by_age;
                        total.deleted_by_size += r.deleted_by_size;
                        total.used_bytes = r.used_bytes;
                        total.over_cap = r.over_cap;
                        if !r.more || stop.load(Ordering::SeqCst) {
                            break;
                        }
                    }
                    Ok(Err(e)) => {
                        crate::error!("retention: {e}");
                        break;
                    }
                    Err(Error::Stopped(_)) => return,
                    Err(e) => {
                        crate::warn!("retention: {e}");
                        break;
                    }
                }
            }
            if total.deleted_by_age + total.deleted_by_size > 0 {
                crate::info!(
                    "retention: deleted {} rows by age and {} over the size cap in {} ms; {} bytes used",
                    total.deleted_by_age,
                    total.deleted_by_size,
                    started.elapsed().as_millis(),
                    total.used_bytes
                );
            }
            if total.over_cap && !warned_cap {
                crate::warn!(
                    "retention: the database uses {} bytes, over the size cap, and every remaining row is open or not yet synced",
                    total.used_bytes
                );
            }
            warned_cap = total.over_cap;
            // Wait for the next run, noticing the stop flag within 100 ms.
            let until = Instant::now() + every;
            loop {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left.min(Duration::from_millis(100)));
            }
        }
    };
    std::thread::Builder::new()
        .name("retention".into())
        .spawn(body)
        .expect("spawn retention thread")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Access;

    const DAY: i64 = 86_400_000;

    /// The size cap's slices walk the start index: without a condition on the minute, SQLite (no
    /// statistics) sorted every closed row for each slice of 500.
    #[test]
    fn the_oldest_closed_rows_are_found_through_the_start_index() {
        let c = db("plan");
        let plan: Vec<String> = c
            .prepare(&format!("EXPLAIN QUERY PLAN {OLDEST_CLOSED_SQL}"))
            .unwrap()
            .query_map(params![1, 1, 500, start_minute(i64::MIN / 4)], |r| r.get(3))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        let plan = plan.join("; ");
        assert!(
            plan.contains("USING INDEX connections_start_minute"),
            "{plan}"
        );
        assert!(!plan.contains("TEMP B-TREE FOR ORDER BY"), "{plan}");
    }

    fn db(name: &str) -> Connection {
        let dir = std::env::temp_dir().join(format!("mct-ret-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        crate::store::open(&dir.join("r.db"), Access::Write).unwrap()
    }

    /// Inserts a row directly (the writer's own tests cover how rows get there).
    fn row(c: &Connection, id: &str, start: i64, end: Option<i64>, seq: i64) -> i64 {
        c.execute(
            "INSERT INTO connections (agent_id, id, start_ms, end_ms, last_updated_ms, seq, host)
             VALUES ('a', ?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, start, end, end.unwrap_or(start), seq, "x".repeat(400)],
        )
        .unwrap();
        let pk = c.last_insert_rowid();
        c.execute(
            "INSERT INTO traffic (conn, minute, upload, download, seq) VALUES (?1, ?2, 1, 2, ?3)",
            params![pk, start / 60_000, seq],
        )
        .unwrap();
        pk
    }

    /// The one integer `sql` selects.
    fn number(c: &Connection, sql: &str, params: impl rusqlite::Params) -> i64 {
        c.query_row(sql, params, |r| r.get(0)).unwrap()
    }

    fn ids(c: &Connection) -> Vec<String> {
        let mut s = c.prepare("SELECT id FROM connections ORDER BY id").unwrap();
        let v = s.query_map([], |r| r.get(0)).unwrap();
        v.map(|x| x.unwrap()).collect()
    }

    fn age(days: u64) -> Option<Duration> {
        Some(Duration::from_secs(days * 86_400))
    }

    #[test]
    fn never_deletes_open_or_unsynced_rows() {
        let mut c = db("open");
        let now = 100 * DAY;
        row(&c, "old-open", 10 * DAY, None, 1);
        let pk_synced = row(&c, "old-closed-synced", 10 * DAY, Some(11 * DAY), 2);
        row(&c, "old-closed-unsynced", 10 * DAY, Some(11 * DAY), 3);
        row(&c, "new-closed-synced", 99 * DAY, Some(99 * DAY), 1);
        crate::sync::store_cursor(&c, (2, pk_synced)).unwrap();
        let policy = RetentionPolicy {
            max_age: age(30),
            require_synced: true,
            ..Default::default()
        };
        let r = apply(&mut c, &policy, now).unwrap();
        assert_eq!(r.deleted_by_age, 1);
        assert_eq!(
            ids(&c),
            vec!["new-closed-synced", "old-closed-unsynced", "old-open"]
        );
        // the traffic row went with it
        let t = number(
            &c,
            "SELECT count(*) FROM traffic WHERE conn = ?1",
            [pk_synced],
        );
        assert_eq!(t, 0);
        // no master: closed and old goes, open stays
        let offline = RetentionPolicy {
            max_age: age(30),
            ..Default::default()
        };
        apply(&mut c, &offline, now).unwrap();
        assert_eq!(ids(&c), vec!["new-closed-synced", "old-open"]);
        // master: stale "open" rows go too
        let master = RetentionPolicy {
            max_age: age(30),
            delete_stale_open: true,
            ..Default::default()
        };
        apply(&mut c, &master, now).unwrap();
        assert_eq!(ids(&c), vec!["new-closed-synced"]);
    }

    #[test]
    fn no_cursor_means_nothing_is_synced() {
        let mut c = db("nocursor");
        row(&c, "old", 1, Some(2), 1);
        let policy = RetentionPolicy {
            max_age: age(1),
            max_db_bytes: Some(1),
            require_synced: true,
            ..Default::default()
        };
        let r = apply(&mut c, &policy, 100 * DAY).unwrap();
        assert_eq!(r.deleted_by_age + r.deleted_by_size, 0);
        assert!(r.over_cap);
        assert_eq!(ids(&c), vec!["old"]);
    }

    #[test]
    fn size_cap_drops_oldest_closed_synced_first() {
        let mut c = db("cap");
        let mut last = 0;
        for i in 0..3000i64 {
            let end = if i % 10 == 0 {
                None
            } else {
                Some(i * 1000 + 500)
            };
            last = row(&c, &format!("r{i:05}"), i * 1000, end, 1);
        }
        let full = used_bytes(&c).unwrap();
        crate::sync::store_cursor(&c, (1, last)).unwrap();
        let cap = full / 2;
        let policy = RetentionPolicy {
            max_db_bytes: Some(cap),
            require_synced: true,
            ..Default::default()
        };
        let r = apply(&mut c, &policy, 0).unwrap();
        assert!(r.deleted_by_size > 0);
        assert!(r.used_bytes <= cap, "{} > {cap}", r.used_bytes);
        assert!(!r.over_cap);
        // the oldest closed rows went; every open row stayed; what remains closed is newer than what went
        let open = number(
            &c,
            "SELECT count(*) FROM connections WHERE end_ms IS NULL",
            [],
        );
        assert_eq!(open, 300);
        let oldest_closed = number(
            &c,
            "SELECT min(start_ms) FROM connections WHERE end_ms IS NOT NULL",
            [],
        );
        assert!(oldest_closed > 0);
        let gone_after = number(
            &c,
            "SELECT count(*) FROM connections WHERE end_ms IS NOT NULL AND start_ms < ?1",
            [oldest_closed],
        );
        assert_eq!(gone_after, 0);
        // a second pass changes nothing
        let again = apply(&mut c, &policy, 0).unwrap();
        assert_eq!(again.deleted_by_size, 0);
    }

    #[test]
    fn chunks_report_more() {
        let mut c = db("chunks");
        for i in 0..25 {
            row(&c, &format!("r{i}"), 1, Some(2), 1);
        }
        let policy = RetentionPolicy {
            max_age: age(1),
            ..Default::default()
        };
        let r = apply_chunk(&mut c, &policy, 10 * DAY, 10).unwrap();
        assert_eq!(r.deleted_by_age, 10);
        assert!(r.more);
        let r = apply(&mut c, &policy, 10 * DAY).unwrap();
        assert_eq!(r.deleted_by_age, 15);
        assert!(ids(&c).is_empty());
    }
}
