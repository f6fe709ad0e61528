//! LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"): Adam moments with a
//! layer-wise trust ratio ‖w‖ / ‖update‖, per parameter tensor. Biases and norms get no weight
//! decay and no trust ratio (as in the reference implementations for BERT/ALBERT).

use serde::{Deserialize, Serialize};

use super::{OptimizerState, norm};
use crate::params::Layout;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LambConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Upper bound on the trust ratio (10 in several implementations; `f32::INFINITY` for none).
    pub max_trust: f32,
}

impl Default for LambConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.01,
            max_trust: 10.0,
        }
    }
}

pub fn step(
    c: &LambConfig,
    layout: &Layout,
    params: &mut [f32],
    grad: &[f32],
    s: &mut OptimizerState,
    lr: f32,
) {
    s.step += 1;
    let t = s.step as i32;
    let bc1 = 1.0 - c.beta1.powi(t);
    let bc2 = 1.0 - c.beta2.powi(t);
    let mut update = Vec::new();
    for seg in &layout.segments {
        let r = seg.offset..seg.offset + seg.len;
        let (w, g) = (&mut params[r.clone()], &grad[r.clone()]);
        let (m, v) = (&mut s.first[r.clone()], &mut s.second[r]);
        let wd = if seg.exclude_from_decay {
            0.0
        } else {
            c.weight_decay
        };
        update.clear();
        for i in 0..w.len() {
            m[i] = c.beta1 * m[i] + (1.0 - c.beta1) * g[i];
            v[i] = c.beta2 * v[i] + (1.0 - c.beta2) * g[i] * g[i];
            let mh = m[i] / bc1;
            let vh = v[i] / bc2;
            update.push(mh / (vh.sqrt() + c.eps) + wd * w[i]);
        }
        let trust = if seg.exclude_from_decay {
            1.0
        } else {
            let (wn, un) = (norm(w), norm(&update));
            if wn > 0.0 && un > 0.0 {
                ((wn / un) as f32).min(c.max_trust)
            } else {
                1.0
            }
        };
        for (wi, ui) in w.iter_mut().zip(&update) {
            *wi -= lr * trust * ui;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::Segment;

    fn layout() -> Layout {
        Layout {
            segments: vec![
                Segment {
                    path: "w".into(),
                    shape: vec![2, 2],
                    offset: 0,
                    len: 4,
                    exclude_from_decay: false,
                },
                Segment {
                    path: "b".into(),
                    shape: vec![2],
                    offset: 4,
                    len: 2,
                    exclude_from_decay: true,
                },
            ],
            total: 6,
        }
    }

    /// The update written out in f64 from the paper's algorithm, one tensor at a time.
    fn reference(
        w: &[f64],
        g: &[f64],
        m: &mut [f64],
        v: &mut [f64],
        t: i32,
        lr: f64,
        decay: bool,
    ) -> Vec<f64> {
        let (b1, b2, eps, wd) = (0.9f64, 0.999f64, 1e-6f64, if decay { 0.01 } else { 0.0 });
        let mut u = vec![0.0; w.len()];
        for i in 0..w.len() {
            m[i] = b1 * m[i] + (1.0 - b1) * g[i];
            v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
            u[i] = (m[i] / (1.0 - b1.powi(t))) / ((v[i] / (1.0 - b2.powi(t))).sqrt() + eps)
                + wd * w[i];
        }
        let wn = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        let un = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        let trust = if decay && wn > 0.0 && un > 0.0 {
            (wn / un).min(10.0)
        } else {
            1.0
        };
        w.iter()
            .zip(&u)
            .map(|(wi, ui)| wi - lr * trust * ui)
            .collect()
    }

    #[test]
    fn matches_the_papers_update_over_several_steps() {
        let l = layout();
        let cfg = LambConfig::default();
        let mut p: Vec<f32> = vec![0.5, -1.0, 2.0, 0.25, 0.1, -0.1];
        let mut s = super::super::OptimizerConfig::Lamb(cfg.clone()).init_state(6);
        let mut rp: Vec<f64> = p.iter().map(|&x| f64::from(x)).collect();
        let (mut rm, mut rv) = (vec![0.0f64; 6], vec![0.0f64; 6]);
        for t in 1..=5 {
            let g: Vec<f32> = (0..6)
                .map(|i| ((i as f32 + 1.0) * 0.3 * t as f32).sin())
                .collect();
            step(&cfg, &l, &mut p, &g, &mut s, 0.01);
            let gd: Vec<f64> = g.iter().map(|&x| f64::from(x)).collect();
            let w = reference(
                &rp[..4],
                &gd[..4],
                &mut rm[..4],
                &mut rv[..4],
                t,
                0.01,
                true,
            );
            let b = reference(
                &rp[4..],
                &gd[4..],
                &mut rm[4..],
                &mut rv[4..],
                t,
                0.01,
                false,
            );
            rp = [w, b].concat();
            for i in 0..6 {
                assert!(
                    (f64::from(p[i]) - rp[i]).abs() < 1e-5,
                    "step {t} elem {i}: {} vs {}",
                    p[i],
                    rp[i]
                );
            }
        }
        assert_eq!(s.step, 5);
    }
}
