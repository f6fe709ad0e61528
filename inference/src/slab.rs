//! The block KV cache laid out for the GPU: one preallocated key slab and one value slab per
//! layer, each block a region of it, and one attention call per layer for every row of a pass,
//! whatever the number of workers and blocks.
//!
//! [`crate::cache::BlockCache`] runs a product, a partial softmax and a merge per block, and
//! grows blocks by concatenation: its number of tensor operations grows with the number of
//! blocks, which on a GPU (where each operation costs a launch) is what a pass's time grows
//! with. Here, per layer:
//!
//! - the pass's new keys (rotated to their index inside their block, as in the block cache) and
//!   values are added into their slots with one indexed write each (free slots are zero, so an
//!   add is an assignment);
//! - every row's query is rotated once per region (`rows × regions` queries, one elementwise
//!   rotation) and multiplied with the whole key slab in one batched product; a one-hot
//!   membership `[regions, slots]` keeps, for each slot, the score of the query rotated for the
//!   slot's region (multiply and sum over regions);
//! - one additive mask `[rows, slots]` hides what a row does not view (unfilled slots, tokens
//!   past its visible count, blocks outside its view); one softmax; one product with the value
//!   slab.
//!
//! A view may hold one block more than once (the Hogwild! layout repeats the separator after
//! every other worker's block): each slot can carry one rotation per row, so such a block gets
//! as many **copies** (regions with the same content) as the most times one view holds it, and
//! a view's k-th occurrence of the block reads its k-th copy. Writes go to every copy.
//!
//! Invariants: slots outside `region.start .. region.start + len` are zero in every layer (the
//! indexed add relies on it); every copy of a block holds the same keys and values; a region's
//! capacity is at least its block's length after the pass, or the slabs are laid out anew
//! (bigger) before the pass writes; every row sees exactly its view; the key at in-block index
//! j of a block is stored rotated by j (a moved block's keys by their new index).
//!
//! The cost: the score product is `regions` times the plain one (small next to reading the
//! slabs at decoding shapes), and free capacity is read too (regions keep ~1/8 slack).

use burn::prelude::Backend;
use burn::tensor::activation::softmax;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};

use crate::cache::{BlockId, BlockStore, Row};
use crate::model::{Attention, Rope, RopeAt, by_kv_head};

/// Slots of one copy of a block in the slabs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    start: usize,
    cap: usize,
}

/// Where every block's copies lie; regions numbered block by block, copy by copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Layout {
    /// Per block, per copy.
    regions: Vec<Vec<Region>>,
}

impl Layout {
    fn slots(&self) -> usize {
        self.all().map(|r| r.start + r.cap).max().unwrap_or(0)
    }

    /// Regions in order (block by block, copy by copy).
    fn all(&self) -> impl Iterator<Item = Region> + '_ {
        self.regions.iter().flatten().copied()
    }

    /// The number of region (b, c) in [`Layout::all`]'s order.
    fn index(&self, b: BlockId, c: usize) -> usize {
        self.regions[..b].iter().map(Vec::len).sum::<usize>() + c
    }

    fn count(&self) -> usize {
        self.regions.iter().map(Vec::len).sum()
    }

    /// Whether every block has `copies[b]` copies holding `need[b]` tokens.
    fn fits(&self, need: &[usize], copies: &[usize]) -> bool {
        self.regions.len() == need.len()
            && self
                .regions
                .iter()
                .zip(need.iter().zip(copies))
                .all(|(cs, (&n, &c))| cs.len() == c && cs.iter().all(|r| r.cap >= n))
    }
}

/// What every layer of a pass shares, made at its first layer.
#[derive(Debug)]
struct Plan<B: Backend> {
    /// `[writes]`: the slot of each write (a row's key goes to every copy of its block).
    write_slots: Tensor<B, 1, Int>,
    /// `[writes]`: the row each write takes; None when that is every row once, in order.
    write_rows: Option<Tensor<B, 1, Int>>,
    /// The writes' in-block angles.
    write_at: RopeAt<B>,
    /// `[rows·regions]`: row r's query rotated for region i at entry `r·regions + i`.
    query_at: RopeAt<B>,
    /// `[1, 1, regions, 1, slots]`: 1 where the slot belongs to the region.
    member: Tensor<B, 5>,
    /// `[1, rows, 1, slots]`: 0 where the row views the slot, −∞ elsewhere.
    mask: Tensor<B, 4>,
}

/// Keys `[kv_heads, slots, head_dim]` and values of one layer.
#[derive(Debug, Clone)]
struct Slab<B: Backend> {
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
}

/// The fast path for the GPU; see the module docs.
#[derive(Debug)]
pub struct SlabCache<B: Backend> {
    layers: usize,
    /// Per layer; empty until the first pass (the head shape comes with it).
    slabs: Vec<Option<Slab<B>>>,
    layout: Layout,
    lens: Vec<usize>,
    rows: Vec<Row>,
    plan: Option<Plan<B>>,
}

/// Capacity for `need` tokens: ~1/8 more, at least 64 more, a multiple of 64.
fn capacity(need: usize) -> usize {
    (need + (need / 8).max(64)).div_ceil(64) * 64
}

impl<B: Backend> SlabCache<B> {
    pub fn new(layers: usize, blocks: usize) -> Self {
        Self {
            layers,
            slabs: vec![None; layers],
            layout: Layout::default(),
            lens: vec![0; blocks],
            rows: Vec::new(),
            plan: None,
        }
    }

    fn ensure_block(&mut self, b: BlockId) {
        if b >= self.lens.len() {
            self.lens.resize(b + 1, 0);
        }
    }

    fn copies(&self) -> Vec<usize> {
        (0..self.lens.len())
            .map(|b| self.layout.regions.get(b).map_or(1, Vec::len).max(1))
            .collect()
    }

    /// Makes every block hold `need[b]` tokens in each of `copies[b]` copies, laying the slabs
    /// out anew when they do not (kept content copied, to new copies too; the rest zero).
    /// `shape`: `(kv_heads, head_dim)` and the device, when no slab exists yet.
    fn reserve(
        &mut self,
        need: &[usize],
        copies: &[usize],
        shape: Option<(usize, usize, &B::Device)>,
    ) {
        if self.layout.fits(need, copies) && self.slabs.iter().all(Option::is_some) {
            return;
        }
        let mut regions = Vec::with_capacity(need.len());
        let mut start = 0;
        for (b, (&n, &c)) in need.iter().zip(copies).enumerate() {
            let old = self
                .layout
                .regions
                .get(b)
                .and_then(|cs| cs.first())
                .map_or(0, |r| r.cap);
            let cap = if old >= n { old } else { capacity(n) };
            regions.push(
                (0..c)
                    .map(|_| {
                        let r = Region { start, cap };
                        start += cap;
                        r
                    })
                    .collect::<Vec<_>>(),
            );
        }
        let layout = Layout { regions };
        let slots = layout.slots();
        for layer in 0..self.layers {
            let old = self.slabs[layer].take();
            let (kv_heads, hd, dev) = match (&old, shape) {
                (Some(s), _) => {
                    let [h, _, d] = s.k.dims();
                    (h, d, s.k.device())
                }
                (None, Some((h, d, dev))) => (h, d, dev.clone()),
                (None, None) => return,
            };
            let mut k = Tensor::<B, 3>::zeros([kv_heads, slots, hd], &dev);
            let mut v = Tensor::<B, 3>::zeros([kv_heads, slots, hd], &dev);
            if let Some(old) = old {
                for (b, (from, to)) in self.layout.regions.iter().zip(&layout.regions).enumerate() {
                    let (n, Some(src)) = (self.lens[b], from.first()) else {
                        continue;
                    };
                    if n == 0 {
                        continue;
                    }
                    let src = [0..kv_heads, src.start..src.start + n, 0..hd];
                    let (ks, vs) = (old.k.clone().slice(src.clone()), old.v.clone().slice(src));
                    for dst in to {
                        let dst = [0..kv_heads, dst.start..dst.start + n, 0..hd];
                        k = k.slice_assign(dst.clone(), ks.clone());
                        v = v.slice_assign(dst, vs.clone());
                    }
                }
            }
            self.slabs[layer] = Some(Slab { k, v });
        }
        self.layout = layout;
    }

    fn plan(&mut self, rope: &Rope, kv_heads: usize, hd: usize, dev: &B::Device) -> Plan<B> {
        // Lengths after this pass's writes, each row's in-block index, and the copies views
        // need (the most times one view holds a block).
        let mut after = self.lens.clone();
        let mut write_pos = Vec::with_capacity(self.rows.len());
        let mut copies = self.copies();
        for r in &self.rows {
            write_pos.push(after[r.write] as i64);
            after[r.write] += 1;
            let mut seen = vec![0usize; copies.len()];
            for s in &r.view {
                seen[s.block] += 1;
                copies[s.block] = copies[s.block].max(seen[s.block]);
            }
        }
        self.reserve(&after, &copies, Some((kv_heads, hd, dev)));
        let (layout, rows) = (&self.layout, &self.rows);
        let (regions, slots) = (layout.count(), layout.slots());
        // Writes: every copy of the row's block.
        let (mut slots_w, mut rows_w, mut pos_w) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (r, &p)) in rows.iter().zip(&write_pos).enumerate() {
            for reg in &layout.regions[r.write] {
                slots_w.push(reg.start as i64 + p);
                rows_w.push(i as i64);
                pos_w.push(p);
            }
        }
        let identity = rows_w.len() == rows.len();
        let mut query_pos = vec![0i64; rows.len() * regions];
        let mut mask = vec![f32::NEG_INFINITY; rows.len() * slots];
        for (i, r) in rows.iter().enumerate() {
            let q = r.view.iter().map(|s| s.visible as i64).sum::<i64>() - 1;
            let mut start = 0i64;
            let mut seen = vec![0usize; layout.regions.len()];
            for seg in &r.view {
                let c = seen[seg.block];
                seen[seg.block] += 1;
                let reg = layout.regions[seg.block][c];
                query_pos[i * regions + layout.index(seg.block, c)] = q - start;
                let vis = seg.visible.min(after[seg.block]);
                mask[i * slots + reg.start..i * slots + reg.start + vis].fill(0.0);
                start += seg.visible as i64;
            }
        }
        let mut member = vec![0f32; regions * slots];
        for (i, reg) in layout.all().enumerate() {
            member[i * slots + reg.start..i * slots + reg.start + reg.cap].fill(1.0);
        }
        let int = |v: Vec<i64>| {
            let n = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), dev)
        };
        Plan {
            write_slots: int(slots_w),
            write_rows: (!identity).then(|| int(rows_w)),
            write_at: rope.at(&pos_w, dev),
            query_at: rope.at(&query_pos, dev),
            member: Tensor::from_data(TensorData::new(member, [1, 1, regions, 1, slots]), dev),
            mask: Tensor::from_data(TensorData::new(mask, [1, rows.len(), 1, slots]), dev),
        }
    }
}

impl<B: Backend> Attention<B> for SlabCache<B> {
    fn attend(
        &mut self,
        rope: &Rope,
        layer: usize,
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
    ) -> Tensor<B, 2> {
        let [rows, heads, hd] = q.dims();
        let kv_heads = k.dims()[1];
        let g = heads / kv_heads;
        if self.plan.is_none() {
            self.plan = Some(self.plan(rope, kv_heads, hd, &q.device()));
        }
        let (Some(plan), Some(slab)) = (self.plan.take(), self.slabs[layer].take()) else {
            unreachable!("the plan reserves every layer's slab")
        };
        let (regions, slots) = (self.layout.count(), self.layout.slots());
        // Writes: the slab is owned here alone, so the indexed add happens in place.
        let (k, v) = match &plan.write_rows {
            None => (k, v),
            Some(r) => (k.select(0, r.clone()), v.select(0, r.clone())),
        };
        let kr = rope.rotate_at(k, &plan.write_at).swap_dims(0, 1);
        let add = |slab: Tensor<B, 3>, x: Tensor<B, 3>| {
            slab.select_assign(1, plan.write_slots.clone(), x, IndexingUpdateOp::Add)
        };
        let slab = Slab {
            k: add(slab.k, kr),
            v: add(slab.v, v.swap_dims(0, 1)),
        };
        if layer + 1 == self.layers {
            for r in &self.rows {
                self.lens[r.write] += 1;
            }
        }
        // Every row's query rotated for every region: [kv, rows·regions·g, hd].
        let qx =
            q.unsqueeze_dim::<4>(1)
                .repeat_dim(1, regions)
                .reshape([rows * regions, heads, hd]);
        let qh = by_kv_head(rope.rotate_at(qx, &plan.query_at), kv_heads);
        let s = qh
            .matmul(slab.k.clone().swap_dims(1, 2))
            .reshape([kv_heads, rows, regions, g, slots])
            .mul(plan.member.clone())
            .sum_dim(2)
            .reshape([kv_heads, rows, g, slots])
            .mul_scalar(1.0 / (hd as f32).sqrt())
            .add(plan.mask.clone());
        let p = softmax(s.reshape([kv_heads, rows * g, slots]), 2);
        let out = p
            .matmul(slab.v.clone())
            .reshape([kv_heads, rows, g, hd])
            .permute([1, 0, 2, 3])
            .reshape([rows, heads * hd]);
        self.slabs[layer] = Some(slab);
        self.plan = Some(plan);
        out
    }
}

impl<B: Backend> BlockStore<B> for SlabCache<B> {
    fn begin(&mut self, rows: &[Row]) {
        for r in rows {
            self.ensure_block(r.write);
            for s in &r.view {
                self.ensure_block(s.block);
            }
        }
        self.rows = rows.to_vec();
        self.plan = None;
    }

    fn len(&self, block: BlockId) -> usize {
        self.lens.get(block).copied().unwrap_or(0)
    }

    fn move_block(&mut self, from: BlockId, to: BlockId, rope: &Rope) {
        self.ensure_block(from.max(to));
        let (n, offset) = (self.lens[from], self.lens[to]);
        if n == 0 {
            return;
        }
        let mut need = self.lens.clone();
        need[to] += n;
        let copies = self.copies();
        self.reserve(&need, &copies, None);
        let src = self.layout.regions[from][0].start;
        let dsts: Vec<usize> = self.layout.regions[to]
            .iter()
            .map(|r| r.start + offset)
            .collect();
        let olds: Vec<usize> = self.layout.regions[from].iter().map(|r| r.start).collect();
        let positions = vec![offset as i64; n];
        for slab in self.slabs.iter_mut().flatten() {
            let [h, _, d] = slab.k.dims();
            let range = |at: usize| [0..h, at..at + n, 0..d];
            // Stored at in-block index j; in `to` a key sits at offset + j.
            let k = slab.k.clone().slice(range(src));
            let k = rope.rotate(k.swap_dims(0, 1), &positions).swap_dims(0, 1);
            let v = slab.v.clone().slice(range(src));
            let zeros = Tensor::<B, 3>::zeros([h, n, d], &k.device());
            let (mut sk, mut sv) = (slab.k.clone(), slab.v.clone());
            for &o in &olds {
                sk = sk.slice_assign(range(o), zeros.clone());
                sv = sv.slice_assign(range(o), zeros.clone());
            }
            for &t in &dsts {
                sk = sk.slice_assign(range(t), k.clone());
                sv = sv.slice_assign(range(t), v.clone());
            }
            *slab = Slab { k: sk, v: sv };
        }
        self.lens[to] += n;
        self.lens[from] = 0;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::cache::{Reference, Segment};
    use crate::model::{Llama, to_vec};
    use crate::weights::Config;
    use rand::{Rng, SeedableRng};

    type Cpu = crate::Cpu;

    fn tiny() -> Config {
        Config {
            arch: "llama".into(),
            vocab: 97,
            dim: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            ffn: 48,
            rope_base: 10_000.0,
            rms_eps: 1e-5,
            context: 4096,
            qkv_bias: false,
            tied: true,
        }
    }

    fn logits<C: BlockStore<Cpu>>(m: &Llama<Cpu>, c: &mut C, rows: &[Row]) -> Vec<f32> {
        c.begin(rows);
        let h = m.hidden(&rows.iter().map(|r| r.token).collect::<Vec<_>>(), c);
        to_vec(m.logits(h))
    }

    /// Random Hogwild!-like passes (a common block, headers, worker blocks viewed in per-worker
    /// orders, multi-row inputs, steps moved into the common block, regions outgrown) give the
    /// logits of the plain recompute of every row's view.
    #[test]
    fn slab_cache_equals_a_plain_recompute_of_each_view() {
        let cfg = tiny();
        let dev = Default::default();
        let m = Llama::<Cpu>::random(&cfg, &dev, 3);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let workers = 3;
        // Block 0 common, 1 header, 2.. workers.
        let blocks = 2 + workers;
        let mut fast = SlabCache::<Cpu>::new(cfg.layers, blocks);
        let mut slow = Reference::<Cpu>::new(cfg.layers, blocks);
        let tok = |rng: &mut rand::rngs::StdRng| rng.gen_range(0..cfg.vocab as u32);
        // Prefill: 70 tokens of common, 3 of header (in two passes: regions grow).
        let mut lens = vec![0usize; blocks];
        for (block, n) in [(0usize, 40usize), (0, 30), (1, 3)] {
            let rows: Vec<Row> = (0..n)
                .map(|i| {
                    let mut view = Vec::new();
                    if block == 1 {
                        view.push(Segment {
                            block: 0,
                            visible: lens[0],
                        });
                    }
                    view.push(Segment {
                        block,
                        visible: lens[block] + i + 1,
                    });
                    Row {
                        token: tok(&mut rng),
                        write: block,
                        view,
                    }
                })
                .collect();
            let (a, b) = (logits(&m, &mut fast, &rows), logits(&m, &mut slow, &rows));
            assert!(max_diff(&a, &b) < 1e-4, "prefill: {}", max_diff(&a, &b));
            lens[block] += n;
        }
        let mut worst = 0f32;
        for pass in 0..90 {
            // Each worker adds 1–2 rows (a header-like input now and then); every row sees
            // every row of the pass (keys are written before any row attends).
            let n: Vec<usize> = (0..workers)
                .map(|_| if rng.gen_range(0..5) == 0 { 2 } else { 1 })
                .collect();
            let mut rows = Vec::new();
            for w in 0..workers {
                let own = 2 + w;
                for i in 0..n[w] {
                    let mut view = vec![
                        Segment {
                            block: 0,
                            visible: lens[0],
                        },
                        Segment {
                            block: 1,
                            visible: lens[1],
                        },
                    ];
                    // Each other worker's block, then the separator (block 1) again: a
                    // view holds the separator several times, as the engine's do.
                    for j in (0..workers).filter(|&j| j != w) {
                        view.push(Segment {
                            block: 2 + j,
                            visible: lens[2 + j] + n[j],
                        });
                        view.push(Segment {
                            block: 1,
                            visible: lens[1],
                        });
                    }
                    view.push(Segment {
                        block: own,
                        visible: lens[own] + i + 1,
                    });
                    rows.push(Row {
                        token: tok(&mut rng),
                        write: own,
                        view,
                    });
                }
            }
            let (a, b) = (logits(&m, &mut fast, &rows), logits(&m, &mut slow, &rows));
            let d = max_diff(&a, &b);
            assert!(d < 1e-4, "pass {pass}: {d}");
            worst = worst.max(d);
            for r in &rows {
                lens[r.write] += 1;
            }
            // Now and then a worker's step moves into the common block.
            if pass % 7 == 6 {
                let w = 2 + rng.gen_range(0..workers);
                fast.move_block(w, 0, &m.rope);
                slow.move_block(w, 0, &m.rope);
                lens[0] += lens[w];
                lens[w] = 0;
            }
            for (b, &len) in lens.iter().enumerate() {
                assert_eq!(fast.len(b), len);
            }
        }
        assert!(lens[0] > 200, "the common block outgrew its region");
        // A finisher: a new block viewing everything, the separator after every worker.
        let fin = blocks;
        let mut context = vec![Segment {
            block: 0,
            visible: lens[0],
        }];
        for w in 0..workers {
            context.push(Segment {
                block: 2 + w,
                visible: lens[2 + w],
            });
            context.push(Segment {
                block: 1,
                visible: lens[1],
            });
        }
        for step in 0..3 {
            let rows: Vec<Row> = (0..2)
                .map(|i| {
                    let mut view = context.clone();
                    view.push(Segment {
                        block: fin,
                        visible: 2 * step + i + 1,
                    });
                    Row {
                        token: tok(&mut rng),
                        write: fin,
                        view,
                    }
                })
                .collect();
            let (a, b) = (logits(&m, &mut fast, &rows), logits(&m, &mut slow, &rows));
            let d = max_diff(&a, &b);
            assert!(d < 1e-4, "finisher step {step}: {d}");
            worst = worst.max(d);
        }
        eprintln!("slab cache vs reference: max |Δ logits| {worst:.2e}");
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }
}
