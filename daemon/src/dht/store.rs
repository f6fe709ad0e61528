//! A node's local share of the DHT: entries it holds for others, with hivemind's merge rule
//! (newest expiration wins per subkey), expiry, and per-key and per-node limits.
//!
//! Pure: the caller passes `now_ms`. Persistence is a snapshot the daemon writes on shutdown.

use std::collections::{BTreeMap, HashMap};

use colony_protocol::names::{MAX_BYTES_PER_KEY, MAX_SUBKEYS_PER_KEY};
use colony_protocol::{DhtEntry, DhtKey, RecordError, StoreOutcome, Subkey};
use serde::{Deserialize, Serialize};

/// Limits of one node's store.
#[derive(Clone, Copy, Debug)]
pub struct StoreLimits {
    pub max_keys: usize,
    pub max_total_bytes: usize,
}

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_keys: 100_000,
            max_total_bytes: 256 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Default)]
struct KeyEntries {
    entries: BTreeMap<Subkey, DhtEntry>,
    bytes: usize,
}

#[derive(Debug, Default)]
pub struct LocalStore {
    keys: HashMap<DhtKey, KeyEntries>,
    total_bytes: usize,
    limits: StoreLimits,
}

/// Why a valid entry could still not be stored here.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error(transparent)]
    Invalid(#[from] RecordError),
    #[error("key {0} already holds the maximum number of subkeys")]
    TooManySubkeys(DhtKey),
    #[error("key {0} already holds the maximum number of bytes")]
    KeyFull(DhtKey),
    #[error("this node's dht store is full")]
    StoreFull,
}

impl LocalStore {
    pub fn new(limits: StoreLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Validates and merges one entry.
    pub fn put(&mut self, entry: DhtEntry, now_ms: u64) -> Result<StoreOutcome, StoreError> {
        entry.validate(now_ms)?;
        self.put_validated(entry, now_ms)
    }

    fn put_validated(&mut self, entry: DhtEntry, now_ms: u64) -> Result<StoreOutcome, StoreError> {
        if !self.keys.contains_key(&entry.key) && self.keys.len() >= self.limits.max_keys {
            self.purge_expired(now_ms);
            if self.keys.len() >= self.limits.max_keys {
                return Err(StoreError::StoreFull);
            }
        }
        let limits = self.limits;
        let slot = self.keys.entry(entry.key.clone()).or_default();
        let new_bytes = entry.footprint();
        let old_bytes = match slot.entries.get(&entry.subkey) {
            Some(old) if !old.is_expired(now_ms) && !entry.supersedes(old) => {
                return Ok(StoreOutcome::Outdated);
            }
            Some(old) => old.footprint(),
            None => {
                if slot.entries.len() >= MAX_SUBKEYS_PER_KEY {
                    Self::purge_key(slot, &mut self.total_bytes, now_ms);
                    if slot.entries.len() >= MAX_SUBKEYS_PER_KEY {
                        return Err(StoreError::TooManySubkeys(entry.key));
                    }
                }
                0
            }
        };
        if slot.bytes - old_bytes + new_bytes > MAX_BYTES_PER_KEY {
            return Err(StoreError::KeyFull(entry.key));
        }
        if self.total_bytes - old_bytes + new_bytes > limits.max_total_bytes {
            return Err(StoreError::StoreFull);
        }
        slot.bytes = slot.bytes - old_bytes + new_bytes;
        self.total_bytes = self.total_bytes - old_bytes + new_bytes;
        slot.entries.insert(entry.subkey.clone(), entry);
        Ok(StoreOutcome::Stored)
    }

    fn purge_key(slot: &mut KeyEntries, total: &mut usize, now_ms: u64) {
        slot.entries.retain(|_, e| {
            let keep = !e.is_expired(now_ms);
            if !keep {
                slot.bytes -= e.footprint();
                *total -= e.footprint();
            }
            keep
        });
    }

    /// All unexpired entries under `key`.
    pub fn get(&self, key: &DhtKey, now_ms: u64) -> Vec<DhtEntry> {
        self.keys
            .get(key)
            .map(|slot| {
                slot.entries
                    .values()
                    .filter(|e| !e.is_expired(now_ms))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops every expired entry and empty key.
    pub fn purge_expired(&mut self, now_ms: u64) {
        let total = &mut self.total_bytes;
        self.keys.retain(|_, slot| {
            Self::purge_key(slot, total, now_ms);
            !slot.entries.is_empty()
        });
    }

    pub fn keys(&self) -> impl Iterator<Item = &DhtKey> {
        self.keys.keys()
    }

    pub fn len(&self) -> usize {
        self.keys.values().map(|s| s.entries.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn total_bytes(&self) -> usize {
        self.total_bytes
    }

    /// Every unexpired entry, for a snapshot.
    pub fn snapshot(&self, now_ms: u64) -> StoreSnapshot {
        StoreSnapshot {
            entries: self
                .keys
                .values()
                .flat_map(|s| s.entries.values())
                .filter(|e| !e.is_expired(now_ms))
                .cloned()
                .collect(),
        }
    }

    /// Loads a snapshot, re-validating every entry (a snapshot file is untrusted input).
    /// Returns how many entries were refused.
    pub fn restore(&mut self, snapshot: StoreSnapshot, now_ms: u64) -> usize {
        snapshot
            .entries
            .into_iter()
            .filter(|e| self.put(e.clone(), now_ms).is_err())
            .count()
    }
}

/// What the daemon writes to disk on shutdown and reads back at start.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StoreSnapshot {
    pub entries: Vec<DhtEntry>,
}

/// Merges entries from several sources (peers' answers) into the newest per subkey.
pub fn merge_newest(
    into: &mut BTreeMap<Subkey, DhtEntry>,
    entries: impl IntoIterator<Item = DhtEntry>,
) {
    for e in entries {
        match into.get(&e.subkey) {
            Some(old) if !e.supersedes(old) => {}
            _ => {
                into.insert(e.subkey.clone(), e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colony_protocol::NodeKeypair;

    const NOW: u64 = 1_700_000_000_000;

    fn key(s: &str) -> DhtKey {
        DhtKey::new(s).unwrap()
    }

    #[test]
    fn newest_wins_and_expiry_removes() {
        let mut s = LocalStore::default();
        let k = key("a/b");
        assert_eq!(
            s.put(
                DhtEntry::plain(k.clone(), "x", b"1".to_vec(), NOW + 100),
                NOW
            )
            .unwrap(),
            StoreOutcome::Stored
        );
        assert_eq!(
            s.put(
                DhtEntry::plain(k.clone(), "x", b"0".to_vec(), NOW + 50),
                NOW
            )
            .unwrap(),
            StoreOutcome::Outdated
        );
        assert_eq!(
            s.put(
                DhtEntry::plain(k.clone(), "x", b"2".to_vec(), NOW + 200),
                NOW
            )
            .unwrap(),
            StoreOutcome::Stored
        );
        s.put(
            DhtEntry::plain(k.clone(), "y", b"3".to_vec(), NOW + 10),
            NOW,
        )
        .unwrap();
        let got = s.get(&k, NOW);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got.iter()
                .find(|e| e.subkey == Subkey::Plain(b"x".to_vec()))
                .unwrap()
                .value,
            b"2"
        );
        assert_eq!(s.get(&k, NOW + 10).len(), 1, "y expired");
        s.purge_expired(NOW + 1000);
        assert!(s.is_empty());
        assert_eq!(s.total_bytes(), 0);
    }

    #[test]
    fn owner_only_overwrite() {
        let mut s = LocalStore::default();
        let owner = NodeKeypair::from_secret([1; 32]);
        let k = key("run/x/progress");
        s.put(
            DhtEntry::owned(k.clone(), &owner, b"mine".to_vec(), NOW + 100),
            NOW,
        )
        .unwrap();
        let intruder = NodeKeypair::from_secret([2; 32]);
        let mut forged = DhtEntry::owned(k.clone(), &intruder, b"yours".to_vec(), NOW + 500);
        forged.subkey = Subkey::Owner(owner.public());
        assert!(matches!(
            s.put(forged, NOW),
            Err(StoreError::Invalid(RecordError::Signature { .. }))
        ));
        assert_eq!(s.get(&k, NOW)[0].value, b"mine");
    }

    #[test]
    fn limits_hold() {
        let mut s = LocalStore::new(StoreLimits {
            max_keys: 2,
            max_total_bytes: 10_000,
        });
        s.put(DhtEntry::plain(key("k1"), "a", vec![], NOW + 100), NOW)
            .unwrap();
        s.put(DhtEntry::plain(key("k2"), "a", vec![], NOW + 100), NOW)
            .unwrap();
        assert_eq!(
            s.put(DhtEntry::plain(key("k3"), "a", vec![], NOW + 100), NOW),
            Err(StoreError::StoreFull)
        );
        // Once k1 expires, its room is reclaimed.
        s.put(DhtEntry::plain(key("k1"), "a", vec![], NOW + 101), NOW)
            .unwrap();
        assert_eq!(
            s.put(
                DhtEntry::plain(key("k4"), "b", vec![0; 20_000], NOW + 500),
                NOW + 200
            )
            .unwrap_err(),
            StoreError::StoreFull
        );
    }

    #[test]
    fn snapshot_round_trip_revalidates() {
        let mut s = LocalStore::default();
        s.put(
            DhtEntry::plain(key("k"), "a", b"v".to_vec(), NOW + 100),
            NOW,
        )
        .unwrap();
        let mut snap = s.snapshot(NOW);
        let mut bad = snap.entries[0].clone();
        bad.subkey = Subkey::Owner(NodeKeypair::from_secret([5; 32]).public());
        snap.entries.push(bad);
        let mut t = LocalStore::default();
        assert_eq!(t.restore(snap, NOW), 1);
        assert_eq!(t.get(&key("k"), NOW).len(), 1);
    }
}
