//! The master's side of `POST /api/v1/sync`: parsing, validating and storing one batch of an agent's
//! connection records.
//!
//! The HTTP layer calls [`handle_sync`] from a worker thread. The whole body is parsed and validated there
//! (nothing touches the database for a bad batch), then the batch travels to the writer thread as a
//! [`WriteCmd::Grouped`] write: batches of several agents queued at the same time share one transaction (one
//! commit), and each is still all or nothing (a failed group is retried batch by batch).
//!
//! # Wire format
//! Body: `{"agent_id": "...", "timestamp": "<RFC 3339>", "connections": [Record, ...]}`; `connections` may be
//! `null` or `[]` (an empty batch is a heartbeat: it still counts as a sync in table `agents`).
//!
//! A Record is the earlier tool's 33 fields (see /work/shared/API-COMPAT.md): `id` (required, non-empty),
//! `agent_id` (the row's agent; empty or missing means the batch's), `download`, `upload` (non-negative
//! integers), `start`, `last_updated` (RFC 3339, any offset, stored as UTC ms; one may stand in for the other
//! when missing), `uid`, `dscp` (integers) and strings for everything else; `chains` is a JSON array encoded
//! as a string, policy group first and exit node last. Missing or `null` optional fields take defaults;
//! unknown fields are ignored; a field of the wrong type is a `400` naming it (`connections[3].download`).
//!
//! Our own agents add:
//! - `end`: RFC 3339 or `null` (still open). Missing means "not known" (the earlier tool's agents).
//! - `rematch_name`, `provider_chains`, `node`, `policy` (strings; `node`/`policy` default to the ends of `chains`).
//! - `traffic`: `[[minute_start_unix_seconds, upload, download], ...]`, the bytes that flowed in each minute
//!   (the agent's `traffic` rows that changed since it last delivered this connection).
//!
//! # Merge rules (re-sending a batch changes nothing)
//! Rows are upserted on `(agent_id, id)`: totals and `last_updated` keep the larger value, `end` keeps a
//! non-null value (the later of two), metadata is kept from the first insert. A bucket's value only grows on
//! the agent, so `traffic` buckets merge with `max()`. Records without `traffic` (the earlier tool) get buckets
//! derived here: the increase of the totals over what is stored, spread over `[stored last_updated, new
//! last_updated]` (from `start` for a new row) with [`crate::store::writer::spread`]; a replay increases
//! nothing, so it adds nothing.
//!
//! Table `agents` records each batch's agent: `first_seen_ms`, `last_sync_ms` (every batch), `last_data_ms`
//! (batches with rows) and `sync_count`.

use crate::error::{Error, Result};
use crate::model::{placeholders, Bytes, ConnMeta, MetaView};
use crate::store::rollup::{host_key, RollupDelta};
use crate::store::writer::{spread, GroupedWrite};
use crate::store::WriteCmd;
use crate::timefmt::{parse_rfc3339, MINUTE_MS};
use rusqlite::{params, Connection, OptionalExtension};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Set while batches fail for a full or failing disk: its error is logged once, not per batch.
static STORAGE_FAILING: AtomicBool = AtomicBool::new(false);

/// How long a sync request waits for the writer before answering `503`.
pub const WRITER_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a text field's value sits in its record's text (byte offsets `start..end`); [`ABSENT`] when the field
/// was missing or `null`.
type Span = (u32, u32);
const ABSENT: Span = (u32::MAX, 0);

/// Indexes of [`RECORD_FIELDS`] (and of a record's spans).
mod f {
    pub const ID: usize = 0;
    pub const AGENT_ID: usize = 1;
    pub const DOWNLOAD: usize = 2;
    pub const UPLOAD: usize = 3;
    pub const LAST_UPDATED: usize = 4;
    pub const START: usize = 5;
    pub const END: usize = 6;
    pub const NETWORK: usize = 7;
    pub const CONN_TYPE: usize = 8;
    pub const SOURCE_IP: usize = 9;
    pub const DESTINATION_IP: usize = 10;
    pub const SOURCE_GEOIP: usize = 11;
    pub const DESTINATION_GEOIP: usize = 12;
    pub const SOURCE_IP_ASN: usize = 13;
    pub const DESTINATION_IP_ASN: usize = 14;
    pub const SOURCE_PORT: usize = 15;
    pub const DESTINATION_PORT: usize = 16;
    pub const INBOUND_IP: usize = 17;
    pub const INBOUND_PORT: usize = 18;
    pub const INBOUND_NAME: usize = 19;
    pub const INBOUND_USER: usize = 20;
    pub const HOST: usize = 21;
    pub const DNS_MODE: usize = 22;
    pub const UID: usize = 23;
    pub const PROCESS: usize = 24;
    pub const PROCESS_PATH: usize = 25;
    pub const SPECIAL_PROXY: usize = 26;
    pub const SPECIAL_RULES: usize = 27;
    pub const REMOTE_DESTINATION: usize = 28;
    pub const DSCP: usize = 29;
    pub const SNIFF_HOST: usize = 30;
    pub const CHAINS: usize = 31;
    pub const RULE: usize = 32;
    pub const RULE_PAYLOAD: usize = 33;
    pub const REMATCH_NAME: usize = 34;
    pub const PROVIDER_CHAINS: usize = 35;
    pub const NODE: usize = 36;
    pub const POLICY: usize = 37;
    pub const TRAFFIC: usize = 38;
    pub const COUNT: usize = 39;
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
/// text value, escapes resolved, is appended to `text` (a buffer kept across the records of a batch, copied
/// into the row at its exact size: one allocation per record) and `spans`, indexed like [`RECORD_FIELDS`], say
/// where. The times stay text until validation, which names a bad one.
struct WireRecord {
    text: String,
    spans: [Span; f::COUNT],
    download: Option<u64>,
    upload: Option<u64>,
    uid: Option<i64>,
    dscp: Option<i64>,
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
                download: None,
                upload: None,
                uid: None,
                dscp: None,
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
        (r.download, r.upload, r.uid, r.dscp, r.traffic) = (None, None, None, None, None);
        let mut seen = 0u64;
        let mut k = 0;
        loop {
            let hint = self.order.get(k).map(|&h| h as usize);
            let key = map.next_key_seed(KeySeed(|name: &str| match hint {
                Some(h) if RECORD_FIELDS.get(h).is_some_and(|(n, _)| *n == name) => Some(h),
                _ => RECORD_FIELDS.iter().position(|(n, _)| *n == name),
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
                return Err(de::Error::duplicate_field(RECORD_FIELDS[i].0));
            }
            seen |= 1 << i;
            match i {
                f::DOWNLOAD => r.download = map.next_value()?,
                f::UPLOAD => r.upload = map.next_value()?,
                f::UID => r.uid = map.next_value()?,
                f::DSCP => r.dscp = map.next_value()?,
                f::TRAFFIC => r.traffic = map.next_value()?,
                _ => r.spans[i] = map.next_value_seed(TextSeed(&mut r.text))?,
            }
        }
        Ok(())
    }
}

/// The type each known field must have; used only to name the bad field when typed parsing fails.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    UInt,
    Int,
    Traffic,
}

const RECORD_FIELDS: &[(&str, Kind)] = &[
    ("id", Kind::Str),
    ("agent_id", Kind::Str),
    ("download", Kind::UInt),
    ("upload", Kind::UInt),
    ("last_updated", Kind::Str),
    ("start", Kind::Str),
    ("end", Kind::Str),
    ("network", Kind::Str),
    ("conn_type", Kind::Str),
    ("source_ip", Kind::Str),
    ("destination_ip", Kind::Str),
    ("source_geoip", Kind::Str),
    ("destination_geoip", Kind::Str),
    ("source_ip_asn", Kind::Str),
    ("destination_ip_asn", Kind::Str),
    ("source_port", Kind::Str),
    ("destination_port", Kind::Str),
    ("inbound_ip", Kind::Str),
    ("inbound_port", Kind::Str),
    ("inbound_name", Kind::Str),
    ("inbound_user", Kind::Str),
    ("host", Kind::Str),
    ("dns_mode", Kind::Str),
    ("uid", Kind::Int),
    ("process", Kind::Str),
    ("process_path", Kind::Str),
    ("special_proxy", Kind::Str),
    ("special_rules", Kind::Str),
    ("remote_destination", Kind::Str),
    ("dscp", Kind::Int),
    ("sniff_host", Kind::Str),
    ("chains", Kind::Str),
    ("rule", Kind::Str),
    ("rule_payload", Kind::Str),
    ("rematch_name", Kind::Str),
    ("provider_chains", Kind::Str),
    ("node", Kind::Str),
    ("policy", Kind::Str),
    ("traffic", Kind::Traffic),
];

/// One validated record, ready to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestRow {
    pub agent_id: String,
    pub meta: RowMeta,
    pub end_ms: Option<i64>,
    pub last_updated_ms: i64,
    pub totals: Bytes,
    /// `(minute index, bytes)`; `None` when the agent sent no buckets (they are derived on store).
    pub traffic: Option<Vec<(i64, Bytes)>>,
}

/// A record's [`ConnMeta`] as the record's text and where each field is in it: one allocation instead of one
/// per field (what the worker allocates, the writer frees). [`RowMeta::view`] reads it as borrowed fields.
#[derive(Clone)]
pub struct RowMeta {
    text: String,
    spans: [Span; f::COUNT],
    pub start_ms: i64,
    uid: i64,
    dscp: i64,
}

impl RowMeta {
    /// The field's value, or its default when the record had none (missing or `null`).
    fn text(&self, field: usize) -> &str {
        span_text(&self.text, self.spans[field]).unwrap_or(match field {
            f::SOURCE_GEOIP | f::DESTINATION_GEOIP => "null",
            f::CHAINS | f::PROVIDER_CHAINS => "[]",
            _ => "",
        })
    }

    /// The fields, borrowed.
    pub fn view(&self) -> MetaView<'_> {
        let t = |field| self.text(field);
        MetaView {
            id: t(f::ID),
            start_ms: self.start_ms,
            network: t(f::NETWORK),
            conn_type: t(f::CONN_TYPE),
            source_ip: t(f::SOURCE_IP),
            source_port: t(f::SOURCE_PORT),
            destination_ip: t(f::DESTINATION_IP),
            destination_port: t(f::DESTINATION_PORT),
            source_geoip: t(f::SOURCE_GEOIP),
            destination_geoip: t(f::DESTINATION_GEOIP),
            source_ip_asn: t(f::SOURCE_IP_ASN),
            destination_ip_asn: t(f::DESTINATION_IP_ASN),
            inbound_ip: t(f::INBOUND_IP),
            inbound_port: t(f::INBOUND_PORT),
            inbound_name: t(f::INBOUND_NAME),
            inbound_user: t(f::INBOUND_USER),
            host: t(f::HOST),
            dns_mode: t(f::DNS_MODE),
            uid: self.uid,
            process: t(f::PROCESS),
            process_path: t(f::PROCESS_PATH),
            special_proxy: t(f::SPECIAL_PROXY),
            special_rules: t(f::SPECIAL_RULES),
            remote_destination: t(f::REMOTE_DESTINATION),
            dscp: self.dscp,
            sniff_host: t(f::SNIFF_HOST),
            rematch_name: t(f::REMATCH_NAME),
            chains: t(f::CHAINS),
            provider_chains: t(f::PROVIDER_CHAINS),
            node: t(f::NODE),
            policy: t(f::POLICY),
            rule: t(f::RULE),
            rule_payload: t(f::RULE_PAYLOAD),
        }
    }
}

impl PartialEq for RowMeta {
    fn eq(&self, other: &RowMeta) -> bool {
        self.view() == other.view()
    }
}

impl Eq for RowMeta {}

impl std::fmt::Debug for RowMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.view().fmt(f)
    }
}

/// A validated batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngestBatch {
    pub agent_id: String,
    pub rows: Vec<IngestRow>,
}

/// Answers `POST /api/v1/sync`: `Ok` is the envelope's `data` (`{"count": N, "message": "..."}`), `Err` is the
/// HTTP status and a message naming the bad field. Blocks until the writer has committed the batch, at most
/// [`WRITER_TIMEOUT`].
pub fn handle_sync(
    body: &[u8],
    writer: &SyncSender<WriteCmd>,
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
/// whether the disk is full or failing: [`crate::store::writer::is_storage_error`]).
fn store_grouped(
    writer: &SyncSender<WriteCmd>,
    batch: IngestBatch,
    now_ms: i64,
) -> Result<std::result::Result<usize, (String, bool)>> {
    let deadline = std::time::Instant::now() + WRITER_TIMEOUT;
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let n = batch.rows.len();
    // The batch comes back with the outcome and is freed here, not on the writer thread (the bottleneck;
    // musl's allocator has one lock for every thread, and a batch is thousands of allocations).
    let batch = Arc::new(Mutex::new(Some(batch)));
    let back = Arc::clone(&batch);
    let cmd = WriteCmd::Grouped(GroupedWrite {
        apply: Box::new(move |conn| {
            match &*batch.lock().unwrap_or_else(PoisonError::into_inner) {
                Some(batch) => store_batch(conn, batch, now_ms),
                None => Ok(()), // (not reached: `done` takes it after the last `apply`)
            }
        }),
        done: Box::new(move |outcome| {
            let batch = back.lock().unwrap_or_else(PoisonError::into_inner).take();
            let outcome = outcome
                .map(|()| n)
                .map_err(|e| (e.to_string(), crate::store::writer::is_storage_error(e)));
            let _ = tx.send((outcome, batch));
        }),
    });
    crate::sync::send_to_writer(writer, cmd, deadline)?;
    rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        .map(|(outcome, _batch)| outcome)
        .map_err(|e| match e {
            std::sync::mpsc::RecvTimeoutError::Timeout => {
                Error::Sync("writer did not answer in time".into())
            }
            std::sync::mpsc::RecvTimeoutError::Disconnected => Error::Stopped("writer"),
        })
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
    let ends = chain_ends(i, &r.text, r.spans[f::CHAINS])?;
    // `node`/`policy` when sent and not empty, else the ends of `chains` (or empty)
    for (field, end) in [(f::POLICY, 0), (f::NODE, 1)] {
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
    let traffic = match r.traffic.take() {
        None => None,
        Some(t) => {
            for (j, (secs, _, _)) in t.iter().enumerate() {
                if secs.rem_euclid(60) != 0 {
                    return Err(format!(
                        "connections[{i}].traffic[{j}]: {secs} is not the start of a minute (Unix seconds divisible by 60)"
                    ));
                }
            }
            // (the same size as the tuples: collected in place, no allocation)
            Some(
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
            )
        }
    };
    Ok(IngestRow {
        agent_id,
        meta: RowMeta {
            text: r.text.as_str().into(),
            spans: r.spans,
            start_ms,
            uid: r.uid.unwrap_or(0),
            dscp: r.dscp.unwrap_or(0),
        },
        end_ms,
        last_updated_ms,
        totals: Bytes {
            upload: r.upload.unwrap_or(0),
            download: r.download.unwrap_or(0),
        },
        traffic,
    })
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
        for (name, kind) in RECORD_FIELDS {
            let Some(v) = rec.get(*name) else { continue };
            if v.is_null() {
                continue;
            }
            let ok = match kind {
                Kind::Str => v.is_string(),
                Kind::UInt => v.is_u64(),
                Kind::Int => v.is_i64() || v.is_u64() && v.as_i64().is_some(),
                Kind::Traffic => {
                    if let Some(msg) = explain_traffic(i, v) {
                        return Some(msg);
                    }
                    true
                }
            };
            if !ok {
                let want = match kind {
                    Kind::Str => "a string",
                    Kind::UInt => "a non-negative integer",
                    Kind::Int => "an integer",
                    Kind::Traffic => "[[minute_unix_seconds, upload, download], ...]",
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

fn clamp(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// Stores a validated batch in one transaction; returns the number of records. Used by [`handle_sync`] on
/// the writer thread, and directly by tests.
pub fn apply_batch(conn: &mut Connection, batch: &IngestBatch, now_ms: i64) -> Result<usize> {
    let tx = conn.transaction().map_err(Error::db("begin sync batch"))?;
    store_batch(&tx, batch, now_ms)?;
    tx.commit().map_err(Error::db("commit sync batch"))?;
    Ok(batch.rows.len())
}

/// The statements of [`store_batch`], prepared once per transaction.
///
/// Why plain statements and no `ON CONFLICT ... DO UPDATE` or `RETURNING` (which said the same in fewer
/// lines): SQLite runs a `RETURNING` clause through a temporary table with its own page cache, created and
/// freed per row (musl's allocator answers that with an `mmap`/`munmap` pair), and an upsert into a table
/// with a foreign key keeps a statement journal: a copy of every page it touches. Both cost more than the
/// writes themselves. An `INSERT ... DO NOTHING` (it only skips: no statement journal), then for a row that
/// was there a lookup and an `UPDATE` only when something grew, does the same merge without either, and
/// makes a replayed batch (the agent's retry) write nothing.
struct Statements<'c> {
    find: rusqlite::Statement<'c>,
    insert: rusqlite::Statement<'c>,
    update: rusqlite::Statement<'c>,
    bucket_find: rusqlite::Statement<'c>,
    bucket_insert: rusqlite::Statement<'c>,
    bucket_set: rusqlite::Statement<'c>,
    bucket_add: rusqlite::Statement<'c>,
}

impl<'c> Statements<'c> {
    fn prepare(tx: &'c Connection) -> Result<Statements<'c>> {
        let p = |sql: &str, what: &'static str| tx.prepare(sql).map_err(Error::db(what));
        Ok(Statements {
            find: p(
                "SELECT pk, upload, download, last_updated_ms, end_ms, start_ms, host, destination_ip
                 FROM connections WHERE agent_id = ?1 AND id = ?2",
                "prepare sync lookup",
            )?,
            insert: p(
                &format!(
                    "INSERT INTO connections (agent_id, id, end_ms, last_updated_ms, upload, download, {})
                     VALUES ({}) ON CONFLICT (agent_id, id) DO NOTHING",
                    ConnMeta::SQL_COLUMNS,
                    placeholders(6 + ConnMeta::SQL_COLUMNS.split(',').count())
                ),
                "prepare sync insert",
            )?,
            update: p(
                "UPDATE connections SET upload = ?2, download = ?3, last_updated_ms = ?4, end_ms = ?5
                 WHERE pk = ?1",
                "prepare sync update",
            )?,
            bucket_find: p(
                "SELECT upload, download FROM traffic WHERE conn = ?1 AND minute = ?2",
                "prepare sync traffic lookup",
            )?,
            bucket_insert: p(
                "INSERT INTO traffic (conn, minute, upload, download) VALUES (?1, ?2, ?3, ?4)",
                "prepare sync traffic insert",
            )?,
            bucket_set: p(
                "UPDATE traffic SET upload = ?3, download = ?4 WHERE conn = ?1 AND minute = ?2",
                "prepare sync traffic update",
            )?,
            bucket_add: p(
                "UPDATE traffic SET upload = upload + ?3, download = download + ?4
                 WHERE conn = ?1 AND minute = ?2",
                "prepare sync derived traffic",
            )?,
        })
    }
}

/// What is stored of a connection before a record is merged into it.
struct Prior {
    pk: i64,
    upload: i64,
    download: i64,
    last_updated_ms: i64,
    end_ms: Option<i64>,
    start_ms: i64,
    host: String,
    destination_ip: String,
}

/// `end` merged: a non-null value wins over null, the later of two wins.
fn merge_end(old: Option<i64>, new: Option<i64>) -> Option<i64> {
    match (old, new) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Writes a validated batch inside the caller's transaction (see the module doc for the merge rules).
pub fn store_batch(tx: &Connection, batch: &IngestBatch, now_ms: i64) -> Result<()> {
    let mut rollup = RollupDelta::default();
    {
        let mut st = Statements::prepare(tx)?;
        let mut other_agents: Vec<&str> = Vec::new();
        for row in &batch.rows {
            let m = row.meta.view();
            if row.agent_id != batch.agent_id && !other_agents.contains(&row.agent_id.as_str()) {
                other_agents.push(&row.agent_id);
            }
            let (new_up, new_down) = (clamp(row.totals.upload), clamp(row.totals.download));
            // A new connection is the common case: insert first (`DO NOTHING` when the row exists), and read
            // what was stored (to merge, to derive buckets for records that carry none, and for the rollup
            // deltas) only when nothing was inserted: one index search per new row instead of two.
            let head: [&dyn rusqlite::ToSql; 6] = [
                &row.agent_id,
                &m.id,
                &row.end_ms,
                &row.last_updated_ms,
                &new_up,
                &new_down,
            ];
            let inserted = st
                .insert
                .execute(rusqlite::params_from_iter(
                    head.into_iter().chain(m.sql_values()),
                ))
                .map_err(|e| Error::Db(format!("store connection {}", m.id), e))?;
            let prior: Option<Prior> = match inserted {
                0 => Some(
                    st.find
                        .query_row(params![row.agent_id, m.id], |r| {
                            Ok(Prior {
                                pk: r.get(0)?,
                                upload: r.get(1)?,
                                download: r.get(2)?,
                                last_updated_ms: r.get(3)?,
                                end_ms: r.get(4)?,
                                start_ms: r.get(5)?,
                                host: r.get(6)?,
                                destination_ip: r.get(7)?,
                            })
                        })
                        .map_err(|e| Error::Db(format!("look up connection {}", m.id), e))?,
                ),
                _ => None,
            };
            let pk = match &prior {
                None => {
                    rollup.conn(
                        &row.agent_id,
                        m.start_ms,
                        host_key(m.host, m.destination_ip),
                        1,
                        new_up,
                        new_down,
                    );
                    tx.last_insert_rowid()
                }
                Some(p) => {
                    let (up, down) = (new_up.max(p.upload), new_down.max(p.download));
                    let last = row.last_updated_ms.max(p.last_updated_ms);
                    let end = merge_end(p.end_ms, row.end_ms);
                    rollup.conn(
                        &row.agent_id,
                        p.start_ms,
                        host_key(&p.host, &p.destination_ip),
                        0,
                        up - p.upload,
                        down - p.download,
                    );
                    if (up, down, last, end) != (p.upload, p.download, p.last_updated_ms, p.end_ms)
                    {
                        st.update
                            .execute(params![p.pk, up, down, last, end])
                            .map_err(|e| Error::Db(format!("store connection {}", m.id), e))?;
                    }
                    p.pk
                }
            };
            match &row.traffic {
                Some(buckets) => {
                    // A new connection has no buckets yet, unless this record lists a minute twice (our agents
                    // send them in order, once each).
                    let fresh = prior.is_none() && buckets.windows(2).all(|w| w[0].0 < w[1].0);
                    for (minute, b) in buckets {
                        let (up, down) = (clamp(b.upload), clamp(b.download));
                        let old: Option<(i64, i64)> = match fresh {
                            true => None,
                            false => st
                                .bucket_find
                                .query_row(params![pk, minute], |r| Ok((r.get(0)?, r.get(1)?)))
                                .optional()
                                .map_err(|e| {
                                    Error::Db(format!("look up traffic of {}", m.id), e)
                                })?,
                        };
                        match old {
                            None => {
                                rollup.traffic(&row.agent_id, *minute, up, down);
                                st.bucket_insert
                                    .execute(params![pk, minute, up, down])
                                    .map_err(|e| {
                                        Error::Db(format!("store traffic of {}", m.id), e)
                                    })?;
                            }
                            Some((u0, d0)) => {
                                let (nu, nd) = (up.max(u0), down.max(d0));
                                if (nu, nd) != (u0, d0) {
                                    rollup.traffic(&row.agent_id, *minute, nu - u0, nd - d0);
                                    st.bucket_set.execute(params![pk, minute, nu, nd]).map_err(
                                        |e| Error::Db(format!("store traffic of {}", m.id), e),
                                    )?;
                                }
                            }
                        }
                    }
                }
                None => {
                    let (up0, down0, from) = prior.as_ref().map_or((0, 0, m.start_ms), |p| {
                        (p.upload, p.download, p.last_updated_ms)
                    });
                    let delta = Bytes {
                        upload: (new_up - up0).max(0) as u64,
                        download: (new_down - down0).max(0) as u64,
                    };
                    if delta != Bytes::default() {
                        // an agent whose clock went back: its bytes stay after what is stored
                        let to = row.last_updated_ms.max(from);
                        for (minute, b) in spread(from, to, delta) {
                            let (up, down) = (clamp(b.upload), clamp(b.download));
                            rollup.traffic(&row.agent_id, minute, up, down);
                            // `spread` gives each minute once: a new connection has none of them yet
                            let added = match prior {
                                None => 0,
                                Some(_) => st
                                    .bucket_add
                                    .execute(params![pk, minute, up, down])
                                    .map_err(|e| {
                                        Error::Db(format!("store traffic of {}", m.id), e)
                                    })?,
                            };
                            if added == 0 {
                                st.bucket_insert
                                    .execute(params![pk, minute, up, down])
                                    .map_err(|e| {
                                        Error::Db(format!("store traffic of {}", m.id), e)
                                    })?;
                            }
                        }
                    }
                }
            }
        }
        let has_data = !batch.rows.is_empty();
        tx.execute(
            "INSERT INTO agents (agent_id, first_seen_ms, last_sync_ms, last_data_ms, sync_count)
             VALUES (?1, ?2, ?2, CASE WHEN ?3 THEN ?2 END, 1)
             ON CONFLICT (agent_id) DO UPDATE SET last_sync_ms = ?2,
                last_data_ms = CASE WHEN ?3 THEN ?2 ELSE last_data_ms END, sync_count = sync_count + 1",
            params![batch.agent_id, now_ms, has_data],
        )
        .map_err(Error::db("record agent sync"))?;
        // Rows an agent forwards under another id (kept from before an --agent-id change): that agent
        // exists and has data, but did not sync itself.
        for other in other_agents {
            tx.execute(
                "INSERT INTO agents (agent_id, first_seen_ms, last_data_ms) VALUES (?1, ?2, ?2)
                 ON CONFLICT (agent_id) DO UPDATE SET last_data_ms = ?2",
                params![other, now_ms],
            )
            .map_err(Error::db("record agent data"))?;
        }
    }
    rollup.apply(tx)
}

/// The minute index of a millisecond time (the `traffic.minute` column).
pub fn minute_of(ms: i64) -> i64 {
    ms.div_euclid(MINUTE_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            r.meta.start_ms,
            parse_rfc3339("2026-11-28T23:00:00Z").unwrap()
        );
        assert_eq!(r.last_updated_ms - r.meta.start_ms, 30 * 60_000);
        assert_eq!(r.meta.view().policy, "Proxy");
        assert_eq!(r.meta.view().node, "HK-01");
        assert_eq!(r.meta.view().source_geoip, "null");
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
        let v: Vec<MetaView> = b.rows.iter().map(|r| r.meta.view()).collect();
        assert_eq!((v[0].id, v[0].host), ("c1", "a\"bé"));
        assert_eq!((v[0].policy, v[0].node), ("P\"x", "Né"));
        assert_eq!(v[0].chains, r#"["P\"x","mid","Né"]"#);
        assert_eq!(
            (v[1].id, v[1].host, v[1].policy, v[1].node),
            ("c2", "h2", "Pol", "N")
        );
        assert_eq!((v[1].source_geoip, v[1].provider_chains), ("null", "[]"));
        assert_eq!((v[1].uid, v[1].dscp), (-3, 4));
        assert_eq!(
            (b.rows[1].agent_id.as_str(), b.rows[2].agent_id.as_str()),
            ("r1", "other")
        );
        assert_eq!((v[2].policy, v[2].node, v[2].host), ("solo", "solo", ""));
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
