//! SwAV (Caron et al. 2020): a ResNet backbone, a projection head (linear, batch norm, ReLU,
//! linear) onto the unit sphere, and prototypes (a bias-free linear layer whose columns are kept
//! unit-norm). Codes for the global crops come from the Sinkhorn-Knopp algorithm on their
//! prototype scores (equal partition of the batch among the prototypes); every other view
//! predicts them ("swapped prediction"): loss = −Σ q·log softmax(scores/τ).
//!
//! Codes are computed over the micro-batch a peer holds (SwAV computes them over one GPU's share
//! and sums the Sinkhorn marginals across GPUs; here a micro-batch is the unit, so a run's result
//! depends on its micro-batch size, not on how micro-batches are spread over peers).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::prelude::Backend;
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::resnet::{BatchNorm, ConvImpl, ResNet, ResNetConfig};
use crate::data::images::SwavBatch;
use crate::params::Layout;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwavConfig {
    pub backbone: ResNetConfig,
    /// Width of the projection head's hidden layer.
    pub hidden: usize,
    /// Width of the projected (unit-norm) features.
    pub out_dim: usize,
    pub prototypes: usize,
    /// τ of the swapped prediction's softmax.
    pub temperature: f64,
    /// ε of the Sinkhorn-Knopp codes.
    pub epsilon: f64,
    pub sinkhorn_iters: usize,
    /// Global steps during which the prototypes stay fixed (SwAV: the first epoch).
    pub freeze_prototypes_steps: u64,
}

impl SwavConfig {
    /// The paper's head on a ResNet: 2048 hidden, 128 out, 3000 prototypes, τ 0.1, ε 0.05,
    /// 3 Sinkhorn iterations, prototypes frozen for the first 313 steps (one ImageNet epoch at
    /// batch 4096).
    pub fn on(backbone: ResNetConfig) -> Self {
        Self {
            backbone,
            hidden: 2048,
            out_dim: 128,
            prototypes: 3000,
            temperature: 0.1,
            epsilon: 0.05,
            sinkhorn_iters: 3,
            freeze_prototypes_steps: 313,
        }
    }

    /// `small` (digits on a CPU: 128 hidden, 32 out, 100 prototypes, frozen for 50 steps),
    /// `resnet18`, `resnet50`.
    pub fn named(name: &str, in_channels: usize) -> Option<Self> {
        let backbone = ResNetConfig::named(name, in_channels)?;
        Some(if name == "small" {
            Self {
                hidden: 128,
                out_dim: 32,
                prototypes: 100,
                freeze_prototypes_steps: 50,
                ..Self::on(backbone)
            }
        } else {
            Self::on(backbone)
        })
    }

    pub fn init<B: Backend>(&self, how: ConvImpl, device: &B::Device) -> Swav<B> {
        let f = self.backbone.features();
        Swav {
            backbone: self.backbone.init(how, device),
            proj_in: LinearConfig::new(f, self.hidden).init(device),
            proj_bn: BatchNorm::new(self.hidden, device),
            proj_out: LinearConfig::new(self.hidden, self.out_dim).init(device),
            prototypes: LinearConfig::new(self.out_dim, self.prototypes)
                .with_bias(false)
                .init(device),
            temperature: self.temperature,
            epsilon: self.epsilon,
            sinkhorn_iters: self.sinkhorn_iters,
            freeze_prototypes_steps: self.freeze_prototypes_steps,
        }
    }
}

#[derive(Module, Debug)]
pub struct Swav<B: Backend> {
    backbone: ResNet<B>,
    proj_in: Linear<B>,
    proj_bn: BatchNorm<B>,
    proj_out: Linear<B>,
    prototypes: Linear<B>,
    temperature: f64,
    epsilon: f64,
    sinkhorn_iters: usize,
    freeze_prototypes_steps: u64,
}

/// The flat path of the prototype matrix ([out_dim, prototypes]; a prototype is a column).
pub const PROTOTYPES: &str = "prototypes.weight";

/// What one forward pass gives.
#[derive(Debug)]
pub struct SwavOutput<B: Backend> {
    /// Mean over the global views of the swapped-prediction loss, each averaged over the
    /// batch and the other views.
    pub loss: Tensor<B, 1>,
}

impl<B: Backend> Swav<B> {
    /// Backbone features of one crop group's images: [views·batch, F].
    pub fn features(&self, batch: &SwavBatch, group: usize, device: &B::Device) -> Tensor<B, 2> {
        let g = &batch.groups[group];
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(
                g.data.clone(),
                [g.views * batch.batch, batch.channels, g.size, g.size],
            ),
            device,
        );
        self.backbone.forward(x)
    }

    /// Prototype scores of every view, view-major: [V·batch, prototypes].
    pub fn scores(&self, batch: &SwavBatch, device: &B::Device) -> Tensor<B, 2> {
        let feats: Vec<Tensor<B, 2>> = (0..batch.groups.len())
            .map(|g| self.features(batch, g, device))
            .collect();
        let h = Tensor::cat(feats, 0);
        let h = relu(self.proj_bn.forward2(self.proj_in.forward(h)));
        let z = self.proj_out.forward(h);
        let norm = z.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
        self.prototypes.forward(z / norm)
    }

    pub fn forward_loss(&self, batch: &SwavBatch, device: &B::Device) -> SwavOutput<B> {
        let n = batch.batch;
        let views = batch.views();
        let global = batch.groups.first().map_or(0, |g| g.views);
        let scores = self.scores(batch, device);
        let k = scores.dims()[1];
        let logp = log_softmax(scores.clone() / self.temperature, 1).reshape([views, n, k]);
        // Σ over all views of log p; for assignment view i the others are that minus view i.
        let all = logp.clone().sum_dim(0).reshape([n, k]);
        let mut loss: Option<Tensor<B, 1>> = None;
        for i in 0..global {
            let s = scores.clone().slice([i * n..(i + 1) * n, 0..k]).detach();
            let q = sinkhorn(s, self.epsilon, self.sinkhorn_iters);
            let others = all.clone() - logp.clone().slice([i..i + 1, 0..n, 0..k]).reshape([n, k]);
            let term = (q * others).sum().neg() / (n * (views - 1)) as f64;
            loss = Some(match loss {
                Some(l) => l + term,
                None => term,
            });
        }
        let loss = loss.unwrap_or_else(|| Tensor::zeros([1], device)) / global.max(1) as f64;
        SwavOutput { loss }
    }

    pub fn freeze_prototypes_steps(&self) -> u64 {
        self.freeze_prototypes_steps
    }
}

/// Sinkhorn-Knopp codes for scores [B, K]: Q ∝ exp(scores/ε) rescaled alternately so that each
/// prototype gets 1/K of the mass and each sample 1/B; returned with rows summing to 1.
pub fn sinkhorn<B: Backend>(scores: Tensor<B, 2>, epsilon: f64, iters: usize) -> Tensor<B, 2> {
    let [b, k] = scores.dims();
    // The global normalisation makes Q independent of a constant shift: subtract the maximum.
    let max = scores.clone().max().reshape([1, 1]);
    let q = ((scores - max) / epsilon).exp();
    let mut q = q.clone() / q.sum().reshape([1, 1]);
    for _ in 0..iters {
        q = q.clone() / (q.clone().sum_dim(0) * k as f64);
        q = q.clone() / (q.clone().sum_dim(1) * b as f64);
    }
    q * b as f64
}

/// Unit-normalises each prototype (a column of the [out_dim, prototypes] matrix) in the flat
/// vector, as SwAV does before every step.
pub fn normalize_prototypes(layout: &Layout, params: &mut [f32]) {
    let Some(seg) = layout.segments.iter().find(|s| s.path == PROTOTYPES) else {
        return;
    };
    let [d, k] = [seg.shape[0], seg.shape[1]];
    let w = &mut params[seg.offset..seg.offset + seg.len];
    for col in 0..k {
        let n = (0..d)
            .map(|r| f64::from(w[r * k + col]).powi(2))
            .sum::<f64>()
            .sqrt();
        if n > 0.0 {
            (0..d).for_each(|r| w[r * k + col] = (f64::from(w[r * k + col]) / n) as f32);
        }
    }
}

/// SwAV's initialisation from `seed` (see [`super::resnet::seeded_params`]), prototypes
/// unit-norm.
pub fn seeded_params(layout: &Layout, seed: u64) -> Vec<f32> {
    let mut p = super::resnet::seeded_params(layout, seed);
    normalize_prototypes(layout, &mut p);
    p
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::Cpu;

    /// SwAV's algorithm in f64 on plain vectors, written from the paper's listing.
    fn sinkhorn_oracle(scores: &[Vec<f64>], eps: f64, iters: usize) -> Vec<Vec<f64>> {
        let (b, k) = (scores.len(), scores[0].len());
        // Q is K×B.
        let mut q: Vec<Vec<f64>> = (0..k)
            .map(|j| (0..b).map(|i| (scores[i][j] / eps).exp()).collect())
            .collect();
        let total: f64 = q.iter().flatten().sum();
        q.iter_mut().flatten().for_each(|x| *x /= total);
        for _ in 0..iters {
            for row in q.iter_mut() {
                let s: f64 = row.iter().sum();
                row.iter_mut().for_each(|x| *x /= s * k as f64);
            }
            let col_sums: Vec<f64> = (0..b).map(|i| q.iter().map(|row| row[i]).sum()).collect();
            for row in q.iter_mut() {
                for (x, s) in row.iter_mut().zip(&col_sums) {
                    *x /= s * b as f64;
                }
            }
        }
        (0..b)
            .map(|i| (0..k).map(|j| q[j][i] * b as f64).collect())
            .collect()
    }

    #[test]
    fn sinkhorn_matches_the_oracle_and_equipartitions() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (b, k) = (12, 5);
        let s: Vec<Vec<f64>> = (0..b)
            .map(|_| (0..k).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect();
        let want = sinkhorn_oracle(&s, 0.05, 3);
        let d = Default::default();
        let flat: Vec<f32> = s.iter().flatten().map(|&x| x as f32).collect();
        let t = Tensor::<Cpu, 2>::from_data(TensorData::new(flat, [b, k]), &d);
        let got = sinkhorn(t, 0.05, 3).into_data().to_vec::<f32>().unwrap();
        for i in 0..b {
            for j in 0..k {
                let (g, w) = (f64::from(got[i * k + j]), want[i][j]);
                assert!(
                    (g - w).abs() < 1e-4 * w.abs().max(1.0),
                    "{i},{j}: {g} vs {w}"
                );
            }
            // each sample's code is a distribution
            let row: f64 = (0..k).map(|j| f64::from(got[i * k + j])).sum();
            assert!((row - 1.0).abs() < 1e-4);
        }
        // and after enough iterations each prototype gets an equal share of the batch
        let t = Tensor::<Cpu, 2>::from_data(
            TensorData::new(s.iter().flatten().map(|&x| x as f32).collect(), [b, k]),
            &d,
        );
        let q = sinkhorn(t, 0.5, 50).into_data().to_vec::<f32>().unwrap();
        for j in 0..k {
            let col: f32 = (0..b).map(|i| q[i * k + j]).sum();
            assert!((col - b as f32 / k as f32).abs() < 1e-3, "{col}");
        }
    }

    #[test]
    fn prototypes_are_unit_columns() {
        let d = Default::default();
        let cfg = SwavConfig::named("small", 1).unwrap();
        let layout = Layout::of(&cfg.init::<Cpu>(ConvImpl::Im2col, &d));
        let p = seeded_params(&layout, 9);
        let seg = layout
            .segments
            .iter()
            .find(|s| s.path == PROTOTYPES)
            .unwrap();
        assert_eq!(seg.shape, vec![32, 100]);
        for col in 0..100 {
            let n: f32 = (0..32)
                .map(|r| p[seg.offset + r * 100 + col].powi(2))
                .sum::<f32>();
            assert!((n - 1.0).abs() < 1e-5);
        }
    }
}
