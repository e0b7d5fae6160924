//! The master's HTTP API (`/api/v1/...`, see API-COMPAT): a tiny_http server shared by N named worker
//! threads, each with its own read-only database connection, calling `recv()` in a loop. Handlers are plain
//! functions ([`handler::handle`]) from a parsed request to a [`handler::Reply`]; this module only moves
//! bytes: it reads a body of at most `max_body_bytes` (413 beyond), and writes the reply.
//!
//! Queries live one module per endpoint ([`stats`], [`connections`], [`agents`], [`options`]); parameters
//! are parsed once into typed values ([`params`]) before any SQL exists, and SQL only binds values. Unfiltered
//! aggregates read hourly rollups (kept by every writer, [`crate::store::rollup`]) when the database has them.
//!
//! `GET /metrics` (also `/api/v1/metrics`) answers the Prometheus text format ([`metrics`]).
//!
//! Two lanes: the N workers receive every request and serve writes (`POST /sync`) and `/health` themselves;
//! other requests (reads) go over a bounded queue ([`QUERY_QUEUE`], `503` when full) to N/4 query threads (at
//! least one). A read can take seconds of CPU (a ranged `group_by` scans its traffic rows); in one shared lane
//! a few dashboards filled every worker and agents' syncs waited behind them until they timed out (the load
//! test: 9 of 10 syncs failed). Query threads also cap the cores that queries take from the writer (with two
//! query threads instead of one, the load test ingested 20 % less and peaked 20 MB higher). A read that
//! waited longer than [`QUERY_MAX_WAIT`] is answered `503` without running: its client has likely gone.
//!
//! Stop: [`ApiServer::stop`] sets the stop flag and calls `unblock()` once per worker, then joins them (query
//! threads notice the flag within 100 ms).

pub mod agents;
pub mod connections;
pub mod handler;
pub mod metrics;
pub mod options;
pub mod params;
pub mod rollup;
pub mod stats;
pub mod table;

use crate::error::{Error, Result};
use crate::store::{Access, WriteCmd};
use handler::{ApiRequest, Ctx, Reply};
use params::ApiError;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How the API server runs.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// With a token every endpoint but `/health` needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    pub db_path: PathBuf,
    /// Worker threads (each with its own read-only connection); at least 1.
    pub workers: usize,
    /// Largest request body accepted (`413` beyond).
    pub max_body_bytes: usize,
    /// Where device names come from (`group_by=source_ip`, `/connections`, `/metrics`); `None`: no names.
    pub devices: Option<Arc<crate::devices::Devices>>,
    /// How `/metrics` caps its series.
    pub metrics: crate::metrics::MetricsConfig,
}

/// A running server.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    workers: Vec<JoinHandle<()>>,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl ApiServer {
    /// The bound address (the real port when port 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting requests, lets each worker finish its current one, and joins them all.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for _ in &self.workers {
            self.server.unblock();
        }
        for w in self.workers {
            if w.join().is_err() {
                crate::error!("api: a worker thread panicked");
            }
        }
    }
}

/// Binds `cfg.listen`, opens one read-only connection per worker and starts the workers.
/// `writer` is the database writer, needed by `POST /sync` (`503` without it).
pub fn start(cfg: ApiConfig, writer: Option<SyncSender<WriteCmd>>) -> Result<ApiServer> {
    start_with_body_timeout(cfg, writer, BODY_TIMEOUT)
}

/// [`start`] with another limit on how long a client may take to send a request body (tests use a short
/// one).
pub fn start_with_body_timeout(
    cfg: ApiConfig,
    writer: Option<SyncSender<WriteCmd>>,
    body_timeout: Duration,
) -> Result<ApiServer> {
    let workers = cfg.workers.max(1);
    // One per four workers: on a 2-core router the writer keeps a core while dashboards query.
    let query_threads = (workers / 4).max(1);
    let mut conns = Vec::with_capacity(workers + query_threads);
    for _ in 0..workers + query_threads {
        conns.push(crate::store::open(&cfg.db_path, Access::Read)?);
    }
    let rollups = rollup::has_rollups(&conns[0]);
    if !rollups {
        crate::warn!(
            "api: database has no rollup tables; unfiltered aggregates will scan (slower)"
        );
    }
    let server = tiny_http::Server::http(cfg.listen)
        .map_err(|e| Error::Http(format!("cannot listen on {}: {e}", cfg.listen)))?;
    let addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| Error::Http(format!("{} is not an IP listener", cfg.listen)))?;
    let server = Arc::new(server);
    let stop = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared {
        token: cfg.token,
        max_body: cfg.max_body_bytes,
        rollups,
        body_readers: Arc::new(AtomicUsize::new(0)),
        body_timeout,
        devices: cfg.devices,
        metrics: metrics::MetricsState::new(cfg.metrics),
    });
    let mut handles = Vec::with_capacity(workers + query_threads);
    let (query_tx, query_rx) = std::sync::mpsc::sync_channel(QUERY_QUEUE);
    let query_rx = Arc::new(Mutex::new(query_rx));
    for (i, db) in conns.into_iter().enumerate() {
        let (srv, stp, shared) = (Arc::clone(&server), Arc::clone(&stop), Arc::clone(&shared));
        let writer = writer.clone();
        let spawned = if i < workers {
            let queries = query_tx.clone();
            std::thread::Builder::new()
                .name(format!("api-{i}"))
                .spawn(move || worker(&srv, &stp, &shared, &db, writer.as_ref(), &queries))
        } else {
            let rx = Arc::clone(&query_rx);
            std::thread::Builder::new()
                .name(format!("api-query-{}", i - workers))
                .spawn(move || query_worker(&rx, &stp, &shared, &db))
        };
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                let partial = ApiServer {
                    server,
                    workers: handles,
                    addr,
                    stop,
                };
                partial.stop();
                return Err(Error::Http(format!("cannot start worker thread: {e}")));
            }
        }
    }
    crate::info!(
        "api: listening on http://{addr}/api/v1 with {workers} workers and {query_threads} query threads"
    );
    Ok(ApiServer {
        server,
        workers: handles,
        addr,
        stop,
    })
}

/// Settings every worker reads.
struct Shared {
    token: Option<String>,
    max_body: usize,
    rollups: bool,
    /// Body reads in progress (see [`read_body_bounded`]).
    body_readers: Arc<AtomicUsize>,
    body_timeout: Duration,
    devices: Option<Arc<crate::devices::Devices>>,
    /// Shared by every worker, so counters stay monotonic whichever worker answers a scrape.
    metrics: metrics::MetricsState,
}

/// Reads waiting for a query thread; one more is answered `503`.
pub const QUERY_QUEUE: usize = 64;
/// A read queued longer than this is not run (`503`): the dashboard gives up after 20 s.
pub const QUERY_MAX_WAIT: Duration = Duration::from_secs(20);

/// How long a client may take to send its body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// The most body reads at once; beyond, `503`. Bounds the threads a stalled client can hold.
pub const MAX_BODY_READERS: usize = 16;

fn worker(
    server: &tiny_http::Server,
    stop: &AtomicBool,
    shared: &Shared,
    db: &rusqlite::Connection,
    writer: Option<&SyncSender<WriteCmd>>,
    queries: &SyncSender<(std::time::Instant, tiny_http::Request)>,
) {
    while !stop.load(Ordering::SeqCst) {
        let rq = match server.recv() {
            Ok(rq) => rq,
            Err(e) => {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                crate::debug!("api: receive failed: {e}");
                continue;
            }
        };
        // Writes, and the health check (which must answer even while queries queue), stay here.
        let health = matches!(rq.url(), "/health" | "/api/v1/health");
        if *rq.method() == tiny_http::Method::Post || health {
            serve(rq, shared, db, writer);
            continue;
        }
        match queries.try_send((std::time::Instant::now(), rq)) {
            Ok(()) => {}
            Err(TrySendError::Full((_, rq))) => {
                let e = ApiError::status(503, "too many queries waiting; retry later");
                respond(rq, Reply::error(&e));
            }
            Err(TrySendError::Disconnected((_, rq))) => serve(rq, shared, db, writer),
        }
    }
}

/// A query thread: serves the reads the workers queue, until the stop flag.
fn query_worker(
    queries: &Mutex<Receiver<(std::time::Instant, tiny_http::Request)>>,
    stop: &AtomicBool,
    shared: &Shared,
    db: &rusqlite::Connection,
) {
    while !stop.load(Ordering::SeqCst) {
        let next = match queries.lock() {
            Ok(rx) => rx.recv_timeout(Duration::from_millis(100)),
            Err(_) => return,
        };
        match next {
            Ok((queued, rq)) if queued.elapsed() > QUERY_MAX_WAIT => {
                let e = ApiError::status(
                    503,
                    "the server was too busy to answer in time; retry later",
                );
                respond(rq, Reply::error(&e));
            }
            Ok((_, rq)) => serve(rq, shared, db, None),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn header<'a>(rq: &'a tiny_http::Request, name: &'static str) -> Option<&'a str> {
    rq.headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

fn body_too_big(max: usize) -> ApiError {
    ApiError::status(413, format!("request body larger than {max} bytes"))
}

/// Reads at most `max + 1` bytes of the body (a chunked body has no length to check first): `413` when it
/// is longer than `max`.
fn read_body(rq: &mut tiny_http::Request, max: usize) -> std::result::Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    rq.as_reader()
        .take(max as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ApiError::status(400, format!("cannot read request body: {e}")))?;
    if body.len() > max {
        return Err(body_too_big(max));
    }
    Ok(body)
}

/// Reads the body on a helper thread and waits at most the body timeout ([`BODY_TIMEOUT`]): tiny_http 0.12 sets no socket
/// timeouts, so a client that stalls mid-body would otherwise hold this worker forever. On timeout the helper
/// keeps the request (it is dropped, and the connection closed, when the client finally goes away) and the
/// worker moves on; `None` means there is nothing left to answer.
fn read_body_bounded(
    mut rq: tiny_http::Request,
    shared: &Shared,
) -> Option<(tiny_http::Request, std::result::Result<Vec<u8>, ApiError>)> {
    // Refused by Content-Length before reading anything.
    if rq.body_length().is_some_and(|n| n > shared.max_body) {
        return Some((rq, Err(body_too_big(shared.max_body))));
    }
    if shared.body_readers.fetch_add(1, Ordering::SeqCst) >= MAX_BODY_READERS {
        shared.body_readers.fetch_sub(1, Ordering::SeqCst);
        return Some((
            rq,
            Err(ApiError::status(
                503,
                "too many uploads in progress; retry later",
            )),
        ));
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let readers = Arc::clone(&shared.body_readers);
    let max = shared.max_body;
    let spawned = std::thread::Builder::new()
        .name("api-body".into())
        .spawn(move || {
            let body = read_body(&mut rq, max);
            readers.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send((rq, body));
        });
    if let Err(e) = spawned {
        shared.body_readers.fetch_sub(1, Ordering::SeqCst);
        crate::error!("api: cannot start a body reader: {e}");
        return None;
    }
    match rx.recv_timeout(shared.body_timeout) {
        Ok(done) => Some(done),
        Err(_) => {
            crate::warn!(
                "api: a client sent no complete body within {} ms; dropped",
                shared.body_timeout.as_millis()
            );
            None
        }
    }
}

fn serve(
    rq: tiny_http::Request,
    shared: &Shared,
    db: &rusqlite::Connection,
    writer: Option<&SyncSender<WriteCmd>>,
) {
    let started = std::time::Instant::now();
    let method = rq.method().as_str().to_ascii_uppercase();
    let url = rq.url().to_string();
    // Only POST carries a body we use; others are not read (tiny_http discards them).
    let (rq, body) = if method == "POST" {
        match read_body_bounded(rq, shared) {
            Some(done) => done,
            None => return,
        }
    } else {
        (rq, Ok(Vec::new()))
    };
    let reply = match body {
        Err(e) => Reply::error(&e),
        Ok(body) => {
            let (path, query) = url.split_once('?').unwrap_or((&url, ""));
            let auth = header(&rq, "Authorization").map(str::to_string);
            let req = ApiRequest {
                method: &method,
                path,
                query,
                body: &body,
                authorization: auth.as_deref(),
            };
            let ctx = Ctx {
                db,
                rollups: shared.rollups,
                token: shared.token.as_deref(),
                writer,
                now_ms: crate::timefmt::now_ms(),
                devices: shared.devices.as_deref(),
                metrics: Some(&shared.metrics),
            };
            handler::handle(&ctx, &req)
        }
    };
    crate::debug!(
        "api: {method} {url} -> {} in {} ms",
        reply.status,
        started.elapsed().as_millis()
    );
    respond(rq, reply);
}

fn respond(rq: tiny_http::Request, reply: Reply) {
    let mut resp = tiny_http::Response::from_data(reply.body)
        .with_status_code(reply.status)
        .with_header(
            tiny_http::Header::from_bytes(&b"Content-Type"[..], reply.content_type.as_bytes())
                .expect("static header is valid"),
        );
    for (k, v) in reply.headers {
        if let Ok(h) = tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()) {
            resp.add_header(h);
        }
    }
    if let Err(e) = rq.respond(resp) {
        crate::debug!("api: cannot send reply: {e}");
    }
}

#[cfg(test)]
mod tests;
