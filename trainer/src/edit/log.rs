//! The patch log: an append-only file of checksummed records (adopted patches with their
//! votes, roll-backs). Each record is `len (u32 LE) ‖ SHA-256(payload) ‖ payload`, written and
//! synced before the node acts on it. A crash mid-write leaves a torn last record: opening the
//! log keeps every whole record before it, moves the damaged bytes aside to
//! `<log>.damaged-<offset>` (nothing is deleted) and truncates the log to its last good record.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use colony_protocol::patch::Hash32;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LogEntry {
    /// An adopted patch: its signed envelope and the signed votes that adopted it.
    Adopted {
        patch: Vec<u8>,
        votes: Vec<Vec<u8>>,
        at_ms: u64,
    },
    /// A patch rolled back on this node.
    RolledBack { patch: Hash32, at_ms: u64 },
}

#[derive(Debug)]
pub struct PatchLog {
    file: File,
}

/// What opening a log found.
#[derive(Debug, Default, PartialEq)]
pub struct Recovery {
    /// Bytes moved aside from a damaged tail.
    pub damaged_bytes: u64,
    pub damaged_file: Option<PathBuf>,
}

const MAX_RECORD: usize = 16 * 1024 * 1024;

impl PatchLog {
    /// Opens (or creates) the log and reads every whole record.
    pub fn open(path: &Path) -> std::io::Result<(Self, Vec<LogEntry>, Recovery)> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut at = 0usize;
        let mut entries = Vec::new();
        while at < bytes.len() {
            let Some(entry) = read_record(&bytes[at..]) else {
                break;
            };
            entries.push(entry.0);
            at += entry.1;
        }
        let mut recovery = Recovery::default();
        if at < bytes.len() {
            let aside = PathBuf::from(format!("{}.damaged-{at}", path.display()));
            std::fs::write(&aside, &bytes[at..])?;
            recovery = Recovery {
                damaged_bytes: (bytes.len() - at) as u64,
                damaged_file: Some(aside),
            };
            let f = OpenOptions::new().write(true).open(path)?;
            f.set_len(at as u64)?;
            f.sync_all()?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok((Self { file }, entries, recovery))
    }

    /// Appends one record and syncs it to disk.
    pub fn append(&mut self, entry: &LogEntry) -> std::io::Result<()> {
        let payload = colony_protocol::codec::encode_file(entry)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        let mut rec = Vec::with_capacity(payload.len() + 36);
        rec.extend((payload.len() as u32).to_le_bytes());
        rec.extend(Sha256::digest(&payload));
        rec.extend(&payload);
        self.file.write_all(&rec)?;
        self.file.sync_data()
    }
}

/// One whole, intact record at the start of `b`, and its length.
fn read_record(b: &[u8]) -> Option<(LogEntry, usize)> {
    let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    if len > MAX_RECORD {
        return None;
    }
    let sum = b.get(4..36)?;
    let payload = b.get(36..36 + len)?;
    if Sha256::digest(payload).as_slice() != sum {
        return None;
    }
    let entry = colony_protocol::codec::decode_file(payload).ok()?;
    Some((entry, 36 + len))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn adopted(i: u8) -> LogEntry {
        LogEntry::Adopted {
            patch: vec![i; 100 + i as usize],
            votes: vec![vec![i; 10]],
            at_ms: u64::from(i),
        }
    }

    #[test]
    fn log_recovers_from_a_torn_write_and_keeps_the_damaged_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("patches.log");
        {
            let (mut log, entries, rec) = PatchLog::open(&path).unwrap();
            assert!(entries.is_empty());
            assert_eq!(rec, Recovery::default());
            for i in 0..3 {
                log.append(&adopted(i)).unwrap();
            }
            log.append(&LogEntry::RolledBack {
                patch: [9; 32],
                at_ms: 4,
            })
            .unwrap();
        }
        let whole = std::fs::read(&path).unwrap();
        // Every cut inside the last record leaves the first three; a cut on a boundary loses
        // nothing.
        let (_, all, _) = PatchLog::open(&path).unwrap();
        assert_eq!(all.len(), 4);
        let last_start =
            whole.len() - (36 + colony_protocol::codec::encode_file(&all[3]).unwrap().len());
        for cut in [last_start + 1, last_start + 20, whole.len() - 1] {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let (mut log, entries, rec) = PatchLog::open(&path).unwrap();
            assert_eq!(entries, all[..3].to_vec(), "cut at {cut}");
            assert_eq!(rec.damaged_bytes, (cut - last_start) as u64);
            let aside = rec.damaged_file.unwrap();
            assert_eq!(std::fs::read(&aside).unwrap(), whole[last_start..cut]);
            // The log goes on from the last good record.
            log.append(&adopted(7)).unwrap();
            drop(log);
            let (_, again, rec) = PatchLog::open(&path).unwrap();
            assert_eq!(again.len(), 4);
            assert_eq!(again[3], adopted(7));
            assert_eq!(rec, Recovery::default());
        }
        // A flipped byte inside a record (bit rot) stops the read there, also kept aside.
        std::fs::write(&path, &whole).unwrap();
        let mut bad = whole.clone();
        bad[40] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        let (_, entries, rec) = PatchLog::open(&path).unwrap();
        assert!(entries.is_empty());
        assert_eq!(rec.damaged_bytes, bad.len() as u64);
    }
}
