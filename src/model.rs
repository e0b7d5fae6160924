//! The data that flows between threads: what we know of a connection, and the changes the collector sees.
//!
//! A connection's metadata fields are declared once, in the table of `connection_fields!` below: each
//! field's name, kind, default, `connections` column, name in a sync record and key in mihomo's `metadata`.
//! The struct [`ConnMeta`], the column list and the row mapping of the writers and the sync reader, the
//! binds, the sync wire names and mihomo's keys all come from it, so the mapping between fields and columns
//! lives in that one place.

use rusqlite::types::{ToSqlOutput, ValueRef};

/// What a metadata field holds (its column is `TEXT` or `INTEGER`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    Int,
}

/// Where a field is in one of mihomo's connection objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mihomo {
    /// The value under this key of `metadata` (a string, or a number for an integer field).
    Meta(&'static str),
    /// The array of strings under this key of `metadata`, kept as its compact JSON (`"null"` when absent).
    MetaList(&'static str),
    /// Outside `metadata`: decoded from the connection object itself (`chains` and its ends, the rule).
    Object,
}

impl Mihomo {
    /// The key in `metadata`, if the field is there.
    pub const fn metadata_key(self) -> Option<&'static str> {
        match self {
            Mihomo::Meta(k) | Mihomo::MetaList(k) => Some(k),
            Mihomo::Object => None,
        }
    }
}

/// A metadata field's value, borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValue<'a> {
    Text(&'a str),
    Int(i64),
}

impl<'a> FieldValue<'a> {
    /// The text, or `""` for an integer.
    pub fn text(self) -> &'a str {
        match self {
            FieldValue::Text(t) => t,
            FieldValue::Int(_) => "",
        }
    }

    /// The integer, or 0 for a text.
    pub fn int(self) -> i64 {
        match self {
            FieldValue::Int(i) => i,
            FieldValue::Text(_) => 0,
        }
    }

    /// As SQLite takes it (nothing copied).
    pub fn sql(self) -> ValueRef<'a> {
        match self {
            FieldValue::Text(t) => ValueRef::Text(t.as_bytes()),
            FieldValue::Int(i) => ValueRef::Integer(i),
        }
    }
}

impl rusqlite::ToSql for FieldValue<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(self.sql()))
    }
}

/// A [`ConnMeta`] field lent as a [`FieldValue`] (and, for the mihomo decoder, filled in).
trait Slot {
    fn value(&self) -> FieldValue<'_>;
    fn text_mut(&mut self) -> Option<&mut String>;
    fn int_mut(&mut self) -> Option<&mut i64>;
}

impl Slot for String {
    fn value(&self) -> FieldValue<'_> {
        FieldValue::Text(self)
    }
    fn text_mut(&mut self) -> Option<&mut String> {
        Some(self)
    }
    fn int_mut(&mut self) -> Option<&mut i64> {
        None
    }
}

impl Slot for i64 {
    fn value(&self) -> FieldValue<'_> {
        FieldValue::Int(*self)
    }
    fn text_mut(&mut self) -> Option<&mut String> {
        None
    }
    fn int_mut(&mut self) -> Option<&mut i64> {
        Some(self)
    }
}

/// The Rust type of a field of a kind.
macro_rules! field_type {
    (Text) => {
        String
    };
    (Int) => {
        i64
    };
}

/// Declares the metadata fields and builds from them [`Field`], [`ConnMeta`] and its column list, row mapping
/// and values. One line a field, in column order: the [`Field`] variant, the [`ConnMeta`] field, its
/// [`Kind`], its default (the column's `DEFAULT`, and a sync record's value when it has none), its column in
/// `connections`, its name in sync records, and where mihomo has it ([`Mihomo`]).
macro_rules! connection_fields {
    ($(
        $variant:ident $field:ident $kind:ident $default:literal $column:literal $wire:literal $mihomo:expr;
    )*) => {
        /// One of a connection's metadata fields (declaration order: the order of [`ConnMeta::SQL_COLUMNS`]
        /// after `start_ms`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum Field {
            $($variant),*
        }

        impl Field {
            /// How many there are.
            pub const COUNT: usize = [$(stringify!($variant)),*].len();
            /// Every field, in declaration order (`Field::ALL[f as usize] == f`).
            pub const ALL: [Field; Field::COUNT] = [$(Field::$variant),*];
            /// Each field's [`Field::kind`], by index (for loops over a record's fields).
            pub const KINDS: [Kind; Field::COUNT] = [$(Kind::$kind),*];
            /// Each field's [`Field::wire`] name, by index.
            pub const WIRE: [&'static str; Field::COUNT] = [$($wire),*];
            /// Each field's [`Field::default_value`], by index.
            pub const DEFAULTS: [FieldValue<'static>; Field::COUNT] = [$(FieldValue::$kind($default)),*];
            const COLUMNS: [&'static str; Field::COUNT] = [$($column),*];
            const MIHOMO: [Mihomo; Field::COUNT] = {
                use Mihomo::*;
                [$($mihomo),*]
            };

            /// Its column in table `connections`.
            pub const fn column(self) -> &'static str {
                Field::COLUMNS[self as usize]
            }

            /// Its name in a sync record (`POST /api/v1/sync`, both ways).
            pub const fn wire(self) -> &'static str {
                Field::WIRE[self as usize]
            }

            /// What it holds.
            pub const fn kind(self) -> Kind {
                Field::KINDS[self as usize]
            }

            /// Its value when a sync record does not have it: its column's `DEFAULT`.
            pub const fn default_value(self) -> FieldValue<'static> {
                Field::DEFAULTS[self as usize]
            }

            /// Where mihomo puts it.
            pub const fn mihomo(self) -> Mihomo {
                Field::MIHOMO[self as usize]
            }

            /// The field of a sync record's key.
            pub fn by_wire(name: &str) -> Option<Field> {
                match name {
                    $($wire => Some(Field::$variant),)*
                    _ => None,
                }
            }
        }

        /// Everything mihomo tells about a connection that does not change over its life, in the shape of the
        /// database row (the earlier tool's record fields). Ports are strings as mihomo sends them; `chains` is
        /// a JSON array with the policy group first and the exit node last (the reverse of mihomo's order),
        /// `node` and `policy` are its two ends as plain fields; the geoip fields are mihomo's arrays as JSON
        /// text (`"null"`, `"[\"us\"]"`).
        ///
        /// Serialized (for the agent's sync records) under the fields' wire names, without `start_ms`: the wire
        /// carries `start` as RFC 3339.
        #[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
        pub struct ConnMeta {
            pub id: String,
            #[serde(skip)]
            pub start_ms: i64,
            $(
                #[serde(rename = $wire)]
                pub $field: field_type!($kind),
            )*
        }

        impl ConnMeta {
            /// The `connections` columns of [`ConnMeta::from_sql_row`] and of the writers' inserts: `start_ms`,
            /// then every field's.
            pub const SQL_COLUMNS: &'static str = concat!("start_ms" $(, ", ", $column)*);

            /// Reads a connection whose [`ConnMeta::SQL_COLUMNS`] start at column `first` of `r`.
            pub fn from_sql_row(
                id: String,
                r: &rusqlite::Row<'_>,
                first: usize,
            ) -> rusqlite::Result<ConnMeta> {
                Ok(ConnMeta {
                    id,
                    start_ms: r.get(first)?,
                    $($field: r.get(first + 1 + Field::$variant as usize)?,)*
                })
            }

            /// The value of field `f`.
            pub fn value(&self, f: Field) -> FieldValue<'_> {
                match f {
                    $(Field::$variant => self.$field.value()),*
                }
            }

            /// Field `f`'s text, to fill in; `None` for an integer field.
            pub fn text_mut(&mut self, f: Field) -> Option<&mut String> {
                match f {
                    $(Field::$variant => self.$field.text_mut()),*
                }
            }

            /// Field `f`'s integer, to fill in; `None` for a text field.
            pub fn int_mut(&mut self, f: Field) -> Option<&mut i64> {
                match f {
                    $(Field::$variant => self.$field.int_mut()),*
                }
            }
        }
    };
}

connection_fields! {
    // variant        field              kind default column               wire                 mihomo
    Network           network            Text ""      "network"            "network"            Meta("network");
    ConnType          conn_type          Text ""      "conn_type"          "conn_type"          Meta("type");
    SourceIp          source_ip          Text ""      "source_ip"          "source_ip"          Meta("sourceIP");
    SourcePort        source_port        Text ""      "source_port"        "source_port"        Meta("sourcePort");
    DestinationIp     destination_ip     Text ""      "destination_ip"     "destination_ip"     Meta("destinationIP");
    DestinationPort   destination_port   Text ""      "destination_port"   "destination_port"   Meta("destinationPort");
    SourceGeoip       source_geoip       Text "null"  "source_geoip"       "source_geoip"       MetaList("sourceGeoIP");
    DestinationGeoip  destination_geoip  Text "null"  "destination_geoip"  "destination_geoip"  MetaList("destinationGeoIP");
    SourceIpAsn       source_ip_asn      Text ""      "source_ip_asn"      "source_ip_asn"      Meta("sourceIPASN");
    DestinationIpAsn  destination_ip_asn Text ""      "destination_ip_asn" "destination_ip_asn" Meta("destinationIPASN");
    InboundIp         inbound_ip         Text ""      "inbound_ip"         "inbound_ip"         Meta("inboundIP");
    InboundPort       inbound_port       Text ""      "inbound_port"       "inbound_port"       Meta("inboundPort");
    InboundName       inbound_name       Text ""      "inbound_name"       "inbound_name"       Meta("inboundName");
    InboundUser       inbound_user       Text ""      "inbound_user"       "inbound_user"       Meta("inboundUser");
    Host              host               Text ""      "host"               "host"               Meta("host");
    DnsMode           dns_mode           Text ""      "dns_mode"           "dns_mode"           Meta("dnsMode");
    Uid               uid                Int  0       "uid"                "uid"                Meta("uid");
    Process           process            Text ""      "process"            "process"            Meta("process");
    ProcessPath       process_path       Text ""      "process_path"       "process_path"       Meta("processPath");
    SpecialProxy      special_proxy      Text ""      "special_proxy"      "special_proxy"      Meta("specialProxy");
    SpecialRules      special_rules      Text ""      "special_rules"      "special_rules"      Meta("specialRules");
    RemoteDestination remote_destination Text ""      "remote_destination" "remote_destination" Meta("remoteDestination");
    Dscp              dscp               Int  0       "dscp"               "dscp"               Meta("dscp");
    SniffHost         sniff_host         Text ""      "sniff_host"         "sniff_host"         Meta("sniffHost");
    RematchName       rematch_name       Text ""      "rematch_name"       "rematch_name"       Meta("rematchName");
    Chains            chains             Text "[]"    "chains"             "chains"             Object;
    ProviderChains    provider_chains    Text "[]"    "provider_chains"    "provider_chains"    Object;
    Node              node               Text ""      "node"               "node"               Object;
    Policy            policy             Text ""      "policy"             "policy"             Object;
    Rule              rule               Text ""      "rule"               "rule"               Object;
    RulePayload       rule_payload       Text ""      "rule_payload"       "rule_payload"       Object;
}

/// A connection's metadata, however it is held: what the merge inserts ([`crate::store::merge`]). Held as
/// [`ConnMeta`] (the collector's), [`PackedMeta`] (the writer's pending new connections) or [`RecordMeta`]
/// (a validated sync record).
pub trait Metadata {
    fn id(&self) -> &str;
    fn start_ms(&self) -> i64;
    /// The value of field `f`.
    fn get(&self, f: Field) -> FieldValue<'_>;
    /// Every field's value in [`Field`] order, as SQLite takes it (the insert's binds).
    fn sql_values(&self) -> impl Iterator<Item = ValueRef<'_>>;

    /// Field `f`'s text (`""` for an integer field).
    fn text(&self, f: Field) -> &str {
        self.get(f).text()
    }

    /// As a [`ConnMeta`] (tests, messages).
    fn to_conn_meta(&self) -> ConnMeta {
        let mut m = ConnMeta {
            id: self.id().to_string(),
            start_ms: self.start_ms(),
            ..ConnMeta::default()
        };
        for f in Field::ALL {
            match self.get(f) {
                FieldValue::Text(t) => m.text_mut(f).into_iter().for_each(|s| *s = t.to_string()),
                FieldValue::Int(i) => m.int_mut(f).into_iter().for_each(|v| *v = i),
            }
        }
        m
    }
}

impl Metadata for ConnMeta {
    fn id(&self) -> &str {
        &self.id
    }
    fn start_ms(&self) -> i64 {
        self.start_ms
    }
    fn get(&self, f: Field) -> FieldValue<'_> {
        self.value(f)
    }
    fn sql_values(&self) -> impl Iterator<Item = ValueRef<'_>> {
        Field::ALL.into_iter().map(|f| self.value(f).sql())
    }
}

/// Where a text sits in a larger one (byte offsets `start..end`); [`ABSENT`] for no value.
pub type Span = (u32, u32);
/// The [`Span`] of a value that is not there.
pub const ABSENT: Span = (u32::MAX, 0);

/// A validated sync record's metadata: the record's text (every value it sent, escapes resolved) and where
/// each field is in it, in one allocation made on the API worker, the way the record was parsed (a copy of
/// the parse buffer and of its spans, nothing rearranged per field). An absent field takes its default.
#[derive(Clone)]
pub struct RecordMeta {
    text: Box<str>,
    id: Span,
    start_ms: i64,
    /// By field: a text field's [`Span`] in `text` (start in the high half), an integer field's value.
    slots: [u64; Field::COUNT],
}

impl RecordMeta {
    /// The metadata in `text`: the id at `id`, text field `f` at `spans[f as usize]` ([`ABSENT`], or none:
    /// its default), integer field `f` from `ints[f as usize]` (`None`, or none: its default).
    pub fn new(
        text: &str,
        id: Span,
        start_ms: i64,
        spans: &[Span],
        ints: &[Option<i64>],
    ) -> RecordMeta {
        let slots = std::array::from_fn(|i| match Field::KINDS[i] {
            Kind::Text => {
                let (a, b) = spans.get(i).copied().unwrap_or(ABSENT);
                (u64::from(a) << 32) | u64::from(b)
            }
            Kind::Int => ints
                .get(i)
                .copied()
                .flatten()
                .unwrap_or(Field::DEFAULTS[i].int()) as u64,
        });
        RecordMeta {
            text: text.into(),
            id,
            start_ms,
            slots,
        }
    }

    /// The span of text field `i` (`None`: absent).
    fn span(&self, i: usize) -> Option<(usize, usize)> {
        let slot = self.slots[i];
        let (a, b) = ((slot >> 32) as u32, slot as u32);
        ((a, b) != ABSENT).then_some((a as usize, b as usize))
    }
}

impl Metadata for RecordMeta {
    fn id(&self) -> &str {
        self.text
            .get(self.id.0 as usize..self.id.1 as usize)
            .unwrap_or_default()
    }
    fn start_ms(&self) -> i64 {
        self.start_ms
    }
    fn get(&self, f: Field) -> FieldValue<'_> {
        let i = f as usize;
        match (f.kind(), self.span(i)) {
            (Kind::Int, _) => FieldValue::Int(self.slots[i] as i64),
            (Kind::Text, None) => Field::DEFAULTS[i],
            (Kind::Text, Some((a, b))) => FieldValue::Text(self.text.get(a..b).unwrap_or_default()),
        }
    }
    fn sql_values(&self) -> impl Iterator<Item = ValueRef<'_>> {
        let text = self.text.as_bytes();
        (0..Field::COUNT).map(move |i| match (Field::KINDS[i], self.span(i)) {
            (Kind::Int, _) => ValueRef::Integer(self.slots[i] as i64),
            (Kind::Text, None) => Field::DEFAULTS[i].sql(),
            (Kind::Text, Some((a, b))) => ValueRef::Text(text.get(a..b).unwrap_or_default()),
        })
    }
}

impl PartialEq for RecordMeta {
    fn eq(&self, other: &RecordMeta) -> bool {
        self.id() == other.id()
            && self.start_ms == other.start_ms
            && Field::ALL.iter().all(|&f| self.get(f) == other.get(f))
    }
}

impl Eq for RecordMeta {}

impl std::fmt::Debug for RecordMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.to_conn_meta().fmt(f)
    }
}

/// A connection's metadata packed into one allocation: its id and `start_ms`, then each [`Field`] in order
/// (a text as its `u32` length and bytes, an integer as 8 bytes). What the writer holds of a new connection
/// until its commit (a start next to 2,500 connections holds them all, and that commit is the largest: about
/// 4 MB as `ConnMeta`s, 33 strings each, a third of that packed).
#[derive(Clone, PartialEq, Eq)]
pub struct PackedMeta(Box<[u8]>);

impl PackedMeta {
    /// `m`, packed in one allocation of the exact size.
    pub fn new(m: &ConnMeta) -> PackedMeta {
        let size = |v: FieldValue<'_>| match v {
            FieldValue::Text(t) => 4 + t.len(),
            FieldValue::Int(_) => 8,
        };
        let total =
            4 + m.id.len() + 8 + Field::ALL.iter().map(|&f| size(m.value(f))).sum::<usize>();
        let mut out = Vec::with_capacity(total);
        // (a value longer than 4 GiB cannot come in: frames and request bodies are limited far below)
        let text = |out: &mut Vec<u8>, t: &str| {
            out.extend_from_slice(&(t.len() as u32).to_le_bytes());
            out.extend_from_slice(t.as_bytes());
        };
        text(&mut out, &m.id);
        out.extend_from_slice(&m.start_ms.to_le_bytes());
        for f in Field::ALL {
            match m.value(f) {
                FieldValue::Text(t) => text(&mut out, t),
                FieldValue::Int(i) => out.extend_from_slice(&i.to_le_bytes()),
            }
        }
        debug_assert_eq!(out.len(), total);
        PackedMeta(out.into_boxed_slice())
    }

    /// The bytes at `at` of a text (`u32` length first), and where the next value starts.
    fn bytes_at(&self, at: usize) -> (&[u8], usize) {
        let len = u32::from_le_bytes(self.0[at..at + 4].try_into().unwrap_or_default()) as usize;
        (&self.0[at + 4..at + 4 + len], at + 4 + len)
    }

    fn int_at(&self, at: usize) -> i64 {
        i64::from_le_bytes(self.0[at..at + 8].try_into().unwrap_or_default())
    }
}

impl Metadata for PackedMeta {
    fn id(&self) -> &str {
        std::str::from_utf8(self.bytes_at(0).0).unwrap_or_default()
    }

    fn start_ms(&self) -> i64 {
        self.int_at(self.bytes_at(0).1)
    }

    fn get(&self, f: Field) -> FieldValue<'_> {
        match self.sql_values().nth(f as usize) {
            Some(ValueRef::Text(t)) => FieldValue::Text(std::str::from_utf8(t).unwrap_or_default()),
            Some(ValueRef::Integer(i)) => FieldValue::Int(i),
            _ => f.default_value(),
        }
    }

    /// (texts are not checked again for UTF-8: they were `str`s when packed)
    fn sql_values(&self) -> impl Iterator<Item = ValueRef<'_>> {
        let mut at = self.bytes_at(0).1 + 8;
        Field::ALL.into_iter().map(move |f| match f.kind() {
            Kind::Text => {
                let (t, next) = self.bytes_at(at);
                at = next;
                ValueRef::Text(t)
            }
            Kind::Int => {
                let i = self.int_at(at);
                at += 8;
                ValueRef::Integer(i)
            }
        })
    }
}

impl std::fmt::Debug for PackedMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.to_conn_meta().fmt(f)
    }
}

/// Cumulative byte counters of one connection at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bytes {
    pub upload: u64,
    pub download: u64,
}

/// Bytes that flowed between two moments: the writer spreads them evenly over the minutes of
/// `[from_ms, to_ms]`, so a long download shows over its whole duration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub id: String,
    /// The new cumulative totals.
    pub totals: Bytes,
    /// The increase since the last observation.
    pub delta: Bytes,
    pub from_ms: i64,
    pub to_ms: i64,
}

/// A connection that ended: `end_ms` and its final totals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    pub id: String,
    pub end_ms: i64,
    pub totals: Bytes,
}

/// What changed between two snapshots (or between the database and the first snapshot after a start).
/// The writer applies `opened`, then `reopened`, then `flows`, then `closed`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionDiff {
    /// When the snapshot arrived (UTC ms): the `last_updated` of every flow.
    pub at_ms: i64,
    /// New connections with their counters at first sight (their bytes also appear in `flows`).
    pub opened: Vec<(ConnMeta, Bytes)>,
    /// Ids that were closed and showed up again (mihomo never reuses ids, but a glitch may hide one).
    pub reopened: Vec<String>,
    pub flows: Vec<Flow>,
    pub closed: Vec<Closed>,
}

impl ConnectionDiff {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.opened.is_empty()
            && self.reopened.is_empty()
            && self.flows.is_empty()
            && self.closed.is_empty()
    }
}

/// A connection the database knows as open, loaded at start so a tracker restart resumes instead of
/// counting twice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenRow {
    pub id: String,
    pub totals: Bytes,
    pub last_updated_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> ConnMeta {
        ConnMeta {
            id: "c-1".into(),
            start_ms: -5,
            network: "tcp".into(),
            source_ip: "10.0.0.2".into(),
            destination_ip: "203.0.113.9".into(),
            host: "example.org".into(),
            uid: i64::MAX,
            dscp: -46,
            chains: r#"["a","é"]"#.into(),
            rule_payload: "x".repeat(300),
            ..ConnMeta::default()
        }
    }

    #[test]
    fn packed_meta_gives_back_every_value() {
        for m in [full(), ConnMeta::default()] {
            let p = PackedMeta::new(&m);
            assert_eq!((p.id(), p.start_ms()), (m.id.as_str(), m.start_ms));
            let want: Vec<ValueRef<'_>> = Field::ALL.iter().map(|&f| m.value(f).sql()).collect();
            assert_eq!(p.sql_values().collect::<Vec<_>>(), want);
            for f in Field::ALL {
                assert_eq!(p.get(f), m.value(f), "{f:?}");
            }
            assert_eq!(p.to_conn_meta(), m);
            // the exact size: nothing to shrink (no reallocation) and nothing wasted
            let texts: usize = Field::ALL
                .iter()
                .map(|&f| 4 + m.value(f).text().len())
                .sum();
            assert!(p.0.len() <= 4 + m.id.len() + 8 + texts + 8 * Field::COUNT);
        }
    }

    #[test]
    fn record_meta_reads_its_spans_and_defaults() {
        let text = "idhosté";
        let mut spans = [ABSENT; Field::COUNT];
        spans[Field::Host as usize] = (2, 8);
        let mut ints = [None; Field::COUNT];
        ints[Field::Dscp as usize] = Some(-7);
        let r = RecordMeta::new(text, (0, 2), 5, &spans, &ints);
        let want = ConnMeta {
            id: "id".into(),
            start_ms: 5,
            host: "hosté".into(),
            dscp: -7,
            source_geoip: "null".into(),
            destination_geoip: "null".into(),
            chains: "[]".into(),
            provider_chains: "[]".into(),
            ..ConnMeta::default()
        };
        assert_eq!(r.to_conn_meta(), want);
        assert_eq!(
            r.sql_values().collect::<Vec<_>>(),
            want.sql_values().collect::<Vec<_>>()
        );
        assert_eq!(r, RecordMeta::new(text, (0, 2), 5, &spans, &ints));
        assert_ne!(r, RecordMeta::new(text, (0, 2), 6, &spans, &ints));
    }

    #[test]
    fn fields_are_declared_once_each() {
        assert_eq!(Field::COUNT, 31);
        for (i, f) in Field::ALL.iter().enumerate() {
            assert_eq!(*f as usize, i);
            assert_eq!(Field::by_wire(f.wire()), Some(*f));
            assert_eq!(
                f.default_value() == FieldValue::Int(0),
                f.kind() == Kind::Int
            );
            for g in &Field::ALL[..i] {
                assert_ne!(f.column(), g.column());
                assert_ne!(f.wire(), g.wire());
                assert!(f.mihomo().metadata_key().is_none() || f.mihomo() != g.mihomo());
            }
        }
        assert_eq!(Field::by_wire("id"), None);
        // the sync record's names are the wire names, in declaration order after `id`
        let v = serde_json::to_value(full()).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 1 + Field::COUNT);
        assert!(Field::ALL.iter().all(|f| keys.contains(&f.wire())));
    }
}
