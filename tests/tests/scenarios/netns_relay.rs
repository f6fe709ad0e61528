//! Three hosts in network namespaces: a relay (public), a public node, and a node that accepts
//! no inbound connections and is reached through the relay.

use std::time::Duration;

use colony_tests::netns::{self, NetLab};
use colony_tests::process::{NodeProcess, colony_cli};
use colony_tests::wait_for;
use serde_json::Value;

/// The API token of every node here (set in their config file).
const TOKEN: &str = "netns-relay-test-token";

fn cli_json(ns: &str, args: &[&str]) -> anyhow::Result<Value> {
    colony_tests::process::netns_cli_json(ns, TOKEN, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_node_is_reached_through_a_relay() {
    assert!(
        netns::available(),
        "this test needs root and iproute2 (`ip netns`); CI runs as root"
    );
    colony_tests::init_tracing();
    let t0 = std::time::Instant::now();
    let phase = |what: &str| eprintln!("[{:>6.1} s] {what}", t0.elapsed().as_secs_f64());
    let lab = NetLab::new(&format!("cr{}", std::process::id() % 10000), 77, 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.toml");
    std::fs::write(
        &cfg,
        format!("api_token = \"{TOKEN}\"\n[dht]\nannounce_interval_s = 2\nrpc_timeout_ms = 3000\n"),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    let (a, b, c) = (&lab.hosts[0], &lab.hosts[1], &lab.hosts[2]);
    // C cannot reach B directly either, so everything between them must cross the relay A.
    lab.block(2, 1).unwrap();

    let common = |listen_ip: &str| {
        vec![
            "--config".to_string(),
            cfg.clone(),
            "--http".into(),
            "127.0.0.1:8700".into(),
            "--listen".into(),
            format!("/ip4/{listen_ip}/tcp/4001"),
            "--listen".into(),
            format!("/ip4/{listen_ip}/udp/4001/quic-v1"),
        ]
    };
    let relay = NodeProcess::start(
        &dir.path().join("a"),
        &[
            common(&a.ip),
            vec!["--reachability".into(), "public".into()],
        ]
        .concat(),
        Some(&a.ns),
    )
    .unwrap();
    let seed = format!("/ip4/{}/tcp/4001/p2p/{}", a.ip, relay.info.peer_id);
    let public = NodeProcess::start(
        &dir.path().join("b"),
        &[
            common(&b.ip),
            vec![
                "--reachability".into(),
                "public".into(),
                "--bootstrap".into(),
                seed.clone(),
            ],
        ]
        .concat(),
        Some(&b.ns),
    )
    .unwrap();
    let private = NodeProcess::start(
        &dir.path().join("c"),
        &[
            common(&c.ip),
            vec![
                "--reachability".into(),
                "private".into(),
                "--bootstrap".into(),
                seed.clone(),
            ],
        ]
        .concat(),
        Some(&c.ns),
    )
    .unwrap();

    phase("nodes started");
    // The private node listens on nothing of its own: only on a circuit through the relay.
    let st = wait_for("a relay reservation", Duration::from_secs(30), || async {
        let st = cli_json(&c.ns, &["status"])?;
        let addrs = st["listen_addrs"].as_array().cloned().unwrap_or_default();
        Ok((!addrs.is_empty()).then_some(st))
    })
    .await
    .unwrap();
    for addr in st["listen_addrs"].as_array().unwrap() {
        assert!(
            addr.as_str().unwrap().contains("/p2p-circuit"),
            "private node listens directly: {st}"
        );
    }
    assert_eq!(st["dht_mode"], "client");

    phase("relay reservation up");
    // A direct TCP connection to C is refused: nothing listens there. (Tried from A, whose
    // packets C may answer; C's answers to B are blocked.)
    let direct = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &a.ns,
            "timeout",
            "5",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{}/4001", c.ip),
        ])
        .output()
        .unwrap();
    assert!(
        !direct.status.success(),
        "C must accept no inbound connections"
    );
    assert!(
        String::from_utf8_lossy(&direct.stderr).contains("refused"),
        "{}",
        String::from_utf8_lossy(&direct.stderr)
    );

    // B reaches C by peer id: it finds C's circuit address in C's signed node record.
    let c_id = private.info.peer_id.clone();
    let pong = wait_for(
        "B to ping C through the relay",
        Duration::from_secs(60),
        || async { Ok(cli_json(&b.ns, &["ping", &c_id]).ok()) },
    )
    .await
    .unwrap();
    assert!(pong["rtt_ms"].as_f64().unwrap() > 0.0);
    phase("B pinged C");

    // The DHT works both ways across the relay.
    colony_cli(
        &[
            "dht",
            "put",
            "test/from-c",
            "hello-from-c",
            "--api",
            "http://127.0.0.1:8700",
            "--token",
            TOKEN,
        ],
        Some(&c.ns),
    )
    .unwrap();
    let got = cli_json(&b.ns, &["dht", "get", "test/from-c"]).unwrap();
    assert!(got.to_string().contains("hello-from-c"), "{got}");
    colony_cli(
        &[
            "dht",
            "put",
            "test/from-b",
            "hello-from-b",
            "--api",
            "http://127.0.0.1:8700",
            "--token",
            TOKEN,
        ],
        Some(&b.ns),
    )
    .unwrap();
    let got = cli_json(&c.ns, &["dht", "get", "test/from-b"]).unwrap();
    assert!(got.to_string().contains("hello-from-b"), "{got}");

    phase("dht both ways");
    // B's only connection to C is the relayed one.
    let peers = cli_json(&b.ns, &["peers"]).unwrap();
    let to_c = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["peer_id"] == c_id.as_str())
        .cloned();
    let to_c = to_c.unwrap_or_else(|| panic!("B is connected to C: {peers}"));
    assert_eq!(to_c["relayed"], true, "{to_c}");
    for p in [&relay, &public, &private] {
        assert!(!p.log_text().contains("panicked"), "{}", p.log_text());
    }
}
