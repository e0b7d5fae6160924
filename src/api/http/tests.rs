//! The HTTP server alone, with an echo worker and small limits, through real sockets on 127.0.0.1:0.

use super::*;
use crate::api::handler::Reply;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
#[path = "../../../tests/it/wait.rs"]
#[allow(dead_code)] // the integration tests' defaults (WAIT, POLL, wait_for) are not needed here
mod wait;
use wait::wait_until;

/// How long these tests wait for the server to notice something (milliseconds when all is well).
const WAIT: Duration = Duration::from_secs(10);

/// A server whose one worker answers `METHOD TARGET AUTH BODYLEN`, or 32 MiB for `/big`.
struct Echo {
    server: Option<Server>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start(limits: Limits) -> Echo {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(limits.max_connections);
        let worker = std::thread::spawn(move || {
            while let Ok(job) = rx.recv() {
                let r = &job.request;
                let body = if r.target == "/big" {
                    vec![b'x'; 32 << 20]
                } else {
                    format!(
                        "{} {} {:?} {}",
                        r.method,
                        r.target,
                        r.authorization,
                        String::from_utf8_lossy(&r.body)
                    )
                    .into_bytes()
                };
                let _ = job.reply.send(Reply {
                    status: 200,
                    content_type: "text/plain",
                    body,
                    headers: vec![("X-Echo", "1".into())],
                });
            }
        });
        Echo {
            server: Some(Server::start(listener, limits, tx).unwrap()),
            worker: Some(worker),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.as_ref().unwrap().addr()
    }

    fn connections(&self) -> usize {
        self.server.as_ref().unwrap().connections()
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
        if let Some(w) = self.worker.take() {
            w.join().unwrap();
        }
    }
}

fn small() -> Limits {
    Limits {
        max_connections: 8,
        head_timeout: Duration::from_millis(400),
        idle_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(400),
        write_timeout: Duration::from_millis(400),
        max_head_bytes: 1024,
        max_body_bytes: 100,
        answer_timeout: Duration::from_secs(5),
        max_body_in_flight: 1000,
        token: None,
    }
}

/// Reads one response: (status, head, body).
fn response(s: &mut TcpStream) -> (u16, String, String) {
    read_response(s, false)
}

/// Reads one response, without a body when `head_only` (the answer to `HEAD`).
fn read_response(s: &mut TcpStream, head_only: bool) -> (u16, String, String) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => buf.push(byte[0]),
            other => panic!(
                "response cut after {:?}: {other:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    }
    let head = String::from_utf8(buf).unwrap();
    let status = head[9..12].parse().unwrap();
    if head_only {
        return (status, head, String::new());
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

/// Sends `raw` on a fresh connection; the first response.
fn one(e: &Echo, raw: &[u8]) -> (u16, String, String) {
    let mut s = e.connect();
    s.write_all(raw).unwrap();
    response(&mut s)
}

fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(0)) || matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn keep_alive_pipelining_head_and_bodies() {
    let e = Echo::start(small());
    let mut s = e.connect();
    // two pipelined requests in one write, then a HEAD
    s.write_all(
        b"GET /a?x=1 HTTP/1.1\r\nHost: x\r\nauthorization: Bearer t\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    )
    .unwrap();
    let (st, head, body) = response(&mut s);
    assert_eq!(
        (st, body.as_str()),
        (200, "GET /a?x=1 Some(\"Bearer t\") "),
        "{head}"
    );
    assert!(
        head.contains("X-Echo: 1\r\n") && !head.contains("Connection: close"),
        "{head}"
    );
    assert_eq!(response(&mut s).2, "POST /b None abc");
    s.write_all(b"head /c HTTP/1.1\r\n\r\n").unwrap();
    let (st, head, body) = read_response(&mut s, true);
    assert_eq!(st, 200);
    assert!(
        head.contains("Content-Length: 13\r\n") && body.is_empty(),
        "{head}"
    );
    // chunked, with Expect: 100-continue answered first
    s.write_all(b"PUT /d HTTP/1.1\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        .unwrap();
    let mut cont = [0u8; 25];
    s.read_exact(&mut cont).unwrap();
    assert_eq!(&cont, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n")
        .unwrap();
    assert_eq!(response(&mut s).2, "PUT /d None abcde");
    // HTTP/1.0 and Connection: close end the connection after the answer
    s.write_all(b"GET /e HTTP/1.0\r\n\r\n").unwrap();
    let (_, head, _) = response(&mut s);
    assert!(head.contains("Connection: close"), "{head}");
    assert!(closed(&mut s));
}

#[test]
fn malformed_requests_get_the_right_status_and_a_closed_connection() {
    let e = Echo::start(small());
    let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(2000));
    let token = format!(
        "GET / HTTP/1.1\r\nAuthorization: Bearer {}\r\n\r\n",
        "t".repeat(1 << 20)
    );
    let cases: Vec<(&[u8], u16)> = vec![
        (long.as_bytes(), 431),
        (token.as_bytes(), 431),
        (b"POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n", 413),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n65\r\n",
            413,
        ),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET /\xff\xfe HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: \xc3\x28\r\n\r\n", 400),
        (b"GET /a\x01b HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
        (b"G\"T / HTTP/1.1\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nExpect: magic\r\nContent-Length: 1\r\n\r\n",
            417,
        ),
    ];
    for (raw, want) in cases {
        let mut s = e.connect();
        let _ = s.write_all(raw);
        let (st, head, body) = response(&mut s);
        let shown = String::from_utf8_lossy(&raw[..raw.len().min(60)]).into_owned();
        assert_eq!(st, want, "{shown}: {head}{body}");
        assert!(head.contains("Connection: close"), "{shown}: {head}");
        assert!(body.contains("\"status\":\"error\""), "{shown}: {body}");
        assert!(closed(&mut s), "{shown}: still open");
    }
}

#[test]
fn slow_and_idle_clients_are_cut_off_in_time() {
    let e = Echo::start(small());
    // a head trickling in a byte at a time: 408 at the head timeout, however steady the trickle
    let mut slow = e.connect();
    let mut writer = slow.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        for b in b"GET /slow HTTP/1.1\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n" {
            if writer.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    });
    let started = Instant::now();
    let (st, _, body) = response(&mut slow);
    assert_eq!(
        st, 408,
        "a byte every 30 ms must not keep a head open past 400 ms: {body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    trickle.join().unwrap();
    // connected and silent: closed without an answer
    let mut silent = e.connect();
    assert!(closed(&mut silent));
    // kept alive after an answer, then idle: closed
    let mut idle = e.connect();
    idle.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(response(&mut idle).0, 200);
    assert!(closed(&mut idle));
    // a body that never completes: 408
    let (st, _, body) = one(&e, b"POST / HTTP/1.1\r\nContent-Length: 50\r\n\r\nabc");
    assert_eq!(st, 408, "{body}");
}

#[test]
fn connections_beyond_the_limit_get_503_and_the_server_recovers() {
    let e = Echo::start(Limits {
        max_connections: 3,
        head_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        ..small()
    });
    let held: Vec<TcpStream> = (0..3).map(|_| e.connect()).collect();
    wait_until(
        "3 connections registered",
        WAIT,
        Duration::from_millis(5),
        || {
            let n = e.connections();
            (n >= 3).then_some(()).ok_or(n)
        },
    );
    let (st, head, body) = one(&e, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(st, 503, "{head}{body}");
    assert!(head.contains("Retry-After: 1"), "{head}");
    drop(held);
    let every = Duration::from_millis(10);
    wait_until(
        "a 200 after the held connections closed",
        WAIT,
        every,
        || {
            let (st, _, _) = one(&e, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
            (st == 200).then_some(()).ok_or(st)
        },
    );
}

#[test]
fn a_client_that_never_reads_its_answer_holds_only_its_own_connection() {
    let e = Echo::start(small());
    let mut stuck = e.connect();
    stuck.write_all(b"GET /big HTTP/1.1\r\n\r\n").unwrap();
    // the one worker is free for others at once
    assert_eq!(one(&e, b"GET /x HTTP/1.1\r\n\r\n").0, 200);
    // and the stuck writer gives up after the write timeout, closing its connection
    let every = Duration::from_millis(10);
    wait_until("the stuck connection dropped", WAIT, every, || {
        let n = e.connections();
        (n == 0).then_some(()).ok_or(n)
    });
    drop(stuck);
}

#[test]
fn stop_closes_idle_connections_and_the_listener() {
    let e = Echo::start(Limits {
        idle_timeout: Duration::from_secs(60),
        head_timeout: Duration::from_secs(60),
        ..small()
    });
    let addr = e.addr();
    let mut idle = e.connect();
    idle.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(response(&mut idle).0, 200);
    let started = Instant::now();
    drop(e);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(closed(&mut idle));
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn bodies_need_the_token_first_and_share_a_memory_budget() {
    let e = Echo::start(Limits {
        token: Some("t0k".into()),
        max_body_in_flight: 150,
        body_timeout: Duration::from_secs(10),
        ..small()
    });
    // no token (or a wrong one): 401 before a byte of the body is read
    for auth in ["", "Authorization: Bearer nope\r\n"] {
        let raw = format!("POST /s HTTP/1.1\r\n{auth}Content-Length: 100\r\n\r\n");
        let (st, head, _) = one(&e, raw.as_bytes());
        assert_eq!(st, 401, "{auth}: {head}");
        assert!(head.contains("WWW-Authenticate: Bearer"), "{head}");
    }
    // requests without a body still reach the handler, which decides (the dashboard, /health)
    assert_eq!(one(&e, b"GET /h HTTP/1.1\r\n\r\n").0, 200);
    // one upload in progress holds 100 of the 150 bytes: a second one must wait its turn. The first asks
    // for `100 Continue`, which the server sends only once its share is reserved.
    let mut first = e.connect();
    first
        .write_all(
            b"POST /s HTTP/1.1\r\nAuthorization: Bearer t0k\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\nabc",
        )
        .unwrap();
    let mut cont = [0u8; 25];
    first.read_exact(&mut cont).unwrap();
    assert_eq!(&cont[..], b"HTTP/1.1 100 Continue\r\n\r\n");
    let second = b"POST /s HTTP/1.1\r\nAuthorization: Bearer t0k\r\nContent-Length: 100\r\n\r\n";
    let mut s = e.connect();
    s.write_all(&[&second[..], &[b'z'; 100]].concat()).unwrap();
    let (st, _, body) = response(&mut s);
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("too many uploads"), "{body}");
    first.write_all(&[b'x'; 97]).unwrap();
    assert_eq!(response(&mut first).0, 200);
    // the first's share is given back just after its answer is written: poll for it
    wait_until("the budget to come back", WAIT, Duration::ZERO, || {
        let mut s = e.connect();
        s.write_all(&[&second[..], &[b'y'; 100]].concat()).unwrap();
        let (st, _, body) = response(&mut s);
        if st != 200 {
            assert_eq!(st, 503, "{body}");
        }
        (st == 200).then_some(()).ok_or(st)
    });
}

#[test]
fn a_chunked_upload_holds_only_the_budget_of_what_it_has_sent() {
    let e = Echo::start(Limits {
        max_body_in_flight: 150,
        body_timeout: Duration::from_secs(10),
        ..small()
    });
    // A chunked upload (no length) under way, with 30 bytes sent: the server answered `100 Continue`, so its
    // head has been read. It used to reserve the whole body limit (100), leaving 50: too little for B.
    let mut a = e.connect();
    a.write_all(b"POST /a HTTP/1.1\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    let mut cont = [0u8; 25];
    a.read_exact(&mut cont).unwrap();
    assert_eq!(&cont[..], b"HTTP/1.1 100 Continue\r\n\r\n");
    a.write_all(&[&b"1e\r\n"[..], &[b'a'; 30], b"\r\n"].concat())
        .unwrap();
    // B takes 100 of the 150 (A holds at most its 30) and waits with its body unsent
    let mut b = e.connect();
    b.write_all(b"POST /b HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 100\r\n\r\n")
        .unwrap();
    b.read_exact(&mut cont).unwrap();
    assert_eq!(&cont[..], b"HTTP/1.1 100 Continue\r\n\r\n");
    // A's next chunk would hold 70 with B's 100: over the budget, so A is told to retry later
    a.write_all(&[&b"28\r\n"[..], &[b'a'; 40], b"\r\n"].concat())
        .unwrap();
    let (st, _, body) = response(&mut a);
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("too many uploads"), "{body}");
    assert!(closed(&mut a));
    // B is unharmed, and A's share came back: a chunked upload of the same 70 bytes now passes whole
    b.write_all(&[b'b'; 100]).unwrap();
    let (st, _, body) = response(&mut b);
    assert_eq!(st, 200, "{body}");
    assert_eq!(body, format!("POST /b None {}", "b".repeat(100)));
    wait_until("the budget to come back", WAIT, Duration::ZERO, || {
        let raw = [
            &b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1e\r\n"[..],
            &[b'c'; 30],
            b"\r\n28\r\n",
            &[b'c'; 40],
            b"\r\n0\r\n\r\n",
        ]
        .concat();
        let (st, _, body) = one(&e, &raw);
        if st == 200 {
            assert!(body.ends_with(&"c".repeat(70)), "{body}");
            return Ok(());
        }
        assert_eq!(st, 503, "{body}");
        Err(st)
    });
}

#[test]
fn a_client_that_leaves_while_its_request_waits_frees_its_connection_and_the_job_is_marked_gone() {
    // No worker: the test takes the jobs itself and answers when it likes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let limits = Limits {
        answer_timeout: Duration::from_secs(60),
        ..small()
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(limits.max_connections);
    let server = Server::start(listener, limits, tx).unwrap();
    let connect = || {
        let s = TcpStream::connect(server.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };
    let (mut a, mut b) = (connect(), connect());
    a.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let job_a = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    b.write_all(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let job_b = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(
        (job_a.request.target.as_str(), job_b.request.target.as_str()),
        ("/a", "/b")
    );
    assert!(!job_a.gone() && !job_b.gone());
    drop(a);
    let (within, every) = (Duration::from_secs(5), Duration::from_millis(10));
    wait_until(
        "the client that left to free its connection and its job",
        within,
        every,
        || {
            let open = server.connections();
            (job_a.gone() && open == 1)
                .then_some(())
                .ok_or_else(|| format!("{open} open, job gone: {}", job_a.gone()))
        },
    );
    // the client that stayed (waiting longer than the one that left was) still gets its answer
    assert!(!job_b.gone());
    job_b
        .reply
        .send(Reply {
            status: 200,
            content_type: "text/plain",
            body: b"late".to_vec(),
            headers: Vec::new(),
        })
        .unwrap();
    let (status, _, body) = response(&mut b);
    assert_eq!((status, body.as_str()), (200, "late"));
    drop(b);
    server.stop();
}

#[test]
fn no_cache_is_read_from_cache_control_or_pragma() {
    let parse = |raw: &str| parse_head(raw.as_bytes()).unwrap().no_cache;
    assert!(!parse("GET / HTTP/1.1\r\n\r\n"));
    assert!(parse(
        "GET / HTTP/1.1\r\nCache-Control: max-age=0, No-Cache\r\n\r\n"
    ));
    assert!(parse("GET / HTTP/1.1\r\npragma: no-cache\r\n\r\n"));
    assert!(!parse(
        "GET / HTTP/1.1\r\nPragma: no-cache\r\nCache-Control: max-age=4\r\n\r\n"
    ));
    assert!(!parse("GET / HTTP/1.1\r\nCache-Control: max-age=0\r\n\r\n"));
}

#[test]
fn max_age_is_read_from_cache_control_only() {
    let parse = |raw: &str| parse_head(raw.as_bytes()).unwrap().max_age;
    let secs = |n| Some(Duration::from_secs(n));
    assert_eq!(parse("GET / HTTP/1.1\r\n\r\n"), None);
    assert_eq!(
        parse("GET / HTTP/1.1\r\nCache-Control: max-age=4\r\n\r\n"),
        secs(4)
    );
    assert_eq!(
        parse("GET / HTTP/1.1\r\ncache-control: no-transform, Max-Age = \"7\"\r\n\r\n"),
        secs(7)
    );
    assert_eq!(
        parse("GET / HTTP/1.1\r\nCache-Control: max-age=-1\r\n\r\n"),
        None
    );
    assert_eq!(
        parse("GET / HTTP/1.1\r\nCache-Control: max-age=4x\r\n\r\n"),
        None
    );
    assert_eq!(parse("GET / HTTP/1.1\r\nPragma: max-age=4\r\n\r\n"), None);
}

#[test]
fn heads_are_refused_with_the_status_of_their_first_fault() {
    let status = |raw: &[u8]| parse_head(raw).err().map(|(s, _)| s);
    // accepted: bare LF line ends, whitespace around values, HTTP/1.0
    let head =
        parse_head(b"get /a?b=c HTTP/1.0\nAuthorization: \t Bearer x \t\nContent-Length: 2\n\n")
            .unwrap();
    assert_eq!(
        (head.method.as_str(), head.target.as_str(), head.http10),
        ("GET", "/a?b=c", true)
    );
    assert_eq!(
        (head.authorization.as_deref(), head.content_length),
        (Some("Bearer x"), Some(2))
    );
    let cases: &[(&[u8], Option<u16>)] = &[
        (b"GET / HTTP/1.1\r\nX:\r\n\r\n", None),
        (b"GET / HTTP/1.10\r\n\r\n", Some(505)),
        (b"GET / HTTP/1.1x\r\n\r\n", Some(505)),
        (b"GET / HTTP/3\r\n\r\n", Some(505)),
        (b"GET / HTTX/1.1\r\n\r\n", Some(400)),
        (b"GET / HTTP/2.0 x\r\n\r\n", Some(400)),
        (b"GET  / HTTP/1.1\r\n\r\n", Some(400)),
        // the method's length is checked before the version
        (
            &[&[b'M'; 33][..], b" / HTTP/2.0\r\n\r\n"].concat(),
            Some(400),
        ),
        (&[&[b'M'; 32][..], b" / HTTP/1.1\r\n\r\n"].concat(), None),
        // UTF-8 before everything else, as before
        (b"GET / HTTP/2.0\r\nX: \xff\r\n\r\n", Some(400)),
        (b"GET / HTTP/1.1\r\nX : a\r\n\r\n", Some(400)),
        (b"GET / HTTP/1.1\r\n: a\r\n\r\n", Some(400)),
        (b"GET / HTTP/1.1\r\nContent-Length: +1\r\n\r\n", Some(400)),
        (
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            None,
        ),
        (b"GET / HTTP/1.1\r\nExpect: 100-CONTINUE\r\n\r\n", None),
    ];
    for (raw, want) in cases {
        assert_eq!(status(raw), *want, "{}", String::from_utf8_lossy(raw));
    }
    let (_, folded) = parse_head(b"GET / HTTP/1.1\r\nX: a\r\n\tb\r\n\r\n").unwrap_err();
    assert!(folded.contains("folded"), "{folded}");
}

#[test]
fn chunk_sizes_need_a_digit_and_may_carry_extensions() {
    let e = Echo::start(small());
    let chunked = |lines: &str| {
        let raw = format!("POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{lines}");
        one(&e, raw.as_bytes())
    };
    let (st, _, body) = chunked("2 ; a=\"b\"\r\nxy\r\n0\r\n\r\n");
    assert_eq!((st, body.as_str()), (200, "POST /c None xy"));
    assert_eq!(chunked("00000000000000002\r\nxy\r\n0\r\n\r\n").0, 400);
    for bad in [
        "\r\nxy\r\n0\r\n\r\n",
        ";x\r\n0\r\n\r\n",
        " 2\r\nxy\r\n0\r\n\r\n",
        "2 3\r\n",
    ] {
        assert_eq!(chunked(bad).0, 400, "{bad:?}");
    }
    // a size line still without its end past 4 KiB
    assert_eq!(chunked(&format!("1;{}", "e".repeat(5000))).0, 413);
}
