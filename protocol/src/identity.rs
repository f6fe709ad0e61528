//! Node identities: ed25519 keys and signatures as they appear on the wire.
//!
//! The daemon's libp2p identity is an ed25519 key too; [`NodeKeypair::from_keypair_bytes`]
//! takes the same 64 bytes (secret ‖ public) so one key signs transport handshakes and records.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// Why a key or a signature was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not a valid ed25519 public key")]
    BadPublicKey,
    #[error("not a valid ed25519 key pair (64 bytes: secret then public, matching)")]
    BadKeypair,
    #[error("signature does not verify against the public key")]
    BadSignature,
}

macro_rules! byte_array_serde {
    ($ty:ident, $len:expr, $what:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> de::Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "{} ({} bytes)", $what, $len)
                    }
                    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<$ty, E> {
                        let arr: [u8; $len] = v
                            .try_into()
                            .map_err(|_| E::invalid_length(v.len(), &self))?;
                        Ok($ty(arr))
                    }
                    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<$ty, A::Error> {
                        let mut arr = [0u8; $len];
                        for (i, b) in arr.iter_mut().enumerate() {
                            *b = seq
                                .next_element()?
                                .ok_or_else(|| de::Error::invalid_length(i, &self))?;
                        }
                        if seq.next_element::<u8>()?.is_some() {
                            return Err(de::Error::invalid_length($len + 1, &self));
                        }
                        Ok($ty(arr))
                    }
                }
                d.deserialize_bytes(V)
            }
        }
    };
}

/// An ed25519 public key: the identity of a node on the wire and the owner of signed records.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodePublicKey(pub [u8; 32]);
byte_array_serde!(NodePublicKey, 32, "an ed25519 public key");

/// An ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Signature(pub [u8; 64]);
byte_array_serde!(Signature, 64, "an ed25519 signature");

impl fmt::Debug for NodePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodePublicKey({})", self)
    }
}

impl fmt::Display for NodePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({}…)", hex::encode(&self.0[..8]))
    }
}

impl NodePublicKey {
    /// Checks `signature` over `message`. Uses strict verification (rejects malleable and
    /// small-order encodings), so one message has one valid signature per key.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> Result<(), KeyError> {
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| KeyError::BadPublicKey)?;
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify_strict(message, &sig)
            .map_err(|_| KeyError::BadSignature)
    }
}

/// A node's signing key.
#[derive(Clone)]
pub struct NodeKeypair {
    signing: SigningKey,
}

impl fmt::Debug for NodeKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKeypair(public: {})", self.public())
    }
}

impl NodeKeypair {
    /// A key pair from a 32-byte secret seed (the caller supplies the randomness).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(&secret),
        }
    }

    /// A key pair from 64 bytes: secret then public (libp2p's and dalek's layout).
    pub fn from_keypair_bytes(bytes: &[u8; 64]) -> Result<Self, KeyError> {
        SigningKey::from_keypair_bytes(bytes)
            .map(|signing| Self { signing })
            .map_err(|_| KeyError::BadKeypair)
    }

    pub fn public(&self) -> NodePublicKey {
        NodePublicKey(self.signing.verifying_key().to_bytes())
    }

    pub fn sign(&self, message: &[u8]) -> Signature {
        Signature(self.signing.sign(message).to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify() {
        let kp = NodeKeypair::from_secret([7; 32]);
        let sig = kp.sign(b"hello");
        kp.public().verify(b"hello", &sig).unwrap();
        assert_eq!(
            kp.public().verify(b"hellO", &sig),
            Err(KeyError::BadSignature)
        );
        let other = NodeKeypair::from_secret([8; 32]);
        assert_eq!(
            other.public().verify(b"hello", &sig),
            Err(KeyError::BadSignature)
        );
    }

    #[test]
    fn keypair_bytes_must_match() {
        let kp = NodeKeypair::from_secret([1; 32]);
        let mut bytes = [0u8; 64];
        bytes[..32].copy_from_slice(&[1; 32]);
        bytes[32..].copy_from_slice(&kp.public().0);
        assert_eq!(
            NodeKeypair::from_keypair_bytes(&bytes).unwrap().public(),
            kp.public()
        );
        bytes[40] ^= 1;
        assert!(NodeKeypair::from_keypair_bytes(&bytes).is_err());
    }
}
