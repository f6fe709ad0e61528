//! The real `colony` binary, five processes on loopback.

use std::time::Duration;

use colony_tests::process::{NodeProcess, colony_cli};
use colony_tests::wait_for;
use serde_json::Value;

fn node_args(bootstrap: &[String], extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--http",
        "127.0.0.1:0",
        "--reachability",
        "public",
    ]
    .map(String::from)
    .to_vec();
    for b in bootstrap {
        a.push("--bootstrap".into());
        a.push(b.clone());
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

async fn get_json(url: &str) -> anyhow::Result<Value> {
    let r = reqwest::get(url).await?;
    anyhow::ensure!(r.status().is_success(), "{url}: {}", r.status());
    Ok(r.json().await?)
}

async fn routing_peers(p: &NodeProcess) -> anyhow::Result<u64> {
    Ok(
        get_json(&format!("{}/api/status", p.api())).await?["routing_table_peers"]
            .as_u64()
            .unwrap_or(0),
    )
}

/// Five nodes; two are killed with SIGKILL; the rest still answer gets for everything stored
/// before; a killed node restarted on its data directory keeps its peer id and rejoins; a
/// SIGTERM'd node exits 0 after writing its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_processes_survive_two_kill9_and_restart() {
    colony_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    // Three replicas: any two nodes can die and one copy of each entry survives.
    std::fs::write(
        &config,
        "[dht]\nreplicas = 3\nget_fanout = 5\nrpc_timeout_ms = 2000\n",
    )
    .unwrap();
    let cfg = ["--config", config.to_str().unwrap()];

    let mut nodes =
        vec![NodeProcess::start(&dir.path().join("n0"), &node_args(&[], &cfg), None).unwrap()];
    let seeds = nodes[0].dial_addrs();
    for i in 1..5 {
        nodes.push(
            NodeProcess::start(
                &dir.path().join(format!("n{i}")),
                &node_args(&seeds, &cfg),
                None,
            )
            .unwrap(),
        );
    }
    for p in &nodes {
        wait_for(
            "routing tables to fill",
            Duration::from_secs(30),
            || async { Ok((routing_peers(p).await? >= 4).then_some(())) },
        )
        .await
        .unwrap();
    }

    // Store through the CLI and the HTTP API of different nodes.
    let keys: Vec<String> = (0..12).map(|i| format!("test/proc/{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        let p = &nodes[i % 5];
        if i % 2 == 0 {
            let out = colony_cli(
                &[
                    "dht",
                    "put",
                    k,
                    &format!("v{i}"),
                    "--api",
                    &p.api(),
                    "--data-dir",
                    p.data_dir.to_str().unwrap(),
                ],
                None,
            )
            .unwrap();
            assert!(out.contains("stored"), "{out}");
        } else {
            let put = || {
                reqwest::Client::new()
                    .put(format!("{}/api/dht/{k}", p.api()))
                    .json(&serde_json::json!({ "value": format!("v{i}"), "subkey": "s", "ttl_s": 300 }))
            };
            let r = put().send().await.unwrap();
            assert_eq!(r.status(), 401, "a write without the token is refused");
            let r = put().bearer_auth("not-the-token").send().await.unwrap();
            assert_eq!(r.status(), 401);
            let r = put().bearer_auth(p.token()).send().await.unwrap();
            assert!(r.status().is_success());
        }
    }

    nodes[1].kill9().unwrap();
    nodes[3].kill9().unwrap();
    let killed_id = nodes[1].info.peer_id.clone();

    for reader in [0, 2, 4] {
        for (i, k) in keys.iter().enumerate() {
            let v = get_json(&format!("{}/api/dht/{k}", nodes[reader].api()))
                .await
                .unwrap();
            let vals: Vec<&str> = v["entries"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|e| e["value"].as_str())
                .collect();
            assert!(
                vals.contains(&format!("v{i}").as_str()),
                "node {reader} lost {k}: {v}"
            );
        }
    }
    // The CLI reads too.
    let out = colony_cli(&["dht", "get", &keys[0], "--api", &nodes[2].api()], None).unwrap();
    assert!(out.contains("v0"), "{out}");

    // Restart the killed node on its data directory.
    let dir1 = nodes[1].data_dir.clone();
    let restarted = NodeProcess::start(&dir1, &node_args(&seeds, &cfg), None).unwrap();
    assert_eq!(
        restarted.info.peer_id, killed_id,
        "a restarted node keeps its peer id"
    );
    wait_for(
        "the restarted node to rejoin",
        Duration::from_secs(30),
        || async { Ok((routing_peers(&restarted).await? >= 2).then_some(())) },
    )
    .await
    .unwrap();
    let v = get_json(&format!("{}/api/dht/{}", restarted.api(), keys[5]))
        .await
        .unwrap();
    assert!(v.to_string().contains("v5"), "{v}");
    nodes[1] = restarted;

    // `colony peers` and `colony status` against a live node.
    let peers: Value = serde_json::from_str(
        &colony_cli(&["peers", "--json", "--api", &nodes[0].api()], None).unwrap(),
    )
    .unwrap();
    assert!(peers.as_array().unwrap().len() >= 2, "{peers}");

    // Graceful shutdown: exit 0, state flushed.
    let status = nodes[2].terminate().unwrap();
    assert!(
        status.success(),
        "SIGTERM must exit 0, got {status}; log:\n{}",
        nodes[2].log_text()
    );
    assert!(nodes[2].data_dir.join("dht.snapshot").exists());
}

/// A corrupt config or key file stops `colony node` at start with a message naming the file.
#[test]
fn corrupt_config_and_key_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let bad_cfg = dir.path().join("bad.toml");
    std::fs::write(&bad_cfg, "listen = 5\n").unwrap();
    let out = std::process::Command::new(colony_tests::process::colony_bin())
        .args([
            "node",
            "--config",
            bad_cfg.to_str().unwrap(),
            "--http",
            "off",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("invalid"), "{err}");

    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("node.key"), b"\x00\x01garbage").unwrap();
    let out = std::process::Command::new(colony_tests::process::colony_bin())
        .args([
            "node",
            "--data-dir",
            data.to_str().unwrap(),
            "--http",
            "off",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node.key") && err.contains("corrupt"), "{err}");
}

/// The README's main job: `colony demo` runs end to end and reports what it checked.
#[test]
fn demo_runs_end_to_end() {
    let out = colony_cli(&["demo", "--json", "--http", "off"], None).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["nodes"], 4);
    assert_eq!(v["progress_entries_seen_by_every_node"], 4);
    assert_eq!(v["forged_overwrite_refused"], true);
    assert_eq!(v["gossip_delivered"], 3);
    assert!(
        v["allreduce"]["max_abs_err"].as_f64().unwrap() < 1e-3,
        "{v}"
    );
    assert!(
        v["routing"]["recall_at_10"].as_f64().unwrap() > 0.9,
        "the sharded index answers: {v}"
    );
    assert_eq!(v["patching"]["adopted_everywhere"], 3, "patch jobs: {v}");
    assert_eq!(v["patching"]["same_version"], true, "{v}");
    assert_eq!(v["patching"]["bad_patch_refused"], true, "{v}");
    // Hogwild! inference over peer RPC (SmolLM2 from scripts/fetch-data.sh): three workers,
    // each of which wrote.
    let texts = v["hogwild"]["worker_texts"].as_array().unwrap();
    assert_eq!(texts.len(), 3, "{v}");
    assert!(texts.iter().all(|t| !t.as_str().unwrap().is_empty()), "{v}");
    assert!(v["hogwild"]["tokens"].as_u64().unwrap() >= 3, "{v}");
    for row in v["ping_rtt_ms"].as_array().unwrap() {
        assert_eq!(
            row.as_array()
                .unwrap()
                .iter()
                .filter(|x| x.is_null())
                .count(),
            1,
            "every pair answered a ping: {v}"
        );
    }
}

/// The README's patch workflow with the real binary: `colony edit train` writes a model, two
/// `colony node` processes serve it from `[patch]` in their config, `colony patch submit` gets a
/// fix adopted, `colony patch list`/`show` and `colony status --json` show it on the other node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_patch_cli_workflow_runs_against_two_processes() {
    colony_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("digits.edit");
    let out = colony_cli(
        &[
            "edit",
            "train",
            "--arch",
            "mlp",
            "--epochs",
            "12",
            "--out",
            model.to_str().unwrap(),
        ],
        None,
    )
    .unwrap();
    assert!(out.contains("written to"), "{out}");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "[patch]\nmodel = {:?}\nquorum = 1\nrebroadcast_ms = 500\n",
            model.to_str().unwrap()
        ),
    )
    .unwrap();
    let cfg = ["--config", config.to_str().unwrap()];
    let a = NodeProcess::start(&dir.path().join("a"), &node_args(&[], &cfg), None).unwrap();
    let b = NodeProcess::start(
        &dir.path().join("b"),
        &node_args(&a.dial_addrs(), &cfg),
        None,
    )
    .unwrap();
    let (api_a, api_b) = (a.api(), b.api());
    wait_for(
        "the two nodes see each other",
        Duration::from_secs(20),
        || async {
            Ok(
                (get_json(&format!("{api_b}/api/status")).await?["connected_peers"].as_u64()
                    >= Some(1))
                .then_some(()),
            )
        },
    )
    .await
    .unwrap();
    // Gossipsub's mesh forms within a few heartbeats; the request is re-published until answered.
    let out = colony_cli(
        &[
            "patch",
            "submit",
            "--api",
            &api_a,
            "--data-dir",
            a.data_dir.to_str().unwrap(),
            "--control-index",
            "3",
            "--target",
            "7",
            "--wait",
            "60",
        ],
        None,
    )
    .unwrap();
    assert!(out.contains("accepted by 1 verifiers"), "{out}");
    let list: Value = serde_json::from_str(
        &colony_cli(&["patch", "list", "--api", &api_b, "--json"], None).unwrap(),
    )
    .unwrap();
    assert_eq!(list["len"], 1, "{list}");
    let id = list["chain"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["fate"] == "applied")
        .unwrap()["patch"]
        .as_str()
        .unwrap()
        .to_owned();
    let shown = colony_cli(&["patch", "show", &id[..12], "--api", &api_b], None).unwrap();
    assert!(
        shown.contains("accepted") && shown.contains("target 7"),
        "{shown}"
    );
    let st: Value =
        serde_json::from_str(&colony_cli(&["status", "--api", &api_b, "--json"], None).unwrap())
            .unwrap();
    assert_eq!(st["patch"]["len"], 1, "{st}");
    assert!(
        st["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "patch"),
        "{st}"
    );
    // A bad request is refused with a named error.
    let err = colony_cli(
        &[
            "patch",
            "submit",
            "--api",
            &api_a,
            "--data-dir",
            a.data_dir.to_str().unwrap(),
            "--control-index",
            "3",
            "--target",
            "12",
        ],
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not a class"), "{err}");
}
