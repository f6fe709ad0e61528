//! `colony bench edit`: baseline vs Editable Training on scikit-learn's digits, with the same
//! editor, split and seeds: 1000 independent edits (success rate, mean steps, drawdown), one
//! chain of 100 sequential edits, the size of the encoded patch and the time a verifier takes
//! to check one.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::anyhow;
use clap::Args;
use colony_protocol::NodeKeypair;
use colony_protocol::patch::{MAX_PATCH_BYTES, Patch};
use colony_trainer::backend::{Cpu, CpuTrain};
use colony_trainer::edit::chain::base_version;
use colony_trainer::edit::eval::{edit_requests, evaluate};
use colony_trainer::edit::model::{EditModel, Limits, check_patch, model_file};
use colony_trainer::edit::net::{Arch, features_of};
use colony_trainer::edit::train::{Digits, Mode, TrainConfig, train};
use serde::Serialize;

use crate::edit_cli::{SPLIT_SEED, TEST_FRACTION, editor_named, load_digits};

#[derive(Debug, Clone, Args)]
pub struct EditBenchArgs {
    /// Architectures, comma-separated (`mlp`, `cnn`).
    #[arg(long, default_value = "mlp,cnn")]
    pub arch: String,
    #[arg(long, default_value_t = 1000)]
    pub edits: usize,
    #[arg(long, default_value_t = 100)]
    pub sequential: usize,
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    #[arg(long, default_value = "line-search")]
    pub editor: String,
    #[arg(long)]
    pub editor_lr: Option<f32>,
    /// Also edit the body's last layer with the head (first-order Editable Training, Polyak
    /// editor; no patches: those carry head edits only).
    #[arg(long)]
    pub block: bool,
    /// Patches verified for `verify_ms`.
    #[arg(long, default_value_t = 200)]
    pub verify: usize,
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Write machine-readable results here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EditCase {
    pub model: String,
    pub training: String,
    pub editor: String,
    pub edits: usize,
    pub base_error: f32,
    pub success_rate: f32,
    pub mean_steps: f32,
    pub drawdown: f32,
    pub sequential_drawdown_100: f32,
    pub sequential_success_rate: f32,
    pub patch_bytes: usize,
    pub patch_bytes_max: usize,
    pub verify_ms: f64,
    pub train_s: f32,
}

pub fn run(a: EditBenchArgs) -> anyhow::Result<()> {
    let editor = editor_named(&a.editor, a.editor_lr)?;
    let set = load_digits(a.data.as_ref())?;
    let digits = Digits::from_set(&set).map_err(|e| anyhow!(e))?;
    let (tr, te) = digits.split(SPLIT_SEED, TEST_FRACTION);
    let device = Default::default();
    let dir = tempfile::tempdir()?;
    let key = NodeKeypair::from_secret([5; 32]);
    let mut cases = Vec::new();
    println!(
        "| model | training | edits | base error | success | mean steps | drawdown | seq. drawdown (100) | patch bytes (mean/max) | verify ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for name in a.arch.split(',') {
        let arch =
            Arch::named(name.trim()).ok_or_else(|| anyhow!("--arch {name}: want mlp or cnn"))?;
        for mode in [Mode::Baseline, Mode::Editable] {
            let mut cfg = TrainConfig::new(arch, mode);
            cfg.epochs = a.epochs;
            cfg.editor = editor;
            let t0 = Instant::now();
            let (net, _) = train::<CpuTrain>(&cfg, &tr, &device);
            let train_s = t0.elapsed().as_secs_f32();
            let f = features_of::<Cpu>(&net, &te.pixels, &device);
            let head = net.plain_head();
            let s = evaluate(&head, &f, &te.labels, &editor, a.edits, a.sequential, 3);
            // Patches as a node makes them, and a verifier's check of each.
            let path = dir
                .path()
                .join(format!("{}-{}.edit", arch.name(), mode.name()));
            model_file(&net, mode.name(), &editor, &set, SPLIT_SEED, TEST_FRACTION)
                .map_err(|e| anyhow!(e))?
                .save(&path)?;
            let model = EditModel::load(&path, &set)?;
            let (mut bytes, mut max_bytes, mut verify_s) = (0usize, 0usize, 0.0f64);
            let reqs = edit_requests(&te.labels, a.verify.max(1), 11);
            for &(i, t) in &reqs {
                let out = model
                    .solve(&model.base, te.image(i), t)
                    .map_err(|e| anyhow!(e))?;
                let patch = Patch {
                    model: model.id.clone(),
                    parent: base_version(&model.id),
                    parent_len: 0,
                    request: [0; 32],
                    sample: te.image(i).to_vec(),
                    target: t as u32,
                    delta: out.delta,
                    editor: editor.spec(),
                    steps: out.steps,
                    author: key.public(),
                    created_ms: 0,
                };
                let b = colony_protocol::encode(&patch, MAX_PATCH_BYTES)?.len();
                bytes += b;
                max_bytes = max_bytes.max(b);
                let t0 = Instant::now();
                let v = check_patch(
                    &model,
                    &model.base,
                    &patch,
                    &Limits {
                        max_drawdown: 1.0,
                        max_total_drawdown: 1.0,
                        ..Limits::default()
                    },
                );
                verify_s += t0.elapsed().as_secs_f64();
                if !v.accept {
                    return Err(anyhow!(
                        "a patch the editor made failed its own check: {}",
                        v.reason
                    ));
                }
            }
            let case = EditCase {
                model: arch.name().into(),
                training: mode.name().into(),
                editor: editor.spec().kind,
                edits: s.edits,
                base_error: s.base_error,
                success_rate: s.success_rate,
                mean_steps: s.mean_steps,
                drawdown: s.drawdown,
                sequential_drawdown_100: s.sequential_drawdown,
                sequential_success_rate: s.sequential_success_rate,
                patch_bytes: bytes / reqs.len(),
                patch_bytes_max: max_bytes,
                verify_ms: verify_s * 1000.0 / reqs.len() as f64,
                train_s,
            };
            println!(
                "| {} | {} | {} | {:.2}% | {:.1}% | {:.2} | {:.2}% | {:.1}% | {} / {} | {:.2} |",
                case.model,
                case.training,
                case.edits,
                case.base_error * 100.0,
                case.success_rate * 100.0,
                case.mean_steps,
                case.drawdown * 100.0,
                case.sequential_drawdown_100 * 100.0,
                case.patch_bytes,
                case.patch_bytes_max,
                case.verify_ms
            );
            cases.push(case);
        }
        let (b, e) = (&cases[cases.len() - 2], &cases[cases.len() - 1]);
        println!(
            "  {}: editable drawdown / baseline drawdown = {:.2} (target <= 0.5)",
            b.model,
            e.drawdown / b.drawdown
        );
    }
    if a.block {
        println!("\nEditable block = the body's last linear layer + the head (first-order):\n");
        println!("| model | training | edits | base error | success | mean steps | drawdown |");
        println!("|---|---|---|---|---|---|---|");
        for name in a.arch.split(',') {
            let arch = Arch::named(name.trim())
                .ok_or_else(|| anyhow!("--arch {name}: want mlp or cnn"))?;
            let mut dd = Vec::new();
            for mode in [Mode::Baseline, Mode::Editable] {
                let mut cfg = TrainConfig::new(arch, mode);
                cfg.epochs = a.epochs;
                cfg.editor = editor;
                cfg.block = true;
                let t0 = Instant::now();
                let (net, _) = train::<CpuTrain>(&cfg, &tr, &device);
                let train_s = t0.elapsed().as_secs_f32();
                let s = colony_trainer::edit::block::evaluate_block::<CpuTrain>(
                    &net, &te.pixels, &te.labels, &editor, a.edits, 3,
                );
                println!(
                    "| {} (block) | {} | {} | {:.2}% | {:.1}% | {:.2} | {:.2}% |",
                    arch.name(),
                    mode.name(),
                    s.edits,
                    s.base_error * 100.0,
                    s.success_rate * 100.0,
                    s.mean_steps,
                    s.drawdown * 100.0
                );
                dd.push(s.drawdown);
                cases.push(EditCase {
                    model: format!("{}-block", arch.name()),
                    training: mode.name().into(),
                    editor: "polyak-first-order".into(),
                    edits: s.edits,
                    base_error: s.base_error,
                    success_rate: s.success_rate,
                    mean_steps: s.mean_steps,
                    drawdown: s.drawdown,
                    sequential_drawdown_100: f32::NAN,
                    sequential_success_rate: f32::NAN,
                    patch_bytes: 0,
                    patch_bytes_max: 0,
                    verify_ms: f64::NAN,
                    train_s,
                });
            }
            println!(
                "  {} (block): editable drawdown / baseline drawdown = {:.2}",
                arch.name(),
                dd[1] / dd[0]
            );
        }
    }
    if let Some(p) = &a.json {
        super::write_json(p, "edit", &cases)?;
    }
    Ok(())
}
