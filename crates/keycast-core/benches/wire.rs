//! The rekey on the wire at a million members: encoding, packetising and signing, and the
//! member's side, beside the cost of the wraps and of one signature.
//!
//! - `sign/one`: one Ed25519 signature (a heartbeat: encode and sign);
//! - `encode/single leave 2^20 d4`, `encode/10% of 2^20 d4`: `encode_rekey` of the plan
//!   (default placement: user-oriented for the single leave, tiered for the batch; MTU 1200,
//!   blocks of 64 packets), plan already built; `encode/10% of 2^20 d4 user-oriented` too;
//! - `member/verify and unwrap its packets`: after the 10% batch, a member verifies the (at
//!   most two) packets holding its entries (signature + path each) and unwraps its new keys.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use keycast_core::wire::rekey::RekeyContext;
use keycast_core::wire::*;
use keycast_core::{Batch, BatchSeed, KeyId, KeyRef, MemberId, MemberKeys};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

mod common;
use common::{full_group, random_leavers, N};

fn bench(c: &mut Criterion) {
    let signer = Signer::from_seed(&[9; 32]);
    let beat = Heartbeat {
        group: GroupId(1),
        epoch: 1,
        seq: 1,
        rekey_seq: 1,
        active: KeyRef::new(KeyId(0), 1, 0),
        active_check: [0; 8],
        pending: None,
        pending_check: [0; 8],
        group_size: N,
        sent_ms: 0,
        activates_in_ms: 0,
    };
    c.bench_function("sign/one", |b| b.iter(|| black_box(beat.sign(&signer))));

    let mut graph = full_group();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let context = RekeyContext { group: GroupId(1), epoch: 2, seq: 1, activation: 3 };
    let single = graph.apply(&Batch { joins: vec![], leaves: vec![MemberId(N / 3)] }, &BatchSeed::from_u64(5)).unwrap();
    c.bench_function("encode/single leave 2^20 d4", |b| {
        b.iter(|| black_box(encode_rekey(&single, context, PacketConfig::default(), &signer).unwrap()))
    });
    graph.apply(&Batch { joins: vec![MemberId(N / 3)], leaves: vec![] }, &BatchSeed::from_u64(6)).unwrap();

    let tenth = random_leavers(N as usize / 10, &mut rng);
    let stay = (0..N).map(MemberId).find(|m| tenth.binary_search(m).is_err()).unwrap();
    let (position, keys) = graph.member_keys(stay).unwrap();
    let before = MemberKeys::from_snapshot(position, keys, graph.group_key().0);
    let plan = graph.apply(&Batch { joins: vec![], leaves: tenth }, &BatchSeed::from_u64(7)).unwrap();
    let mut group = c.benchmark_group("encode");
    group.sample_size(10).measurement_time(Duration::from_secs(15));
    group.bench_function("10% of 2^20 d4", |b| {
        b.iter(|| black_box(encode_rekey(&plan, context, PacketConfig::default(), &signer).unwrap()))
    });
    let user = PacketConfig { placement: Placement::UserOriented, ..PacketConfig::default() };
    group.bench_function("10% of 2^20 d4 user-oriented", |b| b.iter(|| black_box(encode_rekey(&plan, context, user, &signer).unwrap())));
    group.finish();

    let rekey = encode_rekey(&plan, context, PacketConfig::default(), &signer).unwrap();
    eprintln!("10% rekey on the wire: {:?} (plan: {} wraps)", rekey.stats, plan.wraps.len());
    let key = signer.verifying_key();
    let mine: Vec<&Vec<u8>> =
        rekey.packets.iter().filter(|bytes| before.has_entry(&RekeyPacket::decode(bytes).unwrap().message())).collect();
    assert!((1..=2).contains(&mine.len()));
    c.bench_function("member/verify and unwrap its packets", |b| {
        b.iter(|| {
            let packets: Vec<RekeyPacket> = mine.iter().map(|bytes| RekeyPacket::verify(bytes, &key).unwrap()).collect();
            let messages: Vec<_> = packets.iter().map(RekeyPacket::message).collect();
            let mut member = before.clone();
            black_box(member.apply(&messages).unwrap())
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
