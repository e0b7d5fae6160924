//! The master's side of `POST /api/v1/sync`: decoding and validating one batch of an agent's connection
//! records, and handing it to the writer.
//!
//! The HTTP layer calls [`handle_sync`] from a worker thread. The whole body is parsed and validated there
//! (nothing touches the database for a bad batch), then the batch travels to the writer thread as a
//! [`WriteCmd::Grouped`](crate::store::WriteCmd::Grouped) write: batches of several agents queued at the same
//! time share one transaction (one commit), and each is still all or nothing (a failed group is retried batch
//! by batch). The writer merges it with [`crate::store::merge::merge_batch`] (its module doc has the merge
//! rules: re-sending a batch changes nothing).
//!
//! # Wire format
//! Body: `{"agent_id": "...", "timestamp": "<RFC 3339>", "connections": [Record, ...]}`; `connections` may be
//! `null` or `[]` (an empty batch is a heartbeat: it still counts as a sync in table `agents`).
//!
//! A Record is the earlier tool's 33 fields (see `API-COMPAT.md` of the shared docs): `id` (required,
//! non-empty), `agent_id` (the row's agent; empty or missing means the batch's), `download`, `upload`
//! (non-negative integers), `start`, `last_updated` (RFC 3339, any offset, stored as UTC ms; one may stand in
//! for the other when missing), `uid`, `dscp` (integers) and strings for everything else (the metadata fields
//! under their wire names: [`crate::model::Field::wire`]); `chains` is a JSON array encoded as a string,
//! policy group first and exit node last. Missing or `null` optional fields take defaults (their column's);
//! unknown fields are ignored; a field of the wrong type is a `400` naming it (`connections[3].download`).
//!
//! Our own agents add:
//! - `end`: RFC 3339 or `null` (still open). Missing means "not known" (the earlier tool's agents).
//! - `rematch_name`, `provider_chains`, `node`, `policy` (strings; `node`/`policy` default to the ends of `chains`).
//! - `traffic`: `[[minute_start_unix_seconds, upload, download], ...]`, the bytes that flowed in each minute
//!   (the agent's `traffic` rows that changed since it last delivered this connection).

use crate::error::Result;
use crate::model::{Bytes, Field, Kind, RecordMeta, Span, ABSENT};
use crate::store::merge::{merge_batch, IngestBatch, IngestRow};
use crate::store::writer::is_storage_error;
use crate::store::WriterHandle;
use crate::timefmt::parse_rfc3339;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Set while batches fail for a full or failing disk: its error is logged once, not per batch.
static STORAGE_FAILING: AtomicBool = AtomicBool::new(false);

/// How long a sync request waits for the writer before answering `503`.
pub const WRITER_TIMEOUT: Duration = Duration::from_secs(30);

/// Indexes of a record's fields (and of its spans): its own fields, then the metadata fields (in [`Field`]
/// order, from [`f::META`]), then `traffic`.
mod f {
    use crate::model::Field;
    pub const ID: usize = 0;
    pub const AGENT_ID: usize = 1;
    pub const DOWNLOAD: usize = 2;
    pub const UPLOAD: usize = 3;
    pub const LAST_UPDATED: usize = 4;
    pub const START: usize = 5;
    pub const END: usize = 6;
    pub const META: usize = 7;
    pub const TRAFFIC: usize = META + Field::COUNT;
    pub const COUNT: usize = TRAFFIC + 1;
    // (a record's keys seen so far are a bit mask)
    const _: () = assert!(COUNT <= 64);

    /// The index of metadata field `field`.
    pub const fn meta(field: Field) -> usize {
        META + field as usize
    }
}

/// The body as it arrives; every field optional so that we, not serde, decide what is required.
/// `has_connections`: the key was there, even as `null` (an empty heartbeat, not a missing list).
struct WireBatch {
    agent_id: Option<String>,
    timestamp: Option<String>,
    connections: Option<Records>,
    has_connections: bool,
}

/// `connections`, validated while it is parsed (no list of raw records in between): the rows, or the first
/// record's validation error. That error is kept aside, not returned at once: a field of the wrong type
/// further on, and a bad `agent_id` or `timestamp`, are reported first, as they always were. A row without
/// its own `agent_id` has an empty one here: the batch's, which may come after the list, is put in at the end.
struct Records {
    rows: Vec<IngestRow>,
    error: Option<String>,
}

/// One record as it arrives, before validation. Parsed straight from the body without a `String` per field
/// (each one an allocation on the worker and a free on the writer, through musl's one allocator lock): every
/// text value, escapes resolved, is appended to `text` (a buffer kept across the records of a batch) and
/// `spans`, indexed like the record's fields ([`f`]), say where; the integer metadata fields are in `ints`
/// (by [`Field`]). Validation packs the metadata into one allocation of its exact size. The times stay text
/// until validation, which names a bad one.
struct WireRecord {
    text: String,
    spans: [Span; f::COUNT],
    ints: [Option<i64>; Field::COUNT],
    download: Option<u64>,
    upload: Option<u64>,
    traffic: Option<Vec<(i64, u64, u64)>>,
}

fn span_text(text: &str, (a, b): Span) -> Option<&str> {
    (a != u32::MAX).then(|| &text[a as usize..b as usize])
}

impl WireRecord {
    fn get(&self, field: usize) -> Option<&str> {
        span_text(&self.text, self.spans[field])
    }
}

/// A map key, told to `0` as the index its name has in a list (`None`: unknown, ignored). Keys are matched
/// without allocating, escapes or not.
struct KeySeed<F>(F);

impl<'de, F: FnOnce(&str) -> Option<usize>> DeserializeSeed<'de> for KeySeed<F> {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_identifier(self)
    }
}

impl<'de, F: FnOnce(&str) -> Option<usize>> Visitor<'de> for KeySeed<F> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
        Ok((self.0)(v))
    }
}

/// A string or `null` appended to a record's text; gives its span.
struct TextSeed<'s>(&'s mut String);

impl<'de> DeserializeSeed<'de> for TextSeed<'_> {
    type Value = Span;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Span, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for TextSeed<'_> {
    type Value = Span;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string")
    }
    fn visit_none<E: de::Error>(self) -> std::result::Result<Span, E> {
        Ok(ABSENT)
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<Span, E> {
        Ok(ABSENT)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Span, D::Error> {
        d.deserialize_str(self)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Span, E> {
        // (a body of 4 GiB cannot come in: request bodies are limited far below)
        let start = self.0.len() as u32;
        self.0.push_str(v);
        Ok((start, self.0.len() as u32))
    }
}

const BATCH_FIELDS: [&str; 3] = ["agent_id", "timestamp", "connections"];

impl<'de> Deserialize<'de> for WireBatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_map(BatchVisitor)
    }
}

struct BatchVisitor;

impl<'de> Visitor<'de> for BatchVisitor {
    type Value = WireBatch;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a sync batch object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<WireBatch, A::Error> {
        let mut b = WireBatch {
            agent_id: None,
            timestamp: None,
            connections: None,
            has_connections: false,
        };
        let mut seen = [false; 3];
        while let Some(key) =
            map.next_key_seed(KeySeed(|k: &str| BATCH_FIELDS.iter().position(|n| *n == k)))?
        {
            let Some(key) = key else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            if std::mem::replace(&mut seen[key], true) {
                return Err(de::Error::duplicate_field(BATCH_FIELDS[key]));
            }
            match key {
                0 => b.agent_id = map.next_value()?,
                1 => b.timestamp = map.next_value()?,
                _ => {
                    b.has_connections = true;
                    b.connections = map.next_value_seed(RecordsSeed)?;
                }
            }
        }
        Ok(b)
    }
}

/// `connections`: `null` or an array of records.
struct RecordsSeed;

impl<'de> DeserializeSeed<'de> for RecordsSeed {
    type Value = Option<Records>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for RecordsSeed {
    type Value = Option<Records>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of connection records")
    }
    fn visit_none<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut out = Records {
            rows: Vec::new(),
            error: None,
        };
        let mut seed = RecordSeed {
            record: WireRecord {
                text: String::with_capacity(1024),
                spans: [ABSENT; f::COUNT],
                ints: [None; Field::COUNT],
                download: None,
                upload: None,
                traffic: None,
            },
            order: Vec::new(),
        };
        let mut i = 0;
        while seq.next_element_seed(&mut seed)?.is_some() {
            // after a bad record, the rest is only parsed (for a field of the wrong type)
            if out.error.is_none() {
                match validate_record(i, &mut seed.record) {
                    Ok(row) => out.rows.push(row),
                    Err(e) => {
                        out.error = Some(e);
                        out.rows = Vec::new();
                    }
                }
            }
            i += 1;
        }
        Ok(Some(out))
    }
}

/// Parses one record into `record`. Kept across the records of a batch: `record` (its text buffer),
/// `order` the fields of the previous record in the order they came (an agent sends every record's keys in
/// the same order, so a key is found with one comparison).
struct RecordSeed {
    record: WireRecord,
    order: Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for &mut RecordSeed {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for &mut RecordSeed {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a connection record object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        let r = &mut self.record;
        r.text.clear();
        r.spans = [ABSENT; f::COUNT];
        r.ints = [None; Field::COUNT];
        (r.download, r.upload, r.traffic) = (None, None, None);
        let mut seen = 0u64;
        let mut k = 0;
        loop {
            let hint = self.order.get(k).map(|&h| h as usize);
            let key = map.next_key_seed(KeySeed(|name: &str| match hint {
                Some(h) if RECORD_NAMES.get(h).is_some_and(|n| *n == name) => Some(h),
                _ => record_field(name),
            }))?;
            let Some(key) = key else { break };
            let tag = key.map_or(u8::MAX, |i| i as u8);
            match self.order.get_mut(k) {
                Some(h) => *h = tag,
                None => self.order.push(tag),
            }
            k += 1;
            let Some(i) = key else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            if seen & (1 << i) != 0 {
                return Err(de::Error::duplicate_field(RECORD_NAMES[i]));
            }
            seen |= 1 << i;
            match (i, RECORD_EXPECT[i]) {
                (f::DOWNLOAD, _) => r.download = map.next_value()?,
                (f::UPLOAD, _) => r.upload = map.next_value()?,
                (f::TRAFFIC, _) => r.traffic = map.next_value()?,
                // (the integer metadata fields)
                (_, Expect::Int) => r.ints[i - f::META] = map.next_value()?,
                _ => r.spans[i] = map.next_value_seed(TextSeed(&mut r.text))?,
            }
        }
        Ok(())
    }
}

/// The type each known field must have; used only to name the bad field when typed parsing fails.
#[derive(Clone, Copy)]
enum Expect {
    Str,
    UInt,
    Int,
    Traffic,
}

/// A record's own fields (indexes [`f::ID`] to [`f::END`]), by wire name; `traffic` and the metadata fields
/// ([`Field::wire`]) complete the list.
const OWN_FIELDS: [(&str, Expect); f::META] = [
    ("id", Expect::Str),
    ("agent_id", Expect::Str),
    ("download", Expect::UInt),
    ("upload", Expect::UInt),
    ("last_updated", Expect::Str),
    ("start", Expect::Str),
    ("end", Expect::Str),
];

/// Every record field's wire name, by index ([`f`]): the record's own, the metadata fields', `traffic`.
const RECORD_NAMES: [&str; f::COUNT] = {
    let mut names = [""; f::COUNT];
    let mut i = 0;
    while i < f::COUNT {
        names[i] = match i {
            f::TRAFFIC => "traffic",
            _ if i >= f::META => Field::WIRE[i - f::META],
            _ => OWN_FIELDS[i].0,
        };
        i += 1;
    }
    names
};

/// What each record field must be, by index.
const RECORD_EXPECT: [Expect; f::COUNT] = {
    let mut expect = [Expect::Str; f::COUNT];
    let mut i = 0;
    while i < f::COUNT {
        expect[i] = match i {
            f::TRAFFIC => Expect::Traffic,
            _ if i >= f::META => match Field::KINDS[i - f::META] {
                Kind::Int => Expect::Int,
                Kind::Text => Expect::Str,
            },
            _ => OWN_FIELDS[i].1,
        };
        i += 1;
    }
    expect
};

/// The record field named `name` (`None`: unknown, ignored).
fn record_field(name: &str) -> Option<usize> {
    RECORD_NAMES.iter().position(|n| *n == name)
}

/// Answers `POST /api/v1/sync`: `Ok` is the envelope's `data` (`{"count": N, "message": "..."}`), `Err` is the
/// HTTP status and a message naming the bad field. Blocks until the writer has committed the batch, at most
/// [`WRITER_TIMEOUT`].
pub fn handle_sync(
    body: &[u8],
    writer: &WriterHandle,
    now_ms: i64,
) -> std::result::Result<Value, (u16, String)> {
    let batch = parse_batch(body).map_err(|m| (400, m))?;
    let count = batch.rows.len();
    let agent = batch.agent_id.clone();
    let stored = store_grouped(writer, batch, now_ms);
    match stored {
        Ok(Ok(n)) => {
            if STORAGE_FAILING.swap(false, Ordering::Relaxed) {
                crate::info!("ingest: the database can be written again; storing batches");
            }
            crate::debug!("ingest: stored {n} connections from agent {agent}");
            Ok(serde_json::json!({
                "count": n,
                "message": format!("synced {n} connections"),
            }))
        }
        Ok(Err((e, true))) => {
            // logged once, not per batch: every agent retries every few seconds
            if !STORAGE_FAILING.swap(true, Ordering::Relaxed) {
                crate::error!("ingest: cannot store batches ({e}); answering 503 until the database can be written again");
            }
            crate::debug!("ingest: batch of {count} from agent {agent} not stored: {e}");
            Err((
                503,
                "the master's disk is full or failing: nothing was stored; retry later".into(),
            ))
        }
        Ok(Err((e, false))) => {
            crate::error!("ingest: batch of {count} from agent {agent} not stored: {e}");
            Err((500, "could not store the batch; nothing was stored".into()))
        }
        Err(e) => {
            crate::warn!("ingest: batch of {count} from agent {agent}: {e}");
            Err((503, "database busy; retry later".into()))
        }
    }
}

/// Hands a batch to the writer for group commit (it may share its transaction with other agents' batches
/// queued at the same time, each still all or nothing) and waits for the outcome, at most
/// [`WRITER_TIMEOUT`]. The outer error: the writer is gone or too slow; the inner: storing failed (why, and
/// whether the disk is full or failing: [`is_storage_error`]).
fn store_grouped(
    writer: &WriterHandle,
    batch: IngestBatch,
    now_ms: i64,
) -> Result<std::result::Result<usize, (String, bool)>> {
    let n = batch.rows.len();
    // The batch comes back with the outcome and is freed here, not on the writer thread (the bottleneck;
    // musl's allocator has one lock for every thread, and a batch is thousands of allocations).
    let batch = Arc::new(Mutex::new(Some(batch)));
    let back = Arc::clone(&batch);
    let (outcome, _batch) = writer.call_grouped(
        Box::new(move |conn| {
            match &*batch.lock().unwrap_or_else(PoisonError::into_inner) {
                Some(batch) => merge_batch(conn, batch, now_ms),
                None => Ok(()), // (not reached: `done` takes it after the last `apply`)
            }
        }),
        move |outcome| {
            let batch = back.lock().unwrap_or_else(PoisonError::into_inner).take();
            let outcome = outcome
                .map(|()| n)
                .map_err(|e| (e.to_string(), is_storage_error(e)));
            (outcome, batch)
        },
        WRITER_TIMEOUT,
    )?;
    Ok(outcome)
}

/// Parses and validates a sync body completely. The error names the bad field, e.g.
/// `connections[2].download: expected a non-negative integer`.
pub fn parse_batch(body: &[u8]) -> std::result::Result<IngestBatch, String> {
    // A UTF-8 body (all but a hostile one) is parsed as `str`, which spares serde_json checking every string
    // again; anything else the byte way, for the same error message.
    let parsed = match std::str::from_utf8(body) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(body),
    };
    let wire: WireBatch = match parsed {
        Ok(w) => w,
        Err(e) if e.is_syntax() || e.is_eof() || e.is_io() => {
            return Err(format!("body is not valid JSON: {e}"))
        }
        // Typed parsing says what is wrong but not where in words a user understands; walk the document to
        // name the field.
        Err(e) => return Err(explain_shape_error(body).unwrap_or_else(|| format!("body: {e}"))),
    };
    let agent_id = match wire.agent_id {
        Some(a) if !a.trim().is_empty() => a,
        Some(_) => return Err("agent_id: must not be empty".into()),
        None => return Err("agent_id: missing".into()),
    };
    if let Some(ts) = &wire.timestamp {
        if parse_rfc3339(ts).is_none() {
            return Err(format!("timestamp: not an RFC 3339 time: {ts:?}"));
        }
    }
    let mut rows = match wire.connections {
        Some(Records { error: Some(e), .. }) => return Err(e),
        Some(Records { rows, .. }) => rows,
        None if wire.has_connections => Vec::new(),
        None => return Err("connections: missing".into()),
    };
    for row in rows.iter_mut().filter(|r| r.agent_id.is_empty()) {
        row.agent_id.clone_from(&agent_id);
    }
    Ok(IngestBatch { agent_id, rows })
}

fn time_field(i: usize, name: &str, v: Option<&str>) -> std::result::Result<Option<i64>, String> {
    match v {
        None => Ok(None),
        Some(s) => parse_rfc3339(s)
            .map(Some)
            .ok_or_else(|| format!("connections[{i}].{name}: not an RFC 3339 time: {s:?}")),
    }
}

/// One end of `chains`: where it is in the record's text, or (escapes resolved) its own text.
enum ChainEnd {
    At(Span),
    Owned(String),
}

/// `chains` (at `span` in `text`) as (policy group, exit node): its first and last elements, `None` for an
/// empty list.
fn chain_ends(
    i: usize,
    text: &str,
    span: Span,
) -> std::result::Result<Option<(ChainEnd, ChainEnd)>, String> {
    let chains = span_text(text, span).unwrap_or("[]");
    let t = chains.trim();
    if t.is_empty() || t == "null" {
        return Ok(None);
    }
    let ends: ChainEnds = serde_json::from_str(t).map_err(|_| {
        format!(
            "connections[{i}].chains: not a JSON array of strings encoded as a string: {chains:?}"
        )
    })?;
    // a borrowed element is a slice of `text`: its span is where it starts in there
    let end = |c: Cow<'_, str>| match c {
        Cow::Borrowed(s) => {
            let at = (s.as_ptr() as usize - text.as_ptr() as usize) as u32;
            ChainEnd::At((at, at + s.len() as u32))
        }
        Cow::Owned(s) => ChainEnd::Owned(s),
    };
    Ok(ends.0.map(|(first, last)| (end(first), end(last))))
}

/// The first and last strings of a JSON array, borrowed from the input when they have no escapes.
struct ChainEnds<'a>(Option<(Cow<'a, str>, Cow<'a, str>)>);

impl<'de> Deserialize<'de> for ChainEnds<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_seq(ChainEndsVisitor)
    }
}

struct ChainEndsVisitor;

impl<'de> Visitor<'de> for ChainEndsVisitor {
    type Value = ChainEnds<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of strings")
    }
    fn visit_seq<A: SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Self::Value, A::Error> {
        let mut ends: Option<(Cow<'de, str>, Cow<'de, str>)> = None;
        while let Some(StrCow(s)) = seq.next_element()? {
            match &mut ends {
                None => ends = Some((s.clone(), s)),
                Some((_, last)) => *last = s,
            }
        }
        Ok(ChainEnds(ends))
    }
}

/// A string, borrowed from the input when it has no escapes.
struct StrCow<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for StrCow<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_str(StrCowVisitor)
    }
}

struct StrCowVisitor;

impl<'de> Visitor<'de> for StrCowVisitor {
    type Value = StrCow<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> std::result::Result<Self::Value, E> {
        Ok(StrCow(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
        Ok(StrCow(Cow::Owned(v.to_string())))
    }
}

/// Validates record `i`, parsed into `r`; its `agent_id` is left empty when it had none (the batch's).
fn validate_record(i: usize, r: &mut WireRecord) -> std::result::Result<IngestRow, String> {
    match r.get(f::ID) {
        Some(id) if !id.trim().is_empty() => {}
        Some(_) => return Err(format!("connections[{i}].id: must not be empty")),
        None => return Err(format!("connections[{i}].id: missing")),
    }
    let agent_id = match r.get(f::AGENT_ID) {
        Some(a) if !a.trim().is_empty() => a.to_string(),
        _ => String::new(),
    };
    let start = time_field(i, "start", r.get(f::START))?;
    let last = time_field(i, "last_updated", r.get(f::LAST_UPDATED))?;
    let end_ms = time_field(i, "end", r.get(f::END))?;
    let (start_ms, last_updated_ms) = match (start, last) {
        (Some(s), Some(l)) => (s, l),
        (Some(s), None) => (s, end_ms.unwrap_or(s).max(s)),
        (None, Some(l)) => (l, l),
        (None, None) => {
            return Err(format!(
                "connections[{i}].start: missing (and no last_updated to stand in)"
            ))
        }
    };
    fill_chain_ends(i, r)?;
    let traffic = validate_traffic(i, r.traffic.take())?;
    let meta = RecordMeta::new(
        &r.text,
        r.spans[f::ID],
        start_ms,
        &r.spans[f::META..f::TRAFFIC],
        &r.ints,
    );
    Ok(IngestRow {
        agent_id,
        meta,
        end_ms,
        last_updated_ms,
        totals: Bytes {
            upload: r.upload.unwrap_or(0),
            download: r.download.unwrap_or(0),
        },
        traffic,
    })
}

/// `node`/`policy` when sent and not empty, else the ends of `chains` (or empty).
fn fill_chain_ends(i: usize, r: &mut WireRecord) -> std::result::Result<(), String> {
    let ends = chain_ends(i, &r.text, r.spans[f::meta(Field::Chains)])?;
    for (field, end) in [(f::meta(Field::Policy), 0), (f::meta(Field::Node), 1)] {
        if r.get(field).is_some_and(|v| !v.is_empty()) {
            continue;
        }
        r.spans[field] = match &ends {
            None => ABSENT,
            Some(pair) => match if end == 0 { &pair.0 } else { &pair.1 } {
                ChainEnd::At(span) => *span,
                ChainEnd::Owned(s) => {
                    let at = r.text.len() as u32;
                    r.text.push_str(s);
                    (at, r.text.len() as u32)
                }
            },
        };
    }
    Ok(())
}

/// A record's `traffic` as `(minute index, bytes)`, each minute's start checked.
type Buckets = Option<Vec<(i64, Bytes)>>;

fn validate_traffic(
    i: usize,
    traffic: Option<Vec<(i64, u64, u64)>>,
) -> std::result::Result<Buckets, String> {
    let Some(t) = traffic else { return Ok(None) };
    for (j, (secs, _, _)) in t.iter().enumerate() {
        if secs.rem_euclid(60) != 0 {
            return Err(format!(
                "connections[{i}].traffic[{j}]: {secs} is not the start of a minute (Unix seconds divisible by 60)"
            ));
        }
    }
    // (the same size as the tuples: collected in place, no allocation)
    Ok(Some(
        t.into_iter()
            .map(|(secs, up, down)| {
                (
                    secs.div_euclid(60),
                    Bytes {
                        upload: up,
                        download: down,
                    },
                )
            })
            .collect(),
    ))
}

/// Finds the first field whose JSON type is wrong, for the error message. `None` when the document looks
/// right (the caller then falls back to serde's message).
fn explain_shape_error(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let Value::Object(top) = v else {
        return Some("body: expected a JSON object".into());
    };
    for key in ["agent_id", "timestamp"] {
        match top.get(key) {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(_) => return Some(format!("{key}: expected a string")),
        }
    }
    let list = match top.get("connections") {
        None | Some(Value::Null) => return None,
        Some(Value::Array(a)) => a,
        Some(_) => return Some("connections: expected an array".into()),
    };
    for (i, rec) in list.iter().enumerate() {
        let Value::Object(rec) = rec else {
            return Some(format!("connections[{i}]: expected an object"));
        };
        for field in 0..f::COUNT {
            let (name, kind) = (RECORD_NAMES[field], RECORD_EXPECT[field]);
            let Some(v) = rec.get(name) else { continue };
            if v.is_null() {
                continue;
            }
            let ok = match kind {
                Expect::Str => v.is_string(),
                Expect::UInt => v.is_u64(),
                Expect::Int => v.is_i64() || v.is_u64() && v.as_i64().is_some(),
                Expect::Traffic => {
                    if let Some(msg) = explain_traffic(i, v) {
                        return Some(msg);
                    }
                    true
                }
            };
            if !ok {
                let want = match kind {
                    Expect::Str => "a string",
                    Expect::UInt => "a non-negative integer",
                    Expect::Int => "an integer",
                    Expect::Traffic => "[[minute_unix_seconds, upload, download], ...]",
                };
                return Some(format!("connections[{i}].{name}: expected {want}, got {v}"));
            }
        }
    }
    None
}

fn explain_traffic(i: usize, v: &Value) -> Option<String> {
    let want = "expected [minute_unix_seconds, upload, download] (integers)";
    let Value::Array(list) = v else {
        return Some(format!(
            "connections[{i}].traffic: expected an array of [minute_unix_seconds, upload, download]"
        ));
    };
    for (j, e) in list.iter().enumerate() {
        let ok = matches!(e, Value::Array(t) if t.len() == 3 && t[0].is_i64() && t[1].is_u64() && t[2].is_u64());
        if !ok {
            return Some(format!("connections[{i}].traffic[{j}]: {want}, got {e}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ConnMeta, Metadata};
    use crate::store::merge::apply_batch;
    use rusqlite::Connection;

    /// The minute index of a millisecond time (the `traffic.minute` column).
    fn minute_of(ms: i64) -> i64 {
        ms.div_euclid(crate::timefmt::MINUTE_MS)
    }

    fn ok_body() -> serde_json::Value {
        serde_json::json!({
            "agent_id": "r1",
            "timestamp": "2026-11-29T08:00:00+08:00",
            "connections": [{
                "id": "c1", "upload": 10, "download": 20,
                "start": "2026-11-29T07:00:00+08:00", "last_updated": "2026-11-29T07:30:00+08:00",
                "chains": "[\"Proxy\",\"HK-01\"]", "uid": 0, "dscp": 0
            }]
        })
    }

    fn err_of(v: &serde_json::Value) -> String {
        parse_batch(&serde_json::to_vec(v).unwrap()).unwrap_err()
    }

    #[test]
    fn parses_times_to_utc_and_chain_ends() {
        let b = parse_batch(&serde_json::to_vec(&ok_body()).unwrap()).unwrap();
        let r = &b.rows[0];
        assert_eq!(r.agent_id, "r1");
        assert_eq!(
            r.meta.start_ms(),
            parse_rfc3339("2026-11-28T23:00:00Z").unwrap()
        );
        assert_eq!(r.last_updated_ms - r.meta.start_ms(), 30 * 60_000);
        assert_eq!(r.meta.text(Field::Policy), "Proxy");
        assert_eq!(r.meta.text(Field::Node), "HK-01");
        assert_eq!(r.meta.text(Field::SourceGeoip), "null");
        assert_eq!(r.end_ms, None);
        assert!(r.traffic.is_none());
    }

    #[test]
    fn bad_fields_are_named() {
        let cases: Vec<(&str, serde_json::Value, &str)> = vec![
            (
                "download",
                serde_json::json!("12"),
                "connections[0].download",
            ),
            ("download", serde_json::json!(-1), "connections[0].download"),
            ("uid", serde_json::json!("x"), "connections[0].uid"),
            ("host", serde_json::json!(5), "connections[0].host"),
            (
                "start",
                serde_json::json!("yesterday"),
                "connections[0].start",
            ),
            ("end", serde_json::json!("soon"), "connections[0].end"),
            ("id", serde_json::json!(""), "connections[0].id"),
            ("id", serde_json::json!(7), "connections[0].id"),
            (
                "chains",
                serde_json::json!("not json"),
                "connections[0].chains",
            ),
            (
                "traffic",
                serde_json::json!([[61, 1, 2]]),
                "connections[0].traffic[0]",
            ),
            (
                "traffic",
                serde_json::json!([[60, 1]]),
                "connections[0].traffic[0]",
            ),
            ("traffic", serde_json::json!(3), "connections[0].traffic"),
        ];
        for (field, value, want) in cases {
            let mut body = ok_body();
            body["connections"][0][field] = value.clone();
            let msg = err_of(&body);
            assert!(msg.starts_with(want), "{field}={value}: {msg}");
        }
        let mut body = ok_body();
        body["connections"][0].as_object_mut().unwrap().remove("id");
        assert_eq!(err_of(&body), "connections[0].id: missing");
        let mut body = ok_body();
        body.as_object_mut().unwrap().remove("agent_id");
        assert_eq!(err_of(&body), "agent_id: missing");
        let mut body = ok_body();
        body["agent_id"] = serde_json::json!(3);
        assert!(err_of(&body).starts_with("agent_id"));
        let mut body = ok_body();
        body.as_object_mut().unwrap().remove("connections");
        assert_eq!(err_of(&body), "connections: missing");
        let mut body = ok_body();
        body["connections"] = serde_json::json!({"a": 1});
        assert!(err_of(&body).starts_with("connections: expected an array"));
        let mut body = ok_body();
        body["timestamp"] = serde_json::json!("noon");
        assert!(err_of(&body).starts_with("timestamp"));
        assert!(parse_batch(b"{\"agent_id\":")
            .unwrap_err()
            .contains("not valid JSON"));
        assert!(parse_batch(b"[1,2]").unwrap_err().starts_with("body"));
    }

    #[test]
    fn an_agent_clock_behind_the_start_puts_no_bytes_before_it() {
        // the earlier tool's agents send no buckets: the master spreads the bytes up to last_updated, which
        // a clock that went back can put before the start
        let path = std::env::temp_dir().join(format!("mct-ingest-clock-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut conn = crate::store::open(&path, crate::store::Access::Write).unwrap();
        let mut body = ok_body();
        body["connections"][0]["last_updated"] = serde_json::json!("2026-11-29T05:00:00+08:00");
        let batch = parse_batch(&serde_json::to_vec(&body).unwrap()).unwrap();
        apply_batch(&mut conn, &batch, 0).unwrap();
        let (start, first, sum): (i64, i64, i64) = conn
            .query_row(
                "SELECT c.start_ms, min(t.minute), sum(t.download) FROM connections c JOIN traffic t ON t.conn = c.pk",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        drop(conn);
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", path.display()));
        }
        assert!(
            first >= minute_of(start),
            "bucket {first} before the start {start}"
        );
        assert_eq!(sum, 20);
    }

    /// The single-pass parser: keys in any order (and a different order from one record to the next),
    /// escapes in keys and values, unknown keys, nulls, chain ends with escapes, a duplicate key.
    #[test]
    fn records_parse_in_any_key_order_with_escapes_and_defaults() {
        let body = br#"{"connections":[
            {"id":"c1","start":"2026-01-01T00:00:00Z","host":"a\"b\u00e9","chains":"[\"P\\\"x\",\"mid\",\"N\u00e9\"]","extra":{"k":[1]}},
            {"host":"h2","extra":null,"st\u0061rt":"2026-01-01T00:00:00Z","id":"c2","chains":"[\"P\",\"N\"]","node":"","policy":"Pol",
             "source_geoip":null,"provider_chains":null,"agent_id":" ","uid":-3,"dscp":4},
            {"id":"c3","last_updated":"2026-01-01T00:01:00Z","agent_id":"other","chains":"[\"solo\"]"}
        ],"agent_id":"r1","unknown":[{"id":5}]}"#;
        let b = parse_batch(body).unwrap();
        let v: Vec<ConnMeta> = b.rows.iter().map(|r| r.meta.to_conn_meta()).collect();
        assert_eq!((v[0].id.as_str(), v[0].host.as_str()), ("c1", "a\"bé"));
        assert_eq!((v[0].policy.as_str(), v[0].node.as_str()), ("P\"x", "Né"));
        assert_eq!(v[0].chains.as_str(), r#"["P\"x","mid","Né"]"#);
        assert_eq!(
            (
                v[1].id.as_str(),
                v[1].host.as_str(),
                v[1].policy.as_str(),
                v[1].node.as_str()
            ),
            ("c2", "h2", "Pol", "N")
        );
        assert_eq!(
            (v[1].source_geoip.as_str(), v[1].provider_chains.as_str()),
            ("null", "[]")
        );
        assert_eq!((v[1].uid, v[1].dscp), (-3, 4));
        assert_eq!(
            (b.rows[1].agent_id.as_str(), b.rows[2].agent_id.as_str()),
            ("r1", "other")
        );
        assert_eq!(
            (v[2].policy.as_str(), v[2].node.as_str(), v[2].host.as_str()),
            ("solo", "solo", "")
        );
        assert_eq!(v[2].start_ms, b.rows[2].last_updated_ms);
        let dup =
            parse_batch(br#"{"agent_id":"a","connections":[{"id":"x","host":"h","host":"i"}]}"#);
        assert!(dup.unwrap_err().contains("duplicate field `host`"));
        let dup = parse_batch(br#"{"agent_id":"a","agent_id":"b","connections":[]}"#);
        assert!(dup.unwrap_err().contains("duplicate field `agent_id`"));
    }

    #[test]
    fn null_connections_is_an_empty_heartbeat() {
        let b = parse_batch(
            br#"{"agent_id":"a","timestamp":"2026-01-01T00:00:00Z","connections":null}"#,
        )
        .unwrap();
        assert!(b.rows.is_empty());
    }

    fn tmp_db(name: &str) -> Connection {
        let dir = std::env::temp_dir().join(format!("mct-ingest-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        crate::store::open(&dir.join("m.db"), crate::store::Access::Write).unwrap()
    }

    fn dump(c: &Connection, sql: &str) -> Vec<Vec<rusqlite::types::Value>> {
        let mut st = c.prepare(sql).unwrap();
        let n = st.column_count();
        st.query_map([], |r| (0..n).map(|i| r.get(i)).collect())
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    const ROLLUPS: [&str; 3] = [
        "SELECT * FROM rollup_conn_hour ORDER BY 1, 2",
        "SELECT * FROM rollup_traffic_hour ORDER BY 1, 2",
        "SELECT * FROM rollup_host ORDER BY 1",
    ];

    /// The merge without upserts: a record repeated in one batch, a minute listed twice, buckets out of
    /// order, a legacy record growing within the batch; then a replay changes nothing and the rollups agree
    /// with a rebuild from the raw tables.
    #[test]
    fn repeats_within_a_batch_merge_and_replays_change_nothing() {
        let body = serde_json::json!({
            "agent_id": "r1",
            "connections": [
                {"id": "c1", "upload": 10, "download": 20, "start": "2026-11-29T07:00:00Z",
                 "last_updated": "2026-11-29T07:02:30Z", "traffic": [[1795935660, 1, 2], [1795935720, 3, 4], [1795935660, 5, 1]]},
                {"id": "c2", "upload": 0, "download": 600, "start": "2026-11-29T07:00:00Z",
                 "last_updated": "2026-11-29T07:01:00Z", "host": "example.com"},
                {"id": "c1", "upload": 12, "download": 25, "start": "2026-11-29T07:00:00Z",
                 "last_updated": "2026-11-29T07:03:00Z", "end": "2026-11-29T07:03:00Z", "traffic": [[1795935720, 7, 0]]},
                {"id": "c2", "upload": 0, "download": 900, "start": "2026-11-29T07:00:00Z",
                 "last_updated": "2026-11-29T07:02:00Z", "host": "example.com"}
            ]
        });
        let batch = parse_batch(&serde_json::to_vec(&body).unwrap()).unwrap();
        let mut c = tmp_db("repeats");
        assert_eq!(apply_batch(&mut c, &batch, 1).unwrap(), 4);
        let conns = "SELECT agent_id, id, upload, download, last_updated_ms, end_ms FROM connections ORDER BY id";
        let traffic = "SELECT t.minute, t.upload, t.download FROM traffic t JOIN connections c ON c.pk = t.conn
                       ORDER BY c.id, t.minute";
        use rusqlite::types::Value::{Integer as I, Null, Text as T};
        let end = parse_rfc3339("2026-11-29T07:03:00Z").unwrap();
        assert_eq!(
            dump(&c, conns),
            vec![
                vec![T("r1".into()), T("c1".into()), I(12), I(25), I(end), I(end)],
                vec![
                    T("r1".into()),
                    T("c2".into()),
                    I(0),
                    I(900),
                    I(parse_rfc3339("2026-11-29T07:02:00Z").unwrap()),
                    Null
                ],
            ]
        );
        // c1: the larger value of each minute; c2: 600 spread over its first minute, 300 over its second
        assert_eq!(
            dump(&c, traffic),
            vec![
                vec![I(29932261), I(5), I(2)],
                vec![I(29932262), I(7), I(4)],
                vec![I(29932260), I(0), I(600)],
                vec![I(29932261), I(0), I(300)],
            ]
        );
        let before: Vec<_> = [conns, traffic]
            .iter()
            .chain(ROLLUPS.iter())
            .map(|q| dump(&c, q))
            .collect();
        apply_batch(&mut c, &batch, 2).unwrap();
        let after: Vec<_> = [conns, traffic]
            .iter()
            .chain(ROLLUPS.iter())
            .map(|q| dump(&c, q))
            .collect();
        assert_eq!(before, after, "a replay changed something");
        crate::store::rollup::rebuild(&c).unwrap();
        let rebuilt: Vec<_> = ROLLUPS.iter().map(|q| dump(&c, q)).collect();
        assert_eq!(&before[2..], &rebuilt[..], "rollups differ from a rebuild");
    }
}
