//! Collaborative-training wire types: the progress record each peer keeps in the DHT under
//! `run_progress(run)`, and the state-download RPC a joiner uses to fetch parameters and
//! optimizer state from several peers at once.

use serde::{Deserialize, Serialize};

/// Largest chunk of a state snapshot one RPC carries.
pub const MAX_STATE_CHUNK: u32 = 1024 * 1024;

/// A peer's training progress (value of its owned subkey under `run_progress(run)`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainProgress {
    /// Model + tokenizer fingerprint: peers with another one are ignored.
    pub fingerprint: [u8; 32],
    /// The global step this peer accumulates for.
    pub epoch: u64,
    pub samples: u64,
    pub samples_per_sec: f64,
    /// When this record was written (unix ms).
    pub time_ms: u64,
    /// Accepts no inbound connections.
    pub client: bool,
    /// The all-reduce start this peer proposes for `epoch` (unix ms).
    pub ready_at_ms: Option<u64>,
    /// Serves its state snapshot for this epoch to joiners.
    pub serves_state: bool,
    /// Mean training loss over the last steps (for dashboards; not trusted).
    pub loss: Option<f32>,
    /// SHA-256 of this peer's state (parameters and optimizer) at `epoch`, once it has one:
    /// peers at one epoch with different states (islands of a healed partition) reconcile
    /// on the majority's.
    pub state_digest: Option<[u8; 32]>,
}

/// State download requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StateRequest {
    /// Which snapshot does the peer serve for `run`?
    Describe { run: String },
    /// Bytes `[offset, offset + len)` of the snapshot with this digest.
    Chunk {
        run: String,
        digest: [u8; 32],
        offset: u64,
        len: u32,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StateResponse {
    /// The snapshot served: its global step, size and SHA-256.
    Described {
        epoch: u64,
        size: u64,
        digest: [u8; 32],
    },
    Chunk {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// No such run or snapshot (any more); the reason is for the log.
    Unavailable(String),
}
