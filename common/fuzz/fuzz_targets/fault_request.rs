//! Fuzzes the admin API's fault request body (JSON, then the fault's own checks) with
//! arbitrary bytes: it must never panic, and an accepted request survives a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strait_common::api::FaultRequest;

fuzz_target!(|data: &[u8]| {
    let mut de = serde_json::Deserializer::from_slice(data);
    let Ok(req) = serde_path_to_error::deserialize::<_, FaultRequest>(&mut de) else {
        return;
    };
    let _ = req.fault.check();
    let json = serde_json::to_vec(&req).expect("a request serializes");
    let again: FaultRequest = serde_json::from_slice(&json).expect("and reads back");
    assert_eq!(serde_json::to_vec(&again).unwrap(), json);
});
