//! The real binary as a user runs it: exit codes, error messages, signals.

use crate::fake_mihomo::{frame, FakeMihomo};
use crate::support::*;
use std::ffi::OsStr;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_mihomo-connections-tracker");

/// A child process whose stderr lines arrive on a channel; killed on drop.
pub struct Proc {
    pub child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

/// The arguments of a master storing into `db` with its API on `port` (0: any free one), then `extra`.
pub fn master_args(db: &Path, port: u16, extra: &[&str]) -> Vec<String> {
    let port = port.to_string();
    let head = [
        "master",
        "--database",
        db.to_str().unwrap(),
        "--listen-port",
        &port,
    ];
    head.iter().chain(extra).map(|a| a.to_string()).collect()
}

/// The arguments of a standalone master on a free port recording `mihomo`, committing every `commit_ms`,
/// then `extra`.
pub fn standalone_args(
    db: &Path,
    mihomo: &FakeMihomo,
    commit_ms: u64,
    extra: &[&str],
) -> Vec<String> {
    let (port, ms) = (mihomo.addr.port().to_string(), commit_ms.to_string());
    let own = [
        "--mihomo-host",
        "127.0.0.1",
        "--mihomo-port",
        &port,
        "--commit-interval-ms",
        &ms,
    ];
    master_args(db, 0, &[&own[..], extra].concat())
}

/// The API address from a "api: listening on http://ADDR/api/v1" line.
pub fn listen_addr(line: &str) -> SocketAddr {
    let rest = &line[line.find("http://").unwrap() + 7..];
    rest[..rest.find('/').unwrap()].parse().unwrap()
}

impl Proc {
    pub fn spawn(args: &[impl AsRef<OsStr>]) -> Proc {
        Proc::spawn_with(BIN, &[], args)
    }

    /// A standalone master ([`standalone_args`]) logging at debug level.
    pub fn standalone(db: &Path, mihomo: &FakeMihomo, commit_ms: u64) -> Proc {
        Proc::spawn(&standalone_args(
            db,
            mihomo,
            commit_ms,
            &["--log-level", "debug"],
        ))
    }

    /// Runs `program` (e.g. an emulator) with `pre` then `args`.
    pub fn spawn_with(program: &str, pre: &[&str], args: &[impl AsRef<OsStr>]) -> Proc {
        let mut child = Command::new(program)
            .args(pre)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits (20 s at most) for a stderr line containing `needle`; returns it.
    pub fn wait_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no stderr line with {needle:?}; saw {:#?}", self.seen),
            }
        }
    }

    /// The API address, once it says it listens.
    pub fn api_addr(&mut self) -> SocketAddr {
        listen_addr(&self.wait_line("api: listening on http://"))
    }

    /// Forgets the stderr lines written so far (the next `wait_line` sees only newer ones).
    pub fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args(["-s", sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {sig}");
    }

    /// Waits (20 s at most) for the exit code.
    pub fn wait_exit(&mut self) -> i32 {
        let what = format!("the process to exit; stderr {:#?}", self.seen);
        let status = wait_for(&what, || self.child.try_wait().unwrap());
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(line);
        }
        status.code().unwrap_or(-1)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[impl AsRef<OsStr>]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout),
    )
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    for (args, needle) in [
        (
            &["master", "--database", "x.db", "--frobnicate"][..],
            "--frobnicate",
        ),
        (
            &["master", "--database", "x.db", "--listen-port", "http"][..],
            "--listen-port",
        ),
        (&["agent", "--local-database", "x.db"][..], "--mihomo-host"),
        (&["nonsense"][..], "nonsense"),
    ] {
        let (code, text) = run(args);
        assert_eq!(code, 2, "{args:?}: {text}");
        assert!(text.contains(needle), "{args:?}: {text}");
    }
    let (code, text) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(text.contains("master") && text.contains("agent"));
    let (code, text) = run(&["--version"]);
    assert_eq!(
        (code, text.trim()),
        (
            0,
            concat!("mihomo-connections-tracker ", env!("CARGO_PKG_VERSION"))
        )
    );
}

#[test]
fn a_file_that_is_not_a_database_is_refused_and_left_alone() {
    let dir = TempDir::new("corrupt");
    let db = dir.path("notes.db");
    let content = b"SQLite format 2? no: my notes, keep them\n".repeat(100);
    std::fs::write(&db, &content).unwrap();
    let (code, text) = run(&master_args(&db, 0, &[]));
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("not a SQLite database"), "{text}");
    assert_eq!(std::fs::read(&db).unwrap(), content);
}

#[test]
fn sigterm_commits_what_is_pending() {
    let dir = TempDir::new("sigterm");
    let db = dir.path("t.db");
    let fake = FakeMihomo::start(None);
    // commits only every 10 minutes: what is stored at exit was written by the shutdown itself
    let mut p = Proc::standalone(&db, &fake, 600_000);
    fake.wait_connected();
    fake.push(frame(
        10,
        &[("a", 1, 10, "a.example"), ("b", 2, 20, "b.example")],
    ));
    fake.push(frame(20, &[("a", 5, 50, "a.example")]));
    p.wait_line("closed b");
    p.signal("TERM");
    assert_eq!(p.wait_exit(), 0, "{:#?}", p.seen);
    let rows = stored(&db);
    assert_stored(&rows, &[("a", 5, 50, true), ("b", 2, 20, false)]);
}

#[test]
fn every_flag_can_come_from_the_environment() {
    // MCT_DATABASE stands in for --database: the file named there is the one refused
    let dir = TempDir::new("env");
    let db = dir.path("from-env.db");
    std::fs::write(&db, b"not a database").unwrap();
    let out = Command::new(BIN)
        .args(["master", "--listen-port", "0"])
        .env("MCT_DATABASE", &db)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("from-env.db") && text.contains("not a SQLite database"),
        "{text}"
    );
    // and a malformed value from the environment is named like a flag
    let out = Command::new(BIN)
        .args(["master", "--database", "x.db"])
        .env("MCT_LISTEN_PORT", "eighty")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen-port"));
}

#[test]
fn a_flag_that_would_be_ignored_or_is_out_of_range_exits_2_naming_it() {
    for (args, needle) in [
        (
            &["master", "--database", "x.db", "--interval-ms", "500"][..],
            "--interval-ms needs --mihomo-host or --mihomo-config",
        ),
        (
            &["master", "--database", "x.db", "--workers", "65"][..],
            "--workers: expected a number of threads 1-64, got '65'",
        ),
        (
            &[
                "agent",
                "--mihomo-host",
                "h",
                "--local-database",
                "a.db",
                "--sync-interval",
                "5",
            ][..],
            "--sync-interval needs --master-url",
        ),
    ] {
        let (code, text) = run(args);
        assert_eq!(code, 2, "{args:?}: {text}");
        assert!(text.contains(needle), "{args:?}: {text}");
    }
    // from the environment, the variable is named
    let out = Command::new(BIN)
        .args(["master", "--database", "x.db"])
        .env("MCT_INTERVAL_MS", "500")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("MCT_INTERVAL_MS (--interval-ms) needs --mihomo-host"),
        "{text}"
    );
}
