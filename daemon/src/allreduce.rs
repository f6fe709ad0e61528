//! One all-reduce round over the swarm: the trainer's pure [`Round`] state machine, driven by
//! the `/colony/allreduce/1` protocol. Parts to each peer go through a per-peer queue with a
//! window of messages in flight (pipelining); a peer whose messages cannot be delivered is
//! reported to the round as failed; the round's deadlines run on a 100 ms tick.

use std::sync::Arc;
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

/// Runs this node's part of `group`'s round on `vector` and returns how it ended.
pub async fn run_round(
    h: &NodeHandle,
    group: &Group,
    vector: Vec<f32>,
    cfg: DriveConfig,
) -> anyhow::Result<RoundReport> {
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
    let result = drive(h, group, me, &parts, vector, cfg, &mut rx).await;
    h.unregister_round(group.round).await;
    result
}

async fn drive(
    h: &NodeHandle,
    group: &Group,
    me: usize,
    parts: &[Vec<usize>],
    vector: Vec<f32>,
    cfg: DriveConfig,
    rx: &mut mpsc::Receiver<(PeerId, PartMessage)>,
) -> anyhow::Result<RoundReport> {
    let n = group.members.len();
    let cfg = stretch(cfg, group.predicted_s);
    let t0 = Instant::now();
    let deadline = t0 + cfg.timeout;
    let now = || t0.elapsed().as_millis() as u64;
    let (fail_tx, mut fail_rx) = mpsc::channel::<usize>(n.max(1));
    // One queue and one sending task per peer.
    let mut queues = Vec::with_capacity(n);
    for to in 0..n {
        let (qtx, qrx) = mpsc::channel::<PartMessage>(1024);
        queues.push(qtx);
        if to != me {
            tokio::spawn(send_loop(
                h.clone(),
                group.members[to],
                to,
                qrx,
                cfg.window,
                (t0 + cfg.join_grace).min(deadline),
                fail_tx.clone(),
            ));
        }
    }
    drop(fail_tx);

    let (mut round, outputs) = Round::start(me, group.spec.clone(), cfg.round, vector, now());
    if let Some(report) = apply(h, group, me, outputs, &queues).await {
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
        if let Some(report) = apply(h, group, me, outputs, &queues).await {
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
                data,
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
                data,
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

/// Queues the round's messages; returns the report when the round is done.
async fn apply(
    h: &NodeHandle,
    group: &Group,
    me: usize,
    outputs: Vec<Output>,
    queues: &[mpsc::Sender<PartMessage>],
) -> Option<RoundReport> {
    let scheme = scheme_of(group.compression);
    for o in outputs {
        match o {
            Output::Send { to, message } => {
                let body = match message {
                    Message::Part { part, weight, data } => PartBody::Part {
                        part: part as u32,
                        weight,
                        scheme,
                        data: compression::encode(group.compression, &data),
                    },
                    Message::Result { part, data } => PartBody::Result {
                        part: part as u32,
                        scheme,
                        data: compression::encode(group.compression, &data),
                    },
                    Message::Unchanged { part } => PartBody::Unchanged { part: part as u32 },
                    Message::Status { failed } => PartBody::Status {
                        failed: failed.into_iter().map(|j| j as u32).collect(),
                    },
                };
                let msg = PartMessage {
                    round: group.round,
                    from: me as u32,
                    body,
                };
                // A closed queue means that peer already failed; the round knows.
                let _ = queues[to].send(msg).await;
            }
            Output::Misbehaved { peer, reason } => {
                h.report_offence(group.members[peer], reason).await
            }
            Output::Done(report) => return Some(report),
        }
    }
    None
}

/// Delivers one peer's messages, `window` at a time, retrying until `join_by` while the peer
/// has not yet registered the round; reports the peer as failed if a message cannot be
/// delivered.
async fn send_loop(
    h: NodeHandle,
    peer: PeerId,
    index: usize,
    mut rx: mpsc::Receiver<PartMessage>,
    window: usize,
    join_by: Instant,
    failed: mpsc::Sender<usize>,
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
        let (h, err_tx) = (h.clone(), err_tx.clone());
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                match h.send_part(peer, msg.clone()).await {
                    Ok(PartAck::Ok) => return,
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
