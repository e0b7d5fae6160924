//! A master's WAL checkpointer: a thread with its own connection that copies committed WAL pages into the
//! database file, so the writer thread does not.
//!
//! SQLite's automatic checkpoint runs inside the commit that passes `wal_autocheckpoint`, on the committing
//! thread: on a master taking sync batches that was a fifth of the writer's time (copying every page the
//! batches dirtied a second time, and two fsyncs), while the other core waited. Here the writer only appends
//! to the WAL, and this thread runs `PASSIVE` checkpoints (they never block the writer or the readers) every
//! [`BUSY_EVERY`] while commits come in, every [`IDLE_EVERY`] otherwise.
//!
//! The WAL stays bounded: the writer keeps an automatic checkpoint at a higher mark ([`WAL_CAP_PAGES`]), so
//! when this thread falls behind (readers pinning old snapshots, a slow disk) the writer checkpoints itself
//! as before. On stop (and drop) the thread runs a last checkpoint and closes its connection; the last
//! connection to close checkpoints and removes the WAL, as SQLite always does.

use crate::error::{Error, Result};
use rusqlite::{Connection, OpenFlags};
use std::path::Path;
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::Duration;

/// Checkpoint this often while the WAL keeps growing.
pub const BUSY_EVERY: Duration = Duration::from_millis(10);
/// ... and this often when the last checkpoint found nothing new.
pub const IDLE_EVERY: Duration = Duration::from_secs(1);
/// The writer's own `wal_autocheckpoint` next to a checkpointer (pages of 4 KiB: 128 MiB of WAL).
pub const WAL_CAP_PAGES: i64 = 32_768;

/// The running checkpointer; stopping or dropping it ends the thread after a last checkpoint.
pub struct Checkpointer {
    stop: Option<SyncSender<()>>,
    handle: Option<JoinHandle<()>>,
}

/// `PRAGMA wal_checkpoint(PASSIVE)`: (frames in the WAL, frames copied into the database so far).
fn passive(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

impl Checkpointer {
    /// Opens a connection of its own to `db` (already created and migrated by the writer) and starts the
    /// thread.
    pub fn spawn(db: &Path) -> Result<Checkpointer> {
        let name = db.display().to_string();
        let conn = Connection::open_with_flags(
            db,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(Error::db(format!("open {name} for checkpoints")))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(Error::db("busy_timeout"))?;
        // it reads WAL frames and writes them to the file: no need for a page cache of its own
        conn.execute_batch("PRAGMA cache_size = -64; PRAGMA synchronous = NORMAL;")
            .map_err(Error::db("checkpointer pragmas"))?;
        let (stop, rx) = sync_channel::<()>(1);
        let handle = std::thread::Builder::new()
            .name("checkpoint".into())
            .stack_size(128 << 10)
            .spawn(move || {
                let mut last = (0, 0);
                let mut failing = false;
                let mut wait = IDLE_EVERY;
                // until stop is asked or the owner is gone
                while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(wait) {
                    match passive(&conn) {
                        Ok(now) => {
                            if failing {
                                crate::info!("checkpoint: works again");
                                failing = false;
                            }
                            wait = if now != last { BUSY_EVERY } else { IDLE_EVERY };
                            last = now;
                        }
                        Err(e) => {
                            // the writer's own checkpoint at WAL_CAP_PAGES still bounds the WAL
                            if !failing {
                                crate::warn!("checkpoint: cannot checkpoint the WAL ({e}); the writer will, past {WAL_CAP_PAGES} pages");
                                failing = true;
                            }
                            wait = IDLE_EVERY;
                        }
                    }
                }
                if let Err(e) = passive(&conn) {
                    crate::debug!("checkpoint: last checkpoint: {e}");
                }
            })
            .map_err(Error::io("spawn thread checkpoint"))?;
        Ok(Checkpointer {
            stop: Some(stop),
            handle: Some(handle),
        })
    }

    /// Runs a last checkpoint, closes the connection and waits for the thread.
    pub fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.try_send(());
        }
        if let Some(h) = self.handle.take() {
            if h.join().is_err() {
                crate::error!("checkpoint thread panicked");
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With the writer's automatic checkpoint off, the thread copies the WAL into the database file while
    /// the writer keeps its connection, and the data is there for a reader of the file alone.
    #[test]
    fn copies_the_wal_into_the_database_file() {
        let dir = std::env::temp_dir().join(format!("mct-checkpoint-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.db");
        let writer = crate::store::open(&path, crate::store::Access::Write).unwrap();
        writer
            .execute_batch("PRAGMA wal_autocheckpoint = 0;")
            .unwrap();
        let ck = Checkpointer::spawn(&path).unwrap();
        writer
            .execute_batch(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
                 INSERT INTO meta (key, value) SELECT 'k' || i, hex(randomblob(100)) FROM n;",
            )
            .unwrap();
        // Only a checkpoint writes pages into the database file, and nothing but the thread checkpoints here:
        // the file growing to hold the rows (200 KB of values) is the thread's work. Its first check comes
        // after IDLE_EVERY.
        let size = || std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let before = size();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while size() < before + 200_000 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            size() >= before + 200_000,
            "database file {} bytes, was {before}",
            size()
        );
        ck.stop();
        drop(writer);
        // the WAL is gone with the last connection; the rows are in the file
        assert!(!dir.join("c.db-wal").exists());
        let c = Connection::open(&path).unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM meta WHERE key LIKE 'k%'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, 2000);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
