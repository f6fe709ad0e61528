//! An index served in shards by the swarm: three shards, each on two of three nodes; a fourth
//! node's query (peer RPC fan-out, and the HTTP endpoint) answers exactly as one index over
//! all the vectors does, keeps answering exactly when a node serving two of the shards goes
//! away (the other replicas are asked), and bad queries get errors that name the problem.

use std::time::Duration;

use colony_daemon::local::{LocalSwarm, LocalSwarmConfig};
use colony_daemon::route_cli::{BuildArgs, build};
use colony_daemon::route_service::{RouteQuery, RouteService, ShardConfig, query};
use colony_routing::data::{Matrix, write_npy};
use colony_routing::{Hnsw, Metric, Params, Query};
use colony_tests::wait_for;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

const N: usize = 2400;
const DIM: usize = 12;
const SHARDS: u32 = 3;
const K: u32 = 10;

fn data() -> Matrix<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    Matrix {
        n: N,
        dim: DIM,
        data: (0..N * DIM).map(|_| rng.gen_range(-1.0..1.0)).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sharded_index_answers_as_one_index_and_survives_a_replica_leaving() {
    colony_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let m = data();
    let file = dir.path().join("v.npy");
    write_npy(&file, &m).unwrap();
    // The shards, built as `colony route build --shard I --shards 3` builds them.
    let mut shard_files = Vec::new();
    for shard in 0..SHARDS {
        let out = dir.path().join(format!("shard-{shard}.hnsw"));
        build(BuildArgs {
            data: file.clone(),
            out: out.clone(),
            metric: "l2".into(),
            m: 8,
            ef_construction: 100,
            limit: 0,
            shard,
            shards: SHARDS,
        })
        .unwrap();
        shard_files.push(out);
    }
    // The oracle: one index over everything, searched with a beam as wide as the data (exact).
    let single = Hnsw::build(&m.data, DIM, Metric::L2, Params::with_m(8)).unwrap();

    let swarm = LocalSwarm::start(
        &dir.path().join("nodes"),
        LocalSwarmConfig {
            nodes: 4,
            first_http: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    swarm
        .wait_for_routing(2, Duration::from_secs(20))
        .await
        .unwrap();
    // Node 1 serves shards {0, 1}, node 2 {0, 2}, node 3 {1, 2}: two replicas each.
    let cancel: Vec<CancellationToken> = (0..4).map(|_| CancellationToken::new()).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (node, shards) in [(1usize, [0u32, 1]), (2, [0, 2]), (3, [1, 2])] {
        let cfg: Vec<ShardConfig> = shards
            .iter()
            .map(|&s| ShardConfig {
                index: "rand".into(),
                shard: s,
                shards: SHARDS,
                path: shard_files[s as usize].clone(),
            })
            .collect();
        let svc = RouteService::load(&cfg).unwrap();
        svc.start(&swarm.nodes[node].handle, &cancel[node], &mut tasks)
            .await
            .unwrap();
    }
    let client = &swarm.nodes[0].handle;
    async fn client_entries(
        h: &colony_daemon::NodeHandle,
        key: &colony_protocol::DhtKey,
    ) -> Vec<colony_protocol::DhtEntry> {
        h.dht_get(key).await.unwrap().entries
    }
    let ask = |v: &[f32]| RouteQuery {
        index: "rand".into(),
        vector: v.to_vec(),
        k: K,
        ef: N as u32,
        max_dcs: None,
        label: None,
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let queries: Vec<Vec<f32>> = (0..30)
        .map(|_| (0..DIM).map(|_| rng.gen_range(-1.0..1.0)).collect())
        .collect();
    wait_for("every shard announced", Duration::from_secs(30), || async {
        Ok(query(client, None, &ask(&queries[0]))
            .await
            .ok()
            .filter(|r| r.shards.len() == SHARDS as usize))
    })
    .await
    .unwrap();
    let expect = |v: &[f32]| -> Vec<u64> {
        single
            .search(v, &Query::top(K as usize, N))
            .unwrap()
            .hits
            .iter()
            .map(|h| h.key)
            .collect()
    };
    let check = |got: &colony_daemon::route_service::Merged, v: &[f32]| {
        let keys: Vec<u64> = got.hits.iter().map(|h| h.key).collect();
        assert_eq!(keys, expect(v), "sharded and single answers differ");
        assert!(got.hits.windows(2).all(|w| w[0].distance <= w[1].distance));
    };
    for v in &queries {
        let got = query(client, None, &ask(v)).await.unwrap();
        assert_eq!(got.shards.len(), SHARDS as usize);
        check(&got, v);
    }

    // The HTTP endpoint answers the same.
    let api = format!("http://{}", swarm.nodes[0].http_addr.unwrap());
    let http = reqwest::Client::new();
    let got: colony_daemon::route_service::Merged = http
        .post(format!("{api}/api/route/query"))
        .json(&ask(&queries[1]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    check(&got, &queries[1]);
    // Bad queries: named errors, status 400 / 503.
    let r = http
        .post(format!("{api}/api/route/query"))
        .json(&ask(&[1.0, 2.0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("12-dimensional"),
        "{body}"
    );
    let e = query(
        client,
        None,
        &RouteQuery {
            index: "nothing-here".into(),
            ..ask(&queries[0])
        },
    )
    .await
    .unwrap_err();
    assert!(format!("{e:#}").contains("no node announces"), "{e:#}");
    let e = query(
        client,
        None,
        &RouteQuery {
            vector: vec![f32::NAN; DIM],
            ..ask(&queries[0])
        },
    )
    .await
    .unwrap_err();
    assert!(format!("{e:#}").contains("not finite"), "{e:#}");

    // Node 1 (shards 0 and 1) goes away; its records stay in the DHT until they expire, so
    // the client meets a dead replica and must go on to the live one. (Which nodes hold its
    // records depends on timing; they are stored again after it leaves, as another holder
    // would still have them.)
    let mut nodes = swarm.nodes;
    let gone_key = colony_daemon::handle::peer_id_of;
    let mut left_behind = Vec::new();
    for shard in [0, 1] {
        let key = colony_protocol::DhtKey::route_shard("rand", shard).unwrap();
        for e in client_entries(&nodes[0].handle, &key).await {
            if let colony_protocol::Subkey::Owner(pk) = &e.subkey
                && gone_key(pk).unwrap() == nodes[1].peer_id()
            {
                left_behind.push(e);
            }
        }
    }
    assert_eq!(left_behind.len(), 2, "node 1 announced its two shards");
    cancel[1].cancel();
    let gone = nodes.remove(1);
    let gone_id = gone.peer_id().to_string();
    gone.shutdown().await;
    for e in left_behind {
        nodes[0].handle.dht_store(vec![e]).await.unwrap();
    }
    let mut retried = 0;
    for v in &queries[..10] {
        let got = query(&nodes[0].handle, None, &ask(v)).await.unwrap();
        check(&got, v);
        for s in &got.shards {
            assert_ne!(s.peer, gone_id, "answered by the departed node");
            retried += usize::from(s.attempts > 1);
        }
    }
    // Each shard's first replica is drawn at random: over 20 draws some were the dead one.
    assert!(retried > 0, "no query met the departed replica");
    for c in &cancel {
        c.cancel();
    }
    futures::future::join_all(nodes.into_iter().map(|n| n.shutdown())).await;
    tasks.shutdown().await;
}
