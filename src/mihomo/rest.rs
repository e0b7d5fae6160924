//! mihomo's REST endpoints beside the `/connections` WebSocket (`GET /rules`, `GET /providers/proxies`, ...):
//! one blocking `GET` with the secret as `Authorization: Bearer`, a timeout on the whole call, a bounded body,
//! and JSON out. The pollers that ask them on a schedule build on this; each says what a core without the
//! endpoint (sing-box, older mihomo) means for its figure.

use crate::error::Error;
use crate::mihomo::collector::CollectorConfig;
use std::time::Duration;

/// The largest answer read: `/providers/proxies` of a big subscription is a few hundred KB.
pub const MAX_BODY_BYTES: u64 = 8 << 20;

/// What a call gave besides a parsed answer.
#[derive(Debug)]
pub enum RestError {
    /// The core has no such endpoint (`404`): sing-box and older cores; a figure from it is unknown.
    Missing,
    /// The core refused the secret (`401`/`403`).
    Unauthorized,
    /// Anything else: unreachable, timed out, another status, a body that is not the JSON expected.
    Failed(String),
}

impl std::fmt::Display for RestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestError::Missing => f.write_str("the core has no such endpoint (404)"),
            RestError::Unauthorized => {
                f.write_str("the core refused the secret (check --mihomo-token)")
            }
            RestError::Failed(m) => f.write_str(m),
        }
    }
}

impl From<RestError> for Error {
    fn from(e: RestError) -> Error {
        Error::Mihomo(e.to_string())
    }
}

/// A client of one core's REST API.
pub struct Rest {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
}

impl Rest {
    /// A client for the controller of `cfg`; every call gives up after `timeout` in all.
    pub fn new(cfg: &CollectorConfig, timeout: Duration) -> Rest {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Rest {
            agent,
            base: format!("http://{}", cfg.authority()),
            token: cfg.token.clone(),
        }
    }

    /// `GET path` (absolute, e.g. `/rules`), parsed as `T`.
    pub fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> std::result::Result<T, RestError> {
        let text = self.get_text(path)?;
        serde_json::from_str(&text)
            .map_err(|e| RestError::Failed(format!("GET {path}: not the JSON expected: {e}")))
    }

    /// `GET path`, the body as text (a `2xx` only).
    pub fn get_text(&self, path: &str) -> std::result::Result<String, RestError> {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = req
            .call()
            .map_err(|e| RestError::Failed(format!("GET {path}: {e}")))?;
        match resp.status().as_u16() {
            200..=299 => {}
            404 => return Err(RestError::Missing),
            401 | 403 => return Err(RestError::Unauthorized),
            s => return Err(RestError::Failed(format!("GET {path}: HTTP {s}"))),
        }
        resp.body_mut()
            .with_config()
            .limit(MAX_BODY_BYTES)
            .read_to_string()
            .map_err(|e| RestError::Failed(format!("GET {path}: reading the answer: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A one-shot server answering `status` with `body`; gives the config pointing at it and the request head
    /// it saw.
    fn serve_once(
        status: &'static str,
        body: &'static str,
    ) -> (CollectorConfig, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap() == 1 {
                head.push(b[0]);
            }
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            String::from_utf8_lossy(&head).into_owned()
        });
        let cfg = CollectorConfig {
            host: "127.0.0.1".into(),
            port,
            token: Some("s3cret".into()),
            interval_ms: 1000,
        };
        (cfg, h)
    }

    #[test]
    fn answers_parse_and_statuses_say_what_they_mean() {
        let (cfg, h) = serve_once("200 OK", r#"{"rules":[]}"#);
        let v: serde_json::Value = Rest::new(&cfg, Duration::from_secs(5))
            .get("/rules")
            .unwrap();
        assert_eq!(v, serde_json::json!({"rules": []}));
        let head = h.join().unwrap();
        assert!(head.starts_with("GET /rules HTTP/1.1"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("authorization: bearer s3cret"),
            "{head}"
        );

        let (cfg, _h) = serve_once("404 Not Found", "");
        let e = Rest::new(&cfg, Duration::from_secs(5)).get_text("/rules");
        assert!(matches!(e, Err(RestError::Missing)), "{e:?}");
        let (cfg, _h) = serve_once("401 Unauthorized", r#"{"message":"Unauthorized"}"#);
        let e = Rest::new(&cfg, Duration::from_secs(5)).get_text("/rules");
        assert!(matches!(e, Err(RestError::Unauthorized)), "{e:?}");
        let (cfg, _h) = serve_once("200 OK", "not json");
        let e = Rest::new(&cfg, Duration::from_secs(5)).get::<serde_json::Value>("/rules");
        assert!(
            matches!(&e, Err(RestError::Failed(m)) if m.contains("not the JSON")),
            "{e:?}"
        );
    }

    #[test]
    fn a_silent_core_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = CollectorConfig {
            host: "127.0.0.1".into(),
            port: l.local_addr().unwrap().port(),
            token: None,
            interval_ms: 1000,
        };
        let started = std::time::Instant::now();
        let e = Rest::new(&cfg, Duration::from_millis(300)).get_text("/rules");
        assert!(matches!(e, Err(RestError::Failed(_))), "{e:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(l);
    }
}
