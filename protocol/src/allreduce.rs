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
        data: Vec<u8>,
    },
    /// The average of part `part` of the sender's shard.
    Result {
        part: u32,
        scheme: Scheme,
        data: Vec<u8>,
    },
    /// Part `part` had no positive weight left: keep local values.
    Unchanged { part: u32 },
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
