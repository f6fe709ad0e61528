//! This node's upload and download bandwidth, measured rather than declared: hivemind
//! trusts the numbers volunteers type in; we probe, keep a running estimate, and use the
//! volunteer's configured cap only as an upper bound.
//!
//! A probe streams bulk requests to (upload) or from (download) several peers at once for a
//! fixed time and divides the bytes that completed by the time taken. Several peers at once,
//! because one peer's link may be slower than ours; the estimate is the aggregate, which is
//! what an all-reduce (which talks to everyone at once) will see.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use colony_protocol::Request;
use colony_protocol::names::MAX_PROBE_BYTES;
use libp2p::PeerId;
use tokio::time::Instant;

use crate::handle::NodeHandle;

/// Which way a probe measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
}

/// An exponentially weighted running estimate, capped.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Estimate {
    value: Option<f64>,
    /// The volunteer's declared limit, bytes per second.
    pub cap: Option<f64>,
}

impl Estimate {
    /// Weight of a new sample.
    pub const ALPHA: f64 = 0.5;

    pub fn with_cap(cap: Option<f64>) -> Self {
        Self { value: None, cap }
    }

    /// Folds in one measurement (bytes per second); non-positive or non-finite ones are
    /// ignored.
    pub fn observe(&mut self, sample: f64) {
        if !(sample.is_finite() && sample > 0.0) {
            return;
        }
        self.value = Some(match self.value {
            None => sample,
            Some(v) => v + Self::ALPHA * (sample - v),
        });
    }

    /// The estimate, capped; the cap alone before any measurement; None when neither.
    pub fn get(&self) -> Option<f64> {
        match (self.value, self.cap) {
            (Some(v), Some(c)) => Some(v.min(c)),
            (v, c) => v.or(c),
        }
    }
}

/// Measures this node's bandwidth in `dir` against `peers` (all at once) for `duration`;
/// bytes per second, or None if nothing got through.
pub async fn probe(
    h: &NodeHandle,
    peers: &[PeerId],
    dir: Direction,
    duration: Duration,
    chunk: usize,
) -> Option<f64> {
    let chunk = chunk.clamp(1, MAX_PROBE_BYTES);
    let moved = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let stop = t0 + duration;
    // Two requests in flight per peer keep each link busy across round trips.
    let tasks: Vec<_> = peers
        .iter()
        .flat_map(|&peer| [peer, peer])
        .map(|peer| {
            let (h, moved) = (h.clone(), moved.clone());
            tokio::spawn(async move {
                while Instant::now() < stop {
                    let req = match dir {
                        Direction::Up => Request::Probe {
                            payload: vec![0xa5; chunk],
                            echo: 0,
                        },
                        Direction::Down => Request::Probe {
                            payload: Vec::new(),
                            echo: chunk as u32,
                        },
                    };
                    match h.rpc(peer, Vec::new(), req).await {
                        Ok(colony_protocol::Response::Probe { .. }) => {
                            moved.fetch_add(chunk as u64, Ordering::Relaxed);
                        }
                        _ => return,
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let bytes = moved.load(Ordering::Relaxed) as f64;
    (bytes > 0.0 && secs > 0.0).then(|| bytes / secs)
}

#[cfg(test)]
mod tests {
    use super::Estimate;

    #[test]
    fn estimate_is_a_capped_running_mean() {
        let mut e = Estimate::with_cap(Some(100.0));
        assert_eq!(e.get(), Some(100.0), "the cap before any sample");
        e.observe(40.0);
        assert_eq!(e.get(), Some(40.0));
        e.observe(80.0);
        assert_eq!(e.get(), Some(60.0));
        e.observe(f64::NAN);
        e.observe(-3.0);
        assert_eq!(e.get(), Some(60.0), "bad samples are ignored");
        e.observe(1000.0);
        assert_eq!(e.get(), Some(100.0), "never above the cap");
        assert_eq!(Estimate::default().get(), None);
    }
}
