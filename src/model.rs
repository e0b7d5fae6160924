//! The data that flows between threads: what we know of a connection, and the changes the collector sees.

/// Everything mihomo tells about a connection that does not change over its life, in the shape of the
/// database row (the earlier tool's record fields). Ports are strings as mihomo sends them; `chains` is a
/// JSON array with the policy group first and the exit node last (the reverse of mihomo's order), `node` and
/// `policy` are its two ends as plain fields; the geoip fields are mihomo's arrays as JSON text (`"null"`,
/// `"[\"us\"]"`).
///
/// Serialized (for the agent's sync records) under the same names, without `start_ms`: the wire carries `start`
/// as RFC 3339.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConnMeta {
    pub id: String,
    #[serde(skip)]
    pub start_ms: i64,
    pub network: String,
    pub conn_type: String,
    pub source_ip: String,
    pub source_port: String,
    pub destination_ip: String,
    pub destination_port: String,
    pub source_geoip: String,
    pub destination_geoip: String,
    pub source_ip_asn: String,
    pub destination_ip_asn: String,
    pub inbound_ip: String,
    pub inbound_port: String,
    pub inbound_name: String,
    pub inbound_user: String,
    pub host: String,
    pub dns_mode: String,
    pub uid: i64,
    pub process: String,
    pub process_path: String,
    pub special_proxy: String,
    pub special_rules: String,
    pub remote_destination: String,
    pub dscp: i64,
    pub sniff_host: String,
    pub rematch_name: String,
    pub chains: String,
    pub provider_chains: String,
    pub node: String,
    pub policy: String,
    pub rule: String,
    pub rule_payload: String,
}

impl ConnMeta {
    /// The `connections` columns [`MetaView::sql_values`] binds, in order (for the writers' inserts).
    pub const SQL_COLUMNS: &'static str = "start_ms, network, conn_type, source_ip, source_port, destination_ip, destination_port, source_geoip, destination_geoip, source_ip_asn, destination_ip_asn, inbound_ip, inbound_port, inbound_name, inbound_user, host, dns_mode, uid, process, process_path, special_proxy, special_rules, remote_destination, dscp, sniff_host, rematch_name, chains, provider_chains, node, policy, rule, rule_payload";

    /// Reads a connection whose [`ConnMeta::SQL_COLUMNS`] start at column `first` of `r`.
    pub fn from_sql_row(
        id: String,
        r: &rusqlite::Row<'_>,
        first: usize,
    ) -> rusqlite::Result<ConnMeta> {
        Ok(ConnMeta {
            id,
            start_ms: r.get(first)?,
            network: r.get(first + 1)?,
            conn_type: r.get(first + 2)?,
            source_ip: r.get(first + 3)?,
            source_port: r.get(first + 4)?,
            destination_ip: r.get(first + 5)?,
            destination_port: r.get(first + 6)?,
            source_geoip: r.get(first + 7)?,
            destination_geoip: r.get(first + 8)?,
            source_ip_asn: r.get(first + 9)?,
            destination_ip_asn: r.get(first + 10)?,
            inbound_ip: r.get(first + 11)?,
            inbound_port: r.get(first + 12)?,
            inbound_name: r.get(first + 13)?,
            inbound_user: r.get(first + 14)?,
            host: r.get(first + 15)?,
            dns_mode: r.get(first + 16)?,
            uid: r.get(first + 17)?,
            process: r.get(first + 18)?,
            process_path: r.get(first + 19)?,
            special_proxy: r.get(first + 20)?,
            special_rules: r.get(first + 21)?,
            remote_destination: r.get(first + 22)?,
            dscp: r.get(first + 23)?,
            sniff_host: r.get(first + 24)?,
            rematch_name: r.get(first + 25)?,
            chains: r.get(first + 26)?,
            provider_chains: r.get(first + 27)?,
            node: r.get(first + 28)?,
            policy: r.get(first + 29)?,
            rule: r.get(first + 30)?,
            rule_payload: r.get(first + 31)?,
        })
    }

    /// The fields, borrowed (one shape for the writer's rows and the master's parsed sync records).
    pub fn view(&self) -> MetaView<'_> {
        MetaView {
            id: &self.id,
            start_ms: self.start_ms,
            network: &self.network,
            conn_type: &self.conn_type,
            source_ip: &self.source_ip,
            source_port: &self.source_port,
            destination_ip: &self.destination_ip,
            destination_port: &self.destination_port,
            source_geoip: &self.source_geoip,
            destination_geoip: &self.destination_geoip,
            source_ip_asn: &self.source_ip_asn,
            destination_ip_asn: &self.destination_ip_asn,
            inbound_ip: &self.inbound_ip,
            inbound_port: &self.inbound_port,
            inbound_name: &self.inbound_name,
            inbound_user: &self.inbound_user,
            host: &self.host,
            dns_mode: &self.dns_mode,
            uid: self.uid,
            process: &self.process,
            process_path: &self.process_path,
            special_proxy: &self.special_proxy,
            special_rules: &self.special_rules,
            remote_destination: &self.remote_destination,
            dscp: self.dscp,
            sniff_host: &self.sniff_host,
            rematch_name: &self.rematch_name,
            chains: &self.chains,
            provider_chains: &self.provider_chains,
            node: &self.node,
            policy: &self.policy,
            rule: &self.rule,
            rule_payload: &self.rule_payload,
        }
    }
}

/// [`ConnMeta`]'s fields, borrowed: what the writers bind ([`ConnMeta::view`], `ingest::RowMeta::view`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaView<'a> {
    pub id: &'a str,
    pub start_ms: i64,
    pub network: &'a str,
    pub conn_type: &'a str,
    pub source_ip: &'a str,
    pub source_port: &'a str,
    pub destination_ip: &'a str,
    pub destination_port: &'a str,
    pub source_geoip: &'a str,
    pub destination_geoip: &'a str,
    pub source_ip_asn: &'a str,
    pub destination_ip_asn: &'a str,
    pub inbound_ip: &'a str,
    pub inbound_port: &'a str,
    pub inbound_name: &'a str,
    pub inbound_user: &'a str,
    pub host: &'a str,
    pub dns_mode: &'a str,
    pub uid: i64,
    pub process: &'a str,
    pub process_path: &'a str,
    pub special_proxy: &'a str,
    pub special_rules: &'a str,
    pub remote_destination: &'a str,
    pub dscp: i64,
    pub sniff_host: &'a str,
    pub rematch_name: &'a str,
    pub chains: &'a str,
    pub provider_chains: &'a str,
    pub node: &'a str,
    pub policy: &'a str,
    pub rule: &'a str,
    pub rule_payload: &'a str,
}

impl MetaView<'_> {
    /// The values of [`ConnMeta::SQL_COLUMNS`], to bind.
    pub fn sql_values(&self) -> [&dyn rusqlite::ToSql; 32] {
        [
            &self.start_ms,
            &self.network,
            &self.conn_type,
            &self.source_ip,
            &self.source_port,
            &self.destination_ip,
            &self.destination_port,
            &self.source_geoip,
            &self.destination_geoip,
            &self.source_ip_asn,
            &self.destination_ip_asn,
            &self.inbound_ip,
            &self.inbound_port,
            &self.inbound_name,
            &self.inbound_user,
            &self.host,
            &self.dns_mode,
            &self.uid,
            &self.process,
            &self.process_path,
            &self.special_proxy,
            &self.special_rules,
            &self.remote_destination,
            &self.dscp,
            &self.sniff_host,
            &self.rematch_name,
            &self.chains,
            &self.provider_chains,
            &self.node,
            &self.policy,
            &self.rule,
            &self.rule_payload,
        ]
    }
}

/// `?1, ?2, ... ?n`: the placeholders of an insert.
pub fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
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
