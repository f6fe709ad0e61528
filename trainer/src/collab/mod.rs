//! The collaborative optimizer's logic, without a network: a peer's local trainer (accumulate
//! gradients, apply an averaged one), the swarm's global view from progress records and the
//! decision each peer takes from it, and state snapshots for joiners.

pub mod local;
pub mod progress;
pub mod snapshot;

use burn::module::AutodiffModule;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;

#[cfg(feature = "cuda")]
pub use local::albert_cuda;
pub use local::{AlbertTrainer, LocalTrainer, TrainError, Trainer, albert_cpu};
pub use progress::{Decision, GlobalView, PeerProgress, decide};
pub use snapshot::{SnapshotError, TrainState};

/// A model with a training objective.
pub trait Objective<B: AutodiffBackend>: AutodiffModule<B> {
    type Batch;
    /// Examples in `batch` (the sample count the all-reduce weighs by).
    fn batch_len(batch: &Self::Batch) -> usize;
    /// The batch's loss, a mean over its examples of per-example losses (so that sub-batch
    /// gradients weighted by their sizes add up to the whole batch's gradient).
    fn loss(&self, batch: &Self::Batch, device: &B::Device) -> Tensor<B, 1>;
}

impl<B: AutodiffBackend> Objective<B> for crate::models::albert::Albert<B> {
    type Batch = crate::data::mlm::MlmBatch;
    fn batch_len(batch: &Self::Batch) -> usize {
        batch.batch
    }
    fn loss(&self, batch: &Self::Batch, device: &B::Device) -> Tensor<B, 1> {
        self.forward_loss(batch, device).loss
    }
}
