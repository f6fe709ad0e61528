//! GGUF files (llama.cpp's format, versions 2 and 3): the metadata, the tensor directory, and
//! each tensor's data dequantised to f32.
//!
//! Layout: magic `GGUF`, version (u32), tensor count and metadata count (u64), the metadata
//! key/value pairs, the tensor infos (name, dimensions innermost first, type, offset into the
//! data section), padding to `general.alignment` (32 by default), the data section. All
//! little-endian. Every length and offset read from the file is checked against the file's size
//! before anything is allocated, so a corrupt or hostile file gives an error naming the problem.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::quant::{self, TensorType};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(x) => Some(x.into()),
            Value::U16(x) => Some(x.into()),
            Value::U32(x) => Some(x.into()),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x.into()),
            Value::F64(x) => Some(x),
            _ => self.as_u64().map(|x| x as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// Where one tensor lives and what it is.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as GGUF stores them: innermost (contiguous) first.
    pub dims: Vec<u64>,
    pub kind: TensorType,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub bytes: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Dimensions outermost first (row-major shape, as burn and PyTorch write it).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a GGUF file (bad magic)")]
    Magic(PathBuf),
    #[error("{path}: GGUF version {version} is not supported (this build reads 2 and 3)")]
    Version { path: PathBuf, version: u32 },
    #[error("{path}: corrupt at byte {at}: {what}")]
    Corrupt {
        path: PathBuf,
        at: u64,
        what: String,
    },
    #[error("{path}: tensor {name:?}: {what}")]
    Tensor {
        path: PathBuf,
        name: String,
        what: String,
    },
    #[error("{path}: no tensor named {name:?}")]
    Missing { path: PathBuf, name: String },
    #[error("{path}: metadata {key:?} is missing or has the wrong type")]
    Metadata { path: PathBuf, key: String },
}

/// An open GGUF file: metadata and tensor directory read, tensor data read on demand.
#[derive(Debug)]
pub struct Gguf {
    path: PathBuf,
    file: File,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

/// Strings and arrays longer than this are refused (a real vocabulary is ~10^5 entries).
const MAX_ARRAY: u64 = 1 << 24;
const MAX_STRING: u64 = 1 << 24;
const MAX_DIMS: u32 = 4;

/// Reads little-endian values from a buffered file, tracking the position for errors.
struct Cursor<'a> {
    r: std::io::BufReader<&'a File>,
    at: u64,
    len: u64,
    path: &'a Path,
}

impl Cursor<'_> {
    fn corrupt(&self, what: impl Into<String>) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            at: self.at,
            what: what.into(),
        }
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|_| self.corrupt("the file ends inside the header"))?;
        self.at += N as u64;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn string(&mut self) -> Result<String, GgufError> {
        let n = self.u64()?;
        if n > MAX_STRING || n > self.len.saturating_sub(self.at) {
            return Err(self.corrupt(format!("a string of {n} bytes")));
        }
        let mut b = vec![0u8; n as usize];
        self.r
            .read_exact(&mut b)
            .map_err(|_| self.corrupt("the file ends inside a string"))?;
        self.at += n;
        String::from_utf8(b).map_err(|_| self.corrupt("a string is not UTF-8"))
    }

    fn value(&mut self, kind: u32, depth: u32) -> Result<Value, GgufError> {
        Ok(match kind {
            0 => Value::U8(self.bytes::<1>()?[0]),
            1 => Value::I8(self.bytes::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => match self.bytes::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.corrupt(format!("boolean {b}"))),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.corrupt("arrays nested too deep"));
                }
                let inner = self.u32()?;
                let n = self.u64()?;
                // Each element takes at least one byte.
                if n > MAX_ARRAY || n > self.len.saturating_sub(self.at) {
                    return Err(self.corrupt(format!("an array of {n} elements")));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            k => return Err(self.corrupt(format!("unknown metadata type {k}"))),
        })
    }
}

impl Gguf {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GgufError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut c = Cursor {
            r: std::io::BufReader::with_capacity(1 << 20, &file),
            at: 0,
            len,
            path: &path,
        };
        if len < 4 || &c.bytes::<4>()? != b"GGUF" {
            return Err(GgufError::Magic(path.clone()));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::Version {
                path: path.clone(),
                version,
            });
        }
        let n_tensors = c.u64()?;
        let n_kv = c.u64()?;
        if n_tensors > MAX_ARRAY || n_kv > MAX_ARRAY {
            return Err(c.corrupt(format!("{n_tensors} tensors, {n_kv} metadata entries")));
        }
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let kind = c.u32()?;
            let v = c.value(kind, 0)?;
            metadata.insert(key, v);
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32);
        if alignment == 0 || !alignment.is_power_of_two() || alignment > 1 << 20 {
            return Err(c.corrupt(format!("alignment {alignment}")));
        }
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string()?;
            let n_dims = c.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(c.corrupt(format!("tensor {name:?} has {n_dims} dimensions")));
            }
            let mut dims = Vec::new();
            for _ in 0..n_dims {
                dims.push(c.u64()?);
            }
            let kind_id = c.u32()?;
            let offset = c.u64()?;
            infos.push((name, dims, kind_id, offset));
        }
        let data_start = c.at.div_ceil(alignment) * alignment;
        drop(c);
        let mut tensors = BTreeMap::new();
        for (name, dims, kind_id, offset) in infos {
            let bad = |what: String| GgufError::Tensor {
                path: path.clone(),
                name: name.clone(),
                what,
            };
            let kind = TensorType::from_id(kind_id).ok_or_else(|| {
                bad(format!(
                    "type {kind_id} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q8_0 are)"
                ))
            })?;
            let elements = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("dimensions {dims:?} overflow")))?;
            if dims[0] % kind.block_len() as u64 != 0 {
                return Err(bad(format!(
                    "rows of {} elements do not split into {:?} blocks of {}",
                    dims[0],
                    kind,
                    kind.block_len()
                )));
            }
            let bytes = elements / kind.block_len() as u64 * kind.block_bytes() as u64;
            let start = data_start
                .checked_add(offset)
                .filter(|s| s.checked_add(bytes).is_some_and(|e| e <= len))
                .ok_or_else(|| {
                    bad(format!(
                        "data at {offset}+{bytes} lies outside the file ({len} bytes)"
                    ))
                })?;
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "offset {offset} is not aligned to {alignment}"
                )));
            }
            tensors.insert(
                name.clone(),
                TensorInfo {
                    name,
                    dims,
                    kind,
                    offset: start,
                    bytes,
                },
            );
        }
        Ok(Self {
            path,
            file,
            version,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn meta_err(&self, key: &str) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
        }
    }

    pub fn u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| self.meta_err(key))
    }

    pub fn f64(&self, key: &str) -> Result<f64, GgufError> {
        self.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| self.meta_err(key))
    }

    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| self.meta_err(key))
    }

    /// A string array (e.g. `tokenizer.ggml.tokens`).
    pub fn strings(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        self.get(key)
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.meta_err(key))
    }

    pub fn info(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensors.get(name).ok_or_else(|| GgufError::Missing {
            path: self.path.clone(),
            name: name.to_string(),
        })
    }

    /// The raw bytes of a tensor.
    pub fn raw(&self, name: &str) -> Result<Vec<u8>, GgufError> {
        let info = self.info(name)?;
        let io = |source| GgufError::Io {
            path: self.path.clone(),
            source,
        };
        let mut f = &self.file;
        f.seek(SeekFrom::Start(info.offset)).map_err(io)?;
        let mut buf = vec![0u8; info.bytes as usize];
        f.read_exact(&mut buf).map_err(io)?;
        Ok(buf)
    }

    /// A tensor dequantised to f32, row-major, with its shape (outermost first).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>), GgufError> {
        let info = self.info(name)?;
        let raw = self.raw(name)?;
        let data =
            quant::dequantize(info.kind, &raw, info.elements() as usize).map_err(|what| {
                GgufError::Tensor {
                    path: self.path.clone(),
                    name: name.to_string(),
                    what,
                }
            })?;
        Ok((data, info.shape()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A small GGUF writer for tests (the format, from the spec).
    pub(crate) fn write_gguf(
        path: &Path,
        meta: &[(&str, Value)],
        tensors: &[(&str, Vec<u64>, TensorType, Vec<u8>)],
    ) {
        fn put_value(b: &mut Vec<u8>, v: &Value) {
            match v {
                Value::U32(x) => b.extend(x.to_le_bytes()),
                Value::F32(x) => b.extend(x.to_le_bytes()),
                Value::U64(x) => b.extend(x.to_le_bytes()),
                Value::String(s) => {
                    b.extend((s.len() as u64).to_le_bytes());
                    b.extend(s.as_bytes());
                }
                Value::Array(a) => {
                    let kind = match a.first() {
                        Some(Value::String(_)) | None => 8u32,
                        Some(Value::U32(_)) => 4,
                        Some(other) => panic!("test writer: {other:?}"),
                    };
                    b.extend(kind.to_le_bytes());
                    b.extend((a.len() as u64).to_le_bytes());
                    for x in a {
                        put_value(b, x);
                    }
                }
                other => panic!("test writer: {other:?}"),
            }
        }
        fn kind_of(v: &Value) -> u32 {
            match v {
                Value::U32(_) => 4,
                Value::F32(_) => 6,
                Value::String(_) => 8,
                Value::Array(_) => 9,
                Value::U64(_) => 10,
                other => panic!("test writer: {other:?}"),
            }
        }
        let mut b = Vec::new();
        b.extend(b"GGUF");
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            put_value(&mut b, &Value::String((*k).into()));
            b.extend(kind_of(v).to_le_bytes());
            put_value(&mut b, v);
        }
        let mut offset;
        let mut data = Vec::new();
        for (name, dims, kind, bytes) in tensors {
            put_value(&mut b, &Value::String((*name).into()));
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            while data.len() % 32 != 0 {
                data.push(0);
            }
            offset = data.len() as u64;
            b.extend(kind.id().to_le_bytes());
            b.extend(offset.to_le_bytes());
            data.extend(bytes);
        }
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend(data);
        std::fs::write(path, b).unwrap();
    }

    #[test]
    fn reads_metadata_and_tensors_it_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        let w: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        write_gguf(
            &p,
            &[
                ("general.architecture", Value::String("llama".into())),
                ("llama.block_count", Value::U32(2)),
                ("x.f", Value::F32(0.5)),
                (
                    "tokenizer.ggml.tokens",
                    Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
                ),
            ],
            &[("w", vec![3, 2], TensorType::F32, w)],
        );
        let g = Gguf::open(&p).unwrap();
        assert_eq!(g.str("general.architecture").unwrap(), "llama");
        assert_eq!(g.u64("llama.block_count").unwrap(), 2);
        assert_eq!(g.f64("x.f").unwrap(), 0.5);
        assert_eq!(g.strings("tokenizer.ggml.tokens").unwrap(), ["a", "b"]);
        let (data, shape) = g.tensor_f32("w").unwrap();
        assert_eq!(shape, [2, 3]);
        assert_eq!(data, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert!(matches!(
            g.tensor_f32("nope"),
            Err(GgufError::Missing { .. })
        ));
    }

    #[test]
    fn corrupt_files_are_named_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        std::fs::write(&p, b"GGML\x03\0\0\0").unwrap();
        assert!(matches!(Gguf::open(&p), Err(GgufError::Magic(_))));
        std::fs::write(&p, b"GGUF\x09\0\0\0").unwrap();
        assert!(matches!(
            Gguf::open(&p),
            Err(GgufError::Version { version: 9, .. })
        ));
        // A tensor whose data would lie past the end of the file.
        write_gguf(&p, &[], &[("w", vec![4], TensorType::F32, vec![0; 16])]);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(bytes.len() - 8);
        std::fs::write(&p, &bytes).unwrap();
        let e = Gguf::open(&p).unwrap_err().to_string();
        assert!(e.contains("outside the file"), "{e}");
        // Truncated inside the header, and an absurd string length.
        std::fs::write(&p, &bytes[..20]).unwrap();
        assert!(matches!(Gguf::open(&p), Err(GgufError::Corrupt { .. })));
        let mut huge = b"GGUF\x03\0\0\0".to_vec();
        huge.extend(0u64.to_le_bytes());
        huge.extend(1u64.to_le_bytes());
        huge.extend(u64::MAX.to_le_bytes());
        std::fs::write(&p, &huge).unwrap();
        let e = Gguf::open(&p).unwrap_err().to_string();
        assert!(e.contains("a string of"), "{e}");
        // Every truncation of a valid file is an error, never a panic.
        write_gguf(
            &p,
            &[("k", Value::String("v".into()))],
            &[("w", vec![4], TensorType::F32, vec![0; 16])],
        );
        let good = std::fs::read(&p).unwrap();
        for n in 0..good.len() {
            std::fs::write(&p, &good[..n]).unwrap();
            assert!(Gguf::open(&p).is_err(), "truncated to {n}");
        }
    }
}
