//! Learned routing (Baranchuk et al., 2019), the search side and the expert; `train` learns
//! the routing vectors on top of these (ARCHITECTURE.md, "Learned routing").
//!
//! A [`Routing`] gives every slot a routing vector `f(v)` and maps a query to `g(q)`; a routed
//! search walks the bottom layer from the fixed entry by the routing distance `−⟨f(v), g(q)⟩`
//! under a budget of distance computations, then re-ranks its best `verify` vertices on the
//! original vectors. Budget accounting is the paper's: a routing distance costs `d/D` of a full
//! one, the query map `d` (when there is one), each verification one.
//!
//! [`Reverse`] holds the bottom layer's edges reversed; a breadth-first search over it from a
//! query's true nearest neighbour gives every vertex's hop count to it along the graph: the
//! expert that labels which candidates a search should have taken.

use std::collections::VecDeque;

use pulp::{Simd, WithSimd};

use crate::distance::{Metric, dispatch, dist, dot, normalise};
use crate::hnsw::{Budget, Found, Hnsw, Near, ToVertex};
use crate::{Error, Result};

/// How a query becomes `g(q)`.
#[derive(Debug, Clone, PartialEq)]
pub enum QueryMap {
    /// `g(q) = q` (d = D).
    Identity,
    /// `g(q) = (q, 1)` (d = D + 1): the extra coordinate of a routing vector acts as a
    /// per-vertex offset, which lets `−⟨f(v), g(q)⟩` equal a squared L2 distance up to a
    /// per-query constant (`f(v) = (x, −|x|²/2)`). Costs nothing.
    Lifted,
    /// `g(q) = (P q, 1)` with P `(d − 1) × D` row-major: routing in a learned subspace, lifted
    /// as above; computing it costs d − 1 distance computations.
    Projected(Vec<f32>),
}

/// Routing vectors of an index's slots and the query map.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Routing dimension d.
    pub dim: usize,
    /// `slots × d`, row-major.
    pub table: Vec<f32>,
    pub map: QueryMap,
}

/// `(x, c(x))`: the lifted vector whose routing distance `−⟨(x, c), (q, 1)⟩` orders vertices as
/// the index's metric does (`c = −|x|²/2` for L2, 0 for inner product and for cosine, whose
/// stored vectors are unit vectors).
pub(crate) fn lift(metric: Metric, x: &[f32], out: &mut Vec<f32>) {
    out.extend_from_slice(x);
    out.push(match metric {
        Metric::L2 => -0.5 * x.iter().map(|a| a * a).sum::<f32>(),
        Metric::InnerProduct | Metric::Cosine => 0.0,
    });
}

impl Routing {
    /// Routing vectors equal to the stored vectors, no query map: with the cosine metric the
    /// routed search then walks exactly as the plain one (the oracle of the routed search).
    pub fn identity(h: &Hnsw) -> Self {
        Self {
            dim: h.dim(),
            table: h.vectors.clone(),
            map: QueryMap::Identity,
        }
    }

    /// The lifted stored vectors ([`QueryMap::Lifted`]): routing that orders vertices exactly
    /// as the index's metric does, for every metric. Learned routing starts here.
    pub fn lifted(h: &Hnsw) -> Self {
        let mut table = Vec::with_capacity(h.slots() * (h.dim() + 1));
        for s in 0..h.slots() as u32 {
            lift(h.metric(), h.vec(s), &mut table);
        }
        Self {
            dim: h.dim() + 1,
            table,
            map: QueryMap::Lifted,
        }
    }

    /// `g(q)`.
    pub fn query(&self, q: &[f32]) -> Vec<f32> {
        match &self.map {
            QueryMap::Identity => q.to_vec(),
            QueryMap::Lifted => {
                let mut g = q.to_vec();
                g.push(1.0);
                g
            }
            QueryMap::Projected(p) => {
                let mut g: Vec<f32> = p
                    .chunks_exact(q.len())
                    .map(|row| row.iter().zip(q).map(|(a, b)| a * b).sum())
                    .collect();
                g.push(1.0);
                g
            }
        }
    }

    /// What computing `g(q)` costs, in full distance computations.
    pub fn map_cost(&self) -> usize {
        match self.map {
            QueryMap::Projected(_) => self.dim - 1,
            QueryMap::Identity | QueryMap::Lifted => 0,
        }
    }

    pub(crate) fn check(&self, h: &Hnsw) -> Result<()> {
        let want = h.slots() * self.dim;
        let dims_ok = match &self.map {
            QueryMap::Identity => self.dim == h.dim(),
            QueryMap::Lifted => self.dim == h.dim() + 1,
            QueryMap::Projected(p) => self.dim >= 2 && p.len() == (self.dim - 1) * h.dim(),
        };
        if self.table.len() != want || !dims_ok || self.dim == 0 {
            return Err(Error::Invalid(format!(
                "a routing table of {} values (dimension {}, query map {}) for {} slots of \
                 dimension {}",
                self.table.len(),
                self.dim,
                self.map_name(),
                h.slots(),
                h.dim()
            )));
        }
        Ok(())
    }

    fn map_name(&self) -> &'static str {
        match self.map {
            QueryMap::Identity => "identity",
            QueryMap::Lifted => "lifted",
            QueryMap::Projected(_) => "projected",
        }
    }
}

/// How one routed search runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routed {
    pub k: usize,
    /// The whole budget, in full-dimensional distance computations.
    pub max_dcs: usize,
    /// Vertices re-ranked on the original vectors.
    pub verify: usize,
}

/// Routing distances.
struct ToRouting<'a, S: Simd> {
    s: S,
    table: &'a [f32],
    dim: usize,
    g: &'a [f32],
}

impl<S: Simd> ToVertex for ToRouting<'_, S> {
    #[inline(always)]
    fn to(&self, v: u32) -> f32 {
        let i = v as usize * self.dim;
        -dot(self.s, &self.table[i..i + self.dim], self.g)
    }

    /// As `ToVector::touch`: one load per cache line of the routing vector, issued before
    /// the distances that need them.
    #[inline(always)]
    fn touch(&self, v: u32) {
        let i = v as usize * self.dim;
        let x = &self.table[i..i + self.dim];
        let mut j = 0;
        while j < x.len() {
            std::hint::black_box(x[j]);
            j += 16;
        }
    }
}

impl Hnsw {
    /// The `k` nearest live vectors to `q` found by routing on `r` (see the module docs).
    pub fn search_routed(&self, r: &Routing, q: &[f32], rq: &Routed) -> Result<Found> {
        r.check(self)?;
        if q.len() != self.dim {
            return Err(Error::Invalid(format!(
                "a query of dimension {} for an index of dimension {}",
                q.len(),
                self.dim
            )));
        }
        let mut qn = q.to_vec();
        if self.metric.normalises() {
            normalise(&mut qn);
        }
        let g = r.query(&qn);
        let proj = r.map_cost();
        let fixed = proj + rq.verify;
        // Routing distances the budget allows: each costs d/D of a full one.
        let routing = rq.max_dcs.saturating_sub(fixed) * self.dim / r.dim.max(1);
        struct Op<'a> {
            h: &'a Hnsw,
            r: &'a Routing,
            g: &'a [f32],
            q: &'a [f32],
            verify: usize,
            routing: usize,
        }
        impl WithSimd for Op<'_> {
            type Output = (Vec<Near>, Budget);
            #[inline(always)]
            fn with_simd<S: Simd>(self, s: S) -> (Vec<Near>, Budget) {
                let h = self.h;
                let d = ToRouting {
                    s,
                    table: &self.r.table,
                    dim: self.r.dim,
                    g: self.g,
                };
                let Some(entry) = h.entry_now() else {
                    return (Vec::new(), Budget::new(Some(0)));
                };
                let mut budget = Budget::new(Some(self.routing));
                let mut vis = h.pool.take(h.slots());
                let first = Near(d.to(entry.slot), entry.slot);
                let top = h.beam(
                    &d,
                    &[first],
                    usize::MAX / 4,
                    0,
                    &mut vis,
                    &mut budget,
                    |_| true,
                );
                h.pool.give(vis);
                // Verification on the original vectors.
                let mut out = Vec::with_capacity(self.verify);
                for n in top.iter().take(self.verify) {
                    out.push(Near(dist(s, h.metric, self.q, h.vec(n.1)), n.1));
                }
                out.sort_unstable();
                (out, budget)
            }
        }
        let (mut best, budget) = dispatch(Op {
            h: self,
            r,
            g: &g,
            q: &qn,
            verify: rq.verify,
            routing,
        });
        let verified = best.len();
        best.truncate(rq.k);
        Ok(Found {
            hits: self.hits(best),
            dcs: (budget.used * r.dim).div_ceil(self.dim) + proj + verified,
            hops: budget.hops,
        })
    }
}

/// The bottom layer's edges reversed (compressed rows: the slots that link to each slot).
#[derive(Debug, Clone)]
pub struct Reverse {
    offsets: Vec<u32>,
    ids: Vec<u32>,
}

impl Reverse {
    pub fn of(h: &Hnsw) -> Self {
        let n = h.slots();
        let mut count = vec![0u32; n + 1];
        for u in 0..n as u32 {
            for v in Hnsw::ids(h.list(u, 0)) {
                count[v as usize + 1] += 1;
            }
        }
        for i in 0..n {
            count[i + 1] += count[i];
        }
        let mut fill = count.clone();
        let mut ids = vec![0u32; count[n] as usize];
        for u in 0..n as u32 {
            for v in Hnsw::ids(h.list(u, 0)) {
                ids[fill[v as usize] as usize] = u;
                fill[v as usize] += 1;
            }
        }
        Self {
            offsets: count,
            ids,
        }
    }

    /// The slots that link to `v`.
    pub fn linking_to(&self, v: u32) -> &[u32] {
        let (a, b) = (self.offsets[v as usize], self.offsets[v as usize + 1]);
        &self.ids[a as usize..b as usize]
    }

    /// Every slot's number of hops to `target` along the bottom layer's edges (`u32::MAX`
    /// where it cannot reach it).
    pub fn hops_to(&self, target: u32) -> Vec<u32> {
        let mut hops = Vec::new();
        self.hops_into(target, None, &mut hops, &mut VecDeque::new());
        hops
    }

    /// [`Reverse::hops_to`] into buffers the caller keeps between calls, with paths through
    /// `avoid` left out (a stored vector used as a query is not in its own search, so a path
    /// through it is no path for that search).
    pub fn hops_into(
        &self,
        target: u32,
        avoid: Option<u32>,
        hops: &mut Vec<u32>,
        queue: &mut VecDeque<u32>,
    ) {
        let n = self.offsets.len() - 1;
        hops.clear();
        hops.resize(n, u32::MAX);
        queue.clear();
        if let Some(a) = avoid {
            // Marked reached so it is never entered; reset below.
            hops[a as usize] = 0;
        }
        hops[target as usize] = 0;
        queue.push_back(target);
        while let Some(v) = queue.pop_front() {
            let h = hops[v as usize] + 1;
            for &u in self.linking_to(v) {
                if hops[u as usize] == u32::MAX {
                    hops[u as usize] = h;
                    queue.push_back(u);
                }
            }
        }
        if let Some(a) = avoid.filter(|&a| a != target) {
            hops[a as usize] = u32::MAX;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{Params, Query};
    use rand::{Rng, SeedableRng};

    fn random(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n * dim).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    /// With the stored vectors as routing vectors and the cosine metric, the routing distance
    /// orders vertices as the plain distance does, so a routed search under budget B + verify
    /// walks as the plain bottom-layer search under B and answers the same.
    #[test]
    fn identity_routing_walks_as_the_plain_search() {
        let (n, dim) = (2000, 12);
        let h = Hnsw::build(&random(n, dim, 1), dim, Metric::Cosine, Params::with_m(8)).unwrap();
        let r = Routing::identity(&h);
        let queries = random(40, dim, 2);
        for b in [32, 128, 512] {
            for q in queries.chunks_exact(dim) {
                let plain = h
                    .search(
                        q,
                        &Query {
                            max_dcs: Some(b),
                            bottom_only: true,
                            ..Query::top(5, usize::MAX / 4)
                        },
                    )
                    .unwrap();
                let routed = h
                    .search_routed(
                        &r,
                        q,
                        &Routed {
                            k: 5,
                            max_dcs: b + 5,
                            verify: 5,
                        },
                    )
                    .unwrap();
                let keys = |f: &Found| f.hits.iter().map(|x| x.key).collect::<Vec<_>>();
                assert_eq!(keys(&plain), keys(&routed), "budget {b}");
                assert!(routed.dcs <= b + 5, "{} over {}", routed.dcs, b + 5);
            }
        }
        let bad = Routing {
            dim: 3,
            table: vec![0.0; 5],
            map: QueryMap::Identity,
        };
        assert!(
            h.search_routed(
                &bad,
                &queries[..dim],
                &Routed {
                    k: 1,
                    max_dcs: 10,
                    verify: 1
                }
            )
            .is_err()
        );
    }

    #[test]
    fn hop_counts_follow_the_edges() {
        let (n, dim) = (500, 6);
        let h = Hnsw::build(&random(n, dim, 3), dim, Metric::L2, Params::with_m(6)).unwrap();
        let rev = Reverse::of(&h);
        let target = 17u32;
        let hops = rev.hops_to(target);
        assert_eq!(hops[target as usize], 0);
        // Forward check: a vertex's hops are 1 + the fewest hops among its out-neighbours.
        for u in 0..n as u32 {
            if u == target || hops[u as usize] == u32::MAX {
                continue;
            }
            let best = Hnsw::ids(h.list(u, 0))
                .map(|v| hops[v as usize])
                .min()
                .unwrap();
            assert_eq!(hops[u as usize], best + 1, "vertex {u}");
        }
        // A proximity graph is (nearly) strongly connected: almost everyone reaches the target.
        let reach = hops.iter().filter(|&&x| x != u32::MAX).count();
        assert!(reach > n * 95 / 100, "{reach} of {n} reach the target");
    }
}
