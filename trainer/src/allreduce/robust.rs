//! Robust aggregation: CenteredClip (Karimireddy, He & Jaggi, 2021), the aggregator used in
//! Byzantine-tolerant decentralised training (Gorbunov et al., BTARD).
//!
//! Starting from the coordinate-wise median, each iteration moves the estimate towards every
//! input, but by at most `tau` per input:
//!
//! ```text
//! v ← v + Σ_i w_i · min(1, τ / ‖x_i − v‖) · (x_i − v) / Σ_i w_i
//! ```
//!
//! so an input with weight share `δ` moves the result by at most `δ·τ` per iteration however
//! large or adversarial it is. With `τ = ∞` one iteration gives the exact weighted mean.

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RobustError {
    #[error("no inputs")]
    Empty,
    #[error("input {0} has a different length")]
    Length(usize),
    #[error("input {0} holds a non-finite value or weight")]
    NotFinite(usize),
    #[error("the weights sum to zero")]
    ZeroWeight,
}

pub fn centered_clip(
    inputs: &[&[f32]],
    weights: &[f64],
    tau: f64,
    iters: usize,
) -> Result<Vec<f32>, RobustError> {
    let first = inputs.first().ok_or(RobustError::Empty)?;
    let dim = first.len();
    for (i, x) in inputs.iter().enumerate() {
        if x.len() != dim || weights.len() != inputs.len() {
            return Err(RobustError::Length(i));
        }
        if !weights[i].is_finite() || weights[i] < 0.0 || x.iter().any(|v| !v.is_finite()) {
            return Err(RobustError::NotFinite(i));
        }
    }
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return Err(RobustError::ZeroWeight);
    }
    // Start at the coordinate-wise median: already robust to a minority of outliers.
    let mut v: Vec<f64> = (0..dim)
        .map(|k| {
            let mut col: Vec<f32> = inputs.iter().map(|x| x[k]).collect();
            col.sort_by(|a, b| a.total_cmp(b));
            f64::from(col[col.len() / 2])
        })
        .collect();
    for _ in 0..iters.max(1) {
        let mut step = vec![0.0f64; dim];
        for (x, &w) in inputs.iter().zip(weights) {
            let dist = x
                .iter()
                .zip(&v)
                .map(|(a, b)| (f64::from(*a) - b).powi(2))
                .sum::<f64>()
                .sqrt();
            let c = if dist > tau { tau / dist } else { 1.0 };
            for (s, (a, b)) in step.iter_mut().zip(x.iter().zip(&v)) {
                *s += w * c * (f64::from(*a) - b);
            }
        }
        for (vk, s) in v.iter_mut().zip(step) {
            *vk += s / total;
        }
    }
    Ok(v.into_iter().map(|x| x as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn infinite_tau_is_the_weighted_mean() {
        let xs = [vec![1.0f32, 2.0], vec![3.0, -4.0], vec![10.0, 0.5]];
        let w = [1.0, 2.0, 5.0];
        let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let got = centered_clip(&refs, &w, f64::INFINITY, 1).unwrap();
        let want = [(1.0 + 6.0 + 50.0) / 8.0, (2.0 - 8.0 + 2.5) / 8.0];
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6);
        }
    }

    #[test]
    fn a_byzantine_input_moves_the_result_at_most_tau_times_its_share() {
        let honest: Vec<Vec<f32>> = (0..7).map(|i| vec![1.0 + 0.01 * i as f32; 16]).collect();
        let honest_mean: Vec<f32> = (0..16)
            .map(|k| honest.iter().map(|h| h[k]).sum::<f32>() / 7.0)
            .collect();
        for attack in [1e9f32, -1e9, 3e4] {
            let evil = vec![attack; 16];
            let mut refs: Vec<&[f32]> = honest.iter().map(|x| x.as_slice()).collect();
            refs.push(&evil);
            let w = vec![1.0; 8];
            let (tau, iters) = (0.5, 10);
            let got = centered_clip(&refs, &w, tau, iters).unwrap();
            let moved = norm(&got, &honest_mean);
            // Honest inputs sit within 0.3 of their mean; the attacker's share is 1/8.
            assert!(
                moved <= tau / 8.0 * iters as f64 + 0.3,
                "{attack}: moved {moved}"
            );
            let plain: f64 = (f64::from(attack) - 1.03) / 8.0;
            assert!(moved < plain.abs() / 100.0, "clip must beat the plain mean");
        }
    }

    #[test]
    fn bad_inputs_are_refused() {
        let a = [1.0f32, 2.0];
        let nan = [f32::NAN, 0.0];
        assert_eq!(
            centered_clip(&[&a, &nan], &[1.0, 1.0], 1.0, 3),
            Err(RobustError::NotFinite(1))
        );
        assert_eq!(
            centered_clip(&[&a, &a[..1]], &[1.0, 1.0], 1.0, 3),
            Err(RobustError::Length(1))
        );
        assert_eq!(centered_clip(&[], &[], 1.0, 3), Err(RobustError::Empty));
        assert_eq!(
            centered_clip(&[&a], &[0.0], 1.0, 3),
            Err(RobustError::ZeroWeight)
        );
    }
}
