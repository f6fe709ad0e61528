//! The daemon's one source of wall-clock time for protocol rules (DHT expirations are
//! absolute Unix milliseconds, as in hivemind).

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
