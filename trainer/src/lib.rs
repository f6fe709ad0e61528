//! Collaborative training (DeDLOC): models (ALBERT, SwAV on ResNets), text and image data
//! pipelines, optimizers on flat parameter vectors, the collaborative step logic, and the
//! bandwidth-aware all-reduce; Editable Training and what patch jobs are made of (`edit`).
//!
//! This crate holds no sockets and no tokio: the daemon provides the transport.

pub mod allreduce;
pub mod backend;
pub mod collab;
pub mod data;
pub mod edit;
pub mod models;
pub mod optim;
pub mod params;
pub use burn;
pub use image;
