//! Packet reassembly and the member's unwrapping on hostile packets: the input is a series
//! of length-prefixed packets (u16 big-endian length, then the bytes), decoded without
//! signatures so the fuzzer reaches the assembly and the member's key handling.
#![no_main]

use keycast_core::wire::{RekeyAssembly, RekeyPacket};
use keycast_core::{Key, KeyId, KeyRef, MemberKeys, Position};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut assembly: Option<RekeyAssembly> = None;
    let mut rest = data;
    while rest.len() >= 2 {
        let len = (u16::from_be_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let (packet, tail) = rest[2..].split_at(len);
        rest = tail;
        let Ok(packet) = RekeyPacket::decode(packet) else { continue };
        match assembly.as_mut() {
            None => assembly = Some(RekeyAssembly::new(packet)),
            Some(a) => {
                let _ = a.offer(packet);
            }
        }
    }
    let Some(assembly) = assembly else { return };
    let missing = assembly.missing(512);
    assert!(missing.len() <= 512);
    assert_eq!(assembly.is_complete(), missing.is_empty() && assembly.header().count as usize == assembly.messages().len());
    // A member of a degree-4 tree whose individual key is all zeros tries the packets.
    let individual = KeyRef::new(KeyId(0), 1, 0);
    let mut member = MemberKeys::from_snapshot(
        Position::Tree { leaf: 0, degree: 4 },
        vec![(individual, Key::from_bytes([0; 32]))],
        individual,
    );
    let _ = member.apply(&assembly.messages());
});
