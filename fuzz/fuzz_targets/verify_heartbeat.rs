//! Heartbeat verification and the replay guard on hostile bytes.
#![no_main]

use keycast_core::wire::{GroupId, ReplayGuard, SignedHeartbeat, Signer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let signer = Signer::from_seed(&[0x5e; 32]).verifying_key();
    let mut guard = ReplayGuard::new(GroupId(0x6b63), 7, 2);
    if let Ok(SignedHeartbeat { heartbeat, .. }) = SignedHeartbeat::decode(data) {
        let _ = guard.accept_heartbeat(&heartbeat);
        let _ = guard.accept_heartbeat(&heartbeat).expect_err("a heartbeat is accepted once at most");
    }
    let _ = SignedHeartbeat::verify(data, &signer);
});
