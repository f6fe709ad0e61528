//! Chaos: six `colony train` processes train albert-tiny on the fortunes while a peer is
//! killed with SIGKILL every few seconds and restarted (from its checkpoint, on the same
//! address). The run keeps making global steps; once the chaos stops every peer catches up;
//! after a clean stop every checkpoint decodes and the peers at the same step hold the same
//! parameters.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_survives_peers_killed_and_restarted() {
    colony_tests::init_tracing();
    assert!(
        Path::new(FORTUNES).exists(),
        "{FORTUNES} is missing (scripts/test.sh installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    // One tokenizer file for the whole run, and keys and ports fixed up front so that the
    // bootstrap addresses (peers 0 and 1) stay valid across restarts.
    let corpus = Corpus::read(Path::new(FORTUNES)).unwrap();
    let tok = dir.path().join("tokenizer.json");
    AlbertJob::tokenizer_for(&corpus, &tok, 2000).unwrap();
    let mut ids = Vec::new();
    let ports: Vec<u16> = (0..PEERS).map(|_| free_port()).collect();
    for i in 0..PEERS {
        let key = dir.path().join(format!("peer-{i}/node.key"));
        ids.push(
            colony_cli(&["keygen", "--out", key.to_str().unwrap()], None)
                .unwrap()
                .trim()
                .to_string(),
        );
    }
    let seeds: Vec<String> = (0..2)
        .map(|i| format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", ports[i], ids[i]))
        .collect();
    let args: Vec<Vec<String>> = (0..PEERS)
        .map(|i| {
            let data = dir.path().join(format!("peer-{i}"));
            let mut a: Vec<String> = [
                "--run",
                "chaos",
                "--model",
                "albert-tiny",
                "--data",
                FORTUNES,
                "--tokenizer",
                tok.to_str().unwrap(),
                "--target-batch",
                "64",
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
                "--http",
                "127.0.0.1:0",
                "--reachability",
                "public",
                "--listen",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            a.push(format!("/ip4/127.0.0.1/tcp/{}", ports[i]));
            a.push("--checkpoint".into());
            a.push(data.join("checkpoint.bin").to_str().unwrap().into());
            for (k, s) in seeds.iter().enumerate() {
                if k != i {
                    a.push("--bootstrap".into());
                    a.push(s.clone());
                }
            }
            a
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
    let mut by_epoch: BTreeMap<u64, Vec<(usize, Vec<f32>)>> = BTreeMap::new();
    for i in 0..PEERS {
        let path: PathBuf = dir.path().join(format!("peer-{i}/checkpoint.bin"));
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
    let largest = by_epoch.values().map(Vec::len).max().unwrap();
    assert!(
        largest >= PEERS - 1,
        "the peers stopped at scattered steps: {:?}",
        by_epoch
            .iter()
            .map(|(e, g)| (*e, g.len()))
            .collect::<Vec<_>>()
    );
    phase("every checkpoint decodes; peers at the same step hold the same parameters");
}
