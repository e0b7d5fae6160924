//! What the fuzz targets run, shared with the stable corpus replay (`tests/it/fuzz_corpus.rs` includes this
//! file), so the corpus is checked by `make test` through exactly the code the fuzzers drive.
//!
//! - [`mihomo::snapshot`]: the input is a stream of mihomo frames separated by `0xFF` bytes. Each goes through
//!   [`snapshot::parse`], every entry is decoded ([`Entry::meta`]) and the [`Tracker`] diffs it. Besides "no
//!   panic", the byte bookkeeping must hold: every flow continues its id's totals exactly
//!   (`before + delta == totals`), and a close reports at most what was counted.
//! - [`params`]: the input is a query string. It goes through [`Params::parse`] and every typed accessor, then
//!   through the real handler of each GET endpoint on a small database: never a `5xx`, never a panic.

use mct::api::handler::{handle, ApiRequest, Ctx};
use mct::api::params::{self, ConnState, Filters, Format, Match, Order, Params, Where};
use mct::mihomo::diff::Tracker;
use mct::mihomo::snapshot::{self, Entry};
use mct::model::{Bytes, Closed, ConnMeta, ConnectionDiff, Flow};
use mihomo_connections_tracker as mct;
use std::collections::HashMap;
use std::path::PathBuf;

/// 2025-04-28T10:00:00Z: frames "arrive" one second apart from here.
const T0: i64 = 1_745_834_400_000;

/// Runs one input of the `snapshot` target.
pub fn snapshot(data: &[u8]) {
    mct::log::set_level(mct::log::Level::Error);
    let mut tracker = Tracker::new(Vec::new());
    let mut counted: HashMap<String, Bytes> = HashMap::new();
    let mut at = T0;
    for piece in data.split(|&b| b == 0xff) {
        // A leading `!` means the stream was lost before this frame; `~` that it comes much later (past the
        // reopen window).
        let mut piece = piece;
        while let Some((&c, rest)) = piece.split_first() {
            match c {
                b'!' => tracker.stream_lost(),
                b'~' => at += 3 * mct::mihomo::diff::REOPEN_WINDOW_MS,
                _ => break,
            }
            piece = rest;
        }
        at += 1000;
        let Ok(snap) = snapshot::parse(piece) else {
            continue;
        };
        for e in &snap.connections {
            let id = e.id();
            assert!(!id.is_empty() && id.len() <= 256, "id {id:?}");
            let meta: ConnMeta = Entry::meta(e, at);
            assert_eq!(meta.id, id);
        }
        let diff = tracker.apply(&snap, at);
        check(&diff, &mut counted);
    }
}

fn check(diff: &ConnectionDiff, counted: &mut HashMap<String, Bytes>) {
    for (meta, bytes) in &diff.opened {
        // a new row: its bytes arrive in `flows`, from zero
        counted.insert(meta.id.clone(), Bytes::default());
        let _ = bytes;
    }
    for Flow {
        id,
        totals,
        delta,
        from_ms,
        to_ms,
    } in &diff.flows
    {
        let before = counted.entry(id.clone()).or_default();
        assert_eq!(
            (
                before.upload.checked_add(delta.upload),
                before.download.checked_add(delta.download)
            ),
            (Some(totals.upload), Some(totals.download)),
            "flow of {id}: {before:?} + {delta:?} != {totals:?}"
        );
        assert!(
            from_ms <= to_ms,
            "flow of {id} runs backwards: {from_ms} > {to_ms}"
        );
        *before = *totals;
    }
    for Closed { id, totals, .. } in &diff.closed {
        let c = counted.get(id).copied().unwrap_or_default();
        assert!(
            totals.upload <= c.upload && totals.download <= c.download,
            "{id} closed with {totals:?}, more than counted {c:?}"
        );
    }
}

/// A small database for [`params`]: one connection full of characters that need escaping in JSON and CSV.
pub struct Fixture {
    dir: PathBuf,
    read: rusqlite::Connection,
    rollups: bool,
}

impl Fixture {
    /// Builds it under `dir` (created; removed on drop).
    pub fn new(dir: PathBuf) -> Fixture {
        mct::log::set_level(mct::log::Level::Error);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fuzz.db");
        let conn = mct::store::open(&path, mct::store::Access::Write).unwrap();
        let w = mct::store::Writer::new(conn, mct::store::WriterConfig::default()).unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let writer = std::thread::spawn(move || w.run(rx));
        let bytes = Bytes {
            upload: 300,
            download: 6_000,
        };
        for (i, (host, closed)) in [("ex\"am,ple\n.com", true), ("😀.例え.jp'--", false)]
            .into_iter()
            .enumerate()
        {
            let id = format!("c{i}");
            let meta = ConnMeta {
                id: id.clone(),
                start_ms: T0,
                network: "tcp".into(),
                host: host.into(),
                destination_ip: "203.0.113.7".into(),
                destination_geoip: "[\"us\"]".into(),
                process: "a \"b\", c".into(),
                chains: "[\"Proxy\",\"HK\"]".into(),
                rule: "DomainSuffix".into(),
                rule_payload: host.into(),
                ..ConnMeta::default()
            };
            let diff = ConnectionDiff {
                at_ms: T0 + 120_000,
                opened: vec![(meta, Bytes::default())],
                flows: vec![Flow {
                    id: id.clone(),
                    totals: bytes,
                    delta: bytes,
                    from_ms: T0,
                    to_ms: T0 + 120_000,
                }],
                closed: closed
                    .then_some(Closed {
                        id,
                        end_ms: T0 + 120_000,
                        totals: bytes,
                    })
                    .into_iter()
                    .collect(),
                ..ConnectionDiff::default()
            };
            tx.send(mct::store::WriteCmd::Diff(diff)).unwrap();
        }
        drop(tx);
        writer.join().unwrap().unwrap();
        let read = mct::store::open(&path, mct::store::Access::Read).unwrap();
        let rollups = mct::api::rollup::has_rollups(&read);
        Fixture { dir, read, rollups }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The GET endpoints a query string can reach.
const PATHS: [&str; 7] = [
    "/api/v1/stats",
    "/api/v1/connections",
    "/api/v1/filter-options",
    "/api/v1/agents",
    "/api/v1/agents/router/status",
    "/api/v1/metrics",
    "/api/v1/health",
];

/// Runs one input of the `params` target against `fx`.
pub fn params(fx: &Fixture, data: &[u8]) {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let _ = params::percent_decode(query);
    let _ = params::parse_time_lenient(query);
    if let Ok(p) = Params::parse(query) {
        for name in [
            "from", "to", "limit", "offset", "type", "group_by", "interval", "metric",
        ] {
            let _ = p.time(name);
            let _ = p.uint(name, 100, 1, params::MAX_ROWS);
            let _ = p.flag(name);
            if let Some(v) = p.get(name) {
                let _ = params::parse_time_lenient(v);
                let _ = mct::timefmt::Interval::parse(v);
                let _ = params::clip(v);
            }
        }
        let _ = (Order::parse(&p), Format::parse(&p), ConnState::parse(&p));
        let _ = mct::api::stats::parse_dims(&p);
        if let Ok(f) = Filters::parse(&p) {
            for m in [Match::Exact, Match::Substring] {
                let w = Where::from_filters(&f, m);
                // one `?` per bound value: the values never reach the SQL text
                assert_eq!(w.sql().matches('?').count(), w.values.len(), "{query}");
            }
        }
    }
    let ctx = Ctx {
        db: &fx.read,
        rollups: fx.rollups,
        token: None,
        writer: None,
        now_ms: T0 + 3_600_000,
        devices: None,
        metrics: None,
    };
    for path in PATHS {
        let req = ApiRequest {
            method: "GET",
            path,
            query,
            body: b"",
            authorization: None,
        };
        let reply = handle(&ctx, &req);
        assert!(
            reply.status < 500,
            "GET {path}?{query}: {} {}",
            reply.status,
            reply.text()
        );
    }
}
