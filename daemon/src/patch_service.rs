//! Patch jobs in the swarm: requests to fix a model's answer on a sample are gossiped; nodes
//! that hold the model compute a patch, every node verifies it on the version it names and
//! gossips a signed vote; a patch is accepted once `quorum` verifiers other than its author
//! accept it (rejected once `quorum` reject it, and its author is penalised). The adopted state
//! is the chain folded from the set of accepted patches (see `colony_trainer::edit::chain`),
//! so nodes that heard of the same patches in any order hold the same version.
//!
//! Gossip is best effort: every node re-publishes the undecided proposals it knows and its
//! votes on them every `rebroadcast` interval until they are decided, so a node that missed a
//! message (mesh not formed yet, a restart) still hears it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use colony_protocol::envelope::SignedEnvelope;
use colony_protocol::names::patches_topic;
use colony_protocol::patch::{
    Hash32, MAX_PATCH_BYTES, PATCH_DOMAIN, Patch, PatchGossip, PatchRequest, REQUEST_DOMAIN,
    VOTE_DOMAIN, Vote,
};
use colony_protocol::{NodePublicKey, encode};
use colony_trainer::data::images::ImageSet;
use colony_trainer::edit::chain::{Chain, StepFate, broken_edit, fold};
use colony_trainer::edit::log::{LogEntry, PatchLog};
use colony_trainer::edit::model::{EditModel, Limits, check_patch, check_request};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::clock::now_ms;
use crate::handle::{NodeHandle, peer_id_of};

/// `[patch]` in the node config.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchConfig {
    /// An editable model file (`colony edit train`).
    pub model: PathBuf,
    /// The digits file holding the model's control set (default: the fetched digits).
    #[serde(default)]
    pub data: Option<PathBuf>,
    /// The run whose gossip topic carries the patch jobs.
    #[serde(default = "default_run")]
    pub run: String,
    /// Verifiers (other than the author) that must accept a patch.
    #[serde(default = "default_quorum")]
    pub quorum: usize,
    /// Largest control-error increase a patch may cause.
    #[serde(default = "default_max_drawdown")]
    pub max_drawdown: f32,
    /// Largest control-error increase over the base model the whole chain may reach.
    #[serde(default = "default_max_total_drawdown")]
    pub max_total_drawdown: f32,
    /// Whether this node computes patches for requests (it always verifies).
    #[serde(default = "yes")]
    pub solve: bool,
    /// Re-publishing period of undecided proposals and votes, milliseconds.
    #[serde(default = "default_rebroadcast_ms")]
    pub rebroadcast_ms: u64,
}

fn default_run() -> String {
    "patches".into()
}
fn default_quorum() -> usize {
    3
}
fn default_max_drawdown() -> f32 {
    Limits::default().max_drawdown
}
fn default_max_total_drawdown() -> f32 {
    Limits::default().max_total_drawdown
}
fn yes() -> bool {
    true
}
fn default_rebroadcast_ms() -> u64 {
    2000
}

impl PatchConfig {
    pub fn new(model: PathBuf) -> Self {
        Self {
            model,
            data: None,
            run: default_run(),
            quorum: default_quorum(),
            max_drawdown: default_max_drawdown(),
            max_total_drawdown: default_max_total_drawdown(),
            solve: true,
            rebroadcast_ms: default_rebroadcast_ms(),
        }
    }
}

/// Where a proposal stands.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pending,
    Accepted,
    Rejected(String),
}

#[derive(Debug)]
struct Proposal {
    patch: Patch,
    env: SignedEnvelope,
    votes: HashMap<NodePublicKey, (Vote, SignedEnvelope)>,
    status: Status,
    voted: bool,
}

#[derive(Debug)]
struct State {
    requests: HashMap<Hash32, (PatchRequest, SignedEnvelope)>,
    solved: HashSet<Hash32>,
    proposals: HashMap<Hash32, Proposal>,
    /// Votes that arrived before their patch.
    early_votes: HashMap<Hash32, Vec<SignedEnvelope>>,
    accepted: BTreeMap<Hash32, Patch>,
    rolled_back: HashSet<Hash32>,
    chain: Chain,
    log: PatchLog,
}

/// A running patch service (cheap to clone).
#[derive(Clone, Debug)]
pub struct PatchService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    model: EditModel,
    cfg: PatchConfig,
    limits: Limits,
    topic: String,
    state: Mutex<State>,
}

impl Inner {
    /// Rebuilds the chain from the accepted and rolled-back sets.
    fn refold(&self, s: &mut State) {
        s.chain = fold(&self.model, &s.accepted, &s.rolled_back, &self.limits);
    }
}

/// One step of the chain, for the API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepView {
    pub patch: String,
    pub fate: String,
    pub version: String,
}

/// A proposal, for the API.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProposalView {
    pub patch: String,
    pub request: String,
    pub author: String,
    pub parent: String,
    pub target: u32,
    pub steps: u32,
    pub bytes: usize,
    pub status: String,
    pub accepts: usize,
    pub rejects: usize,
    pub votes: Vec<VoteView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VoteView {
    pub voter: String,
    pub accept: bool,
    pub reason: String,
}

/// The chain and the proposals, for the API and `colony patch list`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PatchList {
    pub model: String,
    pub version: String,
    pub len: u64,
    pub control_error: f32,
    pub base_error: f32,
    pub chain: Vec<StepView>,
    pub proposals: Vec<ProposalView>,
}

/// A request to submit, as the API takes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SubmitRequest {
    /// 64 pixels on the 0–1 scale; or
    #[serde(default)]
    pub sample: Option<Vec<f32>>,
    /// the index of an image in the model's control set.
    #[serde(default)]
    pub control_index: Option<usize>,
    pub target: u32,
}

impl PatchService {
    /// Loads the model and the patch log (under `data_dir`), and folds the chain.
    pub fn load(cfg: &PatchConfig, data_dir: &std::path::Path) -> anyhow::Result<Self> {
        if cfg.quorum == 0 {
            bail!("[patch] quorum must be at least 1");
        }
        let data = cfg
            .data
            .clone()
            .unwrap_or_else(crate::swav_job::default_digits);
        let set = ImageSet::digits(&data).with_context(|| {
            format!(
                "reading the control set's images at {} (scripts/fetch-data.sh fetches them)",
                data.display()
            )
        })?;
        let model = EditModel::load(&cfg.model, &set)?;
        let limits = Limits {
            max_drawdown: cfg.max_drawdown,
            max_total_drawdown: cfg.max_total_drawdown,
            ..Limits::default()
        };
        std::fs::create_dir_all(data_dir)?;
        let log_path = data_dir.join(format!("patches-{}.log", &model.id[..16]));
        let (log, entries, recovery) = PatchLog::open(&log_path)
            .with_context(|| format!("cannot open the patch log {}", log_path.display()))?;
        if let Some(f) = &recovery.damaged_file {
            warn!(
                bytes = recovery.damaged_bytes,
                kept = %f.display(),
                "the patch log had a damaged tail (a crash mid-write?); it was moved aside"
            );
        }
        let mut accepted = BTreeMap::new();
        let mut rolled_back = HashSet::new();
        for e in entries {
            match e {
                LogEntry::Adopted { patch, .. } => {
                    let env = SignedEnvelope::from_bytes(&patch)?;
                    let (p, id) = Patch::open(&env)?;
                    accepted.insert(id, p);
                }
                LogEntry::RolledBack { patch, .. } => {
                    rolled_back.insert(patch);
                }
            }
        }
        let chain = fold(&model, &accepted, &rolled_back, &limits);
        info!(model = %&model.id[..12], patches = chain.len, "patch chain loaded");
        let topic = patches_topic(&cfg.run);
        Ok(Self {
            inner: Arc::new(Inner {
                model,
                cfg: cfg.clone(),
                limits,
                topic,
                state: Mutex::new(State {
                    requests: HashMap::new(),
                    solved: HashSet::new(),
                    proposals: HashMap::new(),
                    early_votes: HashMap::new(),
                    accepted,
                    rolled_back,
                    chain,
                    log,
                }),
            }),
        })
    }

    pub fn model_id(&self) -> &str {
        &self.inner.model.id
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current version (hex) and chain length.
    pub fn version(&self) -> (String, u64) {
        let s = self.state();
        (hex::encode(s.chain.version), s.chain.len)
    }

    /// Subscribes to the topic and runs the gossip and re-broadcast loops.
    pub async fn start(
        &self,
        handle: &NodeHandle,
        cancel: &CancellationToken,
        tasks: &mut tokio::task::JoinSet<()>,
    ) -> anyhow::Result<()> {
        let mut rx = handle.subscribe(&self.inner.topic).await?;
        let (svc, h, c) = (self.clone(), handle.clone(), cancel.clone());
        tasks.spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = c.cancelled() => return,
                    m = rx.recv() => m,
                };
                match msg {
                    Ok(m) if m.topic == svc.inner.topic => {
                        svc.on_gossip(&h, &m.data, m.source).await;
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        warn!("patch gossip: {n} messages dropped (slow consumer)");
                    }
                    Err(_) => return,
                }
            }
        });
        let (svc, h, c) = (self.clone(), handle.clone(), cancel.clone());
        tasks.spawn(async move {
            let period = Duration::from_millis(svc.inner.cfg.rebroadcast_ms.max(100));
            loop {
                tokio::select! {
                    _ = c.cancelled() => return,
                    _ = tokio::time::sleep(period) => {}
                }
                for msg in svc.undecided() {
                    if let Ok(b) = msg.to_bytes() {
                        let _ = h.publish(&svc.inner.topic, b).await;
                    }
                }
            }
        });
        info!(model = %&self.inner.model.id[..12], topic = %self.inner.topic, "serving patch jobs");
        Ok(())
    }

    /// The undecided proposals and this node's votes on them (and unanswered requests), to
    /// re-publish.
    fn undecided(&self) -> Vec<PatchGossip> {
        let s = self.state();
        let mut out = Vec::new();
        let answered: HashSet<Hash32> = s.accepted.values().map(|p| p.request).collect();
        for (id, (_, env)) in s.requests.iter().take(64) {
            if !answered.contains(id) {
                out.push(PatchGossip::Request(env.clone()));
            }
        }
        for p in s
            .proposals
            .values()
            .filter(|p| p.status == Status::Pending)
            .take(64)
        {
            out.push(PatchGossip::Patch(p.env.clone()));
            for (_, env) in p.votes.values() {
                out.push(PatchGossip::Vote(env.clone()));
            }
        }
        out
    }

    /// Publishes a message and handles it here too (gossipsub does not deliver a node's own
    /// messages to itself).
    async fn broadcast(&self, handle: &NodeHandle, msg: PatchGossip) {
        match msg.to_bytes() {
            Ok(b) => {
                if let Err(e) = handle.publish(&self.inner.topic, b.clone()).await {
                    debug!("patch gossip not published yet: {e:#}");
                }
                Box::pin(self.on_gossip(handle, &b, Some(handle.peer_id()))).await;
            }
            Err(e) => warn!("cannot encode a patch message: {e}"),
        }
    }

    /// Submits a request from this node; returns its id.
    pub async fn submit(&self, handle: &NodeHandle, req: SubmitRequest) -> anyhow::Result<String> {
        let sample = match (req.sample, req.control_index) {
            (Some(s), None) => s,
            (None, Some(i)) => self.control_image(i)?,
            _ => bail!("give exactly one of `sample` and `control_index`"),
        };
        check_request(&sample, req.target as usize).map_err(|e| anyhow!(e))?;
        let request = PatchRequest {
            model: self.inner.model.id.clone(),
            sample,
            target: req.target,
            created_ms: now_ms(),
        };
        let id = request.id()?;
        let env = SignedEnvelope::seal(
            handle.signer(),
            REQUEST_DOMAIN,
            now_ms(),
            rand::random(),
            encode(&request, MAX_PATCH_BYTES)?,
        );
        self.broadcast(handle, PatchGossip::Request(env)).await;
        Ok(hex::encode(id))
    }

    /// The control images the current version gets wrong, with their true labels: the fixes a
    /// user would ask for.
    pub fn control_mistakes(&self) -> Vec<(usize, u32)> {
        let m = &self.inner.model;
        let head = self.state().chain.head.clone();
        head.predict_all(&m.control)
            .into_iter()
            .zip(&m.control_labels)
            .enumerate()
            .filter(|(_, (p, y))| p != *y)
            .map(|(i, (_, y))| (i, *y as u32))
            .collect()
    }

    /// The pixels of image `i` of the control set.
    fn control_image(&self, i: usize) -> anyhow::Result<Vec<f32>> {
        let m = &self.inner.model;
        let n = m.control_labels.len();
        if i >= n {
            bail!("control_index {i} is outside the control set ({n} images)");
        }
        let per = m.control_pixels.len() / n.max(1);
        Ok(m.control_pixels[i * per..(i + 1) * per].to_vec())
    }

    async fn on_gossip(&self, handle: &NodeHandle, data: &[u8], source: Option<PeerId>) {
        let msg = match PatchGossip::from_bytes(data) {
            Ok(m) => m,
            Err(e) => {
                self.offence(handle, source, format!("malformed patch gossip: {e}"))
                    .await;
                return;
            }
        };
        let r = match msg {
            PatchGossip::Request(env) => self.on_request(handle, env).await,
            PatchGossip::Patch(env) => self.on_patch(handle, env).await,
            PatchGossip::Vote(env) => self.on_vote(handle, env).await,
        };
        if let Err(e) = r {
            self.offence(handle, source, format!("{e:#}")).await;
        }
    }

    async fn offence(&self, handle: &NodeHandle, peer: Option<PeerId>, reason: String) {
        warn!(peer = ?peer, "patch gossip refused: {reason}");
        if let Some(p) = peer.filter(|p| *p != handle.peer_id()) {
            handle.report_offence(p, reason).await;
        }
    }

    async fn on_request(&self, handle: &NodeHandle, env: SignedEnvelope) -> anyhow::Result<()> {
        let req: PatchRequest =
            colony_protocol::decode(env.open(REQUEST_DOMAIN)?, MAX_PATCH_BYTES)?;
        if req.model != self.inner.model.id {
            return Ok(());
        }
        check_request(&req.sample, req.target as usize).map_err(|e| anyhow!(e))?;
        let id = req.id()?;
        let solve = {
            let mut s = self.state();
            let fresh = s.requests.insert(id, (req.clone(), env)).is_none();
            let answered = s.accepted.values().any(|p| p.request == id);
            fresh && !answered && self.inner.cfg.solve && s.solved.insert(id)
        };
        if !solve {
            return Ok(());
        }
        // Every node that holds the model may solve; a short random wait lets the first
        // answer reach the others so that most of them need not compute a duplicate.
        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 400)).await;
        let answered = self
            .state()
            .proposals
            .values()
            .any(|p| p.patch.request == id);
        if answered {
            return Ok(());
        }
        let (head, parent, parent_len, edits) = {
            let s = self.state();
            (
                s.chain.head.clone(),
                s.chain.version,
                s.chain.len,
                s.chain.edits.clone(),
            )
        };
        let svc = self.clone();
        let author = handle.signer().public();
        let made = tokio::task::spawn_blocking(move || -> anyhow::Result<Patch> {
            let m = &svc.inner.model;
            let (delta, steps) = colony_trainer::edit::chain::solve_on_chain(
                m,
                &head,
                &edits,
                &req.sample,
                req.target as usize,
                &svc.inner.limits,
            )
            .map_err(|e| anyhow!(e))?;
            let patch = Patch {
                model: m.id.clone(),
                parent,
                parent_len,
                request: id,
                sample: req.sample,
                target: req.target,
                delta,
                editor: m.editor.spec(),
                steps,
                author,
                created_ms: now_ms(),
            };
            let v = check_patch(m, &head, &patch, &svc.inner.limits);
            if !v.accept {
                bail!("own check failed: {}", v.reason);
            }
            if let Some(k) = v.head.as_ref().and_then(|h| broken_edit(h, &edits)) {
                bail!("own check failed: it undoes edit {} of the chain", k + 1);
            }
            Ok(patch)
        })
        .await?;
        match made {
            Ok(patch) => {
                let env = SignedEnvelope::seal(
                    handle.signer(),
                    PATCH_DOMAIN,
                    now_ms(),
                    rand::random(),
                    encode(&patch, MAX_PATCH_BYTES)?,
                );
                info!(request = %hex::encode(&id[..6]), steps = patch.steps, "computed a patch");
                self.broadcast(handle, PatchGossip::Patch(env)).await;
            }
            Err(e) => warn!(request = %hex::encode(&id[..6]), "no patch for the request: {e:#}"),
        }
        Ok(())
    }

    async fn on_patch(&self, handle: &NodeHandle, env: SignedEnvelope) -> anyhow::Result<()> {
        let (patch, id) = Patch::open(&env)?;
        if patch.model != self.inner.model.id {
            return Ok(());
        }
        let early = {
            let mut s = self.state();
            if s.proposals.contains_key(&id) {
                return Ok(());
            }
            s.proposals.insert(
                id,
                Proposal {
                    patch,
                    env,
                    votes: HashMap::new(),
                    status: Status::Pending,
                    voted: false,
                },
            );
            s.early_votes.remove(&id).unwrap_or_default()
        };
        for v in early {
            let _ = self.on_vote(handle, v).await;
        }
        self.verify_pending(handle).await;
        Ok(())
    }

    /// Verifies every pending proposal this node has not voted on whose parent it knows.
    async fn verify_pending(&self, handle: &NodeHandle) {
        let me = handle.signer().public();
        loop {
            let job = {
                let s = self.state();
                s.proposals
                    .iter()
                    .filter(|(_, p)| {
                        !p.voted && p.status == Status::Pending && p.patch.author != me
                    })
                    .find_map(|(id, p)| {
                        let len = *s.chain.versions.get(&p.patch.parent)?;
                        let head = s.chain.heads.get(&p.patch.parent)?.clone();
                        let edits = s.chain.edits[..len as usize].to_vec();
                        Some((*id, p.patch.clone(), head, edits, len))
                    })
            };
            let Some((id, patch, head, edits, len)) = job else {
                return;
            };
            if let Some(p) = self.state().proposals.get_mut(&id) {
                p.voted = true;
            }
            let svc = self.clone();
            let verdict = tokio::task::spawn_blocking(move || {
                let m = &svc.inner.model;
                let mut v = check_patch(m, &head, &patch, &svc.inner.limits);
                if patch.parent_len != len {
                    v.accept = false;
                    v.reason = format!("parent_len {} but the parent has {len}", patch.parent_len);
                }
                if v.accept
                    && let Some(k) = v.head.as_ref().and_then(|h| broken_edit(h, &edits))
                {
                    v.accept = false;
                    v.reason = format!("it undoes edit {} of the chain", k + 1);
                }
                v
            })
            .await;
            let Ok(v) = verdict else { return };
            let vote = Vote {
                patch: id,
                accept: v.accept,
                reason: v.reason.chars().take(200).collect(),
                margin: v.margin,
                drawdown: v.drawdown,
            };
            debug!(patch = %hex::encode(&id[..6]), accept = vote.accept, reason = %vote.reason, "voted");
            let Ok(payload) = encode(&vote, MAX_PATCH_BYTES) else {
                return;
            };
            let env = SignedEnvelope::seal(
                handle.signer(),
                VOTE_DOMAIN,
                now_ms(),
                rand::random(),
                payload,
            );
            self.broadcast(handle, PatchGossip::Vote(env)).await;
        }
    }

    async fn on_vote(&self, handle: &NodeHandle, env: SignedEnvelope) -> anyhow::Result<()> {
        let vote = Vote::open(&env)?;
        let decided = {
            let mut s = self.state();
            let quorum = self.inner.cfg.quorum;
            if !s.proposals.contains_key(&vote.patch) {
                let room = s.early_votes.len() < 1024;
                let early = s.early_votes.entry(vote.patch).or_default();
                if early.len() < 64 && room {
                    early.push(env);
                }
                return Ok(());
            }
            let Some(p) = s.proposals.get_mut(&vote.patch) else {
                return Ok(());
            };
            if env.signer == p.patch.author || p.votes.contains_key(&env.signer) {
                return Ok(());
            }
            p.votes.insert(env.signer, (vote, env));
            if p.status != Status::Pending {
                return Ok(());
            }
            let accepts = p.votes.values().filter(|(v, _)| v.accept).count();
            let rejects = p.votes.len() - accepts;
            if accepts >= quorum {
                p.status = Status::Accepted;
                Some((
                    true,
                    p.patch.clone(),
                    p.env.clone(),
                    p.votes.values().map(|v| v.1.clone()).collect::<Vec<_>>(),
                ))
            } else if rejects >= quorum {
                let why = p
                    .votes
                    .values()
                    .find(|(v, _)| !v.accept)
                    .map(|(v, _)| v.reason.clone())
                    .unwrap_or_default();
                p.status = Status::Rejected(why);
                Some((false, p.patch.clone(), p.env.clone(), Vec::new()))
            } else {
                None
            }
        };
        match decided {
            Some((true, patch, penv, votes)) => self.adopt(handle, patch, penv, votes).await?,
            Some((false, patch, _, _)) => {
                let id = patch.id()?;
                warn!(patch = %hex::encode(&id[..6]), "patch rejected by a quorum of verifiers");
                if let Ok(author) = peer_id_of(&patch.author)
                    && author != handle.peer_id()
                {
                    handle
                        .report_offence(author, "authored a patch a quorum rejected".into())
                        .await;
                }
            }
            None => {}
        }
        Ok(())
    }

    async fn adopt(
        &self,
        handle: &NodeHandle,
        patch: Patch,
        env: SignedEnvelope,
        votes: Vec<SignedEnvelope>,
    ) -> anyhow::Result<()> {
        let id = patch.id()?;
        let entry = LogEntry::Adopted {
            patch: env.to_bytes()?,
            votes: votes.iter().filter_map(|v| v.to_bytes().ok()).collect(),
            at_ms: now_ms(),
        };
        let svc = self.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let mut s = svc.state();
            s.log
                .append(&entry)
                .context("cannot append to the patch log")?;
            s.accepted.insert(id, patch);
            svc.inner.refold(&mut s);
            Ok(())
        })
        .await??;
        let (version, len) = self.version();
        info!(patch = %hex::encode(&id[..6]), version = %&version[..12], len, "patch adopted");
        self.verify_pending(handle).await;
        Ok(())
    }

    /// Rolls a patch back on this node (the chain is rebuilt without it).
    pub fn rollback(&self, patch: &str) -> anyhow::Result<(String, u64)> {
        let id: Hash32 = hex::decode(patch)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| anyhow!("{patch:?} is not a patch id (64 hex digits)"))?;
        {
            let mut s = self.state();
            if !s.accepted.contains_key(&id) {
                bail!("patch {patch} is not in this node's chain");
            }
            s.log.append(&LogEntry::RolledBack {
                patch: id,
                at_ms: now_ms(),
            })?;
            s.rolled_back.insert(id);
            self.inner.refold(&mut s);
        }
        Ok(self.version())
    }

    /// The chain and the proposals.
    pub fn list(&self) -> PatchList {
        let s = self.state();
        let m = &self.inner.model;
        PatchList {
            model: m.id.clone(),
            version: hex::encode(s.chain.version),
            len: s.chain.len,
            control_error: m.error(&s.chain.head),
            base_error: m.base_error,
            chain: s
                .chain
                .steps
                .iter()
                .map(|st| StepView {
                    patch: hex::encode(st.patch),
                    fate: match &st.fate {
                        StepFate::Applied => "applied".into(),
                        StepFate::Rebased { steps } => format!("rebased ({steps} more steps)"),
                        StepFate::Conflict(w) => format!("conflict: {w}"),
                        StepFate::Superseded => "superseded".into(),
                        StepFate::RolledBack => "rolled back".into(),
                    },
                    version: hex::encode(st.version),
                })
                .collect(),
            proposals: s.proposals.iter().map(|(id, p)| view(id, p)).collect(),
        }
    }

    /// One proposal.
    pub fn show(&self, patch: &str) -> Option<ProposalView> {
        let s = self.state();
        s.proposals
            .iter()
            .find(|(id, _)| hex::encode(id).starts_with(patch))
            .map(|(id, p)| view(id, p))
    }
}

fn view(id: &Hash32, p: &Proposal) -> ProposalView {
    let accepts = p.votes.values().filter(|(v, _)| v.accept).count();
    ProposalView {
        patch: hex::encode(id),
        request: hex::encode(p.patch.request),
        author: peer_id_of(&p.patch.author).map_or_else(|_| "?".into(), |x| x.to_string()),
        parent: hex::encode(p.patch.parent),
        target: p.patch.target,
        steps: p.patch.steps,
        bytes: encode(&p.patch, MAX_PATCH_BYTES).map_or(0, |b| b.len()),
        status: match &p.status {
            Status::Pending => "pending".into(),
            Status::Accepted => "accepted".into(),
            Status::Rejected(w) => format!("rejected: {w}"),
        },
        accepts,
        rejects: p.votes.len() - accepts,
        votes: p
            .votes
            .iter()
            .map(|(k, (v, _))| VoteView {
                voter: peer_id_of(k).map_or_else(|_| "?".into(), |x| x.to_string()),
                accept: v.accept,
                reason: v.reason.clone(),
            })
            .collect(),
    }
}
