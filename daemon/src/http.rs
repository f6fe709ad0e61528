//! The node's HTTP API (JSON). Loopback by default. The CLI's `dht`, `peers` and `status`
//! commands are clients of this API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use colony_protocol::{DhtEntry, DhtKey, Subkey};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::handle::{NodeHandle, StoreReport};

/// The services a node runs, as the API serves them.
#[derive(Clone, Debug, Default)]
pub struct Services {
    pub infer: Option<crate::infer_service::InferService>,
    pub route: Option<crate::route_service::RouteService>,
    pub patch: Option<crate::patch_service::PatchService>,
}

/// Binds `addr` and serves the API until `cancel` fires (requests that change state need
/// `token`, when there is one). Returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    token: Option<String>,
    handle: NodeHandle,
    services: Services,
    cancel: CancellationToken,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<SocketAddr> {
    let Services {
        infer,
        route,
        patch,
    } = services;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind the HTTP API to {addr}"))?;
    let bound = listener.local_addr()?;
    let app = router(handle.clone())
        .merge(metrics_router(
            handle.clone(),
            infer.clone(),
            route.clone(),
            patch.clone(),
        ))
        .merge(crate::openai::router(infer.clone()))
        .merge(route_router(handle.clone(), route.clone()))
        .merge(patch_router(handle.clone(), patch.clone()))
        .merge(crate::dashboard::router(handle, infer, route, patch))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(token),
            require_token,
        ));
    tasks.spawn(async move {
        let shutdown = async move { cancel.cancelled().await };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::warn!("http server stopped: {e}");
        }
    });
    Ok(bound)
}

/// Requests that may change state (every method but GET and HEAD, and the POST of a routing
/// query) carry
/// `Authorization: Bearer <token>`; the rest are open (the API binds to loopback by default).
async fn require_token(
    State(token): State<Arc<Option<String>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::Method;
    let Some(token) = token.as_ref() else {
        return next.run(req).await;
    };
    // A routing query is a read that carries its vector in a body.
    let read_only_post = *req.method() == Method::POST && req.uri().path() == "/api/route/query";
    if matches!(*req.method(), Method::GET | Method::HEAD) || read_only_post {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if same_secret(g.as_bytes(), token.as_bytes()) => next.run(req).await,
        Some(_) => ApiError(StatusCode::UNAUTHORIZED, "wrong API token".into()).into_response(),
        None => ApiError(
            StatusCode::UNAUTHORIZED,
            format!(
                "{} {} changes state: send `Authorization: Bearer <token>` (the token is in \
                 the node's data directory, file api-token)",
                req.method(),
                req.uri().path()
            ),
        )
        .into_response(),
    }
}

/// The token a client sends: `explicit`, else the one in `data_dir/api-token` (if readable).
pub fn client_token(explicit: Option<&str>, data_dir: &std::path::Path) -> Option<String> {
    explicit.map(str::to_string).or_else(|| {
        std::fs::read_to_string(crate::storage::DataDir::new(data_dir).api_token())
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    })
}

/// `rb` with `Authorization: Bearer` set from [`client_token`], when there is one.
pub fn authorize(
    rb: reqwest::RequestBuilder,
    explicit: Option<&str>,
    data_dir: &std::path::Path,
) -> reqwest::RequestBuilder {
    match client_token(explicit, data_dir) {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    }
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn router(handle: NodeHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/openapi.json", get(openapi))
        .route("/api/status", get(status))
        .route("/api/peers", get(peers))
        .route("/api/dht/{*key}", get(dht_get).put(dht_put))
        .route("/api/ping/{peer}", post(ping))
        .with_state(handle)
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

fn bad_request(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, e.to_string())
}

fn unavailable(e: anyhow::Error) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}"))
}

async fn status(State(h): State<NodeHandle>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(h.status().await.map_err(unavailable)?))
}

async fn peers(State(h): State<NodeHandle>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(h.peers().await.map_err(unavailable)?))
}

/// One entry as JSON: the value as text when it is UTF-8, and always as hex.
#[derive(Debug, Serialize, Deserialize)]
pub struct EntryView {
    pub subkey: String,
    pub owner: Option<String>,
    pub value: Option<String>,
    pub value_hex: String,
    pub expires_at_ms: u64,
}

impl From<&DhtEntry> for EntryView {
    fn from(e: &DhtEntry) -> Self {
        Self {
            subkey: e.subkey.to_string(),
            owner: match &e.subkey {
                Subkey::Owner(pk) => crate::handle::peer_id_of(pk).ok().map(|p| p.to_string()),
                Subkey::Plain(_) => None,
            },
            value: String::from_utf8(e.value.clone()).ok(),
            value_hex: hex::encode(&e.value),
            expires_at_ms: e.expires_at_ms,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct GetView {
    pub key: String,
    pub entries: Vec<EntryView>,
    pub asked: usize,
    pub answered: usize,
}

async fn dht_get(
    State(h): State<NodeHandle>,
    Path(key): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let key = DhtKey::new(key).map_err(bad_request)?;
    let got = h.dht_get(&key).await.map_err(unavailable)?;
    Ok(Json(GetView {
        key: key.to_string(),
        entries: got.entries.iter().map(EntryView::from).collect(),
        asked: got.asked,
        answered: got.answered,
    }))
}

/// Body of `PUT /api/dht/{key}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PutBody {
    /// The value, as text.
    pub value: String,
    /// A plain subkey; when absent the entry is owned by (and signed with) this node's key.
    pub subkey: Option<String>,
    /// Seconds until the entry expires.
    #[serde(default = "default_ttl")]
    pub ttl_s: u64,
}

fn default_ttl() -> u64 {
    300
}

async fn dht_put(
    State(h): State<NodeHandle>,
    Path(key): Path<String>,
    Json(body): Json<PutBody>,
) -> Result<Json<StoreReport>, ApiError> {
    let key = DhtKey::new(key).map_err(bad_request)?;
    let ttl = Duration::from_secs(body.ttl_s);
    let value = body.value.into_bytes();
    let report = match body.subkey {
        Some(sk) => h.dht_put(key, sk.into_bytes(), value, ttl).await,
        None => h.dht_put_owned(key, value, ttl).await,
    };
    Ok(Json(report.map_err(|e| {
        if e.downcast_ref::<colony_protocol::RecordError>().is_some() {
            bad_request(format!("{e:#}"))
        } else {
            unavailable(e)
        }
    })?))
}

async fn ping(
    State(h): State<NodeHandle>,
    Path(peer): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let peer = peer
        .parse()
        .map_err(|e| bad_request(format!("bad peer id {peer:?}: {e}")))?;
    let rtt = h.ping(peer).await.map_err(unavailable)?;
    Ok(Json(
        serde_json::json!({ "peer": peer.to_string(), "rtt_ms": rtt.as_secs_f64() * 1e3 }),
    ))
}

/// `POST /api/route/query`: a nearest-neighbour query fanned out to every shard of an index
/// in the swarm (see `route_service::query`); `GET /api/route/shards`: the shards this node
/// serves.
pub fn route_router(
    handle: NodeHandle,
    route: Option<crate::route_service::RouteService>,
) -> Router {
    Router::new()
        .route("/api/route/query", post(route_query))
        .route("/api/route/shards", get(route_shards))
        .with_state((handle, route))
}

type RouteState = (NodeHandle, Option<crate::route_service::RouteService>);

async fn route_query(
    State((h, local)): State<RouteState>,
    body: Result<Json<crate::route_service::RouteQuery>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<crate::route_service::Merged>, ApiError> {
    let Json(q) = body.map_err(|e| bad_request(e.body_text()))?;
    crate::route_service::query(&h, local.as_ref(), &q)
        .await
        .map(Json)
        .map_err(|e| {
            let msg = format!("{e:#}");
            if msg.contains("values")
                || msg.contains("must be")
                || msg.contains("not finite")
                || msg.contains("dimensional")
                || msg.contains("index name")
            {
                bad_request(msg)
            } else {
                ApiError(StatusCode::SERVICE_UNAVAILABLE, msg)
            }
        })
}

async fn route_shards(State((_, local)): State<RouteState>) -> impl IntoResponse {
    Json(local.map(|s| s.records()).unwrap_or_default())
}

/// `/api/patch/*`: submit a patch request, list the chain and proposals, show one, roll back.
pub fn patch_router(
    handle: NodeHandle,
    patch: Option<crate::patch_service::PatchService>,
) -> Router {
    Router::new()
        .route("/api/patch/submit", post(patch_submit))
        .route("/api/patch/list", get(patch_list))
        .route("/api/patch/show/{id}", get(patch_show))
        .route("/api/patch/rollback/{id}", post(patch_rollback))
        .with_state((handle, patch))
}

type PatchState = (NodeHandle, Option<crate::patch_service::PatchService>);

fn no_patch_service() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "this node serves no editable model (no [patch] in its config)".into(),
    )
}

async fn patch_submit(
    State((h, svc)): State<PatchState>,
    body: Result<
        Json<crate::patch_service::SubmitRequest>,
        axum::extract::rejection::JsonRejection,
    >,
) -> Result<impl IntoResponse, ApiError> {
    let svc = svc.ok_or_else(no_patch_service)?;
    let Json(req) = body.map_err(|e| bad_request(e.body_text()))?;
    let id = svc
        .submit(&h, req)
        .await
        .map_err(|e| bad_request(format!("{e:#}")))?;
    Ok(Json(serde_json::json!({ "request": id })))
}

async fn patch_list(State((_, svc)): State<PatchState>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(svc.ok_or_else(no_patch_service)?.list()))
}

async fn patch_show(
    State((_, svc)): State<PatchState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    svc.ok_or_else(no_patch_service)?
        .show(&id)
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no patch {id} known here")))
}

async fn patch_rollback(
    State((_, svc)): State<PatchState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let (version, len) = svc
        .ok_or_else(no_patch_service)?
        .rollback(&id)
        .map_err(|e| bad_request(format!("{e:#}")))?;
    Ok(Json(serde_json::json!({ "version": version, "len": len })))
}

type MetricsState = (
    NodeHandle,
    Option<crate::infer_service::InferService>,
    Option<crate::route_service::RouteService>,
    Option<crate::patch_service::PatchService>,
);

/// `GET /metrics`: Prometheus text exposition (see `crate::metrics`).
pub fn metrics_router(
    handle: NodeHandle,
    infer: Option<crate::infer_service::InferService>,
    route: Option<crate::route_service::RouteService>,
    patch: Option<crate::patch_service::PatchService>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state((handle, infer, route, patch))
}

async fn metrics(
    State((h, infer, route, patch)): State<MetricsState>,
) -> Result<impl IntoResponse, ApiError> {
    let status = h.status().await.map_err(unavailable)?;
    let peers = h.peers().await.map_err(unavailable)?;
    let text = crate::metrics::render(
        &status,
        &peers,
        infer.as_ref(),
        route.as_ref(),
        patch.as_ref(),
        h.telemetry(),
    );
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    ))
}

/// The API's OpenAPI 3.1 document (`daemon/src/openapi.json`; a test keeps it in step with
/// the routers).
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// Every `.route(path, method(..))` of the routers is in the OpenAPI document with that
    /// method, and the document lists nothing the routers do not serve.
    #[test]
    fn the_openapi_document_matches_the_routers() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let mut served = std::collections::BTreeSet::new();
        for src in [
            include_str!("http.rs"),
            include_str!("openai.rs"),
            include_str!("dashboard.rs"),
        ] {
            for part in src.split(".route(\"").skip(1) {
                let (path, rest) = part.split_once('"').unwrap();
                let call = &rest[..rest.find("))\n").unwrap_or(rest.len())];
                let path = path.replace("{*key}", "{key}");
                for m in ["get", "put", "post", "delete"] {
                    if call.contains(&format!("{m}(")) {
                        served.insert((path.clone(), m.to_owned()));
                    }
                }
            }
        }
        assert!(served.len() > 10, "{served:?}");
        let mut documented = std::collections::BTreeSet::new();
        for (p, ops) in paths {
            for m in ops.as_object().unwrap().keys() {
                documented.insert((p.clone(), m.clone()));
            }
        }
        // The document itself is served but not described in itself.
        served.remove(&("/api/openapi.json".to_owned(), "get".to_owned()));
        assert_eq!(served, documented);
    }
}
