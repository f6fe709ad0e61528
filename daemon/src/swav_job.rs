//! A SwAV pretraining job: a ResNet trained without labels on an image set (an image folder, or
//! scikit-learn's digits), with LARS and a warm-up/cosine schedule.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use colony_trainer::collab::{SwavTrainer, swav_cpu};
use colony_trainer::data::images::{Augment, CropSpec, ImageSet, SwavBatch};
use colony_trainer::data::mlm::Sampler;
use colony_trainer::models::swav::SwavConfig;
use colony_trainer::optim::OptimizerConfig;
use colony_trainer::optim::lars::LarsConfig;
use colony_trainer::optim::schedule::Schedule;

use crate::train::BatchSource;
use crate::train_cli::{Backend, TrainJob};

#[derive(Debug, Clone)]
pub struct SwavJob {
    /// `small`, `resnet18` or `resnet50`.
    pub backbone: String,
    pub images: Arc<ImageSet>,
    pub augment: Augment,
    pub micro_batch: usize,
    /// Peak rate (LARS); the cosine ends at a thousandth of it.
    pub lr: f32,
    pub warmup: u64,
    pub total_steps: u64,
    /// Steps with the prototypes fixed (default: the model's).
    pub freeze_prototypes: Option<u64>,
    pub seed: u64,
    pub backend: Backend,
    pub gpu: usize,
}

/// Where `scripts/fetch-data.sh` puts the digits (see
/// [`colony_trainer::data::images::default_digits_path`]).
pub fn default_digits() -> PathBuf {
    colony_trainer::data::images::default_digits_path()
}

/// Parses `2x224+6x96`: counts and sizes of the crops, global first.
pub fn parse_crops(spec: &str) -> anyhow::Result<Vec<(usize, usize)>> {
    let out: Vec<(usize, usize)> = spec
        .split('+')
        .map(|part| {
            let (n, s) = part
                .trim()
                .split_once('x')
                .with_context(|| format!("crop spec {part:?}: want COUNTxSIZE, as in 2x224"))?;
            let (n, s): (usize, usize) = (
                n.parse().with_context(|| format!("crop count {n:?}"))?,
                s.parse().with_context(|| format!("crop size {s:?}"))?,
            );
            if n == 0 || !(4..=1024).contains(&s) {
                bail!("crop spec {part:?}: count ≥ 1 and size 4–1024 pixels");
            }
            Ok((n, s))
        })
        .collect::<anyhow::Result<_>>()?;
    if out.first().is_none_or(|&(n, _)| n < 2) {
        bail!("crop spec {spec:?}: SwAV needs at least two global crops (the first group)");
    }
    Ok(out)
}

impl SwavJob {
    /// The image set at `data`: `digits` (scikit-learn's set, fetched by
    /// scripts/fetch-data.sh), a `.csv`/`.csv.gz` file of that format, or an image folder
    /// loaded at `load_size` pixels.
    pub fn load_images(data: &Path, load_size: usize) -> anyhow::Result<ImageSet> {
        let name = data.to_string_lossy();
        if name == "digits" {
            let p = default_digits();
            return ImageSet::digits(&p).with_context(|| {
                format!(
                    "reading the digits at {} (scripts/fetch-data.sh fetches them; or set COLONY_DIGITS)",
                    p.display()
                )
            });
        }
        if name.ends_with(".csv") || name.ends_with(".csv.gz") {
            return Ok(ImageSet::digits(data)?);
        }
        if data.is_dir() {
            return Ok(ImageSet::folder(data, load_size)?);
        }
        bail!(
            "--data {}: want `digits`, a digits .csv(.gz) file or an image folder",
            data.display()
        )
    }

    /// The multi-crop recipe: `crops` if given (the ImageNet recipe's scales and colour
    /// distortion), else the digits recipe for 8×8 digits and SwAV's 2×224+6×96 otherwise.
    pub fn augment_for(images: &ImageSet, crops: Option<&str>) -> anyhow::Result<Augment> {
        let mut aug = if images.channels == 1 && images.size <= 16 {
            Augment::digits()
        } else {
            Augment::imagenet()
        };
        let Some(spec) = crops else {
            return Ok(aug);
        };
        let (g, l) = (aug.crops[0].clone(), aug.crops[1].clone());
        aug.crops = parse_crops(spec)?
            .iter()
            .enumerate()
            .map(|(i, &(count, size))| CropSpec {
                count,
                size,
                ..(if i == 0 { &g } else { &l }).clone()
            })
            .collect();
        Ok(aug)
    }

    fn config(&self) -> anyhow::Result<SwavConfig> {
        let mut cfg =
            SwavConfig::named(&self.backbone, self.images.channels).with_context(|| {
                format!(
                    "unknown SwAV backbone {:?} (small, resnet18, resnet50)",
                    self.backbone
                )
            })?;
        if let Some(f) = self.freeze_prototypes {
            cfg.freeze_prototypes_steps = f;
        }
        Ok(cfg)
    }
}

impl TrainJob for SwavJob {
    type Batch = SwavBatch;

    fn trainer(&self) -> anyhow::Result<SwavTrainer> {
        let cfg = self.config()?;
        let optimizer = OptimizerConfig::Lars(LarsConfig::default());
        let schedule = Schedule::WarmupCosine {
            peak: self.lr,
            floor: self.lr * 1e-3,
            warmup: self.warmup,
            total: self.total_steps,
        };
        let extra = serde_json::to_vec(&(
            &optimizer,
            &schedule,
            self.seed,
            &self.augment,
            hex::encode(self.images.fingerprint()),
        ))?;
        Ok(match self.backend {
            Backend::Ndarray => swav_cpu(&cfg, optimizer, schedule, &extra, self.seed)?,
            Backend::Cuda => cuda_trainer(&cfg, optimizer, schedule, &extra, self.seed, self.gpu)?,
        })
    }

    fn source(&self, peer: &[u8]) -> anyhow::Result<BatchSource<SwavBatch>> {
        if self.images.is_empty() {
            bail!("the image set is empty");
        }
        let sampler = Sampler {
            run_seed: self.seed,
            peer: peer.to_vec(),
        };
        let (images, aug, mb) = (self.images.clone(), self.augment.clone(), self.micro_batch);
        Ok(Arc::new(move |epoch, index| {
            sampler.views(&images, &aug, epoch, index, mb)
        }))
    }

    fn micro_batch(&self) -> usize {
        self.micro_batch
    }

    fn on_gpu(&self, gpu: usize) -> Self {
        Self {
            gpu,
            ..self.clone()
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_trainer(
    cfg: &SwavConfig,
    optimizer: OptimizerConfig,
    schedule: Schedule,
    extra: &[u8],
    seed: u64,
    gpu: usize,
) -> anyhow::Result<SwavTrainer> {
    if !colony_trainer::backend::cuda_available() {
        bail!("--backend cuda: no CUDA driver (libcuda.so) on this machine");
    }
    Ok(colony_trainer::collab::swav_cuda(
        cfg, optimizer, schedule, extra, seed, gpu,
    )?)
}

#[cfg(not(feature = "cuda"))]
fn cuda_trainer(
    _: &SwavConfig,
    _: OptimizerConfig,
    _: Schedule,
    _: &[u8],
    _: u64,
    _: usize,
) -> anyhow::Result<SwavTrainer> {
    bail!(
        "--backend cuda: this colony was built without the `cuda` feature (cargo build --release --features cuda)"
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn crop_specs_parse_and_bad_ones_are_named() {
        assert_eq!(parse_crops("2x224+6x96").unwrap(), vec![(2, 224), (6, 96)]);
        assert_eq!(parse_crops("3x32").unwrap(), vec![(3, 32)]);
        for bad in ["1x224+6x96", "2x", "2y224", "0x8+2x8", "2x2"] {
            assert!(parse_crops(bad).is_err(), "{bad}");
        }
    }
}
