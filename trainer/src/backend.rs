//! The burn backends Colony trains on: ndarray on the CPU, and burn-cuda with `--features cuda`.

use burn::backend::{Autodiff, NdArray};

/// CPU inference backend.
pub type Cpu = NdArray<f32>;
/// CPU training backend.
pub type CpuTrain = Autodiff<Cpu>;

/// GPU training backend (burn-cuda). Check [`cuda_available`] before creating a device: burn-cuda
/// panics instead of returning an error when the driver library is missing.
#[cfg(feature = "cuda")]
pub type CudaTrain = Autodiff<burn::backend::Cuda<f32>>;

/// Whether the CUDA driver library can be loaded on this machine.
pub fn cuda_available() -> bool {
    ["libcuda.so.1", "libcuda.so"].iter().any(|name| {
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/nvidia/lib64",
            "/usr/lib/wsl/lib",
        ]
        .iter()
        .any(|dir| std::path::Path::new(dir).join(name).exists())
    })
}
