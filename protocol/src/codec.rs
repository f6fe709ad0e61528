//! The byte encoding of every wire type: bincode 2 with a fixed configuration.
//!
//! All encoding goes through this module so the format can be swapped in one place. Decoding
//! is bounded twice: the input slice must not exceed the caller's limit, and bincode's own
//! allocation limit stops a small message that claims a huge length prefix.

use serde::{Serialize, de::DeserializeOwned};

/// Bincode's allocation limit: the largest wire message (an all-reduce part).
const ALLOC_LIMIT: usize = crate::names::MAX_PART_BYTES;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<ALLOC_LIMIT>()
}

/// Why bytes could not be turned into a message, or a message into bytes.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("malformed message: {trailing} trailing bytes after a complete message")]
    TrailingBytes { trailing: usize },
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// Encodes `value`, refusing results larger than `limit` bytes.
pub fn encode<T: Serialize>(value: &T, limit: usize) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(value, config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    if bytes.len() > limit {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    Ok(bytes)
}

/// Largest file-backed message (snapshots, logs): these come from disk, not from peers.
pub const MAX_FILE_BYTES: usize = 1 << 30;

fn file_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<MAX_FILE_BYTES>()
}

/// Encodes a large local file (a snapshot). Same format as [`encode`], larger limit.
pub fn encode_file<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(value, file_config())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    if bytes.len() > MAX_FILE_BYTES {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit: MAX_FILE_BYTES,
        });
    }
    Ok(bytes)
}

/// Decodes a large local file written by [`encode_file`].
pub fn decode_file<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_FILE_BYTES {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit: MAX_FILE_BYTES,
        });
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, file_config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes {
            trailing: bytes.len() - used,
        });
    }
    Ok(value)
}

/// Decodes exactly one `T` from `bytes`, which must be at most `limit` bytes long and contain
/// nothing after the message.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, CodecError> {
    if bytes.len() > limit {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes {
            trailing: bytes.len() - used,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_oversized_input() {
        let err = decode::<Vec<u8>>(&[0u8; 100], 10).unwrap_err();
        assert!(matches!(
            err,
            CodecError::TooLarge {
                len: 100,
                limit: 10
            }
        ));
    }

    #[test]
    fn refuses_trailing_bytes() {
        let mut bytes = encode(&7u32, 64).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<u32>(&bytes, 64),
            Err(CodecError::TrailingBytes { trailing: 1 })
        ));
    }

    #[test]
    fn refuses_huge_length_prefix() {
        // A varint length of u64::MAX followed by nothing: must fail without allocating.
        let bytes = [0xFFu8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        assert!(decode::<Vec<u8>>(&bytes, 64).is_err());
    }

    #[test]
    fn refuses_truncated_input() {
        let bytes = encode(&vec![1u8; 40], 64).unwrap();
        assert!(decode::<Vec<u8>>(&bytes[..20], 64).is_err());
    }

    #[test]
    fn encode_refuses_over_limit() {
        assert!(matches!(
            encode(&vec![0u8; 100], 50),
            Err(CodecError::TooLarge { .. })
        ));
    }
}
