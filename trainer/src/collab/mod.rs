//! The collaborative optimizer's logic, without a network: a peer's local trainer (accumulate
//! gradients, apply an averaged one), the swarm's global view from progress records and the
//! decision each peer takes from it, and state snapshots for joiners.

pub mod local;
pub mod progress;
pub mod snapshot;

use std::ops::Range;

use burn::module::AutodiffModule;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;

use crate::params::Layout;

pub use local::{
    AlbertTrainer, LocalTrainer, SwavTrainer, TrainError, Trainer, albert_cpu, swav_cpu,
};
#[cfg(feature = "cuda")]
pub use local::{albert_cuda, swav_cuda};
pub use progress::{Decision, GlobalView, PeerProgress, decide, majority_digest};
pub use snapshot::{SnapshotError, TrainState};

/// A model with a training objective.
pub trait Objective<B: AutodiffBackend>: AutodiffModule<B> {
    type Batch;
    /// Examples in `batch` (the sample count the all-reduce weighs by).
    fn batch_len(batch: &Self::Batch) -> usize;
    /// The batch's loss, a mean over its examples of per-example losses (so that sub-batch
    /// gradients weighted by their sizes add up to the whole batch's gradient).
    fn loss(&self, batch: &Self::Batch, device: &B::Device) -> Tensor<B, 1>;
    /// Flat ranges the optimizer step at global step `step` must leave unchanged (values and
    /// optimizer moments).
    fn frozen(&self, _layout: &Layout, _step: u64) -> Vec<Range<usize>> {
        Vec::new()
    }
    /// Adjusts the flat parameters after an optimizer step (a projection such as unit-norm
    /// prototypes). Must be deterministic: every peer applies it to the same values.
    fn after_step(&self, _layout: &Layout, _params: &mut [f32]) {}
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

impl<B: AutodiffBackend> Objective<B> for crate::models::swav::Swav<B> {
    type Batch = crate::data::images::SwavBatch;
    fn batch_len(batch: &Self::Batch) -> usize {
        batch.batch
    }
    fn loss(&self, batch: &Self::Batch, device: &B::Device) -> Tensor<B, 1> {
        self.forward_loss(batch, device).loss
    }
    fn frozen(&self, layout: &Layout, step: u64) -> Vec<Range<usize>> {
        if step < self.freeze_prototypes_steps() {
            layout
                .segments
                .iter()
                .filter(|s| s.path == crate::models::swav::PROTOTYPES)
                .map(|s| s.offset..s.offset + s.len)
                .collect()
        } else {
            Vec::new()
        }
    }
    fn after_step(&self, layout: &Layout, params: &mut [f32]) {
        crate::models::swav::normalize_prototypes(layout, params);
    }
}
