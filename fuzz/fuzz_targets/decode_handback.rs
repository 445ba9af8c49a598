//! The appointed controller's decoder of a participant's handback (its ID, TEK and KEKs): no
//! panic, and whatever decodes has exactly one encoding (the bytes it came from).
#![no_main]

use keycast_core::protocol::distributed_flat::HandbackKeys;
use keycast_core::wire::GroupId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The handback names its group after the version and kind bytes.
    let group = data.get(2..10).map_or(GroupId(0), |b| GroupId(u64::from_be_bytes(b.try_into().unwrap())));
    if let Ok(handback) = HandbackKeys::decode(data, group) {
        assert_eq!(&handback.encode(group)[..], data, "handback re-encodes differently");
    }
});
