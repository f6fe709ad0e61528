//! [`NodeHandle`]: the cloneable way to use a running node. Every method sends one command to
//! the swarm actor (bounded inbox) and awaits its reply; composite operations (DHT store and
//! get) fan out RPCs from here, so the actor never blocks on the network.
//!
//! Cancel-safety: dropping a future of any method here abandons the reply; the actor is not
//! affected.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use colony_protocol::allreduce::{PartAck, PartMessage, RoundId};
use colony_protocol::names::MAX_ENTRIES_PER_STORE;
use colony_protocol::{
    DhtEntry, DhtKey, NodeInfo, NodeKeypair, NodePublicKey, Request, Response, StoreOutcome, Subkey,
};
use futures::future::join_all;
use libp2p::{Multiaddr, PeerId, kad};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::clock::now_ms;
use crate::config::DhtConfig;
use crate::dht::store::merge_newest;
use crate::swarm::actor::{Closest, Command, GossipMessage, NodeStatus, PeerSummary, RpcFailure};
use crate::telemetry::Telemetry;

#[derive(Clone, Debug)]
pub struct NodeHandle {
    tx: mpsc::Sender<Command>,
    gossip: broadcast::Sender<GossipMessage>,
    peer_id: PeerId,
    signer: NodeKeypair,
    dht: DhtConfig,
    telemetry: Arc<Telemetry>,
}

/// Where one store landed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StoreReport {
    /// Peers (this node included, if it was among the closest) that now hold the entries.
    pub stored: Vec<String>,
    /// Peers that already held something newer.
    pub outdated: Vec<String>,
    /// Peers that refused or could not be reached, with why.
    pub failed: Vec<(String, String)>,
}

/// The answer to a get.
#[derive(Clone, Debug, Default)]
pub struct GetResult {
    /// The newest unexpired entry per subkey.
    pub entries: Vec<DhtEntry>,
    /// How many nodes were asked, and how many answered.
    pub asked: usize,
    pub answered: usize,
}

impl NodeHandle {
    pub(crate) fn new(
        tx: mpsc::Sender<Command>,
        gossip: broadcast::Sender<GossipMessage>,
        peer_id: PeerId,
        signer: NodeKeypair,
        dht: DhtConfig,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            tx,
            gossip,
            peer_id,
            signer,
            dht,
            telemetry,
        }
    }

    /// The node's records for the API and the dashboard.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The key this node signs records with (the same key as its peer id).
    pub fn signer(&self) -> &NodeKeypair {
        &self.signer
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> anyhow::Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| anyhow!("the node has stopped"))?;
        rx.await.map_err(|_| anyhow!("the node has stopped"))
    }

    pub async fn status(&self) -> anyhow::Result<NodeStatus> {
        self.ask(|reply| Command::Status { reply }).await
    }

    pub async fn peers(&self) -> anyhow::Result<Vec<PeerSummary>> {
        self.ask(|reply| Command::Peers { reply }).await
    }

    pub async fn listen_addrs(&self) -> anyhow::Result<Vec<Multiaddr>> {
        self.ask(|reply| Command::ListenAddrs { reply }).await
    }

    pub async fn dial(&self, addr: Multiaddr) -> anyhow::Result<()> {
        self.ask(|reply| Command::Dial {
            addr: addr.clone(),
            reply,
        })
        .await?
        .map_err(|e| anyhow!("cannot dial {addr}: {e}"))
    }

    /// Reports misbehaviour by `peer` (a forged or malformed answer found outside the actor).
    pub async fn report_offence(&self, peer: PeerId, reason: String) {
        let _ = self
            .tx
            .send(Command::Offence {
                peer,
                reason,
                byzantine: false,
            })
            .await;
    }

    /// `peer` sent poisoned data (NaN or outlier gradients): it is banned at once.
    pub async fn report_byzantine(&self, peer: PeerId, reason: String) {
        self.telemetry.error("byzantine_peer");
        let _ = self
            .tx
            .send(Command::Offence {
                peer,
                reason,
                byzantine: true,
            })
            .await;
    }

    /// One RPC to `peer`; `addrs` are extra addresses to dial it at (may be empty).
    pub async fn rpc(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Request,
    ) -> Result<Response, RpcFailure> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Rpc {
                peer,
                addrs,
                request,
                reply,
            })
            .await
            .map_err(|_| RpcFailure::Shutdown)?;
        // The swarm enforces the request timeout once connected (stalls sooner, in the
        // codec), and the transport a 10 s connection timeout; this outer one only guards
        // against a lost reply.
        let outer = self.dht.rpc_timeout()
            + crate::swarm::codec::max_transfer_time(
                Duration::ZERO,
                colony_protocol::names::MAX_RPC_BYTES,
            )
            + Duration::from_secs(12);
        let r = match tokio::time::timeout(outer, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(RpcFailure::Shutdown),
            Err(_) => Err(RpcFailure::Failed {
                peer,
                reason: "no reply in time".into(),
            }),
        };
        if let Err(RpcFailure::Failed { .. }) = &r {
            self.telemetry.error("rpc_failed");
        }
        r
    }

    /// One RPC of a DHT fan-out: bounded by the RPC timeout, dialling included, so one
    /// unreachable replica cannot hold up the whole operation.
    async fn fanout_rpc(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Request,
    ) -> Result<Response, String> {
        match tokio::time::timeout(self.dht.rpc_timeout(), self.rpc(peer, addrs, request)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!(
                "peer {peer}: no answer within {:?}",
                self.dht.rpc_timeout()
            )),
        }
    }

    /// Round-trip time of one RPC ping (found through the DHT if not directly reachable).
    pub async fn ping(&self, peer: PeerId) -> anyhow::Result<Duration> {
        let nonce = rand::random();
        let t0 = std::time::Instant::now();
        match self
            .rpc_anywhere(
                peer,
                Request::Ping {
                    nonce,
                    payload: vec![],
                },
            )
            .await?
        {
            Response::Pong { nonce: n, .. } if n == nonce => Ok(t0.elapsed()),
            other => bail!("peer {peer} answered a ping with {other:?}"),
        }
    }

    /// The `n` nodes closest to `key` (iterative Kademlia lookup), closest first.
    pub async fn closest_peers(&self, key: &DhtKey, n: usize) -> anyhow::Result<Closest> {
        let bytes = key.as_str().as_bytes().to_vec();
        let n = NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        let fut = self.ask(|reply| Command::ClosestPeers {
            key: bytes,
            n,
            reply,
        });
        match tokio::time::timeout(self.dht.lookup_timeout() + Duration::from_secs(1), fut).await {
            Ok(r) => r,
            Err(_) => bail!("closest-peers lookup for {key} timed out"),
        }
    }

    /// The `n` nodes that should hold `key`: the closest peers, and this node when it is a
    /// DHT server and close enough, ordered by XOR distance.
    async fn replica_set(
        &self,
        key: &DhtKey,
        n: usize,
    ) -> anyhow::Result<Vec<(PeerId, Vec<Multiaddr>)>> {
        let Closest {
            mut peers,
            self_server,
        } = self.closest_peers(key, self.dht.lookup_size.max(n)).await?;
        if self_server || peers.is_empty() {
            peers.push((self.peer_id, vec![]));
        }
        let target = kad::KBucketKey::new(key.as_str().as_bytes().to_vec());
        peers.sort_by_key(|(p, _)| target.distance(&kad::KBucketKey::from(*p)));
        peers.dedup_by_key(|(p, _)| *p);
        peers.truncate(n);
        Ok(peers)
    }

    /// Stores entries (all under one key) on the `replicas` nodes closest to the key.
    /// Succeeds when at least one node holds them.
    pub async fn dht_store(&self, entries: Vec<DhtEntry>) -> anyhow::Result<StoreReport> {
        let key = entries.first().context("nothing to store")?.key.clone();
        if entries.iter().any(|e| e.key != key) {
            bail!("one store takes entries of one key");
        }
        if entries.len() > MAX_ENTRIES_PER_STORE {
            bail!("at most {MAX_ENTRIES_PER_STORE} entries per store");
        }
        let now = now_ms();
        for e in &entries {
            e.validate(now)?;
        }
        let t0 = std::time::Instant::now();
        let targets = self.replica_set(&key, self.dht.replicas).await?;
        let lookup = t0.elapsed();
        let calls = targets.into_iter().map(|(peer, addrs)| {
            let entries = entries.clone();
            async move {
                let r = if peer == self.peer_id {
                    self.ask(|reply| Command::LocalPut { entries, reply })
                        .await
                        .map_err(|e| e.to_string())
                } else {
                    match self
                        .fanout_rpc(peer, addrs, Request::DhtStore { entries })
                        .await
                    {
                        Ok(Response::DhtStored { outcomes }) => Ok(outcomes),
                        Ok(other) => Err(format!("unexpected answer {other:?}")),
                        Err(e) => Err(e),
                    }
                };
                (peer, r)
            }
        });
        let mut report = StoreReport::default();
        let results = join_all(calls).await;
        tracing::debug!(%key, lookup_ms = lookup.as_millis() as u64, total_ms = t0.elapsed().as_millis() as u64, "dht store");
        for (peer, r) in results {
            let name = peer.to_string();
            match r {
                Ok(outcomes) if outcomes.iter().all(|o| *o == StoreOutcome::Stored) => {
                    report.stored.push(name)
                }
                Ok(outcomes)
                    if outcomes
                        .iter()
                        .all(|o| matches!(o, StoreOutcome::Stored | StoreOutcome::Outdated)) =>
                {
                    report.outdated.push(name)
                }
                Ok(outcomes) => {
                    let why = outcomes.iter().find_map(|o| match o {
                        StoreOutcome::Refused(w) => Some(w.clone()),
                        _ => None,
                    });
                    report.failed.push((name, why.unwrap_or_default()))
                }
                Err(e) => report.failed.push((name, e)),
            }
        }
        if report.stored.is_empty() && report.outdated.is_empty() {
            bail!("no node stored {key}: {:?}", report.failed);
        }
        Ok(report)
    }

    /// Stores `value` under (`key`, this node's public key), signed: only this node can
    /// overwrite it.
    pub async fn dht_put_owned(
        &self,
        key: DhtKey,
        value: Vec<u8>,
        ttl: Duration,
    ) -> anyhow::Result<StoreReport> {
        let expires = now_ms() + ttl.as_millis() as u64;
        self.dht_store(vec![DhtEntry::owned(key, &self.signer, value, expires)])
            .await
    }

    /// Stores `value` under (`key`, `subkey`); anyone may overwrite it with a later expiration.
    pub async fn dht_put(
        &self,
        key: DhtKey,
        subkey: Vec<u8>,
        value: Vec<u8>,
        ttl: Duration,
    ) -> anyhow::Result<StoreReport> {
        let expires = now_ms() + ttl.as_millis() as u64;
        self.dht_store(vec![DhtEntry::plain(key, subkey, value, expires)])
            .await
    }

    /// The newest unexpired value of every subkey under `key`, merged from the closest nodes.
    /// Entries that fail validation are dropped and their sender penalised.
    pub async fn dht_get(&self, key: &DhtKey) -> anyhow::Result<GetResult> {
        let t0 = std::time::Instant::now();
        let targets = self.replica_set(key, self.dht.get_fanout).await?;
        let lookup = t0.elapsed();
        let asked = targets.len();
        let calls = targets.into_iter().map(|(peer, addrs)| async move {
            let r = if peer == self.peer_id {
                self.ask(|reply| Command::LocalGet {
                    key: key.clone(),
                    reply,
                })
                .await
                .map_err(|e| e.to_string())
            } else {
                match self
                    .fanout_rpc(peer, addrs, Request::DhtFind { key: key.clone() })
                    .await
                {
                    Ok(Response::DhtFound { entries }) => Ok(entries),
                    Ok(other) => Err(format!("unexpected answer {other:?}")),
                    Err(e) => Err(e),
                }
            };
            (peer, r)
        });
        let results = join_all(calls).await;
        tracing::debug!(%key, lookup_ms = lookup.as_millis() as u64, total_ms = t0.elapsed().as_millis() as u64, "dht get");
        let now = now_ms();
        let mut merged = BTreeMap::new();
        let mut answered = 0;
        for (peer, r) in results {
            let Ok(entries) = r else { continue };
            answered += 1;
            let mut bad = None;
            let good = entries.into_iter().filter(|e| {
                if e.key != *key {
                    bad = Some(format!(
                        "answered a find for {key} with an entry for {}",
                        e.key
                    ));
                    return false;
                }
                match e.validate(now) {
                    Ok(()) => true,
                    Err(colony_protocol::RecordError::Expired { .. }) => false,
                    Err(err) => {
                        bad = Some(format!("returned an invalid entry: {err}"));
                        false
                    }
                }
            });
            merge_newest(&mut merged, good.collect::<Vec<_>>());
            if let Some(reason) = bad {
                self.report_offence(peer, reason).await;
            }
        }
        if answered == 0 && asked > 0 {
            bail!("no node answered a get for {key} (asked {asked})");
        }
        // Also consult the local store when this node was not among the asked.
        if let Ok(local) = self
            .ask(|reply| Command::LocalGet {
                key: key.clone(),
                reply,
            })
            .await
        {
            merge_newest(&mut merged, local);
        }
        Ok(GetResult {
            entries: merged.into_values().collect(),
            asked,
            answered,
        })
    }

    /// Pushes every entry this node holds to the current closest nodes of its key.
    pub async fn replicate(&self) -> anyhow::Result<usize> {
        let plan = self
            .ask(|reply| Command::ReplicationPlan {
                per_key: self.dht.replicas,
                reply,
            })
            .await?;
        let mut pushed = 0;
        for (entries, peers) in plan {
            for chunk in entries.chunks(MAX_ENTRIES_PER_STORE) {
                let calls = peers.iter().map(|p| {
                    self.rpc(
                        *p,
                        vec![],
                        Request::DhtStore {
                            entries: chunk.to_vec(),
                        },
                    )
                });
                pushed += join_all(calls)
                    .await
                    .into_iter()
                    .filter(|r| r.is_ok())
                    .count();
            }
        }
        Ok(pushed)
    }

    /// Addresses of `peer` from its signed `node/<peer>/info` record (how a node behind a
    /// relay is found).
    pub async fn lookup_peer(&self, peer: PeerId) -> anyhow::Result<Vec<Multiaddr>> {
        let key = DhtKey::node_info(&peer.to_string())?;
        let got = self.dht_get(&key).await?;
        for e in got.entries {
            let Subkey::Owner(pk) = &e.subkey else {
                continue;
            };
            if peer_id_of(pk).ok() != Some(peer) {
                continue;
            }
            let info: NodeInfo =
                colony_protocol::decode(&e.value, colony_protocol::names::MAX_VALUE_BYTES)
                    .with_context(|| format!("node info record of {peer} is malformed"))?;
            return Ok(info
                .listen_addrs
                .iter()
                .filter_map(|a| a.parse().ok())
                .collect());
        }
        bail!("no node info record for {peer}")
    }

    /// An RPC to `peer` wherever it is: over an open connection if there is one, else at the
    /// addresses its signed node record names (relay circuits included) and those the routing
    /// table knows.
    pub async fn rpc_anywhere(&self, peer: PeerId, request: Request) -> anyhow::Result<Response> {
        let connected = self
            .ask(|reply| Command::IsConnected { peer, reply })
            .await?;
        let addrs = if connected {
            vec![]
        } else {
            self.lookup_peer(peer).await.unwrap_or_else(|e| {
                tracing::debug!(%peer, "no node record, dialling known addresses only: {e:#}");
                vec![]
            })
        };
        Ok(self.rpc(peer, addrs, request).await?)
    }

    /// Routes inbound all-reduce messages of `round` to `tx`.
    pub async fn register_round(
        &self,
        round: RoundId,
        tx: mpsc::Sender<(PeerId, PartMessage)>,
    ) -> anyhow::Result<()> {
        self.tx
            .send(Command::RegisterRound { round, tx })
            .await
            .map_err(|_| anyhow!("the node has stopped"))
    }

    pub async fn unregister_round(&self, round: RoundId) {
        let _ = self.tx.send(Command::UnregisterRound { round }).await;
    }

    /// Answers matchmaking requests for `run` with `handler` (replacing any earlier one).
    pub async fn register_group_handler(
        &self,
        run: String,
        handler: crate::swarm::actor::GroupHandler,
    ) -> anyhow::Result<()> {
        self.tx
            .send(Command::RegisterGroupHandler { run, handler })
            .await
            .map_err(|_| anyhow!("the node has stopped"))
    }

    /// Serves training-state downloads for `run` with `handler` (replacing any earlier one).
    pub async fn register_state_handler(
        &self,
        run: String,
        handler: crate::swarm::actor::StateHandler,
    ) -> anyhow::Result<()> {
        self.tx
            .send(Command::RegisterStateHandler { run, handler })
            .await
            .map_err(|_| anyhow!("the node has stopped"))
    }

    /// Serves inference jobs with `handler` (None: stops serving them).
    pub async fn set_infer_handler(
        &self,
        handler: Option<crate::swarm::actor::InferHandler>,
    ) -> anyhow::Result<()> {
        self.tx
            .send(Command::SetInferHandler(handler))
            .await
            .map_err(|_| anyhow!("the node has stopped"))
    }

    /// Hands routing searches to `handler` (None: stops serving them).
    pub async fn set_route_handler(
        &self,
        handler: Option<crate::swarm::actor::RouteHandler>,
    ) -> anyhow::Result<()> {
        self.tx
            .send(Command::SetRouteHandler(handler))
            .await
            .map_err(|_| anyhow!("the node has stopped"))
    }

    /// Answers a deferred request (see [`crate::swarm::actor::RouteCall`]).
    pub async fn respond(&self, id: u64, response: Response) {
        let _ = self.tx.send(Command::Respond { id, response }).await;
    }

    pub async fn unregister_state_handler(&self, run: String) {
        let _ = self.tx.send(Command::UnregisterStateHandler { run }).await;
    }

    pub async fn unregister_group_handler(&self, run: String) {
        let _ = self.tx.send(Command::UnregisterGroupHandler { run }).await;
    }

    /// Sends one all-reduce message and waits for its acknowledgement.
    pub async fn send_part(
        &self,
        peer: PeerId,
        message: PartMessage,
    ) -> Result<PartAck, RpcFailure> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::SendPart {
                peer,
                message,
                reply,
            })
            .await
            .map_err(|_| RpcFailure::Shutdown)?;
        rx.await.map_err(|_| RpcFailure::Shutdown)?
    }

    pub async fn subscribe(
        &self,
        topic: &str,
    ) -> anyhow::Result<broadcast::Receiver<GossipMessage>> {
        let rx = self.gossip.subscribe();
        self.ask(|reply| Command::Subscribe {
            topic: topic.to_owned(),
            reply,
        })
        .await?
        .map_err(|e| anyhow!("cannot subscribe to {topic}: {e}"))?;
        Ok(rx)
    }

    pub async fn publish(&self, topic: &str, data: Vec<u8>) -> anyhow::Result<()> {
        self.ask(|reply| Command::Publish {
            topic: topic.to_owned(),
            data,
            reply,
        })
        .await?
        .map_err(|e| anyhow!("cannot publish on {topic}: {e}"))
    }
}

/// The owned entries among `entries` whose value decodes as `T`, with their owners' peer ids
/// (entries with a plain subkey, a bad key or a malformed value are skipped).
pub fn owned_values<T: serde::de::DeserializeOwned>(
    entries: &[DhtEntry],
) -> impl Iterator<Item = (PeerId, T)> + '_ {
    entries.iter().filter_map(|e| {
        let Subkey::Owner(pk) = &e.subkey else {
            return None;
        };
        let peer = peer_id_of(pk).ok()?;
        let v = colony_protocol::decode(&e.value, colony_protocol::names::MAX_VALUE_BYTES).ok()?;
        Some((peer, v))
    })
}

/// The libp2p peer id of an ed25519 public key.
pub fn peer_id_of(pk: &NodePublicKey) -> anyhow::Result<PeerId> {
    let ed = libp2p::identity::ed25519::PublicKey::try_from_bytes(&pk.0)
        .context("not an ed25519 key")?;
    Ok(libp2p::identity::PublicKey::from(ed).to_peer_id())
}
