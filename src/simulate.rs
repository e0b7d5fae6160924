//! A simulated mihomo controller: a `/connections` WebSocket server with realistic load, for `make demo`
//! and the benchmarks (the tests script their own small fake instead).
//!
//! [`SimModel`] is the snapshot generator: N live connections from ~20 LAN devices (and the router's own
//! processes) to ~200 hosts, each with its own byte rates (a few heavy downloads), `churn_percent` of them
//! replaced per second by new ones whose ids are never reused. It writes frames in mihomo's exact wire shape
//! (every metadata key, ports as strings, `start` with a `+08:00` offset, chains exit-first, `connections:
//! null` when empty, Go's string escaping) straight into a reused `Vec<u8>`, so a 10,000-connection frame
//! (~8 MB) costs no intermediate values. Everything derives from one seed through a tiny xorshift PRNG.
//!
//! [`start`] serves one model to any number of clients, one thread each, like mihomo: a full snapshot at
//! once and then every `?interval=MS`; the secret is checked before the upgrade (`?token=` or
//! `Authorization: Bearer`, else `401 {"message":"Unauthorized"}`). After the handshake the server only
//! reads to notice a close (the read timeout doubles as the wait between pushes); writes have a timeout so
//! a stuck client cannot hold its thread forever.

use crate::api::params::percent_decode_lenient;
use crate::error::{Error, Result};
use crate::timefmt::{now_ms, Civil, HOUR_MS};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::Message;

/// A tiny xorshift64* generator: deterministic, no `rand` crate.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Rng {
        Rng(splitmix(seed) | 1)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `0..n` (`n > 0`; the tiny modulo bias does not matter here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// SplitMix64's finaliser: a bijection on u64, so distinct counters give distinct ids.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The core's local offset used in `start` (mihomo reports its own time zone).
const OFFSET_MS: i64 = 8 * HOUR_MS;

/// Exit nodes (with their provider) and the policy group that picks each: 6 nodes in 3 groups.
#[rustfmt::skip]
const NODES: &[(&str, &str, &str)] = &[
    ("HK-01 Premium", "airport-a", "Proxy"),
    ("HK-02", "airport-a", "Proxy"),
    ("US-West 01", "airport-b", "Streaming"),
    ("JP-Tokyo 02", "airport-b", "Streaming"),
    ("SG-01", "airport-a", "Auto"),
    ("TW-03 \u{1F680}", "airport-b", "Auto"),
];

/// How a family of hosts is routed.
#[derive(Clone, Copy)]
enum Route {
    /// `DIRECT`, matched by GeoIP/GeoSite China rules.
    Direct,
    /// A policy group, by name (the third field of [`NODES`]).
    Group(&'static str),
}

impl Route {
    /// `chains` and `providerChains` of a connection on this route that drew `node`: the exit node first,
    /// the policy group last, the providers naming the node's (`DIRECT` alone uses the first of each).
    fn chains(self, node: u8) -> ([&'static str; 2], [&'static str; 2]) {
        match self {
            Route::Direct => (["DIRECT", ""], ["", ""]),
            Route::Group(group) => {
                // The node must belong to the group: pick among its members (no allocation per row).
                let members = || NODES.iter().filter(|n| n.2 == group);
                let pick = node as usize % members().count().max(1);
                let (node, provider, _) = members().nth(pick).unwrap_or(&NODES[0]);
                ([node, group], [provider, ""])
            }
        }
    }
}

/// Base domains: (domain, subdomain prefixes, destination country, rule type, rule payload, route).
type Base = (
    &'static str,
    &'static [&'static str],
    &'static str,
    &'static str,
    &'static str,
    Route,
);
const WEB: &[&str] = &["www", "api", "static", "cdn", "img", "m", "login", "assets"];
const VIDEO: &[&str] = &[
    "rr1---sn-oguelnzz",
    "rr3---sn-oguelnzz",
    "rr5---sn-n4v7knll",
    "rr2---sn-un57sn7s",
    "redirector",
    "manifest",
];
#[rustfmt::skip]
const BASES: &[Base] = &[
    ("googlevideo.com", VIDEO, "us", "RuleSet", "geosite-youtube", Route::Group("Streaming")),
    ("youtube.com", WEB, "us", "RuleSet", "geosite-youtube", Route::Group("Streaming")),
    ("nflxvideo.net", VIDEO, "us", "RuleSet", "geosite-netflix", Route::Group("Streaming")),
    ("netflix.com", WEB, "us", "RuleSet", "geosite-netflix", Route::Group("Streaming")),
    ("twitch.tv", WEB, "us", "DomainSuffix", "twitch.tv", Route::Group("Streaming")),
    ("google.com", WEB, "us", "RuleSet", "geosite-google", Route::Group("Proxy")),
    ("googleapis.com", WEB, "us", "RuleSet", "geosite-google", Route::Group("Proxy")),
    ("gstatic.com", WEB, "us", "RuleSet", "geosite-google", Route::Group("Proxy")),
    ("telegram.org", WEB, "nl", "RuleSet", "telegram", Route::Group("Proxy")),
    ("twitter.com", WEB, "us", "DomainSuffix", "twitter.com", Route::Group("Proxy")),
    ("twimg.com", WEB, "us", "DomainSuffix", "twimg.com", Route::Group("Proxy")),
    ("wikipedia.org", WEB, "us", "Match", "", Route::Group("Proxy")),
    ("reddit.com", WEB, "us", "Match", "", Route::Group("Proxy")),
    ("cloudflare.com", WEB, "us", "Match", "", Route::Group("Proxy")),
    ("github.com", WEB, "us", "DomainKeyword", "github", Route::Group("Auto")),
    ("githubusercontent.com", WEB, "us", "DomainKeyword", "github", Route::Group("Auto")),
    ("openai.com", WEB, "us", "RuleSet", "ai", Route::Group("Auto")),
    ("anthropic.com", WEB, "us", "RuleSet", "ai", Route::Group("Auto")),
    ("docker.io", WEB, "us", "DomainSuffix", "docker.io", Route::Group("Auto")),
    ("crates.io", WEB, "us", "DomainSuffix", "crates.io", Route::Group("Auto")),
    ("apple.com", WEB, "us", "RuleSet", "apple", Route::Direct),
    ("icloud.com", WEB, "us", "RuleSet", "apple", Route::Direct),
    ("baidu.com", WEB, "cn", "GeoSite", "cn", Route::Direct),
    ("qq.com", WEB, "cn", "GeoSite", "cn", Route::Direct),
    ("bilibili.com", WEB, "cn", "GeoSite", "cn", Route::Direct),
    ("taobao.com", WEB, "cn", "DomainSuffix", "taobao.com", Route::Direct),
    ("jd.com", WEB, "cn", "GeoIP", "cn", Route::Direct),
    ("steamcontent.com", VIDEO, "jp", "DomainSuffix", "steamcontent.com", Route::Direct),
];

/// Local processes on the router itself (source 127.0.0.1); LAN devices have no process.
#[rustfmt::skip]
const PROCESSES: &[(&str, &str, u64)] = &[
    ("firefox", "/usr/lib/firefox/firefox", 1000),
    ("chrome", "/opt/google/chrome/chrome", 1000),
    ("curl", "/usr/bin/curl", 0),
    ("opkg", "/bin/opkg", 0),
    ("Telegram", "/opt/Telegram/Telegram", 1000),
    ("R&D <tool>", "/opt/r&d/tool", 1000),
];

/// Inbounds: (type, name, ip, port).
#[rustfmt::skip]
const INBOUNDS: &[(&str, &str, &str, &str)] = &[
    ("Tun", "DEFAULT-TUN", "", "0"),
    ("TProxy", "DEFAULT-TPROXY", "192.168.1.1", "7894"),
    ("Redir", "DEFAULT-REDIR", "192.168.1.1", "7892"),
    ("HTTPS", "DEFAULT-MIXED", "192.168.1.1", "7890"),
    ("Socks5", "DEFAULT-MIXED", "192.168.1.1", "7890"),
];

/// Number of LAN devices.
const DEVICES: u64 = 20;

/// A destination: host name (or `""` for IP-only), address, port, country, rule, route.
struct Host {
    name: String,
    ip: String,
    port: &'static str,
    geoip: &'static str,
    rule: &'static str,
    payload: &'static str,
    route: Route,
    udp: bool,
    /// Hosts that carry bulk traffic (video CDNs, downloads).
    bulk: bool,
}

/// Destinations without a domain family: DNS (no host), NTP, a NAS on the LAN. (host, ip, port, country,
/// rule, payload, route, udp, bulk)
type OtherHost = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Route,
    bool,
    bool,
);
#[rustfmt::skip]
const OTHER_HOSTS: &[OtherHost] = &[
    ("", "8.8.8.8", "53", "us", "IPCIDR", "8.8.8.0/24", Route::Group("Proxy"), true, false),
    ("", "223.5.5.5", "53", "cn", "GeoIP", "cn", Route::Direct, true, false),
    ("time.apple.com", "17.253.144.10", "123", "us", "Match", "", Route::Direct, true, false),
    ("", "192.168.1.5", "445", "", "GeoIP", "private", Route::Direct, false, true),
];

fn build_hosts(rng: &mut Rng) -> Vec<Host> {
    let mut hosts = Vec::new();
    for &(domain, prefixes, geoip, rule, payload, route) in BASES {
        let first_octets: &[u64] = if geoip == "cn" {
            &[36, 39, 110, 183]
        } else {
            &[104, 142, 151, 172, 185, 23]
        };
        for prefix in prefixes.iter().take(7) {
            let a = first_octets[rng.below(first_octets.len() as u64) as usize];
            let ip = format!(
                "{a}.{}.{}.{}",
                rng.below(256),
                rng.below(256),
                1 + rng.below(254)
            );
            // Video CDN edges carry the heavy downloads; their redirectors and manifests do not.
            let bulk = std::ptr::eq(prefixes, VIDEO) && prefix.starts_with("rr");
            hosts.push(Host {
                name: format!("{prefix}.{domain}"),
                ip,
                port: "443",
                geoip,
                rule,
                payload,
                route,
                udp: bulk && domain == "googlevideo.com", // QUIC
                bulk,
            });
        }
    }
    for &(name, ip, port, geoip, rule, payload, route, udp, bulk) in OTHER_HOSTS {
        let name = name.to_owned();
        let ip = ip.to_owned();
        hosts.push(Host {
            name,
            ip,
            port,
            geoip,
            rule,
            payload,
            route,
            udp,
            bulk,
        });
    }
    hosts
}

/// One live connection. Only numbers and indexes: the strings live in the host table.
#[derive(Clone, Debug)]
struct Conn {
    /// Counter behind the id (never reused).
    serial: u64,
    start_ms: i64,
    /// Sub-millisecond part of `start`, in 100 ns units (0..10,000).
    start_sub: u32,
    host: u16,
    /// 0 = the router itself (with a process), 1..=DEVICES = 192.168.1.(100+n).
    device: u8,
    process: u8,
    inbound: u8,
    /// Chooses the exit node among the members of the host's policy group (ignored for DIRECT routes).
    node: u8,
    udp: bool,
    source_port: u16,
    upload: u64,
    download: u64,
    /// Bytes per second.
    rate_up: u32,
    rate_down: u32,
}

/// The snapshot generator. See the module doc.
pub struct SimModel {
    rng: Rng,
    seed: u64,
    hosts: Vec<Host>,
    conns: Vec<Conn>,
    next_serial: u64,
    churn_percent: f64,
    /// Fractional connections owed to churn from earlier ticks.
    churn_debt: f64,
    last_ms: i64,
    upload_total: u64,
    download_total: u64,
}

impl SimModel {
    /// A model with `connections` live connections at `now_ms`, started over the last two hours.
    pub fn new(connections: usize, churn_percent: f64, seed: u64, now_ms: i64) -> SimModel {
        let mut rng = Rng::new(seed);
        let hosts = build_hosts(&mut rng);
        let mut m = SimModel {
            rng,
            seed,
            hosts,
            conns: Vec::with_capacity(connections),
            next_serial: 0,
            churn_percent: churn_percent.max(0.0),
            churn_debt: 0.0,
            last_ms: now_ms,
            upload_total: 0,
            download_total: 0,
        };
        for _ in 0..connections {
            // Skewed towards recent starts: most connections are young, a few are hours old.
            let age = (m.rng.unit().powi(3) * 2.0 * HOUR_MS as f64) as i64;
            let mut c = m.new_conn(now_ms - age);
            c.upload = c.rate_up as u64 * age as u64 / 4000;
            c.download = c.rate_down as u64 * age as u64 / 4000;
            m.upload_total += c.upload;
            m.download_total += c.download;
            m.conns.push(c);
        }
        m
    }

    fn new_conn(&mut self, start_ms: i64) -> Conn {
        let r = &mut self.rng;
        let serial = self.next_serial;
        self.next_serial += 1;
        let host = r.below(self.hosts.len() as u64) as u16;
        let h = &self.hosts[host as usize];
        let device = if r.chance(0.15) {
            0
        } else {
            1 + r.below(DEVICES) as u8
        };
        let heavy = h.bulk && r.chance(0.08);
        let (rate_up, rate_down) = if heavy {
            (
                2_000 + r.below(20_000) as u32,
                500_000 + r.below(4_500_000) as u32,
            )
        } else if r.chance(0.3) {
            (200 + r.below(5_000) as u32, 1_000 + r.below(60_000) as u32)
        } else {
            (5 + r.below(300) as u32, 10 + r.below(2_000) as u32)
        };
        Conn {
            serial,
            start_ms,
            start_sub: r.below(10_000) as u32,
            host,
            device,
            process: r.below(PROCESSES.len() as u64) as u8,
            inbound: if device == 0 {
                3 + r.below(2) as u8
            } else {
                r.below(3) as u8
            },
            node: r.below(NODES.len() as u64) as u8,
            udp: h.udp && r.chance(0.6),
            source_port: 32_768 + r.below(28_000) as u16,
            upload: 0,
            download: 0,
            rate_up,
            rate_down,
        }
    }

    /// Advances the model to `now_ms`: every connection's bytes grow (at least one byte each), and the
    /// churn owed for the elapsed time replaces random connections with new ones. Time never goes back.
    pub fn tick(&mut self, now_ms: i64) {
        let dt = now_ms - self.last_ms;
        if dt <= 0 {
            return;
        }
        self.last_ms = now_ms;
        let (mut up_sum, mut down_sum) = (0u64, 0u64);
        for c in &mut self.conns {
            // Rates vary +-50 % from push to push.
            let jitter = 500 + self.rng.below(1001);
            let up = 1 + c.rate_up as u64 * dt as u64 * jitter / 1_000_000;
            let down = 1 + c.rate_down as u64 * dt as u64 * jitter / 1_000_000;
            c.upload += up;
            c.download += down;
            up_sum += up;
            down_sum += down;
        }
        self.upload_total += up_sum;
        self.download_total += down_sum;
        let n = self.conns.len();
        if n == 0 {
            return;
        }
        self.churn_debt += n as f64 * self.churn_percent / 100.0 * dt as f64 / 1000.0;
        let replace = (self.churn_debt.floor() as usize).min(n);
        self.churn_debt -= replace as f64;
        self.churn_debt = self.churn_debt.min(n as f64);
        for _ in 0..replace {
            let i = self.rng.below(n as u64) as usize;
            // A new connection started some time since the last push.
            let start = now_ms - self.rng.below(dt.min(1000) as u64) as i64;
            let mut c = self.new_conn(start);
            c.upload = 1 + self.rng.below(2_000);
            c.download = 1 + self.rng.below(20_000);
            self.upload_total += c.upload;
            self.download_total += c.download;
            self.conns[i] = c;
        }
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// True when there is no live connection.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// `(uploadTotal, downloadTotal)` as the next frame will report them.
    pub fn totals(&self) -> (u64, u64) {
        (self.upload_total, self.download_total)
    }

    /// The live connections as `(id, upload, download)`, the values the next frame will carry.
    pub fn counters(&self) -> Vec<(String, u64, u64)> {
        let mut id = Vec::with_capacity(36);
        self.conns
            .iter()
            .map(|c| {
                id.clear();
                self.write_id(&mut id, c.serial);
                let s = String::from_utf8(id.clone()).expect("ids are ASCII");
                (s, c.upload, c.download)
            })
            .collect()
    }

    /// A UUID-looking id: the low 64 bits are a bijection of the serial (so never repeated), the rest noise.
    fn write_id(&self, out: &mut Vec<u8>, serial: u64) {
        let lo = splitmix(serial ^ self.seed.rotate_left(17));
        let hi = splitmix(lo ^ 0x5bd1_e995);
        let hi = (hi & !0xf000) | 0x4000; // version nibble
        let mut hex = [0u8; 32];
        for (i, b) in hex.iter_mut().enumerate() {
            let v = if i < 16 {
                hi >> (60 - 4 * i)
            } else {
                lo >> (60 - 4 * (i - 16))
            };
            *b = b"0123456789abcdef"[(v & 0xf) as usize];
        }
        for (i, chunk) in [
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32],
        ]
        .iter()
        .enumerate()
        {
            if i > 0 {
                out.push(b'-');
            }
            out.extend_from_slice(chunk);
        }
    }

    /// Writes one frame (replacing `out`'s content) exactly as mihomo sends it, trailing newline included.
    pub fn write_frame(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(b"{\"downloadTotal\":");
        push_u64(out, self.download_total);
        out.extend_from_slice(b",\"uploadTotal\":");
        push_u64(out, self.upload_total);
        if self.conns.is_empty() {
            out.extend_from_slice(b",\"connections\":null");
        } else {
            out.extend_from_slice(b",\"connections\":[");
            for (i, c) in self.conns.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                self.write_conn(out, c);
            }
            out.push(b']');
        }
        // mihomo's own memory figure; a plausible constant-ish value.
        out.extend_from_slice(b",\"memory\":");
        push_u64(out, 40_000_000 + self.conns.len() as u64 * 3_000);
        out.extend_from_slice(b"}\n");
    }

    fn write_conn(&self, out: &mut Vec<u8>, c: &Conn) {
        let h = &self.hosts[c.host as usize];
        let (process, process_path, uid) = if c.device == 0 {
            let p = PROCESSES[c.process as usize];
            (p.0, p.1, p.2)
        } else {
            ("", "", 0)
        };
        let (in_type, in_name, in_ip, in_port) = INBOUNDS[c.inbound as usize];
        // Fake-ip style inbounds do not know the destination address; the others resolved it.
        let known_ip = c.inbound != 0 || h.name.is_empty();
        let fake_ip = c.inbound == 0;
        out.extend_from_slice(b"{\"id\":\"");
        self.write_id(out, c.serial);
        out.extend_from_slice(b"\",\"metadata\":{\"network\":");
        push_str(out, if c.udp { "udp" } else { "tcp" });
        str_field(out, "type", in_type);
        key(out, "sourceIP");
        if c.device == 0 {
            push_str(out, "127.0.0.1");
        } else {
            out.extend_from_slice(b"\"192.168.1.");
            push_u64(out, 100 + c.device as u64);
            out.push(b'"');
        }
        str_field(out, "destinationIP", if known_ip { &h.ip } else { "" });
        key(out, "sourceGeoIP");
        out.extend_from_slice(b"null");
        key(out, "destinationGeoIP");
        match (known_ip, h.geoip) {
            (false, _) => out.extend_from_slice(b"null"),
            (true, "") => out.extend_from_slice(b"[]"),
            (true, cc) => {
                out.push(b'[');
                push_str(out, cc);
                out.push(b']');
            }
        }
        str_field(out, "sourceIPASN", "");
        let asn = if known_ip && h.geoip == "us" {
            "AS15169 Google LLC"
        } else {
            ""
        };
        str_field(out, "destinationIPASN", asn);
        key(out, "sourcePort");
        out.push(b'"');
        push_u64(out, c.source_port as u64);
        out.push(b'"');
        str_field(out, "destinationPort", h.port);
        str_field(out, "inboundIP", in_ip);
        str_field(out, "inboundPort", in_port);
        str_field(out, "inboundName", in_name);
        str_field(out, "inboundUser", "");
        str_field(out, "rematchName", "");
        str_field(out, "host", &h.name);
        str_field(out, "dnsMode", if fake_ip { "fake-ip" } else { "normal" });
        num_field(out, "uid", uid);
        str_field(out, "process", process);
        str_field(out, "processPath", process_path);
        str_field(out, "specialProxy", "");
        str_field(out, "specialRules", "");
        let direct = matches!(h.route, Route::Direct);
        str_field(out, "remoteDestination", if direct { "" } else { &h.ip });
        num_field(out, "dscp", 0);
        str_field(out, "sniffHost", if fake_ip { &h.name } else { "" });
        out.push(b'}');
        num_field(out, "upload", c.upload);
        num_field(out, "download", c.download);
        key(out, "start");
        out.push(b'"');
        push_start(out, c.start_ms, c.start_sub);
        out.push(b'"');
        let (chain, providers) = h.route.chains(c.node);
        let len = if direct { 1 } else { 2 };
        str_list_field(out, "chains", &chain[..len]);
        str_list_field(out, "providerChains", &providers[..len]);
        str_field(out, "rule", h.rule);
        str_field(out, "rulePayload", h.payload);
        out.push(b'}');
    }
}

/// Writes `,"key":` (every field but an object's first).
fn key(out: &mut Vec<u8>, key: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
}

fn str_field(out: &mut Vec<u8>, k: &str, v: &str) {
    key(out, k);
    push_str(out, v);
}

fn num_field(out: &mut Vec<u8>, k: &str, v: u64) {
    key(out, k);
    push_u64(out, v);
}

fn str_list_field(out: &mut Vec<u8>, k: &str, items: &[&str]) {
    key(out, k);
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_str(out, item);
    }
    out.push(b']');
}

/// Writes `v` in decimal without going through `fmt`.
fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

fn push_2(out: &mut Vec<u8>, v: u32) {
    out.push(b'0' + (v / 10 % 10) as u8);
    out.push(b'0' + (v % 10) as u8);
}

/// `2026-07-14T21:03:17.4829152+08:00`: Go's RFC3339Nano in the core's zone, trailing zeros trimmed.
fn push_start(out: &mut Vec<u8>, start_ms: i64, sub: u32) {
    let c = Civil::from_ms(start_ms + OFFSET_MS);
    let _ = write!(out, "{:04}-", c.year);
    push_2(out, c.month);
    out.push(b'-');
    push_2(out, c.day);
    out.push(b'T');
    push_2(out, c.hour);
    out.push(b':');
    push_2(out, c.minute);
    out.push(b':');
    push_2(out, c.second);
    let mut frac = c.millis * 10_000 + sub;
    if frac != 0 {
        let mut digits = 7;
        while frac % 10 == 0 {
            frac /= 10;
            digits -= 1;
        }
        let _ = write!(out, ".{frac:0digits$}");
    }
    out.extend_from_slice(b"+08:00");
}

/// Writes a JSON string the way Go's `encoding/json` does: `<`, `>`, `&`, U+2028 and U+2029 as `\u` escapes.
fn push_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, ch) in s.char_indices() {
        let esc: Option<&[u8]> = match ch {
            '"' => Some(b"\\\""),
            '\\' => Some(b"\\\\"),
            '\n' => Some(b"\\n"),
            '\r' => Some(b"\\r"),
            '\t' => Some(b"\\t"),
            _ => None,
        };
        let special = esc.is_some()
            || (ch as u32) < 0x20
            || matches!(ch, '<' | '>' | '&' | '\u{2028}' | '\u{2029}');
        if !special {
            continue;
        }
        out.extend_from_slice(&bytes[start..i]);
        match esc {
            Some(e) => out.extend_from_slice(e),
            None => {
                let _ = write!(out, "\\u{:04x}", ch as u32);
            }
        }
        start = i + ch.len_utf8();
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// How to run the simulated controller.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub listen: SocketAddr,
    pub connections: usize,
    /// Share of the live connections replaced by new ones per second, in percent.
    pub churn_percent: f64,
    /// When set, clients must present it like mihomo's `secret`.
    pub secret: Option<String>,
    pub seed: u64,
}

/// State shared by the accept thread and every client thread.
struct Shared {
    model: Mutex<SimModel>,
    secret: Option<String>,
    stop: AtomicBool,
    paused: AtomicBool,
}

/// A running simulated controller. Dropping it stops it too.
pub struct Simulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

/// How often blocked loops look at the stop flag.
const POLL: Duration = Duration::from_millis(100);
/// A client that cannot take a frame within this time is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `cfg.listen` and serves `/connections` until [`Simulator::stop`].
pub fn start(cfg: SimConfig) -> Result<Simulator> {
    if !cfg.churn_percent.is_finite() || cfg.churn_percent < 0.0 {
        return Err(Error::Usage(format!(
            "--churn-percent must be a number >= 0, got {}",
            cfg.churn_percent
        )));
    }
    let listener = TcpListener::bind(cfg.listen)
        .map_err(Error::io(format!("simulate: bind {}", cfg.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(Error::io("simulate: local address"))?;
    listener
        .set_nonblocking(true)
        .map_err(Error::io("simulate: nonblocking listener"))?;
    let shared = Arc::new(Shared {
        model: Mutex::new(SimModel::new(
            cfg.connections,
            cfg.churn_percent,
            cfg.seed,
            now_ms(),
        )),
        secret: cfg.secret,
        stop: AtomicBool::new(false),
        paused: AtomicBool::new(false),
    });
    let accept = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("sim-accept".into())
            .spawn(move || accept_loop(listener, shared))
            .map_err(Error::io("simulate: spawn accept thread"))?
    };
    crate::info!(
        "simulate: ws://{addr}/connections with {} connections, {}% churn/s",
        cfg.connections,
        cfg.churn_percent
    );
    Ok(Simulator {
        addr,
        shared,
        accept: Some(accept),
    })
}

impl Simulator {
    /// The address it listens on (the real port when bound to port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The model, locked: what the last push sent (it only advances when a push is due). Hold it briefly.
    pub fn model(&self) -> MutexGuard<'_, SimModel> {
        lock(&self.shared.model)
    }

    /// While paused no client gets a push (sockets stay open): lets a benchmark know the last values sent.
    pub fn set_paused(&self, paused: bool) {
        self.shared.paused.store(paused, Ordering::SeqCst);
    }

    /// Stops accepting, ends every client and joins all threads.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A poisoned lock only means a client thread panicked mid-frame; the model itself stays consistent.
fn lock(m: &Mutex<SimModel>) -> MutexGuard<'_, SimModel> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut clients: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("sim-client".into())
                        .spawn(move || {
                            if let Err(e) = serve_client(stream, &shared) {
                                crate::debug!("simulate: client {peer}: {e}");
                            }
                        });
                match spawned {
                    Ok(h) => clients.push(h),
                    Err(e) => crate::warn!("simulate: cannot spawn client thread: {e}"),
                }
                clients.retain(|h| !h.is_finished());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(e) => {
                crate::warn!("simulate: accept: {e}");
                std::thread::sleep(POLL);
            }
        }
    }
    for h in clients {
        let _ = h.join();
    }
}

/// What the `interval` query parameter asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pushes {
    Every(u64),
    /// `0` or negative: mihomo sends the first frame and then nothing.
    Once,
    /// Not an integer: an open socket that never sends.
    Never,
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn parse_interval(query: &str) -> Pushes {
    match query_param(query, "interval") {
        None | Some("") => Pushes::Every(1000),
        Some(v) => match v.parse::<i64>() {
            Ok(ms) if ms > 0 => Pushes::Every(ms as u64),
            Ok(_) => Pushes::Once,
            Err(_) => Pushes::Never,
        },
    }
}

/// The handshake check, before any upgrade: the answer to refuse with, if any (wrong path, wrong secret).
fn rejection(req: &Request, secret: Option<&str>) -> Option<ErrorResponse> {
    let reject = |status: u16, msg: &str| {
        let mut resp = ErrorResponse::new(Some(format!("{{\"message\":\"{msg}\"}}")));
        *resp.status_mut() = tungstenite::http::StatusCode::from_u16(status)
            .unwrap_or(tungstenite::http::StatusCode::BAD_REQUEST);
        resp.headers_mut().insert(
            "content-type",
            tungstenite::http::HeaderValue::from_static("application/json"),
        );
        resp
    };
    if req.uri().path() != "/connections" {
        return Some(reject(404, "Not Found"));
    }
    let secret = secret?;
    let query = req.uri().query().unwrap_or("");
    let by_query = query_param(query, "token").map(percent_decode_lenient);
    let by_header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let matches = |given: Option<String>| {
        given
            .is_some_and(|g| crate::api::handler::constant_time_eq(g.as_bytes(), secret.as_bytes()))
    };
    let ok = matches(by_query) | matches(by_header);
    (!ok).then(|| reject(401, "Unauthorized"))
}

fn serve_client(stream: TcpStream, shared: &Shared) -> Result<()> {
    let io = |what: &'static str| Error::io(format!("simulate: {what}"));
    stream
        .set_nonblocking(false)
        .map_err(io("blocking socket"))?;
    stream
        .set_read_timeout(Some(WRITE_TIMEOUT))
        .map_err(io("read timeout"))?;
    stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .map_err(io("write timeout"))?;
    let mut query = String::new();
    // tungstenite's `Callback` signature fixes this closure's (large) error type.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| {
        query = req.uri().query().unwrap_or("").to_owned();
        match rejection(req, shared.secret.as_deref()) {
            Some(refusal) => Err(refusal),
            None => Ok(resp),
        }
    };
    let mut ws = tungstenite::accept_hdr(stream, callback)
        .map_err(|e| Error::Mihomo(format!("simulate: handshake: {e}")))?;
    let pushes = parse_interval(&query);
    let mut buf: Vec<u8> = Vec::new();
    let mut sent_any = false;
    let mut next_push = std::time::Instant::now();
    while !shared.stop.load(Ordering::SeqCst) {
        let due = std::time::Instant::now() >= next_push;
        let wanted = match pushes {
            Pushes::Every(_) => true,
            Pushes::Once => !sent_any,
            Pushes::Never => false,
        };
        let paused = shared.paused.load(Ordering::SeqCst);
        if due && wanted && !paused {
            {
                let mut model = lock(&shared.model);
                model.tick(now_ms());
                // One allocation of the right size per frame; the message then owns it.
                buf.reserve(model.len() * 900 + 128);
                model.write_frame(&mut buf);
            }
            let text = String::from_utf8(std::mem::take(&mut buf)).expect("frames are UTF-8");
            ws.send(Message::Text(text.into()))
                .map_err(|e| Error::Mihomo(format!("simulate: send: {e}")))?;
            sent_any = true;
            if let Pushes::Every(ms) = pushes {
                next_push += Duration::from_millis(ms);
                let now = std::time::Instant::now();
                if next_push < now {
                    next_push = now; // fell behind: push again at once, never in a burst
                }
            }
        }
        // Wait for the next push (or the stop flag) by reading: it notices a close at the same time.
        // Nothing due (paused, one-shot done, never): just look at the flags again every POLL.
        let wait = if wanted && !paused {
            next_push
                .saturating_duration_since(std::time::Instant::now())
                .clamp(Duration::from_millis(1), POLL)
        } else {
            POLL
        };
        ws.get_mut()
            .set_read_timeout(Some(wait))
            .map_err(io("read timeout"))?;
        match ws.read() {
            Ok(Message::Close(_)) => return Ok(()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                return Ok(())
            }
            Err(e) => return Err(Error::Mihomo(format!("simulate: read: {e}"))),
        }
    }
    let _ = ws.close(None);
    let _ = ws.flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::HashSet;

    const T0: i64 = 1_784_000_000_000;

    fn frame_bytes(m: &SimModel) -> Vec<u8> {
        let mut buf = Vec::new();
        m.write_frame(&mut buf);
        buf
    }

    fn frame(m: &SimModel) -> Value {
        let buf = frame_bytes(m);
        assert_eq!(buf.last(), Some(&b'\n'));
        serde_json::from_slice(&buf).expect("frame is JSON")
    }

    /// A frame's connection's `(upload, download)`.
    fn up_down(c: &Value) -> (u64, u64) {
        (
            c["upload"].as_u64().unwrap(),
            c["download"].as_u64().unwrap(),
        )
    }

    fn ids(v: &Value) -> Vec<String> {
        v["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// The keys of mihomo's `metadata`: those the tracker reads ([`crate::model::Field::mihomo`]).
    fn meta_keys() -> Vec<&'static str> {
        crate::model::Field::ALL
            .iter()
            .filter_map(|f| f.mihomo().metadata_key())
            .collect()
    }

    #[test]
    fn frame_has_mihomo_shape() {
        let m = SimModel::new(500, 1.0, 7, T0);
        let v = frame(&m);
        assert!(v["downloadTotal"].as_u64().unwrap() > 0);
        assert!(v["uploadTotal"].is_u64());
        assert!(v["memory"].is_u64());
        let conns = v["connections"].as_array().unwrap();
        assert_eq!(conns.len(), 500);
        let (mut hosts, mut devices, mut nodes, mut rules, mut udp) = (
            HashSet::new(),
            HashSet::new(),
            HashSet::new(),
            HashSet::new(),
            0,
        );
        for c in conns {
            let id = c["id"].as_str().unwrap();
            assert_eq!(id.len(), 36, "{id}");
            let md = c["metadata"].as_object().unwrap();
            let keys = meta_keys();
            assert_eq!(md.len(), keys.len());
            for k in keys {
                assert!(md.contains_key(k), "missing metadata key {k}");
            }
            for k in ["sourcePort", "destinationPort", "inboundPort"] {
                assert!(
                    md[k].as_str().unwrap().parse::<u16>().is_ok(),
                    "{k}: {}",
                    md[k]
                );
            }
            assert!(md["uid"].is_u64() && md["dscp"].is_u64());
            assert!(md["destinationGeoIP"].is_null() || md["destinationGeoIP"].is_array());
            let start = c["start"].as_str().unwrap();
            assert!(start.ends_with("+08:00"), "{start}");
            let ms = crate::timefmt::parse_rfc3339(start).unwrap();
            assert!(ms <= T0 && ms > T0 - 3 * HOUR_MS, "{start}");
            let chains = c["chains"].as_array().unwrap();
            assert_eq!(chains.len(), c["providerChains"].as_array().unwrap().len());
            assert!(c["upload"].is_u64() && c["download"].is_u64());
            assert!(c["rule"].is_string() && c["rulePayload"].is_string());
            hosts.insert(md["host"].as_str().unwrap().to_owned());
            devices.insert(md["sourceIP"].as_str().unwrap().to_owned());
            nodes.insert(chains[0].as_str().unwrap().to_owned());
            rules.insert(c["rule"].as_str().unwrap().to_owned());
            udp += (md["network"] == "udp") as usize;
        }
        assert!(hosts.len() > 100, "{} hosts", hosts.len());
        assert!(devices.len() >= 20, "{} devices", devices.len());
        assert_eq!(nodes.len(), NODES.len() + 1, "{nodes:?}"); // + DIRECT
        assert!(rules.len() >= 5, "{rules:?}");
        assert!(udp > 0);
    }

    #[test]
    fn start_has_offset_and_trimmed_fraction() {
        let mut out = Vec::new();
        // 2026-07-14T13:03:17.482Z in UTC
        let ms = crate::timefmt::parse_rfc3339("2026-07-14T13:03:17.482Z").unwrap();
        push_start(&mut out, ms, 9152);
        assert_eq!(out, b"2026-07-14T21:03:17.4829152+08:00");
        out.clear();
        push_start(&mut out, ms - 482 + 90, 1130);
        assert_eq!(out, b"2026-07-14T21:03:17.090113+08:00");
        out.clear();
        push_start(&mut out, ms - 482, 0);
        assert_eq!(out, b"2026-07-14T21:03:17+08:00");
    }

    #[test]
    fn strings_are_escaped_like_go() {
        let input = "R&D <x> \"q\" \\ \n\u{1} \u{2028} \u{1F680}";
        let mut out = Vec::new();
        push_str(&mut out, input);
        let expected =
            r#""R\u0026D \u003cx\u003e \"q\" \\ \n\u0001 \u2028 "#.to_owned() + "\u{1F680}\"";
        assert_eq!(String::from_utf8(out.clone()).unwrap(), expected);
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, input);
    }

    #[test]
    fn empty_model_sends_null_connections() {
        let mut m = SimModel::new(0, 5.0, 1, T0);
        m.tick(T0 + 1000);
        let buf = frame_bytes(&m);
        let v: Value = serde_json::from_slice(&buf).unwrap();
        assert!(v["connections"].is_null(), "{v}");
        assert!(String::from_utf8(buf)
            .unwrap()
            .contains("\"connections\":null"));
    }

    #[test]
    fn ids_persist_bytes_grow_and_churn_replaces_its_share() {
        let mut m = SimModel::new(2000, 5.0, 42, T0);
        let first = frame(&m);
        let mut seen: HashSet<String> = ids(&first).into_iter().collect();
        assert_eq!(seen.len(), 2000, "ids are unique");
        let mut prev = first;
        for step in 1..=4 {
            m.tick(T0 + step * 1000);
            let v = frame(&m);
            let before: std::collections::HashMap<&str, (u64, u64)> = prev["connections"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| (c["id"].as_str().unwrap(), up_down(c)))
                .collect();
            let (mut kept, mut heavy, mut idle) = (0, 0, 0);
            for c in v["connections"].as_array().unwrap() {
                let id = c["id"].as_str().unwrap();
                let (up, down) = up_down(c);
                match before.get(id) {
                    Some(&(u0, d0)) => {
                        kept += 1;
                        assert!(up > u0 && down > d0, "bytes of {id} did not move");
                        heavy += (down - d0 > 250_000) as usize;
                        idle += (down - d0 < 3_000) as usize;
                    }
                    None => assert!(seen.insert(id.to_owned()), "id {id} reused"),
                }
            }
            // Varying rates: mostly light connections, a few heavy downloads.
            assert!(
                (1..=100).contains(&heavy),
                "{heavy} heavy downloads of {kept}"
            );
            assert!(idle > kept / 2, "{idle} light connections of {kept}");
            // 5 % of 2000 = 100 replacements per second; a few may hit the same slot twice.
            let replaced = 2000 - kept;
            assert!((90..=100).contains(&replaced), "replaced {replaced}");
            assert_eq!(v["connections"].as_array().unwrap().len(), 2000);
            assert!(v["downloadTotal"].as_u64() > prev["downloadTotal"].as_u64());
            assert!(v["uploadTotal"].as_u64() > prev["uploadTotal"].as_u64());
            prev = v;
        }
        // Fractional churn accumulates: 0.5 %/s of 2000 = 10 per second, in 100 ms ticks.
        let mut m = SimModel::new(2000, 0.5, 3, T0);
        let start: HashSet<String> = m.counters().into_iter().map(|c| c.0).collect();
        for i in 1..=10 {
            m.tick(T0 + i * 100);
        }
        let gone = m
            .counters()
            .iter()
            .filter(|c| !start.contains(&c.0))
            .count();
        assert!((9..=10).contains(&gone), "replaced {gone}");
    }

    #[test]
    fn same_seed_same_frames() {
        let mut a = SimModel::new(300, 2.0, 9, T0);
        let mut b = SimModel::new(300, 2.0, 9, T0);
        a.tick(T0 + 1500);
        b.tick(T0 + 1500);
        assert_eq!(frame_bytes(&a), frame_bytes(&b));
        let c = SimModel::new(300, 2.0, 10, T0);
        assert_ne!(ids(&frame(&c)), ids(&frame(&a)));
    }

    #[test]
    fn ten_thousand_connections_make_a_mihomo_sized_frame() {
        let mut m = SimModel::new(10_000, 1.0, 1, T0);
        m.tick(T0 + 1000);
        let buf = frame_bytes(&m);
        let per_conn = buf.len() / 10_000;
        assert!(
            (600..=1000).contains(&per_conn),
            "{per_conn} bytes per connection"
        );
        let v: Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["connections"].as_array().unwrap().len(), 10_000);
    }

    #[test]
    fn query_parsing() {
        assert_eq!(parse_interval(""), Pushes::Every(1000));
        assert_eq!(parse_interval("interval=250"), Pushes::Every(250));
        assert_eq!(parse_interval("token=x&interval=0"), Pushes::Once);
        assert_eq!(parse_interval("interval=-5"), Pushes::Once);
        assert_eq!(parse_interval("interval=1s"), Pushes::Never);
        assert_eq!(percent_decode_lenient("a%20b+c%2F%zz%4"), "a b c/%zz%4");
    }

    type Client = tungstenite::WebSocket<TcpStream>;

    fn connect(
        addr: SocketAddr,
        path_query: &str,
        bearer: Option<&str>,
    ) -> std::result::Result<Client, tungstenite::Error> {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut req = tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://{addr}{path_query}"
        ))
        .unwrap();
        if let Some(t) = bearer {
            req.headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        tungstenite::client(req, stream)
            .map(|(ws, _)| ws)
            .map_err(|e| match e {
                tungstenite::HandshakeError::Failure(e) => e,
                tungstenite::HandshakeError::Interrupted(_) => panic!("interrupted handshake"),
            })
    }

    fn next_frame(ws: &mut Client) -> Value {
        match ws.read().expect("a frame before the read timeout") {
            Message::Text(t) => serde_json::from_str(t.as_str()).expect("frame is JSON"),
            other => panic!("unexpected message {other:?}"),
        }
    }

    fn sim(connections: usize, churn_percent: f64, secret: Option<&str>) -> Simulator {
        start(SimConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            connections,
            churn_percent,
            secret: secret.map(str::to_owned),
            seed: 5,
        })
        .unwrap()
    }

    #[test]
    fn serves_frames_over_websocket_and_ids_persist() {
        let s = sim(40, 0.0, None);
        let mut ws = connect(s.addr(), "/connections?interval=50", None).unwrap();
        let a = next_frame(&mut ws);
        let b = next_frame(&mut ws);
        let c = next_frame(&mut ws);
        assert_eq!(ids(&a).len(), 40);
        assert_eq!(ids(&a), ids(&b));
        assert_eq!(ids(&b), ids(&c));
        assert!(c["downloadTotal"].as_u64() > a["downloadTotal"].as_u64());
        // A second client shares the same model.
        let mut ws2 = connect(s.addr(), "/connections", None).unwrap();
        assert_eq!(ids(&next_frame(&mut ws2)), ids(&a));
        s.stop();
        // After stop the server closes: the client sees the end of the stream, not a timeout.
        let mut ended = false;
        for _ in 0..100 {
            match ws.read() {
                Ok(Message::Text(_)) => continue,
                Ok(_) | Err(_) => {
                    ended = true;
                    break;
                }
            }
        }
        assert!(ended);
    }

    #[test]
    fn secret_is_checked_before_the_upgrade() {
        let secret = "s3 cr&t/+";
        let s = sim(3, 0.0, Some(secret));
        for (path, bearer) in [
            ("/connections", None),
            ("/connections?token=wrong", None),
            ("/connections", Some("wrong")),
        ] {
            match connect(s.addr(), path, bearer) {
                Err(tungstenite::Error::Http(resp)) => {
                    assert_eq!(resp.status(), 401);
                    assert_eq!(
                        resp.body().as_deref(),
                        Some(&b"{\"message\":\"Unauthorized\"}"[..])
                    );
                }
                Err(e) => panic!("{path}: expected a 401, got {e}"),
                Ok(_) => panic!("{path}: accepted without the secret"),
            }
        }
        let mut ws = connect(s.addr(), "/connections?token=s3%20cr%26t%2F%2B", None).unwrap();
        assert_eq!(ids(&next_frame(&mut ws)).len(), 3);
        let mut ws = connect(s.addr(), "/connections", Some(secret)).unwrap();
        assert_eq!(ids(&next_frame(&mut ws)).len(), 3);
        match connect(s.addr(), "/traffic", Some(secret)) {
            Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 404),
            other => panic!("expected 404, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn refuses_negative_churn() {
        let err = start(SimConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            connections: 1,
            churn_percent: -1.0,
            secret: None,
            seed: 1,
        })
        .err()
        .expect("negative churn refused")
        .to_string();
        assert!(
            err.contains("--churn-percent") && err.contains("-1"),
            "{err}"
        );
    }

    /// Nothing arrives on `ws` for 400 ms.
    fn assert_silent(ws: &mut Client) {
        ws.get_mut()
            .set_read_timeout(Some(Duration::from_millis(400)))
            .unwrap();
        match ws.read() {
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }

    #[test]
    fn zero_interval_sends_one_frame_and_stays_open() {
        let s = sim(2, 0.0, None);
        let mut ws = connect(s.addr(), "/connections?interval=0", None).unwrap();
        assert_eq!(ids(&next_frame(&mut ws)).len(), 2);
        assert_silent(&mut ws);
        let mut ws = connect(s.addr(), "/connections?interval=1s", None).unwrap();
        assert_silent(&mut ws);
    }

    #[test]
    fn pause_holds_the_model_still() {
        let s = sim(10, 50.0, None);
        let mut ws = connect(s.addr(), "/connections?interval=20", None).unwrap();
        next_frame(&mut ws);
        s.set_paused(true);
        // A frame already in flight may still arrive: drain until the socket is quiet for 300 ms.
        ws.get_mut()
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        while ws.read().is_ok() {}
        let before = s.model().totals();
        assert!(ws.read().is_err(), "a push while paused");
        assert_eq!(s.model().totals(), before);
        s.set_paused(false);
    }
}
