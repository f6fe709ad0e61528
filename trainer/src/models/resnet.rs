//! ResNet backbones (He et al. 2016) for SwAV: `resnet18` and `resnet50` as in the paper (7×7
//! stem with max-pool, four stages), and `small`, a three-stage CIFAR-style net with a 3×3 stem
//! that trains on a 2-core CPU.
//!
//! Batch normalisation here always normalises with the statistics of the batch it sees and keeps
//! no running averages: self-supervised pretraining only ever runs in that mode, and running
//! averages would be per-peer state outside the flat parameter vector that peers keep identical.
//! Features for evaluation are taken the same way, over a batch of images.

use burn::module::{Module, Param};
use burn::nn::PaddingConfig2d;
use burn::nn::pool::MaxPool2dConfig;
use burn::prelude::Backend;
use burn::tensor::activation::relu;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Slice, Tensor};
use serde::{Deserialize, Serialize};

/// How convolutions are computed. The parameters are the same either way (peers on different
/// backends train one model together).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvImpl {
    /// The backend's convolution (burn-cuda: implicit GEMM).
    #[default]
    Native,
    /// Patches gathered with slices, then one matrix product: burn-ndarray's own convolution
    /// computes the input gradient with a scalar loop (measured 15–65× slower than the
    /// forward pass), while slicing and matrix products have fast gradients there.
    Im2col,
}

impl ConvImpl {
    /// On burn-cuda: the backend's convolution, unless `COLONY_CONV=im2col` (same results;
    /// im2col was measured several times slower there, see BENCHMARKS.md).
    pub fn for_cuda() -> Self {
        match std::env::var("COLONY_CONV").as_deref() {
            Ok("im2col") => Self::Im2col,
            _ => Self::Native,
        }
    }
}

/// A bias-free k×k convolution with padding k/2, weight [out, in, k, k].
#[derive(Module, Debug)]
pub struct Conv<B: Backend> {
    pub weight: Param<Tensor<B, 4>>,
    stride: usize,
    im2col: bool,
}

impl<B: Backend> Conv<B> {
    pub fn new(
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        how: ConvImpl,
        device: &B::Device,
    ) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::zeros([out_c, in_c, k, k], device)),
            stride,
            im2col: how == ConvImpl::Im2col,
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let w = self.weight.val();
        let [o, c, k, _] = w.dims();
        let (s, p) = (self.stride, k / 2);
        if !self.im2col {
            return burn::tensor::module::conv2d(
                x,
                w,
                None,
                ConvOptions::new([s, s], [p, p], [1, 1], 1),
            );
        }
        let [n, _, h, wd] = x.dims();
        let (ho, wo) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
        let x = if p > 0 {
            x.pad((p, p, p, p), 0.0f32)
        } else {
            x
        };
        // [n, c, k·k, ho, wo]: tap (i, j) is the input shifted by (i, j), every s-th pixel.
        let taps: Vec<Tensor<B, 4>> = (0..k * k)
            .map(|t| {
                let (i, j) = ((t / k) as isize, (t % k) as isize);
                let (hs, ws) = ((s * (ho - 1) + 1) as isize, (s * (wo - 1) + 1) as isize);
                x.clone().slice([
                    Slice::from(..),
                    Slice::from(..),
                    Slice::new(i, Some(i + hs), s as isize),
                    Slice::new(j, Some(j + ws), s as isize),
                ])
            })
            .collect();
        let patches = Tensor::stack::<5>(taps, 2)
            .reshape([n, c * k * k, ho * wo])
            .swap_dims(1, 2)
            .reshape([n * ho * wo, c * k * k]);
        let wm = w.reshape([o, c * k * k]).transpose();
        patches
            .matmul(wm)
            .reshape([n, ho * wo, o])
            .swap_dims(1, 2)
            .reshape([n, o, ho, wo])
    }
}

/// Batch normalisation over every dimension but the channel one, with batch statistics.
#[derive(Module, Debug)]
pub struct BatchNorm<B: Backend> {
    pub gamma: Param<Tensor<B, 1>>,
    pub beta: Param<Tensor<B, 1>>,
    epsilon: f64,
}

impl<B: Backend> BatchNorm<B> {
    pub fn new(channels: usize, device: &B::Device) -> Self {
        Self {
            gamma: Param::from_tensor(Tensor::ones([channels], device)),
            beta: Param::from_tensor(Tensor::zeros([channels], device)),
            epsilon: 1e-5,
        }
    }

    /// `x`: [N, C, H, W].
    pub fn forward4(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let c = x.dims()[1];
        let mean = x.clone().mean_dim(0).mean_dim(2).mean_dim(3);
        let centered = x - mean;
        let var = centered
            .clone()
            .square()
            .mean_dim(0)
            .mean_dim(2)
            .mean_dim(3);
        let scale = self.gamma.val().reshape([1, c, 1, 1]) / (var + self.epsilon).sqrt();
        centered * scale + self.beta.val().reshape([1, c, 1, 1])
    }

    /// `x`: [N, C].
    pub fn forward2(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let c = x.dims()[1];
        let mean = x.clone().mean_dim(0);
        let centered = x - mean;
        let var = centered.clone().square().mean_dim(0);
        let scale = self.gamma.val().reshape([1, c]) / (var + self.epsilon).sqrt();
        centered * scale + self.beta.val().reshape([1, c])
    }
}

/// Which residual block a ResNet stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockKind {
    /// Two 3×3 convolutions (ResNet-18/34).
    Basic,
    /// 1×1 reduce, 3×3, 1×1 expand ×4 (ResNet-50 and deeper).
    Bottleneck,
}

/// The first layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stem {
    /// 7×7 stride-2 convolution and a 3×3 stride-2 max-pool (ImageNet-sized inputs).
    Imagenet,
    /// One 3×3 stride-1 convolution (small images: digits, CIFAR).
    Small,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResNetConfig {
    pub in_channels: usize,
    pub stem: Stem,
    pub block: BlockKind,
    /// Blocks per stage.
    pub depths: Vec<usize>,
    /// Inner width per stage (a bottleneck stage's output is 4× this).
    pub widths: Vec<usize>,
}

impl ResNetConfig {
    pub fn resnet18(in_channels: usize) -> Self {
        Self {
            in_channels,
            stem: Stem::Imagenet,
            block: BlockKind::Basic,
            depths: vec![2, 2, 2, 2],
            widths: vec![64, 128, 256, 512],
        }
    }
    pub fn resnet50(in_channels: usize) -> Self {
        Self {
            in_channels,
            stem: Stem::Imagenet,
            block: BlockKind::Bottleneck,
            depths: vec![3, 4, 6, 3],
            widths: vec![64, 128, 256, 512],
        }
    }
    /// Three stages of one basic block, widths 16/32/64: ~0.08 M parameters.
    pub fn small(in_channels: usize) -> Self {
        Self {
            in_channels,
            stem: Stem::Small,
            block: BlockKind::Basic,
            depths: vec![1, 1, 1],
            widths: vec![16, 32, 64],
        }
    }

    /// `resnet18`, `resnet50` or `small`.
    pub fn named(name: &str, in_channels: usize) -> Option<Self> {
        match name {
            "resnet18" => Some(Self::resnet18(in_channels)),
            "resnet50" => Some(Self::resnet50(in_channels)),
            "small" => Some(Self::small(in_channels)),
            _ => None,
        }
    }

    fn expansion(&self) -> usize {
        match self.block {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }

    /// Width of the pooled feature vector.
    pub fn features(&self) -> usize {
        self.widths.last().copied().unwrap_or(0) * self.expansion()
    }

    pub fn init<B: Backend>(&self, how: ConvImpl, device: &B::Device) -> ResNet<B> {
        let conv = |i, o, k, s, d: &B::Device| Conv::new(i, o, k, s, how, d);
        let stem_width = self.widths.first().copied().unwrap_or(16);
        let stem = match self.stem {
            Stem::Imagenet => conv(self.in_channels, stem_width, 7, 2, device),
            Stem::Small => conv(self.in_channels, stem_width, 3, 1, device),
        };
        let e = self.expansion();
        let mut in_c = stem_width;
        let mut blocks = Vec::new();
        for (stage, (&depth, &width)) in self.depths.iter().zip(&self.widths).enumerate() {
            for i in 0..depth {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let out_c = width * e;
                let down = (stride != 1 || in_c != out_c).then(|| Downsample {
                    conv: conv(in_c, out_c, 1, stride, device),
                    bn: BatchNorm::new(out_c, device),
                });
                let block = match self.block {
                    BlockKind::Basic => Block {
                        conv1: conv(in_c, width, 3, stride, device),
                        bn1: BatchNorm::new(width, device),
                        conv2: conv(width, width, 3, 1, device),
                        bn2: BatchNorm::new(width, device),
                        conv3: None,
                        bn3: None,
                        down,
                    },
                    BlockKind::Bottleneck => Block {
                        conv1: conv(in_c, width, 1, 1, device),
                        bn1: BatchNorm::new(width, device),
                        conv2: conv(width, width, 3, stride, device),
                        bn2: BatchNorm::new(width, device),
                        conv3: Some(conv(width, out_c, 1, 1, device)),
                        bn3: Some(BatchNorm::new(out_c, device)),
                        down,
                    },
                };
                blocks.push(block);
                in_c = out_c;
            }
        }
        ResNet {
            stem,
            stem_bn: BatchNorm::new(stem_width, device),
            blocks,
            max_pool: self.stem == Stem::Imagenet,
        }
    }
}

#[derive(Module, Debug)]
pub struct Downsample<B: Backend> {
    conv: Conv<B>,
    bn: BatchNorm<B>,
}

/// A basic block (`conv3` absent) or a bottleneck block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    conv1: Conv<B>,
    bn1: BatchNorm<B>,
    conv2: Conv<B>,
    bn2: BatchNorm<B>,
    conv3: Option<Conv<B>>,
    bn3: Option<BatchNorm<B>>,
    down: Option<Downsample<B>>,
}

impl<B: Backend> Block<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let skip = match &self.down {
            Some(d) => d.bn.forward4(d.conv.forward(x.clone())),
            None => x.clone(),
        };
        let h = relu(self.bn1.forward4(self.conv1.forward(x)));
        let mut h = self.bn2.forward4(self.conv2.forward(h));
        if let (Some(c3), Some(b3)) = (&self.conv3, &self.bn3) {
            h = b3.forward4(c3.forward(relu(h)));
        }
        relu(h + skip)
    }
}

#[derive(Module, Debug)]
pub struct ResNet<B: Backend> {
    stem: Conv<B>,
    stem_bn: BatchNorm<B>,
    blocks: Vec<Block<B>>,
    max_pool: bool,
}

impl<B: Backend> ResNet<B> {
    /// `x`: [N, C, H, W] → pooled features [N, F].
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let mut h = relu(self.stem_bn.forward4(self.stem.forward(x)));
        if self.max_pool {
            h = MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init()
                .forward(h);
        }
        for b in &self.blocks {
            h = b.forward(h);
        }
        let [n, c, _, _] = h.dims();
        h.mean_dim(2).mean_dim(3).reshape([n, c])
    }
}

/// He (Kaiming) initialisation drawn from `seed` and each tensor's path: convolutions normal
/// with std √(2 / fan_out) (torchvision's choice), linear layers normal with std √(1 / fan_in),
/// batch-norm scales 1 (0 for the last norm of each residual branch, so every block starts as
/// the identity) and shifts 0.
pub fn seeded_params(layout: &crate::params::Layout, seed: u64) -> Vec<f32> {
    use crate::params::Init;
    crate::params::seeded_init(layout, seed, |seg| {
        let name = seg.path.rsplit('.').next().unwrap_or("");
        let last_norm = seg.path.ends_with("bn3.gamma")
            || (seg.path.ends_with("bn2.gamma") && !has_bn3(layout, &seg.path));
        match (name, seg.shape.as_slice()) {
            ("gamma", _) if last_norm && seg.path.contains("blocks.") => Init::Const(0.0),
            ("gamma", _) => Init::Const(1.0),
            ("beta" | "bias", _) => Init::Const(0.0),
            (_, [out, _, kh, kw]) => Init::Normal((2.0 / (out * kh * kw) as f64).sqrt()),
            (_, [fan_in, _]) => Init::Normal((1.0 / *fan_in as f64).sqrt()),
            _ => Init::Normal(0.02),
        }
    })
}

fn has_bn3(layout: &crate::params::Layout, bn2_gamma: &str) -> bool {
    let bn3 = bn2_gamma.replace("bn2.gamma", "bn3.gamma");
    layout.segments.iter().any(|s| s.path == bn3)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backend::Cpu;
    use crate::params::Layout;

    #[test]
    fn shapes_of_the_three_configs() {
        let d = Default::default();
        let small = ResNetConfig::small(1).init::<Cpu>(ConvImpl::Im2col, &d);
        let y = small.forward(Tensor::zeros([3, 1, 16, 16], &d));
        assert_eq!(y.dims(), [3, 64]);
        let r18 = ResNetConfig::resnet18(3);
        let l18 = Layout::of(&r18.init::<Cpu>(ConvImpl::Im2col, &d));
        // torchvision's resnet18 without the classifier: 11,176,512 weights.
        assert_eq!(l18.total, 11_176_512);
        let r50 = ResNetConfig::resnet50(3);
        assert_eq!(r50.features(), 2048);
        let l50 = Layout::of(&r50.init::<Cpu>(ConvImpl::Im2col, &d));
        // torchvision's resnet50 without the classifier: 23,508,032 weights.
        assert_eq!(l50.total, 23_508_032);
        let y = r18
            .init::<Cpu>(ConvImpl::Im2col, &d)
            .forward(Tensor::zeros([2, 3, 64, 64], &d));
        assert_eq!(y.dims(), [2, 512]);
    }

    /// The im2col convolution against burn's own (forward and both gradients), for the kernel
    /// sizes and strides a ResNet uses, including odd sizes.
    #[test]
    fn im2col_convolution_equals_the_backend_convolution() {
        use crate::backend::CpuTrain;
        use burn::tensor::TensorData;
        let d = Default::default();
        for (k, s, h, w) in [
            (3, 1, 7, 6),
            (3, 2, 9, 8),
            (1, 2, 8, 7),
            (7, 2, 13, 12),
            (1, 1, 4, 4),
        ] {
            let (n, c, o) = (2, 3, 4);
            let x: Vec<f32> = (0..n * c * h * w)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
                .collect();
            let wv: Vec<f32> = (0..o * c * k * k)
                .map(|i| ((i * 17 % 13) as f32 - 6.0) / 5.0)
                .collect();
            let run = |how: ConvImpl| {
                let mut conv = Conv::<CpuTrain>::new(c, o, k, s, how, &d);
                conv.weight = Param::from_tensor(Tensor::from_data(
                    TensorData::new(wv.clone(), [o, c, k, k]),
                    &d,
                ));
                let xt =
                    Tensor::<CpuTrain, 4>::from_data(TensorData::new(x.clone(), [n, c, h, w]), &d)
                        .require_grad();
                let y = conv.forward(xt.clone());
                let dims = y.dims();
                // A loss with distinct weights per output so every gradient entry matters.
                let m = Tensor::<CpuTrain, 1, burn::tensor::Int>::arange(
                    0..y.shape().num_elements() as i64,
                    &d,
                )
                .float()
                .reshape(dims)
                .cos();
                let g = (y.clone() * m).sum().backward();
                let gx = xt.grad(&g).unwrap().into_data().to_vec::<f32>().unwrap();
                let gw = conv
                    .weight
                    .grad(&g)
                    .unwrap()
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap();
                (dims, y.into_data().to_vec::<f32>().unwrap(), gx, gw)
            };
            let (a, b) = (run(ConvImpl::Native), run(ConvImpl::Im2col));
            assert_eq!(a.0, b.0, "k {k} s {s}");
            for (u, v) in [(&a.1, &b.1), (&a.2, &b.2), (&a.3, &b.3)] {
                for (p, q) in u.iter().zip(v) {
                    assert!(
                        (p - q).abs() < 1e-4 * p.abs().max(1.0),
                        "k {k} s {s}: {p} vs {q}"
                    );
                }
            }
        }
    }

    /// The measurement behind `ConvImpl::Im2col` (ARCHITECTURE.md, "SwAV"): prints forward and
    /// forward+backward times of one 3×3 layer both ways; asserts nothing.
    /// `cargo test -p colony-trainer --lib conv_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn conv_speed() {
        use crate::backend::CpuTrain;
        let d = Default::default();
        for how in [ConvImpl::Native, ConvImpl::Im2col] {
            let conv = Conv::<CpuTrain>::new(16, 16, 3, 1, how, &d);
            let x = Tensor::<CpuTrain, 4>::ones([128, 16, 16, 16], &d).require_grad();
            let t0 = std::time::Instant::now();
            let y = conv.forward(x);
            let _ = y.clone().sum().into_data();
            let fwd = t0.elapsed();
            let _ = y.sum().backward();
            eprintln!(
                "{how:?}: forward {fwd:?}, forward+backward {:?}",
                t0.elapsed()
            );
        }
    }

    #[test]
    fn batch_norm_normalises_each_channel() {
        let d = Default::default();
        let bn = BatchNorm::<Cpu>::new(2, &d);
        let x = Tensor::<Cpu, 4>::from_floats(
            [
                [[[1.0, 2.0]], [[10.0, 10.0]]],
                [[[3.0, 4.0]], [[20.0, 30.0]]],
            ],
            &d,
        );
        let y = bn.forward4(x);
        let v = y.into_data().to_vec::<f32>().unwrap();
        // channel 0 holds 1,2,3,4: mean 2.5, var 1.25.
        let z = |x: f32| (x - 2.5) / (1.25f32 + 1e-5).sqrt();
        assert!((v[0] - z(1.0)).abs() < 1e-5 && (v[4] - z(3.0)).abs() < 1e-5);
        // every channel ends with mean 0.
        let c1 = [v[2], v[3], v[6], v[7]];
        assert!(c1.iter().sum::<f32>().abs() < 1e-4);
    }

    #[test]
    fn seeded_init_zeroes_the_last_norm_of_each_branch() {
        let d = Default::default();
        let l = Layout::of(&ResNetConfig::small(1).init::<Cpu>(ConvImpl::Im2col, &d));
        let p = seeded_params(&l, 3);
        let seg = |path: &str| l.segments.iter().find(|s| s.path == path).unwrap();
        let s = seg("blocks.0.bn2.gamma");
        assert!(p[s.offset..s.offset + s.len].iter().all(|&x| x == 0.0));
        let s = seg("blocks.0.bn1.gamma");
        assert!(p[s.offset..s.offset + s.len].iter().all(|&x| x == 1.0));
        assert_eq!(p, seeded_params(&l, 3));
        assert_ne!(p, seeded_params(&l, 4));
    }
}
