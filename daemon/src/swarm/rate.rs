//! Per-peer rate limits on inbound RPC requests: a token bucket per connected peer (`rate`
//! requests per second, bursts of `burst`). Bandwidth probes and state-download chunks are not
//! counted (they are bounded by the streams in flight and are how a peer measures links and
//! catches up); everything else is. Pure bookkeeping on a caller-supplied clock.

use std::collections::HashMap;
use std::time::Instant;

use libp2p::PeerId;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    /// Requests refused since the last offence was reported.
    refused: u64,
}

/// What to do with one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Refuse it; `offence`: the peer has now been refused `burst` requests since the last
    /// report (a sustained flood), so count an offence too.
    No {
        offence: bool,
    },
}

#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    peers: HashMap<PeerId, Bucket>,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate: rate.max(0.0),
            burst: burst.max(1.0),
            peers: HashMap::new(),
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn admit(&mut self, peer: PeerId, now: Instant) -> Admit {
        let burst = self.burst;
        let b = self.peers.entry(peer).or_insert(Bucket {
            tokens: burst,
            last: now,
            refused: 0,
        });
        let dt = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + dt * self.rate).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Admit::Yes
        } else {
            b.refused += 1;
            let offence = b.refused as f64 >= burst;
            if offence {
                b.refused = 0;
            }
            Admit::No { offence }
        }
    }

    /// The peer disconnected: its bucket goes (it starts full when it comes back).
    pub fn forget(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_then_the_rate_and_a_sustained_flood_is_an_offence() {
        let mut r = RateLimiter::new(10.0, 20.0);
        let (p, q) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        for _ in 0..20 {
            assert_eq!(r.admit(p, t0), Admit::Yes);
        }
        assert_eq!(r.admit(p, t0), Admit::No { offence: false });
        // Another peer has its own bucket.
        assert_eq!(r.admit(q, t0), Admit::Yes);
        // 0.5 s later: 5 more.
        let t1 = t0 + Duration::from_millis(500);
        for _ in 0..5 {
            assert_eq!(r.admit(p, t1), Admit::Yes);
        }
        assert_eq!(r.admit(p, t1), Admit::No { offence: false });
        // 20 refusals in all make one offence.
        let mut offences = 0;
        for _ in 0..38 {
            if r.admit(p, t1) == (Admit::No { offence: true }) {
                offences += 1;
            }
        }
        assert_eq!(offences, 2);
        r.forget(&p);
        assert_eq!(r.admit(p, t1), Admit::Yes);
    }
}
