//! Colony's multi-node scenarios: in-process swarms, the real binary as processes, and hosts
//! in network namespaces.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod allreduce;
mod chaos;
mod in_process;
mod infer;
mod matchmaking;
mod misbehaviour;
mod netns_allreduce;
mod netns_dht;
mod netns_relay;
mod netns_train;
mod patch;
mod processes;
mod route;
mod train;
