//! Any bytes a peer sends as an RPC request: decode must return, never panic; whatever
//! decodes must re-encode to the same bytes (the encoding is canonical).
#![no_main]
use colony_protocol::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = Request::from_bytes(data) {
        let again = req.to_bytes().expect("a decoded request re-encodes");
        let back = Request::from_bytes(&again).expect("re-decodes");
        // Floats may be NaN (refused later, by validation), which compare unequal: compare
        // the bytes.
        assert_eq!(back.to_bytes().expect("re-encodes"), again);
    }
});
