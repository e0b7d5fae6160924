//! Hourly rollups that make unfiltered aggregates cheap, and the extra indexes the queries want.
//!
//! A 1,000,000-connection database cannot be summed in 50 ms by scanning it, so every writer keeps per-hour sums
//! as rows change, inside the writer's own transactions (readers still never write). They are schema
//! migration v2 (`crate::store::schema::MIGRATIONS`); where they are missing, [`has_rollups`] is false and every
//! query takes the raw (slower, equally correct) path.
//!
//! - `rollup_conn_hour (agent_id, hour)`: connections by the hour of their `start_ms`, with their current
//!   totals. Answers unfiltered counts, summary without `from`/`to`, and `/agents` totals.
//! - `rollup_traffic_hour (hour, agent_id)`: the `traffic` deltas by the hour in which they flowed. Answers
//!   unfiltered (or agent-only) byte time series and ranged summaries (edge minutes come from `traffic`).
//!
//! - `rollup_host (host)`: connections by host key (the host, or the destination IP without one), with
//!   their totals. Answers unfiltered `group_by=host` (the dashboard's top hosts) and host filter options.
//!   Rows whose connections are all gone keep `conns = 0` and are skipped.
//!
//! Indexes: `connections_agent_updated` (an agent's `last_active` from an index edge),
//! `connections_agent_start_minute` (`/connections?agent_id=` newest first).

use rusqlite::Connection;

/// Milliseconds per rollup bucket.
pub const HOUR_MS: i64 = crate::timefmt::HOUR_MS;

/// Drops the rollups (tests compare the answers with and without them).
#[cfg(test)]
pub const DROP_SQL: &str =
    "DROP TABLE rollup_conn_hour; DROP TABLE rollup_traffic_hour; DROP TABLE rollup_host;";

/// True when the database has the rollup tables of schema v2.
pub fn has_rollups(conn: &Connection) -> bool {
    conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name IN
            ('rollup_conn_hour', 'rollup_traffic_hour', 'rollup_host')",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n == 3)
    .unwrap_or(false)
}
