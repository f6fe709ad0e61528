//! All-reduce wire messages (`/colony/allreduce/1`): parts streamed to an aggregator and the
//! averages it sends back. One message per request; the response is an acknowledgement, so a
//! sender learns at once that its part arrived (or why not).

use serde::{Deserialize, Serialize};

use crate::names::MAX_PART_BYTES;
use crate::{CodecError, decode, encode};

/// Identifies one round of one group (chosen by the group's leader).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RoundId(pub [u8; 16]);

/// How the values of a part are encoded (the trainer crate implements the schemes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scheme {
    F32,
    F16,
    /// One f32 scale per `block` values, one signed byte per value.
    Int8Blockwise {
        block: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PartBody {
    /// The sender's copy of part `part` of the recipient's shard, with the sender's weight.
    Part {
        part: u32,
        weight: f64,
        scheme: Scheme,
        /// Raw bytes on the wire (not a sequence of integers): parts are megabytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The average of part `part` of the sender's shard.
    Result {
        part: u32,
        scheme: Scheme,
        /// Raw bytes on the wire (not a sequence of integers): parts are megabytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Part `part` had no positive weight left: keep local values.
    Unchanged { part: u32 },
    /// The sender finished and gave up on these members' shards (the confirmation step).
    Status { failed: Vec<u32> },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PartMessage {
    pub round: RoundId,
    /// The sender's index in the group.
    pub from: u32,
    pub body: PartBody,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartAck {
    Ok,
    /// The recipient knows no such round (yet, or any more).
    UnknownRound,
    Refused(String),
}

/// A peer's mode in a round, on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireMode {
    /// Sends its data and reduces a shard.
    Node,
    /// Sends its data and reduces nothing (accepts no inbound connections).
    Client,
    /// Reduces a shard and contributes no data.
    Aux,
}

/// What a peer declares for one matchmaking epoch of a run; stored owner-signed under
/// `run_group(run, epoch)` in the DHT, so the peer is the entry's owner.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupDeclaration {
    pub mode: WireMode,
    /// Samples behind this peer's vector (the weight of its data).
    pub weight: f64,
    /// Upload and download, bytes per second (measured, capped by the volunteer's config).
    pub up: f64,
    pub down: f64,
    /// Elements in the vector to average: peers only group with equal lengths.
    pub len: u64,
    /// The attempt: when this peer reads the declarations (unix ms). A declaration left
    /// from an earlier attempt at the same epoch (its peer gone, or grouped and moved on)
    /// is ignored by peers whose deadline lies far from it.
    pub deadline_ms: u64,
}

/// How aggregators combine the copies of a part, on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum WireAggregation {
    Mean,
    /// CenteredClip with radius `tau` (L2, per part) and `iters` iterations.
    CenteredClip {
        tau: f64,
        iters: u32,
    },
}

/// The group a leader committed to: everything a member needs to run the round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupCommit {
    pub run: String,
    pub epoch: u64,
    pub round: RoundId,
    /// Members' peer ids (bytes) in round order; member i reduces shard i.
    pub members: Vec<Vec<u8>>,
    pub modes: Vec<WireMode>,
    pub weights: Vec<f64>,
    pub shard_sizes: Vec<u64>,
    pub part_len: u64,
    pub scheme: Scheme,
    pub aggregation: WireAggregation,
    /// The leader's prediction of the round's duration at the declared bandwidths, seconds:
    /// members scale their deadlines by it.
    pub predicted_s: f64,
}

/// Matchmaking messages from a group's leader.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GroupRequest {
    /// Join my group for this epoch? A peer accepts one leader per epoch.
    Propose { run: String, epoch: u64 },
    /// The final group, over the peers that accepted; start the round now.
    Commit(GroupCommit),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupResponse {
    Accept,
    Decline(String),
}

impl PartMessage {
    pub fn to_bytes(&self) -> Result<Vec<u8>, CodecError> {
        encode(self, MAX_PART_BYTES)
    }
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CodecError> {
        decode(bytes, MAX_PART_BYTES)
    }
}

impl PartAck {
    pub fn to_bytes(&self) -> Result<Vec<u8>, CodecError> {
        encode(self, 64 * 1024)
    }
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CodecError> {
        decode(bytes, 64 * 1024)
    }
}
