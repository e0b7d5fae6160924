//! Shared test plumbing: temporary directories, waiting with a deadline, reading the database.

use mihomo_connections_tracker::cli::MasterConfig;
use mihomo_connections_tracker::log::Level;
use mihomo_connections_tracker::mihomo::collector::CollectorConfig;
use mihomo_connections_tracker::model::{Bytes, Closed, ConnMeta, ConnectionDiff, Flow};
use mihomo_connections_tracker::store::{self, Access, WriteCmd, Writer, WriterConfig};
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::wait::*;

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("mct-it-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port that was free a moment ago (for a server started later).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A standalone master config for tests: API on 127.0.0.1:0, fast commits.
pub fn master_config(
    db: &Path,
    mihomo: Option<(std::net::SocketAddr, Option<&str>)>,
) -> MasterConfig {
    mihomo_connections_tracker::log::set_level(Level::Warn);
    MasterConfig {
        database: db.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        api_token: None,
        mihomo: mihomo.map(|(addr, token)| CollectorConfig {
            host: addr.ip().to_string(),
            port: addr.port(),
            token: token.map(str::to_string),
            interval_ms: 1000,
        }),
        agent_id: Some("router".into()),
        retention_days: None,
        workers: 2,
        max_body_bytes: 1 << 20,
        commit_interval: Duration::from_millis(30),
        db_cache_kib: 2048,
        log_level: Level::Warn,
        arp_file: "/nonexistent/arp".into(),
        dhcp_leases: "/nonexistent/dhcp.leases".into(),
        metrics: Default::default(),
    }
}

/// Writes `diffs` into `db` as agent `agent_id` with the real writer, and waits until it has stopped.
pub fn write_diffs(db: &Path, agent_id: &str, diffs: impl IntoIterator<Item = ConnectionDiff>) {
    let cfg = WriterConfig {
        agent_id: agent_id.into(),
        ..WriterConfig::default()
    };
    let w = Writer::new(store::open(db, Access::Write).unwrap(), cfg).unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel(8);
    let h = std::thread::spawn(move || w.run(rx));
    for d in diffs {
        tx.send(WriteCmd::Diff(d)).unwrap();
    }
    drop(tx);
    h.join().unwrap().unwrap();
}

/// The whole life of one connection in one change: opened, `bytes` flowed from its start to `to_ms`, then
/// closed at `to_ms` when `closed`.
pub fn whole_connection(meta: ConnMeta, bytes: Bytes, to_ms: i64, closed: bool) -> ConnectionDiff {
    let id = meta.id.clone();
    let flow = Flow {
        id: id.clone(),
        totals: bytes,
        delta: bytes,
        from_ms: meta.start_ms,
        to_ms,
    };
    let end = Closed {
        id,
        end_ms: to_ms,
        totals: bytes,
    };
    ConnectionDiff {
        at_ms: to_ms,
        opened: vec![(meta, Bytes::default())],
        flows: vec![flow],
        closed: if closed { vec![end] } else { Vec::new() },
        ..ConnectionDiff::default()
    }
}

/// One stored connection, as the tests compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub id: String,
    pub upload: i64,
    pub download: i64,
    pub end_ms: Option<i64>,
    pub traffic_up: i64,
    pub traffic_down: i64,
}

/// The rows of `sql` with `params` in the database `db`, each read as a tuple such as `(String, i64)`.
pub fn query<T>(db: &Path, sql: &str, params: impl rusqlite::Params) -> Vec<T>
where
    T: for<'a> TryFrom<&'a rusqlite::Row<'a>, Error = rusqlite::Error>,
{
    let c = Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut s = c.prepare(sql).unwrap();
    let rows = s.query_map(params, |r| T::try_from(r)).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

/// The first row of `sql` in `db`, as a tuple; panics when there is none.
pub fn query_one<T>(db: &Path, sql: &str) -> T
where
    T: for<'a> TryFrom<&'a rusqlite::Row<'a>, Error = rusqlite::Error>,
{
    let mut rows = query(db, sql, []);
    assert!(!rows.is_empty(), "no row from {sql}");
    rows.swap_remove(0)
}

/// Every connection row with the sums of its traffic buckets, ordered by id.
pub fn stored(db: &Path) -> Vec<Stored> {
    let sql = "SELECT c.id, c.upload, c.download, c.end_ms,
            coalesce((SELECT sum(upload) FROM traffic WHERE conn = c.pk), 0),
            coalesce((SELECT sum(download) FROM traffic WHERE conn = c.pk), 0)
         FROM connections c ORDER BY c.id";
    let rows: Vec<(String, i64, i64, Option<i64>, i64, i64)> = query(db, sql, []);
    rows.into_iter()
        .map(
            |(id, upload, download, end_ms, traffic_up, traffic_down)| Stored {
                id,
                upload,
                download,
                end_ms,
                traffic_up,
                traffic_down,
            },
        )
        .collect()
}

/// [`stored`], or no rows while the database file is not there yet.
pub fn stored_so_far(db: &Path) -> Vec<Stored> {
    if db.exists() {
        stored(db)
    } else {
        Vec::new()
    }
}

/// Waits until the stored rows satisfy `pred`; returns them.
pub fn wait_stored(db: &Path, what: &str, pred: impl Fn(&[Stored]) -> bool) -> Vec<Stored> {
    wait_for(what, || {
        let rows = stored_so_far(db);
        if pred(&rows) {
            Ok(rows)
        } else {
            Err(RowsSeen(rows))
        }
    })
}

/// Stored rows as a timeout message shows them: how many, how many open, the first few.
struct RowsSeen(Vec<Stored>);

impl std::fmt::Display for RowsSeen {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let rows = &self.0;
        let open = rows.iter().filter(|r| r.end_ms.is_none()).count();
        write!(
            f,
            "{} rows, {open} open; first rows {:?}",
            rows.len(),
            &rows[..rows.len().min(3)]
        )
    }
}

/// Shorthand: (id, upload, download, open?) of every row.
pub fn summary(rows: &[Stored]) -> Vec<(String, i64, i64, bool)> {
    rows.iter()
        .map(|r| (r.id.clone(), r.upload, r.download, r.end_ms.is_none()))
        .collect()
}

/// The rows are `want` as [`summary`] shows them, and their traffic adds up to their totals.
#[track_caller]
pub fn assert_stored(rows: &[Stored], want: &[(&str, i64, i64, bool)]) {
    let want: Vec<(String, i64, i64, bool)> = want
        .iter()
        .map(|&(id, up, down, open)| (id.to_string(), up, down, open))
        .collect();
    assert_eq!(summary(rows), want);
    assert_traffic_matches_totals(rows);
}

/// Traffic buckets always add up to the totals: the invariant behind honest time series.
pub fn assert_traffic_matches_totals(rows: &[Stored]) {
    for r in rows {
        assert_eq!(
            (r.traffic_up, r.traffic_down),
            (r.upload, r.download),
            "traffic of {}",
            r.id
        );
    }
}
