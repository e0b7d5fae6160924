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
use crate::model::{placeholders, Bytes, ConnMeta};
use crate::store::rollup::{host_key, RollupDelta};
use crate::store::writer::{spread, GroupedWrite};
use crate::store::WriteCmd;
use crate::timefmt::{parse_rfc3339, MINUTE_MS};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::time::Duration;

/// Set while batches fail for a full or failing disk: its error is logged once, not per batch.
static STORAGE_FAILING: AtomicBool = AtomicBool::new(false);

/// How long a sync request waits for the writer before answering `503`.
pub const WRITER_TIMEOUT: Duration = Duration::from_secs(30);

/// The body as it arrives; every field optional so that we, not serde, decide what is required.
#[derive(Deserialize)]
struct WireBatch {
    agent_id: Option<String>,
    timestamp: Option<String>,
    connections: Option<Vec<WireRecord>>,
}

#[derive(Deserialize)]
struct WireRecord {
    id: Option<String>,
    agent_id: Option<String>,
    download: Option<u64>,
    upload: Option<u64>,
    last_updated: Option<String>,
    start: Option<String>,
    end: Option<String>,
    network: Option<String>,
    conn_type: Option<String>,
    source_ip: Option<String>,
    destination_ip: Option<String>,
    source_geoip: Option<String>,
    destination_geoip: Option<String>,
    source_ip_asn: Option<String>,
    destination_ip_asn: Option<String>,
    source_port: Option<String>,
    destination_port: Option<String>,
    inbound_ip: Option<String>,
    inbound_port: Option<String>,
    inbound_name: Option<String>,
    inbound_user: Option<String>,
    host: Option<String>,
    dns_mode: Option<String>,
    uid: Option<i64>,
    process: Option<String>,
    process_path: Option<String>,
    special_proxy: Option<String>,
    special_rules: Option<String>,
    remote_destination: Option<String>,
    dscp: Option<i64>,
    sniff_host: Option<String>,
    chains: Option<String>,
    rule: Option<String>,
    rule_payload: Option<String>,
    rematch_name: Option<String>,
    provider_chains: Option<String>,
    node: Option<String>,
    policy: Option<String>,
    traffic: Option<Vec<(i64, u64, u64)>>,
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
    pub meta: ConnMeta,
    pub end_ms: Option<i64>,
    pub last_updated_ms: i64,
    pub totals: Bytes,
    /// `(minute index, bytes)`; `None` when the agent sent no buckets (they are derived on store).
    pub traffic: Option<Vec<(i64, Bytes)>>,
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
    let cmd = WriteCmd::Grouped(GroupedWrite {
        apply: Box::new(move |conn| store_batch(conn, &batch, now_ms)),
        done: Box::new(move |outcome| {
            let _ = tx.send(
                outcome
                    .map(|()| n)
                    .map_err(|e| (e.to_string(), crate::store::writer::is_storage_error(e))),
            );
        }),
    });
    crate::sync::send_to_writer(writer, cmd, deadline)?;
    rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
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
    let wire: WireBatch = match serde_json::from_slice(body) {
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
    let records = match wire.connections {
        Some(c) => c,
        None if body_has_key(body, "connections") => Vec::new(),
        None => return Err("connections: missing".into()),
    };
    let mut rows = Vec::with_capacity(records.len());
    for (i, r) in records.into_iter().enumerate() {
        rows.push(validate_record(i, r, &agent_id)?);
    }
    Ok(IngestBatch { agent_id, rows })
}

/// True when the top-level object has `key`, even as `null` (typed parsing cannot tell `null` from missing).
fn body_has_key(body: &[u8], key: &str) -> bool {
    serde_json::from_slice::<serde_json::Map<String, Value>>(body)
        .map(|m| m.contains_key(key))
        .unwrap_or(false)
}

fn time_field(
    i: usize,
    name: &str,
    v: &Option<String>,
) -> std::result::Result<Option<i64>, String> {
    match v {
        None => Ok(None),
        Some(s) => parse_rfc3339(s)
            .map(Some)
            .ok_or_else(|| format!("connections[{i}].{name}: not an RFC 3339 time: {s:?}")),
    }
}

/// `chains` as (policy group, exit node): its first and last elements.
fn chain_ends(i: usize, chains: &str) -> std::result::Result<(String, String), String> {
    let t = chains.trim();
    if t.is_empty() || t == "null" {
        return Ok((String::new(), String::new()));
    }
    let list: Vec<String> = serde_json::from_str(t).map_err(|_| {
        format!(
            "connections[{i}].chains: not a JSON array of strings encoded as a string: {chains:?}"
        )
    })?;
    Ok((
        list.first().cloned().unwrap_or_default(),
        list.last().cloned().unwrap_or_default(),
    ))
}

fn validate_record(
    i: usize,
    r: WireRecord,
    batch_agent: &str,
) -> std::result::Result<IngestRow, String> {
    let id = match r.id {
        Some(id) if !id.trim().is_empty() => id,
        Some(_) => return Err(format!("connections[{i}].id: must not be empty")),
        None => return Err(format!("connections[{i}].id: missing")),
    };
    let agent_id = match r.agent_id {
        Some(a) if !a.trim().is_empty() => a,
        _ => batch_agent.to_string(),
    };
    let start = time_field(i, "start", &r.start)?;
    let last = time_field(i, "last_updated", &r.last_updated)?;
    let end_ms = time_field(i, "end", &r.end)?;
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
    let chains = r.chains.unwrap_or_else(|| "[]".into());
    let (policy, node) = chain_ends(i, &chains)?;
    let traffic = match r.traffic {
        None => None,
        Some(t) => {
            let mut out = Vec::with_capacity(t.len());
            for (j, (secs, up, down)) in t.into_iter().enumerate() {
                if secs.rem_euclid(60) != 0 {
                    return Err(format!(
                        "connections[{i}].traffic[{j}]: {secs} is not the start of a minute (Unix seconds divisible by 60)"
                    ));
                }
                out.push((
                    secs.div_euclid(60),
                    Bytes {
                        upload: up,
                        download: down,
                    },
                ));
            }
            Some(out)
        }
    };
    let s = |v: Option<String>| v.unwrap_or_default();
    let meta = ConnMeta {
        id,
        start_ms,
        network: s(r.network),
        conn_type: s(r.conn_type),
        source_ip: s(r.source_ip),
        source_port: s(r.source_port),
        destination_ip: s(r.destination_ip),
        destination_port: s(r.destination_port),
        source_geoip: r.source_geoip.unwrap_or_else(|| "null".into()),
        destination_geoip: r.destination_geoip.unwrap_or_else(|| "null".into()),
        source_ip_asn: s(r.source_ip_asn),
        destination_ip_asn: s(r.destination_ip_asn),
        inbound_ip: s(r.inbound_ip),
        inbound_port: s(r.inbound_port),
        inbound_name: s(r.inbound_name),
        inbound_user: s(r.inbound_user),
        host: s(r.host),
        dns_mode: s(r.dns_mode),
        uid: r.uid.unwrap_or(0),
        process: s(r.process),
        process_path: s(r.process_path),
        special_proxy: s(r.special_proxy),
        special_rules: s(r.special_rules),
        remote_destination: s(r.remote_destination),
        dscp: r.dscp.unwrap_or(0),
        sniff_host: s(r.sniff_host),
        rematch_name: s(r.rematch_name),
        chains,
        provider_chains: r.provider_chains.unwrap_or_else(|| "[]".into()),
        node: r.node.filter(|n| !n.is_empty()).unwrap_or(node),
        policy: r.policy.filter(|p| !p.is_empty()).unwrap_or(policy),
        rule: s(r.rule),
        rule_payload: s(r.rule_payload),
    };
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
            let m = &row.meta;
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
                        host_key(&m.host, &m.destination_ip),
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
        assert_eq!(r.meta.policy, "Proxy");
        assert_eq!(r.meta.node, "HK-01");
        assert_eq!(r.meta.source_geoip, "null");
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
