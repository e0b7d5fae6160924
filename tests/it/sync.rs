//! Agents syncing to a master, end to end on loopback: the real writer on both sides, the real sync thread,
//! and a tiny fake master (tiny_http, one thread) that feeds bodies to `ingest::handle_sync`.

use crate::support::{query_one, wait_until, TempDir, POLL};
use mihomo_connections_tracker::api::ingest::handle_sync;
use mihomo_connections_tracker::model::{Bytes, Closed, ConnMeta, ConnectionDiff, Flow};
use mihomo_connections_tracker::retention::{self, RetentionPolicy};
use mihomo_connections_tracker::store::{
    self, Access, WriteCmd, Writer, WriterConfig, WriterHandle,
};
use mihomo_connections_tracker::sync::{self, LinkState, SyncConfig, SyncStatus};
use rusqlite::types::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// 2026-01-01T00:00:00Z
const T0: i64 = 1_767_225_600_000;
const WAIT: Duration = Duration::from_secs(30);

struct Db {
    path: PathBuf,
    tx: Option<WriterHandle>,
    handle: Option<JoinHandle<mihomo_connections_tracker::Result<()>>>,
}

impl Db {
    fn start(path: PathBuf, agent_id: &str) -> Db {
        let conn = store::open(&path, Access::Write).unwrap();
        let cfg = WriterConfig {
            agent_id: agent_id.into(),
            flush_every: Duration::from_millis(20),
            max_pending: 20_000,
        };
        let writer = Writer::new(conn, cfg).unwrap();
        let (tx, handle) = writer.spawn(64).unwrap();
        Db {
            path,
            tx: Some(tx),
            handle: Some(handle),
        }
    }
    fn tx(&self) -> WriterHandle {
        self.tx.clone().unwrap()
    }
    fn send(&self, diff: ConnectionDiff) {
        self.tx
            .as_ref()
            .unwrap()
            .send_blocking(WriteCmd::Diff(diff))
            .unwrap();
    }
    fn flush(&self) {
        self.tx.as_ref().unwrap().flush(WAIT).unwrap();
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            if !std::thread::panicking() {
                h.join().unwrap().unwrap();
            }
        }
    }
}

fn meta(id: &str, start_ms: i64) -> ConnMeta {
    ConnMeta {
        id: id.into(),
        start_ms,
        network: "tcp".into(),
        conn_type: "HTTP".into(),
        source_ip: "192.168.1.20".into(),
        source_port: "51234".into(),
        destination_ip: "1.2.3.4".into(),
        destination_port: "443".into(),
        source_geoip: "null".into(),
        destination_geoip: "[\"us\"]".into(),
        source_ip_asn: String::new(),
        destination_ip_asn: "AS13335 Cloudflare".into(),
        inbound_ip: "192.168.1.1".into(),
        inbound_port: "7890".into(),
        inbound_name: "DEFAULT-MIXED".into(),
        inbound_user: String::new(),
        host: format!("{id}.example.com"),
        dns_mode: "normal".into(),
        uid: 1000,
        process: "curl".into(),
        process_path: "/usr/bin/curl".into(),
        special_proxy: String::new(),
        special_rules: String::new(),
        remote_destination: "1.2.3.4".into(),
        dscp: 4,
        sniff_host: "sni.example.com".into(),
        rematch_name: String::new(),
        chains: "[\"Proxy\",\"HK-01\"]".into(),
        provider_chains: "[\"\",\"sub\"]".into(),
        node: "HK-01".into(),
        policy: "Proxy".into(),
        rule: "DomainSuffix".into(),
        rule_payload: "example.com".into(),
    }
}

/// Agent `r1`'s database in `dir`, with `n` connections `c0..` made by [`make_conns`] at `T0`.
fn agent_with(dir: &TempDir, n: usize) -> Db {
    let db = Db::start(dir.path("agent.db"), "r1");
    make_conns(&db, "c", n, T0);
    db
}

/// Agent `r1`'s database in `dir` with `commits` commits an hour apart, each of `n` connections
/// `{prefix}{k}-{i}` made by [`make_conns`].
fn agent_with_backlog(dir: &TempDir, prefix: &str, commits: i64, n: usize) -> Db {
    let db = Db::start(dir.path("agent.db"), "r1");
    for k in 0..commits {
        make_conns(&db, &format!("{prefix}{k}-"), n, T0 + k * 3_600_000);
    }
    db
}

fn bytes(upload: u64, download: u64) -> Bytes {
    Bytes { upload, download }
}

/// Opens `n` connections `{prefix}{i}` at `t`, lets bytes flow for three minutes and closes every other one.
fn make_conns(db: &Db, prefix: &str, n: usize, t: i64) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    db.send(ConnectionDiff {
        at_ms: t,
        opened: ids
            .iter()
            .map(|id| (meta(id, t - 1_000), bytes(10, 100)))
            .collect(),
        flows: ids
            .iter()
            .map(|id| Flow {
                id: id.clone(),
                totals: bytes(10, 100),
                delta: bytes(10, 100),
                from_ms: t - 1_000,
                to_ms: t,
            })
            .collect(),
        ..Default::default()
    });
    db.flush();
    db.send(ConnectionDiff {
        at_ms: t + 180_000,
        flows: ids
            .iter()
            .map(|id| Flow {
                id: id.clone(),
                totals: bytes(1_010, 90_100),
                delta: bytes(1_000, 90_000),
                from_ms: t,
                to_ms: t + 180_000,
            })
            .collect(),
        ..Default::default()
    });
    db.flush();
    db.send(ConnectionDiff {
        at_ms: t + 240_000,
        closed: ids
            .iter()
            .step_by(2)
            .map(|id| Closed {
                id: id.clone(),
                end_ms: t + 235_000,
                totals: bytes(1_010, 90_100),
            })
            .collect(),
        ..Default::default()
    });
    db.flush();
}

const COLUMNS: &str = "agent_id, id, start_ms, end_ms, last_updated_ms, upload, download, network, conn_type,
    source_ip, source_port, destination_ip, destination_port, source_geoip, destination_geoip, source_ip_asn,
    destination_ip_asn, inbound_ip, inbound_port, inbound_name, inbound_user, host, dns_mode, uid, process,
    process_path, special_proxy, special_rules, remote_destination, dscp, sniff_host, rematch_name, chains,
    provider_chains, node, policy, rule, rule_payload";

/// Everything but the local keys and change counters: connections and traffic of one agent, in a stable order.
#[derive(Debug, PartialEq)]
struct Dump {
    conns: Vec<Vec<Value>>,
    traffic: Vec<Vec<Value>>,
}

fn dump(path: &Path, agent_id: &str) -> Dump {
    let c = store::open(path, Access::Read).unwrap();
    let rows = |sql: &str| -> Vec<Vec<Value>> {
        let mut s = c.prepare(sql).unwrap();
        let n = s.column_count();
        let it = s
            .query_map([agent_id], |r| {
                (0..n).map(|i| r.get::<_, Value>(i)).collect()
            })
            .unwrap();
        it.map(|r| r.unwrap()).collect()
    };
    Dump {
        conns: rows(&format!(
            "SELECT {COLUMNS} FROM connections WHERE agent_id = ?1 ORDER BY id"
        )),
        traffic: rows(
            "SELECT c.agent_id, c.id, t.minute, t.upload, t.download FROM traffic t
             JOIN connections c ON c.pk = t.conn WHERE c.agent_id = ?1 ORDER BY c.id, t.minute",
        ),
    }
}

/// A full dump of a master database: every table we write.
fn dump_all(path: &Path) -> Vec<Vec<Value>> {
    let c = store::open(path, Access::Read).unwrap();
    let mut out = Vec::new();
    for sql in [
        format!("SELECT pk, {COLUMNS} FROM connections ORDER BY pk"),
        "SELECT conn, minute, upload, download, seq FROM traffic ORDER BY conn, minute".to_string(),
    ] {
        let mut s = c.prepare(&sql).unwrap();
        let n = s.column_count();
        let it = s
            .query_map([], |r| (0..n).map(|i| r.get::<_, Value>(i)).collect())
            .unwrap();
        out.extend(it.map(|r: rusqlite::Result<Vec<Value>>| r.unwrap()));
    }
    out
}

fn count(path: &Path, sql: &str) -> i64 {
    query_one::<(i64,)>(path, sql).0
}

type Hook = Box<dyn FnMut(&[u8]) + Send>;

/// A master on 127.0.0.1: tiny_http, one thread, the real ingest and writer.
struct FakeMaster {
    db: Db,
    port: u16,
    token: Arc<Mutex<Option<String>>>,
    hook: Arc<Mutex<Option<Hook>>>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeMaster {
    /// Stores into `db`; `port` 0 takes any free one.
    fn start(db: PathBuf, port: u16, token: Option<&str>) -> FakeMaster {
        let db = Db::start(db, "master");
        let server = tiny_http::Server::http(("127.0.0.1", port)).unwrap();
        let port = server.server_addr().to_ip().unwrap().port();
        let token = Arc::new(Mutex::new(token.map(str::to_string)));
        let hook: Arc<Mutex<Option<Hook>>> = Arc::new(Mutex::new(None));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writer = db.tx();
        let (t, h, r, s) = (token.clone(), hook.clone(), requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let Ok(Some(mut req)) = server.recv_timeout(Duration::from_millis(50)) else {
                    continue;
                };
                r.fetch_add(1, Ordering::SeqCst);
                let mut body = Vec::new();
                std::io::Read::read_to_end(req.as_reader(), &mut body).unwrap();
                let want = t.lock().unwrap().clone();
                let auth = req
                    .headers()
                    .iter()
                    .find(|h| h.field.equiv("Authorization"))
                    .map(|h| h.value.as_str().to_string());
                let (status, json) = if want.is_some_and(|w| auth != Some(format!("Bearer {w}"))) {
                    (
                        401,
                        serde_json::json!({"status":"error","data":null,"message":"invalid token"}),
                    )
                } else {
                    if let Some(f) = h.lock().unwrap().as_mut() {
                        f(&body);
                    }
                    match handle_sync(
                        &body,
                        &writer,
                        mihomo_connections_tracker::timefmt::now_ms(),
                    ) {
                        Ok(data) => (
                            200,
                            serde_json::json!({"status":"success","data":data,"message":null}),
                        ),
                        Err((code, m)) => (
                            code,
                            serde_json::json!({"status":"error","data":null,"message":m}),
                        ),
                    }
                };
                let _ = req.respond(
                    tiny_http::Response::from_string(json.to_string()).with_status_code(status),
                );
            }
        });
        FakeMaster {
            db,
            port,
            token,
            hook,
            requests,
            stop,
            thread: Some(thread),
        }
    }
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    fn path(&self) -> &Path {
        &self.db.path
    }
}

impl Drop for FakeMaster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Agent {
    stop: Arc<AtomicBool>,
    status: Arc<SyncStatus>,
    thread: Option<JoinHandle<()>>,
}

impl Agent {
    fn start(db: &Db, url: &str, agent_id: &str, token: Option<&str>, batch_rows: usize) -> Agent {
        Agent::start_with_timeout(db, url, agent_id, token, batch_rows, Duration::from_secs(5))
    }
    fn start_with_timeout(
        db: &Db,
        url: &str,
        agent_id: &str,
        token: Option<&str>,
        batch_rows: usize,
        timeout: Duration,
    ) -> Agent {
        let cfg = SyncConfig {
            master_url: url.into(),
            token: token.map(str::to_string),
            agent_id: agent_id.into(),
            interval: Duration::from_millis(100),
            batch_rows,
            timeout,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let status = Arc::new(SyncStatus::default());
        let thread =
            sync::spawn_with_status(cfg, db.path.clone(), db.tx(), stop.clone(), status.clone())
                .unwrap();
        Agent {
            stop,
            status,
            thread: Some(thread),
        }
    }
}

impl Agent {
    /// Waits until the agent's sync status satisfies `ok`; a timeout shows the whole status.
    fn wait(&self, what: &str, ok: impl Fn(&SyncStatus) -> bool) {
        let s = &self.status;
        wait_until(what, WAIT, POLL, || {
            ok(s).then_some(()).ok_or_else(|| {
                format!(
                    "{:?}, {} failed attempts, {} batches and {} rows acked, last error {:?}",
                    s.state(),
                    s.failed_attempts(),
                    s.batches_acked(),
                    s.rows_acked(),
                    s.last_error()
                )
            })
        });
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let started = Instant::now();
            t.join().unwrap();
            // The stop flag is noticed while waiting (no HTTP call is slow on loopback).
            if !std::thread::panicking() {
                assert!(started.elapsed() < Duration::from_secs(2));
            }
        }
    }
}

/// Waits until the master holds exactly what the agent holds.
fn wait_synced(agent_db: &Db, master: &Path, agent_id: &str) {
    wait_until("the master to catch up", WAIT, POLL, || {
        let want = dump(&agent_db.path, agent_id);
        let got = dump(master, agent_id);
        if want == got && !want.conns.is_empty() {
            Ok(())
        } else {
            let (w, g) = (want.conns.len(), got.conns.len());
            Err(format!("agent has {w} rows, master {g}"))
        }
    });
}

#[test]
fn master_down_then_up_everything_arrives_once_with_final_bytes_and_end_times() {
    let dir = TempDir::new("down-up");
    let agent_db = agent_with(&dir, 40);
    // A master that hangs: the port is ours (no other test can take it) but nobody answers.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hung.local_addr().unwrap().port();
    let agent = Agent::start_with_timeout(
        &agent_db,
        &format!("http://127.0.0.1:{port}/"),
        "r1",
        None,
        1000,
        Duration::from_millis(300),
    );
    agent.wait("the agent to notice the master is down", |s| {
        s.failed_attempts() >= 2 && s.state() == LinkState::Unreachable
    });
    assert!(
        agent.status.last_error().contains("timeout"),
        "{}",
        agent.status.last_error()
    );
    // Nothing listening at all: connection refused.
    drop(hung);
    let failed = agent.status.failed_attempts();
    agent.wait("a refused connection", |s| s.failed_attempts() > failed);
    // Still collecting while the master is away.
    make_conns(&agent_db, "d", 10, T0 + 600_000);
    let master = FakeMaster::start(dir.path("master.db"), port, None);
    wait_synced(&agent_db, master.path(), "r1");
    agent.wait("the agent to see the master back", |s| {
        s.state() == LinkState::Synced
    });
    assert_eq!(count(master.path(), "SELECT count(*) FROM connections"), 50);
    let closed = count(
        master.path(),
        "SELECT count(*) FROM connections WHERE end_ms IS NOT NULL AND download = 90100",
    );
    assert_eq!(closed, 25);
    // Every byte once: buckets add up to the totals.
    let bucket_sum = count(master.path(), "SELECT sum(download) FROM traffic");
    assert_eq!(bucket_sum, 50 * 90_100);

    // Later changes of open connections arrive too.
    agent_db.send(ConnectionDiff {
        at_ms: T0 + 900_000,
        closed: vec![Closed {
            id: "c1".into(),
            end_ms: T0 + 890_000,
            totals: bytes(2_000, 200_000),
        }],
        ..Default::default()
    });
    agent_db.flush();
    wait_synced(&agent_db, master.path(), "r1");
    let (end, down): (Option<i64>, i64) = query_one(
        master.path(),
        "SELECT end_ms, download FROM connections WHERE id = 'c1'",
    );
    assert_eq!((end, down), (Some(T0 + 890_000), 200_000));
    let row: (i64, i64) = query_one(
        master.path(),
        "SELECT sync_count, last_data_ms IS NOT NULL FROM agents WHERE agent_id = 'r1'",
    );
    assert!(row.0 >= 2 && row.1 == 1, "{row:?}");
    drop(agent);
}

#[test]
fn backlog_of_6000_rows_arrives_whole_batch_after_batch() {
    let dir = TempDir::new("backlog");
    // Three commits of 2000 rows: batches cut inside one `seq` as well as across.
    let agent_db = agent_with_backlog(&dir, "b", 3, 2000);
    let master = FakeMaster::start(dir.path("master.db"), 0, None);
    let agent = Agent::start(
        &agent_db,
        &format!("{}/api/v1", master.url()),
        "r1",
        None,
        1000,
    );
    wait_synced(&agent_db, master.path(), "r1");
    assert_eq!(
        count(master.path(), "SELECT count(*) FROM connections"),
        6000
    );
    assert!(agent.status.batches_acked() >= 6);
    assert_eq!(
        count(master.path(), "SELECT sum(download) FROM traffic"),
        6000 * 90_100
    );
    let cursor = sync::load_cursor(&store::open(&agent_db.path, Access::Read).unwrap())
        .unwrap()
        .unwrap();
    let max: (i64, i64) = query_one(
        &agent_db.path,
        "SELECT seq, pk FROM connections ORDER BY seq DESC, pk DESC LIMIT 1",
    );
    wait_until("the cursor to reach the last row", WAIT, POLL, || {
        let now = sync::load_cursor(&store::open(&agent_db.path, Access::Read).unwrap())
            .unwrap()
            .unwrap();
        (now == max)
            .then_some(())
            .ok_or_else(|| format!("the cursor at {now:?}, the last row at {max:?}"))
    });
    assert!(cursor <= max);
}

#[test]
fn row_updated_while_its_batch_is_in_flight_is_sent_again() {
    let dir = TempDir::new("inflight");
    let agent_db = agent_with(&dir, 20);
    let master = FakeMaster::start(dir.path("master.db"), 0, None);
    let fired = Arc::new(AtomicBool::new(false));
    {
        let agent_tx = agent_db.tx();
        let fired = fired.clone();
        *master.hook.lock().unwrap() = Some(Box::new(move |body: &[u8]| {
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            let in_batch = v["connections"]
                .as_array()
                .is_some_and(|c| c.iter().any(|r| r["id"] == "c1"));
            if in_batch && !fired.swap(true, Ordering::SeqCst) {
                // c1 (open) moves on while the batch holding its old state is being answered.
                agent_tx
                    .send_blocking(WriteCmd::Diff(ConnectionDiff {
                        at_ms: T0 + 300_000,
                        flows: vec![Flow {
                            id: "c1".into(),
                            totals: bytes(5_010, 190_100),
                            delta: bytes(4_000, 100_000),
                            from_ms: T0 + 240_000,
                            to_ms: T0 + 300_000,
                        }],
                        closed: vec![Closed {
                            id: "c1".into(),
                            end_ms: T0 + 300_000,
                            totals: bytes(5_010, 190_100),
                        }],
                        ..Default::default()
                    }))
                    .unwrap();
                agent_tx.flush(WAIT).unwrap();
            }
        }));
    }
    let agent = Agent::start(&agent_db, &master.url(), "r1", None, 1000);
    wait_until("the update during the batch", WAIT, POLL, || {
        fired.load(Ordering::SeqCst)
    });
    wait_synced(&agent_db, master.path(), "r1");
    let (end, down): (Option<i64>, i64) = query_one(
        master.path(),
        "SELECT end_ms, download FROM connections WHERE id = 'c1'",
    );
    assert_eq!((end, down), (Some(T0 + 300_000), 190_100));
    agent.wait("the agent to count the resent row", |s| {
        s.rows_acked() >= 21
    });
}

#[test]
fn two_agents_into_one_master_keep_their_rows_apart() {
    let dir = TempDir::new("two");
    let a = Db::start(dir.path("a.db"), "r1");
    let b = Db::start(dir.path("b.db"), "r2");
    // The same connection ids on both routers.
    make_conns(&a, "c", 30, T0);
    make_conns(&b, "c", 30, T0 + 60_000);
    let master = FakeMaster::start(dir.path("master.db"), 0, Some("tok"));
    let _ga = Agent::start(&a, &master.url(), "r1", Some("tok"), 7);
    let _gb = Agent::start(&b, &master.url(), "r2", Some("tok"), 1000);
    wait_synced(&a, master.path(), "r1");
    wait_synced(&b, master.path(), "r2");
    assert_eq!(count(master.path(), "SELECT count(*) FROM connections"), 60);
    assert_eq!(
        count(
            master.path(),
            "SELECT count(*) FROM agents WHERE sync_count > 0 AND agent_id IN ('r1','r2')"
        ),
        2
    );
}

#[test]
fn wrong_token_is_reported_data_is_kept_then_everything_arrives() {
    let dir = TempDir::new("token");
    let agent_db = agent_with(&dir, 15);
    let before = dump(&agent_db.path, "r1");
    let master = FakeMaster::start(dir.path("master.db"), 0, Some("right"));
    let agent = Agent::start(&agent_db, &master.url(), "r1", Some("wrong"), 1000);
    agent.wait("the agent to report the refused token", |s| {
        s.state() == LinkState::Unauthorized
    });
    assert!(
        agent.status.last_error().contains("401"),
        "{}",
        agent.status.last_error()
    );
    assert_eq!(dump(&agent_db.path, "r1"), before);
    assert_eq!(count(master.path(), "SELECT count(*) FROM connections"), 0);
    assert!(
        sync::load_cursor(&store::open(&agent_db.path, Access::Read).unwrap())
            .unwrap()
            .is_none()
    );
    // The master's operator fixes the token: the agent's retries succeed without a restart.
    *master.token.lock().unwrap() = Some("wrong".into());
    wait_synced(&agent_db, master.path(), "r1");
    agent.wait("the agent to see the token accepted", |s| {
        s.state() == LinkState::Synced
    });
    assert!(master.requests.load(Ordering::SeqCst) >= 2);
}

/// The earlier tool's record: all 33 fields, times with a local offset, no `end`, no `traffic`.
fn legacy_record(id: &str, up: u64, down: u64, last_updated: &str) -> serde_json::Value {
    serde_json::json!({
        "id": id, "download": down, "upload": up, "last_updated": last_updated,
        "start": "2026-01-01T08:00:00.123456789+08:00", "network": "tcp", "conn_type": "HTTPS",
        "source_ip": "192.168.1.20", "destination_ip": "142.250.1.1", "source_geoip": "null",
        "destination_geoip": "[\"us\"]", "source_ip_asn": "", "destination_ip_asn": "AS15169 Google",
        "source_port": "50000", "destination_port": "443", "inbound_ip": "192.168.1.1",
        "inbound_port": "7890", "inbound_name": "DEFAULT-MIXED", "inbound_user": "",
        "host": "www.google.com", "dns_mode": "normal", "uid": 0, "process": "chrome",
        "process_path": "/usr/bin/chrome", "special_proxy": "", "special_rules": "",
        "remote_destination": "142.250.1.1", "dscp": 0, "sniff_host": "",
        "chains": "[\"Proxy\",\"Auto\",\"JP-02\"]", "rule": "GeoSite", "rule_payload": "google",
        "agent_id": "old-router"
    })
}

fn legacy_body(records: Vec<serde_json::Value>) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "agent_id": "old-router",
        "timestamp": "2026-01-01T09:00:00+08:00",
        "connections": records,
    }))
    .unwrap()
}

#[test]
fn earlier_tools_payload_is_accepted_with_derived_traffic_and_replays_change_nothing() {
    let dir = TempDir::new("legacy");
    let master = Db::start(dir.path("master.db"), "master");
    let tx = master.tx();
    let first = legacy_body(vec![legacy_record(
        "L1",
        600,
        6_000,
        "2026-01-01T08:10:00.123+08:00",
    )]);
    let data = handle_sync(&first, &tx, T0).unwrap();
    assert_eq!(data["count"], 1);
    let (start, last, node, policy, end): (i64, i64, String, String, Option<i64>) = query_one(
        &master.path,
        "SELECT start_ms, last_updated_ms, node, policy, end_ms FROM connections WHERE id = 'L1'",
    );
    assert_eq!(start, T0 + 123);
    assert_eq!(last, T0 + 600_123);
    assert_eq!(
        (node.as_str(), policy.as_str(), end),
        ("JP-02", "Proxy", None)
    );
    // Bytes spread over the ten minutes, not one spike.
    let buckets = count(&master.path, "SELECT count(*) FROM traffic");
    assert!(buckets >= 10, "{buckets}");
    assert_eq!(
        count(&master.path, "SELECT sum(download) FROM traffic"),
        6_000
    );

    let second = legacy_body(vec![legacy_record(
        "L1",
        900,
        9_000,
        "2026-01-01T08:20:00.123+08:00",
    )]);
    handle_sync(&second, &tx, T0).unwrap();
    assert_eq!(
        count(&master.path, "SELECT sum(download) FROM traffic"),
        9_000
    );
    assert_eq!(count(&master.path, "SELECT sum(upload) FROM traffic"), 900);
    let after = dump_all(&master.path);
    // Replays, in and out of order, change nothing.
    handle_sync(&first, &tx, T0).unwrap();
    handle_sync(&second, &tx, T0).unwrap();
    assert_eq!(dump_all(&master.path), after);
    assert_eq!(
        count(
            &master.path,
            "SELECT sync_count FROM agents WHERE agent_id = 'old-router'"
        ),
        4
    );
}

/// Every batch of agent `r1`'s database at `path` as the agent sends them, from the start: at most
/// `rows` connections and `buckets` traffic buckets each.
fn batch_bodies(path: &Path, rows: usize, buckets: usize) -> Vec<Vec<u8>> {
    let conn = store::open(path, Access::Read).unwrap();
    let delivered = sync::Delivered::new();
    let mut bodies = Vec::new();
    let mut cursor = (0, 0);
    loop {
        let b = sync::read_batch(&conn, cursor, rows, buckets, &delivered).unwrap();
        if b.records.is_empty() {
            return bodies;
        }
        cursor = b.end;
        bodies.push(sync::encode_batch("r1", &b, T0));
    }
}

#[test]
fn our_batches_replayed_change_nothing() {
    let dir = TempDir::new("replay");
    let agent_db = agent_with(&dir, 50);
    let master = Db::start(dir.path("master.db"), "master");
    let bodies = batch_bodies(&agent_db.path, 16, 1_000);
    assert_eq!(bodies.len(), 4);
    for b in &bodies {
        handle_sync(b, &master.tx(), T0).unwrap();
    }
    let once = dump_all(&master.path);
    assert_eq!(dump(&master.path, "r1"), dump(&agent_db.path, "r1"));
    for b in bodies.iter().rev() {
        handle_sync(b, &master.tx(), T0).unwrap();
    }
    assert_eq!(dump_all(&master.path), once);
}

#[test]
fn malformed_bodies_are_400_naming_the_field_and_store_nothing() {
    let dir = TempDir::new("malformed");
    let master = Db::start(dir.path("master.db"), "master");
    let good = legacy_record("ok", 1, 2, "2026-01-01T08:10:00+08:00");
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            serde_json::json!({"download": "lots"}),
            "connections[1].download",
        ),
        (serde_json::json!({"upload": -5}), "connections[1].upload"),
        (serde_json::json!({"id": null}), "connections[1].id"),
        (serde_json::json!({"id": ""}), "connections[1].id"),
        (
            serde_json::json!({"start": "2026-13-01T00:00:00Z"}),
            "connections[1].start",
        ),
        (serde_json::json!({"uid": 1.5}), "connections[1].uid"),
        (
            serde_json::json!({"chains": ["Proxy"]}),
            "connections[1].chains",
        ),
        (
            serde_json::json!({"traffic": [[60, 1, -2]]}),
            "connections[1].traffic[0]",
        ),
    ];
    for (patch, field) in cases {
        let mut bad = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            bad[k] = v.clone();
        }
        let body = legacy_body(vec![good.clone(), bad]);
        let (code, msg) = handle_sync(&body, &master.tx(), T0).unwrap_err();
        assert_eq!(code, 400, "{msg}");
        assert!(msg.starts_with(field), "{field}: {msg}");
    }
    let raw: [(&[u8], &str); 4] = [
        (
            b"{\"agent_id\":\"a\",\"connections\":[",
            "body is not valid JSON",
        ),
        (b"{\"connections\":[]}", "agent_id"),
        (b"{\"agent_id\":\"a\"}", "connections"),
        (b"{\"agent_id\":\"a\",\"connections\":{}}", "connections"),
    ];
    for (body, field) in raw {
        let (code, msg) = handle_sync(body, &master.tx(), T0).unwrap_err();
        assert_eq!(code, 400);
        assert!(msg.starts_with(field), "{field}: {msg}");
    }
    master.flush();
    assert_eq!(count(&master.path, "SELECT count(*) FROM connections"), 0);
    assert_eq!(count(&master.path, "SELECT count(*) FROM traffic"), 0);
    assert_eq!(count(&master.path, "SELECT count(*) FROM agents"), 0);
}

#[test]
fn retention_after_sync_keeps_open_and_unsynced_rows() {
    let dir = TempDir::new("retention");
    let agent_db = agent_with(&dir, 10);
    let master = FakeMaster::start(dir.path("master.db"), 0, None);
    let agent = Agent::start(&agent_db, &master.url(), "r1", None, 1000);
    wait_synced(&agent_db, master.path(), "r1");
    drop(agent);
    // Closed after the last sync: not on the master yet.
    agent_db.send(ConnectionDiff {
        at_ms: T0 + 400_000,
        closed: vec![Closed {
            id: "c1".into(),
            end_ms: T0 + 400_000,
            totals: bytes(1_010, 90_100),
        }],
        ..Default::default()
    });
    agent_db.flush();
    let policy = RetentionPolicy {
        max_age: Some(Duration::from_secs(3600)),
        require_synced: true,
        ..Default::default()
    };
    let deleted = agent_db
        .tx()
        .call(
            move |c| retention::apply(c, &policy, T0 + 30 * 86_400_000),
            WAIT,
        )
        .unwrap()
        .unwrap();
    assert_eq!(deleted.deleted_by_age, 5);
    let left = dump(&agent_db.path, "r1");
    let ids: Vec<String> = left
        .conns
        .iter()
        .map(|r| match &r[1] {
            Value::Text(s) => s.clone(),
            v => panic!("{v:?}"),
        })
        .collect();
    assert_eq!(ids, ["c1", "c3", "c5", "c7", "c9"]);
    assert_eq!(count(&agent_db.path, "SELECT count(*) FROM traffic t LEFT JOIN connections c ON c.pk = t.conn WHERE c.pk IS NULL"), 0);
}

#[test]
fn retention_thread_runs_at_start_offline_and_stops_promptly() {
    let dir = TempDir::new("retention-thread");
    let db = agent_with(&dir, 10);
    // Offline agent (no master): closed and old goes, open stays, no cursor needed.
    let policy = RetentionPolicy {
        max_age: Some(Duration::from_secs(86_400)),
        ..Default::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let h = retention::spawn_retention(policy, Duration::from_secs(3600), db.tx(), stop.clone());
    wait_until("retention to run at start", WAIT, POLL, || {
        let n = count(&db.path, "SELECT count(*) FROM connections");
        (n == 5)
            .then_some(())
            .ok_or_else(|| format!("{n} connections"))
    });
    assert_eq!(
        count(
            &db.path,
            "SELECT count(*) FROM connections WHERE end_ms IS NULL"
        ),
        5
    );
    let started = Instant::now();
    stop.store(true, Ordering::SeqCst);
    h.join().unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));
}

/// Measures the figures of issue 3 (run with `--ignored --nocapture`, ideally `--release`): master ingest of
/// batches of 1,000 from 4 concurrent agents, and an agent emptying a backlog of 100,000 rows.
#[test]
#[ignore]
fn measure_ingest_and_catch_up() {
    let dir = TempDir::new("measure");
    let agent_db = agent_with_backlog(&dir, "m", 5, 20_000);
    // Bodies as our agent sends them.
    let bodies = batch_bodies(&agent_db.path, 1000, sync::MAX_BATCH_BUCKETS);
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    {
        let started = Instant::now();
        let parsed: Vec<_> = bodies
            .iter()
            .map(|b| mihomo_connections_tracker::api::ingest::parse_batch(b).unwrap())
            .collect();
        let parse = started.elapsed().as_secs_f64();
        let mut c = store::open(&dir.path("direct.db"), Access::Write).unwrap();
        let started = Instant::now();
        for b in &parsed {
            mihomo_connections_tracker::store::merge::apply_batch(&mut c, b, T0).unwrap();
        }
        eprintln!(
            "one thread: parse {parse:.2} s, store {:.2} s",
            started.elapsed().as_secs_f64()
        );
    }
    let master = Db::start(dir.path("master.db"), "master");
    // Four agents: each takes every fourth batch under its own id, so rows do not collide.
    let mut per_agent: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 4];
    for (i, b) in bodies.iter().enumerate() {
        let t = i % 4;
        let own = String::from_utf8(b.clone())
            .unwrap()
            .replace("\"r1\"", &format!("\"a{t}\""));
        per_agent[t].push(own.into_bytes());
    }
    let started = Instant::now();
    let threads: Vec<_> = per_agent
        .into_iter()
        .map(|mine| {
            let tx = master.tx();
            std::thread::spawn(move || {
                for b in mine {
                    handle_sync(&b, &tx, T0).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "ingest: {} rows ({} MB JSON) in {secs:.2} s = {:.0} rows/s",
        100_000,
        bytes / 1_000_000,
        100_000.0 / secs
    );

    let master2 = FakeMaster::start(dir.path("master2.db"), 0, None);
    let started = Instant::now();
    let agent = Agent::start(&agent_db, &master2.url(), "r1", None, 1000);
    agent.wait("the backlog to drain", |s| s.rows_acked() >= 100_000);
    eprintln!(
        "catch-up: 100,000 rows in {:.2} s",
        started.elapsed().as_secs_f64()
    );
}
