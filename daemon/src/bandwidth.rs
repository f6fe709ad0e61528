//! This node's upload and download bandwidth, measured rather than declared: hivemind
//! trusts the numbers volunteers type in; we probe, keep a running estimate, and use the
//! volunteer's configured cap only as an upper bound.
//!
//! [`Monitor`] holds the estimates and the policy: probe when there is no measurement, when
//! the last probe is older than `max_age`, or when a round ran much slower than its plan
//! (our numbers may be stale); otherwise real all-reduce transfers keep the estimates up to
//! date. A round's bytes over its duration are a *lower* bound on a link's capacity (a fast
//! peer's sends are often limited by slower receivers), so transfers only ever raise an
//! estimate; lowering it is the probe's job. Per-peer rates from the same transfers are kept
//! too (what each member delivered to us and took from us), for operators and diagnostics.
//!
//! A probe streams bulk requests to (upload) or from (download) several peers at once for a
//! fixed time and divides the bytes that completed by the time taken. Several peers at once,
//! because one peer's link may be slower than ours; the estimate is the aggregate, which is
//! what an all-reduce (which talks to everyone at once) will see.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use colony_protocol::Request;
use colony_protocol::names::MAX_PROBE_BYTES;
use libp2p::PeerId;
use tokio::time::Instant;

use crate::allreduce::Transfers;
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

    /// Folds in a lower bound on the capacity: only a sample above the current measurement
    /// moves it (up); the first one sets it.
    pub fn observe_at_least(&mut self, sample: f64) {
        if self.value.is_none_or(|v| sample > v) {
            self.observe(sample);
        }
    }

    /// Whether anything has been measured (the cap alone does not count).
    pub fn measured(&self) -> bool {
        self.value.is_some()
    }

    /// The estimate, capped; the cap alone before any measurement; None when neither.
    pub fn get(&self) -> Option<f64> {
        match (self.value, self.cap) {
            (Some(v), Some(c)) => Some(v.min(c)),
            (v, c) => v.or(c),
        }
    }
}

/// Rates seen with one peer in all-reduce rounds, bytes per second (running means).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PeerRate {
    /// What it acknowledged from us.
    pub to: Estimate,
    /// What it delivered to us.
    pub from: Estimate,
    /// Rounds in which we exchanged data with it.
    pub rounds: u64,
    /// The monitor's round count when it was last seen.
    last_seen: u64,
}

/// This node's bandwidth estimates and when to measure them again; see the module docs.
#[derive(Clone, Debug)]
pub struct Monitor {
    pub up: Estimate,
    pub down: Estimate,
    /// Re-probe after this long even if rounds go to plan.
    pub max_age: Duration,
    probed_at: Option<Instant>,
    probe_due: bool,
    /// Rounds observed.
    rounds: u64,
    peers: HashMap<PeerId, PeerRate>,
}

impl Monitor {
    /// Transfers smaller than this say little about a link (latency dominates).
    pub const MIN_BYTES: u64 = 1 << 20;
    /// A round this many times slower than its plan (plus a second) asks for a new probe.
    pub const SLOW_ROUND: f64 = 1.5;
    /// Peers remembered at most (the least recently seen are forgotten).
    pub const MAX_PEERS: usize = 4096;

    /// Caps are the volunteer's declared limits, bytes per second.
    pub fn new(cap_up: Option<f64>, cap_down: Option<f64>) -> Self {
        Self {
            up: Estimate::with_cap(cap_up),
            down: Estimate::with_cap(cap_down),
            max_age: Duration::from_secs(3600),
            probed_at: None,
            probe_due: false,
            rounds: 0,
            peers: HashMap::new(),
        }
    }

    /// Whether to probe before the next round.
    pub fn needs_probe(&self, now: Instant) -> bool {
        !self.up.measured()
            || !self.down.measured()
            || self.probe_due
            || self
                .probed_at
                .is_none_or(|t| now.saturating_duration_since(t) > self.max_age)
    }

    /// Folds in a probe's results (None: nothing got through that way).
    pub fn after_probe(&mut self, up: Option<f64>, down: Option<f64>, now: Instant) {
        if let Some(u) = up {
            self.up.observe(u);
        }
        if let Some(d) = down {
            self.down.observe(d);
        }
        self.probed_at = Some(now);
        self.probe_due = false;
    }

    /// Probes against `peers`: upload, then download, `each` long, 64 KiB requests.
    pub async fn probe(&mut self, h: &NodeHandle, peers: &[PeerId], each: Duration) {
        let up = probe(h, peers, Direction::Up, each, 64 * 1024).await;
        let down = probe(h, peers, Direction::Down, each, 64 * 1024).await;
        self.after_probe(up, down, Instant::now());
    }

    /// [`Self::probe`] if [`Self::needs_probe`].
    pub async fn probe_if_due(&mut self, h: &NodeHandle, peers: &[PeerId], each: Duration) {
        if !peers.is_empty() && self.needs_probe(Instant::now()) {
            self.probe(h, peers, each).await;
        }
    }

    /// Folds in what a round moved: totals raise this node's estimates, per-member
    /// figures update the per-peer rates; a round far slower than planned asks for a probe.
    pub fn observe_round(&mut self, t: &Transfers) {
        self.rounds += 1;
        let rate = |(bytes, secs): (u64, f64)| {
            (bytes >= Self::MIN_BYTES && secs > 0.0).then(|| bytes as f64 / secs)
        };
        if let Some(r) = rate(Transfers::total(&t.sent)) {
            self.up.observe_at_least(r);
        }
        if let Some(r) = rate(Transfers::total(&t.received)) {
            self.down.observe_at_least(r);
        }
        for (k, peer) in t.members.iter().enumerate() {
            let to = t.sent.get(k).copied().and_then(rate);
            let from = t.received.get(k).copied().and_then(rate);
            if to.is_none() && from.is_none() {
                continue;
            }
            let e = self.peers.entry(*peer).or_default();
            e.rounds += 1;
            e.last_seen = self.rounds;
            e.to.observe(to.unwrap_or(f64::NAN));
            e.from.observe(from.unwrap_or(f64::NAN));
        }
        if self.peers.len() > Self::MAX_PEERS {
            // Forget the peers seen longest ago.
            let mut seen: Vec<(u64, PeerId)> =
                self.peers.iter().map(|(p, r)| (r.last_seen, *p)).collect();
            seen.sort_unstable();
            for (_, p) in &seen[..self.peers.len() - Self::MAX_PEERS] {
                self.peers.remove(p);
            }
        }
        if t.predicted_s > 0.0 && t.secs > Self::SLOW_ROUND * t.predicted_s + 1.0 {
            self.probe_due = true;
        }
    }

    /// The estimates, for the API and the dashboard.
    pub fn view(&self) -> crate::telemetry::BandwidthView {
        let finite = |x: Option<f64>| x.filter(|v| v.is_finite());
        crate::telemetry::BandwidthView {
            up_bps: finite(self.up.get()),
            down_bps: finite(self.down.get()),
            peers: self
                .peers
                .iter()
                .map(|(p, r)| {
                    (
                        p.to_string(),
                        crate::telemetry::PeerBandwidth {
                            to_bps: finite(r.to.get()),
                            from_bps: finite(r.from.get()),
                            rounds: r.rounds,
                        },
                    )
                })
                .collect(),
        }
    }

    /// Rates seen with `peer`, if any round exchanged enough data with it.
    pub fn peer(&self, peer: &PeerId) -> Option<PeerRate> {
        self.peers.get(peer).copied()
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
    use std::time::Duration;

    use libp2p::PeerId;
    use tokio::time::Instant;

    use super::{Estimate, Monitor};
    use crate::allreduce::Transfers;

    const MIB: u64 = 1 << 20;

    fn round(
        sent: Vec<(u64, f64)>,
        received: Vec<(u64, f64)>,
        secs: f64,
        predicted_s: f64,
    ) -> Transfers {
        let members = (0..sent.len()).map(|_| PeerId::random()).collect();
        Transfers {
            secs,
            predicted_s,
            sent,
            received,
            members,
        }
    }

    #[test]
    fn monitor_probes_when_it_has_nothing_is_stale_or_a_round_ran_slow() {
        let t0 = Instant::now();
        let mut m = Monitor::new(Some(50e6), None);
        assert!(m.needs_probe(t0), "a cap is not a measurement");
        m.after_probe(Some(10e6), None, t0);
        assert!(m.needs_probe(t0), "no download measurement yet");
        m.after_probe(None, Some(20e6), t0);
        assert!(!m.needs_probe(t0));
        assert!(
            m.needs_probe(t0 + m.max_age + Duration::from_secs(1)),
            "stale"
        );
        // On plan (20 s predicted, 25 s taken): no probe.
        m.observe_round(&round(vec![(0, 0.0)], vec![(0, 0.0)], 25.0, 20.0));
        assert!(!m.needs_probe(t0));
        // Far slower than planned.
        m.observe_round(&round(vec![(0, 0.0)], vec![(0, 0.0)], 40.0, 20.0));
        assert!(m.needs_probe(t0));
        m.after_probe(Some(10e6), Some(20e6), t0);
        assert!(!m.needs_probe(t0), "a probe answers it");
    }

    #[test]
    fn transfers_only_raise_the_estimates_and_feed_per_peer_rates() {
        let t0 = Instant::now();
        let mut m = Monitor::new(Some(30e6), None);
        m.after_probe(Some(10e6), Some(20e6), t0);
        // 40 MiB sent over 2 s (to two members), 20 MiB received in 4 s.
        let t = round(
            vec![(30 * MIB, 2.0), (10 * MIB, 1.5)],
            vec![(10 * MIB, 4.0), (10 * MIB, 3.0)],
            4.0,
            0.0,
        );
        m.observe_round(&t);
        let up = 40.0 * MIB as f64 / 2.0;
        assert_eq!(m.up.get(), Some((10e6 + 0.5 * (up - 10e6)).min(30e6)));
        assert_eq!(
            m.down.get(),
            Some(20e6),
            "5.2 MB/s received is below the estimate"
        );
        let p0 = m.peer(&t.members[0]).expect("rates for member 0");
        assert_eq!(p0.to.get(), Some(15.0 * MIB as f64));
        assert_eq!(p0.from.get(), Some(2.5 * MIB as f64));
        assert_eq!(p0.rounds, 1);
        // Small transfers say nothing.
        let mut quiet = Monitor::new(None, None);
        let t = round(vec![(MIB / 2, 0.1)], vec![(MIB / 2, 0.1)], 0.2, 0.0);
        quiet.observe_round(&t);
        assert!(!quiet.up.measured() && !quiet.down.measured());
        assert!(quiet.peer(&t.members[0]).is_none());
    }

    #[test]
    fn monitor_forgets_the_peers_seen_longest_ago() {
        let mut m = Monitor::new(None, None);
        let mut first = None;
        for _ in 0..=Monitor::MAX_PEERS {
            let t = round(vec![(2 * MIB, 1.0)], vec![(2 * MIB, 1.0)], 1.0, 0.0);
            first.get_or_insert(t.members[0]);
            m.observe_round(&t);
        }
        assert!(m.peer(&first.unwrap()).is_none());
        assert_eq!(m.peers.len(), Monitor::MAX_PEERS);
    }

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
