//! Devices by name: maps a source IP to a MAC address and a host name from the router's own tables,
//! `/proc/net/arp` and dnsmasq's leases file (`/tmp/dhcp.leases` on OpenWrt). Read lazily and cached for a
//! minute; a missing file just means no names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What we know of one device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Device {
    pub mac: String,
    pub name: String,
}

/// IP → device.
pub type DeviceTable = HashMap<String, Device>;

/// Parses `/proc/net/arp` (incomplete entries, MAC 00:00:..., are skipped).
pub fn parse_arp(text: &str, table: &mut DeviceTable) {
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 4 && f[3] != "00:00:00:00:00:00" {
            table.entry(f[0].to_string()).or_default().mac = f[3].to_ascii_lowercase();
        }
    }
}

/// Parses dnsmasq leases: `EXPIRY MAC IP HOSTNAME CLIENT-ID` (hostname `*` when unknown; `duid` lines skipped).
pub fn parse_leases(text: &str, table: &mut DeviceTable) {
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 || f[0] == "duid" {
            continue;
        }
        let d = table.entry(f[2].to_string()).or_default();
        if d.mac.is_empty() && f[1].contains(':') {
            d.mac = f[1].to_ascii_lowercase();
        }
        if f[3] != "*" {
            d.name = f[3].to_string();
        }
    }
}

/// The router's tables, re-read at most once a minute.
#[derive(Debug)]
pub struct Devices {
    arp: Option<PathBuf>,
    leases: Option<PathBuf>,
    cache: Mutex<Option<(Instant, Arc<DeviceTable>)>>,
}

const REFRESH: Duration = Duration::from_secs(60);

impl Devices {
    /// Reads from these files (either may be absent).
    pub fn new(arp: Option<PathBuf>, leases: Option<PathBuf>) -> Devices {
        Devices {
            arp,
            leases,
            cache: Mutex::new(None),
        }
    }

    /// The defaults on a router: `/proc/net/arp` and `/tmp/dhcp.leases`.
    pub fn router_defaults() -> Devices {
        Devices::new(
            Some("/proc/net/arp".into()),
            Some("/tmp/dhcp.leases".into()),
        )
    }

    fn read(path: &Option<PathBuf>) -> String {
        path.as_deref()
            .map(Path::new)
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The current table (cached).
    pub fn table(&self) -> Arc<DeviceTable> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, t)) = cache.as_ref() {
            if at.elapsed() < REFRESH {
                return t.clone();
            }
        }
        let mut table = DeviceTable::new();
        parse_arp(&Self::read(&self.arp), &mut table);
        parse_leases(&Self::read(&self.leases), &mut table);
        let t = Arc::new(table);
        *cache = Some((Instant::now(), t.clone()));
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_and_leases() {
        let mut t = DeviceTable::new();
        parse_arp(
            "IP address       HW type     Flags       HW address            Mask     Device\n\
             192.168.1.20     0x1         0x2         AA:BB:CC:DD:EE:01     *        br-lan\n\
             192.168.1.99     0x1         0x0         00:00:00:00:00:00     *        br-lan\n",
            &mut t,
        );
        parse_leases(
            "1767225600 aa:bb:cc:dd:ee:01 192.168.1.20 laptop 01:aa:bb:cc:dd:ee:01\n\
             1767225600 aa:bb:cc:dd:ee:02 192.168.1.21 * *\n\
             duid 00:01:00:01:2c:aa\n",
            &mut t,
        );
        assert_eq!(
            t["192.168.1.20"],
            Device {
                mac: "aa:bb:cc:dd:ee:01".into(),
                name: "laptop".into()
            }
        );
        assert_eq!(
            t["192.168.1.21"],
            Device {
                mac: "aa:bb:cc:dd:ee:02".into(),
                name: "".into()
            }
        );
        assert!(!t.contains_key("192.168.1.99"));
    }

    #[test]
    fn missing_files_mean_no_names() {
        let d = Devices::new(Some("/nonexistent/arp".into()), None);
        assert!(d.table().is_empty());
    }
}
