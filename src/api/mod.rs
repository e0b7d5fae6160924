//! The master's HTTP API (`/api/v1/...`, see API-COMPAT): our own small HTTP/1.1 server ([`http`]: one
//! thread per connection, bounded, with limits on every byte and second a client controls) hands complete
//! requests over a bounded channel to N named worker threads, each with its own read-only database
//! connection. Handlers are plain functions ([`handler::handle`]) from a parsed request to a
//! [`handler::Reply`]; workers never touch a socket, so no client can hold one.
//!
//! Queries live one module per endpoint ([`stats`], [`connections`], [`agents`], [`options`]); parameters
//! are parsed once into typed values ([`params`]) before any SQL exists, and SQL only binds values. Unfiltered
//! aggregates read hourly rollups (kept by every writer, [`crate::store::rollup`]) when the database has them.
//!
//! `GET /metrics` (also `/api/v1/metrics`) answers the Prometheus text format ([`metrics`]).
//!
//! Stop: [`ApiServer::stop`] closes the listener and lets the connection threads finish the request in hand;
//! when the last one is gone the job channel disconnects and the workers end; all are joined.

pub mod agents;
pub mod connections;
pub mod handler;
pub mod http;
pub mod metrics;
pub mod options;
pub mod params;
pub mod rollup;
pub mod stats;
pub mod table;

use crate::error::{Error, Result};
use crate::store::{Access, WriteCmd};
use handler::{ApiRequest, Ctx};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
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
    let limits = http::Limits {
        body_timeout,
        ..http::Limits::default()
    };
    start_with_limits(cfg, writer, limits)
}

/// [`start`] with other client limits (`max_body_bytes` and `token` are taken from `cfg`).
pub fn start_with_limits(
    cfg: ApiConfig,
    writer: Option<SyncSender<WriteCmd>>,
    mut limits: http::Limits,
) -> Result<ApiServer> {
    let workers = cfg.workers.max(1);
    let mut conns = Vec::with_capacity(workers);
    for _ in 0..workers {
        conns.push(crate::store::open(&cfg.db_path, Access::Read)?);
    }
    let rollups = rollup::has_rollups(&conns[0]);
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
    });
    let mut handles = Vec::with_capacity(workers);
    for (i, db) in conns.into_iter().enumerate() {
        let (rx, shared) = (Arc::clone(&jobs_rx), Arc::clone(&shared));
        let writer = writer.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("api-{i}"))
            .spawn(move || worker(&rx, &shared, &db, writer.as_ref()));
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                // dropping the sender ends the workers already started
                drop(jobs_tx);
                for h in handles {
                    let _ = h.join();
                }
                return Err(Error::Http(format!("cannot start worker thread: {e}")));
            }
        }
    }
    let server = match http::Server::start(listener, limits, jobs_tx) {
        Ok(s) => s,
        Err(e) => {
            for h in handles {
                let _ = h.join();
            }
            return Err(Error::Http(format!("cannot start the accept thread: {e}")));
        }
    };
    crate::info!(
        "api: listening on http://{}/api/v1 with {workers} workers",
        server.addr()
    );
    Ok(ApiServer {
        http: server,
        workers: handles,
    })
}

/// Settings every worker reads.
struct Shared {
    token: Option<String>,
    rollups: bool,
    devices: Option<Arc<crate::devices::Devices>>,
    /// Shared by every worker, so counters stay monotonic whichever worker answers a scrape.
    metrics: metrics::MetricsState,
}

/// How long a client may take to send its body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Answers jobs until the channel disconnects (the server stopped and every connection is gone).
fn worker(
    jobs: &Mutex<Receiver<http::Job>>,
    shared: &Shared,
    db: &rusqlite::Connection,
    writer: Option<&SyncSender<WriteCmd>>,
) {
    loop {
        let job = {
            let Ok(rx) = jobs.lock() else { return };
            rx.recv_timeout(Duration::from_secs(1))
        };
        match job {
            Ok(job) => serve(job, shared, db, writer),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
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
    writer: Option<&SyncSender<WriteCmd>>,
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
    let reply = handler::handle(&ctx, &req);
    crate::debug!(
        "api: {} {} -> {} in {} ms",
        rq.method,
        redact(&rq.target),
        reply.status,
        started.elapsed().as_millis()
    );
    // the connection may have given up waiting: nothing to do then
    let _ = job.reply.send(reply);
}

#[cfg(test)]
mod tests;
