//! Patch jobs in a 5-node swarm: a request is solved, verified by a quorum and adopted by every
//! node; a forged patch (signed by someone other than its author) and a patch with a high
//! drawdown are refused and their sender penalised; two concurrent requests end in the same
//! version on every node.

use std::time::Duration;

use colony_daemon::local::{LocalSwarm, LocalSwarmConfig};
use colony_daemon::patch_service::{PatchConfig, PatchList, PatchService, SubmitRequest};
use colony_protocol::envelope::SignedEnvelope;
use colony_protocol::patch::{Delta, MAX_PATCH_BYTES, PATCH_DOMAIN, Patch, PatchGossip};
use colony_protocol::{encode, names::patches_topic};
use colony_tests::wait_for;
use colony_trainer::backend::CpuTrain;
use colony_trainer::data::images::ImageSet;
use colony_trainer::edit::chain::base_version;
use colony_trainer::edit::model::model_file;
use colony_trainer::edit::net::Arch;
use colony_trainer::edit::train::{Digits, Mode, TrainConfig, train};

fn digits() -> ImageSet {
    ImageSet::digits(&colony_daemon::swav_job::default_digits())
        .expect("the digits set (scripts/fetch-data.sh)")
}

fn svc(swarm: &LocalSwarm, i: usize) -> &PatchService {
    swarm.nodes[i].patch.as_ref().unwrap()
}

/// Waits until every node holds the same version with at least `len` patches.
async fn converged(swarm: &LocalSwarm, len: u64, what: &str) -> Vec<PatchList> {
    wait_for(what, Duration::from_secs(60), || async {
        let lists: Vec<PatchList> = (0..swarm.nodes.len())
            .map(|i| svc(swarm, i).list())
            .collect();
        let same = lists.iter().all(|l| l.version == lists[0].version);
        Ok((same && lists[0].len >= len).then_some(lists))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_swarm_adopts_good_patches_refuses_bad_ones_and_agrees_on_concurrent_ones() {
    colony_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let set = digits();
    let (tr, te) = Digits::from_set(&set).unwrap().split(7, 0.2);
    let mut cfg = TrainConfig::new(Arch::Mlp, Mode::Editable);
    cfg.epochs = 15;
    let (net, _) = train::<CpuTrain>(&cfg, &tr, &Default::default());
    let model_path = dir.path().join("digits.edit");
    let model_id = model_file(&net, "editable", &cfg.editor, &set, 7, 0.2)
        .unwrap()
        .save(&model_path)
        .unwrap();

    let mut lc = LocalSwarmConfig {
        nodes: 5,
        first_http: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    };
    lc.template.patch = Some(PatchConfig {
        quorum: 3,
        rebroadcast_ms: 500,
        ..PatchConfig::new(model_path.clone())
    });
    let swarm = LocalSwarm::start(&dir.path().join("nodes"), lc)
        .await
        .unwrap();
    swarm
        .wait_for_routing(4, Duration::from_secs(20))
        .await
        .unwrap();
    for i in 0..5 {
        assert_eq!(svc(&swarm, i).model_id(), model_id);
    }

    // 1. A good patch, requested through node 0's HTTP API.
    let api = format!("http://{}", swarm.nodes[0].http_addr.unwrap());
    let http = reqwest::Client::new();
    let token = swarm.nodes[0].api_token.clone().unwrap();
    let target = (te.labels[3] as u32 + 1) % 10;
    let r = http
        .post(format!("{api}/api/patch/submit"))
        .bearer_auth(&token)
        .json(&SubmitRequest {
            sample: None,
            control_index: Some(3),
            target,
        })
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let lists = converged(&swarm, 1, "every node adopts the patch").await;
    assert_eq!(
        lists[0].len, 1,
        "one patch per request: {:?}",
        lists[0].chain
    );
    let adopted = lists[0]
        .chain
        .iter()
        .find(|s| s.fate == "applied")
        .unwrap()
        .patch
        .clone();
    let shown = svc(&swarm, 2).show(&adopted).unwrap();
    assert!(shown.accepts >= 3, "{shown:?}");
    // Bad requests get named errors.
    let r = http
        .post(format!("{api}/api/patch/submit"))
        .bearer_auth(&token)
        .json(&SubmitRequest {
            sample: Some(vec![0.5; 3]),
            control_index: None,
            target: 1,
        })
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("64"));
    let r = http
        .post(format!("{api}/api/patch/submit"))
        .bearer_auth(&token)
        .json(&SubmitRequest {
            sample: None,
            control_index: Some(3),
            target: 12,
        })
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains("not a class"));

    // 2. Node 4 turns bad. A forged patch: the author field names node 1, node 4 signs it.
    let attacker = &swarm.nodes[4].handle;
    let victim = swarm.nodes[1].handle.signer().public();
    let head = svc(&swarm, 0).list();
    let parent = hex::decode(&head.version).unwrap().try_into().unwrap();
    let sample = te.image(5).to_vec();
    let t5 = (te.labels[5] as u32 + 2) % 10;
    let mut bad = Patch {
        model: model_id.clone(),
        parent,
        parent_len: 1,
        request: [7; 32],
        sample,
        target: t5,
        // The target's bias lifted for every input: the edit holds, most answers change.
        delta: Delta::Rank1 {
            rows: vec![],
            h: vec![0.0; 128],
            bias: vec![(t5, 1000.0)],
        },
        editor: cfg.editor.spec(),
        steps: 1,
        author: victim,
        created_ms: 1,
    };
    let offences_before: u64 = {
        let mut n = 0;
        for node in &swarm.nodes[..4] {
            n += node.handle.status().await.unwrap().offences;
        }
        n
    };
    let seal = |p: &Patch| {
        let env = SignedEnvelope::seal(
            attacker.signer(),
            PATCH_DOMAIN,
            1,
            rand::random(),
            encode(p, MAX_PATCH_BYTES).unwrap(),
        );
        PatchGossip::Patch(env).to_bytes().unwrap()
    };
    let topic = patches_topic("patches");
    attacker.publish(&topic, seal(&bad)).await.unwrap();
    // 3. The same delta, honestly signed by node 4: a high drawdown.
    bad.author = attacker.signer().public();
    let high_id = hex::encode(bad.id().unwrap());
    attacker.publish(&topic, seal(&bad)).await.unwrap();
    wait_for(
        "the high-drawdown patch is rejected",
        Duration::from_secs(30),
        || async {
            Ok((0..4)
                .all(|i| {
                    svc(&swarm, i)
                        .show(&high_id)
                        .is_some_and(|p| p.status.contains("drawdown"))
                })
                .then_some(()))
        },
    )
    .await
    .unwrap();
    wait_for(
        "the senders are penalised",
        Duration::from_secs(10),
        || async {
            let mut n = 0;
            for node in &swarm.nodes[..4] {
                n += node.handle.status().await?.offences;
            }
            Ok((n >= offences_before + 2).then_some(()))
        },
    )
    .await
    .unwrap();
    for i in 0..5 {
        let l = svc(&swarm, i).list();
        assert_eq!(l.len, 1, "node {i} adopted a bad patch: {:?}", l.chain);
        assert!(
            !l.proposals
                .iter()
                .any(|p| p.author == swarm.nodes[1].peer_id().to_string() && p.target == t5),
            "node {i} took the forged patch"
        );
    }
    // The base version is the model id's hash chain start.
    assert_ne!(lists[0].version, hex::encode(base_version(&model_id)));

    // 4. Two concurrent requests, on two nodes at once.
    let (a, b) = (svc(&swarm, 1), svc(&swarm, 2));
    let (ta, tb) = (
        (te.labels[10] as u32 + 1) % 10,
        (te.labels[20] as u32 + 3) % 10,
    );
    let (ra, rb) = tokio::join!(
        a.submit(
            &swarm.nodes[1].handle,
            SubmitRequest {
                sample: None,
                control_index: Some(10),
                target: ta
            }
        ),
        b.submit(
            &swarm.nodes[2].handle,
            SubmitRequest {
                sample: None,
                control_index: Some(20),
                target: tb
            }
        ),
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let lists = wait_for(
        "both requests decided on every node",
        Duration::from_secs(60),
        || async {
            let lists: Vec<PatchList> = (0..5).map(|i| svc(&swarm, i).list()).collect();
            let decided = lists.iter().all(|l| {
                [&ra, &rb].iter().all(|r| {
                    l.proposals
                        .iter()
                        .any(|p| &&p.request == r && p.status == "accepted")
                })
            });
            let same = lists.iter().all(|l| l.version == lists[0].version);
            Ok((decided && same).then_some(lists))
        },
    )
    .await
    .unwrap();
    eprintln!("chain after the concurrent requests: {:?}", lists[0].chain);
    assert!(lists[0].len >= 2, "{:?}", lists[0].chain);
    for l in &lists {
        assert_eq!(l.version, lists[0].version);
        assert_eq!(l.len, lists[0].len);
    }
    // Prometheus metrics of node 0 show the same state, in a well-formed exposition.
    let text = http
        .get(format!("{api}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples = parse_exposition(&text);
    let get = |name: &str, label: Option<(&str, &str)>| -> f64 {
        samples
            .iter()
            .find(|(n, l, _)| {
                n == name && label.is_none_or(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
            .2
    };
    assert_eq!(get("colony_patch_chain_length", None), lists[0].len as f64);
    assert!(get("colony_patch_proposals", Some(("status", "rejected"))) >= 1.0);
    assert!(get("colony_connected_peers", None) >= 4.0);
    assert!(get("colony_offences_total", None) >= 1.0);
    assert_eq!(get("colony_up", None), 1.0);
    swarm.shutdown().await;
}

/// Parses Prometheus text exposition strictly: every sample belongs to a family declared by
/// `# TYPE` before it, names and label sets are well formed, values are numbers.
fn parse_exposition(text: &str) -> Vec<(String, String, f64)> {
    let mut typed = std::collections::HashSet::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let name = it.next().unwrap();
            let kind = it.next().unwrap();
            assert!(
                ["gauge", "counter", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                typed.insert(name.to_owned()),
                "family {name} declared twice"
            );
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (head, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match head.split_once('{') {
            Some((n, l)) => {
                assert!(l.ends_with('}'), "{line}");
                (n, l.trim_end_matches('}').to_owned())
            }
            None => (head, String::new()),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        assert!(typed.contains(name), "sample before its # TYPE: {line}");
        let v: f64 = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        out.push((name.to_owned(), labels, v));
    }
    out
}
