//! Any bytes a peer sends on the all-reduce protocol.
#![no_main]
use colony_protocol::allreduce::{PartAck, PartMessage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = PartMessage::from_bytes(data) {
        let again = m.to_bytes().expect("re-encodes");
        let back = PartMessage::from_bytes(&again).expect("re-decodes");
        // NaN weights compare unequal; compare the bytes instead.
        assert_eq!(back.to_bytes().expect("re-encodes"), again);
    }
    let _ = PartAck::from_bytes(data);
});
