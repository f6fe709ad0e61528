//! The swarm actor: owns the `Swarm`, serves inbound RPCs from the local DHT store, and runs
//! commands from [`NodeHandle`](crate::handle::NodeHandle)s.
//!
//! Cancel-safety: the loop `select!`s the cancellation token first; on cancellation it writes
//! the DHT snapshot and returns, dropping the swarm (which closes every connection).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use colony_protocol::allreduce::{GroupRequest, GroupResponse, PartAck, PartMessage, RoundId};
use colony_protocol::names::{MAX_ENTRIES_PER_STORE, MAX_PROBE_BYTES};
use colony_protocol::rpc::RpcErrorCode;
use colony_protocol::train::{StateRequest, StateResponse};
use colony_protocol::{DhtEntry, DhtKey, NodeInfo, Request, Response, StoreOutcome};
use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, gossipsub, identify, kad, ping, request_response};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::codec::Wire;
use super::penalty::{Penalties, Verdict};
use super::{AGENT, Behaviour, BehaviourEvent};
use crate::clock::now_ms;
use crate::dht::store::{LocalStore, StoreError, StoreSnapshot};
use crate::storage::{DataDir, write_atomic};

/// Why an RPC to a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcFailure {
    #[error("peer {peer}: {reason}")]
    Failed { peer: PeerId, reason: String },
    #[error("the node is shutting down")]
    Shutdown,
}

/// A peer we are connected to, as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PeerSummary {
    pub peer_id: String,
    pub addresses: Vec<String>,
    pub agent: Option<String>,
    pub rtt_ms: Option<f64>,
    pub dht_server: bool,
    pub relayed: bool,
    pub strikes: u32,
}

/// The node as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub peer_id: String,
    pub agent: String,
    pub listen_addrs: Vec<String>,
    pub external_addrs: Vec<String>,
    pub connected_peers: usize,
    pub routing_table_peers: usize,
    pub dht_mode: String,
    pub dht_entries: usize,
    pub dht_bytes: usize,
    pub banned_peers: Vec<String>,
    pub offences: u64,
    pub uptime_s: u64,
    pub services: Vec<String>,
}

/// Where the actor delivers gossip: the subscribers' channel, and the byte counters.
#[derive(Debug)]
pub struct GossipOut {
    pub tx: broadcast::Sender<GossipMessage>,
    pub counters: std::sync::Arc<crate::telemetry::Counters>,
}

/// A gossip message delivered to subscribers.
#[derive(Clone, Debug)]
pub struct GossipMessage {
    pub topic: String,
    pub source: Option<PeerId>,
    pub data: Vec<u8>,
}

/// The result of a closest-peers lookup.
#[derive(Debug, Default)]
pub struct Closest {
    /// Peers closest to the key, closest first, with addresses to reach them.
    pub peers: Vec<(PeerId, Vec<Multiaddr>)>,
    /// Whether this node itself is a DHT server (and so may hold entries for others).
    pub self_server: bool,
}

/// The closed set of things a handle can ask of the actor.
#[derive(Debug)]
pub enum Command {
    /// The `n` closest peers to `key` (an iterative lookup that stops once the `n` closest
    /// answered).
    ClosestPeers {
        key: Vec<u8>,
        n: NonZeroUsize,
        reply: oneshot::Sender<Closest>,
    },
    Rpc {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        request: Request,
        reply: oneshot::Sender<Result<Response, RpcFailure>>,
    },
    LocalPut {
        entries: Vec<DhtEntry>,
        reply: oneshot::Sender<Vec<StoreOutcome>>,
    },
    LocalGet {
        key: DhtKey,
        reply: oneshot::Sender<Vec<DhtEntry>>,
    },
    /// Held entries grouped by key, with the closest peers from the local routing table.
    ReplicationPlan {
        per_key: usize,
        reply: oneshot::Sender<Vec<(Vec<DhtEntry>, Vec<PeerId>)>>,
    },
    Offence {
        peer: PeerId,
        reason: String,
        /// Poisoned data (NaN or outlier gradients): banned at once.
        byzantine: bool,
    },
    Status {
        reply: oneshot::Sender<NodeStatus>,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerSummary>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), String>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    /// Routes inbound all-reduce messages of `round` to `tx` until unregistered.
    RegisterRound {
        round: RoundId,
        tx: mpsc::Sender<(PeerId, PartMessage)>,
    },
    UnregisterRound {
        round: RoundId,
    },
    SendPart {
        peer: PeerId,
        message: PartMessage,
        reply: oneshot::Sender<Result<PartAck, RpcFailure>>,
    },
    IsConnected {
        peer: PeerId,
        reply: oneshot::Sender<bool>,
    },
    /// Answers matchmaking requests for `run` with `handler` until unregistered.
    RegisterGroupHandler {
        run: String,
        handler: GroupHandler,
    },
    UnregisterGroupHandler {
        run: String,
    },
    /// Serves training-state downloads for `run` with `handler` until unregistered.
    RegisterStateHandler {
        run: String,
        handler: StateHandler,
    },
    UnregisterStateHandler {
        run: String,
    },
    /// Serve inference jobs with this handler (None: stop serving them).
    SetInferHandler(Option<InferHandler>),
    /// Hand routing searches to this handler (None: stop serving them).
    SetRouteHandler(Option<RouteHandler>),
    /// The answer to a deferred request (a routing search) handed out with this id.
    Respond {
        id: u64,
        response: Response,
    },
    Subscribe {
        topic: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Publish {
        topic: String,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Answers one matchmaking request (synchronously, inside the actor: it must not block).
#[derive(Clone)]
pub struct GroupHandler(pub Arc<dyn Fn(PeerId, GroupRequest) -> GroupResponse + Send + Sync>);

impl std::fmt::Debug for GroupHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupHandler")
    }
}

/// Answers one state-download request (synchronously, inside the actor: it must not block;
/// a chunk is a copy of at most [`colony_protocol::train::MAX_STATE_CHUNK`] bytes).
#[derive(Clone)]
pub struct StateHandler(pub Arc<dyn Fn(PeerId, StateRequest) -> StateResponse + Send + Sync>);

impl std::fmt::Debug for StateHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateHandler")
    }
}

/// Answers one inference-job request (synchronously, inside the actor: queueing, copying
/// events out and setting a cancel flag never block; the decoding runs elsewhere).
#[derive(Clone)]
pub struct InferHandler(
    pub  Arc<
        dyn Fn(
                PeerId,
                colony_protocol::infer::InferRequest,
            ) -> colony_protocol::infer::InferResponse
            + Send
            + Sync,
    >,
);

impl std::fmt::Debug for InferHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InferHandler")
    }
}

/// A routing search handed out of the actor: the searching runs on other threads, and the
/// answer comes back as [`Command::Respond`] with `id`.
#[derive(Debug)]
pub struct RouteCall {
    pub id: u64,
    pub peer: PeerId,
    pub request: colony_protocol::route::RouteRequest,
}

/// Where the actor hands routing searches (a bounded queue: when it is full the request is
/// refused as overloaded at once, never queued in the actor).
#[derive(Clone, Debug)]
pub struct RouteHandler(pub mpsc::Sender<RouteCall>);

/// Deferred answers the actor holds at most.
const MAX_DEFERRED: usize = 1024;

#[derive(Default)]
struct PeerState {
    addresses: Vec<Multiaddr>,
    agent: Option<String>,
    rtt: Option<Duration>,
    dht_server: bool,
    relayed: bool,
    connections: u32,
}

#[allow(missing_debug_implementations)] // holds the swarm, which is not Debug
pub struct SwarmActor {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    gossip_tx: broadcast::Sender<GossipMessage>,
    gossip_counters: std::sync::Arc<crate::telemetry::Counters>,
    store: LocalStore,
    penalties: Penalties,
    pending_rpc:
        HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<Response, RpcFailure>>>,
    pending_closest: HashMap<kad::QueryId, oneshot::Sender<Closest>>,
    peers: HashMap<PeerId, PeerState>,
    rounds: HashMap<RoundId, mpsc::Sender<(PeerId, PartMessage)>>,
    group_handlers: HashMap<String, GroupHandler>,
    state_handlers: HashMap<String, StateHandler>,
    infer_handler: Option<InferHandler>,
    route_handler: Option<RouteHandler>,
    /// Inbound requests answered later ([`Command::Respond`]).
    deferred: HashMap<u64, request_response::ResponseChannel<Wire<Response>>>,
    next_deferred: u64,
    pending_parts:
        HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<PartAck, RpcFailure>>>,
    data_dir: DataDir,
    services: Vec<String>,
    started: Instant,
    bootstrapped: bool,
    /// Relays to keep a circuit listener open through, with the listener (if any) and when
    /// it was last attempted.
    relays: Vec<RelayListen>,
    /// Bootstrap peers, re-dialled until reached (see [`Seed`]).
    seeds: Vec<Seed>,
    /// Per-peer limits on inbound requests.
    rate: super::rate::RateLimiter,
}

/// A bootstrap peer. One that could not be reached is dialled again (1 s, 2 s, … 30 s apart)
/// until a connection is made; then Kademlia bootstraps again, so that nodes started at the
/// same time as their seeds, or cut off from them at start-up, join one swarm instead of
/// staying in islands. When the node has lost every connection, every seed is tried again.
struct Seed {
    addr: Multiaddr,
    peer: PeerId,
    reached: bool,
    next_attempt: Instant,
    backoff: Duration,
}

impl Seed {
    const FIRST_BACKOFF: Duration = Duration::from_secs(1);
    const MAX_BACKOFF: Duration = Duration::from_secs(30);
}

/// The peers a node starts from (its relays, for a private node, and its bootstrap peers) and
/// how many inbound requests per second (and in a burst) it takes from each peer.
#[derive(Debug, Default)]
pub struct Peering {
    pub relays: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub rpc_rate: (f64, f64),
}

struct RelayListen {
    circuit: Multiaddr,
    listener: Option<ListenerId>,
    last_attempt: Option<Instant>,
}

impl SwarmActor {
    pub fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        gossip: GossipOut,
        store: LocalStore,
        data_dir: DataDir,
        services: Vec<String>,
        seeds: Peering,
    ) -> Self {
        let rate = super::rate::RateLimiter::new(seeds.rpc_rate.0, seeds.rpc_rate.1);
        let now = Instant::now();
        let local = *swarm.local_peer_id();
        let bootstrap = seeds
            .bootstrap
            .into_iter()
            .filter_map(|addr| match addr.iter().last() {
                Some(Protocol::P2p(peer)) if peer != local => Some(Seed {
                    addr,
                    peer,
                    reached: false,
                    // Node::start dialled them once already.
                    next_attempt: now + Seed::FIRST_BACKOFF,
                    backoff: Seed::FIRST_BACKOFF,
                }),
                _ => None,
            })
            .collect();
        let relays = seeds.relays;
        let GossipOut {
            tx: gossip_tx,
            counters: gossip_counters,
        } = gossip;
        let relays = relays
            .into_iter()
            .map(|r| RelayListen {
                circuit: r.with(Protocol::P2pCircuit),
                listener: None,
                last_attempt: None,
            })
            .collect();
        Self {
            swarm,
            commands,
            gossip_tx,
            gossip_counters,
            store,
            penalties: Penalties::default(),
            pending_rpc: HashMap::new(),
            pending_closest: HashMap::new(),
            peers: HashMap::new(),
            rounds: HashMap::new(),
            group_handlers: HashMap::new(),
            state_handlers: HashMap::new(),
            infer_handler: None,
            route_handler: None,
            deferred: HashMap::new(),
            next_deferred: 0,
            pending_parts: HashMap::new(),
            data_dir,
            services,
            started: Instant::now(),
            bootstrapped: false,
            seeds: bootstrap,
            rate,
            relays,
        }
    }

    /// Runs until `cancel` fires, then persists state and returns.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(cmd) = self.commands.recv() => self.on_command(cmd),
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                _ = tick.tick() => self.housekeeping(),
            }
        }
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let snap = self.store.snapshot(now_ms());
        let path = self.data_dir.dht_snapshot();
        match colony_protocol::codec::encode_file(&snap)
            .map_err(anyhow::Error::from)
            .and_then(|b| write_atomic(&path, &b, 0o600))
        {
            Ok(()) => {
                info!(entries = snap.entries.len(), path = %path.display(), "dht snapshot written")
            }
            Err(e) => warn!(path = %path.display(), "cannot write dht snapshot: {e:#}"),
        }
        for (_, reply) in self.pending_rpc.drain() {
            let _ = reply.send(Err(RpcFailure::Shutdown));
        }
        for (_, reply) in self.pending_parts.drain() {
            let _ = reply.send(Err(RpcFailure::Shutdown));
        }
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        for peer in self.penalties.expire(now) {
            info!(%peer, "ban expired");
            self.swarm.behaviour_mut().blocked.unblock_peer(peer);
        }
        self.store.purge_expired(now_ms());
        if self.swarm.connected_peers().next().is_none() {
            // Cut off from everyone: every seed is worth trying again.
            for s in self.seeds.iter_mut().filter(|s| s.reached) {
                s.reached = false;
                s.next_attempt = now;
                s.backoff = Seed::FIRST_BACKOFF;
            }
        }
        for i in 0..self.seeds.len() {
            let s = &self.seeds[i];
            if s.reached || now < s.next_attempt || self.swarm.is_connected(&s.peer) {
                continue;
            }
            let addr = s.addr.clone();
            debug!(%addr, "dialling a bootstrap peer again");
            if let Err(e) = self.swarm.dial(addr.clone()) {
                debug!(%addr, "cannot dial bootstrap peer: {e}");
            }
            let s = &mut self.seeds[i];
            s.next_attempt = now + s.backoff;
            s.backoff = (s.backoff * 2).min(Seed::MAX_BACKOFF);
        }
        for r in &mut self.relays {
            let due = r
                .last_attempt
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(5));
            if r.listener.is_none() && due {
                r.last_attempt = Some(now);
                match self.swarm.listen_on(r.circuit.clone()) {
                    Ok(id) => r.listener = Some(id),
                    Err(e) => warn!(circuit = %r.circuit, "cannot listen through relay: {e}"),
                }
            }
        }
    }

    fn byzantine(&mut self, peer: PeerId, reason: &str) {
        if let Verdict::Banned { .. } = self.penalties.byzantine(peer, Instant::now()) {
            warn!(%peer, "peer banned for sending poisoned data: {reason}");
            self.swarm.behaviour_mut().blocked.block_peer(peer);
            self.swarm.behaviour_mut().kad.remove_peer(&peer);
        }
    }

    fn offence(&mut self, peer: PeerId, reason: &str) {
        match self.penalties.offence(peer, Instant::now()) {
            Verdict::Warned { strikes } => warn!(%peer, strikes, "peer misbehaved: {reason}"),
            Verdict::Banned { .. } => {
                warn!(%peer, "peer banned after repeated misbehaviour; last: {reason}");
                self.swarm.behaviour_mut().blocked.block_peer(peer);
                self.swarm.behaviour_mut().kad.remove_peer(&peer);
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::ClosestPeers { key, n, reply } => {
                let id = self.swarm.behaviour_mut().kad.get_n_closest_peers(key, n);
                self.pending_closest.insert(id, reply);
            }
            Command::Rpc {
                peer,
                addrs,
                request,
                reply,
            } => {
                if peer == *self.swarm.local_peer_id() {
                    let _ = reply.send(Ok(self.serve(peer, request)));
                    return;
                }
                let id = self.swarm.behaviour_mut().rpc.send_request_with_addresses(
                    &peer,
                    Wire::Valid(request),
                    addrs,
                );
                self.pending_rpc.insert(id, reply);
            }
            Command::LocalPut { entries, reply } => {
                let outcomes = self.put_entries(None, entries);
                let _ = reply.send(outcomes);
            }
            Command::LocalGet { key, reply } => {
                let _ = reply.send(self.store.get(&key, now_ms()));
            }
            Command::ReplicationPlan { per_key, reply } => {
                let now = now_ms();
                let keys: Vec<DhtKey> = self.store.keys().cloned().collect();
                let plan = keys
                    .into_iter()
                    .map(|k| {
                        let target = kad::KBucketKey::new(k.as_str().as_bytes().to_vec());
                        let peers = self
                            .swarm
                            .behaviour_mut()
                            .kad
                            .get_closest_local_peers(&target)
                            .take(per_key)
                            .map(|p| *p.preimage())
                            .collect();
                        (self.store.get(&k, now), peers)
                    })
                    .collect();
                let _ = reply.send(plan);
            }
            Command::Offence {
                peer,
                reason,
                byzantine,
            } => {
                if byzantine {
                    self.byzantine(peer, &reason)
                } else {
                    self.offence(peer, &reason)
                }
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Peers { reply } => {
                let list = self
                    .peers
                    .iter()
                    .map(|(id, s)| PeerSummary {
                        peer_id: id.to_string(),
                        addresses: s.addresses.iter().map(|a| a.to_string()).collect(),
                        agent: s.agent.clone(),
                        rtt_ms: s.rtt.map(|d| d.as_secs_f64() * 1e3),
                        dht_server: s.dht_server,
                        relayed: s.relayed,
                        strikes: self.penalties.strikes(id),
                    })
                    .collect();
                let _ = reply.send(list);
            }
            Command::Dial { addr, reply } => {
                if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                }
                let _ = reply.send(self.swarm.dial(addr).map_err(|e| e.to_string()));
            }
            Command::RegisterRound { round, tx } => {
                self.rounds.insert(round, tx);
            }
            Command::UnregisterRound { round } => {
                self.rounds.remove(&round);
            }
            Command::RegisterGroupHandler { run, handler } => {
                self.group_handlers.insert(run, handler);
            }
            Command::RegisterStateHandler { run, handler } => {
                self.state_handlers.insert(run, handler);
            }
            Command::UnregisterStateHandler { run } => {
                self.state_handlers.remove(&run);
            }
            Command::SetInferHandler(h) => self.infer_handler = h,
            Command::SetRouteHandler(h) => self.route_handler = h,
            Command::Respond { id, response } => {
                if let Some(channel) = self.deferred.remove(&id) {
                    // Closed streams (the asker gave up) are dropped quietly.
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .rpc
                        .send_response(channel, Wire::Valid(response));
                }
            }
            Command::UnregisterGroupHandler { run } => {
                self.group_handlers.remove(&run);
            }
            Command::SendPart {
                peer,
                message,
                reply,
            } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .parts
                    .send_request(&peer, Wire::Valid(message));
                self.pending_parts.insert(id, reply);
            }
            Command::IsConnected { peer, reply } => {
                let _ = reply.send(self.swarm.is_connected(&peer));
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Subscribe { topic, reply } => {
                let t = gossipsub::IdentTopic::new(topic);
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossip
                    .subscribe(&t)
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            Command::Publish { topic, data, reply } => {
                let t = gossipsub::IdentTopic::new(topic);
                let len = data.len();
                let r = self
                    .swarm
                    .behaviour_mut()
                    .gossip
                    .publish(t, data)
                    .map(|_| self.gossip_counters.sent(len))
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
        }
    }

    fn status(&mut self) -> NodeStatus {
        let kad = &mut self.swarm.behaviour_mut().kad;
        let routing_table_peers = kad.kbuckets().map(|b| b.num_entries()).sum();
        let dht_mode = kad.mode().to_string();
        NodeStatus {
            peer_id: self.swarm.local_peer_id().to_string(),
            agent: AGENT.into(),
            listen_addrs: self.swarm.listeners().map(|a| a.to_string()).collect(),
            external_addrs: self
                .swarm
                .external_addresses()
                .map(|a| a.to_string())
                .collect(),
            connected_peers: self.swarm.connected_peers().count(),
            routing_table_peers,
            dht_mode,
            dht_entries: self.store.len(),
            dht_bytes: self.store.total_bytes(),
            banned_peers: self.penalties.banned().map(|p| p.to_string()).collect(),
            offences: self.penalties.total_offences(),
            uptime_s: self.started.elapsed().as_secs(),
            services: self.services.clone(),
        }
    }

    /// Stores entries from `from` (None = this node) and penalises forged ones.
    fn put_entries(&mut self, from: Option<PeerId>, entries: Vec<DhtEntry>) -> Vec<StoreOutcome> {
        let now = now_ms();
        let mut forged = None;
        let outcomes = entries
            .into_iter()
            .map(|e| match self.store.put(e, now) {
                Ok(o) => o,
                Err(err) => {
                    if matches!(&err, StoreError::Invalid(r) if is_forgery(r)) {
                        forged = Some(err.to_string());
                    }
                    StoreOutcome::Refused(err.to_string())
                }
            })
            .collect();
        if let (Some(peer), Some(reason)) = (from, forged) {
            self.offence(peer, &format!("sent a forged dht entry: {reason}"));
        }
        outcomes
    }

    /// Answers one inbound request.
    fn serve(&mut self, peer: PeerId, request: Request) -> Response {
        debug!(%peer, kind = request.kind(), "rpc request");
        match request {
            Request::Ping { nonce, payload } => Response::Pong { nonce, payload },
            Request::NodeInfo => Response::NodeInfo(NodeInfo {
                agent: AGENT.into(),
                services: self.services.clone(),
                listen_addrs: self.swarm.listeners().map(|a| a.to_string()).collect(),
                reachable: self.swarm.behaviour().kad.mode() == kad::Mode::Server,
                uptime_s: self.started.elapsed().as_secs(),
            }),
            Request::DhtStore { entries } if entries.len() > MAX_ENTRIES_PER_STORE => {
                self.offence(peer, "store request with too many entries");
                Response::error(
                    RpcErrorCode::TooLarge,
                    format!("at most {MAX_ENTRIES_PER_STORE} entries per store"),
                )
            }
            Request::DhtStore { entries } => Response::DhtStored {
                outcomes: self.put_entries(Some(peer), entries),
            },
            Request::DhtFind { key } => Response::DhtFound {
                entries: self.store.get(&key, now_ms()),
            },
            Request::Probe { payload, echo } => {
                if payload.len() > MAX_PROBE_BYTES || echo as usize > MAX_PROBE_BYTES {
                    self.offence(peer, "oversized bandwidth probe");
                    return Response::error(
                        RpcErrorCode::TooLarge,
                        format!("probes carry at most {MAX_PROBE_BYTES} bytes each way"),
                    );
                }
                Response::Probe {
                    payload: vec![0x5a; echo as usize],
                }
            }
            Request::Group(g) => {
                let run = match &g {
                    GroupRequest::Propose { run, .. } => run.as_str(),
                    GroupRequest::Commit(c) => c.run.as_str(),
                };
                Response::Group(match self.group_handlers.get(run) {
                    Some(h) => (h.0)(peer, g),
                    None => GroupResponse::Decline(format!("not matchmaking for run {run:?}")),
                })
            }
            Request::State(r) => {
                let run = match &r {
                    StateRequest::Describe { run } | StateRequest::Chunk { run, .. } => run,
                };
                Response::State(match self.state_handlers.get(run) {
                    Some(h) => (h.0)(peer, r),
                    None => StateResponse::Unavailable(format!("not training run {run:?}")),
                })
            }
            Request::Infer(r) => Response::Infer(match &self.infer_handler {
                Some(h) => (h.0)(peer, r),
                None => colony_protocol::infer::InferResponse::Refused(
                    "this node serves no model".into(),
                ),
            }),
            // Deferred requests reach here only when they could not be handed out.
            Request::Route(_) => Response::Route(colony_protocol::route::RouteResponse::Refused(
                "this node serves no index".into(),
            )),
        }
    }

    /// Hands a routing search to the route handler, keeping `channel` for the answer; gives
    /// the channel back with the answer to send now when it cannot (no handler, overloaded).
    fn defer_route(
        &mut self,
        peer: PeerId,
        request: colony_protocol::route::RouteRequest,
        channel: request_response::ResponseChannel<Wire<Response>>,
    ) -> Option<(request_response::ResponseChannel<Wire<Response>>, Response)> {
        let refuse =
            |why: &str| Response::Route(colony_protocol::route::RouteResponse::Refused(why.into()));
        let Some(h) = &self.route_handler else {
            return Some((channel, refuse("this node serves no index")));
        };
        // Answers whose searches were lost (the service stopped) would pile up: drop the
        // stale ones' channels when the map is full rather than grow it.
        if self.deferred.len() >= MAX_DEFERRED {
            return Some((
                channel,
                Response::error(RpcErrorCode::Overloaded, "too many searches in flight"),
            ));
        }
        let id = self.next_deferred;
        match h.0.try_send(RouteCall { id, peer, request }) {
            Ok(()) => {
                self.next_deferred += 1;
                self.deferred.insert(id, channel);
                None
            }
            Err(mpsc::error::TrySendError::Full(_)) => Some((
                channel,
                Response::error(RpcErrorCode::Overloaded, "the search queue is full"),
            )),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Some((channel, refuse("this node's index service has stopped")))
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                if self.swarm.behaviour().kad.mode() == kad::Mode::Server && is_dialable(&address) {
                    self.swarm.add_external_address(address);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                let addr = endpoint.get_remote_address().clone();
                debug!(peer = %peer_id, %addr, "connected");
                let st = self.peers.entry(peer_id).or_default();
                st.connections += 1;
                st.relayed = endpoint.is_relayed();
                if !st.addresses.contains(&addr) {
                    st.addresses.push(addr);
                }
                let mut new_seed = false;
                for s in self
                    .seeds
                    .iter_mut()
                    .filter(|s| s.peer == peer_id && !s.reached)
                {
                    s.reached = true;
                    new_seed = true;
                }
                // A seed reached late may lead to peers this node has not seen: look again.
                if !self.bootstrapped || new_seed {
                    self.bootstrapped = self.swarm.behaviour_mut().kad.bootstrap().is_ok();
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => {
                if num_established == 0 {
                    self.peers.remove(&peer_id);
                    self.rate.forget(&peer_id);
                } else if let Some(st) = self.peers.get_mut(&peer_id) {
                    st.connections = num_established;
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(?peer_id, "outgoing connection failed: {error}");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                debug!(%send_back_addr, "incoming connection failed: {error}");
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                info!(%address, "external address confirmed")
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                if let Some(r) = self
                    .relays
                    .iter_mut()
                    .find(|r| r.listener == Some(listener_id))
                {
                    warn!(circuit = %r.circuit, ?reason, "relay circuit listener closed; will retry");
                    r.listener = None;
                }
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                if let Some(r) = self
                    .relays
                    .iter_mut()
                    .find(|r| r.listener == Some(listener_id))
                {
                    warn!(circuit = %r.circuit, "relay circuit listener failed: {error}");
                }
            }
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Rpc(ev) => self.on_rpc_event(ev),
            BehaviourEvent::Parts(ev) => self.on_part_event(ev),
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            }) => {
                if let kad::QueryResult::GetClosestPeers(r) = result {
                    let peers = match r {
                        Ok(ok) => ok.peers,
                        Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                    };
                    if let Some(reply) = self.pending_closest.remove(&id) {
                        let self_server = self.swarm.behaviour().kad.mode() == kad::Mode::Server;
                        let peers = peers.into_iter().map(|p| (p.peer_id, p.addrs)).collect();
                        let _ = reply.send(Closest { peers, self_server });
                    } else if !step.last {
                        debug!(?id, "closest-peers progress for an unknown query");
                    }
                }
            }
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, .. }) => {
                debug!(%peer, "routing table updated");
            }
            BehaviourEvent::Kad(_) => {}
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let kad_proto = libp2p::StreamProtocol::new(colony_protocol::names::KAD_PROTOCOL);
                let is_server = info.protocols.contains(&kad_proto);
                if is_server {
                    for addr in info.listen_addrs.iter().filter(|a| is_dialable(a)) {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, addr.clone());
                    }
                }
                let st = self.peers.entry(peer_id).or_default();
                st.agent = Some(info.agent_version);
                st.dht_server = is_server;
            }
            BehaviourEvent::Identify(_) => {}
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                if let Some(st) = self.peers.get_mut(&peer) {
                    st.rtt = Some(rtt);
                }
            }
            BehaviourEvent::Ping(_) => {}
            BehaviourEvent::Gossip(gossipsub::Event::Message { message, .. }) => {
                self.gossip_counters.received(message.data.len());
                let _ = self.gossip_tx.send(GossipMessage {
                    topic: message.topic.into_string(),
                    source: message.source,
                    data: message.data,
                });
            }
            BehaviourEvent::Gossip(_) => {}
            BehaviourEvent::RelayClient(ev) => info!(?ev, "relay client"),
            BehaviourEvent::RelayServer(ev) => debug!(?ev, "relay server"),
            BehaviourEvent::Dcutr(ev) => info!(?ev, "hole punching"),
            BehaviourEvent::Autonat(ev) => debug!(?ev, "autonat"),
            BehaviourEvent::Blocked(_) | BehaviourEvent::Limits(_) => {}
        }
    }

    fn on_rpc_event(&mut self, ev: request_response::Event<Wire<Request>, Wire<Response>>) {
        use request_response::{Event, Message};
        match ev {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                // Probes and state chunks are bounded by the streams in flight; the rest count
                // against the peer's rate.
                let counted = !matches!(
                    request,
                    Wire::Valid(Request::Probe { .. } | Request::State(_))
                );
                let refused = counted
                    && match self.rate.admit(peer, Instant::now()) {
                        super::rate::Admit::Yes => false,
                        super::rate::Admit::No { offence } => {
                            if offence {
                                self.offence(peer, "flooded this node with requests");
                            }
                            true
                        }
                    };
                let (channel, response) = match request {
                    _ if refused => {
                        let why = format!(
                            "rate limit: at most {} requests per second from one peer",
                            self.rate.rate()
                        );
                        (channel, Response::error(RpcErrorCode::Overloaded, why))
                    }
                    Wire::Valid(Request::Route(r)) => match self.defer_route(peer, r, channel) {
                        Some(now) => now,
                        None => return,
                    },
                    other => (
                        channel,
                        match other {
                            Wire::Valid(request) => self.serve(peer, request),
                            Wire::Invalid(why) => {
                                self.offence(peer, &format!("sent a bad request: {why}"));
                                Response::error(RpcErrorCode::BadRequest, why)
                            }
                        },
                    ),
                };
                if self
                    .swarm
                    .behaviour_mut()
                    .rpc
                    .send_response(channel, Wire::Valid(response))
                    .is_err()
                {
                    debug!(%peer, "response not sent: stream closed");
                }
            }
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let result = self.check_response(peer, response);
                settle(&mut self.pending_rpc, request_id, result);
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let reason = error.to_string();
                settle(
                    &mut self.pending_rpc,
                    request_id,
                    Err(RpcFailure::Failed { peer, reason }),
                );
            }
            Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, "inbound rpc failed: {error}")
            }
            Event::ResponseSent { .. } => {}
        }
    }
}

impl SwarmActor {
    fn on_part_event(&mut self, ev: request_response::Event<Wire<PartMessage>, Wire<PartAck>>) {
        use request_response::{Event, Message};
        match ev {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let ack = match request {
                    Wire::Invalid(why) => {
                        self.offence(peer, &format!("sent a bad all-reduce message: {why}"));
                        PartAck::Refused(why)
                    }
                    Wire::Valid(msg) => match self.rounds.get(&msg.round) {
                        None => PartAck::UnknownRound,
                        // The round's inbox is sized to the most messages the protocol allows,
                        // so it is full only if the peer sends more than it may.
                        Some(tx) => match tx.try_send((peer, msg)) {
                            Ok(()) => PartAck::Ok,
                            Err(mpsc::error::TrySendError::Full(_)) => {
                                self.offence(
                                    peer,
                                    "sent more all-reduce messages than a round allows",
                                );
                                PartAck::Refused("round inbox full".into())
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => PartAck::UnknownRound,
                        },
                    },
                };
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .parts
                    .send_response(channel, Wire::Valid(ack));
            }
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                let result = self.check_response(peer, response);
                settle(&mut self.pending_parts, request_id, result);
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let reason = error.to_string();
                settle(
                    &mut self.pending_parts,
                    request_id,
                    Err(RpcFailure::Failed { peer, reason }),
                );
            }
            Event::InboundFailure { peer, error, .. } => {
                debug!(%peer, "inbound all-reduce message failed: {error}")
            }
            Event::ResponseSent { .. } => {}
        }
    }
}

impl SwarmActor {
    /// A decoded answer, or the failure its sender earns a strike for.
    fn check_response<T>(&mut self, peer: PeerId, response: Wire<T>) -> Result<T, RpcFailure> {
        match response {
            Wire::Valid(r) => Ok(r),
            Wire::Invalid(why) => {
                self.offence(peer, &format!("sent a bad response: {why}"));
                Err(RpcFailure::Failed {
                    peer,
                    reason: format!("bad response: {why}"),
                })
            }
        }
    }
}

/// Delivers the outcome of an outbound request to whoever is waiting for it.
fn settle<T>(
    pending: &mut HashMap<
        request_response::OutboundRequestId,
        oneshot::Sender<Result<T, RpcFailure>>,
    >,
    id: request_response::OutboundRequestId,
    result: Result<T, RpcFailure>,
) {
    if let Some(reply) = pending.remove(&id) {
        let _ = reply.send(result);
    }
}

fn is_forgery(e: &colony_protocol::RecordError) -> bool {
    use colony_protocol::RecordError::*;
    matches!(
        e,
        Signature { .. }
            | MissingSignature { .. }
            | UnexpectedSignature { .. }
            | ValueTooLarge { .. }
            | SubkeyTooLarge { .. }
    )
}

/// Whether an address can be dialled by others (not unspecified, not a relay circuit).
fn is_dialable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        Protocol::P2pCircuit => true,
        _ => false,
    })
}

/// Reads a snapshot written by a previous run; a corrupt file is reported and ignored (the
/// entries will come back from other replicas), never fatal.
pub fn load_snapshot(data_dir: &DataDir, store: &mut LocalStore) {
    let path = data_dir.dht_snapshot();
    let Ok(bytes) = std::fs::read(&path) else {
        return;
    };
    match colony_protocol::codec::decode_file::<StoreSnapshot>(&bytes) {
        Ok(snap) => {
            let n = snap.entries.len();
            let refused = store.restore(snap, now_ms());
            info!(path = %path.display(), restored = n - refused, refused, "dht snapshot loaded");
        }
        Err(e) => warn!(path = %path.display(), "ignoring corrupt dht snapshot: {e}"),
    }
}
