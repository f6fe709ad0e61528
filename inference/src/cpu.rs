//! The decoder on the CPU without burn: the same model and the same block cache, in plain
//! loops over host memory, parallel over output rows.
//!
//! Why: burn-ndarray's matrix product packs the weight matrix on every call; for decoding (a
//! handful of rows against every weight) packing costs as much as the product, and 19% of a
//! decode step went to `pack_avx2` and 13% to copies (perf, SmolLM2-135M). Here a weight row is
//! read once per pass and multiplied with every row of the pass, keys and values are appended
//! to per-block vectors (no copies), and attention is one online softmax per (row, head) over
//! the row's view segments, with the query rotated once per segment (keys stay rotated to their
//! index inside their block, as in [`crate::cache::BlockCache`]). Checked against the burn model
//! (`tests/hogwild.rs`).

use rayon::prelude::*;

use crate::cache::{BlockId, Row};
use crate::model::Rope;
use crate::qmat::{QActs, QMat, vectorized};
use crate::weights::{Config, Mat, Weights};

/// A weight matrix as the decoder multiplies it: f32 (exact; the oracle) or quantised blocks
/// with 8-bit activations ([`crate::qmat`]; the fast path).
#[derive(Debug, Clone)]
pub enum Linear {
    F32(Mat),
    Quant(QMat),
}

impl From<Mat> for Linear {
    fn from(m: Mat) -> Self {
        Self::F32(m)
    }
}

impl From<QMat> for Linear {
    fn from(m: QMat) -> Self {
        Self::Quant(m)
    }
}

impl Linear {
    fn rows(&self) -> usize {
        match self {
            Self::F32(m) => m.rows,
            Self::Quant(m) => m.rows,
        }
    }

    /// The rows of `parts` one after another.
    fn stack(parts: Vec<Linear>) -> Linear {
        let f32s: Vec<&Mat> = parts
            .iter()
            .filter_map(|p| match p {
                Self::F32(m) => Some(m),
                Self::Quant(_) => None,
            })
            .collect();
        if f32s.len() == parts.len() {
            return Self::F32(stack_mats(&f32s));
        }
        let quants: Vec<QMat> = parts
            .into_iter()
            .map(|p| match p {
                Self::F32(m) => QMat::quantize_q8(&m),
                Self::Quant(q) => q,
            })
            .collect();
        Self::Quant(QMat::stack(&quants.iter().collect::<Vec<_>>()))
    }

    /// Row `r` as f32 (the embedding lookup).
    fn row(&self, r: usize) -> Vec<f32> {
        match self {
            Self::F32(m) => m.data[r * m.cols..(r + 1) * m.cols].to_vec(),
            Self::Quant(m) => m.row(r),
        }
    }

    /// `[rows, self.rows]`: every row of `x` times the matrix.
    fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        match self {
            Self::F32(m) => matmul(m, x, rows),
            Self::Quant(m) => m.matmul(&QActs::quantize(x, m.cols)),
        }
    }

    /// Bytes read per pass.
    fn bytes(&self) -> usize {
        match self {
            Self::F32(m) => 4 * m.data.len(),
            Self::Quant(m) => m.bytes(),
        }
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Vec<f32>,
    /// `[(heads + 2·kv_heads)·head_dim, dim]`: q, k, v rows stacked.
    wqkv: Linear,
    bqkv: Option<Vec<f32>>,
    wo: Linear,
    ffn_norm: Vec<f32>,
    /// `[2·ffn, dim]`: gate rows, then up rows.
    w_gate_up: Linear,
    w_down: Linear,
}

/// RoPE's cos and sin, computed once for the first positions (rotations happen per layer, row,
/// head and block segment; computing them each time in f64 was, by estimate, about a millisecond
/// per token).
#[derive(Debug, Clone)]
struct RopeTable {
    rope: Rope,
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Positions beyond this are computed when needed.
    const MAX: usize = 32_768;

    fn new(rope: Rope, context: usize) -> Self {
        let n = context.clamp(1, Self::MAX) as i64;
        let positions: Vec<i64> = (0..n).collect();
        let (cos, sin) = rope.cos_sin(&positions);
        Self {
            half: rope.half(),
            rope,
            cos,
            sin,
        }
    }

    /// Rotates each `head_dim` chunk of `x` (interleaved pairs) to `pos`.
    #[inline(always)]
    fn rotate(&self, x: &mut [f32], head_dim: usize, pos: i64) {
        let h = self.half;
        let computed;
        let (c, s) = match usize::try_from(pos) {
            Ok(p) if (p + 1) * h <= self.cos.len() => {
                (&self.cos[p * h..(p + 1) * h], &self.sin[p * h..(p + 1) * h])
            }
            _ => {
                computed = self.rope.cos_sin(&[pos]);
                (&computed.0[..], &computed.1[..])
            }
        };
        for head in x.chunks_exact_mut(head_dim) {
            for i in 0..head_dim / 2 {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * c[i] - b * s[i];
                head[2 * i + 1] = a * s[i] + b * c[i];
            }
        }
    }
}

/// The model's weights laid out for [`CpuDecoder`].
#[derive(Debug, Clone)]
pub struct CpuModel {
    pub config: Config,
    pub rope: Rope,
    table: RopeTable,
    embed: Linear,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Option<Linear>,
}

pub(crate) fn stack_mats(mats: &[&Mat]) -> Mat {
    Mat {
        rows: mats.iter().map(|m| m.rows).sum(),
        cols: mats[0].cols,
        data: mats.iter().flat_map(|m| m.data.iter().copied()).collect(),
    }
}

impl CpuModel {
    /// From f32 weights ([`Mat`]: exact) or quantised ones ([`QMat`]: 8-bit activations).
    pub fn new<M: Into<Linear>>(w: Weights<M>) -> Self {
        let c = w.config.clone();
        let layers = w
            .layers
            .into_iter()
            .map(|l| Layer {
                wqkv: Linear::stack(vec![l.wq.into(), l.wk.into(), l.wv.into()]),
                bqkv: match (&l.bq, &l.bk, &l.bv) {
                    (Some(q), Some(k), Some(v)) => Some([q.as_slice(), k, v].concat()),
                    _ => None,
                },
                w_gate_up: Linear::stack(vec![l.w_gate.into(), l.w_up.into()]),
                attn_norm: l.attn_norm,
                wo: l.wo.into(),
                ffn_norm: l.ffn_norm,
                w_down: l.w_down.into(),
            })
            .collect();
        let rope = Rope::new(c.head_dim, c.rope_base);
        Self {
            table: RopeTable::new(rope.clone(), c.context),
            rope,
            config: c,
            embed: w.embed.into(),
            layers,
            norm: w.norm,
            output: w.output.map(Into::into),
        }
    }

    /// Whether the matrices are quantised.
    pub fn quantised(&self) -> bool {
        matches!(self.embed, Linear::Quant(_))
    }

    /// Bytes of weights one decoding pass reads (every matrix once, plus one embedding row).
    pub fn bytes_per_pass(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.wqkv.bytes() + l.wo.bytes() + l.w_gate_up.bytes() + l.w_down.bytes())
            .sum();
        layers + self.output.as_ref().unwrap_or(&self.embed).bytes()
    }
}

/// `out[r·m.rows + o] = Σ_i m[o, i] · x[r·m.cols + i]` for every row r of `x`, in parallel over
/// chunks of output rows (each weight row read once for all rows of `x`).
fn matmul(m: &Mat, x: &[f32], rows: usize) -> Vec<f32> {
    let (n_out, n_in) = (m.rows, m.cols);
    let mut t = vec![0f32; n_out * rows]; // [out, rows]
    const CHUNK: usize = 16;
    t.par_chunks_mut(CHUNK * rows)
        .enumerate()
        .for_each(|(ci, block)| {
            for (k, o) in (ci * CHUNK..(ci * CHUNK + CHUNK).min(n_out)).enumerate() {
                let w = &m.data[o * n_in..(o + 1) * n_in];
                for r in 0..rows {
                    block[k * rows + r] = dot(w, &x[r * n_in..(r + 1) * n_in]);
                }
            }
        });
    rows_first(t, n_out, rows)
}

/// `t` (`[out, rows]`, as the products compute it) laid out as `[rows, out]`.
pub(crate) fn rows_first(t: Vec<f32>, n_out: usize, rows: usize) -> Vec<f32> {
    if rows == 1 {
        return t;
    }
    let mut out = vec![0f32; rows * n_out];
    for o in 0..n_out {
        for r in 0..rows {
            out[r * n_out + o] = t[o * rows + r];
        }
    }
    out
}

/// A dot product the compiler vectorises (eight independent accumulators).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

fn rms_norm(x: &mut [f32], w: &[f32], eps: f64) {
    let n = w.len();
    for row in x.chunks_exact_mut(n) {
        let ms = row
            .iter()
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum::<f64>()
            / n as f64;
        let s = (1.0 / (ms + eps).sqrt()) as f32;
        for (v, g) in row.iter_mut().zip(w) {
            *v *= s * g;
        }
    }
}

/// One kv head's keys and values in every block of one layer.
struct KvHead<'a> {
    blocks: &'a [BlockKv],
    /// Floats per cached row (all kv heads).
    stride: usize,
    /// This head's first float in a row.
    offset: usize,
}

/// One query head's attention over `view` into `out`: scores over the whole view (the query
/// rotated once per segment to its distance from the segment's start), one softmax, one
/// weighted sum of the values.
#[inline(always)]
fn attend(
    table: &RopeTable,
    q0: &[f32],
    view: &[crate::cache::Segment],
    qpos: i64,
    kv: &KvHead<'_>,
    scale: f32,
    out: &mut [f32],
) {
    let hd = q0.len();
    let total: usize = view.iter().map(|s| s.visible).sum();
    let mut scores = Vec::with_capacity(total);
    let mut q = q0.to_vec();
    let mut start = 0i64;
    for seg in view {
        if seg.visible > 0 {
            q.copy_from_slice(q0);
            table.rotate(&mut q, hd, qpos - start);
            let keys = &kv.blocks[seg.block].k;
            scores.extend((0..seg.visible).map(|j| {
                let o = j * kv.stride + kv.offset;
                dot(&q, &keys[o..o + hd]) * scale
            }));
        }
        start += seg.visible as i64;
    }
    let mx = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in &mut scores {
        *s = (*s - mx).exp();
        sum += *s;
    }
    out.fill(0.0);
    let mut p = scores.iter();
    for seg in view {
        let values = &kv.blocks[seg.block].v;
        for j in 0..seg.visible {
            let pj = p.next().copied().unwrap_or(0.0) / sum;
            let o = j * kv.stride + kv.offset;
            for (a, v) in out.iter_mut().zip(&values[o..o + hd]) {
                *a += pj * v;
            }
        }
    }
}

/// Keys (rotated to their index in the block) and values, per layer and block.
#[derive(Debug, Default, Clone)]
struct BlockKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The native decoder: model plus block cache.
#[derive(Debug)]
pub struct CpuDecoder<'m> {
    pub model: &'m CpuModel,
    /// `[layer][block]`.
    kv: Vec<Vec<BlockKv>>,
    lens: Vec<usize>,
}

impl<'m> CpuDecoder<'m> {
    pub fn new(model: &'m CpuModel) -> Self {
        Self {
            kv: vec![Vec::new(); model.config.layers],
            lens: Vec::new(),
            model,
        }
    }

    fn ensure(&mut self, b: BlockId) {
        if b >= self.lens.len() {
            self.lens.resize(b + 1, 0);
            for l in &mut self.kv {
                l.resize(b + 1, BlockKv::default());
            }
        }
    }

    pub fn len(&self, b: BlockId) -> usize {
        self.lens.get(b).copied().unwrap_or(0)
    }

    pub fn move_block(&mut self, from: BlockId, to: BlockId) {
        self.ensure(from.max(to));
        let c = &self.model.config;
        let kvd = c.kv_heads * c.head_dim;
        let offset = self.lens[to] as i64;
        for layer in &mut self.kv {
            let mut moved = std::mem::take(&mut layer[from]);
            for key in moved.k.chunks_exact_mut(kvd) {
                self.model.table.rotate(key, c.head_dim, offset);
            }
            layer[to].k.extend(moved.k);
            layer[to].v.extend(moved.v);
        }
        self.lens[to] += self.lens[from];
        self.lens[from] = 0;
    }

    /// One pass over `rows` (as in [`crate::cache`]); returns the logits of the rows in `want`.
    pub fn forward(&mut self, rows: &[Row], want: &[usize]) -> Vec<Vec<f32>> {
        for r in rows {
            self.ensure(r.write);
            for s in &r.view {
                self.ensure(s.block);
            }
        }
        let m = self.model;
        let c = &m.config;
        let (dim, hd) = (c.dim, c.head_dim);
        let (qd, kvd) = (c.heads * hd, c.kv_heads * hd);
        let n = rows.len();
        let mut x: Vec<f32> = rows
            .iter()
            .flat_map(|r| m.embed.row(r.token as usize))
            .collect();
        // In-block index of each row's key.
        let mut next = self.lens.clone();
        let index: Vec<usize> = rows
            .iter()
            .map(|r| {
                let i = next[r.write];
                next[r.write] += 1;
                i
            })
            .collect();
        let qpos: Vec<i64> = rows
            .iter()
            .map(|r| r.view.iter().map(|s| s.visible as i64).sum::<i64>() - 1)
            .collect();
        for (li, l) in m.layers.iter().enumerate() {
            let mut h = x.clone();
            rms_norm(&mut h, &l.attn_norm, c.rms_eps);
            let mut qkv = l.wqkv.matmul(&h, n);
            let w = qd + 2 * kvd;
            if let Some(b) = &l.bqkv {
                for row in qkv.chunks_exact_mut(w) {
                    for (v, bb) in row.iter_mut().zip(b) {
                        *v += bb;
                    }
                }
            }
            // Write keys (rotated to their in-block index) and values.
            for (r, row) in rows.iter().enumerate() {
                let base = r * w;
                let mut k = qkv[base + qd..base + qd + kvd].to_vec();
                m.table.rotate(&mut k, hd, index[r] as i64);
                let blk = &mut self.kv[li][row.write];
                blk.k.extend(k);
                blk.v.extend_from_slice(&qkv[base + qd + kvd..base + w]);
            }
            let layer_kv = &self.kv[li];
            let g = c.heads / c.kv_heads;
            let scale = 1.0 / (hd as f32).sqrt();
            let mut att = vec![0f32; n * qd];
            att.par_chunks_mut(hd).enumerate().for_each(|(i, out)| {
                let (r, head) = (i / c.heads, i % c.heads);
                let kvh = head / g;
                let q0 = &qkv[r * w + head * hd..r * w + (head + 1) * hd];
                let kvs = KvHead {
                    blocks: layer_kv,
                    stride: kvd,
                    offset: kvh * hd,
                };
                vectorized(|| attend(&m.table, q0, &rows[r].view, qpos[r], &kvs, scale, out));
            });
            let proj = l.wo.matmul(&att, n);
            for (xv, p) in x.iter_mut().zip(&proj) {
                *xv += p;
            }
            let mut h = x.clone();
            rms_norm(&mut h, &l.ffn_norm, c.rms_eps);
            let gu = l.w_gate_up.matmul(&h, n);
            let ffn = c.ffn;
            let mut act = vec![0f32; n * ffn];
            for r in 0..n {
                for i in 0..ffn {
                    let gate = gu[r * 2 * ffn + i];
                    let up = gu[r * 2 * ffn + ffn + i];
                    act[r * ffn + i] = gate / (1.0 + (-gate).exp()) * up;
                }
            }
            let down = l.w_down.matmul(&act, n);
            for (xv, d) in x.iter_mut().zip(&down) {
                *xv += d;
            }
        }
        for r in rows {
            self.lens[r.write] += 1;
        }
        if want.is_empty() {
            return Vec::new();
        }
        let mut h: Vec<f32> = want
            .iter()
            .flat_map(|&r| x[r * dim..(r + 1) * dim].iter().copied())
            .collect();
        rms_norm(&mut h, &m.norm, c.rms_eps);
        let out = m.output.as_ref().unwrap_or(&m.embed);
        let logits = out.matmul(&h, want.len());
        debug_assert_eq!(out.rows(), c.vocab);
        logits.chunks_exact(c.vocab).map(<[f32]>::to_vec).collect()
    }
}
