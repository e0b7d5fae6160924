//! The agent's id: stable across restarts, never a fresh random one (the earlier tool's defect).
//!
//! `--agent-id` wins and is remembered in table `meta` (key [`AGENT_ID_KEY`]); without the flag the
//! remembered id is used; on first start it is the host name (`/proc/sys/kernel/hostname`, then
//! `/etc/hostname`, then `"agent"`), remembered so that renaming the host later does not split the data.

use crate::error::{Error, Result};
use rusqlite::{params, Connection, OptionalExtension};

/// Key of the remembered id in table `meta`.
pub const AGENT_ID_KEY: &str = "agent_id";

/// Picks the agent id and remembers it. Call once on the writable connection before the writer starts.
pub fn resolve_agent_id(conn: &rusqlite::Connection, flag: Option<&str>) -> Result<String> {
    resolve_with(conn, flag, host_name)
}

fn resolve_with(
    conn: &Connection,
    flag: Option<&str>,
    host: impl FnOnce() -> String,
) -> Result<String> {
    let stored: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            params![AGENT_ID_KEY],
            |r| r.get(0),
        )
        .optional()
        .map_err(Error::db("read agent id"))?;
    let id = match flag {
        Some(f) => {
            let f = f.trim();
            if f.is_empty() {
                return Err(Error::Usage("--agent-id must not be empty".into()));
            }
            if let Some(old) = stored.as_deref().filter(|o| *o != f) {
                crate::info!("agent id changed from {old:?} to {f:?} (--agent-id)");
            }
            f.to_string()
        }
        None => match stored.filter(|s| !s.trim().is_empty()) {
            Some(s) => return Ok(s),
            None => host(),
        },
    };
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![AGENT_ID_KEY, id],
    )
    .map_err(Error::db("remember agent id"))?;
    Ok(id)
}

/// The host name, or `"agent"` when none can be read.
pub fn host_name() -> String {
    for path in ["/proc/sys/kernel/hostname", "/etc/hostname"] {
        if let Ok(s) = std::fs::read_to_string(path) {
            let s = s.trim();
            if !s.is_empty() && s != "(none)" && s != "localhost" {
                return s.to_string();
            }
        }
    }
    "agent".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(name: &str) -> Connection {
        let dir = std::env::temp_dir().join(format!("mct-agentid-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        crate::store::open(&dir.join("a.db"), crate::store::Access::Write).unwrap()
    }

    #[test]
    fn host_name_is_remembered_and_the_flag_wins() {
        let c = db("remember");
        assert_eq!(
            resolve_with(&c, None, || "router1".into()).unwrap(),
            "router1"
        );
        // the host was renamed: the remembered id stays
        assert_eq!(
            resolve_with(&c, None, || "router2".into()).unwrap(),
            "router1"
        );
        // the flag wins and is remembered
        assert_eq!(
            resolve_with(&c, Some(" lab "), || "x".into()).unwrap(),
            "lab"
        );
        assert_eq!(resolve_with(&c, None, || "x".into()).unwrap(), "lab");
        assert!(resolve_with(&c, Some("  "), || "x".into()).is_err());
        assert!(!host_name().is_empty());
    }
}
