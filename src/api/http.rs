//! The HTTP/1.1 server under the API, built for hostile clients on a router with little memory: it owns the
//! listening socket, one thread per connection up to [`Limits::max_connections`] (beyond: an immediate `503`),
//! and bounds everything a client controls: the request head (size and total time, however slowly it
//! trickles in), the body (size and time), the wait between keep-alive requests, and every write. Connection
//! threads only move bytes; requests go over a bounded channel to the API workers ([`Job`]), so a slow client
//! never holds a worker or its database connection.
//!
//! Why not tiny_http 0.12's own server (still used by tests as a fake master): its accept thread ends for
//! good on the first `accept()` error (e.g. `EMFILE` under many connections), after which nothing is ever
//! answered again; it sets no socket timeouts and has no connection limit, so every idle keep-alive or
//! byte-a-minute client holds a thread forever; a header line has no length limit (memory); and its thread
//! pool can queue a new connection behind busy keep-alive ones when several arrive at once (a new
//! connection went unanswered while more than 4 keep-alive connections were open). Setting `SO_RCVTIMEO` on
//! the listening socket (accepted sockets inherit it on Linux) does not rescue it: `accept()` honours that
//! timeout too, and its first timeout would end the accept thread.
//!
//! The bytes themselves are parsed by httparse, the HTTP/1.x parser that ureq and tungstenite already bring
//! in: request heads (`parse_head`) and chunk sizes. Everything around it stays ours: where a head ends and
//! how large or slow it may be, the lanes, the body budget, and which status each refusal gets.

use super::handler::Reply;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What one client may take.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections open at once; one more is answered `503` and closed.
    pub max_connections: usize,
    /// A request head (request line and headers) must be complete this long after the connection opened, or
    /// after its first byte on a kept-alive connection: `408` otherwise.
    pub head_timeout: Duration,
    /// A kept-alive connection with no new request for this long is closed.
    pub idle_timeout: Duration,
    /// The body must be complete this long after the head: `408` otherwise.
    pub body_timeout: Duration,
    /// The whole response must be written within this.
    pub write_timeout: Duration,
    /// Largest request head: `431` beyond.
    pub max_head_bytes: usize,
    /// Largest request body: `413` beyond, refused by `Content-Length` before reading it.
    pub max_body_bytes: usize,
    /// How long a request may wait for a worker and its answer: `503` beyond. A connection whose client
    /// closes while it waits is dropped at once (within `POLL`) and its job marked [`Job::gone`].
    pub answer_timeout: Duration,
    /// Request bodies held in memory at once, all connections together: `503` beyond.
    pub max_body_in_flight: usize,
    /// With a token, a request that has a body must carry `Authorization: Bearer <token>` before its body
    /// is read (`401` otherwise): only clients that know the token can make the server buffer bodies.
    pub token: Option<String>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            // The load figure needs about 90 (50 agents, 2 per dashboard user); a connection thread costs
            // about 20 KB resident (its 128 KiB stack is reserved, mostly untouched).
            max_connections: 256,
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(15),
            body_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            max_head_bytes: 16 * 1024,
            max_body_bytes: 32 << 20,
            // Above the clients' own (agents 10 s, the dashboard 20 s): a client that gave up is noticed by its
            // closed socket, so this only bounds clients that wait on.
            answer_timeout: Duration::from_secs(30),
            max_body_in_flight: 64 << 20,
            token: None,
        }
    }
}

/// A complete request, handed to a worker.
#[derive(Debug)]
pub struct Request {
    /// Upper-cased.
    pub method: String,
    /// The request target as sent (path and query, still percent-encoded).
    pub target: String,
    /// The `Authorization` header, when it is valid UTF-8.
    pub authorization: Option<String>,
    /// `Cache-Control: no-cache` (or `Pragma: no-cache`): the client wants a fresh answer.
    pub no_cache: bool,
    /// `Cache-Control: max-age=N`: the client accepts an answer up to N seconds old (`api::cache`).
    pub max_age: Option<Duration>,
    pub body: Vec<u8>,
}

/// A request and where its answer goes.
pub struct Job {
    pub request: Request,
    pub reply: SyncSender<Reply>,
    /// When the connection handed it over.
    pub queued: Instant,
    /// The writer's commit generation then ([`crate::counters::commit_generation_begun`]): its answer must
    /// include every write a client was told of before this request arrived.
    pub generation: u64,
    /// Set when nobody waits for the answer any more (the client closed, or `answer_timeout` passed).
    pub left: Arc<AtomicBool>,
}

impl Job {
    /// Whether nobody waits for the answer any more: workers skip such a job instead of running it.
    pub fn gone(&self) -> bool {
        self.left.load(Ordering::SeqCst)
    }
}

/// Blocking calls wake this often to notice the stop flag.
const POLL: Duration = Duration::from_millis(250);
/// Connection threads only parse and copy bytes.
const CONN_STACK: usize = 128 * 1024;
/// Longest line of a chunked body (a chunk's size with its extensions, a trailer): `413` beyond.
const MAX_LINE: usize = 4096;

/// The accept thread and what it shares with the connection threads.
pub struct Server {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    live: Arc<AtomicUsize>,
    acceptor: Option<JoinHandle<()>>,
}

impl Server {
    /// Takes over `listener` and starts accepting. Requests go to `jobs`, which must hold at least
    /// `limits.max_connections` (each connection has at most one request in flight).
    pub fn start(
        listener: TcpListener,
        limits: Limits,
        jobs: SyncSender<Job>,
    ) -> std::io::Result<Server> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(AtomicUsize::new(0));
        let (s, l) = (Arc::clone(&stop), Arc::clone(&live));
        let acceptor = std::thread::Builder::new()
            .name("api-accept".into())
            .spawn(move || {
                let budget = AtomicUsize::new(limits.max_body_in_flight);
                accept_loop(&listener, &Arc::new((limits, budget)), &jobs, &s, &l)
            })?;
        Ok(Server {
            addr,
            stop,
            live,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Closes the listening socket and waits (2 s at most) for the connection threads, which finish the
    /// request in hand and close. Their job senders go with them, so the workers' channel then disconnects.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // accept() has no timeout: wake it with a connection of our own.
        let wake = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), self.addr.port())
            }
            IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), self.addr.port())
            }
            _ => self.addr,
        };
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(a) = self.acceptor.take() {
            if a.join().is_err() {
                crate::error!("api: the accept thread panicked");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.live.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Logs at most one line per `every` for a recurring problem.
struct Throttle {
    last: Option<Instant>,
    every: Duration,
}

impl Throttle {
    fn ready(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

fn accept_loop(
    listener: &TcpListener,
    policy: &Arc<(Limits, AtomicUsize)>,
    jobs: &SyncSender<Job>,
    stop: &Arc<AtomicBool>,
    live: &Arc<AtomicUsize>,
) {
    let mut full = Throttle {
        last: None,
        every: Duration::from_secs(10),
    };
    let mut failing = Throttle {
        last: None,
        every: Duration::from_secs(10),
    };
    let limits = &policy.0;
    while !stop.load(Ordering::SeqCst) {
        let (stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                // Out of file descriptors and the like: never give up on accepting, but do not spin.
                if failing.ready() {
                    crate::warn!("api: cannot accept a connection: {e}");
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if live.load(Ordering::SeqCst) >= limits.max_connections {
            if full.ready() {
                crate::warn!(
                    "api: {} connections open, the most allowed; refusing {peer} with 503",
                    limits.max_connections
                );
            }
            refuse(stream);
            continue;
        }
        live.fetch_add(1, Ordering::SeqCst);
        let (pol, tx, stp, lv) = (
            Arc::clone(policy),
            jobs.clone(),
            Arc::clone(stop),
            Arc::clone(live),
        );
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .stack_size(CONN_STACK)
            .spawn(move || {
                let mut conn = Conn::new(stream, &pol.0, &pol.1, &stp);
                conn.serve(&tx);
                lv.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            live.fetch_sub(1, Ordering::SeqCst);
            if failing.ready() {
                crate::warn!("api: cannot start a connection thread: {e}");
            }
        }
    }
}

/// Answers `503` without waiting for anything (the socket's send buffer is empty) and closes.
fn refuse(stream: TcpStream) {
    let _ = stream.set_nonblocking(true);
    let body = super::table::error("too many connections; retry later");
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = (&stream).write_all(head.as_bytes());
    let _ = (&stream).write_all(body.as_bytes());
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Why reading stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The peer closed, or we are stopping: nothing to answer.
    Closed,
    /// Too slow: `408` when a request was under way.
    Timeout,
    /// Over a size limit.
    TooLarge,
    /// The shared body budget is spent: `503`.
    Busy,
}

/// The parsed head of one request.
#[derive(Debug)]
struct Head {
    method: String,
    target: String,
    http10: bool,
    close: bool,
    authorization: Option<String>,
    no_cache: bool,
    max_age: Option<Duration>,
    content_length: Option<usize>,
    chunked: bool,
    expect_continue: bool,
}

/// One connection: the socket, bytes read ahead, and the limits.
struct Conn<'a> {
    stream: TcpStream,
    buf: Vec<u8>,
    limits: &'a Limits,
    /// Body bytes that may still be buffered, all connections together.
    budget: &'a AtomicUsize,
    stop: &'a AtomicBool,
}

/// Body bytes taken from the shared budget, given back on drop.
struct Reserved<'a>(&'a AtomicUsize, usize);

impl<'a> Reserved<'a> {
    fn take(budget: &'a AtomicUsize, n: usize) -> Option<Reserved<'a>> {
        budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(n)
            })
            .ok()
            .map(|_| Reserved(budget, n))
    }

    /// Takes `n` more bytes for the same body (a chunked one, reserved as its chunks arrive).
    fn grow(&mut self, n: usize) -> bool {
        let ok = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                left.checked_sub(n)
            })
            .is_ok();
        if ok {
            self.1 += n;
        }
        ok
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(self.1, Ordering::SeqCst);
    }
}

impl<'a> Conn<'a> {
    fn new(
        stream: TcpStream,
        limits: &'a Limits,
        budget: &'a AtomicUsize,
        stop: &'a AtomicBool,
    ) -> Conn<'a> {
        let _ = stream.set_nodelay(true);
        Conn {
            stream,
            buf: Vec::new(),
            limits,
            budget,
            stop,
        }
    }

    /// Reads more bytes into `buf` before `deadline`.
    fn fill(&mut self, deadline: Instant) -> Result<(), Stop> {
        let mut chunk = [0u8; 4096];
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Err(Stop::Closed);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Stop::Timeout);
            }
            let _ = self.stream.set_read_timeout(Some(left.min(POLL)));
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(Stop::Closed),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => return Err(Stop::Closed),
            }
        }
    }

    /// The bytes of the next request head (without the blank line), removed from `buf`. Before the first
    /// byte the wait is `idle`; from the first byte on, the head has [`Limits::head_timeout`] in total.
    fn read_head(&mut self, idle: Duration) -> Result<Vec<u8>, Stop> {
        // Blank lines before a request are allowed (RFC 9112 2.2).
        skip_blank(&mut self.buf);
        let mut deadline = Instant::now() + idle;
        let mut started = !self.buf.is_empty();
        if started {
            deadline = Instant::now() + self.limits.head_timeout;
        }
        let mut scanned = 0;
        loop {
            if let Some(end) = head_end(&self.buf, scanned) {
                if end > self.limits.max_head_bytes {
                    return Err(Stop::TooLarge);
                }
                let rest = self.buf.split_off(end);
                let head = std::mem::replace(&mut self.buf, rest);
                return Ok(head);
            }
            scanned = self.buf.len().saturating_sub(3);
            if self.buf.len() > self.limits.max_head_bytes {
                return Err(Stop::TooLarge);
            }
            match self.fill(deadline) {
                Ok(()) => {}
                Err(Stop::Timeout) if !started => return Err(Stop::Closed),
                Err(e) => return Err(e),
            }
            if !started {
                skip_blank(&mut self.buf);
                if !self.buf.is_empty() {
                    started = true;
                    deadline = deadline.min(Instant::now() + self.limits.head_timeout);
                }
            }
        }
    }

    /// Reads a `Content-Length` body.
    fn read_exact_body(&mut self, n: usize, deadline: Instant) -> Result<Vec<u8>, Stop> {
        while self.buf.len() < n {
            self.fill(deadline)?;
        }
        let rest = self.buf.split_off(n);
        Ok(std::mem::replace(&mut self.buf, rest))
    }

    /// The size line of the next chunk (its extensions are ignored), at most [`MAX_LINE`] bytes; `Err(None)` for
    /// a malformed one.
    fn read_chunk_size(&mut self, deadline: Instant) -> Result<usize, Option<Stop>> {
        loop {
            // httparse reads a line without digits as size 0: a size needs one
            if self.buf.first().is_some_and(|b| !b.is_ascii_hexdigit()) {
                return Err(None);
            }
            match httparse::parse_chunk_size(&self.buf) {
                Ok(httparse::Status::Complete((end, size))) => {
                    self.buf.drain(..end);
                    return usize::try_from(size).map_err(|_| None);
                }
                Ok(httparse::Status::Partial) if self.buf.len() > MAX_LINE => {
                    return Err(Some(Stop::TooLarge))
                }
                Ok(httparse::Status::Partial) => self.fill(deadline).map_err(Some)?,
                Err(httparse::InvalidChunkSize) => return Err(None),
            }
        }
    }

    /// One line (without CRLF) of a chunked body, at most [`MAX_LINE`] bytes.
    fn read_line(&mut self, deadline: Instant) -> Result<Vec<u8>, Stop> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let rest = self.buf.split_off(i + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buf.len() > MAX_LINE {
                return Err(Stop::TooLarge);
            }
            self.fill(deadline)?;
        }
    }

    /// Decodes a chunked body of at most `max` bytes; `Err(None)` for a malformed one. Each chunk is taken
    /// from the shared budget (into `reserved`) before it is read, so an upload of unknown length holds only
    /// what it has sent, not the whole limit; `Stop::Busy` when the budget runs out.
    fn read_chunked(
        &mut self,
        max: usize,
        reserved: &mut Reserved<'_>,
        deadline: Instant,
    ) -> Result<Vec<u8>, Option<Stop>> {
        let mut body = Vec::new();
        loop {
            let size = self.read_chunk_size(deadline)?;
            if size == 0 {
                // trailers, up to the blank line
                while !self.read_line(deadline).map_err(Some)?.is_empty() {}
                return Ok(body);
            }
            if body.len().saturating_add(size) > max {
                return Err(Some(Stop::TooLarge));
            }
            if body.len() + size > reserved.1 && !reserved.grow(body.len() + size - reserved.1) {
                return Err(Some(Stop::Busy));
            }
            let data = self.read_exact_body(size, deadline).map_err(Some)?;
            body.extend_from_slice(&data);
            if !self.read_line(deadline).map_err(Some)?.is_empty() {
                return Err(None);
            }
        }
    }

    /// Writes all of `bytes` before `deadline`, in slices that notice the stop flag.
    fn write(&mut self, bytes: &[u8], deadline: Instant) -> bool {
        let mut done = 0;
        while done < bytes.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = self.stream.set_write_timeout(Some(left.min(POLL)));
            match self.stream.write(&bytes[done..]) {
                Ok(0) => return false,
                Ok(n) => done += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) =>
                {
                    if self.stop.load(Ordering::SeqCst) {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Sends `reply`; `head_only` for `HEAD`. Returns false when the connection is unusable.
    fn respond(&mut self, reply: &Reply, head_only: bool, close: bool) -> bool {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            reply.status,
            reason(reply.status),
            reply.content_type,
            reply.body.len()
        );
        for (k, v) in &reply.headers {
            // our own values, but never let one split the head
            if !v.contains(['\r', '\n']) {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let deadline = Instant::now() + self.limits.write_timeout;
        let mut out = head.into_bytes();
        let body: &[u8] = if head_only { &[] } else { &reply.body };
        // small answers in one write (one packet); large ones without copying
        if body.len() <= 16 * 1024 {
            out.extend_from_slice(body);
            return self.write(&out, deadline);
        }
        self.write(&out, deadline) && self.write(body, deadline)
    }

    /// Answers an error and closes; `None`, for the caller to return: the connection is done.
    fn fail<T>(&mut self, status: u16, message: &str) -> Option<T> {
        let peer = self
            .stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        crate::debug!("api: refused a request from {peer}: {status} {message}");
        let reply = Reply::error(&super::params::ApiError::status(status, message));
        if self.respond(&reply, false, true) {
            self.linger();
        }
        None
    }

    /// Closes our side, then reads and discards what the client is still sending (1 s, 4 MiB at most):
    /// closing a socket with unread input sends a reset, which can destroy the answer before the client
    /// reads it (a `413` or `431` the client never sees).
    fn linger(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut left = 4usize << 20;
        let mut chunk = [0u8; 4096];
        while left > 0 {
            let wait = deadline.saturating_duration_since(Instant::now());
            if wait.is_zero() {
                return;
            }
            let _ = self.stream.set_read_timeout(Some(wait));
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    }

    /// Serves requests until the client closes, a limit is hit, or the server stops.
    fn serve(&mut self, jobs: &SyncSender<Job>) {
        let mut idle = self.limits.head_timeout;
        loop {
            let Some(head) = self.next_head(idle) else {
                return;
            };
            idle = self.limits.idle_timeout;
            // the body's share of the budget is held until its answer is written
            let Some((body, _held)) = self.read_body(&head) else {
                return;
            };
            let head_only = head.method == "HEAD";
            let close = head.close || head.http10 || self.stop.load(Ordering::SeqCst);
            let Some(reply) = self.ask(jobs, head, body) else {
                // the client closed while its request waited: nobody to answer
                return;
            };
            if !self.respond(&reply, head_only, close) {
                return;
            }
            if close {
                return self.linger();
            }
        }
    }

    /// Reads and parses the next request head; `None` when the connection is done (answered if need be).
    fn next_head(&mut self, idle: Duration) -> Option<Head> {
        let limits = self.limits;
        let raw = match self.read_head(idle) {
            Ok(raw) => raw,
            // reading a head takes nothing from the body budget
            Err(Stop::Closed | Stop::Busy) => return None,
            Err(Stop::Timeout) => {
                let ms = limits.head_timeout.as_millis();
                return self.fail(408, &format!("request head not complete within {ms} ms"));
            }
            Err(Stop::TooLarge) => {
                let max = limits.max_head_bytes;
                return self.fail(431, &format!("request head larger than {max} bytes"));
            }
        };
        match parse_head(&raw) {
            Ok(head) => Some(head),
            Err((status, message)) => self.fail(status, &message),
        }
    }

    /// Reads the body `head` announces, with its share of the body budget: a body needs the token first, and
    /// `Expect: 100-continue` is answered once its share is taken. `None` when the connection is done
    /// (answered if need be).
    fn read_body(&mut self, head: &Head) -> Option<(Vec<u8>, Option<Reserved<'a>>)> {
        let (limits, budget) = (self.limits, self.budget);
        let max = limits.max_body_bytes;
        let too_large = || format!("request body larger than {max} bytes");
        if head.content_length.is_some_and(|n| n > max) {
            return self.fail(413, &too_large());
        }
        let length = head.content_length.unwrap_or(0);
        if !head.chunked && length == 0 {
            return Some((Vec::new(), None));
        }
        let (token, given) = (limits.token.as_deref(), head.authorization.as_deref());
        if !super::handler::authorized(token, given) {
            return self.fail(401, super::handler::UNAUTHORIZED);
        }
        const BUSY: &str = "too many uploads in progress; retry later";
        // a chunked body (no length) reserves as it arrives: see read_chunked
        let Some(mut reserved) = Reserved::take(budget, length) else {
            return self.fail(503, BUSY);
        };
        if head.expect_continue {
            let deadline = Instant::now() + limits.write_timeout;
            if !self.write(b"HTTP/1.1 100 Continue\r\n\r\n", deadline) {
                return None;
            }
        }
        let deadline = Instant::now() + limits.body_timeout;
        let body = if head.chunked {
            self.read_chunked(max, &mut reserved, deadline)
        } else {
            self.read_exact_body(length, deadline).map_err(Some)
        };
        match body {
            Ok(body) => Some((body, Some(reserved))),
            Err(None) => self.fail(400, "malformed chunked request body"),
            Err(Some(Stop::TooLarge)) => self.fail(413, &too_large()),
            Err(Some(Stop::Busy)) => self.fail(503, BUSY),
            Err(Some(Stop::Timeout)) => {
                let ms = limits.body_timeout.as_millis();
                crate::warn!("api: a client sent no complete body within {ms} ms; dropped");
                self.fail(408, &format!("request body not complete within {ms} ms"))
            }
            Err(Some(Stop::Closed)) => None,
        }
    }

    /// Hands the request to a worker and waits for its answer; `None` when the client closed meanwhile.
    fn ask(&mut self, jobs: &SyncSender<Job>, head: Head, body: Vec<u8>) -> Option<Reply> {
        let busy = |msg: &str| Reply::error(&super::params::ApiError::status(503, msg));
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let left = Arc::new(AtomicBool::new(false));
        let job = Job {
            request: Request {
                method: head.method,
                target: head.target,
                authorization: head.authorization,
                no_cache: head.no_cache,
                max_age: head.max_age,
                body,
            },
            reply: tx,
            queued: Instant::now(),
            generation: crate::counters::commit_generation_begun(),
            left: Arc::clone(&left),
        };
        match jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Some(busy("server busy; retry later")),
            Err(TrySendError::Disconnected(_)) => return Some(busy("server stopping")),
        }
        let deadline = Instant::now() + self.limits.answer_timeout;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now()).min(POLL);
            match rx.recv_timeout(wait) {
                Ok(reply) => return Some(reply),
                Err(RecvTimeoutError::Disconnected) => {
                    return Some(busy("no answer (server stopping); retry later"))
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() >= deadline {
                left.store(true, Ordering::SeqCst);
                return Some(busy("no answer in time; retry later"));
            }
            // A client that gave up (agents wait 10 s, the dashboard 20 s) frees its connection and its
            // place in the queue now, not when an answer nobody reads is ready.
            if self.peer_closed() {
                left.store(true, Ordering::SeqCst);
                return None;
            }
        }
    }

    /// Whether the client closed its side (or the connection broke). Bytes it sent ahead (pipelining) do
    /// not count. A client that only half-closes (`shutdown(Write)`) and waits for its answer looks the
    /// same and is dropped too, as nginx drops a request whose client closed.
    fn peer_closed(&self) -> bool {
        if self.stream.set_nonblocking(true).is_err() {
            return false;
        }
        let mut b = [0u8; 1];
        let r = self.stream.peek(&mut b);
        let _ = self.stream.set_nonblocking(false);
        match r {
            Ok(n) => n == 0,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
        }
    }
}

/// Drops the CR and LF bytes at the front of `buf`.
fn skip_blank(buf: &mut Vec<u8>) {
    let n = buf
        .iter()
        .take_while(|b| **b == b'\r' || **b == b'\n')
        .count();
    buf.drain(..n);
}

/// Where the head ends (after its blank line), searching from `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
        i += 1;
    }
    None
}

/// Why a head is refused: its status and message.
type Refusal = (u16, String);

/// The message for a head that is not UTF-8 (most likely a path or query sent unencoded).
const NOT_UTF8: &str =
    "request line or headers are not valid UTF-8 (percent-encode the path and query)";

/// Methods longer than this are refused (httparse has no limit of its own).
const MAX_METHOD: usize = 32;

/// Parses a complete request head (as [`Conn::read_head`] cut it) with httparse, then reads the headers our
/// server acts on; `Err((status, message))` for a request to refuse.
/// The `max-age=N` directive of a request's `Cache-Control` (seconds); a malformed one counts as absent.
fn max_age(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').find_map(|d| {
        let (name, n) = d.trim().split_once('=')?;
        let n = n.trim().trim_matches('"');
        (name.trim().eq_ignore_ascii_case("max-age") && n.bytes().all(|b| b.is_ascii_digit()))
            .then(|| n.parse().ok().map(Duration::from_secs))
            .flatten()
    })
}

fn parse_head(raw: &[u8]) -> Result<Head, Refusal> {
    let bad = |m: &str| (400, m.to_string());
    let text = std::str::from_utf8(raw).map_err(|_| bad(NOT_UTF8))?;
    // Every header ends in a newline, so this many always suffice: the only bound on headers stays the
    // head's size.
    let lines = raw.iter().filter(|&&b| b == b'\n').count();
    let mut headers = vec![httparse::EMPTY_HEADER; lines];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = req.parse(raw);
    if req.method.is_some_and(|m| m.len() > MAX_METHOD) {
        return Err(bad("malformed method"));
    }
    match parsed {
        Ok(httparse::Status::Complete(_)) => {}
        // cannot happen: the head ends with its blank line
        Ok(httparse::Status::Partial) => return Err(bad("incomplete request head")),
        Err(e) => return Err(head_refusal(e, req.method.is_some(), text)),
    }
    let mut head = Head {
        method: req.method.unwrap_or_default().to_ascii_uppercase(),
        target: req.path.unwrap_or_default().to_string(),
        http10: req.version == Some(0),
        close: false,
        authorization: None,
        no_cache: false,
        max_age: None,
        content_length: None,
        chunked: false,
        expect_continue: false,
    };
    let (mut transfer_encoding, mut cache_control, mut pragma_no_cache) = (false, false, false);
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).map_err(|_| bad(NOT_UTF8))?;
        let is = |name: &str| h.name.eq_ignore_ascii_case(name);
        transfer_encoding |= is("transfer-encoding");
        cache_control |= is("cache-control");
        pragma_no_cache |= is("pragma") && value.to_ascii_lowercase().contains("no-cache");
        head.read_header(h.name, value)?;
    }
    // `Pragma` counts only without `Cache-Control` (RFC 9111 5.4): a browser adds `Pragma: no-cache` to the
    // dashboard's requests, which say `Cache-Control: max-age=4`.
    head.no_cache |= pragma_no_cache && !cache_control;
    if transfer_encoding && head.content_length.is_some() {
        // the classic request-smuggling ambiguity: refuse rather than guess
        return Err(bad("both Content-Length and Transfer-Encoding"));
    }
    Ok(head)
}

impl Head {
    /// Takes in one header (`value` without the whitespace around it); others than ours are ignored.
    fn read_header(&mut self, name: &str, value: &str) -> Result<(), Refusal> {
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("content-length") {
            let n: usize = value
                .parse()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| (400, "Content-Length is not a number".to_string()))?;
            if self.content_length.is_some_and(|m| m != n) {
                return Err((400, "conflicting Content-Length headers".to_string()));
            }
            self.content_length = Some(n);
        } else if is("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") {
                let msg = "only the chunked Transfer-Encoding is supported";
                return Err((501, msg.to_string()));
            }
            self.chunked = true;
        } else if is("connection") {
            self.close |= value.to_ascii_lowercase().contains("close");
        } else if is("authorization") {
            self.authorization = Some(value.to_string());
        } else if is("cache-control") {
            self.no_cache |= value.to_ascii_lowercase().contains("no-cache");
            self.max_age = max_age(value).or(self.max_age);
        } else if is("expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err((417, "only 'Expect: 100-continue' is supported".to_string()));
            }
            self.expect_continue = true;
        }
        Ok(())
    }
}

/// The status and message for a head httparse refused: `505` for a well-formed request line naming an HTTP
/// version other than 1.0 and 1.1 (`HTTP/2.0`, the HTTP/2 preface), `400` for everything else.
fn head_refusal(e: httparse::Error, has_method: bool, text: &str) -> Refusal {
    let line = text.split('\n').next().unwrap_or("");
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut parts = line.split(' ');
    let version = parts.nth(2).filter(|_| parts.next().is_none());
    let message = match e {
        httparse::Error::Version | httparse::Error::NewLine => match version {
            Some(v) if v.starts_with("HTTP/") && v != "HTTP/1.0" && v != "HTTP/1.1" => {
                let v = super::params::clip(v);
                return (505, format!("{v} is not supported; use HTTP/1.1"));
            }
            _ => "malformed request line",
        },
        httparse::Error::Token if !has_method => "malformed method",
        httparse::Error::Token => "malformed request line",
        httparse::Error::HeaderName if text.contains("\n ") || text.contains("\n\t") => {
            "folded header lines are not accepted"
        }
        httparse::Error::HeaderName => "malformed header line",
        httparse::Error::HeaderValue => "malformed header value",
        _ => "malformed request head",
    };
    (400, message.to_string())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests;
