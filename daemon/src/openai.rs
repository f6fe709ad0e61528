//! The OpenAI-compatible chat API over a node's inference service, and the job endpoints:
//!
//! - `POST /v1/chat/completions` — `messages`, `max_tokens` (or `max_completion_tokens`),
//!   `temperature`, `top_p`, `seed`, `stream`, and `hogwild_workers` (1–8, default 1). Not
//!   streamed: the answer in `choices[0].message.content`, each worker's text in
//!   `hogwild.workers`. Streamed (Server-Sent Events): the answer as `choices[0].delta`
//!   chunks (with one worker its tokens are the answer; with several the finisher's answer
//!   comes at the end), every worker's tokens as they are chosen in `hogwild` chunks
//!   (`{"worker": w, "content": ...}`, no choices), then the usage and `[DONE]`. A client that
//!   hangs up cancels its job.
//! - `GET /v1/models`, `GET /api/infer/jobs`, `GET /api/infer/jobs/{id}?from=N` (events),
//!   `DELETE /api/infer/jobs/{id}` (cancel).

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use colony_protocol::infer::{InferEvent, InferJob, InferSampling};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::infer_service::{Client, InferService, Refusal};

pub fn router(svc: Option<InferService>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/api/infer/jobs", get(jobs))
        .route("/api/infer/jobs/{id}", get(job_events).delete(cancel_job))
        .with_state(svc)
}

fn error(status: StatusCode, kind: &str, message: impl std::fmt::Display) -> Response {
    (
        status,
        Json(json!({ "error": { "message": message.to_string(), "type": kind } })),
    )
        .into_response()
}

fn no_model() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_model",
        "this node serves no model (start it with `colony node --model PATH`)",
    )
}

/// Message content: a string, or an array of parts of which the text ones count.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Content,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    hogwild_workers: Option<u8>,
    #[serde(default)]
    n: Option<u32>,
}

fn to_job(r: &ChatRequest) -> Result<InferJob, String> {
    if r.n.is_some_and(|n| n != 1) {
        return Err("n must be 1 (ask for parallel workers with hogwild_workers)".into());
    }
    let mut messages = Vec::new();
    for m in &r.messages {
        let text = match &m.content {
            Content::Text(t) => t.clone(),
            Content::Parts(parts) => parts
                .iter()
                .filter(|p| p["type"] == "text")
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        };
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role.clone()
        };
        messages.push((role, text));
    }
    Ok(InferJob {
        messages,
        workers: r.hogwild_workers.unwrap_or(1),
        max_tokens: r.max_completion_tokens.or(r.max_tokens).unwrap_or(256),
        sampling: InferSampling {
            temperature: r.temperature.unwrap_or(1.0),
            top_p: r.top_p.unwrap_or(1.0),
            seed: r.seed.unwrap_or(0),
        },
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn refusal(r: Refusal) -> Response {
    match r {
        Refusal::Invalid(why) => error(StatusCode::BAD_REQUEST, "invalid_request_error", why),
        Refusal::QueueFull(_) | Refusal::TooManyForClient(_) => {
            error(StatusCode::TOO_MANY_REQUESTS, "queue_full", r)
        }
        Refusal::Stopped => error(StatusCode::SERVICE_UNAVAILABLE, "stopped", r),
    }
}

/// Cancels the job when dropped unless it has ended (a client that hangs up).
struct CancelOnDrop {
    svc: InferService,
    id: u64,
    ended: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.svc.cancel(self.id, Client::Local);
        }
    }
}

/// Everything a finished job said.
#[derive(Default)]
struct Outcome {
    workers: Vec<String>,
    answer: String,
    generated: Vec<u32>,
    decode_seconds: f64,
    end: Option<InferEvent>,
}

fn finish_reason(generated: &[u32], max_tokens: u32) -> &'static str {
    if generated.iter().all(|&g| g >= max_tokens) {
        "length"
    } else {
        "stop"
    }
}

async fn chat(State(svc): State<Option<InferService>>, body: axum::body::Bytes) -> Response {
    let Some(svc) = svc else {
        return no_model();
    };
    let req: ChatRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("the body is not a chat completion request: {e}"),
            );
        }
    };
    if let Some(m) = &req.model
        && !m.is_empty()
        && m != svc.model()
    {
        return error(
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!("this node serves {:?}, not {m:?}", svc.model()),
        );
    }
    let job = match to_job(&req) {
        Ok(j) => j,
        Err(why) => return error(StatusCode::BAD_REQUEST, "invalid_request_error", why),
    };
    let (workers, max_tokens) = (usize::from(job.workers), job.max_tokens);
    let (id, _) = match svc.submit(job, Client::Local) {
        Ok(x) => x,
        Err(r) => return refusal(r),
    };
    let guard = CancelOnDrop {
        svc: svc.clone(),
        id,
        ended: false,
    };
    let meta = Meta {
        id: format!("chatcmpl-{id}"),
        created: unix_now(),
        model: svc.model().to_string(),
        workers,
        max_tokens,
    };
    if req.stream {
        return stream(svc, guard, meta).into_response();
    }
    match collect(&svc, id, workers).await {
        Ok(out) => {
            let mut guard = guard;
            guard.ended = true;
            match out.end {
                Some(InferEvent::Failed(why)) => {
                    error(StatusCode::INTERNAL_SERVER_ERROR, "job_failed", why)
                }
                Some(InferEvent::Cancelled) => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cancelled",
                    "the job was cancelled",
                ),
                _ => {
                    let completion: u32 = out.generated.iter().sum();
                    Json(json!({
                        "id": meta.id,
                        "object": "chat.completion",
                        "created": meta.created,
                        "model": meta.model,
                        "choices": [{
                            "index": 0,
                            "message": { "role": "assistant", "content": out.answer },
                            "finish_reason": finish_reason(&out.generated, max_tokens),
                        }],
                        "usage": { "completion_tokens": completion },
                        "hogwild": {
                            "workers": out.workers,
                            "generated": out.generated,
                            "decode_seconds": out.decode_seconds,
                        },
                    }))
                    .into_response()
                }
            }
        }
        Err(why) => error(StatusCode::INTERNAL_SERVER_ERROR, "job_lost", why),
    }
}

/// Waits for job `id` to end and gathers its events.
async fn collect(svc: &InferService, id: u64, workers: usize) -> Result<Outcome, String> {
    let mut rx = svc.subscribe(id, Client::Local)?;
    let mut out = Outcome {
        workers: vec![String::new(); workers],
        ..Outcome::default()
    };
    let mut from = 0;
    loop {
        let (events, next, done) = svc.events(id, from, usize::MAX, Client::Local)?;
        from = next;
        for e in events {
            match &e {
                InferEvent::Token { worker, text } => {
                    if let Some(w) = out.workers.get_mut(usize::from(*worker)) {
                        w.push_str(text);
                    }
                }
                InferEvent::Answer { text } => out.answer = text.clone(),
                InferEvent::Done {
                    generated,
                    decode_seconds,
                    ..
                } => {
                    out.generated = generated.clone();
                    out.decode_seconds = *decode_seconds;
                }
                _ => {}
            }
            if e.is_last() {
                out.end = Some(e);
            }
        }
        if done {
            return Ok(out);
        }
        if rx.changed().await.is_err() {
            return Err(format!("job {id} was forgotten before it ended"));
        }
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    workers: usize,
    max_tokens: u32,
}

impl Meta {
    fn chunk(&self, choices: Value, extra: Option<(&str, Value)>) -> Event {
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some((k, x)) = extra {
            v[k] = x;
        }
        Event::default().data(v.to_string())
    }
}

fn stream(
    svc: InferService,
    guard: CancelOnDrop,
    meta: Meta,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    struct St {
        svc: InferService,
        guard: CancelOnDrop,
        meta: Meta,
        rx: Option<tokio::sync::watch::Receiver<usize>>,
        from: usize,
        pending: std::collections::VecDeque<Event>,
        started: bool,
        finished: bool,
        generated: Vec<u32>,
    }
    let rx = svc.subscribe(guard.id, Client::Local).ok();
    let st = St {
        svc,
        guard,
        meta,
        rx,
        from: 0,
        pending: Default::default(),
        started: false,
        finished: false,
        generated: Vec::new(),
    };
    let s = futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(ev) = st.pending.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.finished {
                return None;
            }
            if !st.started {
                st.started = true;
                let first = st.meta.chunk(
                    json!([{ "index": 0, "delta": { "role": "assistant", "content": "" },
                             "finish_reason": null }]),
                    None,
                );
                return Some((Ok(first), st));
            }
            let id = st.guard.id;
            let got = st.svc.events(id, st.from, 256, Client::Local);
            let (events, next, done) = match got {
                Ok(x) => x,
                Err(why) => {
                    st.finished = true;
                    st.guard.ended = true;
                    st.pending.push_back(
                        Event::default().data(json!({ "error": { "message": why } }).to_string()),
                    );
                    st.pending.push_back(Event::default().data("[DONE]"));
                    continue;
                }
            };
            st.from = next;
            for e in events {
                match e {
                    InferEvent::Token { worker, text } if st.meta.workers == 1 => {
                        let _ = worker;
                        let c = st.meta.chunk(
                            json!([{ "index": 0, "delta": { "content": text },
                                     "finish_reason": null }]),
                            None,
                        );
                        st.pending.push_back(c);
                    }
                    InferEvent::Token { worker, text } => {
                        let c = st.meta.chunk(
                            json!([]),
                            Some(("hogwild", json!({ "worker": worker, "content": text }))),
                        );
                        st.pending.push_back(c);
                    }
                    InferEvent::Answer { text } if st.meta.workers > 1 => {
                        let c = st.meta.chunk(
                            json!([{ "index": 0, "delta": { "content": text },
                                     "finish_reason": null }]),
                            None,
                        );
                        st.pending.push_back(c);
                    }
                    InferEvent::Done { generated, .. } => {
                        st.generated = generated;
                        let completion: u32 = st.generated.iter().sum();
                        let reason = finish_reason(&st.generated, st.meta.max_tokens);
                        let c = st.meta.chunk(
                            json!([{ "index": 0, "delta": {}, "finish_reason": reason }]),
                            Some(("usage", json!({ "completion_tokens": completion }))),
                        );
                        st.pending.push_back(c);
                    }
                    InferEvent::Failed(why) => st.pending.push_back(
                        Event::default().data(json!({ "error": { "message": why } }).to_string()),
                    ),
                    InferEvent::Cancelled => st.pending.push_back(Event::default().data(
                        json!({ "error": { "message": "the job was cancelled" } }).to_string(),
                    )),
                    _ => {}
                }
            }
            if done {
                st.finished = true;
                st.guard.ended = true;
                st.pending.push_back(Event::default().data("[DONE]"));
                continue;
            }
            if st.pending.is_empty() {
                let changed = match st.rx.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => false,
                };
                if !changed {
                    st.finished = true;
                    st.pending.push_back(Event::default().data("[DONE]"));
                }
            }
        }
    });
    Sse::new(s)
}

async fn models(State(svc): State<Option<InferService>>) -> Response {
    let data: Vec<Value> = svc
        .iter()
        .map(|s| json!({ "id": s.model(), "object": "model", "owned_by": "colony" }))
        .collect();
    Json(json!({ "object": "list", "data": data })).into_response()
}

async fn jobs(State(svc): State<Option<InferService>>) -> Response {
    match svc {
        Some(s) => Json(json!({ "jobs": s.list() })).into_response(),
        None => no_model(),
    }
}

#[derive(Debug, Deserialize)]
struct FromQuery {
    #[serde(default)]
    from: usize,
}

async fn job_events(
    State(svc): State<Option<InferService>>,
    Path(id): Path<u64>,
    Query(q): Query<FromQuery>,
) -> Response {
    let Some(svc) = svc else {
        return no_model();
    };
    match svc.events(id, q.from, 1024, Client::Local) {
        Ok((events, next, done)) => {
            Json(json!({ "events": events_json(&events), "next": next, "done": done }))
                .into_response()
        }
        Err(why) => error(StatusCode::NOT_FOUND, "not_found", why),
    }
}

fn events_json(events: &[InferEvent]) -> Vec<Value> {
    events
        .iter()
        .map(|e| match e {
            InferEvent::Started => json!({ "type": "started" }),
            InferEvent::Token { worker, text } => {
                json!({ "type": "token", "worker": worker, "text": text })
            }
            InferEvent::Answer { text } => json!({ "type": "answer", "text": text }),
            InferEvent::Done {
                generated,
                decode_seconds,
                seconds,
            } => json!({ "type": "done", "generated": generated,
                         "decode_seconds": decode_seconds, "seconds": seconds }),
            InferEvent::Cancelled => json!({ "type": "cancelled" }),
            InferEvent::Failed(why) => json!({ "type": "failed", "error": why }),
        })
        .collect()
}

async fn cancel_job(State(svc): State<Option<InferService>>, Path(id): Path<u64>) -> Response {
    let Some(svc) = svc else {
        return no_model();
    };
    match svc.cancel(id, Client::Local) {
        Ok(()) => Json(json!({ "cancelled": id })).into_response(),
        Err(why) => error(StatusCode::NOT_FOUND, "not_found", why),
    }
}
