//! FEC for rekey blocks: keycast's `delivery::fec` (reed-solomon-simd, framed shards) against
//! RaptorQ (the `raptorq` crate, RFC 6330), on blocks of k packets of 1200 bytes with as many
//! parity (repair) packets.
//!
//! - `encode/<codec> k=K`: make the K parity packets of one block;
//! - `decode/<codec> k=K`: recover the block with half its originals lost, from the rest and
//!   parity (RaptorQ may need a repair symbol more than K; it is given every one).
//!
//! Results are recorded in docs/delivery.md.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use keycast_core::delivery::fec::{decode_block, encode_block, BlockCode, Shard, ShardIndex};
use raptorq::{Decoder, Encoder, EncodingPacket};

const PACKET: usize = 1200;

fn packets(k: usize) -> Vec<Vec<u8>> {
    (0..k).map(|i| (0..PACKET).map(|b| (b * 31 + i * 7) as u8).collect()).collect()
}

fn reed_solomon(c: &mut Criterion, k: usize) {
    let originals = packets(k);
    let code = BlockCode::new(k, k).unwrap();
    c.bench_function(&format!("encode/reed-solomon-simd k={k}"), |b| b.iter(|| black_box(encode_block(code, &originals).unwrap())));
    let block = encode_block(code, &originals).unwrap();
    // The second half of the originals arrives, and parity stands in for the first half.
    let mut shards: Vec<Shard> = (k / 2..k).map(|i| Shard { index: ShardIndex::Original(i as u16), bytes: &originals[i] }).collect();
    shards.extend((0..k / 2).map(|i| Shard { index: ShardIndex::Parity(i as u16), bytes: &block.parity[i] }));
    assert_eq!(decode_block(code, block.shard_len, &shards).unwrap(), originals);
    c.bench_function(&format!("decode/reed-solomon-simd k={k}"), |b| b.iter(|| black_box(decode_block(code, block.shard_len, &shards).unwrap())));
}

fn raptor(c: &mut Criterion, k: usize) {
    let data: Vec<u8> = packets(k).concat();
    c.bench_function(&format!("encode/raptorq k={k}"), |b| {
        b.iter(|| black_box(Encoder::with_defaults(&data, PACKET as u16).get_encoded_packets(k as u32)))
    });
    let encoder = Encoder::with_defaults(&data, PACKET as u16);
    let config = encoder.get_config();
    let all: Vec<EncodingPacket> = encoder.get_encoded_packets(k as u32);
    // Lose the first half of the source symbols; keep the rest and every repair symbol.
    let received: Vec<EncodingPacket> = all.into_iter().skip(k / 2).collect();
    let decode = || {
        let mut decoder = Decoder::new(config);
        received.iter().find_map(|p| decoder.decode(p.clone())).expect("decodes")
    };
    assert_eq!(decode(), data);
    c.bench_function(&format!("decode/raptorq k={k}"), |b| b.iter(|| black_box(decode())));
}

fn bench(c: &mut Criterion) {
    for k in [10, 100] {
        reed_solomon(c, k);
        raptor(c, k);
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500)).sample_size(20);
    targets = bench
}
criterion_main!(benches);
