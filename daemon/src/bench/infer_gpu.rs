//! `colony bench infer --backend cuda`: the Hogwild! block cache on the GPU (burn-cuda), a
//! Llama-3.2-1B-shaped model with random weights, N workers over a common history of C tokens:
//! aggregate tokens/s, ms per pass, and the memory-bandwidth bound of each pass (every weight
//! read once, every cached key and value read once). `--backend ndarray` runs the same code on
//! the CPU (with `--shape tiny`: the test of this file).
//!
//! A pass is what the engine runs while decoding: one row per worker, each row's view the
//! common history, the other workers' blocks and its own block (the headers of the real
//! layout are left out: a few tokens), logits of every row read back to the host.

use std::time::Instant;

use burn::prelude::Backend;
use colony_inference::cache::{BlockCache, BlockStore, Row, Segment};
use colony_inference::hogwild::{BurnDecoder, Decoder};
use colony_inference::model::Llama;
use colony_inference::slab::SlabCache;
use colony_inference::weights::Config;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// H200 HBM3e: 4.8 TB/s (the data sheet; a device-to-device copy measured about 4.3 TB/s).
pub const H200_BYTES_PER_S: f64 = 4.8e12;

#[derive(Debug, Clone, Serialize)]
pub struct GpuCase {
    pub backend: String,
    /// `slab` (one attention call per layer) or `block` (per-block products and a merge).
    pub cache: String,
    pub dtype: String,
    pub shape: String,
    pub params: usize,
    pub context: usize,
    pub workers: usize,
    /// Passes per round.
    pub passes: usize,
    pub rounds: usize,
    /// The median over rounds.
    pub ms_per_pass: f64,
    pub ms_per_pass_each_round: Vec<f64>,
    pub tokens_per_s: f64,
    pub speedup_vs_one_worker: f64,
    /// Weights + the cache read once, at `bandwidth` bytes/s.
    pub bound_ms_per_pass: f64,
    pub bandwidth: f64,
    pub over_bound: f64,
}

/// Common block 0, worker w's block is 1 + w.
fn pass_rows(context: usize, lens: &[usize], tokens: &[u32]) -> Vec<Row> {
    let n = lens.len();
    (0..n)
        .map(|w| {
            let mut view = vec![Segment {
                block: 0,
                visible: context,
            }];
            for (j, &len) in lens.iter().enumerate() {
                if j != w {
                    view.push(Segment {
                        block: 1 + j,
                        visible: len + 1,
                    });
                }
            }
            view.push(Segment {
                block: 1 + w,
                visible: lens[w] + 1,
            });
            Row {
                token: tokens[w],
                write: 1 + w,
                view,
            }
        })
        .collect()
}

/// Which cache the passes go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    Slab,
    Block,
}

impl CacheKind {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "slab" => Ok(Self::Slab),
            "block" => Ok(Self::Block),
            other => anyhow::bail!("--cache {other:?}: slab or block"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Slab => "slab",
            Self::Block => "block",
        }
    }
}

/// One decoder under measurement: `workers` rows per pass over a common history of `context`
/// random tokens (prefilled in chunks when made).
struct Run<'m, B: Backend, C: BlockStore<B>> {
    dec: BurnDecoder<'m, B, C>,
    context: usize,
    lens: Vec<usize>,
    rng: rand::rngs::StdRng,
}

impl<'m, B: Backend, C: BlockStore<B>> Run<'m, B, C> {
    fn new(model: &'m Llama<B>, cache: C, context: usize, workers: usize, seed: u64) -> Self {
        let vocab = model.config.vocab as u32;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut dec = BurnDecoder { model, cache };
        const CHUNK: usize = 512;
        let mut done = 0;
        while done < context {
            let n = CHUNK.min(context - done);
            let rows: Vec<Row> = (0..n)
                .map(|i| Row {
                    token: rng.gen_range(0..vocab),
                    write: 0,
                    view: vec![Segment {
                        block: 0,
                        visible: done + i + 1,
                    }],
                })
                .collect();
            dec.forward(&rows, &[]);
            done += n;
        }
        Self {
            dec,
            context,
            lens: vec![0; workers],
            rng,
        }
    }

    /// Runs `passes` passes (each reads every row's logits back); seconds per pass.
    fn passes(&mut self, passes: usize) -> f64 {
        let vocab = self.dec.model.config.vocab as u32;
        let want: Vec<usize> = (0..self.lens.len()).collect();
        let t0 = Instant::now();
        for _ in 0..passes {
            let tokens: Vec<u32> = (0..self.lens.len())
                .map(|_| self.rng.gen_range(0..vocab))
                .collect();
            let rows = pass_rows(self.context, &self.lens, &tokens);
            let logits = self.dec.forward(&rows, &want);
            debug_assert_eq!(logits.len(), self.lens.len());
            for l in &mut self.lens {
                *l += 1;
            }
        }
        t0.elapsed().as_secs_f64() / passes.max(1) as f64
    }
}

/// Seconds per pass of each worker count, per round: a decoder per worker count, each warmed
/// up (a first run of a shape compiles and autotunes kernels), then `rounds` rounds of
/// `passes` passes of every count one after another, so that a drift of the machine's speed
/// falls on every count alike.
pub fn time_rounds<B: Backend>(
    model: &Llama<B>,
    cache: CacheKind,
    context: usize,
    workers: &[usize],
    passes: usize,
    rounds: usize,
) -> Vec<Vec<f64>> {
    let blocks = |w: usize| 1 + w;
    match cache {
        CacheKind::Slab => {
            let runs = workers
                .iter()
                .map(|&w| {
                    let c = SlabCache::<B>::new(model.config.layers, blocks(w));
                    Run::new(model, c, context, w, 7 + w as u64)
                })
                .collect();
            rounds_of(runs, passes, rounds)
        }
        CacheKind::Block => {
            let runs = workers
                .iter()
                .map(|&w| {
                    let c = BlockCache::<B>::new(model.config.layers, blocks(w));
                    Run::new(model, c, context, w, 7 + w as u64)
                })
                .collect();
            rounds_of(runs, passes, rounds)
        }
    }
}

fn rounds_of<B: Backend, C: BlockStore<B>>(
    mut runs: Vec<Run<'_, B, C>>,
    passes: usize,
    rounds: usize,
) -> Vec<Vec<f64>> {
    for r in &mut runs {
        let _ = r.passes(3);
    }
    let mut out = vec![Vec::new(); runs.len()];
    for _ in 0..rounds {
        for (i, r) in runs.iter_mut().enumerate() {
            out[i].push(r.passes(passes));
        }
    }
    out
}

/// Bytes one pass must read at least: every weight once (a tied embedding once, as the output
/// projection; the embedding rows looked up are negligible) and every cached key and value
/// once.
pub fn bytes_per_pass(c: &Config, elem: usize, context: usize, cached_worker_tokens: usize) -> f64 {
    let kv = (context + cached_worker_tokens) * c.layers * 2 * c.kv_heads * c.head_dim;
    ((c.params() + kv) * elem) as f64
}

/// What the backend costs apart from the model: microseconds per small elementwise operation
/// launched and waited for (`x + 1` on 2048 values, then a sync: launch, dispatch and one
/// round trip), and per `[1, 2048] × [2048, 8192]` product waited for (a decoding step's
/// typical matrix-vector product; 32 MiB of bf16 weights) with the bandwidth that makes; each
/// `n` times after a few untimed. Printed with the cases.
pub fn probe<B: Backend>(dev: &B::Device, elem: usize, n: usize) -> (f64, f64, f64) {
    use burn::tensor::{Distribution, Tensor};
    let sync = || {
        let _ = B::sync(dev);
    };
    let time = |f: &mut dyn FnMut()| {
        for _ in 0..n.min(10) {
            f();
        }
        sync();
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    };
    let mut x = Tensor::<B, 2>::zeros([1, 2048], dev);
    let op_us = time(&mut || {
        x = x.clone().add_scalar(1.0);
        sync();
    });
    let w = Tensor::<B, 2>::random([2048, 8192], Distribution::Normal(0.0, 0.02), dev);
    let a = Tensor::<B, 2>::random([1, 2048], Distribution::Normal(0.0, 1.0), dev);
    let mm_us = time(&mut || {
        let _y = a.clone().matmul(w.clone());
        sync();
    });
    let gbps = (2048 * 8192 * elem) as f64 / (mm_us * 1e-6) / 1e9;
    println!(
        "backend probe: {op_us:.1} µs per small elementwise op waited for; \
         [1,2048]×[2048,8192] waited for: {mm_us:.1} µs ({gbps:.0} GB/s of weights)"
    );
    (op_us, mm_us, gbps)
}

/// Attention left out: each layer's output is its queries, reshaped (no operation).
#[derive(Debug)]
struct NoAttention;

impl<B: Backend> colony_inference::model::Attention<B> for NoAttention {
    fn attend(
        &mut self,
        _rope: &colony_inference::model::Rope,
        _layer: usize,
        q: burn::tensor::Tensor<B, 3>,
        _k: burn::tensor::Tensor<B, 3>,
        _v: burn::tensor::Tensor<B, 3>,
    ) -> burn::tensor::Tensor<B, 2> {
        let [rows, heads, hd] = q.dims();
        q.reshape([rows, heads * hd])
    }
}

/// Milliseconds per pass of `rows` rows without attention (every weight product, norm and
/// activation, the logits read back): what a pass costs besides its cache.
pub fn without_attention_ms<B: Backend>(model: &Llama<B>, rows: usize, passes: usize) -> f64 {
    let tokens: Vec<u32> = (0..rows as u32).collect();
    let run = || {
        let h = model.hidden(&tokens, &mut NoAttention);
        let _ = colony_inference::model::to_vec(model.logits(h));
    };
    for _ in 0..3 {
        run();
    }
    let t = Instant::now();
    for _ in 0..passes {
        run();
    }
    1e3 * t.elapsed().as_secs_f64() / passes.max(1) as f64
}

#[allow(clippy::too_many_arguments)]
pub fn run_shapes<B: Backend>(
    model: &Llama<B>,
    cache: CacheKind,
    backend: &str,
    dtype: &str,
    elem: usize,
    shape: &str,
    contexts: &[usize],
    workers: &[usize],
    passes: usize,
    rounds: usize,
    bandwidth: f64,
) -> Vec<GpuCase> {
    let c = &model.config;
    let mut cases: Vec<GpuCase> = Vec::new();
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    for &ctx in contexts {
        let per_round = time_rounds(model, cache, ctx, workers, passes, rounds);
        let one = workers.iter().position(|&w| w == 1);
        for (i, &w) in workers.iter().enumerate() {
            let s = median(per_round[i].clone());
            let tps = w as f64 / s;
            // The speed-up: the median over rounds of this round's ratio to one worker.
            let speedup = one.map_or(f64::NAN, |o| {
                median(
                    per_round[i]
                        .iter()
                        .zip(&per_round[o])
                        .map(|(si, so)| w as f64 * so / si)
                        .collect(),
                )
            });
            // Mid-run worker blocks: about half the tokens decoded.
            let cached = w * (3 + passes * rounds / 2);
            let bound = bytes_per_pass(c, elem, ctx, cached) / bandwidth;
            let case = GpuCase {
                backend: backend.into(),
                cache: cache.name().into(),
                dtype: dtype.into(),
                shape: shape.into(),
                params: c.params(),
                context: ctx,
                workers: w,
                passes,
                rounds,
                ms_per_pass: 1e3 * s,
                ms_per_pass_each_round: per_round[i].iter().map(|x| 1e3 * x).collect(),
                tokens_per_s: tps,
                speedup_vs_one_worker: speedup,
                bound_ms_per_pass: 1e3 * bound,
                bandwidth,
                over_bound: s / bound,
            };
            println!(
                "{backend} {} cache, context {ctx:>5}, {w} workers: {tps:>8.1} tokens/s aggregate, {:>7.2} ms per pass \
                 (bound {:.3} ms, {:.1}×){}",
                cache.name(),
                case.ms_per_pass,
                case.bound_ms_per_pass,
                case.over_bound,
                if w != 1 && speedup.is_finite() {
                    format!(", {speedup:.2}× one worker")
                } else {
                    String::new()
                }
            );
            cases.push(case);
        }
    }
    cases
}

/// The shapes `--shape` names.
pub fn shape(name: &str) -> anyhow::Result<Config> {
    Ok(match name {
        "llama-3.2-1b" => Config::llama_3_2_1b(),
        // A few-layer toy of the same family, for tests on the CPU.
        "tiny" => Config {
            arch: "llama".into(),
            vocab: 512,
            dim: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            ffn: 128,
            rope_base: 10_000.0,
            rms_eps: 1e-5,
            context: 4096,
            qkv_bias: false,
            tied: true,
        },
        other => anyhow::bail!("--shape {other:?}: llama-3.2-1b or tiny"),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_gpu_bench_runs_its_passes_on_the_cpu_backend() {
        let c = shape("tiny").unwrap();
        let dev = Default::default();
        let m = Llama::<colony_inference::Cpu>::random(&c, &dev, 1);
        let mut cases = Vec::new();
        for cache in [CacheKind::Slab, CacheKind::Block] {
            let mut c = run_shapes(
                &m,
                cache,
                "ndarray",
                "f32",
                4,
                "tiny",
                &[40],
                &[1, 2],
                3,
                2,
                1e10,
            );
            cases.append(&mut c);
        }
        assert_eq!(cases.len(), 4);
        let (op_us, mm_us, _) = probe::<colony_inference::Cpu>(&dev, 4, 1);
        assert!(without_attention_ms(&m, 2, 1) > 0.0);
        assert!(op_us > 0.0 && mm_us > 0.0);
        assert!(
            cases
                .iter()
                .all(|c| c.ms_per_pass > 0.0 && c.bound_ms_per_pass > 0.0)
        );
        // Views: each worker sees the common block, the others' blocks and its own, last.
        let rows = pass_rows(10, &[3, 5], &[7, 8]);
        assert_eq!(rows[0].view.last().unwrap().block, 1);
        assert_eq!(rows[0].view.last().unwrap().visible, 4);
        assert_eq!(rows[1].view[1].block, 1);
        assert_eq!(
            rows[1].view.iter().map(|s| s.visible).sum::<usize>(),
            10 + 4 + 6
        );
    }

    #[test]
    fn the_bound_counts_weights_and_cache_once() {
        let c = Config::llama_3_2_1b();
        // 1.236 B parameters in bf16, no cache: ~2.47 GB.
        let b = bytes_per_pass(&c, 2, 0, 0);
        assert!((2.46e9..2.48e9).contains(&b), "{b}");
        // 8k context: 16 layers × k, v × 8 heads × 64 × 2 bytes = 32 KiB per token.
        let with = bytes_per_pass(&c, 2, 8192, 0) - b;
        assert_eq!(with, (8192 * 32 * 1024) as f64);
    }
}
