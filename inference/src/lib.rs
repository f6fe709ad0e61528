//! Inference: a decoder LLM in burn (Llama/Qwen2/SmolLM2 family), GGUF and safetensors loaders,
//! the tokenizer and chat template, and the Hogwild! engine (several workers decoding over one
//! shared KV cache). No networking here: the daemon serves it.

pub mod cache;
pub mod cpu;
pub mod gguf;
pub mod hogwild;
pub mod model;
pub mod quant;
pub mod tokenizer;
pub mod weights;

/// The CPU backend.
pub type Cpu = burn::backend::NdArray<f32>;

/// A model's weights and tokenizer from a GGUF file or a Hugging Face folder.
pub fn load(path: &std::path::Path) -> anyhow::Result<(weights::Weights, tokenizer::Tokenizer)> {
    use anyhow::Context;
    if path.is_dir() {
        let w = weights::Weights::from_hf_dir(path)?;
        let t = tokenizer::Tokenizer::from_hf_dir(path)?;
        Ok((w, t))
    } else {
        let g = gguf::Gguf::open(path)?;
        let w = weights::Weights::from_gguf(&g)
            .with_context(|| format!("loading the weights of {}", path.display()))?;
        let t = tokenizer::Tokenizer::from_gguf(&g)?;
        Ok((w, t))
    }
}
