//! The bandwidth-aware butterfly all-reduce (DeDLOC), as pure algorithms: shard sizes from
//! measured bandwidths ([`balance`]), cutting the vector ([`partition`]), the per-shard reducer
//! with fault semantics ([`reducer`]), the round state machine ([`round`]), part compression
//! ([`compression`]) and robust aggregation ([`robust`]). Matchmaking and the transport come
//! next.

pub mod balance;
pub mod compression;
pub mod partition;
pub mod reducer;
pub mod robust;
pub mod round;
