//! Hourly rollups that make unfiltered aggregates cheap, and the extra indexes the queries want.
//!
//! A 1,000,000-connection database cannot be summed in 50 ms by scanning it, so triggers keep per-hour sums
//! as rows change, inside the writer's own transactions (readers still never write). They are schema
//! migration v2 (`crate::store::schema::MIGRATIONS`); where they are missing, [`has_rollups`] is false and every
//! query takes the raw (slower, equally correct) path.
//!
//! - `rollup_conn_hour (agent_id, hour)`: connections by the hour of their `start_ms`, with their current
//!   totals. Answers unfiltered counts, summary without `from`/`to`, and `/agents` totals.
//! - `rollup_traffic_hour (hour, agent_id)`: the `traffic` deltas by the hour in which they flowed. Answers
//!   unfiltered (or agent-only) byte time series and ranged summaries (edge minutes come from `traffic`).
//!   Its triggers look up the connection's agent, so a connection's traffic is deleted just before the
//!   connection itself (a cascade would run after the parent row is gone).
//!
//! - `rollup_host (host)`: connections by host key (the host, or the destination IP without one), with
//!   their totals. Answers unfiltered `group_by=host` (the dashboard's top hosts) and host filter options.
//!   Rows whose connections are all gone keep `conns = 0` and are skipped.
//!
//! Indexes: `connections_agent_updated` (an agent's `last_active` from an index edge),
//! `connections_agent_start` (`/connections?agent_id=` newest first).

use rusqlite::Connection;

/// Milliseconds per rollup bucket.
pub const HOUR_MS: i64 = crate::timefmt::HOUR_MS;

/// Drops the rollups (tests compare the answers with and without them).
#[cfg(test)]
pub const DROP_SQL: &str = "
DROP TRIGGER rollup_conn_ins; DROP TRIGGER rollup_conn_upd; DROP TRIGGER rollup_conn_del;
DROP TRIGGER rollup_conn_del_traffic; DROP TRIGGER rollup_traffic_ins; DROP TRIGGER rollup_traffic_upd;
DROP TRIGGER rollup_traffic_del; DROP TABLE rollup_conn_hour; DROP TABLE rollup_traffic_hour; DROP TABLE rollup_host;";

/// True when the database has the rollup tables and triggers of schema v2.
pub fn has_rollups(conn: &Connection) -> bool {
    conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger' AND name IN
            ('rollup_conn_ins', 'rollup_conn_upd', 'rollup_conn_del', 'rollup_conn_del_traffic',
             'rollup_traffic_ins', 'rollup_traffic_upd', 'rollup_traffic_del')",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n == 7)
    .unwrap_or(false)
}
