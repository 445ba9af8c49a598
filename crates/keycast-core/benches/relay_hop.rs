//! What one relay hop adds per data packet: decoding, unwrapping the 32-byte message key under
//! the source group's key, wrapping it under the target's, and encoding; against the floor of
//! one AES-256-GCM open plus one seal of 32 bytes. The joiners' reflector's cost per packet is
//! the same kind of hop (to a joiners' key, on the group's own channel). Figures in
//! docs/hierarchy.md.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use keycast_core::key::{Key, KeyId, KeyRef};
use keycast_core::protocol::reflector::{joiners_key_ref, ReflectionKeys, Reflector};
use keycast_core::protocol::relay::{Forwarder, Side};
use keycast_core::protocol::traffic::{self, Fresh, TrafficKeys, WrapKey};
use keycast_core::wire::{Data, GroupId};
use keycast_core::MemberId;
use std::hint::black_box;

const PARENT: GroupId = GroupId(1);
const SUBGROUP: GroupId = GroupId(2);

fn keys(group: GroupId) -> TrafficKeys {
    let key_ref = KeyRef::new(KeyId(group.0 as u32), 1, 0);
    TrafficKeys { group, sealing: Some(key_ref), keys: vec![(key_ref, Key::from_bytes([group.0 as u8; 32]))] }
}

fn wrap_key(group: GroupId) -> WrapKey {
    let keys = keys(group);
    WrapKey::derive(group, keys.keys[0].0, &keys.keys[0].1)
}

fn message(seq: u64, len: usize) -> Data {
    let fresh = Fresh { message_key: [seq as u8; 32], nonce: [7; 12] };
    traffic::seal((SUBGROUP, MemberId(3), seq), &wrap_key(SUBGROUP), fresh, &vec![0x42; len]).unwrap()
}

/// A reflector of the subgroup whose key in force is made by rekey 1, with the joiners of
/// batch 2 waiting or none.
fn reflector(waiting: bool) -> Reflector {
    let (key_ref, key) = keys(SUBGROUP).keys.remove(0);
    let joiners = if waiting { vec![(2, joiners_key_ref(2), Key::from_bytes([0x77; 32]))] } else { Vec::new() };
    let mut reflector = Reflector::new(SUBGROUP);
    reflector.install(&ReflectionKeys { group: SUBGROUP, group_keys: vec![(1, key_ref, key)], joiners });
    reflector
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("relay_hop");
    for len in [64usize, 1200] {
        let mut forwarder = Forwarder::new(PARENT, SUBGROUP);
        forwarder.install(Side::Parent, &keys(PARENT));
        forwarder.install(Side::Subgroup, &keys(SUBGROUP));
        let mut seq = 0u64;
        group.bench_function(format!("decode + forward + encode, {len}-byte payload"), |b| {
            b.iter_batched(
                || {
                    seq += 1;
                    message(seq, len).encode()
                },
                |bytes| black_box(forwarder.forward(Side::Subgroup, Data::decode(&bytes).unwrap(), [9; 12]).unwrap().encode()),
                BatchSize::SmallInput,
            )
        });
        for (waiting, what) in [(true, "a batch of joiners waits"), (false, "no joiner waits: authenticated only")] {
            let mut reflector = reflector(waiting);
            group.bench_function(format!("decode + reflect + encode, {len}-byte payload, {what}"), |b| {
                b.iter_batched(
                    || {
                        seq += 1;
                        message(seq, len).encode()
                    },
                    |bytes| {
                        let copies = reflector.reflect(&Data::decode(&bytes).unwrap(), || [9; 12]).unwrap();
                        black_box(copies.iter().map(Data::encode).collect::<Vec<_>>())
                    },
                    BatchSize::SmallInput,
                )
            });
        }
        let (from, to) = (wrap_key(SUBGROUP), wrap_key(PARENT));
        group.bench_function(format!("traffic::rewrap alone, {len}-byte payload"), |b| {
            b.iter_batched(|| message(1, len), |data| black_box(traffic::rewrap(data, &from, &to, [9; 12]).unwrap()), BatchSize::SmallInput)
        });
        group.bench_function(format!("seal, {len}-byte payload (a sender's cost, for scale)"), |b| {
            let key = wrap_key(SUBGROUP);
            b.iter(|| black_box(traffic::seal((SUBGROUP, MemberId(3), 1), &key, Fresh { message_key: [1; 32], nonce: [2; 12] }, &vec![0x42; len]).unwrap()))
        });
    }
    group.bench_function("floor: AES-256-GCM open + seal of a 32-byte key", |b| {
        use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
        let (k1, k2) = (LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[1; 32]).unwrap()), LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[2; 32]).unwrap()));
        let mut sealed = [5u8; 48];
        let tag = k1.seal_in_place_separate_tag(Nonce::assume_unique_for_key([3; 12]), Aad::from(&[0u8; 45]), &mut sealed[..32]).unwrap();
        sealed[32..].copy_from_slice(tag.as_ref());
        b.iter(|| {
            let mut buf = sealed;
            let plain: [u8; 32] = k1.open_in_place(Nonce::assume_unique_for_key([3; 12]), Aad::from(&[0u8; 45]), &mut buf).unwrap().try_into().unwrap();
            let mut out = plain;
            let tag = k2.seal_in_place_separate_tag(Nonce::assume_unique_for_key([4; 12]), Aad::from(&[0u8; 45]), &mut out).unwrap();
            black_box((out, tag))
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2)).sample_size(30);
    targets = bench
}
criterion_main!(benches);
