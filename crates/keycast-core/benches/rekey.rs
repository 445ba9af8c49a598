//! Rekey cost at a million members, beside the cost of the wraps themselves.
//!
//! - `wrap/one`: the floor, one wrap with the chosen primitive;
//! - `leave/single 2^20 d4`: one leave from 2^20 members, degree 4 (39 wraps);
//! - `leave/10% of 2^20 d4`: 104,857 random leavers in one batch, on every core;
//! - `member/*`: a member processing the messages it needs (user-oriented) of each rekey.
//!
//! Leavers rejoin between iterations (untimed) so every iteration starts from a full group.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use keycast_core::key::Key;
use keycast_core::{package, Batch, BatchSeed, KeyGraph, KeyId, KeyRef, MemberId, MemberKeys, Strategy, Wrap, Wrapper};
use rand_chacha::ChaCha8Rng;
use rand_core::SeedableRng;

mod common;
use common::{full_group, random_leavers, N};

/// Times `leaves` batches; the same members rejoin after each, untimed.
fn time_leaves(graph: &mut dyn KeyGraph, leavers: &[MemberId], iters: u64, seed: &mut BatchSeed) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        *seed = seed.next();
        let batch = Batch { joins: vec![], leaves: leavers.to_vec() };
        let start = Instant::now();
        let plan = graph.apply(&batch, seed).unwrap();
        total += start.elapsed();
        drop(black_box(plan));
        *seed = seed.next();
        graph.apply(&Batch { joins: leavers.to_vec(), leaves: vec![] }, seed).unwrap();
    }
    total
}

fn bench(c: &mut Criterion) {
    let payload = Key::from_bytes([3; 32]);
    let kek = Key::from_bytes([4; 32]);
    c.bench_function("wrap/one", |b| {
        b.iter(|| black_box(Wrap::seal(&kek, Wrapper::Key(KeyRef::new(KeyId(1), 1, 0)), KeyRef::new(KeyId(2), 2, 0), &payload, &[0x3c; 12])))
    });

    let mut graph = full_group();
    let mut seed = BatchSeed::from_u64(3);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let single = [MemberId(N / 3)];
    c.bench_function("leave/single 2^20 d4", |b| b.iter_custom(|iters| time_leaves(graph.as_mut(), &single, iters, &mut seed)));

    let tenth = random_leavers(N as usize / 10, &mut rng);
    let mut group = c.benchmark_group("leave");
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    group.bench_function("10% of 2^20 d4", |b| b.iter_custom(|iters| time_leaves(graph.as_mut(), &tenth, iters, &mut seed)));
    group.finish();

    for (name, leavers) in [("member/after single leave", &single[..]), ("member/after 10% leave", &tenth[..])] {
        let stay = MemberId(N / 3 + 1);
        let (position, keys) = graph.member_keys(stay).unwrap();
        let group_key = graph.group_key().0;
        seed = seed.next();
        let plan = graph.apply(&Batch { joins: vec![], leaves: leavers.to_vec() }, &seed).unwrap();
        let before = MemberKeys::from_snapshot(position, keys, group_key);
        let messages: Vec<_> = package(&plan, Strategy::UserOriented)
            .into_iter()
            .filter(|m| m.wraps.first().is_some_and(|w| matches!(w.under, Wrapper::Key(r) if before.key(r).is_some())))
            .collect();
        c.bench_function(name, |b| {
            b.iter(|| {
                let mut member = before.clone();
                black_box(member.apply(&messages).unwrap())
            })
        });
        seed = seed.next();
        graph.apply(&Batch { joins: leavers.to_vec(), leaves: vec![] }, &seed).unwrap();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
