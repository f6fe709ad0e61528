//! The index file: one read and one checksum on load, no parsing per vector.
//!
//! ```text
//! "COLONY-HNSW\0"  u32 version  u32 header length  header (JSON: dim, metric, params, slots,
//! entry)  vectors f32[slots·dim]  bottom links u32[slots·(1+m0)]  levels u8[slots]
//! upper links u32[Σ levels·(1+m)]  keys u64[slots]  labels u32[slots]  deleted u8[slots]
//! crc32 of everything before it
//! ```
//!
//! All little-endian. Writing goes to a temporary file renamed over the target, so a crash
//! leaves the old index or the new one. Loading checks the checksum, every length, and every
//! link (in range, not a deleted slot, counts within capacity) before the index exists: a
//! corrupt or truncated file is an error that names what is wrong, never a panic later.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use crate::data::write_atomically;
use crate::distance::Metric;
use crate::hnsw::{Entry, Hnsw, Params};
use crate::learned::{QueryMap, Routing};
use crate::{Error, Result};

const MAGIC: &[u8; 12] = b"COLONY-HNSW\0";
const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    dim: usize,
    metric: Metric,
    params: Params,
    slots: usize,
    /// (slot, level) of the entry vertex.
    entry: Option<(u32, usize)>,
}

impl Hnsw {
    /// Writes the index to `path` (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let slots = self.slots();
        let header = Header {
            dim: self.dim,
            metric: self.metric,
            params: self.params.clone(),
            slots,
            entry: self.entry_now().map(|e| (e.slot, e.level)),
        };
        let header = serde_json::to_vec(&header).map_err(|e| Error::Invalid(e.to_string()))?;
        let upper: usize = self.upper.iter().map(Vec::len).sum();
        let mut out = Vec::with_capacity(
            64 + header.len()
                + self.vectors.len() * 4
                + (self.links0.len() + upper) * 4
                + slots * 14,
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        for v in &self.vectors {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for a in &self.links0 {
            out.extend_from_slice(&a.load(Relaxed).to_le_bytes());
        }
        out.extend_from_slice(&self.levels);
        for a in self.upper.iter().flatten() {
            out.extend_from_slice(&a.load(Relaxed).to_le_bytes());
        }
        for k in &self.keys {
            out.extend_from_slice(&k.to_le_bytes());
        }
        for l in &self.labels {
            out.extend_from_slice(&l.to_le_bytes());
        }
        out.extend(self.deleted.iter().map(|&d| u8::from(d)));
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        write_atomically(path, &out)
    }

    /// Reads an index written by [`Hnsw::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|what| Error::Corrupt {
            path: path.to_path_buf(),
            what,
        })
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() < MAGIC.len() + 12 || &bytes[..MAGIC.len()] != MAGIC {
            return Err("not a Colony HNSW index (no magic)".into());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err("checksum mismatch (truncated or corrupt)".into());
        }
        let mut r = Reader {
            b: body,
            at: MAGIC.len(),
        };
        let version = r.u32s(1)?[0];
        if version != VERSION {
            return Err(format!("version {version}, this build reads {VERSION}"));
        }
        let hlen = r.u32s(1)?[0] as usize;
        let h: Header =
            serde_json::from_slice(r.take(hlen)?).map_err(|e| format!("header: {e}"))?;
        let (n, dim, p) = (h.slots, h.dim, &h.params);
        if dim == 0 || p.m < 2 || p.m0 < p.m {
            return Err(format!("header: dim {dim}, m {}, m0 {}", p.m, p.m0));
        }
        let vectors: Vec<f32> = r
            .take(
                n.checked_mul(dim)
                    .and_then(|x| x.checked_mul(4))
                    .ok_or("sizes overflow")?,
            )?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let links0 = r.u32s(n * (1 + p.m0))?;
        let levels = r.take(n)?.to_vec();
        let upper_words: usize = levels.iter().map(|&l| l as usize * (1 + p.m)).sum();
        let mut upper_all = r.u32s(upper_words)?.into_iter();
        let keys: Vec<u64> = r
            .take(n * 8)?
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect();
        let labels = r.u32s(n)?;
        let deleted: Vec<bool> = r.take(n)?.iter().map(|&d| d != 0).collect();
        if r.at != body.len() {
            return Err(format!(
                "{} bytes after the last section",
                body.len() - r.at
            ));
        }
        // Every list: count within capacity, ids live and not the vertex itself.
        let check = |s: usize, level: usize, list: &[u32], cap: usize| -> Result<(), String> {
            let c = list[0] as usize;
            if c > cap {
                return Err(format!(
                    "vertex {s} level {level}: {c} links, capacity {cap}"
                ));
            }
            if deleted[s] && c > 0 {
                return Err(format!("deleted vertex {s} still has links"));
            }
            for &id in &list[1..1 + c] {
                if id as usize >= n || deleted[id as usize] || id as usize == s {
                    return Err(format!("vertex {s} level {level}: bad link {id}"));
                }
            }
            Ok(())
        };
        for (s, l) in links0.chunks_exact(1 + p.m0).enumerate() {
            check(s, 0, l, p.m0)?;
        }
        let mut upper = Vec::with_capacity(n);
        for (s, &lv) in levels.iter().enumerate() {
            let words: Vec<u32> = upper_all.by_ref().take(lv as usize * (1 + p.m)).collect();
            for (i, l) in words.chunks_exact(1 + p.m).enumerate() {
                check(s, i + 1, l, p.m)?;
                if l[1..1 + l[0] as usize]
                    .iter()
                    .any(|&id| (levels[id as usize] as usize) < i + 1)
                {
                    return Err(format!("vertex {s} level {}: a link below it", i + 1));
                }
            }
            upper.push(words.into_iter().map(AtomicU32::new).collect());
        }
        let entry = match h.entry {
            Some((slot, level))
                if (slot as usize) < n
                    && !deleted[slot as usize]
                    && levels[slot as usize] as usize == level =>
            {
                Some(Entry { slot, level })
            }
            None if deleted.iter().all(|d| *d) => None,
            other => return Err(format!("bad entry vertex {other:?}")),
        };
        Hnsw::from_parts(
            dim,
            h.metric,
            h.params,
            vectors,
            links0.into_iter().map(AtomicU32::new).collect(),
            upper,
            levels,
            keys,
            labels,
            deleted,
            entry,
        )
        .map_err(|e| e.to_string())
    }
}

const ROUTE_MAGIC: &[u8; 12] = b"COLONY-ROUTE";
const ROUTE_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct RouteHeader {
    dim: usize,
    slots: usize,
    /// "identity", "lifted" or "projected" (then a (d − 1) × D matrix follows the table).
    map: String,
    /// [`Hnsw::fingerprint`] of the index the table was trained for.
    index: u32,
}

impl Hnsw {
    /// A checksum of the vectors and the bottom layer's links: routing vectors belong to one
    /// graph, and a table written for another is refused on load.
    pub fn fingerprint(&self) -> u32 {
        let mut c = crc32fast::Hasher::new();
        let mut buf = Vec::with_capacity(1 << 16);
        for chunk in self.vectors.chunks(1 << 14) {
            buf.clear();
            buf.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
            c.update(&buf);
        }
        for chunk in self.links0.chunks(1 << 14) {
            buf.clear();
            buf.extend(chunk.iter().flat_map(|a| a.load(Relaxed).to_le_bytes()));
            c.update(&buf);
        }
        c.update(&[u8::from(self.metric.normalises())]);
        c.finalize()
    }
}

impl Routing {
    /// Writes the routing vectors of `index` to `path` (atomically; same layout rules as the
    /// index: magic, version, JSON header, little-endian f32s, crc32).
    pub fn save(&self, index: &Hnsw, path: &Path) -> Result<()> {
        self.check(index)?;
        let (map, proj) = match &self.map {
            QueryMap::Identity => ("identity", &[][..]),
            QueryMap::Lifted => ("lifted", &[][..]),
            QueryMap::Projected(p) => ("projected", &p[..]),
        };
        let header = RouteHeader {
            dim: self.dim,
            slots: index.slots(),
            map: map.into(),
            index: index.fingerprint(),
        };
        let header = serde_json::to_vec(&header).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut out = Vec::with_capacity(32 + header.len() + (self.table.len() + proj.len()) * 4);
        out.extend_from_slice(ROUTE_MAGIC);
        out.extend_from_slice(&ROUTE_VERSION.to_le_bytes());
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        for v in self.table.iter().chain(proj) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        write_atomically(path, &out)
    }

    /// Reads routing vectors written by [`Routing::save`] for `index`: a corrupt file, or one
    /// written for another index, is an error that says so.
    pub fn load(index: &Hnsw, path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let corrupt = |what: String| Error::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        let r = Self::from_bytes(&bytes, index).map_err(corrupt)?;
        r.check(index).map_err(|e| corrupt(e.to_string()))?;
        Ok(r)
    }

    fn from_bytes(bytes: &[u8], index: &Hnsw) -> Result<Self, String> {
        if bytes.len() < ROUTE_MAGIC.len() + 12 || &bytes[..ROUTE_MAGIC.len()] != ROUTE_MAGIC {
            return Err("not a Colony routing file (no magic)".into());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err("checksum mismatch (truncated or corrupt)".into());
        }
        let mut r = Reader {
            b: body,
            at: ROUTE_MAGIC.len(),
        };
        let version = r.u32s(1)?[0];
        if version != ROUTE_VERSION {
            return Err(format!(
                "version {version}, this build reads {ROUTE_VERSION}"
            ));
        }
        let hlen = r.u32s(1)?[0] as usize;
        let h: RouteHeader =
            serde_json::from_slice(r.take(hlen)?).map_err(|e| format!("header: {e}"))?;
        if h.slots != index.slots() || h.index != index.fingerprint() {
            return Err(format!(
                "written for another index ({} slots, fingerprint {:08x}; this one: {} slots, \
                 {:08x})",
                h.slots,
                h.index,
                index.slots(),
                index.fingerprint()
            ));
        }
        let mut floats = |n: usize| -> Result<Vec<f32>, String> {
            Ok(r.u32s(n)?.into_iter().map(f32::from_bits).collect())
        };
        let table = floats(h.slots.checked_mul(h.dim).ok_or("sizes overflow")?)?;
        let map = match h.map.as_str() {
            "identity" => QueryMap::Identity,
            "lifted" => QueryMap::Lifted,
            "projected" if h.dim >= 2 => QueryMap::Projected(floats((h.dim - 1) * index.dim())?),
            other => return Err(format!("unknown query map {other:?}")),
        };
        if r.at != body.len() {
            return Err(format!(
                "{} bytes after the last section",
                body.len() - r.at
            ));
        }
        if table.iter().any(|v| !v.is_finite()) {
            return Err("a routing vector is not finite".into());
        }
        Ok(Self {
            dim: h.dim,
            table,
            map,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let Some(end) = end else {
            return Err(format!("truncated: {n} bytes wanted at offset {}", self.at));
        };
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32s(&mut self, n: usize) -> Result<Vec<u32>, String> {
        Ok(self
            .take(n.checked_mul(4).ok_or("sizes overflow")?)?
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}
