//! `colony bench infer`: Hogwild! decoding speed on this machine, native CPU decoder, for
//! several worker counts in one run (aggregate tokens/s, milliseconds per pass), and
//! llama.cpp's single stream on the same GGUF, prompt, tokens and threads in the same run
//! (`scripts/llama-venv.sh` sets it up).
//!
//! Each figure is the median of `--repeat` rounds (ours and llama.cpp's alternating: this
//! machine's speed drifts by ±30% over minutes).
//!
//! `--backend cuda` (and `ndarray`) time the burn block cache on random-weight shapes instead:
//! [`super::infer_gpu`].

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use colony_inference::Precision;
use colony_inference::cpu::CpuDecoder;
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
    /// Measure the exact f32 decoder (dequantised weights) instead of the quantised one.
    #[arg(long)]
    pub f32: bool,
    /// Rounds of every measurement (ours and llama.cpp's alternating; on `--backend cuda`
    /// every worker count's passes in turn, `--tokens` passes each); medians are reported.
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// cpu: the native decoder on `--model`. cuda (a build with `--features cuda`) or ndarray:
    /// the burn block cache on a random-weight model of `--shape`, over `--contexts`.
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// With --backend cuda/ndarray: llama-3.2-1b or tiny.
    #[arg(long, default_value = "llama-3.2-1b")]
    pub shape: String,
    /// With --backend cuda/ndarray: common-history lengths.
    #[arg(long, value_delimiter = ',', default_value = "1024,8192")]
    pub contexts: Vec<usize>,
    /// With --backend cuda: bf16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// With --backend cuda: the Python with PyTorch to run the eager peer on the same shapes
    /// ("auto": python3 if it imports torch with CUDA; "off").
    #[arg(long, default_value = "auto")]
    pub torch: String,
    /// With --backend cuda/ndarray: the cache layouts to measure (slab: one attention call per
    /// layer; block: per-block products and a log-sum-exp merge).
    #[arg(long, value_delimiter = ',', default_value = "slab")]
    pub cache: Vec<String>,
    /// With --backend cuda: burn's operation fusion on, off, or both (`on,off`).
    #[arg(long, value_delimiter = ',', default_value = "on")]
    pub fusion: Vec<String>,
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
    #[serde(default)]
    tokens_per_s_each_round: Vec<f64>,
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
    decoder: String,
    workers: usize,
    tokens_per_worker: usize,
    passes: usize,
    rounds: usize,
    /// Median of the rounds.
    tokens_per_s: f64,
    tokens_per_s_each_round: Vec<f64>,
    ms_per_pass: f64,
    speedup_vs_one_worker: f64,
    threads: usize,
}

/// Decodes `tokens` passes greedily with `workers` workers; (tokens generated, seconds).
fn decode(
    model: &colony_inference::cpu::CpuModel,
    tok: &colony_inference::tokenizer::Tokenizer,
    prompt: &str,
    workers: usize,
    tokens: usize,
) -> anyhow::Result<(usize, f64)> {
    let cfg = HogwildConfig {
        workers,
        max_tokens: tokens,
        ..HogwildConfig::default()
    };
    let mut e = Engine::new(CpuDecoder::new(model), tok, prompt, cfg)?;
    let mut generated = 0usize;
    let t0 = Instant::now();
    for _ in 0..tokens {
        let logits = e.pass();
        for (k, l) in logits.into_iter().enumerate() {
            if let Some(l) = l {
                // Greedy; a stop token is taken like any other so every count decodes the same
                // number of passes.
                let t = colony_inference::hogwild::argmax(&l);
                e.accept(k, t)?;
                generated += 1;
            }
        }
    }
    Ok((generated, t0.elapsed().as_secs_f64()))
}

pub fn run(a: InferBenchArgs) -> anyhow::Result<()> {
    if a.backend != "cpu" {
        return run_blocks(&a);
    }
    let precision = if a.f32 {
        Precision::F32
    } else {
        Precision::Quantised
    };
    let (model, tok) = colony_inference::load_cpu(&a.model, precision)?;
    let threads = rayon::current_num_threads();
    let decoder = match precision {
        Precision::F32 => "native cpu, f32".to_string(),
        Precision::Quantised => format!(
            "native cpu, quantised blocks x int8 activations ({})",
            colony_inference::qmat::kernels()
        ),
    };
    println!(
        "{decoder}: {:.1} MB of weights per pass, {threads} threads",
        model.bytes_per_pass() as f64 / 1e6
    );
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
    let chat = tok.render_chat(
        &[colony_inference::tokenizer::Message::new("user", &a.prompt)],
        true,
    )?;
    // Rounds: every worker count, then llama.cpp, one after another, so that each round's
    // figures share the machine's state; the medians are reported (and the ratios are the
    // medians of each round's ratios).
    let rounds = a.repeat.max(1);
    let mut ours: Vec<Vec<(f64, f64)>> = vec![Vec::new(); a.workers.len()]; // (tokens/s, s)
    let mut peers: Vec<LlamaCpp> = Vec::new();
    let mut peer_failed = python.is_none();
    for round in 0..rounds {
        for (i, &w) in a.workers.iter().enumerate() {
            let (generated, secs) = decode(&model, &tok, &a.prompt, w, a.tokens)?;
            let tps = generated as f64 / secs;
            println!(
                "round {}: {w} workers: {tps:>7.1} tokens/s aggregate, {:>6.1} ms per pass",
                round + 1,
                1e3 * secs / a.tokens as f64
            );
            ours[i].push((tps, secs));
        }
        if let (Some(py), false) = (&python, peer_failed) {
            match llama_cpp(py, &a.model, &chat, a.tokens, threads) {
                Ok(l) => {
                    println!(
                        "round {}: llama.cpp {} (one stream, {} threads): {:>7.1} tokens/s",
                        round + 1,
                        l.llama_cpp_python,
                        l.threads,
                        l.tokens_per_s
                    );
                    peers.push(l);
                }
                Err(e) => {
                    // Our own figures still count: say why the peer is missing and go on.
                    eprintln!("warning: llama.cpp not measured: {e:#}");
                    peer_failed = true;
                }
            }
        }
    }
    let median = |mut v: Vec<f64>| -> f64 {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.1}–{hi:.1}")
    };
    println!("medians of {rounds} rounds:");
    let one_idx = a.workers.iter().position(|&w| w == 1);
    let mut cases: Vec<Case> = Vec::new();
    for (i, &w) in a.workers.iter().enumerate() {
        let tps: Vec<f64> = ours[i].iter().map(|x| x.0).collect();
        let secs = median(ours[i].iter().map(|x| x.1).collect());
        let speedup = one_idx.map_or(f64::NAN, |o| {
            median((0..rounds).map(|r| ours[i][r].0 / ours[o][r].0).collect())
        });
        let m = median(tps.clone());
        println!(
            "{w} workers: {m:>7.1} tokens/s aggregate ({}), {:>6.1} ms per pass{}",
            spread(&tps),
            1e3 * secs / a.tokens as f64,
            if speedup.is_nan() {
                String::new()
            } else {
                format!(", {speedup:.2}× one worker")
            }
        );
        cases.push(Case {
            model: a.model.display().to_string(),
            decoder: decoder.clone(),
            workers: w,
            tokens_per_worker: a.tokens,
            passes: a.tokens,
            rounds,
            tokens_per_s: m,
            tokens_per_s_each_round: tps,
            ms_per_pass: 1e3 * secs / a.tokens as f64,
            speedup_vs_one_worker: speedup,
            threads,
        });
    }
    let peer = if peers.len() == rounds {
        let tps: Vec<f64> = peers.iter().map(|l| l.tokens_per_s).collect();
        println!(
            "llama.cpp {} (one stream, {} threads): {:>7.1} tokens/s ({})",
            peers[0].llama_cpp_python,
            peers[0].threads,
            median(tps.clone()),
            spread(&tps)
        );
        let ratio = |i: usize| {
            median(
                (0..rounds)
                    .map(|r| ours[i][r].0 / peers[r].tokens_per_s)
                    .collect(),
            )
        };
        if let Some(o) = one_idx {
            println!(
                "one worker's time per token vs llama.cpp's: {:.2}× (target ≤ 1.5×)",
                1.0 / ratio(o)
            );
        }
        if let Some(f) = a.workers.iter().position(|&w| w == 4) {
            println!(
                "four workers together vs llama.cpp's stream: {:.2}× (target > 1)",
                ratio(f)
            );
        }
        let mut l = peers.swap_remove(0);
        l.tokens_per_s = median(tps.clone());
        l.ms_per_token = 1e3 / l.tokens_per_s;
        l.tokens_per_s_each_round = tps;
        Some(l)
    } else {
        None
    };
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

/// `--backend cuda|ndarray`: the burn decoder over the `--cache` layouts on `--shape` with
/// random weights.
fn run_blocks(a: &InferBenchArgs) -> anyhow::Result<()> {
    use super::infer_gpu::{CacheKind, GpuCase, run_shapes, shape};
    let c = shape(&a.shape)?;
    let caches = a
        .cache
        .iter()
        .map(|s| CacheKind::parse(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Every cache layout on one model; the probe first.
    fn all<B: burn::prelude::Backend>(
        a: &InferBenchArgs,
        m: &colony_inference::model::Llama<B>,
        caches: &[CacheKind],
        backend: &str,
        dtype: &str,
        elem: usize,
        bandwidth: f64,
    ) -> Vec<GpuCase> {
        let _ = super::infer_gpu::probe::<B>(m.device(), elem, 200);
        for &w in &a.workers {
            let ms = super::infer_gpu::without_attention_ms(m, w, a.tokens);
            println!("{backend}: a pass of {w} rows without attention: {ms:.2} ms");
        }
        let mut out = Vec::new();
        for &cache in caches {
            out.append(&mut run_shapes(
                m,
                cache,
                backend,
                dtype,
                elem,
                &a.shape,
                &a.contexts,
                &a.workers,
                a.tokens,
                a.repeat,
                bandwidth,
            ));
        }
        out
    }
    let cases = match (a.backend.as_str(), a.dtype.as_str()) {
        ("ndarray", _) => {
            let m = colony_inference::model::Llama::<colony_inference::Cpu>::random(
                &c,
                &Default::default(),
                1,
            );
            all(a, &m, &caches, "ndarray", "f32", 4, 12e9)
        }
        #[cfg(feature = "cuda")]
        ("cuda", dtype) => {
            use super::infer_gpu::H200_BYTES_PER_S;
            use colony_inference::gpu::{Cuda, FusedCuda};
            use colony_inference::model::Llama;
            if !colony_trainer::backend::cuda_available() {
                anyhow::bail!("--backend cuda: no CUDA driver (libcuda.so) on this machine");
            }
            let dev = burn::backend::cuda::CudaDevice::new(0);
            let mut cases = Vec::new();
            for fusion in &a.fusion {
                let name = match fusion.as_str() {
                    "on" => "cuda+fusion",
                    "off" => "cuda",
                    other => anyhow::bail!("--fusion {other:?}: on or off"),
                };
                let t0 = Instant::now();
                let mut more = match (dtype, fusion.as_str()) {
                    ("bf16", "on") => {
                        let m = Llama::<FusedCuda<half::bf16>>::random(&c, &dev, 1);
                        all(a, &m, &caches, name, "bf16", 2, H200_BYTES_PER_S)
                    }
                    ("bf16", _) => {
                        let m = Llama::<Cuda<half::bf16>>::random(&c, &dev, 1);
                        all(a, &m, &caches, name, "bf16", 2, H200_BYTES_PER_S)
                    }
                    ("f32", "on") => {
                        let m = Llama::<FusedCuda<f32>>::random(&c, &dev, 1);
                        all(a, &m, &caches, name, "f32", 4, H200_BYTES_PER_S)
                    }
                    ("f32", _) => {
                        let m = Llama::<Cuda<f32>>::random(&c, &dev, 1);
                        all(a, &m, &caches, name, "f32", 4, H200_BYTES_PER_S)
                    }
                    (other, _) => anyhow::bail!("--dtype {other:?}: bf16 or f32"),
                };
                println!("{name}: {:.1} s", t0.elapsed().as_secs_f64());
                cases.append(&mut more);
            }
            cases
        }
        #[cfg(not(feature = "cuda"))]
        ("cuda", _) => anyhow::bail!("--backend cuda needs a build with --features cuda"),
        (other, _) => anyhow::bail!("--backend {other:?}: cpu, cuda or ndarray"),
    };
    let mut docs: Vec<serde_json::Value> = cases
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()?;
    if a.backend == "cuda" && a.torch != "off" {
        let python = if a.torch == "auto" {
            "python3"
        } else {
            a.torch.as_str()
        };
        match torch_peer(python, a, &c) {
            Ok(mut peer) => docs.append(&mut peer),
            Err(e) => eprintln!("warning: the PyTorch peer was not measured: {e:#}"),
        }
    }
    if let Some(p) = &a.json {
        super::write_json(p, "infer-gpu", &docs)?;
    }
    Ok(())
}

/// PyTorch eager on the same shapes (`scripts/torch_hogwild_bench.py`): one JSON line per case.
fn torch_peer(
    python: &str,
    a: &InferBenchArgs,
    c: &colony_inference::weights::Config,
) -> anyhow::Result<Vec<serde_json::Value>> {
    use anyhow::Context;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/torch_hogwild_bench.py");
    let join = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg("--config")
        .arg(serde_json::to_string(c)?)
        .arg("--contexts")
        .arg(join(&a.contexts))
        .arg("--workers")
        .arg(join(&a.workers))
        .arg("--passes")
        .arg(a.tokens.to_string())
        .arg("--dtype")
        .arg(&a.dtype)
        .output()
        .with_context(|| format!("cannot run {python}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{} failed ({}): {}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut docs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            println!(
                "pytorch eager: context {:>5}, {} workers: {:>8.1} tokens/s aggregate, {:>7.2} ms per pass",
                v["context"],
                v["workers"],
                v["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
                v["ms_per_pass"].as_f64().unwrap_or(f64::NAN)
            );
            docs.push(v);
        }
    }
    Ok(docs)
}
