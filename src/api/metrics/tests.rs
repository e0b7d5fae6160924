use super::*;
use crate::api::handler::{handle, ApiRequest, Ctx};
use crate::store::{open, Access};
use std::path::PathBuf;

#[test]
fn reuse_grows_with_scan_time() {
    assert_eq!(reuse_for(Duration::from_millis(1)), MIN_REUSE);
    assert_eq!(reuse_for(Duration::from_secs(3)), Duration::from_secs(30));
    assert_eq!(reuse_for(Duration::from_secs(3600)), MAX_REUSE);
}

/// A database of agents a1 (one row in `agents`) and a2 (none), with rollups of their connections and
/// hosts; `broken` then runs on it.
fn database(name: &str, broken: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mct-metrics-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("m.db");
    let db = open(&path, Access::Write).unwrap();
    db.execute_batch(
        "INSERT INTO connections (agent_id, id, start_ms, end_ms, last_updated_ms, upload, download, source_ip)
           VALUES ('a1', 'c1', 1000, NULL, 2000, 10, 100, '192.168.1.2'),
                  ('a2', 'c2', 1000, 3000, 3000, 1, 2, '192.168.1.3');
         INSERT INTO rollup_conn_hour (agent_id, hour, conns, upload, download)
           VALUES ('a1', 0, 1, 10, 100), ('a2', 0, 1, 1, 2);
         INSERT INTO rollup_host (host, conns, upload, download) VALUES ('example.com', 2, 11, 102);
         INSERT INTO agents (agent_id, first_seen_ms, last_sync_ms, sync_count) VALUES ('a1', 0, 4000, 3);",
    )
    .unwrap();
    db.execute_batch(broken).unwrap();
    path
}

fn scrape(db: &Connection, state: &MetricsState) -> ApiResult<String> {
    render(db, true, state, None, None, 10_000)
}

fn hosts() -> MetricsState {
    MetricsState::new(MetricsConfig {
        max_series: 50,
        hosts: true,
    })
}

#[test]
fn every_failing_read_fails_the_scrape_naming_it() {
    let healthy = open(&database("healthy", ""), Access::Read).unwrap();
    let text = scrape(&healthy, &hosts()).unwrap();
    // An agent without a row in `agents` never uploaded: 0 syncs and no sync time, not an error.
    assert!(
        text.contains("\nmct_agent_syncs_total{agent=\"a1\"} 3\n"),
        "{text}"
    );
    assert!(
        text.contains("\nmct_agent_syncs_total{agent=\"a2\"} 0\n"),
        "{text}"
    );
    assert!(!text.contains("mct_agent_last_sync_timestamp_seconds{agent=\"a2\"}"));
    for (name, broken, what) in [
        ("meta", "DROP TABLE meta", "the saved counters' offsets"),
        (
            "agents",
            "UPDATE rollup_conn_hour SET conns = 'x' WHERE agent_id = 'a2'",
            "the totals by agent",
        ),
        (
            "hosts",
            "UPDATE rollup_host SET conns = 'x'",
            "the totals by host",
        ),
        (
            "scan",
            "UPDATE connections SET upload = 'x' WHERE id = 'c2'",
            "the totals by device, node, policy and rule",
        ),
        (
            "syncs",
            "UPDATE agents SET sync_count = 'x'",
            "the agents' sync state",
        ),
        (
            "newest",
            "UPDATE connections SET last_updated_ms = 'x' WHERE id = 'c2'",
            "the newest update by agent",
        ),
    ] {
        let db = open(&database(name, broken), Access::Read).unwrap();
        let e = scrape(&db, &hosts()).unwrap_err();
        assert_eq!(e.status, 500, "{name}");
        assert_eq!(
            e.message,
            format!("/metrics: cannot read {what} from the database; see the server log"),
            "{name}"
        );
    }
}

#[test]
fn a_failing_scrape_answers_500_until_the_database_reads_again() {
    let path = database("recovers", "UPDATE agents SET sync_count = 'x'");
    let db = open(&path, Access::Read).unwrap();
    let state = MetricsState::default();
    let ctx = Ctx {
        db: &db,
        rollups: true,
        token: None,
        writer: None,
        now_ms: 10_000,
        devices: None,
        metrics: Some(&state),
    };
    let get = || {
        handle(
            &ctx,
            &ApiRequest {
                method: "GET",
                path: "/metrics",
                query: "",
                body: b"",
                authorization: None,
            },
        )
    };
    for _ in 0..2 {
        let r = get();
        assert_eq!(r.status, 500);
        assert_eq!(r.content_type, "application/json");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["status"], "error");
        assert_eq!(
            v["message"],
            "/metrics: cannot read the agents' sync state from the database; see the server log"
        );
        // Logged when scrapes started failing, not again.
        assert!(state.inner.lock().unwrap().failing);
    }
    open(&path, Access::Write)
        .unwrap()
        .execute("UPDATE agents SET sync_count = 4", [])
        .unwrap();
    let r = get();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r
        .text()
        .contains("\nmct_agent_syncs_total{agent=\"a1\"} 4\n"));
    assert!(!state.inner.lock().unwrap().failing);
}
