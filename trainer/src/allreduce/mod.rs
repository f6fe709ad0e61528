//! The bandwidth-aware butterfly all-reduce (DeDLOC), as pure algorithms: shard sizes from
//! measured bandwidths ([`balance`]), cutting the vector ([`partition`]), the per-shard reducer
//! with fault semantics ([`reducer`]), the round state machine ([`round`]), part compression
//! ([`compression`]), robust aggregation ([`robust`]) and turning published declarations into
//! groups and plans ([`matchmaking`]); parts travel as shared views ([`values`]). The transport lives in the daemon.

pub mod balance;
pub mod compression;
pub mod matchmaking;
pub mod partition;
pub mod reducer;
pub mod robust;
pub mod round;
pub mod values;
