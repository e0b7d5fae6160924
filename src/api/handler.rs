//! Request to reply, without a socket: authentication, routing (a `match` on method and path), the envelope
//! and error mapping. The server in [`super`] only moves requests between [`super::http`] and [`handle`].
//!
//! It also serves the built-in dashboard (`GET /`): three static files compiled into the binary
//! (`dashboard.html`, `.js`, `.css`). They hold no data and so need no token: the page asks the API with it.

use super::params::{ApiError, Format, Params};
use super::table::{self, Answer};
use crate::store::WriterHandle;
use rusqlite::Connection;
use serde_json::json;

/// A parsed request.
#[derive(Debug, Clone, Copy)]
pub struct ApiRequest<'a> {
    pub method: &'a str,
    /// The path without the query string, still percent-encoded.
    pub path: &'a str,
    /// The raw query string (without `?`).
    pub query: &'a str,
    pub body: &'a [u8],
    /// The `Authorization` header, if any.
    pub authorization: Option<&'a str>,
}

/// A response: status, content type, body and extra headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

const JSON: &str = "application/json";

impl Reply {
    fn json(status: u16, body: String) -> Reply {
        Reply {
            status,
            content_type: JSON,
            body: body.into_bytes(),
            headers: Vec::new(),
        }
    }

    /// The error envelope for `e`.
    pub fn error(e: &ApiError) -> Reply {
        let mut r = Reply::json(e.status, table::error(&e.message));
        if let Some(allow) = e.allow {
            r.headers.push(("Allow", allow.to_string()));
        }
        if e.status == 401 {
            r.headers.push(("WWW-Authenticate", "Bearer".to_string()));
        }
        r
    }

    /// The body as text (tests and logs).
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap_or("")
    }
}

/// What a worker brings to each request.
pub struct Ctx<'a> {
    pub db: &'a Connection,
    /// Whether the database has the rollup tables ([`super::rollup::has_rollups`]).
    pub rollups: bool,
    pub token: Option<&'a str>,
    pub writer: Option<&'a WriterHandle>,
    pub now_ms: i64,
    /// Names of devices (`group_by=source_ip`, `/connections`); `None`: none known.
    pub devices: Option<&'a crate::devices::Devices>,
    /// What `/metrics` keeps between scrapes; `None`: a fresh state per request.
    pub metrics: Option<&'a super::metrics::MetricsState>,
}

/// Compares without an early exit, so the time taken does not tell how much of a guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= (x ^ y) as u64;
    }
    diff == 0
}

/// The answer to a request without the right token.
pub const UNAUTHORIZED: &str =
    "missing or wrong bearer token: send 'Authorization: Bearer <api token>'";

/// Whether `header` (the `Authorization` value) carries `token` (always, without a token).
pub fn authorized(token: Option<&str>, header: Option<&str>) -> bool {
    let Some(token) = token else { return true };
    let given = header
        .and_then(|h| {
            let (scheme, rest) = h.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(rest.trim())
        })
        .unwrap_or("");
    constant_time_eq(given.as_bytes(), token.as_bytes())
}

fn method_not_allowed(allow: &'static str) -> ApiError {
    ApiError {
        status: 405,
        message: format!("method not allowed; this path accepts {allow}"),
        allow: Some(allow),
    }
}

/// Answers one request.
pub fn handle(ctx: &Ctx<'_>, req: &ApiRequest<'_>) -> Reply {
    let path = match req.path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => req.path,
    };
    if path == "/api/v1/health" {
        return match req.method {
            "GET" | "HEAD" => Reply {
                status: 200,
                content_type: "text/plain; charset=utf-8",
                body: b"OK".to_vec(),
                headers: Vec::new(),
            },
            _ => Reply::error(&method_not_allowed("GET, HEAD")),
        };
    }
    if let Some((content_type, body)) = dashboard_file(path) {
        return match req.method {
            "GET" | "HEAD" => dashboard_reply(content_type, body),
            _ => Reply::error(&method_not_allowed("GET, HEAD")),
        };
    }
    if !authorized(ctx.token, req.authorization) {
        return Reply::error(&ApiError::status(401, UNAUTHORIZED));
    }
    match route(ctx, req, path) {
        Ok(reply) => reply,
        Err(e) => Reply::error(&e),
    }
}

/// The dashboard's files by path. Relative links in the page keep it working behind a path prefix.
fn dashboard_file(path: &str) -> Option<(&'static str, &'static str)> {
    match path {
        "/" | "/index.html" => Some(("text/html; charset=utf-8", include_str!("dashboard.html"))),
        "/dashboard.js" => Some((
            "text/javascript; charset=utf-8",
            include_str!("dashboard.js"),
        )),
        "/dashboard.css" => Some(("text/css; charset=utf-8", include_str!("dashboard.css"))),
        _ => None,
    }
}

/// What the dashboard may load: its own script and style (no inline code, so no 'unsafe-inline'), requests
/// to this server only, and nothing else: no other origin, no plugins, no framing, no form posts elsewhere.
pub const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn dashboard_reply(content_type: &'static str, body: &'static str) -> Reply {
    Reply {
        status: 200,
        content_type,
        body: body.as_bytes().to_vec(),
        headers: vec![
            ("Content-Security-Policy", DASHBOARD_CSP.to_string()),
            ("X-Content-Type-Options", "nosniff".to_string()),
            ("Referrer-Policy", "no-referrer".to_string()),
            // A new binary brings a new page: revalidate rather than keep an old script.
            ("Cache-Control", "no-cache".to_string()),
        ],
    }
}

fn route(ctx: &Ctx<'_>, req: &ApiRequest<'_>, path: &str) -> Result<Reply, ApiError> {
    let get = |answer: fn(&Ctx<'_>, &Params, Option<&str>) -> Result<Answer, ApiError>,
               arg: Option<&str>| {
        if req.method != "GET" {
            return Err(method_not_allowed("GET"));
        }
        let p = Params::parse(req.query)?;
        Ok(render(answer(ctx, &p, arg)?))
    };
    let agent_status = path
        .strip_prefix("/api/v1/agents/")
        .and_then(|rest| rest.strip_suffix("/status"))
        .filter(|id| !id.is_empty() && !id.contains('/'));
    match path {
        "/api/v1/metrics" | "/metrics" => {
            if req.method != "GET" {
                return Err(method_not_allowed("GET"));
            }
            let fresh;
            let state = match ctx.metrics {
                Some(s) => s,
                None => {
                    fresh = super::metrics::MetricsState::default();
                    &fresh
                }
            };
            let text = super::metrics::render(
                ctx.db,
                ctx.rollups,
                state,
                ctx.devices,
                ctx.writer,
                ctx.now_ms,
            )?;
            Ok(Reply {
                status: 200,
                content_type: super::metrics::CONTENT_TYPE,
                body: text.into_bytes(),
                headers: Vec::new(),
            })
        }
        "/api/v1/sync" => {
            if req.method != "POST" {
                return Err(method_not_allowed("POST"));
            }
            let Some(writer) = ctx.writer else {
                return Err(ApiError::status(
                    503,
                    "this server does not accept uploads (no database writer)",
                ));
            };
            match crate::api::ingest::handle_sync(req.body, writer, ctx.now_ms) {
                Ok(data) => Ok(Reply::json(200, table::success(&data.to_string(), &[]))),
                Err((status, message)) => Err(ApiError::status(status, message)),
            }
        }
        "/api/v1/stats" => get(
            |c, p, _| super::stats::handle(c.db, c.rollups, p, c.devices),
            None,
        ),
        "/api/v1/connections" => get(
            |c, p, _| super::connections::handle(c.db, c.rollups, p, c.devices),
            None,
        ),
        "/api/v1/agents" => get(
            |c, _, _| super::agents::list(c.db, c.rollups, c.now_ms),
            None,
        ),
        "/api/v1/filter-options" => get(|c, p, _| super::options::handle(c.db, c.rollups, p), None),
        _ => match agent_status {
            Some(raw) => {
                let id = super::params::percent_decode(raw).ok_or_else(|| {
                    ApiError::status(
                        400,
                        "agent id in the path is not valid percent-encoded UTF-8",
                    )
                })?;
                get(
                    |c, _, id| super::agents::status(c.db, c.rollups, id.unwrap_or(""), c.now_ms),
                    Some(&id),
                )
            }
            None => Err(ApiError::status(
                404,
                format!("no such endpoint: {}", super::params::clip(path)),
            )),
        },
    }
}

fn render(answer: Answer) -> Reply {
    match answer {
        Answer::Data(json) => Reply::json(200, table::success(&json, &[])),
        Answer::Rows {
            table,
            format,
            total_count,
        } => {
            let (content_type, body) = match format {
                Format::Json => {
                    let extra: Vec<(&str, serde_json::Value)> = total_count
                        .map(|n| ("total_count", json!(n)))
                        .into_iter()
                        .collect();
                    (JSON, table::success(&table.to_json(), &extra))
                }
                Format::Csv => ("text/csv; charset=utf-8", table.to_csv()),
                Format::Ndjson => ("application/x-ndjson", table.to_ndjson()),
            };
            let mut r = Reply {
                status: 200,
                content_type,
                body: body.into_bytes(),
                headers: Vec::new(),
            };
            if let Some(n) = total_count {
                r.headers.push(("X-Total-Count", n.to_string()));
            }
            r
        }
    }
}
