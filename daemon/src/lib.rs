//! The Colony node: a libp2p swarm (Kademlia, gossipsub, request-response, identify, ping,
//! AutoNAT, relay, DCUtR over QUIC and TCP) owned by one actor, a DHT with hivemind's
//! semantics on top of it, the HTTP API, and the `colony` command line.
//!
//! This crate wires libraries to the network. It holds no model maths: training, inference
//! and routing live in their own crates and reach the network only through here.

pub mod allreduce;
pub mod bandwidth;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dashboard;
pub mod demo;
pub mod dht;
pub mod edit_cli;
pub mod handle;
pub mod http;
pub mod identity;
pub mod infer_cli;
pub mod infer_service;
pub mod local;
pub mod matchmaking;
pub mod metrics;
pub mod netlab;
pub mod node;
pub mod openai;
pub mod patch_service;
pub mod route_cli;
pub mod route_service;
pub mod storage;
pub mod swarm;
pub mod swav_job;
pub mod telemetry;
pub mod train;
pub mod train_cli;

pub use config::{NodeConfig, Reachability};
pub use handle::NodeHandle;
pub use node::Node;
