//! Every decoder, through the type dispatch: no panic, and whatever decodes has exactly one
//! encoding (the bytes it came from).
#![no_main]

use keycast_core::wire::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Message::decode(data) {
        assert_eq!(message.encode(), data, "decoded message re-encodes differently");
    }
});
