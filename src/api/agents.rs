//! `GET /api/v1/agents` and `GET /api/v1/agents/{id}/status`: one row per agent with real activity.
//!
//! An agent is any id in table `agents` (filled by `/sync`) or in `connections` (the local collector of a
//! standalone master has no `agents` row). `last_active` is the newest of its last successful sync and the
//! newest `last_updated` of its connections; it is `active` when that is at most [`ACTIVE_WINDOW_MS`] old.

use super::params::{ApiError, ApiResult};
use super::table::{Answer, Table};
use crate::timefmt::format_rfc3339;
use rusqlite::{Connection, OptionalExtension};
use serde_json::{json, Value};

/// An agent whose last sync or data is at most this old is `active`.
pub const ACTIVE_WINDOW_MS: i64 = 5 * 60_000;

/// What we know of one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    pub id: String,
    pub connections: i64,
    pub upload: i64,
    pub download: i64,
    pub last_active_ms: Option<i64>,
    pub last_sync_ms: Option<i64>,
    pub first_seen_ms: Option<i64>,
}

impl AgentInfo {
    /// Within the activity window at `now_ms`.
    pub fn is_active(&self, now_ms: i64) -> bool {
        self.last_active_ms
            .is_some_and(|t| now_ms - t <= ACTIVE_WINDOW_MS)
    }

    fn fields(&self, now_ms: i64) -> Vec<(&'static str, Value)> {
        let time = |t: Option<i64>| t.map_or(Value::Null, |t| json!(format_rfc3339(t, true)));
        vec![
            ("id", json!(self.id)),
            ("last_active", time(self.last_active_ms)),
            ("connections_count", json!(self.connections)),
            ("total_download", json!(self.download)),
            ("total_upload", json!(self.upload)),
            ("total_traffic", json!(self.download + self.upload)),
            (
                "status",
                json!(if self.is_active(now_ms) {
                    "active"
                } else {
                    "inactive"
                }),
            ),
            ("last_sync", time(self.last_sync_ms)),
            ("first_seen", time(self.first_seen_ms)),
        ]
    }
}

/// Every agent id, sorted: from `agents` and, by an index skip-scan, from `connections`.
fn agent_ids(db: &Connection) -> ApiResult<Vec<String>> {
    let mut stmt = db.prepare(
        "WITH RECURSIVE a(id) AS (
            SELECT min(agent_id) FROM connections
            UNION ALL
            SELECT (SELECT min(agent_id) FROM connections WHERE agent_id > a.id) FROM a WHERE a.id IS NOT NULL
         )
         SELECT id FROM a WHERE id IS NOT NULL UNION SELECT agent_id FROM agents ORDER BY 1",
    )?;
    let ids = stmt.query_map([], |r| r.get(0))?;
    Ok(ids.collect::<Result<Vec<String>, _>>()?)
}

/// One agent, or None when nothing is known of it.
pub fn info(db: &Connection, rollups: bool, id: &str) -> ApiResult<Option<AgentInfo>> {
    let row: Option<(i64, Option<i64>, Option<i64>)> = db
        .query_row(
            "SELECT first_seen_ms, last_sync_ms, last_data_ms FROM agents WHERE agent_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let sums = if rollups {
        "SELECT coalesce(sum(conns), 0), coalesce(sum(upload), 0), coalesce(sum(download), 0)
         FROM rollup_conn_hour WHERE agent_id = ?1"
    } else {
        "SELECT count(*), coalesce(sum(upload), 0), coalesce(sum(download), 0)
         FROM connections WHERE agent_id = ?1"
    };
    let (n, up, down): (i64, i64, i64) =
        db.query_row(sums, [id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    let newest: Option<i64> = db.query_row(
        "SELECT max(last_updated_ms) FROM connections WHERE agent_id = ?1",
        [id],
        |r| r.get(0),
    )?;
    // With rollups a deleted agent could keep an all-zero rollup row; "known" means a row somewhere.
    if row.is_none() && newest.is_none() {
        return Ok(None);
    }
    let (first_seen, last_sync, last_data) = row.unwrap_or((0, None, None));
    let last_active = [last_sync, last_data, newest].into_iter().flatten().max();
    Ok(Some(AgentInfo {
        id: id.to_string(),
        connections: n,
        upload: up,
        download: down,
        last_active_ms: last_active,
        last_sync_ms: last_sync,
        first_seen_ms: row.map(|_| first_seen),
    }))
}

/// `GET /agents`.
pub fn list(db: &Connection, rollups: bool, now_ms: i64) -> ApiResult<Answer> {
    let mut table: Option<Table> = None;
    for id in agent_ids(db)? {
        if let Some(a) = info(db, rollups, &id)? {
            let fields = a.fields(now_ms);
            let t = table.get_or_insert_with(|| Table::new(fields.iter().map(|(k, _)| *k)));
            t.rows.push(fields.into_iter().map(|(_, v)| v).collect());
        }
    }
    Ok(Answer::Data(table.map_or("[]".into(), |t| t.to_json())))
}

/// `GET /agents/{id}/status`.
pub fn status(db: &Connection, rollups: bool, id: &str, now_ms: i64) -> ApiResult<Answer> {
    let a = info(db, rollups, id)?.ok_or_else(|| {
        ApiError::status(
            404,
            format!("no agent with id '{}'", super::params::clip(id)),
        )
    })?;
    let mut obj = serde_json::Map::new();
    for (k, v) in a.fields(now_ms) {
        obj.insert(k.into(), v);
    }
    obj.insert("is_active".into(), json!(a.is_active(now_ms)));
    let counts = |sql: &str, field: &str| -> ApiResult<Value> {
        let mut stmt = db.prepare(sql)?;
        let rows = stmt.query_map([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (k, n) = row?;
            out.push(json!({field: k, "count": n}));
        }
        Ok(Value::Array(out))
    };
    obj.insert(
        "networks".into(),
        counts(
            "SELECT network, count(*) AS n FROM connections WHERE agent_id = ?1 GROUP BY 1 ORDER BY n DESC, 1",
            "network",
        )?,
    );
    obj.insert(
        "rules".into(),
        counts(
            "SELECT rule, count(*) AS n FROM connections WHERE agent_id = ?1 GROUP BY 1 ORDER BY n DESC, 1",
            "rule",
        )?,
    );
    Ok(Answer::Data(Value::Object(obj).to_string()))
}
