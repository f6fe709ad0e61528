//! `colony bench train`: collaborative pretraining (ALBERT or SwAV), N peers on loopback
//! against one process doing the same work.
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
use colony_trainer::data::text::Corpus;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::local::{LocalSwarm, LocalSwarmConfig};
use crate::swav_job::SwavJob;
use crate::train::{StepEvent, TrainConfig, TrainSummary, train};
use crate::train_cli::{AlbertJob, TrainJob};

#[derive(Debug, Clone, Args)]
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
    /// albert-tiny|base|large or swav-small|resnet18|resnet50.
    #[arg(long, default_value = "albert-tiny")]
    pub model: String,
    #[arg(long, default_value_t = 8000)]
    pub vocab: usize,
    /// Peak rate (default: 0.01 for ALBERT, 0.6 for SwAV).
    #[arg(long)]
    pub lr: Option<f32>,
    /// ALBERT: text corpus (default: Debian's fortunes). SwAV: `digits` (the default), a
    /// digits CSV or an image folder; a folder of synthetic images is made for `synthetic`.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// SwAV crops, as for `colony train` (default: 2x224+6x96; 2x16+4x8 on the digits).
    #[arg(long)]
    pub crops: Option<String>,
    /// ndarray (CPU) or cuda (GPU).
    #[arg(long, value_enum, default_value = "ndarray")]
    pub backend: crate::train_cli::Backend,
    /// GPUs to spread the peers over (peer i uses GPU i mod N) with --backend cuda.
    #[arg(long, default_value_t = 1)]
    pub gpus: usize,
    /// Delayed parameter updates (the swarm's parameters then differ from the synchronous
    /// replay's by design).
    #[arg(long)]
    pub delayed: bool,
    /// Only time one process (no swarm): the single-device samples/s.
    #[arg(long)]
    pub single_only: bool,
    /// A smaller run (under a minute on 2 cores), same code path.
    #[arg(long)]
    pub quick: bool,
    /// Run the peers as `colony train` processes, each in its own network namespace on
    /// shaped links (needs root): `none` (namespaces, no shaping) or an all-reduce profile
    /// (uniform, hetero, asym, clients), whose 8 links are sampled evenly for --peers.
    #[arg(long)]
    pub links: Option<String>,
    /// Multiplies the profile's rates.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Second octet of the namespaces' addresses (10.NET.0.x).
    #[arg(long, default_value_t = 47)]
    pub net: u8,
    /// Keep the peers' data folders (logs, summaries, checkpoints) here instead of in a
    /// temporary folder that is removed.
    #[arg(long)]
    pub keep: Option<PathBuf>,
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
    delayed: bool,
    /// Micro-batches computed while an all-reduce ran (delayed updates), all peers.
    overlapped_micro_batches: u64,
    cores: usize,
    /// Where the peers ran: "in-process" (loopback) or "processes in namespaces".
    setup: &'static str,
    /// Each peer's shaped (up, down) Mbit/s, when shaped.
    links_mbit: Vec<(f64, f64)>,
    /// The peers' training start times spread over this many seconds (processes start
    /// one after another).
    start_spread_s: f64,
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
    let tmp = tempfile::tempdir()?;
    let dir = match &a.keep {
        Some(keep) => {
            std::fs::create_dir_all(keep)
                .with_context(|| format!("cannot create {}", keep.display()))?;
            keep.clone()
        }
        None => tmp.path().to_owned(),
    };
    if let Some(size) = a.model.strip_prefix("albert-") {
        let data = a
            .data
            .clone()
            .unwrap_or_else(|| PathBuf::from("/usr/share/games/fortunes"));
        let corpus = Corpus::read(&data).with_context(|| format!("reading {}", data.display()))?;
        let tok_path = dir.as_path().join("tokenizer.json");
        let tokenizer = AlbertJob::tokenizer_for(&corpus, &tok_path, a.vocab)?;
        let lr = a.lr.unwrap_or(0.01);
        let cli = strings(&[
            "--data",
            &data.to_string_lossy(),
            "--tokenizer",
            &tok_path.to_string_lossy(),
            "--seq",
            &a.seq.to_string(),
            "--lr",
            &lr.to_string(),
        ]);
        let job = AlbertJob {
            size: size.to_string(),
            corpus,
            tokenizer,
            micro_batch: a.micro_batch,
            seq: a.seq,
            lr,
            warmup: 2,
            total_steps: 10_000,
            seed: 1,
            backend: a.backend,
            gpu: 0,
            editable: None,
            tokenized: Default::default(),
        };
        bench_job(&a, dir.as_path(), job, cli).await
    } else if let Some(backbone) = a.model.strip_prefix("swav-") {
        let data = a.data.clone().unwrap_or_else(|| PathBuf::from("digits"));
        let global = match &a.crops {
            Some(c) => crate::swav_job::parse_crops(c)?[0].1,
            None => 224,
        };
        let (images, data) = if data.as_os_str() == "synthetic" {
            let folder = dir.as_path().join("images");
            (synthetic_images(&folder, global * 8 / 7)?, folder)
        } else {
            (SwavJob::load_images(&data, global * 8 / 7)?, data)
        };
        let lr = a.lr.unwrap_or(0.6);
        let mut cli = strings(&["--data", &data.to_string_lossy(), "--lr", &lr.to_string()]);
        if let Some(c) = &a.crops {
            cli.extend(strings(&["--crops", c]));
        }
        let augment = SwavJob::augment_for(&images, a.crops.as_deref())?;
        let job = SwavJob {
            backbone: backbone.to_string(),
            images: std::sync::Arc::new(images),
            augment,
            micro_batch: a.micro_batch,
            lr,
            warmup: 2,
            total_steps: 10_000,
            freeze_prototypes: None,
            seed: 1,
            backend: a.backend,
            gpu: 0,
        };
        bench_job(&a, dir.as_path(), job, cli).await
    } else {
        bail!("--model {:?}: albert-* or swav-*", a.model)
    }
}

/// 512 RGB images of random shapes on noise (for timing SwAV where no image folder is at hand;
/// the content does not change the compute).
fn synthetic_images(
    dir: &std::path::Path,
    size: usize,
) -> anyhow::Result<colony_trainer::data::images::ImageSet> {
    use rand::{Rng, SeedableRng};
    std::fs::create_dir_all(dir)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let side = u32::try_from(size)?;
    for i in 0..512 {
        let (cx, cy, r) = (
            rng.gen_range(0..side),
            rng.gen_range(0..side),
            rng.gen_range(side / 8..side / 2),
        );
        let colour: [u8; 3] = rng.r#gen();
        let img = colony_trainer::image::RgbImage::from_fn(side, side, |x, y| {
            let d = (x as i64 - cx as i64).pow(2) + (y as i64 - cy as i64).pow(2);
            if d < (r as i64).pow(2) {
                colony_trainer::image::Rgb(colour)
            } else {
                let v: u8 = rng.r#gen();
                colony_trainer::image::Rgb([v / 2, v / 2, v / 2])
            }
        });
        img.save(dir.join(format!("{i:04}.png")))?;
    }
    Ok(colony_trainer::data::images::ImageSet::folder(dir, size)?)
}

fn strings(xs: &[&str]) -> Vec<String> {
    xs.iter().map(|s| s.to_string()).collect()
}

/// What the swarm did, however it ran.
struct SwarmRun {
    /// The peers' ids (bytes), in the order of `summaries`.
    ids: Vec<Vec<u8>>,
    summaries: Vec<TrainSummary>,
    /// From the first peer's start to the last peer's end.
    seconds: f64,
    /// Peer 0's parameters at the end.
    params0: Vec<f32>,
    setup: &'static str,
    links_mbit: Vec<(f64, f64)>,
    start_spread_s: f64,
}

/// `cli`: the `colony train` flags that make the same job in another process.
async fn bench_job<J: TrainJob>(
    a: &TrainBenchArgs,
    dir: &std::path::Path,
    job: J,
    cli: Vec<String>,
) -> anyhow::Result<()> {
    if a.single_only {
        return single_only(a, &job);
    }
    let run = match &a.links {
        None => in_process(a, dir, &job).await?,
        Some(profile) => {
            let (a2, dir2, profile) = (a.clone(), dir.to_path_buf(), profile.clone());
            tokio::task::spawn_blocking(move || in_namespaces(&a2, &dir2, &profile, &cli))
                .await
                .context("the namespace swarm panicked")??
        }
    };
    analyse(a, &job, run)
}

/// N real nodes in this process on loopback.
async fn in_process<J: TrainJob>(
    a: &TrainBenchArgs,
    dir: &std::path::Path,
    job: &J,
) -> anyhow::Result<SwarmRun> {
    let swarm = LocalSwarm::start(
        dir,
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
    cfg.delayed = a.delayed;
    let mut ids = Vec::new();
    let mut setups = Vec::new();
    for (i, n) in swarm.nodes.iter().enumerate() {
        let id = n.peer_id().to_bytes();
        let (mut trainer, source) = job.on_gpu(i % a.gpus.max(1)).setup(&id)?;
        // One micro-batch before the clock starts: GPU kernels compile on first use.
        trainer.accumulate(&(source)(u64::MAX, 0))?;
        trainer.reset_accumulator();
        setups.push((trainer, source));
        ids.push(id);
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
    let seconds = t0.elapsed().as_secs_f64();
    swarm.shutdown().await;
    let params0 = results[0].0.params().to_vec();
    Ok(SwarmRun {
        ids,
        summaries: results.into_iter().map(|(_, s)| s).collect(),
        seconds,
        params0,
        setup: "in-process",
        links_mbit: Vec::new(),
        start_spread_s: 0.0,
    })
}

/// The links of `profile` for `n` peers: its 8 sampled evenly, fastest and slowest included.
fn links_for(profile: &str, n: usize, scale: f64) -> anyhow::Result<Vec<(f64, f64, bool)>> {
    if profile == "none" {
        return Ok(vec![(f64::INFINITY, f64::INFINITY, false); n]);
    }
    let all = crate::bench::allreduce::profile(profile)?;
    Ok((0..n)
        .map(|i| {
            let l = &all[i * (all.len() - 1) / (n - 1).max(1)];
            (l.up_mbit * scale, l.down_mbit * scale, l.mode == "client")
        })
        .collect())
}

/// N `colony train` processes, each in its own network namespace with shaped links.
fn in_namespaces(
    a: &TrainBenchArgs,
    dir: &std::path::Path,
    profile: &str,
    cli: &[String],
) -> anyhow::Result<SwarmRun> {
    use std::process::{Command, Stdio};

    if !crate::netlab::available() {
        bail!("--links needs root and `ip netns` (network namespaces)");
    }
    let links = links_for(profile, a.peers, a.scale)?;
    let lab = crate::netlab::NetLab::new(&format!("tb{}", a.net), a.net, a.peers)?;
    for (i, &(up, down, _)) in links.iter().enumerate() {
        if up.is_finite() {
            lab.shape(i, (up * 1e6) as u64, (down * 1e6) as u64)?;
        }
    }
    let exe = std::env::current_exe().context("cannot find the colony binary")?;
    // Keys made here, so the bootstrap address (peer 0's) is known before anything starts.
    let mut peers = Vec::new();
    for i in 0..a.peers {
        let data = dir.join(format!("peer-{i}"));
        std::fs::create_dir_all(&data)?;
        let key = libp2p::identity::Keypair::generate_ed25519();
        crate::identity::write(&crate::storage::DataDir::new(&data).node_key(), &key)?;
        peers.push((data, key.public().to_peer_id()));
    }
    let boot = format!(
        "/ip4/{}/udp/4001/quic-v1/p2p/{}",
        lab.hosts[0].ip, peers[0].1
    );
    let mut children = Vec::new();
    for (i, (data, _)) in peers.iter().enumerate() {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &lab.hosts[i].ns])
            .arg(&exe)
            // The matchmaking's view in the logs explains a step that was not averaged.
            .args([
                "--log",
                "warn,colony_daemon::train=info,colony_daemon::matchmaking=info",
            ])
            .arg("train")
            .args(cli)
            .args(["--model", &a.model, "--run", "bench"])
            .args(["--target-batch", &a.target_batch.to_string()])
            .args(["--micro-batch", &a.micro_batch.to_string()])
            .args(["--steps", &a.steps.to_string()])
            .args(["--warmup", "2", "--total-steps", "10000", "--seed", "1"])
            .args(["--http", "off", "--reachability", "public"])
            // Processes start one after another: nobody steps alone while the others load.
            .args(["--discovery", "60"])
            .arg("--data-dir")
            .arg(data)
            .arg("--checkpoint")
            .arg(data.join("checkpoint.bin"))
            .arg("--summary")
            .arg(data.join("summary.json"));
        if links[i].2 {
            cmd.arg("--client");
        } else {
            cmd.args([
                "--listen",
                &format!("/ip4/{}/udp/4001/quic-v1", lab.hosts[i].ip),
            ]);
        }
        if i > 0 {
            cmd.args(["--bootstrap", &boot]);
        }
        if a.delayed {
            cmd.arg("--delayed-updates");
        }
        let log = std::fs::File::create(data.join("log.txt"))?;
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start `colony train` in a namespace")?;
        children.push(KillOnDrop(child));
        if i == 0 {
            // Peer 0 must listen before the others dial it.
            wait_for_log(&data.join("log.txt"), "· peer ", Duration::from_secs(60))?;
        }
    }
    // Well inside a test runner's limit (5 min for 4 steps), so a stuck run reports its logs.
    let deadline = Instant::now() + Duration::from_secs(60 + 40 * a.steps);
    for (i, c) in children.iter_mut().enumerate() {
        let log = peers[i].0.join("log.txt");
        let status = loop {
            if let Some(s) = c.0.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let logs: String = peers
                    .iter()
                    .enumerate()
                    .map(|(k, (data, _))| {
                        let log = data.join("log.txt");
                        format!("--- peer {k} ({}):\n{}\n", log.display(), tail(&log))
                    })
                    .collect();
                bail!("peer {i} did not finish in time; the peers' logs:\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if !status.success() {
            bail!("peer {i} failed ({status}):\n{}", tail(&log));
        }
    }
    let mut summaries = Vec::new();
    let mut ids = Vec::new();
    for (data, id) in &peers {
        let path = data.join("summary.json");
        let doc: crate::train_cli::PeerSummary = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("{} is not a training summary", path.display()))?;
        ids.push(id.to_bytes());
        summaries.push(doc.summary);
    }
    let first = summaries.iter().map(|s| s.started_ms).min().unwrap_or(0);
    let last_start = summaries.iter().map(|s| s.started_ms).max().unwrap_or(0);
    let end = summaries.iter().map(|s| s.finished_ms).max().unwrap_or(0);
    let state = crate::train::load_checkpoint(&peers[0].0.join("checkpoint.bin"), 4 << 30)?
        .context("peer 0 left no checkpoint")?;
    Ok(SwarmRun {
        ids,
        summaries,
        seconds: end.saturating_sub(first) as f64 / 1e3,
        params0: state.params,
        setup: "processes in namespaces",
        links_mbit: links.iter().map(|&(u, d, _)| (u, d)).collect(),
        start_spread_s: (last_start - first) as f64 / 1e3,
    })
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_log(path: &std::path::Path, needle: &str, timeout: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if std::fs::read_to_string(path).is_ok_and(|t| t.contains(needle)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "no {needle:?} in {} within {timeout:?}:\n{}",
        path.display(),
        tail(path)
    )
}

fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// One line of a peer's steps, e.g. `0:avg(3 peers) 1:alone 2:skipped(round failed) 2:dl(2)`.
fn describe_events(events: &[StepEvent]) -> String {
    let words: Vec<String> = events
        .iter()
        .map(|e| match e {
            StepEvent::Averaged { epoch, peers, .. } => format!("{epoch}:avg({peers} peers)"),
            StepEvent::Alone { epoch, .. } => format!("{epoch}:alone"),
            StepEvent::Downloaded { epoch, donors, .. } => format!("{epoch}:dl({donors})"),
            StepEvent::Skipped { epoch, why } => format!("{epoch}:skipped({why})"),
        })
        .collect();
    words.join(" ")
}

/// The single-process replay and the compute-only run against the swarm's record.
fn analyse<J: TrainJob>(a: &TrainBenchArgs, job: &J, run: SwarmRun) -> anyhow::Result<()> {
    let SwarmRun {
        ids: peers_ids,
        summaries,
        seconds: swarm_s,
        params0: swarm_params,
        setup,
        links_mbit,
        start_spread_s,
    } = run;
    let swarm_samples: u64 = summaries.iter().map(|s| s.samples).sum();

    // Which micro-batches each peer contributed at each step, and its loss there.
    let steps = a.steps as usize;
    let mut plan: Vec<Vec<(usize, u64)>> = vec![Vec::new(); steps];
    let mut loss_num = vec![0.0f64; steps];
    let mut loss_den = vec![0.0f64; steps];
    let mut averaged_steps = 0;
    let mut averaging_s = 0.0f64;
    let mut overlapped_total = 0u64;
    for (p, s) in summaries.iter().enumerate() {
        for e in &s.events {
            if let StepEvent::Averaged {
                epoch,
                micro_batches,
                own_samples,
                loss,
                seconds,
                overlapped,
                ..
            } = e
            {
                averaging_s += seconds;
                overlapped_total += overlapped;
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
        for (p, s) in summaries.iter().enumerate() {
            eprintln!("peer {p}: {}", describe_events(&s.events));
        }
    }
    let loss_at_step: Vec<f64> = loss_num
        .iter()
        .zip(&loss_den)
        .map(|(n, d)| if *d > 0.0 { n / d } else { f64::NAN })
        .collect();

    // The single process: the same micro-batches, one step per global step.
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
            let source = job.source(&peers_ids[p])?;
            for j in 0..k {
                let l = single.accumulate(&(source)(epoch, j))?;
                let mb = job.micro_batch() as u64;
                sum += f64::from(l) * mb as f64;
                n += mb;
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
        let (mut t, source) = job.on_gpu(p % a.gpus.max(1)).setup(id)?;
        t.accumulate(&(source)(u64::MAX, 0))?;
        t.reset_accumulator();
        work.push((t, mine, source));
    }
    let t2 = Instant::now();
    let mut threads = Vec::new();
    for (mut t, mine, source) in work {
        let mb = job.micro_batch() as u64;
        threads.push(std::thread::spawn(move || -> anyhow::Result<u64> {
            let mut n = 0;
            for (e, k) in mine {
                for j in 0..k {
                    t.accumulate(&(source)(e, j))?;
                    n += mb;
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
        delayed: a.delayed,
        overlapped_micro_batches: overlapped_total,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        setup,
        links_mbit,
        start_spread_s,
    };
    println!(
        "{} · {} peers ({}) · target batch {} · {} steps on {} cores",
        case.model, case.peers, case.setup, case.target_batch, case.steps, case.cores
    );
    if !case.links_mbit.is_empty() {
        let links: Vec<String> = case
            .links_mbit
            .iter()
            .map(|(u, d)| {
                if u.is_finite() {
                    format!("{u:.0}/{d:.0}")
                } else {
                    "unshaped".into()
                }
            })
            .collect();
        println!(
            "links (up/down Mbit/s): {} · starts spread over {:.1} s",
            links.join(", "),
            case.start_spread_s
        );
    }
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
    if a.delayed {
        println!(
            "delayed updates: {overlapped_total} micro-batches computed during all-reduces (the drift above is by design)"
        );
    }
    if let Some(p) = &a.json {
        super::write_json(p, "train", &[case])?;
    }
    Ok(())
}

/// One trainer, no network: `steps` global steps of `target_batch` samples each. Reports
/// samples/s after a warm-up step (GPU kernels compile on first use).
fn single_only<J: TrainJob>(a: &TrainBenchArgs, job: &J) -> anyhow::Result<()> {
    let (mut t, source) = job.setup(b"single")?;
    let per_step = (a.target_batch as usize).div_ceil(job.micro_batch()) as u64;
    let mut timed = 0u64;
    let mut t0 = Instant::now();
    let mut losses = Vec::new();
    let (mut data_s, mut compute_s) = (0.0f64, 0.0f64);
    for step in 0..=a.steps {
        if step == 1 {
            t0 = Instant::now();
            timed = 0;
        }
        let mut sum = 0.0;
        for j in 0..per_step {
            let d0 = Instant::now();
            let b = (source)(step, j);
            let d1 = Instant::now();
            sum += t.accumulate(&b)?;
            if step > 0 {
                data_s += (d1 - d0).as_secs_f64();
                compute_s += d1.elapsed().as_secs_f64();
            }
            timed += job.micro_batch() as u64;
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
    println!(
        "  of which making batches {data_s:.2} s, forward+backward+gradient copy {compute_s:.2} s, the rest (optimizer, parameter upload) {:.2} s",
        secs - data_s - compute_s
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
                "data_s": data_s,
                "compute_s": compute_s,
                "loss_single_at_step": losses,
            })],
        )?;
    }
    Ok(())
}
