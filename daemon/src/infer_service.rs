//! Inference jobs served by a node: a bounded queue in front of one decoding thread that owns
//! the model, each job's events kept in order for whoever streams them (the HTTP API, peers
//! polling over RPC), and cancellation.
//!
//! States of a job: `queued → running → done | cancelled | failed`; `queued → cancelled`.
//! Invariants: a job's events only grow, and the last one is `Done`, `Cancelled` or `Failed`;
//! at most `limits.queue` jobs wait (more are refused, not dropped later); only the client
//! that started a job (a peer, or the local HTTP API) may read or cancel it; finished jobs
//! are kept for `limits.keep_finished` newer ones, then forgotten.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::Context;
use colony_inference::Precision;
use colony_inference::cpu::{CpuDecoder, CpuModel};
use colony_inference::hogwild::{Engine, HogwildConfig, Sampling};
use colony_inference::tokenizer::{Message, Tokenizer};
use colony_protocol::infer::{
    InferEvent, InferJob, InferRequest, InferResponse, MAX_EVENTS_PER_POLL,
};
use libp2p::PeerId;
use serde::Serialize;
use tokio::sync::watch;

use crate::handle::NodeHandle;
use crate::swarm::actor::InferHandler;

/// How much a node takes on.
#[derive(Clone, Debug)]
pub struct InferLimits {
    /// Jobs waiting behind the running one.
    pub queue: usize,
    /// Tokens per worker a job may ask for.
    pub max_tokens: u32,
    /// Jobs one peer may have queued or running at once (the local API is one operator).
    pub per_client: usize,
    /// Finished jobs remembered (their events can still be read).
    pub keep_finished: usize,
}

impl Default for InferLimits {
    fn default() -> Self {
        Self {
            queue: 8,
            max_tokens: 2048,
            per_client: 2,
            keep_finished: 32,
        }
    }
}

/// Who started a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// This node's HTTP API (loopback by default).
    Local,
    Peer(PeerId),
}

/// Why a job was not queued.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    Invalid(String),
    QueueFull(usize),
    TooManyForClient(usize),
    Stopped,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Invalid(why) => write!(f, "bad job: {why}"),
            Self::QueueFull(n) => write!(f, "the queue is full ({n} jobs wait); try later"),
            Self::TooManyForClient(n) => {
                write!(f, "this client already has {n} jobs queued or running")
            }
            Self::Stopped => write!(f, "the inference service has stopped"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Cancelled,
    Failed,
}

struct Job {
    client: Client,
    job: InferJob,
    state: JobState,
    events: Vec<InferEvent>,
    /// The number of events, for streamers waiting on the next.
    count: watch::Sender<usize>,
    cancel: Arc<AtomicBool>,
    submitted: Instant,
    /// When decoding began and when the job ended.
    started: Option<Instant>,
    ended: Option<Instant>,
    /// Tokens written so far (all workers).
    tokens: usize,
}

#[derive(Default)]
struct Jobs {
    next_id: u64,
    queue: VecDeque<u64>,
    all: HashMap<u64, Job>,
    finished: VecDeque<u64>,
    stopped: bool,
    /// Tokens written by every job since the service started.
    tokens_total: u64,
}

impl Jobs {
    fn push(&mut self, id: u64, e: InferEvent) {
        if let Some(j) = self.all.get_mut(&id) {
            let last = e.is_last();
            match &e {
                InferEvent::Started => j.started = Some(Instant::now()),
                InferEvent::Token { .. } => {
                    j.tokens += 1;
                    self.tokens_total += 1;
                }
                _ => {}
            }
            if last {
                j.ended = Some(Instant::now());
            }
            j.events.push(e);
            j.count.send_replace(j.events.len());
            if last {
                self.finished.push_back(id);
            }
        }
    }

    fn forget_old(&mut self, keep: usize) {
        while self.finished.len() > keep {
            if let Some(id) = self.finished.pop_front() {
                self.all.remove(&id);
            }
        }
    }
}

struct Inner {
    model: String,
    limits: InferLimits,
    jobs: Mutex<Jobs>,
    wake: Condvar,
}

/// One job as listed by the API.
#[derive(Debug, Clone, Serialize)]
pub struct JobSummary {
    pub id: u64,
    pub state: JobState,
    pub workers: u8,
    pub max_tokens: u32,
    /// The question (first 200 characters).
    pub question: String,
    pub client: String,
    pub events: usize,
    pub age_s: f64,
    /// Tokens written (all workers) and their rate over the decoding time so far.
    pub tokens: usize,
    pub tokens_per_sec: f64,
}

/// The service; cheap to clone. Dropping the last clone does not stop the thread: call
/// [`InferService::stop`].
#[derive(Clone)]
pub struct InferService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for InferService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferService")
            .field("model", &self.inner.model)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl InferService {
    /// Loads the model at `path` (GGUF or a Hugging Face folder) and starts the decoding
    /// thread.
    pub fn start(path: &Path, limits: InferLimits) -> anyhow::Result<Self> {
        let (model, tok) = colony_inference::load_cpu(path, Precision::Quantised)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let inner = Arc::new(Inner {
            model: name,
            limits,
            jobs: Mutex::new(Jobs::default()),
            wake: Condvar::new(),
        });
        let worker = inner.clone();
        std::thread::Builder::new()
            .name("colony-infer".into())
            .spawn(move || decode_loop(&worker, &model, &tok))
            .context("cannot start the inference thread")?;
        Ok(Self { inner })
    }

    /// The model's name (its file or folder name).
    pub fn model(&self) -> &str {
        &self.inner.model
    }

    pub fn limits(&self) -> &InferLimits {
        &self.inner.limits
    }

    /// Queues `job`; returns its id and how many jobs are ahead of it.
    pub fn submit(&self, job: InferJob, client: Client) -> Result<(u64, usize), Refusal> {
        job.validate(self.inner.limits.max_tokens)
            .map_err(Refusal::Invalid)?;
        let mut jobs = lock(&self.inner.jobs);
        if jobs.stopped {
            return Err(Refusal::Stopped);
        }
        let running = jobs
            .all
            .values()
            .filter(|j| j.state == JobState::Running)
            .count();
        if jobs.queue.len() >= self.inner.limits.queue {
            return Err(Refusal::QueueFull(jobs.queue.len()));
        }
        let mine = jobs
            .all
            .values()
            .filter(|j| {
                j.client == client && matches!(j.state, JobState::Queued | JobState::Running)
            })
            .count();
        if matches!(client, Client::Peer(_)) && mine >= self.inner.limits.per_client {
            return Err(Refusal::TooManyForClient(mine));
        }
        let id = jobs.next_id;
        jobs.next_id += 1;
        jobs.all.insert(
            id,
            Job {
                client,
                job,
                state: JobState::Queued,
                events: Vec::new(),
                count: watch::Sender::new(0),
                cancel: Arc::new(AtomicBool::new(false)),
                submitted: Instant::now(),
                started: None,
                ended: None,
                tokens: 0,
            },
        );
        let ahead = jobs.queue.len() + running;
        jobs.queue.push_back(id);
        drop(jobs);
        self.inner.wake.notify_all();
        Ok((id, ahead))
    }

    fn check_client(jobs: &Jobs, id: u64, client: Client) -> Result<(), String> {
        match jobs.all.get(&id) {
            None => Err(format!("no job {id} (unknown, or finished long ago)")),
            Some(j) if j.client != client && client != Client::Local => {
                Err(format!("job {id} belongs to another client"))
            }
            Some(_) => Ok(()),
        }
    }

    /// Events of job `id` from index `from` on (at most `max`), the next index, and whether
    /// the job has ended.
    pub fn events(
        &self,
        id: u64,
        from: usize,
        max: usize,
        client: Client,
    ) -> Result<(Vec<InferEvent>, usize, bool), String> {
        let jobs = lock(&self.inner.jobs);
        Self::check_client(&jobs, id, client)?;
        let j = &jobs.all[&id];
        let from = from.min(j.events.len());
        let to = j.events.len().min(from.saturating_add(max));
        let done = j.events[..to].last().is_some_and(InferEvent::is_last);
        Ok((j.events[from..to].to_vec(), to, done))
    }

    /// Waits for events beyond `seen` (returns at once if there are).
    pub fn subscribe(&self, id: u64, client: Client) -> Result<watch::Receiver<usize>, String> {
        let jobs = lock(&self.inner.jobs);
        Self::check_client(&jobs, id, client)?;
        Ok(jobs.all[&id].count.subscribe())
    }

    /// Cancels job `id`: a queued job ends at once, a running one after its current pass.
    pub fn cancel(&self, id: u64, client: Client) -> Result<(), String> {
        let mut jobs = lock(&self.inner.jobs);
        Self::check_client(&jobs, id, client)?;
        let state = jobs.all[&id].state;
        match state {
            JobState::Queued => {
                jobs.queue.retain(|q| *q != id);
                if let Some(j) = jobs.all.get_mut(&id) {
                    j.state = JobState::Cancelled;
                }
                jobs.push(id, InferEvent::Cancelled);
                let keep = self.inner.limits.keep_finished;
                jobs.forget_old(keep);
            }
            JobState::Running => jobs.all[&id].cancel.store(true, Ordering::Relaxed),
            _ => {}
        }
        Ok(())
    }

    /// What each worker of job `id` has written so far, and the final answer once there is
    /// one (None: no such job).
    pub fn texts(&self, id: u64) -> Option<(Vec<String>, Option<String>)> {
        let jobs = lock(&self.inner.jobs);
        let j = jobs.all.get(&id)?;
        let mut workers = vec![String::new(); usize::from(j.job.workers)];
        let mut answer = None;
        for e in &j.events {
            match e {
                InferEvent::Token { worker, text } => {
                    if let Some(w) = workers.get_mut(usize::from(*worker)) {
                        w.push_str(text);
                    }
                }
                InferEvent::Answer { text } => answer = Some(text.clone()),
                _ => {}
            }
        }
        Some((workers, answer))
    }

    /// Tokens written by every job since the service started.
    pub fn tokens_total(&self) -> u64 {
        lock(&self.inner.jobs).tokens_total
    }

    pub fn list(&self) -> Vec<JobSummary> {
        let jobs = lock(&self.inner.jobs);
        let mut out: Vec<JobSummary> = jobs
            .all
            .iter()
            .map(|(id, j)| JobSummary {
                id: *id,
                state: j.state,
                workers: j.job.workers,
                max_tokens: j.job.max_tokens,
                question: j
                    .job
                    .messages
                    .last()
                    .map(|(_, c)| c.chars().take(200).collect())
                    .unwrap_or_default(),
                client: match j.client {
                    Client::Local => "local".into(),
                    Client::Peer(p) => p.to_string(),
                },
                events: j.events.len(),
                age_s: j.submitted.elapsed().as_secs_f64(),
                tokens: j.tokens,
                tokens_per_sec: j.started.map_or(0.0, |t0| {
                    let end = j.ended.unwrap_or_else(Instant::now);
                    j.tokens as f64 / end.saturating_duration_since(t0).as_secs_f64().max(1e-3)
                }),
            })
            .collect();
        out.sort_by_key(|s| s.id);
        out
    }

    /// Cancels every job and ends the decoding thread (after its current pass).
    pub fn stop(&self) {
        let mut jobs = lock(&self.inner.jobs);
        jobs.stopped = true;
        let queued: Vec<u64> = jobs.queue.drain(..).collect();
        for id in queued {
            if let Some(j) = jobs.all.get_mut(&id) {
                j.state = JobState::Cancelled;
            }
            jobs.push(id, InferEvent::Cancelled);
        }
        for j in jobs.all.values() {
            j.cancel.store(true, Ordering::Relaxed);
        }
        drop(jobs);
        self.inner.wake.notify_all();
    }

    /// The peer-RPC side: start, poll and cancel for remote clients.
    pub fn rpc_handler(&self) -> InferHandler {
        let svc = self.clone();
        InferHandler(Arc::new(move |peer, req| {
            svc.answer(Client::Peer(peer), req)
        }))
    }

    fn answer(&self, client: Client, req: InferRequest) -> InferResponse {
        match req {
            InferRequest::Start(job) => match self.submit(job, client) {
                Ok((job, ahead)) => InferResponse::Started {
                    job,
                    ahead: ahead as u32,
                },
                Err(r) => InferResponse::Refused(r.to_string()),
            },
            InferRequest::Poll { job, from } => {
                match self.events(job, from as usize, MAX_EVENTS_PER_POLL, client) {
                    Ok((events, next, done)) => InferResponse::Events {
                        events,
                        next: next as u32,
                        done,
                    },
                    Err(why) => InferResponse::Refused(why),
                }
            }
            InferRequest::Cancel { job } => match self.cancel(job, client) {
                Ok(()) => InferResponse::Cancelled,
                Err(why) => InferResponse::Refused(why),
            },
        }
    }
}

/// The decoding thread: one job at a time, in queue order.
fn decode_loop(inner: &Inner, model: &CpuModel, tok: &Tokenizer) {
    loop {
        let (id, job, cancel) = {
            let mut jobs = lock(&inner.jobs);
            loop {
                if jobs.stopped {
                    return;
                }
                if let Some(id) = jobs.queue.pop_front() {
                    let j = jobs.all.get_mut(&id).expect("queued jobs are known");
                    j.state = JobState::Running;
                    let picked = (id, j.job.clone(), j.cancel.clone());
                    jobs.push(id, InferEvent::Started);
                    break picked;
                }
                jobs = inner.wake.wait(jobs).unwrap_or_else(|p| p.into_inner());
            }
        };
        let outcome = run_job(inner, id, &job, &cancel, model, tok);
        let mut jobs = lock(&inner.jobs);
        let (state, last) = match outcome {
            Ok(Some(ev)) => (JobState::Done, ev),
            Ok(None) => (JobState::Cancelled, InferEvent::Cancelled),
            Err(e) => (JobState::Failed, InferEvent::Failed(format!("{e:#}"))),
        };
        if let Some(j) = jobs.all.get_mut(&id) {
            j.state = state;
        }
        jobs.push(id, last);
        jobs.forget_old(inner.limits.keep_finished);
    }
}

/// Runs one job, pushing its tokens and answer; returns its `Done` event, or None if it was
/// cancelled.
fn run_job(
    inner: &Inner,
    id: u64,
    job: &InferJob,
    cancel: &Arc<AtomicBool>,
    model: &CpuModel,
    tok: &Tokenizer,
) -> anyhow::Result<Option<InferEvent>> {
    let s = job.sampling;
    let cfg = HogwildConfig {
        workers: usize::from(job.workers),
        max_tokens: job.max_tokens as usize,
        sampling: Sampling::from_temperature(s.temperature, s.top_p, s.seed),
        cancel: Some(cancel.clone()),
        // The final answer gets the workers' budget too (at most 256 tokens).
        finisher_tokens: (job.max_tokens as usize).min(256),
        ..HogwildConfig::default()
    };
    let messages: Vec<Message> = job
        .messages
        .iter()
        .map(|(r, c)| Message::new(r, c))
        .collect();
    let mut engine = Engine::with_messages(CpuDecoder::new(model), tok, &messages, cfg)?;
    let out = engine.run(&mut |w, text| {
        lock(&inner.jobs).push(
            id,
            InferEvent::Token {
                worker: w as u8,
                text: text.to_string(),
            },
        );
    })?;
    if out.cancelled {
        return Ok(None);
    }
    lock(&inner.jobs).push(id, InferEvent::Answer { text: out.answer });
    Ok(Some(InferEvent::Done {
        generated: out.generated.iter().map(|&g| g as u32).collect(),
        decode_seconds: out.decode_seconds,
        seconds: out.seconds,
    }))
}

/// Runs `job` on `peer` over RPC, handing each event to `on_event` as it arrives; cancels the
/// job there when `cancel` fires. Returns once the job has ended.
pub async fn remote_infer(
    h: &NodeHandle,
    peer: PeerId,
    job: InferJob,
    cancel: &tokio_util::sync::CancellationToken,
    on_event: &mut (dyn FnMut(&InferEvent) + Send),
) -> anyhow::Result<()> {
    use colony_protocol::{Request, Response};
    let id = match h
        .rpc_anywhere(peer, Request::Infer(InferRequest::Start(job)))
        .await?
    {
        Response::Infer(InferResponse::Started { job, .. }) => job,
        Response::Infer(InferResponse::Refused(why)) => anyhow::bail!("{peer} refused: {why}"),
        other => anyhow::bail!("{peer} answered the job with {other:?}"),
    };
    let mut from = 0u32;
    let mut failures = 0;
    loop {
        if cancel.is_cancelled() {
            let _ = h
                .rpc_anywhere(peer, Request::Infer(InferRequest::Cancel { job: id }))
                .await;
            anyhow::bail!("cancelled");
        }
        let poll = Request::Infer(InferRequest::Poll { job: id, from });
        match h.rpc_anywhere(peer, poll).await {
            Ok(Response::Infer(InferResponse::Events { events, next, done })) => {
                failures = 0;
                let got = !events.is_empty();
                for e in &events {
                    on_event(e);
                }
                from = next;
                if done {
                    return Ok(());
                }
                if !got {
                    tokio::select! {
                        () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                        () = cancel.cancelled() => {}
                    }
                }
            }
            Ok(Response::Infer(InferResponse::Refused(why))) => {
                anyhow::bail!("{peer} refused the poll: {why}")
            }
            Ok(other) => anyhow::bail!("{peer} answered a poll with {other:?}"),
            Err(e) => {
                // A lost answer is polled again from the same offset.
                failures += 1;
                if failures >= 5 {
                    return Err(e).context(format!("polling job {id} on {peer}"));
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
}
