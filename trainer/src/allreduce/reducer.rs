//! Reducing one aggregator's shard: a weighted sum of every sender's copy of each part,
//! divided by the total weight actually received, or (as an option) CenteredClip over the
//! copies.
//!
//! With CenteredClip the copies are kept, so a complete part is also screened: a copy whose
//! norm is more than [`OUTLIER_NORM_RATIO`] times the median norm of the part's copies (three
//! or more) is an outlier ([`ShardReducer::outliers`]); the round drops its sender like one
//! that sent NaNs, and reports it.
//!
//! Fault semantics (hivemind's, made explicit): a sender that fails is dropped from every part
//! it had not yet delivered; parts it did deliver keep its contribution. Each part's mean is
//! therefore exact over the senders that contributed to it, and every receiver of that part
//! gets the same numbers.

/// Why a contribution was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReduceError {
    #[error("sender {0} is not in this group")]
    UnknownSender(usize),
    #[error("part {0} does not exist")]
    UnknownPart(usize),
    #[error("sender {sender} sent part {part} twice")]
    Duplicate { sender: usize, part: usize },
    #[error("sender {sender} sent {got} values for part {part}, expected {expected}")]
    WrongLength {
        sender: usize,
        part: usize,
        got: usize,
        expected: usize,
    },
    #[error("sender {sender} sent a non-finite value or weight in part {part}")]
    NotFinite { sender: usize, part: usize },
    #[error("sender {0} already failed")]
    SenderFailed(usize),
}

/// A copy of a part this many times the median norm of the part's copies is an outlier.
/// Honest gradients of the same parameters differ in norm by small factors; a sender that
/// scales its gradient by less than this still moves a CenteredClip result by at most its
/// share times τ per iteration.
pub const OUTLIER_NORM_RATIO: f64 = 20.0;

/// How an aggregator combines the senders' copies of a part.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Aggregation {
    /// The weighted mean (exact, streaming: nothing but the running sum is kept).
    #[default]
    Mean,
    /// CenteredClip over each part's copies (`super::robust`): a sender with weight share δ
    /// moves a part by at most δ·τ per iteration, whatever it sends. Keeps every copy of a
    /// part until the part is complete.
    CenteredClip { tau: f64, iters: u32 },
}

#[derive(Debug)]
struct PartAcc {
    sum: Vec<f64>,
    weight: f64,
    got: Vec<bool>,
    /// Each sender's copy and weight (CenteredClip only).
    copies: Vec<Option<(f64, Vec<f32>)>>,
}

/// The reducer of one shard, split into parts of the given lengths.
#[derive(Debug)]
pub struct ShardReducer {
    parts: Vec<PartAcc>,
    failed: Vec<bool>,
    aggregation: Aggregation,
}

impl ShardReducer {
    pub fn new(part_lens: &[usize], senders: usize) -> Self {
        Self::with_aggregation(part_lens, senders, Aggregation::Mean)
    }

    pub fn with_aggregation(part_lens: &[usize], senders: usize, aggregation: Aggregation) -> Self {
        Self {
            parts: part_lens
                .iter()
                .map(|&len| PartAcc {
                    sum: vec![0.0; len],
                    weight: 0.0,
                    got: vec![false; senders],
                    copies: vec![None; senders],
                })
                .collect(),
            failed: vec![false; senders],
            aggregation,
        }
    }

    /// Adds `sender`'s copy of `part`, weighted by `weight` (its sample count).
    pub fn add(
        &mut self,
        sender: usize,
        part: usize,
        weight: f64,
        data: &[f32],
    ) -> Result<(), ReduceError> {
        if sender >= self.failed.len() {
            return Err(ReduceError::UnknownSender(sender));
        }
        if self.failed[sender] {
            return Err(ReduceError::SenderFailed(sender));
        }
        let acc = self
            .parts
            .get_mut(part)
            .ok_or(ReduceError::UnknownPart(part))?;
        if acc.got[sender] {
            return Err(ReduceError::Duplicate { sender, part });
        }
        if data.len() != acc.sum.len() {
            return Err(ReduceError::WrongLength {
                sender,
                part,
                got: data.len(),
                expected: acc.sum.len(),
            });
        }
        if !weight.is_finite() || weight < 0.0 || data.iter().any(|x| !x.is_finite()) {
            return Err(ReduceError::NotFinite { sender, part });
        }
        for (s, &x) in acc.sum.iter_mut().zip(data) {
            *s += weight * f64::from(x);
        }
        acc.weight += weight;
        acc.got[sender] = true;
        if matches!(self.aggregation, Aggregation::CenteredClip { .. }) && weight > 0.0 {
            acc.copies[sender] = Some((weight, data.to_vec()));
        }
        Ok(())
    }

    /// Drops `sender` from every part it has not delivered.
    pub fn sender_failed(&mut self, sender: usize) {
        if let Some(f) = self.failed.get_mut(sender) {
            *f = true;
        }
    }

    /// Whether every live sender has delivered `part`.
    pub fn is_complete(&self, part: usize) -> bool {
        self.parts.get(part).is_some_and(|acc| {
            acc.got
                .iter()
                .zip(&self.failed)
                .all(|(got, failed)| *got || *failed)
        })
    }

    /// The weighted mean of a complete part, or `None` if it is incomplete or nobody with a
    /// positive weight contributed.
    pub fn mean(&self, part: usize) -> Option<Vec<f32>> {
        if !self.is_complete(part) {
            return None;
        }
        let acc = &self.parts[part];
        if acc.weight <= 0.0 {
            return None;
        }
        let mean = || acc.sum.iter().map(|s| (s / acc.weight) as f32).collect();
        match self.aggregation {
            Aggregation::Mean => Some(mean()),
            Aggregation::CenteredClip { tau, iters } => {
                let (weights, copies): (Vec<f64>, Vec<&[f32]>) = acc
                    .copies
                    .iter()
                    .flatten()
                    .map(|(w, x)| (*w, x.as_slice()))
                    .unzip();
                // The inputs were validated on arrival, so this cannot fail; the mean is the
                // answer for an unclipped (infinite) radius.
                Some(
                    super::robust::centered_clip(&copies, &weights, tau, iters as usize)
                        .unwrap_or_else(|_| mean()),
                )
            }
        }
    }

    /// The senders whose copy of the complete `part` is an outlier (norm above
    /// [`OUTLIER_NORM_RATIO`] times the median of three or more copies; CenteredClip only, as
    /// the mean keeps no copies).
    pub fn outliers(&self, part: usize) -> Vec<usize> {
        let Some(acc) = self.parts.get(part) else {
            return Vec::new();
        };
        let norms: Vec<(usize, f64)> = acc
            .copies
            .iter()
            .enumerate()
            .filter_map(|(s, c)| {
                c.as_ref().map(|(_, x)| {
                    let n2: f64 = x.iter().map(|v| f64::from(*v).powi(2)).sum();
                    (s, n2.sqrt())
                })
            })
            .collect();
        if norms.len() < 3 {
            return Vec::new();
        }
        let mut sorted: Vec<f64> = norms.iter().map(|(_, n)| *n).collect();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        norms
            .into_iter()
            .filter(|(_, n)| *n > OUTLIER_NORM_RATIO * median.max(f64::MIN_POSITIVE))
            .map(|(s, _)| s)
            .collect()
    }

    /// Removes `sender`'s contribution from `part` (an outlier); the part stays complete.
    pub fn exclude(&mut self, sender: usize, part: usize) {
        let Some(acc) = self.parts.get_mut(part) else {
            return;
        };
        if let Some((w, x)) = acc.copies.get_mut(sender).and_then(Option::take) {
            for (s, v) in acc.sum.iter_mut().zip(&x) {
                *s -= w * f64::from(*v);
            }
            acc.weight -= w;
        }
    }

    /// Senders that contributed to `part`.
    pub fn contributors(&self, part: usize) -> Vec<usize> {
        self.parts.get(part).map_or(vec![], |acc| {
            (0..acc.got.len()).filter(|&i| acc.got[i]).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Oracle: the plain weighted mean over exactly the senders listed.
    fn exact(vectors: &[Vec<f32>], weights: &[f64], who: &[usize]) -> Vec<f32> {
        let w: f64 = who.iter().map(|&i| weights[i]).sum();
        (0..vectors[0].len())
            .map(|k| {
                (who.iter()
                    .map(|&i| weights[i] * f64::from(vectors[i][k]))
                    .sum::<f64>()
                    / w) as f32
            })
            .collect()
    }

    #[test]
    fn weighted_mean_is_exact() {
        let vectors = vec![
            vec![1.0, 2.0, 3.0, 4.0],
            vec![10.0, 20.0, 30.0, 40.0],
            vec![-1.0, 0.5, 7.0, 1e6],
        ];
        let weights = [3.0, 1.0, 0.5];
        let mut r = ShardReducer::new(&[2, 2], 3);
        for (s, v) in vectors.iter().enumerate() {
            r.add(s, 0, weights[s], &v[..2]).unwrap();
            r.add(s, 1, weights[s], &v[2..]).unwrap();
        }
        let got: Vec<f32> = [r.mean(0).unwrap(), r.mean(1).unwrap()].concat();
        assert_eq!(got, exact(&vectors, &weights, &[0, 1, 2]));
    }

    #[test]
    fn failed_sender_is_dropped_only_from_parts_it_missed() {
        let vectors = vec![vec![1.0, 2.0], vec![3.0, 4.0], vec![5.0, 6.0]];
        let weights = [1.0, 2.0, 3.0];
        let mut r = ShardReducer::new(&[1, 1], 3);
        r.add(0, 0, 1.0, &[1.0]).unwrap();
        r.add(1, 0, 2.0, &[3.0]).unwrap();
        r.add(2, 0, 3.0, &[5.0]).unwrap(); // sender 2 delivered part 0, then died
        r.add(0, 1, 1.0, &[2.0]).unwrap();
        assert!(!r.is_complete(1));
        r.sender_failed(2);
        assert!(!r.is_complete(1), "sender 1 is still alive and owes part 1");
        r.add(1, 1, 2.0, &[4.0]).unwrap();
        assert_eq!(
            r.mean(0).unwrap(),
            vec![exact(&vectors, &weights, &[0, 1, 2])[0]]
        );
        assert_eq!(
            r.mean(1).unwrap(),
            vec![exact(&vectors, &weights, &[0, 1])[1]]
        );
        assert_eq!(r.contributors(1), vec![0, 1]);
        assert_eq!(r.add(2, 1, 3.0, &[6.0]), Err(ReduceError::SenderFailed(2)));
    }

    #[test]
    fn centered_clip_bounds_a_byzantine_sender_where_the_mean_does_not() {
        let honest: Vec<Vec<f32>> = (0..5).map(|i| vec![1.0 + 0.01 * i as f32; 8]).collect();
        let evil = vec![1e7f32; 8];
        let (tau, iters) = (0.5, 5);
        let run = |agg: Aggregation| {
            let mut r = ShardReducer::with_aggregation(&[8], 6, agg);
            for (s, v) in honest.iter().enumerate() {
                r.add(s, 0, 1.0, v).unwrap();
            }
            r.add(5, 0, 1.0, &evil).unwrap();
            r.mean(0).unwrap()
        };
        let clipped = run(Aggregation::CenteredClip { tau, iters });
        let plain = run(Aggregation::Mean);
        let honest_mean = 1.02f64;
        let dist = |v: &[f32]| {
            v.iter()
                .map(|x| (f64::from(*x) - honest_mean).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        // The attacker holds 1/6 of the weight: at most τ/6 per iteration, plus the honest
        // spread.
        assert!(
            dist(&clipped) <= tau / 6.0 * f64::from(iters) + 0.1,
            "{clipped:?}"
        );
        assert!(dist(&plain) > 1e6, "the plain mean is dragged away");
        // Without an attacker and with a radius wider than the spread, it is the mean.
        let mut r = ShardReducer::with_aggregation(
            &[8],
            5,
            Aggregation::CenteredClip {
                tau: 10.0,
                iters: 3,
            },
        );
        for (s, v) in honest.iter().enumerate() {
            r.add(s, 0, 1.0 + s as f64, v).unwrap();
        }
        let exact_mean = exact(&honest, &[1.0, 2.0, 3.0, 4.0, 5.0], &[0, 1, 2, 3, 4]);
        for (a, b) in r.mean(0).unwrap().iter().zip(exact_mean) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    #[test]
    fn a_scaled_copy_is_an_outlier_and_excluding_it_leaves_the_honest_result() {
        let honest: Vec<Vec<f32>> = (0..4)
            .map(|i| {
                (0..16)
                    .map(|k| (k as f32 - 8.0) * (1.0 + 0.2 * i as f32))
                    .collect()
            })
            .collect();
        let scaled: Vec<f32> = honest[0].iter().map(|x| x * 1e4).collect();
        let agg = Aggregation::CenteredClip { tau: 1e6, iters: 3 };
        let mut r = ShardReducer::with_aggregation(&[16], 5, agg);
        for (s, v) in honest.iter().enumerate() {
            r.add(s, 0, 1.0 + s as f64, v).unwrap();
        }
        assert_eq!(
            r.outliers(0),
            Vec::<usize>::new(),
            "honest spread is no outlier"
        );
        r.add(4, 0, 2.0, &scaled).unwrap();
        assert_eq!(r.outliers(0), vec![4]);
        r.exclude(4, 0);
        assert_eq!(r.outliers(0), Vec::<usize>::new());
        // With the radius wider than the honest spread, the result is the honest mean.
        let want = exact(&honest, &[1.0, 2.0, 3.0, 4.0], &[0, 1, 2, 3]);
        for (a, b) in r.mean(0).unwrap().iter().zip(want) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
        // Two copies say nothing about which is the odd one.
        let mut r = ShardReducer::with_aggregation(&[16], 2, agg);
        r.add(0, 0, 1.0, &honest[0]).unwrap();
        r.add(1, 0, 1.0, &scaled).unwrap();
        assert!(r.outliers(0).is_empty());
    }

    #[test]
    fn bad_contributions_are_refused() {
        let mut r = ShardReducer::new(&[2], 2);
        assert_eq!(
            r.add(5, 0, 1.0, &[0.0, 0.0]),
            Err(ReduceError::UnknownSender(5))
        );
        assert_eq!(
            r.add(0, 3, 1.0, &[0.0, 0.0]),
            Err(ReduceError::UnknownPart(3))
        );
        assert!(matches!(
            r.add(0, 0, 1.0, &[0.0]),
            Err(ReduceError::WrongLength { .. })
        ));
        assert!(matches!(
            r.add(0, 0, 1.0, &[f32::NAN, 0.0]),
            Err(ReduceError::NotFinite { .. })
        ));
        assert!(matches!(
            r.add(0, 0, f64::INFINITY, &[0.0, 0.0]),
            Err(ReduceError::NotFinite { .. })
        ));
        r.add(0, 0, 1.0, &[1.0, 1.0]).unwrap();
        assert!(matches!(
            r.add(0, 0, 1.0, &[1.0, 1.0]),
            Err(ReduceError::Duplicate { .. })
        ));
        assert_eq!(r.mean(0), None, "sender 1 still owes its part");
    }
}
