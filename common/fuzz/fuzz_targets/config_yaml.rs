//! Fuzzes the gateway config parser (YAML, then field checks) with arbitrary text: it
//! must never panic, and every refusal names a field or the file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use strait_common::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = Config::parse(Path::new("fuzz.yaml"), text) {
        assert!(!errors.0.is_empty(), "a refusal says why");
        for e in &errors.0 {
            assert!(!e.problem.is_empty(), "{e}");
        }
    }
});
