//! One peer's side of the collaborative step: accumulate gradients over micro-batches, hand the
//! local mean to the all-reduce, apply the averaged gradient with the optimizer.
//!
//! The flat parameter vector `params` is authoritative; the burn model is reloaded from it
//! after every step, so a snapshot (`params` + optimizer state) is the whole training state.

use burn::tensor::backend::AutodiffBackend;

use super::Objective;
use super::snapshot::TrainState;
use crate::optim::schedule::Schedule;
use crate::optim::{OptimizerConfig, OptimizerState};
use crate::params::{Layout, LayoutError, flatten_grads, flatten_params, load_params};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("the loss is not finite ({0}); the micro-batch was not accumulated")]
    NonFiniteLoss(f32),
    #[error("a gradient value is not finite; the micro-batch was not accumulated")]
    NonFiniteGradient,
    #[error("the averaged gradient has {got} values, the model {expected}")]
    GradientLength { expected: usize, got: usize },
    #[error("the averaged gradient holds a value that is not finite; the step was not taken")]
    NonFiniteAverage,
    #[error("state is for another model (fingerprint {got}, this model {expected})")]
    WrongModel { expected: String, got: String },
    #[error("state does not fit the model: {0}")]
    StateShape(String),
}

/// A peer's trainer.
#[derive(Debug)]
pub struct LocalTrainer<B: AutodiffBackend, M: Objective<B>> {
    model: Option<M>,
    pub layout: Layout,
    fingerprint: [u8; 32],
    params: Vec<f32>,
    pub optimizer: OptimizerConfig,
    opt_state: OptimizerState,
    pub schedule: Schedule,
    /// Σ over micro-batches of (mean gradient × examples).
    acc: Vec<f32>,
    acc_samples: u64,
    device: B::Device,
}

impl<B: AutodiffBackend, M: Objective<B>> LocalTrainer<B, M> {
    /// `extra_fingerprint` folds what else peers must share (the tokenizer, the model config)
    /// into the model's fingerprint.
    pub fn new(
        model: M,
        optimizer: OptimizerConfig,
        schedule: Schedule,
        extra_fingerprint: &[u8],
        device: B::Device,
    ) -> Result<Self, TrainError> {
        use sha2::{Digest, Sha256};
        let layout = Layout::of(&model);
        let params = flatten_params(&model)?;
        let mut h = Sha256::new();
        h.update(layout.fingerprint());
        h.update(extra_fingerprint);
        let fingerprint = h.finalize().into();
        let opt_state = optimizer.init_state(layout.total);
        Ok(Self {
            acc: vec![0.0; layout.total],
            model: Some(model),
            layout,
            fingerprint,
            params,
            optimizer,
            opt_state,
            schedule,
            acc_samples: 0,
            device,
        })
    }

    pub fn model(&self) -> &M {
        self.model
            .as_ref()
            .expect("model is always present between calls")
    }

    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// Optimizer steps taken: the collaborative epoch (global step) this peer is at.
    pub fn epoch(&self) -> u64 {
        self.opt_state.step
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// Samples accumulated since the last step.
    pub fn samples(&self) -> u64 {
        self.acc_samples
    }

    /// Forward + backward on one micro-batch; adds its gradient into the accumulator.
    /// Returns the batch's loss.
    pub fn accumulate(&mut self, batch: &M::Batch) -> Result<f32, TrainError> {
        let n = M::batch_len(batch);
        let model = self.model();
        let loss = model.loss(batch, &self.device);
        let value: f32 = loss
            .clone()
            .into_data()
            .convert::<f32>()
            .as_slice::<f32>()
            .ok()
            .and_then(|s| s.first().copied())
            .unwrap_or(f32::NAN);
        if !value.is_finite() {
            return Err(TrainError::NonFiniteLoss(value));
        }
        let grads = loss.backward();
        let g = flatten_grads(model, &grads)?;
        if g.iter().any(|x| !x.is_finite()) {
            return Err(TrainError::NonFiniteGradient);
        }
        let w = n as f32;
        for (a, gi) in self.acc.iter_mut().zip(&g) {
            *a += gi * w;
        }
        self.acc_samples += n as u64;
        Ok(value)
    }

    /// The mean gradient over the samples accumulated (zeros when there are none).
    pub fn mean_gradient(&self) -> Vec<f32> {
        let k = if self.acc_samples == 0 {
            0.0
        } else {
            1.0 / self.acc_samples as f32
        };
        self.acc.iter().map(|a| a * k).collect()
    }

    /// Forgets the accumulated gradient.
    pub fn reset_accumulator(&mut self) {
        self.acc.iter_mut().for_each(|a| *a = 0.0);
        self.acc_samples = 0;
    }

    /// One optimizer step with `grad` (the swarm's average) at the schedule's rate for the
    /// current global step; the accumulator is cleared. Returns the rate used.
    pub fn apply(&mut self, grad: &[f32]) -> Result<f32, TrainError> {
        let lr = self.step_with(grad)?;
        self.reset_accumulator();
        Ok(lr)
    }

    /// [`Self::apply`] without clearing the accumulator: for delayed parameter updates, where
    /// the micro-batches of the next step were computed while this step's gradient was being
    /// averaged (on the parameters before it).
    pub fn apply_keeping_accumulator(&mut self, grad: &[f32]) -> Result<f32, TrainError> {
        self.step_with(grad)
    }

    fn step_with(&mut self, grad: &[f32]) -> Result<f32, TrainError> {
        if grad.len() != self.layout.total {
            return Err(TrainError::GradientLength {
                expected: self.layout.total,
                got: grad.len(),
            });
        }
        if grad.iter().any(|x| !x.is_finite()) {
            return Err(TrainError::NonFiniteAverage);
        }
        let step = self.opt_state.step;
        let lr = self.schedule.rate(step);
        let model = self.model();
        let frozen = model.frozen(&self.layout, step);
        let saved: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = frozen
            .iter()
            .map(|r| {
                let moment = |v: &[f32]| v.get(r.clone()).map(<[f32]>::to_vec).unwrap_or_default();
                (
                    self.params[r.clone()].to_vec(),
                    moment(&self.opt_state.first),
                    moment(&self.opt_state.second),
                )
            })
            .collect();
        self.optimizer.step(
            &self.layout,
            &mut self.params,
            grad,
            &mut self.opt_state,
            lr,
        );
        for (r, (p, m1, m2)) in frozen.into_iter().zip(saved) {
            self.params[r.clone()].copy_from_slice(&p);
            if !m1.is_empty() {
                self.opt_state.first[r.clone()].copy_from_slice(&m1);
            }
            if !m2.is_empty() {
                self.opt_state.second[r].copy_from_slice(&m2);
            }
        }
        if let Some(m) = &self.model {
            m.after_step(&self.layout, &mut self.params);
        }
        self.reload()?;
        Ok(lr)
    }

    fn reload(&mut self) -> Result<(), TrainError> {
        let model = self
            .model
            .take()
            .expect("model is always present between calls");
        match load_params(model.clone(), &self.layout, &self.params) {
            Ok(m) => {
                self.model = Some(m);
                Ok(())
            }
            Err(e) => {
                self.model = Some(model);
                Err(e.into())
            }
        }
    }

    /// The whole training state (parameters, optimizer state, global step).
    pub fn state(&self) -> TrainState {
        TrainState {
            fingerprint: self.fingerprint,
            params: self.params.clone(),
            opt: self.opt_state.clone(),
        }
    }

    /// Sets the parameters of a fresh run (global step 0, optimizer state reset).
    pub fn reset_params(&mut self, params: Vec<f32>) -> Result<(), TrainError> {
        let opt = self.optimizer.init_state(self.layout.total);
        self.restore(TrainState {
            fingerprint: self.fingerprint,
            params,
            opt,
        })
    }

    /// Replaces the training state with `s` (a snapshot from peers or a checkpoint); the
    /// accumulator is cleared. Nothing changes when `s` does not fit.
    pub fn restore(&mut self, s: TrainState) -> Result<(), TrainError> {
        if s.fingerprint != self.fingerprint {
            return Err(TrainError::WrongModel {
                expected: hex::encode(&self.fingerprint[..8]),
                got: hex::encode(&s.fingerprint[..8]),
            });
        }
        let want = self.optimizer.init_state(self.layout.total);
        if s.params.len() != self.layout.total
            || s.opt.first.len() != want.first.len()
            || s.opt.second.len() != want.second.len()
        {
            return Err(TrainError::StateShape(format!(
                "{} parameters, moments {}+{} (want {}, {}+{})",
                s.params.len(),
                s.opt.first.len(),
                s.opt.second.len(),
                self.layout.total,
                want.first.len(),
                want.second.len()
            )));
        }
        self.params = s.params;
        self.opt_state = s.opt;
        self.reload()?;
        self.reset_accumulator();
        Ok(())
    }
}

/// A trainer behind a trait object. The daemon drives trainers through this, so the tensor
/// code is compiled (and optimised) in this crate, not in every caller: in debug builds a
/// generic call from an unoptimised crate runs the whole model unoptimised (measured 5×).
pub trait Trainer: Send {
    type Batch;
    fn fingerprint(&self) -> [u8; 32];
    fn epoch(&self) -> u64;
    fn samples(&self) -> u64;
    /// Values in the flat parameter (and gradient) vector.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn params(&self) -> &[f32];
    fn accumulate(&mut self, batch: &Self::Batch) -> Result<f32, TrainError>;
    fn mean_gradient(&self) -> Vec<f32>;
    fn reset_accumulator(&mut self);
    fn apply(&mut self, grad: &[f32]) -> Result<f32, TrainError>;
    /// A step that keeps the accumulated micro-batches (delayed parameter updates).
    fn apply_keeping_accumulator(&mut self, grad: &[f32]) -> Result<f32, TrainError>;
    fn state(&self) -> TrainState;
    fn restore(&mut self, s: TrainState) -> Result<(), TrainError>;
}

impl<B, M> Trainer for LocalTrainer<B, M>
where
    B: AutodiffBackend,
    M: Objective<B> + Send,
    B::Device: Send,
{
    type Batch = M::Batch;
    fn fingerprint(&self) -> [u8; 32] {
        LocalTrainer::fingerprint(self)
    }
    fn epoch(&self) -> u64 {
        LocalTrainer::epoch(self)
    }
    fn samples(&self) -> u64 {
        LocalTrainer::samples(self)
    }
    fn len(&self) -> usize {
        self.layout.total
    }
    fn params(&self) -> &[f32] {
        LocalTrainer::params(self)
    }
    fn accumulate(&mut self, batch: &M::Batch) -> Result<f32, TrainError> {
        LocalTrainer::accumulate(self, batch)
    }
    fn mean_gradient(&self) -> Vec<f32> {
        LocalTrainer::mean_gradient(self)
    }
    fn reset_accumulator(&mut self) {
        LocalTrainer::reset_accumulator(self)
    }
    fn apply(&mut self, grad: &[f32]) -> Result<f32, TrainError> {
        LocalTrainer::apply(self, grad)
    }
    fn apply_keeping_accumulator(&mut self, grad: &[f32]) -> Result<f32, TrainError> {
        LocalTrainer::apply_keeping_accumulator(self, grad)
    }
    fn state(&self) -> TrainState {
        LocalTrainer::state(self)
    }
    fn restore(&mut self, s: TrainState) -> Result<(), TrainError> {
        LocalTrainer::restore(self, s)
    }
}

/// A boxed ALBERT trainer, CPU or GPU (see [`Trainer`] for why it is boxed here).
pub type AlbertTrainer = Box<dyn Trainer<Batch = crate::data::mlm::MlmBatch>>;

/// A boxed SwAV trainer, CPU or GPU.
pub type SwavTrainer = Box<dyn Trainer<Batch = crate::data::images::SwavBatch>>;

/// A trainer of `model` on backend `B`, boxed, starting from `init(layout)`.
fn boxed_on<B, M>(
    model: M,
    optimizer: OptimizerConfig,
    schedule: Schedule,
    extra_fingerprint: &[u8],
    init: impl FnOnce(&crate::params::Layout) -> Vec<f32>,
    device: B::Device,
) -> Result<Box<dyn Trainer<Batch = M::Batch>>, TrainError>
where
    B: AutodiffBackend,
    B::Device: Send,
    M: Objective<B> + Send + 'static,
{
    let mut t: LocalTrainer<B, M> =
        LocalTrainer::new(model, optimizer, schedule, extra_fingerprint, device)?;
    t.reset_params(init(&t.layout))?;
    Ok(Box::new(t))
}

/// An ALBERT trainer on backend `B`, starting from
/// [`crate::models::albert::seeded_params`] of `seed`.
fn albert_on<B>(
    cfg: &crate::models::albert::AlbertConfig,
    optimizer: OptimizerConfig,
    schedule: Schedule,
    extra_fingerprint: &[u8],
    seed: u64,
    device: B::Device,
) -> Result<AlbertTrainer, TrainError>
where
    B: AutodiffBackend,
    B::Device: Send,
{
    boxed_on::<B, _>(
        cfg.init::<B>(&device),
        optimizer,
        schedule,
        extra_fingerprint,
        |l| crate::models::albert::seeded_params(l, seed),
        device,
    )
}

/// A SwAV trainer on backend `B`, starting from [`crate::models::swav::seeded_params`] of
/// `seed`. The model's configuration is part of its fingerprint.
fn swav_on<B>(
    cfg: &crate::models::swav::SwavConfig,
    optimizer: OptimizerConfig,
    schedule: Schedule,
    extra_fingerprint: &[u8],
    seed: u64,
    how: crate::models::resnet::ConvImpl,
    device: B::Device,
) -> Result<SwavTrainer, TrainError>
where
    B: AutodiffBackend,
    B::Device: Send,
{
    let mut extra = extra_fingerprint.to_vec();
    extra.extend(serde_json::to_vec(cfg).unwrap_or_default());
    boxed_on::<B, _>(
        cfg.init::<B>(how, &device),
        optimizer,
        schedule,
        &extra,
        |l| crate::models::swav::seeded_params(l, seed),
        device,
    )
}

/// A CPU (ndarray) SwAV trainer.
pub fn swav_cpu(
    cfg: &crate::models::swav::SwavConfig,
    optimizer: OptimizerConfig,
    schedule: Schedule,
    extra_fingerprint: &[u8],
    seed: u64,
) -> Result<SwavTrainer, TrainError> {
    swav_on::<crate::backend::CpuTrain>(
        cfg,
        optimizer,
        schedule,
        extra_fingerprint,
        seed,
        crate::models::resnet::ConvImpl::Im2col,
        Default::default(),
    )
}

/// A GPU (burn-cuda) SwAV trainer on CUDA device `index`.
#[cfg(feature = "cuda")]
pub fn swav_cuda(
    cfg: &crate::models::swav::SwavConfig,
    optimizer: OptimizerConfig,
    schedule: Schedule,
    extra_fingerprint: &[u8],
    seed: u64,
    index: usize,
) -> Result<SwavTrainer, TrainError> {
    swav_on::<crate::backend::CudaTrain>(
        cfg,
        optimizer,
        schedule,
        extra_fingerprint,
        seed,
        crate::models::resnet::ConvImpl::for_cuda(),
        burn::backend::cuda::CudaDevice::new(index),
    )
}

/// A CPU (ndarray) ALBERT trainer.
pub fn albert_cpu(
    cfg: &crate::models::albert::AlbertConfig,
    optimizer: OptimizerConfig,
    schedule: Schedule,
    extra_fingerprint: &[u8],
    seed: u64,
) -> Result<AlbertTrainer, TrainError> {
    albert_on::<crate::backend::CpuTrain>(
        cfg,
        optimizer,
        schedule,
        extra_fingerprint,
        seed,
        Default::default(),
    )
}

/// A GPU (burn-cuda) ALBERT trainer on CUDA device `index`. Check
/// [`crate::backend::cuda_available`] first: burn-cuda panics without a driver.
#[cfg(feature = "cuda")]
pub fn albert_cuda(
    cfg: &crate::models::albert::AlbertConfig,
    optimizer: OptimizerConfig,
    schedule: Schedule,
    extra_fingerprint: &[u8],
    seed: u64,
    index: usize,
) -> Result<AlbertTrainer, TrainError> {
    albert_on::<crate::backend::CudaTrain>(
        cfg,
        optimizer,
        schedule,
        extra_fingerprint,
        seed,
        burn::backend::cuda::CudaDevice::new(index),
    )
}
