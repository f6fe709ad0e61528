//! `colony demo`: a local swarm on loopback that shows the node's features end to end
//! (discovery, signed DHT records, RPC, gossip, the all-reduce, collaborative training,
//! Hogwild! inference, graph routing, patch jobs); `--keep-running` keeps it working for the
//! dashboard.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Args;
use colony_protocol::{DhtEntry, DhtKey, Subkey};
use serde::Serialize;

use crate::clock::now_ms;
use crate::local::{LocalSwarm, LocalSwarmConfig};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Nodes in the local swarm.
    #[arg(long, default_value_t = 4)]
    pub nodes: usize,
    /// HTTP API of the first node ("off" to disable).
    #[arg(long, default_value = "127.0.0.1:8700")]
    pub http: String,
    /// Keep the swarm running and working after the demo until Ctrl-C: the nodes go on
    /// training together and node 1 asks node 0 for a Hogwild! job every few seconds (watch it
    /// on the dashboard at the --http address).
    #[arg(long)]
    pub keep_running: bool,
    /// The LLM node 0 serves for the Hogwild! step (default: SmolLM2-135M-Instruct from
    /// `scripts/fetch-data.sh`; the step is skipped when it is missing).
    #[arg(long)]
    pub model: Option<std::path::PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Summary {
    nodes: usize,
    peer_ids: Vec<String>,
    discovery_ms: u64,
    progress_entries_seen_by_every_node: usize,
    ping_rtt_ms: Vec<Vec<Option<f64>>>,
    forged_overwrite_refused: bool,
    gossip_delivered: usize,
    allreduce: AllReduceSummary,
    training: TrainingSummary,
    hogwild: Option<HogwildSummary>,
    routing: RoutingSummary,
    patching: Option<PatchingSummary>,
    http: Option<String>,
}

#[derive(Debug, Serialize)]
struct HogwildSummary {
    model: String,
    question: String,
    workers: usize,
    /// Each worker's text, as written token by token over the shared cache.
    worker_texts: Vec<String>,
    answer: String,
    tokens: usize,
    seconds: f64,
}

/// The SmolLM2 model of `scripts/fetch-data.sh`: `$COLONY_MODEL`, `.cache/data/…` here, or
/// beside the source tree.
pub fn default_model_path() -> std::path::PathBuf {
    const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
    if let Some(p) = std::env::var_os("COLONY_MODEL") {
        return p.into();
    }
    let here = std::path::Path::new(".cache/data").join(MODEL);
    if here.exists() {
        return here;
    }
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.cache/data")
        .join(MODEL)
}

const HOGWILD_QUESTIONS: &[&str] = &[
    "Name three things a volunteer computer can do for science. Be brief.",
    "Give two tips for writing clear documentation.",
    "What makes a good team? Answer in two sentences.",
    "List three fruits and their colours.",
];

/// Node 1 asks node 0 (which serves the model) for a Hogwild! job over peer RPC; the
/// workers write over one shared cache and see each other's tokens at once.
async fn hogwild_job(
    swarm: &LocalSwarm,
    question: &str,
    workers: u8,
    max_tokens: u32,
    seed: u64,
) -> anyhow::Result<HogwildSummary> {
    use colony_protocol::infer::{InferEvent, InferJob, InferSampling};
    let server = &swarm.nodes[0];
    let model = server
        .infer
        .as_ref()
        .context("node 0 serves no model")?
        .model()
        .to_string();
    let job = InferJob {
        messages: vec![("user".into(), question.into())],
        workers,
        max_tokens,
        sampling: InferSampling {
            temperature: 0.6,
            top_p: 0.95,
            seed,
        },
    };
    let mut texts = vec![String::new(); usize::from(workers)];
    let mut answer = String::new();
    let mut tokens = 0;
    let t0 = Instant::now();
    crate::infer_service::remote_infer(
        &swarm.nodes[1].handle,
        server.peer_id(),
        job,
        &tokio_util::sync::CancellationToken::new(),
        &mut |e| match e {
            InferEvent::Token { worker, text } => {
                if let Some(t) = texts.get_mut(usize::from(*worker)) {
                    t.push_str(text);
                    tokens += 1;
                }
            }
            InferEvent::Answer { text } => answer = text.clone(),
            _ => {}
        },
    )
    .await?;
    Ok(HogwildSummary {
        model,
        question: question.into(),
        workers: usize::from(workers),
        worker_texts: texts,
        answer,
        tokens,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[derive(Debug, Serialize)]
struct PatchingSummary {
    model: String,
    /// Requests submitted and adopted by every node.
    requests: usize,
    adopted_everywhere: usize,
    /// Every node ended on the same version.
    same_version: bool,
    version: String,
    mean_adoption_ms: f64,
    /// A patch that wrecks the control set was refused.
    bad_patch_refused: bool,
    control_error_before: f32,
    control_error_after: f32,
}

/// Patch jobs: an editable digits classifier (trained here, seconds) on every node; node 0
/// asks for three fixes (three control images the model gets wrong, to their true labels), the nodes solve, verify, vote and adopt them; then node 1 gossips a
/// patch that wrecks the control set and the others refuse it. Skipped when the digits are not
/// fetched.
async fn demo_patching(swarm: &LocalSwarm) -> anyhow::Result<Option<PatchingSummary>> {
    use crate::patch_service::{PatchConfig, PatchService, SubmitRequest};
    use colony_trainer::edit::model::model_file;
    use colony_trainer::edit::train::{Digits, Mode, TrainConfig, train};
    let path = crate::swav_job::default_digits();
    let Ok(set) = colony_trainer::data::images::ImageSet::digits(&path) else {
        return Ok(None);
    };
    let dir = tempfile_dir()?;
    let model_path = dir.path().join("digits.edit");
    let (mp, set2) = (model_path.clone(), set.clone());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let d = Digits::from_set(&set2).map_err(|e| anyhow::anyhow!(e))?;
        let (tr, _) = d.split(crate::edit_cli::SPLIT_SEED, crate::edit_cli::TEST_FRACTION);
        let mut cfg = TrainConfig::new(colony_trainer::edit::net::Arch::Mlp, Mode::Editable);
        cfg.epochs = 15;
        let (net, _) = train::<colony_trainer::backend::CpuTrain>(&cfg, &tr, &Default::default());
        model_file(&net, "editable", &cfg.editor, &set2, 7, 0.2)
            .map_err(|e| anyhow::anyhow!(e))?
            .save(&mp)?;
        Ok(())
    })
    .await??;
    let n = swarm.nodes.len();
    let cfg = PatchConfig {
        quorum: (n - 1).clamp(1, 3),
        rebroadcast_ms: 500,
        ..PatchConfig::new(model_path)
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut services = Vec::new();
    for (i, node) in swarm.nodes.iter().enumerate() {
        let svc = PatchService::load(&cfg, &dir.path().join(format!("node{i}")))?;
        svc.start(&node.handle, &cancel, &mut tasks).await?;
        services.push(svc);
    }
    // Node 0's dashboard shows its patch log.
    swarm.nodes[0]
        .handle
        .telemetry()
        .attach_patch_service(services[0].clone());
    let digits = Digits::from_set(&set).map_err(|e| anyhow::anyhow!(e))?;
    let (_, control) = digits.split(crate::edit_cli::SPLIT_SEED, crate::edit_cli::TEST_FRACTION);
    let before = services[0].list().control_error;
    let (mut adopted, mut total_ms) = (0, 0.0);
    // Fix three of the model's mistakes on the control set (their true labels as targets).
    let mistakes = services[0].control_mistakes();
    for (i, target) in mistakes.into_iter().take(3) {
        let t = Instant::now();
        services[0]
            .submit(
                &swarm.nodes[0].handle,
                SubmitRequest {
                    sample: None,
                    control_index: Some(i),
                    target,
                },
            )
            .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let lists: Vec<_> = services.iter().map(|s| s.list()).collect();
            if lists
                .iter()
                .all(|l| l.len as usize > adopted && l.version == lists[0].version)
            {
                adopted += 1;
                total_ms += t.elapsed().as_secs_f64() * 1e3;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Node 1 turns bad: a validly signed patch whose delta lifts one class for every input.
    use colony_protocol::patch::{Delta, MAX_PATCH_BYTES, PATCH_DOMAIN, Patch, PatchGossip};
    let l = services[0].list();
    let bad_target = (control.labels[7] as u32 + 1) % 10;
    let h = &swarm.nodes[1.min(n - 1)].handle;
    let bad = Patch {
        model: l.model.clone(),
        parent: hex::decode(&l.version)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("version"))?,
        parent_len: l.len,
        request: [9; 32],
        sample: control.image(7).to_vec(),
        target: bad_target,
        delta: Delta::Rank1 {
            rows: vec![],
            h: vec![0.0; 128],
            bias: vec![(bad_target, 1000.0)],
        },
        editor: colony_trainer::edit::EditorConfig::default().spec(),
        steps: 1,
        author: h.signer().public(),
        created_ms: crate::clock::now_ms(),
    };
    let bad_id = hex::encode(bad.id()?);
    let env = colony_protocol::SignedEnvelope::seal(
        h.signer(),
        PATCH_DOMAIN,
        crate::clock::now_ms(),
        rand::random(),
        colony_protocol::encode(&bad, MAX_PATCH_BYTES)?,
    );
    let _ = h
        .publish(
            &colony_protocol::names::patches_topic(&cfg.run),
            PatchGossip::Patch(env).to_bytes()?,
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut refused = false;
    while Instant::now() < deadline && !refused {
        refused = services[0]
            .show(&bad_id)
            .is_some_and(|p| p.status.starts_with("rejected"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lists: Vec<_> = services.iter().map(|s| s.list()).collect();
    cancel.cancel();
    tasks.shutdown().await;
    Ok(Some(PatchingSummary {
        model: lists[0].model[..16].to_owned(),
        requests: 3,
        adopted_everywhere: adopted,
        same_version: lists.iter().all(|l| l.version == lists[0].version),
        version: lists[0].version[..16].to_owned(),
        mean_adoption_ms: total_ms / adopted.max(1) as f64,
        bad_patch_refused: refused,
        control_error_before: before,
        control_error_after: lists[0].control_error,
    }))
}

#[derive(Debug, Serialize)]
struct RoutingSummary {
    data: String,
    vectors: usize,
    shards: u32,
    queries: usize,
    /// Fraction of the sharded answers' top-10 that are the true top-10 (brute force).
    recall_at_10: f64,
    /// Per query, both shards asked and merged.
    mean_ms: f64,
}

/// A nearest-neighbour index served in two shards: node 1 and 2 serve shard 0, nodes 2 and 3
/// (wrapping round) shard 1; node 0 asks every shard through the DHT records and merges.
async fn demo_routing(swarm: &LocalSwarm) -> anyhow::Result<RoutingSummary> {
    use crate::route_service::{RouteQuery, RouteService, ShardConfig, query, shard_rows};
    use colony_routing::hnsw::brute_force;
    use colony_routing::{Hnsw, Metric, Params};
    const SHARDS: u32 = 2;
    let glove = std::path::Path::new(".cache/data/glove-6b-50d.npy");
    let (name, m) = match colony_routing::data::read_vectors(glove) {
        Ok(g) => (
            "GloVe 6B 50-d (first 20,000 words)",
            g.rows(0..20_000.min(g.n)),
        ),
        Err(_) => {
            // No data fetched: deterministic clustered vectors.
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let (n, dim) = (20_000, 32);
            let centres: Vec<f32> = (0..64 * dim).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let data = (0..n)
                .flat_map(|i| {
                    let c = (i * 7) % 64;
                    (0..dim)
                        .map(|j| centres[c * dim + j] + 0.2 * rng.gen_range(-1.0f32..1.0))
                        .collect::<Vec<_>>()
                })
                .collect();
            (
                "synthetic clusters (run scripts/fetch-data.sh for GloVe)",
                colony_routing::data::Matrix { n, dim, data },
            )
        }
    };
    let dir = tempfile_dir()?;
    let mut files = Vec::new();
    for shard in 0..SHARDS {
        let rows = shard_rows(m.n, shard, SHARDS);
        let part = m.rows(rows.clone());
        let keys: Vec<u64> = rows.map(|r| r as u64).collect();
        let h = tokio::task::spawn_blocking(move || -> anyhow::Result<Hnsw> {
            let mut h = Hnsw::new(part.dim, Metric::L2, Params::with_m(16))?;
            h.insert_many(&part.data, &keys, None)?;
            Ok(h)
        })
        .await??;
        let path = dir.path().join(format!("shard-{shard}.hnsw"));
        h.save(&path)?;
        files.push(path);
    }
    let n = swarm.nodes.len();
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, node) in swarm.nodes.iter().enumerate().skip(1) {
        let serves: Vec<ShardConfig> = (0..SHARDS)
            .filter(|&s| {
                let a = 1 + (s as usize) % (n - 1);
                let b = 1 + (s as usize + 1) % (n - 1);
                i == a || i == b
            })
            .map(|s| ShardConfig {
                index: "demo".into(),
                shard: s,
                shards: SHARDS,
                path: files[s as usize].clone(),
            })
            .collect();
        if !serves.is_empty() {
            RouteService::load(&serves)?
                .start(&node.handle, &cancel, &mut tasks)
                .await?;
        }
    }
    let client = &swarm.nodes[0].handle;
    let queries: Vec<Vec<f32>> = (0..100).map(|i| m.row(i * 97 + 13).to_vec()).collect();
    let ask = |v: &[f32]| RouteQuery {
        index: "demo".into(),
        vector: v.to_vec(),
        k: 10,
        ef: 64,
        max_dcs: None,
        label: None,
    };
    // The shards' records take a moment to reach the DHT.
    let deadline = Instant::now() + Duration::from_secs(20);
    while query(client, None, &ask(&queries[0])).await.is_err() {
        ensure!(
            Instant::now() < deadline,
            "the shards were not announced in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (mut hits, t) = (0usize, Instant::now());
    for v in &queries {
        let got = query(client, None, &ask(v)).await?;
        let truth = brute_force(&m.data, m.dim, Metric::L2, v, 10);
        hits += got
            .hits
            .iter()
            .filter(|h| truth.iter().any(|&t| u64::from(t) == h.key))
            .count();
    }
    let mean_ms = t.elapsed().as_secs_f64() * 1e3 / queries.len() as f64;
    cancel.cancel();
    tasks.shutdown().await;
    Ok(RoutingSummary {
        data: name.into(),
        vectors: m.n,
        shards: SHARDS,
        queries: queries.len(),
        recall_at_10: hits as f64 / (10 * queries.len()) as f64,
        mean_ms,
    })
}

#[derive(Debug, Serialize)]
struct TrainingSummary {
    model: String,
    parameters: usize,
    steps: u64,
    target_batch: u64,
    /// Node 0's view of each step: peers averaged with, samples, its mean loss.
    per_step: Vec<(u64, usize, f64, f32)>,
    identical_parameters: bool,
    seconds: f64,
}

/// A short collaborative ALBERT run: every node trains albert-tiny on a small embedded corpus
/// (`daemon/assets/demo_corpus.txt`), averaging gradients at each global step.
fn demo_albert_job() -> anyhow::Result<crate::train_cli::AlbertJob> {
    use colony_trainer::data::text::{Corpus, split_documents};
    use colony_trainer::data::tokenizer::TextTokenizer;

    let docs = split_documents(include_str!("../assets/demo_corpus.txt"));
    let corpus = Corpus::from_documents(&docs);
    let tokenizer = TextTokenizer::train(corpus.texts(), 1000)?;
    Ok(crate::train_cli::AlbertJob {
        size: "tiny".into(),
        corpus,
        tokenizer,
        micro_batch: 8,
        seq: 48,
        lr: 0.02,
        warmup: 2,
        total_steps: 1000,
        seed: 7,
        backend: Default::default(),
        gpu: 0,
        editable: None,
        tokenized: Default::default(),
    })
}

fn demo_train_config(run: &str, nodes: usize) -> crate::train::TrainConfig {
    let mut cfg = crate::train::TrainConfig::new(run, 16 * nodes as u64);
    cfg.window = Duration::from_millis(1000);
    cfg.refresh = Duration::from_millis(250);
    cfg.discovery = Duration::from_secs(3);
    cfg
}

/// `--keep-running`: every node trains in a fresh run until `stop`, and node 1 asks node 0
/// for a Hogwild! job every 10 s (when node 0 serves a model).
async fn live(swarm: &LocalSwarm, stop: tokio_util::sync::CancellationToken) -> anyhow::Result<()> {
    use crate::train::train;
    use crate::train_cli::TrainJob;
    let job = demo_albert_job()?;
    let cfg = demo_train_config("demo-albert-live", swarm.nodes.len());
    let mut runs = Vec::new();
    for node in &swarm.nodes {
        let (trainer, source) = job.setup(&node.peer_id().to_bytes())?;
        let (h, cfg, stop) = (node.handle.clone(), cfg.clone(), stop.clone());
        runs.push(async move { train(&h, trainer, source, &cfg, stop).await.map(|_| ()) });
    }
    let training = futures::future::try_join_all(runs);
    let inference = async {
        if swarm.nodes[0].infer.is_none() {
            return Ok(());
        }
        let mut i = 0usize;
        while !stop.is_cancelled() {
            let q = HOGWILD_QUESTIONS[i % HOGWILD_QUESTIONS.len()];
            if let Err(e) = hogwild_job(swarm, q, 3, 48, i as u64).await {
                tracing::warn!("live Hogwild! job: {e:#}");
            }
            i += 1;
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
        }
        Ok::<_, anyhow::Error>(())
    };
    let (t, i) = tokio::join!(training, inference);
    t?;
    i
}

async fn demo_training(swarm: &LocalSwarm) -> anyhow::Result<TrainingSummary> {
    use crate::train::{StepEvent, train};
    use crate::train_cli::TrainJob;

    let job = demo_albert_job()?;
    let n = swarm.nodes.len() as u64;
    let steps = 5;
    let mut cfg = demo_train_config("demo-albert", swarm.nodes.len());
    cfg.max_steps = Some(steps);
    let stop = tokio_util::sync::CancellationToken::new();
    let t0 = Instant::now();
    let mut setups = Vec::new();
    for node in &swarm.nodes {
        setups.push(job.setup(&node.peer_id().to_bytes())?);
    }
    let parameters = setups.first().map_or(0, |(t, _)| t.len());
    let runs = swarm
        .nodes
        .iter()
        .zip(setups)
        .map(|(node, (trainer, source))| {
            let (h, cfg, stop) = (node.handle.clone(), cfg.clone(), stop.clone());
            async move { train(&h, trainer, source, &cfg, stop).await }
        });
    let results = futures::future::join_all(runs).await;
    let mut finals = Vec::new();
    let mut per_step = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        let (trainer, summary) = r?;
        ensure!(
            trainer.epoch() == steps,
            "node {i} stopped at step {}",
            trainer.epoch()
        );
        if i == 0 {
            for e in &summary.events {
                match e {
                    StepEvent::Averaged {
                        epoch,
                        peers,
                        samples,
                        loss,
                        ..
                    } => per_step.push((*epoch, *peers, *samples, *loss)),
                    StepEvent::Alone { epoch, loss, .. } => {
                        per_step.push((*epoch, 1, f64::NAN, *loss))
                    }
                    _ => {}
                }
            }
        }
        finals.push(trainer.params().to_vec());
    }
    let identical_parameters = finals.windows(2).all(|w| w[0] == w[1]);
    ensure!(
        identical_parameters,
        "the nodes ended on different parameters"
    );
    Ok(TrainingSummary {
        model: "albert-tiny".into(),
        parameters,
        steps,
        target_batch: 16 * n,
        per_step,
        identical_parameters,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[derive(Debug, Serialize)]
struct AllReduceSummary {
    values: usize,
    ms: f64,
    shard_sizes: Vec<usize>,
    max_abs_err: f64,
}

/// One butterfly all-reduce round over the demo swarm, formed through the DHT: every node
/// declares (the last one as a client, which reduces nothing), the lowest-id node that is not
/// a client proposes and commits, shard sizes come from the load-balancing optimum for the declared bandwidths.
async fn demo_allreduce(swarm: &LocalSwarm) -> anyhow::Result<AllReduceSummary> {
    use crate::matchmaking::{MatchConfig, Matchmaker, Offer};
    use colony_trainer::allreduce::balance::PeerMode;

    let n = swarm.nodes.len();
    let len = 1 << 20;
    let weight = |i: usize| 100.0 * (i + 1) as f64;
    let vector = |i: usize| -> Vec<f32> {
        (0..len)
            .map(|k| ((k * (i + 3)) % 1000) as f32 / 10.0 - 50.0)
            .collect()
    };
    let cfg = MatchConfig {
        min_shard: 1024,
        ..MatchConfig::default()
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(1500);
    let t0 = Instant::now();
    let runs = swarm.nodes.iter().enumerate().map(|(i, node)| {
        let cfg = cfg.clone();
        async move {
            let mm = Matchmaker::new(node.handle.clone(), "demo").await?;
            let offer = Offer {
                mode: if i + 1 == n {
                    PeerMode::Client
                } else {
                    PeerMode::Node
                },
                weight: weight(i),
                up: 12.5e6 * (i + 1) as f64,
                down: 12.5e6 * (i + 1) as f64,
            };
            let group = mm.form_group(1, len, offer, deadline, &cfg).await;
            mm.close().await;
            let group = group?.context("a node was left out of the group")?;
            let report =
                crate::allreduce::run_round(&node.handle, &group, vector(i), Default::default())
                    .await?;
            anyhow::Ok((group, report))
        }
    });
    let results = futures::future::join_all(runs).await;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut sum = vec![0f64; len];
    let total: f64 = (0..n).map(weight).sum();
    for i in 0..n {
        for (s, x) in sum.iter_mut().zip(vector(i)) {
            *s += weight(i) * f64::from(x);
        }
    }
    let mut max_abs_err = 0f64;
    let mut shard_sizes = Vec::new();
    for r in results {
        let (group, report) = r?;
        ensure!(
            group.members.len() == n,
            "the group has {} of {n} nodes",
            group.members.len()
        );
        ensure!(
            report.failed_aggregators.is_empty(),
            "a shard was not averaged"
        );
        let v = report.result.context("a sender got no result")?;
        for (x, s) in v.iter().zip(&sum) {
            max_abs_err = max_abs_err.max((f64::from(*x) - s / total).abs());
        }
        shard_sizes = group.spec.shard_sizes;
    }
    ensure!(
        max_abs_err < 1e-3,
        "all-reduce result is off by {max_abs_err}"
    );
    Ok(AllReduceSummary {
        values: len,
        ms,
        shard_sizes,
        max_abs_err,
    })
}

fn step(json: bool, msg: &str) {
    if !json {
        println!("==> {msg}");
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    ensure!(args.nodes >= 2, "--nodes must be at least 2");
    let dir = tempfile_dir()?;
    let http: Option<SocketAddr> = match args.http.as_str() {
        "off" => None,
        s => Some(
            s.parse()
                .with_context(|| format!("--http {s:?} is not an address"))?,
        ),
    };

    step(
        args.json,
        &format!("starting {} nodes on loopback", args.nodes),
    );
    let t0 = Instant::now();
    let model = args.model.clone().unwrap_or_else(default_model_path);
    let first_infer = if model.exists() {
        Some(crate::config::InferConfig {
            model: model.clone(),
            queue: 8,
            max_tokens: 256,
        })
    } else if args.model.is_some() {
        anyhow::bail!("--model {}: no such file", model.display());
    } else {
        None
    };
    let cfg = LocalSwarmConfig {
        nodes: args.nodes,
        first_http: http,
        first_infer,
        bootstrap_from: 1,
        ..LocalSwarmConfig::default()
    };
    let swarm = LocalSwarm::start(dir.path(), cfg).await?;
    let http_addr = swarm.nodes[0].http_addr;
    for (i, n) in swarm.nodes.iter().enumerate() {
        if !args.json {
            println!("    node {i}: {}", n.peer_id());
        }
    }
    if let (Some(h), false) = (http_addr, args.json) {
        println!("    dashboard of node 0: http://{h}/ (API: http://{h}/api/status)");
    }

    step(
        args.json,
        "waiting for the nodes to find each other (Kademlia)",
    );
    swarm
        .wait_for_routing(args.nodes - 1, Duration::from_secs(30))
        .await?;
    let discovery_ms = t0.elapsed().as_millis() as u64;
    if !args.json {
        println!(
            "    every node knows the other {} ({} ms)",
            args.nodes - 1,
            discovery_ms
        );
    }

    step(
        args.json,
        "each node publishes signed progress under run/demo/progress",
    );
    let key = DhtKey::run_progress("demo")?;
    for (i, n) in swarm.nodes.iter().enumerate() {
        let value =
            serde_json::to_vec(&serde_json::json!({ "node": i, "samples": 100 * (i + 1) }))?;
        n.handle
            .dht_put_owned(key.clone(), value, Duration::from_secs(120))
            .await?;
    }
    let mut seen = usize::MAX;
    for (i, n) in swarm.nodes.iter().enumerate() {
        let got = n.handle.dht_get(&key).await?;
        if !args.json {
            println!(
                "    node {i} reads {} entries (asked {} nodes)",
                got.entries.len(),
                got.asked
            );
        }
        seen = seen.min(got.entries.len());
    }
    ensure!(
        seen == args.nodes,
        "a node saw only {seen} of {} progress entries",
        args.nodes
    );

    step(
        args.json,
        "a node tries to overwrite another node's signed entry",
    );
    let owner = swarm.nodes[0].handle.signer().public();
    let mut forged = DhtEntry::owned(
        key.clone(),
        swarm.nodes[1].handle.signer(),
        b"{\"samples\":0}".to_vec(),
        now_ms() + 200_000,
    );
    forged.subkey = Subkey::Owner(owner);
    let refused = swarm.nodes[1].handle.dht_store(vec![forged]).await.is_err();
    if !args.json {
        println!(
            "    forged overwrite {}",
            if refused { "refused" } else { "ACCEPTED (bug)" }
        );
    }

    step(args.json, "peer RPC: every node pings every other");
    let mut rtt = vec![vec![None; args.nodes]; args.nodes];
    for (i, a) in swarm.nodes.iter().enumerate() {
        for (j, b) in swarm.nodes.iter().enumerate() {
            if i != j {
                rtt[i][j] = a
                    .handle
                    .ping(b.peer_id())
                    .await
                    .ok()
                    .map(|d| d.as_secs_f64() * 1e3);
            }
        }
    }
    if !args.json {
        for (i, row) in rtt.iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .map(|r| r.map_or("    -".into(), |v| format!("{v:5.2}")))
                .collect();
            println!("    node {i} → [{}] ms", cells.join(" "));
        }
    }

    step(
        args.json,
        "gossip: node 0 publishes on a topic every node subscribed to",
    );
    let topic = colony_protocol::names::patches_topic("demo");
    let mut subs = Vec::new();
    for n in &swarm.nodes[1..] {
        subs.push(n.handle.subscribe(&topic).await?);
    }
    swarm.nodes[0].handle.subscribe(&topic).await?;
    // Gossipsub builds its mesh over a few heartbeats, and a publish is accepted as
    // soon as node 0 has one mesh peer: publish a numbered message every 300 ms until
    // every subscriber has one (or 15 s pass).
    let mut got = vec![false; subs.len()];
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut i = 0u32;
    while got.iter().any(|g| !g) && Instant::now() < deadline {
        let _ = swarm.nodes[0]
            .handle
            .publish(&topic, format!("hello swarm {i}").into_bytes())
            .await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (k, rx) in subs.iter_mut().enumerate() {
            while rx.try_recv().is_ok() {
                got[k] = true;
            }
        }
    }
    let delivered = got.iter().filter(|g| **g).count();
    if !args.json {
        println!(
            "    delivered to {delivered} of {} subscribers",
            args.nodes - 1
        );
    }

    step(
        args.json,
        "all-reduce: the nodes form a group through the DHT and average a 1M-value vector, \
         weighted by their samples",
    );
    let allreduce = demo_allreduce(&swarm).await?;
    if !args.json {
        println!(
            "    {} values in {:.0} ms (matchmaking included); shards {:?}; \
             max |error| vs exact weighted mean {:.2e}",
            allreduce.values, allreduce.ms, allreduce.shard_sizes, allreduce.max_abs_err
        );
    }

    step(
        args.json,
        "collaborative training: every node trains albert-tiny on a small embedded corpus; \
         at each global step they average gradients weighted by samples and take the same LAMB step",
    );
    let training = demo_training(&swarm).await?;
    if !args.json {
        for (epoch, peers, samples, loss) in &training.per_step {
            println!(
                "    step {epoch}: averaged over {peers} nodes, {samples} samples, local loss {loss:.3}"
            );
        }
        println!(
            "    {} parameters, {} steps in {:.1} s; every node ended on identical parameters",
            training.parameters, training.steps, training.seconds
        );
    }

    step(
        args.json,
        "Hogwild! inference: node 0 serves SmolLM2-135M; node 1 asks it over peer RPC for a job \
         of three workers that decode in parallel over one shared KV cache",
    );
    let hogwild = if swarm.nodes[0].infer.is_some() {
        let h = hogwild_job(&swarm, HOGWILD_QUESTIONS[0], 3, 32, 0).await?;
        if !args.json {
            println!("    Q: {}", h.question);
            for (w, t) in h.worker_texts.iter().enumerate() {
                println!("    worker {w}: {}", t.trim().replace('\n', " "));
            }
            println!("    answer: {}", h.answer.trim().replace('\n', " "));
            println!(
                "    {} tokens in {:.1} s ({})",
                h.tokens, h.seconds, h.model
            );
        }
        Some(h)
    } else {
        if !args.json {
            println!(
                "    skipped: no model at {} (scripts/fetch-data.sh)",
                model.display()
            );
        }
        None
    };

    step(
        args.json,
        "graph routing: a nearest-neighbour index in two shards, each served by two nodes; \
         node 0 fans queries out through the DHT records and merges the answers",
    );
    let routing = demo_routing(&swarm).await?;
    if !args.json {
        println!(
            "    {} vectors of {}; {} queries: recall@10 {:.3} against brute force, {:.1} ms \
             per query (both shards, over loopback)",
            routing.vectors, routing.data, routing.queries, routing.recall_at_10, routing.mean_ms
        );
    }

    step(
        args.json,
        "patch jobs: an editable digits classifier on every node; node 0 asks for three fixes, \
         the nodes solve, verify, vote and adopt them; a patch that wrecks the model is refused",
    );
    let patching = demo_patching(&swarm).await?;
    if !args.json {
        match &patching {
            Some(p) => println!(
                "    {} of {} fixes adopted by every node ({:.0} ms each, quorum of verifiers); \
                 same version everywhere: {} ({}); control error {:.2}% -> {:.2}%; bad patch refused: {}",
                p.adopted_everywhere,
                p.requests,
                p.mean_adoption_ms,
                p.same_version,
                p.version,
                p.control_error_before * 100.0,
                p.control_error_after * 100.0,
                p.bad_patch_refused
            ),
            None => println!("    skipped: the digits are not fetched (scripts/fetch-data.sh)"),
        }
    }

    let summary = Summary {
        nodes: args.nodes,
        peer_ids: swarm
            .nodes
            .iter()
            .map(|n| n.peer_id().to_string())
            .collect(),
        discovery_ms,
        progress_entries_seen_by_every_node: seen,
        ping_rtt_ms: rtt,
        forged_overwrite_refused: refused,
        gossip_delivered: delivered,
        allreduce,
        training,
        hogwild,
        routing,
        patching,
        http: http_addr.map(|h| format!("http://{h}")),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("demo finished in {:.1} s", t0.elapsed().as_secs_f64());
    }
    if args.keep_running {
        step(
            args.json,
            "the swarm keeps running and working (training, Hogwild! jobs); Ctrl-C to stop",
        );
        let stop = tokio_util::sync::CancellationToken::new();
        let work = live(&swarm, stop.clone());
        tokio::pin!(work);
        tokio::select! {
            () = crate::cli::wait_for_signal() => {
                stop.cancel();
                if let Err(e) = work.await {
                    tracing::warn!("live work: {e:#}");
                }
            }
            r = &mut work => r?,
        }
    }
    swarm.shutdown().await;
    ensure!(refused, "a forged overwrite was accepted");
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("colony-demo-")
        .tempdir()
        .context("cannot create a temporary directory")
}
