//! A participant's decoder of the request to hand its keys back to an appointed participant
//! (the new controller's address and name): no panic, and whatever decodes has exactly one
//! encoding (the bytes it came from).
#![no_main]

use keycast_core::protocol::distributed_flat::Appointment;
use keycast_core::wire::GroupId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The appointment names its group after the version and kind bytes.
    let group = data.get(2..10).map_or(GroupId(0), |b| GroupId(u64::from_be_bytes(b.try_into().unwrap())));
    if let Ok(appointment) = Appointment::decode(data, group) {
        assert_eq!(appointment.encode(), data, "appointment re-encodes differently");
    }
});
