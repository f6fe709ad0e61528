//! The coordinator's dashboard (`GET /`) and the read-only endpoints behind it:
//!
//! - `GET /api/snapshot` — everything the page shows, as one JSON object ([`Snapshot`]);
//! - `GET /api/events` — the same snapshot as Server-Sent Events (`event: snapshot`), one
//!   every `every_ms` (default 1000, 200–60000);
//! - `GET /api/runs`, `GET /api/runs/{run}` — training runs this node takes part in, step by
//!   step; `GET /api/allreduce/rounds?n=` — its recent all-reduce rounds against their bound;
//!   `GET /api/traffic` — bytes and messages by protocol, errors by kind.
//!
//! The page is static (`daemon/assets/dashboard.*`, uPlot vendored from npm under
//! `daemon/assets/vendor/`), compiled into the binary, and makes no request beyond this node.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::handle::NodeHandle;
use crate::infer_service::{InferService, JobState, JobSummary};
use crate::patch_service::{PatchList, PatchService};
use crate::route_service::{RouteService, ShardReplicas};
use crate::swarm::actor::{NodeStatus, PeerSummary};
use crate::telemetry::{RoundView, RunView, TrafficView};

/// How many steps of each run a snapshot carries.
const SNAPSHOT_POINTS: usize = 400;
/// How many rounds a snapshot carries.
const SNAPSHOT_ROUNDS: usize = 40;
/// How many inference jobs a snapshot shows the workers' text of.
const SNAPSHOT_JOB_TEXTS: usize = 2;
/// The shard map is read from the DHT at most this often.
const SHARD_MAP_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Dashboard {
    handle: NodeHandle,
    infer: Option<InferService>,
    route: Option<RouteService>,
    patch: Option<PatchService>,
    shard_map: ShardMapCache,
}

/// The shard map and when it was read.
type ShardMapCache = Arc<Mutex<Option<(Instant, Vec<ShardReplicas>)>>>;

impl std::fmt::Debug for Dashboard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dashboard")
            .field("peer", &self.handle.peer_id())
            .finish_non_exhaustive()
    }
}

/// Everything the dashboard shows.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub t_ms: u64,
    pub status: NodeStatus,
    pub peers: Vec<PeerSummary>,
    pub runs: Vec<RunView>,
    pub rounds: Vec<RoundView>,
    pub traffic: Vec<TrafficView>,
    pub errors: BTreeMap<String, u64>,
    /// This node's measured bandwidth and the rates seen with each peer.
    pub bandwidth: crate::telemetry::BandwidthView,
    pub infer: Option<InferView>,
    /// Shards this node serves.
    pub local_shards: Vec<colony_protocol::route::ShardRecord>,
    /// Every shard of the indexes this node serves or queried, with their replicas.
    pub shard_map: Vec<ShardReplicas>,
    pub patch: Option<PatchList>,
}

#[derive(Debug, Serialize)]
pub struct InferView {
    pub model: String,
    pub tokens_total: u64,
    pub jobs: Vec<JobView>,
}

#[derive(Debug, Serialize)]
pub struct JobView {
    #[serde(flatten)]
    pub summary: JobSummary,
    /// Each Hogwild worker's text so far (the newest jobs only).
    pub worker_texts: Option<Vec<String>>,
    pub answer: Option<String>,
}

pub fn router(
    handle: NodeHandle,
    infer: Option<InferService>,
    route: Option<RouteService>,
    patch: Option<PatchService>,
) -> Router {
    let d = Dashboard {
        handle,
        infer,
        route,
        patch,
        shard_map: Arc::default(),
    };
    Router::new()
        .route("/", get(index))
        .route("/assets/{file}", get(asset))
        .route("/api/snapshot", get(snapshot))
        .route("/api/events", get(events))
        .route("/api/runs", get(runs))
        .route("/api/runs/{run}", get(run))
        .route("/api/allreduce/rounds", get(rounds))
        .route("/api/traffic", get(traffic))
        .with_state(d)
}

impl Dashboard {
    async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let h = &self.handle;
        let t = h.telemetry();
        let status = h.status().await?;
        let peers = h.peers().await?;
        let infer = self.infer.as_ref().map(|svc| {
            let list = svc.list();
            let newest: Vec<u64> = list
                .iter()
                .rev()
                .filter(|j| j.state != JobState::Queued)
                .take(SNAPSHOT_JOB_TEXTS)
                .map(|j| j.id)
                .collect();
            InferView {
                model: svc.model().to_string(),
                tokens_total: svc.tokens_total(),
                jobs: list
                    .into_iter()
                    .map(|summary| {
                        let texts = newest
                            .contains(&summary.id)
                            .then(|| svc.texts(summary.id))
                            .flatten();
                        let (workers, answer) = match texts {
                            Some((w, a)) => (Some(w), a),
                            None => (None, None),
                        };
                        JobView {
                            summary,
                            worker_texts: workers,
                            answer,
                        }
                    })
                    .collect(),
            }
        });
        let local_shards = self
            .route
            .as_ref()
            .map(RouteService::records)
            .unwrap_or_default();
        Ok(Snapshot {
            t_ms: crate::clock::now_ms(),
            status,
            peers,
            runs: t.runs(Some(SNAPSHOT_POINTS)),
            rounds: t.rounds(SNAPSHOT_ROUNDS),
            traffic: t.traffic.view(),
            errors: t.errors(),
            bandwidth: t.bandwidth(),
            infer,
            shard_map: self.shard_map(&local_shards).await,
            local_shards,
            patch: self
                .patch
                .clone()
                .or_else(|| t.attached_patch_service())
                .as_ref()
                .map(PatchService::list),
        })
    }

    /// The shard map of every index this node serves or has queried, re-read from the DHT
    /// at most every [`SHARD_MAP_EVERY`].
    async fn shard_map(&self, local: &[colony_protocol::route::ShardRecord]) -> Vec<ShardReplicas> {
        {
            let cached = self
                .shard_map
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((at, map)) = cached.as_ref()
                && at.elapsed() < SHARD_MAP_EVERY
            {
                return map.clone();
            }
        }
        let t = self.handle.telemetry();
        for r in local {
            t.index_used(&r.index);
        }
        let mut map = Vec::new();
        for index in t.indexes() {
            match crate::route_service::shard_map(&self.handle, &index).await {
                Ok(m) => map.extend(m),
                Err(e) => tracing::debug!(index, "shard map: {e:#}"),
            }
        }
        *self
            .shard_map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((Instant::now(), map.clone()));
        map
    }
}

fn unavailable(e: anyhow::Error) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "error": format!("{e:#}") })),
    )
        .into_response()
}

async fn snapshot(State(d): State<Dashboard>) -> Response {
    match d.snapshot().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => unavailable(e),
    }
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    #[serde(default = "default_every")]
    every_ms: u64,
}

fn default_every() -> u64 {
    1000
}

/// The snapshot as Server-Sent Events, the first at once.
async fn events(State(d): State<Dashboard>, Query(q): Query<EventsQuery>) -> Response {
    if !(200..=60_000).contains(&q.every_ms) {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": "every_ms must be within 200..=60000" })),
        )
            .into_response();
    }
    let every = Duration::from_millis(q.every_ms);
    // State: (dashboard, first event, ended). A snapshot that fails (the node is stopping)
    // is sent as an `error` event and ends the stream.
    let stream = futures::stream::unfold((d, true, false), move |(d, first, ended)| async move {
        if ended {
            return None;
        }
        if !first {
            tokio::time::sleep(every).await;
        }
        let (ev, ended) = match d.snapshot().await {
            Ok(s) => (
                Event::default()
                    .event("snapshot")
                    .json_data(&s)
                    .unwrap_or_else(|e| Event::default().event("error").data(e.to_string())),
                false,
            ),
            Err(e) => (Event::default().event("error").data(format!("{e:#}")), true),
        };
        Some((Ok::<_, Infallible>(ev), (d, false, ended)))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[derive(Debug, Deserialize)]
struct PointsQuery {
    points: Option<usize>,
}

async fn runs(State(d): State<Dashboard>, Query(q): Query<PointsQuery>) -> impl IntoResponse {
    Json(d.handle.telemetry().runs(q.points))
}

async fn run(State(d): State<Dashboard>, Path(run): Path<String>) -> Response {
    match d.handle.telemetry().run(&run) {
        Some(r) => Json(r).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": format!("this node has no run {run:?}") })),
        )
            .into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct RoundsQuery {
    n: Option<usize>,
}

async fn rounds(State(d): State<Dashboard>, Query(q): Query<RoundsQuery>) -> impl IntoResponse {
    Json(d.handle.telemetry().rounds(q.n.unwrap_or(usize::MAX)))
}

async fn traffic(State(d): State<Dashboard>) -> impl IntoResponse {
    let t = d.handle.telemetry();
    Json(serde_json::json!({ "protocols": t.traffic.view(), "errors": t.errors() }))
}

const INDEX_HTML: &str = include_str!("../assets/dashboard.html");

async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX_HTML,
    )
}

/// The page's static files, compiled in.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/dashboard.js"),
    ),
    (
        "dashboard.css",
        "text/css; charset=utf-8",
        include_str!("../assets/dashboard.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/vendor/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("../assets/vendor/uPlot.min.css"),
    ),
];

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, kind, body)) => (
            [
                (header::CONTENT_TYPE, *kind),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, format!("no asset {file:?}")).into_response(),
    }
}
