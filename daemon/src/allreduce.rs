//! One all-reduce round over the swarm: the trainer's pure [`Round`] state machine, driven by
//! the `/colony/allreduce/1` protocol. Parts to each peer go through a per-peer queue with a
//! window of messages in flight (pipelining); a peer whose messages cannot be delivered is
//! reported to the round as failed; the round's deadlines run on a 100 ms tick.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use colony_protocol::allreduce::{PartAck, PartBody, PartMessage, RoundId, Scheme};
use colony_trainer::allreduce::compression::{self, Compression};
use colony_trainer::allreduce::partition::part_lens;
use colony_trainer::allreduce::round::{
    Message, Output, Round, RoundConfig, RoundReport, RoundSpec,
};
use libp2p::PeerId;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use crate::handle::NodeHandle;

/// A group that agreed to average together.
#[derive(Clone, Debug)]
pub struct Group {
    pub round: RoundId,
    /// Members in the agreed order; index i reduces shard i.
    pub members: Vec<PeerId>,
    pub spec: RoundSpec,
    pub compression: Compression,
    /// Expected duration at the declared bandwidths, seconds (0 if unknown): deadlines are
    /// stretched to a multiple of it, so slow groups are not cut off by fixed timeouts.
    pub predicted_s: f64,
}

#[derive(Clone, Copy, Debug)]
pub struct DriveConfig {
    pub round: RoundConfig,
    /// Messages in flight to one peer.
    pub window: usize,
    /// The whole round fails after this long.
    pub timeout: Duration,
    /// A peer that has not started the round this long after we did is treated as failed
    /// (members start within milliseconds of the leader's commit).
    pub join_grace: Duration,
}

impl Default for DriveConfig {
    fn default() -> Self {
        Self {
            round: RoundConfig::default(),
            window: 2,
            timeout: Duration::from_secs(120),
            join_grace: Duration::from_secs(10),
        }
    }
}

/// Deadlines for a round expected to take `predicted_s`: results may be up to 3× late (plus
/// 10 s), the whole round 4× (plus 30 s); never shorter than configured. Unchanged when
/// nothing is predicted.
pub fn stretch(mut cfg: DriveConfig, predicted_s: f64) -> DriveConfig {
    if !(predicted_s.is_finite() && predicted_s > 0.0) {
        return cfg;
    }
    let p = predicted_s.min(86_400.0);
    let reducer_ms = (p * 3_000.0) as u64 + 10_000;
    cfg.round.reducer_timeout_ms = cfg.round.reducer_timeout_ms.max(reducer_ms);
    cfg.timeout = cfg.timeout.max(Duration::from_secs_f64(p * 4.0 + 30.0));
    cfg
}

pub fn scheme_of(c: Compression) -> Scheme {
    match c {
        Compression::None => Scheme::F32,
        Compression::Fp16 => Scheme::F16,
        Compression::Uint8Blockwise { block } => Scheme::Int8Blockwise { block },
    }
}

pub fn compression_of(s: Scheme) -> Compression {
    match s {
        Scheme::F32 => Compression::None,
        Scheme::F16 => Compression::Fp16,
        Scheme::Int8Blockwise { block } => Compression::Uint8Blockwise { block },
    }
}

/// What moved during one round, as this node saw it: payload bytes (after compression)
/// acknowledged by each member and received from each member, with the time of the last one
/// (seconds after the round started). Bytes over the time since the start are lower bounds
/// on the links' rates: [`crate::bandwidth::Monitor`] folds them in.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Transfers {
    /// How long the round took here, seconds.
    pub secs: f64,
    /// The leader's predicted duration (0 if none).
    pub predicted_s: f64,
    /// Indexed by member: (bytes, seconds after the start when the last was acknowledged).
    pub sent: Vec<(u64, f64)>,
    /// Indexed by member: (bytes, seconds after the start when the last arrived).
    pub received: Vec<(u64, f64)>,
    pub members: Vec<PeerId>,
}

impl Transfers {
    /// Total bytes and the time the last of them moved, over all members.
    pub fn total(v: &[(u64, f64)]) -> (u64, f64) {
        v.iter()
            .fold((0, 0.0), |(b, t), &(bytes, at)| (b + bytes, t.max(at)))
    }
}

/// One peer's running tally: payload bytes, and milliseconds after the start of the last.
#[derive(Debug, Default)]
struct Tally {
    bytes: AtomicU64,
    last_ms: AtomicU64,
}

impl Tally {
    fn add(&self, bytes: usize, at: Instant, t0: Instant) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        let ms = at.saturating_duration_since(t0).as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn get(&self) -> (u64, f64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.last_ms.load(Ordering::Relaxed) as f64 / 1e3,
        )
    }
}

fn payload_len(body: &PartBody) -> usize {
    match body {
        PartBody::Part { data, .. } | PartBody::Result { data, .. } => data.len(),
        PartBody::Unchanged { .. } | PartBody::Status { .. } => 0,
    }
}

/// Runs this node's part of `group`'s round on `vector` and returns how it ended.
pub async fn run_round(
    h: &NodeHandle,
    group: &Group,
    vector: Vec<f32>,
    cfg: DriveConfig,
) -> anyhow::Result<RoundReport> {
    Ok(run_round_measured(h, group, vector, cfg).await?.0)
}

/// [`run_round`], also returning what moved over the network.
pub async fn run_round_measured(
    h: &NodeHandle,
    group: &Group,
    vector: Vec<f32>,
    cfg: DriveConfig,
) -> anyhow::Result<(RoundReport, Transfers)> {
    let n = group.members.len();
    let me = group
        .members
        .iter()
        .position(|p| *p == h.peer_id())
        .context("this node is not in the group")?;
    let parts: Vec<Vec<usize>> = group
        .spec
        .shard_sizes
        .iter()
        .map(|&s| part_lens(s, group.spec.part_len))
        .collect();
    // The most messages this node can legitimately receive: every sender's parts of its shard,
    // every aggregator's results, and one status per member.
    let inbox = n * parts[me].len() + parts.iter().map(Vec::len).sum::<usize>() + 2 * n;
    let (tx, mut rx) = mpsc::channel(inbox.max(1));
    h.register_round(group.round, tx).await?;
    let t0 = Instant::now();
    let sent: Vec<Arc<Tally>> = (0..n).map(|_| Arc::default()).collect();
    let received: Vec<Tally> = (0..n).map(|_| Tally::default()).collect();
    let tallies = Tallies {
        t0,
        sent: &sent,
        received: &received,
    };
    let result = drive(h, group, me, &parts, vector, cfg, &mut rx, &tallies).await;
    h.unregister_round(group.round).await;
    let transfers = Transfers {
        secs: t0.elapsed().as_secs_f64(),
        predicted_s: group.predicted_s,
        sent: sent.iter().map(|t| t.get()).collect(),
        received: received.iter().map(Tally::get).collect(),
        members: group.members.clone(),
    };
    let (sent_bytes, _) = Transfers::total(&transfers.sent);
    let (received_bytes, _) = Transfers::total(&transfers.received);
    h.telemetry().round(crate::telemetry::RoundView {
        round: hex::encode(&group.round.0[..8]),
        t_ms: crate::clock::now_ms(),
        ok: result.is_ok(),
        error: result.as_ref().err().map(|e| format!("{e:#}")),
        seconds: transfers.secs,
        bound_s: group.predicted_s,
        members: group.members.iter().map(ToString::to_string).collect(),
        values: group.spec.shard_sizes.iter().sum(),
        bytes_sent: sent_bytes,
        bytes_received: received_bytes,
    });
    if result.is_err() {
        h.telemetry().error("allreduce_round_failed");
    }
    result.map(|r| (r, transfers))
}

struct Tallies<'a> {
    t0: Instant,
    sent: &'a [Arc<Tally>],
    received: &'a [Tally],
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    h: &NodeHandle,
    group: &Group,
    me: usize,
    parts: &[Vec<usize>],
    vector: Vec<f32>,
    cfg: DriveConfig,
    rx: &mut mpsc::Receiver<(PeerId, PartMessage)>,
    tallies: &Tallies<'_>,
) -> anyhow::Result<RoundReport> {
    let n = group.members.len();
    let cfg = stretch(cfg, group.predicted_s);
    let t0 = tallies.t0;
    let deadline = t0 + cfg.timeout;
    let now = || t0.elapsed().as_millis() as u64;
    let (fail_tx, mut fail_rx) = mpsc::channel::<usize>(n.max(1));
    let encoder = Encoder {
        round: group.round,
        from: me as u32,
        compression: group.compression,
    };
    // One queue and one sending task per peer.
    let mut queues = Vec::with_capacity(n);
    for to in 0..n {
        // Room for everything this round can send to `to` (its shard's parts, our shard's
        // results, a status), so queueing never waits; a queued part is a shared view, not a
        // copy.
        let room = parts[to].len() + parts[me].len() + 2;
        let (qtx, qrx) = mpsc::channel::<Message>(room);
        queues.push(qtx);
        if to != me {
            tokio::spawn(send_loop(
                h.clone(),
                group.members[to],
                to,
                qrx,
                encoder,
                cfg.window,
                (t0 + cfg.join_grace).min(deadline),
                fail_tx.clone(),
                (tallies.sent[to].clone(), t0),
            ));
        }
    }
    drop(fail_tx);

    let (mut round, outputs) = Round::start(me, group.spec.clone(), cfg.round, vector, now());
    if let Some(report) = apply(h, group, outputs, &queues).await {
        return Ok(report);
    }
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let outputs = tokio::select! {
            Some((peer, msg)) = rx.recv() => {
                let from = msg.from as usize;
                if group.members.get(from) != Some(&peer) {
                    h.report_offence(peer, format!("claimed to be member {from} of an all-reduce group")).await;
                    continue;
                }
                tallies.received[from].add(payload_len(&msg.body), Instant::now(), t0);
                match decode_body(msg.body, from, me, parts) {
                    Ok(m) => round.on_message(from, m, now()),
                    Err(why) => {
                        h.report_offence(peer, why).await;
                        round.on_peer_failed(from)
                    }
                }
            }
            Some(failed) = fail_rx.recv() => round.on_peer_failed(failed),
            _ = tick.tick() => round.tick(now()),
            _ = tokio::time::sleep_until(deadline) => bail!("all-reduce round timed out after {:?}", cfg.timeout),
        };
        if let Some(report) = apply(h, group, outputs, &queues).await {
            return Ok(report);
        }
    }
}

fn decode_body(
    body: PartBody,
    from: usize,
    me: usize,
    parts: &[Vec<usize>],
) -> Result<Message, String> {
    let len =
        |shard: usize, part: u32| parts.get(shard).and_then(|p| p.get(part as usize)).copied();
    match body {
        PartBody::Part {
            part,
            weight,
            scheme,
            data,
        } => {
            let values =
                len(me, part).ok_or(format!("sent part {part}, which this shard does not have"))?;
            let data = compression::decode(compression_of(scheme), &data, values)
                .map_err(|e| e.to_string())?;
            Ok(Message::Part {
                part: part as usize,
                weight,
                data: data.into(),
            })
        }
        PartBody::Result { part, scheme, data } => {
            let values = len(from, part).ok_or(format!(
                "sent a result for part {part}, which its shard does not have"
            ))?;
            let data = compression::decode(compression_of(scheme), &data, values)
                .map_err(|e| e.to_string())?;
            Ok(Message::Result {
                part: part as usize,
                data: data.into(),
            })
        }
        PartBody::Unchanged { part } => Ok(Message::Unchanged {
            part: part as usize,
        }),
        PartBody::Status { failed } => Ok(Message::Status {
            failed: failed.into_iter().map(|j| j as usize).collect(),
        }),
    }
}

/// Queues the round's messages (not yet encoded: each destination's sender encodes its own,
/// just before sending); returns the report when the round is done.
async fn apply(
    h: &NodeHandle,
    group: &Group,
    outputs: Vec<Output>,
    queues: &[mpsc::Sender<Message>],
) -> Option<RoundReport> {
    for o in outputs {
        match o {
            Output::Send { to, message } => {
                // A closed queue means that peer already failed; the round knows.
                if let Err(mpsc::error::TrySendError::Full(m)) = queues[to].try_send(message) {
                    let _ = queues[to].send(m).await;
                }
            }
            Output::Misbehaved {
                peer,
                reason,
                byzantine,
            } => {
                if byzantine {
                    h.report_byzantine(group.members[peer], reason).await
                } else {
                    h.report_offence(group.members[peer], reason).await
                }
            }
            Output::Done(report) => return Some(report),
        }
    }
    None
}

/// Puts a round message on the wire.
#[derive(Clone, Copy, Debug)]
struct Encoder {
    round: RoundId,
    from: u32,
    compression: Compression,
}

impl Encoder {
    fn encode(&self, message: &Message) -> PartMessage {
        let (c, scheme) = (self.compression, scheme_of(self.compression));
        let body = match message {
            Message::Part { part, weight, data } => PartBody::Part {
                part: *part as u32,
                weight: *weight,
                scheme,
                data: compression::encode(c, data),
            },
            Message::Result { part, data } => PartBody::Result {
                part: *part as u32,
                scheme,
                data: compression::encode(c, data),
            },
            Message::Unchanged { part } => PartBody::Unchanged { part: *part as u32 },
            Message::Status { failed } => PartBody::Status {
                failed: failed.iter().map(|&j| j as u32).collect(),
            },
        };
        PartMessage {
            round: self.round,
            from: self.from,
            body,
        }
    }
}

/// Delivers one peer's messages, `window` at a time, retrying until `join_by` while the peer
/// has not yet registered the round; reports the peer as failed if a message cannot be
/// delivered. Acknowledged payload bytes go to `tally`.
#[allow(clippy::too_many_arguments)]
async fn send_loop(
    h: NodeHandle,
    peer: PeerId,
    index: usize,
    mut rx: mpsc::Receiver<Message>,
    encoder: Encoder,
    window: usize,
    join_by: Instant,
    failed: mpsc::Sender<usize>,
    (tally, t0): (Arc<Tally>, Instant),
) {
    let sem = Arc::new(Semaphore::new(window.max(1)));
    let (err_tx, mut err_rx) = mpsc::channel::<()>(1);
    loop {
        let msg = tokio::select! {
            m = rx.recv() => match m { Some(m) => m, None => return },
            _ = err_rx.recv() => {
                let _ = failed.send(index).await;
                return;
            }
        };
        let Ok(permit) = sem.clone().acquire_owned().await else {
            return;
        };
        let (h, err_tx, tally) = (h.clone(), err_tx.clone(), tally.clone());
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                // Encoded per attempt (one copy; a retry is rare), not kept in a queue.
                let wire = encoder.encode(&msg);
                let bytes = payload_len(&wire.body);
                match h.send_part(peer, wire).await {
                    Ok(PartAck::Ok) => {
                        tally.add(bytes, Instant::now(), t0);
                        return;
                    }
                    Ok(PartAck::UnknownRound) if Instant::now() < join_by => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(other) => {
                        tracing::debug!(%peer, ?other, "all-reduce message refused");
                        let _ = err_tx.try_send(());
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(%peer, "all-reduce message failed: {e}");
                        let _ = err_tx.try_send(());
                        return;
                    }
                }
            }
        });
    }
}
