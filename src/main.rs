//! The binary: parse the command line, run it ([`app::run`]), map an error to its exit code.

use mihomo_connections_tracker::{app, cli};

fn main() {
    if let Err(e) = cli::parse(std::env::args_os().skip(1).collect()).and_then(app::run) {
        eprintln!("mihomo-connections-tracker: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            eprintln!("  caused by: {s}");
            source = s.source();
        }
        std::process::exit(e.exit_code());
    }
}
