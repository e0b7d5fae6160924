//! Query-string parsing: percent-decoding, and typed, validated parameters (times, numbers, choices, filters)
//! built once per request before any SQL exists. Every failure is a `400` naming the parameter and what it
//! accepts.

use crate::timefmt;

/// The most rows (or groups, or time-series points) one request may return: no query can exhaust memory.
pub const MAX_ROWS: u64 = 10_000;
/// The longest value any parameter may have.
pub const MAX_VALUE_LEN: usize = 1024;

/// An answer other than success: status and an English message naming the bad input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// The `Allow` header of a `405`.
    pub allow: Option<&'static str>,
}

impl ApiError {
    /// A `400` about one parameter.
    pub fn bad(param: &str, what: impl std::fmt::Display) -> ApiError {
        ApiError::status(400, format!("invalid parameter '{param}': {what}"))
    }

    /// Any status with a message.
    pub fn status(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            allow: None,
        }
    }

    /// A database failure: the detail goes to the log, the client gets a generic message (never SQL text).
    pub fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
        crate::error!("api: {what}: {e}");
        ApiError::status(
            500,
            "internal error while reading the database; see the server log",
        )
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> ApiError {
        ApiError::internal("query failed", e)
    }
}

/// Shorthand for handler results.
pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// Decodes `%XX` escapes and `+` (space) of one query-string component; `None` when an escape is malformed
/// or the result is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    String::from_utf8(decode_escapes(s, false)?).ok()
}

/// [`percent_decode`] that keeps a malformed escape as it is and replaces invalid UTF-8 (the simulator's
/// check of a `token`, which never fails).
#[cfg(feature = "simulator")]
pub fn percent_decode_lenient(s: &str) -> String {
    let bytes = decode_escapes(s, true).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The bytes `s` stands for; a malformed escape is kept as it is when `keep_malformed`, else `None`.
fn decode_escapes(s: &str, keep_malformed: bool) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => match b.get(i + 1..i + 3).and_then(hex_pair) {
                Some(v) => {
                    out.push(v);
                    i += 2;
                }
                None if keep_malformed => out.push(b'%'),
                None => return None,
            },
            c => out.push(c),
        }
        i += 1;
    }
    Some(out)
}

/// The byte two hex digits stand for (exactly two digits: no sign, as `from_str_radix` would take).
fn hex_pair(h: &[u8]) -> Option<u8> {
    let digit = |c: u8| (c as char).to_digit(16);
    Some((digit(h[0])? << 4 | digit(h[1])?) as u8)
}

/// The decoded parameters of one request. A repeated parameter keeps its last value; an empty value counts
/// as absent (dashboards send `process=` for "no filter"); unknown parameters are ignored so that the earlier
/// tool's clients (cache-busting `_=...`) keep working.
#[derive(Debug, Default, Clone)]
pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    /// Parses a raw query string (without `?`).
    pub fn parse(query: &str) -> ApiResult<Params> {
        let mut pairs = Vec::new();
        for part in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            let key = percent_decode(k).ok_or_else(|| {
                ApiError::status(400, "query string is not valid percent-encoded UTF-8")
            })?;
            let value = percent_decode(v)
                .ok_or_else(|| ApiError::bad(&key, "not valid percent-encoded UTF-8"))?;
            if value.len() > MAX_VALUE_LEN {
                return Err(ApiError::bad(
                    &key,
                    format!("longer than {MAX_VALUE_LEN} bytes"),
                ));
            }
            pairs.push((key, value));
        }
        Ok(Params { pairs })
    }

    /// The value of `name`, if given and non-empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }

    /// A time: RFC 3339, `YYYY-MM-DD[ HH:MM[:SS]]` (UTC) or Unix seconds; UTC milliseconds.
    pub fn time(&self, name: &str) -> ApiResult<Option<i64>> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => parse_time_lenient(v).map(Some).ok_or_else(|| {
                ApiError::bad(
                    name,
                    format!(
                        "'{}' is not a time; use RFC 3339 (2025-04-28T10:00:00Z), \
                         YYYY-MM-DD[ HH:MM[:SS]] in UTC, or Unix seconds",
                        clip(v)
                    ),
                )
            }),
        }
    }

    /// An unsigned integer in `min..=max`, `default` when absent.
    pub fn uint(&self, name: &str, default: u64, min: u64, max: u64) -> ApiResult<u64> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::bad(
                    name,
                    format!("'{}' is not an integer from {min} to {max}", clip(v)),
                )),
            },
        }
    }

    /// One of a fixed set of words, `default` when absent.
    pub fn choice<T: Copy>(&self, name: &str, options: &[(&str, T)], default: T) -> ApiResult<T> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => options
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(v))
                .map(|(_, t)| *t)
                .ok_or_else(|| {
                    let names: Vec<&str> = options.iter().map(|(k, _)| *k).collect();
                    ApiError::bad(
                        name,
                        format!("'{}' is not one of {}", clip(v), names.join("|")),
                    )
                }),
        }
    }

    /// A yes/no flag: `true|1|yes` or `false|0|no`.
    pub fn flag(&self, name: &str) -> ApiResult<bool> {
        self.choice(
            name,
            &[
                ("true", true),
                ("1", true),
                ("yes", true),
                ("false", false),
                ("0", false),
                ("no", false),
            ],
            false,
        )
    }
}

/// [`timefmt::parse_user_time`], also forgiving an unencoded `+` of a UTC offset (`...T12:00:00+02:00`
/// typed into a URL arrives as `...T12:00:00 02:00`, because `+` means space in a query string).
pub fn parse_time_lenient(v: &str) -> Option<i64> {
    timefmt::parse_user_time(v).or_else(|| {
        let (head, tail) = v.rsplit_once(' ')?;
        let offset_like =
            matches!(tail.len(), 4 | 5) && tail.bytes().all(|b| b.is_ascii_digit() || b == b':');
        (offset_like && head.contains(':'))
            .then(|| timefmt::parse_user_time(&format!("{head}+{tail}")))
            .flatten()
    })
}

/// A bad value quoted back, shortened so an error message stays small.
pub fn clip(v: &str) -> String {
    if v.chars().count() > 64 {
        let mut s: String = v.chars().take(64).collect();
        s.push('…');
        s
    } else {
        v.to_string()
    }
}

/// `asc` or descending (the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

impl Order {
    /// `sort_order`: `asc`, anything else descending, as the earlier tool's clients expect. The value never
    /// reaches SQL: only the two keywords of [`Order::sql`] do.
    pub fn parse(p: &Params) -> ApiResult<Order> {
        Ok(match p.get("sort_order") {
            Some(v) if v.eq_ignore_ascii_case("asc") => Order::Asc,
            _ => Order::Desc,
        })
    }

    /// The SQL keyword.
    pub fn sql(self) -> &'static str {
        match self {
            Order::Asc => "ASC",
            Order::Desc => "DESC",
        }
    }
}

/// Answer format of the exportable endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Ndjson,
}

impl Format {
    /// `format=json|csv|ndjson`.
    pub fn parse(p: &Params) -> ApiResult<Format> {
        p.choice(
            "format",
            &[
                ("json", Format::Json),
                ("csv", Format::Csv),
                ("ndjson", Format::Ndjson),
            ],
            Format::Json,
        )
    }
}

/// `state` of `/connections`: only the open ones (no end yet, the live view), only the closed ones
/// (history), or both (absent, `all`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    Any,
    Open,
    Closed,
}

impl ConnState {
    /// `state=open|closed|all`.
    pub fn parse(p: &Params) -> ApiResult<ConnState> {
        p.choice(
            "state",
            &[
                ("open", ConnState::Open),
                ("closed", ConnState::Closed),
                ("all", ConnState::Any),
            ],
            ConnState::Any,
        )
    }

    /// The condition on `connections c`, if any (open rows use the partial index `connections_open`).
    pub fn condition(self) -> Option<&'static str> {
        match self {
            ConnState::Any => None,
            ConnState::Open => Some("c.end_ms IS NULL"),
            ConnState::Closed => Some("c.end_ms IS NOT NULL"),
        }
    }
}

/// How text filters compare: exactly (stats, where a filter picks a group) or by substring (`/connections`'
/// `destination` and `host`, as the earlier tool documented).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    Exact,
    Substring,
}

/// The common filters, validated. Times are UTC ms; `[from, to)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filters {
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub agent_id: Option<String>,
    pub network: Option<String>,
    pub rule: Option<String>,
    pub process: Option<String>,
    pub destination: Option<String>,
    pub host: Option<String>,
    pub source_ip: Option<String>,
    pub policy: Option<String>,
    pub node: Option<String>,
    pub inbound: Option<String>,
    pub destination_port: Option<String>,
    pub geoip: Option<String>,
}

/// The host key in SQL: the host, or the destination IP without one; what `group_by=host`, the `host` filter
/// and its filter options compare. (A macro, so that the conditions below are built with `concat!`.)
macro_rules! host_key {
    () => {
        "CASE WHEN c.host <> '' THEN c.host ELSE c.destination_ip END"
    };
}

/// The host key (`host_key!`) as an expression.
pub const HOST_KEY: &str = concat!("(", host_key!(), ")");

/// A SQL condition (always a fixed string of this program) and the values it binds.
pub type Cond = (&'static str, Vec<rusqlite::types::Value>);

impl Filters {
    /// Reads every filter parameter.
    pub fn parse(p: &Params) -> ApiResult<Filters> {
        let s = |k: &str| p.get(k).map(str::to_string);
        let f = Filters {
            from_ms: p.time("from")?,
            to_ms: p.time("to")?,
            agent_id: s("agent_id"),
            network: s("network").map(|v| v.to_ascii_lowercase()),
            rule: s("rule"),
            process: s("process"),
            destination: s("destination"),
            host: s("host"),
            source_ip: s("source_ip"),
            policy: s("policy"),
            node: s("node"),
            inbound: s("inbound"),
            destination_port: s("destination_port"),
            geoip: s("geoip"),
        };
        if let (Some(a), Some(b)) = (f.from_ms, f.to_ms) {
            if a > b {
                return Err(ApiError::bad("from", "must not be after 'to'"));
            }
        }
        Ok(f)
    }

    /// True when some filter other than the time range is set.
    pub fn has_row_filters(&self) -> bool {
        !self.conditions(Match::Exact).is_empty()
    }

    /// True when some filter other than the time range and `agent_id` is set: then the hourly rollups (kept
    /// per agent) cannot answer.
    pub fn has_row_filters_besides_agent(&self) -> bool {
        Filters {
            agent_id: None,
            ..self.clone()
        }
        .has_row_filters()
    }

    /// True when `from` or `to` is given.
    pub fn has_range(&self) -> bool {
        self.from_ms.is_some() || self.to_ms.is_some()
    }

    /// The range with open ends made finite.
    pub fn range(&self) -> (i64, i64) {
        (
            self.from_ms.unwrap_or(i64::MIN / 4),
            self.to_ms.unwrap_or(i64::MAX / 4),
        )
    }

    /// The conditions on `connections c` for every filter but the time range.
    pub fn conditions(&self, m: Match) -> Vec<Cond> {
        use rusqlite::types::Value::Text;
        let mut out: Vec<Cond> = Vec::new();
        let mut eq = |v: &Option<String>, sql: &'static str| {
            if let Some(v) = v {
                out.push((sql, vec![Text(v.clone())]));
            }
        };
        eq(&self.agent_id, "c.agent_id = ?");
        eq(&self.network, "c.network = ?");
        eq(&self.process, "c.process = ?");
        eq(&self.source_ip, "c.source_ip = ?");
        eq(&self.policy, "c.policy = ?");
        eq(&self.node, "c.node = ?");
        eq(&self.inbound, "c.inbound_name = ?");
        eq(&self.destination_port, "c.destination_port = ?");
        if let Some(v) = &self.rule {
            // Either the rule type or the "Type (payload)" label that group_by=rule shows.
            out.push((
                "(c.rule = ? OR (c.rule_payload <> '' AND c.rule || ' (' || c.rule_payload || ')' = ?))",
                vec![Text(v.clone()), Text(v.clone())],
            ));
        }
        if let Some(v) = &self.destination {
            let sql = match m {
                Match::Exact => "(c.destination_ip = ? OR c.host = ?)",
                Match::Substring => {
                    "(instr(c.destination_ip, ?) > 0 OR instr(lower(c.host), lower(?)) > 0)"
                }
            };
            out.push((sql, vec![Text(v.clone()), Text(v.clone())]));
        }
        if let Some(v) = &self.host {
            let sql = match m {
                Match::Exact => concat!("(", host_key!(), ") = ?"),
                Match::Substring => concat!("instr(lower(", host_key!(), "), lower(?)) > 0"),
            };
            out.push((sql, vec![Text(v.clone())]));
        }
        if let Some(v) = &self.geoip {
            out.push((
                "instr(lower(c.destination_geoip), lower(?)) > 0",
                vec![Text(v.clone())],
            ));
        }
        out
    }
}

/// `c.start_ms` in `[lo, hi)`, said on the minute too: the start indexes hold `start_ms / 60000`
/// ([`crate::store::schema::start_minute`]), and only a condition on that expression searches them. The
/// values are [`start_in`]'s.
pub const START_IN: &str =
    "c.start_ms / 60000 BETWEEN ? AND ? AND c.start_ms >= ? AND c.start_ms < ?";

/// `ORDER BY` start time, each term then followed by the direction: the minute first, which the start
/// indexes hold.
pub const START_ORDER: &[&str] = &["c.start_ms / 60000", "c.start_ms"];

/// The values of [`START_IN`] for `[lo, hi)`.
pub fn start_in(lo: i64, hi: i64) -> Vec<rusqlite::types::Value> {
    use crate::store::schema::start_minute;
    use rusqlite::types::Value::Integer;
    vec![
        Integer(start_minute(lo)),
        Integer(start_minute(hi.saturating_sub(1))),
        Integer(lo),
        Integer(hi),
    ]
}

/// A WHERE clause assembled from fixed fragments, with its bound values in order.
#[derive(Default, Debug)]
pub struct Where {
    parts: Vec<&'static str>,
    pub values: Vec<rusqlite::types::Value>,
}

impl Where {
    /// Starts from the filters' conditions.
    pub fn from_filters(f: &Filters, m: Match) -> Where {
        let mut w = Where::default();
        for (sql, vals) in f.conditions(m) {
            w.push(sql, vals);
        }
        w
    }

    /// Adds one condition.
    pub fn push(&mut self, sql: &'static str, vals: Vec<rusqlite::types::Value>) {
        self.parts.push(sql);
        self.values.extend(vals);
    }

    /// Connections that started in `[lo, hi)`: [`START_IN`] with its values.
    pub fn start_in(&mut self, lo: i64, hi: i64) {
        self.push(START_IN, start_in(lo, hi));
    }

    /// `a AND b AND ...`, or `1` when empty.
    pub fn sql(&self) -> String {
        if self.parts.is_empty() {
            "1".into()
        } else {
            self.parts.join(" AND ")
        }
    }

    /// True without conditions.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_keeps_last_non_empty() {
        let p = Params::parse("a=1&b=x%20y+z&a=2&c=&d").unwrap();
        assert_eq!(p.get("a"), Some("2"));
        assert_eq!(p.get("b"), Some("x y z"));
        assert_eq!(p.get("c"), None);
        assert_eq!(p.get("d"), None);
        assert!(Params::parse("a=%zz").is_err());
        assert!(Params::parse("a=%ff").is_err()); // not UTF-8
        assert!(Params::parse("a=%+1").is_err() && Params::parse("a=%-1").is_err());
    }

    #[test]
    fn typed_values_name_the_parameter() {
        let p = Params::parse("limit=abc&from=yesterday&sort_by=x'--").unwrap();
        let e = p.uint("limit", 1, 1, 10).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message.contains("'limit'") && e.message.contains("1 to 10"),
            "{}",
            e.message
        );
        let e = p.time("from").unwrap_err();
        assert!(e.message.contains("'from'") && e.message.contains("RFC 3339"));
        let e = p.choice("sort_by", &[("count", 0)], 0).unwrap_err();
        assert!(e.message.contains("'sort_by'") && e.message.contains("count"));
        let p = Params::parse("limit=0").unwrap();
        assert!(p.uint("limit", 1, 1, 10).is_err());
        let p = Params::parse("limit=10001").unwrap();
        assert!(p.uint("limit", 1, 1, MAX_ROWS).is_err());
    }

    #[test]
    fn unencoded_plus_offset_is_forgiven() {
        let want = timefmt::parse_rfc3339("2025-04-28T10:00:00Z");
        assert_eq!(parse_time_lenient("2025-04-28T12:00:00 02:00"), want);
        assert_eq!(parse_time_lenient("2025-04-28 12:00:00 02:00"), want);
        let p = Params::parse("from=2025-04-28T12:00:00+02:00").unwrap();
        assert_eq!(p.time("from").unwrap(), want);
        assert_eq!(
            parse_time_lenient("2025-04-28 10:00"),
            want,
            "date and time, not an offset"
        );
        assert_eq!(parse_time_lenient("2025-04-28 1000"), None);
    }

    #[test]
    fn connection_state_is_open_closed_or_all() {
        let state = |q: &str| ConnState::parse(&Params::parse(q).unwrap());
        assert_eq!(state("").unwrap(), ConnState::Any);
        assert_eq!(state("state=").unwrap(), ConnState::Any);
        assert_eq!(state("state=all").unwrap(), ConnState::Any);
        assert_eq!(state("state=OPEN").unwrap(), ConnState::Open);
        assert_eq!(state("state=closed").unwrap(), ConnState::Closed);
        let e = state("state=ended").unwrap_err();
        assert!(
            e.status == 400
                && e.message.contains("'state'")
                && e.message.contains("open|closed|all"),
            "{}",
            e.message
        );
        assert_eq!(ConnState::Any.condition(), None);
        assert_eq!(ConnState::Open.condition(), Some("c.end_ms IS NULL"));
    }

    #[test]
    fn from_after_to_is_rejected() {
        let p = Params::parse("from=2025-01-02&to=2025-01-01").unwrap();
        assert_eq!(Filters::parse(&p).unwrap_err().status, 400);
        let p = Params::parse("from=1735689600&to=2025-01-02T00:00:00%2B01:00").unwrap();
        let f = Filters::parse(&p).unwrap();
        assert_eq!(f.from_ms, Some(1_735_689_600_000));
        assert_eq!(f.to_ms, Some(1_735_689_600_000 + 23 * 3_600_000));
    }
}
