//! The collaborative-training service: DeDLOC's step on top of the DHT, matchmaking and the
//! all-reduce (see ARCHITECTURE.md, "Collaborative training").
//!
//! Per peer: accumulate micro-batches and publish progress (`run_progress(run)`, owned subkey,
//! 60 s TTL); when the swarm's samples reach the target batch, the first peer to see it
//! proposes a start time, everyone at that epoch joins matchmaking for it, the group averages
//! the local mean gradients weighted by samples, and every member takes the same optimizer
//! step. A peer behind the swarm downloads the state (parameters + optimizer state) in chunks
//! from several peers at once.
//!
//! Consistency rules (what keeps every peer on the same parameters):
//! - a shard whose aggregator failed is applied as a zero gradient (the verdict is shared by
//!   every member, so every member zeroes the same shards);
//! - a peer whose round failed, or that was left out of the group while others exist, does not
//!   step: it is behind afterwards and downloads the state (its samples are lost, nothing is
//!   applied twice);
//! - a peer alone at its epoch steps on its own gradient.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use colony_protocol::names::MAX_VALUE_BYTES;
use colony_protocol::train::{MAX_STATE_CHUNK, StateRequest, StateResponse, TrainProgress};
use colony_protocol::{DhtKey, Request, Response};
use colony_trainer::allreduce::balance::PeerMode;
use colony_trainer::collab::{
    Decision, GlobalView, PeerProgress, TrainState, Trainer, decide, majority_digest,
};
use libp2p::PeerId;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::allreduce::{DriveConfig, run_round_measured};
use crate::bandwidth::{self, Direction, Monitor};
use crate::clock::now_ms;
use crate::handle::NodeHandle;
use crate::matchmaking::{MatchConfig, Matchmaker, Offer};
use crate::swarm::actor::StateHandler;

/// How a peer takes part in a run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub run: String,
    /// Samples the swarm accumulates per global step.
    pub target_batch: u64,
    /// How long after the target is reached matchmaking reads the declarations.
    pub window: Duration,
    /// Progress is re-read (and re-published) at least this often.
    pub refresh: Duration,
    /// A peer that sees nobody else steps alone only after looking this long.
    pub discovery: Duration,
    /// Stop once the local global step reaches this.
    pub max_steps: Option<u64>,
    /// Accepts no inbound connections (takes no shard, serves no state).
    pub client: bool,
    /// Write a checkpoint here after every `checkpoint_every` steps (atomic), and resume from
    /// it at start.
    pub checkpoint: Option<PathBuf>,
    pub checkpoint_every: u64,
    /// Largest state snapshot accepted from peers.
    pub max_state_bytes: usize,
    /// Bandwidth (bytes/s each way) declared for the all-reduce's shard sizes until this
    /// peer has measured its own (a probe once others are seen, then every round's transfers:
    /// `bandwidth::Monitor`).
    pub bandwidth: f64,
    /// The volunteer's upload and download caps (bytes/s): the measured figures never exceed
    /// them.
    pub bandwidth_cap: (Option<f64>, Option<f64>),
    /// How long each way the first bandwidth probe runs (None: no probe, rounds only).
    pub probe: Option<Duration>,
    pub matching: MatchConfig,
    pub drive: DriveConfig,
    /// Delayed parameter updates: once the group is formed, the all-reduce and the optimizer
    /// step run while this peer computes the next step's micro-batches on the parameters
    /// before the step (one step stale at most).
    pub delayed: bool,
}

impl TrainConfig {
    pub fn new(run: &str, target_batch: u64) -> Self {
        Self {
            run: run.to_string(),
            target_batch,
            window: Duration::from_millis(1500),
            refresh: Duration::from_millis(500),
            discovery: Duration::from_secs(5),
            max_steps: None,
            client: false,
            checkpoint: None,
            checkpoint_every: 1,
            max_state_bytes: 4 << 30,
            bandwidth: 12.5e6,
            bandwidth_cap: (None, None),
            probe: Some(Duration::from_secs(1)),
            matching: MatchConfig {
                // A member that missed its leader learns it within a step, not after 8 s.
                commit_wait: Duration::from_secs(3),
                ..MatchConfig::default()
            },
            drive: DriveConfig::default(),
            delayed: false,
        }
    }
}

/// Where the data comes from: micro-batch `index` of global step `epoch` for this peer.
pub type BatchSource<Batch> = Arc<dyn Fn(u64, u64) -> Batch + Send + Sync>;

/// What happened at one global step, as this peer saw it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum StepEvent {
    /// Averaged with `peers` members (this one included) over `samples` samples.
    Averaged {
        epoch: u64,
        peers: usize,
        samples: f64,
        /// Micro-batches this peer contributed (indices 0.. of its stream for this epoch).
        micro_batches: u64,
        /// Samples this peer contributed.
        own_samples: u64,
        lr: f32,
        /// Shards applied as zero because their aggregator failed.
        zeroed_shards: usize,
        #[serde(with = "nan_as_null")]
        loss: f32,
        seconds: f64,
        /// Micro-batches of the next step computed while this step's all-reduce ran (delayed
        /// parameter updates; 0 otherwise).
        overlapped: u64,
    },
    /// Stepped alone (no other peer at this epoch).
    Alone {
        epoch: u64,
        lr: f32,
        #[serde(with = "nan_as_null")]
        loss: f32,
        micro_batches: u64,
    },
    /// Downloaded the state of `epoch` from `donors` peers.
    Downloaded {
        epoch: u64,
        donors: usize,
        bytes: usize,
    },
    /// Did not step (round failed or left out); will catch up by download.
    Skipped { epoch: u64, why: String },
}

/// Progress records older than this do not vote on the majority's state.
const RECONCILE_FRESH_MS: u64 = 10_000;

/// A peer whose probe measured nothing probes again no sooner than this.
const PROBE_AGAIN_AFTER: Duration = Duration::from_secs(60);

/// Outcome of a training session (`colony train --summary` writes it as JSON).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct TrainSummary {
    pub events: Vec<StepEvent>,
    pub final_epoch: u64,
    pub samples: u64,
    pub micro_batches: u64,
    /// When training began (after the checkpoint was read) and ended, unix ms.
    pub started_ms: u64,
    pub finished_ms: u64,
}

/// A loss is NaN where a peer computed no micro-batch; JSON has no NaN, so it is written as
/// null (and read back as NaN).
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f32, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f32(*x)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NAN))
    }
}

/// Snapshots this peer serves (the current one and the one before, so a download that
/// started just before a step can finish).
#[derive(Default)]
struct Served {
    current: Option<ServedState>,
    previous: Option<ServedState>,
}

#[derive(Clone)]
struct ServedState {
    epoch: u64,
    digest: [u8; 32],
    bytes: Arc<Vec<u8>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn serve(served: &Arc<Mutex<Served>>, req: StateRequest) -> StateResponse {
    let s = lock(served);
    match req {
        StateRequest::Describe { .. } => match &s.current {
            Some(c) => StateResponse::Described {
                epoch: c.epoch,
                size: c.bytes.len() as u64,
                digest: c.digest,
            },
            None => StateResponse::Unavailable("no state yet".into()),
        },
        StateRequest::Chunk {
            digest,
            offset,
            len,
            ..
        } => {
            let Some(st) = [&s.current, &s.previous]
                .into_iter()
                .flatten()
                .find(|c| c.digest == digest)
            else {
                return StateResponse::Unavailable("that snapshot is no longer served".into());
            };
            if len > MAX_STATE_CHUNK {
                return StateResponse::Unavailable(format!(
                    "chunks are at most {MAX_STATE_CHUNK} bytes"
                ));
            }
            let size = st.bytes.len() as u64;
            if offset >= size {
                return StateResponse::Unavailable(format!("offset {offset} beyond {size} bytes"));
            }
            let end = (offset + u64::from(len)).min(size);
            StateResponse::Chunk {
                bytes: st.bytes[offset as usize..end as usize].to_vec(),
            }
        }
    }
}

/// Runs the collaborative optimizer for `trainer` until `max_steps` or `stop`.
pub async fn train<Batch: Send + 'static>(
    h: &NodeHandle,
    mut trainer: Box<dyn Trainer<Batch = Batch>>,
    batches: BatchSource<Batch>,
    cfg: &TrainConfig,
    stop: CancellationToken,
) -> anyhow::Result<(Box<dyn Trainer<Batch = Batch>>, TrainSummary)> {
    let run = cfg.run.as_str();
    let key = DhtKey::run_progress(run)?;
    let fingerprint = trainer.fingerprint();
    let me = h.peer_id();

    if let Some(path) = &cfg.checkpoint {
        match load_checkpoint(path, cfg.max_state_bytes) {
            Ok(Some(state)) => {
                let epoch = state.epoch();
                trainer.restore(state).with_context(|| {
                    format!("checkpoint {} does not fit the model", path.display())
                })?;
                tracing::info!(run, epoch, path = %path.display(), "resumed from checkpoint");
            }
            Ok(None) => {}
            // A corrupt checkpoint is not fatal: the swarm has the state.
            Err(e) => tracing::warn!(run, path = %path.display(), "ignoring checkpoint: {e:#}"),
        }
    }

    let served_owned = Arc::new(Mutex::new(Served::default()));
    let served = &served_owned;
    if !cfg.client {
        let s = served.clone();
        h.register_state_handler(
            run.to_string(),
            StateHandler(Arc::new(move |_peer, req| serve(&s, req))),
        )
        .await?;
        publish_state(served, trainer.as_ref());
    }
    let mm_owned = Matchmaker::new(h.clone(), run).await?;
    let mm = &mm_owned;
    h.telemetry()
        .run_started(run, cfg.target_batch, cfg.client, trainer.epoch());

    // This peer's bandwidth: probed in the background once others are seen (and again when
    // a round runs far slower than planned), kept up by every round's transfers.
    let bw = Arc::new(Mutex::new(Monitor::new(
        cfg.bandwidth_cap.0,
        cfg.bandwidth_cap.1,
    )));
    let mut probing: Option<(Instant, tokio::task::JoinHandle<()>)> = None;

    let mut summary_owned = TrainSummary {
        started_ms: now_ms(),
        ..TrainSummary::default()
    };
    let summary = &mut summary_owned;
    let mut sps = 0.0f64;
    let mut loss_sum = 0.0f64;
    let mut loss_n = 0u64;
    let mut micro = 0u64;
    let mut ready_at: Option<u64> = None;
    // Attempts that failed at an epoch: matchmaking is not retried for that epoch until the
    // swarm moves on or a fresh start time is proposed.
    let mut failed_start: Option<(u64, u64)> = None;
    let started = Instant::now();
    // Duration of the last micro-batch (ms): how close to the start one more fits.
    let mut micro_ms = 0u64;
    // The next micro-batch, made while the current one computes (data is ready when the
    // compute is; SwAV's crops take a while).
    let mut prefetched: Option<((u64, u64), tokio::task::JoinHandle<Batch>)> = None;

    // Progress goes to and comes from the DHT in the background: the loop never waits on it.
    let tracker_stop = stop.child_token();
    let (local_tx, local_rx) = tokio::sync::watch::channel::<Option<TrainProgress>>(None);
    let (records_tx, records_rx) = tokio::sync::watch::channel::<Vec<PeerProgress>>(Vec::new());
    let urgent = Arc::new(tokio::sync::Notify::new());
    let tracker = tokio::spawn(track_progress(
        h.clone(),
        key.clone(),
        fingerprint,
        local_rx,
        records_tx,
        urgent.clone(),
        cfg.refresh,
        tracker_stop.clone(),
    ));

    let probe_stop = tracker_stop.clone();
    let result: anyhow::Result<Box<dyn Trainer<Batch = Batch>>> = async move {
        loop {
            if stop.is_cancelled() || cfg.max_steps.is_some_and(|m| trainer.epoch() >= m) {
                return Ok(trainer);
            }
            let epoch = trainer.epoch();
            // The digest of this peer's state at this epoch (published with its progress).
            let my_digest = lock(served)
                .current
                .as_ref()
                .filter(|c| c.epoch == epoch)
                .map(|c| c.digest);
            let progress =
                |samples: u64, sps: f64, ready_at: Option<u64>, loss: Option<f32>| TrainProgress {
                    fingerprint,
                    epoch,
                    samples,
                    samples_per_sec: sps,
                    time_ms: now_ms(),
                    client: cfg.client,
                    ready_at_ms: ready_at,
                    serves_state: !cfg.client,
                    loss,
                    state_digest: my_digest,
                };
            let mean_loss = (loss_n > 0).then(|| (loss_sum / loss_n as f64) as f32);
            local_tx.send_replace(Some(progress(trainer.samples(), sps, ready_at, mean_loss)));
            let records: Vec<PeerProgress> = records_rx.borrow().clone();
            // Islands of a healed partition (or a peer that stepped alone) hold different
            // states at one epoch: a peer off the majority's state downloads it.
            if let Some(mine) = my_digest {
                let mut voters: Vec<PeerProgress> = records
                    .iter()
                    .filter(|r| r.peer != me.to_bytes())
                    .cloned()
                    .collect();
                voters.push(PeerProgress {
                    peer: me.to_bytes(),
                    epoch,
                    samples: 0,
                    samples_per_sec: 0.0,
                    time_ms: now_ms(),
                    client: cfg.client,
                    ready_at_ms: None,
                    digest: Some(mine),
                });
                let fresh = now_ms().saturating_sub(RECONCILE_FRESH_MS);
                if let Some(want) = majority_digest(&voters, epoch, fresh)
                    && want != mine
                {
                    match download_state(h, run, &records, epoch, Some(want), cfg.max_state_bytes)
                        .await
                    {
                        Ok((state, donors, bytes)) => {
                            trainer.restore(state)?;
                            tracing::warn!(
                                run,
                                epoch,
                                donors,
                                "this peer's state differed from the majority's at this step \
                                 (a healed partition?); took the majority's"
                            );
                            h.telemetry().error("train_state_reconciled");
                            note(
                                h,
                                run,
                                summary,
                                sps,
                                StepEvent::Downloaded {
                                    epoch,
                                    donors,
                                    bytes,
                                },
                            );
                            publish_state(served, trainer.as_ref());
                            ready_at = None;
                            trainer.reset_accumulator();
                            micro = 0;
                            loss_sum = 0.0;
                            loss_n = 0;
                            continue;
                        }
                        Err(e) => tracing::debug!(run, epoch, "cannot reconcile yet: {e:#}"),
                    }
                }
            }
            if let Some(each) = cfg.probe {
                let idle = probing
                    .as_ref()
                    .is_none_or(|(at, t)| t.is_finished() && at.elapsed() > PROBE_AGAIN_AFTER);
                let others: Vec<libp2p::PeerId> = records
                    .iter()
                    .filter(|r| r.peer != me.to_bytes() && !r.client)
                    .filter_map(|r| libp2p::PeerId::from_bytes(&r.peer).ok())
                    .collect();
                if idle && !others.is_empty() && lock(&bw).needs_probe(tokio::time::Instant::now())
                {
                    let (h, bw, quit) = (h.clone(), bw.clone(), probe_stop.clone());
                    let task = tokio::spawn(async move {
                        let chunk = 64 * 1024;
                        let measure = async {
                            let up =
                                bandwidth::probe(&h, &others, Direction::Up, each, chunk).await;
                            let down =
                                bandwidth::probe(&h, &others, Direction::Down, each, chunk).await;
                            (up, down)
                        };
                        tokio::select! {
                            () = quit.cancelled() => {}
                            (up, down) = measure => {
                                tracing::info!(up, down, "probed this peer's bandwidth (bytes/s)");
                                let mut m = lock(&bw);
                                m.after_probe(up, down, tokio::time::Instant::now());
                                h.telemetry().set_bandwidth(m.view());
                            }
                        }
                    });
                    probing = Some((Instant::now(), task));
                }
            }
            let mut decision = {
                let now = now_ms();
                let stale = (cfg.window + cfg.matching.commit_wait).as_millis() as u64;
                let mut view_records = records.clone();
                for r in &mut view_records {
                    if r.ready_at_ms.is_some_and(|t| t + stale < now)
                        || failed_start
                            .is_some_and(|(e, t)| e == r.epoch && r.ready_at_ms == Some(t))
                    {
                        r.ready_at_ms = None;
                    }
                }
                // Our own record may lag: count our samples as they are now.
                view_records.retain(|r| r.peer != me.to_bytes());
                view_records.push(PeerProgress {
                    peer: me.to_bytes(),
                    epoch,
                    samples: trainer.samples(),
                    samples_per_sec: sps,
                    time_ms: now,
                    client: cfg.client,
                    ready_at_ms: ready_at,
                    digest: my_digest,
                });
                let view = GlobalView::of(&view_records, now);
                h.telemetry().run_progress(
                    run,
                    epoch,
                    view.as_ref().map(|v| crate::telemetry::SwarmProgress {
                        epoch: v.epoch,
                        samples: v.samples,
                        estimated: v.estimated,
                        samples_per_sec: v.samples_per_sec,
                        peers: v.peers,
                        members: view_records
                            .iter()
                            .map(|r| crate::telemetry::RunPeer {
                                peer: libp2p::PeerId::from_bytes(&r.peer)
                                    .map_or_else(|_| hex::encode(&r.peer), |p| p.to_string()),
                                epoch: r.epoch,
                                samples: r.samples,
                                samples_per_sec: r.samples_per_sec,
                                client: r.client,
                                age_ms: now.saturating_sub(r.time_ms),
                            })
                            .collect(),
                    }),
                );
                decide(
                    epoch,
                    view.as_ref(),
                    cfg.target_batch,
                    now,
                    cfg.window.as_millis() as u64,
                    2 * cfg.refresh.as_millis() as u64,
                    micro_ms,
                )
            };

            // Our own proposal goes out first, so the others can join in time.
            if let Decision::Average {
                start_ms,
                propose: true,
            } = decision
                && ready_at != Some(start_ms)
            {
                let others_here = records
                    .iter()
                    .filter(|r| r.peer != me.to_bytes() && r.epoch == epoch)
                    .count();
                if others_here == 0 && started.elapsed() < cfg.discovery {
                    // Seeing nobody may only mean the DHT has not shown them yet: do not
                    // start a run of our own before looking for a while.
                    decision = Decision::Accumulate;
                } else {
                    ready_at = Some(start_ms);
                    local_tx.send_replace(Some(progress(
                        trainer.samples(),
                        sps,
                        ready_at,
                        mean_loss,
                    )));
                    urgent.notify_one();
                }
            }
            // Joining another peer's proposal: say so, so that the peers reading the
            // declarations at the start wait a little for ours if it comes late.
            if let Decision::Average {
                start_ms,
                propose: false,
            } = decision
                && ready_at != Some(start_ms)
            {
                ready_at = Some(start_ms);
                local_tx.send_replace(Some(progress(trainer.samples(), sps, ready_at, mean_loss)));
                urgent.notify_one();
            }
            // Keep computing until the start is a micro-batch (plus the declaration's lead)
            // away: matchmaking overlaps the last micro-batches.
            let compute = match decision {
                Decision::Accumulate => true,
                Decision::Average { start_ms, .. } => {
                    now_ms() + micro_ms + cfg.refresh.as_millis() as u64 / 2 < start_ms
                }
                Decision::Behind { .. } => false,
            };
            if compute {
                let t0 = Instant::now();
                let before = trainer.samples();
                // The batch made ahead while the last micro-batch computed, if it is this one.
                let batch = match prefetched.take() {
                    Some((key, job)) if key == (epoch, micro) => {
                        job.await.map_err(|e| anyhow!("batch task panicked: {e}"))?
                    }
                    _ => (batches)(epoch, micro),
                };
                let t_batch = t0.elapsed();
                let source = batches.clone();
                prefetched = Some((
                    (epoch, micro + 1),
                    tokio::task::spawn_blocking(move || (source)(epoch, micro + 1)),
                ));
                let (t, r) = tokio::task::spawn_blocking(move || {
                    let t1 = Instant::now();
                    let r = trainer.accumulate(&batch);
                    tracing::debug!(compute_ms = t1.elapsed().as_millis() as u64, "micro-batch");
                    (trainer, r)
                })
                .await
                .map_err(|e| anyhow!("training task panicked: {e}"))?;
                trainer = t;
                tracing::debug!(
                    batch_ms = t_batch.as_millis() as u64,
                    total_ms = t0.elapsed().as_millis() as u64,
                    "micro-batch done"
                );
                micro_ms = t0.elapsed().as_millis() as u64;
                micro += 1;
                summary.micro_batches += 1;
                summary.samples += trainer.samples().saturating_sub(before);
                match r {
                    Ok(loss) => {
                        loss_sum += f64::from(loss);
                        loss_n += 1;
                        let n = trainer.samples().saturating_sub(before) as f64;
                        let inst = n / t0.elapsed().as_secs_f64().max(1e-6);
                        sps = if sps == 0.0 {
                            inst
                        } else {
                            0.9 * sps + 0.1 * inst
                        };
                    }
                    Err(e) => tracing::warn!(run, epoch, "micro-batch skipped: {e}"),
                }
                continue;
            }
            match decision {
                Decision::Accumulate => {}
                Decision::Behind { epoch: target } => {
                    match download_state(h, run, &records, target, None, cfg.max_state_bytes).await
                    {
                        Ok((state, donors, bytes)) => {
                            let got = state.epoch();
                            trainer.restore(state)?;
                            tracing::info!(
                                run,
                                from = epoch,
                                to = got,
                                donors,
                                bytes,
                                "caught up by state download"
                            );
                            note(
                                h,
                                run,
                                summary,
                                sps,
                                StepEvent::Downloaded {
                                    epoch: got,
                                    donors,
                                    bytes,
                                },
                            );
                            publish_state(served, trainer.as_ref());
                            ready_at = None;
                            micro = 0;
                            loss_sum = 0.0;
                            loss_n = 0;
                            urgent.notify_one();
                        }
                        Err(e) => {
                            tracing::warn!(run, epoch, target, "state download failed: {e:#}");
                            tokio::time::sleep(cfg.refresh).await;
                        }
                    }
                }
                Decision::Average { start_ms, .. } => {
                    let others_here = records
                        .iter()
                        .filter(|r| r.peer != me.to_bytes() && r.epoch == epoch)
                        .count();
                    let t0 = Instant::now();
                    let wait = Duration::from_millis(start_ms.saturating_sub(now_ms()));
                    let deadline = tokio::time::Instant::now() + wait;
                    let samples = trainer.samples();
                    let grad = trainer.mean_gradient();
                    let len = grad.len();
                    let (up, down) = {
                        let bw = lock(&bw);
                        (bw.up.get(), bw.down.get())
                    };
                    let offer = Offer {
                        mode: if cfg.client {
                            PeerMode::Client
                        } else {
                            PeerMode::Node
                        },
                        weight: samples as f64,
                        up: up.unwrap_or(cfg.bandwidth),
                        down: down.unwrap_or(cfg.bandwidth),
                    };
                    let loss = mean_loss.unwrap_or(f32::NAN);
                    let mut carry: Option<Carry> = None;
                    // Alone at this epoch (as far as the DHT shows): no matchmaking to wait for.
                    let group = if others_here == 0 && !cfg.client {
                        Ok(None)
                    } else {
                        // The peers accumulating for this epoch will join this start (the
                        // start is the earliest proposed, the same for all of them): their
                        // declarations are waited for a little if they come late.
                        let expected: Vec<PeerId> = records
                            .iter()
                            .filter(|r| r.epoch == epoch)
                            .filter_map(|r| PeerId::from_bytes(&r.peer).ok())
                            .collect();
                        mm.form_group_expecting(
                            epoch,
                            len,
                            offer,
                            deadline,
                            &cfg.matching,
                            &expected,
                        )
                        .await
                    };
                    let outcome: Result<StepEvent, String> = match group {
                        Ok(Some(group)) => {
                            let peers = group.members.len();
                            let total: f64 = group.spec.weights.iter().sum();
                            let shard_sizes = group.spec.shard_sizes.clone();
                            let round = run_round_measured(h, &group, grad, cfg.drive);
                            let report = if cfg.delayed {
                                // The next step's micro-batches, computed while the round runs.
                                trainer.reset_accumulator();
                                tokio::pin!(round);
                                let mut next = Carry::default();
                                loop {
                                    local_tx.send_replace(Some(TrainProgress {
                                        epoch: epoch + 1,
                                        samples: trainer.samples(),
                                        ready_at_ms: None,
                                        loss: None,
                                        // No state at epoch + 1 yet.
                                        state_digest: None,
                                        ..progress(0, sps, None, None)
                                    }));
                                    let source = batches.clone();
                                    let index = next.micro;
                                    let mut job = tokio::task::spawn_blocking(move || {
                                        let before = trainer.samples();
                                        let t0 = Instant::now();
                                        let r = trainer.accumulate(&(source)(epoch + 1, index));
                                        let n = trainer.samples() - before;
                                        (trainer, r, n, t0.elapsed())
                                    });
                                    let (done, joined) = tokio::select! {
                                        rep = &mut round => (Some(rep), (&mut job).await),
                                        j = &mut job => (None, j),
                                    };
                                    let (t, r, n, took) = joined
                                        .map_err(|e| anyhow!("training task panicked: {e}"))?;
                                    trainer = t;
                                    next.micro += 1;
                                    summary.micro_batches += 1;
                                    summary.samples += n;
                                    match r {
                                        Ok(l) => {
                                            next.loss_sum += f64::from(l);
                                            next.loss_n += 1;
                                            let inst = n as f64 / took.as_secs_f64().max(1e-6);
                                            sps = 0.9 * sps + 0.1 * inst;
                                        }
                                        Err(e) => {
                                            tracing::warn!(run, epoch, "micro-batch skipped: {e}")
                                        }
                                    }
                                    if let Some(rep) = done {
                                        carry = Some(next);
                                        break rep;
                                    }
                                }
                            } else {
                                round.await
                            };
                            let report = report.map(|(r, moved)| {
                                let mut m = lock(&bw);
                                m.observe_round(&moved);
                                h.telemetry().set_bandwidth(m.view());
                                r
                            });
                            let overlapped = carry.map_or(0, |c| c.micro);
                            match report {
                                Ok(report) => match report.result {
                                    Some(mut avg) => {
                                        let zeroed = report.failed_aggregators.len();
                                        zero_shards(
                                            &mut avg,
                                            &shard_sizes,
                                            &report.failed_aggregators,
                                        );
                                        let lr = if cfg.delayed {
                                            trainer.apply_keeping_accumulator(&avg)?
                                        } else {
                                            trainer.apply(&avg)?
                                        };
                                        Ok(StepEvent::Averaged {
                                            epoch,
                                            peers,
                                            samples: total,
                                            micro_batches: micro,
                                            own_samples: samples,
                                            lr,
                                            zeroed_shards: zeroed,
                                            loss,
                                            seconds: t0.elapsed().as_secs_f64(),
                                            overlapped,
                                        })
                                    }
                                    None => Err("the round gave no result".into()),
                                },
                                Err(e) => Err(format!("all-reduce failed: {e:#}")),
                            }
                        }
                        Ok(None) if others_here == 0 && !cfg.client => {
                            let lr = trainer.apply(&trainer.mean_gradient())?;
                            Ok(StepEvent::Alone {
                                epoch,
                                lr,
                                loss,
                                micro_batches: micro,
                            })
                        }
                        Ok(None) => Err("left out of the group".into()),
                        Err(e) => Err(format!("matchmaking failed: {e:#}")),
                    };
                    match outcome {
                        Ok(ev) => {
                            tracing::info!(run, ?ev, "global step");
                            note(h, run, summary, sps, ev);
                            ready_at = None;
                            failed_start = None;
                            // With delayed updates the next step has begun already.
                            let next = carry.unwrap_or_default();
                            loss_sum = next.loss_sum;
                            loss_n = next.loss_n;
                            micro = next.micro;
                            publish_state(served, trainer.as_ref());
                            if let Some(path) = &cfg.checkpoint
                                && trainer.epoch().is_multiple_of(cfg.checkpoint_every.max(1))
                            {
                                save_checkpoint(path, &trainer.state())?;
                            }
                        }
                        Err(why) => {
                            tracing::warn!(run, epoch, "no step: {why}");
                            note(h, run, summary, sps, StepEvent::Skipped { epoch, why });
                            failed_start = Some((epoch, start_ms));
                            ready_at = None;
                            // Give the swarm time to publish its next epoch before retrying.
                            tokio::time::sleep(cfg.refresh).await;
                        }
                    }
                    urgent.notify_one();
                }
            }
        }
    }
    .await;

    tracker_stop.cancel();
    let _ = tracker.await;
    h.telemetry().run_stopped(run);

    mm_owned.close().await;
    if !cfg.client {
        h.unregister_state_handler(run.to_string()).await;
    }
    let trainer = result?;
    if let Some(path) = &cfg.checkpoint {
        save_checkpoint(path, &trainer.state())?;
    }
    summary_owned.final_epoch = trainer.epoch();
    summary_owned.finished_ms = now_ms();
    Ok((trainer, summary_owned))
}

/// Keeps `ev` in the summary and in the node's telemetry (the API and the dashboard).
fn note(h: &NodeHandle, run: &str, summary: &mut TrainSummary, sps: f64, ev: StepEvent) {
    use crate::telemetry::StepPoint;
    let t_ms = now_ms();
    let base = |epoch, kind| StepPoint {
        t_ms,
        epoch,
        kind,
        loss: None,
        samples_per_sec: sps,
        peers: 1,
        samples: 0.0,
        seconds: 0.0,
        why: None,
    };
    let finite = |l: f32| l.is_finite().then_some(l);
    let point = match &ev {
        StepEvent::Averaged {
            epoch,
            peers,
            samples,
            loss,
            seconds,
            ..
        } => StepPoint {
            loss: finite(*loss),
            peers: *peers,
            samples: *samples,
            seconds: *seconds,
            ..base(*epoch, "averaged")
        },
        StepEvent::Alone { epoch, loss, .. } => StepPoint {
            loss: finite(*loss),
            ..base(*epoch, "alone")
        },
        StepEvent::Downloaded { epoch, donors, .. } => StepPoint {
            peers: *donors,
            ..base(*epoch, "downloaded")
        },
        StepEvent::Skipped { epoch, why } => {
            let kind = if why.starts_with("all-reduce failed") {
                "train_allreduce_failed"
            } else if why.starts_with("matchmaking failed") {
                "train_matchmaking_failed"
            } else if why.starts_with("left out") {
                "train_left_out_of_group"
            } else {
                "train_step_skipped"
            };
            h.telemetry().error(kind);
            StepPoint {
                why: Some(why.clone()),
                ..base(*epoch, "skipped")
            }
        }
    };
    h.telemetry().run_step(run, point);
    summary.events.push(ev);
}

/// Micro-batches of the next step computed during a delayed update.
#[derive(Debug, Clone, Copy, Default)]
struct Carry {
    micro: u64,
    loss_sum: f64,
    loss_n: u64,
}

/// Zeroes the shards of failed aggregators (every member zeroes the same ones).
fn zero_shards(v: &mut [f32], shard_sizes: &[usize], failed: &[usize]) {
    let mut start = 0;
    for (i, &n) in shard_sizes.iter().enumerate() {
        if failed.contains(&i) {
            v[start..start + n].iter_mut().for_each(|x| *x = 0.0);
        }
        start += n;
    }
}

fn publish_state<Batch>(served: &Arc<Mutex<Served>>, t: &dyn Trainer<Batch = Batch>) {
    let bytes = t.state().encode();
    let digest: [u8; 32] = Sha256::digest(&bytes).into();
    let mut s = lock(served);
    let fresh = ServedState {
        epoch: t.epoch(),
        digest,
        bytes: Arc::new(bytes),
    };
    if s.current.as_ref().is_some_and(|c| c.digest == digest) {
        return;
    }
    s.previous = s.current.replace(fresh);
}

/// Publishes the latest local progress and reads everyone's, every `refresh` or at once when
/// `urgent` is notified, until `stop`.
#[allow(clippy::too_many_arguments)]
async fn track_progress(
    h: NodeHandle,
    key: DhtKey,
    fingerprint: [u8; 32],
    mut local: tokio::sync::watch::Receiver<Option<TrainProgress>>,
    records: tokio::sync::watch::Sender<Vec<PeerProgress>>,
    urgent: Arc<tokio::sync::Notify>,
    refresh: Duration,
    stop: CancellationToken,
) {
    loop {
        let mine = local.borrow_and_update().clone();
        if let Some(p) = mine {
            put_progress(
                &h,
                &key,
                &TrainProgress {
                    time_ms: now_ms(),
                    ..p
                },
            )
            .await;
        }
        let rs = read_progress(&h, &key, &fingerprint).await;
        records.send_replace(rs);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(refresh) => {}
            () = urgent.notified() => {}
        }
    }
}

async fn put_progress(h: &NodeHandle, key: &DhtKey, p: &TrainProgress) {
    let value = match colony_protocol::encode(p, MAX_VALUE_BYTES) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("cannot encode progress: {e}");
            return;
        }
    };
    if let Err(e) = h
        .dht_put_owned(key.clone(), value, Duration::from_secs(60))
        .await
    {
        tracing::debug!("cannot publish progress: {e:#}");
    }
}

/// Progress records of peers training the same model (fingerprint), newest per peer.
pub async fn read_progress(
    h: &NodeHandle,
    key: &DhtKey,
    fingerprint: &[u8; 32],
) -> Vec<PeerProgress> {
    let got = match h.dht_get(key).await {
        Ok(g) => g,
        Err(e) => {
            tracing::debug!("cannot read progress: {e:#}");
            return Vec::new();
        }
    };
    crate::handle::owned_values::<TrainProgress>(&got.entries)
        .filter_map(|(peer, p)| {
            (p.fingerprint == *fingerprint
                && p.samples_per_sec.is_finite()
                && p.samples_per_sec >= 0.0)
                .then(|| PeerProgress {
                    peer: peer.to_bytes(),
                    epoch: p.epoch,
                    samples: p.samples,
                    samples_per_sec: p.samples_per_sec,
                    time_ms: p.time_ms,
                    client: p.client,
                    ready_at_ms: p.ready_at_ms,
                    digest: p.state_digest,
                })
        })
        .collect()
}

/// Downloads the newest state at `epoch` or later from several peers in parallel (with
/// `want`: the state with that digest at `epoch` exactly).
/// Returns the state, the number of donors that served chunks, and its size.
async fn download_state(
    h: &NodeHandle,
    run: &str,
    records: &[PeerProgress],
    epoch: u64,
    want: Option<[u8; 32]>,
    max_bytes: usize,
) -> anyhow::Result<(TrainState, usize, usize)> {
    let me = h.peer_id().to_bytes();
    let candidates: Vec<PeerId> = records
        .iter()
        .filter(|r| r.epoch >= epoch && !r.client && r.peer != me)
        .filter(|r| want.is_none_or(|w| r.epoch == epoch && r.digest == Some(w)))
        .filter_map(|r| PeerId::from_bytes(&r.peer).ok())
        .take(8)
        .collect();
    if candidates.is_empty() {
        bail!("no peer at epoch {epoch} serves its state");
    }
    let describe = Request::State(StateRequest::Describe {
        run: run.to_string(),
    });
    let answers = futures::future::join_all(candidates.iter().map(|&p| {
        let req = describe.clone();
        async move { (p, h.rpc_anywhere(p, req).await) }
    }))
    .await;
    // Group the donors by the snapshot they serve; take the newest epoch, then the most donors.
    let mut offers: HashMap<(u64, [u8; 32], u64), Vec<PeerId>> = HashMap::new();
    for (p, a) in answers {
        match a {
            Ok(Response::State(StateResponse::Described {
                epoch: e,
                size,
                digest,
            })) if e >= epoch && want.is_none_or(|w| w == digest) => {
                offers.entry((e, digest, size)).or_default().push(p);
            }
            Ok(other) => tracing::debug!(peer = %p, ?other, "no usable state offer"),
            Err(e) => tracing::debug!(peer = %p, "state describe failed: {e:#}"),
        }
    }
    let ((got_epoch, digest, size), donors) = offers
        .into_iter()
        .max_by_key(|((e, _, _), d)| (*e, d.len()))
        .context("no peer described a state at that epoch")?;
    if size as usize > max_bytes {
        bail!("the state is {size} bytes, over the {max_bytes}-byte limit");
    }
    let chunk =
        u64::from(MAX_STATE_CHUNK).min(size.div_ceil(2 * donors.len() as u64).max(64 * 1024));
    let n_chunks = size.div_ceil(chunk);
    let mut buf = vec![0u8; size as usize];
    let used = Mutex::new(std::collections::HashSet::new());
    // Each chunk starts at donor (i mod n) and moves to the next donor when one fails.
    let fetches = (0..n_chunks).map(|i| {
        let donors = &donors;
        let used = &used;
        async move {
            let offset = i * chunk;
            let len = chunk.min(size - offset) as u32;
            let mut last_err = String::new();
            for k in 0..donors.len() {
                let p = donors[(i as usize + k) % donors.len()];
                let req = Request::State(StateRequest::Chunk {
                    run: run.to_string(),
                    digest,
                    offset,
                    len,
                });
                match h.rpc_anywhere(p, req).await {
                    Ok(Response::State(StateResponse::Chunk { bytes }))
                        if bytes.len() == len as usize =>
                    {
                        lock(used).insert(p);
                        return Ok((offset, bytes));
                    }
                    Ok(other) => last_err = format!("{p}: {other:?}"),
                    Err(e) => last_err = format!("{p}: {e:#}"),
                }
            }
            Err(anyhow!(
                "chunk at {offset}: every donor failed (last: {last_err})"
            ))
        }
    });
    // Bounded parallelism: two chunks in flight per donor.
    use futures::StreamExt;
    let mut stream = futures::stream::iter(fetches).buffer_unordered(2 * donors.len());
    while let Some(r) = stream.next().await {
        let (offset, bytes) = r?;
        buf[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes);
    }
    drop(stream);
    let got: [u8; 32] = Sha256::digest(&buf).into();
    if got != digest {
        bail!("downloaded state does not match its digest");
    }
    let state = TrainState::decode(&buf, max_bytes)?;
    if state.epoch() != got_epoch {
        bail!(
            "donors described epoch {got_epoch} but the state is at {}",
            state.epoch()
        );
    }
    let n = lock(&used).len();
    Ok((state, n, buf.len()))
}

/// Writes a checkpoint atomically (temp file, fsync, rename).
pub fn save_checkpoint(path: &std::path::Path, s: &TrainState) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::storage::write_atomic(path, &s.encode(), 0o644)
}

/// Reads a checkpoint; `None` when there is none.
pub fn load_checkpoint(
    path: &std::path::Path,
    max_bytes: usize,
) -> anyhow::Result<Option<TrainState>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(TrainState::decode(&b, max_bytes).with_context(
            || format!("checkpoint {} is unreadable", path.display()),
        )?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_shards_become_zero() {
        let mut v = vec![1.0f32; 10];
        zero_shards(&mut v, &[3, 4, 3], &[1]);
        assert_eq!(v, [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn serving_checks_digest_offset_and_length() {
        let served = Arc::new(Mutex::new(Served::default()));
        let bytes: Vec<u8> = (0..100u8).collect();
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        lock(&served).current = Some(ServedState {
            epoch: 3,
            digest,
            bytes: Arc::new(bytes),
        });
        let chunk = |d, offset, len| {
            serve(
                &served,
                StateRequest::Chunk {
                    run: "r".into(),
                    digest: d,
                    offset,
                    len,
                },
            )
        };
        assert_eq!(
            chunk(digest, 90, 50),
            StateResponse::Chunk {
                bytes: (90..100u8).collect()
            }
        );
        assert!(matches!(
            chunk([0; 32], 0, 10),
            StateResponse::Unavailable(_)
        ));
        assert!(matches!(
            chunk(digest, 100, 10),
            StateResponse::Unavailable(_)
        ));
        assert!(matches!(
            chunk(digest, 0, MAX_STATE_CHUNK + 1),
            StateResponse::Unavailable(_)
        ));
        assert!(matches!(
            serve(&served, StateRequest::Describe { run: "r".into() }),
            StateResponse::Described {
                epoch: 3,
                size: 100,
                ..
            }
        ));
    }
}
