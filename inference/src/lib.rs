//! Inference: a decoder LLM in burn (Llama/Qwen2/SmolLM2 family), GGUF and safetensors loaders,
//! the tokenizer and chat template, and the Hogwild! engine (several workers decoding over one
//! shared KV cache). No networking here: the daemon serves it.

pub mod cache;
pub mod gguf;
pub mod hogwild;
pub mod model;
pub mod quant;
pub mod tokenizer;
pub mod weights;

/// The CPU backend.
pub type Cpu = burn::backend::NdArray<f32>;
