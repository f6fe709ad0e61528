//! The editor: up to `max_steps` steps of SGD, momentum or RMSProp on the head, on the
//! contrastive edit loss `relu(margin + max_{j≠t} z_j − z_t)`, stopping as soon as the loss is
//! zero (the target beats every other class by `margin`).
//!
//! The loss's gradient with respect to the logits is `e_j − e_t` (`j` the runner-up), so the
//! weight gradient is `(e_j − e_t) hᵀ`: with `h` fixed, every SGD or momentum step adds a
//! multiple of `hᵀ` to the touched rows, and the whole edit is exactly `ΔW = u hᵀ` with `u`
//! non-zero only on the target and the runner-ups visited. The editor keeps `u` (and the bias
//! change, equal to `u` for these two) instead of a dense matrix and evaluates the logits as
//! `W h + b + u (h·h) + Δb`. RMSProp divides elementwise by a running RMS, which breaks the
//! rank-one form: it keeps a dense change.

use colony_protocol::patch::{Delta, EditorSpec};

use super::head::{Head, target_margin};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EditorKind {
    Sgd,
    /// SGD with the step divided by `h·h + 1`, so that `lr` is in logit units whatever the
    /// scale of the features: each step moves the target's and the runner-up's logits by
    /// `lr` (ENN's "scaled" gradient descent). Still rank one.
    Scaled,
    /// SGD with an exact line search: each step takes the step size that lifts the target
    /// exactly `lr × margin` above the current runner-up (`lr ≥ 1` for a little slack). The
    /// target only rises and each runner-up only falls, so no class is visited twice and an
    /// edit over `C` classes succeeds in at most `C − 1` steps. Still rank one.
    LineSearch,
    /// `m ← μ m + g`, `θ ← θ − lr m`.
    Momentum {
        momentum: f32,
    },
    /// `v ← β v + (1−β) g²` (`v = g²` at the first step), `θ ← θ − lr g / sqrt(v + ε)`.
    RmsProp {
        beta: f32,
        eps: f32,
    },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EditorConfig {
    pub kind: EditorKind,
    pub lr: f32,
    pub max_steps: u32,
    pub margin: f32,
}

impl Default for EditorConfig {
    fn default() -> Self {
        Self {
            kind: EditorKind::LineSearch,
            lr: 1.05,
            max_steps: 10,
            margin: 0.1,
        }
    }
}

impl EditorConfig {
    pub fn spec(&self) -> EditorSpec {
        let kind = match self.kind {
            EditorKind::Sgd => "sgd",
            EditorKind::Scaled => "scaled",
            EditorKind::LineSearch => "line-search",
            EditorKind::Momentum { .. } => "momentum",
            EditorKind::RmsProp { .. } => "rmsprop",
        };
        EditorSpec {
            kind: kind.into(),
            lr: self.lr,
            max_steps: self.max_steps,
            margin: self.margin,
        }
    }

    /// Parses `sgd`, `momentum` or `rmsprop` with the usual constants.
    pub fn kind_named(name: &str) -> Option<EditorKind> {
        match name {
            "sgd" => Some(EditorKind::Sgd),
            "scaled" => Some(EditorKind::Scaled),
            "line-search" => Some(EditorKind::LineSearch),
            "momentum" => Some(EditorKind::Momentum { momentum: 0.9 }),
            "rmsprop" => Some(EditorKind::RmsProp {
                beta: 0.5,
                eps: 1e-6,
            }),
            _ => None,
        }
    }
}

/// What one edit did.
#[derive(Clone, Debug, PartialEq)]
pub struct EditOutcome {
    /// The target beats every other class by the margin.
    pub success: bool,
    /// Gradient steps taken (0 when the sample was already answered with margin).
    pub steps: u32,
    /// The change to the head.
    pub delta: Delta,
    /// `z_t − max_{j≠t} z_j` at the end.
    pub margin: f32,
    /// The runner-up class at each step taken (what an in-graph replay of the edit needs).
    pub runner_ups: Vec<usize>,
}

/// Edits `head` so that features `h` are classified as `target`.
pub fn edit(head: &Head, h: &[f32], target: usize, cfg: &EditorConfig) -> EditOutcome {
    assert_eq!(h.len(), head.inp, "feature length");
    assert!(target < head.out, "target class");
    match cfg.kind {
        EditorKind::Sgd => edit_rank1(head, h, target, cfg, 0.0, 1.0),
        EditorKind::Scaled => {
            let scale = 1.0 / (super::head::dot(h, h) + 1.0);
            edit_rank1(head, h, target, cfg, 0.0, scale)
        }
        EditorKind::LineSearch => edit_rank1(head, h, target, cfg, 0.0, f32::NAN),
        EditorKind::Momentum { momentum } => edit_rank1(head, h, target, cfg, momentum, 1.0),
        EditorKind::RmsProp { beta, eps } => edit_rmsprop(head, h, target, cfg, beta, eps),
    }
}

fn edit_rank1(
    head: &Head,
    h: &[f32],
    t: usize,
    cfg: &EditorConfig,
    mu: f32,
    scale: f32,
) -> EditOutcome {
    let z0 = head.logits(h);
    let hh = super::head::dot(h, h);
    let mut u = vec![0.0f32; head.out];
    let mut m = vec![0.0f32; head.out];
    let mut runner_ups = Vec::new();
    let logits =
        |u: &[f32]| -> Vec<f32> { z0.iter().zip(u).map(|(z, ui)| z + ui * hh + ui).collect() };
    let (mut margin, mut j) = target_margin(&z0, t);
    while margin < cfg.margin && (runner_ups.len() as u32) < cfg.max_steps {
        runner_ups.push(j);
        // g = (e_j − e_t) for both the weight's row coefficient and the bias.
        for (i, mi) in m.iter_mut().enumerate() {
            let g = f32::from(i == j) - f32::from(i == t);
            *mi = mu * *mi + g;
        }
        // The line search (scale NaN) steps to `lr × margin` above this runner-up.
        let step = if scale.is_nan() {
            (cfg.lr * cfg.margin - margin).max(0.0) / (2.0 * (hh + 1.0))
        } else {
            cfg.lr * scale
        };
        for (ui, mi) in u.iter_mut().zip(&m) {
            *ui -= step * mi;
        }
        (margin, j) = target_margin(&logits(&u), t);
    }
    let rows: Vec<(u32, f32)> = u
        .iter()
        .enumerate()
        .filter(|(_, v)| **v != 0.0)
        .map(|(i, v)| (i as u32, *v))
        .collect();
    EditOutcome {
        success: margin >= cfg.margin,
        steps: runner_ups.len() as u32,
        delta: Delta::Rank1 {
            bias: rows.clone(),
            rows,
            h: h.to_vec(),
        },
        margin,
        runner_ups,
    }
}

fn edit_rmsprop(
    head: &Head,
    h: &[f32],
    t: usize,
    cfg: &EditorConfig,
    beta: f32,
    eps: f32,
) -> EditOutcome {
    let (out, inp) = (head.out, head.inp);
    let mut dw = vec![0.0f32; out * inp];
    let mut db = vec![0.0f32; out];
    let mut vw = vec![0.0f32; out * inp];
    let mut vb = vec![0.0f32; out];
    let mut runner_ups = Vec::new();
    let logits = |dw: &[f32], db: &[f32]| -> Vec<f32> {
        let z = head.logits(h);
        (0..out)
            .map(|i| z[i] + super::head::dot(&dw[i * inp..(i + 1) * inp], h) + db[i])
            .collect()
    };
    let (mut margin, mut j) = target_margin(&head.logits(h), t);
    while margin < cfg.margin && (runner_ups.len() as u32) < cfg.max_steps {
        let first = runner_ups.is_empty();
        runner_ups.push(j);
        for i in 0..out {
            let g = f32::from(i == j) - f32::from(i == t);
            let avg = |v: &mut f32, g: f32| {
                *v = if first {
                    g * g
                } else {
                    beta * *v + (1.0 - beta) * g * g
                };
                g / (*v + eps).sqrt()
            };
            for (k, hk) in h.iter().enumerate() {
                let step = avg(&mut vw[i * inp + k], g * hk);
                dw[i * inp + k] -= cfg.lr * step;
            }
            let step = avg(&mut vb[i], g);
            db[i] -= cfg.lr * step;
        }
        (margin, j) = target_margin(&logits(&dw, &db), t);
    }
    EditOutcome {
        success: margin >= cfg.margin,
        steps: runner_ups.len() as u32,
        delta: Delta::Dense { w: dw, b: db },
        margin,
        runner_ups,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::needless_range_loop)]
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_head(out: usize, inp: usize, seed: u64) -> (Head, Vec<f32>) {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let w = (0..out * inp).map(|_| r.gen_range(-1.0..1.0)).collect();
        let b = (0..out).map(|_| r.gen_range(-1.0..1.0)).collect();
        let h = (0..inp).map(|_| r.gen_range(0.0..1.0)).collect();
        (Head::new(out, inp, w, b), h)
    }

    #[test]
    fn every_editor_fixes_the_sample_within_k_steps() {
        for kind in [
            EditorKind::Sgd,
            EditorKind::Scaled,
            EditorKind::LineSearch,
            EditorKind::Momentum { momentum: 0.9 },
            EditorKind::RmsProp {
                beta: 0.5,
                eps: 1e-6,
            },
        ] {
            for seed in 0..20 {
                let (head, h) = random_head(10, 32, seed);
                let target = (head.predict(&h) + 1 + seed as usize % 9) % 10;
                let cfg = EditorConfig {
                    kind,
                    lr: match kind {
                        EditorKind::LineSearch => 1.05,
                        EditorKind::Scaled => 2.0,
                        _ => 0.05,
                    },
                    max_steps: 10,
                    margin: 0.1,
                };
                let out = edit(&head, &h, target, &cfg);
                assert!(out.success, "{kind:?} seed {seed}: margin {}", out.margin);
                assert!(out.steps >= 1 && out.steps <= 10);
                // The stored delta, applied to the head, answers the target with the margin
                // (up to rounding of the compact form).
                let edited = head.apply(&out.delta).unwrap();
                let (m, _) = target_margin(&edited.logits(&h), target);
                assert!(
                    (m - out.margin).abs() < 1e-4,
                    "{kind:?}: {m} vs {}",
                    out.margin
                );
                assert_eq!(edited.predict(&h), target);
            }
        }
    }

    #[test]
    fn rank1_form_equals_the_dense_delta_of_plain_gradient_steps() {
        // Plain dense SGD on the same loss, step by step, as an oracle.
        for (kind, mu) in [
            (EditorKind::Sgd, 0.0),
            (EditorKind::Momentum { momentum: 0.7 }, 0.7),
        ] {
            let (head, h) = random_head(10, 16, 3);
            let target = (head.predict(&h) + 3) % 10;
            let cfg = EditorConfig {
                kind,
                lr: 0.02,
                max_steps: 10,
                margin: 0.5,
            };
            let out = edit(&head, &h, target, &cfg);
            let mut cur = head.clone();
            let mut mw = vec![0.0f32; 10 * 16];
            let mut mb = [0.0f32; 10];
            for _ in 0..out.steps {
                let (_, j) = target_margin(&cur.logits(&h), target);
                for i in 0..10 {
                    let g = f32::from(i == j) - f32::from(i == target);
                    for k in 0..16 {
                        mw[i * 16 + k] = mu * mw[i * 16 + k] + g * h[k];
                        cur.w[i * 16 + k] -= cfg.lr * mw[i * 16 + k];
                    }
                    mb[i] = mu * mb[i] + g;
                    cur.b[i] -= cfg.lr * mb[i];
                }
            }
            let (dw, db) = out.delta.to_dense(10, 16);
            for i in 0..160 {
                assert!(
                    (head.w[i] + dw[i] - cur.w[i]).abs() < 1e-5,
                    "{kind:?} w[{i}]"
                );
            }
            for i in 0..10 {
                assert!(
                    (head.b[i] + db[i] - cur.b[i]).abs() < 1e-5,
                    "{kind:?} b[{i}]"
                );
            }
            // Rank one: every changed row is a multiple of h.
            let Delta::Rank1 { rows, .. } = &out.delta else {
                panic!("not rank one")
            };
            assert!(!rows.is_empty() && rows.len() <= out.steps as usize + 1);
        }
    }

    #[test]
    fn an_already_correct_sample_takes_no_step() {
        let (head, h) = random_head(10, 8, 1);
        let t = head.predict(&h);
        let z = head.logits(&h);
        let (m, _) = target_margin(&z, t);
        let out = edit(
            &head,
            &h,
            t,
            &EditorConfig {
                margin: m / 2.0,
                ..Default::default()
            },
        );
        assert!(out.success);
        assert_eq!(out.steps, 0);
    }

    #[test]
    fn a_tiny_rate_fails_after_max_steps() {
        let (head, h) = random_head(10, 8, 2);
        let t = (head.predict(&h) + 1) % 10;
        let out = edit(
            &head,
            &h,
            t,
            &EditorConfig {
                lr: 1e-6,
                ..Default::default()
            },
        );
        assert!(!out.success);
        assert_eq!(out.steps, 10);
    }
}
