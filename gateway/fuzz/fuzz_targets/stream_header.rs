//! Fuzzes the tunnel stream header decoder with arbitrary bytes: it must never panic, and
//! whatever it accepts must re-encode to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_gateway::tunnel::header::{StreamRequest, StreamResponse, decode_frame, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, used))) = decode_frame::<StreamRequest>(data) {
        assert!(used <= data.len());
        if req.service.len() + req.namespace.len() + req.endpoint.as_deref().map_or(0, str::len) < 900 {
            let again = encode(&req);
            assert_eq!(decode_frame::<StreamRequest>(&again).unwrap().unwrap().0, req);
        }
    }
    let _ = decode_frame::<StreamResponse>(data);
});
