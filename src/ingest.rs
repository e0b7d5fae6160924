//! Placeholder for `POST /api/v1/sync` (built on another branch; the integrator replaces this file).

use crate::store::WriteCmd;
use std::sync::mpsc::SyncSender;

/// Stores an agent's upload; `Ok` is the envelope's `data`, `Err` a status and message.
pub fn handle_sync(
    _body: &[u8],
    _writer: &SyncSender<WriteCmd>,
    _now_ms: i64,
) -> Result<serde_json::Value, (u16, String)> {
    Err((501, "sync not built yet".into()))
}
