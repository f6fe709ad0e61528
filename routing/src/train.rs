//! Training routing vectors (Baranchuk et al., 2019) with burn on the CPU: imitation of a
//! breadth-first expert in DAgger rounds (ARCHITECTURE.md, "Learned routing").
//!
//! The model: `f(v) = lift(P x_v)` and `g(q) = (P q, 1)`, where `lift(y) = (y, −|y|²/2)` under
//! L2 (`(y, 0)` otherwise), so `−⟨f(v), g(q)⟩` orders vertices by L2 in the subspace of P; P
//! starts at the principal components (or is the identity with `dim: 0`). Optionally
//! (`ffn: true`) a per-vertex network over `[x_v/σ, mean of out-neighbours/σ, graph
//! statistics]` adds `σ · FFN(…)` to `f(v)` (σ: the mean vector norm); its last layer starts at
//! zero, so training starts from the untrained subspace either way.
//!
//! A round: (1) recompute every vertex's routing vector; (2) walk the bottom layer for a batch
//! of training queries with the current vectors, Gumbel noise on the heap order (the learner's
//! own, exploring policy), under a budget drawn from the configured ones; (3) label each heap
//! pop by the expert — the candidates with the fewest hops to the query's true nearest
//! neighbour along the graph (BFS over reversed edges) are the positives — and the final
//! verification by the same rule over the visited set; (4) Adam steps on
//! `−log Σ_{v∈V⁺} softmax_H(τ⟨f(v), g(q)⟩)`, routing and verification terms weighted ½ each
//! per query. Training queries are stored vectors held out of their own answers
//! (leave-one-out), so a held-out query set stays unseen; a dev set of other stored vectors
//! measures recall@1 plain vs learned after every round.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module, Param};
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::activation::elu;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::Metric;
use crate::hnsw::Hnsw;
use crate::learned::{QueryMap, Reverse, Routing};
use crate::{Error, Query, Result};

type Cpu = NdArray<f32>;
type Train = Autodiff<Cpu>;
type Ids<B> = Tensor<B, 1, burn::tensor::Int>;

/// What `train` does.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Dimension of the subspace routing runs in (0: the vectors' own, no projection). A
    /// routing distance costs (dim + 1)/D of a full one and the query's projection dim, so a
    /// smaller subspace buys more steps under the same budget; it starts at the principal
    /// components and is trained with the rest.
    pub dim: usize,
    /// Budgets (total distance computations) the trajectories are walked under, one drawn per
    /// query in turn; the dev report uses the same ones.
    pub budgets: Vec<usize>,
    /// Vertices re-ranked on the original vectors at the end of a routed search, as a fraction
    /// of its budget (the paper used 1/16 to 1/8).
    pub verify: f64,
    /// DAgger rounds.
    pub rounds: usize,
    /// Training queries walked per round.
    pub queries_per_round: usize,
    /// Optimiser steps per round (passes over the round's walks as needed).
    pub steps_per_round: usize,
    /// Queries per step (all the events of their walks).
    pub batch: usize,
    /// Candidates kept per event (the positives and the best by the current routing).
    pub candidates: usize,
    /// Add a per-vertex network (FFN over the vector, its neighbours' mean and graph
    /// statistics) to the projected vectors, as the paper does. Off by default: at the training
    /// budgets measured here (a few thousand steps on a CPU) it made recall worse, while the
    /// projection alone, trained the same way, made it better (BENCHMARKS.md, "route").
    pub ffn: bool,
    /// Width of its hidden layers.
    pub hidden: usize,
    pub lr: f64,
    /// Scale of the Gumbel noise on the heap order while sampling (0: greedy walks).
    pub temperature: f32,
    /// Stored vectors used as dev queries (not trained on).
    pub dev: usize,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            dim: 16,
            budgets: vec![128, 256],
            verify: 0.125,
            rounds: 6,
            queries_per_round: 4000,
            steps_per_round: 500,
            batch: 16,
            candidates: 64,
            ffn: false,
            hidden: 256,
            lr: 3e-4,
            temperature: 1.0,
            dev: 1000,
            seed: 7,
        }
    }
}

/// Recall@1 on the dev queries at one budget.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct DevPoint {
    pub budget: usize,
    pub plain: f64,
    pub learned: f64,
}

/// One round's numbers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundReport {
    pub round: usize,
    pub events: usize,
    pub steps: usize,
    /// Mean loss and the fraction of events whose top-scored candidate is a positive, over the
    /// round's steps.
    pub loss: f64,
    pub accuracy: f64,
    pub dev: Vec<DevPoint>,
    pub secs: f64,
}

#[derive(Module, Debug)]
struct Net<B: Backend> {
    /// `D × d` (x · proj), from the principal components; unused without a projection.
    proj: Param<Tensor<B, 2>>,
    projected: bool,
    /// Whether the lift is `−|px|²/2` (L2) or 0.
    l2: bool,
    /// Whether the per-vertex network adds to the projected vector.
    ffn: bool,
    l1: Linear<B>,
    l2_: Linear<B>,
    out: Linear<B>,
    /// log τ, the softmax temperature of the loss (the ordering does not depend on it).
    log_tau: Param<Tensor<B, 1>>,
}

impl<B: Backend> Net<B> {
    fn new(
        inputs: &Inputs<'_>,
        pca: Option<Vec<f32>>,
        hidden: Option<usize>,
        device: &B::Device,
    ) -> Self {
        let ffn = hidden.is_some();
        let hidden = hidden.unwrap_or(1);
        let d = pca.as_ref().map_or(inputs.dim, |p| p.len() / inputs.dim);
        let proj = match &pca {
            Some(p) => Tensor::from_data(TensorData::new(p.clone(), [inputs.dim, d]), device),
            None => Tensor::zeros([1, 1], device),
        };
        Self {
            proj: Param::from_tensor(proj),
            projected: pca.is_some(),
            l2: inputs.l2,
            ffn,
            l1: LinearConfig::new(inputs.width(), hidden).init(device),
            l2_: LinearConfig::new(hidden, hidden).init(device),
            out: LinearConfig::new(hidden, d + 1)
                .with_initializer(Initializer::Zeros)
                .init(device),
            log_tau: Param::from_tensor(Tensor::zeros([1], device)),
        }
    }

    fn project(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        if self.projected {
            x.matmul(self.proj.val())
        } else {
            x
        }
    }

    /// Routing vectors of rows with vectors `x` `[n, D]` and features `feat`.
    fn forward(&self, x: Tensor<B, 2>, feat: Tensor<B, 2>, sigma: f32) -> Tensor<B, 2> {
        let px = self.project(x);
        let c = if self.l2 {
            px.clone().powi_scalar(2).sum_dim(1).mul_scalar(-0.5)
        } else {
            px.clone().sum_dim(1).mul_scalar(0.0)
        };
        let base = Tensor::cat(vec![px, c], 1);
        if !self.ffn {
            return base;
        }
        let h = elu(self.l1.forward(feat), 1.0);
        let h = elu(self.l2_.forward(h), 1.0);
        base + self.out.forward(h).mul_scalar(sigma)
    }

    /// `g(q) = (proj(q), 1)` of rows `q` `[b, D]`.
    fn query(&self, q: Tensor<B, 2>) -> Tensor<B, 2> {
        let [b, _] = q.dims();
        let pq = self.project(q);
        let ones = Tensor::ones([b, 1], &pq.device());
        Tensor::cat(vec![pq, ones], 1)
    }

    /// The query map as a [`QueryMap`].
    fn map(&self, dim: usize) -> QueryMap {
        if !self.projected {
            return QueryMap::Lifted;
        }
        let p: Vec<f32> = self.proj.val().into_data().iter::<f32>().collect();
        let d = p.len() / dim;
        // proj is D × d; the map wants d × D.
        let mut t = vec![0f32; p.len()];
        for i in 0..dim {
            for j in 0..d {
                t[j * dim + i] = p[i * d + j];
            }
        }
        QueryMap::Projected(t)
    }
}

/// Graph statistics per vertex the network sees beside the vectors.
const STATS: usize = 6;

/// The fixed inputs of the model for every slot.
struct Inputs<'a> {
    /// `[x/σ, mean of out-neighbours/σ, statistics]`, `slots × (2D + STATS)`: the statistics
    /// are ln(1 + in-degree), out-degree / m0, the mean and the longest link length / σ, the
    /// distance to the entry / σ, and the hops from the entry / 10.
    feat: Vec<f32>,
    /// The stored vectors, `slots × D`.
    x: &'a [f32],
    sigma: f32,
    dim: usize,
    l2: bool,
}

impl<'a> Inputs<'a> {
    fn of(h: &'a Hnsw) -> Self {
        let (n, dim) = (h.slots(), h.dim());
        let live: Vec<u32> = (0..n as u32).filter(|&s| !h.deleted[s as usize]).collect();
        let sigma = (live
            .iter()
            .map(|&s| h.vec(s).iter().map(|a| a * a).sum::<f32>().sqrt())
            .sum::<f32>()
            / live.len().max(1) as f32)
            .max(1e-6);
        let w = 2 * dim + STATS;
        let rev = Reverse::of(h);
        let entry = h.entry_now().map_or(0, |e| e.slot);
        let from_entry = hops_from(h, entry);
        let m0 = h.params().m0 as f32;
        let mut feat = vec![0f32; n * w];
        feat.par_chunks_mut(w).enumerate().for_each(|(s, row)| {
            let (x, rest) = row.split_at_mut(dim);
            let (m, st) = rest.split_at_mut(dim);
            let me = h.vec(s as u32);
            for (a, b) in x.iter_mut().zip(me) {
                *a = b / sigma;
            }
            let (mut total, mut longest, mut out) = (0f32, 0f32, 0usize);
            for u in Hnsw::ids(h.list(s as u32, 0)) {
                for (a, b) in m.iter_mut().zip(h.vec(u)) {
                    *a += b;
                }
                let l = h.metric().exact(me, h.vec(u)).max(0.0).sqrt();
                total += l;
                longest = longest.max(l);
                out += 1;
            }
            let c = sigma * out.max(1) as f32;
            m.iter_mut().for_each(|a| *a /= c);
            st[0] = (1.0 + rev.linking_to(s as u32).len() as f32).ln();
            st[1] = out as f32 / m0;
            st[2] = total / out.max(1) as f32 / sigma;
            st[3] = longest / sigma;
            st[4] = h.metric().exact(me, h.vec(entry)).max(0.0).sqrt() / sigma;
            st[5] = from_entry[s].min(100) as f32 / 10.0;
        });
        Self {
            feat,
            x: &h.vectors,
            sigma,
            dim,
            l2: h.metric() == Metric::L2,
        }
    }

    fn width(&self) -> usize {
        2 * self.dim + STATS
    }

    /// The vectors and features of `slots` as tensors.
    fn rows<B: Backend>(&self, slots: &[u32], device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let (w, dim) = (self.width(), self.dim);
        let mut f = Vec::with_capacity(slots.len() * w);
        let mut x = Vec::with_capacity(slots.len() * dim);
        for &s in slots {
            let s = s as usize;
            f.extend_from_slice(&self.feat[s * w..(s + 1) * w]);
            x.extend_from_slice(&self.x[s * dim..(s + 1) * dim]);
        }
        (
            Tensor::from_data(TensorData::new(x, [slots.len(), dim]), device),
            Tensor::from_data(TensorData::new(f, [slots.len(), w]), device),
        )
    }

    /// The routing of every slot under `net`.
    fn routing(&self, net: &Net<Cpu>) -> Routing {
        let n = self.x.len() / self.dim;
        let device = Default::default();
        let mut table = Vec::new();
        let all: Vec<u32> = (0..n as u32).collect();
        for chunk in all.chunks(16_384) {
            let (x, f) = self.rows::<Cpu>(chunk, &device);
            let t = net.forward(x, f, self.sigma);
            table.extend(t.into_data().iter::<f32>());
        }
        Routing {
            dim: table.len() / n.max(1),
            table,
            map: net.map(self.dim),
        }
    }
}

/// The top `d` principal directions of the live vectors, as a `D × d` matrix (row-major):
/// the eigenvectors of their covariance with the largest eigenvalues (cyclic Jacobi).
fn principal(h: &Hnsw, d: usize) -> Vec<f32> {
    let dim = h.dim();
    let live: Vec<u32> = (0..h.slots() as u32)
        .filter(|&s| !h.deleted[s as usize])
        .collect();
    let n = live.len().max(1) as f64;
    let mut mean = vec![0f64; dim];
    for &s in &live {
        for (m, &v) in mean.iter_mut().zip(h.vec(s)) {
            *m += f64::from(v) / n;
        }
    }
    let mut a = vec![0f64; dim * dim];
    for &s in &live {
        let v = h.vec(s);
        for i in 0..dim {
            let xi = f64::from(v[i]) - mean[i];
            for j in i..dim {
                a[i * dim + j] += xi * (f64::from(v[j]) - mean[j]) / n;
            }
        }
    }
    for i in 0..dim {
        for j in 0..i {
            a[i * dim + j] = a[j * dim + i];
        }
    }
    // Eigenvectors accumulate in the columns of e.
    let mut e = vec![0f64; dim * dim];
    for i in 0..dim {
        e[i * dim + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..dim)
            .flat_map(|i| (0..dim).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * dim + j] * a[i * dim + j])
            .sum();
        if off < 1e-18 {
            break;
        }
        for p in 0..dim {
            for q in p + 1..dim {
                let apq = a[p * dim + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * dim + q] - a[p * dim + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let sn = t * c;
                for k in 0..dim {
                    let (akp, akq) = (a[k * dim + p], a[k * dim + q]);
                    a[k * dim + p] = c * akp - sn * akq;
                    a[k * dim + q] = sn * akp + c * akq;
                }
                for k in 0..dim {
                    let (apk, aqk) = (a[p * dim + k], a[q * dim + k]);
                    a[p * dim + k] = c * apk - sn * aqk;
                    a[q * dim + k] = sn * apk + c * aqk;
                }
                for k in 0..dim {
                    let (ekp, ekq) = (e[k * dim + p], e[k * dim + q]);
                    e[k * dim + p] = c * ekp - sn * ekq;
                    e[k * dim + q] = sn * ekp + c * ekq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..dim).collect();
    order.sort_by(|&i, &j| a[j * dim + j].total_cmp(&a[i * dim + i]));
    let mut out = vec![0f32; dim * d];
    for (col, &k) in order.iter().take(d).enumerate() {
        for i in 0..dim {
            out[i * d + col] = e[i * dim + k] as f32;
        }
    }
    out
}

/// Hops from `from` along the bottom layer's out-edges (`u32::MAX` where unreachable).
fn hops_from(h: &Hnsw, from: u32) -> Vec<u32> {
    let mut hops = vec![u32::MAX; h.slots()];
    let mut queue = VecDeque::from([from]);
    hops[from as usize] = 0;
    while let Some(v) = queue.pop_front() {
        let next = hops[v as usize] + 1;
        for u in Hnsw::ids(h.list(v, 0)) {
            if hops[u as usize] == u32::MAX {
                hops[u as usize] = next;
                queue.push_back(u);
            }
        }
    }
    hops
}

/// One labelled choice: the candidates in play, how many of the first are positives, and the
/// event's weight in its query's loss.
#[derive(Debug, Clone)]
struct Event {
    query: u32,
    /// Positives first.
    cands: Vec<u32>,
    positives: usize,
    weight: f32,
}

/// An entry of the walk's heap: (key, routing distance, slot), smallest key first.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Key(f32, f32, u32);
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Key {
    fn cmp(&self, o: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap and the walk pops the smallest key.
        o.0.total_cmp(&self.0).then(o.2.cmp(&self.2))
    }
}

/// A walk over the bottom layer from the entry by routing distance, leaving out one slot (the
/// query itself when it is a stored vector): the trajectory sampler, the dev search, and (with
/// the lifted table) the plain search.
struct Walk<'a> {
    h: &'a Hnsw,
    r: &'a Routing,
}

/// What a walk saw.
struct Trace {
    answer: Option<u32>,
    /// Heap contents at every pop: (routing distance, slot).
    pops: Vec<Vec<(f32, u32)>>,
    /// Every vertex whose routing distance was computed, with it.
    seen: Vec<(f32, u32)>,
}

impl Walk<'_> {
    fn rd(&self, g: &[f32], v: u32) -> f32 {
        let d = self.r.dim;
        let i = v as usize * d;
        -self.r.table[i..i + d]
            .iter()
            .zip(g)
            .map(|(a, b)| a * b)
            .sum::<f32>()
    }

    /// `routing` distance computations at most; the best `verify` by routing distance are
    /// re-ranked on the original vectors. `noise`: Gumbel noise of that scale on the heap
    /// order. `record`: keep the heap at every pop.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        q: &[f32],
        g: &[f32],
        exclude: Option<u32>,
        routing: usize,
        verify: usize,
        noise: Option<(&mut StdRng, f32)>,
        record: bool,
    ) -> Trace {
        let h = self.h;
        let mut trace = Trace {
            answer: None,
            pops: Vec::new(),
            seen: Vec::new(),
        };
        let Some(entry) = h.entry_now().map(|e| e.slot) else {
            return trace;
        };
        let mut noise = noise;
        let mut key = |dist: f32| match noise.as_mut() {
            Some((rng, t)) if *t > 0.0 => {
                let u: f32 = rng.gen_range(1e-7f32..1.0);
                dist + *t * (-u.ln()).ln()
            }
            _ => dist,
        };
        let mut visited = std::collections::HashSet::with_capacity(routing * 2 + 8);
        visited.insert(entry);
        if let Some(x) = exclude {
            visited.insert(x);
        }
        let mut heap = BinaryHeap::new();
        let mut left = routing;
        if Some(entry) != exclude {
            let d0 = self.rd(g, entry);
            heap.push(Key(key(d0), d0, entry));
            trace.seen.push((d0, entry));
        }
        'walk: while !heap.is_empty() {
            if record {
                trace.pops.push(heap.iter().map(|k| (k.1, k.2)).collect());
            }
            let Some(Key(_, _, c)) = heap.pop() else {
                break;
            };
            for n in Hnsw::ids(h.list(c, 0)) {
                if !visited.insert(n) {
                    continue;
                }
                if left == 0 {
                    break 'walk;
                }
                left -= 1;
                let dn = self.rd(g, n);
                heap.push(Key(key(dn), dn, n));
                trace.seen.push((dn, n));
            }
        }
        let mut best: Vec<(f32, u32)> = trace.seen.clone();
        best.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        trace.answer = best
            .iter()
            .take(verify.max(1))
            .map(|&(_, s)| (h.metric().exact(q, h.vec(s)), s))
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
            .map(|x| x.1);
        trace
    }
}

/// The labelled events of one trace (`hops`: every slot's hops to the true nearest neighbour).
fn label(trace: &Trace, hops: &[u32], query: u32, cap: usize) -> Vec<Event> {
    let pick = |set: &[(f32, u32)]| -> Option<(Vec<u32>, usize)> {
        let min = set.iter().map(|&(_, s)| hops[s as usize]).min()?;
        if min == u32::MAX {
            return None;
        }
        let mut pos: Vec<(f32, u32)> = Vec::new();
        let mut neg: Vec<(f32, u32)> = Vec::new();
        for &(d, s) in set {
            if hops[s as usize] == min {
                pos.push((d, s));
            } else {
                neg.push((d, s));
            }
        }
        if neg.is_empty() {
            return None; // nothing to learn: every choice is right
        }
        let by = |a: &(f32, u32), b: &(f32, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        pos.sort_unstable_by(by);
        neg.sort_unstable_by(by);
        pos.truncate((cap / 4).max(1));
        neg.truncate(cap - pos.len());
        let p = pos.len();
        Some((pos.into_iter().chain(neg).map(|x| x.1).collect(), p))
    };
    let mut out: Vec<Event> = trace
        .pops
        .iter()
        .filter_map(|set| pick(set))
        .map(|(cands, positives)| Event {
            query,
            cands,
            positives,
            weight: 0.0,
        })
        .collect();
    let routing = out.len();
    for e in &mut out {
        e.weight = 0.5 / routing as f32;
    }
    if let Some((cands, positives)) = pick(&trace.seen) {
        out.push(Event {
            query,
            cands,
            positives,
            weight: 0.5,
        });
    }
    out
}

/// Vertices verified under a budget of `total` (at least one).
pub fn verify_for(total: usize, fraction: f64) -> usize {
    ((total as f64 * fraction).round() as usize).max(1)
}

/// Routing distances a budget of `total` leaves after the query map and verification, at
/// d/D each.
fn routing_budget(total: usize, verify: usize, r: &Routing, dim: usize) -> usize {
    total.saturating_sub(verify + r.map_cost()) * dim / r.dim
}

/// What training gives back: the routing of the round that did best on the dev queries (the
/// sum of recall@1 over the budgets; round 0 is the untrained start), with its numbers.
#[derive(Debug, Clone)]
pub struct Trained {
    pub routing: Routing,
    pub round: usize,
    pub dev: Vec<DevPoint>,
    /// The untrained start (the principal subspace, or the lifted vectors).
    pub start: Routing,
}

/// Trains routing vectors for `h`'s bottom layer; `progress` sees every round (round 0: the
/// starting point, no training).
pub fn train(
    h: &Hnsw,
    cfg: &TrainConfig,
    mut progress: impl FnMut(&RoundReport),
) -> Result<Trained> {
    if cfg.dim >= h.dim() && cfg.dim != 0 {
        return Err(Error::Invalid(format!(
            "a routing subspace of {} dimensions for {}-dimensional vectors (0: no projection)",
            cfg.dim,
            h.dim()
        )));
    }
    if cfg.budgets.is_empty()
        || cfg
            .budgets
            .iter()
            .any(|&b| b <= verify_for(b, cfg.verify) + cfg.dim)
    {
        return Err(Error::Invalid(format!(
            "budgets {:?} must be non-empty and each above its verification and the projection \
             ({})",
            cfg.budgets, cfg.dim
        )));
    }
    if cfg.batch == 0 || cfg.candidates < 2 || cfg.hidden == 0 {
        return Err(Error::Invalid(
            "batch and hidden must be positive, candidates at least 2".into(),
        ));
    }
    let live: Vec<u32> = (0..h.slots() as u32)
        .filter(|&s| !h.deleted[s as usize])
        .collect();
    if live.len() < cfg.dev + 100 {
        return Err(Error::Invalid(format!(
            "{} vectors: too few to train routing with {} dev queries",
            live.len(),
            cfg.dev
        )));
    }
    let started = std::time::Instant::now();
    let dim = h.dim();
    let inputs = Inputs::of(h);
    let rev = Reverse::of(h);
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut order = live.clone();
    order.shuffle(&mut rng);
    let (dev, pool) = order.split_at(cfg.dev);
    // The expert's target: each query's nearest other stored vector (the index at a wide
    // beam, which finds the true one for all but a fraction of a percent of queries).
    let nearest = |s: u32| -> Option<u32> {
        let found = h.search(h.vec(s), &Query::top(2, 512)).ok()?;
        found
            .hits
            .iter()
            .filter_map(|hit| h.slot_of.get(&hit.key).copied())
            .find(|&t| t != s)
    };
    let dev_truth: Vec<Option<u32>> = dev.par_iter().map(|&s| nearest(s)).collect();
    let device = Default::default();
    let pca = (cfg.dim > 0).then(|| principal(h, cfg.dim));
    let mut net: Net<Train> = Net::new(&inputs, pca, cfg.ffn.then_some(cfg.hidden), &device);
    let mut optim = AdamConfig::new().init::<Train, Net<Train>>();
    // Plain routing: the stored vectors, lifted (orders as the metric does), all of the
    // budget on routing, the answer its own best.
    let plain_routing = Routing::lifted(h);
    let evaluate = |r: &Routing, budget: usize, learned: bool| -> f64 {
        let w = Walk { h, r };
        let (routing, verify) = if learned {
            let v = verify_for(budget, cfg.verify);
            (routing_budget(budget, v, r, dim), v)
        } else {
            (budget, 1)
        };
        let hits: usize = dev
            .par_iter()
            .zip(&dev_truth)
            .filter(|&(&s, t)| {
                let q = h.vec(s);
                let tr = w.run(q, &r.query(q), Some(s), routing, verify, None, false);
                tr.answer.is_some() && tr.answer == *t
            })
            .count();
        hits as f64 / dev.len().max(1) as f64
    };
    let plain: Vec<f64> = cfg
        .budgets
        .iter()
        .map(|&b| evaluate(&plain_routing, b, false))
        .collect();
    let report_dev = |r: &Routing| -> Vec<DevPoint> {
        cfg.budgets
            .iter()
            .zip(&plain)
            .map(|(&budget, &p)| DevPoint {
                budget,
                plain: p,
                learned: evaluate(r, budget, true),
            })
            .collect()
    };
    let mut routing = inputs.routing(&net.valid());
    let dev0 = report_dev(&routing);
    progress(&RoundReport {
        round: 0,
        events: 0,
        steps: 0,
        loss: f64::NAN,
        accuracy: f64::NAN,
        dev: dev0.clone(),
        secs: started.elapsed().as_secs_f64(),
    });
    let score = |d: &[DevPoint]| d.iter().map(|p| p.learned).sum::<f64>();
    let mut best = Trained {
        routing: routing.clone(),
        round: 0,
        dev: dev0,
        start: routing.clone(),
    };
    let mut next = 0usize;
    for round in 1..=cfg.rounds {
        // (2), (3): sample and label trajectories with the current routing.
        let queries: Vec<u32> = (0..cfg.queries_per_round)
            .map(|i| pool[(next + i) % pool.len()])
            .collect();
        next += queries.len();
        let w = Walk { h, r: &routing };
        let mut walks: Vec<Vec<Event>> = queries
            .par_iter()
            .enumerate()
            .map_init(
                || (Vec::new(), VecDeque::new()),
                |(hops, queue), (i, &s)| {
                    let Some(target) = nearest(s) else {
                        return Vec::new();
                    };
                    rev.hops_into(target, Some(s), hops, queue);
                    let budget = cfg.budgets[i % cfg.budgets.len()];
                    let mut r = StdRng::seed_from_u64(
                        cfg.seed ^ ((round as u64) << 32) ^ u64::from(s).wrapping_mul(0x9e37_79b9),
                    );
                    let q = h.vec(s);
                    let v = verify_for(budget, cfg.verify);
                    let tr = w.run(
                        q,
                        &routing.query(q),
                        Some(s),
                        routing_budget(budget, v, &routing, dim),
                        v,
                        Some((&mut r, cfg.temperature)),
                        true,
                    );
                    label(&tr, hops, s, cfg.candidates)
                },
            )
            .filter(|e| !e.is_empty())
            .collect();
        walks.shuffle(&mut rng);
        let events: usize = walks.iter().map(Vec::len).sum();
        // (4): optimiser steps, each over all events of `batch` queries (their candidates
        // overlap, so the network runs once per distinct vertex); passes over the round's
        // walks until `steps_per_round`.
        let steps = cfg.steps_per_round.max(1);
        let (mut loss_sum, mut acc_sum) = (0.0, 0.0);
        let per_pass = walks.len().div_ceil(cfg.batch).max(1);
        for i in 0..steps {
            if i > 0 && i % per_pass == 0 {
                walks.shuffle(&mut rng);
            }
            let j = (i % per_pass) * cfg.batch;
            let batch = &walks[j.min(walks.len())..(j + cfg.batch).min(walks.len())];
            let batch: Vec<&Event> = batch.iter().flatten().collect();
            if batch.is_empty() {
                continue;
            }
            let (loss, acc) = step_loss(&net, &inputs, &batch, &device);
            loss_sum += f64::from(loss.clone().into_scalar());
            acc_sum += acc;
            let grads = GradientsParams::from_grads(loss.backward(), &net);
            net = optim.step(cfg.lr, net, grads);
        }
        routing = inputs.routing(&net.valid());
        let dev = report_dev(&routing);
        progress(&RoundReport {
            round,
            events,
            steps,
            loss: loss_sum / steps as f64,
            accuracy: acc_sum / steps as f64,
            dev: dev.clone(),
            secs: started.elapsed().as_secs_f64(),
        });
        if score(&dev) > score(&best.dev) {
            best = Trained {
                routing: routing.clone(),
                round,
                dev,
                start: best.start,
            };
        }
    }
    Ok(best)
}

/// The batch's weighted loss and the fraction of its events whose best-scored candidate is a
/// positive.
fn step_loss(
    net: &Net<Train>,
    inputs: &Inputs<'_>,
    batch: &[&Event],
    device: &burn::tensor::Device<Train>,
) -> (Tensor<Train, 1>, f64) {
    let b = batch.len();
    let c = batch.iter().map(|e| e.cands.len()).max().unwrap_or(1);
    let dim = inputs.dim;
    let mut unique: Vec<u32> = Vec::new();
    let mut at: std::collections::HashMap<u32, i64> = std::collections::HashMap::new();
    let mut idx = Vec::with_capacity(b * c);
    let mut valid = Vec::with_capacity(b * c);
    let mut pos = Vec::with_capacity(b * c);
    let mut q = Vec::with_capacity(b * dim);
    let mut w = Vec::with_capacity(b);
    const OFF: f32 = -1e9;
    for e in batch {
        for j in 0..c {
            let here = j < e.cands.len();
            let s = if here { e.cands[j] } else { e.cands[0] };
            let i = *at.entry(s).or_insert_with(|| {
                unique.push(s);
                unique.len() as i64 - 1
            });
            idx.push(i);
            valid.push(if here { 0.0 } else { OFF });
            pos.push(if j < e.positives { 0.0 } else { OFF });
        }
        let s = e.query as usize;
        q.extend_from_slice(&inputs.x[s * dim..(s + 1) * dim]);
        w.push(e.weight);
    }
    let (x, feat) = inputs.rows::<Train>(&unique, device);
    let f = net.forward(x, feat, inputs.sigma);
    let d = f.dims()[1];
    let idx = Ids::<Train>::from_data(TensorData::new(idx, [b * c]), device);
    let f = f.select(0, idx).reshape([b as i32, c as i32, d as i32]);
    let q: Tensor<Train, 2> = Tensor::from_data(TensorData::new(q, [b, dim]), device);
    let g = net.query(q).reshape([b as i32, 1, d as i32]);
    let tau = net.log_tau.val().exp().reshape([1, 1]);
    let logits = (f * g).sum_dim(2).reshape([b as i32, c as i32]) * tau;
    let valid: Tensor<Train, 2> = Tensor::from_data(TensorData::new(valid, [b, c]), device);
    let pos: Tensor<Train, 2> = Tensor::from_data(TensorData::new(pos, [b, c]), device);
    let all = logits.clone() + valid.clone();
    let lse = |x: Tensor<Train, 2>| -> Tensor<Train, 1> {
        let m = x.clone().max_dim(1).detach();
        let s = (x - m.clone()).exp().sum_dim(1).log() + m;
        s.reshape([b as i32])
    };
    let per = lse(all.clone()) - lse(logits + valid + pos);
    let weights: Tensor<Train, 1> = Tensor::from_data(TensorData::new(w.clone(), [b]), device);
    let total: f32 = w.iter().sum();
    let loss = (per * weights).sum().div_scalar(total.max(1e-12));
    // Accuracy: is the arg-max a positive?
    let am: Vec<i64> = all.argmax(1).into_data().iter::<i64>().collect();
    let acc = batch
        .iter()
        .zip(&am)
        .filter(|(e, a)| (**a as usize) < e.positives)
        .count() as f64
        / b.max(1) as f64;
    (loss, acc)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Params;

    /// Recall@1 of walks that pop by hops to the truth (the expert followed exactly) vs the plain
    /// walk, on `n` stored vectors leave-one-out.
    fn expert_recall(h: &Hnsw, budget: usize, n: usize) -> (f64, f64) {
        let r = Routing::lifted(h);
        let rev = Reverse::of(h);
        let w = Walk { h, r: &r };
        let (mut plain, mut expert) = (0, 0);
        for s in 0..n as u32 {
            let found = h.search(h.vec(s), &Query::top(2, 512)).unwrap_or_default();
            let Some(t) = found
                .hits
                .iter()
                .filter_map(|hit| h.slot_of.get(&hit.key).copied())
                .find(|&t| t != s)
            else {
                continue;
            };
            let mut hops = Vec::new();
            rev.hops_into(t, Some(s), &mut hops, &mut VecDeque::new());
            let q = h.vec(s);
            let mut g = q.to_vec();
            g.push(1.0);
            let tr = w.run(q, &g, Some(s), budget, 1, None, false);
            plain += usize::from(tr.answer == Some(t));
            // Expert walk: pop the fewest hops first.
            let mut visited = std::collections::HashSet::new();
            visited.insert(s);
            let entry = h.entry_now().map_or(0, |e| e.slot);
            visited.insert(entry);
            let mut heap = BinaryHeap::new();
            heap.push(std::cmp::Reverse((hops[entry as usize], entry)));
            let mut left = budget;
            let mut found_t = entry == t;
            'w: while let Some(std::cmp::Reverse((_, c))) = heap.pop() {
                for u in Hnsw::ids(h.list(c, 0)) {
                    if !visited.insert(u) {
                        continue;
                    }
                    if left == 0 {
                        break 'w;
                    }
                    left -= 1;
                    found_t |= u == t;
                    heap.push(std::cmp::Reverse((hops[u as usize], u)));
                }
            }
            expert += usize::from(found_t);
        }
        (plain as f64 / n as f64, expert as f64 / n as f64)
    }

    /// The expert's labels are right: a walk that follows them finds the true neighbour
    /// almost always, at a budget where the plain walk often does not (here 1.00 vs 0.58 at 96
    /// distance computations).
    #[test]
    fn following_the_expert_finds_the_neighbour() {
        use rand::Rng;
        let (n, dim) = (4000, 12);
        let mut rng = StdRng::seed_from_u64(3);
        let v: Vec<f32> = (0..n * dim).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let h = Hnsw::build(&v, dim, Metric::L2, Params::with_m(6)).unwrap();
        let (plain, expert) = expert_recall(&h, 96, 300);
        assert!(expert > 0.9, "expert walk {expert:.3}");
        assert!(
            expert > plain + 0.2,
            "expert {expert:.3} vs plain {plain:.3}"
        );
    }

    #[test]
    fn principal_directions_are_orthonormal_and_ordered() {
        use rand::Rng;
        let (n, dim) = (3000, 6);
        let mut rng = StdRng::seed_from_u64(4);
        // Variances 36, 25, 16, 9, 4, 1 along the axes.
        let v: Vec<f32> = (0..n * dim)
            .map(|i| (6 - i % dim) as f32 * rng.gen_range(-1.0f32..1.0) * 3f32.sqrt())
            .collect();
        let h = Hnsw::build(&v, dim, Metric::L2, Params::with_m(6)).unwrap();
        let p = principal(&h, 3);
        for a in 0..3 {
            for b in 0..3 {
                let dot: f32 = (0..dim).map(|i| p[i * 3 + a] * p[i * 3 + b]).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-4, "columns {a}, {b}: {dot}");
            }
            // Column a is (up to sign) axis a.
            assert!(p[a * 3 + a].abs() > 0.99, "column {a}: {:?}", &p);
        }
    }
}
