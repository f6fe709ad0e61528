//! `colony bench train --links`: `colony train` processes, each in its own network namespace
//! on shaped links (the slowest one a client with no listening socket), train albert-tiny on
//! the fortunes. Every step must be averaged and the swarm must end on the parameters of one
//! process replaying the same micro-batches.

use colony_tests::netns;
use colony_tests::process::colony_cli;
use serde_json::Value;

#[test]
fn processes_on_shaped_links_train_like_one_process() {
    assert!(
        netns::available(),
        "this test needs root and iproute2 (`ip netns`, `tc`); CI runs as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("train.json");
    let keep = dir.path().join("peers");
    let net = (100 + (std::process::id() + 37) % 100).to_string();
    colony_cli(
        &[
            "bench",
            "train",
            "--quick",
            "--links",
            "clients",
            "--scale",
            "0.2",
            "--net",
            &net,
            "--json",
            json.to_str().unwrap(),
            "--keep",
            keep.to_str().unwrap(),
        ],
        None,
    )
    .unwrap();
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let case = &doc["cases"][0];
    assert_eq!(case["setup"], "processes in namespaces", "{case}");
    assert_eq!(
        case["averaged_steps"],
        case["steps"],
        "{case}\n{}",
        peer_logs(&keep)
    );
    let diff = case["max_param_diff_vs_single"].as_f64().unwrap();
    assert!(diff < 1e-4, "the swarm drifted from the replay: {case}");
    let links = case["links_mbit"].as_array().unwrap();
    assert_eq!(links.len(), 3);
    assert_eq!(links[0][0], 80.0, "{case}");
    assert_eq!(links[2][0], 5.0, "{case}");
}

/// The tail of every peer's log, to explain a step that was not averaged.
fn peer_logs(dir: &std::path::Path) -> String {
    let mut out = String::new();
    for i in 0.. {
        let path = dir.join(format!("peer-{i}/log.txt"));
        let Ok(text) = std::fs::read_to_string(&path) else {
            break;
        };
        let lines: Vec<&str> = text.lines().collect();
        out += &format!(
            "--- peer {i} ({})\n{}\n",
            path.display(),
            lines[lines.len().saturating_sub(60)..].join("\n")
        );
    }
    out
}
