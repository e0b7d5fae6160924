//! The database file: opening it safely, pragmas, and the schema with its migrations.
//!
//! Times are UTC milliseconds since the Unix epoch (`*_ms` columns). Bytes are counted twice on purpose:
//! `connections.upload/download` hold the final (or latest) totals, and `traffic` holds the deltas per
//! minute in which they flowed, so a time series shows when bytes moved. Every change to a connection or to
//! its traffic rows sets `seq` (a durable, monotonic change counter) so an agent can sync by cursor.
//!
//! Migrations run in order from `PRAGMA user_version`; a file newer than this binary or not one of ours is
//! refused, untouched.

use crate::error::{Error, Result};
use rusqlite::Connection;
use std::path::Path;

/// `PRAGMA application_id` of our files ("MCT1").
pub const APPLICATION_ID: i32 = 0x4d43_5431;

/// One entry per schema version; entry `i` upgrades `user_version` i to i+1. Never edit a released entry:
/// append a new one.
pub const MIGRATIONS: &[&str] = &[
    // v1
    r#"
CREATE TABLE connections (
    pk                 INTEGER PRIMARY KEY,
    agent_id           TEXT    NOT NULL,
    id                 TEXT    NOT NULL,
    start_ms           INTEGER NOT NULL,
    end_ms             INTEGER,
    last_updated_ms    INTEGER NOT NULL,
    upload             INTEGER NOT NULL DEFAULT 0,
    download           INTEGER NOT NULL DEFAULT 0,
    network            TEXT    NOT NULL DEFAULT '',
    conn_type          TEXT    NOT NULL DEFAULT '',
    source_ip          TEXT    NOT NULL DEFAULT '',
    source_port        TEXT    NOT NULL DEFAULT '',
    destination_ip     TEXT    NOT NULL DEFAULT '',
    destination_port   TEXT    NOT NULL DEFAULT '',
    source_geoip       TEXT    NOT NULL DEFAULT 'null',
    destination_geoip  TEXT    NOT NULL DEFAULT 'null',
    source_ip_asn      TEXT    NOT NULL DEFAULT '',
    destination_ip_asn TEXT    NOT NULL DEFAULT '',
    inbound_ip         TEXT    NOT NULL DEFAULT '',
    inbound_port       TEXT    NOT NULL DEFAULT '',
    inbound_name       TEXT    NOT NULL DEFAULT '',
    inbound_user       TEXT    NOT NULL DEFAULT '',
    host               TEXT    NOT NULL DEFAULT '',
    dns_mode           TEXT    NOT NULL DEFAULT '',
    uid                INTEGER NOT NULL DEFAULT 0,
    process            TEXT    NOT NULL DEFAULT '',
    process_path       TEXT    NOT NULL DEFAULT '',
    special_proxy      TEXT    NOT NULL DEFAULT '',
    special_rules      TEXT    NOT NULL DEFAULT '',
    remote_destination TEXT    NOT NULL DEFAULT '',
    dscp               INTEGER NOT NULL DEFAULT 0,
    sniff_host         TEXT    NOT NULL DEFAULT '',
    rematch_name       TEXT    NOT NULL DEFAULT '',
    chains             TEXT    NOT NULL DEFAULT '[]',
    provider_chains    TEXT    NOT NULL DEFAULT '[]',
    node               TEXT    NOT NULL DEFAULT '',
    policy             TEXT    NOT NULL DEFAULT '',
    rule               TEXT    NOT NULL DEFAULT '',
    rule_payload       TEXT    NOT NULL DEFAULT '',
    seq                INTEGER NOT NULL DEFAULT 0,
    UNIQUE (agent_id, id)
);
CREATE INDEX connections_start ON connections (start_ms);
CREATE INDEX connections_open ON connections (agent_id) WHERE end_ms IS NULL;
CREATE INDEX connections_seq ON connections (seq);

CREATE TABLE traffic (
    conn     INTEGER NOT NULL REFERENCES connections (pk) ON DELETE CASCADE,
    minute   INTEGER NOT NULL,
    upload   INTEGER NOT NULL,
    download INTEGER NOT NULL,
    seq      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (conn, minute)
) WITHOUT ROWID;
CREATE INDEX traffic_minute ON traffic (minute, upload, download);

CREATE TABLE agents (
    agent_id      TEXT PRIMARY KEY,
    first_seen_ms INTEGER NOT NULL,
    last_sync_ms  INTEGER,
    last_data_ms  INTEGER,
    sync_count    INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
"#,
    // v2: hourly rollups, kept by every writer in the same transaction (`crate::store::rollup`), so
    // unfiltered aggregates over millions of rows stay fast (`crate::api::rollup`), and the indexes of
    // `/agents` and `/connections?agent_id=`.
    r#"
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
CREATE INDEX connections_agent_updated ON connections (agent_id, last_updated_ms);
CREATE INDEX connections_agent_start ON connections (agent_id, start_ms);
"#,
    // v3: `traffic_minute` keyed by (minute, conn) instead of (minute, upload, download). It still covers every
    // query of a minute range (they read conn, upload and download), but new rows land at the end of their
    // minute (`conn` only grows) instead of anywhere in it by byte count: a master's commit of thousands of
    // connections dirtied (and wrote to the WAL, then checkpointed) most of the index's recent pages, about
    // half of its ingest time (README "Performance").
    r#"
DROP INDEX traffic_minute;
CREATE INDEX traffic_minute ON traffic (minute, conn, upload, download);
"#,
    // v4: the start indexes hold the minute a connection started (`start_ms / 60000`, then the rowid), not
    // its exact time. A master's sync batches carry connections that started anywhere in the last minutes or
    // hours, so exact times landed all over both indexes: each commit dirtied (and wrote to the WAL, then
    // checkpointed) most of their recent pages, a third of the writer's time. By minute, a new row lands at
    // the end of its minute. Queries say their `start_ms` conditions on the minute too, and order by the
    // minute first ([`start_minute`]).
    r#"
DROP INDEX connections_start;
DROP INDEX connections_agent_start;
CREATE INDEX connections_start_minute ON connections (start_ms / 60000);
CREATE INDEX connections_agent_start_minute ON connections (agent_id, start_ms / 60000);
"#,
];

/// The minute the start indexes hold for a time (`start_ms / 60000` in SQL, schema v4), for bound values.
/// SQLite searches an index on an expression only for conditions and orderings written with that same
/// expression, so a query on `start_ms` says it on the minute too: `start_ms / 60000 BETWEEN lo / 60000
/// AND (hi - 1) / 60000` next to `start_ms >= lo AND start_ms < hi` (integer division truncates the same
/// way in SQLite and Rust, and keeps the order), and `ORDER BY start_ms / 60000, start_ms`
/// (`crate::api::params::START_IN`, `START_ORDER`).
pub const fn start_minute(ms: i64) -> i64 {
    ms / 60_000
}

/// How a connection to the database will be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The writer: creates the file (mode 0600), runs migrations.
    Write,
    /// Readers (HTTP workers, the sync thread): never write, never migrate.
    Read,
}

/// Opens the database at `path`, refusing files that are not SQLite or not ours, and applying migrations when
/// opened for writing.
pub fn open(path: &Path, access: Access) -> Result<Connection> {
    check_header(path)?;
    if access == Access::Write && !path.exists() {
        create_private(path)?;
    }
    let flags = match access {
        Access::Write => {
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
        }
        Access::Read => rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    } | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let name = path.display().to_string();
    let conn =
        Connection::open_with_flags(path, flags).map_err(Error::db(format!("open {name}")))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(Error::db("busy_timeout"))?;
    // Small page cache: routers have little RAM; the OS cache does the rest.
    conn.execute_batch(
        "PRAGMA cache_size = -1024; PRAGMA temp_store = MEMORY; PRAGMA foreign_keys = ON;",
    )
    .map_err(Error::db("pragmas"))?;
    match access {
        Access::Write => {
            conn.execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA cache_spill = OFF;",
            )
            .map_err(Error::db(format!("enable WAL on {name}")))?;
            migrate(&conn, &name)?;
        }
        Access::Read => {
            conn.execute_batch("PRAGMA query_only = ON;")
                .map_err(Error::db("query_only"))?;
            let v = user_version(&conn)?;
            if v as usize != MIGRATIONS.len() {
                return Err(Error::Schema(format!(
                    "{name} has schema version {v}, this binary expects {}",
                    MIGRATIONS.len()
                )));
            }
        }
    }
    Ok(conn)
}

fn user_version(conn: &Connection) -> Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(Error::db("read user_version"))
}

/// Refuses, without touching it, a file that exists, is non-empty and does not start with SQLite's magic.
fn check_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::Io(format!("open database {}", path.display()), e)),
    };
    let mut head = [0u8; 16];
    let n = f
        .read(&mut head)
        .map_err(Error::io(format!("read database {}", path.display())))?;
    if n == 0 {
        return Ok(());
    }
    if n < 16 || &head != b"SQLite format 3\0" {
        return Err(Error::Schema(format!(
            "{} is not a SQLite database; refusing to touch it",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(unix)]
fn create_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .or_else(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(Error::io(format!("create database {}", path.display())))
}

#[cfg(not(unix))]
fn create_private(_path: &Path) -> Result<()> {
    Ok(())
}

fn migrate(conn: &Connection, name: &str) -> Result<()> {
    let version = user_version(conn)?;
    let app_id: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(Error::db("read application_id"))?;
    let tables: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .map_err(Error::db(format!("read schema of {name}")))?;
    if app_id != APPLICATION_ID && (tables > 0 || version > 0) {
        return Err(Error::Schema(format!(
            "{name} is a SQLite database of another program; refusing to touch it"
        )));
    }
    if version as usize > MIGRATIONS.len() {
        return Err(Error::Schema(format!(
            "{name} has schema version {version}, newer than this binary ({}); upgrade the binary",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn
            .unchecked_transaction()
            .map_err(Error::db("begin migration"))?;
        tx.execute_batch(sql)
            .map_err(Error::db(format!("migrate {name} to version {}", i + 1)))?;
        tx.execute_batch(&format!(
            "PRAGMA user_version = {}; PRAGMA application_id = {APPLICATION_ID};",
            i + 1
        ))
        .map_err(Error::db("set user_version"))?;
        tx.commit().map_err(Error::db("commit migration"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("mct-schema-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("t.db")
    }

    #[test]
    fn creates_migrates_and_reopens() {
        let p = tmp("create");
        let c = open(&p, Access::Write).unwrap();
        assert_eq!(user_version(&c).unwrap() as usize, MIGRATIONS.len());
        drop(c);
        open(&p, Access::Write).unwrap();
        open(&p, Access::Read).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    /// A file of every earlier version migrates to the latest with its rows intact, the minute-range query
    /// of the stats walks the v3 `traffic_minute` index, and start times are searched and ordered through
    /// the v4 start indexes.
    #[test]
    fn migrates_each_earlier_version_with_its_data() {
        for from in 1..MIGRATIONS.len() {
            let p = tmp(&format!("from-v{from}"));
            {
                let c = Connection::open(&p).unwrap();
                for sql in &MIGRATIONS[..from] {
                    c.execute_batch(sql).unwrap();
                }
                c.execute_batch(&format!(
                    "PRAGMA user_version = {from}; PRAGMA application_id = {APPLICATION_ID};
                     INSERT INTO connections (pk, agent_id, id, start_ms, last_updated_ms, upload, download)
                         VALUES (7, 'a', 'c1', 60000, 180000, 5, 50);
                     INSERT INTO traffic (conn, minute, upload, download) VALUES (7, 1, 2, 20), (7, 2, 3, 30);"
                ))
                .unwrap();
            }
            let c = open(&p, Access::Write).unwrap();
            assert_eq!(user_version(&c).unwrap() as usize, MIGRATIONS.len());
            let sums: (i64, i64, i64) = c
                .query_row(
                    "SELECT count(*), sum(upload), sum(download) FROM traffic WHERE minute >= 0 AND minute < 10",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .unwrap();
            assert_eq!(sums, (2, 5, 50), "from v{from}");
            let plan: String = c
                .query_row(
                    "EXPLAIN QUERY PLAN SELECT conn, upload, download FROM traffic WHERE minute >= 0 AND minute < 10",
                    [],
                    |r| r.get(3),
                )
                .unwrap();
            assert!(plan.contains("COVERING INDEX traffic_minute"), "{plan}");
            let sql: String = c
                .query_row(
                    "SELECT sql FROM sqlite_schema WHERE name = 'traffic_minute'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert!(sql.contains("(minute, conn, upload, download)"), "{sql}");
            // v4: the start indexes hold the minute, and the queries' start conditions and order search them
            use crate::api::params::{start_in, START_IN, START_ORDER};
            let plan = |sql: &str, vals: Vec<rusqlite::types::Value>| -> String {
                let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
                let rows =
                    st.query_map(rusqlite::params_from_iter(vals), |r| r.get::<_, String>(3));
                rows.unwrap()
                    .map(|r| r.unwrap())
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            let range = plan(
                &format!("SELECT c.pk FROM connections c WHERE {START_IN}"),
                start_in(0, 120_000),
            );
            assert!(
                range.contains("USING INDEX connections_start_minute (<expr>>? AND <expr><?)"),
                "{range}"
            );
            let mut vals = vec![rusqlite::types::Value::Text("a".into())];
            vals.extend(start_in(0, 120_000));
            let agent = plan(
                &format!("SELECT c.pk FROM connections c WHERE c.agent_id = ? AND {START_IN}"),
                vals,
            );
            assert!(agent.contains("USING INDEX connections_agent_start_minute (agent_id=? AND <expr>>? AND <expr><?)"), "{agent}");
            let order = START_ORDER
                .iter()
                .map(|t| format!("{t} DESC"))
                .collect::<Vec<_>>()
                .join(", ");
            // Newest first (`/connections`): with a condition on the minute (the whole range when none is asked
            // for), SQLite walks the index and sorts only the last minutes; without one it sorts every row.
            let newest = plan(
                &format!("SELECT c.* FROM connections c WHERE {START_IN} ORDER BY {order}, c.pk DESC LIMIT 100"),
                start_in(i64::MIN / 4, i64::MAX / 4),
            );
            assert!(
                newest.contains("USING INDEX connections_start_minute"),
                "{newest}"
            );
            assert!(
                newest.contains("USE TEMP B-TREE FOR LAST 2 TERMS OF ORDER BY"),
                "{newest}"
            );
            let rows: Vec<i64> = c
                .prepare(&format!("SELECT c.pk FROM connections c WHERE {START_IN}"))
                .unwrap()
                .query_map(rusqlite::params_from_iter(start_in(60_000, 60_001)), |r| {
                    r.get(0)
                })
                .unwrap()
                .map(|r| r.unwrap())
                .collect();
            assert_eq!(rows, [7], "from v{from}");
            drop(c);
            open(&p, Access::Read).unwrap();
        }
    }

    /// The metadata fields declared in `crate::model` are the columns of `connections`, with their types and
    /// defaults (the migrations stay literal: a released one never changes).
    #[test]
    fn declared_fields_are_the_connection_columns() {
        use crate::model::{ConnMeta, Field, FieldValue, Kind};
        let c = open(&tmp("fields"), Access::Write).unwrap();
        let mut st = c
            .prepare("SELECT name, type, dflt_value FROM pragma_table_info('connections')")
            .unwrap();
        let columns: Vec<(String, String, Option<String>)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        for f in Field::ALL {
            let (_, ty, default) = columns
                .iter()
                .find(|(name, _, _)| name == f.column())
                .unwrap_or_else(|| panic!("{f:?}: no column {}", f.column()));
            let want_ty = match f.kind() {
                Kind::Text => "TEXT",
                Kind::Int => "INTEGER",
            };
            assert_eq!(ty, want_ty, "{f:?}");
            let want_default = match f.default_value() {
                FieldValue::Text(t) => format!("'{t}'"),
                FieldValue::Int(i) => i.to_string(),
            };
            assert_eq!(default.as_deref(), Some(want_default.as_str()), "{f:?}");
        }
        let listed: Vec<&str> = ConnMeta::SQL_COLUMNS.split(", ").collect();
        assert_eq!(listed.len(), 1 + Field::COUNT);
        assert_eq!(listed[0], "start_ms");
        // every other column is the row's own (key, times, totals, change counter)
        let own = [
            "pk",
            "agent_id",
            "id",
            "start_ms",
            "end_ms",
            "last_updated_ms",
            "upload",
            "download",
            "seq",
        ];
        for (name, _, _) in &columns {
            assert!(
                own.contains(&name.as_str()) || Field::ALL.iter().any(|f| f.column() == name),
                "column {name} is not declared"
            );
        }
    }

    #[test]
    fn refuses_non_sqlite_file_untouched() {
        let p = tmp("garbage");
        std::fs::write(&p, b"this is not a database, it is a shopping list\n").unwrap();
        let err = open(&p, Access::Write).unwrap_err().to_string();
        assert!(err.contains("not a SQLite database"), "{err}");
        assert_eq!(
            std::fs::read(&p).unwrap(),
            b"this is not a database, it is a shopping list\n"
        );
    }

    #[test]
    fn refuses_foreign_sqlite_file() {
        let p = tmp("foreign");
        Connection::open(&p)
            .unwrap()
            .execute_batch("CREATE TABLE x (a)")
            .unwrap();
        let err = open(&p, Access::Write).unwrap_err().to_string();
        assert!(err.contains("another program"), "{err}");
    }
}
