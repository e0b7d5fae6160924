//! The families of `/metrics` as data, in the order they are written: first two counters per capped
//! dimension ([`write_dimension`], folded top N then `other`), then [`FAMILIES`], each a name, a kind, a
//! help text and where its samples come from: the [`Facts`] one scrape read, or a process counter.

use super::dimension::{exported, DimState, Dimension, DEVICE, DIMENSIONS};
use super::exposition::{Exposition, Kind};
use super::queries::AgentRow;
use crate::counters as m;
use crate::devices::DeviceTable;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// What one scrape read, gathered before any line is written.
pub struct Facts<'a> {
    pub max_series: usize,
    pub hosts: bool,
    pub dims: &'a [DimState; DIMENSIONS.len()],
    /// The device table, when devices are named.
    pub devices: Option<Arc<DeviceTable>>,
    /// Open connections per agent series, folded like the agent counters.
    pub open: Vec<(&'a str, i64)>,
    /// The agents with their own series.
    pub agents: Vec<AgentRow>,
    pub database_bytes: i64,
    /// Duration of the last grouped scan (0 before the first).
    pub scan_seconds: f64,
    pub now_ms: i64,
}

/// Where the samples of a family go.
pub struct Samples<'e> {
    e: &'e mut Exposition,
    name: &'static str,
}

impl Samples<'_> {
    fn put(&mut self, labels: &[(&str, &str)], value: f64) {
        self.e.sample(self.name, labels, value);
    }
}

/// Where a family's samples come from.
enum Source {
    /// Written from what the scrape read.
    Facts(fn(&Facts<'_>, &mut Samples<'_>)),
    /// One sample without labels: a process counter divided by a unit (1 when it is the value itself).
    Counter(&'static AtomicU64, f64),
}

/// One family after the per-dimension ones.
struct Family {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    /// Whether the family is written at all (its header too).
    shown: fn(&Facts<'_>) -> bool,
    source: Source,
}

fn always(_: &Facts<'_>) -> bool {
    true
}

static FAMILIES: &[Family] = &[
    Family {
        name: "mct_device_info",
        kind: Kind::Gauge,
        help: "MAC address and name of a device, from the ARP table and DHCP leases (always 1).",
        shown: |f| f.devices.is_some(),
        source: Source::Facts(device_info),
    },
    Family {
        name: "mct_open_connections",
        kind: Kind::Gauge,
        help: "Connections open now (no end time yet), by agent.",
        shown: always,
        source: Source::Facts(|f, s| {
            for (l, n) in &f.open {
                s.put(&[("agent", l)], *n as f64);
            }
        }),
    },
    Family {
        name: "mct_agent_syncs_total",
        kind: Kind::Counter,
        help: "Uploads (POST /sync) received from an agent.",
        shown: always,
        source: Source::Facts(|f, s| per_agent(f, s, |r, _| Some(r.sync_count as f64))),
    },
    Family {
        name: "mct_agent_last_sync_timestamp_seconds",
        kind: Kind::Gauge,
        help: "When an agent last uploaded (Unix seconds); absent for agents that never uploaded.",
        shown: always,
        source: Source::Facts(|f, s| {
            per_agent(f, s, |r, _| r.last_sync_ms.map(|t| t as f64 / 1000.0))
        }),
    },
    Family {
        name: "mct_agent_sync_lag_seconds",
        kind: Kind::Gauge,
        help: "Seconds since an agent last uploaded (the master's view of its sync lag).",
        shown: always,
        source: Source::Facts(|f, s| per_agent(f, s, |r, now| seconds_since(r.last_sync_ms, now))),
    },
    Family {
        name: "mct_agent_data_lag_seconds",
        kind: Kind::Gauge,
        help: "Seconds since the newest connection update the master holds from an agent (grows while an agent's backlog waits).",
        shown: always,
        source: Source::Facts(|f, s| {
            per_agent(f, s, |r, now| seconds_since(r.newest_update_ms, now))
        }),
    },
    Family {
        name: "mct_database_size_bytes",
        kind: Kind::Gauge,
        help: "Size of the database (page_count * page_size, without the WAL).",
        shown: always,
        source: Source::Facts(|f, s| s.put(&[], f.database_bytes as f64)),
    },
    Family {
        name: "mct_collector_frames_total",
        kind: Kind::Counter,
        help: "Snapshots received from mihomo and parsed by the collector.",
        shown: always,
        source: Source::Counter(&m::FRAMES, 1.0),
    },
    Family {
        name: "mct_writer_diffs_total",
        kind: Kind::Counter,
        help: "Diffs (frames that changed something) received by the writer.",
        shown: always,
        source: Source::Counter(&m::DIFFS, 1.0),
    },
    Family {
        name: "mct_writer_changes_total",
        kind: Kind::Counter,
        help: "Changes received by the writer, by kind; rate() gives events per second.",
        shown: always,
        source: Source::Facts(|_, s| {
            for (kind, c) in [
                ("opened", &m::OPENED),
                ("reopened", &m::REOPENED),
                ("flow", &m::FLOWS),
                ("closed", &m::CLOSED),
            ] {
                s.put(&[("kind", kind)], m::get(c) as f64);
            }
        }),
    },
    Family {
        name: "mct_writer_commits_total",
        kind: Kind::Counter,
        help: "Transactions committed by the writer.",
        shown: always,
        source: Source::Counter(&m::COMMITS, 1.0),
    },
    Family {
        name: "mct_writer_dropped_connections_total",
        kind: Kind::Counter,
        help: "New connections dropped because the database could not be written and memory was at its bound.",
        shown: always,
        source: Source::Counter(&m::DROPPED, 1.0),
    },
    Family {
        name: "mct_writer_last_commit_seconds",
        kind: Kind::Gauge,
        help: "Duration of the writer's last commit.",
        shown: always,
        source: Source::Counter(&m::LAST_COMMIT_US, 1e6),
    },
    Family {
        name: "mct_writer_max_commit_seconds",
        kind: Kind::Gauge,
        help: "Duration of the writer's longest commit since start.",
        shown: always,
        source: Source::Counter(&m::MAX_COMMIT_US, 1e6),
    },
    Family {
        name: "mct_errors_total",
        kind: Kind::Counter,
        help: "Errors logged since start (the messages are in the log).",
        shown: always,
        source: Source::Counter(&m::ERRORS, 1.0),
    },
    Family {
        name: "mct_last_error_timestamp_seconds",
        kind: Kind::Gauge,
        help: "When the last error was logged (Unix seconds; 0: none since start).",
        shown: always,
        source: Source::Counter(&m::LAST_ERROR_MS, 1000.0),
    },
    Family {
        name: "mct_metrics_scan_seconds",
        kind: Kind::Gauge,
        help: "Duration of the last grouped scan behind the device, node, policy and rule counters.",
        shown: always,
        source: Source::Facts(|f, s| s.put(&[], f.scan_seconds)),
    },
];

/// The whole exposition.
pub fn write(f: &Facts<'_>) -> String {
    let mut e = Exposition::default();
    for i in exported(f.hosts) {
        write_dimension(&mut e, &DIMENSIONS[i], &f.dims[i], f.max_series);
    }
    for family in FAMILIES.iter().filter(|family| (family.shown)(f)) {
        e.family(family.name, family.kind, family.help);
        let mut s = Samples {
            e: &mut e,
            name: family.name,
        };
        match family.source {
            Source::Facts(samples) => samples(f, &mut s),
            Source::Counter(c, unit) => s.put(&[], m::get(c) as f64 / unit),
        }
    }
    e.finish()
}

/// The two counters of a capped dimension: bytes by direction, and connections.
fn write_dimension(e: &mut Exposition, d: &Dimension, state: &DimState, max_series: usize) {
    let series = state.series();
    let name = format!("{}_bytes_total", d.prefix);
    e.family(
        &name,
        Kind::Counter,
        &format!(
            "Bytes of recorded connections by {} and direction; beyond the top {max_series} by bytes folded into \"other\".",
            d.what
        ),
    );
    for (l, t) in &series {
        let label = (d.label, *l);
        e.sample(
            &name,
            &[label, ("direction", "download")],
            t.download as f64,
        );
        e.sample(&name, &[label, ("direction", "upload")], t.upload as f64);
    }
    let name = format!("{}_connections_total", d.prefix);
    e.family(
        &name,
        Kind::Counter,
        &format!("Connections recorded, by {}.", d.what),
    );
    for (l, t) in &series {
        e.sample(&name, &[(d.label, l)], t.count as f64);
    }
}

fn device_info(f: &Facts<'_>, s: &mut Samples<'_>) {
    let Some(table) = &f.devices else { return };
    for l in &f.dims[DEVICE].top {
        if let Some(d) = table.get(l) {
            s.put(&[("device", l), ("mac", &d.mac), ("name", &d.name)], 1.0);
        }
    }
}

/// One sample per agent with its own series that has a value (given the row and the time now).
fn per_agent(f: &Facts<'_>, s: &mut Samples<'_>, value: fn(&AgentRow, i64) -> Option<f64>) {
    for r in &f.agents {
        if let Some(v) = value(r, f.now_ms) {
            s.put(&[("agent", &r.id)], v);
        }
    }
}

/// Seconds from `t` (UTC ms) to `now_ms`, never negative.
fn seconds_since(t: Option<i64>, now_ms: i64) -> Option<f64> {
    t.map(|t| (now_ms - t).max(0) as f64 / 1000.0)
}
