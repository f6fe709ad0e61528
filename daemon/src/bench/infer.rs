//! `colony bench infer`: Hogwild! decoding speed on this machine, native CPU decoder, for
//! several worker counts in one run (aggregate tokens/s, milliseconds per pass), and
//! llama.cpp's single stream on the same GGUF, prompt, tokens and threads in the same run
//! (`scripts/llama-venv.sh` sets it up).
//!
//! Not yet here (issue 5): the GPU shapes and their bandwidth bound.

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
    /// The Python with llama-cpp-python to measure llama.cpp with ("auto": the one
    /// `scripts/llama-venv.sh` makes, if it is there; "off": skip).
    #[arg(long, default_value = "auto")]
    pub llama_cpp: String,
}

/// llama.cpp's single stream, as `scripts/llama_cpp_bench.py` reports it.
#[derive(Debug, Serialize, serde::Deserialize)]
struct LlamaCpp {
    llama_cpp_python: String,
    prompt_tokens: usize,
    tokens: usize,
    threads: usize,
    prefill_s: f64,
    decode_s: f64,
    tokens_per_s: f64,
    ms_per_token: f64,
}

/// Runs llama.cpp on the same model, prompt, tokens and threads.
fn llama_cpp(
    python: &std::path::Path,
    model: &std::path::Path,
    prompt: &str,
    tokens: usize,
    threads: usize,
) -> anyhow::Result<LlamaCpp> {
    use anyhow::Context;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/llama_cpp_bench.py");
    let dir = tempfile::tempdir()?;
    let prompt_file = dir.path().join("prompt.txt");
    std::fs::write(&prompt_file, prompt)?;
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(model)
        .arg(&prompt_file)
        .arg(tokens.to_string())
        .arg(threads.to_string())
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        anyhow::bail!(
            "llama.cpp benchmark failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("llama.cpp benchmark printed {line:?}"))
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
    // llama.cpp's single stream on the same chat prompt as one worker decodes.
    let python = match a.llama_cpp.as_str() {
        "off" => None,
        "auto" => {
            let p = PathBuf::from(".cache/llama-venv/bin/python");
            if p.exists() {
                Some(p)
            } else {
                eprintln!(
                    "note: llama.cpp not measured (run scripts/llama-venv.sh, or pass --llama-cpp PYTHON)"
                );
                None
            }
        }
        p => Some(PathBuf::from(p)),
    };
    let mut peer = None;
    if let Some(py) = python {
        let prompt = tok.render_chat(
            &[colony_inference::tokenizer::Message::new("user", &a.prompt)],
            true,
        )?;
        match llama_cpp(&py, &a.model, &prompt, a.tokens, threads) {
            Ok(l) => peer = Some(l),
            // Our own figures still count: say why the peer is missing and go on.
            Err(e) => eprintln!("warning: llama.cpp not measured: {e:#}"),
        }
    }
    if let Some(l) = &peer {
        println!(
            "llama.cpp {} (one stream, {} threads): {:>7.1} tokens/s, {:>6.1} ms per token",
            l.llama_cpp_python, l.threads, l.tokens_per_s, l.ms_per_token
        );
        if let Some(one) = cases.iter().find(|c| c.workers == 1) {
            println!(
                "one worker vs llama.cpp: {:.2}× slower (target ≤ 1.5×)",
                l.tokens_per_s / one.tokens_per_s
            );
        }
        if let Some(four) = cases.iter().find(|c| c.workers == 4) {
            println!(
                "four workers together vs llama.cpp's stream: {:.2}× (target > 1)",
                four.tokens_per_s / l.tokens_per_s
            );
        }
    }
    if let Some(p) = &a.json {
        let mut docs = Vec::new();
        for c in &cases {
            docs.push(serde_json::to_value(c)?);
        }
        if let Some(l) = &peer {
            let mut v = serde_json::to_value(l)?;
            v["decoder"] = "llama.cpp (one stream)".into();
            docs.push(v);
        }
        super::write_json(p, "infer", &docs)?;
    }
    Ok(())
}
