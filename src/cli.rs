//! The command line: raw arguments (pico-args) into validated configurations.
//!
//! Same flags as the earlier tool (`master`, `agent`), so existing service files keep working, plus ours.
//! Every flag can also come from the environment: `--mihomo-token` from `MCT_MIHOMO_TOKEN` and so on (the
//! command line wins). Tokens can be read from a file (`--api-token-file`, ...) so they never show in `ps`.
//! An unknown or malformed flag is an error naming it (exit code 2).

use crate::error::{Error, Result};
use crate::log::Level;
use crate::mihomo::collector::CollectorConfig;
use std::ffi::OsString;
use std::net::{SocketAddr, ToSocketAddrs};
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
    pub metrics: crate::counters::MetricsConfig,
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

/// Reads flags from the command line, then the environment.
struct Flags {
    args: pico_args::Arguments,
}

/// The environment variable standing in for `flag`: `--mihomo-token` → `MCT_MIHOMO_TOKEN`.
pub fn env_name(flag: &str) -> String {
    format!(
        "MCT_{}",
        flag.trim_start_matches('-')
            .replace('-', "_")
            .to_ascii_uppercase()
    )
}

impl Flags {
    fn string(&mut self, flag: &'static str) -> Result<Option<String>> {
        let v: Option<String> = self
            .args
            .opt_value_from_str(flag)
            .map_err(|e| Error::Usage(format!("{flag}: {e}")))?;
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

    fn finish(self) -> Result<()> {
        let rest = self.args.finish();
        match rest.first() {
            None => Ok(()),
            Some(a) => {
                let a = a.to_string_lossy();
                if a.starts_with('-') {
                    Err(Error::Usage(format!("unknown flag '{a}' (see --help)")))
                } else {
                    Err(Error::Usage(format!(
                        "unexpected argument '{a}' (see --help)"
                    )))
                }
            }
        }
    }
}

fn port(f: &mut Flags, flag: &'static str, default: u16, allow_zero: bool) -> Result<u16> {
    let p = f
        .parsed::<u16>(flag, "a port number 1-65535")?
        .unwrap_or(default);
    if p == 0 && !allow_zero {
        return Err(Error::Usage(format!(
            "{flag}: expected a port number 1-65535, got '0'"
        )));
    }
    Ok(p)
}

fn listen_addr(host: &str, port: u16) -> Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            Error::Usage(format!(
                "--listen-host: cannot use '{host}' as an address to listen on"
            ))
        })
}

fn positive(f: &mut Flags, flag: &'static str, default: u64) -> Result<u64> {
    let v = f
        .parsed::<u64>(flag, "a positive whole number")?
        .unwrap_or(default);
    if v == 0 {
        return Err(Error::Usage(format!(
            "{flag}: expected a positive whole number, got '0'"
        )));
    }
    Ok(v)
}

/// Reads `--mihomo-config` (mihomo's config.yaml) for defaults of host, port and secret.
fn mihomo_defaults(f: &mut Flags) -> Result<crate::mihomo::config::ControllerInfo> {
    match f.string("--mihomo-config")? {
        Some(path) => crate::mihomo::config::read(&path),
        None => Ok(Default::default()),
    }
}

fn mihomo(
    f: &mut Flags,
    host: String,
    defaults: crate::mihomo::config::ControllerInfo,
) -> Result<CollectorConfig> {
    let cfg = CollectorConfig {
        host,
        port: port(f, "--mihomo-port", defaults.port.unwrap_or(9090), false)?,
        token: f
            .secret("--mihomo-token", "--mihomo-token-file")?
            .or(defaults.secret),
        interval_ms: positive(f, "--interval-ms", 1000)?,
    };
    crate::mihomo::collector::validate(&cfg)?;
    Ok(cfg)
}

/// Parses a full argument list (without the program name).
pub fn parse(args: Vec<OsString>) -> Result<Command> {
    let mut f = Flags {
        args: pico_args::Arguments::from_vec(args),
    };
    if f.args.contains("--version") || f.args.contains("-V") {
        return Ok(Command::Version);
    }
    let help = f.args.contains("--help") || f.args.contains("-h");
    let sub = f
        .args
        .subcommand()
        .map_err(|e| Error::Usage(e.to_string()))?;
    match sub.as_deref() {
        None if help => Ok(Command::Help(MAIN_HELP)),
        None => Err(Error::Usage(
            "a subcommand is required: master, agent or simulate (see --help)".into(),
        )),
        Some("help") => {
            let topic = f
                .args
                .subcommand()
                .map_err(|e| Error::Usage(e.to_string()))?;
            Ok(Command::Help(match topic.as_deref() {
                Some("master") => MASTER_HELP,
                Some("agent") => AGENT_HELP,
                Some("simulate") => SIMULATE_HELP,
                _ => MAIN_HELP,
            }))
        }
        Some("master") if help => Ok(Command::Help(MASTER_HELP)),
        Some("agent") if help => Ok(Command::Help(AGENT_HELP)),
        Some("simulate") if help => Ok(Command::Help(SIMULATE_HELP)),
        Some("master") => {
            let database = PathBuf::from(f.required("--database")?);
            let host = f
                .string("--listen-host")?
                .unwrap_or_else(|| "127.0.0.1".into());
            let listen = listen_addr(&host, port(&mut f, "--listen-port", 8080, true)?)?;
            let api_token = f.secret("--api-token", "--api-token-file")?;
            let defaults = mihomo_defaults(&mut f)?;
            let mihomo_host = f.string("--mihomo-host")?.or(defaults.host.clone());
            let mihomo = match mihomo_host {
                Some(h) => Some(mihomo(&mut f, h, defaults)?),
                None => {
                    for flag in ["--mihomo-port", "--mihomo-token", "--mihomo-token-file"] {
                        if f.string(flag)?.is_some() {
                            return Err(Error::Usage(format!("{flag} needs --mihomo-host")));
                        }
                    }
                    let _ = f.string("--interval-ms")?;
                    None
                }
            };
            let standalone = mihomo.is_some();
            let cfg = MasterConfig {
                database,
                listen,
                api_token,
                mihomo,
                agent_id: f.string("--agent-id")?,
                retention_days: f.parsed::<u64>("--retention-days", "a whole number of days")?,
                workers: positive(&mut f, "--workers", 4)?.min(64) as usize,
                max_body_bytes: positive(&mut f, "--max-body-bytes", 32 << 20)? as usize,
                commit_interval: Duration::from_millis(positive(
                    &mut f,
                    "--commit-interval-ms",
                    2000,
                )?),
                db_cache_kib: {
                    // a central master gets a real cache; a router (standalone) a small one (1 MB: README
                    // "Performance" weighs memory against rewrites)
                    let default = if standalone { 1 } else { 16 };
                    positive(&mut f, "--db-cache-mb", default)?.min(4096) * 1024
                },
                log_level: f.log_level()?,
                arp_file: f
                    .string("--arp-file")?
                    .unwrap_or_else(|| "/proc/net/arp".into())
                    .into(),
                dhcp_leases: f
                    .string("--dhcp-leases")?
                    .unwrap_or_else(|| "/tmp/dhcp.leases".into())
                    .into(),
                metrics: crate::counters::MetricsConfig {
                    max_series: positive(
                        &mut f,
                        "--metrics-max-series",
                        crate::counters::DEFAULT_MAX_SERIES as u64,
                    )?
                    .min(10_000) as usize,
                    hosts: f.args.contains("--metrics-hosts"),
                },
            };
            f.finish()?;
            Ok(Command::Master(cfg))
        }
        Some("agent") => {
            let defaults = mihomo_defaults(&mut f)?;
            let host = match defaults.host.clone() {
                Some(h) => f.string("--mihomo-host")?.unwrap_or(h),
                None => f.required("--mihomo-host")?,
            };
            let mihomo = mihomo(&mut f, host, defaults)?;
            let master_url = f.string("--master-url")?;
            if let Some(u) = &master_url {
                if !u.starts_with("http://") {
                    return Err(Error::Usage(format!(
                        "--master-url: expected http://HOST:PORT, got '{u}'"
                    )));
                }
            }
            let cfg = AgentConfig {
                mihomo,
                master_url,
                master_token: f.secret("--master-token", "--master-token-file")?,
                local_database: PathBuf::from(f.required("--local-database")?),
                agent_id: f.string("--agent-id")?,
                sync_interval: Duration::from_secs(positive(&mut f, "--sync-interval", 60)?),
                data_retention_days: positive(&mut f, "--data-retention-days", 7)?,
                max_db_bytes: f
                    .parsed::<u64>("--max-db-mb", "a whole number of MiB")?
                    .map(|mb| mb << 20),
                commit_interval: Duration::from_millis(positive(
                    &mut f,
                    "--commit-interval-ms",
                    2000,
                )?),
                db_cache_kib: positive(&mut f, "--db-cache-mb", 2)?.min(4096) * 1024,
                log_level: f.log_level()?,
            };
            if let Some(id) = &cfg.agent_id {
                if id.trim().is_empty() || id.len() > 128 {
                    return Err(Error::Usage(format!(
                        "--agent-id: expected 1-128 characters, got '{id}'"
                    )));
                }
            }
            f.finish()?;
            Ok(Command::Agent(cfg))
        }
        Some("simulate") => {
            let host = f
                .string("--listen-host")?
                .unwrap_or_else(|| "127.0.0.1".into());
            let listen = listen_addr(&host, port(&mut f, "--listen-port", 9090, true)?)?;
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
                connections: f
                    .parsed::<usize>("--connections", "a whole number")?
                    .unwrap_or(300),
                churn_percent: churn,
                secret: f.secret("--secret", "--secret-file")?,
                seed: f.parsed::<u64>("--seed", "a whole number")?.unwrap_or(1),
                log_level: f.log_level()?,
            };
            f.finish()?;
            Ok(Command::Simulate(cfg))
        }
        Some("service") => {
            let kind = f
                .args
                .subcommand()
                .map_err(|e| Error::Usage(e.to_string()))?;
            let kind = kind
                .as_deref()
                .and_then(ServiceKind::parse)
                .ok_or_else(|| {
                    Error::Usage(
                        "service: expected openwrt or systemd, then the master/agent command line"
                            .into(),
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
        Some(other) => Err(Error::Usage(format!(
            "unknown subcommand '{other}': expected master, agent, simulate or service"
        ))),
    }
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
        assert_eq!(m.metrics, crate::counters::MetricsConfig::default());
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
