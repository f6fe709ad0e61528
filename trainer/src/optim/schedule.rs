//! Learning-rate schedules keyed to the global step (the collaborative epoch), so every peer
//! uses the same rate for the same step whenever it joined.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Schedule {
    /// Linear warm-up to `peak`, then linear decay to zero at `total` (ALBERT/BERT).
    LinearWarmupDecay {
        peak: f32,
        warmup: u64,
        total: u64,
    },
    /// Linear warm-up, then cosine decay to `floor` at `total` (SwAV).
    WarmupCosine {
        peak: f32,
        floor: f32,
        warmup: u64,
        total: u64,
    },
    Constant(f32),
}

impl Schedule {
    /// The rate for global step `step` (0-based: the rate of the first step is `rate(0)`).
    pub fn rate(&self, step: u64) -> f32 {
        match *self {
            Self::Constant(r) => r,
            Self::LinearWarmupDecay {
                peak,
                warmup,
                total,
            } => {
                if step < warmup {
                    peak * (step + 1) as f32 / warmup as f32
                } else if step >= total {
                    0.0
                } else {
                    peak * (total - step) as f32 / (total - warmup).max(1) as f32
                }
            }
            Self::WarmupCosine {
                peak,
                floor,
                warmup,
                total,
            } => {
                if step < warmup {
                    peak * (step + 1) as f32 / warmup as f32
                } else if step >= total {
                    floor
                } else {
                    let p = (step - warmup) as f32 / (total - warmup).max(1) as f32;
                    floor + 0.5 * (peak - floor) * (1.0 + (std::f32::consts::PI * p).cos())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = Schedule::LinearWarmupDecay {
            peak: 1.0,
            warmup: 4,
            total: 12,
        };
        assert_eq!(s.rate(0), 0.25);
        assert_eq!(s.rate(3), 1.0);
        assert_eq!(s.rate(4), 1.0);
        assert_eq!(s.rate(8), 0.5);
        assert_eq!(s.rate(12), 0.0);
        let c = Schedule::WarmupCosine {
            peak: 1.0,
            floor: 0.0,
            warmup: 0,
            total: 10,
        };
        assert!((c.rate(5) - 0.5).abs() < 1e-6);
        assert_eq!(c.rate(100), 0.0);
    }
}
