//! Vector files: NumPy `.npy` (2-D, little-endian `<f4`, `<f8` or `<f2`, C or Fortran order;
//! read as f32), the TEXMEX formats `.fvecs` / `.ivecs` / `.bvecs` (each row: a little-endian i32
//! dimension, then the values), and brute-force ground truth, cached beside the data.

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::distance::Metric;
use crate::hnsw::brute_force;
use crate::{Error, Result};

/// `n × dim` row-major values.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix<T> {
    pub n: usize,
    pub dim: usize,
    pub data: Vec<T>,
}

impl<T: Clone> Matrix<T> {
    pub fn row(&self, i: usize) -> &[T] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// Rows `range` as a new matrix.
    pub fn rows(&self, range: std::ops::Range<usize>) -> Self {
        Self {
            n: range.len(),
            dim: self.dim,
            data: self.data[range.start * self.dim..range.end * self.dim].to_vec(),
        }
    }
}

fn corrupt(path: &Path, what: impl Into<String>) -> Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads vectors by the file's extension (`.npy`, `.fvecs`, `.bvecs`).
pub fn read_vectors(path: &Path) -> Result<Matrix<f32>> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => read_npy(path),
        Some("fvecs") => read_vecs(path, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Some("bvecs") => read_vecs(path, 1, |b| f32::from(b[0])),
        _ => Err(corrupt(
            path,
            "unknown vector format (want .npy, .fvecs or .bvecs)",
        )),
    }
}

/// Reads an `.ivecs` file (ground truth, graph edges).
pub fn read_ivecs(path: &Path) -> Result<Matrix<u32>> {
    read_vecs(path, 4, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// TEXMEX rows: `i32` dimension, then `dim` values of `width` bytes. Every row must have the
/// first row's dimension.
fn read_vecs<T>(path: &Path, width: usize, value: impl Fn(&[u8]) -> T + Sync) -> Result<Matrix<T>>
where
    T: Send,
{
    let bytes = read(path)?;
    if bytes.is_empty() {
        return Ok(Matrix {
            n: 0,
            dim: 0,
            data: Vec::new(),
        });
    }
    if bytes.len() < 4 {
        return Err(corrupt(path, "shorter than one row header"));
    }
    let dim = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if dim <= 0 || dim > 1 << 20 {
        return Err(corrupt(path, format!("row 0 has dimension {dim}")));
    }
    let dim = dim as usize;
    let row = 4 + dim * width;
    if !bytes.len().is_multiple_of(row) {
        return Err(corrupt(
            path,
            format!(
                "{} bytes are not whole rows of {row} bytes (dimension {dim})",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / row;
    if let Some(bad) = (0..n).find(|&i| bytes[i * row..i * row + 4] != bytes[0..4]) {
        return Err(corrupt(
            path,
            format!("row {bad} has another dimension than row 0"),
        ));
    }
    let data: Vec<T> = bytes
        .par_chunks_exact(row)
        .flat_map_iter(|r| r[4..].chunks_exact(width).map(&value))
        .collect();
    Ok(Matrix { n, dim, data })
}

/// Writes `.fvecs` (or `.ivecs` for u32 through `write_ivecs`).
pub fn write_fvecs(path: &Path, m: &Matrix<f32>) -> Result<()> {
    write_vecs(path, m, |v, out| out.extend_from_slice(&v.to_le_bytes()))
}

pub fn write_ivecs(path: &Path, m: &Matrix<u32>) -> Result<()> {
    write_vecs(path, m, |v, out| out.extend_from_slice(&v.to_le_bytes()))
}

fn write_vecs<T: Copy>(path: &Path, m: &Matrix<T>, put: impl Fn(T, &mut Vec<u8>)) -> Result<()> {
    let mut out = Vec::with_capacity(m.n * (4 + m.dim * 4));
    for i in 0..m.n {
        out.extend_from_slice(&(m.dim as i32).to_le_bytes());
        for &v in &m.data[i * m.dim..(i + 1) * m.dim] {
            put(v, &mut out);
        }
    }
    write_atomically(path, &out)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("partial");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    // The rename itself is durable once the directory is synced.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// A 2-D little-endian `.npy` array (C or Fortran order) of f32, f64 or f16, as f32 rows.
pub fn read_npy(path: &Path) -> Result<Matrix<f32>> {
    let bytes = read(path)?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(corrupt(path, "not a .npy file (no magic)"));
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(corrupt(path, format!(".npy version {v}"))),
    };
    let header = bytes
        .get(hstart..hstart + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| corrupt(path, "truncated .npy header"))?;
    let field = |name: &str| -> Option<&str> {
        let i = header.find(&format!("'{name}'"))?;
        let rest = header[i + name.len() + 2..]
            .trim_start()
            .strip_prefix(':')?;
        Some(rest.trim_start())
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or_else(|| corrupt(path, "no dtype in the .npy header"))?;
    let fortran = field("fortran_order").is_some_and(|r| r.starts_with("True"));
    let shape: Vec<usize> = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .map(|r| {
            r.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::parse)
                .collect::<std::result::Result<Vec<usize>, _>>()
        })
        .and_then(|r| r.ok())
        .ok_or_else(|| corrupt(path, "no shape in the .npy header"))?;
    let [n, dim] = shape[..] else {
        return Err(corrupt(path, format!("shape {shape:?}: want 2 dimensions")));
    };
    let body = &bytes[hstart + hlen..];
    let width = match descr {
        "<f4" => 4,
        "<f8" => 8,
        "<f2" => 2,
        other => {
            return Err(corrupt(
                path,
                format!("dtype {other:?}: want <f4, <f8 or <f2"),
            ));
        }
    };
    if body.len() != n * dim * width {
        return Err(corrupt(
            path,
            format!(
                "{} bytes of data for shape ({n}, {dim}) of {descr}",
                body.len()
            ),
        ));
    }
    let data: Vec<f32> = match width {
        4 => body
            .par_chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        8 => body
            .par_chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        _ => body
            .par_chunks_exact(2)
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
    };
    let data = if fortran {
        // Column-major: value (i, j) at j·n + i.
        let mut t = vec![0f32; data.len()];
        t.par_chunks_exact_mut(dim.max(1))
            .enumerate()
            .for_each(|(i, row)| {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = data[j * n + i];
                }
            });
        t
    } else {
        data
    };
    Ok(Matrix { n, dim, data })
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let frac = f32::from(h & 0x3ff);
    match exp {
        0 => sign * frac * 2f32.powi(-24),
        31 if frac == 0.0 => sign * f32::INFINITY,
        31 => f32::NAN,
        e => sign * (1.0 + frac / 1024.0) * 2f32.powi(e - 15),
    }
}

/// Writes a 2-D f32 `.npy` (version 1).
pub fn write_npy(path: &Path, m: &Matrix<f32>) -> Result<()> {
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}), }}",
        m.n, m.dim
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + m.data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in &m.data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    write_atomically(path, &out)
}

/// The `k` true nearest neighbours of every query (brute force, in parallel), read from
/// `cache` when it holds them for the same data (its name carries a checksum of both sets),
/// else computed and written there.
pub fn ground_truth(
    base: &Matrix<f32>,
    queries: &Matrix<f32>,
    metric: Metric,
    k: usize,
    cache: Option<&Path>,
) -> Result<Matrix<u32>> {
    let file: Option<PathBuf> = cache.map(|dir| {
        let mut h = crc32fast::Hasher::new();
        for m in [base, queries] {
            h.update(&(m.n as u64).to_le_bytes());
            h.update(&(m.dim as u64).to_le_bytes());
            for v in &m.data {
                h.update(&v.to_le_bytes());
            }
        }
        dir.join(format!(
            "gt-{}-k{k}-{:08x}.ivecs",
            metric.name(),
            h.finalize()
        ))
    });
    if let Some(f) = &file
        && let Ok(m) = read_ivecs(f)
        && m.n == queries.n
        && m.dim == k
    {
        return Ok(m);
    }
    if base.dim != queries.dim {
        return Err(Error::Invalid(format!(
            "base dimension {} and query dimension {}",
            base.dim, queries.dim
        )));
    }
    let data: Vec<u32> = (0..queries.n)
        .into_par_iter()
        .flat_map_iter(|i| brute_force(&base.data, base.dim, metric, queries.row(i), k))
        .collect();
    let gt = Matrix {
        n: queries.n,
        dim: k.min(base.n),
        data,
    };
    if let Some(f) = &file {
        if let Some(dir) = f.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        write_ivecs(f, &gt)?;
    }
    Ok(gt)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn npy_fvecs_and_ivecs_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let m = Matrix {
            n: 3,
            dim: 5,
            data: (0..15).map(|i| i as f32 * 0.5 - 2.0).collect(),
        };
        let npy = dir.path().join("a.npy");
        write_npy(&npy, &m).unwrap();
        assert_eq!(read_vectors(&npy).unwrap(), m);
        let fv = dir.path().join("a.fvecs");
        write_fvecs(&fv, &m).unwrap();
        assert_eq!(read_vectors(&fv).unwrap(), m);
        let iv = dir.path().join("a.ivecs");
        let mi = Matrix {
            n: 2,
            dim: 2,
            data: vec![1, 2, 3, 4],
        };
        write_ivecs(&iv, &mi).unwrap();
        assert_eq!(read_ivecs(&iv).unwrap(), mi);
    }

    #[test]
    fn bad_files_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.fvecs");
        std::fs::write(&p, [4u8, 0, 0, 0, 1, 2]).unwrap();
        let e = read_vectors(&p).unwrap_err().to_string();
        assert!(e.contains("not whole rows"), "{e}");
        let p = dir.path().join("c.npy");
        std::fs::write(&p, b"\x93NUMPY\x01\x00\x10\x00{'descr': '<i4'}").unwrap();
        assert!(read_vectors(&p).is_err());
        let p = dir.path().join("d.txt");
        std::fs::write(&p, b"x").unwrap();
        assert!(
            read_vectors(&p)
                .unwrap_err()
                .to_string()
                .contains("unknown")
        );
    }

    #[test]
    fn ground_truth_is_cached_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let base = Matrix {
            n: 4,
            dim: 1,
            data: vec![0.0, 10.0, 3.0, 7.0],
        };
        let q = Matrix {
            n: 2,
            dim: 1,
            data: vec![2.0, 9.0],
        };
        let gt = ground_truth(&base, &q, Metric::L2, 2, Some(dir.path())).unwrap();
        assert_eq!(gt.data, vec![2, 0, 1, 3]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let again = ground_truth(&base, &q, Metric::L2, 2, Some(dir.path())).unwrap();
        assert_eq!(again, gt);
    }
}
