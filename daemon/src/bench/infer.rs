//! `colony bench infer`: Hogwild! decoding speed on this machine, native CPU decoder, for
//! several worker counts in one run (aggregate tokens/s, milliseconds per pass).
//!
//! Not yet here (issue 5): llama.cpp in the same run, the GPU shapes and their bandwidth bound.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use colony_inference::cpu::{CpuDecoder, CpuModel};
use colony_inference::hogwild::{Engine, HogwildConfig};
use serde::Serialize;

#[derive(Debug, Args)]
pub struct InferBenchArgs {
    /// A GGUF file or a Hugging Face folder (default: SmolLM2-135M from scripts/fetch-data.sh).
    #[arg(long, default_value = ".cache/data/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Worker counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub workers: Vec<usize>,
    /// Tokens per worker (greedy; a worker's stop token does not end the run early).
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    #[arg(long, default_value = "Explain how a bicycle stays upright.")]
    pub prompt: String,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Case {
    model: String,
    decoder: &'static str,
    workers: usize,
    tokens_per_worker: usize,
    passes: usize,
    tokens_per_s: f64,
    ms_per_pass: f64,
    speedup_vs_one_worker: f64,
    threads: usize,
}

pub fn run(a: InferBenchArgs) -> anyhow::Result<()> {
    let (weights, tok) = colony_inference::load(&a.model)?;
    let model = CpuModel::new(weights);
    let threads = rayon::current_num_threads();
    let mut cases: Vec<Case> = Vec::new();
    for &w in &a.workers {
        let cfg = HogwildConfig {
            workers: w,
            max_tokens: a.tokens,
            ..HogwildConfig::default()
        };
        let mut e = Engine::new(CpuDecoder::new(&model), &tok, &a.prompt, cfg)?;
        let mut generated = 0usize;
        let t0 = Instant::now();
        for _ in 0..a.tokens {
            let logits = e.pass();
            for (k, l) in logits.into_iter().enumerate() {
                if let Some(l) = l {
                    // Greedy; a stop token is taken like any other so every count decodes
                    // the same number of passes.
                    let t = colony_inference::hogwild::argmax(&l);
                    e.accept(k, t)?;
                    generated += 1;
                }
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let tps = generated as f64 / secs;
        let one = cases
            .iter()
            .find(|c| c.workers == 1)
            .map(|c| c.tokens_per_s);
        cases.push(Case {
            model: a.model.display().to_string(),
            decoder: "native cpu, f32",
            workers: w,
            tokens_per_worker: a.tokens,
            passes: a.tokens,
            tokens_per_s: tps,
            ms_per_pass: 1e3 * secs / a.tokens as f64,
            speedup_vs_one_worker: one.map_or(f64::NAN, |o| tps / o),
            threads,
        });
        println!(
            "{w} workers: {tps:>7.1} tokens/s aggregate, {:>6.1} ms per pass{}",
            1e3 * secs / a.tokens as f64,
            one.map_or(String::new(), |o| format!(", {:.2}× one worker", tps / o))
        );
    }
    if let Some(p) = &a.json {
        super::write_json(p, "infer", &cases)?;
    }
    Ok(())
}
