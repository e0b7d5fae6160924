//! Parsing one push of mihomo's `/connections` (also sing-box's and old Clash's) into a [`Snapshot`].
//!
//! Built for speed and for hostile input. Every push is a full snapshot (7.6 MB for 10,000 connections) and
//! almost every connection in it is already known, so a connection's `metadata`, `chains` and friends are kept
//! as borrowed raw JSON and only decoded ([`Entry::meta`]) the first time an id is seen. Nothing is trusted:
//! missing keys take defaults, unknown keys are ignored, a value of the wrong type (`"upload": "12"`, a number
//! for a string) is converted when that makes sense and defaulted otherwise, and a malformed connection is
//! skipped and counted instead of dropping the whole frame. Only a frame that is not JSON at all, or whose
//! `connections` is neither an array nor `null`, is refused.

use crate::error::{Error, Result};
use crate::model::{Bytes, ConnMeta};
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// One push, borrowing from the frame's bytes.
#[derive(Debug, Default)]
pub struct Snapshot<'a> {
    /// `downloadTotal`: monotonic for the life of the core; a drop means it restarted.
    pub download_total: Option<u64>,
    /// `uploadTotal`, likewise.
    pub upload_total: Option<u64>,
    /// The connections with a usable id, in frame order (duplicates possible: the diff handles them).
    pub connections: Vec<Entry<'a>>,
    /// Connections skipped because they had no usable id or were not objects.
    pub skipped: usize,
}

/// One connection of a snapshot: its id and counters, the rest still raw.
#[derive(Debug, Default)]
pub struct Entry<'a> {
    pub id: Cow<'a, str>,
    pub bytes: Bytes,
    raw: RawRest<'a>,
}

/// What [`Entry::meta`] decodes later. Only these are kept per connection (not the raw id and counters):
/// a frame's entries are as many as its connections, and this keeps them small (memory).
#[derive(Debug, Default)]
struct RawRest<'a> {
    metadata: Option<&'a RawValue>,
    start: Option<&'a RawValue>,
    chains: Option<&'a RawValue>,
    provider_chains: Option<&'a RawValue>,
    rule: Option<&'a RawValue>,
    rule_payload: Option<&'a RawValue>,
}

#[derive(Debug, Default)]
struct RawEntry<'a> {
    id: Option<&'a RawValue>,
    upload: Option<&'a RawValue>,
    download: Option<&'a RawValue>,
    metadata: Option<&'a RawValue>,
    start: Option<&'a RawValue>,
    chains: Option<&'a RawValue>,
    provider_chains: Option<&'a RawValue>,
    rule: Option<&'a RawValue>,
    rule_payload: Option<&'a RawValue>,
    valid: bool,
}

/// Decodes a connection object field by field; anything that is not an object becomes an invalid entry
/// instead of an error, so one bad connection cannot sink the frame.
impl<'de: 'a, 'a> Deserialize<'de> for RawEntry<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = RawEntry<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a connection object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut e = RawEntry {
                    valid: true,
                    ..RawEntry::default()
                };
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    let slot = match key.as_ref() {
                        "id" => &mut e.id,
                        "upload" => &mut e.upload,
                        "download" => &mut e.download,
                        "metadata" => &mut e.metadata,
                        "start" => &mut e.start,
                        "chains" => &mut e.chains,
                        "providerChains" => &mut e.provider_chains,
                        "rule" => &mut e.rule,
                        "rulePayload" => &mut e.rule_payload,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Some(map.next_value::<&'de RawValue>()?);
                }
                Ok(e)
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(RawEntry::default())
            }
            fn visit_str<E>(self, _: &str) -> std::result::Result<Self::Value, E> {
                Ok(RawEntry::default())
            }
            fn visit_u64<E>(self, _: u64) -> std::result::Result<Self::Value, E> {
                Ok(RawEntry::default())
            }
            fn visit_i64<E>(self, _: i64) -> std::result::Result<Self::Value, E> {
                Ok(RawEntry::default())
            }
            fn visit_f64<E>(self, _: f64) -> std::result::Result<Self::Value, E> {
                Ok(RawEntry::default())
            }
            fn visit_bool<E>(self, _: bool) -> std::result::Result<Self::Value, E> {
                Ok(RawEntry::default())
            }
            fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
                Ok(RawEntry::default())
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "downloadTotal", borrow, default)]
    download_total: Option<&'a RawValue>,
    #[serde(rename = "uploadTotal", borrow, default)]
    upload_total: Option<&'a RawValue>,
    #[serde(borrow, default)]
    connections: Option<Connections<'a>>,
}

/// The `connections` array, turned into [`Entry`]s as it is read: one vector, not a vector of raw entries
/// and then another of entries (memory: a 10,000-connection frame has 10,000 of them).
#[derive(Default)]
struct Connections<'a> {
    list: Vec<Entry<'a>>,
    skipped: usize,
}

impl<'de: 'a, 'a> Deserialize<'de> for Connections<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Connections<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of connections")
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut c = Connections::default();
                while let Some(e) = seq.next_element::<RawEntry<'de>>()? {
                    match entry(e) {
                        Some(e) => c.list.push(e),
                        None => c.skipped += 1,
                    }
                }
                Ok(c)
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

/// The entry of a raw connection, `None` when it has no usable id.
fn entry(e: RawEntry<'_>) -> Option<Entry<'_>> {
    let id = if e.valid {
        e.id.map(text).unwrap_or_default()
    } else {
        Cow::Borrowed("")
    };
    if id.is_empty() || id.len() > 256 {
        return None;
    }
    let bytes = Bytes {
        upload: e.upload.and_then(number).unwrap_or(0),
        download: e.download.and_then(number).unwrap_or(0),
    };
    let raw = RawRest {
        metadata: e.metadata,
        start: e.start,
        chains: e.chains,
        provider_chains: e.provider_chains,
        rule: e.rule,
        rule_payload: e.rule_payload,
    };
    Some(Entry { id, bytes, raw })
}

/// Parses one frame. Errors only when the frame as a whole is unusable.
pub fn parse(frame: &[u8]) -> Result<Snapshot<'_>> {
    if frame.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Error::Frame(format!(
            "not a JSON object (frame of {} bytes)",
            frame.len()
        )));
    }
    // Checking UTF-8 once up front lets serde_json skip its per-string checks (its `StrRead` path).
    let utf8 = std::str::from_utf8(frame)
        .map_err(|e| Error::Frame(format!("not UTF-8: {e} (frame of {} bytes)", frame.len())))?;
    let raw: RawFrame = serde_json::from_str(utf8)
        .map_err(|e| Error::Frame(format!("{e} (frame of {} bytes)", frame.len())))?;
    let conns = raw.connections.unwrap_or_default();
    Ok(Snapshot {
        download_total: raw.download_total.and_then(number),
        upload_total: raw.upload_total.and_then(number),
        connections: conns.list,
        skipped: conns.skipped,
    })
}

/// A non-negative integer from a JSON number or numeric string; negatives and garbage are `None`.
fn number(raw: &RawValue) -> Option<u64> {
    let s = raw.get().trim();
    let s = s
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s);
    if let Ok(v) = s.parse::<u64>() {
        return Some(v);
    }
    match s.parse::<f64>() {
        Ok(f) if f.is_finite() && f >= 0.0 => Some(f.min(u64::MAX as f64) as u64),
        _ => None,
    }
}

fn signed(raw: Option<&RawValue>) -> i64 {
    raw.and_then(|r| {
        let s = r.get().trim();
        let s = s
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .unwrap_or(s);
        s.parse::<i64>().ok().or_else(|| {
            s.parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .map(|f| f as i64)
        })
    })
    .unwrap_or(0)
}

/// A string from a JSON string (borrowed when it has no escapes), or the literal text of a number or
/// boolean; `""` for null, objects and arrays.
fn text(raw: &RawValue) -> Cow<'_, str> {
    let s = raw.get();
    match s.as_bytes().first() {
        Some(b'"') => {
            let inner = &s[1..s.len() - 1];
            if inner.contains('\\') {
                serde_json::from_str::<String>(s)
                    .map(Cow::Owned)
                    .unwrap_or_default()
            } else {
                Cow::Borrowed(inner)
            }
        }
        Some(b'-' | b'0'..=b'9' | b't' | b'f') => Cow::Borrowed(s),
        _ => Cow::Borrowed(""),
    }
}

fn owned(raw: Option<&RawValue>) -> String {
    raw.map(|r| text(r).into_owned()).unwrap_or_default()
}

/// The strings of a JSON array (non-strings skipped); `None` when it is not an array.
fn strings(raw: Option<&RawValue>) -> Option<Vec<String>> {
    let values: Vec<&RawValue> = serde_json::from_str(raw?.get()).ok()?;
    Some(
        values
            .into_iter()
            .filter(|v| v.get().starts_with('"'))
            .map(|v| text(v).into_owned())
            .collect(),
    )
}

/// A geoip array as compact JSON text, `"null"` when absent or not an array.
fn geoip(raw: Option<&RawValue>) -> String {
    match strings(raw) {
        Some(list) => serde_json::to_string(&list).unwrap_or_else(|_| "null".into()),
        None => "null".into(),
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RawMeta<'a> {
    #[serde(borrow)]
    network: Option<&'a RawValue>,
    #[serde(borrow, rename = "type")]
    conn_type: Option<&'a RawValue>,
    #[serde(borrow, rename = "sourceIP")]
    source_ip: Option<&'a RawValue>,
    #[serde(borrow, rename = "destinationIP")]
    destination_ip: Option<&'a RawValue>,
    #[serde(borrow, rename = "sourceGeoIP")]
    source_geoip: Option<&'a RawValue>,
    #[serde(borrow, rename = "destinationGeoIP")]
    destination_geoip: Option<&'a RawValue>,
    #[serde(borrow, rename = "sourceIPASN")]
    source_ip_asn: Option<&'a RawValue>,
    #[serde(borrow, rename = "destinationIPASN")]
    destination_ip_asn: Option<&'a RawValue>,
    #[serde(borrow)]
    source_port: Option<&'a RawValue>,
    #[serde(borrow)]
    destination_port: Option<&'a RawValue>,
    #[serde(borrow, rename = "inboundIP")]
    inbound_ip: Option<&'a RawValue>,
    #[serde(borrow)]
    inbound_port: Option<&'a RawValue>,
    #[serde(borrow)]
    inbound_name: Option<&'a RawValue>,
    #[serde(borrow)]
    inbound_user: Option<&'a RawValue>,
    #[serde(borrow)]
    rematch_name: Option<&'a RawValue>,
    #[serde(borrow)]
    host: Option<&'a RawValue>,
    #[serde(borrow)]
    dns_mode: Option<&'a RawValue>,
    #[serde(borrow)]
    uid: Option<&'a RawValue>,
    #[serde(borrow)]
    process: Option<&'a RawValue>,
    #[serde(borrow)]
    process_path: Option<&'a RawValue>,
    #[serde(borrow)]
    special_proxy: Option<&'a RawValue>,
    #[serde(borrow)]
    special_rules: Option<&'a RawValue>,
    #[serde(borrow)]
    remote_destination: Option<&'a RawValue>,
    #[serde(borrow)]
    dscp: Option<&'a RawValue>,
    #[serde(borrow)]
    sniff_host: Option<&'a RawValue>,
}

impl Entry<'_> {
    /// Decodes everything else about the connection. `seen_ms` stands in for a missing or unreadable `start`.
    pub fn meta(&self, seen_ms: i64) -> ConnMeta {
        let r = &self.raw;
        let m: RawMeta = r
            .metadata
            .and_then(|m| serde_json::from_str(m.get()).ok())
            .unwrap_or_default();
        let start_ms = r
            .start
            .and_then(|s| crate::timefmt::parse_rfc3339(&text(s)))
            .filter(|&ms| crate::timefmt::clock_is_sane(ms))
            .unwrap_or(seen_ms);
        // mihomo: exit node first, the policy group the rule picked last. Stored the other way round, as the
        // earlier tool did.
        let mut chains = strings(r.chains).unwrap_or_default();
        let node = chains.first().cloned().unwrap_or_default();
        let policy = chains.last().cloned().unwrap_or_default();
        chains.reverse();
        let mut provider_chains = strings(r.provider_chains).unwrap_or_default();
        provider_chains.reverse();
        ConnMeta {
            id: self.id.to_string(),
            start_ms,
            network: owned(m.network),
            conn_type: owned(m.conn_type),
            source_ip: owned(m.source_ip),
            source_port: owned(m.source_port),
            destination_ip: owned(m.destination_ip),
            destination_port: owned(m.destination_port),
            source_geoip: geoip(m.source_geoip),
            destination_geoip: geoip(m.destination_geoip),
            source_ip_asn: owned(m.source_ip_asn),
            destination_ip_asn: owned(m.destination_ip_asn),
            inbound_ip: owned(m.inbound_ip),
            inbound_port: owned(m.inbound_port),
            inbound_name: owned(m.inbound_name),
            inbound_user: owned(m.inbound_user),
            host: owned(m.host),
            dns_mode: owned(m.dns_mode),
            uid: signed(m.uid),
            process: owned(m.process),
            process_path: owned(m.process_path),
            special_proxy: owned(m.special_proxy),
            special_rules: owned(m.special_rules),
            remote_destination: owned(m.remote_destination),
            dscp: signed(m.dscp),
            sniff_host: owned(m.sniff_host),
            rematch_name: owned(m.rematch_name),
            chains: serde_json::to_string(&chains).unwrap_or_else(|_| "[]".into()),
            provider_chains: serde_json::to_string(&provider_chains)
                .unwrap_or_else(|_| "[]".into()),
            node,
            policy,
            rule: owned(r.rule),
            rule_payload: owned(r.rule_payload),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FRAMES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/frames/");

    fn frame(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FRAMES}{name}")).expect("a frame in tests/frames")
    }

    #[test]
    fn mihomo_frame_every_field() {
        let data = frame("mihomo.wire.txt");
        let s = parse(&data).unwrap();
        assert_eq!(
            (s.download_total, s.upload_total, s.skipped),
            (Some(9866342711), Some(412580934), 0)
        );
        assert_eq!(s.connections.len(), 2);
        let e = &s.connections[0];
        assert_eq!(e.id, "3f0c6c2e-8b1d-4f5e-9a57-6b2d0e4c7a91");
        assert_eq!(
            e.bytes,
            Bytes {
                upload: 18342,
                download: 4718392
            }
        );
        let m = e.meta(0);
        assert_eq!(
            crate::timefmt::format_rfc3339(m.start_ms, true),
            "2026-07-14T13:03:17.482Z"
        );
        assert_eq!((m.network.as_str(), m.conn_type.as_str()), ("tcp", "HTTPS"));
        assert_eq!(
            (m.source_ip.as_str(), m.source_port.as_str()),
            ("127.0.0.1", "51834")
        );
        assert_eq!(
            (m.destination_ip.as_str(), m.destination_port.as_str()),
            ("", "443")
        );
        assert_eq!(m.host, "rr3---sn-oguelnzz.googlevideo.com");
        assert_eq!(
            (m.source_geoip.as_str(), m.destination_geoip.as_str()),
            ("null", "null")
        );
        assert_eq!(
            (
                m.inbound_ip.as_str(),
                m.inbound_port.as_str(),
                m.inbound_name.as_str()
            ),
            ("127.0.0.1", "7890", "DEFAULT-MIXED")
        );
        assert_eq!((m.uid, m.dscp), (1000, 0));
        assert_eq!(
            (m.process.as_str(), m.process_path.as_str()),
            ("firefox", "/usr/lib/firefox/firefox")
        );
        assert_eq!(m.remote_destination, "203.0.113.45");
        assert_eq!(m.dns_mode, "normal");
        assert_eq!(m.chains, r#"["YouTube","Auto-HK","HK-01 Premium"]"#);
        assert_eq!(
            (m.node.as_str(), m.policy.as_str()),
            ("HK-01 Premium", "YouTube")
        );
        assert_eq!(m.provider_chains, r#"["","","airport-a"]"#);
        assert_eq!(
            (m.rule.as_str(), m.rule_payload.as_str()),
            ("RuleSet", "geosite-youtube")
        );
        let m2 = s.connections[1].meta(0);
        assert_eq!(m2.destination_geoip, r#"["us"]"#);
        assert_eq!(
            (m2.node.as_str(), m2.policy.as_str(), m2.chains.as_str()),
            ("DIRECT", "DIRECT", r#"["DIRECT"]"#)
        );
        assert_eq!((m2.rule.as_str(), m2.rule_payload.as_str()), ("Match", ""));
    }

    #[test]
    fn pretty_printed_frame_is_the_same() {
        let (a, b) = (frame("mihomo.wire.txt"), frame("mihomo.json"));
        let (a, b) = (parse(&a).unwrap(), parse(&b).unwrap());
        assert_eq!(a.connections.len(), b.connections.len());
        for (x, y) in a.connections.iter().zip(&b.connections) {
            assert_eq!(x.meta(0), y.meta(0));
            assert_eq!(x.bytes, y.bytes);
        }
    }

    #[test]
    fn empty_frame_has_null_connections() {
        let data = frame("mihomo-empty.wire.txt");
        let s = parse(&data).unwrap();
        assert!(s.connections.is_empty());
        assert_eq!(s.download_total, Some(0));
    }

    #[test]
    fn sing_box_frame_with_missing_keys_and_escapes() {
        let data = frame("sing-box.wire.txt");
        let s = parse(&data).unwrap();
        assert_eq!(s.connections.len(), 2);
        let m = s.connections[0].meta(0);
        assert_eq!(m.rule, "rule_set=geosite-youtube => route(youtube)");
        assert_eq!(m.conn_type, "mixed/mixed-in");
        assert_eq!((m.node.as_str(), m.policy.as_str()), ("hk-01", "youtube"));
        assert_eq!(
            (m.uid, m.inbound_name.as_str(), m.destination_geoip.as_str()),
            (0, "", "null")
        );
        for name in ["sing-box.json", "clash-2021.json"] {
            let data = frame(name);
            let s = parse(&data).unwrap();
            assert!(!s.connections.is_empty(), "{name}");
            assert_eq!(s.skipped, 0);
        }
    }

    #[test]
    fn clash_2021_start_offset() {
        let data = frame("clash-2021.json");
        let s = parse(&data).unwrap();
        let m = s.connections[0].meta(0);
        assert_eq!(
            crate::timefmt::format_rfc3339(m.start_ms, true),
            "2021-06-30T02:11:12.345Z"
        );
        assert_eq!(
            (m.host.as_str(), m.node.as_str(), m.policy.as_str()),
            ("www.example.org", "JP-02", "Proxy")
        );
        assert_eq!(
            s.connections[0].bytes,
            Bytes {
                upload: 2048,
                download: 65536
            }
        );
    }

    #[test]
    fn hostile_values_are_converted_or_skipped() {
        let f = br#"{"downloadTotal":"7","connections":[
            {"id":"a","upload":"12","download":-5,"metadata":"nope","start":12,"chains":"x"},
            {"id":7,"upload":1.5e3,"download":{"x":1},"metadata":{"sourcePort":5353,"uid":"42","host":["h"]}},
            {"upload":1},
            {"id":""},
            42, "str", null, [1,2],
            {"id":"a\u0026b","new":{"deep":[1,2,3]}}
        ]}"#;
        let s = parse(f).unwrap();
        assert_eq!(s.download_total, Some(7));
        let ids: Vec<&str> = s.connections.iter().map(|e| e.id.as_ref()).collect();
        assert_eq!(ids, ["a", "7", "a&b"]);
        assert_eq!(s.skipped, 6);
        assert_eq!(
            s.connections[0].bytes,
            Bytes {
                upload: 12,
                download: 0
            }
        );
        assert_eq!(
            s.connections[1].bytes,
            Bytes {
                upload: 1500,
                download: 0
            }
        );
        let m = s.connections[1].meta(99);
        assert_eq!(
            (m.source_port.as_str(), m.uid, m.host.as_str(), m.start_ms),
            ("5353", 42, "", 99)
        );
        assert_eq!(s.connections[0].meta(5).start_ms, 5);
    }

    #[test]
    fn unusable_frames_are_errors() {
        for f in [
            &b""[..],
            b"{",
            b"[]",
            b"{\"connections\":{}}",
            b"\xff\xfe",
            b"{\"connections\":[{\"id\":\"a\"}",
        ] {
            assert!(parse(f).is_err(), "{:?}", String::from_utf8_lossy(f));
        }
    }
}
