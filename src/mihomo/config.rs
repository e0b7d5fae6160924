//! `--mihomo-config PATH`: reads `external-controller` and `secret` from mihomo's `config.yaml`, so a user
//! does not copy the secret by hand. Only these two top-level keys are read, with a line-based reader (no
//! YAML library: a router binary should not carry one for two scalars).

use crate::error::{Error, Result};

/// What the config tells about the controller.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ControllerInfo {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub secret: Option<String>,
}

fn scalar(v: &str) -> String {
    let v = v.trim();
    if let Some(inner) = v
        .strip_prefix('"')
        .and_then(|r| r.rsplit_once('"'))
        .map(|(a, _)| a)
    {
        return inner.replace("\\\"", "\"").replace("\\\\", "\\");
    }
    if let Some(inner) = v
        .strip_prefix('\'')
        .and_then(|r| r.rsplit_once('\''))
        .map(|(a, _)| a)
    {
        return inner.replace("''", "'");
    }
    // plain scalar: a ` #` starts a comment
    match v.find(" #") {
        Some(i) => v[..i].trim().to_string(),
        None => v.to_string(),
    }
}

/// Parses the text of a config.yaml.
pub fn parse(text: &str) -> ControllerInfo {
    let mut info = ControllerInfo::default();
    for line in text.lines() {
        if line.starts_with([' ', '\t', '#']) {
            continue;
        }
        if let Some(v) = line.strip_prefix("external-controller:") {
            let v = scalar(v);
            if let Some((h, p)) = v.rsplit_once(':') {
                let h = h.trim_start_matches('[').trim_end_matches(']');
                info.host = Some(match h {
                    "" | "0.0.0.0" => "127.0.0.1".to_string(),
                    "::" => "::1".to_string(),
                    _ => h.to_string(),
                });
                info.port = p.parse().ok();
            }
        } else if let Some(v) = line.strip_prefix("secret:") {
            let s = scalar(v);
            if !s.is_empty() {
                info.secret = Some(s);
            }
        }
    }
    info
}

/// Reads and parses a config file.
pub fn read(path: &str) -> Result<ControllerInfo> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("--mihomo-config {path}: {e}")))?;
    let info = parse(&text);
    if info.host.is_none() {
        return Err(Error::Config(format!("--mihomo-config {path}: no `external-controller: HOST:PORT` line; the controller must be enabled")));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_controller_and_secret() {
        for (text, host, port, secret) in [
            (
                "mixed-port: 7890\nexternal-controller: 0.0.0.0:9090 # for the dashboard\nsecret: \"p@ss w#rd\"\ndns:\n  secret: nested-ignored\n",
                "127.0.0.1",
                9090,
                "p@ss w#rd",
            ),
            (
                "external-controller: '192.168.1.1:9091'\nsecret: plain # comment\n",
                "192.168.1.1",
                9091,
                "plain",
            ),
        ] {
            let want = ControllerInfo {
                host: Some(host.into()),
                port: Some(port),
                secret: Some(secret.into()),
            };
            assert_eq!(parse(text), want, "{text}");
        }
        assert_eq!(
            parse("external-controller: :9090\n").host.as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(parse("secret: ''\n").secret, None);
    }
}
