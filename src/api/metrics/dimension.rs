//! The capped dimensions of the counters (agent, device, node, policy, rule, host): their names in
//! [`DIMENSIONS`], and per dimension a [`DimState`] that keeps the top N labels by bytes in their own series,
//! folds the rest into [`OTHER`] and makes every exported counter only grow (see the module doc of
//! [`super`]).

use crate::api::stats::Totals;
use std::collections::{BTreeMap, HashMap, HashSet};

/// The label value that collects everything beyond the top N of a dimension.
pub const OTHER: &str = "other";

/// The names of one capped dimension.
pub struct Dimension {
    /// Its key in the saved offsets (table `meta`).
    pub key: &'static str,
    /// Its families are `{prefix}_bytes_total` and `{prefix}_connections_total`.
    pub prefix: &'static str,
    /// The label that names a series.
    pub label: &'static str,
    /// How the help texts name it.
    pub what: &'static str,
}

/// Indexes of [`DIMENSIONS`] (and of the states kept for them).
pub const AGENT: usize = 0;
pub const DEVICE: usize = 1;
pub const NODE: usize = 2;
pub const POLICY: usize = 3;
pub const RULE: usize = 4;
pub const HOST: usize = 5;

/// Every dimension, in the order of their families; the host dimension only with `--metrics-hosts`.
pub const DIMENSIONS: [Dimension; 6] = [
    Dimension {
        key: "agent",
        prefix: "mct",
        label: "agent",
        what: "agent",
    },
    Dimension {
        key: "device",
        prefix: "mct_device",
        label: "device",
        what: "device (source IP)",
    },
    Dimension {
        key: "node",
        prefix: "mct_node",
        label: "node",
        what: "exit node",
    },
    Dimension {
        key: "policy",
        prefix: "mct_policy",
        label: "policy",
        what: "policy group",
    },
    Dimension {
        key: "rule",
        prefix: "mct_rule",
        label: "rule",
        what: "rule (`Type (payload)`)",
    },
    Dimension {
        key: "host",
        prefix: "mct_host",
        label: "host",
        what: "host (or destination IP)",
    },
];

/// The indexes of the dimensions exported (and saved): all but the host dimension unless `hosts`.
pub fn exported(hosts: bool) -> impl Iterator<Item = usize> {
    (0..DIMENSIONS.len()).filter(move |&i| hosts || i != HOST)
}

pub fn add(a: &mut Totals, b: Totals) {
    a.count += b.count;
    a.upload += b.upload;
    a.download += b.download;
}

/// One capped dimension: the raw totals per label at the last refresh, and the exported accumulators.
#[derive(Default, Debug)]
pub struct DimState {
    prev: HashMap<String, Totals>,
    exposed: HashMap<String, Totals>,
    /// The labels with their own series, by bytes descending.
    pub top: Vec<String>,
    /// Whether anything was ever folded into `other`.
    other: bool,
}

impl DimState {
    /// Takes fresh raw totals: each label's growth (never negative) goes to its series. True when some label
    /// went down (rows were deleted).
    pub fn update(&mut self, raw: HashMap<String, Totals>, max: usize) -> bool {
        let dropped = self.prev.iter().any(|(k, before)| {
            let now = raw.get(k).copied().unwrap_or_default();
            now.count < before.count || now.upload < before.upload || now.download < before.download
        });
        let mut order: Vec<(&String, i64)> = raw.iter().map(|(k, t)| (k, t.total())).collect();
        crate::api::stats::rank(&mut order);
        let top: Vec<String> = order.iter().take(max).map(|(k, _)| (*k).clone()).collect();
        let in_top: HashSet<&str> = top.iter().map(String::as_str).collect();
        for (label, now) in &raw {
            let before = self.prev.get(label).copied().unwrap_or_default();
            let growth = Totals {
                count: (now.count - before.count).max(0),
                upload: (now.upload - before.upload).max(0),
                download: (now.download - before.download).max(0),
            };
            let series = if in_top.contains(label.as_str()) {
                label.as_str()
            } else {
                self.other = true;
                OTHER
            };
            add(self.exposed.entry(series.to_string()).or_default(), growth);
        }
        // Labels that left the top N keep their accumulator (they may come back) until there are too many.
        if self.exposed.len() > 4 * max + 1 {
            self.exposed
                .retain(|k, _| k == OTHER || in_top.contains(k.as_str()));
        }
        self.top = top;
        self.prev = raw;
        dropped
    }

    /// Per exported series, what it carries beyond the raw totals of its members now (deleted rows, labels
    /// that moved): persisted so that a restart continues the counters instead of resetting them.
    pub fn offsets(&self) -> BTreeMap<String, [i64; 3]> {
        let mut members: HashMap<&str, Totals> = HashMap::new();
        for (label, t) in &self.prev {
            add(members.entry(self.series_of(label)).or_default(), *t);
        }
        self.series()
            .into_iter()
            .map(|(k, e)| {
                let r = members.get(k).copied().unwrap_or_default();
                (
                    k.to_string(),
                    [
                        e.count - r.count,
                        e.upload - r.upload,
                        e.download - r.download,
                    ],
                )
            })
            .filter(|(_, o)| *o != [0, 0, 0])
            .collect()
    }

    /// Adds offsets saved by an earlier process to the series that exist now (right after the first update).
    pub fn seed(&mut self, offsets: &BTreeMap<String, [i64; 3]>) {
        let series: Vec<String> = self.series().iter().map(|(k, _)| k.to_string()).collect();
        for k in series {
            if let Some(o) = offsets.get(&k) {
                let e = self.exposed.entry(k).or_default();
                // Offsets may be negative (a label promoted out of `other` starts its series low).
                e.count = (e.count + o[0]).max(0);
                e.upload = (e.upload + o[1]).max(0);
                e.download = (e.download + o[2]).max(0);
            }
        }
    }

    /// The exported series: (label, totals), top N by bytes, then `other`.
    pub fn series(&self) -> Vec<(&str, Totals)> {
        let mut out: Vec<(&str, Totals)> = self
            .top
            .iter()
            .filter(|k| k.as_str() != OTHER)
            .map(|k| (k.as_str(), self.exposed.get(k).copied().unwrap_or_default()))
            .collect();
        if self.other || self.top.iter().any(|k| k == OTHER) {
            out.push((OTHER, self.exposed.get(OTHER).copied().unwrap_or_default()));
        }
        out
    }

    /// The series a raw label is counted in now.
    pub fn series_of<'a>(&self, label: &'a str) -> &'a str {
        if self.top.iter().any(|k| k == label) {
            label
        } else {
            OTHER
        }
    }

    /// Counts per raw label (a gauge's, not an accumulator's) folded like this dimension's series: one entry
    /// per exported series (0 when none of its labels counts anything), then `other` if labels beyond them
    /// count something and no series collects them yet.
    pub fn fold_counts<'a>(&'a self, counts: &HashMap<String, Totals>) -> Vec<(&'a str, i64)> {
        let mut out: Vec<(&str, i64)> = self.series().iter().map(|(l, _)| (*l, 0)).collect();
        for (label, t) in counts {
            let s = self.series_of(label);
            match out.iter_mut().find(|(l, _)| *l == s) {
                Some(x) => x.1 += t.count,
                None => out.push((OTHER, t.count)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(count: i64, upload: i64, download: i64) -> Totals {
        Totals {
            count,
            upload,
            download,
        }
    }

    fn raw(v: &[(&str, Totals)]) -> HashMap<String, Totals> {
        v.iter().map(|(k, t)| (k.to_string(), *t)).collect()
    }

    #[test]
    fn folds_beyond_top_n_and_never_drops() {
        let mut d = DimState::default();
        d.update(
            raw(&[("a", t(1, 0, 100)), ("b", t(2, 0, 50)), ("c", t(3, 0, 10))]),
            2,
        );
        assert_eq!(
            d.series(),
            vec![
                ("a", t(1, 0, 100)),
                ("b", t(2, 0, 50)),
                (OTHER, t(3, 0, 10))
            ]
        );
        // Retention deleted rows of a (a drop) while c grew past b: nothing goes down, c's growth lands in
        // its new series and other keeps what it had.
        d.update(
            raw(&[("a", t(1, 0, 60)), ("b", t(2, 0, 50)), ("c", t(4, 0, 80))]),
            2,
        );
        assert_eq!(
            d.series(),
            vec![
                ("c", t(1, 0, 70)),
                ("a", t(1, 0, 100)),
                (OTHER, t(3, 0, 10))
            ]
        );
        // b is now folded: its growth goes to other.
        d.update(
            raw(&[("a", t(1, 0, 60)), ("b", t(3, 0, 55)), ("c", t(4, 0, 80))]),
            2,
        );
        assert_eq!(d.series()[2], (OTHER, t(4, 0, 15)));
    }

    #[test]
    fn offsets_carry_counters_over_a_restart() {
        let mut d = DimState::default();
        d.update(raw(&[("a", t(2, 0, 100)), ("b", t(1, 0, 10))]), 1);
        assert!(d.offsets().is_empty(), "nothing deleted yet");
        // a lost a row of 60 bytes.
        assert!(d.update(raw(&[("a", t(1, 0, 40)), ("b", t(1, 0, 10))]), 1));
        let saved = d.offsets();
        assert_eq!(saved.get("a"), Some(&[1, 0, 60]));
        // A new process sees only the live rows, and adds the offsets back.
        let mut restarted = DimState::default();
        assert!(!restarted.update(raw(&[("a", t(1, 0, 40)), ("b", t(1, 0, 10))]), 1));
        restarted.seed(&saved);
        assert_eq!(restarted.series(), d.series());
        assert_eq!(restarted.series()[0], ("a", t(2, 0, 100)));
    }

    #[test]
    fn gauges_fold_like_the_series() {
        let mut d = DimState::default();
        d.update(raw(&[("a", t(1, 0, 100)), ("b", t(1, 0, 50))]), 1);
        // b is folded into other; c (never seen by the counters) lands there too; a counts 0.
        let open = raw(&[("b", t(2, 0, 0)), ("c", t(3, 0, 0))]);
        assert_eq!(d.fold_counts(&open), vec![("a", 0), (OTHER, 5)]);
        // Without any folded label yet, a gauge beyond the series still gets an `other` entry.
        let mut d = DimState::default();
        d.update(raw(&[("a", t(1, 0, 100))]), 1);
        assert_eq!(d.fold_counts(&open), vec![("a", 0), (OTHER, 5)]);
    }
}
