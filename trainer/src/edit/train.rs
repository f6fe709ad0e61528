//! Baseline and Editable Training of the digits classifiers.
//!
//! Editable Training minimises `L_base + c_edit·L_edit + c_loc·L_loc` per batch, with one edit
//! per batch (a training image and a random wrong label):
//! - the editor runs on detached values first (plain f32, [`super::editor::edit`]) to find the
//!   runner-up class of every step;
//! - the same steps are then replayed as tensor operations: the head's gradient at step k is
//!   `h_eᵀ (e_{j_k} − e_t)` with `h_e` the edit sample's features *in the graph*, so the edited
//!   head `W' = W + ΔW(h_e, W)` is an ordinary differentiable function of the body and the head
//!   and burn's first-order autodiff gives the exact meta-gradient (the contrastive loss is
//!   piecewise linear in the logits, so no second derivative of it is lost);
//! - `L_edit` is the edit loss after the edit, `L_loc` the cross-entropy of the edited model's
//!   predictions on the batch from the unedited model's (detached) ones, `KL(p ‖ p_edited)`.

use burn::module::AutodiffModule;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::backend::AutodiffBackend;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::editor::{EditorConfig, EditorKind, edit};
use super::net::{Arch, CLASSES, EditNet, INPUTS, images};
use crate::data::images::ImageSet;

/// Labelled images as plain rows on the 0–1 scale.
#[derive(Clone, Debug, PartialEq)]
pub struct Digits {
    pub pixels: Vec<f32>,
    pub labels: Vec<usize>,
}

impl Digits {
    /// The labelled 8×8 single-channel images of `set`.
    pub fn from_set(set: &ImageSet) -> Result<Self, String> {
        if set.channels != 1 || set.size != 8 {
            return Err(format!(
                "want 8x8 single-channel images, got {}x{} with {} channels",
                set.size, set.size, set.channels
            ));
        }
        let mut pixels = Vec::with_capacity(set.len() * INPUTS);
        let mut labels = Vec::with_capacity(set.len());
        for i in 0..set.len() {
            let Some(y) = set.labels[i] else {
                return Err(format!("image {i} has no label"));
            };
            if y as usize >= CLASSES {
                return Err(format!("image {i} has label {y}, want 0..{CLASSES}"));
            }
            pixels.extend(set.image(i).iter().map(|&p| f32::from(p) / 255.0));
            labels.push(y as usize);
        }
        Ok(Self { pixels, labels })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[f32] {
        &self.pixels[i * INPUTS..(i + 1) * INPUTS]
    }

    pub fn subset(&self, idx: &[usize]) -> Self {
        Self {
            pixels: idx.iter().flat_map(|&i| self.image(i).to_vec()).collect(),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// A seeded split into (train, test) with `test_fraction` of the images in the test part.
    pub fn split(&self, seed: u64, test_fraction: f32) -> (Self, Self) {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let n_test = (self.len() as f32 * test_fraction).round() as usize;
        (self.subset(&idx[n_test..]), self.subset(&idx[..n_test]))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Baseline,
    Editable,
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::Editable => "editable",
        }
    }
    pub fn named(s: &str) -> Option<Self> {
        match s {
            "baseline" => Some(Self::Baseline),
            "editable" => Some(Self::Editable),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct TrainConfig {
    pub arch: Arch,
    pub mode: Mode,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
    pub c_edit: f32,
    pub c_loc: f32,
    pub editor: EditorConfig,
    /// Edit the body's last layer with the head ([`super::block`], first-order meta-gradient)
    /// instead of the head alone (exact).
    pub block: bool,
}

impl TrainConfig {
    pub fn new(arch: Arch, mode: Mode) -> Self {
        Self {
            arch,
            mode,
            epochs: 30,
            batch: 32,
            lr: 2e-3,
            seed: 1,
            c_edit: 1.0,
            c_loc: 1.0,
            editor: EditorConfig::default(),
            block: false,
        }
    }
}

/// What training measured (last epoch's means).
#[derive(Clone, Debug, Default)]
pub struct TrainReport {
    pub base_loss: f32,
    pub edit_loss: f32,
    pub loc_loss: f32,
}

/// Trains a classifier on `data`; returns it on the inner (non-autodiff) backend.
pub fn train<B: AutodiffBackend>(
    cfg: &TrainConfig,
    data: &Digits,
    device: &B::Device,
) -> (EditNet<B::InnerBackend>, TrainReport) {
    B::seed(device, cfg.seed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut net = EditNet::<B>::new(cfg.arch, device);
    let mut opt = AdamConfig::new().init::<B, EditNet<B>>();
    let mut report = TrainReport::default();
    let mut order: Vec<usize> = (0..data.len()).collect();
    for _epoch in 0..cfg.epochs {
        order.shuffle(&mut rng);
        let (mut sb, mut se, mut sl, mut n) = (0.0, 0.0, 0.0, 0.0);
        for chunk in order.chunks(cfg.batch) {
            let px: Vec<f32> = chunk.iter().flat_map(|&i| data.image(i).to_vec()).collect();
            let ys: Vec<i64> = chunk.iter().map(|&i| data.labels[i] as i64).collect();
            let x = images::<B>(&px, device);
            let y = Tensor::<B, 1, Int>::from_data(TensorData::new(ys, [chunk.len()]), device);
            let h = net.features(x);
            let logits = net.head.forward(h.clone());
            let base = cross_entropy(logits.clone(), y);
            let mut loss = base.clone();
            sb += scalar(&base);
            if cfg.mode == Mode::Editable {
                let i = rng.gen_range(0..data.len());
                let t = (data.labels[i] + rng.gen_range(1..CLASSES)) % CLASSES;
                let (edit_loss, loc) = if cfg.block {
                    let pre_e = net.pre_features(images::<B>(data.image(i), device));
                    let pre_b = net.pre_features(images::<B>(&px, device));
                    super::block::block_edit_terms(&net, pre_e, pre_b, t, &cfg.editor)
                } else {
                    editable_terms(&net, data.image(i), t, h, &cfg.editor, device)
                };
                se += scalar(&edit_loss);
                sl += scalar(&loc);
                loss = loss + edit_loss * cfg.c_edit + loc * cfg.c_loc;
            }
            n += 1.0;
            let grads = GradientsParams::from_grads(loss.backward(), &net);
            net = opt.step(cfg.lr, net, grads);
        }
        report = TrainReport {
            base_loss: sb / n,
            edit_loss: se / n,
            loc_loss: sl / n,
        };
    }
    (net.valid(), report)
}

fn scalar<B: Backend>(t: &Tensor<B, 1>) -> f32 {
    t.clone()
        .into_data()
        .iter::<f32>()
        .next()
        .unwrap_or(f32::NAN)
}

fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, y: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let n = y.dims()[0];
    -log_softmax(logits, 1).gather(1, y.reshape([n, 1])).mean()
}

/// The edit loss after editing on (`x`, `t`), and the locality loss on the batch (features
/// `h`), both differentiable through the edit.
fn editable_terms<B: AutodiffBackend>(
    net: &EditNet<B>,
    x: &[f32],
    t: usize,
    h: Tensor<B, 2>,
    ed: &EditorConfig,
    device: &B::Device,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let he = net.features(images::<B>(x, device)); // [1, H]
    let b = match &net.head.bias {
        Some(b) => b.val(),
        None => Tensor::zeros([CLASSES], device),
    };
    head_edit_terms(he, h, net.head.weight.val(), b, t, ed, device)
}

/// Editable Training's two extra terms for a linear head `z = h·w + b` (burn layout: `w` is
/// `[in, out]`): the edit loss after editing features `he` (`[1, in]`) to class `t`, and
/// `KL(p ‖ p_edited)` on the batch features `hb` (`[n, in]`), the unedited side detached.
///
/// The editor runs first on detached values (plain f32) to find each step's runner-up; the
/// same steps are then replayed as tensor operations, so the edited head is a differentiable
/// function of `he`, `w` and `b` and the meta-gradient through the edit is exact.
pub fn head_edit_terms<B: Backend>(
    he: Tensor<B, 2>,
    hb: Tensor<B, 2>,
    w: Tensor<B, 2>,
    b: Tensor<B, 1>,
    t: usize,
    ed: &EditorConfig,
    device: &B::Device,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [inp, out] = w.dims();
    let plain = super::head::Head::new(
        out,
        inp,
        w.clone().transpose().into_data().iter::<f32>().collect(),
        b.clone().into_data().iter::<f32>().collect(),
    );
    let he_plain: Vec<f32> = he.clone().into_data().iter::<f32>().collect();
    let outcome = edit(&plain, &he_plain, t, ed);
    let one_hot_diff = |j: usize| -> Tensor<B, 2> {
        let mut v = vec![0.0f32; out];
        v[j] += 1.0;
        v[t] -= 1.0;
        Tensor::from_data(TensorData::new(v, [1, out]), device)
    };
    let mut dw = Tensor::<B, 2>::zeros([inp, out], device);
    let mut db = Tensor::<B, 1>::zeros([out], device);
    let (mut mw, mut mb) = (dw.clone(), db.clone());
    for (k, &j) in outcome.runner_ups.iter().enumerate() {
        let delta = one_hot_diff(j);
        let gw = he.clone().transpose().matmul(delta.clone());
        let gb = delta.clone().reshape([out]);
        match ed.kind {
            EditorKind::Sgd => {
                dw = dw - gw * ed.lr;
                db = db - gb * ed.lr;
            }
            EditorKind::LineSearch => {
                // The step that lifts the target lr × margin above this runner-up, from the
                // logits of the current (in-graph) edited head.
                let z = he.clone().matmul(w.clone() + dw.clone())
                    + (b.clone() + db.clone()).unsqueeze_dim(0);
                let gap = z.matmul(delta.clone().transpose()).reshape([1]); // z_j − z_t
                let hh = he.clone().powi_scalar(2).sum() + 1.0;
                let s = (gap + ed.lr * ed.margin) / (hh * 2.0);
                dw = dw - gw * s.clone().unsqueeze_dim(0);
                db = db - gb * s;
            }
            EditorKind::Scaled => {
                // lr / (h·h + 1), with h in the graph.
                let s = (he.clone().powi_scalar(2).sum() + 1.0).recip() * ed.lr;
                dw = dw - gw * s.clone().unsqueeze_dim(0);
                db = db - gb * s;
            }
            EditorKind::Momentum { momentum } => {
                mw = mw * momentum + gw;
                mb = mb * momentum + gb;
                dw = dw - mw.clone() * ed.lr;
                db = db - mb.clone() * ed.lr;
            }
            EditorKind::RmsProp { beta, eps } => {
                if k == 0 {
                    mw = gw.clone().powi_scalar(2);
                    mb = gb.clone().powi_scalar(2);
                } else {
                    mw = mw * beta + gw.clone().powi_scalar(2) * (1.0 - beta);
                    mb = mb * beta + gb.clone().powi_scalar(2) * (1.0 - beta);
                }
                dw = dw - gw / (mw.clone() + eps).sqrt() * ed.lr;
                db = db - gb / (mb.clone() + eps).sqrt() * ed.lr;
            }
        }
    }
    let logits = hb.clone().matmul(w.clone()) + b.clone().unsqueeze_dim(0);
    let w2 = w + dw;
    let b2 = b + db;
    // Edit loss at the end: relu(margin + z_j − z_t) with j the final runner-up.
    let ze = he.matmul(w2.clone()) + b2.clone().unsqueeze_dim(0);
    let (_, j) = {
        let z: Vec<f32> = ze.clone().into_data().iter::<f32>().collect();
        super::head::target_margin(&z, t)
    };
    let gap = ze.matmul(one_hot_diff(j).transpose()).reshape([1]);
    let edit_loss = relu(gap + ed.margin);
    // Locality: KL(unedited ‖ edited) on the batch, the unedited side detached.
    let edited = hb.matmul(w2) + b2.unsqueeze_dim(0);
    let lp = log_softmax(logits.detach(), 1);
    let loc = (lp.clone().exp() * (lp - log_softmax(edited, 1)))
        .sum_dim(1)
        .mean();
    (edit_loss, loc)
}
