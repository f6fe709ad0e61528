//! Quantised weight matrices and their products with 8-bit activations, computed on the stored
//! blocks (never dequantised to f32): what makes CPU decoding bandwidth-bound on 4-bit weights
//! instead of on 32-bit ones.
//!
//! A matrix keeps GGML's blocks of 32 values along its rows, re-laid out for the kernels:
//! - **Q4** (from Q4_0 and Q4_1): 16 bytes of nibbles per block (value j in the low nibble of
//!   byte j, value j + 16 in the high one, as in the file), a scale `d` and an offset `m` per
//!   block; x = d·q + m with q in 0..16 (Q4_0's x = d·(q − 8) is m = −8d).
//! - **Q8** (from Q8_0, or quantised here from f32/f16): 32 signed bytes and a scale per block.
//!
//! Activations are quantised per row into blocks of 32 signed bytes with scale
//! `dx = max|x|/127`, keeping `sx = dx·Σq` per block ([`QActs`]). Then one block's contribution is
//! `d·dx·Σ q·qx + m·sx`: an integer dot product of 32 byte pairs, two multiplications and an add.
//! The integer dot products run on AVX2 (`vpmaddubsw`/`vpmaddwd`) when the CPU has it, chosen at
//! run time through `pulp` (safe code: the release build targets baseline x86-64), and in plain
//! integer loops otherwise; the plain loops are the oracle of the tests.

use rayon::prelude::*;

use crate::quant::TensorType;
use crate::weights::Mat;

/// Values per block.
pub const BLOCK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QKind {
    Q4,
    Q8,
}

impl QKind {
    fn bytes(self) -> usize {
        match self {
            Self::Q4 => 16,
            Self::Q8 => 32,
        }
    }
}

/// A quantised `[rows, cols]` matrix (`cols` a multiple of 32).
#[derive(Debug, Clone)]
pub struct QMat {
    pub rows: usize,
    pub cols: usize,
    pub kind: QKind,
    /// Per block, row-major: `rows · cols/32`.
    d: Vec<f32>,
    /// Per block (Q4 only).
    m: Vec<f32>,
    /// Per block `kind.bytes()` bytes (Q8: `i8` bit patterns).
    qs: Vec<u8>,
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

impl QMat {
    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    /// From a tensor's raw GGML blocks (Q4_0, Q4_1, Q8_0); f32/f16/bf16 tensors are quantised
    /// to Q8 ([`QMat::quantize_q8`]).
    pub fn from_ggml(
        kind: TensorType,
        raw: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self, String> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(format!("{cols} columns are not whole blocks of {BLOCK}"));
        }
        let n = rows * cols;
        let nb = n / BLOCK;
        if matches!(kind, TensorType::F32 | TensorType::F16 | TensorType::BF16) {
            let data = crate::quant::dequantize(kind, raw, n)?;
            return Ok(Self::quantize_q8(&Mat { rows, cols, data }));
        }
        let want = nb * kind.block_bytes();
        if raw.len() != want {
            return Err(format!(
                "{} bytes for {n} {kind:?} values (want {want})",
                raw.len()
            ));
        }
        let blocks = raw.chunks_exact(kind.block_bytes());
        Ok(match kind {
            TensorType::Q4_0 => Self {
                rows,
                cols,
                kind: QKind::Q4,
                d: blocks.clone().map(|b| f16_at(b, 0)).collect(),
                m: blocks.clone().map(|b| -8.0 * f16_at(b, 0)).collect(),
                qs: blocks.flat_map(|b| b[2..18].iter().copied()).collect(),
            },
            TensorType::Q4_1 => Self {
                rows,
                cols,
                kind: QKind::Q4,
                d: blocks.clone().map(|b| f16_at(b, 0)).collect(),
                m: blocks.clone().map(|b| f16_at(b, 2)).collect(),
                qs: blocks.flat_map(|b| b[4..20].iter().copied()).collect(),
            },
            TensorType::Q8_0 => Self {
                rows,
                cols,
                kind: QKind::Q8,
                d: blocks.clone().map(|b| f16_at(b, 0)).collect(),
                m: Vec::new(),
                qs: blocks.flat_map(|b| b[2..34].iter().copied()).collect(),
            },
            TensorType::F32 | TensorType::F16 | TensorType::BF16 => unreachable!(),
        })
    }

    /// Quantises an f32 matrix to Q8 (scale max|x|/127 per block of 32, rounded to nearest).
    pub fn quantize_q8(mat: &Mat) -> Self {
        assert!(
            mat.cols.is_multiple_of(BLOCK),
            "{} columns are not whole blocks",
            mat.cols
        );
        let nb = mat.data.len() / BLOCK;
        let mut d = Vec::with_capacity(nb);
        let mut qs = Vec::with_capacity(mat.data.len());
        for b in mat.data.chunks_exact(BLOCK) {
            let (scale, q, _) = quantize_block(b);
            d.push(scale);
            qs.extend(q.iter().map(|&v| v as u8));
        }
        Self {
            rows: mat.rows,
            cols: mat.cols,
            kind: QKind::Q8,
            d,
            m: Vec::new(),
            qs,
        }
    }

    /// Row `r` as f32 (the embedding lookup).
    pub fn row(&self, r: usize) -> Vec<f32> {
        let nb = self.blocks_per_row();
        let bytes = self.kind.bytes();
        let mut out = Vec::with_capacity(self.cols);
        for b in r * nb..(r + 1) * nb {
            let q = &self.qs[b * bytes..(b + 1) * bytes];
            let d = self.d[b];
            match self.kind {
                QKind::Q4 => {
                    let m = self.m[b];
                    out.extend(q.iter().map(|&v| d * f32::from(v & 0x0f) + m));
                    out.extend(q.iter().map(|&v| d * f32::from(v >> 4) + m));
                }
                QKind::Q8 => out.extend(q.iter().map(|&v| d * f32::from(v as i8))),
            }
        }
        out
    }

    /// The whole matrix as f32.
    pub fn to_mat(&self) -> Mat {
        Mat {
            rows: self.rows,
            cols: self.cols,
            data: (0..self.rows).flat_map(|r| self.row(r)).collect(),
        }
    }

    /// The rows of `parts` one after another (same kind and width; otherwise all re-quantised
    /// to Q8).
    pub fn stack(parts: &[&QMat]) -> QMat {
        let kind = parts[0].kind;
        if parts
            .iter()
            .any(|p| p.kind != kind || p.cols != parts[0].cols)
        {
            let mats: Vec<Mat> = parts.iter().map(|p| p.to_mat()).collect();
            let refs: Vec<&Mat> = mats.iter().collect();
            return Self::quantize_q8(&crate::cpu::stack_mats(&refs));
        }
        QMat {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: parts[0].cols,
            kind,
            d: parts.iter().flat_map(|p| p.d.iter().copied()).collect(),
            m: parts.iter().flat_map(|p| p.m.iter().copied()).collect(),
            qs: parts.iter().flat_map(|p| p.qs.iter().copied()).collect(),
        }
    }

    /// Reorders the rows: row i of the result is row `perm[i]` of `self`.
    pub fn permute_rows(&self, perm: &[usize]) -> QMat {
        let nb = self.blocks_per_row();
        let bytes = self.kind.bytes();
        let pick = |v: &[f32]| -> Vec<f32> {
            if v.is_empty() {
                return Vec::new();
            }
            perm.iter()
                .flat_map(|&r| v[r * nb..(r + 1) * nb].iter().copied())
                .collect()
        };
        QMat {
            rows: self.rows,
            cols: self.cols,
            kind: self.kind,
            d: pick(&self.d),
            m: pick(&self.m),
            qs: perm
                .iter()
                .flat_map(|&r| {
                    self.qs[r * nb * bytes..(r + 1) * nb * bytes]
                        .iter()
                        .copied()
                })
                .collect(),
        }
    }

    /// Bytes the kernels read for one pass over the matrix.
    pub fn bytes(&self) -> usize {
        self.qs.len() + 4 * (self.d.len() + self.m.len())
    }

    /// `out[r·rows + o] = Σ_i self[o, i] · x[r, i]` for every row r of `x` (as in
    /// [`crate::cpu`]'s f32 product), in parallel over chunks of output rows.
    pub fn matmul(&self, x: &QActs) -> Vec<f32> {
        assert_eq!(x.cols, self.cols, "activation width");
        let n = x.rows;
        let mut t = vec![0f32; self.rows * n]; // [out, rows]
        const CHUNK: usize = 16;
        let simd = Simd::detect();
        t.par_chunks_mut(CHUNK * n)
            .enumerate()
            .for_each(|(ci, block)| {
                let first = ci * CHUNK;
                let count = block.len() / n.max(1);
                simd.rows(self, x, first, count, block);
            });
        crate::cpu::rows_first(t, self.rows, n)
    }

    /// The same product with the plain integer loops (the oracle).
    pub fn matmul_plain(&self, x: &QActs) -> Vec<f32> {
        let n = x.rows;
        let mut t = vec![0f32; self.rows * n];
        plain_rows(self, x, 0, self.rows, &mut t);
        crate::cpu::rows_first(t, self.rows, n)
    }
}

/// Runs `f` compiled for AVX2 and FMA when the CPU has them (plain loops inside it are
/// vectorised 8 wide; the release build otherwise targets baseline x86-64). `f` should only call
/// `#[inline(always)]` functions, so that they are compiled inside it.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    match Simd::detect() {
        Simd::Plain => f(),
        #[cfg(target_arch = "x86_64")]
        Simd::V3(s) => s.vectorize(f),
    }
}

/// The kernels this CPU runs ("avx2" or "plain"; `COLONY_NO_SIMD=1` forces the plain loops).
pub fn kernels() -> &'static str {
    match Simd::detect() {
        Simd::Plain => "plain",
        #[cfg(target_arch = "x86_64")]
        Simd::V3(_) => "avx2",
    }
}

/// Quantises one block: scale, values, Σ values.
fn quantize_block(b: &[f32]) -> (f32, [i8; BLOCK], i32) {
    let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; BLOCK];
    let mut sum = 0i32;
    for (o, v) in q.iter_mut().zip(b) {
        // Round half away from zero (as `f32::round`, without the libm call); |v·inv| ≤ 127.
        let r = v * inv;
        *o = (r + 0.5f32.copysign(r)).clamp(-127.0, 127.0) as i8;
        sum += i32::from(*o);
    }
    (d, q, sum)
}

/// Rows of activations quantised to 8 bits in blocks of 32.
#[derive(Debug, Clone)]
pub struct QActs {
    pub rows: usize,
    pub cols: usize,
    q: Vec<i8>,
    /// Per block: the scale.
    d: Vec<f32>,
    /// Per block: scale · Σ values (for the offsets of Q4 blocks).
    s: Vec<f32>,
}

impl QActs {
    /// Quantises `x` (`rows` rows of `cols` values; `cols` a multiple of 32).
    pub fn quantize(x: &[f32], cols: usize) -> Self {
        assert!(cols.is_multiple_of(BLOCK) && x.len().is_multiple_of(cols));
        let nb = x.len() / BLOCK;
        let mut out = Self {
            rows: x.len() / cols,
            cols,
            q: Vec::with_capacity(x.len()),
            d: Vec::with_capacity(nb),
            s: Vec::with_capacity(nb),
        };
        for b in x.chunks_exact(BLOCK) {
            let (d, q, sum) = quantize_block(b);
            out.q.extend(q);
            out.d.push(d);
            out.s.push(d * sum as f32);
        }
        out
    }
}

/// Computes output rows `first..first + count` of `m · x` into `t` (`[count, x.rows]`), with
/// plain integer loops.
fn plain_rows(m: &QMat, x: &QActs, first: usize, count: usize, t: &mut [f32]) {
    let nb = m.blocks_per_row();
    let n = x.rows;
    for k in 0..count {
        let o = first + k;
        for r in 0..n {
            let mut acc = 0f32;
            for b in 0..nb {
                let wb = o * nb + b;
                let xb = r * nb + b;
                let xq = &x.q[xb * BLOCK..(xb + 1) * BLOCK];
                let dot: i32 = match m.kind {
                    QKind::Q4 => {
                        let q = &m.qs[wb * 16..(wb + 1) * 16];
                        (0..16)
                            .map(|j| {
                                i32::from(q[j] & 0x0f) * i32::from(xq[j])
                                    + i32::from(q[j] >> 4) * i32::from(xq[j + 16])
                            })
                            .sum()
                    }
                    QKind::Q8 => {
                        let q = &m.qs[wb * 32..(wb + 1) * 32];
                        (0..32)
                            .map(|j| i32::from(q[j] as i8) * i32::from(xq[j]))
                            .sum()
                    }
                };
                acc += m.d[wb] * x.d[xb] * dot as f32;
                if m.kind == QKind::Q4 {
                    acc += m.m[wb] * x.s[xb];
                }
            }
            t[k * n + r] = acc;
        }
    }
}

/// The instruction set the kernels use, detected once per product.
#[derive(Clone, Copy)]
enum Simd {
    Plain,
    #[cfg(target_arch = "x86_64")]
    V3(pulp::x86::V3),
}

impl Simd {
    fn detect() -> Self {
        static DETECTED: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
        *DETECTED.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if std::env::var_os("COLONY_NO_SIMD").is_none()
                && let Some(s) = pulp::x86::V3::try_new()
            {
                return Self::V3(s);
            }
            Self::Plain
        })
    }

    fn rows(self, m: &QMat, x: &QActs, first: usize, count: usize, t: &mut [f32]) {
        match self {
            Self::Plain => plain_rows(m, x, first, count, t),
            #[cfg(target_arch = "x86_64")]
            Self::V3(s) => s.vectorize(avx2::Job {
                s,
                m,
                x,
                first,
                count,
                t,
            }),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! AVX2 kernels: per block, `vpmaddubsw` multiplies unsigned weight bytes with signed
    //! activation bytes and adds pairs to 16 bits (|2·15·127| and |2·127·127| fit: Q8 weights
    //! go in as |w| with the sign moved onto the activation), `vpmaddwd` adds those pairs to 32
    //! bits, and one fused multiply-add scales the block into an f32 accumulator per activation
    //! row. Up to four activation rows share each unpacked weight block.

    use pulp::x86::V3;
    use std::arch::x86_64::{__m128i, __m256, __m256i};

    use super::{BLOCK, QActs, QKind, QMat};

    const GROUP: usize = 4;

    /// One chunk of output rows, run by `V3::vectorize` (which compiles it with AVX2 and FMA).
    pub(super) struct Job<'a> {
        pub s: V3,
        pub m: &'a QMat,
        pub x: &'a QActs,
        pub first: usize,
        pub count: usize,
        pub t: &'a mut [f32],
    }

    impl pulp::NullaryFnOnce for Job<'_> {
        type Output = ();

        #[inline(always)]
        fn call(self) {
            rows(self.s, self.m, self.x, self.first, self.count, self.t);
        }
    }

    /// Horizontal sum of eight floats.
    #[inline(always)]
    fn hsum(v: __m256) -> f32 {
        let a: [f32; 8] = pulp::cast(v);
        ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
    }

    #[inline(always)]
    fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// One activation row: its blocks, scales and scaled sums.
    type Act<'a> = (&'a [[i8; 32]], &'a [f32], &'a [f32]);

    /// Activation row `r` of `x`.
    #[inline(always)]
    fn act(x: &QActs, r: usize, nb: usize) -> Act<'_> {
        let q = pulp::as_arrays::<32, i8>(&x.q[r * nb * BLOCK..(r + 1) * nb * BLOCK]).0;
        (q, &x.d[r * nb..(r + 1) * nb], &x.s[r * nb..(r + 1) * nb])
    }

    /// Q4 block `b` as 32 unsigned bytes in value order.
    #[inline(always)]
    fn nibbles(s: V3, qs: &[[u8; 16]], b: usize) -> __m256i {
        let low = s.sse2._mm_set1_epi8(0x0f);
        let raw: __m128i = pulp::cast(qs[b]);
        let lo = s.sse2._mm_and_si128(raw, low);
        let hi = s.sse2._mm_and_si128(s.sse2._mm_srli_epi16::<4>(raw), low);
        s.avx._mm256_set_m128i(hi, lo)
    }

    /// Adds block `b` (unsigned weight bytes `w`, signed activation bytes, sign-adjusted by
    /// `sign` for Q8) times its scales to each row's accumulator.
    #[inline(always)]
    fn step<const G: usize, const Q8: bool>(
        s: V3,
        acc: &mut [__m256; G],
        w: __m256i,
        sign: __m256i,
        d: f32,
        xs: &[Act<'_>; G],
        b: usize,
    ) {
        let ones = s.avx._mm256_set1_epi16(1);
        for j in 0..G {
            let mut xv: __m256i = pulp::cast(xs[j].0[b]);
            if Q8 {
                xv = s.avx2._mm256_sign_epi8(xv, sign);
            }
            let p16 = s.avx2._mm256_maddubs_epi16(w, xv);
            let p32 = s.avx2._mm256_madd_epi16(p16, ones);
            let f = s.avx._mm256_cvtepi32_ps(p32);
            let k = s.avx._mm256_set1_ps(d * xs[j].1[b]);
            acc[j] = s.fma._mm256_fmadd_ps(k, f, acc[j]);
        }
    }

    /// Dot products of one Q4 weight row with `G` activation rows. Two sets of accumulators
    /// (even and odd blocks) keep two multiply-add chains in flight.
    #[inline(always)]
    fn q4<const G: usize>(
        s: V3,
        qs: &[[u8; 16]],
        d: &[f32],
        m: &[f32],
        xs: [Act<'_>; G],
    ) -> [f32; G] {
        let nb = d.len();
        assert!(qs.len() == nb && m.len() == nb);
        for x in &xs {
            assert!(x.0.len() == nb && x.1.len() == nb && x.2.len() == nb);
        }
        let zero = s.avx._mm256_setzero_si256();
        let mut even = [s.avx._mm256_setzero_ps(); G];
        let mut odd = [s.avx._mm256_setzero_ps(); G];
        let mut b = 0;
        while b + 1 < nb {
            step::<G, false>(s, &mut even, nibbles(s, qs, b), zero, d[b], &xs, b);
            step::<G, false>(
                s,
                &mut odd,
                nibbles(s, qs, b + 1),
                zero,
                d[b + 1],
                &xs,
                b + 1,
            );
            b += 2;
        }
        if b < nb {
            step::<G, false>(s, &mut even, nibbles(s, qs, b), zero, d[b], &xs, b);
        }
        std::array::from_fn(|j| hsum(s.avx._mm256_add_ps(even[j], odd[j])) + dot_f32(m, xs[j].2))
    }

    /// Dot products of one Q8 weight row with `G` activation rows.
    #[inline(always)]
    fn q8<const G: usize>(s: V3, qs: &[[u8; 32]], d: &[f32], xs: [Act<'_>; G]) -> [f32; G] {
        let nb = d.len();
        assert!(qs.len() == nb);
        for x in &xs {
            assert!(x.0.len() == nb && x.1.len() == nb);
        }
        let mut even = [s.avx._mm256_setzero_ps(); G];
        let mut odd = [s.avx._mm256_setzero_ps(); G];
        let mut b = 0;
        while b < nb {
            let acc = if b & 1 == 0 { &mut even } else { &mut odd };
            let w: __m256i = pulp::cast(qs[b]);
            step::<G, true>(s, acc, s.avx2._mm256_sign_epi8(w, w), w, d[b], &xs, b);
            b += 1;
        }
        std::array::from_fn(|j| hsum(s.avx._mm256_add_ps(even[j], odd[j])))
    }

    /// Weight row `o` against activation rows `r0..r0 + G`.
    #[inline(always)]
    fn group<const G: usize>(s: V3, m: &QMat, x: &QActs, o: usize, r0: usize) -> [f32; G] {
        let nb = m.cols / BLOCK;
        let xs: [_; G] = std::array::from_fn(|j| act(x, r0 + j, nb));
        let d = &m.d[o * nb..(o + 1) * nb];
        match m.kind {
            QKind::Q4 => q4::<G>(
                s,
                pulp::as_arrays::<16, u8>(&m.qs[o * nb * 16..(o + 1) * nb * 16]).0,
                d,
                &m.m[o * nb..(o + 1) * nb],
                xs,
            ),
            QKind::Q8 => q8::<G>(
                s,
                pulp::as_arrays::<32, u8>(&m.qs[o * nb * 32..(o + 1) * nb * 32]).0,
                d,
                xs,
            ),
        }
    }

    #[inline(always)]
    fn rows(s: V3, m: &QMat, x: &QActs, first: usize, count: usize, t: &mut [f32]) {
        let n = x.rows;
        for k in 0..count {
            let o = first + k;
            let out = &mut t[k * n..(k + 1) * n];
            let mut r0 = 0;
            while r0 < n {
                let g = match n - r0 {
                    1 => {
                        out[r0..r0 + 1].copy_from_slice(&group::<1>(s, m, x, o, r0));
                        1
                    }
                    2 => {
                        out[r0..r0 + 2].copy_from_slice(&group::<2>(s, m, x, o, r0));
                        2
                    }
                    3 => {
                        out[r0..r0 + 3].copy_from_slice(&group::<3>(s, m, x, o, r0));
                        3
                    }
                    _ => {
                        out[r0..r0 + GROUP].copy_from_slice(&group::<GROUP>(s, m, x, o, r0));
                        GROUP
                    }
                };
                r0 += g;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    /// Random raw GGML blocks of `kind` for a `[rows, cols]` matrix.
    fn raw_blocks(kind: TensorType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let nb = rows * cols / 32;
        let mut out = Vec::new();
        for _ in 0..nb {
            let d = half::f16::from_f32(rng.gen_range(0.001..0.05));
            out.extend(d.to_le_bytes());
            match kind {
                TensorType::Q4_1 => {
                    let m = half::f16::from_f32(rng.gen_range(-0.4..0.0));
                    out.extend(m.to_le_bytes());
                    out.extend((0..16).map(|_| rng.r#gen::<u8>()));
                }
                TensorType::Q4_0 => out.extend((0..16).map(|_| rng.r#gen::<u8>())),
                _ => out.extend((0..32).map(|_| rng.r#gen::<u8>())),
            }
        }
        out
    }

    /// f32 product of the dequantised matrix with the dequantised activations.
    fn reference(m: &QMat, x: &QActs) -> Vec<f32> {
        let w = m.to_mat();
        let xs: Vec<f32> = (0..x.rows * x.cols)
            .map(|i| x.d[i / BLOCK] * f32::from(x.q[i]))
            .collect();
        let mut out = vec![0f32; x.rows * m.rows];
        for r in 0..x.rows {
            for o in 0..m.rows {
                out[r * m.rows + o] = (0..m.cols)
                    .map(|i| f64::from(w.data[o * m.cols + i]) * f64::from(xs[r * m.cols + i]))
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    fn max_rel(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / scale)
            .fold(0.0, f32::max)
    }

    #[test]
    fn blocks_keep_the_values_of_the_file() {
        for kind in [TensorType::Q4_0, TensorType::Q4_1, TensorType::Q8_0] {
            let raw = raw_blocks(kind, 3, 64, 7);
            let q = QMat::from_ggml(kind, &raw, 3, 64).unwrap();
            let want = crate::quant::dequantize(kind, &raw, 3 * 64).unwrap();
            assert_eq!(q.to_mat().data, want, "{kind:?}");
            assert_eq!(q.row(1), want[64..128], "{kind:?}");
        }
        assert!(QMat::from_ggml(TensorType::Q4_1, &[0; 10], 1, 32).is_err());
        assert!(QMat::from_ggml(TensorType::Q8_0, &[0; 34], 1, 16).is_err());
    }

    /// Every kernel, every group size (1–9 activation rows: whole and partial groups of four),
    /// against the integer loops and against f64 products of the dequantised values.
    #[test]
    fn simd_products_equal_the_plain_integer_loops() {
        for (i, kind) in [TensorType::Q4_0, TensorType::Q4_1, TensorType::Q8_0]
            .into_iter()
            .enumerate()
        {
            let (rows, cols) = (37, 576);
            let m =
                QMat::from_ggml(kind, &raw_blocks(kind, rows, cols, i as u64), rows, cols).unwrap();
            for n in 1..=9 {
                let x = QActs::quantize(&random(n, cols, 100 + n as u64), cols);
                let fast = m.matmul(&x);
                let plain = m.matmul_plain(&x);
                let exact = reference(&m, &x);
                assert!(max_rel(&fast, &plain) < 1e-5, "{kind:?} n={n}");
                assert!(max_rel(&plain, &exact) < 1e-5, "{kind:?} n={n}");
            }
        }
    }

    /// Quantising activations (and f32 weights to Q8) costs well under 1% of the product.
    #[test]
    fn eight_bit_products_stay_close_to_f32() {
        let (rows, cols) = (64, 1536);
        let w = Mat {
            rows,
            cols,
            data: random(rows, cols, 1),
        };
        let x = random(3, cols, 2);
        let q = QMat::quantize_q8(&w);
        let got = q.matmul(&QActs::quantize(&x, cols));
        let mut want = vec![0f32; 3 * rows];
        for r in 0..3 {
            for o in 0..rows {
                want[r * rows + o] = (0..cols)
                    .map(|i| w.data[o * cols + i] * x[r * cols + i])
                    .sum();
            }
        }
        let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 0.02 * rms, "error {err} vs rms {rms}");
    }

    #[test]
    fn stacking_and_permuting_move_whole_rows() {
        let a = QMat::from_ggml(
            TensorType::Q4_1,
            &raw_blocks(TensorType::Q4_1, 2, 64, 1),
            2,
            64,
        )
        .unwrap();
        let b = QMat::from_ggml(
            TensorType::Q4_1,
            &raw_blocks(TensorType::Q4_1, 3, 64, 2),
            3,
            64,
        )
        .unwrap();
        let s = QMat::stack(&[&a, &b]);
        assert_eq!(s.rows, 5);
        assert_eq!(s.row(3), b.row(1));
        let p = s.permute_rows(&[4, 0, 1, 2, 3]);
        assert_eq!(p.row(0), b.row(2));
        assert_eq!(p.row(1), a.row(0));
        // Mixed kinds fall back to Q8, each value within half a step of its block.
        let c = QMat::from_ggml(
            TensorType::Q8_0,
            &raw_blocks(TensorType::Q8_0, 1, 64, 3),
            1,
            64,
        )
        .unwrap();
        let mixed = QMat::stack(&[&a, &c]);
        assert_eq!(mixed.kind, QKind::Q8);
        let (x, y) = (mixed.row(2), c.row(0));
        let step = y.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
        assert!(x.iter().zip(&y).all(|(p, q)| (p - q).abs() <= 0.51 * step));
    }
}

#[cfg(test)]
mod speed {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `cargo test --release -p colony-inference --lib qmat::speed -- --ignored --nocapture`
    #[test]
    #[ignore = "timing, by hand"]
    fn kernel_speed() {
        let (rows, cols) = (1536 * 2, 576);
        let raw: Vec<u8> = (0..rows * cols / 32 * 20)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let m = QMat::from_ggml(TensorType::Q4_1, &raw, rows, cols).unwrap();
        for n in [1, 2, 4, 8] {
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
                .collect();
            let a = QActs::quantize(&x, cols);
            let reps = 100;
            let s = (0..7)
                .map(|_| {
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        std::hint::black_box(m.matmul(&a));
                    }
                    t.elapsed().as_secs_f64() / reps as f64
                })
                .fold(f64::INFINITY, f64::min);
            let blocks = (rows * cols / 32 * n) as f64;
            println!(
                "n={n}: {:.1} µs, {:.2} ns per block-row, {:.1} GB/s of weights",
                s * 1e6,
                s * 1e9 / blocks,
                m.bytes() as f64 / s / 1e9
            );
        }
    }
}
