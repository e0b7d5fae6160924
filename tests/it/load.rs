//! The master under concurrent load, as a smoke version of the `load` figure of `make bench`: simulated
//! agents syncing and dashboard clients querying at the same time against the real binary. Asserts that no
//! request fails and that the master holds exactly what the agents had acknowledged; never asserts times.

use crate::binary::{master_args, Proc};
use crate::load_gen::{self, LoadConfig};
use crate::support::TempDir;
use std::time::Duration;

#[test]
fn agents_syncing_while_dashboards_query_lose_nothing_and_fail_nothing() {
    let dir = TempDir::new("load");
    let db = dir.path("master.db");
    let mut master = Proc::spawn(&master_args(&db, 0, &["--listen-host", "127.0.0.1"]));
    let base = format!("http://{}", master.api_addr());
    let cfg = LoadConfig {
        base,
        agents: 10,
        agent_prefix: "smoke-".into(),
        conns: (20, 60),
        churn_percent: 5.0,
        sync_interval: Duration::from_secs(1),
        stats_clients: 5,
        clicks: (Duration::from_millis(100), Duration::from_millis(600)),
        duration: Duration::from_secs(5),
        seed: 7,
    };
    let res = load_gen::run(&cfg);
    // For the log only: times depend on the machine and are never asserted.
    let stats = res.stats_latencies();
    eprintln!(
        "load smoke: {} requests ({}), stats p99 {:?}",
        res.total(),
        res.by_kind(),
        load_gen::quantile(&stats, 0.99)
    );
    assert_eq!(
        res.failed(),
        0,
        "failed requests ({}): {:#?}",
        res.by_kind(),
        res.errors(10)
    );
    assert!(res.undelivered.is_empty(), "{:?}", res.undelivered);
    // Every agent synced more than once (changes and closes included); every query of the dashboard's
    // opening refresh ran (the clicks' suggestions and agents list depend on timing: not asserted).
    let syncs = res.kinds["sync"].total();
    assert!(syncs > 2 * cfg.agents as u64, "only {syncs} syncs");
    for kind in ["summary", "group", "timeseries", "connections"] {
        assert!(
            res.kinds.contains_key(kind),
            "no {kind} query ran: {}",
            res.by_kind()
        );
    }
    assert!(
        res.expected.values().any(|e| e.2),
        "no closed connection was sent"
    );
    let check = load_gen::check_master(&db, "smoke-", &res.expected).unwrap();
    assert_eq!(check.rows, res.expected.len() as u64);
    assert_eq!(check.wrong_count, 0, "{:#?}", check.wrong);
    master.signal("TERM");
    assert_eq!(master.wait_exit(), 0);
}
