//! Hostile and malformed input, end to end: the real binary against a fake mihomo that sends broken,
//! oversized and odd frames, and against HTTP clients that send broken, oversized, slow or malicious
//! requests. Each case: the program stays up, says what happened in its log, and the data around it is exact.

use crate::binary::{master_args, Proc};
use crate::fake_mihomo::FakeMihomo;
use crate::support::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// One connection of a hand-made frame: the id as JSON text, and the raw JSON of its counters.
fn conn(id_json: &str, up: &str, down: &str) -> String {
    format!(
        r#"{{"id":{id_json},"metadata":{{"network":"tcp","host":"h.example","destinationIP":"203.0.113.7","sourcePort":"5","uid":0,"dscp":0}},"upload":{up},"download":{down},"start":"2025-04-28T18:00:00+08:00","chains":["HK","Proxy"],"rule":"Match","rulePayload":""}}"#
    )
}

fn frame(totals: u64, conns: &[String]) -> String {
    format!(
        r#"{{"downloadTotal":{totals},"uploadTotal":{totals},"connections":[{}],"memory":0}}"#,
        conns.join(",")
    )
}

/// The good frame of step `k`: `a` at (k, 10k), `b` at (2k, 20k).
fn good(k: u64) -> String {
    frame(
        1000 * k,
        &[
            conn("\"a\"", &k.to_string(), &(10 * k).to_string()),
            conn("\"b\"", &(2 * k).to_string(), &(20 * k).to_string()),
        ],
    )
}

/// The peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// What the fake sends in one case.
enum Send {
    Text(String),
    Binary(Vec<u8>),
    /// Raw bytes (a hand-made frame header) and then that many zero bytes.
    Raw(Vec<u8>, usize),
}

struct Case {
    name: &'static str,
    /// What to send when the last good frame was step `k`.
    send: Box<dyn Fn(u64) -> Send>,
    /// A line the tracker must log.
    log: &'static str,
    /// Whether the tracker must drop the socket and connect again.
    reconnects: bool,
    /// Whether the frame itself moves `a` and `b` to step `k + 1` (it is accepted, values converted).
    lands: bool,
}

/// A frame without totals (so no case looks like a core restart): `a` and `b` at these raw counters, then
/// `more`.
fn ab(a: (&str, &str), b: (&str, &str), more: &[String]) -> Send {
    let mut list = vec![conn("\"a\"", a.0, a.1), conn("\"b\"", b.0, b.1)];
    list.extend_from_slice(more);
    Send::Text(format!(r#"{{"connections":[{}]}}"#, list.join(",")))
}

#[test]
fn hostile_frames_from_mihomo_leave_the_good_data_exact() {
    let dir = TempDir::new("hostile-frames");
    let db = dir.path("t.db");
    let fake = FakeMihomo::start(None);
    let mut p = Proc::standalone(&db, &fake, 50);
    fake.wait_connected();
    const ODD_IDS: [(&str, &str); 3] = [
        (r#""it's \"quoted\"""#, "it's \"quoted\""),
        ("\"ünï😀\\u0026\"", "ünï😀&"),
        (
            r#""x'); DROP TABLE connections;--""#,
            "x'); DROP TABLE connections;--",
        ),
    ];
    let long_ok = "l".repeat(256);
    let s = |v: u64| v.to_string();
    let cases = vec![
        Case {
            name: "truncated JSON",
            send: Box::new(|k| {
                let g = good(k + 1);
                Send::Text(g[..g.len() / 2].to_string())
            }),
            log: "ignored a push",
            reconnects: false,
            lands: false,
        },
        Case {
            name: "binary garbage",
            send: Box::new(|_| Send::Binary(vec![0, 159, 146, 150, 255, 0xc3, 0x28])),
            log: "not a JSON object",
            reconnects: false,
            lands: false,
        },
        Case {
            name: "text frame that is not UTF-8",
            send: Box::new(|_| Send::Raw(vec![0x81, 0x03, b'{', 0xff, 0xfe], 0)),
            // the collector reads frames itself: a bad text frame is one bad push, not a broken stream
            log: "not UTF-8",
            reconnects: false,
            lands: false,
        },
        Case {
            name: "a 100 MiB frame",
            send: Box::new(|_| {
                let mut head = vec![0x81, 127];
                head.extend_from_slice(&(100u64 << 20).to_be_bytes());
                Send::Raw(head, 100 << 20)
            }),
            log: "push from mihomo too large",
            reconnects: true,
            lands: false,
        },
        Case {
            name: "wrong types (\"upload\": \"12\", floats, booleans, null and numeric ids)",
            send: Box::new(move |k| {
                let n = k + 1;
                ab(
                    (&format!("\"{}\"", s(n)), &format!("{}.0", 10 * n)),
                    (&s(2 * n), &format!("\"{}\"", 20 * n)),
                    &[conn("12345", "true", "null"), conn("null", "1", "1")],
                )
            }),
            log: "opened tcp",
            reconnects: false,
            lands: true,
        },
        Case {
            name: "negative counters",
            send: Box::new(|_| ab(("-5", "-50"), ("-1e3", "-0"), &[])),
            log: "counters of a went down",
            reconnects: false,
            lands: false,
        },
        Case {
            name: "decreasing counters",
            send: Box::new(move |k| ab((&s(k - 1), &s(k)), (&s(2 * k), &s(1)), &[])),
            log: "counters of a went down",
            reconnects: false,
            lands: false,
        },
        Case {
            name: "duplicate ids in one snapshot",
            send: Box::new(move |k| {
                let n = k + 1;
                ab(
                    (&s(n), &s(10 * n)),
                    (&s(2 * n), &s(20 * n)),
                    &[conn("\"a\"", "1", "1"), conn("\"b\"", &s(2 * n), "0")],
                )
            }),
            log: "duplicate id a in one push",
            reconnects: false,
            lands: true,
        },
        Case {
            name: "odd ids: quotes, unicode, SQL, 256 and 257 bytes long",
            send: Box::new(move |k| {
                let mut odd: Vec<String> = ODD_IDS.iter().map(|(j, _)| conn(j, "1", "2")).collect();
                odd.push(conn(&format!("\"{}\"", "l".repeat(256)), "1", "2"));
                odd.push(conn(&format!("\"{}\"", "L".repeat(257)), "1", "2"));
                ab((&s(k), &s(10 * k)), (&s(2 * k), &s(20 * k)), &odd)
            }),
            log: "skipped 1 connections without a usable id",
            reconnects: false,
            lands: false,
        },
        Case {
            name: "deep nesting",
            send: Box::new(|_| {
                Send::Text(format!(
                    r#"{{"connections":[{}{}]}}"#,
                    "[".repeat(100_000),
                    "]".repeat(100_000)
                ))
            }),
            // each entry is decoded without recursion: an array is not a connection
            log: "skipped 1 connections without a usable id",
            reconnects: false,
            lands: false,
        },
        Case {
            name: "deep nesting inside one connection",
            send: Box::new(move |k| {
                let deep = format!(
                    r#"{{"id":"deep","metadata":{}1{},"chains":{}{}}}"#,
                    "{\"a\":".repeat(10_000),
                    "}".repeat(10_000),
                    "[".repeat(10_000),
                    "]".repeat(10_000)
                );
                ab((&s(k), &s(10 * k)), (&s(2 * k), &s(20 * k)), &[deep])
            }),
            // recorded, its unreadable metadata defaulted
            log: "opened",
            reconnects: false,
            lands: false,
        },
        Case {
            name: "connections is not an array",
            send: Box::new(|_| Send::Text(r#"{"connections":{"id":"a","upload":99999}}"#.into())),
            log: "ignored a push",
            reconnects: false,
            lands: false,
        },
    ];

    let exact = |k: u64, rows: &[Stored]| {
        let get = |id: &str| {
            rows.iter()
                .find(|r| r.id == id)
                .map(|r| (r.upload, r.download))
        };
        get("a") == Some((k as i64, 10 * k as i64))
            && get("b") == Some((2 * k as i64, 20 * k as i64))
    };
    fake.push(good(1));
    wait_stored(&db, "the first good frame", |r| exact(1, r));
    let mut k = 1;
    for case in cases {
        match (case.send)(k) {
            Send::Text(t) => fake.push(t),
            Send::Binary(b) => fake.push_binary(b),
            Send::Raw(head, zeros) => fake.push_raw(head, zeros),
        }
        p.wait_line(case.log);
        if case.reconnects {
            fake.wait_connected();
        }
        if case.lands {
            k += 1;
            wait_stored(&db, case.name, |r| exact(k, r));
        }
        assert!(
            p.child.try_wait().unwrap().is_none(),
            "{}: the tracker died",
            case.name
        );
        // the good frame after it lands exactly
        k += 1;
        fake.push(good(k));
        wait_stored(&db, case.name, |r| exact(k, r));
    }
    // The 100 MiB frame was refused by its header, never read into memory.
    let peak = peak_rss_kib(p.child.id());
    p.signal("TERM");
    assert_eq!(p.wait_exit(), 0, "{:#?}", p.seen);
    // Whatever odd connections were accepted were recorded exactly, with their ids intact, and closed.
    let rows = stored(&db);
    let mut want: Vec<(String, i64, i64, bool)> = vec![
        ("a".into(), k as i64, 10 * k as i64, true),
        ("b".into(), 2 * k as i64, 20 * k as i64, true),
        ("12345".into(), 0, 0, false),
        ("deep".into(), 0, 0, false),
        (long_ok, 1, 2, false),
    ];
    want.extend(ODD_IDS.iter().map(|(_, id)| (id.to_string(), 1, 2, false)));
    want.sort();
    assert_eq!(
        summary(&rows),
        want,
        "{:#?}",
        p.seen
            .iter()
            .filter(|l| !l.contains("traffic"))
            .collect::<Vec<_>>()
    );
    assert_traffic_matches_totals(&rows);
    assert!(
        peak < 64 * 1024,
        "peak RSS {peak} KiB (8 MiB when last measured): the huge frame was buffered"
    );
}

/// A request with `Connection: close` (so the answer ends with the connection).
pub fn req(method: &str, target: &[u8], headers: &[&[u8]], body: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(method.as_bytes());
    r.push(b' ');
    r.extend_from_slice(target);
    r.extend_from_slice(b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for h in headers {
        r.extend_from_slice(h);
        r.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() {
        r.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    r.extend_from_slice(b"\r\n");
    r.extend_from_slice(body);
    r
}

/// A `GET` of `target` with `headers` ([`req`]).
pub fn get(target: &[u8], headers: &[&[u8]]) -> Vec<u8> {
    req("GET", target, headers, b"")
}

/// Sends `raw` on a fresh connection and reads the answer to the end: (status, head, body).
pub fn call(addr: SocketAddr, raw: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    // the server may answer (and stop reading) before a huge request is all written
    let _ = s.write_all(raw);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

const TOKEN: &str = "hostile-T0ken-5e1f";

#[test]
fn hostile_http_clients_get_clear_answers_and_never_tie_up_the_server() {
    let dir = TempDir::new("hostile-http");
    let db = dir.path("t.db");
    let mut p = Proc::spawn(&master_args(
        &db,
        0,
        &[
            "--api-token",
            TOKEN,
            "--max-body-bytes",
            "1000",
            "--log-level",
            "debug",
        ],
    ));
    let addr = p.api_addr();
    let auth = format!("Authorization: Bearer {TOKEN}");
    let auth = auth.as_bytes();
    let big_token = format!("Authorization: Bearer {}", "t".repeat(1 << 20));
    let near_token = format!("Authorization: Bearer {TOKEN}x");
    let prefix_token = format!("Authorization: Bearer {}", &TOKEN[..TOKEN.len() - 1]);
    let big_body = vec![b'{'; 2000];
    let stats = b"/api/v1/stats?type=summary";
    let sync = |body: &[u8]| req("POST", b"/api/v1/sync", &[auth], body);
    let chunked_big = [
        &b"POST /api/v1/sync HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"[..],
        auth,
        b"\r\n\r\n7d0\r\n",
        &big_body,
        b"\r\n0\r\n\r\n",
    ]
    .concat();
    let preflight = [
        &b"Origin: http://evil.example"[..],
        b"Access-Control-Request-Method: GET",
    ];
    let both_lengths = [auth, b"Transfer-Encoding: chunked"];
    #[rustfmt::skip] // a table: one case a line
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("no token", get(stats, &[]), 401),
        ("wrong token", get(stats, &[b"Authorization: Bearer nope"]), 401),
        ("token plus a byte", get(stats, &[near_token.as_bytes()]), 401),
        ("token minus a byte", get(stats, &[prefix_token.as_bytes()]), 401),
        ("Basic scheme", get(stats, &[b"Authorization: Basic aG9zdGlsZQ=="]), 401),
        ("1 MiB token", get(stats, &[big_token.as_bytes()]), 431),
        ("the right token", get(stats, &[auth]), 200),
        ("body over the limit", sync(&big_body), 413),
        ("chunked body over the limit", chunked_big, 413),
        ("body that is not UTF-8", sync(b"{\"agent_id\":\"\xff\xfe\"}"), 400),
        ("body that is not JSON", sync(b"\x00\x01\x02"), 400),
        ("path not UTF-8", get(b"/api/v1/\xff\xfe", &[auth]), 400),
        ("query not UTF-8", get(b"/api/v1/stats?host=\xc3\x28", &[auth]), 400),
        ("query escape not UTF-8", get(b"/api/v1/stats?host=%c3%28", &[auth]), 400),
        ("header not UTF-8", get(stats, &[b"Authorization: Bearer \xff\xfe"]), 400),
        ("traversal /../", get(b"/../../../../etc/passwd", &[auth]), 404),
        ("traversal %2e%2e", get(b"/%2e%2e/%2e%2e/etc/passwd", &[auth]), 404),
        ("traversal //etc/passwd", get(b"//etc/passwd", &[auth]), 404),
        ("traversal after a dashboard file", get(b"/dashboard.js/../../etc/passwd", &[auth]), 404),
        ("traversal %2f", get(b"/..%2f..%2fetc%2fpasswd", &[auth]), 404),
        ("traversal without the token", get(b"/../etc/passwd", &[]), 401),
        ("unknown method", req("BREW", b"/api/v1/stats", &[auth], b""), 405),
        ("DELETE", req("DELETE", b"/api/v1/connections", &[auth], b""), 405),
        ("TRACE", req("TRACE", b"/", &[auth], b""), 405),
        ("OPTIONS preflight", req("OPTIONS", stats, &preflight, b""), 401),
        ("CONNECT", req("CONNECT", b"example.com:443", &[auth], b""), 404),
        ("HTTP/0.9", b"GET /\r\n\r\n".to_vec(), 400),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), 505),
        ("TLS hello", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n".to_vec(), 400),
        ("smuggling: both lengths", req("POST", b"/api/v1/sync", &both_lengths, b"0\r\n\r\n"), 400),
    ];
    for (name, raw, want) in &cases {
        let (status, head, body) = call(addr, raw);
        assert!(status == *want, "{name}: {status} {head}\n{body}");
        assert!(!body.contains("root:"), "{name}: {body}");
        // the error envelope, never SQL or a stack
        if status >= 400 {
            assert!(
                body.contains(r#""status":"error""#) && !body.contains("SQL"),
                "{name}: {body}"
            );
        }
        // same-origin dashboard: no CORS header, for anyone
        assert!(
            !head.to_ascii_lowercase().contains("access-control-"),
            "{name}: {head}"
        );
    }
    // what the connection layer refuses is logged too (at debug, with the client's address)
    p.wait_line("413 request body larger than 1000 bytes");

    // SQL-injection strings in every parameter of every endpoint: 200 or 400, never 500, nothing changes.
    let params = "from to agent_id network rule process destination host source_ip policy node \
                  inbound destination_port geoip limit offset sort_by sort_order type group_by \
                  interval metric filter_type query format state";
    let payloads = [
        "%27%20OR%201%3D1--",
        "1%3B%20DROP%20TABLE%20connections%3B--",
        "%22%20OR%20%22%22%3D%22",
        "x%27)%20UNION%20SELECT%20name%2C1%2C1%2C1%20FROM%20sqlite_master--",
    ];
    let endpoints = [
        "/api/v1/stats?type=summary&",
        "/api/v1/stats?type=group&group_by=host&",
        "/api/v1/stats?type=timeseries&interval=hour&",
        "/api/v1/connections?",
        "/api/v1/filter-options?filter_type=host&",
        "/api/v1/agents?",
        "/api/v1/agents/x%27--/status?",
    ];
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut asked = 0;
    for e in endpoints {
        for k in params.split_whitespace() {
            for v in payloads {
                // one keep-alive connection for all of them
                let target = format!("{e}{k}={v}");
                let raw = format!(
                    "GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
                );
                s.write_all(raw.as_bytes()).unwrap();
                let (status, body) = read_one(&mut s);
                assert!(
                    matches!(status, 200 | 400 | 404),
                    "{target}: {status} {body}"
                );
                asked += 1;
            }
        }
    }
    assert_eq!(asked, 7 * 26 * 4);
    let (n,): (i64,) = query_one(&db, "SELECT count(*) FROM connections");
    assert_eq!(n, 0, "the connections table is there and untouched");
    assert!(p.child.try_wait().unwrap().is_none());
}

/// Reads one keep-alive answer: (status, body).
fn read_one(s: &mut TcpStream) -> (u16, String) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut b).unwrap(),
            1,
            "answer cut: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map(|v| v.trim().parse().unwrap())
        .unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (
        head[9..12].parse().unwrap(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[test]
fn slow_idle_and_kept_alive_clients_never_block_a_normal_request() {
    let dir = TempDir::new("hostile-slow");
    let db = dir.path("t.db");
    let mut p = Proc::spawn(&master_args(&db, 0, &["--workers", "2"]));
    let addr = p.api_addr();
    let health = || req("GET", b"/api/v1/health", &[], b"");
    // answered within a generous bound, polling: never waits for a slow client to give up
    let answered_promptly = |what: &str| {
        let started = Instant::now();
        let (status, head, _) = call(addr, &health());
        assert_eq!(status, 200, "{what}: {head}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: {:?}",
            started.elapsed()
        );
    };
    // The old tiny_http fault: a burst of keep-alive connections, then a new one went unanswered.
    let mut kept: Vec<TcpStream> = (0..12).map(|_| TcpStream::connect(addr).unwrap()).collect();
    for s in &mut kept {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
    }
    for s in &mut kept {
        assert_eq!(read_one(s).0, 200);
    }
    answered_promptly("12 keep-alive connections open");
    // 20 clients sending their head a byte at a time, and 20 that connect and say nothing
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let trickle = {
        let stop = stop.clone();
        let mut socks: Vec<TcpStream> = slow.iter().map(|s| s.try_clone().unwrap()).collect();
        std::thread::spawn(move || {
            let head = b"GET /api/v1/health HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
            for b in head.iter().cycle() {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                for s in &mut socks {
                    let _ = s.write_all(&[*b]);
                }
                // slow on purpose: a byte every 200 ms
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let idle: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
    answered_promptly("20 slow, 20 idle and 12 kept-alive clients");
    // beyond the connection limit (256): refused at once with 503, not left hanging
    let mut extra = Vec::new();
    // one more connection per poll, as fast as they come
    let refused = wait_until("a 503", Duration::from_secs(10), Duration::ZERO, || {
        let (status, head, body) = call(addr, &health());
        match status {
            200 => extra.push(TcpStream::connect(addr).unwrap()),
            503 => return Ok((head, body)),
            other => panic!("{other} {head}"),
        }
        Err(format!(
            "never refused with {} connections",
            52 + extra.len()
        ))
    });
    assert!(refused.1.contains("too many connections"), "{refused:?}");
    p.wait_line("refusing");
    // and once they go, everyone is served again
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    trickle.join().unwrap();
    drop((slow, idle, kept, extra));
    wait_until(
        "everyone served after the clients left",
        Duration::from_secs(10),
        POLL,
        || {
            let status = call(addr, &health()).0;
            (status == 200)
                .then_some(())
                .ok_or_else(|| format!("still refused: {status}"))
        },
    );
    assert!(p.child.try_wait().unwrap().is_none());
}
