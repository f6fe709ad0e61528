//! Four `colony node` processes started at once in network namespaces, while the network is
//! split in two ({0, 1} | {2, 3}), each bootstrapping from nodes 0 and 2: they form two
//! islands. Once the partition heals, the nodes re-dial the seeds they never reached and
//! Kademlia looks again, so the islands merge into one swarm: every node routes to the three
//! others and a record stored on one side is read on the other.

use std::time::Duration;

use colony_daemon::netlab::NetLab;
use colony_tests::process::{NodeProcess, colony_cli};
use colony_tests::{netns, wait_for};
use serde_json::Value;

const TOKEN: &str = "netns-dht-test-token";

fn cli_json(ns: &str, args: &[&str]) -> anyhow::Result<Value> {
    colony_tests::process::netns_cli_json(ns, TOKEN, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swarm_split_at_start_up_becomes_one_when_the_network_heals() {
    assert!(
        netns::available(),
        "this test needs root and iproute2 (`ip netns`); CI runs as root"
    );
    colony_tests::init_tracing();
    let lab = NetLab::new(&format!("cd{}", std::process::id() % 10000), 78, 4).unwrap();
    let (left, right) = ([0, 1], [2, 3]);
    lab.partition(&left, &right).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        format!("api_token = \"{TOKEN}\"\n[dht]\nannounce_interval_s = 2\nrpc_timeout_ms = 3000\n"),
    )
    .unwrap();
    // Keys first, so every node knows the seeds' peer ids before any of them starts.
    let mut ids = Vec::new();
    for i in 0..4 {
        let key = dir.path().join(format!("n{i}/node.key"));
        let out = colony_cli(&["keygen", "--out", key.to_str().unwrap()], None).unwrap();
        ids.push(out.trim().to_string());
    }
    let seeds: Vec<String> = [0, 2]
        .iter()
        .map(|&i| format!("/ip4/{}/tcp/4001/p2p/{}", lab.hosts[i].ip, ids[i]))
        .collect();
    let starts: Vec<_> = (0..4)
        .map(|i| {
            let host = &lab.hosts[i];
            let mut args = vec![
                "--config".to_string(),
                cfg.to_str().unwrap().to_string(),
                "--http".into(),
                "127.0.0.1:8700".into(),
                "--reachability".into(),
                "public".into(),
                "--listen".into(),
                format!("/ip4/{}/tcp/4001", host.ip),
            ];
            for s in seeds.iter().filter(|s| !s.ends_with(&ids[i])) {
                args.push("--bootstrap".into());
                args.push(s.clone());
            }
            let (data, ns) = (dir.path().join(format!("n{i}")), host.ns.clone());
            std::thread::spawn(move || NodeProcess::start(&data, &args, Some(&ns)))
        })
        .collect();
    let _nodes: Vec<NodeProcess> = starts
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();

    // Two islands: each node sees its own side only.
    for (i, other) in [(1, 0), (3, 2)] {
        let ns = lab.hosts[i].ns.clone();
        let want = ids[other].clone();
        wait_for("the islands to form", Duration::from_secs(30), || {
            let (ns, want) = (ns.clone(), want.clone());
            async move {
                let peers = cli_json(&ns, &["peers"])?;
                Ok(peers
                    .as_array()
                    .is_some_and(|a| a.iter().any(|p| p["peer_id"] == want.as_str()))
                    .then_some(()))
            }
        })
        .await
        .unwrap();
    }
    let st = cli_json(&lab.hosts[1].ns, &["status"]).unwrap();
    assert_eq!(st["connected_peers"], 1, "node 1 reaches only node 0: {st}");

    lab.heal(&left, &right).unwrap();
    for i in 0..4 {
        let ns = lab.hosts[i].ns.clone();
        wait_for(
            "every node to route to the three others",
            Duration::from_secs(90),
            || {
                let ns = ns.clone();
                async move {
                    let st = cli_json(&ns, &["status"])?;
                    Ok((st["routing_table_peers"].as_u64() >= Some(3)).then_some(()))
                }
            },
        )
        .await
        .unwrap();
    }
    // A record stored from one former island is read from the other.
    colony_cli(
        &[
            "dht",
            "put",
            "test/after-heal",
            "one-swarm",
            "--api",
            "http://127.0.0.1:8700",
            "--token",
            TOKEN,
        ],
        Some(&lab.hosts[1].ns),
    )
    .unwrap();
    let ns3 = lab.hosts[3].ns.clone();
    wait_for(
        "the record on the other side",
        Duration::from_secs(30),
        || {
            let ns3 = ns3.clone();
            async move {
                let got = cli_json(&ns3, &["dht", "get", "test/after-heal"])?;
                Ok(got.to_string().contains("one-swarm").then_some(()))
            }
        },
    )
    .await
    .unwrap();
}
