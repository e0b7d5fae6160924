//! The built-in dashboard in a real browser: a master filled by the fake mihomo with known numbers, headless
//! Chromium driven by chromedriver over the W3C WebDriver HTTP protocol (ureq + serde_json), on loopback.
//! It needs the Debian packages `chromium` and `chromium-driver` (`make test` installs them); without them
//! it fails, saying so, rather than passing without having looked.

use crate::fake_mihomo::FakeMihomo;
use crate::support::*;
use mihomo_connections_tracker::app;
use mihomo_connections_tracker::timefmt::{format_rfc3339, now_ms};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const CHROMIUM: &str = "/usr/bin/chromium";
const TOKEN: &str = "dash-t0ken";
const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// One connection of the fake's frames.
struct Conn {
    id: &'static str,
    up: u64,
    down: u64,
    host: &'static str,
    src: &'static str,
    node: &'static str,
    policy: &'static str,
    rule: &'static str,
    payload: &'static str,
}

/// Known numbers. `a` stays open; `b` and `c` close. Totals: 3 connections, download 12 MiB, upload
/// 1.75 MiB, total 13.75 MiB. video.example (a, c): 2 connections, 10.75 MiB (9.5 MiB down, 1.25 MiB up);
/// news.example (b): 3 MiB.
const A: Conn = Conn {
    id: "a",
    up: MIB,
    down: 8 * MIB,
    host: "video.example",
    src: "192.168.1.20",
    node: "HK-01",
    policy: "Proxy",
    rule: "DomainSuffix",
    payload: "example",
};
const B: Conn = Conn {
    id: "b",
    up: 512 * KIB,
    down: 2 * MIB + 512 * KIB,
    host: "news.example",
    src: "192.168.1.21",
    node: "DIRECT",
    policy: "DIRECT",
    rule: "Match",
    payload: "",
};
const C: Conn = Conn {
    id: "c",
    up: 256 * KIB,
    down: MIB + 512 * KIB,
    host: "video.example",
    src: "192.168.1.21",
    node: "JP-02",
    policy: "Proxy",
    rule: "DomainSuffix",
    payload: "example",
};

/// A mihomo-shaped frame (chains in mihomo's order: exit node first, policy group last).
fn frame(totals: u64, conns: &[&Conn], start: &str) -> String {
    let list: Vec<Value> = conns
        .iter()
        .map(|c| {
            json!({
                "id": c.id,
                "metadata": {
                    "network": "tcp", "type": "HTTPS", "sourceIP": c.src, "destinationIP": "203.0.113.7",
                    "sourceGeoIP": null, "destinationGeoIP": ["us"], "sourceIPASN": "", "destinationIPASN": "",
                    "sourcePort": "50000", "destinationPort": "443", "inboundIP": "127.0.0.1",
                    "inboundPort": "7890", "inboundName": "DEFAULT-MIXED", "inboundUser": "", "rematchName": "",
                    "host": c.host, "dnsMode": "normal", "uid": 0, "process": "curl",
                    "processPath": "/usr/bin/curl", "specialProxy": "", "specialRules": "",
                    "remoteDestination": "", "dscp": 0, "sniffHost": ""
                },
                "upload": c.up, "download": c.down, "start": start,
                "chains": [c.node, c.policy], "providerChains": ["", ""],
                "rule": c.rule, "rulePayload": c.payload
            })
        })
        .collect();
    json!({"downloadTotal": totals, "uploadTotal": totals, "connections": list, "memory": 0})
        .to_string()
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// chromedriver with one browser session; on drop (also on panic) the session is deleted, which quits
/// Chromium, and chromedriver's whole process group is killed in case anything was left behind.
struct Browser {
    driver: Child,
    base: String,
    session: Option<String>,
    http: ureq::Agent,
    _profile: TempDir,
}

impl Browser {
    fn start() -> Browser {
        let driver_bin = which("chromedriver");
        if driver_bin.is_none() || !Path::new(CHROMIUM).is_file() {
            panic!(
                "the dashboard test needs headless Chromium and chromedriver ({CHROMIUM}, chromedriver on PATH); \
                 `make test` installs them (apt-get install -y chromium chromium-driver)"
            );
        }
        // A free loopback port for chromedriver (it has no "port 0" of its own).
        let port = free_port();
        let profile = TempDir::new("chromium-profile");
        let mut cmd = Command::new(driver_bin.unwrap());
        cmd.arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group, so that Chromium and its helpers can be killed with it by id.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = cmd.spawn().expect("start chromedriver");
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let mut b = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: None,
            http,
            _profile: profile,
        };
        wait_for("chromedriver to be ready", || {
            b.call("GET", "/status", None)
                .ok()
                .filter(|v| v["ready"] == true)
        });
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--window-size=1280,2400",
                    format!("--user-data-dir={}", b._profile.0.display()),
                ]
            }
        }}});
        let v = b
            .call("POST", "/session", Some(caps))
            .unwrap_or_else(|e| panic!("cannot start a Chromium session: {e}"));
        b.session = Some(v["sessionId"].as_str().unwrap().to_string());
        b
    }

    /// One WebDriver command; its `value`, or the error it answered.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let resp = match body {
            Some(b) => self
                .http
                .post(&url)
                .header("Content-Type", "application/json")
                .send(b.to_string().as_bytes()),
            None if method == "DELETE" => self.http.delete(&url).call(),
            None => self.http.get(&url).call(),
        };
        let mut resp = resp.map_err(|e| format!("{method} {path}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| format!("{method} {path}: {e}: {text}"))?;
        if status != 200 {
            return Err(format!("{method} {path}: {status} {}", v["value"]));
        }
        Ok(v["value"].clone())
    }

    /// A command on the session; panics on error.
    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let s = self.session.as_deref().unwrap();
        self.call(method, &format!("/session/{s}{path}"), body)
            .unwrap_or_else(|e| panic!("webdriver: {e}"))
    }

    /// Element references matching a CSS selector.
    fn find_all(&self, css: &str) -> Vec<String> {
        let v = self.cmd(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_array()
            .unwrap()
            .iter()
            // {"element-6066-...": id}: the one value of the object
            .map(|e| {
                e.as_object()
                    .unwrap()
                    .values()
                    .next()
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    /// The rendered text of an element; `None` when the page replaced it meanwhile.
    fn text(&self, element: &str) -> Option<String> {
        let s = self.session.as_deref().unwrap();
        self.call("GET", &format!("/session/{s}/element/{element}/text"), None)
            .ok()
            .map(|v| v.as_str().unwrap_or("").to_string())
    }

    fn attribute(&self, css: &str, name: &str) -> Option<String> {
        let s = self.session.as_deref().unwrap();
        let e = self.find_all(css).into_iter().next()?;
        self.call(
            "GET",
            &format!("/session/{s}/element/{e}/attribute/{name}"),
            None,
        )
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
    }

    /// The texts of every element matching `css`.
    fn texts(&self, css: &str) -> Vec<String> {
        self.find_all(css)
            .iter()
            .filter_map(|e| self.text(e))
            .collect()
    }

    /// Waits (at most 20 s) until the texts of `css` satisfy `pred`; returns them.
    fn wait_texts(&self, what: &str, css: &str, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        wait_until(what, WAIT, Duration::from_millis(50), || {
            let texts = self.texts(css);
            if pred(&texts) {
                Ok(texts)
            } else {
                Err(PageSeen {
                    browser: self,
                    css,
                    texts,
                })
            }
        })
    }

    fn click(&self, element: &str) {
        self.cmd(
            "POST",
            &format!("/element/{element}/click"),
            Some(json!({})),
        );
    }

    /// Clicks the first element matching `css` whose text contains `needle`.
    fn click_text(&self, css: &str, needle: &str) {
        let e = wait_for(&format!("{css} containing {needle}"), || {
            self.find_all(css)
                .into_iter()
                .find(|e| self.text(e).is_some_and(|t| t.contains(needle)))
        });
        self.click(&e);
    }

    fn screenshot(&self, file: &Path) {
        self.try_screenshot(file)
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
    }

    fn try_screenshot(&self, file: &Path) -> Result<(), String> {
        let s = self.session.as_deref().unwrap();
        let b64 = self.call("GET", &format!("/session/{s}/screenshot"), None)?;
        let png = base64_decode(b64.as_str().unwrap_or(""));
        if !png.starts_with(b"\x89PNG") {
            return Err("not a PNG".into());
        }
        std::fs::create_dir_all(file.parent().unwrap()).map_err(|e| e.to_string())?;
        std::fs::write(file, png).map_err(|e| e.to_string())
    }

    /// The browser console since the last call (Chromium's log endpoint).
    fn console(&self) -> Result<Vec<Value>, String> {
        let s = self.session.as_deref().unwrap();
        let v = self.call(
            "POST",
            &format!("/session/{s}/se/log"),
            Some(json!({"type": "browser"})),
        )?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = self.call("DELETE", &format!("/session/{s}"), None);
        }
        let pid = self.driver.id();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        // Whatever Chromium left in the group (the group id is chromedriver's pid, see `start`).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
    }
}

/// What the page showed when a wait timed out. Formatted once, for the message: it saves a screenshot
/// and reads the browser console as evidence (their own failures must not hide the timeout itself).
struct PageSeen<'a> {
    browser: &'a Browser,
    css: &'a str,
    texts: Vec<String>,
}

impl std::fmt::Display for PageSeen<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let _ = self
            .browser
            .try_screenshot(&screenshot_path("dashboard-failure.png"));
        let log = self.browser.console();
        write!(
            f,
            "{} shows {:?} (see target/dashboard-failure.png); browser console: {log:?}",
            self.css, self.texts
        )
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        acc = (acc << 6) | val(c) as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// Row `i` of `rows` contains every one of `needles`.
#[track_caller]
fn assert_row(rows: &[String], i: usize, needles: &[&str]) {
    assert!(needles.iter().all(|n| rows[i].contains(n)), "{rows:?}");
}

fn screenshot_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(name)
}

#[test]
fn dashboard_shows_known_numbers_and_filters_by_a_clicked_host() {
    let dir = TempDir::new("dash");
    let db = dir.path("t.db");
    let fake = FakeMihomo::start(None);
    let mut cfg = master_config(&db, Some((fake.addr, None)));
    cfg.api_token = Some(TOKEN.into());
    let running = app::start_master(&cfg).unwrap();
    fake.wait_connected();
    let start = format_rfc3339(now_ms() - 1000, true);
    fake.push(frame(100, &[&A, &B, &C], &start));
    fake.push(frame(200, &[&A], &start));
    wait_stored(&db, "a open, b and c closed, every byte stored", |r| {
        r.len() == 3
            && r[0].end_ms.is_none()
            && r[1].end_ms.is_some()
            && r[2].end_ms.is_some()
            && r.iter().map(|x| x.traffic_down).sum::<i64>() == 12 * MIB as i64
    });
    let url = format!("http://{}/", running.api_addr().unwrap());

    let b = Browser::start();
    b.cmd("POST", "/url", Some(json!({ "url": url })));
    // The API answers 401 without the token: the page asks for it once.
    let field = wait_for("the token form", || {
        b.find_all("#login:not([hidden]) #token").pop()
    });
    b.cmd(
        "POST",
        &format!("/element/{field}/value"),
        Some(json!({ "text": TOKEN })),
    );
    b.click(&b.find_all("#login button").pop().unwrap());

    // Totals of the default range (24 h) and the exact bytes behind them.
    b.wait_texts("totals", "#totals b", |t| {
        t == ["13.8 MiB", "12.0 MiB", "1.75 MiB", "3"]
    });
    assert_eq!(
        b.attribute("#t-total", "title").as_deref(),
        Some("14,417,920 bytes")
    );
    let hosts = b.wait_texts("top hosts", "#g-host tr.pick", |t| t.len() == 2);
    assert_row(&hosts, 0, &["video.example", "2", "10.8 MiB"]);
    assert_row(&hosts, 1, &["news.example", "3.00 MiB"]);
    let nodes = b.wait_texts("exit nodes", "#g-node tr.pick", |t| t.len() == 3);
    assert_row(&nodes, 0, &["HK-01", "9.00 MiB"]);
    let devices = b.wait_texts("devices", "#g-source_ip tr.pick", |t| t.len() == 2);
    assert_row(&devices, 1, &["192.168.1.21", "4.75 MiB"]);
    b.wait_texts("policies", "#g-policy tr.pick", |t| t.len() == 2);
    let rules = b.wait_texts("rules", "#g-rule tr.pick", |t| t.len() == 2);
    assert_row(&rules, 0, &["DomainSuffix (example)"]);
    // 24 hourly bars, the current hour last and holding every byte.
    b.wait_texts("24 bars", "#chart g.bar", |t| t.len() == 24);
    assert_eq!(b.attribute("#chart", "data-points").as_deref(), Some("24"));
    assert_eq!(
        b.attribute("#chart", "data-total").as_deref(),
        Some("14417920"),
        "the bars add up to the total"
    );
    // Live: a is open; history: b and c.
    let open = b.wait_texts("open connections", "#open tr", |t| t.len() == 2);
    assert_row(&open, 1, &["video.example:443", "HK-01"]);
    b.wait_texts("history", "#hist tr", |t| t.len() == 3);
    b.wait_texts("history count", "#hist-count", |t| t == ["2 closed"]);
    b.screenshot(&screenshot_path("dashboard.png"));

    // The 1 h preset: 60 minute bars, same numbers (everything happened in the last minutes).
    b.click(&b.find_all("#ranges button[data-range='1h']").pop().unwrap());
    b.wait_texts("60 bars", "#chart g.bar", |t| t.len() == 60);
    b.wait_texts("totals over 1 h", "#t-count", |t| t == ["3"]);

    // Clicking a host filters everything by it.
    b.click_text("#g-host tr.pick", "video.example");
    b.wait_texts("totals of video.example", "#totals b", |t| {
        t == ["10.8 MiB", "9.50 MiB", "1.25 MiB", "2"]
    });
    b.wait_texts("the filter chip", "#chips .chip", |t| {
        t == ["host: video.example"]
    });
    b.wait_texts("one host left", "#g-host tr.pick", |t| t.len() == 1);
    b.wait_texts("its devices", "#g-source_ip tr.pick", |t| t.len() == 2);
    b.wait_texts("its closed connection", "#hist-count", |t| {
        t == ["1 closed"]
    });
    b.screenshot(&screenshot_path("dashboard-filtered.png"));

    // Removing the chip brings the whole picture back.
    b.click(&b.find_all("#chips .chip").pop().unwrap());
    b.wait_texts("totals unfiltered", "#t-count", |t| t == ["3"]);
    b.wait_texts("no chips", "#chips .chip", |t| t.is_empty());

    // Searching the history.
    let search = b.find_all("#search").pop().unwrap();
    b.cmd(
        "POST",
        &format!("/element/{search}/value"),
        Some(json!({ "text": "news" })),
    );
    // (the table may still show the filtered view for a moment: wait for the search's own answer)
    let hist = b.wait_texts("history search", "#hist tr", |t| {
        t.len() == 2 && t[1].contains("news.example")
    });
    assert_row(&hist, 1, &["news.example:443"]);
    b.wait_texts("history search count", "#hist-count", |t| t == ["1 closed"]);

    // The token is kept: a reload does not ask again.
    b.cmd("POST", "/refresh", Some(json!({})));
    b.wait_texts("totals after a reload", "#t-count", |t| t == ["3"]);
    assert!(
        b.find_all("#login:not([hidden])").is_empty(),
        "no second token prompt"
    );

    // A phone-sized window.
    b.cmd(
        "POST",
        "/window/rect",
        Some(json!({"width": 390, "height": 2400})),
    );
    b.screenshot(&screenshot_path("dashboard-phone.png"));

    // No script error and nothing the CSP blocked; only the expected 401s of the first load.
    let problems: Vec<Value> = b
        .console()
        .unwrap()
        .into_iter()
        .filter(|e| {
            e["level"] == "SEVERE"
                || e["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("Content Security Policy")
        })
        .filter(|e| {
            !e["message"]
                .as_str()
                .unwrap_or("")
                .contains("status of 401")
        })
        .collect();
    assert!(problems.is_empty(), "browser console: {problems:?}");

    drop(b);
    running.shutdown().unwrap();
}
