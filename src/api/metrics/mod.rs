//! `GET /metrics` and `GET /api/v1/metrics`: the Prometheus text exposition format (0.0.4).
//!
//! What is exported (every name starts with `mct_`):
//! - counters of connections and bytes (`direction="upload|download"`) by agent, device (source IP), exit
//!   node, policy group and rule (and, with `--metrics-hosts`, host);
//! - gauges of open connections by agent, per-agent sync times, lag and data lag, the database size;
//! - the tracker's own health: frames, diffs and changes processed, commit latency, errors.
//!
//! **Cardinality.** Per dimension the top `--metrics-max-series` labels by bytes keep their own series;
//! the rest are folded into one series labelled `other`. Devices get their MAC and name from a separate
//! `mct_device_info` series (join with `group_left`), so a renamed device keeps its counter.
//!
//! **Counters only grow.** They come from the connections' totals, which grow, but retention deletes rows
//! and a label moving in or out of the top N would move bytes between series: either would make a counter
//! drop, which Prometheus reads as a reset and `rate()` turns into a spike of the whole value. So the
//! exported value is an accumulator: it starts at the database's totals, and at each refresh every label
//! adds its growth since the previous refresh (never less than zero) to the series it belongs to now.
//! Deleted rows therefore stay counted, and a label promoted out of `other` starts a new series without
//! taking anything from `other`. What each series carries beyond the live rows of its members (its
//! *offset*) changes only when rows are deleted or the top N changes; it is then saved in table `meta`
//! (key `metrics_offsets`, through the writer), and a restarted process adds it back, so counters continue
//! across restarts. A drop in an agent's rollup totals (retention ran) triggers an immediate rescan of every
//! dimension so the offsets are saved within one scrape. Limits: deletions between the last scrape and a
//! restart, or growth and deletion of the same label within one refresh, are not seen (the counter then
//! lags by that growth, or Prometheus sees one reset); a label with the literal value `other` shares the
//! `other` series.
//!
//! **Cost.** Agents come from the hourly rollup, hosts from the per-host rollup, open connections from
//! their partial index: cheap at any size (1-10 ms on 1,000,000 rows). Devices, nodes, policies and rules
//! need one pass over the connections (0.7-2.6 s on 1,000,000 rows on a busy desktop; a SQL GROUP BY took
//! 2.6-3.5 s warm), so its answer is reused for ten times as long as it took (at least 5 s, at most
//! 10 min): scraping never costs more than about a tenth of one core, and those counters lag by at most
//! that reuse time.

use super::params::ApiResult;
use super::stats::Totals;
use crate::counters::{self as m, Exposition, Kind, MetricsConfig, OTHER};
use crate::devices::Devices;
use crate::store::{WriteCmd, WriterHandle};
use rusqlite::{Connection, OptionalExtension};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The content type of the exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The shortest time a grouped scan is reused.
pub const MIN_REUSE: Duration = Duration::from_secs(5);
/// The longest time a grouped scan is reused.
pub const MAX_REUSE: Duration = Duration::from_secs(600);

/// One capped dimension: the raw totals per label at the last refresh, and the exported accumulators.
#[derive(Default, Debug)]
struct DimState {
    prev: HashMap<String, Totals>,
    exposed: HashMap<String, Totals>,
    /// The labels with their own series, by bytes descending.
    top: Vec<String>,
    /// Whether anything was ever folded into `other`.
    other: bool,
}

fn add(a: &mut Totals, b: Totals) {
    a.count += b.count;
    a.upload += b.upload;
    a.download += b.download;
}

impl DimState {
    /// Takes fresh raw totals: each label's growth (never negative) goes to its series. True when some label
    /// went down (rows were deleted).
    fn update(&mut self, raw: HashMap<String, Totals>, max: usize) -> bool {
        let dropped = self.prev.iter().any(|(k, before)| {
            let now = raw.get(k).copied().unwrap_or_default();
            now.count < before.count || now.upload < before.upload || now.download < before.download
        });
        let mut order: Vec<(&String, i64)> = raw.iter().map(|(k, t)| (k, t.total())).collect();
        super::stats::rank(&mut order);
        let top: Vec<String> = order.iter().take(max).map(|(k, _)| (*k).clone()).collect();
        let in_top: HashSet<&str> = top.iter().map(String::as_str).collect();
        for (label, now) in &raw {
            let before = self.prev.get(label).copied().unwrap_or_default();
            let growth = Totals {
                count: (now.count - before.count).max(0),
                upload: (now.upload - before.upload).max(0),
                download: (now.download - before.download).max(0),
            };
            let series = if in_top.contains(label.as_str()) {
                label.as_str()
            } else {
                self.other = true;
                OTHER
            };
            add(self.exposed.entry(series.to_string()).or_default(), growth);
        }
        // Labels that left the top N keep their accumulator (they may come back) until there are too many.
        if self.exposed.len() > 4 * max + 1 {
            self.exposed
                .retain(|k, _| k == OTHER || in_top.contains(k.as_str()));
        }
        self.top = top;
        self.prev = raw;
        dropped
    }

    /// Per exported series, what it carries beyond the raw totals of its members now (deleted rows, labels
    /// that moved): persisted so that a restart continues the counters instead of resetting them.
    fn offsets(&self) -> BTreeMap<String, [i64; 3]> {
        let mut members: HashMap<&str, Totals> = HashMap::new();
        for (label, t) in &self.prev {
            add(members.entry(self.series_of(label)).or_default(), *t);
        }
        self.series()
            .into_iter()
            .map(|(k, e)| {
                let r = members.get(k).copied().unwrap_or_default();
                (
                    k.to_string(),
                    [
                        e.count - r.count,
                        e.upload - r.upload,
                        e.download - r.download,
                    ],
                )
            })
            .filter(|(_, o)| *o != [0, 0, 0])
            .collect()
    }

    /// Adds offsets saved by an earlier process to the series that exist now (right after the first update).
    fn seed(&mut self, offsets: &BTreeMap<String, [i64; 3]>) {
        let series: Vec<String> = self.series().iter().map(|(k, _)| k.to_string()).collect();
        for k in series {
            if let Some(o) = offsets.get(&k) {
                let e = self.exposed.entry(k).or_default();
                // Offsets may be negative (a label promoted out of `other` starts its series low).
                e.count = (e.count + o[0]).max(0);
                e.upload = (e.upload + o[1]).max(0);
                e.download = (e.download + o[2]).max(0);
            }
        }
    }

    /// The exported series: (label, totals), top N by bytes, then `other`.
    fn series(&self) -> Vec<(&str, Totals)> {
        let mut out: Vec<(&str, Totals)> = self
            .top
            .iter()
            .filter(|k| k.as_str() != OTHER)
            .map(|k| (k.as_str(), self.exposed.get(k).copied().unwrap_or_default()))
            .collect();
        if self.other || self.top.iter().any(|k| k == OTHER) {
            out.push((OTHER, self.exposed.get(OTHER).copied().unwrap_or_default()));
        }
        out
    }

    /// The series a raw label is counted in now.
    fn series_of<'a>(&self, label: &'a str) -> &'a str {
        if self.top.iter().any(|k| k == label) {
            label
        } else {
            OTHER
        }
    }
}

/// The grouped scan over connections (devices, nodes, policies, rules; hosts without rollups).
#[derive(Default, Debug, Clone)]
struct Scan {
    device: HashMap<String, Totals>,
    node: HashMap<String, Totals>,
    policy: HashMap<String, Totals>,
    rule: HashMap<String, Totals>,
    host: Option<HashMap<String, Totals>>,
}

#[derive(Default, Debug)]
struct Inner {
    agent: DimState,
    device: DimState,
    node: DimState,
    policy: DimState,
    rule: DimState,
    host: DimState,
    /// When the last grouped scan ran and how long it took.
    scanned: Option<(Instant, Duration)>,
    /// Offsets loaded from the database at the first scrape, applied to each dimension's first update.
    saved: Option<Saved>,
    /// The offsets as last handed to the writer (JSON), to write only when they change.
    persisted: String,
}

/// Offsets per dimension name, as stored in table `meta` under [`META_KEY`].
type Saved = BTreeMap<String, BTreeMap<String, [i64; 3]>>;

/// The `meta` key holding the counters' offsets.
pub const META_KEY: &str = "metrics_offsets";

/// What `/metrics` remembers between scrapes (shared by every API worker).
#[derive(Debug, Default)]
pub struct MetricsState {
    cfg: MetricsConfig,
    inner: Mutex<Inner>,
}

impl MetricsState {
    /// A fresh state (counters start at the database's totals at the first scrape).
    pub fn new(cfg: MetricsConfig) -> MetricsState {
        MetricsState {
            cfg: MetricsConfig {
                max_series: cfg.max_series.max(1),
                ..cfg
            },
            inner: Mutex::new(Inner::default()),
        }
    }
}

fn rule_label(rule: &str, payload: &str) -> String {
    if payload.is_empty() {
        rule.to_string()
    } else {
        format!("{rule} ({payload})")
    }
}

fn grouped(db: &Connection, sql: &str) -> ApiResult<HashMap<String, Totals>> {
    let mut stmt = db.prepare(sql)?;
    let mut rows = stmt.query([])?;
    let mut out = HashMap::new();
    while let Some(r) = rows.next()? {
        let t = Totals {
            count: r.get(1)?,
            upload: r.get(2)?,
            download: r.get(3)?,
        };
        add(
            out.entry(r.get::<_, Option<String>>(0)?.unwrap_or_default())
                .or_default(),
            t,
        );
    }
    Ok(out)
}

fn scan(db: &Connection, rollups: bool, hosts: bool) -> ApiResult<Scan> {
    let mut s = Scan::default();
    // Reading the rows and adding them up here is about 4 times faster than SQLite's GROUP BY over five
    // text columns (which sorts a million rows): the key is built in one reused buffer, so a row allocates
    // nothing unless its combination is new.
    let mut stmt = db.prepare(
        "SELECT source_ip, node, policy, rule, rule_payload, upload, download FROM connections",
    )?;
    let mut rows = stmt.query([])?;
    let mut combos: HashMap<String, Totals> = HashMap::new();
    let mut key = String::new();
    while let Some(r) = rows.next()? {
        key.clear();
        for i in 0..5 {
            if i > 0 {
                key.push('\0');
            }
            if let rusqlite::types::ValueRef::Text(t) = r.get_ref(i)? {
                key.push_str(&String::from_utf8_lossy(t));
            }
        }
        let t = Totals {
            count: 1,
            upload: r.get(5)?,
            download: r.get(6)?,
        };
        match combos.get_mut(key.as_str()) {
            Some(x) => add(x, t),
            None => {
                combos.insert(key.clone(), t);
            }
        }
    }
    for (k, t) in combos {
        let mut f = k.split('\0');
        let mut next = || f.next().unwrap_or("").to_string();
        let (device, node, policy, rule, payload) = (next(), next(), next(), next(), next());
        add(s.device.entry(device).or_default(), t);
        add(s.node.entry(node).or_default(), t);
        add(s.policy.entry(policy).or_default(), t);
        add(s.rule.entry(rule_label(&rule, &payload)).or_default(), t);
    }
    if hosts && !rollups {
        s.host = Some(grouped(
            db,
            "SELECT CASE WHEN host <> '' THEN host ELSE destination_ip END, count(*),
                coalesce(sum(upload), 0), coalesce(sum(download), 0) FROM connections GROUP BY 1",
        )?);
    }
    Ok(s)
}

/// How long a scan that took `took` is reused.
pub fn reuse_for(took: Duration) -> Duration {
    (took * 10).clamp(MIN_REUSE, MAX_REUSE)
}

/// Per-agent facts from table `agents` and the newest update of each agent's connections.
struct AgentRow {
    id: String,
    last_sync_ms: Option<i64>,
    sync_count: i64,
    newest_update_ms: Option<i64>,
}

/// Hands the offsets to the writer when they changed (rarely: after deletions or when the top N changes).
/// A full queue just means trying again at the next scrape.
fn persist(inner: &mut Inner, hosts: bool, writer: Option<&WriterHandle>) {
    let Some(writer) = writer else { return };
    let mut all: Saved = BTreeMap::new();
    let mut dims = vec![
        ("agent", &inner.agent),
        ("device", &inner.device),
        ("node", &inner.node),
        ("policy", &inner.policy),
        ("rule", &inner.rule),
    ];
    if hosts {
        dims.push(("host", &inner.host));
    }
    for (name, dim) in dims {
        let o = dim.offsets();
        if !o.is_empty() {
            all.insert(name.to_string(), o);
        }
    }
    let text = serde_json::to_string(&all).unwrap_or_default();
    if text == inner.persisted || (all.is_empty() && inner.persisted.is_empty()) {
        return;
    }
    let value = text.clone();
    let cmd = WriteCmd::Run(Box::new(move |c| {
        if let Err(e) = c.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [META_KEY, value.as_str()],
        ) {
            crate::warn!("metrics: cannot save the counters' offsets: {e}");
        }
    }));
    if writer.try_send(cmd).is_ok() {
        inner.persisted = text;
    }
}

/// Renders the whole exposition. `writer` (when given) saves the counters' offsets in table `meta`.
pub fn render(
    db: &Connection,
    rollups: bool,
    state: &MetricsState,
    devices: Option<&Devices>,
    writer: Option<&WriterHandle>,
    now_ms: i64,
) -> ApiResult<String> {
    let cfg = &state.cfg;
    let mut inner = state.inner.lock().unwrap_or_else(|e| e.into_inner());
    let inner = &mut *inner;
    let first = inner.saved.is_none();
    if first {
        let text: Option<String> = db
            .query_row("SELECT value FROM meta WHERE key = ?1", [META_KEY], |r| {
                r.get(0)
            })
            .optional()?;
        let saved: Saved = text
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        inner.persisted = text.unwrap_or_default();
        inner.saved = Some(saved);
    }
    let saved = inner.saved.clone().unwrap_or_default();
    let seed = |name: &str, dim: &mut DimState| {
        if let Some(o) = saved.get(name) {
            dim.seed(o);
        }
    };

    // Cheap every time: agents from the rollup (or a scan without it), hosts from their rollup.
    let agents = if rollups {
        grouped(
            db,
            "SELECT agent_id, sum(conns), sum(upload), sum(download) FROM rollup_conn_hour GROUP BY 1",
        )?
    } else {
        grouped(
            db,
            "SELECT agent_id, count(*), coalesce(sum(upload), 0), coalesce(sum(download), 0)
             FROM connections GROUP BY 1",
        )?
    };
    // Rows were deleted (retention): rescan now, so every dimension keeps their totals before a restart.
    let deleted = inner.agent.update(agents, cfg.max_series);
    if first {
        seed("agent", &mut inner.agent);
    }
    if cfg.hosts && rollups {
        let hosts = grouped(
            db,
            "SELECT host, conns, upload, download FROM rollup_host WHERE conns > 0",
        )?;
        inner.host.update(hosts, cfg.max_series);
        if first {
            seed("host", &mut inner.host);
        }
    }

    // The grouped scan, reused while fresh enough.
    let stale = deleted
        || match inner.scanned {
            None => true,
            Some((at, took)) => at.elapsed() >= reuse_for(took),
        };
    if stale {
        let started = Instant::now();
        let s = scan(db, rollups, cfg.hosts)?;
        let took = started.elapsed();
        crate::debug!(
            "metrics: grouped scan took {} ms, reused for {} s",
            took.as_millis(),
            reuse_for(took).as_secs()
        );
        inner.device.update(s.device, cfg.max_series);
        inner.node.update(s.node, cfg.max_series);
        inner.policy.update(s.policy, cfg.max_series);
        inner.rule.update(s.rule, cfg.max_series);
        if let Some(h) = s.host {
            inner.host.update(h, cfg.max_series);
        }
        if inner.scanned.is_none() {
            seed("device", &mut inner.device);
            seed("node", &mut inner.node);
            seed("policy", &mut inner.policy);
            seed("rule", &mut inner.rule);
            if !rollups {
                seed("host", &mut inner.host);
            }
        }
        inner.scanned = Some((started, took));
    }
    persist(inner, cfg.hosts, writer);

    let mut e = Exposition::default();
    let dims: Vec<(&str, &str, &str, &DimState)> = {
        let mut d = vec![
            ("mct", "agent", "agent", &inner.agent),
            ("mct_device", "device", "device (source IP)", &inner.device),
            ("mct_node", "node", "exit node", &inner.node),
            ("mct_policy", "policy", "policy group", &inner.policy),
            ("mct_rule", "rule", "rule (`Type (payload)`)", &inner.rule),
        ];
        if cfg.hosts {
            d.push(("mct_host", "host", "host (or destination IP)", &inner.host));
        }
        d
    };
    for (prefix, label, what, dim) in &dims {
        let series = dim.series();
        let name = format!("{prefix}_bytes_total");
        e.family(
            &name,
            Kind::Counter,
            &format!("Bytes of recorded connections by {what} and direction; beyond the top {} by bytes folded into \"other\".", cfg.max_series),
        );
        for (l, t) in &series {
            e.sample(
                &name,
                &[(label, l), ("direction", "download")],
                t.download as f64,
            );
            e.sample(
                &name,
                &[(label, l), ("direction", "upload")],
                t.upload as f64,
            );
        }
        let name = format!("{prefix}_connections_total");
        e.family(
            &name,
            Kind::Counter,
            &format!("Connections recorded, by {what}."),
        );
        for (l, t) in &series {
            e.sample(&name, &[(label, l)], t.count as f64);
        }
    }

    if let Some(devices) = devices {
        let table = devices.table();
        e.family(
            "mct_device_info",
            Kind::Gauge,
            "MAC address and name of a device, from the ARP table and DHCP leases (always 1).",
        );
        for l in &inner.device.top {
            if let Some(d) = table.get(l) {
                e.sample(
                    "mct_device_info",
                    &[("device", l), ("mac", &d.mac), ("name", &d.name)],
                    1.0,
                );
            }
        }
    }

    // Open connections by agent, folded like the agent counters.
    let open = grouped(
        db,
        "SELECT agent_id, count(*), 0, 0 FROM connections WHERE end_ms IS NULL GROUP BY 1",
    )?;
    let mut open_by: Vec<(&str, i64)> = inner.agent.series().iter().map(|(l, _)| (*l, 0)).collect();
    for (agent, t) in &open {
        let s = inner.agent.series_of(agent);
        match open_by.iter_mut().find(|(l, _)| *l == s) {
            Some(x) => x.1 += t.count,
            None => open_by.push((OTHER, t.count)),
        }
    }
    e.family(
        "mct_open_connections",
        Kind::Gauge,
        "Connections open now (no end time yet), by agent.",
    );
    for (l, n) in &open_by {
        e.sample("mct_open_connections", &[("agent", l)], *n as f64);
    }

    // Per-agent sync health, for the agents with their own series.
    let mut rows = Vec::new();
    {
        let mut stmt =
            db.prepare("SELECT last_sync_ms, sync_count FROM agents WHERE agent_id = ?1")?;
        let mut newest =
            db.prepare("SELECT max(last_updated_ms) FROM connections WHERE agent_id = ?1")?;
        for id in inner.agent.top.iter() {
            let (last_sync_ms, sync_count) = stmt
                .query_row([id], |r| {
                    Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, i64>(1)?))
                })
                .unwrap_or((None, 0));
            let newest_update_ms: Option<i64> = newest.query_row([id], |r| r.get(0))?;
            rows.push(AgentRow {
                id: id.clone(),
                last_sync_ms,
                sync_count,
                newest_update_ms,
            });
        }
    }
    e.family(
        "mct_agent_syncs_total",
        Kind::Counter,
        "Uploads (POST /sync) received from an agent.",
    );
    for r in &rows {
        e.sample(
            "mct_agent_syncs_total",
            &[("agent", &r.id)],
            r.sync_count as f64,
        );
    }
    e.family(
        "mct_agent_last_sync_timestamp_seconds",
        Kind::Gauge,
        "When an agent last uploaded (Unix seconds); absent for agents that never uploaded.",
    );
    for r in &rows {
        if let Some(t) = r.last_sync_ms {
            e.sample(
                "mct_agent_last_sync_timestamp_seconds",
                &[("agent", &r.id)],
                t as f64 / 1000.0,
            );
        }
    }
    e.family(
        "mct_agent_sync_lag_seconds",
        Kind::Gauge,
        "Seconds since an agent last uploaded (the master's view of its sync lag).",
    );
    for r in &rows {
        if let Some(t) = r.last_sync_ms {
            e.sample(
                "mct_agent_sync_lag_seconds",
                &[("agent", &r.id)],
                (now_ms - t).max(0) as f64 / 1000.0,
            );
        }
    }
    e.family(
        "mct_agent_data_lag_seconds",
        Kind::Gauge,
        "Seconds since the newest connection update the master holds from an agent (grows while an agent's backlog waits).",
    );
    for r in &rows {
        if let Some(t) = r.newest_update_ms {
            e.sample(
                "mct_agent_data_lag_seconds",
                &[("agent", &r.id)],
                (now_ms - t).max(0) as f64 / 1000.0,
            );
        }
    }

    // The tracker's own health.
    let pages: i64 = db.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let page_size: i64 = db.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    e.family(
        "mct_database_size_bytes",
        Kind::Gauge,
        "Size of the database (page_count * page_size, without the WAL).",
    );
    e.sample("mct_database_size_bytes", &[], (pages * page_size) as f64);
    e.family(
        "mct_collector_frames_total",
        Kind::Counter,
        "Snapshots received from mihomo and parsed by the collector.",
    );
    e.sample("mct_collector_frames_total", &[], m::get(&m::FRAMES) as f64);
    e.family(
        "mct_writer_diffs_total",
        Kind::Counter,
        "Diffs (frames that changed something) received by the writer.",
    );
    e.sample("mct_writer_diffs_total", &[], m::get(&m::DIFFS) as f64);
    e.family(
        "mct_writer_changes_total",
        Kind::Counter,
        "Changes received by the writer, by kind; rate() gives events per second.",
    );
    for (kind, c) in [
        ("opened", &m::OPENED),
        ("reopened", &m::REOPENED),
        ("flow", &m::FLOWS),
        ("closed", &m::CLOSED),
    ] {
        e.sample(
            "mct_writer_changes_total",
            &[("kind", kind)],
            m::get(c) as f64,
        );
    }
    e.family(
        "mct_writer_commits_total",
        Kind::Counter,
        "Transactions committed by the writer.",
    );
    e.sample("mct_writer_commits_total", &[], m::get(&m::COMMITS) as f64);
    e.family(
        "mct_writer_dropped_connections_total",
        Kind::Counter,
        "New connections dropped because the database could not be written and memory was at its bound.",
    );
    e.sample(
        "mct_writer_dropped_connections_total",
        &[],
        m::get(&m::DROPPED) as f64,
    );
    e.family(
        "mct_writer_last_commit_seconds",
        Kind::Gauge,
        "Duration of the writer's last commit.",
    );
    e.sample(
        "mct_writer_last_commit_seconds",
        &[],
        m::get(&m::LAST_COMMIT_US) as f64 / 1e6,
    );
    e.family(
        "mct_writer_max_commit_seconds",
        Kind::Gauge,
        "Duration of the writer's longest commit since start.",
    );
    e.sample(
        "mct_writer_max_commit_seconds",
        &[],
        m::get(&m::MAX_COMMIT_US) as f64 / 1e6,
    );
    e.family(
        "mct_errors_total",
        Kind::Counter,
        "Errors logged since start (the messages are in the log).",
    );
    e.sample("mct_errors_total", &[], m::get(&m::ERRORS) as f64);
    e.family(
        "mct_last_error_timestamp_seconds",
        Kind::Gauge,
        "When the last error was logged (Unix seconds; 0: none since start).",
    );
    e.sample(
        "mct_last_error_timestamp_seconds",
        &[],
        m::get(&m::LAST_ERROR_MS) as f64 / 1000.0,
    );
    e.family(
        "mct_metrics_scan_seconds",
        Kind::Gauge,
        "Duration of the last grouped scan behind the device, node, policy and rule counters.",
    );
    e.sample(
        "mct_metrics_scan_seconds",
        &[],
        inner.scanned.map(|(_, d)| d.as_secs_f64()).unwrap_or(0.0),
    );
    Ok(e.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(count: i64, upload: i64, download: i64) -> Totals {
        Totals {
            count,
            upload,
            download,
        }
    }

    fn raw(v: &[(&str, Totals)]) -> HashMap<String, Totals> {
        v.iter().map(|(k, t)| (k.to_string(), *t)).collect()
    }

    #[test]
    fn folds_beyond_top_n_and_never_drops() {
        let mut d = DimState::default();
        d.update(
            raw(&[("a", t(1, 0, 100)), ("b", t(2, 0, 50)), ("c", t(3, 0, 10))]),
            2,
        );
        assert_eq!(
            d.series(),
            vec![
                ("a", t(1, 0, 100)),
                ("b", t(2, 0, 50)),
                (OTHER, t(3, 0, 10))
            ]
        );
        // Retention deleted rows of a (a drop) while c grew past b: nothing goes down, c's growth lands in
        // its new series and other keeps what it had.
        d.update(
            raw(&[("a", t(1, 0, 60)), ("b", t(2, 0, 50)), ("c", t(4, 0, 80))]),
            2,
        );
        assert_eq!(
            d.series(),
            vec![
                ("c", t(1, 0, 70)),
                ("a", t(1, 0, 100)),
                (OTHER, t(3, 0, 10))
            ]
        );
        // b is now folded: its growth goes to other.
        d.update(
            raw(&[("a", t(1, 0, 60)), ("b", t(3, 0, 55)), ("c", t(4, 0, 80))]),
            2,
        );
        assert_eq!(d.series()[2], (OTHER, t(4, 0, 15)));
    }

    #[test]
    fn offsets_carry_counters_over_a_restart() {
        let mut d = DimState::default();
        d.update(raw(&[("a", t(2, 0, 100)), ("b", t(1, 0, 10))]), 1);
        assert!(d.offsets().is_empty(), "nothing deleted yet");
        // a lost a row of 60 bytes.
        assert!(d.update(raw(&[("a", t(1, 0, 40)), ("b", t(1, 0, 10))]), 1));
        let saved = d.offsets();
        assert_eq!(saved.get("a"), Some(&[1, 0, 60]));
        // A new process sees only the live rows, and adds the offsets back.
        let mut restarted = DimState::default();
        assert!(!restarted.update(raw(&[("a", t(1, 0, 40)), ("b", t(1, 0, 10))]), 1));
        restarted.seed(&saved);
        assert_eq!(restarted.series(), d.series());
        assert_eq!(restarted.series()[0], ("a", t(2, 0, 100)));
    }

    #[test]
    fn reuse_grows_with_scan_time() {
        assert_eq!(reuse_for(Duration::from_millis(1)), MIN_REUSE);
        assert_eq!(reuse_for(Duration::from_secs(3)), Duration::from_secs(30));
        assert_eq!(reuse_for(Duration::from_secs(3600)), MAX_REUSE);
    }
}
