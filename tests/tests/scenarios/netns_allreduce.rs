//! `colony bench allreduce` at a small size: eight `colony` processes in network namespaces,
//! uploads and downloads shaped with tbf (downloads through ifb), matchmaking through the DHT,
//! two peers in client mode (no listening socket at all). Every peer's result must be the
//! exact weighted mean, in every round, with no failed sender or aggregator.

use colony_tests::netns;
use colony_tests::process::colony_cli;
use serde_json::Value;

#[test]
fn shaped_clients_profile_is_exact() {
    assert!(
        netns::available(),
        "this test needs root and iproute2 (`ip netns`, `tc`); CI runs as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("allreduce.json");
    let logs = dir.path().join("logs");
    let net = (100 + std::process::id() % 100).to_string();
    colony_cli(
        &[
            "bench",
            "allreduce",
            "--profile",
            "clients",
            "--floats",
            "300000",
            "--scale",
            "0.2",
            "--rounds",
            "2",
            "--probe-ms",
            "500",
            "--net",
            &net,
            "--json",
            json.to_str().unwrap(),
            "--logs",
            logs.to_str().unwrap(),
        ],
        None,
    )
    .unwrap();
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let case = &doc["cases"][0];
    let why = diagnostics(&logs.join("clients"));
    assert_eq!(case["profile"], "clients");
    assert_eq!(
        case["short_rounds"], 0,
        "matchmaking left a peer out: {case}\n{why}"
    );
    assert_eq!(case["incomplete_rounds"], 0, "{case}\n{why}");
    let err = case["max_abs_err"].as_f64().unwrap();
    assert!(err < 1e-5, "max_abs_err {err}: {case}");
    // Clients reduce nothing; the hetero split gives the slow peers no shard either.
    let shards: Vec<u64> = case["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(shards.iter().sum::<u64>(), 300_000);
    assert!(
        shards.iter().filter(|s| **s == 0).count() >= 2,
        "{shards:?}"
    );
    let makespan = case["makespan_s"].as_f64().unwrap();
    let bound = case["lower_bound_s"].as_f64().unwrap();
    assert!(makespan > 0.0 && bound > 0.0);
}

/// The rounds each peer reported and the matchmaking lines of every peer's log, for a failure
/// message.
fn diagnostics(dir: &std::path::Path) -> String {
    let mut out = std::fs::read_to_string(dir.join("rounds.jsonl")).unwrap_or_default();
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    for path in names {
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            out.push_str(&format!("--- {}\n", path.display()));
            for line in text
                .lines()
                .filter(|l| l.contains("matchmaking") || l.contains("WARN") || l.contains("ERROR"))
            {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}
