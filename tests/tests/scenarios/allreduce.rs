//! The all-reduce over real nodes (TCP, Noise, Yamux on loopback), against the exact
//! weighted mean.

use std::time::Duration;

use colony_daemon::allreduce::{DriveConfig, Group, run_round};
use colony_daemon::local::{LocalSwarm, LocalSwarmConfig};
use colony_protocol::allreduce::RoundId;
use colony_trainer::allreduce::balance::{Link, PeerMode, optimal_split};
use colony_trainer::allreduce::compression::Compression;
use colony_trainer::allreduce::partition::{shard_ranges, shard_sizes};
use colony_trainer::allreduce::round::{RoundConfig, RoundSpec};

use PeerMode::{Aux, Client, Node};

fn vectors(n: usize, len: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|i| {
            (0..len)
                .map(|k| (((k * 31 + i * 977) % 1999) as f32 - 999.0) / 10.0)
                .collect()
        })
        .collect()
}

fn exact(vs: &[Vec<f32>], w: &[f64], who: &[usize]) -> Vec<f32> {
    let total: f64 = who.iter().map(|&i| w[i]).sum();
    (0..vs[0].len())
        .map(|k| (who.iter().map(|&i| w[i] * f64::from(vs[i][k])).sum::<f64>() / total) as f32)
        .collect()
}

/// Runs one round on a fresh swarm; every element must be within `abs_tol` of the exact mean
/// (inputs lie in [-100, 100]).
async fn run(modes: &[PeerMode], compression: Compression, len: usize, abs_tol: f32) {
    colony_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let swarm = LocalSwarm::start(
        dir.path(),
        LocalSwarmConfig {
            nodes: modes.len(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let bandwidths = [100.0, 40.0, 70.0, 25.0, 200.0, 50.0, 80.0, 30.0];
    let links: Vec<Link> = modes
        .iter()
        .enumerate()
        .map(|(i, &mode)| Link {
            up: bandwidths[i % 8],
            down: bandwidths[i % 8],
            mode,
        })
        .collect();
    let plan = optimal_split(&links).unwrap();
    let weights: Vec<f64> = modes
        .iter()
        .enumerate()
        .map(|(i, m)| if m.sends() { 1.0 + i as f64 * 3.0 } else { 0.0 })
        .collect();
    let spec = RoundSpec {
        modes: modes.to_vec(),
        weights: weights.clone(),
        shard_sizes: shard_sizes(len, &plan.fractions, 64),
        part_len: 4096,
        aggregation: Default::default(),
    };
    let group = Group {
        round: RoundId(rand::random()),
        members: swarm.nodes.iter().map(|n| n.peer_id()).collect(),
        spec,
        compression,
        predicted_s: 0.0,
    };
    let vs = vectors(modes.len(), len);
    let cfg = DriveConfig {
        round: RoundConfig {
            sender_timeout_ms: 10_000,
            reducer_timeout_ms: 20_000,
            confirm_grace_ms: 5_000,
        },
        window: 8,
        timeout: Duration::from_secs(60),
        join_grace: Duration::from_secs(10),
    };
    let runs = swarm.nodes.iter().zip(vs.clone()).map(|(node, v)| {
        let group = group.clone();
        async move { run_round(&node.handle, &group, v, cfg).await }
    });
    let reports = futures::future::join_all(runs).await;
    let senders: Vec<usize> = (0..modes.len()).filter(|&i| modes[i].sends()).collect();
    let want = exact(&vs, &weights, &senders);
    for (i, r) in reports.into_iter().enumerate() {
        let r = r.unwrap_or_else(|e| panic!("peer {i}: {e:#}"));
        assert!(
            r.failed_aggregators.is_empty() && r.failed_senders.is_empty(),
            "peer {i}: {r:?}"
        );
        match r.result {
            None => assert_eq!(modes[i], Aux),
            Some(v) => {
                for (k, (a, b)) in v.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= abs_tol,
                        "{compression:?} peer {i} element {k}: {a} vs {b}"
                    );
                }
            }
        }
    }
    swarm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_mean_over_the_swarm_with_nodes_clients_and_aux() {
    // f32 end to end: only summation order differs from the oracle.
    run(
        &[Node, Node, Client, Aux, Node, Client],
        Compression::None,
        300_000,
        1e-4,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_rounds_stay_within_their_error() {
    // fp16 twice (parts, then results): at most 2 · 100 · 2⁻¹¹ ≈ 0.1.
    run(&[Node, Node, Node, Client], Compression::Fp16, 100_000, 0.1).await;
    // 8-bit blockwise: two quantisations of at most absmax/254 ≈ 0.4 each.
    run(
        &[Node, Aux, Node, Client],
        Compression::Uint8Blockwise { block: 256 },
        100_000,
        0.8,
    )
    .await;
}

/// A node killed mid-round: the survivors finish, agree on every shard but the dead node's,
/// and each element is the mean with or without the dead node (or, in its shard, local).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survivors_finish_and_agree_when_a_node_dies_mid_round() {
    colony_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut swarm = LocalSwarm::start(
        dir.path(),
        LocalSwarmConfig {
            nodes: 5,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let len = 400_000;
    let modes = vec![Node; 5];
    let weights = vec![1.0, 2.0, 3.0, 4.0, 5.0];
    let spec = RoundSpec {
        modes,
        weights: weights.clone(),
        shard_sizes: shard_sizes(len, &[0.2; 5], 64),
        part_len: 2048,
        aggregation: Default::default(),
    };
    let group = Group {
        round: RoundId(rand::random()),
        members: swarm.nodes.iter().map(|n| n.peer_id()).collect(),
        spec: spec.clone(),
        compression: Compression::None,
        predicted_s: 0.0,
    };
    let vs = vectors(5, len);
    let cfg = DriveConfig {
        // Generous: the dead node is noticed by its connection closing, not by these; short
        // ones made a loaded CI machine give up on live aggregators too.
        round: RoundConfig {
            sender_timeout_ms: 15_000,
            reducer_timeout_ms: 30_000,
            confirm_grace_ms: 5_000,
        },
        window: 4,
        timeout: Duration::from_secs(90),
        join_grace: Duration::from_secs(10),
    };
    let victim = swarm.nodes.remove(2);
    let mut tasks = Vec::new();
    for (i, node) in swarm.nodes.iter().enumerate() {
        let idx = if i >= 2 { i + 1 } else { i };
        let (h, g, v) = (node.handle.clone(), group.clone(), vs[idx].clone());
        tasks.push(tokio::spawn(async move { run_round(&h, &g, v, cfg).await }));
    }
    let (vh, vg, vv) = (victim.handle.clone(), group.clone(), vs[2].clone());
    let victim_task = tokio::spawn(async move { run_round(&vh, &vg, vv, cfg).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    victim_task.abort();
    victim.kill();

    let all = exact(&vs, &weights, &[0, 1, 2, 3, 4]);
    let without = exact(&vs, &weights, &[0, 1, 3, 4]);
    let shard2 = {
        let start: usize = spec.shard_sizes[..2].iter().sum();
        start..start + spec.shard_sizes[2]
    };
    let ranges = shard_ranges(&spec.shard_sizes);
    let mut results = Vec::new();
    let mut verdicts = Vec::new();
    for (t, idx) in tasks.into_iter().zip([0, 1, 3, 4]) {
        let r = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("survivor {idx}: {e:#}"));
        assert!(
            r.failed_aggregators.contains(&2),
            "survivor {idx} did not report the dead aggregator: {:?}",
            r.failed_aggregators
        );
        let local = |k: usize| r.failed_aggregators.iter().any(|&j| ranges[j].contains(&k));
        let v = r.result.unwrap();
        for k in 0..len {
            let ok = (v[k] - all[k]).abs() < 1e-3
                || (v[k] - without[k]).abs() < 1e-3
                || (local(k) && v[k] == vs[idx][k]);
            assert!(
                ok,
                "survivor {idx} element {k}: {} (all {}, without {}; local shards {:?})",
                v[k], all[k], without[k], r.failed_aggregators
            );
        }
        assert!(
            shard2.clone().all(|k| v[k] == vs[idx][k]),
            "shard 2 stays local"
        );
        results.push(v);
        verdicts.push(r.failed_aggregators);
    }
    // The confirmation step: every survivor gave up on the same aggregators (on an idle
    // machine, only the dead one), and agrees everywhere else.
    assert!(verdicts.iter().all(|v| *v == verdicts[0]), "{verdicts:?}");
    for v in &results[1..] {
        for k in (0..len).filter(|&k| !verdicts[0].iter().any(|&j| ranges[j].contains(&k))) {
            assert_eq!(v[k], results[0][k], "survivors disagree at element {k}");
        }
    }
    swarm.shutdown().await;
}
