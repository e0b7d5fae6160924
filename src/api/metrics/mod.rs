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
//!
//! **Errors.** A read that fails fails the scrape: `500` with the error envelope naming what could not be
//! read, so Prometheus marks the target down (`up` 0) instead of storing a partial exposition whose missing
//! or zero samples would look like data. It is logged at error level when scrapes start failing and at info
//! level when they work again, not at every scrape. (An agent without a row in table `agents` is no error: it
//! never uploaded, so it has no sync time and 0 syncs.)
//!
//! The parts: `exposition.rs` writes the text format, `dimension.rs` folds and accumulates the capped
//! dimensions, `queries.rs` reads the database, `families.rs` is the table of what is written.

mod dimension;
mod exposition;
mod families;
mod queries;

use super::params::{ApiError, ApiResult};
use super::stats::Totals;
use crate::devices::Devices;
use crate::store::{WriteCmd, WriterHandle};
use dimension::{exported, DimState, AGENT, DEVICE, DIMENSIONS, HOST, NODE, POLICY, RULE};
use queries::Failed;
use rusqlite::Connection;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The content type of the exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The shortest time a grouped scan is reused.
pub const MIN_REUSE: Duration = Duration::from_secs(5);
/// The longest time a grouped scan is reused.
pub const MAX_REUSE: Duration = Duration::from_secs(600);

/// How `/metrics` bounds its series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Per dimension, the top N labels by bytes keep their own series; the rest are folded into `other`.
    pub max_series: usize,
    /// Also export the (capped) per-host dimension.
    pub hosts: bool,
}

/// 50 series per dimension, no hosts.
pub const DEFAULT_MAX_SERIES: usize = 50;

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            max_series: DEFAULT_MAX_SERIES,
            hosts: false,
        }
    }
}

#[derive(Default, Debug)]
struct Inner {
    /// Per dimension of [`DIMENSIONS`].
    dims: [DimState; DIMENSIONS.len()],
    /// When the last grouped scan ran and how long it took.
    scanned: Option<(Instant, Duration)>,
    /// Offsets loaded from the database at the first scrape; each dimension's are applied (and removed) at
    /// its first update.
    saved: Option<Saved>,
    /// The offsets as last handed to the writer (JSON), to write only when they change.
    persisted: String,
    /// The last scrape failed (its error was logged; the next ones are not, until one succeeds).
    failing: bool,
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

/// How long a scan that took `took` is reused.
pub fn reuse_for(took: Duration) -> Duration {
    (took * 10).clamp(MIN_REUSE, MAX_REUSE)
}

/// Renders the whole exposition. `writer` (when given) saves the counters' offsets in table `meta`. A read
/// that fails is a `500` naming it (see the module doc).
pub fn render(
    db: &Connection,
    rollups: bool,
    state: &MetricsState,
    devices: Option<&Devices>,
    writer: Option<&WriterHandle>,
    now_ms: i64,
) -> ApiResult<String> {
    let mut inner = state.inner.lock().unwrap_or_else(|e| e.into_inner());
    let inner = &mut *inner;
    match scrape(db, rollups, &state.cfg, inner, devices, writer, now_ms) {
        Ok(text) => {
            if std::mem::take(&mut inner.failing) {
                crate::info!("metrics: the database can be read again; /metrics answers again");
            }
            Ok(text)
        }
        Err(Failed { what, error }) => {
            if std::mem::replace(&mut inner.failing, true) {
                crate::debug!("metrics: cannot read {what}: {error}");
            } else {
                crate::error!(
                    "metrics: cannot read {what}: {error}; /metrics answers 500 until it can"
                );
            }
            Err(ApiError::status(
                500,
                format!("/metrics: cannot read {what} from the database; see the server log"),
            ))
        }
    }
}

/// Refreshes the dimensions, saves their offsets when they changed, reads the rest and writes the text.
fn scrape(
    db: &Connection,
    rollups: bool,
    cfg: &MetricsConfig,
    inner: &mut Inner,
    devices: Option<&Devices>,
    writer: Option<&WriterHandle>,
    now_ms: i64,
) -> Result<String, Failed> {
    if inner.saved.is_none() {
        inner.saved = Some(load_saved(db, inner)?);
    }
    refresh(db, rollups, cfg, inner)?;
    persist(inner, cfg.hosts, writer);
    let open = queries::open_by_agent(db)?;
    let agents = queries::agent_rows(db, inner.dims[AGENT].top.iter())?;
    let database_bytes = queries::database_size(db)?;
    Ok(families::write(&families::Facts {
        max_series: cfg.max_series,
        hosts: cfg.hosts,
        dims: &inner.dims,
        devices: devices.map(Devices::table),
        open: inner.dims[AGENT].fold_counts(&open),
        agents,
        database_bytes,
        scan_seconds: inner.scanned.map(|(_, d)| d.as_secs_f64()).unwrap_or(0.0),
        now_ms,
    }))
}

/// The offsets saved by an earlier process (none when there are none or they cannot be parsed).
fn load_saved(db: &Connection, inner: &mut Inner) -> Result<Saved, Failed> {
    let text = queries::saved_offsets(db, META_KEY)?;
    let saved = match text.as_deref().map(serde_json::from_str::<Saved>) {
        None => Saved::default(),
        Some(Ok(saved)) => saved,
        Some(Err(e)) => {
            crate::warn!(
                "metrics: the saved counters' offsets (table meta, key {META_KEY}) are not valid ({e}); \
                 the counters start from the database's totals"
            );
            Saved::default()
        }
    };
    inner.persisted = text.unwrap_or_default();
    Ok(saved)
}

/// Feeds fresh totals to dimension `i`; at its first update it also gets the offsets an earlier process
/// saved. True when some label went down (rows were deleted).
fn update(inner: &mut Inner, i: usize, raw: HashMap<String, Totals>, max: usize) -> bool {
    let dropped = inner.dims[i].update(raw, max);
    if let Some(o) = inner
        .saved
        .as_mut()
        .and_then(|s| s.remove(DIMENSIONS[i].key))
    {
        inner.dims[i].seed(&o);
    }
    dropped
}

/// Agents (and hosts from their rollup) every time; the grouped scan when the last one is too old, or
/// at once when rows were deleted (retention), so every dimension keeps their totals before a restart.
fn refresh(
    db: &Connection,
    rollups: bool,
    cfg: &MetricsConfig,
    inner: &mut Inner,
) -> Result<(), Failed> {
    let max = cfg.max_series;
    let deleted = update(inner, AGENT, queries::agent_totals(db, rollups)?, max);
    if cfg.hosts && rollups {
        update(inner, HOST, queries::host_totals(db)?, max);
    }
    let stale = deleted
        || match inner.scanned {
            None => true,
            Some((at, took)) => at.elapsed() >= reuse_for(took),
        };
    if !stale {
        return Ok(());
    }
    let started = Instant::now();
    let s = queries::scan(db, rollups, cfg.hosts)?;
    let took = started.elapsed();
    crate::debug!(
        "metrics: grouped scan took {} ms, reused for {} s",
        took.as_millis(),
        reuse_for(took).as_secs()
    );
    for (i, raw) in [
        (DEVICE, s.device),
        (NODE, s.node),
        (POLICY, s.policy),
        (RULE, s.rule),
    ] {
        update(inner, i, raw, max);
    }
    if let Some(h) = s.host {
        update(inner, HOST, h, max);
    }
    inner.scanned = Some((started, took));
    Ok(())
}

/// Hands the offsets to the writer when they changed (rarely: after deletions or when the top N changes).
/// A full queue just means trying again at the next scrape.
fn persist(inner: &mut Inner, hosts: bool, writer: Option<&WriterHandle>) {
    let Some(writer) = writer else { return };
    let mut all: Saved = BTreeMap::new();
    for i in exported(hosts) {
        let o = inner.dims[i].offsets();
        if !o.is_empty() {
            all.insert(DIMENSIONS[i].key.to_string(), o);
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

#[cfg(test)]
mod tests;
