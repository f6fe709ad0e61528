//! Peer RPC: one request, one response, over [`crate::names::RPC_PROTOCOL`].
//!
//! Later services add variants here (all-reduce parts, inference jobs, routing queries, patch
//! verification); a change that breaks old decoders bumps the protocol version.

use serde::{Deserialize, Serialize};

use crate::allreduce::{GroupRequest, GroupResponse};
use crate::dht::{DhtEntry, DhtKey};
use crate::names::MAX_RPC_BYTES;
use crate::train::{StateRequest, StateResponse};
use crate::{CodecError, decode, encode};

/// A request from one peer to another.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness and round-trip time; the response echoes the nonce and payload.
    Ping { nonce: u64, payload: Vec<u8> },
    /// What the peer is and what it offers.
    NodeInfo,
    /// Store these entries (at most [`crate::names::MAX_ENTRIES_PER_STORE`]).
    DhtStore { entries: Vec<DhtEntry> },
    /// All unexpired entries the peer holds under a key.
    DhtFind { key: DhtKey },
    /// Bandwidth probe: the peer discards `payload` and answers with `echo` bytes.
    Probe {
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        echo: u32,
    },
    /// All-reduce matchmaking (proposals and commits of a group's leader).
    Group(GroupRequest),
    /// Training-state download (a joiner fetching parameters and optimizer state).
    State(StateRequest),
    /// Inference jobs (Hogwild! decoding on a node that serves a model).
    Infer(crate::infer::InferRequest),
    /// Nearest-neighbour searches of a shard this node serves.
    Route(crate::route::RouteRequest),
}

/// The answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    Pong {
        nonce: u64,
        payload: Vec<u8>,
    },
    NodeInfo(NodeInfo),
    /// One outcome per stored entry, in request order.
    DhtStored {
        outcomes: Vec<StoreOutcome>,
    },
    DhtFound {
        entries: Vec<DhtEntry>,
    },
    Probe {
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    Group(GroupResponse),
    State(StateResponse),
    Error(RpcError),
    Infer(crate::infer::InferResponse),
    Route(crate::route::RouteResponse),
}

/// What happened to one entry of a store request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreOutcome {
    /// Stored (it is now the newest value under its subkey).
    Stored,
    /// Valid, but the peer already holds a value that supersedes it.
    Outdated,
    /// Refused; the reason is for the sender's log.
    Refused(String),
}

/// A request the peer could not serve.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcError {
    pub code: RpcErrorCode,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RpcErrorCode {
    BadRequest,
    TooLarge,
    Overloaded,
    Unavailable,
    Forbidden,
    Internal,
}

/// What a node tells others about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Software version, e.g. "colony/0.1.0".
    pub agent: String,
    /// Services offered ("dht", "train", "infer", "route", "patch").
    pub services: Vec<String>,
    /// Addresses the node listens on, as multiaddr strings.
    pub listen_addrs: Vec<String>,
    /// Whether the node accepts inbound connections (Kademlia server mode).
    pub reachable: bool,
    /// Seconds since the node started.
    pub uptime_s: u64,
}

impl Request {
    pub fn to_bytes(&self) -> Result<Vec<u8>, CodecError> {
        encode(self, MAX_RPC_BYTES)
    }
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CodecError> {
        decode(bytes, MAX_RPC_BYTES)
    }
    /// A short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Ping { .. } => "ping",
            Request::NodeInfo => "node_info",
            Request::DhtStore { .. } => "dht_store",
            Request::DhtFind { .. } => "dht_find",
            Request::Probe { .. } => "probe",
            Request::Group(_) => "group",
            Request::State(_) => "state",
            Request::Infer(_) => "infer",
            Request::Route(_) => "route",
        }
    }
}

impl Response {
    pub fn to_bytes(&self) -> Result<Vec<u8>, CodecError> {
        encode(self, MAX_RPC_BYTES)
    }
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CodecError> {
        decode(bytes, MAX_RPC_BYTES)
    }
    /// A short name for logs and error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Response::Pong { .. } => "pong",
            Response::NodeInfo(_) => "node_info",
            Response::DhtStored { .. } => "dht_stored",
            Response::DhtFound { .. } => "dht_found",
            Response::Probe { .. } => "probe",
            Response::Group(_) => "group",
            Response::State(_) => "state",
            Response::Error(_) => "error",
            Response::Infer(_) => "infer",
            Response::Route(_) => "route",
        }
    }

    pub fn error(code: RpcErrorCode, message: impl Into<String>) -> Self {
        Response::Error(RpcError {
            code,
            message: message.into(),
        })
    }
}
