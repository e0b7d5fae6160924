//! Keeping the hourly rollups (schema v2; read by `crate::api::rollup`) in step with the raw tables.
//!
//! Every code path that changes `connections` or `traffic` (the writer's flush, a master's sync batch,
//! retention) collects what it changed in a [`RollupDelta`] and applies it in the same transaction: a few
//! upserts per commit instead of triggers firing per row, which cost more than the writes themselves while
//! tracking thousands of live connections.
//!
//! - `rollup_conn_hour (agent_id, hour of start_ms)`: connections and their totals.
//! - `rollup_traffic_hour (hour, agent_id)`: the traffic deltas by the hour in which they flowed.
//! - `rollup_host (host key)`: connections and totals by host, or destination IP without one.

use crate::error::{Error, Result};
use crate::timefmt::HOUR_MS;
use rusqlite::{params, Connection};
use std::collections::HashMap;

/// The `host` grouping key: the host, or the destination IP when there is none.
pub fn host_key<'a>(host: &'a str, destination_ip: &'a str) -> &'a str {
    if host.is_empty() {
        destination_ip
    } else {
        host
    }
}

/// Changes to the rollups, summed per key. Keyed by agent first, so that adding to a key already there
/// allocates nothing (a master's sync batch adds to the same few keys for every row and minute).
#[derive(Debug, Default)]
pub struct RollupDelta {
    /// agent → hour of `start_ms` → (conns, upload, download)
    conn_hour: HashMap<String, HashMap<i64, [i64; 3]>>,
    /// agent → hour → (upload, download)
    traffic_hour: HashMap<String, HashMap<i64, [i64; 2]>>,
    host: HashMap<String, [i64; 3]>,
}

/// The entry of `key` in `map`, allocating the key only when it is new.
fn entry<'m, V: Default>(map: &'m mut HashMap<String, V>, key: &str) -> &'m mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    map.get_mut(key).expect("inserted above")
}

impl RollupDelta {
    /// A connection of `agent` that started at `start_ms` with `host_key` changed by `conns` (+1 new, -1
    /// deleted, 0 bytes only) and its totals by `up`/`down`.
    pub fn conn(
        &mut self,
        agent: &str,
        start_ms: i64,
        host_key: &str,
        conns: i64,
        up: i64,
        down: i64,
    ) {
        if conns == 0 && up == 0 && down == 0 {
            return;
        }
        let hour = start_ms.div_euclid(HOUR_MS);
        let c = entry(&mut self.conn_hour, agent).entry(hour).or_default();
        c[0] += conns;
        c[1] += up;
        c[2] += down;
        let h = entry(&mut self.host, host_key);
        h[0] += conns;
        h[1] += up;
        h[2] += down;
    }

    /// Traffic of `agent` in `minute` (Unix minutes) changed by `up`/`down`.
    pub fn traffic(&mut self, agent: &str, minute: i64, up: i64, down: i64) {
        if up == 0 && down == 0 {
            return;
        }
        let t = entry(&mut self.traffic_hour, agent)
            .entry(minute.div_euclid(60))
            .or_default();
        t[0] += up;
        t[1] += down;
    }

    /// Applies the changes (inside the caller's transaction).
    pub fn apply(&self, tx: &Connection) -> Result<()> {
        let mut conn_hour = tx
            .prepare(
                "INSERT INTO rollup_conn_hour (agent_id, hour, conns, upload, download) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (agent_id, hour) DO UPDATE SET conns = conns + excluded.conns,
                    upload = upload + excluded.upload, download = download + excluded.download",
            )
            .map_err(Error::db("prepare rollup_conn_hour"))?;
        for (agent, hours) in &self.conn_hour {
            for (hour, [c, u, d]) in hours {
                conn_hour
                    .execute(params![agent, hour, c, u, d])
                    .map_err(Error::db("update rollup_conn_hour"))?;
            }
        }
        let mut host = tx
            .prepare(
                "INSERT INTO rollup_host (host, conns, upload, download) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (host) DO UPDATE SET conns = conns + excluded.conns,
                    upload = upload + excluded.upload, download = download + excluded.download",
            )
            .map_err(Error::db("prepare rollup_host"))?;
        for (key, [c, u, d]) in &self.host {
            host.execute(params![key, c, u, d])
                .map_err(Error::db("update rollup_host"))?;
        }
        let mut traffic = tx
            .prepare(
                "INSERT INTO rollup_traffic_hour (hour, agent_id, upload, download) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (hour, agent_id) DO UPDATE SET upload = upload + excluded.upload,
                    download = download + excluded.download",
            )
            .map_err(Error::db("prepare rollup_traffic_hour"))?;
        for (agent, hours) in &self.traffic_hour {
            for (hour, [u, d]) in hours {
                traffic
                    .execute(params![hour, agent, u, d])
                    .map_err(Error::db("update rollup_traffic_hour"))?;
            }
        }
        Ok(())
    }
}

/// Deletes these connections (their traffic goes by cascade) and takes them out of the rollups, inside the
/// caller's transaction. Returns how many rows were deleted.
pub fn delete_connections(tx: &Connection, pks: &[i64]) -> Result<usize> {
    let mut delta = RollupDelta::default();
    let mut row = tx
        .prepare("SELECT agent_id, start_ms, host, destination_ip, upload, download FROM connections WHERE pk = ?1")
        .map_err(Error::db("prepare rollup lookup"))?;
    let mut traffic = tx
        .prepare("SELECT minute, upload, download FROM traffic WHERE conn = ?1")
        .map_err(Error::db("prepare rollup traffic lookup"))?;
    let mut delete = tx
        .prepare("DELETE FROM connections WHERE pk = ?1")
        .map_err(Error::db("prepare delete"))?;
    let mut deleted = 0;
    for &pk in pks {
        let found = row
            .query_row(params![pk], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })
            .map(Some)
            .or_else(|e| {
                if e == rusqlite::Error::QueryReturnedNoRows {
                    Ok(None)
                } else {
                    Err(e)
                }
            })
            .map_err(Error::db("read a connection to delete"))?;
        let Some((agent, start, host, dest, up, down)) = found else {
            continue;
        };
        delta.conn(&agent, start, host_key(&host, &dest), -1, -up, -down);
        let mut rows = traffic
            .query(params![pk])
            .map_err(Error::db("read traffic to delete"))?;
        while let Some(r) = rows.next().map_err(Error::db("read traffic to delete"))? {
            let (minute, u, d): (i64, i64, i64) = (
                r.get(0).map_err(Error::db("traffic"))?,
                r.get(1).map_err(Error::db("traffic"))?,
                r.get(2).map_err(Error::db("traffic"))?,
            );
            delta.traffic(&agent, minute, -u, -d);
        }
        deleted += delete
            .execute(params![pk])
            .map_err(Error::db("delete connection"))?;
    }
    delta.apply(tx)?;
    Ok(deleted)
}

/// Recomputes every rollup from the raw tables (for bulk loads and repairs; a full scan).
pub fn rebuild(conn: &Connection) -> Result<()> {
    conn.execute_batch(
        "DELETE FROM rollup_conn_hour; DELETE FROM rollup_traffic_hour; DELETE FROM rollup_host;
         INSERT INTO rollup_conn_hour (agent_id, hour, conns, upload, download)
             SELECT agent_id, start_ms / 3600000, count(*), sum(upload), sum(download) FROM connections GROUP BY 1, 2;
         INSERT INTO rollup_traffic_hour (hour, agent_id, upload, download)
             SELECT t.minute / 60, c.agent_id, sum(t.upload), sum(t.download)
             FROM traffic t JOIN connections c ON c.pk = t.conn GROUP BY 1, 2;
         INSERT INTO rollup_host (host, conns, upload, download)
             SELECT CASE WHEN host <> '' THEN host ELSE destination_ip END, count(*), sum(upload), sum(download)
             FROM connections GROUP BY 1;",
    )
    .map_err(Error::db("rebuild rollups"))
}
