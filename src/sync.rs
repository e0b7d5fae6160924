//! The agent's side of syncing to a master: one thread that pushes the local database to
//! `POST {master}/api/v1/sync`, batch after batch, and never loses or skips a row.
//!
//! # What to send: a cursor over the change counter
//! The writer stamps every changed `connections` row and every changed `traffic` row with the commit's `seq`
//! (strictly increasing, durable). Rows are read in `(seq, pk)` order after the cursor, at most `batch_rows`
//! at a time, in one read transaction (a consistent snapshot). Once the master answers 2xx the cursor moves to
//! the last row sent and is stored in table `meta` (key [`CURSOR_KEY`]) through the writer.
//!
//! Why nothing is skipped: a commit's `seq` is larger than every `seq` that existed before it, so a row
//! changed while its batch was in flight gets a position after the batch's end and is read again; a batch
//! reads every row between its start and its end. Invariant: every row whose `(seq, pk)` is at or before the
//! cursor has been delivered in its current state. Retention relies on it (`synced` means `<= cursor`).
//!
//! Traffic buckets travel with their connection (`traffic: [[minute_unix_seconds, up, down], ...]`). Which
//! ones: those whose `seq` is above the connection's `seq` when it was last delivered (kept in memory for open
//! connections), or all of them when that is unknown (first delivery, after a restart, closed rows). Filtering
//! by the batch's starting cursor instead would lose buckets: a connection whose buckets changed at commit S
//! and whose row changed again at S+10 without traffic (a close) can be passed over by a batch ending between
//! S and S+10 and then be sent with only buckets newer than that batch's end. A batch is also cut early when
//! it carries more than [`MAX_BATCH_BUCKETS`] buckets, so bodies stay bounded.
//!
//! An empty batch is still posted every interval: it is the heartbeat that lets the master show the agent
//! as active. A full batch is followed at once by the next one, so a backlog drains at the speed of the link.
//!
//! # Failures
//! Master down, unreachable, 5xx: keep collecting, retry with exponential backoff (from `min(interval, 1 s)`
//! up to [`MAX_BACKOFF`], ±20 % jitter). 401/403: the token is wrong; said once at error level, data kept,
//! retried with the same backoff (the master's token may be fixed without restarting us). 413: the batch is
//! halved. Other 4xx: logged, retried. Each state change is logged once, not every try. The stop flag is
//! checked at least every 100 ms while waiting; an HTTP call in flight finishes first (at most `timeout`).

use crate::error::{Error, Result};
use crate::model::ConnMeta;
use crate::store::{Access, WriterHandle};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Key of the sync cursor in table `meta`; the value is `"<seq>:<pk>"`.
pub const CURSOR_KEY: &str = "sync_cursor";
/// The longest wait between two tries while the master is failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A batch is cut before the row that would take it past this many traffic buckets (about 25 bytes each).
pub const MAX_BATCH_BUCKETS: usize = 50_000;
/// How long to wait for the writer to store the cursor.
const WRITER_TIMEOUT: Duration = Duration::from_secs(30);

/// How the agent talks to its master.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    /// `http://host:port`, with or without a trailing `/` or `/api/v1`.
    pub master_url: String,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// The batch's `agent_id` (rows carry their own, normally the same).
    pub agent_id: String,
    /// Time between two syncs when there is no backlog.
    pub interval: Duration,
    /// Rows per batch (default 1000).
    pub batch_rows: usize,
    /// Timeout of one whole HTTP call.
    pub timeout: Duration,
}

impl SyncConfig {
    /// A configuration with the defaults: 30 s interval, 1000 rows per batch, 10 s timeout, no token.
    pub fn new(master_url: impl Into<String>, agent_id: impl Into<String>) -> SyncConfig {
        SyncConfig {
            master_url: master_url.into(),
            token: None,
            agent_id: agent_id.into(),
            interval: Duration::from_secs(30),
            batch_rows: 1000,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Where the link to the master stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// No answer from the master yet.
    Starting = 0,
    /// The last batch was accepted.
    Synced = 1,
    /// Nothing listening, timeout, or a 5xx.
    Unreachable = 2,
    /// The master answered 401 or 403: wrong or missing `--api-token`.
    Unauthorized = 3,
    /// The master refused the batch with another 4xx.
    Rejected = 4,
}

/// What the sync thread has done, readable from other threads (status pages, tests).
#[derive(Debug, Default)]
pub struct SyncStatus {
    state: AtomicU8,
    batches: AtomicU64,
    rows: AtomicU64,
    failures: AtomicU64,
    last_ok_ms: AtomicI64,
    last_error: Mutex<String>,
}

impl SyncStatus {
    /// The current link state.
    pub fn state(&self) -> LinkState {
        match self.state.load(Ordering::SeqCst) {
            1 => LinkState::Synced,
            2 => LinkState::Unreachable,
            3 => LinkState::Unauthorized,
            4 => LinkState::Rejected,
            _ => LinkState::Starting,
        }
    }
    /// Batches the master accepted (heartbeats included).
    pub fn batches_acked(&self) -> u64 {
        self.batches.load(Ordering::SeqCst)
    }
    /// Rows the master accepted (a row sent twice counts twice).
    pub fn rows_acked(&self) -> u64 {
        self.rows.load(Ordering::SeqCst)
    }
    /// Failed tries since the start.
    pub fn failed_attempts(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }
    /// When the master last accepted a batch (UTC ms, 0 = never).
    pub fn last_ok_ms(&self) -> i64 {
        self.last_ok_ms.load(Ordering::SeqCst)
    }
    /// The last failure, in words.
    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }
    fn set_state(&self, s: LinkState) -> LinkState {
        let old = self.state();
        self.state.store(s as u8, Ordering::SeqCst);
        old
    }
    /// Records a failed try that leaves the link in `state`; true when the link was not in it before (a
    /// change worth one log line).
    fn fail(&self, state: LinkState, e: &str) -> bool {
        self.failures.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut g) = self.last_error.lock() {
            *g = e.to_string();
        }
        self.set_state(state) != state
    }
}

/// The sync endpoint for a `--master-url`: accepts `http://h:p`, `http://h:p/`, `http://h:p/api/v1[/]` and
/// the full `.../api/v1/sync`. Only plain `http://` (this build has no TLS).
pub fn sync_endpoint(master_url: &str) -> Result<String> {
    let u = master_url.trim().trim_end_matches('/');
    let lower = u.to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Err(Error::Config(format!(
            "--master-url {master_url:?}: https is not supported by this build; use http:// (e.g. behind a TLS proxy)"
        )));
    }
    if !lower.starts_with("http://") || u.len() <= "http://".len() {
        return Err(Error::Config(format!(
            "--master-url {master_url:?}: expected http://HOST:PORT"
        )));
    }
    let base = u
        .strip_suffix("/api/v1/sync")
        .or_else(|| u.strip_suffix("/api/v1"))
        .unwrap_or(u)
        .trim_end_matches('/');
    Ok(format!("{base}/api/v1/sync"))
}

/// Reads the stored cursor `(seq, pk)`; `None` when nothing was ever synced.
pub fn load_cursor(conn: &Connection) -> Result<Option<(i64, i64)>> {
    let v: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            params![CURSOR_KEY],
            |r| r.get(0),
        )
        .optional()
        .map_err(Error::db("read sync cursor"))?;
    let Some(v) = v else { return Ok(None) };
    let parsed = v
        .split_once(':')
        .and_then(|(s, p)| Some((s.parse().ok()?, p.parse().ok()?)));
    match parsed {
        Some(c) => Ok(Some(c)),
        None => Err(Error::Schema(format!(
            "meta {CURSOR_KEY} is {v:?}, expected \"<seq>:<pk>\""
        ))),
    }
}

/// Stores the cursor (on the writer's connection).
pub fn store_cursor(conn: &Connection, cursor: (i64, i64)) -> Result<()> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![CURSOR_KEY, format!("{}:{}", cursor.0, cursor.1)],
    )
    .map(drop)
    .map_err(Error::db("store sync cursor"))
}

/// One record in our wire format (see [`crate::api::ingest`]): the connection's metadata under its column names,
/// times as RFC 3339, and the traffic rows to merge.
#[derive(Serialize, Debug)]
pub struct OutRecord {
    pub agent_id: String,
    pub download: i64,
    pub upload: i64,
    pub last_updated: String,
    pub start: String,
    pub end: Option<String>,
    #[serde(flatten)]
    pub meta: ConnMeta,
    pub traffic: Vec<[i64; 3]>,
}

#[derive(Serialize)]
struct OutBatch<'a> {
    agent_id: &'a str,
    timestamp: String,
    connections: &'a [OutRecord],
}

/// Rows read after a cursor, ready to send.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<OutRecord>,
    /// `(pk, seq, open)` of each record, in order.
    pub keys: Vec<(i64, i64, bool)>,
    /// The cursor after this batch (the last row's `(seq, pk)`), or the starting cursor when empty.
    pub end: (i64, i64),
    /// True when more rows may be waiting (the batch was cut by a limit).
    pub full: bool,
}

/// The connection's `seq` when it was last delivered, for open connections only.
pub type Delivered = HashMap<i64, i64>;

/// Reads the next batch after `cursor` in one read transaction.
pub fn read_batch(
    conn: &Connection,
    cursor: (i64, i64),
    limit: usize,
    max_buckets: usize,
    delivered: &Delivered,
) -> Result<Batch> {
    let tx = conn
        .unchecked_transaction()
        .map_err(Error::db("begin sync read"))?;
    let mut batch = Batch {
        end: cursor,
        ..Batch::default()
    };
    {
        let mut rows = tx
            .prepare(&format!(
                "SELECT pk, seq, agent_id, id, end_ms, last_updated_ms, upload, download, {}
                 FROM connections WHERE (seq, pk) > (?1, ?2) ORDER BY seq, pk LIMIT ?3",
                ConnMeta::SQL_COLUMNS
            ))
            .map_err(Error::db("prepare sync read"))?;
        let mut traffic = tx
            .prepare(
                "SELECT minute, upload, download FROM traffic WHERE conn = ?1 AND seq > ?2 ORDER BY minute",
            )
            .map_err(Error::db("prepare sync traffic read"))?;
        let mut q = rows
            .query(params![cursor.0, cursor.1, limit as i64])
            .map_err(Error::db("read sync batch"))?;
        let mut buckets = 0usize;
        let mut read = 0usize;
        let ts = |ms: i64| crate::timefmt::format_rfc3339(ms, true);
        while let Some(r) = q.next().map_err(Error::db("read sync batch"))? {
            read += 1;
            let pk: i64 = r.get(0).map_err(Error::db("read pk"))?;
            let seq: i64 = r.get(1).map_err(Error::db("read seq"))?;
            let end_ms: Option<i64> = r.get(4).map_err(Error::db("read end_ms"))?;
            let since = delivered.get(&pk).copied().unwrap_or(i64::MIN);
            let t: Vec<[i64; 3]> = traffic
                .query_map(params![pk, since], |t| {
                    Ok([t.get::<_, i64>(0)? * 60, t.get(1)?, t.get(2)?])
                })
                .and_then(|it| it.collect())
                .map_err(Error::db("read traffic"))?;
            if !batch.records.is_empty() && buckets + t.len() > max_buckets {
                batch.full = true;
                break;
            }
            buckets += t.len();
            let rec = (|| -> rusqlite::Result<OutRecord> {
                let meta = ConnMeta::from_sql_row(r.get(3)?, r, 8)?;
                Ok(OutRecord {
                    agent_id: r.get(2)?,
                    start: ts(meta.start_ms),
                    end: end_ms.map(ts),
                    last_updated: ts(r.get(5)?),
                    upload: r.get(6)?,
                    download: r.get(7)?,
                    meta,
                    traffic: t,
                })
            })()
            .map_err(Error::db("read sync row"))?;
            batch.records.push(rec);
            batch.keys.push((pk, seq, end_ms.is_none()));
            batch.end = (seq, pk);
        }
        if read >= limit {
            batch.full = true;
        }
    }
    tx.finish().map_err(Error::db("end sync read"))?;
    Ok(batch)
}

/// The JSON body of a batch.
pub fn encode_batch(agent_id: &str, batch: &Batch, now_ms: i64) -> Vec<u8> {
    let out = OutBatch {
        agent_id,
        timestamp: crate::timefmt::format_rfc3339(now_ms, true),
        connections: &batch.records,
    };
    // Serializing plain structs of strings and integers cannot fail.
    serde_json::to_vec(&out).unwrap_or_default()
}

/// What the master said about one batch.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Unauthorized(String),
    TooLarge,
    Rejected(String),
    Unreachable(String),
}

fn post(agent: &ureq::Agent, url: &str, token: Option<&str>, body: &[u8]) -> Outcome {
    let mut req = agent.post(url).header("Content-Type", "application/json");
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let mut resp = match req.send(body) {
        Ok(r) => r,
        Err(e) => return Outcome::Unreachable(e.to_string()),
    };
    let status = resp.status().as_u16();
    let text = resp
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_to_string()
        .unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("message")?.as_str().map(str::to_string))
        .unwrap_or_else(|| text.chars().take(200).collect());
    match status {
        200..=299 => Outcome::Accepted,
        401 | 403 => Outcome::Unauthorized(format!("HTTP {status}: {message}")),
        413 => Outcome::TooLarge,
        400..=499 => Outcome::Rejected(format!("HTTP {status}: {message}")),
        _ => Outcome::Unreachable(format!("HTTP {status}: {message}")),
    }
}

/// Exponential backoff with jitter.
struct Backoff {
    base: Duration,
    cap: Duration,
    tries: u32,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.tries.min(16));
        self.tries = self.tries.saturating_add(1);
        let d = exp.min(self.cap);
        // ±20 % so that many agents do not retry in lockstep after a master restart.
        use std::hash::BuildHasher;
        let r = std::collections::hash_map::RandomState::new().hash_one(self.tries) % 401;
        d.mul_f64(0.8 + r as f64 / 1000.0)
    }
    fn reset(&mut self) {
        self.tries = 0;
    }
}

/// Waits `d`, returning early (false) when `stop` is set. Checks every 100 ms.
fn wait(stop: &AtomicBool, d: Duration) -> bool {
    let until = Instant::now() + d;
    loop {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::park_timeout(left.min(Duration::from_millis(100)));
    }
}

/// Starts the sync thread. See [`spawn_with_status`].
pub fn spawn(
    cfg: SyncConfig,
    db_path: PathBuf,
    writer: WriterHandle,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    spawn_with_status(cfg, db_path, writer, stop, Arc::new(SyncStatus::default()))
}

/// Starts the sync thread, reporting into `status`. Fails at once on a bad URL or an unreadable database;
/// everything after that is retried. The database must exist (start the writer first).
pub fn spawn_with_status(
    cfg: SyncConfig,
    db_path: PathBuf,
    writer: WriterHandle,
    stop: Arc<AtomicBool>,
    status: Arc<SyncStatus>,
) -> Result<std::thread::JoinHandle<()>> {
    let url = sync_endpoint(&cfg.master_url)?;
    let conn = crate::store::open(&db_path, Access::Read)?;
    let cursor = load_cursor(&conn)?.unwrap_or((0, 0));
    std::thread::Builder::new()
        .name("sync".into())
        .spawn(move || run(cfg, url, conn, cursor, writer, stop, status))
        .map_err(Error::io("spawn sync thread"))
}

fn run(
    cfg: SyncConfig,
    url: String,
    conn: Connection,
    cursor: (i64, i64),
    writer: WriterHandle,
    stop: Arc<AtomicBool>,
    status: Arc<SyncStatus>,
) {
    crate::info!(
        "sync: agent {} pushing to {url} every {:?}, cursor {}:{}",
        cfg.agent_id,
        cfg.interval,
        cursor.0,
        cursor.1
    );
    let mut pusher = Pusher::new(cfg, url, conn, cursor, writer, status);
    while !stop.load(Ordering::SeqCst) {
        let pause = pusher.push_next();
        if !wait(&stop, pause) {
            break;
        }
    }
    let cursor = pusher.cursor;
    crate::debug!("sync: stopped at cursor {}:{}", cursor.0, cursor.1);
}

/// The sync thread's state from one batch to the next.
struct Pusher {
    cfg: SyncConfig,
    url: String,
    conn: Connection,
    agent: ureq::Agent,
    writer: WriterHandle,
    status: Arc<SyncStatus>,
    cursor: (i64, i64),
    /// Rows asked for: halved on each 413, doubled back (up to `batch_rows`) on each accepted batch.
    limit: usize,
    delivered: Delivered,
    backoff: Backoff,
}

impl Pusher {
    fn new(
        cfg: SyncConfig,
        url: String,
        conn: Connection,
        cursor: (i64, i64),
        writer: WriterHandle,
        status: Arc<SyncStatus>,
    ) -> Pusher {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(cfg.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let base = cfg.interval.min(Duration::from_secs(1));
        Pusher {
            limit: cfg.batch_rows.max(1),
            backoff: Backoff {
                base,
                cap: MAX_BACKOFF.max(base),
                tries: 0,
            },
            cfg,
            url,
            conn,
            agent,
            writer,
            status,
            cursor,
            delivered: Delivered::new(),
        }
    }

    /// Reads and posts the next batch; returns how long to wait before the next one.
    fn push_next(&mut self) -> Duration {
        let batch = match read_batch(
            &self.conn,
            self.cursor,
            self.limit,
            MAX_BATCH_BUCKETS,
            &self.delivered,
        ) {
            Ok(b) => b,
            Err(e) => {
                crate::error!("sync: {e}; retrying");
                return self.cfg.interval;
            }
        };
        let body = encode_batch(&self.cfg.agent_id, &batch, crate::timefmt::now_ms());
        let url = &self.url;
        let status = &self.status;
        match post(&self.agent, url, self.cfg.token.as_deref(), &body) {
            Outcome::Accepted => self.accepted(&batch),
            Outcome::Unauthorized(msg) => {
                if status.fail(LinkState::Unauthorized, &msg) {
                    crate::error!(
                        "sync: master {url} refused our token ({msg}): check --api-token; data is kept locally and retried"
                    );
                }
                self.backoff.next()
            }
            Outcome::TooLarge => {
                if status.fail(LinkState::Rejected, "HTTP 413: batch too large") {
                    crate::warn!(
                        "sync: master {url} says the batch is too large; sending smaller batches"
                    );
                }
                if self.limit > 1 {
                    self.limit /= 2;
                    Duration::ZERO
                } else {
                    self.backoff.next()
                }
            }
            Outcome::Rejected(msg) => {
                if status.fail(LinkState::Rejected, &msg) {
                    crate::error!(
                        "sync: master {url} rejected a batch ({msg}); data is kept locally and retried"
                    );
                }
                self.backoff.next()
            }
            Outcome::Unreachable(msg) => {
                if status.fail(LinkState::Unreachable, &msg) {
                    crate::warn!(
                        "sync: master {url} unreachable ({msg}); collecting locally and retrying"
                    );
                }
                self.backoff.next()
            }
        }
    }

    /// The master took `batch`: the cursor moves past it (and is stored), and a full batch is followed at
    /// once by the next.
    fn accepted(&mut self, batch: &Batch) -> Duration {
        if !batch.records.is_empty() {
            let new = batch.end;
            if let Err(e) = self
                .writer
                .call(move |c| store_cursor(c, new), WRITER_TIMEOUT)
            {
                // The master has the rows; a cursor stored late only means a harmless resend
                // after a restart.
                crate::warn!("sync: could not store the cursor: {e}");
            }
            self.cursor = new;
            for &(pk, seq, open) in &batch.keys {
                if open {
                    self.delivered.insert(pk, seq);
                } else {
                    self.delivered.remove(&pk);
                }
            }
        }
        let status = &self.status;
        status.batches.fetch_add(1, Ordering::SeqCst);
        status
            .rows
            .fetch_add(batch.records.len() as u64, Ordering::SeqCst);
        status
            .last_ok_ms
            .store(crate::timefmt::now_ms(), Ordering::SeqCst);
        let url = &self.url;
        match status.set_state(LinkState::Synced) {
            LinkState::Synced => {}
            LinkState::Starting => crate::info!("sync: connected to master {url}"),
            _ => crate::info!("sync: master {url} accepts batches again"),
        }
        self.backoff.reset();
        self.limit = (self.limit * 2).min(self.cfg.batch_rows.max(1));
        if batch.full {
            Duration::ZERO
        } else {
            self.cfg.interval
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Bytes, Closed, ConnMeta, ConnectionDiff, Flow};
    use crate::store::{WriteCmd, Writer, WriterConfig};

    #[test]
    fn endpoint_accepts_common_spellings() {
        for u in [
            "http://m:8080",
            "http://m:8080/",
            "http://m:8080/api/v1",
            "http://m:8080/api/v1/",
            "http://m:8080/api/v1/sync",
            " http://m:8080// ",
        ] {
            assert_eq!(
                sync_endpoint(u).unwrap(),
                "http://m:8080/api/v1/sync",
                "{u}"
            );
        }
        assert!(sync_endpoint("https://m")
            .unwrap_err()
            .to_string()
            .contains("https"));
        assert!(sync_endpoint("m:8080")
            .unwrap_err()
            .to_string()
            .contains("m:8080"));
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            tries: 0,
        };
        let first = b.next();
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        for _ in 0..20 {
            let d = b.next();
            assert!(d <= Duration::from_millis(2400), "{d:?}");
        }
        assert!(b.next() >= Duration::from_millis(1600));
        b.reset();
        assert!(b.next() <= Duration::from_millis(120));
    }

    fn meta(id: &str) -> ConnMeta {
        ConnMeta {
            id: id.into(),
            start_ms: 1_000,
            network: "tcp".into(),
            ..ConnMeta::default()
        }
    }

    fn flow(id: &str, total: u64, from: i64, to: i64, delta: u64) -> Flow {
        Flow {
            id: id.into(),
            totals: Bytes {
                upload: 0,
                download: total,
            },
            delta: Bytes {
                upload: 0,
                download: delta,
            },
            from_ms: from,
            to_ms: to,
        }
    }

    #[test]
    fn traffic_left_behind_by_a_later_change_is_still_sent() {
        // Commit 1: C opens with traffic (buckets at seq 1). Commit 2: A and B open. Commit 3: C closes
        // without traffic (row at seq 3, buckets stay at seq 1). Batches of one row: A, B, then C, whose
        // batch starts after seq 2; its buckets (seq 1) must still travel.
        let dir = std::env::temp_dir().join(format!("mct-sync-left-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.db");
        let wconn = crate::store::open(&path, Access::Write).unwrap();
        let writer = Writer::new(wconn, WriterConfig::default()).unwrap();
        let (tx, h) = writer.spawn(16).unwrap();
        let flush = |tx: &WriterHandle| tx.flush(Duration::from_secs(10)).unwrap();
        tx.send_blocking(WriteCmd::Diff(ConnectionDiff {
            at_ms: 120_000,
            opened: vec![(meta("C"), Bytes::default())],
            flows: vec![flow("C", 500, 60_000, 120_000, 500)],
            ..Default::default()
        }))
        .unwrap();
        flush(&tx);
        tx.send_blocking(WriteCmd::Diff(ConnectionDiff {
            at_ms: 130_000,
            opened: vec![(meta("A"), Bytes::default()), (meta("B"), Bytes::default())],
            ..Default::default()
        }))
        .unwrap();
        flush(&tx);
        tx.send_blocking(WriteCmd::Diff(ConnectionDiff {
            at_ms: 140_000,
            closed: vec![Closed {
                id: "C".into(),
                end_ms: 140_000,
                totals: Bytes {
                    upload: 0,
                    download: 500,
                },
            }],
            ..Default::default()
        }))
        .unwrap();
        flush(&tx);
        drop(tx);
        h.join().unwrap().unwrap();

        let conn = crate::store::open(&path, Access::Read).unwrap();
        let delivered = Delivered::new();
        let mut cursor = (0, 0);
        let mut seen = Vec::new();
        loop {
            let b = read_batch(&conn, cursor, 1, MAX_BATCH_BUCKETS, &delivered).unwrap();
            if b.records.is_empty() {
                break;
            }
            assert!(b.full);
            cursor = b.end;
            for r in b.records {
                let sum: i64 = r.traffic.iter().map(|t| t[2]).sum();
                seen.push((r.meta.id, sum, r.end.is_some()));
            }
        }
        assert_eq!(
            seen,
            vec![
                ("A".to_string(), 0, false),
                ("B".to_string(), 0, false),
                ("C".to_string(), 500, true)
            ]
        );
    }
}
