//! Hostile and malformed input, end to end: the real binary against a fake mihomo that sends broken,
//! oversized and odd frames, and against HTTP clients that send broken, oversized, slow or malicious
//! requests. Each case: the program stays up, says what happened in its log, and the data around it is exact.

use crate::binary::Proc;
use crate::fake_mihomo::FakeMihomo;
use crate::support::*;

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
    let port = fake.addr.port().to_string();
    let mut p = Proc::spawn(&[
        "master",
        "--database",
        db.to_str().unwrap(),
        "--listen-port",
        "0",
        "--mihomo-host",
        "127.0.0.1",
        "--mihomo-port",
        &port,
        "--commit-interval-ms",
        "50",
        "--log-level",
        "debug",
    ]);
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
            log: "WebSocket to mihomo failed",
            reconnects: true,
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
        "peak RSS {peak} KiB: the huge frame was buffered"
    );
}
