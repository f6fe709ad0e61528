//! Compression of the parts that cross the network: none (f32), fp16, or 8-bit blockwise
//! (absmax scaling per block of values, as bitsandbytes and hivemind do).
//!
//! Decoding is strict: a payload whose length does not match what its header promises, or an
//! unknown scheme, is an error naming the problem, never a panic or a silent short vector.

/// How a part is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    /// IEEE half precision; values beyond ±65504 are clamped (as hivemind does).
    Fp16,
    /// One f32 scale per `block` values, then one signed byte per value.
    Uint8Blockwise {
        block: u32,
    },
}

impl Compression {
    pub const DEFAULT_BLOCK: u32 = 256;

    /// Encoded bytes for `n` values.
    pub fn encoded_len(self, n: usize) -> usize {
        match self {
            Compression::None => 4 * n,
            Compression::Fp16 => 2 * n,
            Compression::Uint8Blockwise { block } => n + 4 * n.div_ceil(block.max(1) as usize),
        }
    }

    /// The largest error decoding may introduce for a value `x` in a block whose largest
    /// magnitude is `absmax` (the bound the tests check).
    pub fn error_bound(self, x: f32, absmax: f32) -> f32 {
        match self {
            Compression::None => 0.0,
            Compression::Fp16 => (x.abs() * 2f32.powi(-11)).max(2f32.powi(-25)),
            Compression::Uint8Blockwise { .. } => {
                absmax / 127.0 * 0.5 * (1.0 + 1e-6) + f32::EPSILON * absmax
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompressionError {
    #[error("compressed part of {got} bytes, expected {expected} for {values} values")]
    WrongLength {
        got: usize,
        expected: usize,
        values: usize,
    },
    #[error("block size must be at least 1")]
    BadBlock,
}

pub fn encode(scheme: Compression, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(scheme.encoded_len(values.len()));
    match scheme {
        Compression::None => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Compression::Fp16 => values.iter().for_each(|v| {
            out.extend_from_slice(&f32_to_f16(v.clamp(-65504.0, 65504.0)).to_le_bytes())
        }),
        Compression::Uint8Blockwise { block } => {
            for chunk in values.chunks(block.max(1) as usize) {
                let absmax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = if absmax > 0.0 { absmax / 127.0 } else { 1.0 };
                out.extend_from_slice(&scale.to_le_bytes());
                out.extend(
                    chunk
                        .iter()
                        .map(|v| (v / scale).round().clamp(-127.0, 127.0) as i8 as u8),
                );
            }
        }
    }
    out
}

pub fn decode(
    scheme: Compression,
    bytes: &[u8],
    values: usize,
) -> Result<Vec<f32>, CompressionError> {
    let expected = scheme.encoded_len(values);
    if bytes.len() != expected {
        return Err(CompressionError::WrongLength {
            got: bytes.len(),
            expected,
            values,
        });
    }
    Ok(match scheme {
        Compression::None => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Compression::Fp16 => bytes
            .chunks_exact(2)
            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        Compression::Uint8Blockwise { block } => {
            if block == 0 {
                return Err(CompressionError::BadBlock);
            }
            let mut out = Vec::with_capacity(values);
            let mut rest = bytes;
            while out.len() < values {
                let n = (values - out.len()).min(block as usize);
                let scale = f32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                out.extend(rest[4..4 + n].iter().map(|&q| f32::from(q as i8) * scale));
                rest = &rest[4 + n..];
            }
            out
        }
    })
}

/// f32 → IEEE binary16 bits, round to nearest even; overflow to ±inf, NaN stays NaN.
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let mant = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if mant != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = mant | 0x80_0000;
        let shift = (14 - e) as u32;
        let (q, rem, half) = (m >> shift, m & ((1 << shift) - 1), 1u32 << (shift - 1));
        let r = q + u32::from(rem > half || (rem == half && q & 1 == 1));
        return sign | r as u16;
    }
    let h = ((e as u32) << 10) | (mant >> 13);
    let rem = mant & 0x1fff;
    // A carry out of the mantissa correctly bumps the exponent (possibly to infinity).
    let h = h + u32::from(rem > 0x1000 || (rem == 0x1000 && h & 1 == 1));
    sign | h as u16
}

/// IEEE binary16 bits → f32 (exact).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, _) => {
            let (mut e, mut m) = (127 - 15 + 1, mant);
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, _) => sign | 0x7f80_0000 | (mant << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_half_round_trips_exactly() {
        for h in 0..=u16::MAX {
            let x = f16_to_f32(h);
            if x.is_nan() {
                assert!(f16_to_f32(f32_to_f16(x)).is_nan());
            } else {
                assert_eq!(f32_to_f16(x), h, "{h:#06x} → {x}");
            }
        }
    }

    #[test]
    fn fp16_rounds_to_nearest() {
        // Oracle: the nearest of the two neighbouring halves, checked by brute force.
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let x = f32::from_bits((seed as u32 & 0x7fff_ffff) % 0x4780_0000)
                * if seed & (1 << 40) != 0 { -1.0 } else { 1.0 };
            let h = f32_to_f16(x);
            let y = f16_to_f32(h);
            let up = f16_to_f32(h.wrapping_add(1));
            let down = f16_to_f32(h.wrapping_sub(1));
            let err = (f64::from(y) - f64::from(x)).abs();
            for n in [up, down] {
                if n.is_finite() {
                    assert!(
                        err <= (f64::from(n) - f64::from(x)).abs(),
                        "{x}: chose {y}, {n} is nearer"
                    );
                }
            }
        }
    }

    #[test]
    fn schemes_round_trip_within_their_bounds() {
        let values: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 2001) as f32 / 10.0 - 100.0)
            .chain([0.0, 1e-9, -3e4])
            .collect();
        for scheme in [
            Compression::None,
            Compression::Fp16,
            Compression::Uint8Blockwise { block: 64 },
        ] {
            let bytes = encode(scheme, &values);
            assert_eq!(bytes.len(), scheme.encoded_len(values.len()));
            let back = decode(scheme, &bytes, values.len()).unwrap();
            for (blk, (xs, ys)) in values.chunks(64).zip(back.chunks(64)).enumerate() {
                let absmax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (x, y) in xs.iter().zip(ys) {
                    assert!(
                        (x - y).abs() <= scheme.error_bound(*x, absmax),
                        "{scheme:?} block {blk}: {x} → {y}"
                    );
                }
            }
        }
        assert_eq!(
            decode(Compression::Fp16, &encode(Compression::Fp16, &[1e9]), 1).unwrap(),
            vec![65504.0]
        );
    }

    #[test]
    fn truncated_or_padded_payloads_are_refused() {
        let bytes = encode(Compression::Uint8Blockwise { block: 16 }, &[1.0; 40]);
        for n in [bytes.len() - 1, bytes.len() + 1] {
            let mut b = bytes.clone();
            b.resize(n, 0);
            assert!(matches!(
                decode(Compression::Uint8Blockwise { block: 16 }, &b, 40),
                Err(CompressionError::WrongLength { .. })
            ));
        }
        assert!(decode(Compression::None, &[0; 7], 2).is_err());
        assert_eq!(
            decode(Compression::Uint8Blockwise { block: 0 }, &[0; 5], 1),
            Err(CompressionError::BadBlock)
        );
    }
}
