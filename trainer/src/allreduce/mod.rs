//! The bandwidth-aware butterfly all-reduce (DeDLOC), as pure algorithms: shard sizes from
//! measured bandwidths ([`balance`]) and the per-shard reducer with fault semantics
//! ([`reducer`]). The round state machine and the transport come next.

pub mod balance;
pub mod partition;
pub mod reducer;
pub mod round;
