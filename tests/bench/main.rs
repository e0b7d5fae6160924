//! The performance figures behind `make bench`: one line per figure, with its target next to it.
//!
//! Runs the real release binary (`MCT_BIN`, set by the Makefile) as child processes on 127.0.0.1 with free
//! ports, hosts the simulated mihomo in-process (so it knows exactly what was last sent), and drives the
//! library directly for the parse + diff figure. A figure whose prerequisite fails prints `FAILED: <why>`;
//! a figure over its target is marked `MISSED`; the exit code is non-zero if either happened. Every wait
//! has a deadline and every child is killed on the way out, panics included ([`Proc`]'s `Drop`).
//!
//! Environment: `MCT_BIN` (binary to run), `MCT_SIZE_BIN` (the stripped static musl binary, for the size
//! figure), `MCT_BENCH_SECS` (length of the tracking and load runs, default 60; CPU target scales with it),
//! `MCT_BENCH_LOG` (the masters' `--log-level`, default `warn`; `debug` logs every request with its time).

use mihomo_connections_tracker::simulate::{self, Rng, SimConfig, SimModel};
use mihomo_connections_tracker::store::{self, Access};
use mihomo_connections_tracker::timefmt::{self, DAY_MS, MINUTE_MS};
use rusqlite::{params, Connection, OpenFlags};
use serde_json::Value;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

// Each figure runs under `catch_unwind` and children die in `Drop`: both need unwinding (Cargo builds benches
// with it whatever the release profile says; this keeps it that way).
#[cfg(panic = "abort")]
compile_error!("the benchmark harness needs panic = \"unwind\"");

type Res<T> = std::result::Result<T, String>;

// The load generator is shared with the smoke test `it::load`.
#[path = "../it/load_gen.rs"]
mod load_gen;

// ---------------------------------------------------------------------------------------------------------
// Reporting

#[derive(Default)]
struct Report {
    failed: Vec<String>,
}

impl Report {
    /// One figure: `label: value (target ...)`, marked MISSED when over target.
    fn line(&mut self, label: &str, value: &str, target: &str, ok: bool) {
        let mark = if ok { "" } else { "  MISSED" };
        println!("{label}: {value} (target {target}){mark}");
        if !ok {
            self.failed.push(label.to_owned());
        }
    }
    /// A figure without a target (context for the others).
    fn info(&mut self, label: &str, value: &str) {
        println!("{label}: {value}");
    }
    fn fail(&mut self, figure: &str, why: &str) {
        println!("{figure}: FAILED: {why}");
        self.failed.push(figure.to_owned());
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------------------------------------
// Child processes

/// A child process that is killed when dropped, whatever happened.
struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, bin: &Path, args: &[String], log: &Path) -> Res<Proc> {
        let file =
            std::fs::File::create(log).map_err(|e| format!("create {}: {e}", log.display()))?;
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file)
            .spawn()
            .map_err(|e| format!("spawn {} {name}: {e}", bin.display()))?;
        children().push(child.id());
        Ok(Proc {
            name,
            child,
            log: log.to_owned(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log, for error messages.
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(8);
        if lines.is_empty() {
            return format!("{} logged nothing ({})", self.name, self.log.display());
        }
        format!(
            "last log lines of {} ({}):\n    {}",
            self.name,
            self.log.display(),
            lines[from..].join("\n    ")
        )
    }

    /// Err when it has exited.
    fn alive(&mut self) -> Res<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => Err(format!(
                "{} exited early ({st}); {}",
                self.name,
                self.tail()
            )),
            Err(e) => Err(format!("wait for {}: {e}", self.name)),
        }
    }

    /// SIGTERM, then wait for the exit status until `timeout`.
    fn terminate(&mut self, timeout: Duration) -> Res<ExitStatus> {
        let pid = self.pid().to_string();
        let ok = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .map_err(|e| format!("kill: {e}"))?;
        if !ok.success() {
            return Err(format!("kill -TERM {pid} failed"));
        }
        let mut status = None;
        wait_until(timeout, Duration::from_millis(20), || {
            status = self.child.try_wait().map_err(|e| e.to_string())?;
            Ok(status.is_some())
        })?;
        status.ok_or_else(|| {
            format!(
                "{} still running {timeout:?} after SIGTERM; {}",
                self.name,
                self.tail()
            )
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        children().retain(|&p| p != self.child.id());
    }
}

/// Pids of the children alive, for the signal thread: SIGINT/SIGTERM end the harness without unwinding.
fn children() -> std::sync::MutexGuard<'static, Vec<u32>> {
    static CHILDREN: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner())
}

/// On SIGINT/SIGTERM: kill every child, then exit 130.
fn kill_children_on_signal() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        eprintln!("cannot install signal handlers; children may outlive an interrupted run");
        return;
    };
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            for pid in children().iter() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            std::process::exit(130);
        }
    });
}

fn free_port() -> Res<u16> {
    let l =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

/// `VmHWM` of /proc/PID/status: peak resident set size, in bytes.
fn peak_rss(pid: u32) -> Res<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .ok_or("no VmHWM in /proc/PID/status")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or("bad VmHWM line")?;
    Ok(kb * 1024)
}

/// utime + stime of /proc/PID/stat, in seconds (clock ticks of 1/100 s).
fn cpu_seconds(pid: u32) -> Res<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').ok_or("bad /proc/PID/stat")? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or("bad /proc/PID/stat field")
    };
    Ok((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

fn bench_dir() -> Res<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("bench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    Ok(dir)
}

fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

fn db_bytes(path: &Path) -> u64 {
    ["", "-wal"]
        .iter()
        .filter_map(|s| std::fs::metadata(format!("{}{s}", path.display())).ok())
        .map(|m| m.len())
        .sum()
}

// ---------------------------------------------------------------------------------------------------------
// HTTP

fn http() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build(),
    )
}

fn get(agent: &ureq::Agent, url: &str) -> Res<(u16, String)> {
    // a fresh answer, not the API's few-second answer cache: the figures are of the queries
    let mut resp = agent
        .get(url)
        .header("Cache-Control", "no-cache")
        .call()
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("GET {url}: body: {e}"))?;
    Ok((status, body))
}

/// GET expecting `200` and the success envelope; returns `data`.
fn get_data(agent: &ureq::Agent, url: &str) -> Res<Value> {
    let (status, body) = get(agent, url)?;
    let v: Value = serde_json::from_str(&body)
        .map_err(|e| format!("GET {url}: {status}, not JSON ({e}): {body:.200}"))?;
    if status != 200 || v["status"] != "success" {
        return Err(format!("GET {url}: {status} {body:.300}"));
    }
    Ok(v["data"].clone())
}

/// Waits until `/api/v1/health` answers, or the process dies, or 15 s pass.
fn wait_healthy(agent: &ureq::Agent, base: &str, proc: &mut Proc) -> Res<()> {
    let healthy = wait_until(Duration::from_secs(15), Duration::from_millis(50), || {
        proc.alive()?;
        // API-COMPAT lists `/health` under the `/api/v1` base; accept it at the root too.
        let ok = |path| matches!(get(agent, &format!("{base}{path}")), Ok((200, _)));
        Ok(["/api/v1/health", "/health"].into_iter().any(ok))
    })?;
    if !healthy {
        return Err(format!(
            "{base}/api/v1/health did not answer 200 within 15 s; {}",
            proc.tail()
        ));
    }
    Ok(())
}

/// Calls `poll` every `every` until it says done (`Ok(true)`) or `within` has passed (`Ok(false)`); a
/// poll's error ends the wait at once. The bench's poll-until helper (it does not share the tests' one).
fn wait_until(within: Duration, every: Duration, mut poll: impl FnMut() -> Res<bool>) -> Res<bool> {
    let deadline = Instant::now() + within;
    loop {
        if poll()? {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(every);
    }
}

/// Starts `master` on a free port; with `wait_api`, returns once `/health` answers.
fn start_master(
    bin: &Path,
    db: &Path,
    log: &Path,
    extra: &[String],
    wait_api: bool,
) -> Res<(Proc, String)> {
    let port = free_port()?;
    let mut args: Vec<String> = [
        "master",
        "--database",
        &db.display().to_string(),
        "--listen-host",
        "127.0.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "--listen-port".into(),
        port.to_string(),
        "--log-level".into(),
        std::env::var("MCT_BENCH_LOG").unwrap_or("warn".into()),
    ]);
    args.extend(extra.iter().cloned());
    let mut proc = Proc::spawn("master", bin, &args, log)?;
    let base = format!("http://127.0.0.1:{port}");
    if wait_api {
        wait_healthy(&http(), &base, &mut proc)?;
    }
    Ok((proc, base))
}

// ---------------------------------------------------------------------------------------------------------
// a. binary size

fn figure_size(r: &mut Report) -> Res<()> {
    let path = std::env::var_os("MCT_SIZE_BIN")
        .ok_or("MCT_SIZE_BIN is not set (run `make bench`; it needs the musl build)")?;
    let bytes = std::fs::read(&path).map_err(|e| format!("read {path:?}: {e}"))?;
    let interp = has_program_header(&bytes, 3)?; // PT_INTERP: dynamically linked
    if interp {
        return Err(format!("{path:?} is dynamically linked (has PT_INTERP)"));
    }
    if bytes.windows(7).any(|w| w == b".symtab") {
        return Err(format!("{path:?} is not stripped (has .symtab)"));
    }
    let n = bytes.len() as u64;
    r.line(
        "binary size, stripped static musl",
        &format!("{:.2} MB ({} bytes)", n as f64 / 1e6, thousands(n)),
        "<= 2.0 MB",
        n <= 2_000_000,
    );
    Ok(())
}

/// True when the 64-bit little-endian ELF has a program header of type `kind`.
fn has_program_header(elf: &[u8], kind: u32) -> Res<bool> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let t = elf.get(o..o + 4).ok_or("truncated ELF program headers")?;
        if u32::from_le_bytes(t.try_into().unwrap()) == kind {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `MCT_BENCH_SECS`: length of the tracking and load runs (default 60).
fn bench_secs() -> Res<u64> {
    match std::env::var("MCT_BENCH_SECS") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("MCT_BENCH_SECS: expected whole seconds, got '{v}'")),
        Err(_) => Ok(60),
    }
}

// ---------------------------------------------------------------------------------------------------------
// b + c. tracking the simulator: memory, CPU, then a clean SIGTERM that keeps the last push

const TRACK_CONNS: usize = 2500;

fn figure_tracking(r: &mut Report, bin: &Path) -> Res<()> {
    let secs = bench_secs()?;
    let dir = bench_dir()?;
    let sim = simulate::start(SimConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        connections: TRACK_CONNS,
        churn_percent: 1.0,
        secret: None,
        seed: 1,
    })
    .map_err(|e| format!("simulator: {e}"))?;
    let db = dir.join("tracking.db");
    remove_db(&db);
    let extra = [
        "--mihomo-host".into(),
        "127.0.0.1".into(),
        "--mihomo-port".into(),
        sim.addr().port().to_string(),
    ];
    let (mut master, base) =
        start_master(bin, &db, &dir.join("tracking-master.log"), &extra, false)?;
    // Ready when the first snapshot is in the database (independent of the HTTP API, checked at the end).
    let stored = wait_until(Duration::from_secs(15), Duration::from_millis(100), || {
        master.alive()?;
        let rows = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|c| {
                c.query_row("SELECT count(*) FROM connections", [], |r| {
                    r.get::<_, i64>(0)
                })
            })
            .unwrap_or(0);
        Ok(rows > 0)
    })?;
    if !stored {
        return Err(format!(
            "no connection stored within 15 s; {}",
            master.tail()
        ));
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(250));
        master.alive()?;
    }
    let pid = master.pid();
    let rss = peak_rss(pid)?;
    let cpu = cpu_seconds(pid)?;
    let label = format!(
        "{} live conns, 1 push/s, 1 % churn/s, {secs} s",
        thousands(TRACK_CONNS as u64)
    );
    r.line(
        &format!("peak RSS, {label}"),
        &format!("{:.1} MB", rss as f64 / 1e6),
        "<= 8 MB",
        rss <= 8_000_000,
    );
    let cpu_target = 3.6 * secs as f64 / 60.0;
    r.line(
        &format!("CPU time, {label}"),
        &format!(
            "{cpu:.2} s ({:.1} % of one core)",
            cpu * 100.0 / secs as f64
        ),
        &format!("<= {cpu_target:.1} s"),
        cpu <= cpu_target,
    );
    // The figures only count if the master really tracked: its API must see the connections.
    match get_data(&http(), &format!("{base}/api/v1/stats?type=summary")) {
        Ok(d) if d["count"].as_u64().unwrap_or(0) > 0 => r.info(
            "  master API after the run",
            &format!(
                "summary count {}",
                thousands(d["count"].as_u64().unwrap_or(0))
            ),
        ),
        Ok(d) => r.fail(
            "master API after the run",
            &format!("summary count is not > 0: {d}"),
        ),
        Err(e) => r.fail("master API after the run", &e),
    }

    // c. Freeze the simulator so its model is exactly the last push, let that push land, then SIGTERM.
    sim.set_paused(true);
    std::thread::sleep(Duration::from_secs(2));
    let expected = sim.model().counters();
    let t = Instant::now();
    let status = master.terminate(Duration::from_secs(20))?;
    let stop_time = t.elapsed();
    if status.code() != Some(0) {
        return Err(format!(
            "SIGTERM: master exited with {status}; {}",
            master.tail()
        ));
    }
    let conn = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("open {}: {e}", db.display()))?;
    let stored: HashMap<String, (i64, i64)> = conn
        .prepare("SELECT id, upload, download FROM connections")
        .and_then(|mut st| {
            st.query_map([], |row| Ok((row.get(0)?, (row.get(1)?, row.get(2)?))))?
                .collect()
        })
        .map_err(|e| format!("read {}: {e}", db.display()))?;
    let mut wrong = Vec::new();
    for (id, up, down) in &expected {
        match stored.get(id) {
            Some(&got) if got == (*up as i64, *down as i64) => {}
            got => wrong.push(format!("{id}: sent ({up}, {down}), stored {got:?}")),
        }
    }
    let ok = wrong.is_empty();
    r.line(
        "SIGTERM after the run: exit 0, last push stored",
        &format!(
            "{} of {} open connections exact, stopped in {}{}",
            thousands((expected.len() - wrong.len()) as u64),
            thousands(expected.len() as u64),
            ms(stop_time),
            wrong
                .first()
                .map(|w| format!("; e.g. {w}"))
                .unwrap_or_default()
        ),
        "all",
        ok,
    );
    sim.stop();
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// d. parse + diff of a 10,000-connection snapshot, in-process

fn figure_parse_diff(r: &mut Report) -> Res<()> {
    use mihomo_connections_tracker::mihomo::diff::Tracker;
    use mihomo_connections_tracker::mihomo::snapshot;
    const N: usize = 10_000;
    let t0 = timefmt::now_ms();
    // No churn: steady state means the same ids with their bytes moved.
    let mut model = SimModel::new(N, 0.0, 3, t0);
    let mut frame = Vec::new();
    model.write_frame(&mut frame);
    let mut tracker = Tracker::new(Vec::new());
    let t = Instant::now();
    // what the collector runs on each push: the streaming parser over the bytes, then the diff
    let snap =
        snapshot::read(&mut &frame[..], |id| tracker.knows(id)).map_err(|e| e.to_string())?;
    let diff = tracker.apply(&snap, t0);
    let first = t.elapsed();
    drop(snap);
    if diff.opened.len() != N {
        return Err(format!(
            "first snapshot opened {} connections, expected {N}",
            diff.opened.len()
        ));
    }
    let mut runs = Vec::new();
    for i in 1..=21 {
        let now = t0 + i * 1000;
        model.tick(now);
        model.write_frame(&mut frame);
        let t = Instant::now();
        let snap =
            snapshot::read(&mut &frame[..], |id| tracker.knows(id)).map_err(|e| e.to_string())?;
        let diff = tracker.apply(&snap, now);
        runs.push(t.elapsed());
        if diff.flows.len() != N || !diff.opened.is_empty() || !diff.closed.is_empty() {
            return Err(format!(
                "steady-state diff {i}: {} flows, {} opened, {} closed (expected {N}, 0, 0)",
                diff.flows.len(),
                diff.opened.len(),
                diff.closed.len()
            ));
        }
    }
    let steady = median(runs);
    let mb = frame.len() as f64 / 1e6;
    r.line(
        &format!(
            "parse + diff, 10,000-connection snapshot ({mb:.1} MB), steady state, median of 21"
        ),
        &ms(steady),
        "<= 20 ms",
        steady <= Duration::from_millis(20),
    );
    r.info(
        "parse + diff, 10,000-connection snapshot, first (all new)",
        &ms(first),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// e. master ingest over /api/v1/sync

const INGEST_THREADS: usize = 4;
const INGEST_BATCHES: usize = 100;
const INGEST_ROWS: usize = 1000;
/// Batches not sent by then count as failed (at the target rate the whole run takes 4 s).
const INGEST_DEADLINE: Duration = Duration::from_secs(120);

/// The connection ids of the ingest figure's records.
#[derive(Clone, Copy)]
enum Ids {
    /// Increasing within each agent (thread, batch, record): the figure with its target.
    Ordered,
    /// Random UUIDs, as mihomo makes them: they land anywhere in the master's (agent_id, id) index.
    Random,
}

/// One `/api/v1/sync` body in the earlier tool's format: 1,000 records of 33 fields.
fn sync_body(agent_id: &str, thread: usize, batch: usize, now_ms: i64, ids: Ids) -> String {
    let mut rng = Rng::new((thread * 1_000_003 + batch) as u64);
    let now = timefmt::format_rfc3339(now_ms, true);
    let mut s = String::with_capacity(INGEST_ROWS * 900);
    let _ = write!(
        s,
        r#"{{"agent_id":"{agent_id}","timestamp":"{now}","connections":["#
    );
    for i in 0..INGEST_ROWS {
        if i > 0 {
            s.push(',');
        }
        // Realistic lifetimes (the master spreads bytes over them): mostly under a minute, a few for hours.
        let life = match rng.below(100) {
            0 => rng.below(2 * 3_600_000),
            1..=9 => rng.below(600_000),
            _ => rng.below(60_000),
        };
        let start = timefmt::format_rfc3339(now_ms - life as i64, true);
        let (h, dev, node) = (rng.below(200), rng.below(20), rng.below(6));
        let _ = write!(
            s,
            concat!(
                r#"{{"id":"{t:08x}-{b:04x}-4{i:03x}-8000-{r:012x}","download":{down},"upload":{up},"last_updated":"{now}","#,
                r#""start":"{start}","network":"tcp","conn_type":"Tun","source_ip":"192.168.1.{dev}","#,
                r#""destination_ip":"104.16.{h}.7","source_geoip":"null","destination_geoip":"[\"us\"]","#,
                r#""source_ip_asn":"","destination_ip_asn":"AS13335 Cloudflare","source_port":"{sport}","#,
                r#""destination_port":"443","inbound_ip":"","inbound_port":"0","inbound_name":"DEFAULT-TUN","#,
                r#""inbound_user":"","host":"h{h}.example.com","dns_mode":"fake-ip","uid":0,"process":"","#,
                r#""process_path":"","special_proxy":"","special_rules":"","remote_destination":"104.16.{h}.7","#,
                r#""dscp":0,"sniff_host":"h{h}.example.com","chains":"[\"Proxy\",\"node-{node}\"]","#,
                r#""rule":"RuleSet","rule_payload":"geosite-example","agent_id":"{agent_id}"}}"#
            ),
            t = match ids {
                Ids::Ordered => thread as u64,
                Ids::Random => rng.next_u64() & 0xffff_ffff,
            },
            b = match ids {
                Ids::Ordered => batch as u64,
                Ids::Random => rng.next_u64() & 0xffff,
            },
            i = match ids {
                Ids::Ordered => i as u64,
                Ids::Random => rng.below(0x1000),
            },
            r = rng.next_u64() & 0xffff_ffff_ffff,
            down = rng.below(5_000_000),
            up = rng.below(200_000),
            now = now,
            start = start,
            dev = 100 + dev,
            h = h,
            sport = 32768 + rng.below(28000),
            node = node,
            agent_id = agent_id,
        );
    }
    s.push_str("]}");
    s
}

fn figure_ingest(r: &mut Report, bin: &Path) -> Res<()> {
    let run = ingest_run(bin, Ids::Ordered)?;
    r.line(
        "master ingest, 4 clients x 100 batches x 1,000 records",
        &run.rate_text(),
        ">= 100,000 rows/s",
        run.rate >= 100_000.0,
    );
    r.line(
        "master ingest, failed requests / rows stored",
        &run.outcome_text(),
        "0 failed, all stored",
        run.failed == 0 && run.stored == run.total,
    );
    let random = ingest_run(bin, Ids::Random)?;
    r.info(
        "master ingest, the same with random UUID ids (as mihomo makes them)",
        &random.rate_text(),
    );
    r.line(
        "master ingest with random ids, failed requests / rows stored",
        &random.outcome_text(),
        "0 failed, all stored",
        random.failed == 0 && random.stored == random.total,
    );
    Ok(())
}

/// What one ingest run measured.
struct IngestRun {
    rate: f64,
    accepted: u64,
    elapsed: Duration,
    failed: usize,
    stored: u64,
    total: u64,
    first_error: Option<String>,
}

impl IngestRun {
    fn rate_text(&self) -> String {
        format!(
            "{} rows/s ({} rows accepted in {:.2} s)",
            thousands(self.rate as u64),
            thousands(self.accepted),
            self.elapsed.as_secs_f64()
        )
    }

    fn outcome_text(&self) -> String {
        format!(
            "{} failed, {} of {} stored{}",
            self.failed,
            thousands(self.stored),
            thousands(self.total),
            self.first_error
                .as_ref()
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        )
    }
}

/// 4 clients send 100 batches of 1,000 records each to a fresh master.
fn ingest_run(bin: &Path, ids: Ids) -> Res<IngestRun> {
    let dir = bench_dir()?;
    let db = dir.join("ingest.db");
    remove_db(&db);
    let (mut master, base) = start_master(bin, &db, &dir.join("ingest-master.log"), &[], true)?;
    // The body must be what the earlier tool's agents send: 33 fields per record.
    let sample: Value = serde_json::from_str(&sync_body("check", 0, 0, 0, ids))
        .map_err(|e| format!("sync body: {e}"))?;
    let fields = sample["connections"][0].as_object().map_or(0, |o| o.len());
    if fields != 33 {
        return Err(format!(
            "sync body records have {fields} fields, expected 33"
        ));
    }
    let url = format!("{base}/api/v1/sync");
    let now = timefmt::now_ms();
    let t = Instant::now();
    let deadline = t + INGEST_DEADLINE;
    let threads: Vec<_> = (0..INGEST_THREADS)
        .map(|th| {
            let url = url.clone();
            std::thread::spawn(move || {
                let agent = http();
                let agent_id = format!("bench-ingest-{th}");
                let (mut failed, mut first_error) = (0usize, None);
                for b in 0..INGEST_BATCHES {
                    if Instant::now() > deadline {
                        failed += INGEST_BATCHES - b;
                        first_error.get_or_insert(format!(
                            "{} batches not sent before the {INGEST_DEADLINE:?} deadline",
                            INGEST_BATCHES - b
                        ));
                        break;
                    }
                    let body = sync_body(&agent_id, th, b, now, ids);
                    let res = agent
                        .post(&url)
                        .header("content-type", "application/json")
                        .send(body.as_bytes())
                        .map_err(|e| e.to_string())
                        .and_then(|mut resp| {
                            let status = resp.status().as_u16();
                            let text = resp
                                .body_mut()
                                .read_to_string()
                                .map_err(|e| e.to_string())?;
                            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                            if status == 200 && v["status"] == "success" {
                                Ok(())
                            } else {
                                Err(format!("{status} {text:.200}"))
                            }
                        });
                    if let Err(e) = res {
                        failed += 1;
                        first_error.get_or_insert(e);
                    }
                }
                (failed, first_error)
            })
        })
        .collect();
    let mut failed = 0;
    let mut first_error = None;
    for h in threads {
        let (f, e) = h
            .join()
            .map_err(|_| "an ingest thread panicked".to_string())?;
        failed += f;
        first_error = first_error.or(e);
    }
    let elapsed = t.elapsed();
    master.alive()?;
    let total = (INGEST_THREADS * INGEST_BATCHES * INGEST_ROWS) as u64;
    // Only accepted batches count towards the rate.
    let accepted = total - (failed * INGEST_ROWS) as u64;
    let rate = accepted as f64 / elapsed.as_secs_f64();
    // Rows are only counted once they are in the database.
    let conn = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("open {}: {e}", db.display()))?;
    let mut stored = 0;
    wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        stored = conn
            .query_row("SELECT count(*) FROM connections", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(|e| e.to_string())? as u64;
        Ok(stored >= total)
    })?;
    let _ = master.terminate(Duration::from_secs(20));
    Ok(IngestRun {
        rate,
        accepted,
        elapsed,
        failed,
        stored,
        total,
        first_error,
    })
}

// ---------------------------------------------------------------------------------------------------------
// Database generation (f and g): rows straight into the real schema

/// Bumped when the generated content changes, so a cached file is rebuilt.
const GENERATOR: &str = "bench-v2";

struct Gen {
    rng: Rng,
    hosts: Vec<String>,
}

const NODES: [(&str, &str); 6] = [
    ("HK-01", "Proxy"),
    ("HK-02", "Proxy"),
    ("US-01", "Streaming"),
    ("JP-01", "Streaming"),
    ("SG-01", "Auto"),
    ("TW-01", "Auto"),
];
const RULES: [(&str, &str); 5] = [
    ("RuleSet", "geosite-google"),
    ("DomainSuffix", "github.com"),
    ("Match", ""),
    ("GeoIP", "cn"),
    ("DomainKeyword", "video"),
];

impl Gen {
    fn new(seed: u64) -> Gen {
        let mut rng = Rng::new(seed);
        let hosts = (0..200)
            .map(|i| {
                format!(
                    "{}.site{}.example.com",
                    ["www", "api", "cdn", "img"][i % 4],
                    rng.below(1000)
                )
            })
            .collect();
        Gen { rng, hosts }
    }

    /// Inserts `n` connections of `agents` agents started in `[end - span, end)`, each with up to three
    /// traffic minutes, `seq` counting up from 1. Returns nothing; the caller owns the transaction.
    fn insert(
        &mut self,
        conn: &Connection,
        n: u64,
        agents: &[String],
        end_ms: i64,
        span_ms: i64,
    ) -> Res<()> {
        let e = |e: rusqlite::Error| format!("generate: {e}");
        let mut ins = conn
            .prepare(
                "INSERT INTO connections (agent_id, id, start_ms, end_ms, last_updated_ms, upload, download, network,
                 conn_type, source_ip, source_port, destination_ip, destination_port, destination_geoip, inbound_name,
                 host, dns_mode, process, chains, provider_chains, node, policy, rule, rule_payload, seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20,
                 ?21, ?22, ?23, ?24, ?25)",
            )
            .map_err(e)?;
        let mut traffic = conn
            .prepare("INSERT INTO traffic (conn, minute, upload, download, seq) VALUES (?1, ?2, ?3, ?4, ?5)")
            .map_err(e)?;
        for seq in 1..=n as i64 {
            let r = &mut self.rng;
            let agent = &agents[r.below(agents.len() as u64) as usize];
            let id = format!(
                "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
                r.next_u64() as u32,
                r.below(1 << 16),
                r.below(1 << 12),
                r.below(1 << 12),
                r.next_u64() & 0xffff_ffff_ffff
            );
            let start = end_ms - 1 - r.below(span_ms as u64) as i64;
            let dur = if r.chance(0.05) {
                r.below(3 * 3_600_000)
            } else {
                r.below(120_000)
            } as i64;
            let last = (start + dur).min(end_ms);
            let end = (start + dur < end_ms).then_some(last);
            let heavy = r.chance(0.01);
            let download = if heavy {
                r.below(1 << 30)
            } else {
                r.below(2_000_000)
            } as i64;
            let upload = r.below(1 + download as u64 / 10 + 5_000) as i64;
            let host_i = r.below(self.hosts.len() as u64) as usize;
            let (node, policy) = NODES[r.below(6) as usize];
            let (rule, payload) = RULES[r.below(5) as usize];
            let udp = r.chance(0.15);
            ins.execute(params![
                agent,
                id,
                start,
                end,
                last,
                upload,
                download,
                if udp { "udp" } else { "tcp" },
                "Tun",
                format!("192.168.1.{}", 100 + r.below(20)),
                (32768 + r.below(28000)).to_string(),
                format!("104.{}.{}.{}", host_i % 256, r.below(256), 1 + r.below(254)),
                if udp {
                    "443"
                } else {
                    ["443", "443", "80", "5223"][r.below(4) as usize]
                },
                ["[\"us\"]", "[\"jp\"]", "[\"hk\"]", "null"][r.below(4) as usize],
                "DEFAULT-TUN",
                self.hosts[host_i],
                "fake-ip",
                "",
                format!("[\"{policy}\",\"{node}\"]"),
                "[\"\",\"airport-a\"]",
                node,
                policy,
                rule,
                payload,
                seq,
            ])
            .map_err(e)?;
            let pk = conn.last_insert_rowid();
            let minutes = (dur / MINUTE_MS + 1).min(3);
            for k in 0..minutes {
                let minute = start / MINUTE_MS + k;
                traffic
                    .execute(params![
                        pk,
                        minute,
                        upload / minutes,
                        download / minutes,
                        seq
                    ])
                    .map_err(e)?;
            }
        }
        Ok(())
    }
}

/// The database's schema as text, in a stable order.
fn schema_sql(conn: &Connection) -> Res<String> {
    conn.prepare("SELECT type, name, coalesce(sql, '') FROM sqlite_schema ORDER BY type, name")
        .and_then(|mut st| {
            st.query_map([], |r| {
                Ok(format!(
                    "{} {} {}",
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?
                ))
            })?
            .collect::<rusqlite::Result<Vec<String>>>()
        })
        .map(|v| v.join("\n"))
        .map_err(|e| format!("read schema: {e}"))
}

/// Creates the database with the real migrations, then fills it fast: indexes dropped during the bulk
/// insert and rebuilt after, one transaction, no journal.
fn generate(path: &Path, fill: impl FnOnce(&Connection) -> Res<()>) -> Res<()> {
    remove_db(path);
    let conn =
        store::open(path, Access::Write).map_err(|e| format!("create {}: {e}", path.display()))?;
    let e = |e: rusqlite::Error| format!("generate {}: {e}", path.display());
    conn.execute_batch(
        "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;",
    )
    .map_err(e)?;
    let indexes: Vec<(String, String)> = conn
        .prepare("SELECT name, sql FROM sqlite_schema WHERE type = 'index' AND sql IS NOT NULL")
        .and_then(|mut st| st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .map_err(e)?;
    conn.execute_batch("BEGIN").map_err(e)?;
    for (name, _) in &indexes {
        conn.execute_batch(&format!("DROP INDEX \"{name}\""))
            .map_err(e)?;
    }
    fill(&conn)?;
    for (_, sql) in &indexes {
        conn.execute_batch(sql).map_err(e)?;
    }
    // bulk inserts bypass the writers that keep the rollups: compute them once
    mihomo_connections_tracker::store::rollup::rebuild(&conn)
        .map_err(|e| format!("generate {}: {e}", path.display()))?;
    conn.execute_batch("COMMIT; PRAGMA journal_mode = WAL;")
        .map_err(e)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// f. stats on 1,000,000 connections

const STATS_CONNS: u64 = 1_000_000;

/// The cached 1M-connection database and its end time; rebuilt when missing, of another schema version or
/// generator, or incomplete.
fn stats_db(path: &Path) -> Res<i64> {
    let key = format!("{GENERATOR} {STATS_CONNS}");
    // Reuse only a complete file of this generator whose schema (tables, indexes, triggers) is exactly what
    // this binary creates: a migration edited in place rebuilds it too.
    let fresh_schema = {
        let probe = path.with_extension("probe.db");
        remove_db(&probe);
        let conn = store::open(&probe, Access::Write).map_err(|e| format!("schema probe: {e}"))?;
        let sql = schema_sql(&conn);
        drop(conn);
        remove_db(&probe);
        sql?
    };
    if let Ok(conn) = store::open(path, Access::Read) {
        let found: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'bench'", [], |r| {
                r.get(0)
            })
            .ok();
        let end = found
            .as_deref()
            .and_then(|v| v.strip_prefix(&format!("{key} ")))
            .and_then(|end| end.parse::<i64>().ok());
        if let (Some(end), Ok(schema)) = (end, schema_sql(&conn)) {
            if schema == fresh_schema {
                println!("  (reusing {})", path.display());
                return Ok(end);
            }
        }
    }
    println!(
        "  (generating {} connections into {}, cached for the next run)",
        thousands(STATS_CONNS),
        path.display()
    );
    let t = Instant::now();
    let end = timefmt::now_ms() / MINUTE_MS * MINUTE_MS;
    generate(path, |conn| {
        let agents: Vec<String> = (1..=10).map(|i| format!("router-{i:02}")).collect();
        Gen::new(11).insert(conn, STATS_CONNS, &agents, end, 30 * DAY_MS)?;
        for a in &agents {
            conn.execute(
                "INSERT INTO agents (agent_id, first_seen_ms, last_sync_ms, last_data_ms, sync_count)
                 VALUES (?1, ?2, ?3, ?3, 43200)",
                params![a, end - 30 * DAY_MS, end],
            )
            .map_err(|e| e.to_string())?;
        }
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('bench', ?1)",
            [format!("{key} {end}")],
        )
        .map_err(|e| e.to_string())?;
        Ok(())
    })?;
    println!("  (generated in {:.1} s)", t.elapsed().as_secs_f64());
    Ok(end)
}

fn figure_stats(r: &mut Report, bin: &Path) -> Res<()> {
    let dir = bench_dir()?;
    let db = dir.join("stats-1m.db");
    let end = stats_db(&db)?;
    let (mut master, base) = start_master(bin, &db, &dir.join("stats-master.log"), &[], true)?;
    let agent = http();
    let api = format!("{base}/api/v1");
    let week_ago = (end - 7 * DAY_MS) / 1000;
    let queries: [(&str, String, u64); 4] = [
        ("stats summary", format!("{api}/stats?type=summary"), 50),
        (
            "stats group by host, top 10",
            format!("{api}/stats?type=group&group_by=host&limit=10"),
            300,
        ),
        (
            "stats hourly time series, 7 days",
            format!(
                "{api}/stats?type=timeseries&interval=hour&metric=total&from={week_ago}&to={}",
                end / 1000
            ),
            100,
        ),
        (
            "connections, newest 100",
            format!("{api}/connections?limit=100"),
            20,
        ),
    ];
    for (label, url, target_ms) in queries {
        let mut runs = Vec::new();
        let mut last = Value::Null;
        for _ in 0..5 {
            let t = Instant::now();
            match get_data(&agent, &url) {
                Ok(d) => last = d,
                Err(e) => {
                    r.fail(&format!("{label}, 1M connections"), &e);
                    break;
                }
            }
            runs.push(t.elapsed());
        }
        if runs.len() < 5 {
            continue;
        }
        if let Err(why) = check_stats_answer(label, &last) {
            r.fail(&format!("{label}, 1M connections"), &why);
            continue;
        }
        let m = median(runs);
        r.line(
            &format!("{label}, 1M connections, median of 5"),
            &ms(m),
            &format!("<= {target_ms} ms"),
            m <= Duration::from_millis(target_ms),
        );
    }
    master.alive()?;
    let _ = master.terminate(Duration::from_secs(20));
    let size = db_bytes(&db);
    r.info(
        "database size per connection (with its traffic rows)",
        &format!(
            "{} bytes ({:.0} MB for 1M)",
            size / STATS_CONNS,
            size as f64 / 1e6
        ),
    );
    Ok(())
}

/// A fast answer only counts if it is the right one.
fn check_stats_answer(label: &str, data: &Value) -> Res<()> {
    match label {
        "stats summary" => {
            let count = data["count"].as_u64().unwrap_or(0);
            (count == STATS_CONNS).then_some(()).ok_or(format!(
                "summary count {count}, expected {STATS_CONNS}: {data}"
            ))
        }
        "connections, newest 100" => {
            let rows = data.as_array().ok_or("data is not an array")?;
            if rows.len() != 100 {
                return Err(format!("{} rows, expected 100", rows.len()));
            }
            let starts: Vec<i64> = rows
                .iter()
                .map(|r| {
                    r["start"]
                        .as_str()
                        .and_then(timefmt::parse_rfc3339)
                        .unwrap_or(i64::MIN)
                })
                .collect();
            starts
                .windows(2)
                .all(|w| w[0] >= w[1])
                .then_some(())
                .ok_or("rows are not sorted newest first".into())
        }
        _ => {
            let rows = data.as_array().ok_or("data is not an array")?;
            (!rows.is_empty()).then_some(()).ok_or("no rows".into())
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// g. an agent's backlog catch-up

const BACKLOG: u64 = 100_000;

fn figure_catch_up(r: &mut Report, bin: &Path) -> Res<()> {
    let dir = bench_dir()?;
    let local = dir.join("agent-local.db");
    let agent_id = "bench-agent".to_string();
    let end = timefmt::now_ms();
    // Started within the last 6 hours: nothing for the agent's 7-day retention to delete.
    generate(&local, |conn| {
        Gen::new(12).insert(
            conn,
            BACKLOG,
            std::slice::from_ref(&agent_id),
            end,
            6 * 3_600_000,
        )
    })?;
    let master_db = dir.join("catch-up-master.db");
    remove_db(&master_db);
    let (mut master, base) =
        start_master(bin, &master_db, &dir.join("catch-up-master.log"), &[], true)?;
    let nothing_listens = free_port()?;
    let args: Vec<String> = [
        "agent",
        "--mihomo-host",
        "127.0.0.1",
        "--mihomo-port",
        &nothing_listens.to_string(),
        "--master-url",
        &base,
        "--local-database",
        &local.display().to_string(),
        "--agent-id",
        &agent_id,
        "--log-level",
        "warn",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let t = Instant::now();
    let mut agent = Proc::spawn("agent", bin, &args, &dir.join("catch-up-agent.log"))?;
    let conn = Connection::open_with_flags(&master_db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("open {}: {e}", master_db.display()))?;
    let deadline = Duration::from_secs(60);
    let mut arrived = 0u64;
    wait_until(deadline, Duration::from_millis(100), || {
        agent.alive()?;
        master.alive()?;
        arrived = conn
            .query_row(
                "SELECT count(*) FROM connections WHERE agent_id = ?1",
                [&agent_id],
                |r| r.get::<_, i64>(0),
            )
            .map_err(|e| format!("count rows in the master: {e}"))? as u64;
        Ok(arrived >= BACKLOG)
    })?;
    let took = t.elapsed();
    let label = format!(
        "agent catch-up, {} pending rows into the master",
        thousands(BACKLOG)
    );
    let value = if arrived >= BACKLOG {
        format!("{:.2} s", took.as_secs_f64())
    } else if arrived > 0 {
        // Still arriving: the figure is a miss, not a broken setup.
        format!(
            "not done after {deadline:?}: {} of {} rows ({} rows/s)",
            thousands(arrived),
            thousands(BACKLOG),
            thousands((arrived as f64 / took.as_secs_f64()) as u64)
        )
    } else {
        return Err(format!("no row arrived in {deadline:?}; {}", agent.tail()));
    };
    r.line(
        &label,
        &value,
        "<= 10 s",
        arrived >= BACKLOG && took <= Duration::from_secs(10),
    );
    let _ = agent.terminate(Duration::from_secs(20));
    let _ = master.terminate(Duration::from_secs(20));
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// h. load: 50 agents syncing and 20 dashboard users at once against one master

const LOAD_AGENTS: usize = 50;
const LOAD_CLIENTS: usize = 20;
/// Connections already in the master when the load starts (10 other agents, 30 days).
const LOAD_HISTORY: u64 = 100_000;

fn figure_load(r: &mut Report, bin: &Path) -> Res<()> {
    let secs = bench_secs()?;
    let dir = bench_dir()?;
    let db = dir.join("load.db");
    let t = Instant::now();
    let end = timefmt::now_ms();
    generate(&db, |conn| {
        let agents: Vec<String> = (1..=10).map(|i| format!("router-{i:02}")).collect();
        Gen::new(13).insert(conn, LOAD_HISTORY, &agents, end, 30 * DAY_MS)
    })?;
    println!(
        "  (history of {} connections generated in {:.1} s)",
        thousands(LOAD_HISTORY),
        t.elapsed().as_secs_f64()
    );
    let (mut master, base) = start_master(bin, &db, &dir.join("load-master.log"), &[], true)?;
    let cfg = load_gen::LoadConfig {
        base,
        agents: LOAD_AGENTS,
        agent_prefix: "load-".into(),
        conns: (100, 400),
        churn_percent: 1.0,
        sync_interval: Duration::from_secs(5),
        stats_clients: LOAD_CLIENTS,
        clicks: (Duration::from_secs(5), Duration::from_secs(25)),
        duration: Duration::from_secs(secs),
        seed: 6,
    };
    // The master's writer maps the database file (`mmap_size`): mapped pages count in RSS but are the
    // kernel's page cache, not the master's heap; sample both kinds while the load runs.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (pid, done) = (master.pid(), std::sync::Arc::clone(&done));
        std::thread::spawn(move || {
            let (mut anon, mut file) = (0u64, 0u64);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let kb = |key: &str| {
                    status
                        .lines()
                        .find(|l| l.starts_with(key))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                        * 1024
                };
                anon = anon.max(kb("RssAnon:"));
                file = file.max(kb("RssFile:"));
                std::thread::sleep(Duration::from_millis(100));
            }
            (anon, file)
        })
    };
    let res = load_gen::run(&cfg);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    master.alive()?;
    let pid = master.pid();
    let rss = peak_rss(pid)?;
    let cpu = cpu_seconds(pid)?;
    let label = format!(
        "load, {LOAD_AGENTS} agents syncing every 5 s + {LOAD_CLIENTS} dashboard users, {secs} s"
    );
    let errors = res.errors(3);
    r.line(
        &format!("{label}: failed requests"),
        &format!(
            "{} of {} ({}){}",
            res.failed(),
            thousands(res.total()),
            res.by_kind(),
            if errors.is_empty() {
                String::new()
            } else {
                format!("; {}", errors.join("; "))
            }
        ),
        "0",
        res.failed() == 0,
    );
    let stats = res.stats_latencies();
    let q = |v: &[Duration], x: f64| ms(load_gen::quantile(v, x));
    r.info(
        "  stats queries (summary, group, timeseries, connections, filter-options, agents)",
        &format!(
            "{} requests, p50 {}, p99 {}, max {}",
            thousands(stats.len() as u64),
            q(&stats, 0.5),
            q(&stats, 0.99),
            q(&stats, 1.0)
        ),
    );
    for (kind, k) in &res.kinds {
        r.info(
            &format!("    {kind}"),
            &format!(
                "{} requests, p50 {}, p99 {}, max {}",
                thousands(k.total()),
                q(&k.latencies, 0.5),
                q(&k.latencies, 0.99),
                q(&k.latencies, 1.0)
            ),
        );
    }
    r.info(
        "  ingested",
        &format!(
            "{} records acknowledged, {} rows/s",
            thousands(res.rows_acked),
            thousands((res.rows_acked as f64 / res.elapsed.as_secs_f64()) as u64)
        ),
    );
    let (anon, file) = sampler
        .join()
        .map_err(|_| "the RSS sampler panicked".to_string())?;
    r.info(
        "  master RSS peaks, sampled every 100 ms",
        &format!(
            "{:.1} MB anonymous (heap, stacks), {:.1} MB file-backed (the writer's mmap of the database, the binary)",
            anon as f64 / 1e6,
            file as f64 / 1e6
        ),
    );
    r.line(
        &format!("{label}: master peak RSS"),
        &format!(
            "{:.1} MB (CPU {cpu:.1} s, {:.0} % of one core)",
            rss as f64 / 1e6,
            cpu * 100.0 / res.elapsed.as_secs_f64()
        ),
        "<= 64 MB",
        rss <= 64_000_000,
    );
    // Other work on the machine slows the master down: say how busy it was.
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    r.info(
        "  machine load average over the last minute (2 cores; includes this harness)",
        loadavg.split_whitespace().next().unwrap_or("?"),
    );
    let check = load_gen::check_master(&db, "load-", &res.expected)?;
    let history: u64 = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| {
            c.query_row(
                "SELECT count(*) FROM connections WHERE agent_id NOT LIKE 'load-%'",
                [],
                |r| r.get::<_, i64>(0),
            )
        })
        .map_err(|e| format!("count rows in {}: {e}", db.display()))? as u64;
    let exact = check.wrong_count == 0
        && check.rows == res.expected.len() as u64
        && history == LOAD_HISTORY
        && res.undelivered.is_empty();
    r.line(
        &format!("{label}: master rows"),
        &format!(
            "{} of {} acknowledged connections exact (totals, end, traffic sums), {} history rows untouched{}{}",
            thousands(res.expected.len() as u64 - check.wrong_count.min(res.expected.len() as u64)),
            thousands(res.expected.len() as u64),
            thousands(history),
            check
                .wrong
                .first()
                .map(|w| format!("; e.g. {w}"))
                .unwrap_or_default(),
            if res.undelivered.is_empty() {
                String::new()
            } else {
                format!("; undelivered: {:?}", res.undelivered)
            }
        ),
        "all",
        exact,
    );
    let _ = master.terminate(Duration::from_secs(20));
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------

fn main() {
    // `cargo bench` passes `--bench`; a name filter selects figures (`cargo bench --bench figures -- stats`).
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    kill_children_on_signal();
    let bin = std::env::var_os("MCT_BIN").map(PathBuf::from);
    let mut r = Report::default();
    type Figure<'a> = Box<dyn FnOnce(&mut Report, &Path) -> Res<()> + 'a>;
    let figures: Vec<(&str, bool, Figure)> = vec![
        ("size", false, Box::new(|r, _| figure_size(r))),
        ("tracking", true, Box::new(figure_tracking)),
        ("parse-diff", false, Box::new(|r, _| figure_parse_diff(r))),
        ("ingest", true, Box::new(figure_ingest)),
        ("stats", true, Box::new(figure_stats)),
        ("catch-up", true, Box::new(figure_catch_up)),
        ("load", true, Box::new(figure_load)),
    ];
    for (name, needs_bin, run) in figures {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let bin = match (&bin, needs_bin) {
            (Some(b), _) => b.clone(),
            (None, false) => PathBuf::new(),
            (None, true) => {
                r.fail(name, "MCT_BIN is not set (run `make bench`)");
                continue;
            }
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut r, &bin)));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(why)) => r.fail(name, &why),
            Err(_) => r.fail(name, "panicked (see above)"),
        }
    }
    if r.failed.is_empty() {
        println!("all figures within their targets");
    } else {
        println!(
            "{} figure(s) FAILED or MISSED their targets (see above)",
            r.failed.len()
        );
        std::process::exit(1);
    }
}
