//! A scripted fake of mihomo's `/connections` WebSocket on 127.0.0.1:0.
//!
//! The test decides every push: [`FakeMihomo::push`] sends one frame to the connected client,
//! [`FakeMihomo::drop_client`] cuts the socket without a close frame (a lost stream). Handshakes are
//! reported as events so tests wait on them instead of sleeping. With a secret, the upgrade needs
//! `?token=` or `Authorization: Bearer`, as in mihomo; otherwise `401 {"message":"Unauthorized"}`.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::Message;

/// What the fake saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A client completed the upgrade; the request URI.
    Connected(String),
    /// A client was refused with 401.
    Unauthorized,
    /// A push was written to the client's socket.
    Pushed,
}

enum Cmd {
    Push(String),
    Binary(Vec<u8>),
    /// Bytes written straight to the socket (a hand-made frame header), then this many zero bytes.
    Raw(Vec<u8>, usize),
    Drop,
}

pub struct FakeMihomo {
    pub addr: SocketAddr,
    cmds: Sender<Cmd>,
    events: Receiver<Event>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn token_ok(req: &Request, secret: &str) -> bool {
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(|v| v == format!("Bearer {secret}"));
    let query = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .any(|kv| kv.strip_prefix("token=").map(decode).as_deref() == Some(secret));
    bearer == Some(true) || query
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FakeMihomo {
    pub fn start(secret: Option<&str>) -> FakeMihomo {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (cmd_tx, cmd_rx) = channel::<Cmd>();
        let (ev_tx, ev_rx) = channel::<Event>();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let secret = secret.map(str::to_string);
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                let stream = match listener.accept() {
                    Ok((s, _)) => s,
                    Err(_) => {
                        // nobody yet: the listener does not block, so that the stop flag is seen
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                stream.set_nonblocking(false).unwrap();
                stream
                    .set_write_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut uri = String::new();
                let secret = secret.clone();
                // tungstenite's callback type fixes the large error type
                #[allow(clippy::result_large_err)]
                let accepted = tungstenite::accept_hdr(stream, |req: &Request, resp: Response| {
                    uri = req.uri().to_string();
                    match &secret {
                        Some(s) if !token_ok(req, s) => {
                            let mut e = ErrorResponse::new(Some(
                                r#"{"message":"Unauthorized"}"#.to_string(),
                            ));
                            *e.status_mut() = tungstenite::http::StatusCode::UNAUTHORIZED;
                            Err(e)
                        }
                        _ => Ok(resp),
                    }
                });
                let mut ws = match accepted {
                    Ok(ws) => ws,
                    Err(_) => {
                        let _ = ev_tx.send(Event::Unauthorized);
                        continue;
                    }
                };
                let _ = ev_tx.send(Event::Connected(uri));
                let _ = ws
                    .get_ref()
                    .set_read_timeout(Some(Duration::from_millis(5)));
                loop {
                    // mihomo never reads, but noticing a client that went away lets the next one in
                    match ws.read() {
                        Err(tungstenite::Error::Io(e))
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Ok(Message::Close(_)) | Err(_) => break,
                        Ok(_) => {}
                    }
                    match cmd_rx.recv_timeout(Duration::from_millis(20)) {
                        Ok(Cmd::Push(frame)) => {
                            if ws.send(Message::text(frame)).is_err() {
                                break;
                            }
                            let _ = ev_tx.send(Event::Pushed);
                        }
                        Ok(Cmd::Binary(data)) => {
                            if ws.send(Message::binary(data)).is_err() {
                                break;
                            }
                            let _ = ev_tx.send(Event::Pushed);
                        }
                        Ok(Cmd::Raw(head, zeros)) => {
                            use std::io::Write;
                            let sock = ws.get_mut();
                            let mut ok = sock.write_all(&head).is_ok();
                            let chunk = vec![0u8; 64 * 1024];
                            let mut left = zeros;
                            while ok && left > 0 {
                                let n = left.min(chunk.len());
                                ok = sock.write_all(&chunk[..n]).is_ok();
                                left -= n;
                            }
                            let _ = ev_tx.send(Event::Pushed);
                            if !ok {
                                break;
                            }
                        }
                        Ok(Cmd::Drop) => break,
                        Err(RecvTimeoutError::Timeout) if !stop2.load(Ordering::Relaxed) => {}
                        Err(_) => return,
                    }
                }
            }
        });
        FakeMihomo {
            addr,
            cmds: cmd_tx,
            events: ev_rx,
            stop,
            thread: Some(thread),
        }
    }

    /// Queues one push; it is sent as soon as a client is connected.
    pub fn push(&self, frame: impl Into<String>) {
        self.cmds.send(Cmd::Push(frame.into())).unwrap();
        self.expect(|e| *e == Event::Pushed, "push written");
    }

    /// Queues one binary push.
    pub fn push_binary(&self, data: Vec<u8>) {
        self.cmds.send(Cmd::Binary(data)).unwrap();
        self.expect(|e| *e == Event::Pushed, "binary push written");
    }

    /// Writes `head` and then `zeros` zero bytes straight to the client's socket (stops early when the
    /// client hangs up): hand-made frames the WebSocket library would not send.
    pub fn push_raw(&self, head: Vec<u8>, zeros: usize) {
        self.cmds.send(Cmd::Raw(head, zeros)).unwrap();
        self.expect(|e| *e == Event::Pushed, "raw bytes written");
    }

    /// Cuts the current client's socket without a close frame.
    pub fn drop_client(&self) {
        self.cmds.send(Cmd::Drop).unwrap();
    }

    /// Waits (at most 20 s) for an event matching `want`, skipping others; returns it.
    pub fn expect(&self, want: impl Fn(&Event) -> bool, what: &str) -> Event {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) if want(&e) => return e,
                Ok(_) => {}
                Err(_) => panic!("fake mihomo: timed out waiting for {what}"),
            }
        }
    }

    /// Waits for a client to connect; returns the request URI.
    pub fn wait_connected(&self) -> String {
        match self.expect(|e| matches!(e, Event::Connected(_)), "a client to connect") {
            Event::Connected(uri) => uri,
            _ => unreachable!(),
        }
    }
}

impl Drop for FakeMihomo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A mihomo-shaped frame. Each connection: (id, upload, download, host); all started a second ago.
pub fn frame(totals: u64, conns: &[(&str, u64, u64, &str)]) -> String {
    let start = mihomo_connections_tracker::timefmt::format_rfc3339(
        mihomo_connections_tracker::timefmt::now_ms() - 1000,
        true,
    );
    if conns.is_empty() {
        return format!(
            r#"{{"downloadTotal":{totals},"uploadTotal":{totals},"connections":null,"memory":0}}"#
        );
    }
    let list: Vec<String> = conns
        .iter()
        .map(|(id, up, down, host)| {
            format!(
                r#"{{"id":"{id}","metadata":{{"network":"tcp","type":"HTTPS","sourceIP":"192.168.1.20","destinationIP":"203.0.113.7","sourceGeoIP":null,"destinationGeoIP":["us"],"sourceIPASN":"","destinationIPASN":"","sourcePort":"50000","destinationPort":"443","inboundIP":"127.0.0.1","inboundPort":"7890","inboundName":"DEFAULT-MIXED","inboundUser":"","rematchName":"","host":"{host}","dnsMode":"normal","uid":0,"process":"curl","processPath":"/usr/bin/curl","specialProxy":"","specialRules":"","remoteDestination":"","dscp":0,"sniffHost":""}},"upload":{up},"download":{down},"start":"{start}","chains":["HK-01","Proxy"],"providerChains":["",""],"rule":"DomainSuffix","rulePayload":"example.com"}}"#
            )
        })
        .collect();
    format!(
        r#"{{"downloadTotal":{totals},"uploadTotal":{totals},"connections":[{}],"memory":0}}"#,
        list.join(",")
    )
}
