//! The master's HTTP API (`/api/v1/...`, see API-COMPAT): our own small HTTP/1.1 server ([`http`]: one
//! thread per connection, bounded, with limits on every byte and second a client controls) hands complete
//! requests over a bounded channel to N named worker threads, each with its own read-only database
//! connection (opened at its first request). Handlers are plain functions ([`handler::handle`]) from a parsed request to a
//! [`handler::Reply`]; workers never touch a socket, so no client can hold one.
//!
//! Queries live one module per endpoint ([`stats`], [`connections`], [`agents`], [`options`]); parameters
//! are parsed once into typed values ([`params`]) before any SQL exists, and SQL only binds values. Unfiltered
//! aggregates read hourly rollups (kept by every writer, [`crate::store::rollup`]) when the database has them.
//!
//! `GET /metrics` (also `/api/v1/metrics`) answers the Prometheus text format ([`metrics`]).
//!
//! Two lanes: the N workers take every request and serve `POST /sync` and `/health` themselves; every other
//! request goes over a bounded queue ([`QUERY_QUEUE`], `503` when full) to one query thread per four workers
//! (at least one), which answer `GET`s through a short-lived, single-flight [`cache`]. A ranged top list can
//! take a second of CPU; in one shared lane a few dashboards held every worker and agents' syncs timed out
//! behind them. Few query threads also bound what queries take from the writer's core and the memory their
//! sorts hold (the load figure: 57 MB peak with one, 69 MB with two, p99 4.0 s against 1.1-3.2 s). A
//! query that waited longer than [`QUERY_WAIT`] is answered `503` without running, and a job whose client
//! left ([`http::Job::gone`]) is skipped in either lane.
//!
//! Stop: [`ApiServer::stop`] closes the listener and lets the connection threads finish the request in hand;
//! when the last one is gone the job channel disconnects and the workers end; all are joined.

pub mod agents;
pub mod cache;
pub mod connections;
pub mod handler;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod options;
pub mod params;
pub mod rollup;
pub mod stats;
pub mod table;

use crate::error::{Error, Result};
use crate::store::{Access, WriterHandle};
use handler::{ApiRequest, Ctx};
use std::net::SocketAddr;
use std::path::PathBuf;
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
    pub metrics: metrics::MetricsConfig,
}

/// A running server.
pub struct ApiServer {
    http: http::Server,
    workers: Vec<JoinHandle<()>>,
}

impl ApiServer {
    /// The bound address (the real port when port 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.http.addr()
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.http.connections()
    }

    /// Stops accepting requests, lets each connection finish its current one, and joins every worker.
    pub fn stop(self) {
        self.http.stop();
        for w in self.workers {
            if w.join().is_err() {
                crate::error!("api: a worker thread panicked");
            }
        }
    }
}

/// Binds `cfg.listen`, opens one read-only connection per worker and starts the workers.
/// `writer` is the database writer, needed by `POST /sync` (`503` without it).
pub fn start(cfg: ApiConfig, writer: Option<WriterHandle>) -> Result<ApiServer> {
    start_with_body_timeout(cfg, writer, BODY_TIMEOUT)
}

/// [`start`] with another limit on how long a client may take to send a request body (tests use a short
/// one).
pub fn start_with_body_timeout(
    cfg: ApiConfig,
    writer: Option<WriterHandle>,
    body_timeout: Duration,
) -> Result<ApiServer> {
    let limits = http::Limits {
        body_timeout,
        ..http::Limits::default()
    };
    start_with_limits(cfg, writer, limits)
}

/// [`start`] with other client limits (`max_body_bytes` and `token` are taken from `cfg`).
pub fn start_with_limits(
    cfg: ApiConfig,
    writer: Option<WriterHandle>,
    mut limits: http::Limits,
) -> Result<ApiServer> {
    let workers = cfg.workers.max(1);
    let query_threads = (workers / 4).max(1);
    let has_token = cfg.token.is_some();
    // Checks the database now (a clear error at start); each thread opens its own connection at its first
    // request (memory: a router's API is mostly idle, and an open connection is ~100 KB).
    let rollups = rollup::has_rollups(&crate::store::open(&cfg.db_path, Access::Read)?);
    let conns = (0..workers + query_threads).map(|_| LazyDb {
        path: cfg.db_path.clone(),
        conn: None,
    });
    if !rollups {
        crate::warn!(
            "api: database has no rollup tables; unfiltered aggregates will scan (slower)"
        );
    }
    let listener = std::net::TcpListener::bind(cfg.listen)
        .map_err(|e| Error::Http(format!("cannot listen on {}: {e}", cfg.listen)))?;
    limits.max_body_bytes = cfg.max_body_bytes;
    limits.max_body_in_flight = limits.max_body_in_flight.max(cfg.max_body_bytes);
    limits.token.clone_from(&cfg.token);
    limits.max_connections = limits.max_connections.max(1);
    // One slot per connection: a connection has at most one request in flight.
    let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel::<http::Job>(limits.max_connections);
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    let shared = Arc::new(Shared {
        token: cfg.token,
        rollups,
        devices: cfg.devices,
        metrics: metrics::MetricsState::new(cfg.metrics),
        cache: cache::Cache::new(
            cache::TTL,
            cache::MAX_BYTES,
            crate::counters::commit_generation,
        ),
    });
    let mut handles = Vec::with_capacity(workers + query_threads);
    // The workers hold the only senders: when they end, the query threads do.
    let (query_tx, query_rx) = std::sync::mpsc::sync_channel::<http::Job>(QUERY_QUEUE);
    let query_rx = Arc::new(Mutex::new(query_rx));
    for (i, mut db) in conns.enumerate() {
        let shared = Arc::clone(&shared);
        let spawned = if i < workers {
            let (rx, queries, writer) = (Arc::clone(&jobs_rx), query_tx.clone(), writer.clone());
            std::thread::Builder::new()
                .name(format!("api-{i}"))
                .spawn(move || worker(&rx, &shared, &mut db, writer.as_ref(), &queries))
        } else {
            let rx = Arc::clone(&query_rx);
            std::thread::Builder::new()
                .name(format!("api-query-{}", i - workers))
                .spawn(move || query_worker(&rx, &shared, &mut db))
        };
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                // dropping the senders ends the threads already started
                drop((jobs_tx, query_tx));
                for h in handles {
                    let _ = h.join();
                }
                return Err(Error::Http(format!("cannot start worker thread: {e}")));
            }
        }
    }
    drop(query_tx);
    let server = match http::Server::start(listener, limits, jobs_tx) {
        Ok(s) => s,
        Err(e) => {
            for h in handles {
                let _ = h.join();
            }
            return Err(Error::Http(format!("cannot start the accept thread: {e}")));
        }
    };
    let addr = server.addr();
    let listening = format!(
        "api: listening on http://{addr}/api/v1 with {workers} workers and {query_threads} query threads"
    );
    match exposure_warning(addr, has_token) {
        Some(warning) => crate::warn!("{listening}, {warning}"),
        None => crate::info!("{listening}"),
    }
    Ok(ApiServer {
        http: server,
        workers: handles,
    })
}

/// The warning for an API reachable from the network without a token; `None` on loopback or with a token.
pub fn exposure_warning(addr: SocketAddr, has_token: bool) -> Option<String> {
    (!addr.ip().is_loopback() && !has_token).then(|| {
        "reachable from the network, without --api-token: anyone there can read your history"
            .to_string()
    })
}

/// Settings every worker reads.
struct Shared {
    token: Option<String>,
    rollups: bool,
    devices: Option<Arc<crate::devices::Devices>>,
    /// Shared by every worker, so counters stay monotonic whichever worker answers a scrape.
    metrics: metrics::MetricsState,
    /// Recent `GET` answers, shared by the query threads.
    cache: cache::Cache,
}

/// Queries waiting for a query thread; one more is answered `503` at once.
pub const QUERY_QUEUE: usize = 64;
/// A query that waited this long for a query thread is answered `503` without running: its client (the
/// dashboard waits 20 s) is about to give up, and running it would only delay the ones behind it.
pub const QUERY_WAIT: Duration = Duration::from_secs(15);

/// How long a client may take to send its body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a request goes to the query lane: everything but uploads and the health check.
fn is_query(rq: &http::Request) -> bool {
    let path = rq.target.split('?').next().unwrap_or("");
    let path = path.strip_suffix('/').unwrap_or(path);
    rq.method != "POST" && path != "/api/v1/health"
}

/// The next job whose client is still there; `None` once the channel disconnects. (Waits in slices of a second
/// so that a poisoned lock or a stop is noticed.)
fn next_job(rx: &Mutex<Receiver<http::Job>>) -> Option<http::Job> {
    loop {
        let job = {
            let rx = rx.lock().ok()?;
            rx.recv_timeout(Duration::from_secs(1))
        };
        match job {
            Ok(job) if job.gone() => continue,
            Ok(job) => return Some(job),
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return None,
        }
    }
}

/// Takes jobs until the channel disconnects (the server stopped and every connection is gone): serves
/// uploads and health checks, queues the rest for the query threads.
/// A thread's read-only connection, opened at its first request.
struct LazyDb {
    path: std::path::PathBuf,
    conn: Option<rusqlite::Connection>,
}

impl LazyDb {
    /// Serves `job` on the connection, opening it first if needed (`503` when that fails).
    fn serve(&mut self, job: http::Job, shared: &Shared, writer: Option<&WriterHandle>) {
        if self.conn.is_none() {
            match crate::store::open(&self.path, Access::Read) {
                Ok(c) => self.conn = Some(c),
                Err(e) => {
                    crate::error!("api: cannot open the database: {e}");
                    let e = params::ApiError::status(503, "database unavailable; retry later");
                    let _ = job.reply.send(handler::Reply::error(&e));
                    return;
                }
            }
        }
        if let Some(db) = &self.conn {
            serve(job, shared, db, writer);
        }
    }
}

fn worker(
    jobs: &Mutex<Receiver<http::Job>>,
    shared: &Shared,
    db: &mut LazyDb,
    writer: Option<&WriterHandle>,
    queries: &SyncSender<http::Job>,
) {
    while let Some(job) = next_job(jobs) {
        if !is_query(&job.request) {
            db.serve(job, shared, writer);
            continue;
        }
        match queries.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                let e = params::ApiError::status(503, "too many queries waiting; retry later");
                let _ = job.reply.send(handler::Reply::error(&e));
            }
            Err(TrySendError::Disconnected(job)) => db.serve(job, shared, writer),
        }
    }
}

/// A query thread: answers the queued queries until the workers are gone.
fn query_worker(queries: &Mutex<Receiver<http::Job>>, shared: &Shared, db: &mut LazyDb) {
    while let Some(job) = next_job(queries) {
        if job.queued.elapsed() > QUERY_WAIT {
            let e = params::ApiError::status(
                503,
                "server busy: the query waited too long; retry later",
            );
            let _ = job.reply.send(handler::Reply::error(&e));
            continue;
        }
        db.serve(job, shared, None);
    }
}

/// The request target for the log, with the values of `token`, `secret` and `key` parameters hidden: the API
/// takes its token in a header only, but a client may still put one in the URL.
pub fn redact(target: &str) -> std::borrow::Cow<'_, str> {
    let Some((path, query)) = target.split_once('?') else {
        return target.into();
    };
    let secret = |k: &str| {
        let k = k.to_ascii_lowercase();
        ["token", "secret", "key", "password"]
            .iter()
            .any(|s| k.contains(s))
    };
    if !query
        .split('&')
        .any(|kv| secret(kv.split('=').next().unwrap_or("")))
    {
        return target.into();
    }
    let parts: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if secret(k) => format!("{k}=<hidden>"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{path}?{}", parts.join("&")).into()
}

fn serve(
    job: http::Job,
    shared: &Shared,
    db: &rusqlite::Connection,
    writer: Option<&WriterHandle>,
) {
    let started = std::time::Instant::now();
    let rq = &job.request;
    let (path, query) = rq.target.split_once('?').unwrap_or((&rq.target, ""));
    let req = ApiRequest {
        method: &rq.method,
        path,
        query,
        body: &rq.body,
        authorization: rq.authorization.as_deref(),
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
    // Only answers the token allows are looked up; every client with the token sees the same data, and none
    // older than a write acknowledged before the request arrived, unless it said (`max-age`) it takes older
    // ones. A client asking for `no-cache` (a benchmark) bypasses it.
    let cacheable = rq.method == "GET"
        && !rq.no_cache
        && path.starts_with("/api/v1/")
        && !path.starts_with("/api/v1/metrics")
        && handler::authorized(shared.token.as_deref(), req.authorization);
    let (reply, cached) = if cacheable {
        let wanted = cache::Wanted {
            generation: job.generation,
            max_age: rq.max_age,
        };
        shared
            .cache
            .get_or_run(&rq.target, wanted, || handler::handle(&ctx, &req))
    } else {
        (handler::handle(&ctx, &req), false)
    };
    crate::debug!(
        "api: {} {} -> {} in {} ms{}",
        rq.method,
        redact(&rq.target),
        reply.status,
        started.elapsed().as_millis(),
        if cached { " (cached)" } else { "" }
    );
    // the connection may have given up waiting: nothing to do then
    let _ = job.reply.send(reply);
}

#[cfg(test)]
mod tests;
