//! Fuzzes the drill scenario parser (YAML, then its checks) with arbitrary text: it must
//! never panic, and every refusal names what is wrong.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use strait_ops::drill::Scenario;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = Scenario::parse(Path::new("fuzz.yaml"), text) {
        assert!(!errors.0.is_empty(), "a refusal says why");
    }
});
