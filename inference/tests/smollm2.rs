//! SmolLM2-135M-Instruct (the real GGUF, Q4_1; `scripts/fetch-data.sh`) against an independent
//! implementation: PyTorch + transformers reading the same file
//! (`scripts/reference_logits.py`, fixtures in `tests/fixtures/`). Tokenizer, chat template, and
//! the logits of a plain forward pass at every position.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::OnceLock;

use colony_inference::Cpu;
use colony_inference::gguf::Gguf;
use colony_inference::model::{Causal, Llama, to_vec};
use colony_inference::tokenizer::{Message, Tokenizer};
use colony_inference::weights::Weights;
use serde_json::Value;

/// Logits agree with the reference within this, absolute (logits here reach 35, so about 1.5e-4
/// relative). Both sides compute in f32 from the same dequantised weights; the difference is
/// summation order. Measured: 3e-5 (raw prompt) and 1.8e-3 (the 40-token chat prompt).
const TOL: f32 = 5e-3;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn gguf_path() -> PathBuf {
    let p = root().join(".cache/data/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-data.sh (the test command does)",
        p.display()
    );
    p
}

fn reference() -> Value {
    let p = root().join("inference/tests/fixtures/smollm2-reference.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

struct Loaded {
    tokenizer: Tokenizer,
    model: Llama<Cpu>,
}

fn loaded() -> &'static Loaded {
    static L: OnceLock<Loaded> = OnceLock::new();
    L.get_or_init(|| {
        let g = Gguf::open(gguf_path()).unwrap();
        let w = Weights::from_gguf(&g).unwrap();
        Loaded {
            tokenizer: Tokenizer::from_gguf(&g).unwrap(),
            model: Llama::new(&w, &Default::default()),
        }
    })
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn config_and_tokenizer_match_the_reference() {
    let g = Gguf::open(gguf_path()).unwrap();
    let w = Weights::from_gguf(&g).unwrap();
    let c = &w.config;
    assert_eq!(
        (
            c.layers, c.dim, c.heads, c.kv_heads, c.head_dim, c.ffn, c.vocab
        ),
        (30, 576, 9, 3, 64, 1536, 49152)
    );
    assert!(c.tied && !c.qkv_bias);
    assert_eq!(c.rope_base, 100_000.0);
    let r = reference();
    let t = &loaded().tokenizer;
    for case in r["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(t.encode(text).unwrap(), ids(&case["token_ids"]), "{text:?}");
        assert_eq!(t.decode(&ids(&case["token_ids"])), text);
    }
    assert_eq!((t.bos, t.eos), (Some(1), Some(2)));
    let chat = &r["cases"][1];
    let rendered = t
        .render_chat(
            &[Message::new("user", "What is 2+3? Answer briefly.")],
            true,
        )
        .unwrap();
    assert_eq!(rendered, chat["text"].as_str().unwrap());
    assert_eq!(t.encode(&rendered).unwrap(), ids(&chat["token_ids"]));
}

#[test]
fn plain_forward_logits_match_transformers_at_every_position() {
    let r = reference();
    let m = &loaded().model;
    for case in r["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let tokens = ids(&case["token_ids"]);
        let hidden = m.hidden(&tokens, &mut Causal);
        let logits = to_vec(m.logits(hidden));
        let vocab = m.config.vocab;
        let mut worst = 0f32;
        for (p, pos) in case["positions"].as_array().unwrap().iter().enumerate() {
            let row = &logits[p * vocab..(p + 1) * vocab];
            for pair in pos["top"].as_array().unwrap() {
                let id = pair[0].as_u64().unwrap() as usize;
                let want = pair[1].as_f64().unwrap() as f32;
                worst = worst.max((row[id] - want).abs());
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
            let want = pos["logsumexp"].as_f64().unwrap() as f32;
            assert!(
                (lse - want).abs() < TOL,
                "{name} position {p}: logsumexp {lse} vs {want}"
            );
            // The reference's best token is ours too.
            let top = pos["top"][0][0].as_u64().unwrap() as usize;
            let ours = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0;
            let margin = row[top] - row[ours];
            assert!(
                ours == top || margin.abs() < TOL,
                "{name} position {p}: argmax {ours} vs {top}"
            );
        }
        assert!(worst < TOL, "{name}: top logits differ by up to {worst}");
        // The whole last row.
        let file = root()
            .join("inference/tests/fixtures")
            .join(case["last_logits_file"].as_str().unwrap());
        let bytes = std::fs::read(file).unwrap();
        let want: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let last = &logits[(tokens.len() - 1) * vocab..];
        let diff = last
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < TOL,
            "{name}: last-position logits differ by up to {diff}"
        );
        eprintln!("{name}: max |Δ top logits| {worst:.2e}, max |Δ last row| {diff:.2e}");
    }
}
