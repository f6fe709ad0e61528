//! Collaborative training (DeDLOC): the bandwidth-aware all-reduce, and (to come) models, data
//! pipelines, optimizers and the collaborative step, behind an injected transport.
//!
//! This crate holds no sockets and no tokio: the daemon provides the transport.

pub mod allreduce;
