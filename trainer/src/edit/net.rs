//! The editable classifiers for 8×8 digits: a body that maps an image to features `h`, and a
//! linear head `z = W h + b` that edits change. Two bodies: an MLP (64→128, ReLU) and a small
//! CNN (two 3×3 convolutions, the second with stride 2, then 512→128, ReLU).

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;
use serde::{Deserialize, Serialize};

use super::head::Head;

/// Pixels per image, classes.
pub const INPUTS: usize = 64;
pub const CLASSES: usize = 10;
/// Feature width (the head's inputs).
pub const HIDDEN: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    Mlp,
    Cnn,
}

impl Arch {
    pub fn named(s: &str) -> Option<Self> {
        match s {
            "mlp" => Some(Self::Mlp),
            "cnn" => Some(Self::Cnn),
            _ => None,
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Self::Mlp => "mlp",
            Self::Cnn => "cnn",
        }
    }
}

#[derive(Module, Debug)]
pub struct EditNet<B: Backend> {
    conv1: Option<Conv2d<B>>,
    conv2: Option<Conv2d<B>>,
    pub body: Linear<B>,
    pub head: Linear<B>,
}

impl<B: Backend> EditNet<B> {
    pub fn new(arch: Arch, device: &B::Device) -> Self {
        match arch {
            Arch::Mlp => Self {
                conv1: None,
                conv2: None,
                body: LinearConfig::new(INPUTS, HIDDEN).init(device),
                head: LinearConfig::new(HIDDEN, CLASSES).init(device),
            },
            Arch::Cnn => Self {
                conv1: Some(
                    Conv2dConfig::new([1, 16], [3, 3])
                        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                        .init(device),
                ),
                conv2: Some(
                    Conv2dConfig::new([16, 32], [3, 3])
                        .with_stride([2, 2])
                        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                        .init(device),
                ),
                body: LinearConfig::new(32 * 4 * 4, HIDDEN).init(device),
                head: LinearConfig::new(HIDDEN, CLASSES).init(device),
            },
        }
    }

    pub fn arch(&self) -> Arch {
        if self.conv1.is_some() {
            Arch::Cnn
        } else {
            Arch::Mlp
        }
    }

    /// Features `[n, HIDDEN]` of images `[n, 64]` (pixels on the 0–1 scale).
    pub fn features(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        relu(self.body.forward(self.pre_features(x)))
    }

    /// The input of the body's last linear layer: the images themselves for the MLP, the
    /// flattened convolution output for the CNN.
    pub fn pre_features(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match (&self.conv1, &self.conv2) {
            (Some(c1), Some(c2)) => {
                let n = x.dims()[0];
                let y = relu(c1.forward(x.reshape([n, 1, 8, 8])));
                relu(c2.forward(y)).reshape([n, 32 * 4 * 4])
            }
            _ => x,
        }
    }

    /// Logits `[n, CLASSES]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.head.forward(self.features(x))
    }

    /// The head as plain f32 (`W` is `out × in`; burn stores it `in × out`).
    pub fn plain_head(&self) -> Head {
        let w = self.head.weight.val(); // [in, out]
        let w: Vec<f32> = w.transpose().into_data().iter::<f32>().collect();
        let b: Vec<f32> = match &self.head.bias {
            Some(b) => b.val().into_data().iter::<f32>().collect(),
            None => vec![0.0; CLASSES],
        };
        Head::new(CLASSES, HIDDEN, w, b)
    }
}

/// Images as a `[n, 64]` tensor on the 0–1 scale.
pub fn images<B: Backend>(pixels: &[f32], device: &B::Device) -> Tensor<B, 2> {
    let n = pixels.len() / INPUTS;
    Tensor::from_data(TensorData::new(pixels.to_vec(), [n, INPUTS]), device)
}

/// Features of many images as plain rows (`n × HIDDEN`), computed in chunks.
pub fn features_of<B: Backend>(net: &EditNet<B>, pixels: &[f32], device: &B::Device) -> Vec<f32> {
    let mut out = Vec::with_capacity(pixels.len() / INPUTS * HIDDEN);
    for chunk in pixels.chunks(INPUTS * 512) {
        let f = net.features(images::<B>(chunk, device));
        out.extend(f.into_data().iter::<f32>());
    }
    out
}
