//! Collaborative training (DeDLOC): models, data pipelines, optimizers, the collaborative step
//! and the bandwidth-aware all-reduce, behind an injected transport.
//!
//! Not yet built: this crate is reserved in the workspace so the dependency direction
//! (protocol ← trainer ← daemon) is fixed from the start. It will hold no sockets and no tokio.
