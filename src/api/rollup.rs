//! Hourly rollups that make unfiltered aggregates cheap, and the extra indexes the queries want.
//!
//! A 1,000,000-connection database cannot be summed in 50 ms by scanning it, so triggers keep per-hour sums
//! as rows change, inside the writer's own transactions (readers still never write). [`EXTRA_SCHEMA_SQL`]
//! must be appended to schema migration v1; until it is, [`has_rollups`] is false and every query takes the
//! raw (slower, equally correct) path.
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

/// SQL to add to schema migration v1 (tables, triggers, indexes). Idempotent only in the sense that a
/// migration runs once: it uses plain `CREATE`.
pub const EXTRA_SCHEMA_SQL: &str = r#"
CREATE TABLE rollup_conn_hour (
    agent_id TEXT    NOT NULL,
    hour     INTEGER NOT NULL,
    conns    INTEGER NOT NULL DEFAULT 0,
    upload   INTEGER NOT NULL DEFAULT 0,
    download INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (agent_id, hour)
) WITHOUT ROWID;
CREATE TABLE rollup_traffic_hour (
    hour     INTEGER NOT NULL,
    agent_id TEXT    NOT NULL,
    upload   INTEGER NOT NULL DEFAULT 0,
    download INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, agent_id)
) WITHOUT ROWID;
CREATE TABLE rollup_host (
    host     TEXT    PRIMARY KEY,
    conns    INTEGER NOT NULL DEFAULT 0,
    upload   INTEGER NOT NULL DEFAULT 0,
    download INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TRIGGER rollup_conn_ins AFTER INSERT ON connections BEGIN
    INSERT INTO rollup_conn_hour (agent_id, hour, conns, upload, download)
    VALUES (NEW.agent_id, NEW.start_ms / 3600000, 1, NEW.upload, NEW.download)
    ON CONFLICT (agent_id, hour) DO UPDATE SET conns = conns + 1,
        upload = upload + excluded.upload, download = download + excluded.download;
    INSERT INTO rollup_host (host, conns, upload, download)
    VALUES (CASE WHEN NEW.host <> '' THEN NEW.host ELSE NEW.destination_ip END, 1, NEW.upload, NEW.download)
    ON CONFLICT (host) DO UPDATE SET conns = conns + 1,
        upload = upload + excluded.upload, download = download + excluded.download;
END;
CREATE TRIGGER rollup_conn_upd AFTER UPDATE OF upload, download, start_ms, agent_id, host, destination_ip
ON connections
WHEN OLD.upload <> NEW.upload OR OLD.download <> NEW.download OR OLD.start_ms <> NEW.start_ms
    OR OLD.agent_id <> NEW.agent_id OR OLD.host <> NEW.host OR OLD.destination_ip <> NEW.destination_ip BEGIN
    UPDATE rollup_conn_hour SET conns = conns - 1, upload = upload - OLD.upload,
        download = download - OLD.download
    WHERE agent_id = OLD.agent_id AND hour = OLD.start_ms / 3600000;
    INSERT INTO rollup_conn_hour (agent_id, hour, conns, upload, download)
    VALUES (NEW.agent_id, NEW.start_ms / 3600000, 1, NEW.upload, NEW.download)
    ON CONFLICT (agent_id, hour) DO UPDATE SET conns = conns + 1,
        upload = upload + excluded.upload, download = download + excluded.download;
    UPDATE rollup_host SET conns = conns - 1, upload = upload - OLD.upload, download = download - OLD.download
    WHERE host = (CASE WHEN OLD.host <> '' THEN OLD.host ELSE OLD.destination_ip END);
    INSERT INTO rollup_host (host, conns, upload, download)
    VALUES (CASE WHEN NEW.host <> '' THEN NEW.host ELSE NEW.destination_ip END, 1, NEW.upload, NEW.download)
    ON CONFLICT (host) DO UPDATE SET conns = conns + 1,
        upload = upload + excluded.upload, download = download + excluded.download;
END;
CREATE TRIGGER rollup_conn_del AFTER DELETE ON connections BEGIN
    UPDATE rollup_conn_hour SET conns = conns - 1, upload = upload - OLD.upload,
        download = download - OLD.download
    WHERE agent_id = OLD.agent_id AND hour = OLD.start_ms / 3600000;
    UPDATE rollup_host SET conns = conns - 1, upload = upload - OLD.upload, download = download - OLD.download
    WHERE host = (CASE WHEN OLD.host <> '' THEN OLD.host ELSE OLD.destination_ip END);
END;
CREATE TRIGGER rollup_conn_del_traffic BEFORE DELETE ON connections BEGIN
    DELETE FROM traffic WHERE conn = OLD.pk;
END;
CREATE TRIGGER rollup_traffic_ins AFTER INSERT ON traffic BEGIN
    INSERT INTO rollup_traffic_hour (hour, agent_id, upload, download)
    VALUES (NEW.minute / 60, (SELECT agent_id FROM connections WHERE pk = NEW.conn), NEW.upload, NEW.download)
    ON CONFLICT (hour, agent_id) DO UPDATE SET upload = upload + excluded.upload,
        download = download + excluded.download;
END;
CREATE TRIGGER rollup_traffic_upd AFTER UPDATE OF upload, download, minute, conn ON traffic BEGIN
    UPDATE rollup_traffic_hour SET upload = upload - OLD.upload, download = download - OLD.download
    WHERE hour = OLD.minute / 60 AND agent_id = (SELECT agent_id FROM connections WHERE pk = OLD.conn);
    INSERT INTO rollup_traffic_hour (hour, agent_id, upload, download)
    VALUES (NEW.minute / 60, (SELECT agent_id FROM connections WHERE pk = NEW.conn), NEW.upload, NEW.download)
    ON CONFLICT (hour, agent_id) DO UPDATE SET upload = upload + excluded.upload,
        download = download + excluded.download;
END;
CREATE TRIGGER rollup_traffic_del AFTER DELETE ON traffic BEGIN
    UPDATE rollup_traffic_hour SET upload = upload - OLD.upload, download = download - OLD.download
    WHERE hour = OLD.minute / 60 AND agent_id = (SELECT agent_id FROM connections WHERE pk = OLD.conn);
END;
CREATE INDEX connections_agent_updated ON connections (agent_id, last_updated_ms);
CREATE INDEX connections_agent_start ON connections (agent_id, start_ms);
"#;

/// True when the database has the rollup tables of [`EXTRA_SCHEMA_SQL`].
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
