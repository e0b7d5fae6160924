//! Standalone mode end to end: a fake mihomo → the collector → the writer → SQLite, checked row by row.

use crate::fake_mihomo::{frame, Event, FakeMihomo};
use crate::support::*;
use mihomo_connections_tracker::app;
use mihomo_connections_tracker::timefmt::now_ms;
use std::path::PathBuf;

const FRAMES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/frames/");

/// A master recording a fresh fake mihomo into `t.db` of a fresh directory `name`.
fn start(name: &str) -> (TempDir, PathBuf, FakeMihomo, app::Running) {
    let dir = TempDir::new(name);
    let db = dir.path("t.db");
    let fake = FakeMihomo::start(None);
    let running = app::start_master(&master_config(&db, Some((fake.addr, None)))).unwrap();
    (dir, db, fake, running)
}

fn row<'a>(rows: &'a [Stored], id: &str) -> &'a Stored {
    rows.iter()
        .find(|r| r.id == id)
        .unwrap_or_else(|| panic!("no row {id} in {rows:?}"))
}

#[test]
fn opened_growing_closed() {
    let (_dir, db, fake, running) = start("ogc");
    let uri = fake.wait_connected();
    assert!(uri.starts_with("/connections?interval=1000"), "{uri}");
    let t0 = now_ms();
    fake.push(frame(
        100,
        &[("a", 1, 10, "a.example"), ("b", 0, 0, "b.example")],
    ));
    wait_stored(&db, "a and b opened", |r| {
        r.len() == 2 && r[0].download == 10
    });
    fake.push(frame(
        200,
        &[("a", 2, 30, "a.example"), ("b", 5, 5, "b.example")],
    ));
    wait_stored(&db, "bytes to grow", |r| {
        r[0].download == 30 && r[1].download == 5
    });
    fake.push(frame(300, &[("b", 5, 7, "b.example")]));
    let rows = wait_stored(&db, "a closed", |r| {
        r[0].end_ms.is_some() && r[1].download == 7
    });
    assert_stored(&rows, &[("a", 2, 30, false), ("b", 5, 7, true)]);
    let end = rows[0].end_ms.unwrap();
    assert!(
        end >= t0 && end <= now_ms(),
        "end time {end} is the time of the push that lacked it"
    );
    running.shutdown().unwrap();
}

#[test]
fn core_restart_closes_what_was_open() {
    let (_dir, db, fake, running) = start("restart");
    fake.wait_connected();
    fake.push(frame(
        1000,
        &[("a", 1, 10, "a.example"), ("b", 1, 10, "b.example")],
    ));
    fake.push(frame(
        2000,
        &[("a", 1, 20, "a.example"), ("b", 1, 10, "b.example")],
    ));
    wait_stored(&db, "a at 20", |r| r.len() == 2 && r[0].download == 20);
    // totals went down: the core restarted; new ids only
    fake.push(frame(5, &[("c", 0, 5, "c.example")]));
    let rows = wait_stored(&db, "a and b closed", |r| {
        r.len() == 3 && r[0].end_ms.is_some() && r[1].end_ms.is_some()
    });
    assert_stored(
        &rows,
        &[("a", 1, 20, false), ("b", 1, 10, false), ("c", 0, 5, true)],
    );
    running.shutdown().unwrap();
}

#[test]
fn dropped_socket_reconnects_without_double_counting() {
    let (_dir, db, fake, running) = start("drop");
    fake.wait_connected();
    fake.push(frame(
        100,
        &[("a", 1, 10, "a.example"), ("b", 1, 10, "b.example")],
    ));
    let before = wait_stored(&db, "a and b", |r| r.len() == 2);
    fake.drop_client();
    fake.wait_connected();
    fake.push(frame(150, &[("a", 3, 40, "a.example")]));
    let rows = wait_stored(&db, "b closed, a grown", |r| {
        r[1].end_ms.is_some() && r[0].download == 40
    });
    assert_stored(&rows, &[("a", 3, 40, true), ("b", 1, 10, false)]);
    assert!(before[1].end_ms.is_none());
    running.shutdown().unwrap();
}

#[test]
fn tracker_restart_resumes_from_stored_bytes() {
    let dir = TempDir::new("resume");
    let db = dir.path("t.db");
    let fake = FakeMihomo::start(None);
    let cfg = master_config(&db, Some((fake.addr, None)));
    let running = app::start_master(&cfg).unwrap();
    fake.wait_connected();
    fake.push(frame(
        100,
        &[("a", 1, 10, "a.example"), ("b", 1, 10, "b.example")],
    ));
    wait_stored(&db, "a and b", |r| r.len() == 2);
    running.shutdown().unwrap();
    let running = app::start_master(&cfg).unwrap();
    fake.wait_connected();
    fake.push(frame(
        200,
        &[("a", 1, 25, "a.example"), ("c", 0, 5, "c.example")],
    ));
    let rows = wait_stored(&db, "a resumed, b closed, c opened", |r| {
        r.len() == 3 && r[0].download == 25 && r[1].end_ms.is_some()
    });
    assert_stored(
        &rows,
        &[("a", 1, 25, true), ("b", 1, 10, false), ("c", 0, 5, true)],
    );
    running.shutdown().unwrap();
}

#[test]
fn null_snapshot_then_same_ids_reopen_the_same_rows() {
    let (_dir, db, fake, running) = start("null");
    fake.wait_connected();
    fake.push(frame(100, &[("a", 1, 10, "a.example")]));
    wait_stored(&db, "a", |r| r.len() == 1);
    fake.push(frame(100, &[]));
    wait_stored(&db, "a closed by the empty snapshot", |r| {
        r[0].end_ms.is_some()
    });
    fake.push(frame(120, &[("a", 1, 30, "a.example")]));
    let rows = wait_stored(&db, "a reopened", |r| {
        r[0].end_ms.is_none() && r[0].download == 30
    });
    assert_stored(&rows, &[("a", 1, 30, true)]);
    running.shutdown().unwrap();
}

#[test]
fn real_frames_of_mihomo_sing_box_and_clash() {
    let (_dir, db, fake, running) = start("frames");
    fake.wait_connected();
    for name in [
        "mihomo.wire.txt",
        "sing-box.wire.txt",
        "clash-2021.json",
        "mihomo-empty.wire.txt",
    ] {
        let text = std::fs::read_to_string(format!("{FRAMES}{name}")).unwrap();
        fake.push(text);
    }
    // mihomo and sing-box share ids (same connections); Clash adds one; the empty frame closes them all.
    let rows = wait_stored(&db, "three connections, all closed", |r| {
        r.len() == 3 && r.iter().all(|x| x.end_ms.is_some())
    });
    assert_traffic_matches_totals(&rows);
    let (host, node, policy, rule, payload, chains, geo, start): (String, String, String, String, String, String, String, i64) = query_one(
        &db,
        "SELECT host, node, policy, rule, rule_payload, chains, destination_geoip, start_ms FROM connections WHERE id = 'b7e4a1d0-2c3f-4e8a-8d6b-91f0c2a5e3d4'",
    );
    assert_eq!(
        (
            host.as_str(),
            node.as_str(),
            policy.as_str(),
            rule.as_str(),
            payload.as_str()
        ),
        ("time.apple.com", "DIRECT", "DIRECT", "Match", "")
    );
    assert_eq!(
        (chains.as_str(), geo.as_str()),
        (r#"["DIRECT"]"#, r#"["us"]"#)
    );
    assert_eq!(
        mihomo_connections_tracker::timefmt::format_rfc3339(start, true),
        "2026-07-14T13:05:02.090Z"
    );
    let clash: (String, String, i64, i64) = query_one(
        &db,
        "SELECT node, policy, upload, download FROM connections WHERE id = '9a1f3c55-0b7e-4d2a-8c61-2f4e5d6a7b8c'",
    );
    assert_eq!(clash, ("JP-02".into(), "Proxy".into(), 2048, 65536));
    // the youtube connection was seen by mihomo and sing-box frames with the same counters: counted once
    assert_eq!(
        row(&rows, "3f0c6c2e-8b1d-4f5e-9a57-6b2d0e4c7a91").download,
        4718392
    );
    running.shutdown().unwrap();
}

#[test]
fn secret_is_sent_encoded_and_a_wrong_one_is_refused() {
    let dir = TempDir::new("secret");
    let db = dir.path("t.db");
    let fake = FakeMihomo::start(Some("s p&ce"));
    let running =
        app::start_master(&master_config(&db, Some((fake.addr, Some("s p&ce"))))).unwrap();
    let uri = fake.wait_connected();
    assert!(uri.contains("token=s%20p%26ce"), "{uri}");
    fake.push(frame(1, &[("a", 1, 1, "a.example")]));
    wait_stored(&db, "a", |r| r.len() == 1);
    running.shutdown().unwrap();

    let dir = TempDir::new("wrong");
    let db = dir.path("t.db");
    let running = app::start_master(&master_config(&db, Some((fake.addr, Some("wrong"))))).unwrap();
    fake.expect(|e| *e == Event::Unauthorized, "a refused upgrade");
    assert!(stored(&db).is_empty());
    // it waits a minute before retrying, but stops at once when told
    let t = std::time::Instant::now();
    running.shutdown().unwrap();
    assert!(t.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn large_snapshots_arrive_whole() {
    let (_dir, db, fake, running) = start("large");
    fake.wait_connected();
    let ids: Vec<String> = (0..3000).map(|i| format!("c{i:04}")).collect();
    let list: Vec<(&str, u64, u64, &str)> = ids
        .iter()
        .map(|id| (id.as_str(), 1, 10, "h.example"))
        .collect();
    fake.push(frame(1, &list));
    let rows = wait_stored(&db, "3000 connections", |r| r.len() == 3000);
    assert_traffic_matches_totals(&rows);
    running.shutdown().unwrap();
}

#[test]
fn agent_in_process_records() {
    let dir = TempDir::new("agent-inproc");
    let db = dir.path("a.db");
    let fake = FakeMihomo::start(None);
    let m = master_config(&db, Some((fake.addr, None)));
    let cfg = mihomo_connections_tracker::cli::AgentConfig {
        mihomo: m.mihomo.clone().unwrap(),
        master_url: Some("http://127.0.0.1:9".into()),
        master_token: None,
        local_database: db.clone(),
        agent_id: Some("a1".into()),
        sync_interval: std::time::Duration::from_secs(1),
        data_retention_days: 7,
        max_db_bytes: None,
        commit_interval: std::time::Duration::from_millis(50),
        db_cache_kib: 2048,
        log_level: mihomo_connections_tracker::log::Level::Debug,
    };
    mihomo_connections_tracker::log::set_level(mihomo_connections_tracker::log::Level::Debug);
    let running = app::start_agent(&cfg).unwrap();
    fake.wait_connected();
    fake.push(frame(1, &[("a", 1, 10, "a.example")]));
    wait_stored(&db, "a", |r| r.len() == 1);
    running.shutdown().unwrap();
}
