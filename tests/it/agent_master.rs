//! Agents and a master as real processes: nothing lost, nothing duplicated, whatever happens to either.

use crate::binary::{master_args, Proc};
use crate::fake_mihomo::{frame, FakeMihomo};
use crate::support::*;

const N: usize = 3000;

/// A master on `port`, with `extra` flags, once its API listens (also used by `faults`).
pub(crate) fn master(db: &std::path::Path, port: u16, extra: &[&str]) -> Proc {
    let mut p = Proc::spawn(&master_args(db, port, extra));
    p.wait_line("api: listening on");
    p
}

/// An agent syncing to the master every second (also used by `faults`).
pub(crate) fn agent(db: &std::path::Path, mihomo_port: u16, master_port: u16, id: &str) -> Proc {
    Proc::spawn(&[
        "agent",
        "--mihomo-host",
        "127.0.0.1",
        "--mihomo-port",
        &mihomo_port.to_string(),
        "--local-database",
        db.to_str().unwrap(),
        "--master-url",
        &format!("http://127.0.0.1:{master_port}"),
        "--agent-id",
        id,
        "--sync-interval",
        "1",
        "--commit-interval-ms",
        "50",
    ])
}

/// `n` connections `c0000..`, each with `bytes` downloaded.
fn conns(n: usize, bytes: u64) -> Vec<(String, u64, u64, String)> {
    (0..n)
        .map(|i| {
            (
                format!("c{i:04}"),
                bytes / 10,
                bytes + i as u64,
                format!("h{}.example", i % 50),
            )
        })
        .collect()
}

fn push(fake: &FakeMihomo, totals: u64, list: &[(String, u64, u64, String)]) {
    let refs: Vec<(&str, u64, u64, &str)> = list
        .iter()
        .map(|(a, b, c, d)| (a.as_str(), *b, *c, d.as_str()))
        .collect();
    fake.push(frame(totals, &refs));
}

/// Master rows as (id, upload, download, open?).
fn master_rows(db: &std::path::Path) -> Vec<(String, i64, i64, bool)> {
    summary(&stored(db))
}

#[test]
fn master_down_then_up_and_agent_killed_mid_sync_lose_nothing() {
    let dir = TempDir::new("agent-master");
    let (adb, mdb) = (dir.path("agent.db"), dir.path("master.db"));
    let fake = FakeMihomo::start(None);
    let mport = free_port();
    // the master is not there yet: the agent records alone
    let mut a = agent(&adb, fake.addr.port(), mport, "router-1");
    fake.wait_connected();
    push(&fake, 1, &conns(N, 1000));
    let mut more = conns(3000, 5000);
    more.truncate(2500); // 500 closed
    push(&fake, 2, &more);
    wait_stored(&adb, "the agent to record 3000 connections", |r| {
        r.len() == 3000 && r.iter().filter(|x| x.end_ms.is_some()).count() == 500
    });
    a.wait_line("unreachable");

    // the master comes up; kill the agent while it syncs its backlog (3 batches of 1000)
    let _m = master(&mdb, mport, &[]);
    a.wait_line("accepts batches again");
    a.child.kill().unwrap();
    a.wait_exit();
    let after_kill = stored(&mdb).len();

    // restart: it resumes the open connections and the sync cursor; more traffic flows meanwhile
    let mut a = agent(&adb, fake.addr.port(), mport, "router-1");
    fake.wait_connected();
    let mut last = conns(2500, 9000);
    last.truncate(2000); // 500 more closed
    push(&fake, 3, &last);
    let want: Vec<(String, i64, i64, bool)> = (0..3000)
        .map(|i| {
            let (up, down) = if i < 2000 {
                (900, 9000)
            } else if i < 2500 {
                (500, 5000)
            } else {
                (100, 1000)
            };
            (format!("c{i:04}"), up, down + i as i64, i < 2000)
        })
        .collect();
    wait_for(
        "the master to hold every connection with final bytes",
        || (master_rows(&mdb) == want).then_some(()),
    );
    let agents: Vec<(String,)> = query(&mdb, "SELECT DISTINCT agent_id FROM connections", []);
    assert_eq!(agents, [("router-1".to_string(),)]);
    assert_traffic_matches_totals(&stored(&mdb));
    assert_traffic_matches_totals(&stored(&adb));
    eprintln!("master had {after_kill} rows when the agent was killed");
    a.signal("TERM");
    assert_eq!(a.wait_exit(), 0);
}
