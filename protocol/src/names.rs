//! Versioned protocol names, gossip topics and the size limits every decoder enforces.
//!
//! A protocol name changes its trailing version whenever its wire format changes, so that two
//! nodes of different versions fail negotiation cleanly instead of misreading each other.

/// Peer RPC (request-response): [`crate::Request`] / [`crate::Response`].
pub const RPC_PROTOCOL: &str = "/colony/rpc/1";
/// Kademlia routing (our own protocol name keeps Colony out of the public IPFS DHT).
pub const KAD_PROTOCOL: &str = "/colony/kad/1";
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/colony/id/1";
/// The agent string prefix nodes announce.
pub const AGENT_PREFIX: &str = "colony";

/// Largest encoded RPC request or response, in bytes. Enforced while reading a stream.
pub const MAX_RPC_BYTES: usize = 4 * 1024 * 1024;
/// Largest value stored under one (key, subkey).
/// Largest bandwidth-probe payload or echo, either way.
pub const MAX_PROBE_BYTES: usize = 2 * 1024 * 1024;
/// Largest value of one DHT subkey.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Largest DHT key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Largest plain (unowned) subkey, in bytes.
pub const MAX_SUBKEY_BYTES: usize = 256;
/// Most entries in one store request.
pub const MAX_ENTRIES_PER_STORE: usize = 64;
/// Most subkeys a node keeps under one key.
pub const MAX_SUBKEYS_PER_KEY: usize = 1024;
/// Largest total size of the values a node keeps under one key (what a find may return).
pub const MAX_BYTES_PER_KEY: usize = 2 * 1024 * 1024;
/// Longest time a record may live: expirations further in the future are refused.
pub const MAX_TTL_MS: u64 = 24 * 60 * 60 * 1000;
/// Tolerated clock skew between nodes (hivemind assumes 3 s; we allow a little more).
pub const MAX_CLOCK_SKEW_MS: u64 = 5_000;
/// All-reduce parts and results.
pub const ALLREDUCE_PROTOCOL: &str = "/colony/allreduce/1";
/// Largest encoded all-reduce message (a part of up to a few MiB of values plus framing).
pub const MAX_PART_BYTES: usize = 8 * 1024 * 1024;

/// Largest gossip message.
pub const MAX_GOSSIP_BYTES: usize = 1024 * 1024;

/// The gossip topic on which patch jobs of a run travel.
pub fn patches_topic(run: &str) -> String {
    format!("colony/{run}/patches/1")
}
