//! `colony train`: join (or start) a collaborative ALBERT pretraining run.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use colony_trainer::collab::{AlbertTrainer, albert_cpu};
use colony_trainer::data::mlm::{MlmBatch, Sampler, TokenizedCorpus};
use colony_trainer::data::text::Corpus;
use colony_trainer::data::tokenizer::TextTokenizer;
use colony_trainer::models::albert::AlbertConfig;
use colony_trainer::optim::OptimizerConfig;
use colony_trainer::optim::lamb::LambConfig;
use colony_trainer::optim::schedule::Schedule;
use tokio_util::sync::CancellationToken;

use crate::train::{BatchSource, StepEvent, TrainConfig, TrainSummary, train};

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

    /// This peer's trainer (seeded initial parameters) and its data stream.
    pub fn setup(&self, peer: &[u8]) -> anyhow::Result<(AlbertTrainer, BatchSource<MlmBatch>)> {
        let vocab = self.tokenizer.vocab_size();
        let cfg = AlbertConfig::named(&self.size, vocab)
            .with_context(|| format!("unknown ALBERT size {:?} (tiny, base, large)", self.size))?;
        if self.seq < 8 || self.seq > cfg.max_positions {
            bail!("--seq must be between 8 and {}", cfg.max_positions);
        }
        let tc = self.tokenized_corpus()?;
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
        let trainer = match self.backend {
            Backend::Ndarray => albert_cpu(&cfg, optimizer, schedule, &extra, self.seed)?,
            Backend::Cuda => cuda_trainer(&cfg, optimizer, schedule, &extra, self.seed, self.gpu)?,
        };
        let sampler = Sampler {
            run_seed: self.seed,
            peer: peer.to_vec(),
        };
        let (mb, seq) = (self.micro_batch, self.seq);
        let source: BatchSource<MlmBatch> =
            Arc::new(move |epoch, index| sampler.batch(&tc, epoch, index, mb, seq));
        Ok((trainer, source))
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
    /// The run to join or start.
    #[arg(long, default_value = "albert")]
    pub run: String,
    /// albert-tiny, albert-base or albert-large.
    #[arg(long, default_value = "albert-tiny")]
    pub model: String,
    /// Text corpus: a folder of text/fortune/JSONL files, or one file.
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
    #[arg(long, default_value_t = 16)]
    pub micro_batch: usize,
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
    /// Peak learning rate (LAMB).
    #[arg(long, default_value_t = 0.00176)]
    pub lr: f32,
    #[arg(long, default_value_t = 100)]
    pub warmup: u64,
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
    /// Do not accept inbound connections (no shard, no state serving).
    #[arg(long)]
    pub client: bool,
    /// Checkpoint file (default: <data-dir>/runs/<run>/checkpoint.bin).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    #[command(flatten)]
    pub node: crate::cli::NodeArgs,
}

/// Runs `colony train`.
pub async fn run(args: TrainArgs) -> anyhow::Result<()> {
    let size = args
        .model
        .strip_prefix("albert-")
        .with_context(|| {
            format!(
                "--model {:?}: only albert-tiny|base|large are trainable for now",
                args.model
            )
        })?
        .to_string();
    let mut node_cfg = args.node.resolve()?;
    if args.node.listen.is_empty() && node_cfg.listen.is_empty() {
        node_cfg.listen = vec!["/ip4/0.0.0.0/udp/0/quic-v1".parse()?];
    }
    let corpus = Corpus::read(&args.data)
        .with_context(|| format!("reading --data {}", args.data.display()))?;
    let run_dir = node_cfg.data_dir.join("runs").join(&args.run);
    let tok_path = args
        .tokenizer
        .clone()
        .unwrap_or_else(|| run_dir.join("tokenizer.json"));
    let tokenizer = AlbertJob::tokenizer_for(&corpus, &tok_path, args.vocab)?;
    let job = AlbertJob {
        size,
        corpus,
        tokenizer,
        micro_batch: args.micro_batch,
        seq: args.seq,
        lr: args.lr,
        warmup: args.warmup,
        total_steps: args.total_steps,
        seed: args.seed,
        backend: args.backend,
        gpu: args.gpu,
        tokenized: Default::default(),
    };
    let node = crate::node::Node::start(node_cfg).await?;
    let (trainer, source) = job.setup(&node.peer_id().to_bytes())?;
    eprintln!(
        "run {} · albert-{} · {} parameters · target batch {} · peer {}",
        args.run,
        job.size,
        trainer.len(),
        args.target_batch,
        node.peer_id()
    );
    let mut cfg = TrainConfig::new(&args.run, args.target_batch);
    cfg.max_steps = args.steps;
    cfg.client = args.client;
    cfg.checkpoint = Some(
        args.checkpoint
            .clone()
            .unwrap_or_else(|| run_dir.join("checkpoint.bin")),
    );
    let stop = CancellationToken::new();
    let s2 = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
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
    Ok(())
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
