//! `GET /api/v1/stats`: summary, group and time-series aggregates.
//!
//! What `from`/`to` mean (`[from, to)`, UTC): a connection is counted when its `start` is in range, and bytes
//! are the per-minute `traffic` buckets whose minute starts in range, so bytes land where they flowed and
//! a time series summed over a range equals the summary over that range. Without `from` and `to`, count and
//! bytes are those of every matching connection (its latest totals). Every path below computes the same
//! numbers; the rollup paths ([`super::rollup`]) only make unfiltered questions cheap.

use super::params::{
    start_in, ApiError, ApiResult, Filters, Format, Match, Order, Params, Where, HOST_KEY,
    MAX_ROWS, START_IN,
};
use super::rollup::HOUR_MS;
use super::table::{Answer, Table};
use crate::timefmt::{self, Interval, DAY_MS, MINUTE_MS};
use rusqlite::types::Value as Sql;
use rusqlite::Connection;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};

/// The most points one time series may have.
pub const MAX_POINTS: i64 = 20_000;

/// Count and bytes of a set of connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub count: i64,
    pub upload: i64,
    pub download: i64,
}

impl Totals {
    fn add(&mut self, o: Totals) {
        self.count += o.count;
        self.upload += o.upload;
        self.download += o.download;
    }

    /// download + upload.
    pub fn total(&self) -> i64 {
        self.upload + self.download
    }

    /// The `count`, `download`, `upload` and `total` cells of a table row.
    fn cells(&self) -> [Value; 4] {
        [
            json!(self.count),
            json!(self.download),
            json!(self.upload),
            json!(self.total()),
        ]
    }

    fn json(&self) -> Value {
        json!({"count": self.count, "download": self.download, "upload": self.upload, "total": self.total()})
    }
}

/// `GET /stats`.
/// `devices` names the devices of `group_by=source_ip` (fields `mac` and `name` next to `source_ip`).
pub fn handle(
    db: &Connection,
    rollups: bool,
    p: &Params,
    devices: Option<&crate::devices::Devices>,
) -> ApiResult<Answer> {
    #[derive(Clone, Copy)]
    enum Kind {
        Summary,
        Group,
        Series,
    }
    let kind = p.choice(
        "type",
        &[
            ("summary", Kind::Summary),
            ("group", Kind::Group),
            ("timeseries", Kind::Series),
        ],
        Kind::Summary,
    )?;
    let f = Filters::parse(p)?;
    match kind {
        Kind::Summary => Ok(Answer::Data(summary(db, rollups, &f)?.json().to_string())),
        Kind::Group => group(db, rollups, &f, p, devices),
        Kind::Series => series(db, rollups, &f, p),
    }
}

fn ceil_div(a: i64, b: i64) -> i64 {
    -((-a).div_euclid(b))
}

/// The summary under the rules in the module doc.
pub fn summary(db: &Connection, rollups: bool, f: &Filters) -> ApiResult<Totals> {
    if f.has_range() {
        let (lo, hi) = f.range();
        let mut t = Totals::default();
        for v in accumulate(db, rollups, f, lo, hi, DAY_MS)?.values() {
            t.add(*v);
        }
        return Ok(t);
    }
    if rollups && !f.has_row_filters_besides_agent() {
        let mut w = Where::default();
        if let Some(a) = &f.agent_id {
            w.push("agent_id = ?", vec![Sql::Text(a.clone())]);
        }
        let sql = format!(
            "SELECT coalesce(sum(conns), 0), coalesce(sum(upload), 0), coalesce(sum(download), 0)
             FROM rollup_conn_hour WHERE {}",
            w.sql()
        );
        return totals_row(db, &sql, w.values);
    }
    let w = Where::from_filters(f, Match::Exact);
    let sql = format!(
        "SELECT count(*), coalesce(sum(c.upload), 0), coalesce(sum(c.download), 0)
         FROM connections c WHERE {}",
        w.sql()
    );
    totals_row(db, &sql, w.values)
}

fn totals_row(db: &Connection, sql: &str, values: Vec<Sql>) -> ApiResult<Totals> {
    Ok(db.query_row(sql, rusqlite::params_from_iter(values), |r| {
        Ok(Totals {
            count: r.get(0)?,
            upload: r.get(1)?,
            download: r.get(2)?,
        })
    })?)
}

/// Counts (by start) and bytes (by minute flowed) in `[lo, hi)`, in buckets of `unit_ms` (a minute, an hour
/// or a day), keyed by bucket start.
fn accumulate(
    db: &Connection,
    rollups: bool,
    f: &Filters,
    lo: i64,
    hi: i64,
    unit_ms: i64,
) -> ApiResult<BTreeMap<i64, Totals>> {
    let mut out = BTreeMap::new();
    if lo >= hi {
        return Ok(out);
    }
    if rollups && !f.has_row_filters_besides_agent() && unit_ms >= HOUR_MS {
        let (h1, h2) = (ceil_div(lo, HOUR_MS), hi.div_euclid(HOUR_MS));
        if h1 < h2 {
            raw(db, f, lo, h1 * HOUR_MS, unit_ms, &mut out)?;
            from_rollups(db, f.agent_id.as_deref(), h1, h2, unit_ms, &mut out)?;
            raw(db, f, h2 * HOUR_MS, hi, unit_ms, &mut out)?;
            return Ok(out);
        }
    }
    raw(db, f, lo, hi, unit_ms, &mut out)?;
    Ok(out)
}

fn raw(
    db: &Connection,
    f: &Filters,
    lo: i64,
    hi: i64,
    unit_ms: i64,
    out: &mut BTreeMap<i64, Totals>,
) -> ApiResult<()> {
    if lo >= hi {
        return Ok(());
    }
    let mut w = Where::from_filters(f, Match::Exact);
    let filtered = !w.is_empty();
    w.start_in(lo, hi);
    let sql = format!(
        "SELECT c.start_ms / ?, count(*) FROM connections c WHERE {} GROUP BY 1",
        w.sql()
    );
    let mut vals = vec![Sql::Integer(unit_ms)];
    vals.extend(w.values);
    let vals = rusqlite::params_from_iter(vals);
    add_buckets(db, &sql, vals, Sums::Count, unit_ms, out)?;

    let (m1, m2) = (ceil_div(lo, MINUTE_MS), ceil_div(hi, MINUTE_MS));
    let per = unit_ms / MINUTE_MS;
    if !filtered {
        let sql = "SELECT minute / ?1, sum(upload), sum(download) FROM traffic
             WHERE minute >= ?2 AND minute < ?3 GROUP BY 1";
        return add_buckets(db, sql, [per, m1, m2], Sums::Bytes, unit_ms, out);
    }
    // Filtered: the matching connections once (one pass over the table), then the traffic rows in range
    // from the covering `traffic_minute` index, kept when their connection matched. Joining each traffic
    // row to its connection instead looks a connection up once per minute it moved bytes (hundreds of
    // thousands of lookups for a 24 h range of a busy router: a second of CPU per summary or series).
    // The set is bounded ([`MAX_MATCHING`], about 2 MB): beyond, the join, slower but in constant memory.
    let w = Where::from_filters(f, Match::Exact);
    let mut matching = std::collections::HashSet::new();
    let mut stmt = db.prepare(&format!("SELECT c.pk FROM connections c WHERE {}", w.sql()))?;
    let mut rows = stmt.query(rusqlite::params_from_iter(w.values.iter()))?;
    while let Some(r) = rows.next()? {
        if matching.len() == MAX_MATCHING {
            return raw_traffic_join(db, w, per, m1, m2, unit_ms, out);
        }
        matching.insert(r.get::<_, i64>(0)?);
    }
    drop(rows);
    if matching.is_empty() {
        return Ok(());
    }
    let mut stmt = db.prepare(
        "SELECT minute / ?1, conn, upload, download FROM traffic WHERE minute >= ?2 AND minute < ?3",
    )?;
    let mut rows = stmt.query([per, m1, m2])?;
    while let Some(r) = rows.next()? {
        if !matching.contains(&r.get::<_, i64>(1)?) {
            continue;
        }
        let b: i64 = r.get(0)?;
        let e = out.entry(b * unit_ms).or_default();
        e.upload += r.get::<_, i64>(2)?;
        e.download += r.get::<_, i64>(3)?;
    }
    Ok(())
}

/// Matching connections [`raw`] keeps in a set at most.
const MAX_MATCHING: usize = 100_000;

/// [`raw`]'s traffic sums joining each traffic row in range to its connection (CROSS JOIN keeps traffic
/// outermost: walk the minute range by index, then look up each connection by key; SQLite would otherwise
/// start from an agent's (large) set of connections).
fn raw_traffic_join(
    db: &Connection,
    mut w: Where,
    per: i64,
    m1: i64,
    m2: i64,
    unit_ms: i64,
    out: &mut BTreeMap<i64, Totals>,
) -> ApiResult<()> {
    w.push(
        "t.minute >= ? AND t.minute < ?",
        vec![Sql::Integer(m1), Sql::Integer(m2)],
    );
    let sql = format!(
        "SELECT t.minute / ?, sum(t.upload), sum(t.download)
         FROM traffic t CROSS JOIN connections c ON c.pk = t.conn WHERE {} GROUP BY 1",
        w.sql()
    );
    let mut vals = vec![Sql::Integer(per)];
    vals.extend(w.values);
    let vals = rusqlite::params_from_iter(vals);
    add_buckets(db, &sql, vals, Sums::Bytes, unit_ms, out)
}

fn from_rollups(
    db: &Connection,
    agent: Option<&str>,
    h1: i64,
    h2: i64,
    unit_ms: i64,
    out: &mut BTreeMap<i64, Totals>,
) -> ApiResult<()> {
    let per = unit_ms / HOUR_MS;
    let agent_cond = if agent.is_some() {
        "agent_id = ?4"
    } else {
        "?4 IS NULL"
    };
    let vals = rusqlite::params![per, h1, h2, agent];
    let sql = format!(
        "SELECT hour / ?1, sum(conns) FROM rollup_conn_hour WHERE hour >= ?2 AND hour < ?3 AND {agent_cond}
         GROUP BY 1"
    );
    add_buckets(db, &sql, vals, Sums::Count, unit_ms, out)?;
    let sql = format!(
        "SELECT hour / ?1, sum(upload), sum(download) FROM rollup_traffic_hour
         WHERE hour >= ?2 AND hour < ?3 AND {agent_cond} GROUP BY 1"
    );
    add_buckets(db, &sql, vals, Sums::Bytes, unit_ms, out)
}

/// What a bucket query's columns after the first (the bucket's number) hold.
#[derive(Clone, Copy)]
enum Sums {
    /// A count of connections.
    Count,
    /// Upload, then download bytes.
    Bytes,
}

/// Runs `sql` and adds each of its rows into the bucket of `out` it names (bucket number × `unit_ms`).
fn add_buckets(
    db: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    sums: Sums,
    unit_ms: i64,
    out: &mut BTreeMap<i64, Totals>,
) -> ApiResult<()> {
    let mut stmt = db.prepare(sql)?;
    let mut rows = stmt.query(params)?;
    while let Some(r) = rows.next()? {
        let b: i64 = r.get(0)?;
        let e = out.entry(b * unit_ms).or_default();
        match sums {
            Sums::Count => e.count += r.get::<_, i64>(1)?,
            Sums::Bytes => {
                e.upload += r.get::<_, i64>(1)?;
                e.download += r.get::<_, i64>(2)?;
            }
        }
    }
    Ok(())
}

/// A `group_by` dimension: its key field and SQL expression (fixed strings; user input never reaches SQL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dim {
    pub field: &'static str,
    expr: &'static str,
}

/// Accepted `group_by` values, for messages and docs.
pub const GROUP_KEYS: &str = "network|process|destination|host|rule|chains|node|policy|geoip|source_ip|inbound|agent_id|destination_port";

/// The geoip key in SQL is the whole JSON array; [`geo_keys`] splits it (SQLite is built without its JSON
/// functions, 31 KB of the router binary).
const GEO_EXPR: &str = "c.destination_geoip";

/// The group keys of one `destination_geoip` array, as `json_each` over it gave them: one per element
/// (duplicates included), "" for a null element, and one "" when the text is not a JSON array or is empty.
/// Strings are unescaped, `true`/`false` are 1/0, numbers and nested values their JSON text (as serde_json
/// writes it: `1e300` and the key order of an object differ from SQLite; mihomo writes country codes).
pub(super) fn geo_keys(raw: &str) -> Vec<String> {
    let items = match serde_json::from_str::<Value>(raw) {
        Ok(Value::Array(items)) if !items.is_empty() => items,
        _ => return vec![String::new()],
    };
    items
        .into_iter()
        .map(|v| match v {
            Value::String(s) => s,
            Value::Null => String::new(),
            Value::Bool(b) => u8::from(b).to_string(),
            other => other.to_string(),
        })
        .collect()
}

/// Parses one `group_by` word.
pub fn dim(word: &str) -> Option<Dim> {
    let (field, expr) = match word {
        "network" => ("network", "c.network"),
        "process" => ("process", "c.process"),
        "destination" => ("destination_ip", "c.destination_ip"),
        "host" => ("host", HOST_KEY),
        "rule" => (
            "rule",
            "(CASE WHEN c.rule_payload <> '' THEN c.rule || ' (' || c.rule_payload || ')' ELSE c.rule END)",
        ),
        "chains" | "node" => ("node", "c.node"),
        "policy" => ("policy", "c.policy"),
        "geoip" => ("destination_geoip", GEO_EXPR),
        "source_ip" => ("source_ip", "c.source_ip"),
        "inbound" => ("inbound", "c.inbound_name"),
        "agent_id" => ("agent_id", "c.agent_id"),
        "destination_port" => ("destination_port", "c.destination_port"),
        _ => return None,
    };
    Some(Dim { field, expr })
}

/// `group_by=a` or `group_by=a,b`.
pub fn parse_dims(p: &Params) -> ApiResult<Vec<Dim>> {
    let raw = p.get("group_by").ok_or_else(|| {
        ApiError::bad(
            "group_by",
            format!("required with type=group; one or two of {GROUP_KEYS}, comma-separated"),
        )
    })?;
    let mut dims = Vec::new();
    for word in raw.split(',').map(str::trim) {
        let d = dim(word).ok_or_else(|| {
            ApiError::bad(
                "group_by",
                format!("'{}' is not one of {GROUP_KEYS}", super::params::clip(word)),
            )
        })?;
        if dims.iter().any(|x: &Dim| x.field == d.field) {
            return Err(ApiError::bad("group_by", "the same key twice"));
        }
        dims.push(d);
    }
    if dims.len() > 2 {
        return Err(ApiError::bad("group_by", "at most two keys"));
    }
    Ok(dims)
}

/// The sort metric of groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Count,
    Download,
    Upload,
    Total,
}

impl Metric {
    fn sql(self) -> &'static str {
        match self {
            Metric::Count => "n",
            Metric::Download => "down",
            Metric::Upload => "up",
            Metric::Total => "(up + down)",
        }
    }
}

/// The words of a grouping's `sort_by`.
const SORT_CHOICES: &[(&str, Metric)] = &[
    ("count", Metric::Count),
    ("download", Metric::Download),
    ("upload", Metric::Upload),
    ("total", Metric::Total),
];

/// The words of a time series' `metric`.
const SERIES_METRICS: &[(&str, Metric)] = &[
    ("connections", Metric::Count),
    ("download", Metric::Download),
    ("upload", Metric::Upload),
    ("total", Metric::Total),
];

/// The SQL of a grouping (without ORDER/LIMIT) and its bound values.
fn group_sql(f: &Filters, dims: &[Dim]) -> (String, Vec<Sql>) {
    let keys: Vec<String> = dims
        .iter()
        .enumerate()
        .map(|(i, d)| format!("{} AS k{i}", d.expr))
        .collect();
    let keys = keys.join(", ");
    let outer: Vec<String> = (0..dims.len()).map(|i| format!("k{i}")).collect();
    let outer = outer.join(", ");
    let by: Vec<String> = (1..=dims.len()).map(|i| i.to_string()).collect();
    let by = by.join(", ");
    let w = Where::from_filters(f, Match::Exact);
    if !f.has_range() {
        let sql = format!(
            "SELECT {keys}, count(*) AS n, coalesce(sum(c.upload), 0) AS up, coalesce(sum(c.download), 0) AS down
             FROM connections c WHERE {} GROUP BY {by}",
            w.sql()
        );
        return (sql, w.values);
    }
    let (lo, hi) = f.range();
    let sql = format!(
        "SELECT {outer}, sum(n) AS n, sum(up) AS up, sum(down) AS down FROM (
            SELECT {keys}, 1 AS n, 0 AS up, 0 AS down FROM connections c
            WHERE {w} AND {START_IN}
            UNION ALL
            SELECT {keys}, 0, t.up, t.down FROM (
                SELECT conn, sum(upload) AS up, sum(download) AS down FROM traffic
                WHERE minute >= ? AND minute < ? GROUP BY conn
            ) t CROSS JOIN connections c ON c.pk = t.conn
            WHERE {w}
         ) GROUP BY {by}",
        w = w.sql()
    );
    // The traffic rows in range are summed per connection first (walking the `traffic_minute` index), so
    // each connection is looked up and keyed once, not once per minute it moved bytes: a 24 h range of a busy
    // router has dozens of rows per connection, and the final GROUP BY sorts that many fewer rows.
    let mut vals = w.values.clone();
    vals.extend(start_in(lo, hi));
    vals.extend([
        Sql::Integer(ceil_div(lo, MINUTE_MS)),
        Sql::Integer(ceil_div(hi, MINUTE_MS)),
    ]);
    vals.extend(w.values);
    (sql, vals)
}

fn group(
    db: &Connection,
    rollups: bool,
    f: &Filters,
    p: &Params,
    devices: Option<&crate::devices::Devices>,
) -> ApiResult<Answer> {
    let dims = parse_dims(p)?;
    // Rows by device also say which device: its MAC and name ("" when unknown), right after source_ip.
    let names = dims
        .iter()
        .any(|d| d.field == "source_ip")
        .then(|| devices.map(|d| d.table()).unwrap_or_default());
    let sort = p.choice("sort_by", SORT_CHOICES, Metric::Total)?;
    let order = Order::parse(p)?;
    let limit = p.uint("limit", MAX_ROWS, 1, MAX_ROWS)? as i64;
    let other = p.flag("other")?;
    let format = Format::parse(p)?;

    // (keys, totals) of at most `limit + 1` groups, in answer order; with geoip or a range also the sum of all
    // groups.
    let (groups, summed) = match dims.iter().position(|d| d.expr == GEO_EXPR) {
        Some(g) => {
            let (groups, all) = geo_groups(db, f, &dims, g, sort, order)?;
            (
                groups.into_iter().take(limit as usize + 1).collect(),
                Some(all),
            )
        }
        // Every connection is in exactly one group: their sum is the summary, without a second scan.
        None if f.has_range() => {
            let (groups, all) = ranged_groups(db, f, &dims, sort, order, limit)?;
            (groups, Some(all))
        }
        None => (sql_groups(db, rollups, f, &dims, sort, order, limit)?, None),
    };
    let mut table = Table::new(group_columns(&dims));
    let mut shown = Totals::default();
    let truncated = groups.len() as i64 > limit;
    for (keys, t) in groups.into_iter().take(limit as usize) {
        shown.add(t);
        let mut row: Vec<Value> = Vec::with_capacity(dims.len() + 4);
        for (key, d) in keys.into_iter().zip(&dims) {
            let device = match (&names, d.field) {
                (Some(names), "source_ip") => Some(names.get(&key).cloned().unwrap_or_default()),
                _ => None,
            };
            row.push(Value::String(key));
            if let Some(dev) = device {
                row.extend([Value::String(dev.mac), Value::String(dev.name)]);
            }
        }
        row.extend(t.cells());
        table.rows.push(row);
    }
    if other && truncated {
        let all = match summed {
            // With geoip a connection with several countries is in several groups: sum the groups, not the
            // connections. A ranged grouping summed its groups already.
            Some(all) => all,
            None => summary(db, rollups, f)?,
        };
        let rest = Totals {
            count: all.count - shown.count,
            upload: all.upload - shown.upload,
            download: all.download - shown.download,
        };
        let keys = dims.len() + if names.is_some() { 2 } else { 0 };
        let mut row: Vec<Value> = vec![Value::Null; keys];
        row.extend(rest.cells());
        table.rows.push(row);
    }
    Ok(match format {
        Format::Json => Answer::Data(table.to_json()),
        _ => Answer::Rows {
            table,
            format,
            total_count: None,
        },
    })
}

/// The columns of a grouping: its keys (`source_ip` followed by the device's `mac` and `name`), then the
/// totals.
fn group_columns(dims: &[Dim]) -> Vec<&'static str> {
    let mut columns: Vec<&str> = Vec::new();
    for d in dims {
        columns.push(d.field);
        if d.field == "source_ip" {
            columns.extend(["mac", "name"]);
        }
    }
    columns.extend(["count", "download", "upload", "total"]);
    columns
}

/// The keys of one group (one per dimension) and its totals.
type Group = (Vec<String>, Totals);

/// The group keys and totals of one row of a grouping query.
fn group_row(r: &rusqlite::Row, k: usize) -> rusqlite::Result<Group> {
    let mut keys = Vec::with_capacity(k);
    for i in 0..k {
        keys.push(r.get::<_, Option<String>>(i)?.unwrap_or_default());
    }
    let t = Totals {
        count: r.get(k)?,
        upload: r.get(k + 1)?,
        download: r.get(k + 2)?,
    };
    Ok((keys, t))
}

/// `base` (a grouping query with `ndims` key columns first) sorted by `sort` then by its keys, cut at a bound
/// `LIMIT`. Sorted outside: in the ranged query `up`/`down` are also the inner columns, and SQLite would take
/// an ORDER BY expression's names from there (one arbitrary row) instead of from the sums.
fn sorted_groups_sql(base: &str, ndims: usize, sort: Metric, order: Order) -> String {
    let by: Vec<String> = (1..=ndims).map(|i| i.to_string()).collect();
    format!(
        "SELECT * FROM ({base}) ORDER BY {} {}, {} LIMIT ?",
        sort.sql(),
        order.sql(),
        by.join(", ")
    )
}

/// The first `limit + 1` groups, sorted and cut by SQLite.
fn sql_groups(
    db: &Connection,
    rollups: bool,
    f: &Filters,
    dims: &[Dim],
    sort: Metric,
    order: Order,
    limit: i64,
) -> ApiResult<Vec<Group>> {
    let by_host_only = dims.len() == 1 && dims[0].field == "host";
    let (base, mut vals) = if rollups && by_host_only && !f.has_range() && !f.has_row_filters() {
        // Same rows as group_sql, from the per-host rollup instead of a million connections.
        (
            "SELECT host AS k0, conns AS n, upload AS up, download AS down FROM rollup_host WHERE conns > 0"
                .to_string(),
            Vec::new(),
        )
    } else {
        group_sql(f, dims)
    };
    let sql = sorted_groups_sql(&base, dims.len(), sort, order);
    vals.push(Sql::Integer(limit + 1));
    let mut stmt = db.prepare(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(vals), |r| {
        group_row(r, dims.len())
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The first `limit + 1` groups of a ranged grouping, the same rows and order as [`group_sql`] with
/// [`sql_groups`]'s ORDER BY, summed here instead of by SQLite: the traffic rows in range are read once from
/// the covering `traffic_minute` index into per-connection sums, then each connection's keys are read once.
/// SQLite would sort every traffic row (a 24 h range of a busy router: hundreds of thousands, half a second
/// and tens of MB of sorter memory) to group them; here memory follows the connections in range, not
/// their minutes. NULL keys stay apart from "" and sort first, as in SQL. Also returns the sum of all
/// groups, which is the range's summary (each connection is in one group).
fn ranged_groups(
    db: &Connection,
    f: &Filters,
    dims: &[Dim],
    sort: Metric,
    order: Order,
    limit: i64,
) -> ApiResult<(Vec<Group>, Totals)> {
    let (lo, hi) = f.range();
    // A BTreeMap grows a node at a time (a HashMap of 100,000 connections doubles into 6 MB, holding both
    // tables while it moves) and yields the leftovers in key order, for the lookups below.
    let mut bytes: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    {
        let mut stmt = db.prepare(
            "SELECT conn, upload, download FROM traffic WHERE minute >= ?1 AND minute < ?2",
        )?;
        let mut rows = stmt.query([ceil_div(lo, MINUTE_MS), ceil_div(hi, MINUTE_MS)])?;
        while let Some(r) = rows.next()? {
            let e = bytes.entry(r.get(0)?).or_default();
            e.0 += r.get::<_, i64>(1)?;
            e.1 += r.get::<_, i64>(2)?;
        }
    }
    let k = dims.len();
    let keys: Vec<&str> = dims.iter().map(|d| d.expr).collect();
    let keys = keys.join(", ");
    let read_keys = |r: &rusqlite::Row| -> rusqlite::Result<Vec<Option<String>>> {
        (1..=k).map(|i| r.get::<_, Option<String>>(i)).collect()
    };
    let w = Where::from_filters(f, Match::Exact);
    let mut groups: HashMap<Vec<Option<String>>, Totals> = HashMap::new();
    // Connections that started in range count, with the bytes they moved in it.
    let mut stmt = db.prepare(&format!(
        "SELECT c.pk, {keys} FROM connections c WHERE {} AND {START_IN}",
        w.sql()
    ))?;
    let mut vals = w.values.clone();
    vals.extend(start_in(lo, hi));
    let mut rows = stmt.query(rusqlite::params_from_iter(vals))?;
    while let Some(r) = rows.next()? {
        let g = groups.entry(read_keys(r)?).or_default();
        g.count += 1;
        if let Some((up, down)) = bytes.remove(&r.get::<_, i64>(0)?) {
            g.upload += up;
            g.download += down;
        }
    }
    drop(rows);
    // Connections that started before and moved bytes in range: their bytes only.
    let mut stmt = db.prepare(&format!(
        "SELECT c.pk, {keys} FROM connections c WHERE c.pk = ? AND {}",
        w.sql()
    ))?;
    for (pk, (up, down)) in bytes {
        let mut vals = vec![Sql::Integer(pk)];
        vals.extend(w.values.iter().cloned());
        let mut rows = stmt.query(rusqlite::params_from_iter(vals))?;
        if let Some(r) = rows.next()? {
            let g = groups.entry(read_keys(r)?).or_default();
            g.upload += up;
            g.download += down;
        }
    }
    let metric = |t: &Totals| match sort {
        Metric::Count => t.count,
        Metric::Download => t.download,
        Metric::Upload => t.upload,
        Metric::Total => t.total(),
    };
    let mut all = Totals::default();
    for t in groups.values() {
        all.add(*t);
    }
    let mut out: Vec<(Vec<Option<String>>, Totals)> = groups.into_iter().collect();
    out.sort_unstable_by(|a, b| {
        let by = metric(&a.1).cmp(&metric(&b.1));
        let by = if order == Order::Desc {
            by.reverse()
        } else {
            by
        };
        by.then_with(|| a.0.cmp(&b.0))
    });
    out.truncate(usize::try_from(limit).unwrap_or(0).saturating_add(1));
    let out = out
        .into_iter()
        .map(|(keys, t)| (keys.into_iter().map(Option::unwrap_or_default).collect(), t))
        .collect();
    Ok((out, all))
}

/// A bucket's start, upload and download.
#[cfg(test)]
pub(super) type BucketBytes = (i64, i64, i64);

/// The byte sums per `unit_ms` bucket of a filtered `query` from [`raw`] (the set of matching connections)
/// and from [`raw_traffic_join`] (its fallback beyond [`MAX_MATCHING`]), for tests that they agree.
#[cfg(test)]
pub(super) fn raw_both_ways(
    db: &Connection,
    query: &str,
    unit_ms: i64,
) -> (Vec<BucketBytes>, Vec<BucketBytes>) {
    let p = Params::parse(query).unwrap();
    let f = Filters::parse(&p).unwrap();
    let (lo, hi) = f.range();
    let (lo, hi) = (lo.max(0), hi.min(4_000_000_000_000));
    let bytes = |m: BTreeMap<i64, Totals>| -> Vec<BucketBytes> {
        m.into_iter()
            .filter(|(_, t)| t.upload != 0 || t.download != 0)
            .map(|(b, t)| (b, t.upload, t.download))
            .collect()
    };
    let mut set = BTreeMap::new();
    raw(db, &f, lo, hi, unit_ms, &mut set).unwrap();
    let mut join = BTreeMap::new();
    let w = Where::from_filters(&f, Match::Exact);
    let (m1, m2) = (ceil_div(lo, MINUTE_MS), ceil_div(hi, MINUTE_MS));
    raw_traffic_join(db, w, unit_ms / MINUTE_MS, m1, m2, unit_ms, &mut join).unwrap();
    (bytes(set), bytes(join))
}

/// The groups of `query` (a ranged `type=group` query string) from [`ranged_groups`] and from SQLite
/// ([`group_sql`] with [`sql_groups`]'s ORDER BY), for tests that they agree.
#[cfg(test)]
pub(super) fn ranged_both_ways(db: &Connection, query: &str) -> (Vec<Group>, Vec<Group>) {
    let p = Params::parse(query).unwrap();
    let f = Filters::parse(&p).unwrap();
    assert!(f.has_range(), "{query}");
    let dims = parse_dims(&p).unwrap();
    let sort = p.choice("sort_by", SORT_CHOICES, Metric::Total).unwrap();
    let order = Order::parse(&p).unwrap();
    let limit = p.uint("limit", MAX_ROWS, 1, MAX_ROWS).unwrap() as i64;
    let (mine, all) = ranged_groups(db, &f, &dims, sort, order, limit).unwrap();
    assert_eq!(
        all,
        summary(db, false, &f).unwrap(),
        "{query}: the sum of the groups"
    );
    let (base, mut vals) = group_sql(&f, &dims);
    let sql = sorted_groups_sql(&base, dims.len(), sort, order);
    vals.push(Sql::Integer(limit + 1));
    let mut stmt = db.prepare(&sql).unwrap();
    let theirs = stmt
        .query_map(rusqlite::params_from_iter(vals), |r| {
            group_row(r, dims.len())
        })
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    (mine, theirs)
}

/// Sorts (label, value) pairs by value, largest first, then by label in byte order (as SQLite compares
/// text). Every ranking in the API sorts through this one function: each instantiation of the standard
/// sort costs kilobytes of the router binary.
pub(super) fn rank(pairs: &mut [(&String, i64)]) {
    pairs.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
}

/// Every group of a grouping with geoip (dimension `g`), sorted as [`sql_groups`] sorts (the metric, then
/// the keys in byte order), and the sum of all groups. SQLite groups by the whole array; each of its
/// countries then gets the array's totals.
fn geo_groups(
    db: &Connection,
    f: &Filters,
    dims: &[Dim],
    g: usize,
    sort: Metric,
    order: Order,
) -> ApiResult<(Vec<Group>, Totals)> {
    let (sql, vals) = group_sql(f, dims);
    let mut stmt = db.prepare(&sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(vals))?;
    // Keyed by the keys joined with NUL (which sorts before any other byte, so the joined keys sort as the
    // keys do): the same map type as the metrics scan, which keeps the binary smaller.
    let mut groups: HashMap<String, Totals> = HashMap::new();
    let mut all = Totals::default();
    while let Some(r) = rows.next()? {
        let (keys, t) = group_row(r, dims.len())?;
        for country in geo_keys(&keys[g]) {
            let mut key = String::new();
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    key.push('\0');
                }
                key.push_str(if i == g { &country } else { k });
            }
            groups.entry(key).or_default().add(t);
            all.add(t);
        }
    }
    let mut ranked: Vec<(&String, i64)> = groups
        .iter()
        .map(|(k, t)| {
            let m = match sort {
                Metric::Count => t.count,
                Metric::Download => t.download,
                Metric::Upload => t.upload,
                Metric::Total => t.total(),
            };
            (k, if order == Order::Asc { -m } else { m })
        })
        .collect();
    rank(&mut ranked);
    let groups = ranked
        .into_iter()
        .map(|(k, _)| (k.split('\0').map(str::to_string).collect(), groups[k]))
        .collect();
    Ok((groups, all))
}

/// The approximate length of a bucket, to bound the number of points before querying.
fn approx_ms(i: Interval) -> i64 {
    match i {
        Interval::Minute => MINUTE_MS,
        Interval::Hour => HOUR_MS,
        Interval::Day => DAY_MS,
        Interval::Week => 7 * DAY_MS,
        Interval::Month => 28 * DAY_MS,
    }
}

/// The first and last moments with data (any agent), or None for an empty database.
fn extent(db: &Connection) -> ApiResult<Option<(i64, i64)>> {
    // One min() or max() per statement: SQLite answers each from an index edge; both in one scan the table.
    let one = |sql: &str| -> ApiResult<Option<i64>> { Ok(db.query_row(sql, [], |r| r.get(0))?) };
    // (the start indexes hold the minute: the first and last minute, then the time within it)
    let a = one("SELECT min(start_ms) FROM connections
         WHERE start_ms / 60000 = (SELECT min(start_ms / 60000) FROM connections)")?;
    let b = one("SELECT max(start_ms) FROM connections
         WHERE start_ms / 60000 = (SELECT max(start_ms / 60000) FROM connections)")?;
    let c = one("SELECT min(minute) FROM traffic")?;
    let d = one("SELECT max(minute) FROM traffic")?;
    let lo = [a, c.map(|m| m * MINUTE_MS)].into_iter().flatten().min();
    let hi = [b, d.map(|m| m * MINUTE_MS)].into_iter().flatten().max();
    Ok(lo.zip(hi).map(|(lo, hi)| (lo, hi + 1)))
}

fn series(db: &Connection, rollups: bool, f: &Filters, p: &Params) -> ApiResult<Answer> {
    let interval = p.choice("interval", Interval::NAMES, Interval::Hour)?;
    let metric = p.choice("metric", SERIES_METRICS, Metric::Total)?;
    let fill = p.choice("fill", &[("none", false), ("zero", true)], false)?;
    // Without data the zero-filled range still needs both ends.
    let (data_lo, data_hi) = match (extent(db)?, f.from_ms, f.to_ms) {
        (Some(e), _, _) => e,
        (None, Some(from), Some(to)) if fill => (from, to),
        (None, _, _) => return Ok(Answer::Data("[]".into())),
    };
    let (lo, hi) = f.range();
    // Zero-filled buckets span the asked range; otherwise only where data can be.
    let (lo, hi) = if fill {
        (f.from_ms.unwrap_or(data_lo), f.to_ms.unwrap_or(data_hi))
    } else {
        (lo.max(data_lo), hi.min(data_hi))
    };
    if lo >= hi {
        return Ok(Answer::Data("[]".into()));
    }
    let points = (hi - lo) / approx_ms(interval) + 1;
    if points > MAX_POINTS {
        return Err(ApiError::bad(
            "interval",
            format!(
                "{points} buckets from 'from' to 'to' is more than {MAX_POINTS}; choose a coarser interval or a narrower range"
            ),
        ));
    }
    let unit = match interval {
        Interval::Minute => MINUTE_MS,
        Interval::Hour => HOUR_MS,
        _ => DAY_MS,
    };
    let mut buckets: BTreeMap<i64, Totals> = BTreeMap::new();
    for (start, t) in accumulate(db, rollups, f, lo, hi, unit)? {
        buckets
            .entry(timefmt::bucket_start(start, interval))
            .or_default()
            .add(t);
    }
    if fill {
        let mut b = timefmt::bucket_start(lo, interval);
        while b < hi {
            buckets.entry(b).or_default();
            b = timefmt::next_bucket(b, interval);
        }
    }
    let mut table = Table::new(["time", "ts", "value"]);
    for (start, t) in buckets {
        let value = match metric {
            Metric::Count => t.count,
            Metric::Download => t.download,
            Metric::Upload => t.upload,
            Metric::Total => t.total(),
        };
        table.rows.push(vec![
            json!(timefmt::bucket_label(start, interval)),
            json!(start.div_euclid(1000)),
            json!(value),
        ]);
    }
    Ok(Answer::Data(table.to_json()))
}
