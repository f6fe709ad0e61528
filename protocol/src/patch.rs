//! Patch jobs: requests to fix a model's answer on one sample, the patches that fix it, and the
//! verifiers' votes, all gossiped on [`crate::names::patches_topic`] inside signed envelopes.
//!
//! Versions form a hash chain: the base version of a model is its id (the hash of its
//! weights) and `version(parent, patch) = H("colony/patch-version/1" ‖ parent ‖ patch_id)`.
//! A patch's id hashes its encoded body (the signature is not part of it, so the id does not
//! depend on the encoding of the signature).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::envelope::{EnvelopeError, SignedEnvelope};
use crate::identity::NodePublicKey;
use crate::{CodecError, decode, encode};

/// Envelope domain of a [`PatchRequest`].
pub const REQUEST_DOMAIN: &str = "colony/patch-request/1";
/// Envelope domain of a [`Patch`].
pub const PATCH_DOMAIN: &str = "colony/patch/1";
/// Envelope domain of a [`Vote`].
pub const VOTE_DOMAIN: &str = "colony/patch-vote/1";

/// Largest encoded patch, request or vote (a dense head of ~60K floats fits).
pub const MAX_PATCH_BYTES: usize = 256 * 1024;
/// Most input values in a sample.
pub const MAX_SAMPLE_LEN: usize = 16 * 1024;
/// Longest reason string in a vote.
pub const MAX_REASON_LEN: usize = 256;

/// A 32-byte hash: model ids, versions, patch and request ids.
pub type Hash32 = [u8; 32];

/// The change a patch makes to the editable linear head `z = W h + b` (`W` is `out × in`,
/// row-major).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Delta {
    /// `ΔW = u hᵀ` and `Δb`, with `u` and `Δb` sparse over the output rows: what k steps of
    /// SGD or momentum on one sample produce (exactly rank one).
    Rank1 {
        rows: Vec<(u32, f32)>,
        h: Vec<f32>,
        bias: Vec<(u32, f32)>,
    },
    /// The whole head's change (RMSProp edits are not rank one).
    Dense { w: Vec<f32>, b: Vec<f32> },
}

impl Delta {
    /// Checks that the delta fits a head with `out` rows and `inp` columns.
    pub fn check_shape(&self, out: usize, inp: usize) -> Result<(), PatchError> {
        let bad = |what: String| Err(PatchError::Shape(what));
        match self {
            Delta::Rank1 { rows, h, bias } => {
                if h.len() != inp {
                    return bad(format!(
                        "h has {} values, the head has {inp} inputs",
                        h.len()
                    ));
                }
                for (i, _) in rows.iter().chain(bias) {
                    if *i as usize >= out {
                        return bad(format!("row {i} is outside the head's {out} outputs"));
                    }
                }
                if rows.len() > out || bias.len() > out {
                    return bad("more sparse rows than the head has outputs".into());
                }
            }
            Delta::Dense { w, b } => {
                if w.len() != out * inp || b.len() != out {
                    return bad(format!(
                        "dense delta is {}+{} values, the head is {out}x{inp}+{out}",
                        w.len(),
                        b.len()
                    ));
                }
            }
        }
        if !self.values().all(f32::is_finite) {
            return Err(PatchError::NotFinite);
        }
        Ok(())
    }

    fn values(&self) -> Box<dyn Iterator<Item = f32> + '_> {
        match self {
            Delta::Rank1 { rows, h, bias } => Box::new(
                rows.iter()
                    .map(|r| r.1)
                    .chain(h.iter().copied())
                    .chain(bias.iter().map(|r| r.1)),
            ),
            Delta::Dense { w, b } => Box::new(w.iter().chain(b).copied()),
        }
    }

    /// The delta as a dense `(ΔW, Δb)` for a head with `out` rows and `inp` columns.
    pub fn to_dense(&self, out: usize, inp: usize) -> (Vec<f32>, Vec<f32>) {
        match self {
            Delta::Dense { w, b } => (w.clone(), b.clone()),
            Delta::Rank1 { rows, h, bias } => {
                let mut w = vec![0.0; out * inp];
                let mut b = vec![0.0; out];
                for &(i, u) in rows {
                    for (x, hj) in w[i as usize * inp..(i as usize + 1) * inp]
                        .iter_mut()
                        .zip(h)
                    {
                        *x = u * hj;
                    }
                }
                for &(i, d) in bias {
                    b[i as usize] = d;
                }
                (w, b)
            }
        }
    }
}

/// A request: "make model `model` answer `target` on `sample`".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PatchRequest {
    /// The model's id (hex of the hash of its weights).
    pub model: String,
    pub sample: Vec<f32>,
    pub target: u32,
    /// When it was made, Unix ms (with the signer, it makes the request unique).
    pub created_ms: u64,
}

impl PatchRequest {
    /// The request's id: the hash of its encoding.
    pub fn id(&self) -> Result<Hash32, CodecError> {
        Ok(hash(&[
            b"colony/patch-request/1",
            &encode(self, MAX_PATCH_BYTES)?,
        ]))
    }
}

/// The editor a patch was made with (verifiers use `margin` and `max_steps`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EditorSpec {
    /// `sgd`, `momentum` or `rmsprop`.
    pub kind: String,
    pub lr: f32,
    pub max_steps: u32,
    /// The target's logit must beat every other by this much.
    pub margin: f32,
}

/// A patch to one model version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Patch {
    /// The model's id (hex).
    pub model: String,
    /// The version the delta was computed on.
    pub parent: Hash32,
    /// How many patches the parent version holds (orders concurrent patches).
    pub parent_len: u64,
    /// The request this patch answers.
    pub request: Hash32,
    pub sample: Vec<f32>,
    pub target: u32,
    pub delta: Delta,
    pub editor: EditorSpec,
    /// Editor steps the author took.
    pub steps: u32,
    /// The author's key (must be the envelope's signer).
    pub author: NodePublicKey,
    pub created_ms: u64,
}

impl Patch {
    pub fn id(&self) -> Result<Hash32, CodecError> {
        Ok(hash(&[b"colony/patch/1", &encode(self, MAX_PATCH_BYTES)?]))
    }

    /// Opens a signed patch: checks the signature, the size limits and that the signer is the
    /// author. Returns the patch and its id.
    pub fn open(env: &SignedEnvelope) -> Result<(Patch, Hash32), PatchError> {
        let payload = env.open(PATCH_DOMAIN)?;
        let patch: Patch = decode(payload, MAX_PATCH_BYTES)?;
        if patch.author != env.signer {
            return Err(PatchError::Forged(
                "the patch's author is not its signer".into(),
            ));
        }
        if patch.sample.len() > MAX_SAMPLE_LEN {
            return Err(PatchError::Shape(format!(
                "sample of {} values (at most {MAX_SAMPLE_LEN})",
                patch.sample.len()
            )));
        }
        let id = patch.id()?;
        Ok((patch, id))
    }
}

/// A verifier's verdict on a patch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vote {
    pub patch: Hash32,
    pub accept: bool,
    /// Why (for a rejection), or the measurements (for an acceptance).
    pub reason: String,
    /// Target logit minus the best other logit after the patch.
    pub margin: f32,
    /// Test error increase on the control set.
    pub drawdown: f32,
}

impl Vote {
    pub fn open(env: &SignedEnvelope) -> Result<Vote, PatchError> {
        let vote: Vote = decode(env.open(VOTE_DOMAIN)?, MAX_PATCH_BYTES)?;
        if vote.reason.len() > MAX_REASON_LEN {
            return Err(PatchError::Shape("vote reason too long".into()));
        }
        Ok(vote)
    }
}

/// What travels on the patches topic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PatchGossip {
    Request(SignedEnvelope),
    Patch(SignedEnvelope),
    Vote(SignedEnvelope),
}

impl PatchGossip {
    pub fn to_bytes(&self) -> Result<Vec<u8>, CodecError> {
        encode(self, crate::names::MAX_GOSSIP_BYTES)
    }
    pub fn from_bytes(b: &[u8]) -> Result<Self, CodecError> {
        decode(b, crate::names::MAX_GOSSIP_BYTES)
    }
}

/// The version after applying patch `patch_id` on `parent`.
pub fn next_version(parent: &Hash32, patch_id: &Hash32) -> Hash32 {
    hash(&[b"colony/patch-version/1", parent, patch_id])
}

/// SHA-256 over the concatenation of `parts`.
pub fn hash(parts: &[&[u8]]) -> Hash32 {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("{0}")]
    Envelope(#[from] EnvelopeError),
    #[error("malformed: {0}")]
    Codec(#[from] CodecError),
    #[error("forged patch: {0}")]
    Forged(String),
    #[error("wrong shape: {0}")]
    Shape(String),
    #[error("the delta holds a value that is not finite")]
    NotFinite,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::identity::NodeKeypair;

    fn patch(author: NodePublicKey) -> Patch {
        Patch {
            model: "m".into(),
            parent: [1; 32],
            parent_len: 0,
            request: [2; 32],
            sample: vec![0.5; 4],
            target: 1,
            delta: Delta::Rank1 {
                rows: vec![(1, 0.5), (2, -0.5)],
                h: vec![1.0, 2.0],
                bias: vec![(1, 0.5), (2, -0.5)],
            },
            editor: EditorSpec {
                kind: "sgd".into(),
                lr: 0.1,
                max_steps: 10,
                margin: 0.1,
            },
            steps: 1,
            author,
            created_ms: 5,
        }
    }

    #[test]
    fn signed_patch_round_trips_and_forgery_is_named() {
        let k = NodeKeypair::from_secret([7; 32]);
        let p = patch(k.public());
        let env =
            SignedEnvelope::seal(&k, PATCH_DOMAIN, 1, 2, encode(&p, MAX_PATCH_BYTES).unwrap());
        let (q, id) = Patch::open(&env).unwrap();
        assert_eq!(q, p);
        assert_eq!(id, p.id().unwrap());
        // Signed by someone else than the author.
        let other = NodeKeypair::from_secret([8; 32]);
        let env = SignedEnvelope::seal(
            &other,
            PATCH_DOMAIN,
            1,
            2,
            encode(&p, MAX_PATCH_BYTES).unwrap(),
        );
        assert!(matches!(Patch::open(&env), Err(PatchError::Forged(_))));
        // A tampered payload fails the signature.
        let mut env =
            SignedEnvelope::seal(&k, PATCH_DOMAIN, 1, 2, encode(&p, MAX_PATCH_BYTES).unwrap());
        let n = env.payload.len();
        env.payload[n - 1] ^= 1;
        assert!(matches!(Patch::open(&env), Err(PatchError::Envelope(_))));
    }

    #[test]
    fn rank1_dense_form_and_shape_checks() {
        let d = Delta::Rank1 {
            rows: vec![(0, 2.0)],
            h: vec![1.0, 3.0],
            bias: vec![(1, -1.0)],
        };
        assert_eq!(
            d.to_dense(2, 2),
            (vec![2.0, 6.0, 0.0, 0.0], vec![0.0, -1.0])
        );
        d.check_shape(2, 2).unwrap();
        assert!(d.check_shape(1, 2).is_err());
        assert!(d.check_shape(2, 3).is_err());
        let nan = Delta::Dense {
            w: vec![f32::NAN; 4],
            b: vec![0.0; 2],
        };
        assert!(matches!(nan.check_shape(2, 2), Err(PatchError::NotFinite)));
    }

    #[test]
    fn versions_chain() {
        let a = next_version(&[0; 32], &[1; 32]);
        let b = next_version(&a, &[2; 32]);
        assert_ne!(a, b);
        assert_ne!(next_version(&[0; 32], &[2; 32]), b);
    }
}
