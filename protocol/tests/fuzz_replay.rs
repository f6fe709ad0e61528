//! Replays the saved fuzz corpus (`tests/fuzz_corpus/<target>/`, a sample of what
//! `scripts/fuzz.sh` found interesting, bad inputs and near-valid ones) through the same checks
//! as the fuzz targets in `fuzz/fuzz_targets/`: no input may panic, and whatever decodes must
//! re-encode to the same thing.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use colony_protocol::allreduce::{PartAck, PartMessage};
use colony_protocol::names::MAX_RPC_BYTES;
use colony_protocol::{DhtEntry, Request, Response, SignedEnvelope, decode};

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no corpus in {}", dir.display());
    out
}

#[test]
fn allreduce_part_corpus() {
    for (name, data) in inputs("allreduce_part") {
        if let Ok(m) = PartMessage::from_bytes(&data) {
            let again = m.to_bytes().unwrap();
            let back = PartMessage::from_bytes(&again).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(back.to_bytes().unwrap(), again, "{name}");
        }
        let _ = PartAck::from_bytes(&data);
    }
}

#[test]
fn dht_entry_corpus() {
    for (_, data) in inputs("dht_entry") {
        if let Ok(entry) = decode::<DhtEntry>(&data, MAX_RPC_BYTES) {
            let _ = entry.validate(1_700_000_000_000);
            let _ = entry.signing_bytes();
        }
        let _ = colony_protocol::codec::decode_file::<Vec<DhtEntry>>(&data);
    }
}

#[test]
fn envelope_corpus() {
    for (name, data) in inputs("envelope") {
        if let Ok(env) = SignedEnvelope::from_bytes(&data) {
            // Nothing in the corpus is signed by a key we hold: none may open.
            assert!(env.open(&env.domain.clone()).is_err(), "{name} opened");
        }
    }
}

#[test]
fn rpc_request_corpus() {
    for (name, data) in inputs("rpc_request") {
        if let Ok(req) = Request::from_bytes(&data) {
            // Compared as bytes: a float may be NaN (validation refuses it later).
            let again = req.to_bytes().unwrap();
            let back = Request::from_bytes(&again).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(back.to_bytes().unwrap(), again, "{name}");
        }
    }
}

#[test]
fn rpc_response_corpus() {
    for (name, data) in inputs("rpc_response") {
        if let Ok(resp) = Response::from_bytes(&data) {
            // Compared as bytes: a float may be NaN (validation refuses it later).
            let again = resp.to_bytes().unwrap();
            let back = Response::from_bytes(&again).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(back.to_bytes().unwrap(), again, "{name}");
        }
    }
}
