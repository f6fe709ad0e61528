//! The all-reduce round on a simulated network (virtual clock, messages delivered in a seeded
//! random order) against the exact weighted mean.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;

use colony_trainer::allreduce::balance::{Link, PeerMode, optimal_split};
use colony_trainer::allreduce::partition::shard_sizes;
use colony_trainer::allreduce::round::{
    Message, Output, Round, RoundConfig, RoundReport, RoundSpec,
};

/// A tiny deterministic generator (xorshift64*), so the tests need no dependencies.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn float(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// How a member misbehaves.
#[derive(Clone, Copy, Debug)]
enum Fault {
    None,
    /// Dies after sending this many messages; others notice only through timeouts.
    DiesAfter(usize),
}

struct Sim {
    rounds: Vec<Round>,
    reports: Vec<Option<RoundReport>>,
    queue: VecDeque<(usize, usize, Message)>,
    sent: Vec<usize>,
    faults: Vec<Fault>,
    dead: Vec<bool>,
    rng: Rng,
    now: u64,
}

impl Sim {
    fn emit(&mut self, from: usize, outputs: Vec<Output>) {
        for o in outputs {
            match o {
                Output::Send { to, message } => {
                    if self.dead[from] {
                        continue;
                    }
                    if let Fault::DiesAfter(k) = self.faults[from]
                        && self.sent[from] >= k
                    {
                        self.dead[from] = true;
                        continue;
                    }
                    self.sent[from] += 1;
                    self.queue.push_back((from, to, message));
                }
                Output::Done(r) => self.reports[from] = Some(r),
                Output::Misbehaved { peer, reason, .. } => {
                    panic!("{from} says {peer} misbehaved: {reason}")
                }
            }
        }
    }

    fn run(
        spec: RoundSpec,
        vectors: Vec<Vec<f32>>,
        faults: Vec<Fault>,
        seed: u64,
    ) -> Vec<Option<RoundReport>> {
        let n = spec.modes.len();
        let config = RoundConfig {
            sender_timeout_ms: 2_000,
            reducer_timeout_ms: 5_000,
            confirm_grace_ms: 1_000,
        };
        let mut sim = Sim {
            rounds: Vec::new(),
            reports: vec![None; n],
            queue: VecDeque::new(),
            sent: vec![0; n],
            faults,
            dead: vec![false; n],
            rng: Rng(seed | 1),
            now: 0,
        };
        let mut starts = Vec::new();
        for (me, v) in vectors.into_iter().enumerate() {
            let (round, out) = Round::start(me, spec.clone(), config, v, 0);
            sim.rounds.push(round);
            starts.push(out);
        }
        for (me, out) in starts.into_iter().enumerate() {
            if let Fault::DiesAfter(0) = sim.faults[me] {
                sim.dead[me] = true;
            }
            sim.emit(me, out);
        }
        while sim.now < 60_000 && (0..n).any(|i| !sim.dead[i] && sim.reports[i].is_none()) {
            if sim.queue.is_empty() {
                sim.now += 500;
                for i in 0..n {
                    if !sim.dead[i] {
                        let out = sim.rounds[i].tick(sim.now);
                        sim.emit(i, out);
                    }
                }
                continue;
            }
            // Deliver a random queued message (networks reorder across streams).
            let k = sim.rng.below(sim.queue.len());
            let (from, to, msg) = sim.queue.remove(k).unwrap();
            if sim.dead[to] {
                continue;
            }
            let out = sim.rounds[to].on_message(from, msg, sim.now);
            sim.emit(to, out);
        }
        for i in 0..n {
            if sim.dead[i] {
                sim.reports[i] = None;
            }
        }
        sim.reports
    }
}

fn exact_mean(vectors: &[Vec<f32>], weights: &[f64], who: &[usize]) -> Vec<f32> {
    let w: f64 = who.iter().map(|&i| weights[i]).sum();
    (0..vectors[0].len())
        .map(|k| {
            (who.iter()
                .map(|&i| weights[i] * f64::from(vectors[i][k]))
                .sum::<f64>()
                / w) as f32
        })
        .collect()
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-5 * (1.0 + b.abs())
}

fn setup(modes: &[PeerMode], len: usize, part_len: usize, seed: u64) -> (RoundSpec, Vec<Vec<f32>>) {
    let mut rng = Rng(seed | 1);
    let links: Vec<Link> = modes
        .iter()
        .map(|&mode| {
            let up = 10.0 + rng.below(400) as f64;
            Link {
                up,
                down: up * (1.0 + rng.below(3) as f64),
                mode,
            }
        })
        .collect();
    let plan = optimal_split(&links).unwrap();
    let spec = RoundSpec {
        modes: modes.to_vec(),
        weights: modes
            .iter()
            .map(|m| {
                if m.sends() {
                    1.0 + rng.below(64) as f64
                } else {
                    0.0
                }
            })
            .collect(),
        shard_sizes: shard_sizes(len, &plan.fractions, 1),
        part_len,
        aggregation: Default::default(),
    };
    let vectors = (0..modes.len())
        .map(|_| (0..len).map(|_| rng.float() * 100.0).collect())
        .collect();
    (spec, vectors)
}

use PeerMode::{Aux, Client, Node};

#[test]
fn exact_weighted_mean_for_every_mix_of_modes() {
    let mixes: Vec<Vec<PeerMode>> = vec![
        vec![Node, Node],
        vec![Node, Node, Node, Node, Node],
        vec![Node, Client],
        vec![Node, Node, Client, Client],
        vec![Aux, Node, Client],
        vec![Node, Aux, Aux, Client, Node, Client],
        vec![Aux, Client, Client, Client],
    ];
    for (m, modes) in mixes.iter().enumerate() {
        for seed in 1..6u64 {
            let (spec, vectors) = setup(modes, 1000 + 37 * seed as usize, 64, seed * 31 + m as u64);
            let senders: Vec<usize> = (0..modes.len()).filter(|&i| modes[i].sends()).collect();
            let want = exact_mean(&vectors, &spec.weights, &senders);
            let reports = Sim::run(spec.clone(), vectors, vec![Fault::None; modes.len()], seed);
            for (i, r) in reports.iter().enumerate() {
                let r = r
                    .as_ref()
                    .unwrap_or_else(|| panic!("mix {modes:?}: peer {i} did not finish"));
                assert!(
                    r.failed_aggregators.is_empty() && r.failed_senders.is_empty(),
                    "{r:?}"
                );
                match &r.result {
                    Some(v) => {
                        assert!(modes[i].sends());
                        for (k, (a, b)) in v.iter().zip(&want).enumerate() {
                            assert!(
                                close(*a, *b),
                                "mix {modes:?} seed {seed}: peer {i} element {k}: {a} vs {b}"
                            );
                        }
                    }
                    None => assert_eq!(modes[i], Aux),
                }
            }
        }
    }
}

#[test]
fn parts_with_no_positive_weight_keep_every_peers_own_values() {
    // Every sender has weight 0: every part, the peer's own shard included, comes back
    // `Unchanged`, and each peer ends with exactly its own vector.
    let modes = [Node, Node, Client, Aux, Node];
    for seed in 1..4u64 {
        let (mut spec, vectors) = setup(&modes, 1500, 40, seed);
        spec.weights = vec![0.0; modes.len()];
        let reports = Sim::run(spec, vectors.clone(), vec![Fault::None; modes.len()], seed);
        for (i, r) in reports.iter().enumerate() {
            let r = r.as_ref().expect("every peer finishes");
            assert!(r.failed_aggregators.is_empty(), "{r:?}");
            match &r.result {
                Some(v) => assert_eq!(v, &vectors[i], "peer {i} seed {seed}"),
                None => assert_eq!(modes[i], Aux),
            }
        }
    }
}

#[test]
fn a_sender_that_dies_mid_stream_is_dropped_consistently() {
    let modes = [Node, Node, Node, Node, Client];
    for seed in 1..8u64 {
        let (spec, vectors) = setup(&modes, 2000, 50, seed);
        // The client dies after sending a few parts; the aggregators notice by timeout.
        let mut faults = vec![Fault::None; modes.len()];
        faults[4] = Fault::DiesAfter(3 + seed as usize);
        let all = exact_mean(&vectors, &spec.weights, &[0, 1, 2, 3, 4]);
        let without = exact_mean(&vectors, &spec.weights, &[0, 1, 2, 3]);
        let reports = Sim::run(spec, vectors, faults, seed);
        let survivors: Vec<&RoundReport> =
            reports[..4].iter().map(|r| r.as_ref().unwrap()).collect();
        let first = survivors[0].result.as_ref().unwrap();
        let mut with_it = 0;
        for (k, x) in first.iter().enumerate() {
            assert!(
                close(*x, without[k]) || close(*x, all[k]),
                "element {k} is neither mean"
            );
            with_it += usize::from(close(*x, all[k]) && !close(*x, without[k]));
        }
        assert!(
            with_it > 0,
            "parts delivered before the failure keep the sender's contribution"
        );
        for r in &survivors {
            assert_eq!(
                r.result.as_ref().unwrap(),
                first,
                "every survivor holds the same vector"
            );
            assert!(r.failed_aggregators.is_empty());
        }
    }
}

#[test]
fn a_dead_aggregator_leaves_its_shard_local_and_everyone_reports_it() {
    let modes = [Node, Node, Node, Node];
    let (spec, vectors) = setup(&modes, 1200, 40, 7);
    let mut faults = vec![Fault::None; 4];
    faults[2] = Fault::DiesAfter(0);
    let shard2 = {
        let start: usize = spec.shard_sizes[..2].iter().sum();
        start..start + spec.shard_sizes[2]
    };
    assert!(!shard2.is_empty());
    let without = exact_mean(&vectors, &spec.weights, &[0, 1, 3]);
    let sizes = spec.shard_sizes.clone();
    let reports = Sim::run(spec, vectors.clone(), faults, 7);
    for i in [0, 1, 3] {
        let r = reports[i].as_ref().unwrap();
        assert_eq!(r.failed_aggregators, vec![2]);
        // Only a peer that reduces something waits for (and drops) the dead sender.
        let expect: Vec<usize> = if sizes[i] > 0 { vec![2] } else { vec![] };
        assert_eq!(r.failed_senders, expect, "peer {i}");
        let v = r.result.as_ref().unwrap();
        for k in 0..v.len() {
            if shard2.contains(&k) {
                assert_eq!(
                    v[k], vectors[i][k],
                    "the dead aggregator's shard stays local"
                );
            } else {
                assert!(close(v[k], without[k]), "peer {i} element {k}");
            }
        }
    }
}

#[test]
fn an_aggregator_dying_mid_answer_leaves_its_shard_local_for_everyone() {
    // Node 2 sends all its parts, then dies after answering only some of its shard's parts to
    // some peers. Without the confirmation step, peers that got an answer would hold the
    // average and the others their own values; with it, every survivor keeps its own values
    // for the whole shard and reports the same failure.
    let modes = [Node, Node, Node, Node, Client];
    for seed in 1..6u64 {
        let (mut spec, vectors) = setup(&modes, 3000, 60, seed);
        spec.shard_sizes = vec![750, 750, 750, 750, 0];
        let parts: Vec<usize> = spec
            .shard_sizes
            .iter()
            .map(|&s| s.div_ceil(spec.part_len))
            .collect();
        assert!(parts[2] >= 2, "the victim reduces several parts");
        let to_others: usize = (0..modes.len()).filter(|&j| j != 2).map(|j| parts[j]).sum();
        let answers = parts[2] * (modes.len() - 1);
        let mut faults = vec![Fault::None; modes.len()];
        faults[2] = Fault::DiesAfter(to_others + answers / 2 + seed as usize);
        let shard2 = {
            let start: usize = spec.shard_sizes[..2].iter().sum();
            start..start + spec.shard_sizes[2]
        };
        let reports = Sim::run(spec, vectors.clone(), faults, seed);
        let survivors = [0, 1, 3, 4];
        let first = reports[0].as_ref().unwrap().result.clone().unwrap();
        for &i in &survivors {
            let r = reports[i].as_ref().unwrap();
            assert_eq!(r.failed_aggregators, vec![2], "peer {i}, seed {seed}");
            let v = r.result.as_ref().unwrap();
            assert_eq!(
                &v[shard2.clone()],
                &vectors[i][shard2.clone()],
                "peer {i} keeps its own values for the dead aggregator's shard"
            );
            for k in (0..v.len()).filter(|k| !shard2.contains(k)) {
                assert_eq!(v[k], first[k], "peer {i} agrees with peer 0 at {k}");
            }
        }
    }
}

#[test]
fn a_status_naming_a_shard_makes_every_peer_keep_it_local() {
    // Peer 3 gives up on aggregator 1 (its results come too late for it), while the others
    // got them: the statuses spread the verdict, so all agree on shard 1.
    let modes = [Node, Node, Node, Node];
    let (mut spec, vectors) = setup(&modes, 800, 50, 3);
    spec.shard_sizes = vec![200; 4];
    let config = RoundConfig {
        sender_timeout_ms: 2_000,
        reducer_timeout_ms: 5_000,
        confirm_grace_ms: 1_000,
    };
    let mut rounds = Vec::new();
    let mut queue = VecDeque::new();
    for (me, v) in vectors.iter().enumerate() {
        let (r, out) = Round::start(me, spec.clone(), config, v.clone(), 0);
        rounds.push(r);
        for o in out {
            if let Output::Send { to, message } = o {
                queue.push_back((me, to, message));
            }
        }
    }
    let mut reports: Vec<Option<RoundReport>> = vec![None; 4];
    // Results from 1 to 3 are held back until 3 has timed out on 1.
    let mut held = Vec::new();
    let mut now = 0;
    while reports.iter().any(Option::is_none) && now < 20_000 {
        let Some((from, to, msg)) = queue.pop_front() else {
            now += 1_000;
            if now == 6_000 {
                queue.extend(held.drain(..));
            }
            for (i, r) in rounds.iter_mut().enumerate() {
                for o in r.tick(now) {
                    match o {
                        Output::Send { to, message } => queue.push_back((i, to, message)),
                        Output::Done(rep) => reports[i] = Some(rep),
                        Output::Misbehaved { peer, reason, .. } => panic!("{peer}: {reason}"),
                    }
                }
            }
            continue;
        };
        if from == 1 && to == 3 && matches!(msg, Message::Result { .. }) && now < 6_000 {
            held.push((from, to, msg));
            continue;
        }
        for o in rounds[to].on_message(from, msg, now) {
            match o {
                Output::Send { to: t, message } => queue.push_back((to, t, message)),
                Output::Done(rep) => reports[to] = Some(rep),
                Output::Misbehaved { peer, reason, .. } => panic!("{peer}: {reason}"),
            }
        }
    }
    let shard1 = spec.shard_sizes[0]..spec.shard_sizes[0] + spec.shard_sizes[1];
    for (i, r) in reports.iter().enumerate() {
        let r = r.as_ref().expect("every peer finishes");
        assert_eq!(r.failed_aggregators, vec![1], "peer {i}");
        let v = r.result.as_ref().unwrap();
        assert_eq!(&v[shard1.clone()], &vectors[i][shard1.clone()], "peer {i}");
    }
}
