//! A decoder's configuration and weights on the host, from a GGUF file or a Hugging Face folder
//! (`config.json` + `*.safetensors`), in one convention: matrices `[out, in]` row-major, f32,
//! and q/k projections laid out for **interleaved** RoPE (adjacent pairs rotate together).
//!
//! RoPE layouts: Hugging Face checkpoints rotate the two halves of each head (`rotate_half`);
//! llama.cpp permutes q/k rows of Llama models when converting so that adjacent pairs rotate,
//! but leaves Qwen2 in the half-split form (its NEOX mode). Half-split q/k rows are permuted here
//! (row `i` of a head's first half goes to `2i`, of its second half to `2i + 1`), the same
//! permutation on q and k, so every score `q·k` is unchanged and one RoPE serves all models.

use std::path::Path;

use anyhow::{Context, bail};

use crate::gguf::Gguf;
use crate::qmat::QMat;

/// The shape of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Config {
    /// `llama` or `qwen2`.
    pub arch: String,
    pub vocab: usize,
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub rope_base: f64,
    pub rms_eps: f64,
    pub context: usize,
    /// Biases on q, k, v (Qwen2).
    pub qkv_bias: bool,
    /// The output projection is the token embedding.
    pub tied: bool,
}

impl Config {
    /// Parameters, counting a tied output once.
    pub fn params(&self) -> usize {
        let attn = self.dim * self.head_dim * (2 * self.heads + 2 * self.kv_heads);
        let bias = if self.qkv_bias {
            self.head_dim * (self.heads + 2 * self.kv_heads)
        } else {
            0
        };
        let mlp = 3 * self.dim * self.ffn;
        let layer = attn + bias + mlp + 2 * self.dim;
        let out = if self.tied { 0 } else { self.vocab * self.dim };
        self.vocab * self.dim + self.layers * layer + self.dim + out
    }

    /// Llama-3.2-1B's shape (for GPU benchmarks with random weights).
    pub fn llama_3_2_1b() -> Self {
        Self {
            arch: "llama".into(),
            vocab: 128_256,
            dim: 2048,
            layers: 16,
            heads: 32,
            kv_heads: 8,
            head_dim: 64,
            ffn: 8192,
            rope_base: 500_000.0,
            rms_eps: 1e-5,
            context: 131_072,
            qkv_bias: false,
            tied: true,
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            bail!(
                "{} query heads do not group over {} key/value heads",
                self.heads,
                self.kv_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim == 0 {
            bail!("head dimension {} is not even", self.head_dim);
        }
        if self.dim == 0 || self.layers == 0 || self.vocab == 0 || self.ffn == 0 {
            bail!("a zero dimension in {self:?}");
        }
        Ok(())
    }
}

/// A row-major matrix `[rows, cols]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    fn new(rows: usize, cols: usize, data: Vec<f32>) -> anyhow::Result<Self> {
        if data.len() != rows * cols {
            bail!("{} values for a {rows}×{cols} matrix", data.len());
        }
        Ok(Self { rows, cols, data })
    }
}

/// What a loader can read a weight matrix into: f32 ([`Mat`], for burn and as the oracle) or
/// quantised blocks ([`QMat`], for the CPU decoder).
pub trait Matrix: Sized {
    /// Tensor `name` of a GGUF file, checked to be `[rows, cols]`.
    fn read_gguf(g: &Gguf, name: &str, rows: usize, cols: usize) -> anyhow::Result<Self>;
    /// Row i of the result is row `perm[i]`.
    fn permute_rows(self, perm: &[usize]) -> Self;
}

fn check_shape(name: &str, shape: &[usize], rows: usize, cols: usize) -> anyhow::Result<()> {
    if shape != [rows, cols] {
        bail!("{name} is {shape:?}, expected [{rows}, {cols}]");
    }
    Ok(())
}

impl Matrix for Mat {
    fn read_gguf(g: &Gguf, name: &str, rows: usize, cols: usize) -> anyhow::Result<Self> {
        let (data, shape) = g.tensor_f32(name)?;
        check_shape(name, &shape, rows, cols)?;
        Mat::new(rows, cols, data)
    }

    fn permute_rows(self, perm: &[usize]) -> Self {
        let c = self.cols;
        let data = perm
            .iter()
            .flat_map(|&r| self.data[r * c..(r + 1) * c].iter().copied())
            .collect();
        Mat { data, ..self }
    }
}

impl Matrix for QMat {
    fn read_gguf(g: &Gguf, name: &str, rows: usize, cols: usize) -> anyhow::Result<Self> {
        let info = g.info(name)?;
        check_shape(name, &info.shape(), rows, cols)?;
        let raw = g.raw(name)?;
        QMat::from_ggml(info.kind, &raw, rows, cols)
            .map_err(|e| anyhow::anyhow!("{}: tensor {name}: {e}", g.path().display()))
    }

    fn permute_rows(self, perm: &[usize]) -> Self {
        QMat::permute_rows(&self, perm)
    }
}

/// The row permutation that takes half-split q/k rows (`heads` heads of `head_dim`) to
/// interleaved: row i of the result is row `perm[i]`.
pub fn half_split_permutation(heads: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    let mut perm = vec![0; heads * head_dim];
    for h in 0..heads {
        for i in 0..head_dim {
            let dst = h * head_dim + if i < half { 2 * i } else { 2 * (i - half) + 1 };
            perm[dst] = h * head_dim + i;
        }
    }
    perm
}

#[derive(Debug, Clone)]
pub struct LayerWeights<M = Mat> {
    pub attn_norm: Vec<f32>,
    /// `[heads·head_dim, dim]`, interleaved RoPE layout.
    pub wq: M,
    pub wk: M,
    pub wv: M,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    /// `[dim, heads·head_dim]`.
    pub wo: M,
    pub ffn_norm: Vec<f32>,
    pub w_gate: M,
    pub w_up: M,
    pub w_down: M,
}

#[derive(Debug, Clone)]
pub struct Weights<M = Mat> {
    pub config: Config,
    /// `[vocab, dim]`.
    pub embed: M,
    pub layers: Vec<LayerWeights<M>>,
    pub norm: Vec<f32>,
    /// `[vocab, dim]`; None when tied to `embed`.
    pub output: Option<M>,
}

impl<M> Weights<M> {
    /// The same weights with every matrix converted by `f` (norms and biases kept).
    pub fn map_matrices<N>(self, mut f: impl FnMut(M) -> N) -> Weights<N> {
        Weights {
            config: self.config,
            embed: f(self.embed),
            layers: self
                .layers
                .into_iter()
                .map(|l| LayerWeights {
                    attn_norm: l.attn_norm,
                    wq: f(l.wq),
                    wk: f(l.wk),
                    wv: f(l.wv),
                    bq: l.bq,
                    bk: l.bk,
                    bv: l.bv,
                    wo: f(l.wo),
                    ffn_norm: l.ffn_norm,
                    w_gate: f(l.w_gate),
                    w_up: f(l.w_up),
                    w_down: f(l.w_down),
                })
                .collect(),
            norm: self.norm,
            output: self.output.map(f),
        }
    }
}

/// Permutes the rows of a half-split q/k projection (or bias, `cols` = 1) to interleaved.
pub fn half_split_to_interleaved(
    data: &[f32],
    heads: usize,
    head_dim: usize,
    cols: usize,
) -> Vec<f32> {
    half_split_permutation(heads, head_dim)
        .iter()
        .flat_map(|&r| data[r * cols..(r + 1) * cols].iter().copied())
        .collect()
}

impl Weights {
    /// Reads a GGUF file (Llama or Qwen2 architecture) into f32 matrices.
    pub fn from_gguf(g: &Gguf) -> anyhow::Result<Self> {
        Self::read_gguf(g)
    }
}

impl<M: Matrix> Weights<M> {
    /// Reads a GGUF file (Llama or Qwen2 architecture) into matrices of type `M`.
    pub fn read_gguf(g: &Gguf) -> anyhow::Result<Self> {
        let arch = g.str("general.architecture")?.to_string();
        if arch != "llama" && arch != "qwen2" {
            bail!(
                "{}: architecture {arch:?} is not supported (llama, qwen2 are)",
                g.path().display()
            );
        }
        let k = |s: &str| format!("{arch}.{s}");
        let embed_shape = g.info("token_embd.weight")?.shape();
        let dim = g.u64(&k("embedding_length"))? as usize;
        let heads = g.u64(&k("attention.head_count"))? as usize;
        let head_dim = g
            .u64(&k("attention.key_length"))
            .map(|x| x as usize)
            .unwrap_or(dim / heads.max(1));
        let config = Config {
            arch: arch.clone(),
            vocab: embed_shape[0],
            dim,
            layers: g.u64(&k("block_count"))? as usize,
            heads,
            kv_heads: g
                .u64(&k("attention.head_count_kv"))
                .map_or(heads, |x| x as usize),
            head_dim,
            ffn: g.u64(&k("feed_forward_length"))? as usize,
            rope_base: g.f64(&k("rope.freq_base")).unwrap_or(10_000.0),
            rms_eps: g
                .f64(&k("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            context: g.u64(&k("context_length")).map_or(4096, |x| x as usize),
            qkv_bias: g.tensors.contains_key("blk.0.attn_q.bias"),
            tied: !g.tensors.contains_key("output.weight"),
        };
        config.check()?;
        if embed_shape.get(1) != Some(&dim) {
            bail!("token_embd is {embed_shape:?}, the model width is {dim}");
        }
        // llama.cpp stores Llama's q/k interleaved already, Qwen2's half-split.
        let permute = arch == "qwen2";
        let mat = |name: &str, rows: usize, cols: usize| M::read_gguf(g, name, rows, cols);
        let vec = |name: &str, n: usize| -> anyhow::Result<Vec<f32>> {
            let (data, _) = g.tensor_f32(name)?;
            if data.len() != n {
                bail!("{name} has {} values, expected {n}", data.len());
            }
            Ok(data)
        };
        let c = &config;
        let (qd, kvd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let mut layers = Vec::new();
        for i in 0..c.layers {
            let b = |s: &str| format!("blk.{i}.{s}");
            let mut wq = mat(&b("attn_q.weight"), qd, c.dim)?;
            let mut wk = mat(&b("attn_k.weight"), kvd, c.dim)?;
            let mut bq = c.qkv_bias.then(|| vec(&b("attn_q.bias"), qd)).transpose()?;
            let mut bk = c
                .qkv_bias
                .then(|| vec(&b("attn_k.bias"), kvd))
                .transpose()?;
            if permute {
                wq = wq.permute_rows(&half_split_permutation(c.heads, c.head_dim));
                wk = wk.permute_rows(&half_split_permutation(c.kv_heads, c.head_dim));
                bq = bq.map(|v| half_split_to_interleaved(&v, c.heads, c.head_dim, 1));
                bk = bk.map(|v| half_split_to_interleaved(&v, c.kv_heads, c.head_dim, 1));
            }
            layers.push(LayerWeights {
                attn_norm: vec(&b("attn_norm.weight"), c.dim)?,
                wq,
                wk,
                wv: mat(&b("attn_v.weight"), kvd, c.dim)?,
                bq,
                bk,
                bv: c
                    .qkv_bias
                    .then(|| vec(&b("attn_v.bias"), kvd))
                    .transpose()?,
                wo: mat(&b("attn_output.weight"), c.dim, qd)?,
                ffn_norm: vec(&b("ffn_norm.weight"), c.dim)?,
                w_gate: mat(&b("ffn_gate.weight"), c.ffn, c.dim)?,
                w_up: mat(&b("ffn_up.weight"), c.ffn, c.dim)?,
                w_down: mat(&b("ffn_down.weight"), c.dim, c.ffn)?,
            });
        }
        Ok(Self {
            embed: mat("token_embd.weight", c.vocab, c.dim)?,
            layers,
            norm: vec("output_norm.weight", c.dim)?,
            output: if c.tied {
                None
            } else {
                Some(mat("output.weight", c.vocab, c.dim)?)
            },
            config,
        })
    }
}

impl Weights {
    /// Reads a Hugging Face folder: `config.json` and `model.safetensors` (or the shards named
    /// in `model.safetensors.index.json`). F32, F16 and BF16 tensors.
    pub fn from_hf_dir(dir: &Path) -> anyhow::Result<Self> {
        let cfg_path = dir.join("config.json");
        let j: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&cfg_path).with_context(|| format!("reading {}", cfg_path.display()))?,
        )
        .with_context(|| format!("{} is not JSON", cfg_path.display()))?;
        let num = |k: &str| j[k].as_u64().map(|x| x as usize);
        let need = |k: &str| num(k).with_context(|| format!("{}: no {k:?}", cfg_path.display()));
        let model_type = j["model_type"].as_str().unwrap_or("llama");
        let arch = match model_type {
            "llama" | "mistral" => "llama",
            "qwen2" => "qwen2",
            other => bail!(
                "{}: model_type {other:?} is not supported (llama, mistral, qwen2 are)",
                cfg_path.display()
            ),
        };
        let dim = need("hidden_size")?;
        let heads = need("num_attention_heads")?;
        let config = Config {
            arch: arch.into(),
            vocab: need("vocab_size")?,
            dim,
            layers: need("num_hidden_layers")?,
            heads,
            kv_heads: num("num_key_value_heads").unwrap_or(heads),
            head_dim: num("head_dim").unwrap_or(dim / heads.max(1)),
            ffn: need("intermediate_size")?,
            rope_base: j["rope_theta"].as_f64().unwrap_or(10_000.0),
            rms_eps: j["rms_norm_eps"].as_f64().unwrap_or(1e-5),
            context: num("max_position_embeddings").unwrap_or(4096),
            qkv_bias: arch == "qwen2",
            tied: j["tie_word_embeddings"].as_bool().unwrap_or(false),
        };
        config.check()?;
        if let Some(s) = j["rope_scaling"].as_object()
            && !s.is_empty()
        {
            bail!(
                "{}: rope_scaling {s:?} is not supported yet",
                cfg_path.display()
            );
        }
        let files: Vec<std::path::PathBuf> = {
            let index = dir.join("model.safetensors.index.json");
            if index.exists() {
                let ix: serde_json::Value = serde_json::from_slice(&std::fs::read(&index)?)?;
                let mut names: Vec<String> = ix["weight_map"]
                    .as_object()
                    .context("the safetensors index has no weight_map")?
                    .values()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect();
                names.sort();
                names.dedup();
                names.into_iter().map(|n| dir.join(n)).collect()
            } else {
                vec![dir.join("model.safetensors")]
            }
        };
        let mut tensors: std::collections::HashMap<String, (Vec<f32>, Vec<usize>)> =
            std::collections::HashMap::new();
        for f in &files {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .with_context(|| format!("{} is not a safetensors file", f.display()))?;
            for (name, view) in st.tensors() {
                let kind = match view.dtype() {
                    safetensors::Dtype::F32 => crate::quant::TensorType::F32,
                    safetensors::Dtype::F16 => crate::quant::TensorType::F16,
                    safetensors::Dtype::BF16 => crate::quant::TensorType::BF16,
                    other => bail!(
                        "{}: tensor {name} is {other:?} (F32, F16, BF16 are read)",
                        f.display()
                    ),
                };
                let n = view.shape().iter().product();
                let data = crate::quant::dequantize(kind, view.data(), n)
                    .map_err(|e| anyhow::anyhow!("{}: tensor {name}: {e}", f.display()))?;
                tensors.insert(name, (data, view.shape().to_vec()));
            }
        }
        let mut take = |name: &str, shape: &[usize]| -> anyhow::Result<Vec<f32>> {
            let (data, got) = tensors
                .remove(name)
                .with_context(|| format!("{}: no tensor {name}", dir.display()))?;
            if got != shape {
                bail!("{name} is {got:?}, expected {shape:?}");
            }
            Ok(data)
        };
        let c = config.clone();
        let (qd, kvd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let embed = Mat::new(
            c.vocab,
            c.dim,
            take("model.embed_tokens.weight", &[c.vocab, c.dim])?,
        )?;
        let mut layers = Vec::new();
        for i in 0..c.layers {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let wq = take(&p("self_attn.q_proj.weight"), &[qd, c.dim])?;
            let wk = take(&p("self_attn.k_proj.weight"), &[kvd, c.dim])?;
            let (bq, bk, bv) = if c.qkv_bias {
                (
                    Some(take(&p("self_attn.q_proj.bias"), &[qd])?),
                    Some(take(&p("self_attn.k_proj.bias"), &[kvd])?),
                    Some(take(&p("self_attn.v_proj.bias"), &[kvd])?),
                )
            } else {
                (None, None, None)
            };
            layers.push(LayerWeights {
                attn_norm: take(&p("input_layernorm.weight"), &[c.dim])?,
                wq: Mat::new(
                    qd,
                    c.dim,
                    half_split_to_interleaved(&wq, c.heads, c.head_dim, c.dim),
                )?,
                wk: Mat::new(
                    kvd,
                    c.dim,
                    half_split_to_interleaved(&wk, c.kv_heads, c.head_dim, c.dim),
                )?,
                wv: Mat::new(
                    kvd,
                    c.dim,
                    take(&p("self_attn.v_proj.weight"), &[kvd, c.dim])?,
                )?,
                bq: bq.map(|v| half_split_to_interleaved(&v, c.heads, c.head_dim, 1)),
                bk: bk.map(|v| half_split_to_interleaved(&v, c.kv_heads, c.head_dim, 1)),
                bv,
                wo: Mat::new(
                    c.dim,
                    qd,
                    take(&p("self_attn.o_proj.weight"), &[c.dim, qd])?,
                )?,
                ffn_norm: take(&p("post_attention_layernorm.weight"), &[c.dim])?,
                w_gate: Mat::new(
                    c.ffn,
                    c.dim,
                    take(&p("mlp.gate_proj.weight"), &[c.ffn, c.dim])?,
                )?,
                w_up: Mat::new(
                    c.ffn,
                    c.dim,
                    take(&p("mlp.up_proj.weight"), &[c.ffn, c.dim])?,
                )?,
                w_down: Mat::new(
                    c.dim,
                    c.ffn,
                    take(&p("mlp.down_proj.weight"), &[c.dim, c.ffn])?,
                )?,
            });
        }
        let norm = take("model.norm.weight", &[c.dim])?;
        let output = if c.tied {
            None
        } else {
            Some(Mat::new(
                c.vocab,
                c.dim,
                take("lm_head.weight", &[c.vocab, c.dim])?,
            )?)
        };
        Ok(Self {
            config,
            embed,
            layers,
            norm,
            output,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn half_split_rows_interleave_per_head() {
        // 2 heads of dim 4, one column: rows h*4 + [0, 1, 2, 3] → [0, 2, 1, 3].
        let v: Vec<f32> = (0..8).map(|x| x as f32).collect();
        assert_eq!(
            half_split_to_interleaved(&v, 2, 4, 1),
            [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
        );
    }

    #[test]
    fn llama_1b_shape_counts_its_parameters() {
        // Llama-3.2-1B: 1.236 B parameters with the tied embedding.
        let p = Config::llama_3_2_1b().params();
        assert!((1_230_000_000..1_240_000_000).contains(&p), "{p}");
    }
}
