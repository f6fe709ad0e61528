//! GGML tensor types and their dequantisation to f32 (the block layouts of llama.cpp's
//! `ggml-common.h`): blocks of 32 values with an f16 scale (and, for Q4_1, an f16 minimum).
//!
//! - Q4_0: `d: f16, qs: [u8; 16]`; value j (0..16) is the low nibble of `qs[j]`, value j + 16 the
//!   high nibble; x = d · (q − 8).
//! - Q4_1: `d: f16, m: f16, qs: [u8; 16]`; same nibble order; x = d · q + m.
//! - Q8_0: `d: f16, qs: [i8; 32]`; x = d · q.

use half::{bf16, f16};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl TensorType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            30 => Self::BF16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::BF16 => 30,
        }
    }

    /// Values per block.
    pub fn block_len(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantises `n` values of type `kind` from `raw`.
pub fn dequantize(kind: TensorType, raw: &[u8], n: usize) -> Result<Vec<f32>, String> {
    if !n.is_multiple_of(kind.block_len()) {
        return Err(format!("{n} values do not fill whole {kind:?} blocks"));
    }
    let want = n / kind.block_len() * kind.block_bytes();
    if raw.len() != want {
        return Err(format!(
            "{} bytes for {n} {kind:?} values (want {want})",
            raw.len()
        ));
    }
    let mut out = Vec::with_capacity(n);
    match kind {
        TensorType::F32 => out.extend(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        TensorType::F16 => out.extend(raw.chunks_exact(2).map(|c| f16_at(c, 0))),
        TensorType::BF16 => out.extend(
            raw.chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        TensorType::Q4_0 => {
            for b in raw.chunks_exact(18) {
                let d = f16_at(b, 0);
                let qs = &b[2..];
                let mut block = [0f32; 32];
                for (j, &q) in qs.iter().enumerate() {
                    block[j] = d * (f32::from(q & 0x0f) - 8.0);
                    block[j + 16] = d * (f32::from(q >> 4) - 8.0);
                }
                out.extend(block);
            }
        }
        TensorType::Q4_1 => {
            for b in raw.chunks_exact(20) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..];
                let mut block = [0f32; 32];
                for (j, &q) in qs.iter().enumerate() {
                    block[j] = d * f32::from(q & 0x0f) + m;
                    block[j + 16] = d * f32::from(q >> 4) + m;
                }
                out.extend(block);
            }
        }
        TensorType::Q8_0 => {
            for b in raw.chunks_exact(34) {
                let d = f16_at(b, 0);
                out.extend(b[2..].iter().map(|&q| d * f32::from(q as i8)));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn q4_blocks_follow_the_nibble_order() {
        // d = 0.5, m = -1; qs[j] = (j, 15 − j) in (low, high) nibbles.
        let mut b = Vec::new();
        b.extend(f16::from_f32(0.5).to_le_bytes());
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let v = dequantize(TensorType::Q4_1, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(v[j], 0.5 * j as f32 - 1.0);
            assert_eq!(v[j + 16], 0.5 * (15 - j) as f32 - 1.0);
        }
        let mut b0 = vec![];
        b0.extend(f16::from_f32(2.0).to_le_bytes());
        b0.extend(&b[4..]);
        let v = dequantize(TensorType::Q4_0, &b0, 32).unwrap();
        assert_eq!(v[0], 2.0 * (0.0 - 8.0));
        assert_eq!(v[31], 2.0 * (0.0 - 8.0));
        assert_eq!(v[15], 2.0 * (15.0 - 8.0));
    }

    #[test]
    fn q8_and_floats() {
        let mut b = Vec::new();
        b.extend(f16::from_f32(0.25).to_le_bytes());
        b.extend((0..32).map(|j| (j as i8 - 16) as u8));
        let v = dequantize(TensorType::Q8_0, &b, 32).unwrap();
        assert_eq!(v[0], -4.0);
        assert_eq!(v[31], 0.25 * 15.0);
        let f: Vec<u8> = [f16::from_f32(1.5), f16::from_f32(-2.0)]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(dequantize(TensorType::F16, &f, 2).unwrap(), [1.5, -2.0]);
        let bf: Vec<u8> = [bf16::from_f32(3.0)]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(dequantize(TensorType::BF16, &bf, 1).unwrap(), [3.0]);
        assert!(dequantize(TensorType::Q8_0, &b[..33], 32).is_err());
        assert!(dequantize(TensorType::Q8_0, &b, 31).is_err());
    }
}
