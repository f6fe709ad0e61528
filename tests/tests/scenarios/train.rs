//! Collaborative ALBERT pretraining over real in-process nodes (DHT progress, matchmaking,
//! all-reduce, state download) on the real `fortunes` corpus.

use std::path::{Path, PathBuf};
use std::time::Duration;

use colony_daemon::local::{LocalSwarm, LocalSwarmConfig};
use colony_daemon::node::Node;
use colony_daemon::train::{StepEvent, TrainConfig, TrainSummary, train};
use colony_daemon::train_cli::{AlbertJob, TrainJob};
use colony_trainer::collab::{AlbertTrainer, Trainer};
use colony_trainer::data::mlm::Sampler;
use colony_trainer::data::text::Corpus;
use tokio_util::sync::CancellationToken;

const FORTUNES: &str = "/usr/share/games/fortunes";

/// The real corpus (Debian `fortunes`, installed by scripts/test.sh) and one tokenizer for
/// the whole run.
fn job(dir: &Path) -> AlbertJob {
    let root = Path::new(FORTUNES);
    assert!(
        root.exists(),
        "{FORTUNES} is missing: install the Debian package `fortunes` (scripts/test.sh does)"
    );
    let corpus = Corpus::read(root).unwrap();
    let tokenizer = AlbertJob::tokenizer_for(&corpus, &dir.join("tokenizer.json"), 2000).unwrap();
    AlbertJob {
        size: "tiny".into(),
        corpus,
        tokenizer,
        micro_batch: 8,
        seq: 32,
        lr: 0.05,
        warmup: 2,
        total_steps: 1000,
        seed: 5,
        backend: Default::default(),
        gpu: 0,
        editable: None,
        tokenized: Default::default(),
    }
}

async fn swarm(n: usize, dir: &Path) -> LocalSwarm {
    colony_tests::init_tracing();
    let s = LocalSwarm::start(
        dir,
        LocalSwarmConfig {
            nodes: n,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    s.wait_for_routing(n.min(4) - 1, Duration::from_secs(20))
        .await
        .unwrap();
    s
}

fn config(steps: u64, checkpoint: Option<PathBuf>) -> TrainConfig {
    let mut c = TrainConfig::new("fortunes", 48);
    c.window = Duration::from_millis(1000);
    c.refresh = Duration::from_millis(250);
    c.discovery = Duration::from_secs(3);
    c.max_steps = Some(steps);
    c.checkpoint = checkpoint;
    c
}

fn spawn_peer<J: TrainJob>(
    node: &Node,
    job: &J,
    cfg: TrainConfig,
    stop: CancellationToken,
) -> Run<J::Batch> {
    let h = node.handle.clone();
    let (trainer, source) = job.setup(&node.peer_id().to_bytes()).unwrap();
    tokio::spawn(async move { train(&h, trainer, source, &cfg, stop).await })
}

type Finished<B> = (Box<dyn Trainer<Batch = B>>, TrainSummary);
type Run<B> = tokio::task::JoinHandle<anyhow::Result<Finished<B>>>;

/// Each run's trainer and summary, in order (a run that fails or takes 5 min fails the test).
async fn finish<B>(runs: Vec<Run<B>>) -> Vec<Finished<B>> {
    let mut out = Vec::new();
    for r in runs {
        out.push(
            tokio::time::timeout(Duration::from_secs(300), r)
                .await
                .unwrap()
                .unwrap()
                .unwrap(),
        );
    }
    out
}

/// Mean loss of `trainer`'s current parameters on fixed held-out batches (no step taken).
fn held_out_loss(job: &AlbertJob, trainer: &mut AlbertTrainer) -> f32 {
    let tc = job.tokenized_corpus().unwrap();
    let s = Sampler {
        run_seed: 99,
        peer: b"held-out".to_vec(),
    };
    let mut sum = 0.0;
    for i in 0..4 {
        sum += trainer
            .accumulate(&s.batch(&tc, 0, i, 16, job.seq))
            .unwrap();
    }
    trainer.reset_accumulator();
    sum / 4.0
}

fn averaged(events: &[StepEvent]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, StepEvent::Averaged { .. }))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_peers_train_albert_tiny_on_fortunes_and_stay_identical() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let swarm = swarm(3, dir.path()).await;
    let (mut fresh, _) = job.setup(b"probe").unwrap();
    let before = held_out_loss(&job, &mut fresh);

    let stop = CancellationToken::new();
    let runs: Vec<_> = swarm
        .nodes
        .iter()
        .map(|n| spawn_peer(n, &job, config(10, None), stop.clone()))
        .collect();
    let mut results = finish(runs).await;
    for (t, s) in &results {
        assert_eq!(t.epoch(), 10, "{:?}", s.events);
        assert_eq!(
            t.params(),
            results[0].0.params(),
            "peers ended on different parameters"
        );
        assert!(
            averaged(&s.events) >= 8,
            "too few averaged steps: {:?}",
            s.events
        );
    }
    let (mut t0, s0) = results.remove(0);
    let after = held_out_loss(&job, &mut t0);
    eprintln!(
        "held-out loss {before:.3} -> {after:.3}; events {:?}",
        s0.events
    );
    assert!(
        after < before - 0.5,
        "loss did not go down: {before} -> {after}"
    );
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_joiner_downloads_the_state_and_matches_after_the_next_step() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let mut swarm = swarm(3, dir.path()).await;
    let stop = CancellationToken::new();
    let runs: Vec<_> = swarm
        .nodes
        .iter()
        .map(|n| spawn_peer(n, &job, config(12, None), stop.clone()))
        .collect();
    // Let the swarm get a few steps ahead (read from its progress records, not a fixed sleep:
    // on a loaded machine 10 s was once 10 of the 12 steps and the joiner found no group left),
    // then join.
    let key = colony_protocol::DhtKey::run_progress("fortunes").unwrap();
    let h = swarm.nodes[0].handle.clone();
    colony_tests::wait_for(
        "the swarm is three steps in",
        Duration::from_secs(120),
        || {
            let (h, key) = (h.clone(), key.clone());
            async move {
                let got = h.dht_get(&key).await?;
                let epoch = colony_daemon::handle::owned_values::<
                    colony_protocol::train::TrainProgress,
                >(&got.entries)
                .map(|(_, p)| p.epoch)
                .max()
                .unwrap_or(0);
                Ok((epoch >= 3).then_some(()))
            }
        },
    )
    .await
    .unwrap();
    let joiner = swarm.spawn_node().await.unwrap();
    let late = spawn_peer(&joiner, &job, config(12, None), stop.clone());
    let (jt, js) = finish(vec![late]).await.remove(0);
    let others = finish(runs).await;
    let downloaded = js
        .events
        .iter()
        .find_map(|e| match e {
            StepEvent::Downloaded { epoch, donors, .. } => Some((*epoch, *donors)),
            _ => None,
        })
        .unwrap_or_else(|| panic!("the joiner never downloaded: {:?}", js.events));
    assert!(downloaded.0 >= 1, "{downloaded:?}");
    assert!(
        averaged(&js.events) >= 1,
        "the joiner never averaged: {:?}",
        js.events
    );
    assert_eq!(jt.epoch(), 12);
    for (t, _) in &others {
        assert_eq!(t.params(), jt.params(), "the joiner's parameters differ");
    }
    joiner.shutdown().await;
    swarm.shutdown().await;
}

/// Every global step taken exactly once, in order: epochs of the steps (and downloads) a peer
/// went through never repeat and never skip.
fn assert_each_step_once(events: &[StepEvent], end: u64) {
    let mut next = 0u64;
    for e in events {
        match e {
            StepEvent::Averaged { epoch, .. } | StepEvent::Alone { epoch, .. } => {
                assert_eq!(*epoch, next, "step {epoch} out of order: {events:?}");
                next = epoch + 1;
            }
            StepEvent::Downloaded { epoch, .. } => {
                assert!(*epoch >= next, "downloaded an older state: {events:?}");
                next = *epoch;
            }
            StepEvent::Skipped { .. } => {}
        }
    }
    assert_eq!(next, end, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_killed_mid_accumulation_and_mid_round_cost_only_their_samples() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let mut swarm = swarm(5, dir.path()).await;
    let stop = CancellationToken::new();
    let steps = 10;
    // Nodes 3 and 4 are the victims; their training tasks die with their nodes.
    let victims: Vec<Node> = swarm.nodes.drain(3..).collect();
    let runs: Vec<_> = swarm
        .nodes
        .iter()
        .map(|n| spawn_peer(n, &job, config(steps, None), stop.clone()))
        .collect();
    let mut victim_runs: Vec<_> = victims
        .iter()
        .map(|n| spawn_peer(n, &job, config(steps, None), stop.clone()))
        .collect();
    let mut victims = victims.into_iter();
    // Victim 1 dies while accumulating (between two averaging windows).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let v1 = victims.next().unwrap();
    v1.kill();
    victim_runs.remove(0).abort();
    // Victim 2 dies just after an all-reduce starts: watch for a proposed start time.
    let h = swarm.nodes[0].handle.clone();
    let key = colony_protocol::DhtKey::run_progress("fortunes").unwrap();
    let v2 = victims.next().unwrap();
    let fp = {
        let (t, _) = job.setup(b"x").unwrap();
        t.fingerprint()
    };
    let start = colony_tests::wait_for(
        "a proposed all-reduce start",
        Duration::from_secs(60),
        || {
            let h = h.clone();
            let key = key.clone();
            async move {
                let rs = colony_daemon::train::read_progress(&h, &key, &fp).await;
                anyhow::Ok(
                    rs.iter()
                        .filter(|r| r.epoch >= 3)
                        .find_map(|r| r.ready_at_ms),
                )
            }
        },
    )
    .await
    .unwrap();
    let wait = start.saturating_sub(colony_daemon::clock::now_ms()) + 20;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    v2.kill();
    victim_runs.remove(0).abort();
    let results = finish(runs).await;
    for (t, s) in &results {
        assert_eq!(t.epoch(), steps);
        assert_eq!(t.params(), results[0].0.params(), "survivors diverged");
        assert_each_step_once(&s.events, steps);
    }
    swarm.shutdown().await;
}

#[test]
fn colony_train_runs_across_processes_and_resumes_from_its_checkpoint() {
    use colony_tests::process::NodeProcess;
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path()); // writes the run's shared tokenizer.json
    drop(job);
    let tok = dir.path().join("tokenizer.json");
    let common = |steps: u64, bootstrap: Option<&str>| {
        let mut a: Vec<String> = [
            "--data",
            FORTUNES,
            "--tokenizer",
            tok.to_str().unwrap(),
            "--run",
            "proc",
            "--target-batch",
            "32",
            "--micro-batch",
            "8",
            "--seq",
            "32",
            "--lr",
            "0.05",
            "--warmup",
            "2",
            "--http",
            "off",
            "--reachability",
            "public",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            // The three processes start one after another: nobody steps alone meanwhile.
            "--discovery",
            "30",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(["--steps".to_string(), steps.to_string()]);
        if let Some(b) = bootstrap {
            a.extend(["--bootstrap".to_string(), b.to_string()]);
        }
        a
    };
    let first = NodeProcess::start_command("train", &dir.path().join("p0"), &common(4, None), None)
        .unwrap();
    let boot = format!("{}/p2p/{}", first.info.listen_addrs[0], first.info.peer_id);
    let mut procs = vec![first];
    for i in 1..3 {
        procs.push(
            NodeProcess::start_command(
                "train",
                &dir.path().join(format!("p{i}")),
                &common(4, Some(&boot)),
                None,
            )
            .unwrap(),
        );
    }
    for p in &mut procs {
        let deadline = std::time::Instant::now() + Duration::from_secs(240);
        let status = loop {
            if let Some(s) = p.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "colony train did not finish: {}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let log = p.log_text();
        assert!(status.success(), "colony train failed: {log}");
        assert!(log.contains("reached global step 4"), "{log}");
        assert!(
            log.contains("averaged with 3 peers"),
            "never averaged with all three: {log}"
        );
    }
    // Restart the first peer alone: it resumes from its checkpoint at step 4.
    let mut again =
        NodeProcess::start_command("train", &dir.path().join("p0"), &common(5, None), None)
            .unwrap();
    let status = again.child.wait().unwrap();
    let log = again.log_text();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("step    4: alone"),
        "did not resume at step 4: {log}"
    );
    assert!(log.contains("reached global step 5"), "{log}");
}

/// SwAV on the real digits (scripts/fetch-data.sh) across two in-process peers: every step is
/// averaged, the peers end on identical parameters, and the loss falls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_peers_train_swav_small_on_digits_and_stay_identical() {
    use colony_daemon::swav_job::{SwavJob, default_digits};
    let dir = tempfile::tempdir().unwrap();
    let images = SwavJob::load_images(Path::new("digits"), 16).unwrap_or_else(|e| {
        panic!(
            "{e:#} ({}; scripts/fetch-data.sh fetches it)",
            default_digits().display()
        )
    });
    let augment = SwavJob::augment_for(&images, None).unwrap();
    let job = SwavJob {
        backbone: "small".into(),
        images: std::sync::Arc::new(images),
        augment,
        micro_batch: 8,
        lr: 0.6,
        warmup: 0,
        total_steps: 1000,
        freeze_prototypes: None,
        seed: 2,
        backend: Default::default(),
        gpu: 0,
    };
    let swarm = swarm(2, dir.path()).await;
    let stop = CancellationToken::new();
    let mut cfg = config(6, None);
    cfg.run = "digits".into();
    cfg.target_batch = 32;
    let runs: Vec<_> = swarm
        .nodes
        .iter()
        .map(|n| spawn_peer(n, &job, cfg.clone(), stop.clone()))
        .collect();
    let results = finish(runs).await;
    swarm.shutdown().await;
    for (t, s) in &results {
        assert_eq!(t.epoch(), 6, "{:?}", s.events);
        assert_eq!(t.params(), results[0].0.params());
        assert!(averaged(&s.events) >= 5, "{:?}", s.events);
    }
    let losses: Vec<f32> = results[0]
        .1
        .events
        .iter()
        .filter_map(|e| match e {
            StepEvent::Averaged { loss, .. } => Some(*loss),
            _ => None,
        })
        .collect();
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(last < first - 0.3, "loss {losses:?}");
}

/// Delayed parameter updates: three peers compute the next step's micro-batches while each
/// all-reduce runs, still take every step together, end identical, and the loss falls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delayed_updates_overlap_the_all_reduce_and_peers_stay_identical() {
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let swarm = swarm(3, dir.path()).await;
    let (mut fresh, _) = job.setup(b"probe").unwrap();
    let before = held_out_loss(&job, &mut fresh);
    let stop = CancellationToken::new();
    let mut cfg = config(8, None);
    cfg.delayed = true;
    let runs: Vec<_> = swarm
        .nodes
        .iter()
        .map(|n| spawn_peer(n, &job, cfg.clone(), stop.clone()))
        .collect();
    let mut results = finish(runs).await;
    swarm.shutdown().await;
    let mut overlapped = 0;
    for (t, s) in &results {
        assert_eq!(t.epoch(), 8, "{:?}", s.events);
        assert_eq!(t.params(), results[0].0.params());
        assert!(averaged(&s.events) >= 7, "{:?}", s.events);
        overlapped += s
            .events
            .iter()
            .map(|e| match e {
                StepEvent::Averaged { overlapped, .. } => *overlapped,
                _ => 0,
            })
            .sum::<u64>();
    }
    assert!(overlapped > 0, "no micro-batch overlapped an all-reduce");
    let after = held_out_loss(&job, &mut results[0].0);
    assert!(after < before - 0.3, "held-out loss {before} -> {after}");
}

/// The dashboard's API against a live three-node run: node 0's `/api/runs`, `/api/runs/{run}`,
/// `/api/allreduce/rounds`, `/api/traffic`, `/api/snapshot`, `/api/events` (Server-Sent
/// Events) and `/metrics` show the steps, the rounds against their bound and the bytes the
/// run moved; the page and its assets are served; writes without the token are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_api_shows_a_live_training_run() {
    use serde_json::Value;
    colony_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let swarm = LocalSwarm::start(
        dir.path(),
        LocalSwarmConfig {
            nodes: 3,
            first_http: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    swarm
        .wait_for_routing(2, Duration::from_secs(20))
        .await
        .unwrap();
    let api = format!("http://{}", swarm.nodes[0].http_addr.unwrap());
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let url = format!("{api}{path}");
        let http = http.clone();
        async move {
            let r = http.get(&url).send().await.unwrap();
            assert!(r.status().is_success(), "{url}: {}", r.status());
            r
        }
    };

    // Before any run: no runs, and the events stream opens with a snapshot at once.
    let runs: Value = get("/api/runs").await.json().await.unwrap();
    assert_eq!(runs, serde_json::json!([]));
    let mut sse = get("/api/events?every_ms=500").await;
    assert_eq!(
        sse.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), sse.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let event = text.split("\n\n").next().unwrap();
    assert!(event.starts_with("event: snapshot\n"), "{event}");
    let data: String = event
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    let snap: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(snap["peers"].as_array().unwrap().len(), 2, "{snap}");
    drop(sse);
    let r = http
        .get(format!("{api}/api/events?every_ms=5"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let stop = CancellationToken::new();
    let runs: Vec<_> = swarm
        .nodes
        .iter()
        .map(|n| spawn_peer(n, &job, config(3, None), stop.clone()))
        .collect();
    let results = finish(runs).await;
    assert!(averaged(&results[0].1.events) >= 2, "{:?}", results[0].1);

    let runs: Value = get("/api/runs?points=2").await.json().await.unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 1, "{runs}");
    let run = &runs[0];
    assert_eq!(run["run"], "fortunes");
    assert_eq!(run["epoch"], 3);
    assert_eq!(run["active"], false);
    assert_eq!(run["target_batch"], 48);
    assert_eq!(run["history"].as_array().unwrap().len(), 2, "points=2");
    assert_eq!(
        run["swarm"]["members"].as_array().unwrap().len(),
        3,
        "{run}"
    );
    let full: Value = get("/api/runs/fortunes").await.json().await.unwrap();
    let steps = full["history"].as_array().unwrap();
    let avg: Vec<&Value> = steps.iter().filter(|p| p["kind"] == "averaged").collect();
    assert_eq!(avg.len(), averaged(&results[0].1.events), "{full}");
    for p in &avg {
        assert!(p["loss"].as_f64().unwrap() > 0.0, "{p}");
        assert!(p["peers"].as_u64().unwrap() >= 2, "{p}");
    }
    let r = http
        .get(format!("{api}/api/runs/no-such-run"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let rounds: Value = get("/api/allreduce/rounds").await.json().await.unwrap();
    let rounds = rounds.as_array().unwrap();
    assert!(rounds.len() >= avg.len(), "{rounds:?}");
    let ok: Vec<&Value> = rounds.iter().filter(|r| r["ok"] == true).collect();
    assert!(!ok.is_empty());
    for r in &ok {
        assert!(r["seconds"].as_f64().unwrap() > 0.0);
        assert!(r["bound_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["bytes_sent"].as_u64().unwrap() > 0, "{r}");
        assert!(r["members"].as_array().unwrap().len() >= 2);
    }
    let traffic: Value = get("/api/traffic").await.json().await.unwrap();
    let allreduce = traffic["protocols"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["protocol"] == "allreduce")
        .unwrap();
    assert!(allreduce["bytes_out"].as_u64().unwrap() > 0, "{traffic}");

    let metrics = get("/metrics").await.text().await.unwrap();
    for needle in [
        "colony_bytes_sent_total{protocol=\"allreduce\"}",
        "colony_bytes_received_total{protocol=\"rpc\"}",
        "colony_train_epoch{run=\"fortunes\"} 3",
        "colony_train_target_batch{run=\"fortunes\"} 48",
        "colony_allreduce_last_round_bound_seconds",
    ] {
        assert!(metrics.contains(needle), "{needle} missing:\n{metrics}");
    }

    let snap: Value = get("/api/snapshot").await.json().await.unwrap();
    assert_eq!(snap["runs"][0]["run"], "fortunes");
    assert!(!snap["rounds"].as_array().unwrap().is_empty());
    assert!(snap["bandwidth"]["peers"].is_object(), "{snap}");
    if let Some(up) = snap["bandwidth"]["up_bps"].as_f64() {
        assert!(up > 0.0, "{snap}");
        assert!(metrics.contains("colony_bandwidth_bytes_per_second{direction=\"up\"}"));
    }

    // The page and its assets, compiled in.
    let page = get("/").await.text().await.unwrap();
    assert!(page.contains("/assets/uPlot.iife.min.js"), "{page}");
    let js = get("/assets/dashboard.js").await.text().await.unwrap();
    assert!(js.contains("EventSource(\"/api/events\")"));
    get("/assets/uPlot.iife.min.js").await;
    let r = http
        .get(format!("{api}/assets/nothing.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Reads are open; writes need the node's token.
    let r = http
        .put(format!("{api}/api/dht/some-key"))
        .json(&serde_json::json!({ "value": "v", "subkey": "s", "ttl_s": 60 }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let token = swarm.nodes[0].api_token.clone().unwrap();
    let on_disk = std::fs::read_to_string(dir.path().join("node-0/api-token")).unwrap();
    assert_eq!(token, on_disk.trim());
    let r = http
        .put(format!("{api}/api/dht/some-key"))
        .bearer_auth(&token)
        .json(&serde_json::json!({ "value": "v", "subkey": "s", "ttl_s": 60 }))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    swarm.shutdown().await;
}

/// A peer that lies about its gradient: NaNs at even steps, the honest gradient × 10⁴ at odd
/// ones. Everything else is an honest trainer's.
struct Byzantine(AlbertTrainer);

impl Trainer for Byzantine {
    type Batch = colony_trainer::data::mlm::MlmBatch;
    fn fingerprint(&self) -> [u8; 32] {
        self.0.fingerprint()
    }
    fn epoch(&self) -> u64 {
        self.0.epoch()
    }
    fn samples(&self) -> u64 {
        self.0.samples()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn params(&self) -> &[f32] {
        self.0.params()
    }
    fn accumulate(
        &mut self,
        batch: &colony_trainer::data::mlm::MlmBatch,
    ) -> Result<f32, colony_trainer::collab::local::TrainError> {
        self.0.accumulate(batch)
    }
    fn mean_gradient(&self) -> Vec<f32> {
        let g = self.0.mean_gradient();
        if self.0.epoch().is_multiple_of(2) {
            vec![f32::NAN; g.len()]
        } else {
            g.iter().map(|x| x * 1e4).collect()
        }
    }
    fn reset_accumulator(&mut self) {
        self.0.reset_accumulator()
    }
    fn apply(&mut self, grad: &[f32]) -> Result<f32, colony_trainer::collab::local::TrainError> {
        self.0.apply(grad)
    }
    fn apply_keeping_accumulator(
        &mut self,
        grad: &[f32],
    ) -> Result<f32, colony_trainer::collab::local::TrainError> {
        self.0.apply_keeping_accumulator(grad)
    }
    fn state(&self) -> colony_trainer::collab::TrainState {
        self.0.state()
    }
    fn restore(
        &mut self,
        s: colony_trainer::collab::TrainState,
    ) -> Result<(), colony_trainer::collab::local::TrainError> {
        self.0.restore(s)
    }
}

/// Three honest peers and one Byzantine client (NaN gradients, then gradients × 10⁴)
/// average with CenteredClip: the aggregators drop the liar's parts (non-finite, or an
/// outlier by norm) and report it, so every honest peer bans it; the honest peers stay finite
/// and identical and their held-out loss falls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_byzantine_peer_is_dropped_and_banned_and_training_goes_on() {
    use colony_trainer::allreduce::reducer::Aggregation;
    let dir = tempfile::tempdir().unwrap();
    let job = job(dir.path());
    let swarm = swarm(4, dir.path()).await;
    let (mut fresh, _) = job.setup(b"probe").unwrap();
    let before = held_out_loss(&job, &mut fresh);
    let mut cfg = config(6, None);
    cfg.matching.aggregation = Aggregation::CenteredClip {
        tau: 1.0,
        iters: 10,
    };
    let stop = CancellationToken::new();
    let honest: Vec<_> = swarm.nodes[..3]
        .iter()
        .map(|n| spawn_peer(n, &job, cfg.clone(), stop.clone()))
        .collect();
    let liar_stop = CancellationToken::new();
    let liar_node = &swarm.nodes[3];
    let liar_id = liar_node.peer_id().to_string();
    let liar = {
        let h = liar_node.handle.clone();
        let (trainer, source) = job.setup(&liar_node.peer_id().to_bytes()).unwrap();
        let trainer: AlbertTrainer = Box::new(Byzantine(trainer));
        let mut cfg = cfg.clone();
        cfg.client = true;
        cfg.max_steps = None;
        let stop = liar_stop.clone();
        tokio::spawn(async move { train(&h, trainer, source, &cfg, stop).await })
    };
    let mut results = finish(honest).await;
    liar_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), liar).await;

    let params: Vec<&[f32]> = results.iter().map(|(t, _)| t.params()).collect();
    assert!(
        params[0].iter().all(|x| x.is_finite()),
        "the model stays finite"
    );
    for p in &params[1..] {
        assert_eq!(*p, params[0], "honest peers end on the same parameters");
    }
    let (mut t, s) = results.remove(0);
    assert_eq!(t.epoch(), 6);
    assert!(averaged(&s.events) >= 4, "{:?}", s.events);
    let after = held_out_loss(&job, &mut t);
    assert!(after < before, "held-out loss {before} -> {after}");
    for n in &swarm.nodes[..3] {
        let st = n.handle.status().await.unwrap();
        assert!(
            st.banned_peers.contains(&liar_id),
            "{} did not ban the liar: {st:?}",
            n.peer_id()
        );
    }
    swarm.shutdown().await;
}
