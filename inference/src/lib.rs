//! Inference: a decoder LLM in burn (Llama/Qwen2/SmolLM2 family), GGUF and safetensors loaders,
//! the tokenizer and chat template, and the Hogwild! engine (several workers decoding over one
//! shared KV cache). No networking here: the daemon serves it.

pub mod cache;
pub mod cpu;
pub mod gguf;
pub mod hogwild;
pub mod model;
pub mod qmat;
pub mod quant;
pub mod slab;
pub mod tokenizer;
pub mod weights;

/// The GPU backends of decoding: burn-cuda as it is (`Cuda`) and wrapped in burn's operation
/// fusion (`FusedCuda`: runs of elementwise operations and reductions become one kernel each).
#[cfg(feature = "cuda")]
pub mod gpu {
    pub type Cuda<F> = burn::backend::Cuda<F>;
    pub type FusedCuda<F> = burn_fusion::Fusion<
        burn_cubecl::CubeBackend<burn_cubecl::cubecl::cuda::CudaRuntime, F, i32, u8>,
    >;
}

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

/// How the CPU decoder holds the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// Quantised blocks as stored (Q4_0/Q4_1/Q8_0; f32/f16 matrices quantised to Q8) with 8-bit
    /// activations: the fast path.
    #[default]
    Quantised,
    /// Every matrix dequantised to f32: exact, 4–8× the bytes per token.
    F32,
}

/// The CPU decoder's model and the tokenizer from a GGUF file or a Hugging Face folder.
pub fn load_cpu(
    path: &std::path::Path,
    precision: Precision,
) -> anyhow::Result<(cpu::CpuModel, tokenizer::Tokenizer)> {
    use anyhow::Context;
    if path.is_dir() || precision == Precision::F32 {
        let (w, t) = load(path)?;
        let model = match precision {
            Precision::F32 => cpu::CpuModel::new(w),
            Precision::Quantised => {
                cpu::CpuModel::new(w.map_matrices(|m| qmat::QMat::quantize_q8(&m)))
            }
        };
        return Ok((model, t));
    }
    let g = gguf::Gguf::open(path)?;
    let w = weights::Weights::<qmat::QMat>::read_gguf(&g)
        .with_context(|| format!("loading the weights of {}", path.display()))?;
    let t = tokenizer::Tokenizer::from_gguf(&g)?;
    Ok((cpu::CpuModel::new(w), t))
}
