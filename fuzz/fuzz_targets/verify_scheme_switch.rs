//! Scheme switch notices (type 21) on hostile bytes: no panic, whatever decodes has exactly one
//! encoding, and nothing unsigned verifies.
#![no_main]

use keycast_core::wire::{SignedSchemeSwitch, Signer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let signer = Signer::from_seed(&[0x5e; 32]).verifying_key();
    if let Ok(signed) = SignedSchemeSwitch::decode(data) {
        assert_eq!(signed.encode(), data, "scheme switch re-encodes differently");
    }
    let _ = SignedSchemeSwitch::verify(data, &signer);
});
