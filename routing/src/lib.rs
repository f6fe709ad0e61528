//! Graph routing: the similarity-graph index (HNSW), search under a distance-computation
//! budget, learned routing, and dataset readers.
//!
//! Not yet built: this crate is reserved in the workspace so the dependency direction
//! (protocol ← routing ← daemon) is fixed from the start. It will hold no networking.
