//! `colony train`: join (or start) a collaborative pretraining run (ALBERT on text, SwAV on
//! images). A job ([`TrainJob`]) holds everything the peers of a run must agree on and makes
//! each peer's trainer and data stream.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use colony_trainer::collab::{AlbertTrainer, Trainer, albert_cpu};
use colony_trainer::data::mlm::{MlmBatch, Sampler, TokenizedCorpus};
use colony_trainer::data::text::Corpus;
use colony_trainer::data::tokenizer::TextTokenizer;
use colony_trainer::models::albert::AlbertConfig;
use colony_trainer::optim::OptimizerConfig;
use colony_trainer::optim::lamb::LambConfig;
use colony_trainer::optim::schedule::Schedule;
use tokio_util::sync::CancellationToken;

use crate::train::{BatchSource, StepEvent, TrainConfig, TrainSummary, train};

/// A peer's trainer and its micro-batches.
pub type Setup<Batch> = (Box<dyn Trainer<Batch = Batch>>, BatchSource<Batch>);

/// A pretraining job: what the peers of one run agree on, and how a peer gets its trainer and
/// its data.
pub trait TrainJob: Clone + Send + Sync + 'static {
    type Batch: Send + 'static;
    /// A trainer with the run's initial parameters.
    fn trainer(&self) -> anyhow::Result<Box<dyn Trainer<Batch = Self::Batch>>>;
    /// Peer `peer`'s micro-batches (deterministic in the run seed, the peer, the epoch and the
    /// index).
    fn source(&self, peer: &[u8]) -> anyhow::Result<BatchSource<Self::Batch>>;
    /// Samples per micro-batch.
    fn micro_batch(&self) -> usize;
    /// The same job on CUDA device `gpu`.
    fn on_gpu(&self, gpu: usize) -> Self;
    fn setup(&self, peer: &[u8]) -> anyhow::Result<Setup<Self::Batch>> {
        Ok((self.trainer()?, self.source(peer)?))
    }
}

/// An ALBERT pretraining job: everything peers of one run must agree on.
#[derive(Debug, Clone)]
pub struct AlbertJob {
    /// `tiny`, `base` or `large`.
    pub size: String,
    pub corpus: Corpus,
    pub tokenizer: TextTokenizer,
    pub micro_batch: usize,
    pub seq: usize,
    pub lr: f32,
    pub warmup: u64,
    pub total_steps: u64,
    pub seed: u64,
    pub backend: Backend,
    /// CUDA device index (with `Backend::Cuda`).
    pub gpu: usize,
    /// Editable Training: an edit per micro-batch on the MLM head, with this weight for the
    /// edit and locality terms.
    pub editable: Option<f32>,
    /// The corpus tokenized once, shared by every trainer set up from this job (and its
    /// clones); filled on first use.
    pub tokenized: Arc<OnceLock<Arc<TokenizedCorpus>>>,
}

/// Where a trainer computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
pub enum Backend {
    /// burn-ndarray on the CPU.
    #[default]
    Ndarray,
    /// burn-cuda on an NVIDIA GPU (a build with `--features cuda`).
    Cuda,
}

impl AlbertJob {
    /// The tokenizer at `path`, or one trained on `corpus` and saved there (the run's peers
    /// must then use that file).
    pub fn tokenizer_for(
        corpus: &Corpus,
        path: &Path,
        vocab: usize,
    ) -> anyhow::Result<TextTokenizer> {
        if path.exists() {
            return TextTokenizer::load(path)
                .with_context(|| format!("loading {}", path.display()));
        }
        let t = TextTokenizer::train(corpus.texts(), vocab)?;
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let tmp = path.with_extension("json.tmp");
        t.save(&tmp)?;
        std::fs::rename(&tmp, path)?;
        tracing::info!(path = %path.display(), vocab = t.vocab_size(), "trained a tokenizer; every peer of the run must use this file");
        Ok(t)
    }

    /// The corpus as token ids (tokenized on the first call only).
    pub fn tokenized_corpus(&self) -> anyhow::Result<Arc<TokenizedCorpus>> {
        if let Some(tc) = self.tokenized.get() {
            return Ok(tc.clone());
        }
        let tc = TokenizedCorpus::new(&self.corpus, &self.tokenizer)?;
        if tc.documents.is_empty() {
            bail!("no document in the corpus has two tokens or more");
        }
        Ok(self.tokenized.get_or_init(|| Arc::new(tc)).clone())
    }
}

impl TrainJob for AlbertJob {
    type Batch = MlmBatch;

    fn trainer(&self) -> anyhow::Result<AlbertTrainer> {
        let vocab = self.tokenizer.vocab_size();
        let cfg = AlbertConfig::named(&self.size, vocab)
            .with_context(|| format!("unknown ALBERT size {:?} (tiny, base, large)", self.size))?;
        if self.seq < 8 || self.seq > cfg.max_positions {
            bail!("--seq must be between 8 and {}", cfg.max_positions);
        }
        let optimizer = OptimizerConfig::Lamb(LambConfig::default());
        let schedule = Schedule::LinearWarmupDecay {
            peak: self.lr,
            warmup: self.warmup,
            total: self.total_steps,
        };
        // Everything peers must share goes into the fingerprint.
        let extra = serde_json::to_vec(&(
            &cfg,
            &optimizer,
            &schedule,
            self.seed,
            self.seq,
            hex::encode(self.tokenizer.fingerprint()?),
        ))?;
        Ok(match self.backend {
            Backend::Ndarray => albert_cpu(&cfg, optimizer, schedule, &extra, self.seed)?,
            Backend::Cuda => cuda_trainer(&cfg, optimizer, schedule, &extra, self.seed, self.gpu)?,
        })
    }

    fn source(&self, peer: &[u8]) -> anyhow::Result<BatchSource<MlmBatch>> {
        let tc = self.tokenized_corpus()?;
        let sampler = Sampler {
            run_seed: self.seed,
            peer: peer.to_vec(),
        };
        let (mb, seq, editable) = (self.micro_batch, self.seq, self.editable);
        Ok(Arc::new(move |epoch, index| match editable {
            Some(c) => sampler.editable_batch(&tc, epoch, index, mb, seq, c),
            None => sampler.batch(&tc, epoch, index, mb, seq),
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
    cfg: &AlbertConfig,
    optimizer: OptimizerConfig,
    schedule: Schedule,
    extra: &[u8],
    seed: u64,
    gpu: usize,
) -> anyhow::Result<AlbertTrainer> {
    if !colony_trainer::backend::cuda_available() {
        bail!("--backend cuda: no CUDA driver (libcuda.so) on this machine");
    }
    Ok(colony_trainer::collab::albert_cuda(
        cfg, optimizer, schedule, extra, seed, gpu,
    )?)
}

#[cfg(not(feature = "cuda"))]
fn cuda_trainer(
    _: &AlbertConfig,
    _: OptimizerConfig,
    _: Schedule,
    _: &[u8],
    _: u64,
    _: usize,
) -> anyhow::Result<AlbertTrainer> {
    bail!(
        "--backend cuda: this colony was built without the `cuda` feature (cargo build --release --features cuda)"
    )
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The run to join or start (default: the model's name).
    #[arg(long, default_value = "")]
    pub run: String,
    /// albert-tiny|base|large (text) or swav-small|resnet18|resnet50 (images).
    #[arg(long, default_value = "albert-tiny")]
    pub model: String,
    /// ALBERT: a folder of text/fortune/JSONL files, or one file. SwAV: `digits`
    /// (scripts/fetch-data.sh), a digits .csv(.gz), or an image folder.
    #[arg(long)]
    pub data: PathBuf,
    /// tokenizer.json shared by the run (trained on --data and written here when missing).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 8000)]
    pub vocab: usize,
    /// Samples the swarm accumulates per global step.
    #[arg(long, default_value_t = 256)]
    pub target_batch: u64,
    /// Samples per micro-batch (default: 16 for ALBERT, 32 for SwAV).
    #[arg(long)]
    pub micro_batch: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
    /// Peak learning rate (default: 0.00176 with LAMB for ALBERT, 0.6 with LARS for SwAV).
    #[arg(long)]
    pub lr: Option<f32>,
    /// Warm-up steps (default: 100 for ALBERT, 0 for SwAV).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// SwAV crops, global first: COUNTxSIZE+COUNTxSIZE (default 2x224+6x96; 2x16+4x8 for
    /// the digits).
    #[arg(long)]
    pub crops: Option<String>,
    /// SwAV on an image folder: the size images are loaded at (default: 8/7 of the global
    /// crop).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// SwAV: global steps with the prototypes fixed (default: the model's, 313; 50 for small).
    #[arg(long)]
    pub freeze_prototypes: Option<u64>,
    /// Global steps of the schedule (the rate decays to zero there).
    #[arg(long, default_value_t = 10_000)]
    pub total_steps: u64,
    /// Stop after this global step (default: run until interrupted).
    #[arg(long)]
    pub steps: Option<u64>,
    /// ndarray (CPU) or cuda (GPU).
    #[arg(long, value_enum, default_value = "ndarray")]
    pub backend: Backend,
    /// CUDA device index for --backend cuda.
    #[arg(long, env = "COLONY_GPU", default_value_t = 0)]
    pub gpu: usize,
    /// Run seed (initial parameters and data order).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// ALBERT: Editable Training with this weight on the edit and locality terms (one edit of
    /// the MLM head per micro-batch, a random masked position and a random wrong token). Peers
    /// of a run should agree on it.
    #[arg(long)]
    pub editable: Option<f32>,
    /// Do not accept inbound connections (no shard, no state serving).
    #[arg(long)]
    pub client: bool,
    /// Delayed parameter updates: compute the next step's micro-batches while the all-reduce
    /// and the optimizer step run (gradients one step stale at most). Peers of a run should
    /// agree on it.
    #[arg(long)]
    pub delayed_updates: bool,
    /// Checkpoint file (default: <data-dir>/runs/<run>/checkpoint.bin).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Seconds to look for other peers before stepping alone (the first peer of a run).
    #[arg(long, default_value_t = 5.0)]
    pub discovery: f64,
    /// Upload this peer may use, Mbit/s (its measured bandwidth is capped at it).
    #[arg(long)]
    pub max_upload_mbit: Option<f64>,
    /// Download this peer may use, Mbit/s.
    #[arg(long)]
    pub max_download_mbit: Option<f64>,
    /// Average with CenteredClip of this radius instead of the exact mean (when this peer
    /// leads a group): a Byzantine peer moves each part by at most its share times the radius
    /// per iteration, and a copy far larger than the others' is dropped and its sender banned.
    #[arg(long, value_name = "TAU")]
    pub centered_clip: Option<f64>,
    /// Write what happened (this peer's id, every global step, samples, times) as JSON here
    /// when training ends.
    #[arg(long)]
    pub summary: Option<PathBuf>,
    #[command(flatten)]
    pub node: crate::cli::NodeArgs,
}

/// Runs `colony train`.
pub async fn run(mut args: TrainArgs) -> anyhow::Result<()> {
    if args.run.is_empty() {
        args.run = args.model.clone();
    }
    let mut node_cfg = args.node.resolve()?;
    if args.node.listen.is_empty() && node_cfg.listen.is_empty() {
        node_cfg.listen = vec!["/ip4/0.0.0.0/udp/0/quic-v1".parse()?];
    }
    let run_dir = node_cfg.data_dir.join("runs").join(&args.run);
    if let Some(size) = args.model.strip_prefix("albert-") {
        let corpus = Corpus::read(&args.data)
            .with_context(|| format!("reading --data {}", args.data.display()))?;
        let tok_path = args
            .tokenizer
            .clone()
            .unwrap_or_else(|| run_dir.join("tokenizer.json"));
        let tokenizer = AlbertJob::tokenizer_for(&corpus, &tok_path, args.vocab)?;
        let job = AlbertJob {
            size: size.to_string(),
            corpus,
            tokenizer,
            micro_batch: args.micro_batch.unwrap_or(16),
            seq: args.seq,
            lr: args.lr.unwrap_or(0.00176),
            warmup: args.warmup.unwrap_or(100),
            total_steps: args.total_steps,
            seed: args.seed,
            backend: args.backend,
            gpu: args.gpu,
            editable: args.editable,
            tokenized: Default::default(),
        };
        run_job(&args, node_cfg, &run_dir, job).await
    } else if let Some(backbone) = args.model.strip_prefix("swav-") {
        use crate::swav_job::SwavJob;
        let global = match &args.crops {
            Some(c) => crate::swav_job::parse_crops(c)?[0].1,
            None => 224,
        };
        let load = args.image_size.unwrap_or(global * 8 / 7);
        let images = SwavJob::load_images(&args.data, load)?;
        let augment = SwavJob::augment_for(&images, args.crops.as_deref())?;
        let job = SwavJob {
            backbone: backbone.to_string(),
            images: Arc::new(images),
            augment,
            micro_batch: args.micro_batch.unwrap_or(32),
            lr: args.lr.unwrap_or(0.6),
            warmup: args.warmup.unwrap_or(0),
            total_steps: args.total_steps,
            freeze_prototypes: args.freeze_prototypes,
            seed: args.seed,
            backend: args.backend,
            gpu: args.gpu,
        };
        run_job(&args, node_cfg, &run_dir, job).await
    } else {
        bail!(
            "--model {:?}: albert-tiny|base|large or swav-small|resnet18|resnet50",
            args.model
        )
    }
}

async fn run_job<J: TrainJob>(
    args: &TrainArgs,
    node_cfg: crate::config::NodeConfig,
    run_dir: &Path,
    job: J,
) -> anyhow::Result<()> {
    let node = crate::node::Node::start(node_cfg).await?;
    let me = node.peer_id();
    let (trainer, source) = job.setup(&me.to_bytes())?;
    eprintln!(
        "run {} · {} · {} parameters · target batch {} · peer {}",
        args.run,
        args.model,
        trainer.len(),
        args.target_batch,
        node.peer_id()
    );
    let mut cfg = TrainConfig::new(&args.run, args.target_batch);
    cfg.max_steps = args.steps;
    cfg.client = args.client;
    cfg.delayed = args.delayed_updates;
    cfg.discovery = Duration::try_from_secs_f64(args.discovery).map_err(|_| {
        anyhow::anyhow!("--discovery {} is not a number of seconds", args.discovery)
    })?;
    let bytes_per_s = |mbit: Option<f64>| mbit.map(|m| m * 1e6 / 8.0);
    cfg.bandwidth_cap = (
        bytes_per_s(args.max_upload_mbit),
        bytes_per_s(args.max_download_mbit),
    );
    if let Some(up) = cfg.bandwidth_cap.0 {
        cfg.bandwidth = cfg.bandwidth.min(up);
    }
    if let Some(tau) = args.centered_clip {
        anyhow::ensure!(
            tau.is_finite() && tau > 0.0,
            "--centered-clip {tau}: the radius must be a positive number"
        );
        cfg.matching.aggregation =
            colony_trainer::allreduce::reducer::Aggregation::CenteredClip { tau, iters: 10 };
    }
    cfg.checkpoint = Some(
        args.checkpoint
            .clone()
            .unwrap_or_else(|| run_dir.join("checkpoint.bin")),
    );
    let stop = CancellationToken::new();
    let s2 = stop.clone();
    // SIGINT or SIGTERM: stop after the current micro-batch, write the checkpoint, exit 0.
    tokio::spawn(async move {
        crate::cli::wait_for_signal().await;
        s2.cancel();
    });
    let t0 = Instant::now();
    let h = node.handle.clone();
    let watch = tokio::spawn(progress_line(
        h.clone(),
        args.run.clone(),
        trainer.fingerprint(),
        args.target_batch,
        stop.clone(),
    ));
    let result = train(&h, trainer, source, &cfg, stop.clone()).await;
    stop.cancel();
    let _ = watch.await;
    node.shutdown().await;
    let (_, summary) = result?;
    print_summary(&summary, t0.elapsed());
    if let Some(path) = &args.summary {
        let doc = PeerSummary {
            peer: me.to_string(),
            run: args.run.clone(),
            model: args.model.clone(),
            summary,
        };
        crate::storage::write_atomic(path, &serde_json::to_vec_pretty(&doc)?, 0o644)
            .with_context(|| format!("writing --summary {}", path.display()))?;
    }
    Ok(())
}

/// The file `colony train --summary` writes.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct PeerSummary {
    /// This peer's id (base58).
    pub peer: String,
    pub run: String,
    pub model: String,
    #[serde(flatten)]
    pub summary: TrainSummary,
}

async fn progress_line(
    h: crate::handle::NodeHandle,
    run: String,
    fp: [u8; 32],
    target: u64,
    stop: CancellationToken,
) {
    let Ok(key) = colony_protocol::DhtKey::run_progress(&run) else {
        return;
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let rs = crate::train::read_progress(&h, &key, &fp).await;
        let now = crate::clock::now_ms();
        if let Some(v) = colony_trainer::collab::GlobalView::of(&rs, now) {
            eprintln!(
                "step {:>5} · {:>5}/{} samples · {:>7.1} samples/s · {} peers",
                v.epoch,
                v.estimated as u64,
                target,
                v.samples_per_sec,
                rs.len()
            );
        }
    }
}

pub fn print_summary(s: &TrainSummary, elapsed: Duration) {
    println!(
        "reached global step {} in {:.1} s ({} micro-batches, {} samples here)",
        s.final_epoch,
        elapsed.as_secs_f64(),
        s.micro_batches,
        s.samples
    );
    for e in &s.events {
        match e {
            StepEvent::Averaged {
                epoch,
                peers,
                samples,
                loss,
                seconds,
                ..
            } => println!(
                "  step {epoch:>4}: averaged with {peers} peers over {samples} samples, loss {loss:.3}, {seconds:.2} s"
            ),
            StepEvent::Alone { epoch, loss, .. } => {
                println!("  step {epoch:>4}: alone, loss {loss:.3}")
            }
            StepEvent::Downloaded {
                epoch,
                donors,
                bytes,
            } => {
                println!("  caught up to step {epoch} from {donors} peers ({bytes} bytes)")
            }
            StepEvent::Skipped { epoch, why } => println!("  step {epoch:>4}: skipped ({why})"),
        }
    }
}
