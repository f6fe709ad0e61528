//! Any bytes a peer sends as an RPC response.
#![no_main]
use colony_protocol::Response;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(resp) = Response::from_bytes(data) {
        let again = resp.to_bytes().expect("a decoded response re-encodes");
        let back = Response::from_bytes(&again).expect("re-decodes");
        // Floats may be NaN (refused later, by validation), which compare unequal: compare
        // the bytes.
        assert_eq!(back.to_bytes().expect("re-encodes"), again);
    }
});
