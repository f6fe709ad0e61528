//! The Llama-family decoder in burn, generic over the backend: RMSNorm, RoPE (interleaved
//! pairs; see `weights`), grouped-query attention, SwiGLU, optional q/k/v biases (Qwen2), tied or
//! separate output.
//!
//! The model does not own a KV cache: each layer hands its queries and new keys/values (not yet
//! rotated) to an [`Attention`], which stores them and returns the attention output. So the same
//! weights serve a whole-sequence causal pass ([`Causal`], the oracle), the Hogwild! block cache,
//! and its plain-recompute reference.

use burn::prelude::Backend;
use burn::tensor::activation::silu;
use burn::tensor::{Int, Tensor, TensorData};

use crate::weights::{Config, Mat, Weights};

/// One layer's attention over whatever cache the caller keeps.
pub trait Attention<B: Backend> {
    /// `q`: `[rows, heads, head_dim]`, `k`, `v`: `[rows, kv_heads, head_dim]`, none rotated.
    /// Returns `[rows, heads·head_dim]`.
    fn attend(
        &mut self,
        rope: &Rope,
        layer: usize,
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
    ) -> Tensor<B, 2>;
}

/// Rotary position embedding tables (interleaved pairs): angle of pair `i` at position `p` is
/// `p · base^(−2i/head_dim)`, computed in f64.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
}

impl Rope {
    pub fn new(head_dim: usize, base: f64) -> Self {
        Self {
            inv_freq: (0..head_dim / 2)
                .map(|i| base.powf(-2.0 * i as f64 / head_dim as f64))
                .collect(),
        }
    }

    pub fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// cos and sin for each position, `[positions.len(), head_dim/2]` row-major.
    pub fn cos_sin(&self, positions: &[i64]) -> (Vec<f32>, Vec<f32>) {
        let mut c = Vec::with_capacity(positions.len() * self.half());
        let mut s = Vec::with_capacity(positions.len() * self.half());
        for &p in positions {
            for &f in &self.inv_freq {
                let a = p as f64 * f;
                c.push(a.cos() as f32);
                s.push(a.sin() as f32);
            }
        }
        (c, s)
    }

    /// cos and sin of `positions` on `dev`, for [`Rope::rotate_at`] (made once, used by every
    /// layer of a pass).
    pub fn at<B: Backend>(&self, positions: &[i64], dev: &B::Device) -> RopeAt<B> {
        let (rows, half) = (positions.len(), self.half());
        let (c, s) = self.cos_sin(positions);
        RopeAt {
            cos: Tensor::from_data(TensorData::new(c, [rows, 1, half]), dev),
            sin: Tensor::from_data(TensorData::new(s, [rows, 1, half]), dev),
        }
    }

    /// Rotates each row of `x` (`[rows, heads, head_dim]`) to its position.
    pub fn rotate<B: Backend>(&self, x: Tensor<B, 3>, positions: &[i64]) -> Tensor<B, 3> {
        debug_assert_eq!(x.dims()[0], positions.len());
        let at = self.at(positions, &x.device());
        self.rotate_at(x, &at)
    }

    /// Rotates each row of `x` by the angles of `at` (one row of `at` per row of `x`).
    pub fn rotate_at<B: Backend>(&self, x: Tensor<B, 3>, at: &RopeAt<B>) -> Tensor<B, 3> {
        let [rows, heads, hd] = x.dims();
        let half = hd / 2;
        let (cos, sin) = (at.cos.clone(), at.sin.clone());
        let pairs = x.reshape([rows, heads, half, 2]);
        let even = pairs
            .clone()
            .slice([0..rows, 0..heads, 0..half, 0..1])
            .reshape([rows, heads, half]);
        let odd = pairs
            .slice([0..rows, 0..heads, 0..half, 1..2])
            .reshape([rows, heads, half]);
        let e2 = even.clone() * cos.clone() - odd.clone() * sin.clone();
        let o2 = even * sin + odd * cos;
        Tensor::cat(
            vec![
                e2.reshape([rows, heads, half, 1]),
                o2.reshape([rows, heads, half, 1]),
            ],
            3,
        )
        .reshape([rows, heads, hd])
    }
}

#[derive(Debug, Clone)]
struct Layer<B: Backend> {
    attn_norm: Tensor<B, 2>,
    /// `[dim, (heads + 2·kv_heads)·head_dim]`: q, k, v side by side.
    wqkv: Tensor<B, 2>,
    bqkv: Option<Tensor<B, 2>>,
    /// `[heads·head_dim, dim]`.
    wo: Tensor<B, 2>,
    ffn_norm: Tensor<B, 2>,
    /// `[dim, 2·ffn]`: gate, then up.
    w_gate_up: Tensor<B, 2>,
    /// `[ffn, dim]`.
    w_down: Tensor<B, 2>,
}

/// RoPE angles of some positions, on a device: `[rows, 1, head_dim/2]` each.
#[derive(Debug, Clone)]
pub struct RopeAt<B: Backend> {
    cos: Tensor<B, 3>,
    sin: Tensor<B, 3>,
}

/// A loaded model on one device.
#[derive(Debug, Clone)]
pub struct Llama<B: Backend> {
    pub config: Config,
    pub rope: Rope,
    device: B::Device,
    /// `[vocab, dim]`.
    embed: Tensor<B, 2>,
    layers: Vec<Layer<B>>,
    norm: Tensor<B, 2>,
    /// `[dim, vocab]`.
    lm_head: Tensor<B, 2>,
}

fn transposed(m: &Mat) -> Vec<f32> {
    let mut t = vec![0f32; m.data.len()];
    for r in 0..m.rows {
        for c in 0..m.cols {
            t[c * m.rows + r] = m.data[r * m.cols + c];
        }
    }
    t
}

/// `[in, Σ out]`: the transposes of `mats` (all `[out_i, in]`) side by side.
fn side_by_side<B: Backend>(mats: &[&Mat], dev: &B::Device) -> Tensor<B, 2> {
    let cols = mats[0].cols;
    let parts: Vec<Tensor<B, 2>> = mats
        .iter()
        .map(|m| Tensor::from_data(TensorData::new(transposed(m), [cols, m.rows]), dev))
        .collect();
    Tensor::cat(parts, 1)
}

fn row<B: Backend>(v: &[f32], dev: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(v.to_vec(), [1, v.len()]), dev)
}

impl<B: Backend> Llama<B> {
    pub fn new(w: &Weights, device: &B::Device) -> Self {
        let c = &w.config;
        let layers = w
            .layers
            .iter()
            .map(|l| Layer {
                attn_norm: row(&l.attn_norm, device),
                wqkv: side_by_side(&[&l.wq, &l.wk, &l.wv], device),
                bqkv: match (&l.bq, &l.bk, &l.bv) {
                    (Some(q), Some(k), Some(v)) => {
                        Some(row(&[q.as_slice(), k, v].concat(), device))
                    }
                    _ => None,
                },
                wo: side_by_side(&[&l.wo], device),
                ffn_norm: row(&l.ffn_norm, device),
                w_gate_up: side_by_side(&[&l.w_gate, &l.w_up], device),
                w_down: side_by_side(&[&l.w_down], device),
            })
            .collect();
        let out = w.output.as_ref().unwrap_or(&w.embed);
        Self {
            config: c.clone(),
            rope: Rope::new(c.head_dim, c.rope_base),
            device: device.clone(),
            embed: Tensor::from_data(
                TensorData::new(w.embed.data.clone(), [c.vocab, c.dim]),
                device,
            ),
            layers,
            norm: row(&w.norm, device),
            lm_head: side_by_side(&[out], device),
        }
    }

    /// A model of shape `c` with random weights made on the device (normal, σ = 0.02; norms
    /// one): for timing shapes whose weights we do not have (Llama-3.2-1B on the GPU). The
    /// output projection is a separate matrix even when `c.tied` (the same bytes are read).
    pub fn random(c: &Config, device: &B::Device, seed: u64) -> Self {
        use burn::tensor::Distribution;
        B::seed(device, seed);
        let (qd, kvd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let normal = |rows: usize, cols: usize| {
            Tensor::<B, 2>::random([rows, cols], Distribution::Normal(0.0, 0.02), device)
        };
        let ones = |n: usize| Tensor::<B, 2>::ones([1, n], device);
        let layers = (0..c.layers)
            .map(|_| Layer {
                attn_norm: ones(c.dim),
                wqkv: normal(c.dim, qd + 2 * kvd),
                bqkv: c.qkv_bias.then(|| Tensor::zeros([1, qd + 2 * kvd], device)),
                wo: normal(qd, c.dim),
                ffn_norm: ones(c.dim),
                w_gate_up: normal(c.dim, 2 * c.ffn),
                w_down: normal(c.ffn, c.dim),
            })
            .collect();
        Self {
            config: c.clone(),
            rope: Rope::new(c.head_dim, c.rope_base),
            device: device.clone(),
            embed: normal(c.vocab, c.dim),
            layers,
            norm: ones(c.dim),
            lm_head: normal(c.dim, c.vocab),
        }
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    fn rms_norm(&self, x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
        let ms = x.clone().powf_scalar(2.0).mean_dim(1);
        x * (ms + self.config.rms_eps).sqrt().recip() * w.clone()
    }

    /// Runs `tokens` (one row each) through the model; returns the final hidden states
    /// (normed), `[rows, dim]`.
    pub fn hidden(&self, tokens: &[u32], att: &mut dyn Attention<B>) -> Tensor<B, 2> {
        let c = &self.config;
        let rows = tokens.len();
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [rows]), &self.device);
        let mut x = self.embed.clone().select(0, ids);
        let (qd, kvd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        for (i, l) in self.layers.iter().enumerate() {
            let h = self.rms_norm(x.clone(), &l.attn_norm);
            let mut qkv = h.matmul(l.wqkv.clone());
            if let Some(b) = &l.bqkv {
                qkv = qkv + b.clone();
            }
            let q = qkv
                .clone()
                .slice([0..rows, 0..qd])
                .reshape([rows, c.heads, c.head_dim]);
            let k = qkv
                .clone()
                .slice([0..rows, qd..qd + kvd])
                .reshape([rows, c.kv_heads, c.head_dim]);
            let v = qkv
                .slice([0..rows, qd + kvd..qd + 2 * kvd])
                .reshape([rows, c.kv_heads, c.head_dim]);
            let a = att.attend(&self.rope, i, q, k, v);
            x = x + a.matmul(l.wo.clone());
            let h = self.rms_norm(x.clone(), &l.ffn_norm);
            let gu = h.matmul(l.w_gate_up.clone());
            let gate = gu.clone().slice([0..rows, 0..c.ffn]);
            let up = gu.slice([0..rows, c.ffn..2 * c.ffn]);
            x = x + (silu(gate) * up).matmul(l.w_down.clone());
        }
        self.rms_norm(x, &self.norm)
    }

    /// Logits of hidden states, `[rows, vocab]`.
    pub fn logits(&self, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        hidden.matmul(self.lm_head.clone())
    }

    /// Logits of the last row only.
    pub fn last_logits(&self, hidden: Tensor<B, 2>) -> Vec<f32> {
        let [rows, dim] = hidden.dims();
        let last = hidden.slice([rows - 1..rows, 0..dim]);
        to_vec(self.logits(last))
    }
}

/// A tensor's values on the host.
pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap_or_default()
}

/// Queries `[rows, heads, hd]` regrouped as `[kv_heads, rows·g, hd]` (g query heads share
/// each key/value head), so one batched product per key/value head serves all of them.
pub fn by_kv_head<B: Backend>(q: Tensor<B, 3>, kv_heads: usize) -> Tensor<B, 3> {
    let [rows, heads, hd] = q.dims();
    let g = heads / kv_heads;
    q.reshape([rows, kv_heads, g, hd])
        .permute([1, 0, 2, 3])
        .reshape([kv_heads, rows * g, hd])
}

/// Grouped-query attention of `q` (`[rows, heads, hd]`, rotated) over `k`, `v`
/// (`[len, kv_heads, hd]`, rotated keys) with an additive `mask` `[rows, len]` (0 or −∞).
pub fn gqa<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    mask: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    let [rows, heads, hd] = q.dims();
    let [len, kv_heads, _] = k.dims();
    let g = heads / kv_heads;
    // [kv, rows·g, hd] × [kv, hd, len]
    let qh = by_kv_head(q, kv_heads);
    let kh = k.permute([1, 2, 0]); // [kv, hd, len]
    let vh = v.permute([1, 0, 2]); // [kv, len, hd]
    let mut s = qh
        .matmul(kh)
        .div_scalar((hd as f32).sqrt())
        .reshape([kv_heads, rows, g, len]);
    if let Some(m) = mask {
        s = s + m.reshape([1, rows, 1, len]);
    }
    let p = burn::tensor::activation::softmax(s.reshape([kv_heads, rows * g, len]), 2);
    p.matmul(vh) // [kv, rows·g, hd]
        .reshape([kv_heads, rows, g, hd])
        .permute([1, 0, 2, 3])
        .reshape([rows, heads * hd])
}

/// Whole-sequence causal attention over the rows of one pass (positions `start..start+rows`),
/// no cache kept: the plain forward pass, used as the oracle.
#[derive(Debug, Default)]
pub struct Causal;

impl<B: Backend> Attention<B> for Causal {
    fn attend(
        &mut self,
        rope: &Rope,
        _layer: usize,
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
    ) -> Tensor<B, 2> {
        let rows = q.dims()[0];
        let pos: Vec<i64> = (0..rows as i64).collect();
        let q = rope.rotate(q, &pos);
        let k = rope.rotate(k, &pos);
        let mut m = vec![0f32; rows * rows];
        for r in 0..rows {
            for c in r + 1..rows {
                m[r * rows + c] = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_data(TensorData::new(m, [rows, rows]), &q.device());
        gqa(q, k, v, Some(mask))
    }
}
