//! Turning a stream of full snapshots into changes: opened, traffic (byte deltas), closed.
//!
//! mihomo has no open or close events: a connection is closed when its id is missing from a push. The
//! [`Tracker`] keeps the open set (id → counters, last seen) and compares each snapshot with it.
//!
//! Rules, all about never counting a byte twice and never leaving a connection open forever:
//! - Deltas are `now - last known` per id; counters that go down are ignored (the larger value is kept).
//! - A connection missing from a push is closed at the push's time. After the stream was lost (a dropped
//!   socket, a tracker restart), missing connections are closed at the time they were last seen.
//! - A core restart (the totals go down) closes everything open at its last-seen time.
//! - A tracker restart resumes from the database's open rows: a connection still in mihomo's first snapshot
//!   continues from its stored bytes.
//! - An id that was closed and shows up again within [`REOPEN_WINDOW_MS`] (an empty or partial snapshot, a
//!   glitch) is reopened, its bytes continuing from where they were: never a second row.
//! - Duplicate ids within one snapshot count once (the larger counters win).
//! - Time never runs backwards for a connection: when the clock jumps back, its bytes land in the minute it
//!   was last seen (never before its start) and it closes no earlier than that, so no duration is negative.
//!   A start after first sight (in our future) is taken as first sight.

use crate::mihomo::snapshot::{Entry, IdKey, Snapshot};
use crate::model::{Bytes, Closed, ConnMeta, ConnectionDiff, Flow, OpenRow};
use std::collections::HashMap;

/// How long a closed id is remembered so that it can be reopened instead of duplicated.
pub const REOPEN_WINDOW_MS: i64 = 120_000;

#[derive(Debug)]
struct Tracked {
    bytes: Bytes,
    last_seen_ms: i64,
    start_ms: i64,
    /// What the log calls it: host, else destination IP.
    label: Box<str>,
    generation: u64,
}

/// The open set and what is needed to diff the next snapshot against it.
#[derive(Debug, Default)]
pub struct Tracker {
    open: HashMap<IdKey, Tracked>,
    recently_closed: HashMap<IdKey, (Bytes, i64)>,
    totals: Option<(u64, u64)>,
    /// The next snapshot is the first after a (re)connect or start.
    fresh: bool,
    generation: u64,
}

impl Tracker {
    /// A tracker that resumes the connections the database still has open.
    pub fn new(open: Vec<OpenRow>) -> Tracker {
        let mut t = Tracker {
            fresh: true,
            ..Tracker::default()
        };
        for row in open {
            let tracked = Tracked {
                bytes: row.totals,
                last_seen_ms: row.last_updated_ms,
                start_ms: row.last_updated_ms,
                label: "".into(),
                generation: 0,
            };
            t.open.insert(IdKey::new(&row.id), tracked);
        }
        t
    }

    /// Number of connections currently open.
    pub fn open_count(&self) -> usize {
        self.open.len()
    }

    /// The stream was lost: the next snapshot's missing connections close at their last-seen time, and a
    /// snapshot sharing no id with the open set means the core restarted.
    pub fn stream_lost(&mut self) {
        self.fresh = true;
    }

    /// Whether `id` is open or recently closed: the next [`Tracker::apply`] will not need its metadata
    /// ([`crate::mihomo::snapshot::read`] keeps the raw JSON of the others only).
    pub fn knows(&self, id: &IdKey) -> bool {
        self.open.contains_key(id) || self.recently_closed.contains_key(id)
    }

    /// Compares `snap`, received at `at_ms`, with the open set and returns what changed.
    pub fn apply(&mut self, snap: &Snapshot, at_ms: i64) -> ConnectionDiff {
        self.apply_in_parts(snap, at_ms, usize::MAX, &mut |_| {})
    }

    /// [`Tracker::apply`], handing the new connections to `part` as soon as `max_opened` of them are decoded
    /// (each in a diff of its own, with only `opened` set, at zero bytes), and returning the rest of the
    /// diff. A first snapshot of 2,500 connections would otherwise hold all their decoded metadata at once
    /// (memory). The parts come before the diff holding these connections' traffic (their flows carry all
    /// their bytes), so the writer sees them first. The raw JSON of each new connection is freed once decoded.
    pub fn apply_in_parts(
        &mut self,
        snap: &Snapshot,
        at_ms: i64,
        max_opened: usize,
        part: &mut dyn FnMut(ConnectionDiff),
    ) -> ConnectionDiff {
        let mut diff = ConnectionDiff {
            at_ms,
            ..ConnectionDiff::default()
        };
        self.check_totals(snap, &mut diff);
        let fresh = std::mem::take(&mut self.fresh);
        self.generation += 1;
        let gen = self.generation;

        for e in &snap.connections {
            if let Some(t) = self.open.get_mut(&e.key) {
                t.seen_again(e, gen, at_ms, &mut diff.flows);
            } else if let Some((before, closed_ms)) = self.recently_closed.remove(&e.key) {
                self.reopen(e, before, closed_ms, gen, &mut diff);
            } else {
                self.open_new(e, gen, &mut diff);
                if diff.opened.len() >= max_opened {
                    hand_over_opened(&mut diff, part);
                }
            }
        }

        self.close_missing(gen, fresh, &mut diff);
        if self.generation % 64 == 0 {
            self.recently_closed
                .retain(|_, (_, closed)| *closed > at_ms - REOPEN_WINDOW_MS);
        }
        diff
    }

    /// Keeps the core's totals; when they went down the core restarted, and everything open is closed.
    fn check_totals(&mut self, snap: &Snapshot, diff: &mut ConnectionDiff) {
        let core_restarted = match (self.totals, snap.download_total, snap.upload_total) {
            (Some((d, u)), Some(d2), Some(u2)) => d2 < d || u2 < u,
            _ => false,
        };
        if let (Some(d), Some(u)) = (snap.download_total, snap.upload_total) {
            self.totals = Some((d, u));
        }
        if core_restarted {
            crate::info!(
                "collector: mihomo restarted (totals went down); closing {} connections",
                self.open.len()
            );
            self.close_all(diff);
        }
    }

    /// An id closed within [`REOPEN_WINDOW_MS`] is back: it is open again, its bytes continuing from where
    /// they were.
    fn reopen(
        &mut self,
        e: &Entry,
        before: Bytes,
        closed_ms: i64,
        gen: u64,
        diff: &mut ConnectionDiff,
    ) {
        let at_ms = diff.at_ms;
        let id = e.id();
        let bytes = Bytes {
            upload: before.upload.max(e.bytes.upload),
            download: before.download.max(e.bytes.download),
        };
        let delta = Bytes {
            upload: bytes.upload - before.upload,
            download: bytes.download - before.download,
        };
        crate::debug!("reopened {id}: it was missing from a snapshot but is back");
        diff.reopened.push(id.to_string());
        if delta != Bytes::default() {
            diff.flows.push(Flow {
                id: id.to_string(),
                totals: bytes,
                delta,
                from_ms: closed_ms,
                to_ms: at_ms.max(closed_ms),
            });
        }
        let tracked = Tracked {
            bytes,
            last_seen_ms: at_ms.max(closed_ms),
            start_ms: closed_ms,
            label: "".into(),
            generation: gen,
        };
        self.open.insert(e.key.clone(), tracked);
    }

    /// A connection never seen before: its metadata decoded (and its raw JSON freed), its bytes so far a
    /// flow from its start.
    fn open_new(&mut self, e: &Entry, gen: u64, diff: &mut ConnectionDiff) {
        let at_ms = diff.at_ms;
        let id = e.id();
        let mut meta = e.meta(at_ms);
        e.forget_raw();
        // A connection cannot start after we first see it: a start in our future (our clock went
        // back, or the core's clock runs ahead of ours) becomes now, so that its bytes and end are
        // never put before its start, and never piled into one minute ahead of the present.
        meta.start_ms = meta.start_ms.min(at_ms);
        let debug = crate::log::enabled(crate::log::Level::Debug);
        if debug {
            log_opened(&meta);
        }
        // only the debug log names it (memory: nothing per connection otherwise)
        let label: Box<str> = if !debug {
            "".into()
        } else if meta.host.is_empty() {
            meta.destination_ip.as_str().into()
        } else {
            meta.host.as_str().into()
        };
        let tracked = Tracked {
            bytes: e.bytes,
            last_seen_ms: at_ms,
            start_ms: meta.start_ms,
            label,
            generation: gen,
        };
        if e.bytes != Bytes::default() {
            diff.flows.push(Flow {
                id: id.to_string(),
                totals: e.bytes,
                delta: e.bytes,
                from_ms: meta.start_ms,
                to_ms: at_ms,
            });
        }
        diff.opened.push((meta, e.bytes));
        self.open.insert(e.key.clone(), tracked);
    }

    /// Closes what this push (generation `gen`) did not show: at the push's time, or at its last sight when
    /// the push is the first after the stream was lost.
    fn close_missing(&mut self, gen: u64, fresh: bool, diff: &mut ConnectionDiff) {
        let at_ms = diff.at_ms;
        let missing: Vec<IdKey> = self
            .open
            .iter()
            .filter(|(_, t)| t.generation != gen)
            .map(|(id, _)| id.clone())
            .collect();
        for id in missing {
            if let Some(t) = self.open.remove(&id) {
                let end_ms = if fresh {
                    t.last_seen_ms
                } else {
                    at_ms.max(t.last_seen_ms)
                };
                self.close(id, t, end_ms, diff);
            }
        }
    }

    fn close_all(&mut self, diff: &mut ConnectionDiff) {
        for (id, t) in std::mem::take(&mut self.open) {
            let end = t.last_seen_ms;
            self.close(id, t, end, diff);
        }
    }

    fn close(&mut self, key: IdKey, t: Tracked, end_ms: i64, diff: &mut ConnectionDiff) {
        let id = key.to_string();
        if crate::log::enabled(crate::log::Level::Debug) {
            let label = if t.label.is_empty() { &*id } else { &*t.label };
            crate::debug!(
                "closed {id} {label} up {} down {} after {}",
                human_bytes(t.bytes.upload),
                human_bytes(t.bytes.download),
                human_duration(end_ms - t.start_ms)
            );
        }
        diff.closed.push(Closed {
            id: id.to_string(),
            end_ms,
            totals: t.bytes,
        });
        self.recently_closed.insert(key, (t.bytes, end_ms));
    }
}

impl Tracked {
    /// An open connection in push `gen`: its byte deltas become a flow (counters that went down are
    /// ignored); a duplicate id within one push only lets larger counters through.
    fn seen_again(&mut self, e: &Entry, gen: u64, at_ms: i64, flows: &mut Vec<Flow>) {
        let key = &e.key;
        if self.generation == gen {
            crate::debug!("duplicate id {key} in one push; the larger counters win");
            if e.bytes.upload <= self.bytes.upload && e.bytes.download <= self.bytes.download {
                return;
            }
        } else if e.bytes.upload < self.bytes.upload || e.bytes.download < self.bytes.download {
            crate::debug!(
                "counters of {key} went down (up {} -> {}, down {} -> {}); keeping the larger",
                self.bytes.upload,
                e.bytes.upload,
                self.bytes.download,
                e.bytes.download
            );
        }
        let delta = Bytes {
            upload: e.bytes.upload.saturating_sub(self.bytes.upload),
            download: e.bytes.download.saturating_sub(self.bytes.download),
        };
        self.bytes.upload = self.bytes.upload.max(e.bytes.upload);
        self.bytes.download = self.bytes.download.max(e.bytes.download);
        if delta != Bytes::default() {
            crate::trace!("traffic {key} +{}/+{}", delta.upload, delta.download);
            flows.push(Flow {
                // the only copy of the id a known connection costs (see Entry::id)
                id: e.id().into_owned(),
                totals: self.bytes,
                delta,
                from_ms: self.last_seen_ms,
                // the clock went back: not before the minute already written
                to_ms: at_ms.max(self.last_seen_ms),
            });
        }
        if self.generation != gen {
            self.last_seen_ms = self.last_seen_ms.max(at_ms);
            self.generation = gen;
        }
    }
}

/// Hands the connections opened so far to the caller as a diff of their own.
fn hand_over_opened(diff: &mut ConnectionDiff, part: &mut dyn FnMut(ConnectionDiff)) {
    let mut opened = std::mem::take(&mut diff.opened);
    // A part may be committed before the rest of the diff: its rows start at zero bytes, and the
    // flows that follow raise them with their traffic, so that every commit keeps a row's bytes
    // equal to the sum of its traffic.
    for (_, bytes) in &mut opened {
        *bytes = Bytes::default();
    }
    part(ConnectionDiff {
        at_ms: diff.at_ms,
        opened,
        ..ConnectionDiff::default()
    });
}

/// The debug line of a new connection.
fn log_opened(meta: &ConnMeta) {
    let dest = if meta.host.is_empty() {
        &meta.destination_ip
    } else {
        &meta.host
    };
    let rule = if meta.rule_payload.is_empty() {
        meta.rule.clone()
    } else {
        format!("{}({})", meta.rule, meta.rule_payload)
    };
    crate::debug!(
        "opened {} {}:{} -> {}:{} rule {} via {}",
        meta.network,
        meta.source_ip,
        meta.source_port,
        dest,
        meta.destination_port,
        rule,
        meta.chains
    );
}

/// `1.5 MiB`-style sizes for the log.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// `1h02m03s`-style durations for the log.
pub fn human_duration(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..=59 => format!("{}.{:01}s", s, ms.max(0) % 1000 / 100),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mihomo::snapshot::parse;

    #[test]
    fn ids_keep_their_exact_text() {
        for id in [
            "3f0c6c2e-8b1d-4f5e-9a57-6b2d0e4c7a91",
            "00000000-0000-0000-0000-000000000000",
            "3F0C6C2E-8B1D-4F5E-9A57-6B2D0E4C7A91",
            "3f0c6c2e-8b1d-4f5e-9a57-6b2d0e4c7a9g",
            "3f0c6c2e88b1d-4f5e-9a57-6b2d0e4c7a91",
            "a",
            "ünï😀",
        ] {
            assert_eq!(IdKey::new(id).to_string(), id);
        }
        assert!(matches!(
            IdKey::new("3f0c6c2e-8b1d-4f5e-9a57-6b2d0e4c7a91"),
            IdKey::Uuid(_)
        ));
        assert!(matches!(
            IdKey::new("3F0C6C2E-8B1D-4F5E-9A57-6B2D0E4C7A91"),
            IdKey::Text(_)
        ));
    }

    /// The start of every connection when the test's clock reads a real date; tests counting from 0 leave
    /// `start` out, and first sight stands in for it.
    const START: &str = "2026-01-01T00:00:00Z";

    fn frame(totals: u64, conns: &[(&str, u64, u64)], start: bool) -> Vec<u8> {
        let start = if start {
            format!(r#""start":"{START}","#)
        } else {
            String::new()
        };
        let list: Vec<String> = conns
            .iter()
            .map(|(id, up, down)| {
                format!(r#"{{"id":"{id}","upload":{up},"download":{down},{start}"metadata":{{"host":"{id}.example"}}}}"#)
            })
            .collect();
        format!(
            r#"{{"downloadTotal":{totals},"uploadTotal":{totals},"connections":[{}]}}"#,
            list.join(",")
        )
        .into_bytes()
    }

    fn apply(t: &mut Tracker, totals: u64, conns: &[(&str, u64, u64)], at: i64) -> ConnectionDiff {
        let f = frame(totals, conns, at >= 1_000_000_000_000);
        let s = parse(&f).unwrap();
        t.apply(&s, at)
    }

    #[test]
    fn new_connections_come_in_parts_at_zero_bytes_and_their_flows_carry_the_bytes() {
        let mut t = Tracker::new(Vec::new());
        let f = frame(
            0,
            &[
                ("a", 1, 2),
                ("b", 3, 4),
                ("c", 0, 0),
                ("d", 5, 6),
                ("e", 7, 8),
            ],
            false,
        );
        let s = parse(&f).unwrap();
        let mut parts = Vec::new();
        let d = t.apply_in_parts(&s, 1000, 2, &mut |p| parts.push(p));
        assert_eq!(parts.len(), 2);
        for p in &parts {
            assert_eq!(p.opened.len(), 2);
            assert!(p.flows.is_empty() && p.closed.is_empty() && p.reopened.is_empty());
            assert!(p.opened.iter().all(|(_, b)| *b == Bytes::default()));
        }
        let ids: Vec<&str> = parts
            .iter()
            .chain([&d])
            .flat_map(|p| p.opened.iter().map(|(m, _)| m.id.as_str()))
            .collect();
        assert_eq!(ids, ["a", "b", "c", "d", "e"]);
        assert_eq!(
            d.opened[0].1,
            Bytes {
                upload: 7,
                download: 8
            }
        );
        let flows: Vec<(&str, u64, u64)> = d
            .flows
            .iter()
            .map(|f| (f.id.as_str(), f.delta.upload, f.totals.download))
            .collect();
        assert_eq!(flows, [("a", 1, 2), ("b", 3, 4), ("d", 5, 6), ("e", 7, 8)]);
        // the raw JSON is freed once decoded: nothing is left to decode
        assert_eq!(d.opened[0].0.host, "e.example");
        assert!(s.connections.iter().all(|e| e.meta(0).host.is_empty()));
    }

    fn ids_closed(d: &ConnectionDiff) -> Vec<(String, i64, u64)> {
        let mut v: Vec<_> = d
            .closed
            .iter()
            .map(|c| (c.id.clone(), c.end_ms, c.totals.download))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn open_grow_close() {
        let mut t = Tracker::new(vec![]);
        let d = apply(&mut t, 10, &[("a", 1, 10), ("b", 0, 0)], 1000);
        assert_eq!(d.opened.len(), 2);
        assert_eq!(d.flows.len(), 1); // b moved no bytes yet
        assert_eq!(
            d.flows[0].delta,
            Bytes {
                upload: 1,
                download: 10
            }
        );
        let d = apply(&mut t, 20, &[("a", 2, 30), ("b", 5, 5)], 2000);
        assert!(d.opened.is_empty());
        let deltas: Vec<_> = d
            .flows
            .iter()
            .map(|f| (f.id.as_str(), f.delta, f.from_ms, f.to_ms))
            .collect();
        assert_eq!(
            deltas,
            [
                (
                    "a",
                    Bytes {
                        upload: 1,
                        download: 20
                    },
                    1000,
                    2000
                ),
                (
                    "b",
                    Bytes {
                        upload: 5,
                        download: 5
                    },
                    1000,
                    2000
                )
            ]
        );
        let d = apply(&mut t, 30, &[("b", 5, 5)], 3000);
        assert_eq!(ids_closed(&d), [("a".to_string(), 3000, 30)]);
        assert!(d.flows.is_empty());
        assert_eq!(t.open_count(), 1);
    }

    #[test]
    fn counters_going_down_are_not_negative_and_not_recounted() {
        let mut t = Tracker::new(vec![]);
        apply(&mut t, 10, &[("a", 5, 100)], 1000);
        let d = apply(&mut t, 11, &[("a", 5, 40)], 2000);
        assert!(d.flows.is_empty());
        let d = apply(&mut t, 12, &[("a", 5, 120)], 3000);
        assert_eq!(
            d.flows[0].delta,
            Bytes {
                upload: 0,
                download: 20
            }
        );
    }

    #[test]
    fn duplicate_ids_count_once() {
        let mut t = Tracker::new(vec![]);
        let d = apply(&mut t, 10, &[("a", 1, 10), ("a", 1, 10)], 1000);
        assert_eq!((d.opened.len(), d.flows.len()), (1, 1));
        let d = apply(&mut t, 10, &[("a", 1, 20), ("a", 1, 30)], 2000);
        let total: u64 = d.flows.iter().map(|f| f.delta.download).sum();
        assert_eq!(total, 20);
    }

    #[test]
    fn core_restart_closes_everything_at_last_seen() {
        let mut t = Tracker::new(vec![]);
        apply(&mut t, 1000, &[("a", 1, 10), ("b", 1, 10)], 1000);
        apply(&mut t, 2000, &[("a", 1, 20), ("b", 1, 10)], 2000);
        let d = apply(&mut t, 5, &[("c", 0, 5)], 3000);
        assert_eq!(
            ids_closed(&d),
            [("a".into(), 2000, 20), ("b".into(), 2000, 10)]
        );
        assert_eq!(d.opened.len(), 1);
    }

    #[test]
    fn reconnect_closes_missing_at_last_seen() {
        let mut t = Tracker::new(vec![]);
        apply(&mut t, 10, &[("a", 1, 10), ("b", 1, 10)], 1000);
        t.stream_lost();
        let d = apply(&mut t, 20, &[("a", 1, 15)], 9000);
        assert_eq!(ids_closed(&d), [("b".into(), 1000, 10)]);
        assert_eq!(d.flows[0].delta.download, 5);
        assert_eq!((d.flows[0].from_ms, d.flows[0].to_ms), (1000, 9000));
    }

    #[test]
    fn tracker_restart_resumes_from_stored_bytes() {
        let stored = vec![
            OpenRow {
                id: "a".into(),
                totals: Bytes {
                    upload: 1,
                    download: 100,
                },
                last_updated_ms: 500,
            },
            OpenRow {
                id: "gone".into(),
                totals: Bytes {
                    upload: 1,
                    download: 7,
                },
                last_updated_ms: 400,
            },
        ];
        let mut t = Tracker::new(stored);
        let d = apply(&mut t, 10, &[("a", 1, 150), ("new", 0, 3)], 5000);
        assert_eq!(d.opened.len(), 1);
        assert_eq!(d.opened[0].0.id, "new");
        let a = d.flows.iter().find(|f| f.id == "a").unwrap();
        assert_eq!(
            (a.delta.download, a.from_ms, a.totals.download),
            (50, 500, 150)
        );
        assert_eq!(ids_closed(&d), [("gone".into(), 400, 7)]);
    }

    #[test]
    fn empty_snapshot_then_back_reopens_without_double_counting() {
        let mut t = Tracker::new(vec![]);
        apply(&mut t, 10, &[("a", 1, 10)], 1000);
        let d = apply(&mut t, 10, &[], 2000);
        assert_eq!(ids_closed(&d), [("a".into(), 2000, 10)]);
        let d = apply(&mut t, 12, &[("a", 1, 12)], 3000);
        assert_eq!(d.reopened, ["a"]);
        assert!(d.opened.is_empty());
        assert_eq!(
            d.flows[0].delta,
            Bytes {
                upload: 0,
                download: 2
            }
        );
    }

    #[test]
    fn a_clock_jumping_back_puts_nothing_before_what_was_seen() {
        let start = crate::timefmt::parse_rfc3339(START).unwrap();
        let hour = 3_600_000;
        let mut t = Tracker::new(vec![]);
        apply(&mut t, 10, &[("a", 1, 10), ("b", 1, 1)], start + hour);
        // two hours back: a's bytes land where it was last seen, b closes no earlier than that
        let d = apply(&mut t, 20, &[("a", 2, 30)], start - hour);
        assert_eq!(
            (d.flows[0].from_ms, d.flows[0].to_ms),
            (start + hour, start + hour)
        );
        assert_eq!(ids_closed(&d), [("b".into(), start + hour, 1)]);
        // first seen while our clock reads before its start: it started when we first saw it
        let mut t = Tracker::new(vec![]);
        let d = apply(&mut t, 10, &[("c", 1, 10)], start - hour);
        assert_eq!(d.opened[0].0.start_ms, start - hour);
        assert_eq!(
            (d.flows[0].from_ms, d.flows[0].to_ms),
            (start - hour, start - hour)
        );
        let d = apply(&mut t, 10, &[], start - hour + 1000);
        assert_eq!(ids_closed(&d), [("c".into(), start - hour + 1000, 10)]);
    }

    #[test]
    fn first_sight_bytes_flow_from_start() {
        let mut t = Tracker::new(vec![]);
        let start = crate::timefmt::parse_rfc3339(START).unwrap();
        let d = apply(&mut t, 10, &[("a", 1, 10)], start + 3 * 3_600_000);
        assert_eq!(
            (d.flows[0].from_ms, d.flows[0].to_ms),
            (start, start + 3 * 3_600_000)
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_duration(3_723_000), "1h02m03s");
        assert_eq!(human_duration(61_000), "1m01s");
    }
}

#[cfg(test)]
mod perf {
    use super::*;

    /// `cargo test --release --lib perf_probe -- --ignored --nocapture`: a quick look, not a figure (see `make bench`).
    #[test]
    #[ignore]
    fn perf_probe() {
        let one = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/frames/mihomo.wire.txt"
        ))
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&one).unwrap();
        let conn = v["connections"][0].to_string();
        let mk = |k: u64| {
            let list: Vec<String> = (0..10_000)
                .map(|i| {
                    conn.replace(
                        "3f0c6c2e-8b1d-4f5e-9a57-6b2d0e4c7a91",
                        &format!("id-{i:08}"),
                    )
                    .replace(
                        "\"download\":4718392",
                        &format!("\"download\":{}", 4718392 + k * i),
                    )
                })
                .collect();
            format!(
                r#"{{"downloadTotal":1,"uploadTotal":1,"connections":[{}],"memory":0}}"#,
                list.join(",")
            )
        };
        let f0 = mk(0);
        let mut t = Tracker::new(vec![]);
        let s = std::time::Instant::now();
        let snap = crate::mihomo::snapshot::parse(f0.as_bytes()).unwrap();
        let d = t.apply(&snap, 1000);
        eprintln!(
            "first: {} bytes, {} opened, {:?}",
            f0.len(),
            d.opened.len(),
            s.elapsed()
        );
        // CPU time of this thread (ns), immune to other processes on a busy machine
        let cpu = || -> u64 {
            let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
            s.split_whitespace().next().unwrap().parse().unwrap()
        };
        let frames: Vec<String> = (1..11).map(mk).collect();
        let (mut parse_ns, mut total_ns) = (0, 0);
        for (k, f) in frames.iter().enumerate() {
            let c0 = cpu();
            let snap = crate::mihomo::snapshot::parse(f.as_bytes()).unwrap();
            let c1 = cpu();
            let d = t.apply(&snap, 2000 + k as i64 * 1000);
            drop(d);
            drop(snap);
            let c2 = cpu();
            parse_ns += c1 - c0;
            total_ns += c2 - c0;
        }
        eprintln!(
            "steady (cpu): parse {:.1} ms, parse+diff {:.1} ms per frame",
            parse_ns as f64 / 1e7,
            total_ns as f64 / 1e7
        );
    }
}
