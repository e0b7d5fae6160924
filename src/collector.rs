//! The collector thread: mihomo's `/connections` WebSocket in, [`ConnectionDiff`]s out to the writer.
//!
//! `ws://HOST:PORT/connections?interval=MS&token=SECRET` with the secret also as `Authorization: Bearer`
//! (mihomo accepts either; sing-box and old Clash one or the other). mihomo never answers pings, so a dead
//! peer is detected by silence: no frame for [`CollectorConfig::dead_after`] drops the socket. Reads use a
//! short socket timeout so the stop flag is noticed quickly; tungstenite keeps partial frames across
//! timeouts. Reconnects back off exponentially (1 s doubling to 30 s, ±20 % jitter); a refused secret (`401`)
//! is reported once and retried every minute. Log lines are written on state changes only, never per try.

use crate::diff::Tracker;
use crate::error::{Error, Result};
use crate::store::WriteCmd;
use std::io::ErrorKind;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// Where and how to reach mihomo.
#[derive(Clone, Debug)]
pub struct CollectorConfig {
    pub host: String,
    pub port: u16,
    pub token: Option<String>,
    /// Push interval asked of mihomo (`?interval=`), ms.
    pub interval_ms: u64,
}

impl CollectorConfig {
    /// No frame for this long means the peer is gone: a few intervals, at least 5 s.
    pub fn dead_after(&self) -> Duration {
        Duration::from_millis((self.interval_ms * 4).max(5_000))
    }

    /// `host:port`, with brackets for IPv6 literals.
    pub fn authority(&self) -> String {
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The WebSocket URL, with the token URL-encoded.
    pub fn url(&self) -> String {
        let mut url = format!(
            "ws://{}/connections?interval={}",
            self.authority(),
            self.interval_ms
        );
        if let Some(t) = &self.token {
            url.push_str("&token=");
            url.push_str(&percent_encode(t));
        }
        url
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Largest WebSocket message accepted: ~80,000 connections. A larger one drops the socket (bounded memory).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
const POLL: Duration = Duration::from_millis(250);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const UNAUTHORIZED_RETRY: Duration = Duration::from_secs(60);

/// Why a session ended.
enum Ended {
    Stopped,
    Unauthorized,
    Lost(String),
}

/// Runs until `stop` is set. Every diff goes to `writer` (blocking when it is full: back-pressure).
pub fn run(
    cfg: CollectorConfig,
    mut tracker: Tracker,
    writer: SyncSender<WriteCmd>,
    stop: Arc<AtomicBool>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut last_problem = String::new();
    let mut jitter = Jitter::new();
    while !stop.load(Ordering::Relaxed) {
        let mut got_frames = false;
        let ended = session(&cfg, &mut tracker, &writer, &stop, &mut got_frames);
        tracker.stream_lost();
        if got_frames {
            backoff = BACKOFF_MIN;
        }
        let wait = match ended {
            Ended::Stopped => break,
            Ended::Unauthorized => {
                let msg = "mihomo refused the secret (401 Unauthorized): check --mihomo-token; retrying every minute".to_string();
                if msg != last_problem {
                    crate::error!("collector: {msg}");
                    last_problem = msg;
                }
                UNAUTHORIZED_RETRY
            }
            Ended::Lost(why) => {
                if got_frames || why != last_problem {
                    crate::warn!("collector: {why}; reconnecting with backoff");
                    last_problem = why;
                }
                let w = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                w
            }
        };
        if got_frames {
            last_problem.clear();
        }
        let wait = jitter.apply(wait);
        let until = Instant::now() + wait;
        while !stop.load(Ordering::Relaxed) && Instant::now() < until {
            std::thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
        }
    }
}

fn connect(cfg: &CollectorConfig) -> std::result::Result<TcpStream, String> {
    let addrs = (cfg.host.as_str(), cfg.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", cfg.host))?;
    let mut last = format!("{} resolves to no address", cfg.host);
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("cannot connect to mihomo at {addr}: {e}"),
        }
    }
    Err(last)
}

fn handshake(
    cfg: &CollectorConfig,
    stream: TcpStream,
) -> std::result::Result<WebSocket<TcpStream>, Ended> {
    use tungstenite::client::IntoClientRequest;
    let mut req = cfg
        .url()
        .into_client_request()
        .map_err(|e| Ended::Lost(format!("bad mihomo address: {e}")))?;
    if let Some(t) = &cfg.token {
        if let Ok(v) = format!("Bearer {t}").parse() {
            req.headers_mut().insert("Authorization", v);
        }
    }
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    match tungstenite::client::client_with_config(req, stream, Some(config)) {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp)))
            if resp.status() == 401 =>
        {
            Err(Ended::Unauthorized)
        }
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            Err(Ended::Lost(format!(
                "mihomo answered HTTP {} to the WebSocket upgrade",
                resp.status()
            )))
        }
        Err(tungstenite::HandshakeError::Failure(e)) => Err(Ended::Lost(format!(
            "WebSocket handshake with mihomo failed: {e}"
        ))),
        Err(tungstenite::HandshakeError::Interrupted(_)) => Err(Ended::Lost(
            "WebSocket handshake with mihomo timed out".into(),
        )),
    }
}

fn session(
    cfg: &CollectorConfig,
    tracker: &mut Tracker,
    writer: &SyncSender<WriteCmd>,
    stop: &AtomicBool,
    got_frames: &mut bool,
) -> Ended {
    let stream = match connect(cfg) {
        Ok(s) => s,
        Err(e) => return Ended::Lost(e),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_nodelay(true);
    let mut ws = match handshake(cfg, stream) {
        Ok(ws) => ws,
        Err(e) => return e,
    };
    let _ = ws.get_ref().set_read_timeout(Some(POLL));
    crate::info!(
        "collector: connected to mihomo at {} (push every {} ms)",
        cfg.authority(),
        cfg.interval_ms
    );
    let dead_after = cfg.dead_after();
    let mut last_frame = Instant::now();
    let mut clock_warned = false;
    loop {
        if stop.load(Ordering::Relaxed) {
            let _ = ws.close(None);
            return Ended::Stopped;
        }
        let data = match ws.read() {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => m.into_data(),
            Ok(Message::Close(_)) => return Ended::Lost("mihomo closed the WebSocket".into()),
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                if last_frame.elapsed() > dead_after {
                    return Ended::Lost(format!(
                        "no push from mihomo for {} s",
                        dead_after.as_secs()
                    ));
                }
                continue;
            }
            Err(tungstenite::Error::Capacity(e)) => {
                return Ended::Lost(format!(
                    "push from mihomo too large ({e}); limit {MAX_MESSAGE_BYTES} bytes"
                ))
            }
            Err(e) => return Ended::Lost(format!("WebSocket to mihomo failed: {e}")),
        };
        last_frame = Instant::now();
        let at = crate::timefmt::now_ms();
        if !crate::timefmt::clock_is_sane(at) {
            // Hold everything until NTP sets the clock: counters are cumulative, so the first push after
            // that carries all the bytes, and nothing is written with a 1970 date.
            if !clock_warned {
                crate::warn!(
                    "collector: the system clock is not set ({}); waiting for it before recording",
                    crate::timefmt::format_rfc3339(at, false)
                );
                clock_warned = true;
            }
            continue;
        }
        if clock_warned {
            crate::info!("collector: the system clock is set; recording");
            clock_warned = false;
        }
        match crate::snapshot::parse(&data) {
            Ok(snap) => {
                crate::metrics::add(&crate::metrics::FRAMES, 1);
                if snap.skipped > 0 {
                    crate::warn!(
                        "collector: skipped {} connections without a usable id",
                        snap.skipped
                    );
                }
                *got_frames = true;
                let diff = tracker.apply(&snap, at);
                drop(snap);
                drop(data);
                if !diff.is_empty() && writer.send(WriteCmd::Diff(diff)).is_err() {
                    crate::error!("collector: writer is gone; stopping");
                    return Ended::Stopped;
                }
            }
            Err(e) => crate::warn!("collector: ignored a push: {e}"),
        }
    }
}

/// Cheap jitter (±20 %) without a random-number crate: xorshift seeded from the clock.
struct Jitter(u64);

impl Jitter {
    fn new() -> Jitter {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Jitter(seed | 1)
    }
    fn apply(&mut self, d: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let factor = 0.8 + (self.0 % 1000) as f64 / 2500.0;
        d.mul_f64(factor)
    }
}

/// Checks the address and port are usable before threads start (for a clear startup error).
pub fn validate(cfg: &CollectorConfig) -> Result<()> {
    if cfg.host.is_empty() {
        return Err(Error::Usage("--mihomo-host is empty".into()));
    }
    if cfg.interval_ms == 0 {
        return Err(Error::Usage(
            "--interval-ms must be a positive number of milliseconds".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encodes_token_and_brackets_ipv6() {
        let cfg = CollectorConfig {
            host: "::1".into(),
            port: 9090,
            token: Some("a b&c=d/é".into()),
            interval_ms: 1000,
        };
        assert_eq!(
            cfg.url(),
            "ws://[::1]:9090/connections?interval=1000&token=a%20b%26c%3Dd%2F%C3%A9"
        );
        let cfg = CollectorConfig {
            host: "127.0.0.1".into(),
            port: 1,
            token: None,
            interval_ms: 500,
        };
        assert_eq!(cfg.url(), "ws://127.0.0.1:1/connections?interval=500");
        assert_eq!(cfg.dead_after(), Duration::from_secs(5));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let mut j = Jitter::new();
        for _ in 0..1000 {
            let d = j.apply(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(8) && d <= Duration::from_secs(12),
                "{d:?}"
            );
        }
    }
}
