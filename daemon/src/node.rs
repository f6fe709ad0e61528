//! Starting and stopping a whole node: key, swarm actor, HTTP API and background loops,
//! under one cancellation token.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use colony_protocol::{DhtKey, NodeInfo};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, warn};

use crate::config::{NodeConfig, Reachability};
use crate::dht::store::{LocalStore, StoreLimits};
use crate::handle::NodeHandle;
use crate::storage::{DataDir, write_atomic};
use crate::swarm::actor::{SwarmActor, load_snapshot};
use crate::{http, identity, swarm};

/// A running node. Dropping it does not stop it; call [`Node::shutdown`].
#[derive(Debug)]
pub struct Node {
    pub handle: NodeHandle,
    pub http_addr: Option<SocketAddr>,
    /// The inference service, when the node serves a model.
    pub infer: Option<crate::infer_service::InferService>,
    /// The index shards the node serves, when it serves any.
    pub route: Option<crate::route_service::RouteService>,
    /// The patch service, when the node holds an editable model.
    pub patch: Option<crate::patch_service::PatchService>,
    /// The bearer token the HTTP API asks of requests that change state (None: no API).
    pub api_token: Option<String>,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

/// The API token kept in the data directory, made (random, 256 bits) the first time.
fn api_token(data: &DataDir) -> anyhow::Result<String> {
    let path = data.api_token();
    match std::fs::read_to_string(&path) {
        Ok(t) if t.trim().len() >= 16 => return Ok(t.trim().to_string()),
        Ok(_) => warn!(path = %path.display(), "API token too short; making a new one"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read the API token {}", path.display()));
        }
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    crate::storage::write_atomic(&path, token.as_bytes(), 0o600)?;
    Ok(token)
}

/// What a running node writes to `node.json` in its data directory, for scripts and tests.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct NodeFile {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub http: Option<String>,
    pub pid: u32,
}

impl Node {
    /// Starts a node with the key stored in its data directory (created on first start).
    pub async fn start(config: NodeConfig) -> anyhow::Result<Self> {
        let data = DataDir::new(&config.data_dir);
        std::fs::create_dir_all(data.root())
            .with_context(|| format!("cannot create data directory {}", data.root().display()))?;
        let key = identity::load_or_create(&data.node_key())?;
        Self::start_with_key(config, key).await
    }

    pub async fn start_with_key(mut config: NodeConfig, key: Keypair) -> anyhow::Result<Self> {
        config.validate()?;
        if config.infer.is_some() && !config.services.iter().any(|s| s == "infer") {
            config.services.push("infer".into());
        }
        if !config.route.is_empty() && !config.services.iter().any(|s| s == "route") {
            config.services.push("route".into());
        }
        if config.patch.is_some() && !config.services.iter().any(|s| s == "patch") {
            config.services.push("patch".into());
        }
        let data = DataDir::new(&config.data_dir);
        std::fs::create_dir_all(data.root())
            .with_context(|| format!("cannot create data directory {}", data.root().display()))?;
        let peer_id = key.public().to_peer_id();
        let signer = identity::signing_key(&key)?;
        let telemetry = std::sync::Arc::new(crate::telemetry::Telemetry::default());
        let mut swarm = swarm::build(key, &config, &telemetry.traffic)?;

        if config.reachability != Reachability::Private {
            for addr in &config.listen {
                swarm
                    .listen_on(addr.clone())
                    .with_context(|| format!("cannot listen on {addr}"))?;
            }
        }
        for addr in &config.bootstrap {
            if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
            }
            if let Err(e) = swarm.dial(addr.clone()) {
                warn!(%addr, "cannot dial bootstrap peer: {e}");
            }
        }
        let mut store = LocalStore::new(StoreLimits {
            max_keys: config.limits.dht_max_keys,
            max_total_bytes: config.limits.dht_max_bytes,
        });
        load_snapshot(&data, &mut store);

        let (tx, rx) = mpsc::channel(1024);
        let (gossip_tx, _) = broadcast::channel(1024);
        let handle = NodeHandle::new(
            tx,
            gossip_tx.clone(),
            peer_id,
            signer,
            config.dht.clone(),
            telemetry.clone(),
        );
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();

        // A private node is reachable only through relay circuits; the actor keeps one open
        // through each relay (default: the bootstrap peers) and re-opens it when it drops.
        let relays = match config.reachability {
            Reachability::Private if config.relays.is_empty() => config.bootstrap.clone(),
            Reachability::Private => config.relays.clone(),
            _ => Vec::new(),
        };
        let actor = SwarmActor::new(
            swarm,
            rx,
            crate::swarm::actor::GossipOut {
                tx: gossip_tx,
                counters: telemetry.traffic.gossip.clone(),
            },
            store,
            data.clone(),
            config.services.clone(),
            crate::swarm::actor::Peering {
                relays,
                bootstrap: config.bootstrap.clone(),
                rpc_rate: (
                    config.limits.rpc_per_peer_per_s,
                    config.limits.rpc_burst_per_peer,
                ),
            },
        );
        let span = tracing::info_span!("swarm", peer = %short(&peer_id));
        tasks.spawn(actor.run(cancel.clone()).instrument(span));

        let infer = match &config.infer {
            Some(ic) => {
                let (path, limits) = (
                    ic.model.clone(),
                    crate::infer_service::InferLimits {
                        queue: ic.queue,
                        max_tokens: ic.max_tokens,
                        ..Default::default()
                    },
                );
                let svc = tokio::task::spawn_blocking(move || {
                    crate::infer_service::InferService::start(&path, limits)
                })
                .await
                .context("the model loader panicked")?
                .with_context(|| format!("cannot serve {}", ic.model.display()))?;
                handle.set_infer_handler(Some(svc.rpc_handler())).await?;
                let (s, c) = (svc.clone(), cancel.clone());
                tasks.spawn(async move {
                    c.cancelled().await;
                    s.stop();
                });
                info!(model = %svc.model(), "serving inference jobs");
                Some(svc)
            }
            None => None,
        };
        let route = if config.route.is_empty() {
            None
        } else {
            let shards = config.route.clone();
            let svc = tokio::task::spawn_blocking(move || {
                crate::route_service::RouteService::load(&shards)
            })
            .await
            .context("the index loader panicked")??;
            svc.start(&handle, &cancel, &mut tasks).await?;
            Some(svc)
        };
        let patch = match &config.patch {
            Some(pc) => {
                let (pc, dir) = (pc.clone(), data.root().join("patches"));
                let svc = tokio::task::spawn_blocking(move || {
                    crate::patch_service::PatchService::load(&pc, &dir)
                })
                .await
                .context("the patch service loader panicked")?
                .context("cannot serve patch jobs")?;
                svc.start(&handle, &cancel, &mut tasks).await?;
                Some(svc)
            }
            None => None,
        };
        let api_token = match config.http {
            Some(_) => Some(match &config.api_token {
                Some(t) => t.clone(),
                None => api_token(&data)?,
            }),
            None => None,
        };
        let http_addr = match config.http {
            Some(addr) => Some(
                http::serve(
                    addr,
                    api_token.clone(),
                    handle.clone(),
                    http::Services {
                        infer: infer.clone(),
                        route: route.clone(),
                        patch: patch.clone(),
                    },
                    cancel.clone(),
                    &mut tasks,
                )
                .await?,
            ),
            None => None,
        };

        spawn_loops(&config, &handle, &cancel, &mut tasks);

        // Wait until listeners are up so node.json and the caller see real addresses.
        let listen = wait_for_listeners(&handle, &config).await;
        let file = NodeFile {
            peer_id: peer_id.to_string(),
            listen_addrs: listen.iter().map(|a| a.to_string()).collect(),
            http: http_addr.map(|a| a.to_string()),
            pid: std::process::id(),
        };
        write_atomic(&data.node_info(), &serde_json::to_vec_pretty(&file)?, 0o644)?;
        info!(%peer_id, listen = ?file.listen_addrs, http = ?file.http, "node started");
        Ok(Self {
            handle,
            http_addr,
            api_token,
            infer,
            route,
            patch,
            cancel,
            tasks,
        })
    }

    pub fn peer_id(&self) -> PeerId {
        self.handle.peer_id()
    }

    /// Addresses others can dial this node at, each ending in `/p2p/<peer id>`.
    pub async fn dial_addrs(&self) -> anyhow::Result<Vec<Multiaddr>> {
        let id = self.peer_id();
        Ok(self
            .handle
            .listen_addrs()
            .await?
            .into_iter()
            .map(|a| a.with(Protocol::P2p(id)))
            .collect())
    }

    /// A token that stops this node when cancelled (for signal handlers).
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops every task (the actor writes its snapshot) and waits for them.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Waits until the node is stopped through its cancel token.
    pub async fn wait(mut self) {
        self.cancel.cancelled().await;
        while self.tasks.join_next().await.is_some() {}
    }

    /// Aborts every task without a graceful shutdown (for crash tests in-process).
    pub fn kill(mut self) {
        self.tasks.abort_all();
    }
}

fn short(p: &PeerId) -> String {
    let s = p.to_string();
    s[s.len().saturating_sub(6)..].to_owned()
}

async fn wait_for_listeners(handle: &NodeHandle, config: &NodeConfig) -> Vec<Multiaddr> {
    let want = if config.reachability == Reachability::Private {
        0
    } else {
        config.listen.len()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let addrs = handle.listen_addrs().await.unwrap_or_default();
        if addrs.len() >= want || tokio::time::Instant::now() > deadline {
            return addrs;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Background work: announcing this node's info record and re-replicating held entries.
fn spawn_loops(
    config: &NodeConfig,
    handle: &NodeHandle,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<()>,
) {
    let announce = config.dht.announce_interval_s;
    if announce > 0 {
        let (h, c, services) = (handle.clone(), cancel.clone(), config.services.clone());
        let reachable = config.reachability != Reachability::Private;
        tasks.spawn(async move {
            // Announce every `announce` seconds, and at once when the listen addresses change
            // (a relay reservation coming up is how a private node becomes reachable).
            let started = std::time::Instant::now();
            let mut last: Option<(std::time::Instant, Vec<Multiaddr>)> = None;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    biased;
                    _ = c.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Ok(addrs) = h.listen_addrs().await else {
                    return;
                };
                let due = match &last {
                    None => true,
                    Some((at, prev)) => {
                        *prev != addrs || at.elapsed() >= Duration::from_secs(announce)
                    }
                };
                if !due {
                    continue;
                }
                match announce_self(&h, &addrs, &services, reachable, started, announce).await {
                    Ok(()) => {
                        tracing::debug!(?addrs, "announced node record");
                        last = Some((std::time::Instant::now(), addrs));
                    }
                    Err(e) => tracing::debug!("announce failed: {e:#}"),
                }
            }
        });
    }
    let replicate = config.dht.replicate_interval_s;
    if replicate > 0 {
        let (h, c) = (handle.clone(), cancel.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(replicate));
            tick.tick().await;
            loop {
                tokio::select! {
                    biased;
                    _ = c.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match h.replicate().await {
                    Ok(n) => tracing::debug!(pushes = n, "replicated held entries"),
                    Err(e) => tracing::debug!("replication failed: {e:#}"),
                }
            }
        });
    }
}

async fn announce_self(
    h: &NodeHandle,
    addrs: &[Multiaddr],
    services: &[String],
    reachable: bool,
    started: std::time::Instant,
    interval_s: u64,
) -> anyhow::Result<()> {
    let id = h.peer_id();
    let listen_addrs = addrs
        .iter()
        .map(|a| {
            if a.iter().last() == Some(Protocol::P2p(id)) {
                a.clone()
            } else {
                a.clone().with(Protocol::P2p(id))
            }
        })
        .map(|a| a.to_string())
        .collect();
    let info = NodeInfo {
        agent: swarm::AGENT.into(),
        services: services.to_vec(),
        listen_addrs,
        reachable,
        uptime_s: started.elapsed().as_secs(),
    };
    let value = colony_protocol::encode(&info, colony_protocol::names::MAX_VALUE_BYTES)?;
    h.dht_put_owned(
        DhtKey::node_info(&id.to_string())?,
        value,
        Duration::from_secs(interval_s * 3),
    )
    .await?;
    Ok(())
}
