//! Forming all-reduce groups through the DHT, with a deadline and a leader's commit so that
//! every member runs the same round or knows it is not in one.
//!
//! One epoch of one run:
//!
//! 1. **Declare.** Each peer stores a signed [`GroupDeclaration`] (mode, weight, measured
//!    bandwidth, vector length) under `run_group(run, epoch)`, owner subkey = its key, so nobody
//!    can declare for it.
//! 2. **Deadline.** At the agreed instant each peer reads the declarations and computes the
//!    groups with the trainer's deterministic `plan_groups` (Moshpit grouping when a size limit
//!    is set). The first member of a group (the lowest-id member that is not a client, so that
//!    every member can reach it) is its leader.
//! 3. **Propose.** The leader asks each member to join. A peer joins at most one leader per
//!    epoch (the first that asks; a leader has joined itself), so two leaders with different
//!    views cannot both count on the same peer.
//! 4. **Commit.** The leader re-plans over the peers that accepted (shard sizes from their
//!    declared bandwidths) and sends the final [`GroupCommit`]; each member starts the round
//!    the moment it gets it. A member accepts a commit only from the leader it joined.
//!
//! Every wait has a deadline: a peer that hears no commit in time falls back (`Ok(None)`: the
//! caller takes a local step), a member that dies between accept and commit is simply absent
//! from the commit, and one that dies after the commit is the round's ordinary fault.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use colony_protocol::allreduce::{
    GroupCommit, GroupDeclaration, GroupRequest, GroupResponse, RoundId, WireAggregation, WireMode,
};
use colony_protocol::{DhtKey, Request, Response};
use colony_trainer::allreduce::balance::PeerMode;
use colony_trainer::allreduce::compression::Compression;
use colony_trainer::allreduce::matchmaking::{Declaration, GroupRules, plan_groups};
use colony_trainer::allreduce::partition::{PartLen, PartRule};
use colony_trainer::allreduce::reducer::Aggregation;
use colony_trainer::allreduce::round::RoundSpec;
use libp2p::PeerId;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::allreduce::{DriveConfig, Group, compression_of, scheme_of};
use crate::handle::NodeHandle;
use crate::swarm::actor::GroupHandler;

/// How one epoch's matchmaking runs.
#[derive(Clone, Debug)]
pub struct MatchConfig {
    /// Elements per streamed part, or the pipeline-fill rule (the leader applies it to the
    /// group's declared bandwidths, with the bytes per element of `compression`).
    pub part_len: PartLen,
    /// Shards smaller than this go to other aggregators.
    pub min_shard: usize,
    /// Largest group (Moshpit-style regrouping each epoch); None: one group.
    pub max_group: Option<usize>,
    pub compression: Compression,
    /// How aggregators combine copies (the leader's choice binds the group).
    pub aggregation: Aggregation,
    /// How long a leader waits for each answer to a proposal or commit.
    pub answer_timeout: Duration,
    /// How long after the deadline a member waits for its leader's commit.
    pub commit_wait: Duration,
}

impl Default for MatchConfig {
    fn default() -> Self {
        Self {
            part_len: PartLen::Auto(PartRule {
                window: DriveConfig::default().window,
                ..PartRule::default()
            }),
            min_shard: 4096,
            max_group: None,
            compression: Compression::None,
            aggregation: Aggregation::Mean,
            answer_timeout: Duration::from_secs(3),
            commit_wait: Duration::from_secs(8),
        }
    }
}

/// What this peer brings to an epoch.
#[derive(Clone, Copy, Debug)]
pub struct Offer {
    pub mode: PeerMode,
    /// Samples behind the vector.
    pub weight: f64,
    /// Bytes per second.
    pub up: f64,
    pub down: f64,
}

#[derive(Default)]
struct State {
    /// The epoch being matched (requests for others are declined).
    epoch: Option<u64>,
    /// The leader this peer joined for `epoch`.
    leader: Option<PeerId>,
    commit: Option<GroupCommit>,
}

/// This node's matchmaking for one run; answers leaders' requests while it lives.
pub struct Matchmaker {
    h: NodeHandle,
    run: String,
    state: Arc<Mutex<State>>,
    committed: Arc<Notify>,
}

impl std::fmt::Debug for Matchmaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matchmaker")
            .field("run", &self.run)
            .finish()
    }
}

fn to_wire(m: PeerMode) -> WireMode {
    match m {
        PeerMode::Node => WireMode::Node,
        PeerMode::Client => WireMode::Client,
        PeerMode::Aux => WireMode::Aux,
    }
}

fn from_wire(m: WireMode) -> PeerMode {
    match m {
        WireMode::Node => PeerMode::Node,
        WireMode::Client => PeerMode::Client,
        WireMode::Aux => PeerMode::Aux,
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding this lock cannot leave the state half-written (every update is a
    // single assignment), so a poisoned lock is still usable.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why a commit cannot be run by `me`, if it cannot.
pub fn check_commit(c: &GroupCommit, me: &PeerId, len: usize) -> Result<(), String> {
    let n = c.members.len();
    if n < 2 {
        return Err("a group needs at least two members".into());
    }
    if c.modes.len() != n || c.weights.len() != n || c.shard_sizes.len() != n {
        return Err("members, modes, weights and shards differ in length".into());
    }
    if let WireAggregation::CenteredClip { tau, iters } = c.aggregation
        && !(tau.is_finite() && tau > 0.0 && (1..=1000).contains(&iters))
    {
        return Err("CenteredClip needs a finite positive radius and 1..=1000 iterations".into());
    }
    if c.part_len == 0 {
        return Err("part length 0".into());
    }
    if c.shard_sizes.iter().sum::<u64>() != len as u64 {
        return Err(format!("shards do not add up to the vector's {len} values"));
    }
    if !(c.predicted_s.is_finite() && c.predicted_s >= 0.0) {
        return Err("the predicted duration is not a finite non-negative number".into());
    }
    if c.weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
        return Err("a weight is negative or not finite".into());
    }
    for (i, m) in c.modes.iter().enumerate() {
        if !from_wire(*m).aggregates() && c.shard_sizes[i] != 0 {
            return Err(format!("member {i} reduces nothing but has a shard"));
        }
    }
    let mut ids = c.members.clone();
    ids.sort();
    ids.dedup();
    if ids.len() != n {
        return Err("a member is listed twice".into());
    }
    if !c.members.iter().any(|m| m.as_slice() == me.to_bytes()) {
        return Err("this peer is not a member".into());
    }
    Ok(())
}

/// The group a (checked) commit describes.
pub fn group_of(c: &GroupCommit) -> anyhow::Result<Group> {
    let members = c
        .members
        .iter()
        .map(|m| PeerId::from_bytes(m).context("a member's peer id is malformed"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Group {
        round: c.round,
        members,
        spec: RoundSpec {
            modes: c.modes.iter().map(|m| from_wire(*m)).collect(),
            weights: c.weights.clone(),
            shard_sizes: c.shard_sizes.iter().map(|&s| s as usize).collect(),
            part_len: c.part_len as usize,
            aggregation: match c.aggregation {
                WireAggregation::Mean => Aggregation::Mean,
                WireAggregation::CenteredClip { tau, iters } => {
                    Aggregation::CenteredClip { tau, iters }
                }
            },
        },
        compression: compression_of(c.scheme),
        predicted_s: c.predicted_s,
    })
}

impl Matchmaker {
    pub async fn new(h: NodeHandle, run: &str) -> anyhow::Result<Self> {
        let state = Arc::new(Mutex::new(State::default()));
        let committed = Arc::new(Notify::new());
        let (st, note, me) = (state.clone(), committed.clone(), h.peer_id());
        let handler = GroupHandler(Arc::new(move |from: PeerId, req: GroupRequest| {
            let mut s = lock(&st);
            match req {
                GroupRequest::Propose { epoch, .. } => {
                    if s.epoch != Some(epoch) {
                        return GroupResponse::Decline(format!("not matching epoch {epoch}"));
                    }
                    match s.leader {
                        Some(l) if l != from => {
                            GroupResponse::Decline(format!("already joined {l}'s group"))
                        }
                        _ => {
                            s.leader = Some(from);
                            GroupResponse::Accept
                        }
                    }
                }
                GroupRequest::Commit(c) => {
                    if s.epoch != Some(c.epoch) || s.leader != Some(from) {
                        return GroupResponse::Decline("no proposal of yours was accepted".into());
                    }
                    if let Some(old) = &s.commit {
                        return if *old == c {
                            GroupResponse::Accept
                        } else {
                            GroupResponse::Decline("already committed".into())
                        };
                    }
                    // The vector length is checked by the member when it starts the round.
                    let len = c.shard_sizes.iter().sum::<u64>() as usize;
                    if let Err(why) = check_commit(&c, &me, len) {
                        return GroupResponse::Decline(why);
                    }
                    if c.members.first().map(Vec::as_slice) != Some(&from.to_bytes()[..]) {
                        return GroupResponse::Decline("the leader must be member 0".into());
                    }
                    s.commit = Some(c);
                    note.notify_one();
                    GroupResponse::Accept
                }
            }
        }));
        h.register_group_handler(run.to_owned(), handler).await?;
        Ok(Self {
            h,
            run: run.to_owned(),
            state,
            committed,
        })
    }

    /// Matches `epoch`: declares `offer` now, reads the others' declarations at `deadline`,
    /// and returns the committed group, or `None` when this peer is in no group this epoch.
    pub async fn form_group(
        &self,
        epoch: u64,
        len: usize,
        offer: Offer,
        deadline: Instant,
        cfg: &MatchConfig,
    ) -> anyhow::Result<Option<Group>> {
        self.form_group_expecting(epoch, len, offer, deadline, cfg, &[])
            .await
    }

    /// As [`Self::form_group`], knowing that the peers in `expected` meant to join this
    /// attempt (they said so in their progress records): when some of their declarations
    /// are not in the DHT at the deadline, the declarations are read again for a short grace
    /// (a peer whose last micro-batch ran long declares late; without the grace it would be
    /// left out, download the state, and be late again at the next step).
    pub async fn form_group_expecting(
        &self,
        epoch: u64,
        len: usize,
        offer: Offer,
        deadline: Instant,
        cfg: &MatchConfig,
        expected: &[PeerId],
    ) -> anyhow::Result<Option<Group>> {
        {
            let mut s = lock(&self.state);
            *s = State {
                epoch: Some(epoch),
                ..State::default()
            };
        }
        let result = self
            .match_epoch(epoch, len, offer, deadline, cfg, expected)
            .await;
        let mut s = lock(&self.state);
        s.epoch = None;
        result
    }

    async fn match_epoch(
        &self,
        epoch: u64,
        len: usize,
        offer: Offer,
        deadline: Instant,
        cfg: &MatchConfig,
        expected: &[PeerId],
    ) -> anyhow::Result<Option<Group>> {
        let me = self.h.peer_id();
        let key = DhtKey::run_group(&self.run, epoch)?;
        let deadline_ms = crate::clock::now_ms()
            + deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as u64;
        let decl = GroupDeclaration {
            mode: to_wire(offer.mode),
            weight: offer.weight,
            up: offer.up,
            down: offer.down,
            len: len as u64,
            deadline_ms,
        };
        let ttl = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(120);
        let value = colony_protocol::encode(&decl, colony_protocol::names::MAX_VALUE_BYTES)?;
        if let Err(e) = self.h.dht_put_owned(key.clone(), value, ttl).await {
            tracing::warn!(run = %self.run, epoch, "cannot declare for matchmaking: {e:#}");
        }
        tokio::time::sleep_until(deadline).await;

        let lead = lock(&self.state).leader.is_none();
        let attempt = Attempt {
            epoch,
            len,
            deadline_ms,
            tolerance_ms: cfg.commit_wait.as_millis() as u64,
        };
        if lead && let Some(group) = self.try_lead(attempt, offer, &key, cfg, expected).await? {
            return Ok(Some(group));
        }
        // Follow: wait for the commit of the leader this peer joined.
        let until = deadline.max(Instant::now()) + cfg.commit_wait;
        loop {
            if let Some(c) = lock(&self.state).commit.clone() {
                if let Err(why) = check_commit(&c, &me, len) {
                    tracing::warn!(run = %self.run, epoch, "leader's commit unusable: {why}");
                    return Ok(None);
                }
                return group_of(&c).map(Some);
            }
            if tokio::time::timeout_at(until, self.committed.notified())
                .await
                .is_err()
            {
                tracing::info!(run = %self.run, epoch, "no group committed in time");
                return Ok(None);
            }
        }
    }

    /// Reads the declarations; if this peer leads its group, proposes, commits and returns
    /// the group. `None` when it is not a leader (or leads nobody).
    async fn try_lead(
        &self,
        attempt: Attempt,
        offer: Offer,
        key: &DhtKey,
        cfg: &MatchConfig,
        expected: &[PeerId],
    ) -> anyhow::Result<Option<Group>> {
        let Attempt { epoch, len, .. } = attempt;
        let me = self.h.peer_id();
        let grace_until = Instant::now() + declaration_grace(cfg);
        let mut decls = loop {
            let decls = match self.h.dht_get(key).await {
                Ok(got) => declarations(&got.entries, attempt),
                Err(e) => {
                    tracing::warn!(run = %self.run, epoch, "cannot read declarations: {e:#}");
                    Vec::new()
                }
            };
            let missing = expected
                .iter()
                .filter(|p| **p != me && !decls.iter().any(|d| d.peer == p.to_bytes()))
                .count();
            if missing == 0 || Instant::now() >= grace_until {
                if missing > 0 {
                    tracing::info!(run = %self.run, epoch, missing, "expected declarations still missing after the grace");
                }
                break decls;
            }
            tokio::time::sleep(GRACE_POLL).await;
        };
        decls.retain(|d| d.peer != me.to_bytes());
        decls.push(Declaration {
            peer: me.to_bytes(),
            mode: offer.mode,
            weight: offer.weight,
            up: offer.up,
            down: offer.down,
        });
        let rules = GroupRules {
            len,
            part_len: match cfg.part_len {
                PartLen::Auto(rule) => PartLen::Auto(PartRule {
                    bytes_per_elem: cfg.compression.encoded_len(1 << 20) as f64
                        / f64::from(1u32 << 20),
                    ..rule
                }),
                fixed => fixed,
            },
            min_shard: cfg.min_shard,
            max_group: cfg.max_group,
            seed: epoch,
        };
        let plans = plan_groups(&decls, rules);
        let Some(plan) = plans.iter().find(|p| p.members.contains(&me.to_bytes())) else {
            tracing::info!(run = %self.run, epoch, seen = decls.len(), "in no group of its own view");
            return Ok(None);
        };
        tracing::info!(
            run = %self.run,
            epoch,
            seen = decls.len(),
            group = plan.members.len(),
            leads = plan.members.first() == Some(&me.to_bytes()),
            "read the declarations"
        );
        if plan.members.first() != Some(&me.to_bytes()) {
            // A client accepts no inbound connections: open one to its leader, so that the
            // proposal and the commit can reach it.
            if offer.mode == PeerMode::Client
                && let Some(leader) = plan
                    .members
                    .first()
                    .and_then(|m| PeerId::from_bytes(m).ok())
                && let Err(e) = self.h.ping(leader).await
            {
                tracing::info!(run = %self.run, epoch, %leader, "cannot reach the leader: {e:#}");
            }
            return Ok(None);
        }
        // Join our own group, unless another leader got here first.
        {
            let mut s = lock(&self.state);
            if s.leader.is_some() {
                return Ok(None);
            }
            s.leader = Some(me);
        }
        let others = peer_ids(&plan.members[1..]);
        let propose = Request::Group(GroupRequest::Propose {
            run: self.run.clone(),
            epoch,
        });
        let answers = self.ask_all(&others, propose, cfg.answer_timeout).await;
        let accepted: Vec<Vec<u8>> = others
            .iter()
            .zip(&answers)
            .filter(|(_, a)| **a)
            .map(|(p, _)| p.to_bytes())
            .chain([me.to_bytes()])
            .collect();
        let members: Vec<Declaration> = decls
            .into_iter()
            .filter(|d| accepted.contains(&d.peer))
            .collect();
        let final_plans = plan_groups(
            &members,
            GroupRules {
                max_group: None,
                ..rules
            },
        );
        let Some(plan) = final_plans.into_iter().next() else {
            return Ok(None);
        };
        if plan.members.len() < 2 {
            tracing::info!(run = %self.run, epoch, "nobody joined this peer's group");
            return Ok(None);
        }
        let commit = GroupCommit {
            run: self.run.clone(),
            epoch,
            round: RoundId(rand::random()),
            members: plan.members.clone(),
            modes: plan.spec.modes.iter().map(|m| to_wire(*m)).collect(),
            weights: plan.spec.weights.clone(),
            shard_sizes: plan.spec.shard_sizes.iter().map(|&s| s as u64).collect(),
            part_len: plan.spec.part_len as u64,
            scheme: scheme_of(cfg.compression),
            aggregation: match cfg.aggregation {
                Aggregation::Mean => WireAggregation::Mean,
                Aggregation::CenteredClip { tau, iters } => {
                    WireAggregation::CenteredClip { tau, iters }
                }
            },
            predicted_s: plan.predicted_s,
        };
        let followers = peer_ids(&commit.members[1..]);
        let req = Request::Group(GroupRequest::Commit(commit.clone()));
        // Members that miss the commit are the round's ordinary fault (their shards stay
        // local, and everyone's report says so).
        let acks = self.ask_all(&followers, req, cfg.answer_timeout).await;
        if acks.iter().any(|a| !a) {
            tracing::warn!(run = %self.run, epoch, "a member did not take the commit");
        }
        group_of(&commit).map(Some)
    }

    /// Sends `req` to every peer at once; whether each accepted in time. A peer that cannot
    /// be reached yet is asked again until `timeout`: a client opens its connection to the
    /// leader only once it has read the declarations, which may be just after the proposal.
    async fn ask_all(&self, peers: &[PeerId], req: Request, timeout: Duration) -> Vec<bool> {
        let until = Instant::now() + timeout;
        let calls = peers.iter().map(|&p| {
            let req = req.clone();
            async move {
                loop {
                    let left = until.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, self.h.rpc_anywhere(p, req.clone())).await {
                        Ok(Ok(Response::Group(GroupResponse::Accept))) => return true,
                        Ok(Ok(other)) => {
                            tracing::debug!(peer = %p, ?other, "matchmaking request declined");
                            return false;
                        }
                        Ok(Err(e)) if Instant::now() + Duration::from_millis(200) < until => {
                            tracing::debug!(peer = %p, "matchmaking request failed, retrying: {e:#}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %p, "matchmaking request failed: {e:#}");
                            return false;
                        }
                        Err(_) => return false,
                    }
                }
            }
        });
        futures::future::join_all(calls).await
    }

    /// Stops answering leaders for this run.
    pub async fn close(self) {
        self.h.unregister_group_handler(self.run.clone()).await;
    }
}

/// The well-formed peer ids among `members` (bytes, as in plans and commits).
fn peer_ids(members: &[Vec<u8>]) -> Vec<PeerId> {
    members
        .iter()
        .filter_map(|m| PeerId::from_bytes(m).ok())
        .collect()
}

/// How often the declarations are read again while an expected one is missing.
const GRACE_POLL: Duration = Duration::from_millis(150);

/// How long past the deadline a peer waits for the declarations of peers that said they
/// would join: a third of the commit wait, so the followers (who wait the commit wait after
/// their own reading) still see the commit.
fn declaration_grace(cfg: &MatchConfig) -> Duration {
    cfg.commit_wait / 3
}

/// Which matchmaking attempt a peer is in: declarations of other attempts are ignored.
#[derive(Clone, Copy, Debug)]
struct Attempt {
    epoch: u64,
    /// Elements in the vector.
    len: usize,
    /// When this peer reads the declarations (unix ms).
    deadline_ms: u64,
    /// How far another peer's deadline may lie from ours and still be this attempt (peers
    /// agree on the start through the DHT, so they differ by a refresh at most; a failed
    /// attempt is followed by the next one no sooner than the commit wait).
    tolerance_ms: u64,
}

/// The valid declarations among `entries` for `attempt` (same vector length, a deadline
/// near ours).
fn declarations(entries: &[colony_protocol::DhtEntry], attempt: Attempt) -> Vec<Declaration> {
    crate::handle::owned_values::<GroupDeclaration>(entries)
        .filter_map(|(peer, d)| {
            let same = d.len == attempt.len as u64
                && d.deadline_ms.abs_diff(attempt.deadline_ms) <= attempt.tolerance_ms;
            if !same {
                tracing::debug!(%peer, len = d.len, deadline_ms = d.deadline_ms, "declaration of another attempt ignored");
            }
            same.then(|| Declaration {
                peer: peer.to_bytes(),
                mode: from_wire(d.mode),
                weight: d.weight,
                up: d.up,
                down: d.down,
            })
        })
        .collect()
}
