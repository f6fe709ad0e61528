//! The block KV cache of Hogwild! inference, and its plain-recompute reference.
//!
//! A cache holds named **blocks** of tokens (the common history, headers, one block per worker).
//! A forward **pass** is a list of rows: each row is one new token, written at the end of one
//! block, and a **view**: the blocks (with how many of their tokens) that row attends to, in
//! order, as if they were one ordinary sequence; the row's own token is the last token of the
//! view. Rows of one pass see each other's tokens at once (every row's key is written before any
//! row attends), so workers see each other's newest tokens.
//!
//! [`BlockCache`] (the fast path) stores each block's keys rotated to their index *inside the
//! block* and rotates each row's query once per (row, view segment) to the distance between the
//! row and the segment's start, so no cached key is ever re-rotated when blocks move relative to
//! each other. Each block's keys and values are read once per layer for all the rows that view
//! it (one matrix product per block), and the per-block partial softmaxes are merged with their
//! log-sum-exp. [`Reference`] keeps raw keys and, for every row, lays its view out as one
//! sequence, rotates keys to their absolute positions and runs ordinary attention: the oracle.

use burn::prelude::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::model::{Attention, Rope, RopeAt, by_kv_head, gqa};

pub type BlockId = usize;

/// Part of a row's view: the first `visible` tokens of `block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub block: BlockId,
    pub visible: usize,
}

/// One row of a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub token: u32,
    /// The block this row's token is appended to.
    pub write: BlockId,
    /// What the row attends to; the last segment is `write`, its visible count ending at the
    /// row's own token.
    pub view: Vec<Segment>,
}

/// A cache the model's layers attend through, with blocks.
pub trait BlockStore<B: Backend>: Attention<B> {
    /// Sets the rows of the next pass (before [`crate::model::Llama::hidden`]).
    fn begin(&mut self, rows: &[Row]);
    /// Tokens stored in `block`.
    fn len(&self, block: BlockId) -> usize;
    /// Appends all of `from` to the end of `to` and empties `from`.
    fn move_block(&mut self, from: BlockId, to: BlockId, rope: &Rope);
}

#[derive(Debug, Clone)]
struct Kv<B: Backend> {
    /// `[len, kv_heads, head_dim]`.
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
}

/// Per layer, per block: keys and values (or none yet).
#[derive(Debug)]
struct Store<B: Backend> {
    layers: Vec<Vec<Option<Kv<B>>>>,
    lens: Vec<usize>,
    rows: Vec<Row>,
}

impl<B: Backend> Store<B> {
    fn new(layers: usize, blocks: usize) -> Self {
        Self {
            layers: (0..layers).map(|_| vec![None; blocks]).collect(),
            lens: vec![0; blocks],
            rows: Vec::new(),
        }
    }

    fn ensure(&mut self, block: BlockId) {
        if block >= self.lens.len() {
            self.lens.resize(block + 1, 0);
            for l in &mut self.layers {
                l.resize(block + 1, None);
            }
        }
    }

    fn begin(&mut self, rows: &[Row]) {
        for r in rows {
            self.ensure(r.write);
            for s in &r.view {
                self.ensure(s.block);
            }
        }
        self.rows = rows.to_vec();
    }

    /// Appends `k` (already in the stored form), `v` rows to `block` at `layer`; the last layer
    /// commits the new length.
    fn append(&mut self, layer: usize, block: BlockId, k: Tensor<B, 3>, v: Tensor<B, 3>) {
        let slot = &mut self.layers[layer][block];
        *slot = Some(match slot.take() {
            None => Kv { k, v },
            Some(old) => Kv {
                k: Tensor::cat(vec![old.k, k], 0),
                v: Tensor::cat(vec![old.v, v], 0),
            },
        });
    }

    /// Appends `from` to `to` (keys through `key_form(keys, offset)`, offset = `to`'s
    /// length) and empties `from`.
    fn move_block(
        &mut self,
        from: BlockId,
        to: BlockId,
        key_form: impl Fn(Tensor<B, 3>, i64) -> Tensor<B, 3>,
    ) {
        self.ensure(from.max(to));
        let offset = self.lens[to] as i64;
        for layer in 0..self.layers.len() {
            if let Some(kv) = self.layers[layer][from].take() {
                let k = key_form(kv.k, offset);
                self.append(layer, to, k, kv.v);
            }
        }
        self.lens[to] += self.lens[from];
        self.lens[from] = 0;
    }

    /// Writes the pass's new keys (transformed by `key_form(rows' keys, in-block positions)`)
    /// and values; on the last layer, advances the block lengths.
    fn write(
        &mut self,
        layer: usize,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        key_form: impl Fn(Tensor<B, 3>, &[i64]) -> Tensor<B, 3>,
    ) {
        let dev = k.device();
        for (b, idx) in self.writes() {
            let n = idx.len();
            let base = self.lens[b] as i64;
            let pos: Vec<i64> = (0..n as i64).map(|i| base + i).collect();
            let sel = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [n]), &dev);
            let kb = key_form(k.clone().select(0, sel.clone()), &pos);
            let vb = v.clone().select(0, sel);
            self.append(layer, b, kb, vb);
        }
        self.commit_if_last(layer);
    }

    /// After the last layer's writes, the blocks' lengths include the pass's rows.
    fn commit_if_last(&mut self, layer: usize) {
        if layer + 1 == self.layers.len() {
            for r in &self.rows {
                self.lens[r.write] += 1;
            }
        }
    }

    /// Rows of the pass written to each block, in row order.
    fn writes(&self) -> Vec<(BlockId, Vec<i64>)> {
        let mut blocks: Vec<BlockId> = self.rows.iter().map(|r| r.write).collect();
        blocks.sort_unstable();
        blocks.dedup();
        blocks
            .into_iter()
            .map(|b| {
                let idx = self
                    .rows
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.write == b)
                    .map(|(i, _)| i as i64)
                    .collect();
                (b, idx)
            })
            .collect()
    }
}

/// Position of a row's query: the length of its view, minus one.
fn query_pos(row: &Row) -> i64 {
    row.view.iter().map(|s| s.visible as i64).sum::<i64>() - 1
}

/// One viewed block of a pass: the rows viewing it (on the device), their queries' angles for
/// this block, and the visibility mask `[entries, len]`.
#[derive(Debug)]
struct Read<B: Backend> {
    block: BlockId,
    rows: Tensor<B, 1, Int>,
    angles: RopeAt<B>,
    mask: Tensor<B, 2>,
}

/// What a pass needs on the device besides the activations; the same at every layer, so it is
/// made once per pass (at the first layer) instead of once per layer: on the GPU each of these
/// is a host-to-device copy.
#[derive(Debug)]
struct Plan<B: Backend> {
    /// Per written block: the rows written to it and their keys' in-block angles.
    writes: Vec<(BlockId, Tensor<B, 1, Int>, RopeAt<B>)>,
    reads: Vec<Read<B>>,
    /// `[rows, E]`: entry i belongs to row r.
    member: Tensor<B, 2>,
    /// `[rows, E, 1]`: 0 where entry i belongs to row r, −∞ elsewhere.
    member_mask: Tensor<B, 3>,
    /// `[E]`: each entry's row.
    row_of: Tensor<B, 1, Int>,
    entries: usize,
}

/// The fast path; see the module docs.
#[derive(Debug)]
pub struct BlockCache<B: Backend> {
    store: Store<B>,
    plan: Option<Plan<B>>,
}

impl<B: Backend> BlockCache<B> {
    pub fn new(layers: usize, blocks: usize) -> Self {
        Self {
            store: Store::new(layers, blocks),
            plan: None,
        }
    }

    fn plan(&self, rope: &Rope, dev: &B::Device) -> Plan<B> {
        let s = &self.store;
        let int = |v: Vec<i64>| {
            let n = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), dev)
        };
        let mut after = s.lens.clone();
        let writes = s
            .writes()
            .into_iter()
            .map(|(b, idx)| {
                let base = s.lens[b] as i64;
                let pos: Vec<i64> = (0..idx.len() as i64).map(|i| base + i).collect();
                after[b] += idx.len();
                (b, int(idx), rope.at(&pos, dev))
            })
            .collect();
        // Entries: (row, segment start, visible), grouped by block.
        let mut by_block: std::collections::BTreeMap<BlockId, Vec<(usize, i64, usize)>> =
            Default::default();
        for (r, row) in s.rows.iter().enumerate() {
            let mut start = 0i64;
            for seg in &row.view {
                if seg.visible > 0 {
                    by_block
                        .entry(seg.block)
                        .or_default()
                        .push((r, start, seg.visible));
                }
                start += seg.visible as i64;
            }
        }
        let mut reads = Vec::new();
        let mut row_of: Vec<i64> = Vec::new();
        for (&b, entries) in &by_block {
            // The length the rows see: stored plus this pass's rows (none: nothing stored).
            let len = after[b];
            if len == 0 {
                continue;
            }
            let e = entries.len();
            let sel: Vec<i64> = entries.iter().map(|&(r, _, _)| r as i64).collect();
            let rel: Vec<i64> = entries
                .iter()
                .map(|&(r, start, _)| query_pos(&s.rows[r]) - start)
                .collect();
            let mut mask = vec![0f32; e * len];
            for (i, &(_, _, vis)) in entries.iter().enumerate() {
                for j in vis.min(len)..len {
                    mask[i * len + j] = f32::NEG_INFINITY;
                }
            }
            let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [e, len]), dev);
            row_of.extend(&sel);
            reads.push(Read {
                block: b,
                rows: int(sel),
                angles: rope.at(&rel, dev),
                mask,
            });
        }
        let rows = s.rows.len();
        let e = row_of.len();
        let mut member = vec![0f32; rows * e];
        let mut member_mask = vec![f32::NEG_INFINITY; rows * e];
        for (i, &r) in row_of.iter().enumerate() {
            member[r as usize * e + i] = 1.0;
            member_mask[r as usize * e + i] = 0.0;
        }
        Plan {
            writes,
            reads,
            member: Tensor::from_data(TensorData::new(member, [rows, e]), dev),
            member_mask: Tensor::from_data(TensorData::new(member_mask, [rows, e, 1]), dev),
            row_of: int(row_of),
            entries: e,
        }
    }
}

impl<B: Backend> Attention<B> for BlockCache<B> {
    fn attend(
        &mut self,
        rope: &Rope,
        layer: usize,
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
    ) -> Tensor<B, 2> {
        let [rows, heads, hd] = q.dims();
        if self.plan.is_none() {
            self.plan = Some(self.plan(rope, &q.device()));
        }
        let Some(plan) = self.plan.take() else {
            unreachable!("the plan was just made")
        };
        // Keys stored rotated to their index inside the block.
        for (b, sel, at) in &plan.writes {
            let kb = rope.rotate_at(k.clone().select(0, sel.clone()), at);
            let vb = v.clone().select(0, sel.clone());
            self.store.append(layer, *b, kb, vb);
        }
        self.store.commit_if_last(layer);
        let mut ms = Vec::new();
        let mut ls = Vec::new();
        let mut os = Vec::new();
        for r in &plan.reads {
            let Some(kv) = &self.store.layers[layer][r.block] else {
                continue;
            };
            let qe = rope.rotate_at(q.clone().select(0, r.rows.clone()), &r.angles);
            let (m, l, o) = partial(qe, kv.k.clone(), kv.v.clone(), r.mask.clone());
            ms.push(m);
            ls.push(l);
            os.push(o);
        }
        let e = plan.entries;
        let m = Tensor::cat(ms, 0); // [E, heads]
        let l = Tensor::cat(ls, 0);
        let o = Tensor::cat(os, 0); // [E, heads, hd]
        let row_max = (m.clone().reshape([1, e, heads]) + plan.member_mask.clone())
            .max_dim(1)
            .reshape([rows, heads]);
        let c = (m - row_max.select(0, plan.row_of.clone())).exp(); // [E, heads]
        let num = plan
            .member
            .clone()
            .matmul((o * c.clone().reshape([e, heads, 1])).reshape([e, heads * hd]));
        let den = plan.member.clone().matmul(c * l); // [rows, heads]
        // Kept for the next layers of this pass; `begin` drops it.
        self.plan = Some(plan);
        (num.reshape([rows, heads, hd]) / den.reshape([rows, heads, 1])).reshape([rows, heads * hd])
    }
}

/// Partial attention of `q` (`[e, heads, hd]`, rotated for this block) over one block's `k`, `v`
/// (`[len, kv_heads, hd]`) with an additive mask `[e, len]`: per entry and head the score max
/// `m`, the sum `l` of `exp(score − m)`, and the unnormalised output `Σ exp(score − m)·v`.
fn partial<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    mask: Tensor<B, 2>,
) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 3>) {
    let [e, heads, hd] = q.dims();
    let [len, kv_heads, _] = k.dims();
    let g = heads / kv_heads;
    let qh = by_kv_head(q, kv_heads);
    let s = qh
        .matmul(k.permute([1, 2, 0]))
        .div_scalar((hd as f32).sqrt())
        .reshape([kv_heads, e, g, len])
        + mask.reshape([1, e, 1, len]);
    let m = s.clone().max_dim(3); // [kv, e, g, 1]
    let p = (s - m.clone()).exp();
    let l = p.clone().sum_dim(3);
    let o = p
        .reshape([kv_heads, e * g, len])
        .matmul(v.permute([1, 0, 2]))
        .reshape([kv_heads, e, g, hd]);
    let per_entry =
        |t: Tensor<B, 4>, last: usize| t.permute([1, 0, 2, 3]).reshape([e, heads * last]);
    (
        per_entry(m, 1),
        per_entry(l, 1),
        per_entry(o, hd).reshape([e, heads, hd]),
    )
}

impl<B: Backend> BlockStore<B> for BlockCache<B> {
    fn begin(&mut self, rows: &[Row]) {
        self.store.begin(rows);
        self.plan = None;
    }

    fn len(&self, block: BlockId) -> usize {
        self.store.lens.get(block).copied().unwrap_or(0)
    }

    fn move_block(&mut self, from: BlockId, to: BlockId, rope: &Rope) {
        // Stored at in-block index j; in `to` a key sits at offset + j.
        self.store.move_block(from, to, |k, offset| {
            let n = k.dims()[0];
            rope.rotate(k, &vec![offset; n])
        });
    }
}

/// The oracle: raw keys, each row's view laid out as one sequence, ordinary attention.
#[derive(Debug)]
pub struct Reference<B: Backend> {
    store: Store<B>,
}

impl<B: Backend> Reference<B> {
    pub fn new(layers: usize, blocks: usize) -> Self {
        Self {
            store: Store::new(layers, blocks),
        }
    }
}

impl<B: Backend> Attention<B> for Reference<B> {
    fn attend(
        &mut self,
        rope: &Rope,
        layer: usize,
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
    ) -> Tensor<B, 2> {
        self.store.write(layer, k, v, |k, _| k);
        let [_, heads, hd] = q.dims();
        let mut outs = Vec::new();
        for (r, row) in self.store.rows.iter().enumerate() {
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for seg in &row.view {
                if seg.visible == 0 {
                    continue;
                }
                let Some(kv) = &self.store.layers[layer][seg.block] else {
                    continue;
                };
                let [_, h, d] = kv.k.dims();
                ks.push(kv.k.clone().slice([0..seg.visible, 0..h, 0..d]));
                vs.push(kv.v.clone().slice([0..seg.visible, 0..h, 0..d]));
            }
            let kk = Tensor::cat(ks, 0);
            let vv = Tensor::cat(vs, 0);
            let len = kk.dims()[0];
            let pos: Vec<i64> = (0..len as i64).collect();
            let kk = rope.rotate(kk, &pos);
            let qr = rope.rotate(
                q.clone().slice([r..r + 1, 0..heads, 0..hd]),
                &[query_pos(row)],
            );
            outs.push(gqa(qr, kk, vv, None));
        }
        Tensor::cat(outs, 0)
    }
}

impl<B: Backend> BlockStore<B> for Reference<B> {
    fn begin(&mut self, rows: &[Row]) {
        self.store.begin(rows);
    }

    fn len(&self, block: BlockId) -> usize {
        self.store.lens.get(block).copied().unwrap_or(0)
    }

    fn move_block(&mut self, from: BlockId, to: BlockId, _rope: &Rope) {
        // Raw keys: rotated only when a view is laid out.
        self.store.move_block(from, to, |k, _| k);
    }
}
