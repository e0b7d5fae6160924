//! # mihomo-connections-tracker
//!
//! Records every connection a mihomo (Clash Meta) proxy handles into SQLite and answers questions about
//! them over HTTP. Built for home routers: blocking code on a handful of OS threads, no async runtime, a
//! static binary of about 2 MB.
//!
//! ## Where things live
//!
//! ```text
//!  main.rs   parse, app::run, exit code           app.rs   which threads each subcommand starts, and stops
//!  cli.rs    flags into validated configs         service.rs  init scripts and units for those command lines
//!  mihomo/   everything that talks to the core: collector (WebSocket), snapshot (push parser), diff
//!            (snapshots into changes), rest + poll (its REST endpoints on a schedule), config (config.yaml)
//!  store/    the database: schema (migrations), writer (the one writing thread and its WriterHandle),
//!            merge (the one place rows and their traffic are merged), rollup, checkpoint
//!  api/      the HTTP API: http (our server), handler (routing), ingest (POST /sync: decode, validate),
//!            params, stats, connections, agents, options, table, cache, metrics/ (the /metrics table)
//!  sync.rs   the agent's side of syncing      retention.rs  old rows out      simulate.rs  a fake mihomo
//!  model.rs  what flows between threads, and the connection's fields declared once
//!  error.rs log.rs counters.rs timefmt.rs agent_id.rs devices.rs test_hooks.rs
//! ```
//!
//! Layering: `store/` imports neither `api/` nor `mihomo/`; `model` and `error` import nothing of ours above
//! them; there is no import loop.
//!
//! ## Threads and channels
//!
//! ```text
//!  mihomo ──ws /connections──▶ [collector] ──WriteCmd::Diff──┐   (sync_channel, 64 slots: back-pressure)
//!                                                            ▼
//!  agents ──POST /api/v1/sync──▶ [http-N] ──WriteCmd::Grouped──▶ [writer] ──▶ SQLite file (WAL)
//!  users ───GET /api/v1/...───▶ [http-N] ◀──── read-only connections ───────┘   ▲
//!  [sync] (agent) ── reads rows by change counter, POSTs to the master ─────────┤
//!         └──────── WriteCmd::Run (advance the cursor after the master's ack) ──┘
//!  [retention] ──── WriteCmd::Run (delete old closed rows) on a schedule
//!  [poller] ─── GET the core's REST endpoints on a schedule ──▶ WriteCmd::Run
//!  [checkpointer] (master) ── its own connection: copies the WAL into the database file
//!  app::run: waits for SIGINT/SIGTERM, sets the stop flag, joins everything
//! ```
//!
//! Every thread reaches the writer through a [`store::WriterHandle`] (send with a deadline, or call and wait
//! for the answer with a timeout).
//!
//! - `collector` ([`mihomo::collector`], [`mihomo::snapshot`], [`mihomo::diff`]): one thread reads mihomo's
//!   full snapshots, diffs them against the open set and sends [`model::ConnectionDiff`]s (opened, byte
//!   deltas, closed).
//! - `writer` ([`store::writer`]): the only thread that writes the database. It coalesces diffs and commits
//!   them in one transaction every `--commit-interval-ms` (2 s); a master's sync batches arrive as
//!   `WriteCmd::Grouped` writes (up to four share one commit, each still all or nothing), other writes as
//!   closures. Both paths merge rows through [`store::merge`].
//! - `http-N` ([`api`]): a pool of workers, each with its own read-only connection, fed by a bounded HTTP/1.1
//!   server of our own ([`api::http`]: one thread per connection, limits on every byte and second, heads
//!   parsed with httparse, requests handed over a bounded channel); handlers are plain functions from a parsed
//!   request to a reply. Two lanes, so that slow queries never make agents' syncs time out: the workers serve
//!   `POST /sync` (decoded and validated there, [`api::ingest`], then applied by the writer) and `/health`;
//!   every other request goes over a bounded queue (`503` when full or after 15 s) to `api-query-N` (one per
//!   four workers), which answers `GET`s through a single-flight answer cache ([`api::cache`]) that never
//!   serves an answer older than a commit acknowledged before the request arrived, unless the client says
//!   `Cache-Control: max-age=N`.
//! - `sync` ([`sync`], agent only): pushes rows whose change counter passed the acknowledged cursor.
//! - `retention` ([`retention`]): deletes old closed (and, on an agent, synced) rows on a schedule.
//! - `poller` ([`mihomo::poll`]): asks the core's REST endpoints ([`mihomo::rest`]) on a schedule.
//! - `checkpointer` ([`store::checkpoint`], a master with `--db-cache-mb` 8 or more): runs SQLite's `PASSIVE`
//!   WAL checkpoints beside the writer, so the writer's commits only append to the WAL (it checkpoints itself
//!   only past a 128 MiB cap). It never changes what is stored, only where the pages sit.
//!
//! ## Invariants
//!
//! - Only the writer thread writes the database; everyone else reads through their own connection.
//! - Every channel is bounded; every blocking call has a timeout (WebSocket reads, HTTP client calls,
//!   SQLite's `busy_timeout`), so each loop notices the one stop flag within a fraction of a second.
//! - Times are stored and compared as UTC milliseconds ([`timefmt`]); mihomo's local offsets are normalised.
//! - Bytes are kept twice: the latest totals on the connection row, and the deltas per minute in which they
//!   flowed (`traffic`); the deltas of a connection always add up to its totals.
//! - A connection is never counted twice: a tracker restart resumes from stored bytes, a reconnect or core
//!   restart closes what vanished at the time it was last seen, a reappearing id reopens its row.
//! - On SIGINT/SIGTERM the writer commits everything it received before the process exits 0.
//! - A full or failing disk is survived: the writer holds its batch (bounded) and retries, `POST /sync`
//!   answers `503` and the agent retries; each is logged once, not per try.
//! - SQL only binds values; column names come from fixed whitelists.

#![forbid(unsafe_code)]

pub mod agent_id;
pub mod api;
pub mod app;
pub mod cli;
pub mod counters;
pub mod devices;
pub mod error;
pub mod log;
pub mod mihomo;
pub mod model;
pub mod retention;
pub mod service;
#[cfg(feature = "simulator")]
pub mod simulate;
pub mod store;
pub mod sync;
pub mod test_hooks;
pub mod timefmt;

pub use error::{Error, Result};
