//! The command line: raw arguments (pico-args) into validated configurations.
//!
//! Same flags as the earlier tool (`master`, `agent`), so existing service files keep working, plus ours.
//! Every flag can also come from the environment: `--mihomo-token` from `MCT_MIHOMO_TOKEN` and so on (the
//! command line wins). Tokens can be read from a file (`--api-token-file`, ...) so they never show in `ps`.
//! [`parse`] picks the subcommand; one function per subcommand reads its flags through `Flags`. An unknown,
//! malformed or out-of-range flag is an error naming it and what it expects, and so is a flag that would be
//! ignored (`--interval-ms` on a master without `--mihomo-host`, a flag of another subcommand): exit code 2.

use crate::api::metrics::{MetricsConfig, DEFAULT_MAX_SERIES};
use crate::error::{Error, Result};
use crate::log::Level;
use crate::mihomo::collector::CollectorConfig;
use crate::mihomo::config::ControllerInfo;
use std::ffi::OsString;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

/// What to run.
#[derive(Debug)]
pub enum Command {
    Master(MasterConfig),
    Agent(AgentConfig),
    Simulate(SimulateArgs),
    /// Print a service definition for the given master/agent command line.
    Service(ServiceKind, Vec<String>),
    /// Print this text and exit 0.
    Help(&'static str),
    Version,
}

/// Which init system `service` writes a definition for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// OpenWrt's procd (`/etc/init.d/...`), with respawn.
    OpenWrt,
    /// A systemd unit.
    Systemd,
}

impl ServiceKind {
    /// Parses `openwrt|procd|systemd`.
    pub fn parse(s: &str) -> Option<ServiceKind> {
        match s {
            "openwrt" | "procd" => Some(ServiceKind::OpenWrt),
            "systemd" => Some(ServiceKind::Systemd),
            _ => None,
        }
    }
}

/// `master`: stores what agents send, answers the API; with `--mihomo-host` also collects itself.
#[derive(Debug, Clone)]
pub struct MasterConfig {
    pub database: PathBuf,
    pub listen: SocketAddr,
    pub api_token: Option<String>,
    pub mihomo: Option<CollectorConfig>,
    /// Agent id of the local collector (standalone mode).
    pub agent_id: Option<String>,
    pub retention_days: Option<u64>,
    pub workers: usize,
    pub max_body_bytes: usize,
    pub commit_interval: Duration,
    /// SQLite page cache of the writer, KiB.
    pub db_cache_kib: u64,
    pub log_level: Level,
    /// The ARP table that maps a device's IP to its MAC (`--arp-file`).
    pub arp_file: PathBuf,
    /// dnsmasq's leases, for device names (`--dhcp-leases`).
    pub dhcp_leases: PathBuf,
    /// `/metrics`: series per dimension (`--metrics-max-series`) and the host dimension (`--metrics-hosts`).
    pub metrics: MetricsConfig,
}

/// `agent`: collects next to mihomo into a local database and syncs it to a master.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub mihomo: CollectorConfig,
    pub master_url: Option<String>,
    pub master_token: Option<String>,
    pub local_database: PathBuf,
    pub agent_id: Option<String>,
    pub sync_interval: Duration,
    pub data_retention_days: u64,
    pub max_db_bytes: Option<u64>,
    pub commit_interval: Duration,
    /// SQLite page cache of the writer, KiB.
    pub db_cache_kib: u64,
    pub log_level: Level,
}

/// `simulate`: a fake mihomo controller for demos and benchmarks.
#[derive(Debug, Clone)]
pub struct SimulateArgs {
    pub listen: SocketAddr,
    pub connections: usize,
    pub churn_percent: f64,
    pub secret: Option<String>,
    pub seed: u64,
    pub log_level: Level,
}

pub const MAIN_HELP: &str = "\
mihomo-connections-tracker: records every connection mihomo handles, in SQLite, and answers questions about them

USAGE:
    mihomo-connections-tracker master --database PATH [--listen-host 127.0.0.1] [--listen-port 8080]
                                      [--api-token T] [--mihomo-host H [--mihomo-port 9090] [--mihomo-token T]]
    mihomo-connections-tracker agent  --mihomo-host H [--mihomo-port 9090] [--mihomo-token T] --local-database PATH
                                      [--master-url URL] [--master-token T] [--agent-id ID]
    mihomo-connections-tracker simulate [--listen-port 9090] [--connections 300]
    mihomo-connections-tracker service openwrt|systemd master|agent FLAGS...   (prints an init script / unit)
    mihomo-connections-tracker --version | help [master|agent|simulate]

Every flag can also be set by the environment: --mihomo-token by MCT_MIHOMO_TOKEN, and so on.
Tokens can be read from files: --api-token-file, --mihomo-token-file, --master-token-file.
Run `mihomo-connections-tracker help master` for every flag of a subcommand.
";

pub const MASTER_HELP: &str = "\
mihomo-connections-tracker master: stores connections from agents (and, with --mihomo-host, from a local mihomo)
and answers the HTTP API under /api/v1.

FLAGS:
    --database PATH          SQLite file (created 0600 if missing)                        [required]
    --listen-host H          address to listen on                                 [default: 127.0.0.1]
    --listen-port P          port to listen on (0: any free port, printed at start)    [default: 8080]
    --api-token T            require `Authorization: Bearer T` (also --api-token-file PATH)
    --mihomo-host H          standalone mode: also collect from this mihomo controller
    --mihomo-config PATH     read external-controller and secret from mihomo's config.yaml
    --mihomo-port P          its external-controller port                                [default: 9090]
    --mihomo-token T         its secret (also --mihomo-token-file PATH)
    --interval-ms MS         push interval asked of mihomo                               [default: 1000]
    --agent-id ID            agent id of the local collector                  [default: the host name]
    --retention-days N       delete closed connections older than N days         [default: keep all]
    --workers N              HTTP worker threads                                            [default: 4]
    --max-body-bytes N       largest accepted request body                           [default: 33554432]
    --commit-interval-ms MS  batch writes for this long (fewer flash writes)                [default: 2000]
    --db-cache-mb N          SQLite page cache of the writer      [default: 16, standalone (--mihomo-host) 1]
    --log-level L            error|warn|info|debug|trace; debug logs each connection  [default: info]
    --arp-file PATH          device MACs for the API (group_by=source_ip)          [default: /proc/net/arp]
    --dhcp-leases PATH       device names (dnsmasq leases)                      [default: /tmp/dhcp.leases]
    --metrics-max-series N   /metrics: series per dimension, the rest folded into other     [default: 50]
    --metrics-hosts          /metrics: also export bytes and connections by host (capped)
";

pub const AGENT_HELP: &str = "\
mihomo-connections-tracker agent: records a mihomo's connections into a local database and syncs them to a
master; keeps everything locally while the master is away.

FLAGS:
    --mihomo-host H            mihomo external-controller host       [required, or --mihomo-config]
    --mihomo-config PATH       read external-controller and secret from mihomo's config.yaml
    --mihomo-port P            its port                                                   [default: 9090]
    --mihomo-token T           its secret (also --mihomo-token-file PATH)
    --interval-ms MS           push interval asked of mihomo                              [default: 1000]
    --local-database PATH      SQLite file (created 0600 if missing)                        [required]
    --master-url URL           e.g. http://192.168.1.2:8080; without it the agent works offline
    --master-token T           the master's --api-token (also --master-token-file PATH)
    --agent-id ID              stable id of this agent                [default: the host name, remembered]
    --sync-interval S          seconds between syncs (sooner while a backlog waits)         [default: 60]
    --data-retention-days N    delete closed (and synced) connections older than N days      [default: 7]
    --max-db-mb N              keep the database file under N MiB by dropping the oldest closed rows
    --commit-interval-ms MS    batch writes for this long (fewer flash writes)               [default: 2000]
    --db-cache-mb N            SQLite page cache of the writer                                 [default: 2]
    --log-level L              error|warn|info|debug|trace; debug logs each connection   [default: info]
";

pub const SIMULATE_HELP: &str = "\
mihomo-connections-tracker simulate: a fake mihomo controller (WebSocket /connections) with made-up traffic,
for trying the tracker without a mihomo of your own.

FLAGS:
    --listen-host H       [default: 127.0.0.1]
    --listen-port P       [default: 9090]
    --connections N       live connections                                               [default: 300]
    --churn-percent P     share of connections replaced every second                        [default: 1]
    --secret S            require this secret, like mihomo's `secret:`
    --seed N              random seed                                                         [default: 1]
    --log-level L                                                                          [default: info]
";

/// The subcommands that take flags, with their help.
const SUBCOMMANDS: [(&str, &str); 3] = [
    ("master", MASTER_HELP),
    ("agent", AGENT_HELP),
    ("simulate", SIMULATE_HELP),
];

/// The ranges of numeric flags. Their upper ends keep what is computed from them in range (days in seconds,
/// MiB in bytes, `now + interval` as a deadline) and refuse values no one means.
const DAYS: RangeInclusive<u64> = 0..=1_000_000;
const MILLIS: RangeInclusive<u64> = 1..=3_600_000;

/// What the flags of the local collector need on a master.
const NEEDS_MIHOMO: &str = "--mihomo-host or --mihomo-config";

/// The environment variable standing in for `flag`: `--mihomo-token` → `MCT_MIHOMO_TOKEN`.
pub fn env_name(flag: &str) -> String {
    format!(
        "MCT_{}",
        flag.trim_start_matches('-')
            .replace('-', "_")
            .to_ascii_uppercase()
    )
}

/// Whether `help` lists `flag` (first in its line, or as the `also --x-file` of another).
fn lists_flag(help: &str, flag: &str) -> bool {
    help.contains(&format!("\n    {flag} ")) || help.contains(&format!("also {flag} "))
}

/// Reads the flags of one subcommand from the command line, then the environment.
struct Flags {
    args: pico_args::Arguments,
    /// The subcommand, named in the error for a flag of another one.
    sub: &'static str,
}

impl Flags {
    /// `flag` from the command line only.
    fn on_line(&mut self, flag: &'static str) -> Result<Option<String>> {
        self.args
            .opt_value_from_str(flag)
            .map_err(|e| Error::Usage(format!("{flag}: {e}")))
    }

    fn string(&mut self, flag: &'static str) -> Result<Option<String>> {
        let v = self.on_line(flag)?;
        Ok(v.or_else(|| std::env::var(env_name(flag)).ok().filter(|s| !s.is_empty())))
    }

    fn required(&mut self, flag: &'static str) -> Result<String> {
        self.string(flag)?
            .ok_or_else(|| Error::Usage(format!("{flag} is required (or set {})", env_name(flag))))
    }

    fn parsed<T: std::str::FromStr>(
        &mut self,
        flag: &'static str,
        what: &str,
    ) -> Result<Option<T>> {
        match self.string(flag)? {
            None => Ok(None),
            Some(s) => s
                .trim()
                .parse::<T>()
                .map(Some)
                .map_err(|_| Error::Usage(format!("{flag}: expected {what}, got '{s}'"))),
        }
    }

    /// A whole number in `range` (`what` names it in the error), `None` when not given.
    fn number_opt(
        &mut self,
        flag: &'static str,
        what: &str,
        range: RangeInclusive<u64>,
    ) -> Result<Option<u64>> {
        let Some(s) = self.string(flag)? else {
            return Ok(None);
        };
        match s.trim().parse::<u64>() {
            Ok(v) if range.contains(&v) => Ok(Some(v)),
            _ => Err(Error::Usage(format!(
                "{flag}: expected {what} {}-{}, got '{s}'",
                range.start(),
                range.end()
            ))),
        }
    }

    /// [`Flags::number_opt`] with a default.
    fn number(
        &mut self,
        flag: &'static str,
        what: &str,
        range: RangeInclusive<u64>,
        default: u64,
    ) -> Result<u64> {
        Ok(self.number_opt(flag, what, range)?.unwrap_or(default))
    }

    /// A port from `lowest` (0: any free port, for listening) to 65535.
    fn port(&mut self, flag: &'static str, default: u16, lowest: u16) -> Result<u16> {
        let range = u64::from(lowest)..=u64::from(u16::MAX);
        Ok(self.number(flag, "a port number", range, u64::from(default))? as u16)
    }

    /// A secret from `--x`, `MCT_X`, or the first line of the file named by `--x-file`.
    fn secret(&mut self, flag: &'static str, file_flag: &'static str) -> Result<Option<String>> {
        let direct = self.string(flag)?;
        let file = self.string(file_flag)?;
        match (direct, file) {
            (Some(_), Some(_)) => Err(Error::Usage(format!(
                "give {flag} or {file_flag}, not both"
            ))),
            (Some(t), None) => Ok(Some(t)),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| Error::Config(format!("{file_flag} {path}: {e}")))?;
                let t = text.lines().next().unwrap_or("").trim().to_string();
                if t.is_empty() {
                    return Err(Error::Config(format!(
                        "{file_flag} {path}: the file is empty"
                    )));
                }
                Ok(Some(t))
            }
            (None, None) => Ok(None),
        }
    }

    fn log_level(&mut self) -> Result<Level> {
        match self.string("--log-level")? {
            None => Ok(Level::Info),
            Some(s) => Level::parse(&s).ok_or_else(|| {
                Error::Usage(format!(
                    "--log-level: expected error|warn|info|debug|trace, got '{s}'"
                ))
            }),
        }
    }

    /// Refuses each of `flags` that is given (on the command line or in the environment): without `what`,
    /// it would be ignored.
    fn refuse_without(&mut self, flags: &[&'static str], what: &str) -> Result<()> {
        for &flag in flags {
            let given = match self.on_line(flag)? {
                Some(_) => Some(flag.to_string()),
                None => std::env::var(env_name(flag))
                    .ok()
                    .filter(|s| !s.is_empty())
                    .map(|_| format!("{} ({flag})", env_name(flag))),
            };
            if let Some(name) = given {
                return Err(Error::Usage(format!("{name} needs {what}")));
            }
        }
        Ok(())
    }

    /// The next word, when it is not a flag.
    fn subcommand(&mut self) -> Result<Option<String>> {
        self.args
            .subcommand()
            .map_err(|e| Error::Usage(e.to_string()))
    }

    /// Refuses whatever is left: an unknown flag, a flag of another subcommand, a stray argument.
    fn finish(self) -> Result<()> {
        let Some(first) = self.args.finish().into_iter().next() else {
            return Ok(());
        };
        let a = first.to_string_lossy();
        if !a.starts_with('-') {
            return Err(Error::Usage(format!(
                "unexpected argument '{a}' (see --help)"
            )));
        }
        let flag = a.split('=').next().unwrap_or(&a);
        let others: Vec<&str> = SUBCOMMANDS
            .iter()
            .filter(|(name, help)| *name != self.sub && lists_flag(help, flag))
            .map(|(name, _)| *name)
            .collect();
        if others.is_empty() {
            return Err(Error::Usage(format!("unknown flag '{a}' (see --help)")));
        }
        Err(Error::Usage(format!(
            "{flag} is a flag of {}, not of {} (see `help {}`)",
            others.join(" and "),
            self.sub,
            self.sub
        )))
    }
}

/// `--listen-host` and `--listen-port` (0: any free port).
fn listen(f: &mut Flags, default_port: u16) -> Result<SocketAddr> {
    let host = f
        .string("--listen-host")?
        .unwrap_or_else(|| "127.0.0.1".into());
    let port = f.port("--listen-port", default_port, 0)?;
    (host.as_str(), port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            Error::Usage(format!(
                "--listen-host: cannot use '{host}' as an address to listen on"
            ))
        })
}

/// The mihomo to collect from: `--mihomo-host`, or the controller in `--mihomo-config`, which also gives the
/// defaults of port and secret.
fn mihomo_host(f: &mut Flags) -> Result<(Option<String>, ControllerInfo)> {
    let defaults = match f.string("--mihomo-config")? {
        Some(path) => crate::mihomo::config::read(&path)?,
        None => ControllerInfo::default(),
    };
    Ok((
        f.string("--mihomo-host")?.or(defaults.host.clone()),
        defaults,
    ))
}

/// The collector of `host`: `--mihomo-port`, `--mihomo-token`, `--interval-ms`.
fn collector(f: &mut Flags, host: String, defaults: ControllerInfo) -> Result<CollectorConfig> {
    let cfg = CollectorConfig {
        host,
        port: f.port("--mihomo-port", defaults.port.unwrap_or(9090), 1)?,
        token: f
            .secret("--mihomo-token", "--mihomo-token-file")?
            .or(defaults.secret),
        interval_ms: f.number("--interval-ms", "a number of milliseconds", MILLIS, 1000)?,
    };
    crate::mihomo::collector::validate(&cfg)?;
    Ok(cfg)
}

/// `--agent-id`: 1-128 characters.
fn agent_id(f: &mut Flags) -> Result<Option<String>> {
    let id = f.string("--agent-id")?;
    match &id {
        Some(s) if s.trim().is_empty() || s.len() > 128 => Err(Error::Usage(format!(
            "--agent-id: expected 1-128 characters, got '{s}'"
        ))),
        _ => Ok(id),
    }
}

/// The writer's `--commit-interval-ms` and `--db-cache-mb` (returned in KiB).
fn writer_flags(f: &mut Flags, cache_mb_default: u64) -> Result<(Duration, u64)> {
    let commit_ms = f.number(
        "--commit-interval-ms",
        "a number of milliseconds",
        MILLIS,
        2000,
    )?;
    let cache_mb = f.number(
        "--db-cache-mb",
        "a number of MiB",
        1..=4096,
        cache_mb_default,
    )?;
    Ok((Duration::from_millis(commit_ms), cache_mb * 1024))
}

/// Parses a full argument list (without the program name).
pub fn parse(args: Vec<OsString>) -> Result<Command> {
    let mut f = Flags {
        args: pico_args::Arguments::from_vec(args),
        sub: "",
    };
    if f.args.contains("--version") || f.args.contains("-V") {
        return Ok(Command::Version);
    }
    let help = f.args.contains("--help") || f.args.contains("-h");
    let sub = f.subcommand()?;
    let Some(sub) = sub.as_deref() else {
        return match help {
            true => Ok(Command::Help(MAIN_HELP)),
            false => Err(Error::Usage(
                "a subcommand is required: master, agent or simulate (see --help)".into(),
            )),
        };
    };
    if let Some(&(name, text)) = SUBCOMMANDS.iter().find(|(name, _)| *name == sub) {
        if help {
            return Ok(Command::Help(text));
        }
        f.sub = name;
    }
    match sub {
        "help" => parse_help(f),
        "service" if help => Ok(Command::Help(MAIN_HELP)),
        "service" => parse_service(f),
        "master" => parse_master(f).map(Command::Master),
        "agent" => parse_agent(f).map(Command::Agent),
        "simulate" => parse_simulate(f).map(Command::Simulate),
        other => Err(Error::Usage(format!(
            "unknown subcommand '{other}': expected master, agent, simulate or service"
        ))),
    }
}

/// `help [master|agent|simulate]`.
fn parse_help(mut f: Flags) -> Result<Command> {
    let topic = f.subcommand()?;
    let text = SUBCOMMANDS
        .iter()
        .find(|(name, _)| Some(*name) == topic.as_deref())
        .map_or(MAIN_HELP, |(_, text)| text);
    Ok(Command::Help(text))
}

/// `service openwrt|systemd master|agent FLAGS...`: the command line is checked when rendered.
fn parse_service(mut f: Flags) -> Result<Command> {
    let kind = f.subcommand()?;
    let kind = kind
        .as_deref()
        .and_then(ServiceKind::parse)
        .ok_or_else(|| {
            Error::Usage(
                "service: expected openwrt or systemd, then the master/agent command line".into(),
            )
        })?;
    let rest: Vec<String> = f
        .args
        .finish()
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    Ok(Command::Service(kind, rest))
}

fn parse_master(mut f: Flags) -> Result<MasterConfig> {
    let database = PathBuf::from(f.required("--database")?);
    let listen = listen(&mut f, 8080)?;
    let api_token = f.secret("--api-token", "--api-token-file")?;
    let (mihomo, agent_id) = match mihomo_host(&mut f)? {
        (Some(host), defaults) => (Some(collector(&mut f, host, defaults)?), agent_id(&mut f)?),
        (None, _) => {
            let flags = [
                "--mihomo-port",
                "--mihomo-token",
                "--mihomo-token-file",
                "--interval-ms",
                "--agent-id",
            ];
            f.refuse_without(&flags, NEEDS_MIHOMO)?;
            (None, None)
        }
    };
    // a central master gets a real cache; a router (standalone) a small one (1 MB: README "Performance"
    // weighs memory against rewrites)
    let (commit_interval, db_cache_kib) =
        writer_flags(&mut f, if mihomo.is_some() { 1 } else { 16 })?;
    let cfg = MasterConfig {
        database,
        listen,
        api_token,
        mihomo,
        agent_id,
        retention_days: f.number_opt("--retention-days", "a number of days", DAYS)?,
        workers: f.number("--workers", "a number of threads", 1..=64, 4)? as usize,
        max_body_bytes: f.number(
            "--max-body-bytes",
            "a number of bytes",
            1..=1 << 30,
            32 << 20,
        )? as usize,
        commit_interval,
        db_cache_kib,
        log_level: f.log_level()?,
        arp_file: f
            .string("--arp-file")?
            .unwrap_or_else(|| "/proc/net/arp".into())
            .into(),
        dhcp_leases: f
            .string("--dhcp-leases")?
            .unwrap_or_else(|| "/tmp/dhcp.leases".into())
            .into(),
        metrics: MetricsConfig {
            max_series: f.number(
                "--metrics-max-series",
                "a number of series",
                1..=10_000,
                DEFAULT_MAX_SERIES as u64,
            )? as usize,
            hosts: f.args.contains("--metrics-hosts"),
        },
    };
    f.finish()?;
    Ok(cfg)
}

fn parse_agent(mut f: Flags) -> Result<AgentConfig> {
    let (host, defaults) = mihomo_host(&mut f)?;
    let host = host.ok_or_else(|| {
        Error::Usage(format!(
            "{NEEDS_MIHOMO} is required (or set {})",
            env_name("--mihomo-host")
        ))
    })?;
    let mihomo = collector(&mut f, host, defaults)?;
    let master_url = f.string("--master-url")?;
    let (master_token, sync_secs) = match &master_url {
        Some(u) if !u.starts_with("http://") => {
            return Err(Error::Usage(format!(
                "--master-url: expected http://HOST:PORT, got '{u}'"
            )))
        }
        Some(_) => (
            f.secret("--master-token", "--master-token-file")?,
            f.number("--sync-interval", "a number of seconds", 1..=86_400, 60)?,
        ),
        None => {
            let flags = ["--master-token", "--master-token-file", "--sync-interval"];
            f.refuse_without(&flags, "--master-url")?;
            (None, 60)
        }
    };
    let local_database = PathBuf::from(f.required("--local-database")?);
    let agent_id = agent_id(&mut f)?;
    let (commit_interval, db_cache_kib) = writer_flags(&mut f, 2)?;
    let cfg = AgentConfig {
        mihomo,
        master_url,
        master_token,
        local_database,
        agent_id,
        sync_interval: Duration::from_secs(sync_secs),
        data_retention_days: f.number(
            "--data-retention-days",
            "a number of days",
            1..=*DAYS.end(),
            7,
        )?,
        max_db_bytes: f
            .number_opt("--max-db-mb", "a number of MiB", 0..=1 << 20)?
            .map(|mb| mb << 20),
        commit_interval,
        db_cache_kib,
        log_level: f.log_level()?,
    };
    f.finish()?;
    Ok(cfg)
}

fn parse_simulate(mut f: Flags) -> Result<SimulateArgs> {
    let listen = listen(&mut f, 9090)?;
    let churn = f
        .parsed::<f64>("--churn-percent", "a percentage 0-100")?
        .unwrap_or(1.0);
    if !(0.0..=100.0).contains(&churn) {
        return Err(Error::Usage(format!(
            "--churn-percent: expected a percentage 0-100, got '{churn}'"
        )));
    }
    let cfg = SimulateArgs {
        listen,
        connections: f.number(
            "--connections",
            "a number of connections",
            0..=1_000_000,
            300,
        )? as usize,
        churn_percent: churn,
        secret: f.secret("--secret", "--secret-file")?,
        seed: f.parsed::<u64>("--seed", "a whole number")?.unwrap_or(1),
        log_level: f.log_level()?,
    };
    f.finish()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &str) -> Result<Command> {
        parse(args.split_whitespace().map(OsString::from).collect())
    }

    #[test]
    fn master_standalone_flags_of_the_earlier_tool() {
        let Command::Master(m) = p("master --database /tmp/x.db --listen-host 0.0.0.0 --listen-port 8081 --api-token s --mihomo-host 10.0.0.1 --mihomo-port 9091 --mihomo-token t").unwrap() else { panic!() };
        assert_eq!(m.listen.to_string(), "0.0.0.0:8081");
        assert_eq!(m.api_token.as_deref(), Some("s"));
        let c = m.mihomo.unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.token.as_deref(), c.interval_ms),
            ("10.0.0.1", 9091, Some("t"), 1000)
        );
    }

    #[test]
    fn safe_defaults() {
        let Command::Master(m) = p("master --database x.db").unwrap() else {
            panic!()
        };
        assert_eq!(m.listen.to_string(), "127.0.0.1:8080");
        assert!(m.mihomo.is_none() && m.api_token.is_none());
        let Command::Agent(a) = p("agent --mihomo-host 127.0.0.1 --local-database a.db").unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (
                a.sync_interval.as_secs(),
                a.data_retention_days,
                a.mihomo.port
            ),
            (60, 7, 9090)
        );
        assert!(a.master_url.is_none());
    }

    #[test]
    fn errors_name_the_flag() {
        let cases = [
            ("master --database x.db --bogus 1", "--bogus"),
            ("master --database x.db --listen-port abc", "--listen-port"),
            (
                "master --database x.db --listen-port 70000",
                "--listen-port",
            ),
            ("master", "--database"),
            ("master --database x.db --mihomo-port 9090", "--mihomo-host"),
            ("agent --local-database a.db", "--mihomo-host"),
            (
                "agent --mihomo-host h --local-database a.db --interval-ms 0",
                "--interval-ms",
            ),
            (
                "agent --mihomo-host h --local-database a.db --master-url ftp://x",
                "--master-url",
            ),
            (
                "agent --mihomo-host h --local-database a.db --log-level loud",
                "--log-level",
            ),
            ("frobnicate", "frobnicate"),
            ("master --database", "--database"),
        ];
        for (args, flag) in cases {
            let e = p(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args}");
            assert!(e.to_string().contains(flag), "{args}: {e}");
        }
    }

    #[test]
    fn device_files_and_metrics_flags() {
        let Command::Master(m) = p("master --database x.db").unwrap() else {
            panic!()
        };
        assert_eq!(
            (m.arp_file.to_str(), m.dhcp_leases.to_str()),
            (Some("/proc/net/arp"), Some("/tmp/dhcp.leases"))
        );
        assert_eq!(m.metrics, MetricsConfig::default());
        let Command::Master(m) = p("master --database x.db --arp-file /a --dhcp-leases /b --metrics-max-series 7 --metrics-hosts").unwrap() else {
            panic!()
        };
        assert_eq!(
            (m.arp_file.to_str(), m.dhcp_leases.to_str()),
            (Some("/a"), Some("/b"))
        );
        assert_eq!((m.metrics.max_series, m.metrics.hosts), (7, true));
        let e = p("master --database x.db --metrics-max-series 0").unwrap_err();
        assert!(e.to_string().contains("--metrics-max-series"), "{e}");
    }

    #[test]
    fn token_from_file() {
        let path = std::env::temp_dir().join(format!("mct-token-{}", std::process::id()));
        std::fs::write(&path, "s3cret\n").unwrap();
        let Command::Master(m) = p(&format!(
            "master --database x.db --api-token-file {}",
            path.display()
        ))
        .unwrap() else {
            panic!()
        };
        assert_eq!(m.api_token.as_deref(), Some("s3cret"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn mihomo_config_gives_defaults_and_flags_win() {
        let path = std::env::temp_dir().join(format!("mct-config-{}.yaml", std::process::id()));
        std::fs::write(
            &path,
            "external-controller: 0.0.0.0:9091\nsecret: 'from file'\n",
        )
        .unwrap();
        let Command::Agent(a) = p(&format!(
            "agent --mihomo-config {} --local-database a.db",
            path.display()
        ))
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (
                a.mihomo.host.as_str(),
                a.mihomo.port,
                a.mihomo.token.as_deref()
            ),
            ("127.0.0.1", 9091, Some("from file"))
        );
        let Command::Agent(a) = p(&format!(
            "agent --mihomo-config {} --mihomo-port 9999 --mihomo-token x --local-database a.db",
            path.display()
        ))
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (a.mihomo.port, a.mihomo.token.as_deref()),
            (9999, Some("x"))
        );
        let Command::Master(m) = p(&format!(
            "master --database m.db --mihomo-config {}",
            path.display()
        ))
        .unwrap() else {
            panic!()
        };
        assert_eq!(m.mihomo.unwrap().port, 9091);
        std::fs::remove_file(&path).unwrap();
        assert!(
            p("agent --mihomo-config /nonexistent.yaml --local-database a.db")
                .unwrap_err()
                .to_string()
                .contains("/nonexistent.yaml")
        );
    }

    /// The error of `args`: a usage error (exit code 2) whose message contains each of `needles`.
    fn usage_error(args: &str, needles: &[&str]) {
        let e = p(args).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{args}: {e}");
        for n in needles {
            assert!(e.to_string().contains(n), "{args}: {e} (wanted {n:?})");
        }
    }

    #[test]
    fn out_of_range_values_name_the_flag_and_the_range() {
        let master = "master --database x.db";
        let standalone = "master --database x.db --mihomo-host h";
        let agent = "agent --mihomo-host h --local-database a.db";
        let synced = "agent --mihomo-host h --local-database a.db --master-url http://m:8080";
        for (base, flag, value, range) in [
            (master, "--workers", "65", "1-64"),
            (master, "--workers", "0", "1-64"),
            (master, "--db-cache-mb", "4097", "1-4096"),
            (agent, "--db-cache-mb", "4097", "1-4096"),
            (master, "--metrics-max-series", "10001", "1-10000"),
            (master, "--max-body-bytes", "1073741825", "1-1073741824"),
            (master, "--retention-days", "1000001", "0-1000000"),
            (master, "--commit-interval-ms", "3600001", "1-3600000"),
            (master, "--listen-port", "65536", "0-65535"),
            (
                standalone,
                "--interval-ms",
                "18446744073709551615",
                "1-3600000",
            ),
            (standalone, "--mihomo-port", "0", "1-65535"),
            (agent, "--data-retention-days", "1000001", "1-1000000"),
            (agent, "--max-db-mb", "1048577", "0-1048576"),
            (agent, "--commit-interval-ms", "0", "1-3600000"),
            (synced, "--sync-interval", "86401", "1-86400"),
            ("simulate", "--connections", "1000001", "0-1000000"),
        ] {
            usage_error(&format!("{base} {flag} {value}"), &[flag, range, value]);
        }
        // the ends of each range are accepted as given, not clamped
        let Command::Master(m) = p(&format!(
            "{master} --workers 64 --db-cache-mb 4096 --metrics-max-series 10000"
        ))
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (m.workers, m.db_cache_kib, m.metrics.max_series),
            (64, 4096 * 1024, 10_000)
        );
        let Command::Agent(a) =
            p(&format!("{synced} --sync-interval 86400 --max-db-mb 0")).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (a.sync_interval.as_secs(), a.max_db_bytes),
            (86_400, Some(0))
        );
    }

    #[test]
    fn a_flag_that_would_be_ignored_is_refused_naming_what_it_needs() {
        let needs_mihomo = "needs --mihomo-host or --mihomo-config";
        for flag in [
            "--interval-ms 500",
            "--mihomo-port 9090",
            "--mihomo-token t",
            "--mihomo-token-file /nonexistent",
            "--agent-id a1",
        ] {
            let name = flag.split(' ').next().unwrap();
            usage_error(
                &format!("master --database x.db {flag}"),
                &[name, needs_mihomo],
            );
        }
        for flag in [
            "--sync-interval 5",
            "--master-token t",
            "--master-token-file /nonexistent",
        ] {
            let name = flag.split(' ').next().unwrap();
            usage_error(
                &format!("agent --mihomo-host h --local-database a.db {flag}"),
                &[name, "needs --master-url"],
            );
        }
        // with what they need they are taken
        let Command::Master(m) =
            p("master --database x.db --mihomo-host h --interval-ms 500 --agent-id a1").unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (m.mihomo.unwrap().interval_ms, m.agent_id.as_deref()),
            (500, Some("a1"))
        );
    }

    #[test]
    fn a_flag_of_another_subcommand_is_named_as_such() {
        usage_error(
            "master --database x.db --local-database a.db",
            &["--local-database is a flag of agent, not of master"],
        );
        usage_error(
            "master --database x.db --max-db-mb=5",
            &["--max-db-mb is a flag of agent, not of master"],
        );
        usage_error(
            "agent --mihomo-host h --local-database a.db --listen-port 1",
            &["--listen-port is a flag of master and simulate, not of agent"],
        );
        usage_error(
            "master --database x.db --api-token t --master-token-file /y",
            &["--master-token-file is a flag of agent"],
        );
        usage_error("simulate --workers 2", &["--workers is a flag of master"]);
        usage_error(
            "master --database x.db --frobnicate",
            &["unknown flag '--frobnicate'"],
        );
    }

    /// Every flag a help text lists is one its subcommand reads (the help is also where the error for a flag
    /// of another subcommand looks).
    #[test]
    fn each_help_lists_only_flags_its_subcommand_reads() {
        let bases = [
            ("master", "master --database x.db --mihomo-host h"),
            (
                "agent",
                "agent --mihomo-host h --local-database a.db --master-url http://m:1",
            ),
            ("simulate", "simulate"),
        ];
        for (name, help) in SUBCOMMANDS {
            let base = bases.iter().find(|(n, _)| *n == name).unwrap().1;
            let listed: Vec<&str> = help
                .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
                .filter(|w| w.starts_with("--") && lists_flag(help, w))
                .collect();
            assert!(listed.len() >= 7, "{name}: {listed:?}");
            for flag in listed.iter().filter(|f| !base.contains(&format!("{f} "))) {
                let args = format!("{base} {flag} 1");
                if let Err(e) = p(&args) {
                    let e = e.to_string();
                    assert!(
                        !e.contains("unknown flag") && !e.contains("is a flag of"),
                        "{args}: {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn service_takes_the_kind_then_the_command_line() {
        let Command::Service(kind, rest) = p("service procd agent --mihomo-host h").unwrap() else {
            panic!()
        };
        assert_eq!(kind, ServiceKind::OpenWrt);
        assert_eq!(rest, ["agent", "--mihomo-host", "h"]);
        assert_eq!(ServiceKind::parse("systemd"), Some(ServiceKind::Systemd));
        usage_error("service upstart master", &["openwrt or systemd"]);
        // --help is answered, never passed on into the service file
        assert!(matches!(
            p("service systemd master --database x.db --help").unwrap(),
            Command::Help(MAIN_HELP)
        ));
    }

    #[test]
    fn help_and_version() {
        assert!(matches!(p("--help").unwrap(), Command::Help(MAIN_HELP)));
        assert!(matches!(
            p("master --help").unwrap(),
            Command::Help(MASTER_HELP)
        ));
        assert!(matches!(
            p("help agent").unwrap(),
            Command::Help(AGENT_HELP)
        ));
        assert!(matches!(p("--version").unwrap(), Command::Version));
    }
}
