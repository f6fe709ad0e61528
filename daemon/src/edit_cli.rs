//! `colony edit train` (baseline or Editable Training of a digits classifier, written as an
//! editable model file) and `colony patch submit|list|show|rollback` (clients of a running
//! node's HTTP API; computing, verifying and adopting patches is the node's job, see
//! `patch_service`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use colony_trainer::backend::{Cpu, CpuTrain};
use colony_trainer::data::images::ImageSet;
use colony_trainer::edit::EditorConfig;
use colony_trainer::edit::eval;
use colony_trainer::edit::model::model_file;
use colony_trainer::edit::net::{Arch, features_of};
use colony_trainer::edit::train::{Digits, Mode, TrainConfig, train};

use crate::patch_service::{PatchList, ProposalView, SubmitRequest};

#[derive(Debug, Subcommand)]
pub enum EditCommand {
    /// Train a digits classifier (baseline or Editable Training) and write an editable model.
    Train(EditTrainArgs),
}

#[derive(Debug, Clone, Args)]
pub struct EditTrainArgs {
    /// `mlp` or `cnn`.
    #[arg(long, default_value = "mlp")]
    pub arch: String,
    /// `baseline` or `editable`.
    #[arg(long, default_value = "editable")]
    pub mode: String,
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The editor the model is trained for and patched with: `line-search`, `scaled`, `sgd`,
    /// `momentum` or `rmsprop`.
    #[arg(long, default_value = "line-search")]
    pub editor: String,
    /// The editor's learning rate (for `line-search`: the overshoot factor, at least 1).
    #[arg(long)]
    pub editor_lr: Option<f32>,
    /// The digits file (default: the one scripts/fetch-data.sh fetches).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Where to write the model.
    #[arg(long)]
    pub out: PathBuf,
}

/// The split every Colony digits model uses: 20% of the images, seed 7, are the control set.
pub const SPLIT_SEED: u64 = 7;
pub const TEST_FRACTION: f32 = 0.2;

pub fn editor_named(name: &str, lr: Option<f32>) -> anyhow::Result<EditorConfig> {
    let kind = EditorConfig::kind_named(name).ok_or_else(|| {
        anyhow!("--editor {name}: want line-search, scaled, sgd, momentum or rmsprop")
    })?;
    let base = EditorConfig {
        kind,
        ..Default::default()
    };
    let lr = lr.unwrap_or(match name {
        "line-search" => base.lr,
        "scaled" => 2.0,
        "rmsprop" => 0.05,
        _ => 0.01,
    });
    if !(lr.is_finite() && lr > 0.0) {
        bail!("--editor-lr must be a positive number");
    }
    Ok(EditorConfig { lr, ..base })
}

pub fn load_digits(data: Option<&PathBuf>) -> anyhow::Result<ImageSet> {
    let p = data
        .cloned()
        .unwrap_or_else(crate::swav_job::default_digits);
    ImageSet::digits(&p).with_context(|| {
        format!(
            "reading the digits at {} (scripts/fetch-data.sh fetches them; or set COLONY_DIGITS)",
            p.display()
        )
    })
}

pub fn run_edit(cmd: EditCommand) -> anyhow::Result<()> {
    let EditCommand::Train(a) = cmd;
    let arch = Arch::named(&a.arch).ok_or_else(|| anyhow!("--arch {}: want mlp or cnn", a.arch))?;
    let mode = Mode::named(&a.mode)
        .ok_or_else(|| anyhow!("--mode {}: want baseline or editable", a.mode))?;
    let editor = editor_named(&a.editor, a.editor_lr)?;
    let set = load_digits(a.data.as_ref())?;
    let digits = Digits::from_set(&set).map_err(|e| anyhow!(e))?;
    let (tr, te) = digits.split(SPLIT_SEED, TEST_FRACTION);
    let mut cfg = TrainConfig::new(arch, mode);
    cfg.epochs = a.epochs;
    cfg.seed = a.seed;
    cfg.editor = editor;
    let t0 = Instant::now();
    let device = Default::default();
    let (net, _) = train::<CpuTrain>(&cfg, &tr, &device);
    let f = features_of::<Cpu>(&net, &te.pixels, &device);
    let stats = eval::evaluate(&net.plain_head(), &f, &te.labels, &editor, 200, 20, 3);
    let file = model_file(&net, mode.name(), &editor, &set, SPLIT_SEED, TEST_FRACTION)
        .map_err(|e| anyhow!(e))?;
    let id = file.save(&a.out)?;
    println!(
        "{} {} trained in {:.1} s: control error {:.2}%, 200 edits: success {:.1}%, {:.2} steps, drawdown {:.2}%",
        arch.name(),
        mode.name(),
        t0.elapsed().as_secs_f32(),
        stats.base_error * 100.0,
        stats.success_rate * 100.0,
        stats.mean_steps,
        stats.drawdown * 100.0
    );
    println!("model {id}\nwritten to {}", a.out.display());
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum PatchCommand {
    /// Ask the swarm to make the model answer TARGET on a sample.
    Submit(SubmitArgs),
    /// The node's patch chain and the proposals it knows.
    List(ApiOnly),
    /// One proposal with its votes.
    Show {
        /// The patch id (or a prefix).
        id: String,
        #[command(flatten)]
        api: ApiOnly,
    },
    /// Roll a patch back on this node (the chain is rebuilt without it).
    Rollback {
        id: String,
        #[command(flatten)]
        api: ApiOnly,
    },
}

#[derive(Debug, Clone, Args)]
pub struct ApiOnly {
    /// The node's HTTP API.
    #[arg(long, default_value = "http://127.0.0.1:8700")]
    pub api: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// The API token of requests that change state (default: read from the data directory).
    #[arg(long, env = "COLONY_API_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The node's data directory, where its API token is kept.
    #[arg(long = "data-dir", value_name = "DIR", default_value = ".colony")]
    pub token_dir: std::path::PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// The image to fix: an index into the model's control set ...
    #[arg(long, conflicts_with = "sample")]
    pub control_index: Option<usize>,
    /// ... or 64 comma-separated pixels on the 0-1 scale.
    #[arg(long)]
    pub sample: Option<String>,
    /// The class the model must answer.
    #[arg(long)]
    pub target: u32,
    /// Wait until a patch for the request is adopted (seconds; 0 = do not wait).
    #[arg(long, default_value_t = 30)]
    pub wait: u64,
    #[command(flatten)]
    pub api: ApiOnly,
}

async fn api_json<T: serde::de::DeserializeOwned>(
    rb: reqwest::RequestBuilder,
    api: &str,
) -> anyhow::Result<T> {
    let r = rb
        .send()
        .await
        .map_err(|e| anyhow!("cannot reach the node at {api}: {e}"))?;
    let status = r.status();
    let body: serde_json::Value = r.json().await.context("the node's answer is not JSON")?;
    if !status.is_success() {
        bail!(
            "{}",
            body.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("request failed")
        );
    }
    Ok(serde_json::from_value(body)?)
}

pub async fn run_patch(cmd: PatchCommand) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    match cmd {
        PatchCommand::Submit(a) => {
            let base = a.api.api.trim_end_matches('/').to_owned();
            let sample = match &a.sample {
                Some(s) => Some(
                    s.split(',')
                        .map(|v| v.trim().parse::<f32>())
                        .collect::<Result<Vec<_>, _>>()
                        .context("--sample: want comma-separated numbers")?,
                ),
                None => None,
            };
            if sample.is_none() && a.control_index.is_none() {
                bail!("give --control-index or --sample");
            }
            let req = SubmitRequest {
                sample,
                control_index: a.control_index,
                target: a.target,
            };
            let v: serde_json::Value = api_json(
                crate::http::authorize(
                    http.post(format!("{base}/api/patch/submit")).json(&req),
                    a.api.token.as_deref(),
                    &a.api.token_dir,
                ),
                &base,
            )
            .await?;
            let id = v["request"].as_str().unwrap_or_default().to_owned();
            println!("request {id} gossiped");
            let deadline = Instant::now() + Duration::from_secs(a.wait);
            while Instant::now() < deadline {
                let l: PatchList =
                    api_json(http.get(format!("{base}/api/patch/list")), &base).await?;
                let done = l
                    .proposals
                    .iter()
                    .find(|p| p.request == id && p.status == "accepted");
                if let Some(p) = done {
                    let fate = l
                        .chain
                        .iter()
                        .find(|s| s.patch == p.patch)
                        .map_or("?", |s| &s.fate);
                    println!(
                        "patch {} accepted by {} verifiers ({fate}); version {} ({} patches)",
                        &p.patch[..16],
                        p.accepts,
                        &l.version[..16],
                        l.len
                    );
                    return Ok(());
                }
                if let Some(p) = l
                    .proposals
                    .iter()
                    .find(|p| p.request == id && p.status.starts_with("rejected"))
                {
                    bail!("patch {} {}", &p.patch[..16], p.status);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            if a.wait > 0 {
                bail!(
                    "no patch adopted within {} s (see `colony patch list`)",
                    a.wait
                );
            }
            Ok(())
        }
        PatchCommand::List(a) => {
            let base = a.api.trim_end_matches('/');
            let l: PatchList = api_json(http.get(format!("{base}/api/patch/list")), base).await?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&l)?);
                return Ok(());
            }
            println!(
                "model {}  version {}  {} patches  control error {:.2}% (base {:.2}%)",
                &l.model[..16],
                &l.version[..16],
                l.len,
                l.control_error * 100.0,
                l.base_error * 100.0
            );
            for (i, s) in l.chain.iter().enumerate() {
                println!("  {:>3}  {}  {}", i + 1, &s.patch[..16], s.fate);
            }
            let pending: Vec<&ProposalView> = l
                .proposals
                .iter()
                .filter(|p| p.status != "accepted")
                .collect();
            if !pending.is_empty() {
                println!("proposals not in the chain:");
                for p in pending {
                    println!(
                        "  {}  {} ({} accept, {} reject)",
                        &p.patch[..16],
                        p.status,
                        p.accepts,
                        p.rejects
                    );
                }
            }
            Ok(())
        }
        PatchCommand::Show { id, api } => {
            let base = api.api.trim_end_matches('/');
            let p: ProposalView =
                api_json(http.get(format!("{base}/api/patch/show/{id}")), base).await?;
            if api.json {
                println!("{}", serde_json::to_string_pretty(&p)?);
                return Ok(());
            }
            println!(
                "patch {}\n  request {}\n  author {}\n  parent {}\n  target {}  steps {}  {} bytes\n  {}",
                p.patch, p.request, p.author, p.parent, p.target, p.steps, p.bytes, p.status
            );
            for v in &p.votes {
                println!(
                    "  vote {} {}: {}",
                    v.voter,
                    if v.accept { "accept" } else { "reject" },
                    v.reason
                );
            }
            Ok(())
        }
        PatchCommand::Rollback { id, api } => {
            let base = api.api.trim_end_matches('/');
            let v: serde_json::Value = api_json(
                crate::http::authorize(
                    http.post(format!("{base}/api/patch/rollback/{id}")),
                    api.token.as_deref(),
                    &api.token_dir,
                ),
                base,
            )
            .await?;
            println!(
                "rolled back; version {} ({} patches)",
                v["version"], v["len"]
            );
            Ok(())
        }
    }
}
