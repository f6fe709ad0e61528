//! DHT records: the key schema, entries with per-subkey expiry and ownership, and the rules
//! every node applies before it stores or returns an entry.
//!
//! The model is hivemind's: a key holds a dictionary of subkeys; each (key, subkey) has one
//! value with an absolute expiration (Unix ms). A newer expiration replaces an older one; an
//! expired entry is gone. A subkey that *is* a public key ([`Subkey::Owner`]) belongs to that
//! key: its entry must be signed by it, so only the owner can write or overwrite it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::identity::{KeyError, NodeKeypair, NodePublicKey, Signature};
use crate::names::{
    MAX_CLOCK_SKEW_MS, MAX_KEY_BYTES, MAX_SUBKEY_BYTES, MAX_TTL_MS, MAX_VALUE_BYTES,
};

/// Longest single path segment of a key.
pub const MAX_SEGMENT_BYTES: usize = 64;

/// A DHT key: `/`-separated segments of ASCII letters, digits, `.`, `_` and `-`.
///
/// The schema Colony uses is built by the constructors below; other well-formed keys are
/// accepted so tools (`colony dht put`) can use their own namespaces.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DhtKey(String);

impl DhtKey {
    /// Parses and validates a key.
    pub fn new(key: impl Into<String>) -> Result<Self, RecordError> {
        let key = key.into();
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(RecordError::BadKey {
                key,
                why: "length must be 1..=256 bytes",
            });
        }
        for seg in key.split('/') {
            if seg.is_empty() || seg.len() > MAX_SEGMENT_BYTES {
                return Err(RecordError::BadKey {
                    key,
                    why: "each segment must be 1..=64 bytes",
                });
            }
            if !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            {
                return Err(RecordError::BadKey {
                    key,
                    why: "segments may hold only ASCII letters, digits, '.', '_' and '-'",
                });
            }
        }
        Ok(Self(key))
    }

    fn schema(parts: &[&str]) -> Result<Self, RecordError> {
        Self::new(parts.join("/"))
    }

    /// `run/<run>/progress`: per-peer training progress, subkey = the peer's public key.
    pub fn run_progress(run: &str) -> Result<Self, RecordError> {
        Self::schema(&["run", run, "progress"])
    }

    /// `run/<run>/group/<epoch>`: matchmaking declarations for one averaging round.
    pub fn run_group(run: &str, epoch: u64) -> Result<Self, RecordError> {
        Self::schema(&["run", run, "group", &epoch.to_string()])
    }

    /// `run/<run>/state`: peers that can serve the latest parameters.
    pub fn run_state(run: &str) -> Result<Self, RecordError> {
        Self::schema(&["run", run, "state"])
    }

    /// `route/<index>/shard/<i>`: peers that serve one shard of a routing index.
    pub fn route_shard(index: &str, shard: u32) -> Result<Self, RecordError> {
        Self::schema(&["route", index, "shard", &shard.to_string()])
    }

    /// `model/<name>/head`: the newest adopted patch-chain version of a model.
    pub fn model_head(name: &str) -> Result<Self, RecordError> {
        Self::schema(&["model", name, "head"])
    }

    /// `node/<peer id>/info`: what a node offers and where it can be reached, owned by it.
    pub fn node_info(peer_id: &str) -> Result<Self, RecordError> {
        Self::schema(&["node", peer_id, "info"])
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DhtKey {
    type Error = RecordError;
    fn try_from(s: String) -> Result<Self, RecordError> {
        Self::new(s)
    }
}

impl From<DhtKey> for String {
    fn from(k: DhtKey) -> String {
        k.0
    }
}

impl fmt::Display for DhtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DhtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DhtKey({})", self.0)
    }
}

/// The subkey of an entry.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Subkey {
    /// Anyone may write it; the newest expiration wins.
    Plain(Vec<u8>),
    /// Only the holder of this key may write it: the entry must carry its signature.
    Owner(NodePublicKey),
}

impl fmt::Debug for Subkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Subkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subkey::Plain(b) => match std::str::from_utf8(b) {
                Ok(s) if s.chars().all(|c| !c.is_control()) => write!(f, "{s}"),
                _ => write!(f, "0x{}", hex::encode(b)),
            },
            Subkey::Owner(pk) => write!(f, "owner:{pk}"),
        }
    }
}

/// One value under one (key, subkey).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DhtEntry {
    pub key: DhtKey,
    pub subkey: Subkey,
    pub value: Vec<u8>,
    /// Absolute expiration, Unix milliseconds.
    pub expires_at_ms: u64,
    /// Present exactly when the subkey is [`Subkey::Owner`].
    pub signature: Option<Signature>,
}

impl fmt::Debug for DhtEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DhtEntry")
            .field("key", &self.key)
            .field("subkey", &self.subkey)
            .field("value_len", &self.value.len())
            .field("expires_at_ms", &self.expires_at_ms)
            .field("signed", &self.signature.is_some())
            .finish()
    }
}

/// Why an entry (or a key) was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("bad dht key {key:?}: {why}")]
    BadKey { key: String, why: &'static str },
    #[error("value of {len} bytes under {key} exceeds the limit of {limit} bytes")]
    ValueTooLarge {
        key: DhtKey,
        len: usize,
        limit: usize,
    },
    #[error("subkey of {len} bytes under {key} exceeds the limit of {limit} bytes")]
    SubkeyTooLarge {
        key: DhtKey,
        len: usize,
        limit: usize,
    },
    #[error("entry {key}/{subkey} expired at {expires_at_ms} (now {now_ms})")]
    Expired {
        key: DhtKey,
        subkey: Subkey,
        expires_at_ms: u64,
        now_ms: u64,
    },
    #[error(
        "entry {key}/{subkey} expires too far in the future ({expires_at_ms}, now {now_ms}; at most 24 h)"
    )]
    TooFarInFuture {
        key: DhtKey,
        subkey: Subkey,
        expires_at_ms: u64,
        now_ms: u64,
    },
    #[error("entry {key}/{subkey} is owned but carries no signature")]
    MissingSignature { key: DhtKey, subkey: Subkey },
    #[error("entry {key}/{subkey} is not owned but carries a signature")]
    UnexpectedSignature { key: DhtKey, subkey: Subkey },
    #[error("entry {key}/{subkey}: {source}")]
    Signature {
        key: DhtKey,
        subkey: Subkey,
        source: KeyError,
    },
}

const SIGNING_DOMAIN: &[u8] = b"colony/dht-entry/1";

impl DhtEntry {
    /// A plain entry anyone may overwrite with a later expiration.
    pub fn plain(
        key: DhtKey,
        subkey: impl Into<Vec<u8>>,
        value: Vec<u8>,
        expires_at_ms: u64,
    ) -> Self {
        Self {
            key,
            subkey: Subkey::Plain(subkey.into()),
            value,
            expires_at_ms,
            signature: None,
        }
    }

    /// An entry owned by `owner`'s public key and signed by it.
    pub fn owned(key: DhtKey, owner: &NodeKeypair, value: Vec<u8>, expires_at_ms: u64) -> Self {
        let mut entry = Self {
            key,
            subkey: Subkey::Owner(owner.public()),
            value,
            expires_at_ms,
            signature: None,
        };
        entry.signature = Some(owner.sign(&entry.signing_bytes()));
        entry
    }

    /// The bytes an owner signs: a domain tag, then key, subkey, value and expiration, each
    /// length-prefixed so no two different entries share them.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let subkey: &[u8] = match &self.subkey {
            Subkey::Plain(b) => b,
            Subkey::Owner(pk) => &pk.0,
        };
        let mut out = Vec::with_capacity(64 + self.key.0.len() + subkey.len() + self.value.len());
        for part in [SIGNING_DOMAIN, self.key.0.as_bytes(), subkey, &self.value] {
            out.extend_from_slice(&(part.len() as u64).to_le_bytes());
            out.extend_from_slice(part);
        }
        out.push(matches!(self.subkey, Subkey::Owner(_)) as u8);
        out.extend_from_slice(&self.expires_at_ms.to_le_bytes());
        out
    }

    /// Checks everything a node checks before storing or accepting this entry.
    pub fn validate(&self, now_ms: u64) -> Result<(), RecordError> {
        let (key, subkey) = (|| self.key.clone(), || self.subkey.clone());
        if self.value.len() > MAX_VALUE_BYTES {
            return Err(RecordError::ValueTooLarge {
                key: key(),
                len: self.value.len(),
                limit: MAX_VALUE_BYTES,
            });
        }
        if let Subkey::Plain(b) = &self.subkey
            && b.len() > MAX_SUBKEY_BYTES
        {
            return Err(RecordError::SubkeyTooLarge {
                key: key(),
                len: b.len(),
                limit: MAX_SUBKEY_BYTES,
            });
        }
        if self.is_expired(now_ms) {
            return Err(RecordError::Expired {
                key: key(),
                subkey: subkey(),
                expires_at_ms: self.expires_at_ms,
                now_ms,
            });
        }
        if self.expires_at_ms > now_ms.saturating_add(MAX_TTL_MS + MAX_CLOCK_SKEW_MS) {
            return Err(RecordError::TooFarInFuture {
                key: key(),
                subkey: subkey(),
                expires_at_ms: self.expires_at_ms,
                now_ms,
            });
        }
        match (&self.subkey, &self.signature) {
            (Subkey::Owner(_), None) => Err(RecordError::MissingSignature {
                key: key(),
                subkey: subkey(),
            }),
            (Subkey::Plain(_), Some(_)) => Err(RecordError::UnexpectedSignature {
                key: key(),
                subkey: subkey(),
            }),
            (Subkey::Plain(_), None) => Ok(()),
            (Subkey::Owner(owner), Some(sig)) => {
                owner
                    .verify(&self.signing_bytes(), sig)
                    .map_err(|source| RecordError::Signature {
                        key: key(),
                        subkey: subkey(),
                        source,
                    })
            }
        }
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms <= now_ms
    }

    /// Whether this entry replaces `other` (same key and subkey) in a store: a later
    /// expiration wins; on a tie the larger value wins, so every node picks the same one.
    pub fn supersedes(&self, other: &DhtEntry) -> bool {
        (self.expires_at_ms, &self.value) > (other.expires_at_ms, &other.value)
    }

    /// Approximate bytes this entry occupies in memory.
    pub fn footprint(&self) -> usize {
        let subkey = match &self.subkey {
            Subkey::Plain(b) => b.len(),
            Subkey::Owner(_) => 32,
        };
        self.key.0.len() + subkey + self.value.len() + 96
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;

    fn key() -> DhtKey {
        DhtKey::run_progress("demo").unwrap()
    }

    #[test]
    fn key_schema() {
        assert_eq!(
            DhtKey::run_group("r1", 7).unwrap().as_str(),
            "run/r1/group/7"
        );
        assert_eq!(
            DhtKey::route_shard("glove", 3).unwrap().as_str(),
            "route/glove/shard/3"
        );
        for bad in [
            "",
            "a//b",
            "/a",
            "a/",
            "a b",
            "ü",
            &"x".repeat(65),
            &"a/".repeat(200),
        ] {
            assert!(DhtKey::new(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(DhtKey::run_progress("bad run").is_err());
    }

    #[test]
    fn owned_entry_verifies_and_detects_tampering() {
        let owner = NodeKeypair::from_secret([3; 32]);
        let entry = DhtEntry::owned(key(), &owner, b"v1".to_vec(), NOW + 60_000);
        entry.validate(NOW).unwrap();

        let mut forged = entry.clone();
        forged.value = b"v2".to_vec();
        assert!(matches!(
            forged.validate(NOW),
            Err(RecordError::Signature { .. })
        ));

        let mut later = entry.clone();
        later.expires_at_ms += 1;
        assert!(matches!(
            later.validate(NOW),
            Err(RecordError::Signature { .. })
        ));

        let mut unsigned = entry.clone();
        unsigned.signature = None;
        assert!(matches!(
            unsigned.validate(NOW),
            Err(RecordError::MissingSignature { .. })
        ));

        // A non-owner signs with its own key but claims the owner's subkey.
        let intruder = NodeKeypair::from_secret([4; 32]);
        let mut stolen = DhtEntry::owned(key(), &intruder, b"evil".to_vec(), NOW + 90_000);
        stolen.subkey = Subkey::Owner(owner.public());
        assert!(matches!(
            stolen.validate(NOW),
            Err(RecordError::Signature { .. })
        ));
    }

    #[test]
    fn limits_and_expiry() {
        let e = DhtEntry::plain(key(), "a", vec![0; MAX_VALUE_BYTES + 1], NOW + 1);
        assert!(matches!(
            e.validate(NOW),
            Err(RecordError::ValueTooLarge { .. })
        ));
        let e = DhtEntry::plain(key(), vec![0; MAX_SUBKEY_BYTES + 1], vec![], NOW + 1);
        assert!(matches!(
            e.validate(NOW),
            Err(RecordError::SubkeyTooLarge { .. })
        ));
        let e = DhtEntry::plain(key(), "a", vec![], NOW);
        assert!(matches!(e.validate(NOW), Err(RecordError::Expired { .. })));
        let e = DhtEntry::plain(key(), "a", vec![], NOW + MAX_TTL_MS + MAX_CLOCK_SKEW_MS + 1);
        assert!(matches!(
            e.validate(NOW),
            Err(RecordError::TooFarInFuture { .. })
        ));
        let mut e = DhtEntry::plain(key(), "a", vec![], NOW + 1);
        e.signature = Some(Signature([0; 64]));
        assert!(matches!(
            e.validate(NOW),
            Err(RecordError::UnexpectedSignature { .. })
        ));
    }

    #[test]
    fn newer_expiration_supersedes() {
        let a = DhtEntry::plain(key(), "s", b"a".to_vec(), NOW + 10);
        let b = DhtEntry::plain(key(), "s", b"b".to_vec(), NOW + 20);
        assert!(b.supersedes(&a));
        assert!(!a.supersedes(&b));
        assert!(!a.supersedes(&a));
        let c = DhtEntry::plain(key(), "s", b"c".to_vec(), NOW + 20);
        assert!(
            c.supersedes(&b) != b.supersedes(&c),
            "ties are broken one way"
        );
    }
}
