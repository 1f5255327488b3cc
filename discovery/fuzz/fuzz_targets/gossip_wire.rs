//! Fuzzes the gossip wire: arbitrary bytes as a sync request (a digest) and as a push
//! request (a delta), decoded by prost and checked by `wire`. It must never panic, and
//! whatever is accepted converts back to a message that is accepted as the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use strait_discovery::wire::{self, pb};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = pb::SyncRequest::decode(data)
        && let Ok(digest) = wire::digest_from_pb(req.digest.unwrap_or_default())
    {
        let again = wire::digest_from_pb(wire::digest_to_pb(&digest)).expect("re-accepted");
        assert_eq!(again, digest);
    }
    if let Ok(req) = pb::PushRequest::decode(data)
        && let Ok(delta) = wire::delta_from_pb(req.delta.unwrap_or_default())
    {
        let again = wire::delta_from_pb(wire::delta_to_pb(&delta)).expect("re-accepted");
        assert_eq!(again, delta);
    }
});
