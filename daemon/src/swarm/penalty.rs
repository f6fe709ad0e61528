//! Misbehaving peers: strikes for each offence, a temporary ban after too many.
//!
//! Pure bookkeeping on a caller-supplied clock; the swarm actor turns bans into libp2p's
//! block list (which closes the peer's connections and refuses new ones).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

#[derive(Clone, Copy, Debug)]
pub struct PenaltyConfig {
    /// Strikes within `window` that earn a ban.
    pub strikes_to_ban: u32,
    pub window: Duration,
    pub ban: Duration,
    /// The ban of a peer caught poisoning data (NaN or outlier gradients): at once, and long
    /// enough to outlast a training run's session.
    pub byzantine_ban: Duration,
}

impl Default for PenaltyConfig {
    fn default() -> Self {
        Self {
            strikes_to_ban: 3,
            window: Duration::from_secs(600),
            ban: Duration::from_secs(600),
            byzantine_ban: Duration::from_secs(24 * 3600),
        }
    }
}

/// What an offence led to.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Warned { strikes: u32 },
    Banned { until: Instant },
}

#[derive(Debug, Default)]
pub struct Penalties {
    config: PenaltyConfig,
    strikes: HashMap<PeerId, (u32, Instant)>,
    banned: HashMap<PeerId, Instant>,
    total_offences: u64,
}

impl Penalties {
    pub fn new(config: PenaltyConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// Records one offence by `peer` at `now`.
    pub fn offence(&mut self, peer: PeerId, now: Instant) -> Verdict {
        self.total_offences += 1;
        let slot = self.strikes.entry(peer).or_insert((0, now));
        if now.duration_since(slot.1) > self.config.window {
            *slot = (0, now);
        }
        slot.0 += 1;
        if slot.0 >= self.config.strikes_to_ban {
            self.strikes.remove(&peer);
            // A longer ban in force (poisoned data) is not shortened.
            let until = now + self.config.ban;
            let until = self.banned.get(&peer).map_or(until, |u| (*u).max(until));
            self.banned.insert(peer, until);
            Verdict::Banned { until }
        } else {
            Verdict::Warned { strikes: slot.0 }
        }
    }

    /// Bans `peer` at once for [`PenaltyConfig::byzantine_ban`] (it sent poisoned data).
    pub fn byzantine(&mut self, peer: PeerId, now: Instant) -> Verdict {
        self.total_offences += 1;
        self.strikes.remove(&peer);
        let until = now + self.config.byzantine_ban;
        let until = self.banned.get(&peer).map_or(until, |u| (*u).max(until));
        self.banned.insert(peer, until);
        Verdict::Banned { until }
    }

    pub fn is_banned(&self, peer: &PeerId, now: Instant) -> bool {
        self.banned.get(peer).is_some_and(|until| *until > now)
    }

    /// Removes expired bans and returns the peers to unblock.
    pub fn expire(&mut self, now: Instant) -> Vec<PeerId> {
        let done: Vec<PeerId> = self
            .banned
            .iter()
            .filter(|(_, u)| **u <= now)
            .map(|(p, _)| *p)
            .collect();
        for p in &done {
            self.banned.remove(p);
        }
        done
    }

    pub fn banned(&self) -> impl Iterator<Item = &PeerId> {
        self.banned.keys()
    }

    pub fn strikes(&self, peer: &PeerId) -> u32 {
        self.strikes.get(peer).map_or(0, |s| s.0)
    }

    pub fn total_offences(&self) -> u64 {
        self.total_offences
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strikes_then_ban_then_expiry() {
        let mut p = Penalties::default();
        let peer = PeerId::random();
        let t0 = Instant::now();
        assert_eq!(p.offence(peer, t0), Verdict::Warned { strikes: 1 });
        assert_eq!(p.offence(peer, t0), Verdict::Warned { strikes: 2 });
        assert!(matches!(p.offence(peer, t0), Verdict::Banned { .. }));
        assert!(p.is_banned(&peer, t0));
        assert!(p.expire(t0 + Duration::from_secs(1)).is_empty());
        assert_eq!(p.expire(t0 + Duration::from_secs(601)), vec![peer]);
        assert!(!p.is_banned(&peer, t0 + Duration::from_secs(601)));
    }

    #[test]
    fn poisoned_data_bans_at_once_for_a_day() {
        let mut p = Penalties::default();
        let peer = PeerId::random();
        let t0 = Instant::now();
        assert!(matches!(p.byzantine(peer, t0), Verdict::Banned { .. }));
        assert!(p.is_banned(&peer, t0 + Duration::from_secs(3600)));
        assert!(p.expire(t0 + Duration::from_secs(3600)).is_empty());
        assert_eq!(
            p.expire(t0 + Duration::from_secs(24 * 3600 + 1)),
            vec![peer]
        );
        // A later ordinary ban does not shorten it.
        let mut p = Penalties::default();
        p.byzantine(peer, t0);
        for _ in 0..3 {
            p.offence(peer, t0);
        }
        assert!(p.is_banned(&peer, t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn old_strikes_are_forgotten() {
        let mut p = Penalties::default();
        let peer = PeerId::random();
        let t0 = Instant::now();
        p.offence(peer, t0);
        p.offence(peer, t0);
        assert_eq!(
            p.offence(peer, t0 + Duration::from_secs(700)),
            Verdict::Warned { strikes: 1 }
        );
    }
}
