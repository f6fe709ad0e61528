//! Distances between vectors: squared L2 and inner product (cosine is inner product over
//! vectors normalised when they enter the index), in SIMD through `pulp` (AVX2/FMA or AVX-512
//! where the CPU has them, chosen at run time; safe code) and in plain loops (the oracle).
//!
//! A search runs inside one [`dispatch`] so that its whole loop is compiled for the CPU's
//! vector width and every distance inlines into it; a distance computed outside one
//! (`Metric::distance`) pays the dispatch per call.

use pulp::{Simd, WithSimd};
use serde::{Deserialize, Serialize};

/// How two vectors are compared; smaller is closer for every metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Metric {
    /// Squared Euclidean distance.
    L2,
    /// `−⟨a, b⟩` (maximum inner product search).
    InnerProduct,
    /// `1 − ⟨a, b⟩` over unit vectors: vectors (stored and queried) are normalised first.
    Cosine,
}

impl Metric {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "l2" => Ok(Self::L2),
            "ip" | "inner-product" => Ok(Self::InnerProduct),
            "cosine" => Ok(Self::Cosine),
            other => Err(format!("metric {other:?}: l2, ip or cosine")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::L2 => "l2",
            Self::InnerProduct => "ip",
            Self::Cosine => "cosine",
        }
    }

    /// Whether vectors are normalised before they are stored or searched.
    pub fn normalises(self) -> bool {
        self == Self::Cosine
    }

    /// The distance in plain loops (f64 accumulation): the oracle of the SIMD kernels.
    pub fn exact(self, a: &[f32], b: &[f32]) -> f32 {
        match self {
            Self::L2 => a
                .iter()
                .zip(b)
                .map(|(x, y)| {
                    let d = f64::from(*x) - f64::from(*y);
                    d * d
                })
                .sum::<f64>() as f32,
            Self::InnerProduct => -dot_f64(a, b) as f32,
            Self::Cosine => (1.0 - dot_f64(a, b)) as f32,
        }
    }

    /// The distance with the SIMD kernel (one dispatch per call).
    pub fn distance(self, a: &[f32], b: &[f32]) -> f32 {
        struct One<'a> {
            m: Metric,
            a: &'a [f32],
            b: &'a [f32],
        }
        impl WithSimd for One<'_> {
            type Output = f32;
            #[inline(always)]
            fn with_simd<S: Simd>(self, s: S) -> f32 {
                dist(s, self.m, self.a, self.b)
            }
        }
        dispatch(One { m: self, a, b })
    }
}

fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

/// Scales `v` to unit length (a zero vector stays zero).
pub fn normalise(v: &mut [f32]) {
    let n = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if n > 0.0 {
        for x in v {
            *x = (f64::from(*x) / n) as f32;
        }
    }
}

/// Runs `op` with the widest SIMD the CPU has (`COLONY_NO_SIMD=1`: scalar).
pub fn dispatch<Op: WithSimd>(op: Op) -> Op::Output {
    static PLAIN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *PLAIN.get_or_init(|| std::env::var_os("COLONY_NO_SIMD").is_some_and(|v| v == "1")) {
        op.with_simd(pulp::Scalar::new())
    } else {
        pulp::Arch::new().dispatch(op)
    }
}

/// The distance of `metric` inside a dispatched kernel.
#[inline(always)]
pub fn dist<S: Simd>(s: S, metric: Metric, a: &[f32], b: &[f32]) -> f32 {
    match metric {
        Metric::L2 => l2(s, a, b),
        Metric::InnerProduct => -dot(s, a, b),
        Metric::Cosine => 1.0 - dot(s, a, b),
    }
}

/// Squared L2 with two accumulator chains.
#[inline(always)]
pub fn l2<S: Simd>(s: S, a: &[f32], b: &[f32]) -> f32 {
    let (ah, at) = S::as_simd_f32s(a);
    let (bh, bt) = S::as_simd_f32s(b);
    let mut acc0 = s.splat_f32s(0.0);
    let mut acc1 = s.splat_f32s(0.0);
    let pairs = ah.len() / 2;
    for i in 0..pairs {
        let d0 = s.sub_f32s(ah[2 * i], bh[2 * i]);
        let d1 = s.sub_f32s(ah[2 * i + 1], bh[2 * i + 1]);
        acc0 = s.mul_add_e_f32s(d0, d0, acc0);
        acc1 = s.mul_add_e_f32s(d1, d1, acc1);
    }
    if ah.len() % 2 == 1 {
        let d = s.sub_f32s(ah[ah.len() - 1], bh[ah.len() - 1]);
        acc0 = s.mul_add_e_f32s(d, d, acc0);
    }
    let mut sum = s.reduce_sum_f32s(s.add_f32s(acc0, acc1));
    for (x, y) in at.iter().zip(bt) {
        let d = x - y;
        sum += d * d;
    }
    sum
}

/// Inner product with two accumulator chains.
#[inline(always)]
pub fn dot<S: Simd>(s: S, a: &[f32], b: &[f32]) -> f32 {
    let (ah, at) = S::as_simd_f32s(a);
    let (bh, bt) = S::as_simd_f32s(b);
    let mut acc0 = s.splat_f32s(0.0);
    let mut acc1 = s.splat_f32s(0.0);
    let pairs = ah.len() / 2;
    for i in 0..pairs {
        acc0 = s.mul_add_e_f32s(ah[2 * i], bh[2 * i], acc0);
        acc1 = s.mul_add_e_f32s(ah[2 * i + 1], bh[2 * i + 1], acc1);
    }
    if ah.len() % 2 == 1 {
        acc0 = s.mul_add_e_f32s(ah[ah.len() - 1], bh[ah.len() - 1], acc0);
    }
    let mut sum = s.reduce_sum_f32s(s.add_f32s(acc0, acc1));
    for (x, y) in at.iter().zip(bt) {
        sum += x * y;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn simd_kernels_equal_the_plain_loops_at_every_length() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for len in [0usize, 1, 3, 7, 8, 9, 15, 16, 17, 31, 50, 64, 100, 128, 300] {
            let a: Vec<f32> = (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect();
            for m in [Metric::L2, Metric::InnerProduct, Metric::Cosine] {
                let (x, y) = (m.distance(&a, &b), m.exact(&a, &b));
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "{m:?} len {len}: {x} vs {y}"
                );
            }
        }
    }

    #[test]
    fn normalised_vectors_have_unit_length() {
        let mut v = vec![3.0, 4.0];
        normalise(&mut v);
        assert!((v[0] - 0.6).abs() < 1e-7 && (v[1] - 0.8).abs() < 1e-7);
        let mut z = vec![0.0; 4];
        normalise(&mut z);
        assert_eq!(z, vec![0.0; 4]);
    }
}
