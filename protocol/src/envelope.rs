//! Signed envelopes: a payload that can be attributed to a node and checked by anyone.
//!
//! The signature covers a domain tag (what kind of payload this is, so a signature made for
//! one purpose cannot be replayed as another), the signer, a timestamp and a nonce. Replay
//! windows (refusing an old timestamp or a seen nonce) need a clock and memory, so the daemon
//! enforces them; this type only carries the fields and checks the signature.

use serde::{Deserialize, Serialize};

use crate::identity::{KeyError, NodeKeypair, NodePublicKey, Signature};
use crate::names::MAX_RPC_BYTES;
use crate::{CodecError, decode, encode};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEnvelope {
    /// What the payload is, e.g. "colony/patch/1".
    pub domain: String,
    pub signer: NodePublicKey,
    /// When it was signed, Unix ms.
    pub timestamp_ms: u64,
    pub nonce: u64,
    pub payload: Vec<u8>,
    pub signature: Signature,
}

impl SignedEnvelope {
    pub fn seal(
        keypair: &NodeKeypair,
        domain: &str,
        timestamp_ms: u64,
        nonce: u64,
        payload: Vec<u8>,
    ) -> Self {
        let signer = keypair.public();
        let msg = signing_bytes(domain, &signer, timestamp_ms, nonce, &payload);
        Self {
            domain: domain.to_owned(),
            signer,
            timestamp_ms,
            nonce,
            payload,
            signature: keypair.sign(&msg),
        }
    }

    /// Checks the signature, and that the envelope is for `domain`.
    pub fn open(&self, domain: &str) -> Result<&[u8], EnvelopeError> {
        if self.domain != domain {
            return Err(EnvelopeError::WrongDomain {
                expected: domain.to_owned(),
                got: self.domain.clone(),
            });
        }
        let msg = signing_bytes(
            &self.domain,
            &self.signer,
            self.timestamp_ms,
            self.nonce,
            &self.payload,
        );
        self.signer
            .verify(&msg, &self.signature)
            .map_err(EnvelopeError::Key)?;
        Ok(&self.payload)
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>, CodecError> {
        encode(self, MAX_RPC_BYTES)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CodecError> {
        decode(bytes, MAX_RPC_BYTES)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("envelope is for {got:?}, expected {expected:?}")]
    WrongDomain { expected: String, got: String },
    #[error("envelope signature: {0}")]
    Key(KeyError),
}

fn signing_bytes(
    domain: &str,
    signer: &NodePublicKey,
    ts: u64,
    nonce: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(96 + domain.len() + payload.len());
    out.extend_from_slice(b"colony/envelope/1");
    out.extend_from_slice(&(domain.len() as u64).to_le_bytes());
    out.extend_from_slice(domain.as_bytes());
    out.extend_from_slice(&signer.0);
    out.extend_from_slice(&ts.to_le_bytes());
    out.extend_from_slice(&nonce.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_tamper() {
        let kp = NodeKeypair::from_secret([9; 32]);
        let env = SignedEnvelope::seal(&kp, "colony/test/1", 5, 6, b"payload".to_vec());
        assert_eq!(env.open("colony/test/1").unwrap(), b"payload");
        assert!(matches!(
            env.open("colony/other/1"),
            Err(EnvelopeError::WrongDomain { .. })
        ));
        let mut t = env.clone();
        t.nonce += 1;
        assert!(matches!(
            t.open("colony/test/1"),
            Err(EnvelopeError::Key(KeyError::BadSignature))
        ));
        let mut t = env.clone();
        t.payload.push(0);
        assert!(t.open("colony/test/1").is_err());
    }
}
