//! Wiring: which threads each subcommand starts, in which order, and how they stop.
//!
//! Start order: open (and migrate) the database, load the open connections to resume, start the writer,
//! then the producers (HTTP workers, collector, sync, retention). Stop order is the reverse: set the stop
//! flag, join the producers (each drops its sender), drop our own sender, and the writer, seeing every
//! sender gone, commits what it holds and returns. Nothing received is lost on SIGINT/SIGTERM.

use crate::cli::{AgentConfig, Command, MasterConfig, SimulateArgs};
use crate::error::{Error, Result};
use crate::mihomo::collector::CollectorConfig;
use crate::mihomo::diff::Tracker;
use crate::retention::RetentionPolicy;
use crate::store::{self, Access, Writer, WriterConfig, WriterHandle};
use crate::sync::SyncConfig;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Capacity of the channel into the writer: a few seconds of pushes; when full, producers wait.
pub const WRITER_QUEUE: usize = 64;

/// How often retention runs (and once at start).
pub const RETENTION_EVERY: Duration = Duration::from_secs(3600);

/// A running master or agent.
pub struct Running {
    stop: Arc<AtomicBool>,
    producers: Vec<(&'static str, JoinHandle<()>)>,
    stoppers: Vec<Box<dyn FnOnce() + Send>>,
    writer_tx: Option<WriterHandle>,
    writer: Option<JoinHandle<Result<()>>>,
    /// A master's WAL checkpointer (`store::checkpoint`), stopped after the writer.
    checkpointer: Option<store::checkpoint::Checkpointer>,
    api_addr: Option<SocketAddr>,
}

fn spawn<F: FnOnce() + Send + 'static>(
    name: &'static str,
    f: F,
) -> Result<(&'static str, JoinHandle<()>)> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(256 << 10)
        .spawn(f)
        .map(|h| (name, h))
        .map_err(Error::io(format!("spawn thread {name}")))
}

impl Running {
    fn start_writer(
        db: &Path,
        agent_flag: Option<&str>,
        commit_interval: Duration,
        cache_kib: u64,
    ) -> Result<(Running, Tracker, String)> {
        let conn = store::open(db, Access::Write)?;
        // A big cache marks a central master (see --db-cache-mb): there, a thread of its own checkpoints the
        // WAL (the writer only past a cap: `store::checkpoint`), and pages are read through mmap instead of
        // copies.
        let master = cache_kib >= 8192;
        let tuning = if master {
            format!(
                "PRAGMA cache_size = -{cache_kib}; PRAGMA wal_autocheckpoint = {}; PRAGMA mmap_size = 268435456;",
                store::checkpoint::WAL_CAP_PAGES
            )
        } else {
            // A router: the cache is a bound. Without spilling, a transaction's dirty pages all stay in memory
            // whatever cache_size says (2.9 MB at 2,500 live connections: each commit rewrites their rows);
            // spilling them to the WAL early keeps memory at cache_size. The writer updates rows in order so a
            // page is spilled about once (README "Performance": write() bytes, CPU and memory measured).
            format!("PRAGMA cache_size = -{cache_kib}; PRAGMA cache_spill = ON;")
        };
        conn.execute_batch(&tuning)
            .map_err(Error::db("tune the writer connection"))?;
        let agent_id = crate::agent_id::resolve_agent_id(&conn, agent_flag)?;
        let agent_id = agent_id.as_str();
        let open = store::writer::load_open(&conn, agent_id)?;
        if !open.is_empty() {
            crate::info!(
                "store: resuming {} connections that were open at the last stop",
                open.len()
            );
        }
        let writer = Writer::new(
            conn,
            WriterConfig {
                agent_id: agent_id.to_string(),
                flush_every: commit_interval,
                ..WriterConfig::default()
            },
        )?;
        let checkpointer = match master {
            true => Some(store::checkpoint::Checkpointer::spawn(db)?),
            false => None,
        };
        let (tx, handle) = writer.spawn(WRITER_QUEUE)?;
        let running = Running {
            stop: Arc::new(AtomicBool::new(false)),
            producers: Vec::new(),
            stoppers: Vec::new(),
            writer_tx: Some(tx),
            writer: Some(handle),
            checkpointer,
            api_addr: None,
        };
        Ok((running, Tracker::new(open), agent_id.to_string()))
    }

    fn start_collector(&mut self, cfg: CollectorConfig, tracker: Tracker) -> Result<()> {
        let tx = self.writer()?;
        let stop = self.stop.clone();
        crate::info!("collector: tracking mihomo at {}", cfg.authority());
        self.producers.push(spawn("collector", move || {
            crate::mihomo::collector::run(cfg, tracker, tx, stop)
        })?);
        Ok(())
    }

    fn start_retention(&mut self, policy: RetentionPolicy) -> Result<()> {
        let handle = crate::retention::spawn_retention(
            policy,
            RETENTION_EVERY,
            self.writer()?,
            self.stop.clone(),
        );
        self.producers.push(("retention", handle));
        Ok(())
    }

    /// A handle on the writer (for tests and for threads started later).
    pub fn writer(&self) -> Result<WriterHandle> {
        self.writer_tx.clone().ok_or(Error::Stopped("writer"))
    }

    /// Commits everything the writer holds, and waits for it (tests use this to wait on an event).
    pub fn flush(&self) -> Result<()> {
        self.writer()?.flush(Duration::from_secs(30))
    }

    /// Where the HTTP API listens (with the real port when port 0 was asked).
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.api_addr
    }

    /// Stops every thread and waits for them; the writer commits what it holds before this returns.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        for stopper in self.stoppers.drain(..) {
            stopper();
        }
        for (name, h) in self.producers.drain(..) {
            if h.join().is_err() {
                crate::error!("{name} thread panicked");
            }
        }
        self.writer_tx = None;
        let writer = match self.writer.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::Stopped("writer")),
            None => Ok(()),
        };
        if let Some(c) = self.checkpointer.take() {
            c.stop();
        }
        writer
    }
}

/// Lives with the API, which says in one line where it listens and whether anyone on the network can read it.
pub use crate::api::exposure_warning;

/// Starts a master: the API, and in standalone mode (`--mihomo-host`) a collector of its own.
pub fn start_master(cfg: &MasterConfig) -> Result<Running> {
    let (mut running, tracker, agent_id) = Running::start_writer(
        &cfg.database,
        cfg.agent_id.as_deref(),
        cfg.commit_interval,
        cfg.db_cache_kib,
    )?;
    let api = crate::api::start(
        crate::api::ApiConfig {
            listen: cfg.listen,
            token: cfg.api_token.clone(),
            db_path: cfg.database.clone(),
            workers: cfg.workers,
            max_body_bytes: cfg.max_body_bytes,
            devices: Some(Arc::new(crate::devices::Devices::new(
                Some(cfg.arp_file.clone()),
                Some(cfg.dhcp_leases.clone()),
            ))),
            metrics: cfg.metrics.clone(),
        },
        Some(running.writer()?),
    );
    let api = match api {
        Ok(api) => api,
        Err(e) => {
            let _ = running.shutdown();
            return Err(e);
        }
    };
    running.api_addr = Some(api.addr());
    running.stoppers.push(Box::new(move || api.stop()));
    if let Some(days) = cfg.retention_days {
        let policy = RetentionPolicy {
            max_age: Some(Duration::from_secs(days * 86_400)),
            max_db_bytes: None,
            require_synced: false,
            // the earlier tool's agents never send an end time: their stale "open" rows go by age too
            delete_stale_open: true,
        };
        running.start_retention(policy)?;
    }
    if let Some(m) = &cfg.mihomo {
        crate::info!("collector: recording as agent '{agent_id}'");
        running.start_collector(m.clone(), tracker)?;
    }
    Ok(running)
}

/// Starts an agent: collector and writer into the local database, and the sync thread when a master is set.
pub fn start_agent(cfg: &AgentConfig) -> Result<Running> {
    let (mut running, tracker, agent_id) = Running::start_writer(
        &cfg.local_database,
        cfg.agent_id.as_deref(),
        cfg.commit_interval,
        cfg.db_cache_kib,
    )?;
    crate::info!("agent: recording as '{agent_id}'");
    running.start_collector(cfg.mihomo.clone(), tracker)?;
    match &cfg.master_url {
        Some(url) => {
            let sync_cfg = SyncConfig {
                token: cfg.master_token.clone(),
                interval: cfg.sync_interval,
                ..SyncConfig::new(url.clone(), agent_id)
            };
            crate::info!("sync: to {url} every {} s", cfg.sync_interval.as_secs());
            let handle = crate::sync::spawn(
                sync_cfg,
                cfg.local_database.clone(),
                running.writer()?,
                running.stop.clone(),
            )?;
            running.producers.push(("sync", handle));
        }
        None => crate::info!(
            "sync: no --master-url; working offline, everything stays in {}",
            cfg.local_database.display()
        ),
    }
    let policy = RetentionPolicy {
        max_age: Some(Duration::from_secs(cfg.data_retention_days * 86_400)),
        max_db_bytes: cfg.max_db_bytes,
        require_synced: cfg.master_url.is_some(),
        delete_stale_open: false,
    };
    running.start_retention(policy)?;
    Ok(running)
}

/// Runs a parsed command line: prints the help, the version or a service file, or runs a master, an agent or
/// the simulator until SIGINT/SIGTERM, then stops it cleanly.
pub fn run(command: Command) -> Result<()> {
    let running = match command {
        Command::Help(text) => {
            print!("{text}");
            return Ok(());
        }
        Command::Version => {
            println!("mihomo-connections-tracker {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        Command::Service(kind, args) => {
            let exe = std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "/usr/bin/mihomo-connections-tracker".into());
            print!("{}", crate::service::render(kind, &exe, &args)?);
            return Ok(());
        }
        Command::Master(cfg) => {
            crate::log::set_level(cfg.log_level);
            start_master(&cfg)?
        }
        Command::Agent(cfg) => {
            crate::log::set_level(cfg.log_level);
            start_agent(&cfg)?
        }
        Command::Simulate(args) => return simulate(args),
    };
    let sig = wait_for_signal()?;
    crate::info!("received signal {sig}; stopping");
    running.shutdown()?;
    crate::info!("stopped cleanly");
    Ok(())
}

/// Blocks until SIGINT or SIGTERM; returns which.
fn wait_for_signal() -> Result<i32> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(Error::io("install signal handlers"))?;
    Ok(signals.forever().next().unwrap_or(SIGTERM))
}

/// Runs the fake mihomo ([`crate::simulate`], which says where it listens) until SIGINT/SIGTERM.
#[cfg(feature = "simulator")]
fn simulate(args: SimulateArgs) -> Result<()> {
    crate::log::set_level(args.log_level);
    let sim = crate::simulate::start(crate::simulate::SimConfig {
        listen: args.listen,
        connections: args.connections,
        churn_percent: args.churn_percent,
        secret: args.secret,
        seed: args.seed,
    })?;
    wait_for_signal()?;
    sim.stop();
    Ok(())
}

#[cfg(not(feature = "simulator"))]
fn simulate(_: SimulateArgs) -> Result<()> {
    Err(Error::Usage(
        "this build has no simulator (router builds leave it out); use the default build, e.g. `make demo`".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A master (big cache: the checkpointer runs) takes a sync batch; the checkpointer copies it into the
    /// database file while the master runs (the writer's own checkpoint is far away), and after shutdown
    /// the WAL is gone and every row is in the file.
    #[test]
    fn a_master_checkpoints_off_the_writer_and_leaves_no_wal() {
        let dir = std::env::temp_dir().join(format!("mct-app-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("m.db");
        let cfg = MasterConfig {
            database: db.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            api_token: None,
            mihomo: None,
            agent_id: Some("master".into()),
            retention_days: None,
            workers: 1,
            max_body_bytes: 1 << 20,
            commit_interval: Duration::from_millis(30),
            db_cache_kib: 16 * 1024,
            log_level: crate::log::Level::Warn,
            arp_file: "/nonexistent/arp".into(),
            dhcp_leases: "/nonexistent/dhcp.leases".into(),
            metrics: Default::default(),
        };
        let running = start_master(&cfg).unwrap();
        let size = || std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
        let before = size();
        let records: Vec<serde_json::Value> = (0..500)
            .map(|i| {
                serde_json::json!({"id": format!("c{i}"), "upload": i, "download": 2 * i,
                    "start": "2026-11-29T07:00:00Z", "last_updated": "2026-11-29T07:01:00Z",
                    "host": format!("host-{i}.example.com")})
            })
            .collect();
        let body = serde_json::json!({"agent_id": "a1", "connections": records});
        let answer = crate::api::ingest::handle_sync(
            &serde_json::to_vec(&body).unwrap(),
            &running.writer().unwrap(),
            0,
        )
        .unwrap();
        assert_eq!(answer["count"], 500);
        // 500 rows of about 150 bytes: only a checkpoint writes them into the file
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while size() < before + 50_000 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            size() >= before + 50_000,
            "file {} bytes, was {before}",
            size()
        );
        running.shutdown().unwrap();
        assert!(!dir.join("m.db-wal").exists(), "WAL left after shutdown");
        let c = rusqlite::Connection::open(&db).unwrap();
        let n: i64 = c
            .query_row(
                "SELECT count(*) FROM connections WHERE agent_id = 'a1'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 500);
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
