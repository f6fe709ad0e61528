//! `colony bench train`: collaborative ALBERT pretraining, N peers on loopback against one
//! process doing the same work.
//!
//! The swarm: N real nodes in this process (QUIC/TCP on 127.0.0.1, DHT progress, matchmaking,
//! all-reduce). The single node: one trainer that replays exactly the micro-batches the swarm
//! averaged at each step (same global batch, same data order), timed, without a network. So
//! one run gives the throughput ratio (the collaboration's overhead on the same cores), the two
//! loss curves, and how far the swarm's parameters drifted from the single process's.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use colony_trainer::data::mlm::Sampler;
use colony_trainer::data::text::Corpus;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::local::{LocalSwarm, LocalSwarmConfig};
use crate::train::{StepEvent, TrainConfig, train};
use crate::train_cli::AlbertJob;

#[derive(Debug, Args)]
pub struct TrainBenchArgs {
    #[arg(long, default_value_t = 4)]
    pub peers: usize,
    /// Global steps.
    #[arg(long, default_value_t = 12)]
    pub steps: u64,
    #[arg(long, default_value_t = 256)]
    pub target_batch: u64,
    #[arg(long, default_value_t = 16)]
    pub micro_batch: usize,
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
    #[arg(long, default_value = "albert-tiny")]
    pub model: String,
    #[arg(long, default_value_t = 8000)]
    pub vocab: usize,
    #[arg(long, default_value_t = 0.01)]
    pub lr: f32,
    /// Text corpus (default: Debian's fortunes).
    #[arg(long, default_value = "/usr/share/games/fortunes")]
    pub data: PathBuf,
    /// ndarray (CPU) or cuda (GPU).
    #[arg(long, value_enum, default_value = "ndarray")]
    pub backend: crate::train_cli::Backend,
    /// GPUs to spread the peers over (peer i uses GPU i mod N) with --backend cuda.
    #[arg(long, default_value_t = 1)]
    pub gpus: usize,
    /// Only time one process (no swarm): the single-device samples/s.
    #[arg(long)]
    pub single_only: bool,
    /// A smaller run (under a minute on 2 cores), same code path.
    #[arg(long)]
    pub quick: bool,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
struct Case {
    model: String,
    backend: &'static str,
    peers: usize,
    target_batch: u64,
    micro_batch: usize,
    seq: usize,
    steps: u64,
    samples_per_s: f64,
    samples_per_s_single: f64,
    /// Swarm throughput over one process's: above 1 on a machine with fewer cores than peers
    /// when N streams use the cores better than one.
    scaling_efficiency: f64,
    /// The same micro-batches on N threads with no network or synchronisation.
    samples_per_s_compute_only: f64,
    /// Swarm throughput over the compute-only figure: what the collaboration costs.
    collaboration_efficiency: f64,
    /// Mean time per global step in the swarm, and the part of it outside micro-batches
    /// (matchmaking wait + all-reduce + optimizer step), measured at peer 0.
    step_s: f64,
    /// Share of the swarm's wall time a peer spends between its last micro-batch of a step and
    /// the step applied (waiting for the start, matchmaking, all-reduce, optimizer), mean over
    /// peers.
    averaging_fraction: f64,
    loss_at_step: Vec<f64>,
    loss_single_at_step: Vec<f64>,
    max_param_diff_vs_single: f64,
    averaged_steps: usize,
    cores: usize,
}

pub async fn run(mut a: TrainBenchArgs) -> anyhow::Result<()> {
    if a.quick {
        a.peers = a.peers.min(3);
        a.steps = a.steps.min(4);
        a.target_batch = a.target_batch.min(48);
        a.micro_batch = a.micro_batch.min(8);
        a.seq = a.seq.min(32);
        a.vocab = a.vocab.min(2000);
    }
    if a.peers < 2 {
        bail!("--peers must be at least 2");
    }
    let size = a
        .model
        .strip_prefix("albert-")
        .context("only albert-* models for now")?
        .to_string();
    let dir = tempfile::tempdir()?;
    let corpus = Corpus::read(&a.data).with_context(|| format!("reading {}", a.data.display()))?;
    let tokenizer = AlbertJob::tokenizer_for(&corpus, &dir.path().join("tokenizer.json"), a.vocab)?;
    let job = AlbertJob {
        size,
        corpus,
        tokenizer,
        micro_batch: a.micro_batch,
        seq: a.seq,
        lr: a.lr,
        warmup: 2,
        total_steps: 10_000,
        seed: 1,
        backend: a.backend,
        gpu: 0,
        tokenized: Default::default(),
    };

    if a.single_only {
        return single_only(&a, &job);
    }

    // The swarm.
    let swarm = LocalSwarm::start(
        dir.path(),
        LocalSwarmConfig {
            nodes: a.peers,
            ..Default::default()
        },
    )
    .await?;
    swarm
        .wait_for_routing(a.peers.min(4) - 1, Duration::from_secs(30))
        .await?;
    let stop = CancellationToken::new();
    let mut cfg = TrainConfig::new("bench", a.target_batch);
    cfg.max_steps = Some(a.steps);
    let mut peers_ids = Vec::new();
    let mut setups = Vec::new();
    for (i, n) in swarm.nodes.iter().enumerate() {
        let id = n.peer_id().to_bytes();
        let peer_job = AlbertJob {
            gpu: i % a.gpus.max(1),
            ..job.clone()
        };
        let (mut trainer, source) = peer_job.setup(&id)?;
        // One micro-batch before the clock starts: GPU kernels compile on first use.
        trainer.accumulate(&(source)(u64::MAX, 0))?;
        trainer.reset_accumulator();
        setups.push((trainer, source));
        peers_ids.push(id);
    }
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (n, (trainer, source)) in swarm.nodes.iter().zip(setups) {
        let (h, cfg, stop) = (n.handle.clone(), cfg.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            train(&h, trainer, source, &cfg, stop).await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.context("a peer's task failed")??);
    }
    let swarm_s = t0.elapsed().as_secs_f64();
    swarm.shutdown().await;
    let swarm_samples: u64 = results.iter().map(|(_, s)| s.samples).sum();

    // Which micro-batches each peer contributed at each step, and its loss there.
    let steps = a.steps as usize;
    let mut plan: Vec<Vec<(usize, u64)>> = vec![Vec::new(); steps];
    let mut loss_num = vec![0.0f64; steps];
    let mut loss_den = vec![0.0f64; steps];
    let mut averaged_steps = 0;
    let mut averaging_s = 0.0f64;
    for (p, (_, s)) in results.iter().enumerate() {
        for e in &s.events {
            if let StepEvent::Averaged {
                epoch,
                micro_batches,
                own_samples,
                loss,
                seconds,
                ..
            } = e
            {
                averaging_s += seconds;
                let i = *epoch as usize;
                if i < steps {
                    plan[i].push((p, *micro_batches));
                    if loss.is_finite() {
                        loss_num[i] += f64::from(*loss) * *own_samples as f64;
                        loss_den[i] += *own_samples as f64;
                    }
                }
                if p == 0 {
                    averaged_steps += 1;
                }
            }
        }
    }
    if averaged_steps < steps {
        eprintln!(
            "note: peer 0 averaged {averaged_steps} of {steps} steps (the others were taken alone or downloaded); the parameter comparison covers the averaged ones only"
        );
    }
    let loss_at_step: Vec<f64> = loss_num
        .iter()
        .zip(&loss_den)
        .map(|(n, d)| if *d > 0.0 { n / d } else { f64::NAN })
        .collect();

    // The single process: the same micro-batches, one step per global step.
    let tc = job.tokenized_corpus()?;
    let (mut single, warm) = job.setup(b"single")?;
    single.accumulate(&(warm)(u64::MAX, 0))?;
    single.reset_accumulator();
    let mut loss_single = Vec::new();
    let mut single_samples = 0u64;
    let t1 = Instant::now();
    for step in plan.iter().take(steps) {
        let epoch = single.epoch();
        let (mut sum, mut n) = (0.0f64, 0u64);
        for &(p, k) in step {
            let s = Sampler {
                run_seed: job.seed,
                peer: peers_ids[p].clone(),
            };
            for j in 0..k {
                let b = s.batch(&tc, epoch, j, job.micro_batch, job.seq);
                let l = single.accumulate(&b)?;
                sum += f64::from(l) * b.batch as f64;
                n += b.batch as u64;
            }
        }
        single_samples += n;
        loss_single.push(if n > 0 { sum / n as f64 } else { f64::NAN });
        let g = single.mean_gradient();
        single.apply(&g)?;
    }
    let single_s = t1.elapsed().as_secs_f64();

    // The same peers' micro-batches computed concurrently, one thread per peer, with no network
    // and no synchronisation: what these cores give N streams at best.
    let mut work = Vec::new();
    for (p, id) in peers_ids.iter().enumerate() {
        let mine: Vec<(u64, u64)> = plan
            .iter()
            .enumerate()
            .flat_map(|(e, step)| {
                step.iter()
                    .filter(|(q, _)| *q == p)
                    .map(move |(_, k)| (e as u64, *k))
            })
            .collect();
        let peer_job = AlbertJob {
            gpu: p % a.gpus.max(1),
            ..job.clone()
        };
        let (mut t, source) = peer_job.setup(id)?;
        t.accumulate(&(source)(u64::MAX, 0))?;
        t.reset_accumulator();
        work.push((t, mine, id.clone()));
    }
    let t2 = Instant::now();
    let mut threads = Vec::new();
    for (mut t, mine, id) in work {
        let (tc, seed, mb, seq) = (tc.clone(), job.seed, job.micro_batch, job.seq);
        threads.push(std::thread::spawn(move || -> anyhow::Result<u64> {
            let s = Sampler {
                run_seed: seed,
                peer: id,
            };
            let mut n = 0;
            for (e, k) in mine {
                for j in 0..k {
                    let b = s.batch(&tc, e, j, mb, seq);
                    t.accumulate(&b)?;
                    n += b.batch as u64;
                }
                t.reset_accumulator();
            }
            Ok(n)
        }));
    }
    let mut concurrent_samples = 0;
    for t in threads {
        concurrent_samples += t
            .join()
            .map_err(|_| anyhow::anyhow!("a compute thread panicked"))??;
    }
    let concurrent_s = t2.elapsed().as_secs_f64();
    let swarm_params = results[0].0.params();
    let max_diff = swarm_params
        .iter()
        .zip(single.params())
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max);

    let sps = swarm_samples as f64 / swarm_s;
    let sps_single = single_samples as f64 / single_s;
    let sps_concurrent = concurrent_samples as f64 / concurrent_s;
    let case = Case {
        model: a.model.clone(),
        backend: match a.backend {
            crate::train_cli::Backend::Ndarray => "ndarray",
            crate::train_cli::Backend::Cuda => "cuda",
        },
        peers: a.peers,
        target_batch: a.target_batch,
        micro_batch: a.micro_batch,
        seq: a.seq,
        steps: a.steps,
        samples_per_s: sps,
        samples_per_s_single: sps_single,
        scaling_efficiency: sps / sps_single,
        samples_per_s_compute_only: sps_concurrent,
        collaboration_efficiency: sps / sps_concurrent,
        step_s: swarm_s / a.steps as f64,
        averaging_fraction: averaging_s / a.peers as f64 / swarm_s,
        loss_at_step,
        loss_single_at_step: loss_single,
        max_param_diff_vs_single: max_diff,
        averaged_steps,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    println!(
        "{} · {} peers · target batch {} · {} steps on {} cores",
        case.model, case.peers, case.target_batch, case.steps, case.cores
    );
    println!(
        "swarm  {:>8.1} samples/s ({} samples in {:.1} s, {:.2} s per step)",
        sps, swarm_samples, swarm_s, case.step_s
    );
    println!(
        "       {:.1}% of a peer's time between its last micro-batch and the step",
        100.0 * case.averaging_fraction
    );
    println!(
        "single {:>8.1} samples/s ({} samples in {:.1} s, same micro-batches)",
        sps_single, single_samples, single_s
    );
    println!(
        "compute only {:>4.1} samples/s ({} threads, same micro-batches, no network)",
        sps_concurrent, a.peers
    );
    println!(
        "scaling efficiency {:.3} (swarm / single); collaboration efficiency {:.3} (swarm / compute only)",
        case.scaling_efficiency, case.collaboration_efficiency
    );
    println!("step   swarm loss   single loss");
    for (i, (x, y)) in case
        .loss_at_step
        .iter()
        .zip(&case.loss_single_at_step)
        .enumerate()
    {
        println!("{i:>4}   {x:>10.4}   {y:>11.4}");
    }
    println!("max |param swarm − param single| = {max_diff:.3e}");
    if let Some(p) = &a.json {
        super::write_json(p, "train", &[case])?;
    }
    Ok(())
}

/// One trainer, no network: `steps` global steps of `target_batch` samples each. Reports
/// samples/s after a warm-up step (GPU kernels compile on first use).
fn single_only(a: &TrainBenchArgs, job: &AlbertJob) -> anyhow::Result<()> {
    let tc = job.tokenized_corpus()?;
    let (mut t, _) = job.setup(b"single")?;
    let s = Sampler {
        run_seed: job.seed,
        peer: b"single".to_vec(),
    };
    let per_step = (a.target_batch as usize).div_ceil(job.micro_batch) as u64;
    let mut timed = 0u64;
    let mut t0 = Instant::now();
    let mut losses = Vec::new();
    for step in 0..=a.steps {
        if step == 1 {
            t0 = Instant::now();
            timed = 0;
        }
        let mut sum = 0.0;
        for j in 0..per_step {
            let b = s.batch(&tc, step, j, job.micro_batch, job.seq);
            sum += t.accumulate(&b)?;
            timed += b.batch as u64;
        }
        losses.push(sum / per_step as f32);
        let g = t.mean_gradient();
        t.apply(&g)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let sps = timed as f64 / secs;
    println!(
        "{} on {:?}: {} parameters, {:.1} samples/s ({} samples, {} steps after one warm-up step, {:.2} s per step); losses {:?}",
        a.model,
        a.backend,
        t.len(),
        sps,
        timed,
        a.steps,
        secs / a.steps as f64,
        losses
    );
    if let Some(p) = &a.json {
        super::write_json(
            p,
            "train",
            &[serde_json::json!({
                "model": a.model,
                "backend": format!("{:?}", a.backend).to_lowercase(),
                "peers": 1,
                "parameters": t.len(),
                "target_batch": a.target_batch,
                "micro_batch": a.micro_batch,
                "seq": a.seq,
                "samples_per_s_single": sps,
                "step_s": secs / a.steps as f64,
                "loss_single_at_step": losses,
            })],
        )?;
    }
    Ok(())
}
