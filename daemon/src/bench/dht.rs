//! `colony bench dht`: put/get latency and success on an in-process swarm of real nodes on
//! loopback (TCP, Noise, Yamux), first undisturbed, then while a fraction of the nodes is
//! killed and replaced by fresh ones.
//!
//! Each case stores `ops` owned entries from random nodes, then reads every one back from
//! another random node; under churn the kills and replacements are spread over the read phase,
//! so a read succeeds only if the entry survived on the replicas.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use colony_protocol::{DhtKey, Subkey};
use futures::StreamExt;
use rand::Rng;
use rand::seq::SliceRandom;
use serde::Serialize;
use tokio::sync::Mutex;

use super::{percentile, rss_mib, write_json};
use crate::handle::NodeHandle;
use crate::local::{LocalSwarm, LocalSwarmConfig};

#[derive(Debug, Args)]
pub struct DhtBenchArgs {
    /// Small size, same code path (under a minute on 2 cores).
    #[arg(long)]
    pub quick: bool,
    /// Nodes in the swarm (default 50; 10 with --quick).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Entries stored and read per case (default 500; 100 with --quick).
    #[arg(long)]
    pub ops: Option<usize>,
    /// Fraction of nodes killed and replaced during the churn case.
    #[arg(long, default_value_t = 0.2)]
    pub churn: f64,
    /// Operations in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Write results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct DhtCase {
    pub nodes: usize,
    pub ops: usize,
    pub churn: f64,
    pub concurrency: usize,
    /// Seconds from starting the first node until every routing table held min(n−1, 8) peers.
    pub join_s: f64,
    pub replicas: usize,
    pub get_p50_ms: f64,
    pub get_p99_ms: f64,
    pub put_p50_ms: f64,
    pub put_p99_ms: f64,
    pub success_rate: f64,
    pub put_success_rate: f64,
    pub nodes_killed: usize,
    pub rss_per_node_mib: Option<f64>,
}

pub async fn run(args: DhtBenchArgs) -> anyhow::Result<()> {
    let nodes = args.nodes.unwrap_or(if args.quick { 10 } else { 50 });
    let ops = args.ops.unwrap_or(if args.quick { 100 } else { 500 });
    anyhow::ensure!(nodes >= 3, "--nodes must be at least 3");
    anyhow::ensure!(
        (0.0..1.0).contains(&args.churn),
        "--churn must be in [0, 1)"
    );
    let mut cases = Vec::new();
    for (i, churn) in [0.0, args.churn].into_iter().enumerate() {
        eprintln!(
            "dht bench: {nodes} nodes, {ops} ops, churn {churn}, {} in flight",
            args.concurrency
        );
        // Memory is measured in the first case only: later ones reuse freed pages.
        cases.push(run_case(nodes, ops, churn, args.concurrency, i == 0).await?);
    }
    println!(
        "{:>6} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10}",
        "nodes",
        "ops",
        "churn",
        "get p50",
        "get p99",
        "put p50",
        "put p99",
        "get ok",
        "put ok",
        "MiB/node"
    );
    for c in &cases {
        println!(
            "{:>6} {:>6} {:>6.2} {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>7.1}% {:>7.1}% {:>10}",
            c.nodes,
            c.ops,
            c.churn,
            c.get_p50_ms,
            c.get_p99_ms,
            c.put_p50_ms,
            c.put_p99_ms,
            100.0 * c.success_rate,
            100.0 * c.put_success_rate,
            c.rss_per_node_mib.map_or("-".into(), |m| format!("{m:.1}"))
        );
    }
    if let Some(p) = &args.json {
        write_json(p, "dht", &cases)?;
    }
    Ok(())
}

async fn run_case(
    n: usize,
    ops: usize,
    churn: f64,
    concurrency: usize,
    measure_rss: bool,
) -> anyhow::Result<DhtCase> {
    let dir = tempfile::Builder::new()
        .prefix("colony-bench-dht-")
        .tempdir()?;
    let rss0 = rss_mib();
    let t_join = Instant::now();
    let cfg = LocalSwarmConfig {
        nodes: n,
        bootstrap_from: 3,
        ..LocalSwarmConfig::default()
    };
    let replicas = cfg.template.dht.replicas;
    let mut swarm = LocalSwarm::start(dir.path(), cfg).await?;
    swarm
        .wait_for_routing((n - 1).min(8), Duration::from_secs(60))
        .await?;
    let join_s = t_join.elapsed().as_secs_f64();
    let rss_per_node = rss0
        .zip(rss_mib())
        .filter(|_| measure_rss)
        .map(|(a, b)| (b - a) / n as f64);

    let live: Arc<Mutex<Vec<NodeHandle>>> = Arc::new(Mutex::new(
        swarm.nodes.iter().map(|x| x.handle.clone()).collect(),
    ));
    let case = rand::random::<u32>();

    // Warm-up, not measured: right after start every node is still running its Kademlia
    // bootstrap and dialling the others; the figures below are for a settled swarm.
    for i in 0..ops.min(30) {
        let h = random_node(&live).await.expect("nodes");
        let key = DhtKey::new(format!("warmup/{case}/{i}"))?;
        let _ = h
            .dht_put_owned(key.clone(), vec![0; 8], Duration::from_secs(60))
            .await;
        let _ = h.dht_get(&key).await;
    }

    // Phase 1: puts.
    let puts = futures::stream::iter(0..ops)
        .map(|i| {
            let live = live.clone();
            async move {
                let h = random_node(&live).await.expect("nodes");
                let key = DhtKey::new(format!("bench/{case}/{i}")).expect("valid key");
                let value: Vec<u8> = (0..64).map(|_| rand::thread_rng().r#gen()).collect();
                let t = Instant::now();
                let ok = h
                    .dht_put_owned(key.clone(), value.clone(), Duration::from_secs(600))
                    .await
                    .is_ok();
                (
                    key,
                    h.signer().public(),
                    value,
                    t.elapsed().as_secs_f64() * 1e3,
                    ok,
                )
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    let put_ms: Vec<f64> = puts.iter().map(|p| p.3).collect();
    let put_ok = puts.iter().filter(|p| p.4).count();

    // Phase 2: gets, while `churn · n` nodes are killed and replaced.
    let kills = (churn * n as f64).round() as usize;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churner = {
        let (live, done) = (live.clone(), done.clone());
        let mut victims: Vec<crate::node::Node> = std::mem::take(&mut swarm.nodes);
        victims.shuffle(&mut rand::thread_rng());
        let mut survivors = victims.split_off(kills.min(victims.len()));
        async move {
            let mut killed = 0;
            for victim in victims {
                if done.load(std::sync::atomic::Ordering::Relaxed) {
                    survivors.push(victim);
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                let id = victim.peer_id();
                live.lock().await.retain(|h| h.peer_id() != id);
                victim.kill();
                killed += 1;
                // Join through a live node: the original seeds may be among the dead.
                let seeds = match survivors.choose(&mut rand::thread_rng()) {
                    Some(s) => s.dial_addrs().await.unwrap_or_default(),
                    None => Vec::new(),
                };
                match swarm.spawn_node_with(seeds).await {
                    Ok(fresh) => {
                        live.lock().await.push(fresh.handle.clone());
                        survivors.push(fresh);
                    }
                    Err(e) => tracing::warn!("cannot start a replacement node: {e:#}"),
                }
            }
            (killed, survivors)
        }
    };
    let gets = async {
        let r = futures::stream::iter(puts.iter().filter(|p| p.4))
            .map(|(key, owner, value, _, _)| {
                let live = live.clone();
                async move {
                    // A reader killed by the churn mid-get is a dead client, not a DHT miss:
                    // like a real client, retry through another live node (the time counts).
                    let t = Instant::now();
                    let mut ok = false;
                    for _ in 0..3 {
                        let Some(h) = random_node(&live).await else {
                            break;
                        };
                        match h.dht_get(key).await {
                            Ok(r) => {
                                ok = r.entries.iter().any(|e| e.subkey == Subkey::Owner(*owner) && e.value == *value);
                                if !ok {
                                    tracing::warn!(%key, reader = %h.peer_id(), "entry not found");
                                }
                                break;
                            }
                            Err(e) if !live.lock().await.iter().any(|x| x.peer_id() == h.peer_id()) => {
                                tracing::debug!(%key, "reader died during the get ({e:#}); retrying elsewhere");
                            }
                            Err(e) => {
                                tracing::warn!(%key, reader = %h.peer_id(), "get failed: {e:#}");
                                break;
                            }
                        }
                    }
                    (t.elapsed().as_secs_f64() * 1e3, ok)
                }
            })
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>()
            .await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    };
    let (gets, (killed, survivors)) = tokio::join!(gets, churner);
    let get_ms: Vec<f64> = gets.iter().map(|g| g.0).collect();
    let get_ok = gets.iter().filter(|g| g.1).count();
    futures::future::join_all(survivors.into_iter().map(|n| n.shutdown())).await;

    Ok(DhtCase {
        nodes: n,
        ops,
        churn,
        concurrency,
        join_s,
        replicas,
        get_p50_ms: percentile(&get_ms, 50.0),
        get_p99_ms: percentile(&get_ms, 99.0),
        put_p50_ms: percentile(&put_ms, 50.0),
        put_p99_ms: percentile(&put_ms, 99.0),
        success_rate: get_ok as f64 / ops.max(1) as f64,
        put_success_rate: put_ok as f64 / ops.max(1) as f64,
        nodes_killed: killed,
        rss_per_node_mib: rss_per_node,
    })
}

/// A live node chosen at random (none once every node is gone).
async fn random_node(live: &Mutex<Vec<NodeHandle>>) -> Option<NodeHandle> {
    live.lock().await.choose(&mut rand::thread_rng()).cloned()
}
