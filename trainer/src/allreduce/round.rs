//! One all-reduce round as seen by one peer: a pure state machine driven by
//! [`Round::start`], [`Round::on_message`], [`Round::on_peer_failed`] and [`Round::tick`], each
//! returning what to send. Time is a caller-supplied millisecond clock, so the same code runs
//! over the daemon's transport and in tests on a virtual clock.
//!
//! Every peer of the group holds the same [`RoundSpec`] (from matchmaking): members in order,
//! their modes and weights, and the shard sizes. Member `j`'s shard is element range `j` of
//! the vector; a member with an empty shard (a client) reduces nothing.
//!
//! States: `Running` until every shard is settled (all its parts averaged, or its aggregator
//! failed) and, for an aggregator, every part of its own shard has been answered; then
//! `Confirming`: each peer that holds a result tells the others which aggregators it gave up
//! on ([`Message::Status`]) and waits for theirs (bounded by the round's deadlines). The union
//! is the round's verdict: every listed shard is put back to this peer's own values, even
//! parts that did arrive averaged, so that peers which heard from a dying aggregator and peers
//! which did not end up agreeing. Then `Done` with a [`RoundReport`]. Statuses travel between
//! every pair of senders of which at least one aggregates (clients cannot reach each other).

use std::ops::Range;
use std::sync::Arc;

use super::balance::PeerMode;
use super::partition::{part_lens, shard_ranges};
use super::reducer::{Aggregation, ReduceError, ShardReducer};
use super::values::Values;

/// The plan every member of a group agrees on.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundSpec {
    pub modes: Vec<PeerMode>,
    /// Sample counts; the mean is weighted by them. Aux peers' weights are ignored.
    pub weights: Vec<f64>,
    /// Elements of the vector each member reduces (0 for clients).
    pub shard_sizes: Vec<usize>,
    /// Elements per streamed part.
    pub part_len: usize,
    /// How aggregators combine the copies of a part.
    pub aggregation: Aggregation,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundConfig {
    /// An aggregator drops a sender it has heard nothing from for this long.
    pub sender_timeout_ms: u64,
    /// A sender keeps its local values for a shard whose results are this late.
    pub reducer_timeout_ms: u64,
    /// After the reducer timeout, how much longer a peer waits for the others' statuses.
    pub confirm_grace_ms: u64,
}

impl Default for RoundConfig {
    fn default() -> Self {
        Self {
            sender_timeout_ms: 15_000,
            reducer_timeout_ms: 30_000,
            confirm_grace_ms: 5_000,
        }
    }
}

/// A message between members of a round.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// A sender's copy of part `part` of the recipient's shard.
    Part {
        part: usize,
        weight: f64,
        data: Values,
    },
    /// The average of part `part` of the sender's shard.
    Result { part: usize, data: Values },
    /// Part `part` of the sender's shard had no contributor with a positive weight left:
    /// every sender keeps its own values for it.
    Unchanged { part: usize },
    /// The sender is done and gave up on these aggregators' shards.
    Status { failed: Vec<usize> },
}

/// What the caller must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    Send {
        to: usize,
        message: Message,
    },
    /// A peer broke the protocol; drop it (the round already treats it as failed).
    /// `byzantine`: what it sent was well-formed but poisoned (non-finite values, an outlier
    /// copy): a deliberate or broken peer that should not take part again.
    Misbehaved {
        peer: usize,
        reason: String,
        byzantine: bool,
    },
    Done(RoundReport),
}

/// How a round ended, for this peer.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundReport {
    /// The averaged vector (senders only; aux peers get `None`).
    pub result: Option<Vec<f32>>,
    /// Aggregators whose shard holds this peer's own values (they failed, were too late, or
    /// another peer said so), agreed by every peer whose status arrived.
    pub failed_aggregators: Vec<usize>,
    /// Senders this peer's reducer dropped.
    pub failed_senders: Vec<usize>,
}

#[derive(Debug)]
pub struct Round {
    me: usize,
    spec: RoundSpec,
    config: RoundConfig,
    ranges: Vec<Range<usize>>,
    parts: Vec<Vec<usize>>,
    /// The result, filled part by part: averages as they arrive, this peer's own values for
    /// parts that come back `Unchanged` and for shards given up on. Starts as zeroed memory
    /// the OS maps lazily, so starting a round copies nothing.
    vector: Vec<f32>,
    /// Its values before the round (senders only): the source of the parts it sends (shared
    /// with the messages, not copied) and of failed shards put back.
    original: Arc<Vec<f32>>,
    /// Statuses received, by member.
    statuses: Vec<Option<Vec<usize>>>,
    confirming: bool,
    now_ms: u64,
    /// Which parts of each shard have come back averaged.
    got: Vec<Vec<bool>>,
    aggregator_failed: Vec<bool>,
    reducer: Option<ShardReducer>,
    /// Parts of this peer's own shard already answered.
    answered: Vec<bool>,
    sender_failed: Vec<bool>,
    last_heard: Vec<u64>,
    started_ms: u64,
    done: bool,
}

fn sends(spec: &RoundSpec, i: usize) -> bool {
    spec.modes[i].sends()
}

impl Round {
    /// Starts the round: returns the parts to stream to every other aggregator.
    pub fn start(
        me: usize,
        spec: RoundSpec,
        config: RoundConfig,
        vector: Vec<f32>,
        now_ms: u64,
    ) -> (Self, Vec<Output>) {
        let n = spec.modes.len();
        let ranges = shard_ranges(&spec.shard_sizes);
        let parts: Vec<Vec<usize>> = spec
            .shard_sizes
            .iter()
            .map(|&s| part_lens(s, spec.part_len))
            .collect();
        let got = parts.iter().map(|p| vec![false; p.len()]).collect();
        let reducer = spec.modes[me]
            .aggregates()
            .then(|| ShardReducer::with_aggregation(&parts[me], n, spec.aggregation));
        let answered = vec![false; parts[me].len()];
        let (original, vector) = if spec.modes[me].sends() {
            let len = vector.len();
            (Arc::new(vector), vec![0.0; len])
        } else {
            (Arc::new(Vec::new()), Vec::new())
        };
        let mut round = Self {
            me,
            config,
            ranges,
            parts,
            vector,
            original,
            statuses: vec![None; n],
            confirming: false,
            now_ms,
            got,
            aggregator_failed: vec![false; n],
            reducer,
            answered,
            sender_failed: vec![false; n],
            last_heard: vec![now_ms; n],
            started_ms: now_ms,
            done: false,
            spec,
        };
        let mut out = Vec::new();
        if let Some(r) = &mut round.reducer {
            // Members that send nothing never owe parts.
            for i in 0..n {
                if !sends(&round.spec, i) {
                    r.sender_failed(i);
                }
            }
        }
        if sends(&round.spec, me) {
            let weight = round.spec.weights[me];
            // Part k to every aggregator before part k + 1 to any, so a transport that sends
            // in this order reaches every aggregator at once.
            let most = round.parts.iter().map(Vec::len).max().unwrap_or(0);
            for k in 0..most {
                for j in (0..n).filter(|&j| k < round.parts[j].len()) {
                    let range = round.part_range(j, k);
                    if j == me {
                        let r = round.reducer.as_mut().expect("an aggregator has a reducer");
                        r.add(me, k, weight, &round.original[range])
                            .expect("own part is well-formed");
                    } else {
                        out.push(Output::Send {
                            to: j,
                            message: Message::Part {
                                part: k,
                                weight,
                                data: Values::slice(&round.original, range),
                            },
                        });
                    }
                }
            }
        }
        round.answer_complete_parts(&mut out);
        round.check_done(&mut out);
        (round, out)
    }

    fn part_range(&self, shard: usize, part: usize) -> Range<usize> {
        let start = self.ranges[shard].start + self.parts[shard][..part].iter().sum::<usize>();
        start..start + self.parts[shard][part]
    }

    /// Handles a message from member `from`.
    pub fn on_message(&mut self, from: usize, message: Message, now_ms: u64) -> Vec<Output> {
        let mut out = Vec::new();
        if self.done || from >= self.spec.modes.len() {
            return out;
        }
        self.now_ms = self.now_ms.max(now_ms);
        match message {
            Message::Status { failed } => {
                let n = self.spec.modes.len();
                if !sends(&self.spec, from) || failed.iter().any(|&j| j >= n) {
                    out.push(Output::Misbehaved {
                        peer: from,
                        byzantine: false,
                        reason: "sent a malformed round status".into(),
                    });
                } else {
                    self.statuses[from] = Some(failed);
                }
            }
            Message::Part { part, weight, data } => {
                let Some(r) = &mut self.reducer else {
                    out.push(Output::Misbehaved {
                        peer: from,
                        byzantine: false,
                        reason: "sent a part to a peer that reduces nothing".into(),
                    });
                    return out;
                };
                if self.sender_failed[from] {
                    return out;
                }
                self.last_heard[from] = now_ms;
                match r.add(from, part, weight, &data) {
                    Ok(()) => {}
                    Err(ReduceError::SenderFailed(_)) => {}
                    Err(e) => {
                        out.push(Output::Misbehaved {
                            peer: from,
                            byzantine: matches!(e, ReduceError::NotFinite { .. }),
                            reason: e.to_string(),
                        });
                        self.drop_sender(from, &mut out);
                    }
                }
                self.answer_complete_parts(&mut out);
            }
            // A result from an aggregator this peer already gave up on (too late) is ignored:
            // the shard stays local, as the report says.
            Message::Result { .. } | Message::Unchanged { .. } if self.aggregator_failed[from] => {}
            Message::Result { part, data } => {
                let ok = sends(&self.spec, self.me)
                    && part < self.parts[from].len()
                    && data.len() == self.parts[from][part]
                    && data.iter().all(|x| x.is_finite());
                if !ok {
                    out.push(Output::Misbehaved {
                        peer: from,
                        byzantine: false,
                        reason: format!("sent a bad result for part {part}"),
                    });
                    self.aggregator_failed[from] = true;
                } else if !self.got[from][part] {
                    let range = self.part_range(from, part);
                    self.vector[range].copy_from_slice(&data);
                    self.got[from][part] = true;
                }
            }
            Message::Unchanged { part } => {
                if sends(&self.spec, self.me) && part < self.parts[from].len() {
                    if !self.got[from][part] {
                        let range = self.part_range(from, part);
                        self.vector[range.clone()].copy_from_slice(&self.original[range]);
                    }
                    self.got[from][part] = true;
                } else {
                    out.push(Output::Misbehaved {
                        peer: from,
                        byzantine: false,
                        reason: format!("sent a bad result for part {part}"),
                    });
                }
            }
        }
        self.check_done(&mut out);
        out
    }

    /// Member `peer` is gone (the transport saw its connection fail).
    pub fn on_peer_failed(&mut self, peer: usize) -> Vec<Output> {
        let mut out = Vec::new();
        if self.done || peer >= self.spec.modes.len() {
            return out;
        }
        self.drop_sender(peer, &mut out);
        if self.spec.modes[peer].aggregates() && self.got[peer].iter().any(|g| !g) {
            self.aggregator_failed[peer] = true;
        }
        self.check_done(&mut out);
        out
    }

    /// Applies the deadlines.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Output> {
        let mut out = Vec::new();
        if self.done {
            return out;
        }
        self.now_ms = self.now_ms.max(now_ms);
        if self.reducer.is_some() {
            for s in 0..self.spec.modes.len() {
                let owes = sends(&self.spec, s)
                    && !self.sender_failed[s]
                    && (0..self.parts[self.me].len()).any(|k| {
                        !self
                            .reducer
                            .as_ref()
                            .is_some_and(|r| r.contributors(k).contains(&s))
                    });
                if owes
                    && now_ms.saturating_sub(self.last_heard[s]) >= self.config.sender_timeout_ms
                {
                    self.drop_sender(s, &mut out);
                }
            }
        }
        if now_ms.saturating_sub(self.started_ms) >= self.config.reducer_timeout_ms {
            for j in 0..self.spec.modes.len() {
                if j != self.me && self.got[j].iter().any(|g| !g) {
                    self.aggregator_failed[j] = true;
                }
            }
        }
        self.check_done(&mut out);
        out
    }

    fn drop_sender(&mut self, s: usize, out: &mut Vec<Output>) {
        if s == self.me || self.sender_failed[s] {
            return;
        }
        self.sender_failed[s] = true;
        if let Some(r) = &mut self.reducer {
            r.sender_failed(s);
        }
        self.answer_complete_parts(out);
    }

    /// Sends the average of every newly complete part of this peer's shard to every live
    /// sender, and keeps it locally.
    fn answer_complete_parts(&mut self, out: &mut Vec<Output>) {
        // Outliers in newly complete parts (CenteredClip): their senders are dropped from the
        // round like a sender of NaNs, and reported.
        if let Some(r) = &mut self.reducer {
            for k in 0..self.answered.len() {
                if self.answered[k] || !r.is_complete(k) {
                    continue;
                }
                for s in r.outliers(k) {
                    r.exclude(s, k);
                    if s != self.me && !self.sender_failed[s] {
                        self.sender_failed[s] = true;
                        r.sender_failed(s);
                        out.push(Output::Misbehaved {
                            peer: s,
                            byzantine: true,
                            reason: format!(
                                "sent a copy of part {k} over {} times the median norm",
                                crate::allreduce::reducer::OUTLIER_NORM_RATIO
                            ),
                        });
                    }
                }
            }
        }
        let Some(r) = &self.reducer else { return };
        let mut done_parts = Vec::new();
        for k in 0..self.answered.len() {
            if !self.answered[k] && r.is_complete(k) {
                // With no positive weight at all, the part keeps everyone's own values.
                let mean = r.mean(k);
                done_parts.push((k, mean));
            }
        }
        for (k, mean) in done_parts {
            self.answered[k] = true;
            let mean = mean.map(Values::from);
            for s in 0..self.spec.modes.len() {
                if s != self.me && sends(&self.spec, s) && !self.sender_failed[s] {
                    let message = match &mean {
                        Some(m) => Message::Result {
                            part: k,
                            data: m.clone(),
                        },
                        None => Message::Unchanged { part: k },
                    };
                    out.push(Output::Send { to: s, message });
                }
            }
            if sends(&self.spec, self.me) {
                let range = self.part_range(self.me, k);
                match &mean {
                    Some(m) => self.vector[range].copy_from_slice(&m[..]),
                    None => self.vector[range.clone()].copy_from_slice(&self.original[range]),
                }
                self.got[self.me][k] = true;
            }
        }
        if !sends(&self.spec, self.me) {
            // An aux peer needs no results of its own.
            for g in &mut self.got {
                g.iter_mut().for_each(|x| *x = true);
            }
        }
    }

    /// Whether `me` and `j` exchange statuses: both hold results, and one of them aggregates
    /// (two clients have no connection to each other).
    fn status_peer(&self, j: usize) -> bool {
        j != self.me
            && sends(&self.spec, self.me)
            && sends(&self.spec, j)
            && (self.spec.modes[self.me].aggregates() || self.spec.modes[j].aggregates())
    }

    fn own_failures(&self) -> Vec<usize> {
        (0..self.spec.modes.len())
            .filter(|&j| self.aggregator_failed[j])
            .collect()
    }

    fn check_done(&mut self, out: &mut Vec<Output>) {
        if self.done {
            return;
        }
        let n = self.spec.modes.len();
        if !self.confirming {
            let own_answered = self.answered.iter().all(|a| *a);
            let settled =
                (0..n).all(|j| self.aggregator_failed[j] || self.got[j].iter().all(|g| *g));
            if !(own_answered && settled) {
                return;
            }
            self.confirming = true;
            let failed = self.own_failures();
            // Also to aggregators this peer gave up on: they may only be slow, and must learn
            // that their own shard is to stay local.
            for j in 0..n {
                if self.status_peer(j) && !self.sender_failed[j] {
                    out.push(Output::Send {
                        to: j,
                        message: Message::Status {
                            failed: failed.clone(),
                        },
                    });
                }
            }
        }
        // Wait for every live status peer, or until every live peer must have settled.
        let waiting = (0..n).any(|j| {
            self.status_peer(j)
                && !self.sender_failed[j]
                && !self.aggregator_failed[j]
                && self.statuses[j].is_none()
        });
        let deadline =
            self.started_ms + self.config.reducer_timeout_ms + self.config.confirm_grace_ms;
        if waiting && self.now_ms < deadline {
            return;
        }
        // The verdict: every shard anyone gave up on stays local here too.
        let mut verdict = vec![false; n];
        for j in self.own_failures() {
            verdict[j] = true;
        }
        for st in self.statuses.iter().flatten() {
            for &j in st {
                verdict[j] = true;
            }
        }
        if sends(&self.spec, self.me) {
            for j in (0..n).filter(|&j| verdict[j]) {
                let range = self.ranges[j].clone();
                self.vector[range.clone()].copy_from_slice(&self.original[range]);
                self.aggregator_failed[j] = true;
            }
        }
        self.done = true;
        let failed_aggregators = self.own_failures();
        let failed_senders = (0..self.spec.modes.len())
            .filter(|&s| self.sender_failed[s] && sends(&self.spec, s))
            .collect();
        let result = sends(&self.spec, self.me).then(|| std::mem::take(&mut self.vector));
        out.push(Output::Done(RoundReport {
            result,
            failed_aggregators,
            failed_senders,
        }));
    }

    pub fn is_done(&self) -> bool {
        self.done
    }
}
