//! The node key: created once in the data directory, loaded on every start, so a node keeps
//! its peer id across restarts.

use std::path::Path;

use anyhow::{Context, bail};
use colony_protocol::NodeKeypair;
use libp2p::identity::Keypair;

use crate::storage::write_atomic;

/// Loads the key at `path`, or creates one there if the file does not exist.
/// A file that exists but cannot be read as a key is an error naming the file: it is never
/// replaced silently (that would change the node's identity).
pub fn load_or_create(path: &Path) -> anyhow::Result<Keypair> {
    match std::fs::read(path) {
        Ok(bytes) => {
            decode(&bytes).with_context(|| format!("node key file {} is corrupt", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            write(path, &key)?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("cannot read node key file {}", path.display())),
    }
}

pub fn decode(bytes: &[u8]) -> anyhow::Result<Keypair> {
    let key =
        Keypair::from_protobuf_encoding(bytes).context("not a protobuf-encoded libp2p key")?;
    if key.clone().try_into_ed25519().is_err() {
        bail!("only ed25519 node keys are supported");
    }
    Ok(key)
}

pub fn write(path: &Path, key: &Keypair) -> anyhow::Result<()> {
    let bytes = key
        .to_protobuf_encoding()
        .context("cannot encode node key")?;
    write_atomic(path, &bytes, 0o600)
}

/// The same key as a record-signing key.
pub fn signing_key(key: &Keypair) -> anyhow::Result<NodeKeypair> {
    let ed = key
        .clone()
        .try_into_ed25519()
        .context("only ed25519 node keys are supported")?;
    Ok(NodeKeypair::from_keypair_bytes(&ed.to_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persists_and_refuses_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let a = load_or_create(&path).unwrap();
        let b = load_or_create(&path).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        assert_eq!(
            signing_key(&a).unwrap().public().0,
            a.public().try_into_ed25519().unwrap().to_bytes()
        );
        std::fs::write(&path, b"garbage").unwrap();
        let err = format!("{:#}", load_or_create(&path).unwrap_err());
        assert!(err.contains("node.key") && err.contains("corrupt"), "{err}");
    }
}
