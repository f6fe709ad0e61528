//! HNSW (Malkov & Yashunin): a hierarchy of proximity graphs over the vectors, searched from a
//! sparse top layer down to the bottom one, where every vector lives.
//!
//! Storage is flat: vectors in one `Vec<f32>`; the bottom layer's links in one array of
//! `1 + m0` words per slot (count, then ids); upper layers per slot (`levels × (1 + m)`). Links
//! are atomics so that a bulk build inserts from every thread at once, each writer holding the
//! lock of the vertex whose list it rewrites (readers do not lock: a reader racing a rewrite
//! sees a valid id list, maybe the old one; on x86 a relaxed load is a plain load, so searches
//! pay nothing for it).
//!
//! Invariants: every id in a list is a live slot (deletes repair the lists that named the
//! deleted vertex before the slot can be reused); a list never names its own vertex or one id
//! twice; the entry vertex is live and on the top level, or the index is empty.

use std::collections::{BinaryHeap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use pulp::{Simd, WithSimd};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::distance::{Metric, dispatch, dist, normalise};
use crate::visited::{Pool, Visited};
use crate::{Error, Result};

/// Build parameters.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Params {
    /// Links per vertex on the upper layers.
    pub m: usize,
    /// Links per vertex on the bottom layer (hnswlib: 2·m).
    pub m0: usize,
    /// Beam width while inserting.
    pub ef_construction: usize,
    /// Seed of the level draws.
    pub seed: u64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            m: 16,
            m0: 32,
            ef_construction: 200,
            seed: 42,
        }
    }
}

impl Params {
    pub fn with_m(m: usize) -> Self {
        Self {
            m,
            m0: 2 * m,
            ..Self::default()
        }
    }
}

/// How one search runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// Neighbours wanted.
    pub k: usize,
    /// Beam width on the bottom layer (at least `k` is used).
    pub ef: usize,
    /// A budget of distance computations (DCS): the search stops when it is spent.
    pub max_dcs: Option<usize>,
    /// Only vectors with this label are answers (the graph is still walked through others).
    pub label: Option<u32>,
    /// Start at the fixed entry vertex on the bottom layer (the setting of the learned-routing
    /// paper) instead of descending the hierarchy.
    pub bottom_only: bool,
}

impl Query {
    pub fn top(k: usize, ef: usize) -> Self {
        Self {
            k,
            ef,
            max_dcs: None,
            label: None,
            bottom_only: false,
        }
    }
}

/// One answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub key: u64,
    pub distance: f32,
}

/// A search's answers, nearest first, and what it cost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Found {
    pub hits: Vec<Hit>,
    /// Distance computations.
    pub dcs: usize,
    /// Vertices expanded.
    pub hops: usize,
}

/// (distance, slot), ordered by distance then slot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Near(pub f32, pub u32);

impl Eq for Near {}
impl PartialOrd for Near {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Near {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
    }
}

/// The min-heap side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Far(std::cmp::Reverse<Near>);

/// Distance computations left.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    pub left: usize,
    pub used: usize,
    /// Vertices expanded.
    pub hops: usize,
}

impl Budget {
    pub fn new(max: Option<usize>) -> Self {
        Self {
            left: max.unwrap_or(usize::MAX),
            used: 0,
            hops: 0,
        }
    }

    #[inline(always)]
    pub fn spend(&mut self) -> bool {
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        self.used += 1;
        true
    }
}

/// The query's distance to a vertex. Searches take this, not a closure: the search runs inside
/// one SIMD dispatch, and a closure's body may be compiled apart from it, without the
/// dispatch's target features, which made every distance a chain of calls (the GloVe ground
/// truth ran ~10× slower that way).
pub(crate) trait ToVertex {
    fn to(&self, v: u32) -> f32;
    /// Starts loading what `to(v)` will read (a hint; the default does nothing).
    #[inline(always)]
    fn touch(&self, _v: u32) {}
}

/// Distances to the stored vectors.
pub(crate) struct ToVector<'a, S: Simd> {
    pub s: S,
    pub metric: Metric,
    pub q: &'a [f32],
    pub h: &'a Hnsw,
}

impl<S: Simd> ToVertex for ToVector<'_, S> {
    #[inline(always)]
    fn to(&self, v: u32) -> f32 {
        dist(self.s, self.metric, self.q, self.h.vec(v))
    }

    /// One load per 64-byte line of the vector, issued before the distances that need them,
    /// so that a vertex's neighbours' cache misses overlap (safe code has no prefetch
    /// instruction; a load whose value is not waited for does the same).
    #[inline(always)]
    fn touch(&self, v: u32) {
        let x = self.h.vec(v);
        let mut i = 0;
        while i < x.len() {
            std::hint::black_box(x[i]);
            i += 16;
        }
    }
}

/// Distances between stored vectors and a list of them, without closures (see [`ToVertex`]).
#[inline(always)]
fn nears<S: Simd>(s: S, h: &Hnsw, base: &[f32], ids: &[u32]) -> Vec<Near> {
    let mut out = Vec::with_capacity(ids.len());
    for &x in ids {
        out.push(Near(dist(s, h.metric, base, h.vec(x)), x));
    }
    out
}

/// The entry vertex and its level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub slot: u32,
    pub level: usize,
}

/// The index.
#[derive(Debug)]
pub struct Hnsw {
    pub(crate) dim: usize,
    pub(crate) metric: Metric,
    pub(crate) params: Params,
    pub(crate) vectors: Vec<f32>,
    pub(crate) links0: Vec<AtomicU32>,
    pub(crate) upper: Vec<Vec<AtomicU32>>,
    pub(crate) levels: Vec<u8>,
    pub(crate) keys: Vec<u64>,
    pub(crate) labels: Vec<u32>,
    /// Slots whose vector was deleted (their lists are empty and nothing links to them).
    pub(crate) deleted: Vec<bool>,
    pub(crate) slot_of: HashMap<u64, u32>,
    pub(crate) entry: Mutex<Option<Entry>>,
    /// Held while a vertex above the current top level is inserted.
    promote: Mutex<()>,
    locks: Vec<Mutex<()>>,
    pub(crate) pool: Pool,
    rng: rand::rngs::StdRng,
}

/// The label of vectors inserted without one.
pub const NO_LABEL: u32 = u32::MAX;

const MAX_LEVEL: usize = 15;

impl Hnsw {
    /// An empty index of `dim`-dimensional vectors.
    pub fn new(dim: usize, metric: Metric, params: Params) -> Result<Self> {
        if dim == 0 {
            return Err(Error::Invalid("dimension 0".into()));
        }
        if params.m < 2 || params.m0 < params.m || params.ef_construction == 0 {
            return Err(Error::Invalid(format!(
                "parameters m = {}, m0 = {}, ef_construction = {}: need m ≥ 2, m0 ≥ m, ef ≥ 1",
                params.m, params.m0, params.ef_construction
            )));
        }
        let rng = rand::rngs::StdRng::seed_from_u64(params.seed);
        Ok(Self {
            dim,
            metric,
            params,
            vectors: Vec::new(),
            links0: Vec::new(),
            upper: Vec::new(),
            levels: Vec::new(),
            keys: Vec::new(),
            labels: Vec::new(),
            deleted: Vec::new(),
            slot_of: HashMap::new(),
            entry: Mutex::new(None),
            promote: Mutex::new(()),
            locks: Vec::new(),
            pool: Pool::default(),
            rng,
        })
    }

    /// Builds an index over `vectors` (`n × dim`, row-major; keys 0..n, no labels) on
    /// rayon's threads.
    pub fn build(vectors: &[f32], dim: usize, metric: Metric, params: Params) -> Result<Self> {
        let mut h = Self::new(dim, metric, params)?;
        if !vectors.len().is_multiple_of(dim) {
            return Err(Error::Invalid(format!(
                "{} values are not a whole number of {dim}-dimensional vectors",
                vectors.len()
            )));
        }
        let n = vectors.len() / dim;
        let keys: Vec<u64> = (0..n as u64).collect();
        h.insert_many(vectors, &keys, None)?;
        Ok(h)
    }

    /// An index from stored parts (the file reader checks them first).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        dim: usize,
        metric: Metric,
        params: Params,
        vectors: Vec<f32>,
        links0: Vec<AtomicU32>,
        upper: Vec<Vec<AtomicU32>>,
        levels: Vec<u8>,
        keys: Vec<u64>,
        labels: Vec<u32>,
        deleted: Vec<bool>,
        entry: Option<Entry>,
    ) -> Result<Self> {
        let mut h = Self::new(dim, metric, params)?;
        let slot_of: HashMap<u64, u32> = keys
            .iter()
            .zip(&deleted)
            .enumerate()
            .filter(|(_, (_, d))| !**d)
            .map(|(s, (k, _))| (*k, s as u32))
            .collect();
        if slot_of.len() != deleted.iter().filter(|d| !**d).count() {
            return Err(Error::Invalid("two live vectors share a key".into()));
        }
        h.locks = (0..levels.len()).map(|_| Mutex::new(())).collect();
        h.vectors = vectors;
        h.links0 = links0;
        h.upper = upper;
        h.levels = levels;
        h.keys = keys;
        h.labels = labels;
        h.deleted = deleted;
        h.slot_of = slot_of;
        h.entry = Mutex::new(entry);
        Ok(h)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Live vectors.
    pub fn len(&self) -> usize {
        self.slot_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slot_of.is_empty()
    }

    /// Slots (live and deleted).
    pub fn slots(&self) -> usize {
        self.levels.len()
    }

    pub fn contains(&self, key: u64) -> bool {
        self.slot_of.contains_key(&key)
    }

    /// The stored vector of `key` (normalised under the cosine metric).
    pub fn vector(&self, key: u64) -> Option<&[f32]> {
        self.slot_of.get(&key).map(|&s| self.vec(s))
    }

    /// Bytes the index holds: vectors, links, levels, keys, labels, flags and the key map.
    pub fn memory_bytes(&self) -> usize {
        let upper: usize = self.upper.iter().map(|u| u.len() * 4 + 24).sum();
        self.vectors.len() * 4
            + self.links0.len() * 4
            + upper
            + self.levels.len()
            + self.keys.len() * 8
            + self.labels.len() * 4
            + self.deleted.len()
            + self.slot_of.capacity() * 16
            + self.locks.len() * std::mem::size_of::<Mutex<()>>()
    }

    #[inline(always)]
    pub(crate) fn vec(&self, slot: u32) -> &[f32] {
        let s = slot as usize * self.dim;
        &self.vectors[s..s + self.dim]
    }

    /// The link list of `slot` on `level`: `[count, ids…]`.
    #[inline(always)]
    pub(crate) fn list(&self, slot: u32, level: usize) -> &[AtomicU32] {
        if level == 0 {
            let w = 1 + self.params.m0;
            &self.links0[slot as usize * w..(slot as usize + 1) * w]
        } else {
            let w = 1 + self.params.m;
            &self.upper[slot as usize][(level - 1) * w..level * w]
        }
    }

    /// The ids in a list (a snapshot; see the module docs).
    #[inline(always)]
    pub(crate) fn ids(list: &[AtomicU32]) -> impl Iterator<Item = u32> + '_ {
        let n = (list[0].load(Relaxed) as usize).min(list.len() - 1);
        list[1..1 + n].iter().map(|a| a.load(Relaxed))
    }

    fn cap(&self, level: usize) -> usize {
        if level == 0 {
            self.params.m0
        } else {
            self.params.m
        }
    }

    fn draw_level(&mut self) -> usize {
        let mult = 1.0 / (self.params.m as f64).ln();
        let u: f64 = self.rng.gen_range(f64::MIN_POSITIVE..1.0);
        ((-u.ln() * mult) as usize).min(MAX_LEVEL)
    }

    /// Inserts (or replaces) one vector.
    pub fn insert(&mut self, key: u64, v: &[f32], label: Option<u32>) -> Result<()> {
        self.insert_many(v, &[key], label.map(|l| vec![l]).as_deref())
    }

    /// Inserts `keys.len()` vectors (`vectors` row-major), in parallel; a key already present
    /// is deleted first (its vector replaced).
    pub fn insert_many(
        &mut self,
        vectors: &[f32],
        keys: &[u64],
        labels: Option<&[u32]>,
    ) -> Result<()> {
        if vectors.len() != keys.len() * self.dim {
            return Err(Error::Invalid(format!(
                "{} values for {} vectors of dimension {}",
                vectors.len(),
                keys.len(),
                self.dim
            )));
        }
        if labels.is_some_and(|l| l.len() != keys.len()) {
            return Err(Error::Invalid("one label per vector".into()));
        }
        if let Some(i) = vectors.iter().position(|x| !x.is_finite()) {
            return Err(Error::Invalid(format!(
                "vector {} has a non-finite value",
                i / self.dim
            )));
        }
        let mut seen = std::collections::HashSet::with_capacity(keys.len());
        if let Some(k) = keys.iter().find(|k| !seen.insert(**k)) {
            return Err(Error::Invalid(format!("key {k} given twice")));
        }
        for k in keys {
            if self.contains(*k) {
                self.delete(*k)?;
            }
        }
        // Slots: deleted ones first, then new.
        let mut free: Vec<u32> = (0..self.slots() as u32)
            .filter(|&s| self.deleted[s as usize])
            .collect();
        free.reverse();
        let mut slots = Vec::with_capacity(keys.len());
        for (i, &key) in keys.iter().enumerate() {
            let level = self.draw_level();
            let slot = match free.pop() {
                Some(s) => s,
                None => self.grow(),
            };
            let mut v = vectors[i * self.dim..(i + 1) * self.dim].to_vec();
            if self.metric.normalises() {
                normalise(&mut v);
            }
            let s = slot as usize;
            self.vectors[s * self.dim..(s + 1) * self.dim].copy_from_slice(&v);
            self.levels[s] = level as u8;
            self.upper[s] = (0..level * (1 + self.params.m))
                .map(|_| AtomicU32::new(0))
                .collect();
            for a in self.list(slot, 0) {
                a.store(0, Relaxed);
            }
            self.keys[s] = key;
            self.labels[s] = labels.map_or(NO_LABEL, |l| l[i]);
            self.deleted[s] = false;
            self.slot_of.insert(key, slot);
            slots.push(slot);
        }
        // The first vertex of an empty index is the entry; the rest link in parallel.
        let mut rest = &slots[..];
        if self.entry_now().is_none()
            && let Some((&first, tail)) = slots.split_first()
        {
            self.set_entry(Some(Entry {
                slot: first,
                level: self.levels[first as usize] as usize,
            }));
            rest = tail;
        }
        let this = &*self;
        rest.par_iter().for_each(|&s| this.link(s));
        // A replaced link can strand another vertex: repeat until none is added (in practice
        // one pass; bounded all the same).
        for _ in 0..8 {
            if self.connect_bottom() == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Makes every live vertex reachable from the entry on the bottom layer. The neighbour
    /// heuristic can leave a vertex with no in-links (every vertex that once linked to it
    /// later pruned it); such a vertex is never found by any search. Each one found by a
    /// breadth-first walk from the entry gets a link from the nearest reached vertex among
    /// its own neighbours (or, with none reached, from the entry); when that list is full,
    /// the link replaces the neighbour with the most other in-links. Returns how many links
    /// were added.
    pub fn connect_bottom(&mut self) -> usize {
        let Some(entry) = self.entry_now() else {
            return 0;
        };
        let n = self.slots();
        let mut indeg = vec![0u32; n];
        for u in 0..n as u32 {
            for v in Self::ids(self.list(u, 0)) {
                indeg[v as usize] += 1;
            }
        }
        let mut reached = vec![false; n];
        let mut queue = std::collections::VecDeque::new();
        let mut added = 0;
        let walk = |h: &Self,
                    from: u32,
                    reached: &mut Vec<bool>,
                    queue: &mut std::collections::VecDeque<u32>| {
            if reached[from as usize] {
                return;
            }
            reached[from as usize] = true;
            queue.push_back(from);
            while let Some(v) = queue.pop_front() {
                for u in Self::ids(h.list(v, 0)) {
                    if !reached[u as usize] {
                        reached[u as usize] = true;
                        queue.push_back(u);
                    }
                }
            }
        };
        walk(self, entry.slot, &mut reached, &mut queue);
        for v in 0..n as u32 {
            if reached[v as usize] || self.deleted[v as usize] {
                continue;
            }
            let me = self.vec(v);
            let from = Self::ids(self.list(v, 0))
                .filter(|&u| reached[u as usize])
                .map(|u| (self.metric.distance(me, self.vec(u)), u))
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .map_or(entry.slot, |x| x.1);
            let list = self.list(from, 0);
            let cnt = (list[0].load(Relaxed) as usize).min(self.params.m0);
            if cnt < self.params.m0 {
                list[1 + cnt].store(v, Relaxed);
                list[0].store(cnt as u32 + 1, Relaxed);
            } else {
                // Replace the neighbour that others link to most (it stays reachable).
                let (pos, w) = Self::ids(list)
                    .enumerate()
                    .max_by_key(|&(_, w)| indeg[w as usize])
                    .unwrap_or((0, v));
                indeg[w as usize] = indeg[w as usize].saturating_sub(1);
                list[1 + pos].store(v, Relaxed);
            }
            indeg[v as usize] += 1;
            added += 1;
            walk(self, v, &mut reached, &mut queue);
        }
        added
    }

    /// A new slot at the end.
    fn grow(&mut self) -> u32 {
        let s = self.levels.len();
        self.vectors.resize((s + 1) * self.dim, 0.0);
        self.links0
            .extend((0..1 + self.params.m0).map(|_| AtomicU32::new(0)));
        self.upper.push(Vec::new());
        self.levels.push(0);
        self.keys.push(0);
        self.labels.push(NO_LABEL);
        self.deleted.push(true);
        self.locks.push(Mutex::new(()));
        s as u32
    }

    pub(crate) fn entry_now(&self) -> Option<Entry> {
        self.entry.lock().ok().and_then(|e| *e)
    }

    fn set_entry(&self, e: Option<Entry>) {
        if let Ok(mut g) = self.entry.lock() {
            *g = e;
        }
    }

    /// Links a stored vertex into the graph (what an insert does after storing the vector).
    fn link(&self, slot: u32) {
        struct Op<'a> {
            h: &'a Hnsw,
            slot: u32,
        }
        impl WithSimd for Op<'_> {
            type Output = ();
            #[inline(always)]
            fn with_simd<S: Simd>(self, s: S) {
                self.h.link_simd(s, self.slot);
            }
        }
        dispatch(Op { h: self, slot });
    }

    #[inline(always)]
    fn link_simd<S: Simd>(&self, s: S, slot: u32) {
        let level = self.levels[slot as usize] as usize;
        let Some(mut entry) = self.entry_now() else {
            return;
        };
        let _promoting = if level > entry.level {
            let g = self.promote.lock().ok();
            match self.entry_now() {
                Some(e) => entry = e,
                None => return,
            }
            g
        } else {
            None
        };
        let q = self.vec(slot);
        let metric = self.metric;
        let d = ToVector {
            s,
            metric,
            q,
            h: self,
        };
        let mut budget = Budget::new(None);
        let mut ep = Near(d.to(entry.slot), entry.slot);
        for lc in (level + 1..=entry.level).rev() {
            ep = self.greedy(&d, ep, lc, &mut budget);
        }
        let mut vis = self.pool.take(self.slots());
        let mut eps = vec![ep];
        for lc in (0..=level.min(entry.level)).rev() {
            let w = self.beam(
                &d,
                &eps,
                self.params.ef_construction,
                lc,
                &mut vis,
                &mut budget,
                |_| true,
            );
            vis.reset(self.slots());
            let chosen = self.select(s, &w, self.cap(lc), slot);
            {
                let _g = self.locks[slot as usize].lock();
                write_list(self.list(slot, lc), &chosen);
            }
            for &e in &chosen {
                self.add_link(s, e, slot, lc);
            }
            eps = w;
        }
        self.pool.give(vis);
        if level > entry.level {
            self.set_entry(Some(Entry { slot, level }));
        }
    }

    /// Adds `new` to `e`'s list on `level`, pruning with the heuristic when full.
    #[inline(always)]
    fn add_link<S: Simd>(&self, s: S, e: u32, new: u32, level: usize) {
        let _g = self.locks[e as usize].lock();
        let list = self.list(e, level);
        let cap = self.cap(level);
        let n = (list[0].load(Relaxed) as usize).min(cap);
        if Self::ids(list).any(|x| x == new) {
            return;
        }
        if n < cap {
            list[1 + n].store(new, Relaxed);
            list[0].store(n as u32 + 1, Relaxed);
            return;
        }
        let base = self.vec(e);
        let ids: Vec<u32> = Self::ids(list).chain(std::iter::once(new)).collect();
        let mut cands = nears(s, self, base, &ids);
        cands.sort_unstable();
        let chosen = self.select(s, &cands, cap, e);
        write_list(list, &chosen);
    }

    /// hnswlib's neighbour heuristic: from `cands` (nearest first, distances to the vertex
    /// `of`), keep a candidate only if it is nearer to `of` than to every one kept before.
    #[inline(always)]
    pub(crate) fn select<S: Simd>(&self, s: S, cands: &[Near], m: usize, of: u32) -> Vec<u32> {
        let mut kept: Vec<u32> = Vec::with_capacity(m);
        for &Near(d, c) in cands {
            if kept.len() >= m {
                break;
            }
            if c == of || kept.contains(&c) {
                continue;
            }
            let cv = self.vec(c);
            let mut good = true;
            for &r in &kept {
                if dist(s, self.metric, cv, self.vec(r)) < d {
                    good = false;
                    break;
                }
            }
            if good {
                kept.push(c);
            }
        }
        kept
    }

    /// Greedy descent on one upper level.
    #[inline(always)]
    pub(crate) fn greedy(
        &self,
        d: &impl ToVertex,
        mut cur: Near,
        level: usize,
        budget: &mut Budget,
    ) -> Near {
        loop {
            let mut moved = false;
            for n in Self::ids(self.list(cur.1, level)) {
                if !budget.spend() {
                    return cur;
                }
                let dn = d.to(n);
                if dn < cur.0 {
                    cur = Near(dn, n);
                    moved = true;
                }
            }
            if !moved {
                return cur;
            }
            budget.hops += 1;
        }
    }

    /// Best-first beam search on one level from `eps`: the `ef` nearest found that pass `ok`,
    /// nearest first. Vertices failing `ok` are walked through but never answers.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(crate) fn beam(
        &self,
        d: &impl ToVertex,
        eps: &[Near],
        ef: usize,
        level: usize,
        vis: &mut Visited,
        budget: &mut Budget,
        ok: impl Fn(u32) -> bool,
    ) -> Vec<Near> {
        // ef may be "unbounded" (a budgeted search): size the heaps for what is typical.
        let mut cand: BinaryHeap<Far> = BinaryHeap::with_capacity(ef.min(512) * 2);
        let mut top: BinaryHeap<Near> = BinaryHeap::with_capacity(ef.min(512) + 1);
        for &e in eps {
            if vis.insert(e.1) {
                cand.push(Far(std::cmp::Reverse(e)));
                if ok(e.1) {
                    top.push(e);
                }
            }
        }
        while top.len() > ef {
            top.pop();
        }
        let mut bound = if top.len() >= ef {
            top.peek().map_or(f32::INFINITY, |n| n.0)
        } else {
            f32::INFINITY
        };
        let mut fresh: Vec<u32> = Vec::with_capacity(self.params.m0);
        'outer: while let Some(Far(std::cmp::Reverse(c))) = cand.pop() {
            if c.0 > bound {
                break;
            }
            budget.hops += 1;
            // The next candidate's links are read after this vertex's neighbours: start their
            // loads now (hnswlib prefetches them the same way).
            if let Some(Far(std::cmp::Reverse(next))) = cand.peek() {
                let l = self.list(next.1, level);
                let mut i = 0;
                while i < l.len() {
                    std::hint::black_box(l[i].load(Relaxed));
                    i += 16;
                }
            }
            // The unvisited neighbours first, their vectors' loads issued together.
            fresh.clear();
            for n in Self::ids(self.list(c.1, level)) {
                if vis.insert(n) {
                    fresh.push(n);
                    d.touch(n);
                }
            }
            for &n in &fresh {
                if !budget.spend() {
                    break 'outer;
                }
                let dn = d.to(n);
                if top.len() < ef || dn < bound {
                    cand.push(Far(std::cmp::Reverse(Near(dn, n))));
                    if ok(n) {
                        top.push(Near(dn, n));
                        if top.len() > ef {
                            top.pop();
                        }
                        if top.len() >= ef {
                            bound = top.peek().map_or(f32::INFINITY, |x| x.0);
                        }
                    }
                }
            }
        }
        top.into_sorted_vec()
    }

    /// The `q.k` nearest live vectors to `v`.
    pub fn search(&self, v: &[f32], q: &Query) -> Result<Found> {
        if v.len() != self.dim {
            return Err(Error::Invalid(format!(
                "a query of dimension {} for an index of dimension {}",
                v.len(),
                self.dim
            )));
        }
        let mut owned;
        let v = if self.metric.normalises() {
            owned = v.to_vec();
            normalise(&mut owned);
            &owned[..]
        } else {
            v
        };
        struct Op<'a> {
            h: &'a Hnsw,
            v: &'a [f32],
            q: &'a Query,
        }
        impl WithSimd for Op<'_> {
            type Output = Found;
            #[inline(always)]
            fn with_simd<S: Simd>(self, s: S) -> Found {
                let (h, v) = (self.h, self.v);
                let metric = h.metric;
                let d = ToVector { s, metric, q: v, h };
                h.search_with(&d, self.q)
            }
        }
        Ok(dispatch(Op { h: self, v, q }))
    }

    /// A search where `d` gives the query's distance to a vertex (the original vectors, or
    /// learned routing vectors).
    #[inline(always)]
    pub(crate) fn search_with(&self, d: &impl ToVertex, q: &Query) -> Found {
        let Some(entry) = self.entry_now() else {
            return Found::default();
        };
        let mut budget = Budget::new(q.max_dcs);
        let start = if q.bottom_only {
            entry.slot
        } else {
            let mut ep = Near(d.to(entry.slot), entry.slot);
            budget.spend();
            for lc in (1..=entry.level).rev() {
                ep = self.greedy(d, ep, lc, &mut budget);
            }
            ep.1
        };
        let mut vis = self.pool.take(self.slots());
        let label = q.label;
        let ok = |x: u32| label.is_none_or(|l| self.labels[x as usize] == l);
        let first = Near(d.to(start), start);
        let ef = q.ef.max(q.k);
        let mut top = self.beam(d, &[first], ef, 0, &mut vis, &mut budget, ok);
        self.pool.give(vis);
        top.truncate(q.k);
        Found {
            hits: self.hits(top),
            dcs: budget.used,
            hops: budget.hops,
        }
    }

    /// Answers from (distance, slot) pairs, in their order.
    pub(crate) fn hits(&self, nears: Vec<Near>) -> Vec<Hit> {
        nears
            .into_iter()
            .map(|Near(distance, s)| Hit {
                key: self.keys[s as usize],
                distance,
            })
            .collect()
    }

    /// Searches every row of `vectors` on rayon's threads.
    pub fn search_many(&self, vectors: &[f32], q: &Query) -> Result<Vec<Found>> {
        if !vectors.len().is_multiple_of(self.dim) {
            return Err(Error::Invalid(format!(
                "{} values are not whole queries of dimension {}",
                vectors.len(),
                self.dim
            )));
        }
        vectors
            .par_chunks_exact(self.dim)
            .map(|v| self.search(v, q))
            .collect()
    }

    /// Deletes `key`: its vertex leaves every list (each list that named it is refilled by the
    /// heuristic from its other links and the deleted vertex's links), the entry moves if it was
    /// the entry, and its slot is reused by a later insert.
    pub fn delete(&mut self, key: u64) -> Result<()> {
        let Some(slot) = self.slot_of.remove(&key) else {
            return Err(Error::NotFound(key));
        };
        self.deleted[slot as usize] = true;
        struct Op<'a> {
            h: &'a mut Hnsw,
            slot: u32,
        }
        impl WithSimd for Op<'_> {
            type Output = ();
            #[inline(always)]
            fn with_simd<S: Simd>(self, s: S) {
                self.h.repair(s, self.slot);
            }
        }
        dispatch(Op { h: self, slot });
        Ok(())
    }

    #[inline(always)]
    fn repair<S: Simd>(&mut self, s: S, gone: u32) {
        let top = self.levels[gone as usize] as usize;
        for level in 0..=top {
            let its: Vec<u32> = Self::ids(self.list(gone, level))
                .filter(|&x| !self.deleted[x as usize])
                .collect();
            // Every live vertex on this level whose list names `gone`.
            let pointing: Vec<u32> = (0..self.slots() as u32)
                .into_par_iter()
                .filter(|&u| {
                    !self.deleted[u as usize]
                        && self.levels[u as usize] as usize >= level
                        && Self::ids(self.list(u, level)).any(|x| x == gone)
                })
                .collect();
            for u in pointing {
                let base = self.vec(u);
                let ids: Vec<u32> = Self::ids(self.list(u, level))
                    .filter(|&x| x != gone)
                    .chain(its.iter().copied().filter(|&x| x != u))
                    .collect();
                let mut cands = nears(s, self, base, &ids);
                cands.sort_unstable();
                cands.dedup_by_key(|n| n.1);
                let chosen = self.select(s, &cands, self.cap(level), u);
                write_list(self.list(u, level), &chosen);
            }
            write_list(self.list(gone, level), &[]);
        }
        self.upper[gone as usize] = Vec::new();
        self.levels[gone as usize] = 0;
        if self.entry_now().is_some_and(|e| e.slot == gone) {
            let next = (0..self.slots() as u32)
                .filter(|&x| !self.deleted[x as usize])
                .max_by_key(|&x| self.levels[x as usize]);
            self.set_entry(next.map(|slot| Entry {
                slot,
                level: self.levels[slot as usize] as usize,
            }));
        }
    }
}

fn write_list(list: &[AtomicU32], ids: &[u32]) {
    for (a, &id) in list[1..].iter().zip(ids) {
        a.store(id, Relaxed);
    }
    list[0].store(ids.len() as u32, Relaxed);
}

/// The `k` nearest rows of `base` to `q` by brute force (ties by index): the oracle. Under
/// the cosine metric both sides are normalised first.
pub fn brute_force(base: &[f32], dim: usize, metric: Metric, q: &[f32], k: usize) -> Vec<u32> {
    struct Op<'a> {
        base: &'a [f32],
        dim: usize,
        metric: Metric,
        q: &'a [f32],
    }
    impl WithSimd for Op<'_> {
        type Output = Vec<Near>;
        #[inline(always)]
        fn with_simd<S: Simd>(self, s: S) -> Vec<Near> {
            let mut qn = self.q.to_vec();
            let mut vn = vec![0f32; self.dim];
            let cosine = self.metric.normalises();
            if cosine {
                normalise(&mut qn);
            }
            // A loop, not a closure: see `ToVertex`.
            let mut out = Vec::with_capacity(self.base.len() / self.dim);
            for (i, v) in self.base.chunks_exact(self.dim).enumerate() {
                let d = if cosine {
                    vn.copy_from_slice(v);
                    normalise(&mut vn);
                    dist(s, self.metric, &qn, &vn)
                } else {
                    dist(s, self.metric, &qn, v)
                };
                out.push(Near(d, i as u32));
            }
            out
        }
    }
    let mut all = dispatch(Op {
        base,
        dim,
        metric,
        q,
    });
    let k = k.min(all.len());
    if k == 0 {
        return Vec::new();
    }
    all.select_nth_unstable(k - 1);
    all.truncate(k);
    all.sort_unstable();
    all.into_iter().map(|n| n.1).collect()
}
