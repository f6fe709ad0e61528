//! Inference: a decoder LLM in burn (Llama/Qwen2/SmolLM2 family), GGUF and safetensors loaders,
//! the tokenizer and sampler, and the Hogwild! engine.
//!
//! Not yet built: this crate is reserved in the workspace so the dependency direction
//! (protocol ← inference ← daemon) is fixed from the start. It will hold no networking.
