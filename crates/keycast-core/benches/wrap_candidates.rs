//! One key wrap with each candidate primitive: a fresh 32-byte wrapping key (every wrap in a
//! rekey uses a different one, so key setup counts), 32 bytes sealed, 24 bytes of AAD.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::hint::black_box;

const AAD: [u8; 25] = [7; 25];
const NONCE: [u8; 12] = [1; 12];

fn keys() -> Vec<[u8; 32]> {
    (0..1024u32).map(|i| { let mut k = [0u8; 32]; k[..4].copy_from_slice(&i.to_le_bytes()); k }).collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("wrap_candidate");
    let keys = keys();
    let mut i = 0usize;
    let mut next = move || { i = (i + 1) % 1024; i };

    group.bench_function("keycast Wrap::seal (aws-lc-rs AES-256-GCM)", |b| {
        use keycast_core::{key::Key, KeyId, KeyRef, Wrap, Wrapper};
        let kek = KeyRef::new(KeyId(1), 1, 0);
        let payload = Key::from_bytes([9; 32]);
        b.iter_batched(|| Key::from_bytes(keys[next()]), |k| black_box(Wrap::seal(&k, Wrapper::Key(kek), KeyRef::new(KeyId(2), 3, 0), &payload, &[0x3c; 12])), BatchSize::SmallInput)
    });
    // aws-lc-rs keeps ring's AEAD API, so one body measures both.
    macro_rules! ring_api {
        ($krate:ident, $($name:literal => $alg:ident),+) => {$(
            group.bench_function($name, |b| {
                use $krate::aead::{Aad, LessSafeKey, Nonce, UnboundKey};
                b.iter(|| {
                    let key = LessSafeKey::new(UnboundKey::new(&$krate::aead::$alg, &keys[next()]).unwrap());
                    let mut buf = [9u8; 32];
                    let tag = key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(NONCE), Aad::from(&AAD), &mut buf).unwrap();
                    black_box((buf, tag))
                })
            });
        )+};
    }
    ring_api!(aws_lc_rs, "aws-lc-rs AES-256-GCM" => AES_256_GCM, "aws-lc-rs ChaCha20-Poly1305" => CHACHA20_POLY1305);
    ring_api!(ring, "ring AES-256-GCM" => AES_256_GCM, "ring ChaCha20-Poly1305" => CHACHA20_POLY1305);
    group.bench_function("RustCrypto aes-gcm Aes256Gcm", |b| {
        use aes_gcm::aead::{AeadInPlace, KeyInit};
        b.iter(|| {
            let cipher = aes_gcm::Aes256Gcm::new_from_slice(&keys[next()]).unwrap();
            let mut buf = [9u8; 32];
            let tag = cipher.encrypt_in_place_detached((&NONCE).into(), &AAD, &mut buf).unwrap();
            black_box((buf, tag))
        })
    });
    group.bench_function("RustCrypto chacha20poly1305", |b| {
        use chacha20poly1305::aead::{AeadInPlace, KeyInit};
        b.iter(|| {
            let cipher = chacha20poly1305::ChaCha20Poly1305::new_from_slice(&keys[next()]).unwrap();
            let mut buf = [9u8; 32];
            let tag = cipher.encrypt_in_place_detached((&NONCE).into(), &AAD, &mut buf).unwrap();
            black_box((buf, tag))
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
