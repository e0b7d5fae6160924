//! The binary: parse the command line, start the threads, wait for SIGINT/SIGTERM, stop cleanly.

use mihomo_connections_tracker::cli::{self, Command};
use mihomo_connections_tracker::{app, log, Error};

fn wait_for_signal() -> Result<i32, Error> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .map_err(Error::io("install signal handlers"))?;
    Ok(signals.forever().next().unwrap_or(SIGTERM))
}

#[cfg(feature = "simulator")]
fn simulate(args: cli::SimulateArgs) -> Result<(), Error> {
    log::set_level(args.log_level);
    let sim = mihomo_connections_tracker::simulate::start(
        mihomo_connections_tracker::simulate::SimConfig {
            listen: args.listen,
            connections: args.connections,
            churn_percent: args.churn_percent,
            secret: args.secret,
            seed: args.seed,
        },
    )?;
    mihomo_connections_tracker::info!(
        "simulate: fake mihomo with {} connections on ws://{}/connections",
        args.connections,
        sim.addr()
    );
    wait_for_signal()?;
    sim.stop();
    Ok(())
}

#[cfg(not(feature = "simulator"))]
fn simulate(_: cli::SimulateArgs) -> Result<(), Error> {
    Err(Error::Usage(
        "this build has no simulator (router builds leave it out); use the default build, e.g. `make demo`".into(),
    ))
}

fn run() -> Result<(), Error> {
    let command = cli::parse(std::env::args_os().skip(1).collect())?;
    let running = match command {
        Command::Help(text) => {
            print!("{text}");
            return Ok(());
        }
        Command::Version => {
            println!("mihomo-connections-tracker {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        Command::Master(cfg) => {
            log::set_level(cfg.log_level);
            app::start_master(&cfg)?
        }
        Command::Agent(cfg) => {
            log::set_level(cfg.log_level);
            app::start_agent(&cfg)?
        }
        Command::Simulate(args) => return simulate(args),
        Command::Service(kind, args) => {
            let exe = std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "/usr/bin/mihomo-connections-tracker".into());
            print!(
                "{}",
                mihomo_connections_tracker::service::render(kind, &exe, &args)?
            );
            return Ok(());
        }
    };
    let sig = wait_for_signal()?;
    mihomo_connections_tracker::info!("received signal {sig}; stopping");
    running.shutdown()?;
    mihomo_connections_tracker::info!("stopped cleanly");
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("mihomo-connections-tracker: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            eprintln!("  caused by: {s}");
            source = s.source();
        }
        std::process::exit(e.exit_code());
    }
}
