//! A deeper editable block: the body's last linear layer *and* the head, edited together.
//!
//! The head-only editor's closed form does not carry over (the features move with the edit),
//! so the editor takes autodiff gradients of the edit loss with respect to the four tensors and
//! steps with the Polyak step size `(loss + (lr − 1)·margin) / ‖g‖²` (for the head alone this is
//! exactly the line search of [`super::editor`]). Editable Training through it is first-order
//! (as MEND's `first_order` ENN and FOMAML): the edit's change is a constant added to the
//! parameters, so the meta-gradient flows through the edited forward pass but not through the
//! editor's own gradients (burn's autodiff is first-order only).

use burn::prelude::*;
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::backend::AutodiffBackend;

use super::editor::EditorConfig;
use super::net::{CLASSES, EditNet};

/// The block's tensors: `w1 [in, H]`, `b1 [H]`, `w2 [H, C]`, `b2 [C]` (burn layout).
#[derive(Clone, Debug)]
pub struct Block<B: Backend> {
    pub w1: Tensor<B, 2>,
    pub b1: Tensor<B, 1>,
    pub w2: Tensor<B, 2>,
    pub b2: Tensor<B, 1>,
}

impl<B: Backend> Block<B> {
    pub fn of(net: &EditNet<B>) -> Self {
        let d = net.head.weight.device();
        let bias = |b: &Option<burn::module::Param<Tensor<B, 1>>>, n: usize| match b {
            Some(b) => b.val(),
            None => Tensor::zeros([n], &d),
        };
        Self {
            w1: net.body.weight.val(),
            b1: bias(&net.body.bias, net.body.weight.dims()[1]),
            w2: net.head.weight.val(),
            b2: bias(&net.head.bias, CLASSES),
        }
    }

    /// Logits `[n, C]` from pre-features `[n, in]`.
    pub fn logits(&self, pre: Tensor<B, 2>) -> Tensor<B, 2> {
        let h = relu(pre.matmul(self.w1.clone()) + self.b1.clone().unsqueeze_dim(0));
        h.matmul(self.w2.clone()) + self.b2.clone().unsqueeze_dim(0)
    }

    pub fn add(&self, d: &Block<B>) -> Self {
        Self {
            w1: self.w1.clone() + d.w1.clone(),
            b1: self.b1.clone() + d.b1.clone(),
            w2: self.w2.clone() + d.w2.clone(),
            b2: self.b2.clone() + d.b2.clone(),
        }
    }
}

/// What one block edit did.
#[derive(Clone, Debug)]
pub struct BlockOutcome<B: Backend> {
    pub success: bool,
    pub steps: u32,
    /// The change to the block.
    pub delta: Block<B>,
}

fn margin_of(z: &[f32], t: usize) -> (f32, usize) {
    super::head::target_margin(z, t)
}

/// Edits `block` so that pre-features `pre` (`[1, in]`) are classified as `t`.
pub fn edit_block<B: AutodiffBackend>(
    block: &Block<B::InnerBackend>,
    pre: Tensor<B::InnerBackend, 2>,
    t: usize,
    cfg: &EditorConfig,
) -> BlockOutcome<B::InnerBackend> {
    let d = pre.device();
    let zeros = Block {
        w1: Tensor::zeros(block.w1.dims(), &d),
        b1: Tensor::zeros(block.b1.dims(), &d),
        w2: Tensor::zeros(block.w2.dims(), &d),
        b2: Tensor::zeros(block.b2.dims(), &d),
    };
    let mut delta = zeros;
    let mut steps = 0;
    loop {
        let cur = block.add(&delta);
        let z: Vec<f32> = cur.logits(pre.clone()).into_data().iter::<f32>().collect();
        let (m, j) = margin_of(&z, t);
        if m >= cfg.margin {
            return BlockOutcome {
                success: true,
                steps,
                delta,
            };
        }
        if steps >= cfg.max_steps {
            return BlockOutcome {
                success: false,
                steps,
                delta,
            };
        }
        steps += 1;
        // Gradient of the edit loss (margin + z_j − z_t) with respect to the four tensors.
        let w1 = Tensor::<B, 2>::from_inner(cur.w1).require_grad();
        let b1 = Tensor::<B, 1>::from_inner(cur.b1).require_grad();
        let w2 = Tensor::<B, 2>::from_inner(cur.w2).require_grad();
        let b2 = Tensor::<B, 1>::from_inner(cur.b2).require_grad();
        let p = Tensor::<B, 2>::from_inner(pre.clone());
        let h = relu(p.matmul(w1.clone()) + b1.clone().unsqueeze_dim(0));
        let z = h.matmul(w2.clone()) + b2.clone().unsqueeze_dim(0);
        let mut v = vec![0.0f32; CLASSES];
        v[j] += 1.0;
        v[t] -= 1.0;
        let sel = Tensor::<B, 2>::from_data(TensorData::new(v, [CLASSES, 1]), &d);
        let loss = z.matmul(sel).sum();
        let grads = loss.backward();
        let g = |x: Option<Tensor<B::InnerBackend, 2>>, like: &Tensor<B::InnerBackend, 2>| {
            x.unwrap_or_else(|| Tensor::zeros(like.dims(), &d))
        };
        let g1 = |x: Option<Tensor<B::InnerBackend, 1>>, n: usize| {
            x.unwrap_or_else(|| Tensor::zeros([n], &d))
        };
        let gw1 = g(w1.grad(&grads), &block.w1);
        let gb1 = g1(b1.grad(&grads), block.b1.dims()[0]);
        let gw2 = g(w2.grad(&grads), &block.w2);
        let gb2 = g1(b2.grad(&grads), CLASSES);
        let norm: f32 = [
            gw1.clone().powi_scalar(2).sum(),
            gb1.clone().powi_scalar(2).sum(),
            gw2.clone().powi_scalar(2).sum(),
            gb2.clone().powi_scalar(2).sum(),
        ]
        .into_iter()
        .map(|x| x.into_scalar().elem::<f32>())
        .sum();
        // Polyak step: lift the target (lr − 1)·margin past the margin, were the loss linear.
        let eta = (cfg.margin - m + (cfg.lr - 1.0) * cfg.margin).max(0.0) / norm.max(1e-12);
        delta = Block {
            w1: delta.w1 - gw1 * eta,
            b1: delta.b1 - gb1 * eta,
            w2: delta.w2 - gw2 * eta,
            b2: delta.b2 - gb2 * eta,
        };
    }
}

/// First-order Editable Training terms for the block: the edit loss after the edit and
/// `KL(p ‖ p_edited)` on the batch pre-features `pre_b`, with the edit's change a constant.
pub fn block_edit_terms<B: AutodiffBackend>(
    net: &EditNet<B>,
    pre_e: Tensor<B, 2>,
    pre_b: Tensor<B, 2>,
    t: usize,
    cfg: &EditorConfig,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let block = Block::of(net);
    let inner = Block {
        w1: block.w1.clone().inner(),
        b1: block.b1.clone().inner(),
        w2: block.w2.clone().inner(),
        b2: block.b2.clone().inner(),
    };
    let out = edit_block::<B>(&inner, pre_e.clone().inner(), t, cfg);
    let c = Block {
        w1: Tensor::<B, 2>::from_inner(out.delta.w1),
        b1: Tensor::<B, 1>::from_inner(out.delta.b1),
        w2: Tensor::<B, 2>::from_inner(out.delta.w2),
        b2: Tensor::<B, 1>::from_inner(out.delta.b2),
    };
    let edited = block.add(&c);
    let ze = edited.logits(pre_e);
    let zv: Vec<f32> = ze.clone().into_data().iter::<f32>().collect();
    let (_, j) = margin_of(&zv, t);
    let mut v = vec![0.0f32; CLASSES];
    v[j] += 1.0;
    v[t] -= 1.0;
    let sel = Tensor::<B, 2>::from_data(TensorData::new(v, [CLASSES, 1]), &ze.device());
    let edit_loss = relu(ze.matmul(sel).reshape([1]) + cfg.margin);
    let lp = log_softmax(block.logits(pre_b.clone()).detach(), 1);
    let loc = (lp.clone().exp() * (lp - log_softmax(edited.logits(pre_b), 1)))
        .sum_dim(1)
        .mean();
    (edit_loss, loc)
}

/// The paper's metrics for block edits (`edits` independent edits of test images to wrong
/// labels): success rate, mean steps, drawdown on the images not edited.
pub fn evaluate_block<B: AutodiffBackend>(
    net: &EditNet<B::InnerBackend>,
    pixels: &[f32],
    labels: &[usize],
    cfg: &EditorConfig,
    edits: usize,
    seed: u64,
) -> super::eval::EditStats {
    let d = net.head.weight.device();
    let pre = net.pre_features(super::net::images::<B::InnerBackend>(pixels, &d));
    let block = Block::of(net);
    let error = |b: &Block<B::InnerBackend>, skip: usize| -> f64 {
        let pred = b.logits(pre.clone()).argmax(1).into_data();
        let (mut wrong, mut n) = (0, 0);
        for (k, (p, y)) in pred.iter::<i64>().zip(labels).enumerate() {
            if k != skip {
                n += 1;
                wrong += usize::from(p as usize != *y);
            }
        }
        wrong as f64 / n.max(1) as f64
    };
    let reqs = super::eval::edit_requests(labels, edits, seed);
    let (mut ok, mut steps, mut dd) = (0, 0u64, 0.0);
    let n_in = pre.dims()[1];
    for &(i, t) in &reqs {
        let p = pre.clone().slice([i..i + 1, 0..n_in]);
        let out = edit_block::<B>(&block, p, t, cfg);
        ok += usize::from(out.success);
        steps += u64::from(out.steps);
        dd += error(&block.add(&out.delta), i) - error(&block, i);
    }
    let n = edits.max(1) as f32;
    super::eval::EditStats {
        edits,
        base_error: error(&block, usize::MAX) as f32,
        success_rate: ok as f32 / n,
        mean_steps: steps as f32 / n,
        drawdown: (dd / edits.max(1) as f64) as f32,
        ..Default::default()
    }
}
