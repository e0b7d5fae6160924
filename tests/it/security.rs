//! Security defaults, each checked against the real binary (or the function that decides it): secrets never
//! reach the log even at trace level, tokens are compared in constant time everywhere, no CORS, a warning
//! when the API is exposed without a token, private database files.

use crate::binary::{listen_addr, master_args, standalone_args, BIN};
use crate::fake_mihomo::{frame, FakeMihomo};
use crate::hostile::{call, req};
use crate::support::*;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The real binary with stdout and stderr going to files (so nothing it prints escapes the check).
struct Logged {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Logged {
    fn spawn(dir: &TempDir, name: &str, args: &[impl AsRef<std::ffi::OsStr>]) -> Logged {
        let (out, err) = (
            dir.path(&format!("{name}.out")),
            dir.path(&format!("{name}.err")),
        );
        let child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Logged { child, out, err }
    }

    /// Everything it printed so far, stdout then stderr.
    fn text(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
            + &std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits (20 s at most) until it printed `needle`; returns the line.
    fn wait_for(&self, needle: &str) -> String {
        wait_for(&format!("a line with {needle:?}"), || {
            let text = self.text();
            match text.lines().find(|l| l.contains(needle)) {
                Some(l) => Ok(l.to_string()),
                None => Err(format!("the output so far:\n{text}")),
            }
        })
    }

    fn api_addr(&self) -> SocketAddr {
        listen_addr(&self.wait_for("api: listening on http://"))
    }

    fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-s", "TERM", &self.child.id().to_string()])
            .status();
        wait_for("it to stop", || match self.child.try_wait().unwrap() {
            Some(_) => Ok(()),
            None => Err(format!("the output so far:\n{}", self.text())),
        });
        self.text()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const API: &str = "api-S3cret-9d2e71";
const MIHOMO: &str = "mihomo-S3cret-40c8aa";
const WRONG_MIHOMO: &str = "wrong-mihomo-77b3f0";
const WRONG_MASTER: &str = "wrong-master-1a5c9e";

fn private(path: &Path) {
    let mode = std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{} is {:o}", path.display(), mode & 0o777);
}

#[test]
fn secrets_never_reach_the_log_even_at_trace_level() {
    let dir = TempDir::new("secrets");
    let db = dir.path("master.db");
    let mihomo = FakeMihomo::start(Some(MIHOMO));
    let master = Logged::spawn(
        &dir,
        "master",
        &standalone_args(
            &db,
            &mihomo,
            50,
            &[
                "--api-token",
                API,
                "--mihomo-token",
                MIHOMO,
                "--log-level",
                "trace",
            ],
        ),
    );
    let addr = master.api_addr();
    mihomo.wait_connected();
    mihomo.push(frame(10, &[("s1", 1, 10, "secret.example")]));
    master.wait_for("opened");
    // auth failures of every kind, including near misses that contain the token, and a token in the URL
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    for (t, want) in [
        (format!("{API}x"), 401),
        (API[..API.len() - 1].to_string(), 401),
        (format!("{API} {API}"), 401),
        (API.to_string(), 200),
    ] {
        let h = bearer(&t);
        let (status, _, body) = call(
            addr,
            &req(
                "GET",
                format!("/api/v1/stats?type=summary&token={API}&secret={API}").as_bytes(),
                &[h.as_bytes()],
                b"",
            ),
        );
        assert_eq!(status, want, "{body}");
        assert!(!body.contains(API), "the answer echoes the token: {body}");
    }
    let (status, _, _) = call(
        addr,
        &req(
            "POST",
            b"/api/v1/sync",
            &[bearer(&format!("{API}!")).as_bytes()],
            b"{}",
        ),
    );
    assert_eq!(status, 401);
    master.wait_for("-> 401");
    master.wait_for("token=<hidden>");
    // a collector with the wrong mihomo secret
    let mihomo2 = FakeMihomo::start(Some(MIHOMO));
    // (committing at the default interval)
    let refused = Logged::spawn(
        &dir,
        "refused",
        &standalone_args(
            &dir.path("refused.db"),
            &mihomo2,
            2000,
            &["--mihomo-token", WRONG_MIHOMO, "--log-level", "trace"],
        ),
    );
    refused.wait_for("refused the secret");
    // an agent with the wrong master token
    let mihomo3 = FakeMihomo::start(Some(MIHOMO));
    let port3 = mihomo3.addr.port().to_string();
    let agent_db = dir.path("agent.db");
    let agent = Logged::spawn(
        &dir,
        "agent",
        &[
            "agent",
            "--mihomo-host",
            "127.0.0.1",
            "--mihomo-port",
            &port3,
            "--mihomo-token",
            MIHOMO,
            "--local-database",
            agent_db.to_str().unwrap(),
            "--master-url",
            &format!("http://{addr}"),
            "--master-token",
            WRONG_MASTER,
            "--agent-id",
            "a1",
            "--sync-interval",
            "1",
            "--log-level",
            "trace",
        ],
    );
    mihomo3.wait_connected();
    mihomo3.push(frame(10, &[("s2", 1, 10, "secret.example")]));
    agent.wait_for("refused our token");

    let outputs = [
        ("master", master.stop()),
        ("refused", refused.stop()),
        ("agent", agent.stop()),
    ];
    for (name, text) in &outputs {
        assert!(
            text.lines().count() > 5,
            "{name} logged almost nothing:\n{text}"
        );
        for secret in [API, MIHOMO, WRONG_MIHOMO, WRONG_MASTER] {
            assert!(
                !text.contains(secret),
                "{name} logged the secret {secret}:\n{text}"
            );
        }
    }
    // database files (and SQLite's WAL companions) are private
    for f in [&db, &agent_db] {
        private(f);
        for ext in ["-wal", "-shm"] {
            let side = PathBuf::from(format!("{}{ext}", f.display()));
            if side.exists() {
                private(&side);
            }
        }
    }
}

#[test]
fn no_cors_headers_for_any_origin() {
    let dir = TempDir::new("cors");
    let db = dir.path("t.db");
    let master = Logged::spawn(&dir, "master", &master_args(&db, 0, &[]));
    let addr = master.api_addr();
    // The dashboard is served by this same server: it needs no CORS, so another origin gets none.
    for (method, path) in [
        ("GET", &b"/"[..]),
        ("GET", b"/api/v1/stats?type=summary"),
        ("OPTIONS", b"/api/v1/stats"),
        ("GET", b"/api/v1/health"),
        ("POST", b"/api/v1/sync"),
    ] {
        let (status, head, _) = call(
            addr,
            &req(
                method,
                path,
                &[
                    b"Origin: http://evil.example",
                    b"Access-Control-Request-Method: GET",
                    b"Access-Control-Request-Headers: authorization",
                ],
                b"",
            ),
        );
        assert!(status > 0, "{method} {path:?}: no answer");
        assert!(
            !head.to_ascii_lowercase().contains("access-control-"),
            "{method} {path:?}: {head}"
        );
    }
}

#[test]
fn exposed_without_a_token_warns() {
    use mihomo_connections_tracker::app::exposure_warning;
    let lan: SocketAddr = "192.168.1.2:8080".parse().unwrap();
    let any: SocketAddr = "[::]:8080".parse().unwrap();
    assert!(exposure_warning(lan, false).is_some_and(|w| w.contains("--api-token")));
    assert!(exposure_warning(any, false).is_some());
    assert_eq!(exposure_warning(lan, true), None);
    assert_eq!(
        exposure_warning("127.0.0.1:8080".parse().unwrap(), false),
        None
    );
    assert_eq!(exposure_warning("[::1]:8080".parse().unwrap(), false), None);
}

/// Every comparison with a secret goes through the constant-time check: a source scan, so a new `== token`
/// anywhere fails here.
#[test]
fn tokens_are_compared_in_constant_time_everywhere() {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("tests.rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut files,
    );
    let mut offenders = Vec::new();
    let mut checks = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        // the unit tests at the end of a file compare freely
        let code = text.split("#[cfg(test)]").next().unwrap();
        for (i, line) in code.lines().enumerate() {
            let l = line.to_ascii_lowercase();
            if l.trim_start().starts_with("//") {
                continue;
            }
            checks += l.matches("constant_time_eq(").count();
            let secretish = l.contains("token") || l.contains("secret");
            let compares = l.contains("==")
                || l.contains("!=")
                || l.contains(".eq(")
                || l.contains("starts_with(");
            if secretish && compares {
                offenders.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "secrets compared directly: {offenders:#?}"
    );
    // the definition and its use by the one authorization check (every endpoint, /sync included)
    assert!(checks >= 2, "constant_time_eq is gone?");
}
