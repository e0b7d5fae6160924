//! `GET /metrics` of a real master on loopback, parsed by a real exposition-format parser (the Python
//! package `prometheus-client`, which `make test` installs), with the numbers of a fixture written by the
//! real writer; counters that survive a retention delete and a restart; devices named from temp ARP/leases
//! files.

use crate::support::{master_config, whole_connection, write_diffs, TempDir};
use mihomo_connections_tracker::app;
use mihomo_connections_tracker::model::{Bytes, ConnMeta};
use mihomo_connections_tracker::store::{open, Access, WriteCmd};
use serde_json::Value;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const T: i64 = 1_745_834_400_000; // 2025-04-28T10:00:00Z
/// A rule payload that needs every escape of a label value.
const NASTY: &str = "a\"b\\c\nd";

/// (id, source_ip, policy, node, rule payload, upload, download, closed)
type Row = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    u64,
    u64,
    bool,
);

const ROWS: &[Row] = &[
    (
        "m1",
        "192.168.1.20",
        "Proxy",
        "HK",
        "example.com",
        100,
        10_000,
        true,
    ),
    ("m2", "192.168.1.20", "Proxy", "JP", NASTY, 20, 2_000, true),
    ("m3", "192.168.1.30", "DIRECT", "DIRECT", "", 3, 300, false),
];

/// Writes the fixture as agent `router` with the real writer.
fn fixture(db: &Path) {
    let diffs = ROWS.iter().enumerate().map(|(i, row)| {
        let (id, src, policy, node, payload, up, down, closed) = *row;
        let start = T + i as i64 * 60_000;
        let meta = ConnMeta {
            id: id.to_string(),
            start_ms: start,
            network: "tcp".into(),
            source_ip: src.to_string(),
            host: "example.com".into(),
            destination_ip: "93.184.216.34".into(),
            chains: format!("[\"{policy}\",\"{node}\"]"),
            policy: policy.to_string(),
            node: node.to_string(),
            rule: if payload.is_empty() {
                "Match"
            } else {
                "DomainSuffix"
            }
            .into(),
            rule_payload: payload.to_string(),
            ..ConnMeta::default()
        };
        let bytes = Bytes {
            upload: up,
            download: down,
        };
        whole_connection(meta, bytes, start + 60_000, closed)
    });
    write_diffs(db, "router", diffs);
}

/// The parser: reads the exposition on stdin, prints `[[name, {labels}, value], ...]` as JSON.
const PARSE: &str = r#"
import sys, json
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    sys.stderr.write("NO_PROMETHEUS_CLIENT\n")
    sys.exit(3)
out = []
types = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    types[fam.name] = fam.type
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps({"types": types, "samples": out}))
"#;

/// Parses `text` with prometheus_client; panics (naming `make test`) when the module is missing, or with
/// the parser's message when the text is not valid exposition format.
fn parse(text: &str) -> Value {
    let mut child = Command::new("python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed to check /metrics with prometheus_client (`make test` installs the module)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("NO_PROMETHEUS_CLIENT") {
        panic!(
            "the Python module prometheus_client is missing: `make test` installs it \
             (python3 -m pip install --quiet prometheus-client)"
        );
    }
    assert!(
        out.status.success(),
        "prometheus_client rejected the exposition: {stderr}\n{text}"
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The value of the one sample named `name` whose labels include `labels`.
fn value(parsed: &Value, name: &str, labels: &[(&str, &str)]) -> f64 {
    let hits: Vec<f64> = parsed["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s[0] == name && labels.iter().all(|(k, v)| s[1][*k].as_str() == Some(*v)))
        .map(|s| s[2].as_f64().unwrap())
        .collect();
    assert_eq!(hits.len(), 1, "{name} {labels:?}: {hits:?} in {parsed}");
    hits[0]
}

fn scrape(base: &str, path: &str, token: Option<&str>) -> (u16, String, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(20)))
        .build()
        .into();
    let mut rq = agent.get(&format!("{base}{path}"));
    if let Some(t) = token {
        rq = rq.header("Authorization", &format!("Bearer {t}"));
    }
    let mut resp = rq.call().unwrap();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (
        resp.status().as_u16(),
        ct,
        resp.body_mut().read_to_string().unwrap(),
    )
}

#[test]
fn metrics_parse_with_prometheus_client_and_match_the_fixture() {
    let dir = TempDir::new("metrics");
    let db = dir.path("m.db");
    fixture(&db);
    let arp = dir.path("arp");
    std::fs::write(
        &arp,
        "IP address       HW type     Flags       HW address            Mask     Device\n\
         192.168.1.20     0x1         0x2         AA:BB:CC:DD:EE:20     *        br-lan\n",
    )
    .unwrap();
    let leases = dir.path("leases");
    std::fs::write(
        &leases,
        "1767225600 aa:bb:cc:dd:ee:20 192.168.1.20 laptop 01:aa:bb:cc:dd:ee:20\n",
    )
    .unwrap();
    let mut cfg = master_config(&db, None);
    cfg.api_token = Some("tok".into());
    cfg.arp_file = arp;
    cfg.dhcp_leases = leases;
    let running = app::start_master(&cfg).unwrap();
    let base = format!("http://{}", running.api_addr().unwrap());

    assert_eq!(scrape(&base, "/metrics", None).0, 401);
    let (status, ct, text) = scrape(&base, "/metrics", Some("tok"));
    assert_eq!(status, 200, "{text}");
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!text.contains("tok\""), "the token never appears");
    let p = parse(&text);
    assert_eq!(p["types"]["mct_bytes"], "counter", "{}", p["types"]);
    assert_eq!(p["types"]["mct_open_connections"], "gauge");
    let dl = |name: &str, k: &str, v: &str| value(&p, name, &[(k, v), ("direction", "download")]);
    assert_eq!(dl("mct_bytes_total", "agent", "router"), 12_300.0);
    assert_eq!(
        value(
            &p,
            "mct_bytes_total",
            &[("agent", "router"), ("direction", "upload")]
        ),
        123.0
    );
    assert_eq!(
        value(&p, "mct_connections_total", &[("agent", "router")]),
        3.0
    );
    assert_eq!(
        dl("mct_device_bytes_total", "device", "192.168.1.20"),
        12_000.0
    );
    assert_eq!(
        dl("mct_device_bytes_total", "device", "192.168.1.30"),
        300.0
    );
    assert_eq!(dl("mct_node_bytes_total", "node", "JP"), 2_000.0);
    assert_eq!(dl("mct_policy_bytes_total", "policy", "Proxy"), 12_000.0);
    // The escaped label value comes back intact through a real parser.
    let nasty = format!("DomainSuffix ({NASTY})");
    assert_eq!(dl("mct_rule_bytes_total", "rule", &nasty), 2_000.0);
    assert_eq!(
        value(&p, "mct_rule_connections_total", &[("rule", "Match")]),
        1.0
    );
    assert_eq!(
        value(&p, "mct_open_connections", &[("agent", "router")]),
        1.0
    );
    assert_eq!(
        value(
            &p,
            "mct_device_info",
            &[
                ("device", "192.168.1.20"),
                ("mac", "aa:bb:cc:dd:ee:20"),
                ("name", "laptop")
            ]
        ),
        1.0
    );
    assert!(value(&p, "mct_database_size_bytes", &[]) > 0.0);
    // The fixture's writer counted its work in this process.
    assert!(value(&p, "mct_writer_changes_total", &[("kind", "opened")]) >= 3.0);
    assert!(value(&p, "mct_writer_commits_total", &[]) >= 1.0);
    value(&p, "mct_errors_total", &[]);
    value(&p, "mct_last_error_timestamp_seconds", &[]);

    // /api/v1/metrics is the same; devices are named in /connections too.
    let (status, _, again) = scrape(&base, "/api/v1/metrics", Some("tok"));
    assert_eq!(status, 200);
    parse(&again);
    let (_, _, rows) = scrape(
        &base,
        "/api/v1/connections?source_ip=192.168.1.20",
        Some("tok"),
    );
    let rows: Value = serde_json::from_str(&rows).unwrap();
    assert_eq!(rows["data"][0]["source_name"], "laptop", "{rows}");

    // Retention deletes a closed connection: the agent counter (refreshed at every scrape) must not drop.
    let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
    running
        .writer()
        .unwrap()
        .send_blocking(WriteCmd::Run(Box::new(move |c| {
            let n = c
                .execute("DELETE FROM connections WHERE id = 'm1'", [])
                .unwrap();
            done_tx.send(n).unwrap();
        })))
        .unwrap();
    assert_eq!(done_rx.recv_timeout(Duration::from_secs(10)).unwrap(), 1);
    let (_, _, after) = scrape(&base, "/metrics", Some("tok"));
    let p2 = parse(&after);
    assert_eq!(
        value(
            &p2,
            "mct_bytes_total",
            &[("agent", "router"), ("direction", "download")]
        ),
        12_300.0,
        "a deleted row's bytes stay counted"
    );
    assert_eq!(
        value(&p2, "mct_connections_total", &[("agent", "router")]),
        3.0
    );
    running.shutdown().unwrap();
}

/// Measurement, not a check: `MCT_METRICS_BENCH_DB=/path/big.db cargo test --test it metrics_scrape_time --
/// --ignored --nocapture` prints how long scrapes of a large database take (the database is migrated).
#[test]
#[ignore]
fn metrics_scrape_time() {
    let Ok(path) = std::env::var("MCT_METRICS_BENCH_DB") else {
        panic!("set MCT_METRICS_BENCH_DB to a database file");
    };
    drop(open(Path::new(&path), Access::Write).unwrap());
    let db = open(Path::new(&path), Access::Read).unwrap();
    let rollups = mihomo_connections_tracker::api::rollup::has_rollups(&db);
    let n: i64 = db
        .query_row("SELECT count(*) FROM connections", [], |r| r.get(0))
        .unwrap();
    for hosts in [false, true] {
        let state = mihomo_connections_tracker::api::metrics::MetricsState::new(
            mihomo_connections_tracker::api::metrics::MetricsConfig {
                max_series: 50,
                hosts,
            },
        );
        for i in 0..2 {
            let t = std::time::Instant::now();
            let text = mihomo_connections_tracker::api::metrics::render(
                &db, rollups, &state, None, None, 0,
            )
            .unwrap();
            println!(
                "{n} rows, rollups {rollups}, hosts {hosts}, scrape {i}: {} ms, {} lines",
                t.elapsed().as_millis(),
                text.lines().count()
            );
        }
    }
}
