//! Editable model files and the checks a verifier runs on a patch.
//!
//! File: `COLONY-EDIT-1\n`, the SHA-256 of the payload, the payload (bincode). The model's id
//! is the hex of that hash, so two nodes with the same id hold the same weights. The file names
//! the data set (by fingerprint) and the seeded split whose test part is the public control set
//! on which verifiers measure drawdown.

use std::path::Path;

use colony_protocol::codec::{decode_file, encode_file};
use colony_protocol::patch::{Delta, Patch};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::editor::EditorConfig;
use super::head::{Head, target_margin};
use super::net::{Arch, CLASSES, EditNet, HIDDEN, INPUTS, features_of};
use super::train::Digits;
use crate::backend::Cpu;
use crate::data::images::ImageSet;
use crate::params::{Layout, flatten_params, load_params};

const MAGIC: &[u8] = b"COLONY-EDIT-1\n";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelFile {
    pub arch: Arch,
    /// `baseline` or `editable`.
    pub mode: String,
    /// The editor the model was trained for (`kind`, `lr`, `max_steps`, `margin`).
    pub editor_kind: String,
    pub editor_lr: f32,
    pub editor_max_steps: u32,
    pub editor_margin: f32,
    /// Hex fingerprint of the image set, and the split whose test part is the control set.
    pub data_fingerprint: String,
    pub split_seed: u64,
    pub test_fraction: f32,
    pub params: Vec<f32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a Colony editable model file (bad magic)")]
    Magic { path: String },
    #[error("{path} is corrupt: its checksum does not match its contents")]
    Checksum { path: String },
    #[error("{path}: {why}")]
    Bad { path: String, why: String },
}

impl ModelFile {
    pub fn editor(&self) -> Option<EditorConfig> {
        Some(EditorConfig {
            kind: EditorConfig::kind_named(&self.editor_kind)?,
            lr: self.editor_lr,
            max_steps: self.editor_max_steps,
            margin: self.editor_margin,
        })
    }

    /// The payload and its id.
    fn encode(&self) -> Result<(Vec<u8>, String), String> {
        let payload = encode_file(self).map_err(|e| e.to_string())?;
        let id = hex::encode(Sha256::digest(&payload));
        Ok((payload, id))
    }

    pub fn id(&self) -> Result<String, String> {
        Ok(self.encode()?.1)
    }

    /// Writes the file (atomically: a temporary file renamed over the target).
    pub fn save(&self, path: &Path) -> Result<String, ModelError> {
        let (payload, id) = self.encode().map_err(|why| ModelError::Bad {
            path: path.display().to_string(),
            why,
        })?;
        let mut bytes = MAGIC.to_vec();
        bytes.extend(Sha256::digest(&payload));
        bytes.extend(payload);
        let tmp = path.with_extension("tmp");
        let io = |source| ModelError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::write(&tmp, &bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(id)
    }

    /// Reads a file; returns it with its id.
    pub fn load(path: &Path) -> Result<(Self, String), ModelError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: p.clone(),
            source,
        })?;
        let Some(rest) = bytes.strip_prefix(MAGIC) else {
            return Err(ModelError::Magic { path: p });
        };
        if rest.len() < 32 || Sha256::digest(&rest[32..]).as_slice() != &rest[..32] {
            return Err(ModelError::Checksum { path: p });
        }
        let file: ModelFile = decode_file(&rest[32..]).map_err(|e| ModelError::Bad {
            path: p.clone(),
            why: e.to_string(),
        })?;
        if file.editor().is_none() {
            return Err(ModelError::Bad {
                path: p,
                why: format!("unknown editor {:?}", file.editor_kind),
            });
        }
        Ok((file, hex::encode(&rest[..32])))
    }
}

/// The file of a trained net.
pub fn model_file(
    net: &EditNet<Cpu>,
    mode: &str,
    editor: &EditorConfig,
    data: &ImageSet,
    split_seed: u64,
    test_fraction: f32,
) -> Result<ModelFile, String> {
    Ok(ModelFile {
        arch: net.arch(),
        mode: mode.into(),
        editor_kind: editor.spec().kind,
        editor_lr: editor.lr,
        editor_max_steps: editor.max_steps,
        editor_margin: editor.margin,
        data_fingerprint: hex::encode(data.fingerprint()),
        split_seed,
        test_fraction,
        params: flatten_params(net).map_err(|e| e.to_string())?,
    })
}

/// What a verifier needs: the body, the base head, the control set's features and labels.
#[derive(Debug)]
pub struct EditModel {
    pub id: String,
    pub file: ModelFile,
    pub net: EditNet<Cpu>,
    pub base: Head,
    pub editor: EditorConfig,
    pub control: Vec<f32>,
    pub control_labels: Vec<usize>,
    /// The control images themselves (`64` pixels each, 0–1 scale).
    pub control_pixels: Vec<f32>,
    /// The base head's control error.
    pub base_error: f32,
}

impl EditModel {
    /// Loads `path` and the control set from the image set it names.
    pub fn load(path: &Path, data: &ImageSet) -> Result<Self, ModelError> {
        let (file, id) = ModelFile::load(path)?;
        let p = path.display().to_string();
        let bad = |why: String| ModelError::Bad {
            path: p.clone(),
            why,
        };
        let fp = hex::encode(data.fingerprint());
        if fp != file.data_fingerprint {
            return Err(bad(format!(
                "the model's control set is in image set {}, the node has {fp}",
                &file.data_fingerprint[..12.min(file.data_fingerprint.len())]
            )));
        }
        let device = Default::default();
        let fresh = EditNet::<Cpu>::new(file.arch, &device);
        let layout = Layout::of(&fresh);
        let net = load_params(fresh, &layout, &file.params).map_err(|e| bad(e.to_string()))?;
        let digits = Digits::from_set(data).map_err(bad)?;
        let (_, test) = digits.split(file.split_seed, file.test_fraction);
        let control = features_of::<Cpu>(&net, &test.pixels, &device);
        let editor = file.editor().ok_or_else(|| bad("unknown editor".into()))?;
        let base = net.plain_head();
        let base_error = base.error(&control, &test.labels);
        Ok(Self {
            id,
            base,
            base_error,
            file,
            net,
            editor,
            control,
            control_labels: test.labels,
            control_pixels: test.pixels,
        })
    }

    /// Features of one sample.
    pub fn features(&self, sample: &[f32]) -> Vec<f32> {
        features_of::<Cpu>(&self.net, sample, &Default::default())
    }

    /// Control-set error of `head`.
    pub fn error(&self, head: &Head) -> f32 {
        head.error(&self.control, &self.control_labels)
    }

    /// Computes a patch body (without author, parent and times) for `sample → target` on `head`.
    pub fn solve(
        &self,
        head: &Head,
        sample: &[f32],
        target: usize,
    ) -> Result<super::EditOutcome, String> {
        check_request(sample, target)?;
        let h = self.features(sample);
        Ok(super::edit(head, &h, target, &self.editor))
    }
}

/// Checks a request's shape.
pub fn check_request(sample: &[f32], target: usize) -> Result<(), String> {
    if sample.len() != INPUTS {
        return Err(format!(
            "the sample has {} values, want {INPUTS}",
            sample.len()
        ));
    }
    if !sample
        .iter()
        .all(|v| v.is_finite() && (-1.0..=2.0).contains(v))
    {
        return Err("the sample's values must be finite pixels on the 0-1 scale".into());
    }
    if target >= CLASSES {
        return Err(format!("target {target} is not a class (0..{CLASSES})"));
    }
    Ok(())
}

/// A verifier's limits.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest control-error increase one patch may cause.
    pub max_drawdown: f32,
    /// Largest control-error increase over the base model the chain may reach (one edit at a
    /// time stays local, but a hundred accumulate: see BENCHMARKS "edit").
    pub max_total_drawdown: f32,
    /// Smallest margin the target must win by after the patch.
    pub min_margin: f32,
    /// Most editor steps.
    pub max_steps: u32,
    /// Largest encoded patch, bytes.
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_drawdown: 0.10,
            max_total_drawdown: 0.25,
            min_margin: 0.05,
            max_steps: 10,
            max_bytes: 64 * 1024,
        }
    }
}

/// A verifier's verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub accept: bool,
    pub reason: String,
    pub margin: f32,
    pub drawdown: f32,
    /// The head with the patch applied (when it applies at all).
    pub head: Option<Head>,
}

impl Verdict {
    fn reject(reason: String) -> Self {
        Self {
            accept: false,
            reason,
            margin: f32::NAN,
            drawdown: f32::NAN,
            head: None,
        }
    }
}

/// Checks `patch` on `head` (the version it is to be applied on): shapes, the edit holds with
/// the margin, drawdown on the control set, steps and size.
pub fn check_patch(model: &EditModel, head: &Head, patch: &Patch, limits: &Limits) -> Verdict {
    if patch.model != model.id {
        return Verdict::reject(format!("patch is for model {}, not this one", patch.model));
    }
    if let Err(e) = check_request(&patch.sample, patch.target as usize) {
        return Verdict::reject(e);
    }
    if patch.steps > limits.max_steps || patch.editor.max_steps > limits.max_steps {
        return Verdict::reject(format!(
            "{} editor steps (at most {})",
            patch.steps, limits.max_steps
        ));
    }
    let bytes = colony_protocol::encode(patch, colony_protocol::patch::MAX_PATCH_BYTES)
        .map_or(usize::MAX, |b| b.len());
    if bytes > limits.max_bytes {
        return Verdict::reject(format!(
            "patch of {bytes} bytes (at most {})",
            limits.max_bytes
        ));
    }
    if let Delta::Rank1 { h, .. } = &patch.delta
        && h.len() != HIDDEN
    {
        return Verdict::reject(format!("h has {} values, want {HIDDEN}", h.len()));
    }
    let edited = match head.apply(&patch.delta) {
        Ok(e) => e,
        Err(e) => return Verdict::reject(e.to_string()),
    };
    let h = model.features(&patch.sample);
    let (margin, _) = target_margin(&edited.logits(&h), patch.target as usize);
    let after = model.error(&edited);
    let drawdown = after - model.error(head);
    let (accept, reason) = if margin < limits.min_margin {
        (
            false,
            format!(
                "the edit does not hold: margin {margin:.4} < {}",
                limits.min_margin
            ),
        )
    } else if drawdown > limits.max_drawdown {
        (
            false,
            format!(
                "drawdown {:.2}% on the control set (at most {:.2}%)",
                drawdown * 100.0,
                limits.max_drawdown * 100.0
            ),
        )
    } else if after - model.base_error > limits.max_total_drawdown {
        (
            false,
            format!(
                "the chain's control error would reach {:.2}%, {:.2} points over the base (at most {:.2})",
                after * 100.0,
                (after - model.base_error) * 100.0,
                limits.max_total_drawdown * 100.0
            ),
        )
    } else {
        (
            true,
            format!("margin {margin:.3}, drawdown {:.2}%", drawdown * 100.0),
        )
    };
    Verdict {
        accept,
        reason,
        margin,
        drawdown,
        head: Some(edited),
    }
}
