//! Parsing one push of mihomo's `/connections` (also sing-box's and old Clash's) into a [`Snapshot`].
//!
//! Built for memory, speed and hostile input. Every push is a full snapshot (2 MB at 2,500 connections,
//! 7.6 MB at 10,000) and almost every connection in it is already known. So a push is parsed as it is read
//! ([`read`], from the socket): a window of a few tens of KB, one connection object at a time, never the
//! whole push. Of a known connection only its id (a UUID as its 128 bits) and counters are kept; of a new one
//! also its raw JSON, decoded ([`Entry::meta`]) once the diff knows it is new. Nothing is trusted: missing
//! keys take defaults, unknown keys are ignored, a value of the wrong type (`"upload": "12"`, a number for a
//! string) is converted when that makes sense and defaulted otherwise, and a malformed connection is skipped
//! and counted instead of dropping the whole frame. Only a frame that is not JSON at all, or whose
//! `connections` is neither an array nor `null`, is refused.

use crate::error::{Error, Result};
use crate::model::{Bytes, ConnMeta, Field, Mihomo};
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;
use std::io::Read;

/// One push: the connections' ids and counters, and the raw JSON of those the caller does not know yet.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// `downloadTotal`: monotonic for the life of the core; a drop means it restarted.
    pub download_total: Option<u64>,
    /// `uploadTotal`, likewise.
    pub upload_total: Option<u64>,
    /// The connections with a usable id, in frame order (duplicates possible: the diff handles them).
    pub connections: Vec<Entry>,
    /// Connections skipped because they had no usable id or were not objects.
    pub skipped: usize,
}

/// One connection of a snapshot: its id and counters, and the rest still raw when it may be needed.
#[derive(Debug)]
pub struct Entry {
    /// The id as the tracker keys it ([`Entry::id`] gives its text): no allocation per connection and push.
    pub key: IdKey,
    pub bytes: Bytes,
    /// The connection's whole JSON object, kept only for ids the caller did not know when it was read:
    /// [`Entry::meta`] decodes it. A known connection keeps nothing more (memory: a push is 2 MB of JSON
    /// at 2,500 connections, almost all of them known).
    /// (In a cell so that [`Entry::forget_raw`] can free it once decoded, while the snapshot is shared.)
    obj: std::cell::RefCell<Option<Box<str>>>,
}

/// A connection id as the tracker keys it: a UUID (what mihomo and sing-box use) as its 128 bits, anything
/// else as text. Memory and speed: no allocation per id, and a lookup compares 16 bytes in the table
/// instead of following a pointer to a 36-byte string (two lookups per connection and push).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum IdKey {
    Uuid(u128),
    Text(Box<str>),
}

impl IdKey {
    /// Only the canonical lowercase form becomes [`IdKey::Uuid`], so that [`IdKey`]'s `Display` gives back
    /// exactly the id that came in.
    pub fn new(id: &str) -> IdKey {
        let b = id.as_bytes();
        if b.len() == 36 && b[8] == b'-' && b[13] == b'-' && b[18] == b'-' && b[23] == b'-' {
            // the 32 hex digits: the id without its four dashes
            const DIGITS: [u8; 32] = [
                0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 16, 17, 19, 20, 21, 22, 24, 25, 26,
                27, 28, 29, 30, 31, 32, 33, 34, 35,
            ];
            let (mut hi, mut lo, mut bad) = (0u64, 0u64, 0u8);
            for (n, &i) in DIGITS.iter().enumerate() {
                let d = HEX[b[i as usize] as usize];
                bad |= d;
                if n < 16 {
                    hi = hi << 4 | u64::from(d);
                } else {
                    lo = lo << 4 | u64::from(d);
                }
            }
            if bad & 0x10 == 0 {
                return IdKey::Uuid(u128::from(hi) << 64 | u128::from(lo));
            }
        }
        IdKey::Text(id.into())
    }
}

/// Lowercase hex digits to their value; anything else has bit 4 set.
const HEX: [u8; 256] = {
    let mut t = [0x10u8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

impl std::fmt::Display for IdKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdKey::Uuid(v) => f.write_str(&uuid_text(*v)),
            IdKey::Text(t) => f.write_str(t),
        }
    }
}

/// The canonical text of a UUID (lowercase, with dashes).
fn uuid_text(v: u128) -> String {
    let mut s = String::with_capacity(36);
    for i in 0..32 {
        if matches!(i, 8 | 12 | 16 | 20) {
            s.push('-');
        }
        s.push(char::from(
            b"0123456789abcdef"[(v >> (124 - 4 * i)) as usize & 0xf],
        ));
    }
    s
}

/// Everything [`Entry::meta`] decodes, still raw.
#[derive(Debug, Default)]
struct RawEntry<'a> {
    metadata: Option<&'a RawValue>,
    start: Option<&'a RawValue>,
    chains: Option<&'a RawValue>,
    provider_chains: Option<&'a RawValue>,
    rule: Option<&'a RawValue>,
    rule_payload: Option<&'a RawValue>,
}

/// What every push needs of a connection: its id and counters; every other value is skipped unread.
#[derive(Debug, Default)]
struct Head<'a> {
    id: Option<&'a RawValue>,
    upload: Option<&'a RawValue>,
    download: Option<&'a RawValue>,
    valid: bool,
}

/// A connection object decoded field by field (`$key => $field`, every other key skipped unread);
/// anything that is not an object becomes the default (invalid) value instead of an error, so one bad
/// connection cannot sink the frame.
/// Reads an object key and gives the one of these it is, without allocating (serde's `Cow<str>` always
/// allocates: nine times per connection and push).
struct Key(&'static [&'static str]);

impl<'de> serde::de::DeserializeSeed<'de> for Key {
    type Value = Option<&'static str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Option<&'static str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Self::Value, E> {
        Ok(self.0.iter().copied().find(|k| *k == v))
    }
}

macro_rules! connection_object {
    ($ty:ident, $valid:expr, { $($key:literal => $field:ident),* $(,)? }) => {
        impl<'de: 'a, 'a> Deserialize<'de> for $ty<'a> {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                struct V<'a>(std::marker::PhantomData<&'a ()>);
                impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
                    type Value = $ty<'a>;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("a connection object")
                    }
                    fn visit_map<A: MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> std::result::Result<Self::Value, A::Error> {
                        let mut e = $ty::default();
                        $valid(&mut e);
                        while let Some(key) = map.next_key_seed(Key(&[$($key),*]))? {
                            let slot = match key {
                                $(Some($key) => &mut e.$field,)*
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
                        Ok($ty::default())
                    }
                    fn visit_str<E>(self, _: &str) -> std::result::Result<Self::Value, E> {
                        Ok($ty::default())
                    }
                    fn visit_u64<E>(self, _: u64) -> std::result::Result<Self::Value, E> {
                        Ok($ty::default())
                    }
                    fn visit_i64<E>(self, _: i64) -> std::result::Result<Self::Value, E> {
                        Ok($ty::default())
                    }
                    fn visit_f64<E>(self, _: f64) -> std::result::Result<Self::Value, E> {
                        Ok($ty::default())
                    }
                    fn visit_bool<E>(self, _: bool) -> std::result::Result<Self::Value, E> {
                        Ok($ty::default())
                    }
                    fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
                        Ok($ty::default())
                    }
                }
                d.deserialize_any(V(std::marker::PhantomData))
            }
        }
    };
}

connection_object!(Head, |e: &mut Head| e.valid = true, {
    "id" => id, "upload" => upload, "download" => download,
});
connection_object!(RawEntry, |_: &mut RawEntry| {}, {
    "metadata" => metadata, "start" => start, "chains" => chains,
    "providerChains" => provider_chains, "rule" => rule, "rulePayload" => rule_payload,
});

/// Bytes read from the stream at a time (more while one value is longer, see [`Window::fill`]): the only
/// buffer a push needs, however many connections it has.
const CHUNK: usize = 64 << 10;

/// The part of the stream being parsed: `buf[pos..end]` is read and not parsed yet.
///
/// UTF-8 is not checked up front: serde_json checks what it decodes (keys, ids, counters, and the whole
/// object of a new connection when it is decoded), and skips the rest unread, so a bad byte in a value we
/// never use costs nothing, and the bytes are scanned once.
struct Window<'r, R> {
    r: &'r mut R,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    eof: bool,
    /// Bytes read so far (for messages).
    total: usize,
}

impl<R: Read> Window<'_, R> {
    /// Drops what was parsed and reads more: at least [`CHUNK`] and half as much again as is left unparsed.
    fn fill(&mut self) -> Result<()> {
        // `buf[..end]` is what was read; the rest is room, zeroed once when the buffer grows
        let left = self.end - self.pos;
        self.buf.copy_within(self.pos..self.end, 0);
        self.pos = 0;
        // a value longer than a chunk is parsed again after each read: grow by half of it, so that is
        // linear time, and the window stays within 1.5 times the longest value
        let want = CHUNK.max(left / 2);
        if self.buf.len() < left + want {
            self.buf.resize(left + want, 0);
        }
        self.end = left;
        while self.end < left + want {
            match self.r.read(&mut self.buf[self.end..left + want]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::Io(
                        format!("read a push ({} bytes in)", self.total + self.end - left),
                        e,
                    ));
                }
            }
        }
        self.total += self.end - left;
        Ok(())
    }

    /// The next byte that is not whitespace, left unparsed; `None` at the end of the stream.
    fn peek(&mut self) -> Result<Option<u8>> {
        loop {
            while self.pos < self.end {
                let b = self.buf[self.pos];
                if !b.is_ascii_whitespace() {
                    return Ok(Some(b));
                }
                self.pos += 1;
            }
            if self.eof {
                return Ok(None);
            }
            self.fill()?;
        }
    }

    /// Consumes `want`, the next byte that is not whitespace.
    fn expect(&mut self, want: u8, what: &str) -> Result<()> {
        match self.peek()? {
            Some(b) if b == want => {
                self.pos += 1;
                Ok(())
            }
            Some(b) => Err(self.bad(&format!("expected {what}, found '{}'", b as char))),
            None => Err(self.bad(&format!("expected {what}, found the end"))),
        }
    }

    /// Parses the next JSON value with `f` (which returns what it made of it and the bytes it took), reading
    /// more until the value is whole. `f` may run more than once: a value cut by the end of a read is parsed
    /// again once more is in.
    fn value<O>(
        &mut self,
        mut f: impl FnMut(&[u8]) -> Option<serde_json::Result<(O, usize)>>,
    ) -> Result<O> {
        loop {
            let data = &self.buf[self.pos..self.end];
            let whole = data.len();
            match f(data) {
                // a value ending right at the end of what is read may go on (a number): read on to be sure
                Some(Ok((o, used))) if used < whole || self.eof => {
                    self.pos += used;
                    return Ok(o);
                }
                Some(Err(e)) if !e.is_eof() || self.eof => {
                    return Err(self.bad(&e.to_string()));
                }
                None if self.eof => return Err(self.bad("expected a value, found the end")),
                _ => {}
            }
            self.fill()?;
        }
    }

    fn bad(&self, what: &str) -> Error {
        // serde_json's word for a string that is not UTF-8, or bytes that are not where it stopped
        let bad_utf8 = matches!(std::str::from_utf8(&self.buf[self.pos..self.end]),
            Err(e) if e.error_len().is_some());
        let utf8 = if what.starts_with("invalid unicode code point") || bad_utf8 {
            "not UTF-8: "
        } else {
            ""
        };
        Error::Frame(format!(
            "{utf8}{what} (at byte {} of the push)",
            self.total - self.end + self.pos
        ))
    }
}

/// One `T` from the start of `data` and the bytes it took; `None` when `data` holds no value yet.
fn one<'de, T: Deserialize<'de>>(data: &'de [u8]) -> Option<serde_json::Result<(T, usize)>> {
    let mut values = serde_json::Deserializer::from_slice(data).into_iter::<T>();
    values.next().map(|v| v.map(|v| (v, values.byte_offset())))
}

/// The keys of a push that matter.
enum Top {
    Connections,
    DownloadTotal,
    UploadTotal,
    Other,
}

/// Parses one push as it is read from `r`: never more than a few tens of KB of it in memory. `known` says
/// which ids the caller already knows: only the others keep their raw JSON (for [`Entry::meta`]). Errors
/// only when the push as a whole is unusable (not JSON, `connections` neither an array nor `null`), or when
/// reading fails.
pub fn read<R: Read>(r: &mut R, mut known: impl FnMut(&IdKey) -> bool) -> Result<Snapshot> {
    let mut w = Window {
        r,
        buf: Vec::new(),
        pos: 0,
        end: 0,
        eof: false,
        total: 0,
    };
    let mut snap = Snapshot::default();
    if w.peek()? != Some(b'{') {
        return Err(w.bad("not a JSON object"));
    }
    w.pos += 1;
    if w.peek()? == Some(b'}') {
        w.pos += 1;
    } else {
        loop {
            let key = w.value(|d| {
                one::<Cow<str>>(d).map(|r| {
                    r.map(|(k, used)| {
                        let key = match k.as_ref() {
                            "connections" => Top::Connections,
                            "downloadTotal" => Top::DownloadTotal,
                            "uploadTotal" => Top::UploadTotal,
                            _ => Top::Other,
                        };
                        (key, used)
                    })
                })
            })?;
            w.expect(b':', "':' after a key")?;
            match key {
                Top::Connections => match w.peek()? {
                    Some(b'[') => {
                        w.pos += 1;
                        connections(&mut w, &mut snap, &mut known)?;
                    }
                    Some(b'n') => w.value(|d| one::<()>(d))?,
                    _ => return Err(w.bad("connections is neither an array nor null")),
                },
                Top::DownloadTotal | Top::UploadTotal => {
                    let v = w.value(|d| {
                        one::<&RawValue>(d).map(|r| r.map(|(v, used)| (number(v), used)))
                    })?;
                    match key {
                        Top::DownloadTotal => snap.download_total = v,
                        _ => snap.upload_total = v,
                    }
                }
                Top::Other => {
                    w.value(|d| one::<IgnoredAny>(d).map(|r| r.map(|(_, used)| ((), used))))?
                }
            }
            match w.peek()? {
                Some(b',') => w.pos += 1,
                Some(b'}') => {
                    w.pos += 1;
                    break;
                }
                _ => return Err(w.bad("expected ',' or '}' after a value")),
            }
        }
    }
    if w.peek()?.is_some() {
        return Err(w.bad("trailing characters after the push"));
    }
    Ok(snap)
}

/// The elements of the `connections` array, after its `[`.
fn connections<R: Read>(
    w: &mut Window<'_, R>,
    snap: &mut Snapshot,
    known: &mut impl FnMut(&IdKey) -> bool,
) -> Result<()> {
    if w.peek()? == Some(b']') {
        w.pos += 1;
        return Ok(());
    }
    loop {
        let e = w.value(|d| {
            one::<Head>(d).map(|r| r.map(|(h, used)| (entry(h, &d[..used], known), used)))
        })?;
        match e {
            Some(e) => snap.connections.push(e),
            None => snap.skipped += 1,
        }
        match w.peek()? {
            Some(b',') => w.pos += 1,
            Some(b']') => {
                w.pos += 1;
                return Ok(());
            }
            _ => return Err(w.bad("expected ',' or ']' after a connection")),
        }
    }
}

/// The entry of a raw connection (`obj`, its JSON text), `None` when it has no usable id.
fn entry(e: Head<'_>, obj: &[u8], known: &mut impl FnMut(&IdKey) -> bool) -> Option<Entry> {
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
    let key = IdKey::new(&id);
    let obj = if known(&key) {
        None
    } else {
        std::str::from_utf8(obj).ok().map(|o| o.trim().into())
    }
    .into();
    Some(Entry { key, bytes, obj })
}

/// Parses one whole push (tests and tools; the collector reads pushes with [`read`]).
pub fn parse(frame: &[u8]) -> Result<Snapshot> {
    read(&mut &frame[..], |_| false)
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

/// A connection's `metadata`, still raw: the value of each field that mihomo puts there ([`Mihomo::Meta`],
/// [`Mihomo::MetaList`]), every other key skipped unread. Anything but an object, or a key twice, makes it
/// unusable (every field then takes its default), as it always did.
#[derive(Default)]
struct RawMeta<'a>([Option<&'a RawValue>; Field::COUNT]);

impl<'de: 'a, 'a> Deserialize<'de> for RawMeta<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = RawMeta<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a metadata object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut m = RawMeta::default();
                while let Some(key) = map.next_key_seed(MetaKey)? {
                    let Some(field) = key else {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    };
                    let slot = &mut m.0[field as usize];
                    if slot.is_some() {
                        return Err(serde::de::Error::duplicate_field(
                            field.mihomo().metadata_key().unwrap_or_default(),
                        ));
                    }
                    *slot = map.next_value::<Option<&'de RawValue>>()?;
                }
                Ok(m)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A `metadata` key: the field it holds, without allocating.
struct MetaKey;

impl<'de> serde::de::DeserializeSeed<'de> for MetaKey {
    type Value = Option<Field>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for MetaKey {
    type Value = Option<Field>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key")
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Self::Value, E> {
        Ok(Field::ALL
            .into_iter()
            .find(|f| f.mihomo().metadata_key() == Some(v)))
    }
}

impl Entry {
    /// The connection's id.
    pub fn id(&self) -> Cow<'_, str> {
        match &self.key {
            IdKey::Uuid(v) => Cow::Owned(uuid_text(*v)),
            IdKey::Text(t) => Cow::Borrowed(t),
        }
    }

    /// Frees the raw JSON kept for [`Entry::meta`] (memory: a first snapshot keeps it for every connection).
    pub fn forget_raw(&self) {
        self.obj.take();
    }

    /// Decodes everything else about the connection. `seen_ms` stands in for a missing or unreadable `start`.
    pub fn meta(&self, seen_ms: i64) -> ConnMeta {
        let obj = self.obj.borrow();
        let r: RawEntry = obj
            .as_deref()
            .and_then(|o| serde_json::from_str(o).ok())
            .unwrap_or_default();
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
        let mut meta = ConnMeta {
            id: self.id().into_owned(),
            start_ms,
            chains: serde_json::to_string(&chains).unwrap_or_else(|_| "[]".into()),
            provider_chains: serde_json::to_string(&provider_chains)
                .unwrap_or_else(|_| "[]".into()),
            node,
            policy,
            rule: owned(r.rule),
            rule_payload: owned(r.rule_payload),
            ..ConnMeta::default()
        };
        for f in Field::ALL {
            let raw = m.0[f as usize];
            match (f.mihomo(), meta.text_mut(f)) {
                (Mihomo::Object, _) => {}
                (Mihomo::MetaList(_), Some(t)) => *t = geoip(raw),
                (Mihomo::Meta(_), Some(t)) => *t = owned(raw),
                (_, None) => {
                    if let Some(i) = meta.int_mut(f) {
                        *i = signed(raw);
                    }
                }
            }
        }
        meta
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
        assert_eq!(e.id(), "3f0c6c2e-8b1d-4f5e-9a57-6b2d0e4c7a91");
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
        let ids: Vec<String> = s.connections.iter().map(|e| e.id().into_owned()).collect();
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

    /// A reader handing out `step` bytes at a time: every cut point of a push must parse the same.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.1).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_push_read_in_pieces_parses_the_same_and_keeps_only_unknown_objects() {
        let data = frame("mihomo.wire.txt");
        let whole = parse(&data).unwrap();
        let first = whole.connections[0].key.clone();
        for step in [1, 2, 3, 7, 64, 1000, usize::MAX] {
            let s = read(&mut Trickle(&data, step), |k| *k == first).unwrap();
            assert_eq!(s.connections.len(), whole.connections.len(), "step {step}");
            assert_eq!(
                (s.download_total, s.upload_total),
                (whole.download_total, whole.upload_total)
            );
            for (a, b) in s.connections.iter().zip(&whole.connections) {
                assert_eq!((&a.key, a.bytes), (&b.key, b.bytes), "step {step}");
            }
            assert!(
                s.connections[0].obj.borrow().is_none(),
                "a known id keeps no JSON"
            );
            assert_eq!(s.connections[1].meta(0), whole.connections[1].meta(0));
        }
        // a value longer than a read chunk, and numbers cut by the end of a read
        let long = format!(
            r#"{{"uploadTotal":12345678901,"connections":[{{"id":"x","upload":98765,"metadata":{{"host":"{}"}}}}],"downloadTotal":7}}"#,
            "h".repeat(3 * CHUNK)
        );
        for step in [1, 5, CHUNK - 1, usize::MAX] {
            let s = read(&mut Trickle(long.as_bytes(), step), |_| false).unwrap();
            assert_eq!(
                (s.upload_total, s.download_total),
                (Some(12345678901), Some(7))
            );
            assert_eq!(s.connections[0].bytes.upload, 98765);
            assert_eq!(s.connections[0].meta(0).host.len(), 3 * CHUNK);
        }
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
            b"{\"connections\":[]} x",
            b"{\"a\":1 \"b\":2}",
        ] {
            assert!(parse(f).is_err(), "{:?}", String::from_utf8_lossy(f));
        }
    }
}
