//! Serving shards of nearest-neighbour indexes to the swarm, and querying a sharded index.
//!
//! A node configured with `[[route]]` entries loads each shard's index file, announces a
//! [`ShardRecord`] under `route/<index>/shard/<i>` (owned by its key, refreshed before it
//! expires) and answers searches over peer RPC. Searches run on blocking threads, at most one
//! per core, fed from a bounded queue by the swarm actor (a full queue is refused as
//! overloaded, never buffered in the actor).
//!
//! A query ([`query`]) reads shard 0's records to learn how many shards the index has, then
//! for every shard at once: reads its records, asks one replica (the first that answers; on an
//! error, a refusal or a timeout the next one), and merges all shards' hits into one top-k by
//! distance. A shard with no replica that answers fails the query with an error that names the
//! shard and what each replica said.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use colony_protocol::route::{
    MAX_SHARDS, RouteHit, RouteRequest, RouteResponse, RouteSearch, ShardRecord,
};
use colony_protocol::{DhtEntry, DhtKey, Response};
use colony_routing::{Hnsw, Query};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::handle::{NodeHandle, owned_values};
use crate::swarm::actor::{RouteCall, RouteHandler};

/// One `[[route]]` entry of the node's config.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// The index's name in the swarm (letters, digits, `-`, `_`, `.`).
    pub index: String,
    pub shard: u32,
    pub shards: u32,
    /// The shard's index file (`colony route build --shard I --shards N`).
    pub path: PathBuf,
}

/// Searches waiting for a thread.
const QUEUE: usize = 256;
/// How long an announcement lives; it is refreshed every third of that.
const RECORD_TTL: Duration = Duration::from_secs(180);

struct Served {
    index: Hnsw,
    record: ShardRecord,
}

/// The shards this node serves.
#[derive(Clone)]
pub struct RouteService {
    shards: Arc<HashMap<(String, u32), Served>>,
}

impl std::fmt::Debug for RouteService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteService")
            .field("shards", &self.records())
            .finish()
    }
}

impl RouteService {
    /// Loads every configured shard (the whole file is checked: see `colony_routing::store`).
    pub fn load(configs: &[ShardConfig]) -> anyhow::Result<Self> {
        let mut shards = HashMap::new();
        for c in configs {
            DhtKey::route_shard(&c.index, c.shard)
                .map_err(|e| anyhow::anyhow!("route index name {:?}: {e}", c.index))?;
            if c.shards == 0 || c.shards > MAX_SHARDS || c.shard >= c.shards {
                bail!(
                    "route index {:?}: shard {} of {} (shards are numbered from 0, at most {MAX_SHARDS})",
                    c.index,
                    c.shard,
                    c.shards
                );
            }
            let index = Hnsw::load(&c.path)
                .with_context(|| format!("route index {:?} shard {}", c.index, c.shard))?;
            let record = ShardRecord {
                index: c.index.clone(),
                shard: c.shard,
                shards: c.shards,
                vectors: index.len() as u64,
                dim: index.dim() as u32,
                metric: index.metric().name().into(),
            };
            if shards
                .insert((c.index.clone(), c.shard), Served { index, record })
                .is_some()
            {
                bail!(
                    "route index {:?} shard {} is configured twice",
                    c.index,
                    c.shard
                );
            }
        }
        Ok(Self {
            shards: Arc::new(shards),
        })
    }

    pub fn records(&self) -> Vec<ShardRecord> {
        let mut r: Vec<ShardRecord> = self.shards.values().map(|s| s.record.clone()).collect();
        r.sort_by(|a, b| (&a.index, a.shard).cmp(&(&b.index, b.shard)));
        r
    }

    /// One search of a served shard.
    pub fn search(&self, s: &RouteSearch) -> RouteResponse {
        if let Err(e) = s.validate() {
            return RouteResponse::Refused(e);
        }
        let Some(served) = self.shards.get(&(s.index.clone(), s.shard)) else {
            return RouteResponse::Refused(format!(
                "shard {} of index {:?} is not served here",
                s.shard, s.index
            ));
        };
        let q = Query {
            k: s.k as usize,
            ef: (s.ef as usize).max(s.k as usize),
            max_dcs: s.max_dcs.map(|b| b as usize),
            label: s.label,
            ..Query::top(s.k as usize, s.ef as usize)
        };
        match served.index.search(&s.vector, &q) {
            Ok(found) => RouteResponse::Hits(
                found
                    .hits
                    .into_iter()
                    .map(|h| RouteHit {
                        key: h.key,
                        distance: h.distance,
                    })
                    .collect(),
            ),
            Err(e) => RouteResponse::Refused(e.to_string()),
        }
    }

    /// Registers with the node's actor and serves searches until `cancel`; announces the
    /// shards in the DHT meanwhile.
    pub async fn start(
        &self,
        handle: &NodeHandle,
        cancel: &CancellationToken,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> anyhow::Result<()> {
        let (tx, rx) = mpsc::channel(QUEUE);
        handle.set_route_handler(Some(RouteHandler(tx))).await?;
        let (svc, h, c) = (self.clone(), handle.clone(), cancel.clone());
        tasks.spawn(async move { svc.serve(h, rx, c).await });
        let (svc, h, c) = (self.clone(), handle.clone(), cancel.clone());
        tasks.spawn(async move { svc.announce(h, c).await });
        for r in self.records() {
            info!(index = %r.index, shard = r.shard, of = r.shards, vectors = r.vectors, "serving route shard");
        }
        Ok(())
    }

    async fn serve(
        self,
        handle: NodeHandle,
        mut rx: mpsc::Receiver<RouteCall>,
        cancel: CancellationToken,
    ) {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let slots = Arc::new(Semaphore::new(threads));
        loop {
            let call = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                c = rx.recv() => match c {
                    Some(c) => c,
                    None => return,
                },
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (svc, h) = (self.clone(), handle.clone());
            tokio::spawn(async move {
                let RouteRequest::Search(s) = call.request;
                let answer = tokio::task::spawn_blocking(move || svc.search(&s))
                    .await
                    .unwrap_or_else(|e| RouteResponse::Refused(format!("the search failed: {e}")));
                drop(permit);
                debug!(peer = %call.peer, "answered a route search");
                h.respond(call.id, Response::Route(answer)).await;
            });
        }
    }

    async fn announce(self, handle: NodeHandle, cancel: CancellationToken) {
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let mut ok = true;
            for r in self.records() {
                let result = match (
                    DhtKey::route_shard(&r.index, r.shard),
                    colony_protocol::encode(&r, colony_protocol::names::MAX_VALUE_BYTES),
                ) {
                    (Ok(key), Ok(value)) => handle.dht_put_owned(key, value, RECORD_TTL).await,
                    (Err(e), _) => Err(e.into()),
                    (_, Err(e)) => Err(e.into()),
                };
                if let Err(e) = result {
                    ok = false;
                    debug!(index = %r.index, shard = r.shard, "announcing the shard failed: {e:#}");
                }
            }
            // Retry soon while the swarm is still forming; then refresh before expiry.
            wait = if ok {
                RECORD_TTL / 3
            } else {
                Duration::from_secs(2)
            };
        }
    }
}

/// What a query asks of every shard.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RouteQuery {
    pub index: String,
    pub vector: Vec<f32>,
    #[serde(default = "default_k")]
    pub k: u32,
    #[serde(default = "default_ef")]
    pub ef: u32,
    #[serde(default)]
    pub max_dcs: Option<u32>,
    #[serde(default)]
    pub label: Option<u32>,
}

fn default_k() -> u32 {
    10
}

fn default_ef() -> u32 {
    64
}

/// How one shard was answered.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShardAnswer {
    pub shard: u32,
    pub peer: String,
    /// Replicas asked before one answered (1: the first did).
    pub attempts: usize,
    pub ms: f64,
}

/// The merged answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Merged {
    /// Nearest first, one per key.
    pub hits: Vec<RouteHit>,
    pub shards: Vec<ShardAnswer>,
}

/// The replicas announced for one shard: (peer, record), only records that describe that
/// shard of that index.
fn replicas(entries: &[DhtEntry], index: &str, shard: u32) -> Vec<(PeerId, ShardRecord)> {
    owned_values::<ShardRecord>(entries)
        .filter(|(_, r)| {
            r.index == index && r.shard == shard && r.shards > 0 && r.shards <= MAX_SHARDS
        })
        .collect()
}

/// One shard of an index as the DHT announces it: its replicas and their vector counts.
#[derive(Clone, Debug, Serialize)]
pub struct ShardReplicas {
    pub index: String,
    pub shard: u32,
    pub shards: u32,
    /// (peer, vectors) of each node that announces the shard.
    pub replicas: Vec<(String, u64)>,
}

/// Every shard of `index` with the nodes that announce it (one DHT read per shard).
pub async fn shard_map(handle: &NodeHandle, index: &str) -> anyhow::Result<Vec<ShardReplicas>> {
    let key0 = DhtKey::route_shard(index, 0)?;
    let reps0 = replicas(&handle.dht_get(&key0).await?.entries, index, 0);
    let Some(shards) = most_common(reps0.iter().map(|(_, r)| r.shards)) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for shard in 0..shards {
        let reps = if shard == 0 {
            reps0.clone()
        } else {
            let key = DhtKey::route_shard(index, shard)?;
            replicas(&handle.dht_get(&key).await?.entries, index, shard)
        };
        out.push(ShardReplicas {
            index: index.to_string(),
            shard,
            shards,
            replicas: reps
                .into_iter()
                .map(|(p, r)| (p.to_string(), r.vectors))
                .collect(),
        });
    }
    Ok(out)
}

/// Fans `q` out to one replica of every shard of its index and merges the answers (see the
/// module docs). `local`: this node's own shards, searched in place.
pub async fn query(
    handle: &NodeHandle,
    local: Option<&RouteService>,
    q: &RouteQuery,
) -> anyhow::Result<Merged> {
    let probe = RouteSearch {
        index: q.index.clone(),
        shard: 0,
        vector: q.vector.clone(),
        k: q.k,
        ef: q.ef,
        max_dcs: q.max_dcs,
        label: q.label,
    };
    probe.validate().map_err(anyhow::Error::msg)?;
    handle.telemetry().index_used(&q.index);
    let key0 = DhtKey::route_shard(&q.index, 0)
        .map_err(|e| anyhow::anyhow!("index name {:?}: {e}", q.index))?;
    let first = handle.dht_get(&key0).await?.entries;
    let reps0 = replicas(&first, &q.index, 0);
    let Some(shards) = most_common(reps0.iter().map(|(_, r)| r.shards)) else {
        bail!(
            "no node announces index {:?} (no records under {key0})",
            q.index
        );
    };
    if let Some((_, r)) = reps0.iter().find(|(_, r)| r.dim as usize != q.vector.len()) {
        bail!(
            "index {:?} holds {}-dimensional vectors; the query has {}",
            q.index,
            r.dim,
            q.vector.len()
        );
    }
    let asks = (0..shards).map(|shard| {
        let probe = RouteSearch {
            shard,
            ..probe.clone()
        };
        let reps = if shard == 0 {
            Some(reps0.clone())
        } else {
            None
        };
        async move { ask_shard(handle, local, probe, reps).await }
    });
    let answers = futures::future::join_all(asks).await;
    let mut hits: Vec<RouteHit> = Vec::new();
    let mut report = Vec::new();
    for a in answers {
        let (h, r) = a?;
        hits.extend(h);
        report.push(r);
    }
    Ok(Merged {
        hits: merge(hits, q.k as usize),
        shards: report,
    })
}

/// The top `k` of several shards' hits, nearest first, one per key (a vector kept by two
/// shards counts once).
pub fn merge(mut hits: Vec<RouteHit>, k: usize) -> Vec<RouteHit> {
    hits.sort_by(|a, b| a.distance.total_cmp(&b.distance).then(a.key.cmp(&b.key)));
    let mut seen = std::collections::HashSet::new();
    hits.retain(|h| seen.insert(h.key));
    hits.truncate(k);
    hits
}

fn most_common(xs: impl Iterator<Item = u32>) -> Option<u32> {
    let mut count: HashMap<u32, usize> = HashMap::new();
    for x in xs {
        *count.entry(x).or_default() += 1;
    }
    count
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(&a.0)))
        .map(|x| x.0)
}

async fn ask_shard(
    handle: &NodeHandle,
    local: Option<&RouteService>,
    s: RouteSearch,
    known: Option<Vec<(PeerId, ShardRecord)>>,
) -> anyhow::Result<(Vec<RouteHit>, ShardAnswer)> {
    let t0 = Instant::now();
    let me = handle.peer_id();
    if let Some(svc) = local
        && svc.shards.contains_key(&(s.index.clone(), s.shard))
    {
        let svc = svc.clone();
        let shard = s.shard;
        let answer = tokio::task::spawn_blocking(move || svc.search(&s)).await?;
        return match answer {
            RouteResponse::Hits(h) => Ok((
                h,
                ShardAnswer {
                    shard,
                    peer: me.to_string(),
                    attempts: 1,
                    ms: t0.elapsed().as_secs_f64() * 1e3,
                },
            )),
            RouteResponse::Refused(why) => bail!("shard {shard}: {why}"),
        };
    }
    let reps = match known {
        Some(r) => r,
        None => {
            let key = DhtKey::route_shard(&s.index, s.shard)?;
            replicas(&handle.dht_get(&key).await?.entries, &s.index, s.shard)
        }
    };
    let mut reps: Vec<PeerId> = reps
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| *p != me)
        .collect();
    reps.dedup();
    if reps.is_empty() {
        bail!(
            "shard {} of index {:?}: no node announces it",
            s.shard,
            s.index
        );
    }
    // Spread load: start at a random replica, go round from there.
    let start = rand::random::<u64>() as usize % reps.len();
    reps.rotate_left(start);
    let mut why = Vec::new();
    for (i, peer) in reps.iter().enumerate() {
        match handle
            .rpc_anywhere(
                *peer,
                colony_protocol::Request::Route(RouteRequest::Search(s.clone())),
            )
            .await
        {
            Ok(Response::Route(RouteResponse::Hits(h))) => {
                if h.len() > s.k as usize || h.iter().any(|x| !x.distance.is_finite()) {
                    handle
                        .report_offence(
                            *peer,
                            "answered a route search with a malformed list".into(),
                        )
                        .await;
                    why.push(format!("{peer}: malformed answer"));
                    continue;
                }
                return Ok((
                    h,
                    ShardAnswer {
                        shard: s.shard,
                        peer: peer.to_string(),
                        attempts: i + 1,
                        ms: t0.elapsed().as_secs_f64() * 1e3,
                    },
                ));
            }
            Ok(Response::Route(RouteResponse::Refused(r))) => why.push(format!("{peer}: {r}")),
            Ok(Response::Error(e)) => why.push(format!("{peer}: {}", e.message)),
            Ok(other) => why.push(format!("{peer}: unexpected answer {}", other.kind())),
            Err(e) => why.push(format!("{peer}: {e:#}")),
        }
        warn!(shard = s.shard, index = %s.index, "a replica failed, trying the next: {}", why.last().map_or("", String::as_str));
    }
    bail!(
        "shard {} of index {:?}: no replica answered ({})",
        s.shard,
        s.index,
        why.join("; ")
    )
}

/// Splits rows `0..n` into `shards` contiguous ranges and gives shard `i`'s (rows are global
/// keys, so a merged answer names the original rows).
pub fn shard_rows(n: usize, shard: u32, shards: u32) -> std::ops::Range<usize> {
    let (i, s) = (shard as usize, shards.max(1) as usize);
    (n * i / s)..(n * (i + 1) / s)
}
