//! A DHT entry from the wire, then the validation every node runs on it: neither may panic.
#![no_main]
use colony_protocol::names::MAX_RPC_BYTES;
use colony_protocol::{decode, DhtEntry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(entry) = decode::<DhtEntry>(data, MAX_RPC_BYTES) {
        let _ = entry.validate(1_700_000_000_000);
        let _ = entry.signing_bytes();
    }
    // The snapshot file format (read back at start-up) uses the same entries.
    let _ = colony_protocol::codec::decode_file::<Vec<DhtEntry>>(data);
});
