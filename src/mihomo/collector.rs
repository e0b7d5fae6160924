//! The collector thread: mihomo's `/connections` WebSocket in, [`ConnectionDiff`](crate::model::ConnectionDiff)s out to the writer.
//!
//! `ws://HOST:PORT/connections?interval=MS&token=SECRET` with the secret also as `Authorization: Bearer`
//! (mihomo accepts either; sing-box and old Clash one or the other). mihomo never answers pings, so a dead
//! peer is detected by silence: no frame for [`CollectorConfig::dead_after`] drops the socket. tungstenite
//! does the upgrade; the frames are read by our `FrameReader`, and each push is parsed as its payload streams
//! in ([`crate::mihomo::snapshot::read`]; memory: a push is 2 MB at 2,500 connections, and none of it is held whole).
//! Reads use a short socket timeout so the stop flag is noticed quickly; partial frames are kept across
//! timeouts. A push is applied to the tracker only once it parsed whole: a bad one changes nothing.
//! Reconnects back off exponentially (1 s doubling to 30 s, ±20 % jitter); a refused secret (`401`) is
//! reported once and retried every minute. Log lines are written on state changes only, never per try.

use crate::error::{Error, Result};
use crate::mihomo::diff::Tracker;
use crate::mihomo::snapshot::Snapshot;
use crate::store::{WriteCmd, WriterHandle};
use std::io::ErrorKind;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    writer: WriterHandle,
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

/// The WebSocket upgrade, by tungstenite; the frames that follow are read by [`FrameReader`].
fn handshake(cfg: &CollectorConfig, stream: TcpStream) -> std::result::Result<FrameReader, Ended> {
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
    let stream = UpToHeaders { stream, window: 0 };
    match tungstenite::client::client(req, stream) {
        Ok((ws, _)) => Ok(FrameReader::new(ws.into_inner().stream)),
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

/// One connection to mihomo, from connecting until it is lost or `stop` is set: every push that parses is
/// applied to the tracker and its diffs sent to the writer.
fn session(
    cfg: &CollectorConfig,
    tracker: &mut Tracker,
    writer: &WriterHandle,
    stop: &AtomicBool,
    got_frames: &mut bool,
) -> Ended {
    let mut ws = match open(cfg) {
        Ok(ws) => ws,
        Err(e) => return e,
    };
    let dead_after = cfg.dead_after();
    let mut last_frame = Instant::now();
    let mut clock = ClockGate::default();
    loop {
        if stop.load(Ordering::Relaxed) {
            ws.close();
            return Ended::Stopped;
        }
        match ws.next_message() {
            Ok(()) => {}
            Err(WsError::Timeout) => {
                if last_frame.elapsed() > dead_after {
                    return Ended::Lost(format!(
                        "no push from mihomo for {} s",
                        dead_after.as_secs()
                    ));
                }
                continue;
            }
            Err(e) => return lost(e),
        }
        let parsed = match read_push(&mut ws, tracker, stop, dead_after) {
            Ok(parsed) => parsed,
            Err(ended) => return ended,
        };
        last_frame = Instant::now();
        let at = crate::timefmt::now_ms();
        if !clock.is_set(at) {
            continue;
        }
        match parsed {
            Ok(snap) => {
                *got_frames = true;
                if !record(snap, at, tracker, writer) {
                    crate::error!("collector: writer is gone; stopping");
                    return Ended::Stopped;
                }
            }
            Err(e) => crate::warn!("collector: ignored a push: {e}"),
        }
    }
}

/// Connects and upgrades to the WebSocket, with the socket timeouts set.
fn open(cfg: &CollectorConfig) -> std::result::Result<FrameReader, Ended> {
    let stream = connect(cfg).map_err(Ended::Lost)?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_nodelay(true);
    let ws = handshake(cfg, stream)?;
    let _ = ws.stream.set_read_timeout(Some(POLL));
    crate::info!(
        "collector: connected to mihomo at {} (push every {} ms)",
        cfg.authority(),
        cfg.interval_ms
    );
    Ok(ws)
}

/// Parses the message [`FrameReader::next_message`] started as it comes in: only a small window of it is
/// ever in memory. A push that does not parse is `Ok(Err(..))` (ignored, the session goes on); the socket
/// failing, or falling silent, in the middle of it ends the session.
fn read_push(
    ws: &mut FrameReader,
    tracker: &Tracker,
    stop: &AtomicBool,
    dead_after: Duration,
) -> std::result::Result<Result<Snapshot>, Ended> {
    let mut payload = Payload {
        ws,
        stop,
        dead_after,
        last_byte: Instant::now(),
        failed: None,
    };
    let parsed = crate::mihomo::snapshot::read(&mut payload, |id| tracker.knows(id));
    // whatever the parser left (after a bad push): skipped, so the next push starts clean
    let _ = std::io::copy(&mut payload, &mut std::io::sink());
    let Some(e) = payload.failed.take() else {
        return Ok(parsed);
    };
    if stop.load(Ordering::Relaxed) {
        ws.close();
        return Err(Ended::Stopped);
    }
    Err(match e {
        WsError::Timeout => Ended::Lost(format!(
            "mihomo stopped sending in the middle of a push for {} s",
            dead_after.as_secs()
        )),
        e => lost(e),
    })
}

/// Holds every push while the system clock is not set: counters are cumulative, so the first push after
/// NTP sets it carries all the bytes, and nothing is written with a 1970 date. Logs each change once.
#[derive(Default)]
struct ClockGate {
    warned: bool,
}

impl ClockGate {
    /// Whether a push received at `at` (ms) may be recorded.
    fn is_set(&mut self, at: i64) -> bool {
        if !crate::timefmt::clock_is_sane(at) {
            if !self.warned {
                crate::warn!(
                    "collector: the system clock is not set ({}); waiting for it before recording",
                    crate::timefmt::format_rfc3339(at, false)
                );
                self.warned = true;
            }
            return false;
        }
        if self.warned {
            crate::info!("collector: the system clock is set; recording");
            self.warned = false;
        }
        true
    }
}

/// Applies a push received at `at` to the tracker and sends its diffs to the writer; false when the writer
/// is gone.
fn record(snap: Snapshot, at: i64, tracker: &mut Tracker, writer: &WriterHandle) -> bool {
    crate::counters::add(&crate::counters::FRAMES, 1);
    if snap.skipped > 0 {
        crate::warn!(
            "collector: skipped {} connections without a usable id",
            snap.skipped
        );
    }
    let mut writer_gone = false;
    let diff = tracker.apply_in_parts(&snap, at, OPENED_PART, &mut |part| {
        writer_gone |= writer.send_blocking(WriteCmd::Diff(part)).is_err();
    });
    drop(snap);
    !(writer_gone || (!diff.is_empty() && writer.send_blocking(WriteCmd::Diff(diff)).is_err()))
}

/// New connections are handed to the writer in diffs of at most this many (memory: their decoded metadata
/// is about 1.5 KB each until the writer packs it).
const OPENED_PART: usize = 100;

/// Why a session ends, from the error that ended it.
fn lost(e: WsError) -> Ended {
    match e {
        WsError::Closed => Ended::Lost("mihomo closed the WebSocket".into()),
        WsError::TooLarge(size) => Ended::Lost(format!(
            "push from mihomo too large ({size} bytes or more); limit {MAX_MESSAGE_BYTES} bytes"
        )),
        WsError::Protocol(e) => Ended::Lost(format!("WebSocket to mihomo failed: {e}")),
        WsError::Io(e) => Ended::Lost(format!("WebSocket to mihomo failed: {e}")),
        WsError::Timeout => Ended::Lost("WebSocket to mihomo timed out".into()),
    }
}

/// The payload of the message being read, as a [`Read`] for the parser. A read timeout (the socket's, kept
/// short so the stop flag is noticed) is waited out until `dead_after` passes without a byte; then, or when
/// stopping, or on any other failure, the read fails and `failed` says why.
struct Payload<'a> {
    ws: &'a mut FrameReader,
    stop: &'a AtomicBool,
    dead_after: Duration,
    last_byte: Instant,
    failed: Option<WsError>,
}

impl Read for Payload<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.failed.is_some() {
            return Err(std::io::Error::other("the WebSocket to mihomo failed"));
        }
        loop {
            match self.ws.read_payload(buf) {
                Ok(n) => {
                    self.last_byte = Instant::now();
                    return Ok(n);
                }
                Err(WsError::Timeout)
                    if !self.stop.load(Ordering::Relaxed)
                        && self.last_byte.elapsed() <= self.dead_after => {}
                Err(e) => {
                    self.failed = Some(e);
                    return Err(std::io::Error::other("the WebSocket to mihomo failed"));
                }
            }
        }
    }
}

/// The socket during the WebSocket upgrade: hands tungstenite the response up to its blank line and not one
/// byte more (it peeks, then consumes only up to `\r\n\r\n`), so no frame bytes are left behind in
/// tungstenite's buffer when [`FrameReader`] takes the socket over.
struct UpToHeaders {
    stream: TcpStream,
    /// The last four bytes handed over, to find `\r\n\r\n` across reads.
    window: u32,
}

impl Read for UpToHeaders {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.window == 0x0d0a_0d0a {
            // tungstenite stops reading at the end of the headers; should it ever ask for more, it gets
            // nothing rather than the first frame
            return Ok(0);
        }
        let n = self.stream.peek(buf)?;
        let mut take = n;
        for (i, &b) in buf[..n].iter().enumerate() {
            self.window = self.window << 8 | u32::from(b);
            if self.window == 0x0d0a_0d0a {
                take = i + 1;
                break;
            }
        }
        // these bytes were peeked, so they are already here: this read does not wait
        self.stream.read_exact(&mut buf[..take])?;
        Ok(take)
    }
}

impl Write for UpToHeaders {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

/// Why [`FrameReader`] returned no message or payload.
#[derive(Debug)]
enum WsError {
    /// Nothing within the socket's read timeout; what was read so far is kept.
    Timeout,
    /// mihomo sent a close frame (answered with one).
    Closed,
    /// The message would be larger than [`MAX_MESSAGE_BYTES`]: at least this many bytes.
    TooLarge(u64),
    /// A frame that breaks RFC 6455.
    Protocol(String),
    Io(std::io::Error),
}

/// The frame being read: its header, then its payload.
#[derive(Clone, Copy, Debug)]
struct FrameState {
    opcode: u8,
    fin: bool,
    /// Payload length and how much of it is in.
    len: usize,
    got: usize,
}

/// Reads mihomo's messages (RFC 6455 frames, client side) straight from the socket, handing each data
/// message's payload to the caller as it arrives ([`FrameReader::read_payload`]).
///
/// Why not tungstenite's reader: it holds whole messages, and its read buffer grows to twice the largest
/// one and stays resident: 4 MB at 2,500 connections, for a 2 MB push. Here nothing of a push is held:
/// the parser reads it in small pieces. Fragmented messages (other servers) are read across their frames,
/// pings answered (also between the fragments of a message), a close answered and reported. Every read may
/// time out (the socket's read timeout) without losing a byte: the state lives here between calls.
struct FrameReader {
    stream: TcpStream,
    /// The header being read: 2 to 10 bytes (a server's frames are not masked).
    head: [u8; 10],
    head_len: usize,
    frame: Option<FrameState>,
    /// Inside a data message (its last frame not read yet), and its payload length so far.
    in_message: bool,
    message_len: u64,
    /// Payload of the control frame being read (at most 125 bytes).
    control: Vec<u8>,
    /// Masks for the frames we send (a client must mask).
    mask: Jitter,
}

impl FrameReader {
    fn new(stream: TcpStream) -> FrameReader {
        FrameReader {
            stream,
            head: [0; 10],
            head_len: 0,
            frame: None,
            in_message: false,
            message_len: 0,
            control: Vec::new(),
            mask: Jitter::new(),
        }
    }

    /// Waits until the next text or binary message begins; its payload is then read with
    /// [`FrameReader::read_payload`] (to its end, before the next call).
    fn next_message(&mut self) -> std::result::Result<(), WsError> {
        loop {
            if matches!(self.frame, Some(f) if f.opcode & 0x8 == 0) {
                return Ok(());
            }
            self.advance()?;
        }
    }

    /// Reads payload of the current message into `buf`; `Ok(0)` at its end.
    fn read_payload(&mut self, buf: &mut [u8]) -> std::result::Result<usize, WsError> {
        loop {
            match self.frame {
                Some(mut f) if f.opcode & 0x8 == 0 => {
                    if f.got < f.len {
                        let want = buf.len().min(f.len - f.got);
                        if want == 0 {
                            return Ok(0);
                        }
                        let n = read_some(&mut self.stream, &mut buf[..want])?;
                        f.got += n;
                        self.frame = Some(f);
                        return Ok(n);
                    }
                    self.frame = None;
                    if f.fin {
                        self.in_message = false;
                        return Ok(0);
                    }
                }
                _ if !self.in_message => return Ok(0),
                _ => self.advance()?,
            }
        }
    }

    /// Reads the next frame's header, or the rest of a control frame and answers it.
    fn advance(&mut self) -> std::result::Result<(), WsError> {
        let mut f = match self.frame {
            Some(f) => f,
            None => {
                let f = self.read_header()?;
                self.frame = Some(f);
                f
            }
        };
        if f.opcode & 0x8 == 0 {
            return Ok(());
        }
        while f.got < f.len {
            let n = read_some(&mut self.stream, &mut self.control[f.got..f.len]);
            f.got += n.as_ref().copied().unwrap_or(0);
            self.frame = Some(f);
            n?;
        }
        self.frame = None;
        match f.opcode {
            0x9 => {
                let payload = std::mem::take(&mut self.control);
                self.send(0xA, &payload).map_err(WsError::Io)
            }
            0x8 => {
                // echo the status code, as RFC 6455 asks; the socket is dropped right after
                let code = self.control.get(..2).unwrap_or_default().to_vec();
                let _ = self.send(0x8, &code);
                Err(WsError::Closed)
            }
            _ => Ok(()),
        }
    }

    /// Reads a frame header (and checks it).
    fn read_header(&mut self) -> std::result::Result<FrameState, WsError> {
        loop {
            let need = match self.head_len {
                0 | 1 => 2,
                _ => match self.head[1] & 0x7f {
                    126 => 4,
                    127 => 10,
                    _ => 2,
                },
            };
            if self.head_len >= need {
                break;
            }
            let n = read_some(&mut self.stream, &mut self.head[self.head_len..need])?;
            self.head_len += n;
        }
        let (b0, b1) = (self.head[0], self.head[1]);
        let len = match b1 & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => u64::from_be_bytes(self.head[2..10].try_into().unwrap_or_default()),
            n => u64::from(n),
        };
        self.head_len = 0;
        let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
        if b0 & 0x70 != 0 {
            return Err(WsError::Protocol(format!(
                "reserved bits set in a frame (first byte {b0:#04x})"
            )));
        }
        if b1 & 0x80 != 0 {
            return Err(WsError::Protocol("masked frame from the server".into()));
        }
        match opcode {
            0x8..=0xA => {
                if !fin || len > 125 {
                    return Err(WsError::Protocol(format!(
                        "control frame (opcode {opcode}) fragmented or longer than 125 bytes ({len})"
                    )));
                }
                self.control.clear();
                self.control.resize(len as usize, 0);
                return Ok(FrameState {
                    opcode,
                    fin,
                    len: len as usize,
                    got: 0,
                });
            }
            0x0 if !self.in_message => {
                return Err(WsError::Protocol(
                    "continuation frame without a message to continue".into(),
                ))
            }
            0x1 | 0x2 if self.in_message => {
                return Err(WsError::Protocol(
                    "new message before the last one ended".into(),
                ))
            }
            0x0 => self.message_len += len,
            0x1 | 0x2 => self.message_len = len,
            _ => {
                return Err(WsError::Protocol(format!("unknown opcode {opcode}")));
            }
        }
        if self.message_len > MAX_MESSAGE_BYTES as u64 {
            return Err(WsError::TooLarge(self.message_len));
        }
        self.in_message = true;
        Ok(FrameState {
            opcode,
            fin,
            len: len as usize,
            got: 0,
        })
    }

    /// Sends a control frame (masked, as a client must).
    fn send(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let key = (self.mask.next() as u32).to_be_bytes();
        let mut f = Vec::with_capacity(6 + payload.len());
        f.extend_from_slice(&[0x80 | opcode, 0x80 | payload.len().min(125) as u8]);
        f.extend_from_slice(&key);
        f.extend(
            payload
                .iter()
                .take(125)
                .zip(key.iter().cycle())
                .map(|(b, k)| b ^ k),
        );
        self.stream.write_all(&f)
    }

    /// Says goodbye (best effort: the socket is dropped right after).
    fn close(&mut self) {
        let _ = self.send(0x8, &[]);
    }
}

/// One read into `buf` (not empty): the end of the stream is an error, a timeout is [`WsError::Timeout`].
fn read_some(stream: &mut TcpStream, buf: &mut [u8]) -> std::result::Result<usize, WsError> {
    loop {
        return match stream.read(buf) {
            Ok(0) => Err(WsError::Io(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                "mihomo closed the connection without a close frame",
            ))),
            Ok(n) => Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Err(WsError::Timeout)
            }
            Err(e) => Err(WsError::Io(e)),
        };
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
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn apply(&mut self, d: Duration) -> Duration {
        let factor = 0.8 + (self.next() % 1000) as f64 / 2500.0;
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

    /// A connected pair on loopback: (our end, with a short read timeout, and the server's end).
    fn pair() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (theirs, _) = l.accept().unwrap();
        ours.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (ours, theirs)
    }

    /// A server frame (unmasked).
    fn frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![b0];
        match payload.len() {
            n @ 0..=125 => f.push(n as u8),
            n @ 126..=65535 => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// Reads one frame the client sent and unmasks it: (first byte, payload).
    fn client_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
        let mut head = [0u8; 6];
        s.read_exact(&mut head).unwrap();
        assert_eq!(head[1] & 0x80, 0x80, "client frames are masked");
        let mut payload = vec![0u8; (head[1] & 0x7f) as usize];
        s.read_exact(&mut payload).unwrap();
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= head[2 + i % 4];
        }
        (head[0], payload)
    }

    /// Reads the current (or next) message on to its end into `into`; what was read stays there when a
    /// read times out, as the parser's window does.
    fn read_into(r: &mut FrameReader, into: &mut Vec<u8>) -> std::result::Result<(), WsError> {
        r.next_message()?;
        let mut buf = [0u8; 1000];
        loop {
            let n = r.read_payload(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            into.extend_from_slice(&buf[..n]);
        }
    }

    /// The next whole message (no timeout expected).
    fn message(r: &mut FrameReader) -> std::result::Result<Vec<u8>, WsError> {
        let mut got = Vec::new();
        read_into(r, &mut got).map(|()| got)
    }

    #[test]
    fn frame_reader_survives_timeouts_mid_frame() {
        let (ours, mut theirs) = pair();
        let mut r = FrameReader::new(ours);
        let big: Vec<u8> = (0..70_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let f = frame(0x81, &big);
        let mut got = Vec::new();
        assert!(matches!(read_into(&mut r, &mut got), Err(WsError::Timeout)));
        // header cut after one byte, then after the length, then the payload in two parts
        let parts = [&f[..1], &f[1..6], &f[6..40_000], &f[40_000..]];
        for (i, part) in parts.iter().enumerate() {
            theirs.write_all(part).unwrap();
            if i + 1 < parts.len() {
                assert!(matches!(read_into(&mut r, &mut got), Err(WsError::Timeout)));
            }
        }
        read_into(&mut r, &mut got).unwrap();
        assert_eq!(got, big);
        theirs.write_all(&frame(0x82, b"{}")).unwrap();
        assert_eq!(message(&mut r).unwrap(), b"{}");
    }

    #[test]
    fn frame_reader_assembles_fragments_and_answers_ping_and_close() {
        let (ours, mut theirs) = pair();
        let mut r = FrameReader::new(ours);
        let mut wire = frame(0x01, b"ab");
        wire.extend(frame(0x89, b"hi"));
        wire.extend(frame(0x00, b""));
        wire.extend(frame(0x80, b"cd"));
        theirs.write_all(&wire).unwrap();
        assert_eq!(message(&mut r).unwrap(), b"abcd");
        assert_eq!(client_frame(&mut theirs), (0x8A, b"hi".to_vec()));
        theirs.write_all(&frame(0x88, &[0x03, 0xe8, b'x'])).unwrap();
        assert!(matches!(message(&mut r), Err(WsError::Closed)));
        assert_eq!(client_frame(&mut theirs), (0x88, vec![0x03, 0xe8]));
    }

    #[test]
    fn frame_reader_refuses_bad_frames() {
        let cases: [(&[u8], &str); 6] = [
            (&[0x81, 0x81, 1, 2, 3, 4, b'x'], "masked"),
            (&[0xC1, 0x00], "reserved"),
            (&[0x80, 0x00], "continuation"),
            (&[0x83, 0x00], "opcode 3"),
            (&[0x09, 0x00], "control frame"),
            (&[0x01, 0x01, b'a', 0x81, 0x00], "new message"),
        ];
        for (wire, want) in cases {
            let (ours, mut theirs) = pair();
            let mut r = FrameReader::new(ours);
            theirs.write_all(wire).unwrap();
            match message(&mut r) {
                Err(WsError::Protocol(e)) => assert!(e.contains(want), "{e} (wanted {want})"),
                other => panic!("{wire:?}: {other:?}"),
            }
        }
        let (ours, mut theirs) = pair();
        let mut r = FrameReader::new(ours);
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        theirs.write_all(&huge).unwrap();
        assert!(matches!(message(&mut r), Err(WsError::TooLarge(n)) if n == 1 << 40));
        let (ours, theirs) = pair();
        let mut r = FrameReader::new(ours);
        drop(theirs);
        assert!(
            matches!(message(&mut r), Err(WsError::Io(e)) if e.kind() == ErrorKind::UnexpectedEof)
        );
    }

    #[test]
    fn handshake_reader_stops_at_the_blank_line() {
        let (ours, mut theirs) = pair();
        let response = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
        let mut wire = response.to_vec();
        wire.extend(frame(0x81, b"{\"connections\":null}"));
        theirs.write_all(&wire).unwrap();
        // small reads put the \r\n\r\n across two of them
        let mut h = UpToHeaders {
            stream: ours,
            window: 0,
        };
        let mut got = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            let n = h.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, response);
        let mut r = FrameReader::new(h.stream);
        assert_eq!(message(&mut r).unwrap(), b"{\"connections\":null}");
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
