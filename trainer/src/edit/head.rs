//! The editable linear head `z = W h + b` in plain f32 (`W` is `out × in`, row-major): what
//! editors change, patches apply to and verifiers evaluate. Plain loops, one fixed order of
//! additions, so every node computes the same logits from the same head.

use colony_protocol::patch::{Delta, PatchError};

#[derive(Clone, Debug, PartialEq)]
pub struct Head {
    pub out: usize,
    pub inp: usize,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

impl Head {
    pub fn new(out: usize, inp: usize, w: Vec<f32>, b: Vec<f32>) -> Self {
        assert_eq!(w.len(), out * inp, "head weight shape");
        assert_eq!(b.len(), out, "head bias shape");
        Self { out, inp, w, b }
    }

    /// Logits for one feature vector.
    pub fn logits(&self, h: &[f32]) -> Vec<f32> {
        (0..self.out)
            .map(|i| dot(&self.w[i * self.inp..(i + 1) * self.inp], h) + self.b[i])
            .collect()
    }

    /// The predicted class of one feature vector (lowest index on ties).
    pub fn predict(&self, h: &[f32]) -> usize {
        argmax(&self.logits(h))
    }

    /// Predictions for feature rows (`features.len()` a multiple of `inp`).
    pub fn predict_all(&self, features: &[f32]) -> Vec<usize> {
        features
            .chunks_exact(self.inp)
            .map(|h| self.predict(h))
            .collect()
    }

    /// Share of rows whose prediction differs from `labels`.
    pub fn error(&self, features: &[f32], labels: &[usize]) -> f32 {
        let wrong = self
            .predict_all(features)
            .iter()
            .zip(labels)
            .filter(|(p, y)| p != y)
            .count();
        wrong as f32 / labels.len().max(1) as f32
    }

    /// The head with `delta` added.
    pub fn apply(&self, delta: &Delta) -> Result<Head, PatchError> {
        delta.check_shape(self.out, self.inp)?;
        let mut next = self.clone();
        match delta {
            Delta::Rank1 { rows, h, bias } => {
                for &(i, u) in rows {
                    let row = &mut next.w[i as usize * self.inp..(i as usize + 1) * self.inp];
                    for (x, hj) in row.iter_mut().zip(h) {
                        *x += u * hj;
                    }
                }
                for &(i, d) in bias {
                    next.b[i as usize] += d;
                }
            }
            Delta::Dense { w, b } => {
                for (x, d) in next.w.iter_mut().zip(w) {
                    *x += d;
                }
                for (x, d) in next.b.iter_mut().zip(b) {
                    *x += d;
                }
            }
        }
        Ok(next)
    }
}

/// `z_t − max_{j≠t} z_j` and the runner-up `j` (the edit holds with margin `m` when the first
/// is at least `m`).
pub fn target_margin(z: &[f32], target: usize) -> (f32, usize) {
    let mut best = (f32::NEG_INFINITY, usize::MAX);
    for (j, &v) in z.iter().enumerate() {
        if j != target && v > best.0 {
            best = (v, j);
        }
    }
    (z[target] - best.0, best.1)
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn argmax(z: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in z.iter().enumerate() {
        if v > z[best] {
            best = i;
        }
    }
    best
}
