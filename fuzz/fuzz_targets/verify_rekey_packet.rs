//! Rekey packet verification (decode, hash path, signature) on hostile bytes.
#![no_main]

use keycast_core::wire::{RekeyPacket, Signer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let signer = Signer::from_seed(&[0x5e; 32]).verifying_key();
    if let Ok(packet) = RekeyPacket::verify(data, &signer) {
        assert_eq!(packet.encode(), data);
    }
});
