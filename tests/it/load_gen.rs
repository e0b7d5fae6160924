//! A load generator for a running master: simulated agents posting `/api/v1/sync` batches exactly as
//! `src/sync.rs` builds them, and dashboard-like stats clients on keep-alive connections. It records every
//! request's kind, latency and outcome, and everything each agent had acknowledged, so that the caller can
//! check the master's database row by row afterwards ([`check_master`]).
//!
//! Shared by the `load` figure of `make bench` (tests/bench/main.rs includes this file with `#[path]`) and
//! the smoke test in tests/it/load.rs; so it names nothing through `crate::`.
//!
//! # Simulated agents, not `agent` processes
//! The master only ever sees HTTP requests; what matters is that they are the requests real agents send.
//! Each simulated agent is a real agent minus its SQLite file: a [`SimModel`] (the simulator's mihomo) is
//! observed once a second through the real snapshot parser and [`Tracker`] (the collector's diff), bytes are
//! spread over minutes with the writer's [`spread`], and every sync posts the records changed since the last
//! acknowledged one (updated open connections, new ones, closed ones with their end) with their changed
//! traffic buckets, as [`OutRecord`]s serialized by the agent's own [`encode_batch`]. A failed batch stays
//! pending and is sent again, after a backoff, as the agent does. Fifty real agents would each add a
//! collector, a writer and SQLite commits of their own: on a 2-core machine they would measure their own
//! contention for the CPU rather than the master's, and the master's rows could only be checked against
//! fifty local databases. A thread per agent costs a fraction of that and knows exactly what it sent.

use mihomo_connections_tracker::mihomo::diff::Tracker;
use mihomo_connections_tracker::mihomo::snapshot;
use mihomo_connections_tracker::model::{Bytes, ConnMeta, ConnectionDiff};
use mihomo_connections_tracker::simulate::{Rng, SimModel};
use mihomo_connections_tracker::store::merge::spread;
use mihomo_connections_tracker::sync::{encode_batch, Batch, OutRecord};
use mihomo_connections_tracker::timefmt::{self, format_rfc3339, MINUTE_MS};
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to run against the master at `base` (`http://127.0.0.1:PORT`).
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub base: String,
    /// Simulated agents, named `{agent_prefix}NN`.
    pub agents: usize,
    pub agent_prefix: String,
    /// Open connections per agent, drawn from this range (a home router: a few hundred).
    pub conns: (usize, usize),
    /// Connections replaced per second, in percent of the open ones.
    pub churn_percent: f64,
    /// Time between two syncs of one agent.
    pub sync_interval: Duration,
    /// Dashboard users (see [`dashboard_user`]); each keeps two keep-alive connections.
    pub stats_clients: usize,
    /// Time between two clicks of a user, drawn from this range (5 to 25 s for people).
    pub clicks: (Duration, Duration),
    /// How long agents and clients run; then each agent delivers what it still holds.
    pub duration: Duration,
    pub seed: u64,
}

/// Requests of one kind.
#[derive(Debug, Default)]
pub struct KindStats {
    pub latencies: Vec<Duration>,
    pub failed: u64,
    /// Failure messages, with how often each happened.
    pub errors: BTreeMap<String, u64>,
}

impl KindStats {
    fn record(&mut self, took: Duration, outcome: Result<(), String>) {
        self.latencies.push(took);
        if let Err(e) = outcome {
            self.failed += 1;
            *self.errors.entry(e).or_default() += 1;
        }
    }
    fn merge(&mut self, other: KindStats) {
        self.latencies.extend(other.latencies);
        self.failed += other.failed;
        for (e, n) in other.errors {
            *self.errors.entry(e).or_default() += n;
        }
    }
    pub fn total(&self) -> u64 {
        self.latencies.len() as u64
    }
}

/// The `q` quantile (0..=1) of `v`, nearest rank; zero when empty.
pub fn quantile(v: &[Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    let mut s = v.to_vec();
    s.sort();
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// A connection as the master must hold it: `(upload, download, ended)`.
pub type Expected = HashMap<(String, String), (u64, u64, bool)>;

/// Everything a run did.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Per kind: `sync`, `summary`, `group`, `timeseries`, `connections`, `filter-options`, `agents`.
    pub kinds: BTreeMap<&'static str, KindStats>,
    /// Records the master acknowledged (a connection sent at every sync counts every time).
    pub rows_acked: u64,
    /// From the start to the last agent's final delivery.
    pub elapsed: Duration,
    /// Every connection any agent had acknowledged, in its last acknowledged state.
    pub expected: Expected,
    /// Agents that still held undelivered changes when they gave up at the end.
    pub undelivered: Vec<String>,
}

impl LoadResult {
    /// Latencies of every stats request (everything but `sync`).
    pub fn stats_latencies(&self) -> Vec<Duration> {
        self.kinds
            .iter()
            .filter(|(k, _)| **k != "sync")
            .flat_map(|(_, s)| s.latencies.iter().copied())
            .collect()
    }
    pub fn total(&self) -> u64 {
        self.kinds.values().map(KindStats::total).sum()
    }
    pub fn failed(&self) -> u64 {
        self.kinds.values().map(|s| s.failed).sum()
    }
    /// `sync 0/612, summary 0/140, ...`: failed/total per kind.
    pub fn by_kind(&self) -> String {
        self.kinds
            .iter()
            .map(|(k, s)| format!("{k} {}/{}", s.failed, s.total()))
            .collect::<Vec<_>>()
            .join(", ")
    }
    /// The distinct failure messages, most frequent first, at most `n`.
    pub fn errors(&self, n: usize) -> Vec<String> {
        let mut all: Vec<(u64, String)> = self
            .kinds
            .iter()
            .flat_map(|(k, s)| s.errors.iter().map(move |(e, c)| (*c, format!("{k}: {e}"))))
            .collect();
        all.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        all.into_iter()
            .take(n)
            .map(|(c, e)| format!("{c} x {e}"))
            .collect()
    }
}

/// Runs the load for `cfg.duration` and returns once every agent delivered what it held (or gave up 30 s
/// later).
pub fn run(cfg: &LoadConfig) -> LoadResult {
    let started = Instant::now();
    let until = started + cfg.duration;
    let stop = Arc::new(AtomicBool::new(false));
    let mut agents = Vec::new();
    let mut rng = Rng::new(cfg.seed);
    for i in 0..cfg.agents {
        let id = format!("{}{:02}", cfg.agent_prefix, i + 1);
        let span = (cfg.conns.1.saturating_sub(cfg.conns.0) + 1) as u64;
        let n = cfg.conns.0 + rng.below(span) as usize;
        let seed = cfg.seed.wrapping_mul(1000).wrapping_add(i as u64 + 1);
        let cfg = cfg.clone();
        agents.push(
            std::thread::Builder::new()
                .name(format!("load-{id}"))
                .spawn(move || SimAgent::new(id, n, seed, &cfg).run(&cfg, until))
                .expect("spawn an agent thread"),
        );
    }
    let mut clients = Vec::new();
    for c in 0..cfg.stats_clients {
        let (cfg, stop) = (cfg.clone(), Arc::clone(&stop));
        let seed = cfg.seed ^ (0x5eed_0000 + c as u64);
        clients.push(
            std::thread::Builder::new()
                .name(format!("load-user-{c}"))
                .spawn(move || dashboard_user(&cfg, seed, &stop, until))
                .expect("spawn a dashboard thread"),
        );
    }
    let mut out = LoadResult::default();
    for h in agents {
        let a = h.join().expect("an agent thread panicked");
        out.kinds.entry("sync").or_default().merge(a.stats);
        out.rows_acked += a.rows_acked;
        if !a.pending_at_end.is_empty() {
            out.undelivered
                .push(format!("{}: {} records", a.id, a.pending_at_end.len()));
        }
        for (id, v) in a.acked {
            out.expected.insert((a.id.clone(), id), v);
        }
    }
    out.elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    for h in clients {
        for (k, s) in h.join().expect("a stats thread panicked") {
            out.kinds.entry(k).or_default().merge(s);
        }
    }
    out
}

/// A ureq client as the agent and the dashboard use it: keep-alive pool, statuses as values.
fn http_client(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into()
}

// ---------------------------------------------------------------------------------------------------------
// Agents

/// One connection as the agent's database holds it.
struct LocalConn {
    meta: ConnMeta,
    totals: Bytes,
    last_ms: i64,
    end_ms: Option<i64>,
    /// Minute -> (upload, download, changed since the last acknowledged delivery).
    buckets: BTreeMap<i64, (u64, u64, bool)>,
    /// Changed since the last acknowledged delivery (its `seq` passed the cursor).
    dirty: bool,
}

struct SimAgent {
    id: String,
    model: SimModel,
    tracker: Tracker,
    frame: Vec<u8>,
    local: HashMap<String, LocalConn>,
    http: ureq::Agent,
    url: String,
    stats: KindStats,
    rows_acked: u64,
    acked: HashMap<String, (u64, u64, bool)>,
    pending_at_end: Vec<String>,
}

/// Records per batch, as the agent's default `batch_rows`.
const BATCH_ROWS: usize = 1000;
/// How long an agent keeps delivering after the run before it gives up.
const FINAL_DELIVERY: Duration = Duration::from_secs(30);

impl SimAgent {
    fn new(id: String, conns: usize, seed: u64, cfg: &LoadConfig) -> SimAgent {
        SimAgent {
            id,
            model: SimModel::new(conns, cfg.churn_percent, seed, timefmt::now_ms()),
            tracker: Tracker::new(Vec::new()),
            frame: Vec::new(),
            local: HashMap::new(),
            // The agent's own settings (SyncConfig::new): a 10 s timeout per call.
            http: http_client(Duration::from_secs(10)),
            url: format!("{}/api/v1/sync", cfg.base),
            stats: KindStats::default(),
            rows_acked: 0,
            acked: HashMap::new(),
            pending_at_end: Vec::new(),
        }
    }

    /// mihomo pushes a snapshot every second; the collector diffs it and the writer stores the changes.
    fn observe(&mut self) {
        let now = timefmt::now_ms();
        self.model.tick(now);
        self.model.write_frame(&mut self.frame);
        let snap = snapshot::parse(&self.frame).expect("the simulator's frame parses");
        let diff = self.tracker.apply(&snap, now);
        drop(snap);
        self.store(diff);
    }

    fn store(&mut self, diff: ConnectionDiff) {
        for (meta, _) in diff.opened {
            // Its first bytes arrive as a flow too.
            self.local.insert(
                meta.id.clone(),
                LocalConn {
                    meta,
                    totals: Bytes::default(),
                    last_ms: diff.at_ms,
                    end_ms: None,
                    buckets: BTreeMap::new(),
                    dirty: true,
                },
            );
        }
        for f in diff.flows {
            let Some(c) = self.local.get_mut(&f.id) else {
                continue;
            };
            for (minute, b) in spread(f.from_ms, f.to_ms, f.delta) {
                let e = c.buckets.entry(minute).or_insert((0, 0, false));
                *e = (e.0 + b.upload, e.1 + b.download, true);
            }
            c.totals = f.totals;
            c.last_ms = c.last_ms.max(f.to_ms);
            c.dirty = true;
        }
        for cl in diff.closed {
            if let Some(c) = self.local.get_mut(&cl.id) {
                c.end_ms = Some(cl.end_ms);
                c.totals = cl.totals;
                c.dirty = true;
            }
        }
    }

    /// Posts the changed records, at most [`BATCH_ROWS`] per request, until none is left; false when a
    /// batch failed (it stays pending).
    fn sync(&mut self) -> bool {
        loop {
            let mut ids: Vec<&String> = self
                .local
                .iter()
                .filter(|(_, c)| c.dirty)
                .map(|(id, _)| id)
                .collect();
            ids.sort();
            ids.truncate(BATCH_ROWS);
            let ids: Vec<String> = ids.into_iter().cloned().collect();
            let ts = |ms: i64| format_rfc3339(ms, true);
            let records: Vec<OutRecord> = ids
                .iter()
                .map(|id| {
                    let c = &self.local[id];
                    OutRecord {
                        agent_id: self.id.clone(),
                        download: c.totals.download as i64,
                        upload: c.totals.upload as i64,
                        last_updated: ts(c.last_ms),
                        start: ts(c.meta.start_ms),
                        end: c.end_ms.map(ts),
                        meta: c.meta.clone(),
                        traffic: c
                            .buckets
                            .iter()
                            .filter(|(_, b)| b.2)
                            .map(|(m, b)| [m * 60, b.0 as i64, b.1 as i64])
                            .collect(),
                    }
                })
                .collect();
            let n = records.len();
            let batch = Batch {
                records,
                ..Batch::default()
            };
            let body = encode_batch(&self.id, &batch, timefmt::now_ms());
            drop(batch);
            let t = Instant::now();
            let outcome = post(&self.http, &self.url, &body);
            self.stats.record(t.elapsed(), outcome.clone());
            if outcome.is_err() {
                return false;
            }
            self.rows_acked += n as u64;
            let keep_from = timefmt::now_ms() / MINUTE_MS - 5;
            for id in &ids {
                let c = self.local.get_mut(id).expect("a sent record is held");
                self.acked.insert(
                    id.clone(),
                    (c.totals.upload, c.totals.download, c.end_ms.is_some()),
                );
                if c.end_ms.is_some() {
                    self.local.remove(id);
                    continue;
                }
                c.dirty = false;
                // Delivered buckets are only needed while bytes can still land in them.
                c.buckets.retain(|m, _| *m >= keep_from);
                for b in c.buckets.values_mut() {
                    b.2 = false;
                }
            }
            if n < BATCH_ROWS {
                return true;
            }
        }
    }

    fn run(mut self, cfg: &LoadConfig, until: Instant) -> SimAgent {
        let mut rng = Rng::new(self.model.len() as u64 ^ 0xa6e7);
        self.observe();
        // Every agent's first sync at once (all of them just started, or the master just came back), then
        // each at its own phase.
        let mut next_sync = Instant::now();
        let mut backoff = Duration::from_secs(1);
        let mut first = true;
        while Instant::now() < until {
            if Instant::now() >= next_sync {
                if self.sync() {
                    backoff = Duration::from_secs(1);
                    next_sync = Instant::now() + cfg.sync_interval;
                    if first {
                        first = false;
                        let phase = rng.below(cfg.sync_interval.as_millis().max(1) as u64);
                        next_sync = Instant::now() + Duration::from_millis(phase);
                    }
                } else {
                    next_sync = Instant::now() + backoff;
                    backoff = (backoff * 2).min(cfg.sync_interval.max(Duration::from_secs(1)));
                }
            }
            let next_tick = Instant::now() + Duration::from_secs(1);
            std::thread::sleep(
                next_tick
                    .min(next_sync)
                    .min(until)
                    .saturating_duration_since(Instant::now()),
            );
            self.observe();
        }
        // Deliver what is left, retrying as the agent would, for a bounded time.
        let give_up = Instant::now() + FINAL_DELIVERY;
        while !self.sync() && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(500));
        }
        self.pending_at_end = self
            .local
            .iter()
            .filter(|(_, c)| c.dirty)
            .map(|(id, _)| id.clone())
            .collect();
        self
    }
}

/// POST one batch; Ok on `200` with the success envelope.
fn post(http: &ureq::Agent, url: &str, body: &[u8]) -> Result<(), String> {
    let mut resp = http
        .post(url)
        .header("Content-Type", "application/json")
        .send(body)
        .map_err(|e| e.to_string())?;
    check_answer(resp.status().as_u16(), resp.body_mut())
}

/// `200` and `{"status":"success",...}`, else the status and the start of the body (digits replaced so
/// that one cause makes one message).
fn check_answer(status: u16, body: &mut ureq::Body) -> Result<(), String> {
    let text = body
        .with_config()
        .limit(16 << 20)
        .read_to_string()
        .map_err(|e| format!("HTTP {status}, body: {e}"))?;
    let ok = status == 200
        && serde_json::from_str::<Value>(&text).is_ok_and(|v| v["status"] == "success");
    if ok {
        Ok(())
    } else {
        Err(format!("HTTP {status}: {:.160}", text.trim()))
    }
}

// ---------------------------------------------------------------------------------------------------------
// Stats clients

/// The dashboard's range presets (src/api/dashboard.js `RANGES`): seconds (0 = all time), chart interval,
/// bucket seconds; and how often a user picks each (the 24 h default most).
const RANGES: [(i64, &str, i64, u64); 5] = [
    (3600, "minute", 60, 2),
    (86400, "hour", 3600, 4),
    (7 * 86400, "hour", 3600, 2),
    (30 * 86400, "day", 86400, 1),
    (0, "day", 86400, 1),
];
/// The dashboard's top lists (`GROUPS`).
const GROUPS: [&str; 5] = ["source_ip", "host", "chains", "policy", "rule"];

/// What one user looks at.
struct View {
    range: usize,
    /// A filter chip (`&key=value`), or empty.
    filter: String,
    offset: u64,
    search: String,
}

impl View {
    /// `&from=..&to=..` as `rangeParams()` builds it: whole buckets, the current one last.
    fn range(&self) -> String {
        let (secs, _, step, _) = RANGES[self.range];
        if secs == 0 {
            return String::new();
        }
        let to = timefmt::now_ms() / 1000 / step * step + step;
        format!("&from={}&to={to}", to - secs)
    }
}

/// One dashboard user (src/api/dashboard.js): a full refresh when the page opens, the open connections every
/// 5 s, a full refresh every 60 s, and a click now and then (`clicks`: another range, a filter chip, the next page of
/// closed connections, a search with its suggestions, the agents list). At most two requests in flight,
/// like the dashboard (`MAX_PARALLEL`), on one client whose pool keeps the connections alive. Timers that
/// fall due during a slow refresh fire once it is done.
fn dashboard_user(
    cfg: &LoadConfig,
    seed: u64,
    stop: &AtomicBool,
    until: Instant,
) -> BTreeMap<&'static str, KindStats> {
    let http = http_client(Duration::from_secs(20));
    let api = format!("{}/api/v1", cfg.base);
    let mut rng = Rng::new(seed);
    let mut out: BTreeMap<&'static str, KindStats> = BTreeMap::new();
    let mut view = View {
        range: 1,
        filter: String::new(),
        offset: 0,
        search: String::new(),
    };
    // Users open the page at different times over the first 20 s (half the run at most).
    let opened = Instant::now()
        + Duration::from_millis(rng.below(20_000).min(cfg.duration.as_millis() as u64 / 2));
    let span = cfg.clicks.1.saturating_sub(cfg.clicks.0).as_millis() as u64 + 1;
    let click = |rng: &mut Rng| cfg.clicks.0 + Duration::from_millis(rng.below(span));
    let (mut next_open, mut next_refresh) = (opened, opened + Duration::from_secs(60));
    let mut next_click = opened + click(&mut rng);
    let mut refresh_due = true;
    loop {
        let wake = next_open.min(next_refresh).min(next_click).min(until);
        while Instant::now() < wake && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(
                wake.saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100)),
            );
        }
        let now = Instant::now();
        if now >= until || stop.load(Ordering::SeqCst) {
            break;
        }
        let mut jobs: Vec<(&'static str, String)> = Vec::new();
        if now >= next_click {
            next_click = now + click(&mut rng);
            match rng.below(10) {
                0..=2 => {
                    view.range = pick_range(&mut rng);
                    view.offset = 0;
                    refresh_due = true;
                }
                3 | 4 => {
                    view.filter = if view.filter.is_empty() {
                        match rng.below(4) {
                            0 => format!("&source_ip=192.168.1.{}", 101 + rng.below(5)),
                            1 => "&network=udp".to_string(),
                            2 => "&policy=Proxy".to_string(),
                            _ => format!(
                                "&agent_id={}{:02}",
                                cfg.agent_prefix,
                                1 + rng.below(cfg.agents.max(1) as u64)
                            ),
                        }
                    } else {
                        String::new()
                    };
                    view.offset = 0;
                    refresh_due = true;
                }
                5 | 6 => {
                    view.offset = if rng.chance(0.7) { view.offset + 25 } else { 0 };
                    jobs.push(closed_page(&api, &view));
                }
                7 | 8 => {
                    // Typing a host: the suggestions, then the closed connections matching it.
                    view.search =
                        ["goo", "video", "apple", "github"][rng.below(4) as usize].to_string();
                    view.offset = 0;
                    jobs.push((
                        "filter-options",
                        format!(
                            "{api}/filter-options?filter_type=host&query={}&limit=10",
                            view.search
                        ),
                    ));
                    jobs.push(closed_page(&api, &view));
                }
                _ => jobs.push(("agents", format!("{api}/agents"))),
            }
        }
        if now >= next_refresh {
            next_refresh = now + Duration::from_secs(60);
            refresh_due = true;
        }
        if refresh_due {
            refresh_due = false;
            jobs.extend(full_refresh(&api, &view));
        } else if now >= next_open {
            jobs.push(open_list(&api, &view));
        }
        if now >= next_open {
            next_open = now + Duration::from_secs(5);
        }
        for (kind, s) in run_two_at_a_time(&http, jobs) {
            out.entry(kind).or_default().merge(s);
        }
    }
    out
}

fn pick_range(rng: &mut Rng) -> usize {
    let total: u64 = RANGES.iter().map(|r| r.3).sum();
    let mut x = rng.below(total);
    for (i, r) in RANGES.iter().enumerate() {
        if x < r.3 {
            return i;
        }
        x -= r.3;
    }
    1
}

fn closed_page(api: &str, v: &View) -> (&'static str, String) {
    let search = if v.search.is_empty() {
        String::new()
    } else {
        format!("&destination={}", v.search)
    };
    (
        "connections",
        format!(
            "{api}/connections?state=closed&limit=25&offset={}{}{}{search}",
            v.offset,
            v.filter,
            v.range()
        ),
    )
}

fn open_list(api: &str, v: &View) -> (&'static str, String) {
    (
        "connections",
        format!(
            "{api}/connections?state=open&limit=100&sort_by=total{}",
            v.filter
        ),
    )
}

/// `refresh()`: totals, the chart (download and upload), the five top lists, closed and open connections.
fn full_refresh(api: &str, v: &View) -> Vec<(&'static str, String)> {
    let (range, filter) = (v.range(), &v.filter);
    let interval = RANGES[v.range].1;
    let mut jobs = vec![(
        "summary",
        format!("{api}/stats?type=summary{filter}{range}"),
    )];
    for metric in ["download", "upload"] {
        jobs.push((
            "timeseries",
            format!("{api}/stats?type=timeseries&interval={interval}&fill=zero&metric={metric}{filter}{range}"),
        ));
    }
    for by in GROUPS {
        jobs.push((
            "group",
            format!("{api}/stats?type=group&group_by={by}&limit=10&other=true{filter}{range}"),
        ));
    }
    jobs.push(closed_page(api, v));
    jobs.push(open_list(api, v));
    jobs
}

/// Runs `jobs` with at most two in flight (two threads on one client).
fn run_two_at_a_time(
    http: &ureq::Agent,
    jobs: Vec<(&'static str, String)>,
) -> BTreeMap<&'static str, KindStats> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let lane = || {
        let mut out: BTreeMap<&'static str, KindStats> = BTreeMap::new();
        loop {
            let i = next.fetch_add(1, Ordering::SeqCst);
            let Some((kind, url)) = jobs.get(i) else {
                return out;
            };
            let t = Instant::now();
            // as the dashboard asks: answers up to 4 s old will do (src/api/cache.rs)
            let outcome = http
                .get(url)
                .header("Cache-Control", "max-age=4")
                .call()
                .map_err(|e| e.to_string())
                .and_then(|mut r| check_answer(r.status().as_u16(), r.body_mut()));
            out.entry(*kind).or_default().record(t.elapsed(), outcome);
        }
    };
    std::thread::scope(|s| {
        let other = s.spawn(lane);
        let mut mine = lane();
        for (k, st) in other.join().expect("a dashboard lane panicked") {
            mine.entry(k).or_default().merge(st);
        }
        mine
    })
}

// ---------------------------------------------------------------------------------------------------------
// Checking the master

/// What [`check_master`] found.
#[derive(Debug, Default)]
pub struct MasterCheck {
    /// Rows of the load's agents in the master.
    pub rows: u64,
    /// Rows whose totals, end or traffic sums differ from what was acknowledged, with examples.
    pub wrong: Vec<String>,
    pub wrong_count: u64,
}

/// Compares the master's rows of agents named `{prefix}*` with `expected`: the same connections, each with
/// the acknowledged totals and end, and traffic buckets that add up to its totals.
pub fn check_master(db: &Path, prefix: &str, expected: &Expected) -> Result<MasterCheck, String> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("open {}: {e}", db.display()))?;
    let like = format!("{prefix}%");
    let mut st = conn
        .prepare(
            "SELECT c.agent_id, c.id, c.upload, c.download, c.end_ms IS NOT NULL,
                 coalesce(sum(t.upload), 0), coalesce(sum(t.download), 0)
             FROM connections c LEFT JOIN traffic t ON t.conn = c.pk
             WHERE c.agent_id LIKE ?1 GROUP BY c.pk",
        )
        .map_err(|e| format!("read {}: {e}", db.display()))?;
    type Row = ((String, String), (i64, i64, bool, i64, i64));
    let rows: Vec<Row> = st
        .query_map([&like], |r| {
            Ok((
                (r.get(0)?, r.get(1)?),
                (r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?),
            ))
        })
        .and_then(|it| it.collect())
        .map_err(|e| format!("read {}: {e}", db.display()))?;
    let mut check = MasterCheck {
        rows: rows.len() as u64,
        ..MasterCheck::default()
    };
    let note = |check: &mut MasterCheck, what: String| {
        check.wrong_count += 1;
        if check.wrong.len() < 5 {
            check.wrong.push(what);
        }
    };
    let mut seen = 0u64;
    for (key, (up, down, ended, t_up, t_down)) in &rows {
        match expected.get(key) {
            None => note(
                &mut check,
                format!("{}/{}: stored, never acknowledged", key.0, key.1),
            ),
            Some(&(e_up, e_down, e_end)) => {
                seen += 1;
                let got = (*up as u64, *down as u64, *ended);
                if got != (e_up, e_down, e_end) || (*t_up, *t_down) != (*up, *down) {
                    note(
                        &mut check,
                        format!(
                            "{}/{}: sent {:?}, stored {got:?} with traffic sums ({t_up}, {t_down})",
                            key.0,
                            key.1,
                            (e_up, e_down, e_end)
                        ),
                    );
                }
            }
        }
    }
    if seen < expected.len() as u64 {
        let stored: HashSet<&(String, String)> = rows.iter().map(|(k, _)| k).collect();
        let missing = expected
            .keys()
            .find(|k| !stored.contains(k))
            .map(|k| format!("{}/{}", k.0, k.1))
            .unwrap_or_default();
        note(
            &mut check,
            format!(
                "{} acknowledged connections missing, e.g. {missing}",
                expected.len() as u64 - seen
            ),
        );
    }
    Ok(check)
}
