//! Handler tests on fixture databases built by the real writer, with known truth. Every check runs on a
//! database with the rollup tables and on one without, which must answer the same.

use super::handler::{handle, ApiRequest, Ctx, Reply};
use super::rollup::{has_rollups, DROP_SQL};
use crate::model::{Bytes, Closed, ConnMeta, ConnectionDiff, Flow};
use crate::store::{open, Access, WriteCmd, Writer, WriterConfig};
use crate::timefmt::{parse_rfc3339, HOUR_MS, MINUTE_MS};
use rusqlite::Connection;
use serde_json::{json, Value};
use std::path::PathBuf;

/// 2025-04-28T10:00:00Z, a Monday.
fn t0() -> i64 {
    parse_rfc3339("2025-04-28T10:00:00Z").unwrap()
}

struct Conn {
    meta: ConnMeta,
    bytes: Bytes,
    flow_from: i64,
    flow_to: i64,
    closed: bool,
}

#[allow(clippy::too_many_arguments)] // a table of test data reads best as positional rows
fn conn(
    id: &str,
    start: i64,
    network: &str,
    src: &str,
    host: &str,
    dst: &str,
    port: &str,
    process: &str,
    rule: (&str, &str),
    chain: (&str, &str),
    geo: &str,
    bytes: (u64, u64),
    flow: (i64, i64),
    closed: bool,
) -> Conn {
    Conn {
        meta: ConnMeta {
            id: id.into(),
            start_ms: start,
            network: network.into(),
            conn_type: "HTTPS".into(),
            source_ip: src.into(),
            source_port: "50000".into(),
            destination_ip: dst.into(),
            destination_port: port.into(),
            source_geoip: "null".into(),
            destination_geoip: geo.into(),
            inbound_name: "mixed".into(),
            host: host.into(),
            process: process.into(),
            chains: format!("[\"{}\",\"{}\"]", chain.0, chain.1),
            provider_chains: "[]".into(),
            policy: chain.0.into(),
            node: chain.1.into(),
            rule: rule.0.into(),
            rule_payload: rule.1.into(),
            ..ConnMeta::default()
        },
        bytes: Bytes {
            upload: bytes.0,
            download: bytes.1,
        },
        flow_from: flow.0,
        flow_to: flow.1,
        closed,
    }
}

/// The fixture's connections per agent. Truth (see the checks): 4 connections, upload 2,905, download
/// 1,850,207; hourly totals 12 (2025-04-27 10h), 600,900 (10h), 600,600 (11h), 651,600 (12h).
fn fixture_conns() -> Vec<(&'static str, Vec<Conn>)> {
    let t = t0();
    let h = HOUR_MS;
    let m = MINUTE_MS;
    vec![
        (
            "a1",
            vec![
                // 3 hours of download, 10 up / 10,000 down per minute from 10:00 to 12:59.
                conn(
                    "c1",
                    t,
                    "tcp",
                    "192.168.1.10",
                    "example.com",
                    "93.184.216.34",
                    "443",
                    "curl",
                    ("DomainSuffix", "example.com"),
                    ("Proxy", "HK-01"),
                    "[\"us\"]",
                    (1_800, 1_800_000),
                    (t, t + 3 * h),
                    true,
                ),
                conn(
                    "c2",
                    t + 30 * m,
                    "udp",
                    "192.168.1.11",
                    "",
                    "8.8.8.8",
                    "53",
                    "dnsmasq",
                    ("Match", ""),
                    ("DIRECT", "DIRECT"),
                    "null",
                    (100, 200),
                    (t + 30 * m, t + 31 * m),
                    true,
                ),
                conn(
                    "c3",
                    t + 2 * h,
                    "tcp",
                    "192.168.1.10",
                    "video.example.org",
                    "1.2.3.4",
                    "443",
                    "firefox",
                    ("GeoIP", "CN"),
                    ("Proxy", "JP-02"),
                    "[\"cn\",\"hk\"]",
                    (1_000, 50_000),
                    (t + 2 * h, t + 2 * h + 10 * m),
                    false,
                ),
            ],
        ),
        (
            "a2",
            vec![
                // Same id as an a1 connection: ids are per agent.
                conn(
                    "c1",
                    t - 24 * h,
                    "tcp",
                    "10.0.0.5",
                    "example.com",
                    "93.184.216.34",
                    "443",
                    "",
                    ("DomainSuffix", "example.com"),
                    ("Proxy", "JP-02"),
                    "[\"us\"]",
                    (5, 7),
                    (t - 24 * h, t - 24 * h + 30_000),
                    true,
                ),
            ],
        ),
    ]
}

/// Writes `diffs` as agent `agent` with the real writer, flushed, and waits until it has stopped.
fn run_writer(path: &std::path::Path, agent: &str, diffs: Vec<ConnectionDiff>) {
    let cfg = WriterConfig {
        agent_id: agent.into(),
        ..WriterConfig::default()
    };
    let w = Writer::new(open(path, Access::Write).unwrap(), cfg).unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel(16);
    let h = std::thread::spawn(move || w.run(rx));
    for d in diffs {
        tx.send(WriteCmd::Diff(d)).unwrap();
    }
    let (ftx, frx) = std::sync::mpsc::sync_channel(1);
    tx.send(WriteCmd::Flush(ftx)).unwrap();
    frx.recv_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    drop(tx);
    h.join().unwrap().unwrap();
}

/// Writes `conns` as agent `agent`, each as the collector sees a live connection.
fn write_agent(path: &std::path::Path, agent: &str, conns: Vec<Conn>) {
    let mut diffs = Vec::new();
    for c in conns {
        let id = c.meta.id.clone();
        // As the collector sees a live connection: a delta every minute (pushes are every second in real
        // life), the cumulative totals growing in proportion to the time elapsed.
        let span = (c.flow_to - c.flow_from).max(1);
        let mut flows = Vec::new();
        let mut from = c.flow_from;
        let mut done = Bytes::default();
        loop {
            let to = (from + 60_000).min(c.flow_to);
            let part = |total: u64| {
                (total as i128 * (to - c.flow_from).max(0) as i128 / span as i128) as u64
            };
            let totals = if to >= c.flow_to {
                c.bytes
            } else {
                Bytes {
                    upload: part(c.bytes.upload),
                    download: part(c.bytes.download),
                }
            };
            let delta = Bytes {
                upload: totals.upload - done.upload,
                download: totals.download - done.download,
            };
            flows.push(Flow {
                id: id.clone(),
                totals,
                delta,
                from_ms: from,
                to_ms: to,
            });
            done = totals;
            from = to;
            if to >= c.flow_to {
                break;
            }
        }
        let mut diff = ConnectionDiff {
            at_ms: c.flow_to,
            opened: vec![(c.meta, Bytes::default())],
            flows,
            ..ConnectionDiff::default()
        };
        if c.closed {
            diff.closed.push(Closed {
                id,
                end_ms: c.flow_to,
                totals: c.bytes,
            });
        }
        diffs.push(diff);
    }
    run_writer(path, agent, diffs);
}

/// An empty directory of this test process, `mct-api-{pid}-{name}` under the system's temporary directory.
fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mct-api-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fresh fixture database; without `rollups` they are dropped before any data is written.
pub(crate) fn fixture(name: &str, rollups: bool) -> PathBuf {
    let dir = fresh_dir(&format!("{name}-{rollups}"));
    let path = dir.join("t.db");
    drop(open(&path, Access::Write).unwrap());
    for (agent, conns) in fixture_conns() {
        write_agent(&path, agent, conns);
    }
    if !rollups {
        open(&path, Access::Write)
            .unwrap()
            .execute_batch(DROP_SQL)
            .unwrap();
    }
    path
}

struct Api {
    db: Connection,
    rollups: bool,
    token: Option<&'static str>,
    now_ms: i64,
    devices: Option<crate::devices::Devices>,
    metrics: super::metrics::MetricsState,
}

impl Api {
    fn new(path: &std::path::Path) -> Api {
        let db = open(path, Access::Read).unwrap();
        let rollups = has_rollups(&db);
        Api {
            db,
            rollups,
            token: None,
            now_ms: t0() + 3 * HOUR_MS,
            devices: None,
            metrics: super::metrics::MetricsState::default(),
        }
    }

    fn call(&self, method: &str, target: &str, auth: Option<&str>) -> Reply {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let ctx = Ctx {
            db: &self.db,
            rollups: self.rollups,
            token: self.token,
            writer: None,
            now_ms: self.now_ms,
            devices: self.devices.as_ref(),
            metrics: Some(&self.metrics),
        };
        handle(
            &ctx,
            &ApiRequest {
                method,
                path,
                query,
                body: b"",
                authorization: auth,
            },
        )
    }

    /// GET, expecting 200 and the success envelope; returns `data`.
    fn data(&self, target: &str) -> Value {
        let r = self.call("GET", target, None);
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["status"], "success", "{target}");
        assert_eq!(v["message"], Value::Null);
        v["data"].clone()
    }

    /// GET, expecting `status` and the error envelope with a message that contains `needle`.
    fn error_naming(&self, target: &str, status: u16, needle: &str) {
        let msg = self.error(target, status);
        assert!(msg.contains(needle), "{target}: {msg}");
    }

    /// GET, expecting `status` and the error envelope; returns the message.
    fn error(&self, target: &str, status: u16) -> String {
        let r = self.call("GET", target, None);
        assert_eq!(r.status, status, "{target}: {}", r.text());
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["status"], "error");
        assert_eq!(v["data"], Value::Null);
        v["message"].as_str().unwrap().to_string()
    }
}

/// Both flavours of the fixture.
fn both(name: &str) -> Vec<Api> {
    let a = Api::new(&fixture(name, true));
    assert!(a.rollups);
    let b = Api::new(&fixture(name, false));
    assert!(!b.rollups);
    vec![a, b]
}

/// Every free-text filter parameter (and `filter_type` of filter-options).
const FILTERS: [&str; 12] = [
    "agent_id",
    "network",
    "rule",
    "process",
    "destination",
    "host",
    "geoip",
    "source_ip",
    "policy",
    "node",
    "inbound",
    "destination_port",
];

/// The rows of `sql` on `db`, each read as a tuple such as `(String, i64)`.
fn rows<T>(db: &Connection, sql: &str) -> Vec<T>
where
    T: for<'a> TryFrom<&'a rusqlite::Row<'a>, Error = rusqlite::Error>,
{
    let mut s = db.prepare(sql).unwrap();
    let found = s.query_map([], |r| T::try_from(r)).unwrap();
    found.map(Result::unwrap).collect()
}

/// The string `key` of every row of `v`.
fn column(v: &Value, key: &str) -> Vec<String> {
    let rows = v.as_array().unwrap().iter();
    rows.map(|r| r[key].as_str().unwrap().to_string()).collect()
}

/// The number `key` of every row of `v`.
fn numbers(v: &Value, key: &str) -> Vec<i64> {
    let rows = v.as_array().unwrap().iter();
    rows.map(|r| r[key].as_i64().unwrap()).collect()
}

fn totals(v: &Value) -> (i64, i64, i64, i64) {
    (
        v["count"].as_i64().unwrap(),
        v["upload"].as_i64().unwrap(),
        v["download"].as_i64().unwrap(),
        v["total"].as_i64().unwrap(),
    )
}

#[test]
fn summary_exact_numbers() {
    // Unix seconds and a range not aligned to hours: [10:29, 10:31) holds c2 and 2 minutes of c1.
    let unix = format!(
        "from={}&to={}",
        (t0() + 29 * MINUTE_MS) / 1000,
        (t0() + 31 * MINUTE_MS) / 1000
    );
    let all_filters = "geoip=HK&policy=Proxy&node=JP-02&inbound=mixed&destination_port=443\
                       &process=firefox&destination=1.2.3.4";
    let cases = [
        ("agent_id=a2", (1, 5, 7, 12)),
        ("host=example.com", (2, 1_805, 1_800_007, 1_801_812)),
        // host filter matches the destination IP when there is no host, like group_by=host
        ("host=8.8.8.8", (1, 100, 200, 300)),
        (
            "rule=DomainSuffix%20(example.com)",
            (2, 1_805, 1_800_007, 1_801_812),
        ),
        (
            "rule=DomainSuffix&network=TCP&source_ip=10.0.0.5",
            (1, 5, 7, 12),
        ),
        (all_filters, (1, 1_000, 50_000, 51_000)),
        // [10:00, 11:00): c1 and c2 started; 60 minutes of c1 and all of c2 flowed.
        (
            "from=2025-04-28T10:00:00Z&to=2025-04-28%2011:00",
            (2, 700, 600_200, 600_900),
        ),
        (&unix, (1, 120, 20_200, 20_320)),
        // from is 10:30Z: c2 and c3 started; 150 minutes of c1, all of c2 and c3 flowed.
        (
            "from=2025-04-28T12:30:00%2B02:00",
            (2, 2_600, 1_550_200, 1_552_800),
        ),
    ];
    for api in both("summary") {
        let all = api.data("/api/v1/stats?type=summary");
        assert_eq!(totals(&all), (4, 2_905, 1_850_207, 1_853_112));
        // default type is summary
        assert_eq!(api.data("/api/v1/stats"), all);
        for (q, want) in cases {
            let r = api.data(&format!("/api/v1/stats?type=summary&{q}"));
            assert_eq!(totals(&r), want, "{q}");
        }
        // A range covering everything equals the unranged summary.
        let r = api.data("/api/v1/stats?type=summary&from=2025-01-01&to=2026-01-01");
        assert_eq!(r, all);
    }
}

#[test]
fn timeseries_buckets_sum_to_summary() {
    for api in both("series") {
        let s = api.data("/api/v1/stats?type=timeseries&interval=hour&metric=total");
        assert_eq!(
            s,
            json!([
                {"time": "2025-04-27 10:00:00", "ts": (t0() - 24 * HOUR_MS) / 1000, "value": 12},
                {"time": "2025-04-28 10:00:00", "ts": t0() / 1000, "value": 600_900},
                {"time": "2025-04-28 11:00:00", "ts": t0() / 1000 + 3600, "value": 600_600},
                {"time": "2025-04-28 12:00:00", "ts": t0() / 1000 + 7200, "value": 651_600},
            ])
        );
        let c = api.data("/api/v1/stats?type=timeseries&interval=hour&metric=connections");
        let counts: Vec<i64> = numbers(&c, "value");
        assert_eq!(counts, vec![1, 2, 0, 1]);
        // every interval and metric, over a range: sums equal the summary over that range
        for range in [
            "",
            "&from=2025-04-27T10:00:30Z&to=2025-04-28T12:05:00Z",
            "&from=2025-04-28T10:17:00Z",
        ] {
            let sum = api.data(&format!("/api/v1/stats?type=summary{range}"));
            for interval in ["minute", "hour", "day", "week", "month"] {
                for (metric, field) in [
                    ("connections", "count"),
                    ("upload", "upload"),
                    ("download", "download"),
                    ("total", "total"),
                ] {
                    let pts = api.data(&format!(
                        "/api/v1/stats?type=timeseries&interval={interval}&metric={metric}{range}"
                    ));
                    let total: i64 = numbers(&pts, "value").into_iter().sum();
                    assert_eq!(
                        total,
                        sum[field].as_i64().unwrap(),
                        "{interval} {metric} {range}"
                    );
                    let ts: Vec<i64> = numbers(&pts, "ts");
                    assert!(ts.windows(2).all(|w| w[0] < w[1]), "ascending {interval}");
                }
            }
        }
        let d = api.data("/api/v1/stats?type=timeseries&interval=day&metric=total&from=2025-04-26&to=2025-04-30&fill=zero");
        assert_eq!(
            d,
            json!([
                {"time": "2025-04-26", "ts": (t0() - 10 * HOUR_MS - 2 * 24 * HOUR_MS) / 1000, "value": 0},
                {"time": "2025-04-27", "ts": (t0() - 10 * HOUR_MS - 24 * HOUR_MS) / 1000, "value": 12},
                {"time": "2025-04-28", "ts": (t0() - 10 * HOUR_MS) / 1000, "value": 1_853_100},
                {"time": "2025-04-29", "ts": (t0() + 14 * HOUR_MS) / 1000, "value": 0},
            ])
        );
        let w = api.data("/api/v1/stats?type=timeseries&interval=week&metric=connections");
        assert_eq!(
            w,
            json!([{"time": "2025-16", "ts": (t0() - 10 * HOUR_MS - 7 * 24 * HOUR_MS) / 1000, "value": 1},
                             {"time": "2025-17", "ts": (t0() - 10 * HOUR_MS) / 1000, "value": 3}])
        );
        let m = api.data("/api/v1/stats?type=timeseries&interval=month&metric=upload");
        assert_eq!(
            m,
            json!([{"time": "2025-04", "ts": parse_rfc3339("2025-04-01T00:00:00Z").unwrap() / 1000, "value": 2_905}])
        );
        let z = api.data("/api/v1/stats?type=timeseries&interval=minute&metric=download&from=2025-04-28T10:29:00Z&to=2025-04-28T10:32:00Z&fill=zero");
        assert_eq!(
            z,
            json!([
                {"time": "2025-04-28 10:29:00", "ts": (t0() + 29 * MINUTE_MS) / 1000, "value": 10_000},
                {"time": "2025-04-28 10:30:00", "ts": (t0() + 30 * MINUTE_MS) / 1000, "value": 10_200},
                {"time": "2025-04-28 10:31:00", "ts": (t0() + 31 * MINUTE_MS) / 1000, "value": 10_000},
            ])
        );
        let filtered = api.data("/api/v1/stats?type=timeseries&interval=hour&metric=download&agent_id=a1&process=firefox");
        assert_eq!(
            filtered,
            json!([{"time": "2025-04-28 12:00:00", "ts": t0() / 1000 + 7200, "value": 50_000}])
        );
        let msg = api.error(
            "/api/v1/stats?type=timeseries&interval=minute&from=2020-01-01&to=2025-01-01&fill=zero",
            400,
        );
        assert!(msg.contains("'interval'"), "{msg}");
        api.error_naming(
            "/api/v1/stats?type=timeseries&interval=year",
            400,
            "minute|hour|day|week|month",
        );
        api.error_naming(
            "/api/v1/stats?type=timeseries&metric=bytes",
            400,
            "'metric'",
        );
    }
}

/// The [`totals`] of every row of `v`, added up.
fn summed(v: &Value) -> (i64, i64, i64, i64) {
    v.as_array().unwrap().iter().fold((0, 0, 0, 0), |a, r| {
        let t = totals(r);
        (a.0 + t.0, a.1 + t.1, a.2 + t.2, a.3 + t.3)
    })
}

fn keyed(v: &Value, key: &str) -> Vec<(String, i64, i64, i64, i64)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let k = r[key]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| "<other>".into());
            let (c, u, d, t) = totals(r);
            assert_eq!(t, u + d);
            (k, c, u, d, t)
        })
        .collect()
}

/// `group_by=host` with `query` gives `want`: (host, count, upload, download, total) per group.
#[track_caller]
fn assert_host_groups(api: &Api, query: &str, want: &[(&str, i64, i64, i64, i64)]) {
    let v = api.data(&format!("/api/v1/stats?type=group&group_by=host{query}"));
    let want: Vec<_> = want
        .iter()
        .map(|&(k, c, u, d, t)| (k.to_string(), c, u, d, t))
        .collect();
    assert_eq!(keyed(&v, "host"), want, "{query}");
}

#[test]
fn group_by_every_key() {
    for api in both("group") {
        let want = [
            ("example.com", 2, 1_805, 1_800_007, 1_801_812),
            ("video.example.org", 1, 1_000, 50_000, 51_000),
            ("8.8.8.8", 1, 100, 200, 300),
        ];
        assert_host_groups(&api, "", &want);
        let h = api.data("/api/v1/stats?type=group&group_by=host&sort_by=count&sort_order=asc");
        let keys: Vec<String> = keyed(&h, "host").into_iter().map(|r| r.0).collect();
        assert_eq!(
            keys,
            vec!["8.8.8.8", "video.example.org", "example.com"],
            "count asc, then key"
        );
        for (by, field, expect) in [
            ("network", "network", vec![("tcp", 3), ("udp", 1)]),
            (
                "process",
                "process",
                vec![("curl", 1), ("firefox", 1), ("dnsmasq", 1), ("", 1)],
            ),
            (
                "destination",
                "destination_ip",
                vec![("93.184.216.34", 2), ("1.2.3.4", 1), ("8.8.8.8", 1)],
            ),
            (
                "rule",
                "rule",
                vec![
                    ("DomainSuffix (example.com)", 2),
                    ("GeoIP (CN)", 1),
                    ("Match", 1),
                ],
            ),
            (
                "chains",
                "node",
                vec![("HK-01", 1), ("JP-02", 2), ("DIRECT", 1)],
            ),
            ("policy", "policy", vec![("Proxy", 3), ("DIRECT", 1)]),
            (
                "source_ip",
                "source_ip",
                vec![("192.168.1.10", 2), ("192.168.1.11", 1), ("10.0.0.5", 1)],
            ),
            ("inbound", "inbound", vec![("mixed", 4)]),
            ("agent_id", "agent_id", vec![("a1", 3), ("a2", 1)]),
            (
                "destination_port",
                "destination_port",
                vec![("443", 3), ("53", 1)],
            ),
            (
                "geoip",
                "destination_geoip",
                vec![("us", 2), ("cn", 1), ("hk", 1), ("", 1)],
            ),
        ] {
            let v = api.data(&format!("/api/v1/stats?type=group&group_by={by}"));
            let got: Vec<(String, i64)> =
                keyed(&v, field).into_iter().map(|r| (r.0, r.1)).collect();
            let want: Vec<(String, i64)> = expect
                .into_iter()
                .map(|(k, n)| (k.to_string(), n))
                .collect();
            assert_eq!(got, want, "group_by={by}");
        }
        // two dimensions: device x host
        let v = api.data("/api/v1/stats?type=group&group_by=source_ip,host&sort_by=count");
        let rows: Vec<(String, String, i64)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["source_ip"].as_str().unwrap().into(),
                    r["host"].as_str().unwrap().into(),
                    r["count"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(rows.len(), 4);
        assert!(rows.contains(&("192.168.1.10".into(), "video.example.org".into(), 1)));
        for bad in ["&group_by=host,host", "&group_by=a,b,c", ""] {
            api.error_naming(&format!("/api/v1/stats?type=group{bad}"), 400, "'group_by'");
        }
    }
}

#[test]
fn top_n_plus_other_equals_summary() {
    for api in both("topn") {
        for range in [
            "",
            "&from=2025-04-28T10:00:00Z&to=2025-04-28T11:00:00Z",
            "&from=2025-04-28T10:10:00Z",
        ] {
            let sum = totals(&api.data(&format!("/api/v1/stats?type=summary{range}")));
            for by in [
                "host",
                "destination",
                "source_ip",
                "rule",
                "chains",
                "agent_id",
                "network",
                "source_ip,host",
            ] {
                let v = api.data(&format!(
                    "/api/v1/stats?type=group&group_by={by}&limit=1&other=true{range}"
                ));
                let rows = v.as_array().unwrap();
                assert_eq!(summed(&v), sum, "group_by={by}{range}: {v}");
                let all = api.data(&format!("/api/v1/stats?type=group&group_by={by}{range}"));
                assert_eq!(summed(&all), sum, "all groups of {by}{range}");
                if all.as_array().unwrap().len() > 1 {
                    assert_eq!(rows.len(), 2, "one row and the other row: {v}");
                    let first = by.split(',').next().unwrap();
                    let field = super::stats::dim(first).unwrap().field;
                    assert_eq!(rows[1][field], Value::Null, "the other row has no key");
                }
            }
        }
        // geoip: a connection with two countries is in two groups, so the rows add up to the sum of all groups
        let all = api.data("/api/v1/stats?type=group&group_by=geoip");
        let top = api.data("/api/v1/stats?type=group&group_by=geoip&limit=2&other=true");
        assert_eq!(top.as_array().unwrap().len(), 3);
        assert_eq!(top[2]["destination_geoip"], Value::Null);
        assert_eq!(summed(&top), summed(&all));
        assert_eq!(summed(&all).0, 5, "4 connections, one of them in cn and hk");
        // without other=true, limit just cuts
        let v = api.data("/api/v1/stats?type=group&group_by=host&limit=2");
        assert_eq!(v.as_array().unwrap().len(), 2);
        // Ranged group counts connections started in range, bytes flowed in range.
        let want = [
            ("example.com", 0, 600, 600_000, 600_600),
            ("video.example.org", 1, 1_000, 50_000, 51_000),
        ];
        let range = "&from=2025-04-28T12:00:00Z&to=2025-04-28T13:00:00Z";
        assert_host_groups(&api, range, &want);
    }
}

#[test]
fn group_exports_csv_and_ndjson() {
    let api = Api::new(&fixture("export", true));
    let r = api.call(
        "GET",
        "/api/v1/stats?type=group&group_by=network&format=csv",
        None,
    );
    assert_eq!(r.status, 200);
    assert!(r.content_type.starts_with("text/csv"));
    assert_eq!(
        r.text(),
        "network,count,download,upload,total\r\ntcp,3,1850007,2805,1852812\r\nudp,1,200,100,300\r\n"
    );
    let r = api.call(
        "GET",
        "/api/v1/stats?type=group&group_by=network&format=ndjson",
        None,
    );
    assert_eq!(r.content_type, "application/x-ndjson");
    let lines: Vec<Value> = r
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines[1],
        json!({"network": "udp", "count": 1, "download": 200, "upload": 100, "total": 300})
    );
}

#[test]
fn connections_rows_paging_and_exports() {
    for api in both("conns") {
        let r = api.call("GET", "/api/v1/connections", None);
        assert_eq!(r.status, 200);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["total_count"], 4);
        assert!(r.headers.contains(&("X-Total-Count", "4".into())));
        let rows = v["data"].as_array().unwrap();
        let ids: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r["agent_id"].as_str().unwrap(), r["id"].as_str().unwrap()))
            .collect();
        assert_eq!(
            ids,
            vec![("a1", "c3"), ("a1", "c2"), ("a1", "c1"), ("a2", "c1")],
            "newest first"
        );
        let c1 = &rows[2];
        for field in [
            "id",
            "agent_id",
            "download",
            "upload",
            "last_updated",
            "start",
            "network",
            "conn_type",
            "source_ip",
            "source_port",
            "destination_ip",
            "destination_port",
            "destination_geoip",
            "host",
            "process",
            "chains",
            "rule",
            "rule_payload",
            "end",
            "node",
            "policy",
        ] {
            assert!(c1.get(field).is_some(), "field {field}");
        }
        assert_eq!(c1["start"], "2025-04-28T10:00:00.000Z");
        assert_eq!(c1["end"], "2025-04-28T13:00:00.000Z");
        assert_eq!(c1["last_updated"], "2025-04-28T13:00:00.000Z");
        assert_eq!(c1["node"], "HK-01");
        assert_eq!(c1["policy"], "Proxy");
        assert_eq!(c1["chains"], "[\"Proxy\",\"HK-01\"]");
        assert_eq!(c1["download"], 1_800_000);
        assert_eq!(rows[0]["end"], Value::Null, "c3 is open");

        let v = api.data("/api/v1/connections?limit=2&offset=1&sort_by=total&sort_order=asc");
        let ids = column(&v, "id");
        assert_eq!(ids, vec!["c2", "c3"]);
        let r = api.call(
            "GET",
            "/api/v1/connections?destination=EXAMPLE&limit=1",
            None,
        );
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v["total_count"], 3,
            "substring of host: example.com x2, video.example.org"
        );
        assert_eq!(v["data"].as_array().unwrap().len(), 1);
        let v = api.data("/api/v1/connections?host=video&geoip=cn");
        assert_eq!(v.as_array().unwrap().len(), 1);
        // host without a host name is the destination IP, as in group_by=host and filter-options
        let v = api.data("/api/v1/connections?host=8.8.");
        assert_eq!(v.as_array().unwrap().len(), 1);
        let v = api.data("/api/v1/connections?from=2025-04-28T10:00:00Z&to=2025-04-28T10:30:00Z");
        assert_eq!(
            v.as_array().unwrap().len(),
            1,
            "start in [from, to): c1 only"
        );
        let v = api.data("/api/v1/connections?agent_id=a2&network=tcp&rule=DomainSuffix&process=");
        assert_eq!(v.as_array().unwrap().len(), 1);

        let r = api.call(
            "GET",
            "/api/v1/connections?format=csv&sort_by=start&sort_order=asc&limit=1",
            None,
        );
        assert!(r.content_type.starts_with("text/csv"));
        let text = r.text();
        let mut lines = text.lines();
        assert!(lines
            .next()
            .unwrap()
            .starts_with("id,agent_id,download,upload,total,start,end,"));
        let row = lines.next().unwrap();
        assert!(
            row.starts_with("c1,a2,7,5,12,2025-04-27T10:00:00.000Z,"),
            "{row}"
        );
        assert!(
            row.contains(",\"[\"\"Proxy\"\",\"\"JP-02\"\"]\","),
            "chains quoted: {row}"
        );
        assert_eq!(lines.next(), None);
        let r = api.call("GET", "/api/v1/connections?format=ndjson", None);
        assert_eq!(r.text().lines().count(), 4);
        assert!(r.headers.contains(&("X-Total-Count", "4".into())));

        for (bad, needle) in [
            ("limit=10001", "'limit'"),
            ("sort_by=id", "start|last_updated|download|upload|total"),
            ("offset=-1", "'offset'"),
            ("format=xml", "json|csv|ndjson"),
        ] {
            api.error_naming(&format!("/api/v1/connections?{bad}"), 400, needle);
        }
    }
}

#[test]
fn agents_are_real() {
    for mut api in both("agents") {
        let v = api.data("/api/v1/agents");
        assert_eq!(
            v,
            json!([
                {"id": "a1", "last_active": "2025-04-28T13:00:00.000Z", "connections_count": 3,
                 "total_download": 1_850_200, "total_upload": 2_900, "total_traffic": 1_853_100,
                 "status": "active", "last_sync": null, "first_seen": null},
                {"id": "a2", "last_active": "2025-04-27T10:00:30.000Z", "connections_count": 1,
                 "total_download": 7, "total_upload": 5, "total_traffic": 12,
                 "status": "inactive", "last_sync": null, "first_seen": null},
            ])
        );
        let s = api.data("/api/v1/agents/a1/status");
        assert_eq!(s["is_active"], true);
        assert_eq!(
            s["networks"],
            json!([{"network": "tcp", "count": 2}, {"network": "udp", "count": 1}])
        );
        assert_eq!(
            s["rules"],
            json!([{"rule": "DomainSuffix", "count": 1}, {"rule": "GeoIP", "count": 1}, {"rule": "Match", "count": 1}])
        );
        api.error_naming("/api/v1/agents/nobody/status", 404, "nobody");
        // time passes: a1 goes inactive
        api.now_ms += 10 * MINUTE_MS;
        assert_eq!(api.data("/api/v1/agents/a1/status")["status"], "inactive");
    }
}

#[test]
fn agents_table_rows_count_as_activity() {
    let path = fixture("agentrow", true);
    let db = open(&path, Access::Write).unwrap();
    db.execute(
        "INSERT INTO agents (agent_id, first_seen_ms, last_sync_ms) VALUES ('a2', ?1, ?2), ('quiet', ?1, NULL)",
        [t0() - 48 * HOUR_MS, t0() + 3 * HOUR_MS - 1000],
    )
    .unwrap();
    drop(db);
    let api = Api::new(&path);
    let v = api.data("/api/v1/agents");
    let ids = column(&v, "id");
    assert_eq!(ids, vec!["a1", "a2", "quiet"]);
    let a2 = api.data("/api/v1/agents/a2/status");
    assert_eq!(a2["status"], "active");
    assert_eq!(a2["last_active"], "2025-04-28T12:59:59.000Z");
    let quiet = api.data("/api/v1/agents/quiet/status");
    assert_eq!(quiet["status"], "inactive");
    assert_eq!(quiet["last_active"], Value::Null);
    assert_eq!(quiet["connections_count"], 0);
    assert_eq!(quiet["networks"], json!([]));
}

#[test]
fn filter_options_sorted_and_limited() {
    let api = Api::new(&fixture("options", true));
    let v = api.data("/api/v1/filter-options?filter_type=host");
    assert_eq!(
        v,
        json!([
            {"field": "host", "label": "8.8.8.8", "value": "8.8.8.8"},
            {"field": "host", "label": "example.com", "value": "example.com"},
            {"field": "host", "label": "video.example.org", "value": "video.example.org"},
        ])
    );
    let v = api.data("/api/v1/filter-options?filter_type=geoip");
    let vals = column(&v, "value");
    assert_eq!(vals, vec!["cn", "hk", "us"]);
    let v = api.data("/api/v1/filter-options?filter_type=destination&query=8.8&limit=5");
    assert_eq!(v.as_array().unwrap().len(), 1);
    let v = api.data("/api/v1/filter-options?filter_type=agent_id&limit=1");
    assert_eq!(
        v,
        json!([{"field": "agent_id", "label": "a1", "value": "a1"}])
    );
    for t in FILTERS {
        assert!(
            !api.data(&format!("/api/v1/filter-options?filter_type={t}"))
                .as_array()
                .unwrap()
                .is_empty(),
            "{t}"
        );
    }
    api.error_naming(
        "/api/v1/filter-options?filter_type=password",
        400,
        "'filter_type'",
    );
    api.error_naming("/api/v1/filter-options", 400, "'filter_type'");
}

fn row_count(path: &std::path::Path) -> (i64, i64) {
    let db = Connection::open(path).unwrap();
    let c = db
        .query_row("SELECT count(*) FROM connections", [], |r| r.get(0))
        .unwrap();
    let t = db
        .query_row("SELECT count(*) FROM traffic", [], |r| r.get(0))
        .unwrap();
    (c, t)
}

#[test]
fn injection_strings_are_rejected_or_bound() {
    let path = fixture("inject", true);
    let before = row_count(&path);
    let api = Api::new(&path);
    let evil = [
        "host'--",
        "1;DROP TABLE connections",
        "x%27%20OR%20%271%27=%271",
        "(SELECT 1)",
        "network) UNION SELECT sql FROM sqlite_schema --",
    ];
    let enumerated = [
        "/api/v1/stats?type=",
        "/api/v1/stats?type=group&group_by=",
        "/api/v1/stats?type=group&group_by=host&sort_by=",
        "/api/v1/stats?type=group&group_by=host&limit=",
        "/api/v1/stats?type=timeseries&interval=",
        "/api/v1/stats?type=timeseries&metric=",
        "/api/v1/stats?from=",
        "/api/v1/stats?to=",
        "/api/v1/connections?sort_by=",
        "/api/v1/connections?limit=",
        "/api/v1/connections?offset=",
        "/api/v1/connections?from=",
        "/api/v1/connections?format=",
        "/api/v1/filter-options?filter_type=",
        "/api/v1/filter-options?filter_type=host&limit=",
        "/api/v1/stats?type=timeseries&fill=",
        "/api/v1/stats?type=group&group_by=host&other=",
    ];
    for e in evil {
        for prefix in enumerated {
            let msg = api.error(&format!("{prefix}{e}"), 400);
            assert!(msg.starts_with("invalid parameter '"), "{prefix}{e}: {msg}");
            // the bad value is quoted back, but nothing of our SQL
            assert!(
                !msg.contains("FROM connections") && !msg.contains("no such"),
                "{msg}"
            );
        }
        // sort_order is `asc` or else descending (the earlier tool's contract); never SQL
        let d = api.data(&format!(
            "/api/v1/stats?type=group&group_by=network&sort_order={e}"
        ));
        assert_eq!(d[0]["network"], "tcp", "descending");
        // free-text filters are bound values: they just match nothing
        for f in FILTERS {
            let s = api.data(&format!("/api/v1/stats?type=summary&{f}={e}"));
            assert_eq!(totals(&s), (0, 0, 0, 0), "{f}={e}");
            let g = api.data(&format!(
                "/api/v1/stats?type=group&group_by=host&{f}={e}&from=2025-01-01"
            ));
            assert_eq!(g, json!([]), "{f}={e}");
            let c = api.data(&format!("/api/v1/connections?{f}={e}"));
            assert_eq!(c, json!([]), "{f}={e}");
        }
        let q = api.data(&format!(
            "/api/v1/filter-options?filter_type=host&query={e}"
        ));
        assert_eq!(q, json!([]));
        api.error(&format!("/api/v1/agents/{e}/status"), 404);
    }
    drop(api);
    assert_eq!(row_count(&path), before, "nothing changed");
}

#[test]
fn auth_routing_and_methods() {
    let mut api = Api::new(&fixture("auth", false));
    api.token = Some("s3cret");
    let r = api.call("GET", "/api/v1/health", None);
    assert_eq!((r.status, r.text()), (200, "OK"));
    assert_eq!(r.content_type, "text/plain; charset=utf-8");
    for (auth, status) in [
        (None, 401),
        (Some("Bearer wrong"), 401),
        (Some("Bearer s3cre"), 401),
        (Some("Bearer s3cret!"), 401),
        (Some("Basic s3cret"), 401),
        (Some("Bearer s3cret"), 200),
        (Some("bearer  s3cret "), 200),
    ] {
        let r = api.call("GET", "/api/v1/stats", auth);
        assert_eq!(r.status, status, "{auth:?}");
        if status == 401 {
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(v["status"], "error");
            assert!(v["message"].as_str().unwrap().contains("Bearer"));
        }
    }
    let ok = Some("Bearer s3cret");
    let r = api.call("GET", "/api/v1/nope", ok);
    assert_eq!(r.status, 404);
    assert!(r.text().contains("\"status\":\"error\""));
    let r = api.call("GET", "/api/v1/nope", None);
    assert_eq!(r.status, 401, "unknown paths do not leak without the token");
    for (method, path, allow) in [
        ("POST", "/api/v1/stats", "GET"),
        ("DELETE", "/api/v1/connections", "GET"),
        ("PUT", "/api/v1/agents", "GET"),
        ("POST", "/api/v1/agents/a1/status", "GET"),
        ("GET", "/api/v1/sync", "POST"),
        ("POST", "/api/v1/health", "GET, HEAD"),
    ] {
        let r = api.call(method, path, ok);
        assert_eq!(r.status, 405, "{method} {path}");
        assert!(
            r.headers.contains(&("Allow", allow.into())),
            "{method} {path}: {:?}",
            r.headers
        );
    }
    // no writer: sync is unavailable, not a crash
    let r = api.call("POST", "/api/v1/sync", ok);
    assert_eq!(r.status, 503);
    // trailing slash is the same endpoint
    assert_eq!(api.call("GET", "/api/v1/agents/", ok).status, 200);
}

#[test]
fn empty_database_answers_zeroes() {
    let dir = fresh_dir("empty");
    let path = dir.join("t.db");
    open(&path, Access::Write).unwrap();
    let api = Api::new(&path);
    assert_eq!(totals(&api.data("/api/v1/stats")), (0, 0, 0, 0));
    assert_eq!(
        totals(&api.data("/api/v1/stats?from=2025-01-01")),
        (0, 0, 0, 0)
    );
    assert_eq!(
        api.data("/api/v1/stats?type=group&group_by=host&other=true&limit=1"),
        json!([])
    );
    assert_eq!(api.data("/api/v1/stats?type=timeseries"), json!([]));
    let z = api
        .data("/api/v1/stats?type=timeseries&interval=day&fill=zero&from=2025-01-01&to=2025-01-03");
    assert_eq!(
        z,
        json!([{"time": "2025-01-01", "ts": 1_735_689_600, "value": 0}, {"time": "2025-01-02", "ts": 1_735_776_000, "value": 0}])
    );
    assert_eq!(api.data("/api/v1/agents"), json!([]));
    assert_eq!(api.data("/api/v1/connections"), json!([]));
    assert_eq!(
        api.data("/api/v1/filter-options?filter_type=geoip"),
        json!([])
    );
}

#[test]
fn constant_time_eq_is_eq() {
    use super::handler::constant_time_eq;
    assert!(constant_time_eq(b"abc", b"abc"));
    assert!(constant_time_eq(b"", b""));
    assert!(!constant_time_eq(b"abc", b"abd"));
    assert!(!constant_time_eq(b"abc", b"ab"));
    assert!(!constant_time_eq(b"", b"a"));
    assert!(!constant_time_eq(b"ab\xff", b"ab"));
}

#[test]
fn database_errors_are_generic_500() {
    let path = fixture("broken", false);
    let api = Api::new(&path);
    // A reader that lost the table under it (never happens in production) must answer without SQL text.
    let w = open(&path, Access::Write).unwrap();
    w.execute_batch("ALTER TABLE traffic RENAME TO traffic_gone")
        .unwrap();
    drop(w);
    let msg = api.error("/api/v1/stats?type=timeseries", 500);
    assert!(
        !msg.contains("traffic") && !msg.to_lowercase().contains("sql"),
        "{msg}"
    );
}

#[test]
fn rollups_stay_consistent_with_raw_tables() {
    let path = fixture("rollup", true);
    let db = open(&path, Access::Write).unwrap();
    let check = |db: &Connection| {
        let conns = "SELECT count(*), sum(upload), sum(download) FROM connections";
        let conns_rolled = "SELECT sum(conns), sum(upload), sum(download) FROM rollup_conn_hour";
        assert_eq!(rows::<(i64, i64, i64)>(db, conns), rows(db, conns_rolled));
        let traffic = "SELECT t.minute / 60, c.agent_id, sum(t.upload), sum(t.download)
             FROM traffic t JOIN connections c ON c.pk = t.conn GROUP BY 1, 2 ORDER BY 1, 2";
        let traffic_rolled = "SELECT hour, agent_id, upload, download FROM rollup_traffic_hour
             WHERE upload <> 0 OR download <> 0 ORDER BY 1, 2";
        assert_eq!(
            rows::<(i64, String, i64, i64)>(db, traffic),
            rows(db, traffic_rolled)
        );
        let hosts =
            "SELECT CASE WHEN host <> '' THEN host ELSE destination_ip END, count(*), sum(upload),
             sum(download) FROM connections GROUP BY 1 ORDER BY 1";
        let hosts_rolled =
            "SELECT host, conns, upload, download FROM rollup_host WHERE conns > 0 ORDER BY 1";
        assert_eq!(
            rows::<(String, i64, i64, i64)>(db, hosts),
            rows(db, hosts_rolled)
        );
    };
    check(&db);
    // updates (a second writer pass adds bytes to c3), then retention-style deletes with cascade
    drop(db);
    let t = t0();
    write_agent(&path, "a1", vec![]);
    let more = Flow {
        id: "c3".into(),
        totals: Bytes {
            upload: 2_000,
            download: 60_000,
        },
        delta: Bytes {
            upload: 1_000,
            download: 10_000,
        },
        from_ms: t + 2 * HOUR_MS + 10 * MINUTE_MS,
        to_ms: t + 4 * HOUR_MS,
    };
    let diff = ConnectionDiff {
        at_ms: t + 4 * HOUR_MS,
        flows: vec![more],
        ..ConnectionDiff::default()
    };
    run_writer(&path, "a1", vec![diff]);
    let db = open(&path, Access::Write).unwrap();
    check(&db);
    let pks: Vec<i64> = rows::<(i64,)>(&db, "SELECT pk FROM connections WHERE agent_id = 'a2'")
        .into_iter()
        .map(|(pk,)| pk)
        .collect();
    assert_eq!(
        crate::store::rollup::delete_connections(&db, &pks).unwrap(),
        1
    );
    check(&db);
    drop(db);
    let api = Api::new(&path);
    assert_eq!(
        totals(&api.data("/api/v1/stats")),
        (3, 3_900, 1_860_200, 1_864_100)
    );
}

/// The earlier tool's documented requests answer with the documented keys.
#[test]
fn documented_shapes() {
    let api = Api::new(&fixture("shapes", true));
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let s = api.data("/api/v1/stats?type=summary&from=2025-04-28T00:00:00Z&to=2025-04-29T00:00:00Z&agent_id=a1&network=tcp");
    assert_eq!(keys(&s), ["count", "download", "total", "upload"]);
    for (by, field) in [
        ("network", "network"),
        ("process", "process"),
        ("destination", "destination_ip"),
        ("host", "host"),
        ("rule", "rule"),
        ("chains", "node"),
        ("geoip", "destination_geoip"),
    ] {
        let g = api.data(&format!(
            "/api/v1/stats?type=group&group_by={by}&limit=5&sort_by=count&sort_order=desc"
        ));
        let mut want = vec![
            field.to_string(),
            "count".into(),
            "download".into(),
            "total".into(),
            "upload".into(),
        ];
        want.sort();
        assert_eq!(keys(&g[0]), want, "{by}");
    }
    let t = api.data("/api/v1/stats?type=timeseries&interval=day&metric=connections&from=2025-04-27&to=2025-04-29");
    assert_eq!(keys(&t[0]), ["time", "ts", "value"]);
    let agent_keys = [
        "id",
        "last_active",
        "connections_count",
        "total_download",
        "total_upload",
        "total_traffic",
        "status",
    ];
    let a = api.data("/api/v1/agents");
    for k in agent_keys {
        assert!(a[0].get(k).is_some(), "{k}");
    }
    let st = api.data("/api/v1/agents/a1/status");
    for k in agent_keys.iter().chain(&["is_active", "networks", "rules"]) {
        assert!(st.get(k).is_some(), "{k}");
    }
    let o = api.data("/api/v1/filter-options?filter_type=rule&query=dom&limit=5");
    assert_eq!(
        o,
        json!([{"field": "rule", "label": "DomainSuffix", "value": "DomainSuffix"}])
    );
}

/// Temp ARP and leases files naming two of the fixture's devices.
fn device_files(name: &str) -> crate::devices::Devices {
    let dir = fresh_dir(&format!("{name}-dev"));
    let arp = dir.join("arp");
    let leases = dir.join("leases");
    std::fs::write(
        &arp,
        "IP address       HW type     Flags       HW address            Mask     Device\n\
         192.168.1.10     0x1         0x2         AA:BB:CC:00:00:10     *        br-lan\n\
         192.168.1.11     0x1         0x2         aa:bb:cc:00:00:11     *        br-lan\n",
    )
    .unwrap();
    std::fs::write(
        &leases,
        "1767225600 aa:bb:cc:00:00:10 192.168.1.10 laptop 01:aa:bb:cc:00:00:10\n",
    )
    .unwrap();
    crate::devices::Devices::new(Some(arp), Some(leases))
}

#[test]
fn devices_have_mac_and_name_in_groups_and_rows() {
    for mut api in both("devnames") {
        api.devices = Some(device_files("devnames"));
        let v = api
            .data("/api/v1/stats?type=group&group_by=source_ip&sort_by=count&limit=2&other=true");
        assert_eq!(
            v,
            json!([
                {"source_ip": "192.168.1.10", "mac": "aa:bb:cc:00:00:10", "name": "laptop", "count": 2, "download": 1_850_000, "upload": 2_800, "total": 1_852_800},
                {"source_ip": "10.0.0.5", "mac": "", "name": "", "count": 1, "download": 7, "upload": 5, "total": 12},
                {"source_ip": null, "mac": null, "name": null, "count": 1, "download": 200, "upload": 100, "total": 300},
            ])
        );
        // Two keys: mac and name stay next to source_ip.
        let r = api.call(
            "GET",
            "/api/v1/stats?type=group&group_by=host,source_ip&format=csv&sort_by=count&limit=1",
            None,
        );
        assert_eq!(r.status, 200);
        assert!(
            r.text().starts_with(
                "host,source_ip,mac,name,count,download,upload,total\r\n8.8.8.8,192.168.1.11,aa:bb:cc:00:00:11,,1,"
            ),
            "{}",
            r.text()
        );
        let rows = api.data("/api/v1/connections?sort_by=start&sort_order=asc");
        let names: Vec<(&str, &str)> = rows
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["source_ip"].as_str().unwrap(),
                    r["source_name"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("10.0.0.5", ""),
                ("192.168.1.10", "laptop"),
                ("192.168.1.11", ""),
                ("192.168.1.10", "laptop"),
            ]
        );
        let r = api.call("GET", "/api/v1/connections?format=csv&limit=1", None);
        let header = r.text().lines().next().unwrap().to_string();
        assert!(
            header.contains(",source_ip,source_name,source_port,"),
            "{header}"
        );
    }
}

/// The value of one sample line `name{labels} value` in an exposition.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

#[test]
fn metrics_known_numbers_caps_and_auth() {
    for mut api in both("metrics") {
        api.devices = Some(device_files("metrics"));
        let r = api.call("GET", "/metrics", None);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.content_type, "text/plain; version=0.0.4; charset=utf-8");
        let text = r.text().to_string();
        for (series, v) in [
            (
                r#"mct_bytes_total{agent="a1",direction="download"}"#,
                1_850_200.0,
            ),
            (r#"mct_bytes_total{agent="a1",direction="upload"}"#, 2_900.0),
            (r#"mct_bytes_total{agent="a2",direction="download"}"#, 7.0),
            (r#"mct_connections_total{agent="a1"}"#, 3.0),
            (
                r#"mct_device_bytes_total{device="192.168.1.10",direction="download"}"#,
                1_850_000.0,
            ),
            (r#"mct_device_connections_total{device="10.0.0.5"}"#, 1.0),
            (
                r#"mct_node_bytes_total{node="JP-02",direction="upload"}"#,
                1_005.0,
            ),
            (r#"mct_policy_connections_total{policy="Proxy"}"#, 3.0),
            (
                r#"mct_rule_bytes_total{rule="DomainSuffix (example.com)",direction="download"}"#,
                1_800_007.0,
            ),
            (r#"mct_open_connections{agent="a1"}"#, 1.0),
            (r#"mct_open_connections{agent="a2"}"#, 0.0),
            (
                r#"mct_device_info{device="192.168.1.10",mac="aa:bb:cc:00:00:10",name="laptop"}"#,
                1.0,
            ),
        ] {
            assert_eq!(sample(&text, series), v, "{series}");
        }
        assert!(sample(&text, "mct_database_size_bytes") > 0.0);
        assert!(!text.contains("mct_host_"), "no host dimension by default");
        // /api/v1/metrics is the same handler; a second scrape gives the same numbers.
        let again = api.call("GET", "/api/v1/metrics", None);
        assert_eq!(
            sample(
                again.text(),
                r#"mct_bytes_total{agent="a1",direction="download"}"#
            ),
            1_850_200.0
        );
        assert_eq!(api.call("POST", "/metrics", None).status, 405);
        // Capped: one series per dimension, the rest in "other".
        api.metrics = super::metrics::MetricsState::new(crate::api::metrics::MetricsConfig {
            max_series: 1,
            hosts: true,
        });
        let text = api.call("GET", "/metrics", None).text().to_string();
        assert_eq!(
            sample(
                &text,
                r#"mct_device_bytes_total{device="other",direction="download"}"#
            ),
            207.0
        );
        assert_eq!(
            sample(&text, r#"mct_host_connections_total{host="example.com"}"#),
            2.0
        );
        assert_eq!(
            sample(&text, r#"mct_host_connections_total{host="other"}"#),
            2.0
        );
        assert_eq!(text.matches("mct_device_connections_total{").count(), 2);
        // With a token, /metrics needs it like the rest of the API, and never shows it.
        api.token = Some("s3cret-token");
        assert_eq!(api.call("GET", "/metrics", None).status, 401);
        let ok = api.call("GET", "/metrics", Some("Bearer s3cret-token"));
        assert_eq!(ok.status, 200);
        assert!(!ok.text().contains("s3cret"));
    }
}
#[test]
fn connections_state_open_or_closed() {
    for api in both("state") {
        let ids = |target: &str| -> (i64, Vec<String>) {
            let r = api.call("GET", target, None);
            assert_eq!(r.status, 200, "{target}: {}", r.text());
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            let ids = v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    format!(
                        "{}/{}",
                        r["agent_id"].as_str().unwrap(),
                        r["id"].as_str().unwrap()
                    )
                })
                .collect();
            (v["total_count"].as_i64().unwrap(), ids)
        };
        // c3 of a1 is the only open connection of the fixture.
        assert_eq!(
            ids("/api/v1/connections?state=open"),
            (1, vec!["a1/c3".into()])
        );
        assert_eq!(
            ids("/api/v1/connections?state=closed&limit=2"),
            (3, vec!["a1/c2".into(), "a1/c1".into()]),
            "total_count counts every closed row, not the page"
        );
        assert_eq!(ids("/api/v1/connections?state=all").0, 4);
        assert_eq!(ids("/api/v1/connections?state=closed&agent_id=a2").0, 1);
        assert_eq!(ids("/api/v1/connections?state=open&agent_id=a2").0, 0);
        assert_eq!(
            ids("/api/v1/connections?state=closed&host=example.com&from=2025-04-28").0,
            1
        );
        let msg = api.error("/api/v1/connections?state=running", 400);
        assert!(msg.contains("'state'"), "{msg}");
    }
}

#[test]
fn dashboard_is_served_without_token_with_strict_headers() {
    let mut api = Api::new(&fixture("dash", true));
    api.token = Some("sekret");
    for (path, content_type, needle) in [
        (
            "/",
            "text/html; charset=utf-8",
            "<script src=\"dashboard.js\"",
        ),
        ("/index.html", "text/html; charset=utf-8", "<title>"),
        (
            "/dashboard.js",
            "text/javascript; charset=utf-8",
            "textContent",
        ),
        ("/dashboard.css", "text/css; charset=utf-8", "#chart"),
    ] {
        let r = api.call("GET", path, None);
        assert_eq!((r.status, r.content_type), (200, content_type), "{path}");
        assert!(r.text().contains(needle), "{path}");
        let header = |name: &str| {
            r.headers
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_str())
        };
        let csp = header("Content-Security-Policy").unwrap();
        assert!(
            csp.starts_with("default-src 'none'") && !csp.contains("unsafe"),
            "{csp}"
        );
        assert_eq!(header("X-Content-Type-Options"), Some("nosniff"));
    }
    assert_eq!(api.call("HEAD", "/", None).status, 200);
    assert_eq!(api.call("POST", "/", None).status, 405);
    // The page holds no data; the API behind it still needs the token.
    assert_eq!(api.call("GET", "/api/v1/stats", None).status, 401);
    assert_eq!(api.call("GET", "/dashboard.json", None).status, 401);
    // No inline code (the CSP forbids it) and nothing from elsewhere.
    let html = api.call("GET", "/", None);
    let html = html.text();
    assert!(!html.contains("<script>") && !html.contains("<style") && !html.contains("style="));
    for path in ["/", "/dashboard.js", "/dashboard.css"] {
        let r = api.call("GET", path, None);
        assert!(
            !r.text().contains("http://") || path == "/dashboard.js",
            "{path}"
        );
        assert!(
            !r.text().contains("https://"),
            "{path}: no external resources"
        );
        assert!(
            !r.text().contains("innerHTML"),
            "{path}: text goes in through textContent"
        );
    }
}

#[test]
fn ranged_groups_sort_by_their_sums() {
    // Regression: with a range, ORDER BY took `up`/`down` from the inner rows, so top-N lists came out
    // in key order and `limit` cut the wrong groups.
    for api in both("rangedsort") {
        let hosts = |q: &str| -> Vec<String> {
            api.data(&format!(
                "/api/v1/stats?type=group&group_by=host&from=2025-04-28&to=2025-04-29{q}"
            ))
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["host"].as_str().unwrap_or("(other)").to_string())
            .collect()
        };
        assert_eq!(hosts(""), ["example.com", "video.example.org", "8.8.8.8"]);
        assert_eq!(
            hosts("&sort_order=asc"),
            ["8.8.8.8", "video.example.org", "example.com"]
        );
        assert_eq!(
            hosts("&sort_by=upload&limit=1&other=true"),
            ["example.com", "(other)"]
        );
    }
}

/// A database whose geoip arrays are odd on purpose (duplicates, empty, invalid, not an array, escapes).
fn geo_fixture(name: &str) -> PathBuf {
    let dir = fresh_dir(name);
    let path = dir.join("t.db");
    drop(open(&path, Access::Write).unwrap());
    let t = t0();
    let m = MINUTE_MS;
    let geos = [
        "[\"us\"]",
        "[\"cn\",\"hk\"]",
        "null",
        "[]",
        "[\"us\",\"us\"]",
        "not json",
        "{\"a\":1}",
        "[\"a\\\"b\",\"\\u0068k\"]",
        "[null,\"JP\"]",
        "[\"us\"]",
    ];
    let conns = geos
        .iter()
        .enumerate()
        .map(|(i, geo)| {
            let i = i as i64;
            let host = ["a.example", "b.example", ""][i as usize % 3];
            conn(
                &format!("g{i}"),
                t + i * 10 * m,
                "tcp",
                "192.168.1.10",
                host,
                "1.1.1.1",
                "443",
                "curl",
                ("Match", ""),
                ("DIRECT", "DIRECT"),
                geo,
                (10 + i as u64, 1_000 * (i as u64 + 1)),
                (t + i * 10 * m, t + i * 10 * m + 3 * m),
                true,
            )
        })
        .collect();
    write_agent(&path, "a1", conns);
    path
}

/// One line per row: the keys, then count/upload/download.
fn rows_text(v: &Value, keys: &[&str]) -> String {
    let mut out = String::new();
    for r in v.as_array().unwrap() {
        for k in keys {
            out += &match &r[*k] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out += "|";
        }
        let (c, u, d, _) = totals(r);
        out += &format!("{c}/{u}/{d}\n");
    }
    out
}

#[test]
fn group_by_geoip_counts_each_country_of_a_connection() {
    let api = Api::new(&geo_fixture("geo"));
    let g = "destination_geoip";
    let cases: &[(&str, &[&str])] = &[
        ("group_by=geoip", &[g]),
        ("group_by=geoip&sort_by=count&sort_order=asc", &[g]),
        ("group_by=geoip&limit=2&other=true", &[g]),
        ("group_by=geoip,host&sort_by=count", &[g, "host"]),
        ("group_by=host,geoip&sort_by=upload&limit=4&other=true", &["host", g]),
        ("group_by=geoip&from=2025-04-28T10:20:00Z&to=2025-04-28T11:00:00Z", &[g]),
        ("group_by=geoip&sort_by=count&from=2025-04-28T10:20:00Z&to=2025-04-28T11:00:00Z&limit=1&other=true", &[g]),
        ("group_by=geoip&host=a.example", &[g]),
    ];
    let mut got = String::new();
    for (q, keys) in cases {
        got += &format!("# {q}\n");
        got += &rows_text(&api.data(&format!("/api/v1/stats?type=group&{q}")), keys);
    }
    for q in ["", "&query=U", "&limit=2", "&query=zz"] {
        got += &format!("# filter-options{q}\n");
        let v = api.data(&format!("/api/v1/filter-options?filter_type=geoip{q}"));
        for value in column(&v, "value") {
            got += &value;
            got += "\n";
        }
    }
    // Recorded from the earlier json_each implementation (SQLite's JSON functions): the Rust one must agree.
    let want = r#"# group_by=geoip
|5/74/29000
us|4/57/21000
hk|2/28/10000
JP|1/18/9000
a"b|1/17/8000
cn|1/11/2000
# group_by=geoip&sort_by=count&sort_order=asc
JP|1/18/9000
a"b|1/17/8000
cn|1/11/2000
hk|2/28/10000
us|4/57/21000
|5/74/29000
# group_by=geoip&limit=2&other=true
|5/74/29000
us|4/57/21000
null|5/74/29000
# group_by=geoip,host&sort_by=count
|1.1.1.1|3/45/18000
|a.example|2/29/11000
hk|b.example|2/28/10000
us|a.example|2/29/11000
us|b.example|2/28/10000
JP|1.1.1.1|1/18/9000
a"b|b.example|1/17/8000
cn|b.example|1/11/2000
# group_by=host,geoip&sort_by=upload&limit=4&other=true
1.1.1.1||3/45/18000
a.example||2/29/11000
a.example|us|2/29/11000
b.example|hk|2/28/10000
null|null|5/74/29000
# group_by=geoip&from=2025-04-28T10:20:00Z&to=2025-04-28T11:00:00Z
|3/40/13000
us|2/28/10000
# group_by=geoip&sort_by=count&from=2025-04-28T10:20:00Z&to=2025-04-28T11:00:00Z&limit=1&other=true
|3/40/13000
null|2/28/10000
# group_by=geoip&host=a.example
|2/29/11000
us|2/29/11000
# filter-options
JP
a"b
cn
hk
us
# filter-options&query=U
us
# filter-options&limit=2
JP
a"b
# filter-options&query=zz
"#;
    assert_eq!(got, want, "{got}");
}

#[test]
fn geo_keys_split_arrays_as_json_each_did() {
    use super::stats::geo_keys;
    assert_eq!(geo_keys("[\"us\"]"), ["us"]);
    assert_eq!(geo_keys(" [\"cn\", \"hk\"] "), ["cn", "hk"]);
    assert_eq!(geo_keys("[\"us\",\"us\"]"), ["us", "us"]);
    for empty in ["null", "[]", "", "[\"us\"", "\"us\"", "{\"a\":1}", "[1,]"] {
        assert_eq!(geo_keys(empty), [""], "{empty:?}");
    }
    // What SQLite's json_each + CAST(value AS TEXT) gave for the other element types.
    assert_eq!(
        geo_keys("[true,false,null,1,2.5,-3,[1, 2],\"\\u00e9\"]"),
        ["1", "0", "", "1", "2.5", "-3", "[1,2]", "\u{e9}"]
    );
}

#[test]
fn ranged_groups_summed_in_rust_match_sqlite() {
    // stats::ranged_groups sums a ranged grouping itself (SQLite would sort every traffic row): it must give
    // SQLite's groups in SQLite's order, for every key, sort, filter and range edge.
    let api = Api::new(&fixture("rangedrust", false));
    let ranges = [
        "from=2025-04-28&to=2025-04-29",
        "from=2025-04-28T10:20:00Z&to=2025-04-28T11:00:00Z",
        "from=2025-04-28T10:20:30Z&to=2025-04-28T12:00:01Z",
        "from=2025-01-01",
        "to=2025-04-28T11:00:00Z",
    ];
    let sorts = [
        "",
        "&sort_by=count",
        "&sort_by=upload&sort_order=asc",
        "&sort_by=download&limit=1",
    ];
    let filters = [
        "",
        "&network=udp",
        "&agent_id=router-a",
        "&policy=Proxy&source_ip=192.168.1.10",
    ];
    let mut compared = 0;
    for by in [
        "host",
        "network",
        "process",
        "destination",
        "rule",
        "chains",
        "policy",
        "source_ip",
        "inbound",
        "agent_id",
        "destination_port",
        "host,network",
        "source_ip,policy",
    ] {
        for range in ranges {
            for sort in sorts {
                for filter in filters {
                    let q = format!("type=group&group_by={by}&{range}{sort}{filter}");
                    let (mine, theirs) = super::stats::ranged_both_ways(&api.db, &q);
                    assert_eq!(mine, theirs, "{q}");
                    compared += usize::from(!theirs.is_empty());
                }
            }
        }
    }
    assert!(compared > 500, "only {compared} non-empty comparisons");
}

#[test]
fn filtered_traffic_sums_from_the_matching_set_equal_the_join() {
    // stats::raw sums a filtered range's traffic through the set of matching connections, and joins each
    // traffic row to its connection beyond a bound: both must give the same buckets.
    let api = Api::new(&fixture("rawsets", false));
    let mut compared = 0;
    for filter in [
        "network=udp",
        "agent_id=router-a",
        "policy=Proxy&source_ip=192.168.1.10",
        "host=example.com",
        "network=none-such",
    ] {
        for range in [
            "from=2025-04-28&to=2025-04-29",
            "from=2025-04-28T10:20:30Z&to=2025-04-28T12:00:01Z",
            "from=2025-01-01",
        ] {
            for unit in [MINUTE_MS, HOUR_MS, 86_400_000] {
                let q = format!("{filter}&{range}");
                let (set, join) = super::stats::raw_both_ways(&api.db, &q, unit);
                assert_eq!(set, join, "{q} per {unit} ms");
                compared += usize::from(!join.is_empty());
            }
        }
    }
    assert!(compared >= 20, "only {compared} non-empty comparisons");
}

/// Schema v4 indexes the minute a connection started, not its time: within a minute the order and the
/// `from`/`to` bounds must still be exact to the millisecond.
#[test]
fn start_times_within_a_minute_order_and_filter_to_the_millisecond() {
    let t = t0();
    let starts = [
        ("m0", t),
        ("m30", t + 30_000),
        ("m59", t + 59_999),
        ("n0", t + 60_000),
        ("n1", t + 61_000),
    ];
    let dir = fresh_dir("minute");
    let path = dir.join("t.db");
    // written in an order unlike their starts
    let conns = [2, 4, 0, 3, 1].map(|i| {
        let (id, start) = starts[i];
        let ip = "192.168.1.10";
        let rule = ("Match", "");
        conn(
            id,
            start,
            "tcp",
            ip,
            "example.com",
            "1.1.1.1",
            "443",
            "",
            rule,
            ("Proxy", "HK-01"),
            "",
            (1, 1),
            (start, start + 1),
            true,
        )
    });
    write_agent(&path, "a1", conns.into());
    let api = Api::new(&path);
    let ids = |target: &str| column(&api.data(target), "id");
    assert_eq!(ids("/api/v1/connections"), ["n1", "n0", "m59", "m30", "m0"]);
    assert_eq!(
        ids("/api/v1/connections?sort_order=asc"),
        ["m0", "m30", "m59", "n0", "n1"]
    );
    let range = "from=2025-04-28T10:00:30Z&to=2025-04-28T10:01:00Z";
    assert_eq!(ids(&format!("/api/v1/connections?{range}")), ["m59", "m30"]);
    assert_eq!(
        ids(&format!(
            "/api/v1/connections?{range}&agent_id=a1&sort_order=asc"
        )),
        ["m30", "m59"]
    );
    assert_eq!(
        api.data(&format!("/api/v1/stats?type=summary&{range}"))["count"],
        2
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Read after write through the real server and its answer cache: a summary read, an acknowledged sync, then
/// the same read at once must include the sync (it was answered from the cache for up to 4 s).
#[test]
fn a_read_right_after_an_acknowledged_sync_includes_it() {
    let dir = fresh_dir("read-after-write");
    let path = dir.join("t.db");
    let writer = Writer::new(open(&path, Access::Write).unwrap(), WriterConfig::default()).unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel(16);
    let writing = std::thread::spawn(move || writer.run(rx));
    let cfg = super::ApiConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: None,
        db_path: path,
        workers: 2,
        max_body_bytes: 1 << 20,
        devices: None,
        metrics: Default::default(),
    };
    let server = super::start(cfg, Some(crate::store::WriterHandle::new(tx))).unwrap();
    let base = format!("http://{}/api/v1", server.addr());
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .into();
    let count = || {
        let mut r = http
            .get(&format!("{base}/stats?type=summary"))
            .call()
            .unwrap();
        let body = r.body_mut().read_to_string().unwrap();
        assert_eq!(r.status(), 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()["data"]["count"].clone()
    };
    assert_eq!(count(), 0);
    for n in 1..=3 {
        let body = json!({
            "agent_id": "a1",
            "timestamp": "2025-04-28T10:05:00Z",
            "connections": [{
                "id": format!("c{n}"),
                "host": "example.com",
                "upload": 10,
                "download": 20,
                "start": "2025-04-28T10:00:00Z",
                "last_updated": "2025-04-28T10:05:00Z",
            }],
        });
        let mut r = http
            .post(&format!("{base}/sync"))
            .send(body.to_string().as_bytes())
            .unwrap();
        let answer = r.body_mut().read_to_string().unwrap();
        assert_eq!(r.status(), 200, "{answer}");
        assert_eq!(count(), n, "the read right after acknowledged sync {n}");
    }
    server.stop();
    writing.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
