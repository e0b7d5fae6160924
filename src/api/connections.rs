//! `GET /api/v1/connections`: connection rows, filtered, sorted and paged, with `total_count`; JSON, CSV or
//! NDJSON. `from`/`to` select connections whose `start` is in `[from, to)` (the same rule as the stats
//! counts); `destination` and `host` match substrings, the other filters exactly; `state=open|closed` keeps
//! only the connections still open (no `end`) or only the ended ones.

use super::params::{
    ApiResult, ConnState, Filters, Format, Match, Order, Params, Where, MAX_ROWS, START_ORDER,
};
use super::table::{Answer, Table};
use crate::timefmt::format_rfc3339;
use rusqlite::types::Value as Sql;
use rusqlite::Connection;
use serde_json::{json, Value};

/// The row fields, in answer order. Text columns are read as text, `*_ms` as times, the rest as integers.
const COLUMNS: &[(&str, &str)] = &[
    ("id", "c.id"),
    ("agent_id", "c.agent_id"),
    ("download", "c.download"),
    ("upload", "c.upload"),
    ("total", "c.upload + c.download"),
    ("start", "c.start_ms"),
    ("end", "c.end_ms"),
    ("last_updated", "c.last_updated_ms"),
    ("network", "c.network"),
    ("conn_type", "c.conn_type"),
    ("source_ip", "c.source_ip"),
    ("source_port", "c.source_port"),
    ("destination_ip", "c.destination_ip"),
    ("destination_port", "c.destination_port"),
    ("source_geoip", "c.source_geoip"),
    ("destination_geoip", "c.destination_geoip"),
    ("source_ip_asn", "c.source_ip_asn"),
    ("destination_ip_asn", "c.destination_ip_asn"),
    ("inbound_ip", "c.inbound_ip"),
    ("inbound_port", "c.inbound_port"),
    ("inbound_name", "c.inbound_name"),
    ("inbound_user", "c.inbound_user"),
    ("host", "c.host"),
    ("dns_mode", "c.dns_mode"),
    ("uid", "c.uid"),
    ("process", "c.process"),
    ("process_path", "c.process_path"),
    ("special_proxy", "c.special_proxy"),
    ("special_rules", "c.special_rules"),
    ("remote_destination", "c.remote_destination"),
    ("dscp", "c.dscp"),
    ("sniff_host", "c.sniff_host"),
    ("chains", "c.chains"),
    ("node", "c.node"),
    ("policy", "c.policy"),
    ("rule", "c.rule"),
    ("rule_payload", "c.rule_payload"),
];

const TIME_COLUMNS: &[&str] = &["start", "end", "last_updated"];
const INT_COLUMNS: &[&str] = &["download", "upload", "total", "uid", "dscp"];

/// Sort keys of `/connections`.
#[derive(Clone, Copy)]
enum SortBy {
    Start,
    LastUpdated,
    Download,
    Upload,
    Total,
}

/// The words of `sort_by`.
const SORT_CHOICES: &[(&str, SortBy)] = &[
    ("start", SortBy::Start),
    ("last_updated", SortBy::LastUpdated),
    ("download", SortBy::Download),
    ("upload", SortBy::Upload),
    ("total", SortBy::Total),
];

impl SortBy {
    /// The ORDER BY terms, each to be followed by the direction.
    fn terms(self) -> &'static [&'static str] {
        match self {
            SortBy::Start => START_ORDER,
            SortBy::LastUpdated => &["c.last_updated_ms"],
            SortBy::Download => &["c.download"],
            SortBy::Upload => &["c.upload"],
            SortBy::Total => &["(c.upload + c.download)"],
        }
    }
}

/// The parameters of one `/connections` request, validated.
struct Query {
    f: Filters,
    limit: i64,
    offset: i64,
    sort: SortBy,
    order: Order,
    format: Format,
    state: ConnState,
}

impl Query {
    fn parse(p: &Params) -> ApiResult<Query> {
        Ok(Query {
            f: Filters::parse(p)?,
            limit: p.uint("limit", 100, 1, MAX_ROWS)? as i64,
            offset: p.uint("offset", 0, 0, i64::MAX as u64 / 2)? as i64,
            sort: p.choice("sort_by", SORT_CHOICES, SortBy::Start)?,
            order: Order::parse(p)?,
            format: Format::parse(p)?,
            state: ConnState::parse(p)?,
        })
    }
}

/// `GET /connections`.
/// `devices` gives each row's `source_name` (the device's name, `""` when unknown).
pub fn handle(
    db: &Connection,
    rollups: bool,
    p: &Params,
    devices: Option<&crate::devices::Devices>,
) -> ApiResult<Answer> {
    let q = Query::parse(p)?;
    let f = &q.f;
    let mut w = Where::from_filters(f, Match::Substring);
    if f.has_range() {
        let (from, to) = f.range();
        w.start_in(from, to);
    }
    if let Some(cond) = q.state.condition() {
        w.push(cond, Vec::new());
    }
    let total_count = total_count(db, rollups, &q, &w)?;

    // By start, a condition on the minute even without a range: only then does SQLite walk the start index
    // for the ORDER BY (and sort just the last minutes); without one it sorts every row (schema v4).
    if !f.has_range() && matches!(q.sort, SortBy::Start) {
        let (from, to) = f.range();
        w.start_in(from, to);
    }
    let cols: Vec<&str> = COLUMNS.iter().map(|(_, e)| *e).collect();
    let by: Vec<String> = q
        .sort
        .terms()
        .iter()
        .chain(&["c.pk"])
        .map(|t| format!("{t} {}", q.order.sql()))
        .collect();
    let sql = format!(
        "SELECT {} FROM connections c WHERE {} ORDER BY {} LIMIT ? OFFSET ?",
        cols.join(", "),
        w.sql(),
        by.join(", "),
    );
    let mut vals = w.values;
    vals.extend([Sql::Integer(q.limit), Sql::Integer(q.offset)]);
    // source_name goes right after source_ip; it comes from the router's tables, not from SQL.
    let names = devices.map(|d| d.table()).unwrap_or_default();
    let mut names_at = 0;
    let mut header: Vec<&str> = Vec::with_capacity(COLUMNS.len() + 1);
    for (n, _) in COLUMNS {
        header.push(n);
        if *n == "source_ip" {
            names_at = header.len();
            header.push("source_name");
        }
    }
    let mut table = Table::new(header);
    let mut stmt = db.prepare(&sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(vals))?;
    while let Some(r) = rows.next()? {
        let mut row = read_row(r)?;
        let name = match &row[names_at - 1] {
            Value::String(ip) => names.get(ip).map(|d| d.name.clone()).unwrap_or_default(),
            _ => String::new(),
        };
        row.insert(names_at, json!(name));
        table.rows.push(row);
    }
    Ok(Answer::Rows {
        table,
        format: q.format,
        total_count: Some(total_count),
    })
}

/// `total_count`: the rows `w` (the filters, range and state of `q`) selects, from the rollups where they
/// give the same number.
fn total_count(db: &Connection, rollups: bool, q: &Query, w: &Where) -> ApiResult<i64> {
    let f = &q.f;
    let count = |w: &Where| -> ApiResult<i64> {
        Ok(db.query_row(
            &format!("SELECT count(*) FROM connections c WHERE {}", w.sql()),
            rusqlite::params_from_iter(w.values.iter()),
            |r| r.get(0),
        )?)
    };
    let from_rollup = rollups && !f.has_range() && !f.has_row_filters_besides_agent();
    Ok(match q.state {
        // The same number from the hourly rollup, without counting a million index entries.
        ConnState::Any if from_rollup => super::stats::summary(db, rollups, f)?.count,
        // Every connection but the open ones (few, and counted from their partial index).
        ConnState::Closed if from_rollup => {
            let agent = Filters {
                agent_id: f.agent_id.clone(),
                ..Filters::default()
            };
            let mut open = Where::from_filters(&agent, Match::Exact);
            open.push("c.end_ms IS NULL", Vec::new());
            super::stats::summary(db, rollups, f)?.count - count(&open)?
        }
        _ => count(w)?,
    })
}

/// One row's [`COLUMNS`] as JSON values.
fn read_row(r: &rusqlite::Row) -> ApiResult<Vec<Value>> {
    let mut row = Vec::with_capacity(COLUMNS.len());
    for (i, (name, _)) in COLUMNS.iter().enumerate() {
        let v = if TIME_COLUMNS.contains(name) {
            match r.get::<_, Option<i64>>(i)? {
                Some(ms) => json!(format_rfc3339(ms, true)),
                None => Value::Null,
            }
        } else if INT_COLUMNS.contains(name) {
            json!(r.get::<_, i64>(i)?)
        } else {
            json!(r.get::<_, String>(i)?)
        };
        row.push(v);
    }
    Ok(row)
}
