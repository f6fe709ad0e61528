//! LARS (You et al. 2017) as SwAV uses it: SGD with momentum where each weight tensor's step is
//! scaled by the trust ratio η‖w‖ / (‖g‖ + λ‖w‖). Biases and batch-norm parameters are
//! excluded from both weight decay and the adaptation.

use serde::{Deserialize, Serialize};

use super::{OptimizerState, norm};
use crate::params::Layout;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LarsConfig {
    pub momentum: f32,
    pub weight_decay: f32,
    /// η, the trust coefficient.
    pub eta: f32,
}

impl Default for LarsConfig {
    fn default() -> Self {
        Self {
            momentum: 0.9,
            weight_decay: 1e-6,
            eta: 0.001,
        }
    }
}

pub fn step(
    c: &LarsConfig,
    layout: &Layout,
    params: &mut [f32],
    grad: &[f32],
    s: &mut OptimizerState,
    lr: f32,
) {
    s.step += 1;
    for seg in &layout.segments {
        let r = seg.offset..seg.offset + seg.len;
        let (w, g, m) = (&mut params[r.clone()], &grad[r.clone()], &mut s.first[r]);
        let (wd, local) = if seg.exclude_from_decay {
            (0.0, 1.0)
        } else {
            let (wn, gn) = (norm(w), norm(g));
            let wd = c.weight_decay;
            let local = if wn > 0.0 && gn > 0.0 {
                (f64::from(c.eta) * wn / (gn + f64::from(wd) * wn)) as f32
            } else {
                1.0
            };
            (wd, local)
        };
        for i in 0..w.len() {
            m[i] = c.momentum * m[i] + lr * local * (g[i] + wd * w[i]);
            w[i] -= m[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Segment;

    #[test]
    fn matches_a_hand_computed_step() {
        let l = Layout {
            segments: vec![Segment {
                path: "w".into(),
                shape: vec![2],
                offset: 0,
                len: 2,
                exclude_from_decay: false,
            }],
            total: 2,
        };
        let c = LarsConfig {
            momentum: 0.9,
            weight_decay: 0.0,
            eta: 0.5,
        };
        let mut w = vec![3.0f32, 4.0]; // ‖w‖ = 5
        let g = [0.6f32, 0.8]; // ‖g‖ = 1
        let mut s = super::super::OptimizerConfig::Lars(c.clone()).init_state(2);
        step(&c, &l, &mut w, &g, &mut s, 0.1);
        // local = 0.5·5/1 = 2.5; m = 0.1·2.5·g = 0.25·g; w -= m.
        assert!(
            (w[0] - (3.0 - 0.15)).abs() < 1e-6 && (w[1] - (4.0 - 0.2)).abs() < 1e-6,
            "{w:?}"
        );
        let wn = (w[0] * w[0] + w[1] * w[1]).sqrt();
        step(&c, &l, &mut w, &g, &mut s, 0.1);
        let m0 = 0.9 * 0.15 + 0.1 * 0.5 * wn * 0.6;
        assert!((w[0] - (2.85 - m0)).abs() < 1e-5, "{w:?}");
    }
}
