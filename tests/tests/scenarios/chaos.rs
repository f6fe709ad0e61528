//! Chaos: `colony train` processes train albert-tiny on the fortunes while (1) a peer is
//! killed with SIGKILL every few seconds and restarted (from its checkpoint, on the same
//! address), or (2) the network is split in two and healed (in network namespaces). The run
//! keeps making global steps; afterwards every peer catches up; after a clean stop every
//! checkpoint decodes and the peers at the same step hold the same parameters (after a
//! partition, the islands' states are reconciled on the majority's).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use colony_daemon::train_cli::AlbertJob;
use colony_tests::process::{NodeProcess, colony_cli};
use colony_trainer::data::text::Corpus;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const FORTUNES: &str = "/usr/share/games/fortunes";
const PEERS: usize = 6;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The peer's global step, from its API (None while it is down or starting).
async fn epoch(p: &NodeProcess) -> Option<u64> {
    let v: Value = reqwest::get(format!("{}/api/runs", p.api()))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    v.as_array()?.iter().find(|r| r["run"] == "chaos")?["epoch"].as_u64()
}

async fn epochs(peers: &[NodeProcess]) -> Vec<Option<u64>> {
    let mut out = Vec::new();
    for p in peers {
        out.push(epoch(p).await);
    }
    out
}

fn start(dir: &Path, i: usize, args: &[String]) -> NodeProcess {
    NodeProcess::start_command("train", &dir.join(format!("peer-{i}")), args, None).unwrap()
}

/// The run's tokenizer (one file for every peer) and each peer's key, made up front so that
/// the bootstrap addresses are known before anything starts; returns the tokenizer's path and
/// the peer ids.
fn prepare(dir: &Path, n: usize) -> (PathBuf, Vec<String>) {
    let corpus = Corpus::read(Path::new(FORTUNES)).unwrap();
    let tok = dir.join("tokenizer.json");
    AlbertJob::tokenizer_for(&corpus, &tok, 2000).unwrap();
    let ids = (0..n)
        .map(|i| {
            let key = dir.join(format!("peer-{i}/node.key"));
            colony_cli(&["keygen", "--out", key.to_str().unwrap()], None)
                .unwrap()
                .trim()
                .to_string()
        })
        .collect();
    (tok, ids)
}

/// `colony train` arguments for peer `i` of a chaos run: albert-tiny on the fortunes, a
/// checkpoint in its data directory, serving its API on `http`, listening on `listen`,
/// bootstrapping from the `seeds` that are not its own (`id`).
#[allow(clippy::too_many_arguments)]
fn train_args(
    dir: &Path,
    i: usize,
    tok: &Path,
    target_batch: u64,
    http: &str,
    listen: String,
    seeds: &[String],
    id: &str,
) -> Vec<String> {
    let data = dir.join(format!("peer-{i}"));
    let mut a: Vec<String> = [
        "--run",
        "chaos",
        "--model",
        "albert-tiny",
        "--data",
        FORTUNES,
        "--micro-batch",
        "8",
        "--seq",
        "32",
        "--warmup",
        "2",
        "--seed",
        "3",
        "--discovery",
        "10",
        "--reachability",
        "public",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend([
        "--tokenizer".into(),
        tok.to_str().unwrap().into(),
        "--target-batch".into(),
        target_batch.to_string(),
        "--http".into(),
        http.into(),
        "--listen".into(),
        listen,
        "--checkpoint".into(),
        data.join("checkpoint.bin").to_str().unwrap().into(),
    ]);
    for s in seeds.iter().filter(|s| !s.ends_with(id)) {
        a.push("--bootstrap".into());
        a.push(s.clone());
    }
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_survives_peers_killed_and_restarted() {
    colony_tests::init_tracing();
    assert!(
        Path::new(FORTUNES).exists(),
        "{FORTUNES} is missing (scripts/test.sh installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    // Ports fixed up front too: the bootstrap addresses (peers 0 and 1) stay valid across
    // restarts.
    let (tok, ids) = prepare(dir.path(), PEERS);
    let ports: Vec<u16> = (0..PEERS).map(|_| free_port()).collect();
    let seeds: Vec<String> = (0..2)
        .map(|i| format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", ports[i], ids[i]))
        .collect();
    let args: Vec<Vec<String>> = (0..PEERS)
        .map(|i| {
            let listen = format!("/ip4/127.0.0.1/tcp/{}", ports[i]);
            train_args(
                dir.path(),
                i,
                &tok,
                64,
                "127.0.0.1:0",
                listen,
                &seeds,
                &ids[i],
            )
        })
        .collect();
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1} s] {what}", t0.elapsed().as_secs_f64());
    let mut peers: Vec<NodeProcess> = (0..PEERS).map(|i| start(dir.path(), i, &args[i])).collect();
    phase("six peers started");

    // Wait for the run to get going.
    let deadline = Instant::now() + Duration::from_secs(180);
    let before = loop {
        let e = epochs(&peers).await;
        if let Some(m) = e.iter().flatten().max()
            && *m >= 2
        {
            break *m;
        }
        assert!(Instant::now() < deadline, "no global step in 180 s: {e:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    phase(&format!("the run is at step {before}; chaos begins"));

    // 40 s of chaos: every 5 s a random peer is killed (SIGKILL) and restarted 2 s later.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let chaos_end = Instant::now() + Duration::from_secs(40);
    let mut kills = 0;
    while Instant::now() < chaos_end {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let victim = rng.gen_range(0..PEERS);
        peers[victim].kill9().unwrap();
        kills += 1;
        phase(&format!("killed peer {victim}"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        peers[victim] = start(dir.path(), victim, &args[victim]);
    }
    let during = epochs(&peers)
        .await
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0);
    phase(&format!("{kills} kills; the run reached step {during}"));
    assert!(
        during >= before + 3,
        "the run stalled under churn: {before} -> {during}"
    );

    // Everyone catches up and goes on.
    let target = during + 2;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let e = epochs(&peers).await;
        if e.iter().all(|x| x.is_some_and(|x| x >= target)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "peers did not all reach step {target}: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    phase(&format!("every peer reached step {target}"));

    // A clean stop (SIGTERM to all at once): each writes its checkpoint.
    for p in &peers {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &p.child.id().to_string()])
            .status();
    }
    for p in &mut peers {
        let status = p.terminate().unwrap();
        assert!(
            status.success(),
            "a peer failed to stop cleanly: {status}\n{}",
            p.log_text()
        );
    }
    check_checkpoints(dir.path(), PEERS);
    phase("every checkpoint decodes; peers at the same step hold the same parameters");
}

/// Every checkpoint decodes, peers at the same step hold the same parameters, and all stopped
/// within one step of each other (a SIGTERM can land while a round is finishing: the peers
/// that got its results apply it, the others stop before).
fn check_checkpoints(dir: &Path, n: usize) {
    let mut by_epoch: BTreeMap<u64, Vec<(usize, Vec<f32>)>> = BTreeMap::new();
    for i in 0..n {
        let path: PathBuf = dir.join(format!("peer-{i}/checkpoint.bin"));
        let state = colony_daemon::train::load_checkpoint(&path, 1 << 30)
            .unwrap_or_else(|e| panic!("peer {i}'s checkpoint is corrupt: {e:#}"))
            .unwrap_or_else(|| panic!("peer {i} left no checkpoint"));
        assert!(state.params.iter().all(|x| x.is_finite()));
        by_epoch
            .entry(state.epoch())
            .or_default()
            .push((i, state.params));
    }
    for (e, group) in &by_epoch {
        for (i, p) in &group[1..] {
            assert!(
                *p == group[0].1,
                "peers {} and {i} are both at step {e} with different parameters",
                group[0].0
            );
        }
    }
    let (lo, hi) = (
        *by_epoch.keys().next().unwrap(),
        *by_epoch.keys().next_back().unwrap(),
    );
    assert!(
        hi - lo <= 1,
        "the peers stopped at scattered steps: {:?}",
        by_epoch
            .iter()
            .map(|(e, g)| (*e, g.len()))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_survives_a_partition_and_the_islands_reconcile() {
    use colony_daemon::netlab::NetLab;
    assert!(
        colony_tests::netns::available(),
        "this test needs root and iproute2 (`ip netns`); CI runs as root"
    );
    colony_tests::init_tracing();
    const N: usize = 4;
    let lab = NetLab::new(&format!("cp{}", std::process::id() % 10000), 79, N).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (tok, ids) = prepare(dir.path(), N);
    let seeds: Vec<String> = [0, 2]
        .iter()
        .map(|&i| format!("/ip4/{}/tcp/4001/p2p/{}", lab.hosts[i].ip, ids[i]))
        .collect();
    let t0 = Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1} s] {what}", t0.elapsed().as_secs_f64());
    let mut peers = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let data = dir.path().join(format!("peer-{i}"));
        let listen = format!("/ip4/{}/tcp/4001", lab.hosts[i].ip);
        let a = train_args(
            dir.path(),
            i,
            &tok,
            32,
            "127.0.0.1:8700",
            listen,
            &seeds,
            id,
        );
        peers.push(NodeProcess::start_command("train", &data, &a, Some(&lab.hosts[i].ns)).unwrap());
    }
    // Each peer's step, through its API inside its namespace.
    let epochs = |lab: &NetLab| -> Vec<Option<u64>> {
        (0..N)
            .map(|i| {
                let out = colony_cli(
                    &["status", "--json", "--api", "http://127.0.0.1:8700"],
                    Some(&lab.hosts[i].ns),
                )
                .ok()?;
                let v: Value = serde_json::from_str(&out).ok()?;
                v["runs"].as_array()?.iter().find(|r| r["run"] == "chaos")?["epoch"].as_u64()
            })
            .collect()
    };
    let wait_all = |lab: &NetLab, at_least: u64, secs: u64| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let e = epochs(lab);
            if e.iter().all(|x| x.is_some_and(|x| x >= at_least)) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "not every peer reached step {at_least}: {e:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let e = wait_all(&lab, 2, 180);
    phase(&format!(
        "the run is at {e:?}; partition {{0, 1}} | {{2, 3}}"
    ));
    lab.partition(&[0, 1], &[2, 3]).unwrap();
    std::thread::sleep(Duration::from_secs(25));
    let split = epochs(&lab);
    phase(&format!("after 25 s apart: {split:?}; healing"));
    lab.heal(&[0, 1], &[2, 3]).unwrap();
    let top = split.iter().flatten().max().copied().unwrap_or(0);
    let e = wait_all(&lab, top + 3, 240);
    phase(&format!("every peer went on to {e:?}"));
    for p in &mut peers {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &p.child.id().to_string()])
            .status();
    }
    for p in &mut peers {
        let status = p.terminate().unwrap();
        assert!(status.success(), "{status}\n{}", p.log_text());
    }
    check_checkpoints(dir.path(), N);
    phase("every checkpoint decodes; peers at the same step hold the same parameters");
}
