//! Packet reassembly and the member's unwrapping on hostile packets: the input is a series
//! of length-prefixed packets (u16 big-endian length, then the bytes), decoded without
//! signatures so the fuzzer reaches the assembly and the member's key handling. The member
//! is the test vectors' member with its real keys, so the vectors' packets unwrap and mutated
//! ones reach past the AEAD.
#![no_main]

use std::sync::OnceLock;

use keycast_core::wire::{RekeyAssembly, RekeyPacket};
use keycast_core::{Key, KeyId, KeyRef, MemberKeys, Position};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The committed test vectors (the one place that names the file).
const VECTORS_JSON: &str = include_str!("../../crates/keycast-core/tests/vectors/wire-v2.json");

/// The vectors' member before the rekey, and the group key the rekey gives it.
struct Fixture {
    position: Position,
    keys_before: Vec<(KeyRef, [u8; 32])>,
    group_key_after: (KeyRef, [u8; 32]),
}

fn key_ref(v: &Value) -> KeyRef {
    let n = |field: &str| v[field].as_u64().expect("key ref field") as u32;
    KeyRef::new(KeyId(n("id")), n("version"), n("revision"))
}

fn key_bytes(v: &Value) -> [u8; 32] {
    let hex = v.as_str().expect("hex key");
    core::array::from_fn(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex digit"))
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let file: Value = serde_json::from_str(VECTORS_JSON).expect("vectors are JSON");
        let member = &file["member"];
        let tree = &member["position"]["tree"];
        let number = |field: &str| tree[field].as_u64().expect("tree position") as u32;
        let keys_before = member["keys_before"]
            .as_array()
            .expect("keys_before")
            .iter()
            .map(|k| (key_ref(&k["ref"]), key_bytes(&k["key"])))
            .collect();
        let after = &member["group_key_after"];
        Fixture {
            position: Position::Tree { leaf: number("leaf"), degree: number("degree") },
            keys_before,
            group_key_after: (key_ref(&after["ref"]), key_bytes(&after["key"])),
        }
    })
}

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

    let fixture = fixture();
    let keys = fixture.keys_before.iter().map(|(r, k)| (*r, Key::from_bytes(*k))).collect();
    let mut member = MemberKeys::from_snapshot(fixture.position, keys, fixture.keys_before.last().expect("a group key").0);
    let _ = member.apply(&assembly.messages());
    // Unsigned packets can say anything, but only the controller could seal a key under the
    // member's keys: whatever the member now holds under the rekey's group key ref is the real key.
    let (group_ref, real_key) = fixture.group_key_after;
    if let Some(key) = member.key(group_ref) {
        assert!(key == Key::from_bytes(real_key), "the member unwrapped a forged group key");
    }
});
