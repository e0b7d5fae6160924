//! `GET /api/v1/filter-options`: distinct values of one field, for filter pickers in a UI.

use super::params::{ApiResult, Params, HOST_KEY, MAX_ROWS};
use super::table::{Answer, Table};
use rusqlite::types::Value as Sql;
use rusqlite::Connection;
use serde_json::json;

/// `GET /filter-options?filter_type=F&query=Q&limit=N`.
pub fn handle(db: &Connection, rollups: bool, p: &Params) -> ApiResult<Answer> {
    // (name, SQL expression of the value, is the geoip array)
    let (field, expr, geo) = p.choice(
        "filter_type",
        &[
            ("agent_id", ("agent_id", "c.agent_id", false)),
            ("network", ("network", "c.network", false)),
            ("rule", ("rule", "c.rule", false)),
            ("process", ("process", "c.process", false)),
            ("destination", ("destination", "c.destination_ip", false)),
            // The host, or the destination IP without one: the key of group_by=host and of the `host` filter.
            ("host", ("host", HOST_KEY, false)),
            ("geoip", ("geoip", "c.destination_geoip", true)),
            ("source_ip", ("source_ip", "c.source_ip", false)),
            ("policy", ("policy", "c.policy", false)),
            ("node", ("node", "c.node", false)),
            ("inbound", ("inbound", "c.inbound_name", false)),
            (
                "destination_port",
                ("destination_port", "c.destination_port", false),
            ),
        ],
        ("", "", false),
    )?;
    if field.is_empty() {
        return Err(super::params::ApiError::bad(
            "filter_type",
            "required; one of agent_id|network|rule|process|destination|host|geoip|source_ip|policy|node|inbound|destination_port",
        ));
    }
    let limit = p.uint("limit", 100, 1, MAX_ROWS)? as i64;
    if geo {
        return geo_options(db, p.get("query"), limit);
    }
    let mut vals = Vec::new();
    let query = match p.get("query") {
        Some(q) => {
            vals.push(Sql::Text(q.to_string()));
            " AND instr(lower(v), lower(?)) > 0"
        }
        None => "",
    };
    vals.push(Sql::Integer(limit));
    let sql = if rollups && field == "host" {
        // Distinct host keys in key order, from the per-host rollup.
        format!("SELECT host AS v FROM rollup_host WHERE conns > 0 AND v <> ''{query} ORDER BY v LIMIT ?")
    } else {
        format!(
            "SELECT DISTINCT {expr} AS v FROM connections c WHERE v IS NOT NULL AND v <> ''{query} ORDER BY v LIMIT ?"
        )
    };
    let mut stmt = db.prepare(&sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(vals))?;
    let mut table = Table::new(["field", "label", "value"]);
    while let Some(r) = rows.next()? {
        let v: String = r.get(0)?;
        table.rows.push(vec![json!(field), json!(v), json!(v)]);
    }
    Ok(Answer::Data(table.to_json()))
}

/// The countries of every `destination_geoip` array (see [`super::stats::geo_keys`]), in byte order, those
/// containing `query` (ASCII case-insensitive, as SQLite's `lower`) when given.
fn geo_options(db: &Connection, query: Option<&str>, limit: i64) -> ApiResult<Answer> {
    let query = query.map(str::to_ascii_lowercase);
    let mut stmt = db.prepare("SELECT DISTINCT destination_geoip FROM connections")?;
    let mut rows = stmt.query([])?;
    let mut found = Vec::new();
    while let Some(r) = rows.next()? {
        for v in super::stats::geo_keys(&r.get::<_, String>(0)?) {
            let wanted = match &query {
                Some(q) => v.to_ascii_lowercase().contains(q.as_str()),
                None => true,
            };
            if wanted && !v.is_empty() {
                found.push(v);
            }
        }
    }
    // All ranked equal: sorted by value (the API's one sort, see `rank`).
    let mut sorted: Vec<(&String, i64)> = found.iter().map(|v| (v, 0)).collect();
    super::stats::rank(&mut sorted);
    sorted.dedup();
    let mut table = Table::new(["field", "label", "value"]);
    for (v, _) in sorted.into_iter().take(limit as usize) {
        table.rows.push(vec![json!("geoip"), json!(v), json!(v)]);
    }
    Ok(Answer::Data(table.to_json()))
}
