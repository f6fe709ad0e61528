//! The swarm's progress towards the next global step, from the peers' progress records
//! (hivemind's `ProgressTracker` formulas, `research/dedloc.md` §1.2), and what a peer should do.

/// One peer's published progress.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerProgress {
    pub peer: Vec<u8>,
    /// Global step the peer is accumulating for.
    pub epoch: u64,
    pub samples: u64,
    /// Exponential moving average of the peer's throughput.
    pub samples_per_sec: f64,
    /// When the record was written (unix ms).
    pub time_ms: u64,
    pub client: bool,
    /// The all-reduce start this peer proposes for `epoch` (unix ms), once it saw the target
    /// reached.
    pub ready_at_ms: Option<u64>,
    /// The digest of the peer's state at `epoch`, if it reports one.
    pub digest: Option<[u8; 32]>,
}

/// The state the peers at `epoch` settle on: among the fresh (written at `fresh_since_ms` or
/// later), non-client records at `epoch` that report a digest, the digest with the most peers
/// (a tie goes to the larger digest, so every peer picks the same one; when every peer holds
/// a state of its own, that is the largest digest, some peer's state all the same). None with
/// fewer than two such records: a peer alone keeps its state.
pub fn majority_digest(
    records: &[PeerProgress],
    epoch: u64,
    fresh_since_ms: u64,
) -> Option<[u8; 32]> {
    let mut count: std::collections::BTreeMap<[u8; 32], usize> = std::collections::BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for r in records {
        if r.epoch == epoch
            && !r.client
            && r.time_ms >= fresh_since_ms
            && seen.insert(&r.peer)
            && let Some(d) = r.digest
        {
            *count.entry(d).or_default() += 1;
        }
    }
    if count.values().sum::<usize>() < 2 {
        return None;
    }
    count
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)))
        .map(|(d, _)| d)
}

/// The swarm as one peer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalView {
    /// Highest epoch of any non-client peer (a client's alone if there are only clients).
    pub epoch: u64,
    /// Samples reported at that epoch.
    pub samples: u64,
    /// Samples expected by now at that epoch: reported + elapsed × rate.
    pub estimated: f64,
    /// Summed throughput of the peers at that epoch.
    pub samples_per_sec: f64,
    /// Peers at that epoch (excluding none).
    pub peers: usize,
    /// Earliest start proposed for that epoch.
    pub ready_at_ms: Option<u64>,
}

impl GlobalView {
    pub fn of(records: &[PeerProgress], now_ms: u64) -> Option<Self> {
        let nodes = records.iter().filter(|r| !r.client);
        let epoch = nodes
            .map(|r| r.epoch)
            .max()
            .or_else(|| records.iter().map(|r| r.epoch).max())?;
        let at: Vec<_> = records.iter().filter(|r| r.epoch == epoch).collect();
        Some(Self {
            epoch,
            samples: at.iter().map(|r| r.samples).sum(),
            estimated: at
                .iter()
                .map(|r| {
                    let dt = now_ms.saturating_sub(r.time_ms) as f64 / 1e3;
                    r.samples as f64 + dt.min(60.0) * r.samples_per_sec
                })
                .sum(),
            samples_per_sec: at.iter().map(|r| r.samples_per_sec).sum(),
            peers: at.len(),
            ready_at_ms: at.iter().filter_map(|r| r.ready_at_ms).min(),
        })
    }

    /// Seconds until the target is reached at the current rate.
    pub fn eta_s(&self, target: u64) -> f64 {
        let left = target as f64 - self.estimated;
        if left <= 0.0 {
            0.0
        } else if self.samples_per_sec > 0.0 {
            left / self.samples_per_sec
        } else {
            f64::INFINITY
        }
    }
}

/// What a peer at `local_epoch` does next.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Keep accumulating micro-batches.
    Accumulate,
    /// Stop and average for this epoch; matchmaking reads the declarations at `start_ms`.
    /// `propose` is true when this peer is the first to call it (it publishes `start_ms`).
    Average { start_ms: u64, propose: bool },
    /// The swarm is at a later epoch: download the state.
    Behind { epoch: u64 },
}

/// The decision rule. `view` includes this peer's own record. A start is proposed once the
/// target is expected within `window_ms`, for when it is expected, and at least `lead_ms`
/// ahead (the others must read the proposal first).
/// `slack_ms` (about one micro-batch) is added to the expected time: peers stop at whole
/// micro-batches, so without it the swarm would fall short of the target.
pub fn decide(
    local_epoch: u64,
    view: Option<&GlobalView>,
    target: u64,
    now_ms: u64,
    window_ms: u64,
    lead_ms: u64,
    slack_ms: u64,
) -> Decision {
    let Some(v) = view else {
        return Decision::Accumulate;
    };
    if v.epoch > local_epoch {
        return Decision::Behind { epoch: v.epoch };
    }
    if v.epoch < local_epoch {
        // Our own record is not visible yet: nothing to go by.
        return Decision::Accumulate;
    }
    if let Some(start) = v.ready_at_ms {
        return Decision::Average {
            start_ms: start,
            propose: false,
        };
    }
    // Propose as soon as the target will be reached within the window, so matchmaking
    // overlaps the last micro-batches: the start is when the target is expected, and never
    // sooner than a window from now (the others must read the proposal first).
    let window_s = window_ms as f64 / 1e3;
    if v.samples >= target || v.estimated + v.samples_per_sec * window_s >= target as f64 {
        let eta_ms = (v.eta_s(target) * 1e3).min(3.6e6) as u64;
        return Decision::Average {
            start_ms: now_ms + lead_ms.max(eta_ms + slack_ms),
            propose: true,
        };
    }
    Decision::Accumulate
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(peer: u8, epoch: u64, samples: u64, sps: f64, t: u64) -> PeerProgress {
        PeerProgress {
            peer: vec![peer],
            epoch,
            samples,
            samples_per_sec: sps,
            time_ms: t,
            client: false,
            ready_at_ms: None,
            digest: None,
        }
    }

    #[test]
    fn the_majority_digest_wins_and_ties_break_the_same_way_everywhere() {
        let with = |peer: u8, epoch: u64, d: u8, t: u64| PeerProgress {
            digest: Some([d; 32]),
            ..rec(peer, epoch, 10, 1.0, t)
        };
        let rs = [
            with(1, 5, 7, 100),
            with(2, 5, 7, 100),
            with(3, 5, 9, 100),
            with(4, 6, 9, 100),
        ];
        assert_eq!(majority_digest(&rs, 5, 0), Some([7; 32]));
        // Stale records do not count; a lone record decides nothing.
        assert_eq!(majority_digest(&rs, 5, 101), None);
        assert_eq!(majority_digest(&rs, 6, 0), None);
        // Every peer with a state of its own: the largest digest, whoever looks.
        let all = [with(1, 5, 4, 100), with(2, 5, 8, 100), with(3, 5, 6, 100)];
        assert_eq!(majority_digest(&all, 5, 0), Some([8; 32]));
        // Two islands of two: the larger digest, whoever looks.
        let tie = [
            with(1, 5, 7, 100),
            with(2, 5, 7, 100),
            with(3, 5, 9, 100),
            with(4, 5, 9, 100),
        ];
        assert_eq!(majority_digest(&tie, 5, 0), Some([9; 32]));
        let mut rev = tie.clone();
        rev.reverse();
        assert_eq!(majority_digest(&rev, 5, 0), Some([9; 32]));
        // Clients do not vote.
        let mut c = with(5, 5, 3, 100);
        c.client = true;
        let rs = [with(1, 5, 3, 100), c.clone(), with(2, 5, 3, 100)];
        assert_eq!(majority_digest(&rs, 5, 0), Some([3; 32]));
        assert_eq!(majority_digest(&[with(1, 5, 3, 100), c], 5, 0), None);
        assert_eq!(
            majority_digest(&[with(1, 5, 3, 100), with(1, 5, 3, 100)], 5, 0),
            None
        );
    }

    #[test]
    fn global_view_follows_the_newest_epoch_and_extrapolates() {
        let rs = [
            rec(1, 3, 10, 2.0, 1000),
            rec(2, 3, 20, 1.0, 2000),
            rec(3, 2, 99, 5.0, 2000),
        ];
        let v = GlobalView::of(&rs, 3000).unwrap();
        assert_eq!((v.epoch, v.samples, v.peers), (3, 30, 2));
        assert!((v.estimated - (10.0 + 4.0 + 20.0 + 1.0)).abs() < 1e-9);
        assert!((v.eta_s(44) - 3.0).abs() < 1e-9);
        // A client alone at a later epoch does not define the swarm's epoch.
        let mut c = rec(4, 9, 1, 1.0, 3000);
        c.client = true;
        let v = GlobalView::of(&[rs[0].clone(), c], 3000).unwrap();
        assert_eq!(v.epoch, 3);
    }

    #[test]
    fn decisions() {
        let rs = [rec(1, 3, 10, 2.0, 1000), rec(2, 3, 20, 1.0, 1000)];
        let v = GlobalView::of(&rs, 1000).unwrap();
        assert_eq!(
            decide(3, Some(&v), 64, 1000, 500, 500, 0),
            Decision::Accumulate
        );
        assert_eq!(
            decide(3, Some(&v), 30, 1000, 500, 500, 0),
            Decision::Average {
                start_ms: 1500,
                propose: true
            }
        );
        assert_eq!(
            decide(2, Some(&v), 30, 1000, 500, 500, 0),
            Decision::Behind { epoch: 3 }
        );
        let mut r = rs.to_vec();
        r[1].ready_at_ms = Some(1200);
        let v = GlobalView::of(&r, 1000).unwrap();
        assert_eq!(
            decide(3, Some(&v), 64, 1000, 500, 500, 0),
            Decision::Average {
                start_ms: 1200,
                propose: false
            }
        );
        assert_eq!(decide(0, None, 1, 0, 0, 0, 0), Decision::Accumulate);
        // 30 samples at 3/s: 32 is expected in 667 ms, within a 1 s window.
        let v = GlobalView::of(&rs, 1000).unwrap();
        assert_eq!(
            decide(3, Some(&v), 32, 1000, 1000, 1000, 0),
            Decision::Average {
                start_ms: 2000,
                propose: true
            }
        );
        // ... and 40 is 3.3 s away: keep accumulating.
        assert_eq!(
            decide(3, Some(&v), 40, 1000, 1000, 1000, 0),
            Decision::Accumulate
        );
    }
}
