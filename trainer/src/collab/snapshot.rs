//! Training-state snapshots: what a joiner downloads and what a checkpoint holds.
//!
//! Layout (little-endian): `COLONYTS` magic, format version u32, model fingerprint (32 B),
//! global step u64, three lengths u64 (parameters, first moments, second moments), the f32
//! values, then SHA-256 of everything before it. Decoding checks every length against the
//! bytes present and the checksum before building anything.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::optim::OptimizerState;

const MAGIC: &[u8; 8] = b"COLONYTS";
const VERSION: u32 = 1;
const HEADER: usize = 8 + 4 + 32 + 8 + 3 * 8;

/// Parameters + optimizer state of one model at one global step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub fingerprint: [u8; 32],
    pub params: Vec<f32>,
    pub opt: OptimizerState,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("not a training-state snapshot (bad magic)")]
    Magic,
    #[error("snapshot format version {0} is not supported (this build reads 1)")]
    Version(u32),
    #[error("snapshot is truncated or has trailing bytes: {got} bytes, its header says {want}")]
    Length { got: usize, want: usize },
    #[error("snapshot checksum mismatch: the data is corrupt")]
    Checksum,
    #[error("snapshot is larger than the {0}-byte limit")]
    TooLarge(usize),
}

impl TrainState {
    /// The global step the state is at.
    pub fn epoch(&self) -> u64 {
        self.opt.step
    }

    pub fn encode(&self) -> Vec<u8> {
        let floats = self.params.len() + self.opt.first.len() + self.opt.second.len();
        let mut out = Vec::with_capacity(HEADER + 4 * floats + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(&self.opt.step.to_le_bytes());
        for v in [&self.params, &self.opt.first, &self.opt.second] {
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
        }
        for v in [&self.params, &self.opt.first, &self.opt.second] {
            for x in v.iter() {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Decodes a snapshot of at most `max_bytes`.
    pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Self, SnapshotError> {
        if bytes.len() > max_bytes {
            return Err(SnapshotError::TooLarge(max_bytes));
        }
        if bytes.len() < HEADER + 32 || &bytes[..8] != MAGIC {
            return Err(SnapshotError::Magic);
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or([0; 8]));
        let version = u32_at(8);
        if version != VERSION {
            return Err(SnapshotError::Version(version));
        }
        let mut fingerprint = [0u8; 32];
        fingerprint.copy_from_slice(&bytes[12..44]);
        let step = u64_at(44);
        let lens = [u64_at(52), u64_at(60), u64_at(68)];
        let want = lens
            .iter()
            .try_fold(HEADER as u64 + 32, |acc, &l| {
                l.checked_mul(4).and_then(|b| acc.checked_add(b))
            })
            .unwrap_or(u64::MAX);
        if want != bytes.len() as u64 {
            return Err(SnapshotError::Length {
                got: bytes.len(),
                want: usize::try_from(want).unwrap_or(usize::MAX),
            });
        }
        let body = bytes.len() - 32;
        if Sha256::digest(&bytes[..body])[..] != bytes[body..] {
            return Err(SnapshotError::Checksum);
        }
        let mut at = HEADER;
        let mut take = |n: u64| {
            let n = n as usize;
            let v: Vec<f32> = bytes[at..at + 4 * n]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            at += 4 * n;
            v
        };
        let params = take(lens[0]);
        let first = take(lens[1]);
        let second = take(lens[2]);
        Ok(Self {
            fingerprint,
            params,
            opt: OptimizerState {
                step,
                first,
                second,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> TrainState {
        TrainState {
            fingerprint: [7; 32],
            params: vec![1.0, -2.5, 3.25],
            opt: OptimizerState {
                step: 42,
                first: vec![0.1, 0.2, 0.3],
                second: vec![],
            },
        }
    }

    #[test]
    fn round_trips_and_rejects_every_corruption() {
        let s = state();
        let b = s.encode();
        assert_eq!(TrainState::decode(&b, 1 << 20).unwrap(), s);
        assert_eq!(TrainState::decode(&b, 10), Err(SnapshotError::TooLarge(10)));
        assert!(matches!(
            TrainState::decode(&b[..b.len() - 1], 1 << 20),
            Err(SnapshotError::Length { .. })
        ));
        for i in [0, 9, 20, 50, 60, HEADER + 3, b.len() - 1] {
            let mut c = b.clone();
            c[i] ^= 0x40;
            assert!(
                TrainState::decode(&c, 1 << 20).is_err(),
                "flip at {i} accepted"
            );
        }
        // Lengths that overflow are a length error, not a panic.
        let mut c = b.clone();
        c[52..60].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            TrainState::decode(&c, 1 << 20),
            Err(SnapshotError::Length { .. })
        ));
    }
}
