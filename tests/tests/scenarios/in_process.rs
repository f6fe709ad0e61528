//! Many real nodes (TCP, Noise, Yamux on loopback) in one process.

use std::time::Duration;

use futures::StreamExt;

use colony_daemon::local::{LocalSwarm, LocalSwarmConfig};
use colony_protocol::{DhtEntry, DhtKey, Request, Response, StoreOutcome, Subkey};
use colony_tests::{init_tracing, wait_for};

async fn swarm(n: usize) -> (tempfile::TempDir, LocalSwarm) {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let s = LocalSwarm::start(
        dir.path(),
        LocalSwarmConfig {
            nodes: n,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    s.wait_for_routing((n - 1).min(8), Duration::from_secs(60))
        .await
        .unwrap();
    (dir, s)
}

/// Twenty nodes: every node reads what every other stored, through the DHT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_nodes_every_node_reads_every_other() {
    let n = 20;
    let (_dir, s) = swarm(n).await;
    for (i, node) in s.nodes.iter().enumerate() {
        let key = DhtKey::new(format!("test/item/{i}")).unwrap();
        let r = node
            .handle
            .dht_put_owned(
                key,
                format!("value-{i}").into_bytes(),
                Duration::from_secs(120),
            )
            .await
            .unwrap();
        assert!(!r.stored.is_empty());
    }
    // One shared key that every node writes its own subkey under.
    let shared = DhtKey::run_progress("twenty").unwrap();
    for node in &s.nodes {
        node.handle
            .dht_put_owned(
                shared.clone(),
                node.peer_id().to_bytes(),
                Duration::from_secs(120),
            )
            .await
            .unwrap();
    }
    let owners: Vec<_> = s.nodes.iter().map(|x| x.handle.signer().public()).collect();
    let owners = &owners;
    let gets = s.nodes.iter().enumerate().flat_map(|(reader, node)| {
        (0..n)
            .filter(move |w| *w != reader)
            .map(move |writer| async move {
                let key = DhtKey::new(format!("test/item/{writer}")).unwrap();
                let got = node.handle.dht_get(&key).await.unwrap();
                let owner = owners[writer];
                let e = got
                    .entries
                    .iter()
                    .find(|e| e.subkey == Subkey::Owner(owner));
                assert_eq!(
                    e.map(|e| e.value.clone()),
                    Some(format!("value-{writer}").into_bytes()),
                    "node {reader} reading node {writer}'s item"
                );
            })
    });
    // 380 gets, 16 at a time: a real load, without flooding 2 cores past the RPC timeouts.
    futures::stream::iter(gets)
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    for (i, node) in s.nodes.iter().enumerate() {
        let got = node.handle.dht_get(&shared).await.unwrap();
        assert_eq!(
            got.entries.len(),
            n,
            "node {i} sees every node's progress entry"
        );
    }
    s.shutdown().await;
}

/// An owned entry cannot be overwritten by another node on any replica, however it asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_entry_overwrite_by_non_owner_is_refused() {
    let (_dir, s) = swarm(6).await;
    let key = DhtKey::run_progress("owned").unwrap();
    let owner = &s.nodes[0].handle;
    owner
        .dht_put_owned(key.clone(), b"genuine".to_vec(), Duration::from_secs(60))
        .await
        .unwrap();

    let intruder = &s.nodes[1].handle;
    // 1. Through the DHT API: signed with the intruder's key, claiming the owner's subkey.
    let mut forged = DhtEntry::owned(
        key.clone(),
        intruder.signer(),
        b"forged".to_vec(),
        colony_daemon::clock::now_ms() + 600_000,
    );
    forged.subkey = Subkey::Owner(owner.signer().public());
    assert!(
        intruder.dht_store(vec![forged.clone()]).await.is_err(),
        "local validation refuses it"
    );
    // 2. Straight to every node over RPC, bypassing the sender's own checks.
    for node in &s.nodes[2..] {
        let r = intruder
            .rpc(
                node.peer_id(),
                vec![],
                Request::DhtStore {
                    entries: vec![forged.clone()],
                },
            )
            .await
            .unwrap();
        match r {
            Response::DhtStored { outcomes } => assert!(
                matches!(&outcomes[0], StoreOutcome::Refused(why) if why.contains("signature"))
            ),
            other => panic!("unexpected {other:?}"),
        }
    }
    // 3. The intruder's own key can write only its own subkey.
    intruder
        .dht_put_owned(key.clone(), b"mine".to_vec(), Duration::from_secs(60))
        .await
        .unwrap();
    for node in &s.nodes {
        let got = node.handle.dht_get(&key).await.unwrap();
        let by_owner = got
            .entries
            .iter()
            .find(|e| e.subkey == Subkey::Owner(owner.signer().public()))
            .unwrap();
        assert_eq!(by_owner.value, b"genuine");
        assert_eq!(got.entries.len(), 2);
    }
    // The forger was penalised by the nodes it sent forged entries to.
    let st = s.nodes[2].handle.status().await.unwrap();
    assert!(st.offences >= 1, "forging is an offence");
    s.shutdown().await;
}

/// Entries disappear when they expire; a newer expiration replaces an older value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_expire_and_newest_wins() {
    let (_dir, s) = swarm(5).await;
    let key = DhtKey::new("test/expiry").unwrap();
    let a = &s.nodes[0].handle;
    a.dht_put(
        key.clone(),
        b"sub".to_vec(),
        b"short".to_vec(),
        Duration::from_millis(1500),
    )
    .await
    .unwrap();
    a.dht_put(
        key.clone(),
        b"keep".to_vec(),
        b"long".to_vec(),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let got = s.nodes[3].handle.dht_get(&key).await.unwrap();
    assert_eq!(got.entries.len(), 2);

    // A later write with a shorter expiration does not replace the longer one.
    s.nodes[2]
        .handle
        .dht_put(
            key.clone(),
            b"keep".to_vec(),
            b"older".to_vec(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    s.nodes[2]
        .handle
        .dht_put(
            key.clone(),
            b"keep".to_vec(),
            b"newer".to_vec(),
            Duration::from_secs(90),
        )
        .await
        .unwrap();

    wait_for(
        "the short entry to expire",
        Duration::from_secs(10),
        || async {
            let got = s.nodes[4].handle.dht_get(&key).await?;
            Ok((got.entries.len() == 1).then_some(got))
        },
    )
    .await
    .map(|got| assert_eq!(got.entries[0].value, b"newer"))
    .unwrap();
    s.shutdown().await;
}

/// A node restarted on the same data directory keeps its peer id and the entries it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_identity_and_entries() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let cfg = colony_daemon::NodeConfig::loopback(dir.path().join("n"));
    let node = colony_daemon::Node::start(cfg.clone()).await.unwrap();
    let id = node.peer_id();
    let key = DhtKey::new("test/persist").unwrap();
    node.handle
        .dht_put(
            key.clone(),
            b"s".to_vec(),
            b"kept".to_vec(),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    node.shutdown().await;
    let node = colony_daemon::Node::start(cfg).await.unwrap();
    assert_eq!(node.peer_id(), id);
    let got = node.handle.dht_get(&key).await.unwrap();
    assert_eq!(got.entries[0].value, b"kept");
    node.shutdown().await;
}

/// Gossip reaches every subscriber. The mesh forms over a few heartbeats and a
/// publish succeeds as soon as node 0 has one mesh peer, so node 0 publishes a
/// numbered message every 300 ms until every other subscriber has one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_reaches_subscribers() {
    let (_dir, s) = swarm(5).await;
    let topic = colony_protocol::names::patches_topic("t");
    let mut subs = Vec::new();
    for n in &s.nodes {
        subs.push(n.handle.subscribe(&topic).await.unwrap());
    }
    let mut got = vec![false; subs.len()];
    got[0] = true;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut i = 0u32;
    while got.iter().any(|g| !g) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gossip did not reach subscribers {:?} in 30 s",
            got.iter()
                .enumerate()
                .filter(|(_, g)| !**g)
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
        );
        let _ = s.nodes[0]
            .handle
            .publish(&topic, format!("hello {i}").into_bytes())
            .await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (k, rx) in subs.iter_mut().enumerate().skip(1) {
            while let Ok(m) = rx.try_recv() {
                assert!(m.data.starts_with(b"hello "), "unexpected payload");
                assert_eq!(m.source, Some(s.nodes[0].peer_id()));
                got[k] = true;
            }
        }
    }
    s.shutdown().await;
}
