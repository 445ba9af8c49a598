//! Every decoder, through the type dispatch: no panic, and whatever decodes has exactly one
//! encoding (the bytes it came from). A join acceptance that decodes with a joiners' key names
//! a joiners' key (the decoder refuses any other key id there).
#![no_main]

use keycast_core::wire::control::JOINERS_KEY_ID;
use keycast_core::wire::{JoinAnswer, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Message::decode(data) {
        assert_eq!(message.encode(), data, "decoded message re-encodes differently");
        if let Message::JoinAnswer(JoinAnswer::Accepted(accepted)) = &message {
            if let Some((key_ref, _)) = accepted.joiners_key.as_deref() {
                assert_eq!((key_ref.id, key_ref.revision), (JOINERS_KEY_ID, 0), "a joiners' key under another id");
            }
        }
    }
});
