//! Peers that send garbage, oversized or truncated messages, or open a stream and never
//! write: each is logged and penalised, repeat offenders are banned, and the node keeps
//! serving everyone else.

use std::io;
use std::time::Duration;

use colony_daemon::{Node, NodeConfig};
use colony_protocol::DhtKey;
use colony_protocol::names::{MAX_RPC_BYTES, RPC_PROTOCOL};
use colony_tests::{init_tracing, wait_for};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, StreamProtocol, Swarm, SwarmBuilder, noise, request_response, tcp, yamux};

/// What the attacker does with each request.
#[derive(Clone, Copy, Debug)]
enum Attack {
    Garbage,
    Oversized,
    Truncated,
    Silent,
}

#[derive(Clone)]
struct EvilCodec(Attack);

impl request_response::Codec for EvilCodec {
    type Protocol = StreamProtocol;
    type Request = ();
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
    ) -> io::Result<()> {
        Ok(())
    }
    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        io.take(MAX_RPC_BYTES as u64).read_to_end(&mut v).await?;
        Ok(v)
    }
    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        _: (),
    ) -> io::Result<()> {
        match self.0 {
            Attack::Garbage => {
                io.write_all(&[0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xff, 0x0f])
                    .await?
            }
            Attack::Oversized => {
                let chunk = vec![7u8; 64 * 1024];
                for _ in 0..(MAX_RPC_BYTES / chunk.len() + 2) {
                    if io.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
            }
            Attack::Truncated => {
                // The first bytes of a valid DhtFind request, then end of stream.
                let full = colony_protocol::Request::DhtFind {
                    key: DhtKey::new("a/b/c").unwrap(),
                }
                .to_bytes()
                .unwrap();
                io.write_all(&full[..full.len() - 2]).await?;
            }
            Attack::Silent => futures::future::pending::<()>().await,
        }
        io.close().await
    }
    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        _: &mut T,
        _: Vec<u8>,
    ) -> io::Result<()> {
        Ok(())
    }
}

fn attacker(attack: Attack) -> Swarm<request_response::Behaviour<EvilCodec>> {
    SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                EvilCodec(attack),
                [(
                    StreamProtocol::new(RPC_PROTOCOL),
                    request_response::ProtocolSupport::Outbound,
                )],
                request_response::Config::default().with_request_timeout(Duration::from_secs(5)),
            )
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(30)))
        .build()
}

/// Sends `times` attacking requests to `victim` and drives the attacker until they finish.
async fn attack(attack: Attack, victim: &Node, times: usize) -> libp2p::PeerId {
    let mut swarm = attacker(attack);
    let me = *swarm.local_peer_id();
    let addr: Multiaddr = victim.dial_addrs().await.unwrap()[0].clone();
    swarm.dial(addr.clone()).unwrap();
    let mut outstanding = 0;
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if sent < times && swarm.is_connected(&victim.peer_id()) {
            swarm.behaviour_mut().send_request(&victim.peer_id(), ());
            sent += 1;
            outstanding += 1;
        }
        let ev = tokio::time::timeout_at(deadline, swarm.select_next_some()).await;
        match ev {
            Err(_) => break,
            Ok(libp2p::swarm::SwarmEvent::Behaviour(
                request_response::Event::OutboundFailure { .. },
            ))
            | Ok(libp2p::swarm::SwarmEvent::Behaviour(request_response::Event::Message {
                ..
            })) => {
                outstanding -= 1;
                if sent == times && outstanding == 0 {
                    break;
                }
            }
            Ok(libp2p::swarm::SwarmEvent::OutgoingConnectionError { .. }) if sent < times => {
                // Banned: the victim refuses us now.
                break;
            }
            Ok(libp2p::swarm::SwarmEvent::ConnectionClosed { .. }) if sent >= 3 => break,
            Ok(_) => {}
        }
        if sent < times && !swarm.is_connected(&victim.peer_id()) && outstanding == 0 {
            let _ = swarm.dial(addr.clone());
        }
    }
    me
}

async fn victim() -> (tempfile::TempDir, Node) {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::loopback(dir.path().join("victim"));
    cfg.dht.rpc_timeout_ms = 1_000;
    let node = Node::start(cfg).await.unwrap();
    (dir, node)
}

async fn assert_banned_and_still_serving(node: &Node, bad: libp2p::PeerId) {
    let st = wait_for(
        "the attacker to be banned",
        Duration::from_secs(20),
        || async {
            let st = node.handle.status().await?;
            Ok(st.banned_peers.contains(&bad.to_string()).then_some(st))
        },
    )
    .await
    .unwrap();
    assert!(st.offences >= 3, "{st:?}");
    // The node still serves an honest peer.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = NodeConfig::loopback(dir.path().join("honest"));
    cfg.bootstrap = node.dial_addrs().await.unwrap();
    let honest = Node::start(cfg).await.unwrap();
    let key = DhtKey::new("test/after-attack").unwrap();
    node.handle
        .dht_put(
            key.clone(),
            b"s".to_vec(),
            b"v".to_vec(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    wait_for(
        "the honest peer to read",
        Duration::from_secs(20),
        || async { Ok((!honest.handle.dht_get(&key).await?.entries.is_empty()).then_some(())) },
    )
    .await
    .unwrap();
    honest.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_requests_get_the_sender_banned() {
    let (_d, node) = victim().await;
    let bad = attack(Attack::Garbage, &node, 3).await;
    assert_banned_and_still_serving(&node, bad).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_requests_get_the_sender_banned() {
    let (_d, node) = victim().await;
    let bad = attack(Attack::Truncated, &node, 3).await;
    assert_banned_and_still_serving(&node, bad).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_get_the_sender_banned() {
    let (_d, node) = victim().await;
    let bad = attack(Attack::Oversized, &node, 3).await;
    assert_banned_and_still_serving(&node, bad).await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_streams_time_out_and_get_the_sender_banned() {
    let (_d, node) = victim().await;
    let bad = attack(Attack::Silent, &node, 3).await;
    assert_banned_and_still_serving(&node, bad).await;
    node.shutdown().await;
}

/// A peer that floods a node with requests gets "overloaded" answers beyond its rate and a
/// strike for every burst's worth of refusals (three strikes ban, as for any offence); it is
/// served again once it slows down, and other peers are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_peer_is_rate_limited_and_others_are_served() {
    use colony_daemon::local::{LocalSwarm, LocalSwarmConfig};
    use colony_protocol::rpc::RpcErrorCode;
    use colony_protocol::{Request, Response};
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let mut template = NodeConfig::loopback(".");
    template.dht.announce_interval_s = 0;
    template.dht.replicate_interval_s = 0;
    template.limits.rpc_per_peer_per_s = 20.0;
    template.limits.rpc_burst_per_peer = 40.0;
    let swarm = LocalSwarm::start(
        dir.path(),
        LocalSwarmConfig {
            nodes: 3,
            template,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    swarm
        .wait_for_routing(2, Duration::from_secs(20))
        .await
        .unwrap();
    let target = swarm.nodes[0].peer_id();
    let flooder = swarm.nodes[1].handle.clone();
    let before = swarm.nodes[0].handle.status().await.unwrap().offences;
    // 150 pings in waves of 25 (below the 64 streams a connection may have open): about the
    // burst (40) pass, the rest are refused as overloaded.
    let mut answers = Vec::new();
    for wave in 0..6u64 {
        let pings = (0..25u64).map(|n| {
            let h = flooder.clone();
            async move {
                h.rpc(
                    target,
                    vec![],
                    Request::Ping {
                        nonce: wave * 25 + n,
                        payload: vec![],
                    },
                )
                .await
            }
        });
        answers.extend(futures::future::join_all(pings).await);
    }
    let refused = answers
        .iter()
        .filter(|a| {
            matches!(a, Ok(Response::Error(e)) if e.code == RpcErrorCode::Overloaded
                && e.message.contains("rate limit"))
        })
        .count();
    let served = answers
        .iter()
        .filter(|a| !matches!(a, Ok(Response::Error(_)) | Err(_)))
        .count();
    assert!(
        (40..=80).contains(&served),
        "{served} served, {refused} refused"
    );
    assert_eq!(served + refused, 150);
    // Every 40 refusals (the burst) are an offence: one or two strikes (the pings refill the
    // bucket as they go), not yet the third that bans.
    let after = swarm.nodes[0].handle.status().await.unwrap().offences;
    assert!(
        (before + 1..=before + 2).contains(&after),
        "offences {before} -> {after}"
    );
    // Another peer is served meanwhile.
    swarm.nodes[2].handle.ping(target).await.unwrap();
    // After a pause the flooder is served again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    flooder.ping(target).await.unwrap();
    swarm.shutdown().await;
}
