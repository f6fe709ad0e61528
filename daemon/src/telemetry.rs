//! What the node has been doing, kept for the HTTP API, `/metrics` and the dashboard: bytes by
//! protocol, the training runs this node takes part in (step by step: loss, samples/s, peers,
//! progress towards the target batch), the all-reduce rounds it drove (time against the
//! leader's prediction, members, bytes), and errors by kind.
//!
//! Everything is bounded: the last [`MAX_POINTS`] steps per run, the last [`MAX_ROUNDS`]
//! rounds, at most [`MAX_RUNS`] runs and [`MAX_ERROR_KINDS`] error kinds. One mutex guards
//! the records; the byte counters are atomics (the codecs add to them on every message).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::clock::now_ms;

pub const MAX_POINTS: usize = 2000;
pub const MAX_ROUNDS: usize = 200;
pub const MAX_RUNS: usize = 16;
pub const MAX_ERROR_KINDS: usize = 64;

/// Payload bytes one protocol moved, each way.
#[derive(Debug, Default)]
pub struct Counters {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
}

impl Counters {
    pub fn received(&self, bytes: usize) {
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
        self.messages_in.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sent(&self, bytes: usize) {
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
        self.messages_out.fetch_add(1, Ordering::Relaxed);
    }

    fn view(&self, protocol: &'static str) -> TrafficView {
        TrafficView {
            protocol,
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            messages_in: self.messages_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
        }
    }
}

/// Bytes by protocol: peer RPC (DHT records, matchmaking, state downloads, inference and
/// routing jobs), all-reduce parts, and gossip (data of the messages published and
/// delivered). Kademlia's routing queries, identify and ping are not counted.
#[derive(Debug, Default)]
pub struct Traffic {
    pub rpc: Arc<Counters>,
    pub allreduce: Arc<Counters>,
    pub gossip: Arc<Counters>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TrafficView {
    pub protocol: &'static str,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub messages_in: u64,
    pub messages_out: u64,
}

impl Traffic {
    pub fn view(&self) -> Vec<TrafficView> {
        vec![
            self.rpc.view("rpc"),
            self.allreduce.view("allreduce"),
            self.gossip.view("gossip"),
        ]
    }
}

/// This node's bandwidth estimates and the rates seen with each peer in all-reduce rounds
/// (bytes/s; None: not measured yet).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct BandwidthView {
    pub up_bps: Option<f64>,
    pub down_bps: Option<f64>,
    pub peers: BTreeMap<String, PeerBandwidth>,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PeerBandwidth {
    /// What the peer acknowledged from this node.
    pub to_bps: Option<f64>,
    /// What it delivered to this node.
    pub from_bps: Option<f64>,
    pub rounds: u64,
}

/// One global step of a run as this node saw it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct StepPoint {
    pub t_ms: u64,
    pub epoch: u64,
    /// `averaged`, `alone`, `downloaded` or `skipped`.
    pub kind: &'static str,
    /// Mean loss of this node's micro-batches of the step (None: it computed none).
    pub loss: Option<f32>,
    /// This node's throughput at the step, samples/s.
    pub samples_per_sec: f64,
    /// Members of the averaging group (this node included).
    pub peers: usize,
    /// Samples the group averaged over.
    pub samples: f64,
    /// Seconds from the end of the previous step.
    pub seconds: f64,
    /// Why a step was skipped.
    pub why: Option<String>,
}

/// The swarm's progress at the current epoch (read from the DHT records).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct SwarmProgress {
    pub epoch: u64,
    pub samples: u64,
    /// Samples expected by now (reported + elapsed × rate).
    pub estimated: f64,
    pub samples_per_sec: f64,
    pub peers: usize,
    /// Every peer's last progress record (this node's as it is now).
    pub members: Vec<RunPeer>,
}

/// One peer of a run, from its progress record.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct RunPeer {
    pub peer: String,
    pub epoch: u64,
    pub samples: u64,
    pub samples_per_sec: f64,
    /// A client: computes, but accepts no connections (takes no shard).
    pub client: bool,
    pub age_ms: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RunView {
    pub run: String,
    pub target_batch: u64,
    pub client: bool,
    /// This node's global step.
    pub epoch: u64,
    pub swarm: Option<SwarmProgress>,
    pub started_ms: u64,
    pub updated_ms: u64,
    /// Whether this node is still in the run.
    pub active: bool,
    pub history: Vec<StepPoint>,
}

/// One all-reduce round this node took part in.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RoundView {
    pub round: String,
    pub t_ms: u64,
    pub ok: bool,
    pub error: Option<String>,
    /// How long the round took here.
    pub seconds: f64,
    /// The leader's prediction from the declared bandwidths (the partition's optimum; 0 if
    /// none): the round's lower bound at those bandwidths.
    pub bound_s: f64,
    pub members: Vec<String>,
    pub values: usize,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

#[derive(Default)]
struct State {
    runs: BTreeMap<String, RunState>,
    rounds: VecDeque<RoundView>,
    errors: BTreeMap<String, u64>,
    indexes: std::collections::BTreeSet<String>,
    bandwidth: BandwidthView,
}

struct RunState {
    view: RunView,
    history: VecDeque<StepPoint>,
}

/// The node's records; one per node, shared through its [`crate::NodeHandle`].
#[derive(Default)]
pub struct Telemetry {
    pub traffic: Traffic,
    state: Mutex<State>,
    /// A patch service started after the node (the demo's), shown by the dashboard.
    attached_patch: Mutex<Option<crate::patch_service::PatchService>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This node joins `run` (again): its record is reset to `epoch`, history kept.
    pub fn run_started(&self, run: &str, target_batch: u64, client: bool, epoch: u64) {
        let mut s = self.lock();
        let now = now_ms();
        if !s.runs.contains_key(run) && s.runs.len() >= MAX_RUNS {
            // Forget the run updated longest ago that is no longer active (or the oldest).
            let victim = s
                .runs
                .iter()
                .min_by_key(|(_, r)| (r.view.active, r.view.updated_ms))
                .map(|(k, _)| k.clone());
            if let Some(v) = victim {
                s.runs.remove(&v);
            }
        }
        let r = s.runs.entry(run.to_string()).or_insert_with(|| RunState {
            view: RunView {
                run: run.to_string(),
                target_batch,
                client,
                epoch,
                swarm: None,
                started_ms: now,
                updated_ms: now,
                active: true,
                history: Vec::new(),
            },
            history: VecDeque::new(),
        });
        r.view.target_batch = target_batch;
        r.view.client = client;
        r.view.epoch = epoch;
        r.view.active = true;
        r.view.updated_ms = now;
    }

    /// The swarm's progress as this node reads it.
    pub fn run_progress(&self, run: &str, epoch: u64, swarm: Option<SwarmProgress>) {
        if let Some(r) = self.lock().runs.get_mut(run) {
            r.view.epoch = epoch;
            r.view.swarm = swarm;
            r.view.updated_ms = now_ms();
        }
    }

    pub fn run_step(&self, run: &str, point: StepPoint) {
        if let Some(r) = self.lock().runs.get_mut(run) {
            // After a step the node is at the next epoch; after a download, at the one it got.
            match point.kind {
                "averaged" | "alone" => r.view.epoch = r.view.epoch.max(point.epoch + 1),
                "downloaded" => r.view.epoch = r.view.epoch.max(point.epoch),
                _ => {}
            }
            r.view.updated_ms = point.t_ms;
            if r.history.len() >= MAX_POINTS {
                r.history.pop_front();
            }
            r.history.push_back(point);
        }
    }

    pub fn run_stopped(&self, run: &str) {
        if let Some(r) = self.lock().runs.get_mut(run) {
            r.view.active = false;
            r.view.updated_ms = now_ms();
        }
    }

    pub fn round(&self, round: RoundView) {
        let mut s = self.lock();
        if s.rounds.len() >= MAX_ROUNDS {
            s.rounds.pop_front();
        }
        s.rounds.push_back(round);
    }

    pub fn set_bandwidth(&self, b: BandwidthView) {
        self.lock().bandwidth = b;
    }

    pub fn bandwidth(&self) -> BandwidthView {
        self.lock().bandwidth.clone()
    }

    /// Shows `svc` on the dashboard of a node that was started without it.
    pub fn attach_patch_service(&self, svc: crate::patch_service::PatchService) {
        *self
            .attached_patch
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(svc);
    }

    pub fn attached_patch_service(&self) -> Option<crate::patch_service::PatchService> {
        self.attached_patch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Notes an index this node queried or serves (the dashboard shows its shard map).
    pub fn index_used(&self, index: &str) {
        let mut s = self.lock();
        if s.indexes.len() < MAX_RUNS || s.indexes.contains(index) {
            s.indexes.insert(index.to_string());
        }
    }

    pub fn indexes(&self) -> Vec<String> {
        self.lock().indexes.iter().cloned().collect()
    }

    /// Counts one error of `kind` (a short snake_case name).
    pub fn error(&self, kind: &str) {
        let mut s = self.lock();
        if let Some(n) = s.errors.get_mut(kind) {
            *n += 1;
        } else if s.errors.len() < MAX_ERROR_KINDS {
            s.errors.insert(kind.to_string(), 1);
        } else {
            *s.errors.entry("other".into()).or_default() += 1;
        }
    }

    /// The runs, each with its last `points` steps (all with `None`).
    pub fn runs(&self, points: Option<usize>) -> Vec<RunView> {
        let s = self.lock();
        s.runs
            .values()
            .map(|r| {
                let skip = points.map_or(0, |p| r.history.len().saturating_sub(p));
                RunView {
                    history: r.history.iter().skip(skip).cloned().collect(),
                    ..r.view.clone()
                }
            })
            .collect()
    }

    pub fn run(&self, run: &str) -> Option<RunView> {
        let s = self.lock();
        s.runs.get(run).map(|r| RunView {
            history: r.history.iter().cloned().collect(),
            ..r.view.clone()
        })
    }

    /// The last `n` rounds, oldest first.
    pub fn rounds(&self, n: usize) -> Vec<RoundView> {
        let s = self.lock();
        s.rounds
            .iter()
            .skip(s.rounds.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.lock().errors.clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn point(epoch: u64) -> StepPoint {
        StepPoint {
            t_ms: epoch,
            epoch,
            kind: "averaged",
            loss: Some(1.0),
            samples_per_sec: 10.0,
            peers: 2,
            samples: 64.0,
            seconds: 1.0,
            why: None,
        }
    }

    #[test]
    fn history_rounds_and_error_kinds_are_bounded() {
        let t = Telemetry::default();
        t.run_started("r", 64, false, 0);
        for e in 0..(MAX_POINTS as u64 + 10) {
            t.run_step("r", point(e));
        }
        let r = t.run("r").unwrap();
        assert_eq!(r.history.len(), MAX_POINTS);
        assert_eq!(r.history[0].epoch, 10);
        assert_eq!(r.epoch, MAX_POINTS as u64 + 10);
        assert_eq!(t.runs(Some(5))[0].history.len(), 5);
        for i in 0..MAX_ROUNDS + 3 {
            t.round(RoundView {
                round: i.to_string(),
                t_ms: 0,
                ok: true,
                error: None,
                seconds: 1.0,
                bound_s: 0.5,
                members: vec![],
                values: 0,
                bytes_sent: 0,
                bytes_received: 0,
            });
        }
        assert_eq!(t.rounds(usize::MAX).len(), MAX_ROUNDS);
        assert_eq!(t.rounds(2)[1].round, (MAX_ROUNDS + 2).to_string());
        for i in 0..MAX_ERROR_KINDS + 5 {
            t.error(&format!("k{i}"));
        }
        let e = t.errors();
        assert_eq!(e.len(), MAX_ERROR_KINDS + 1);
        assert_eq!(e["other"], 5);
        for i in 0..MAX_RUNS + 2 {
            t.run_started(&format!("run{i}"), 1, false, 0);
        }
        assert_eq!(t.runs(None).len(), MAX_RUNS);
    }
}
