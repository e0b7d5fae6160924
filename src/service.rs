//! `service openwrt|systemd ARGS...`: prints a ready service definition that runs this binary with ARGS.
//!
//! Tokens given on the command line are moved into the service's environment (`MCT_API_TOKEN`, ...), so
//! they do not show in `ps`. The arguments are validated first, by [`cli::parse`]: a service file that cannot
//! start is never printed. (The command line knows nothing of this module: `cli` parses `service KIND ARGS`
//! into a [`ServiceKind`] and the raw ARGS, [`crate::app::run`] hands them here.)

use crate::cli::{self, Command, ServiceKind};
use crate::error::{Error, Result};

/// The flags whose values go into the environment.
const SECRET_FLAGS: [&str; 4] = [
    "--api-token",
    "--mihomo-token",
    "--master-token",
    "--secret",
];

/// Splits `args` into the arguments to keep and `(ENV_NAME, value)` pairs for secrets.
fn split_secrets(args: &[String]) -> (Vec<String>, Vec<(String, String)>) {
    let mut keep = Vec::new();
    let mut env = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        if SECRET_FLAGS.contains(&flag) {
            let value = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i).cloned().unwrap_or_default()
                }
            };
            env.push((cli::env_name(flag), value));
        } else {
            keep.push(a.clone());
        }
        i += 1;
    }
    (keep, env)
}

/// Whether `s` needs no quotes, in a shell or in a systemd unit.
fn is_plain(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+".contains(&b))
}

fn sh_quote(s: &str) -> String {
    if is_plain(s) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn systemd_quote(s: &str) -> String {
    if is_plain(s) {
        s.to_string()
    } else {
        format!(
            "\"{}\"",
            s.replace('\\', r"\\")
                .replace('"', "\\\"")
                .replace('%', "%%")
                .replace('$', "$$")
        )
    }
}

/// Renders the service definition for `exe ARGS...`. `args` starts with `master` or `agent`.
pub fn render(kind: ServiceKind, exe: &str, args: &[String]) -> Result<String> {
    let role = match args.first().map(String::as_str) {
        Some(r @ ("master" | "agent")) => r,
        _ => return Err(Error::Usage("service: give the command to run, e.g. `service openwrt agent --mihomo-host 127.0.0.1 ...`".into())),
    };
    match cli::parse(args.iter().map(Into::into).collect())? {
        Command::Master(_) | Command::Agent(_) => {}
        _ => {
            return Err(Error::Usage(
                "service: the command must be master or agent with its flags".into(),
            ))
        }
    }
    let (keep, env) = split_secrets(args);
    Ok(match kind {
        ServiceKind::OpenWrt => {
            let mut s = String::from("#!/bin/sh /etc/rc.common\n");
            s.push_str(&format!(
                "# mihomo-connections-tracker {role}: save as /etc/init.d/mihomo-tracker, then\n"
            ));
            s.push_str("#   chmod +x /etc/init.d/mihomo-tracker && /etc/init.d/mihomo-tracker enable && /etc/init.d/mihomo-tracker start\n");
            s.push_str(
                "USE_PROCD=1\nSTART=99\nSTOP=10\n\nstart_service() {\n\tprocd_open_instance\n",
            );
            let cmd: Vec<String> = std::iter::once(exe.to_string())
                .chain(keep)
                .map(|a| sh_quote(&a))
                .collect();
            s.push_str(&format!("\tprocd_set_param command {}\n", cmd.join(" ")));
            if !env.is_empty() {
                let pairs: Vec<String> = env
                    .iter()
                    .map(|(k, v)| sh_quote(&format!("{k}={v}")))
                    .collect();
                s.push_str(&format!("\tprocd_set_param env {}\n", pairs.join(" ")));
            }
            s.push_str("\t# restart after a crash: at most 5 times within an hour, 5 s apart\n");
            s.push_str("\tprocd_set_param respawn 3600 5 5\n\tprocd_set_param stdout 1\n\tprocd_set_param stderr 1\n");
            s.push_str("\tprocd_close_instance\n}\n");
            s
        }
        ServiceKind::Systemd => {
            let mut s = String::from("[Unit]\n");
            s.push_str(&format!(
                "Description=mihomo connections tracker ({role})\n"
            ));
            s.push_str("# save as /etc/systemd/system/mihomo-tracker.service, then: systemctl daemon-reload && systemctl enable --now mihomo-tracker\n");
            s.push_str("After=network-online.target\nWants=network-online.target\n\n[Service]\n");
            let cmd: Vec<String> = std::iter::once(exe.to_string())
                .chain(keep)
                .map(|a| systemd_quote(&a))
                .collect();
            s.push_str(&format!("ExecStart={}\n", cmd.join(" ")));
            for (k, v) in &env {
                s.push_str(&format!(
                    "Environment={}\n",
                    systemd_quote(&format!("{k}={v}"))
                ));
            }
            s.push_str("Restart=always\nRestartSec=5\nKillSignal=SIGTERM\nTimeoutStopSec=30\nUMask=0077\n\n[Install]\nWantedBy=multi-user.target\n");
            s
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn openwrt_script_moves_tokens_to_env() {
        let out = render(ServiceKind::OpenWrt, "/usr/bin/mct", &args("agent --mihomo-host 127.0.0.1 --mihomo-token s3cr'et --local-database /etc/mct/agent.db --master-url http://10.0.0.2:8080")).unwrap();
        assert!(out.starts_with("#!/bin/sh /etc/rc.common\n"));
        assert!(out.contains("procd_set_param command /usr/bin/mct agent --mihomo-host 127.0.0.1 --local-database /etc/mct/agent.db --master-url http://10.0.0.2:8080\n"), "{out}");
        assert!(
            out.contains(r"procd_set_param env 'MCT_MIHOMO_TOKEN=s3cr'\''et'"),
            "{out}"
        );
        assert!(out.contains("procd_set_param respawn"));
        assert!(!out.contains("--mihomo-token"));
    }

    #[test]
    fn systemd_unit() {
        let out = render(
            ServiceKind::Systemd,
            "/usr/local/bin/mct",
            &args("master --database /var/lib/mct.db --api-token=abc --listen-host 0.0.0.0"),
        )
        .unwrap();
        assert!(out.contains("ExecStart=/usr/local/bin/mct master --database /var/lib/mct.db --listen-host 0.0.0.0\n"), "{out}");
        assert!(out.contains("Environment=MCT_API_TOKEN=abc\n"));
        assert!(out.contains("Restart=always"));
    }

    #[test]
    fn invalid_commands_are_refused() {
        assert!(render(ServiceKind::Systemd, "x", &args("simulate")).is_err());
        assert!(render(
            ServiceKind::Systemd,
            "x",
            &args("master --database x.db --bogus")
        )
        .unwrap_err()
        .to_string()
        .contains("--bogus"));
        assert!(render(ServiceKind::Systemd, "x", &[]).is_err());
    }
}
