//! Colony's wire protocol: the types that cross the network, their encoding, and the rules
//! that make them valid.
//!
//! This crate is sans-IO: it has no sockets, no tokio and reads no clock. Functions that need
//! the time take it as an argument (`now_ms`, Unix milliseconds), so the same rules run in the
//! daemon and in tests on a virtual clock.
//!
//! - [`names`]: versioned protocol names, gossip topics and size limits.
//! - [`codec`]: the one place that knows the byte encoding (bincode 2, size-limited decoding).
//! - [`identity`]: ed25519 node keys and signatures.
//! - [`dht`]: the DHT key schema, records with per-subkey expiry and ownership, the merge rule.
//! - [`rpc`]: peer RPC requests and responses.
//! - [`allreduce`]: all-reduce parts and results.
//! - [`infer`]: inference jobs (start, poll for tokens, cancel).
//! - [`route`]: nearest-neighbour shards (announcements, searches).
//! - [`patch`]: patch jobs (requests, patches, votes) and the version hash chain.
//! - [`envelope`]: signed envelopes for payloads that must be attributable to a node.

pub mod allreduce;
pub mod codec;
pub mod dht;
pub mod envelope;
pub mod identity;
pub mod infer;
pub mod names;
pub mod patch;
pub mod route;
pub mod rpc;
pub mod train;

pub use codec::{CodecError, decode, encode};
pub use dht::{DhtEntry, DhtKey, RecordError, Subkey};
pub use envelope::SignedEnvelope;
pub use identity::{NodeKeypair, NodePublicKey, Signature};
pub use rpc::{NodeInfo, Request, Response, RpcError, StoreOutcome};
