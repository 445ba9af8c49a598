//! Erasure coding of one FEC block of rekey packets (Reed-Solomon over GF(2^16), by the
//! `reed-solomon-simd` crate).
//!
//! A block is `k` original packets of any lengths up to [`MAX_PACKET_LEN`]. Each is *framed*
//! into a shard of one common length: a big-endian `u16` holding the packet's length, the
//! packet, then zeros up to the shard length (the longest framed packet, rounded up to even,
//! as the codec needs). The lengths thus travel inside the shards, and a decoded shard gives
//! back its exact packet. From the `k` framed shards the encoder makes up to
//! `parity_capacity` parity shards; any `k` distinct shards of the block (originals or
//! parity) give back every original.
//!
//! The parity shards depend on the code's `parity_capacity` as well as on `k` (the codec picks
//! its transform from both), so sender and receiver must agree on both: a server encodes the
//! whole capacity once and sends a prefix proactively, then fresh parity shards from the rest
//! on repair.
//!
//! Every input is checked before the codec sees it: shard counts, indices, lengths, duplicates
//! and framing each have their own [`FecError`]. A corrupted parity shard still decodes to
//! wrong bytes (erasure codes do not detect errors): callers check what they decode, as
//! [`super::recovery`] does with the packets' own signatures.
//!
//! Measured (`cargo bench -p keycast-core --bench fec`, 2 cores, 1200-byte packets, k parity):
//! at k = 10, encoding 4.4 µs and decoding (half the originals lost) 205 µs; RaptorQ (`raptorq`
//! 2.0) 43.6 µs and 36.3 µs, but it is not MDS (may need more than k symbols). At k = 100:
//! 55 µs / 355 µs against 286 µs / 254 µs. Reed-Solomon decoding has a fixed ~0.2 ms cost; the
//! server encodes every block, a member decodes one. Details in `docs/delivery.md`.

use reed_solomon_simd as rs;

use crate::wire::MAX_MESSAGE_LEN;

/// Most original packets in a block.
pub const MAX_ORIGINALS: usize = 256;
/// Most parity shards a block's code can make.
pub const MAX_PARITY: usize = 1024;
/// Longest packet a block can carry (the largest message on the wire).
pub const MAX_PACKET_LEN: usize = MAX_MESSAGE_LEN;
/// Bytes of the length prefix in a framed shard.
const LENGTH_PREFIX: usize = 2;

/// A block's shape: `originals` packets (k) and at most `parity_capacity` parity shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCode {
    originals: u16,
    parity_capacity: u16,
}

impl BlockCode {
    /// Checks the shape against the limits and against what the codec supports.
    pub fn new(originals: usize, parity_capacity: usize) -> Result<Self, FecError> {
        if originals == 0 {
            return Err(FecError::EmptyBlock);
        }
        if originals > MAX_ORIGINALS {
            return Err(FecError::TooManyOriginals { originals, max: MAX_ORIGINALS });
        }
        if parity_capacity == 0 || parity_capacity > MAX_PARITY {
            return Err(FecError::BadParityCapacity { parity_capacity, max: MAX_PARITY });
        }
        // Single-packet blocks are repeated, not coded (see `encode_block`).
        if originals > 1 && !rs::ReedSolomonEncoder::supports(originals, parity_capacity) {
            return Err(FecError::Unsupported { originals, parity_capacity });
        }
        Ok(BlockCode { originals: originals as u16, parity_capacity: parity_capacity as u16 })
    }

    /// k: original packets in the block.
    pub fn originals(&self) -> usize {
        self.originals as usize
    }

    pub fn parity_capacity(&self) -> usize {
        self.parity_capacity as usize
    }

    /// Shards of any kind the block can have.
    pub fn shards(&self) -> usize {
        self.originals() + self.parity_capacity()
    }

    /// Checks that `index` names a shard of this code.
    pub fn check_index(&self, index: ShardIndex) -> Result<(), FecError> {
        let (value, limit) = match index {
            ShardIndex::Original(i) => (i, self.originals()),
            ShardIndex::Parity(i) => (i, self.parity_capacity()),
        };
        if usize::from(value) >= limit {
            return Err(FecError::IndexOutOfRange { index, limit });
        }
        Ok(())
    }
}

/// Which shard of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ShardIndex {
    /// Original packet i (0..k), framed.
    Original(u16),
    /// Parity shard i (0..parity capacity).
    Parity(u16),
}

/// Why a block could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FecError {
    #[error("a block needs at least one original packet")]
    EmptyBlock,
    #[error("{originals} original packets in one block, more than the limit of {max}")]
    TooManyOriginals { originals: usize, max: usize },
    #[error("parity capacity {parity_capacity} is not between 1 and {max}")]
    BadParityCapacity { parity_capacity: usize, max: usize },
    #[error("the codec does not support {originals} originals with {parity_capacity} parity shards")]
    Unsupported { originals: usize, parity_capacity: usize },
    #[error("expected {expected} original packets, got {got}")]
    WrongOriginalCount { expected: usize, got: usize },
    #[error("asked for parity shards {first}..{end}, beyond the capacity of {capacity}")]
    ParityBeyondCapacity { first: usize, end: usize, capacity: usize },
    #[error("a packet of {len} bytes is longer than the limit of {max}")]
    PacketTooLong { len: usize, max: usize },
    #[error("shard {index:?} is out of range (limit {limit})")]
    IndexOutOfRange { index: ShardIndex, limit: usize },
    #[error("shard {index:?} has {got} bytes, not the block's {expected}")]
    WrongShardLength { index: ShardIndex, expected: usize, got: usize },
    #[error("shard length {0} is not an even number between 2 and the largest framed packet")]
    BadShardLength(usize),
    #[error("shard {0:?} given twice")]
    DuplicateShard(ShardIndex),
    #[error("{have} distinct shards, {need} needed to decode")]
    NotEnoughShards { have: usize, need: usize },
    #[error("shard {0:?} does not frame a packet (bad length prefix or non-zero padding)")]
    BadFraming(ShardIndex),
    #[error("the Reed-Solomon codec failed: {0}")]
    Codec(String),
}

impl From<rs::Error> for FecError {
    fn from(error: rs::Error) -> Self {
        FecError::Codec(error.to_string())
    }
}

/// The shard length that frames packets of at most `longest` bytes.
pub fn shard_len_for(longest: usize) -> Result<usize, FecError> {
    if longest > MAX_PACKET_LEN {
        return Err(FecError::PacketTooLong { len: longest, max: MAX_PACKET_LEN });
    }
    let framed = LENGTH_PREFIX + longest;
    Ok(framed + framed % 2)
}

/// Whether `shard_len` can be a block's shard length.
fn check_shard_len(shard_len: usize) -> Result<(), FecError> {
    let largest = shard_len_for(MAX_PACKET_LEN)?;
    if shard_len < LENGTH_PREFIX || shard_len % 2 != 0 || shard_len > largest {
        return Err(FecError::BadShardLength(shard_len));
    }
    Ok(())
}

/// `packet` framed into a shard of `shard_len` bytes (`shard_len` from [`shard_len_for`]).
fn frame(packet: &[u8], shard_len: usize) -> Vec<u8> {
    let mut shard = Vec::with_capacity(shard_len);
    shard.extend_from_slice(&(packet.len() as u16).to_be_bytes());
    shard.extend_from_slice(packet);
    shard.resize(shard_len, 0);
    shard
}

/// The packet a framed shard holds, checking the prefix and that the padding is all zeros
/// (so each packet has exactly one framing).
fn unframe(shard: &[u8], index: ShardIndex) -> Result<&[u8], FecError> {
    let (prefix, rest) = shard.split_first_chunk::<LENGTH_PREFIX>().ok_or(FecError::BadFraming(index))?;
    let len = usize::from(u16::from_be_bytes(*prefix));
    if len > rest.len() || rest[len..].iter().any(|&b| b != 0) {
        return Err(FecError::BadFraming(index));
    }
    Ok(&rest[..len])
}

/// A block's shards as the server keeps them: framed originals and every parity shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedBlock {
    pub code: BlockCode,
    pub shard_len: usize,
    /// The parity shards, index i at position i (the whole capacity).
    pub parity: Vec<Vec<u8>>,
}

impl EncodedBlock {
    /// Parity shards `first..first + count` (fresh shards for a repair round).
    pub fn parity_range(&self, first: usize, count: usize) -> Result<&[Vec<u8>], FecError> {
        let end = first.saturating_add(count);
        self.parity.get(first..end).ok_or(FecError::ParityBeyondCapacity { first, end, capacity: self.parity.len() })
    }
}

/// Encodes `packets` (exactly k, any lengths up to [`MAX_PACKET_LEN`]) into the code's whole
/// parity capacity.
pub fn encode_block<P: AsRef<[u8]>>(code: BlockCode, packets: &[P]) -> Result<EncodedBlock, FecError> {
    if packets.len() != code.originals() {
        return Err(FecError::WrongOriginalCount { expected: code.originals(), got: packets.len() });
    }
    let longest = packets.iter().map(|p| p.as_ref().len()).max().unwrap_or(0);
    let shard_len = shard_len_for(longest)?;
    let framed: Vec<Vec<u8>> = packets.iter().map(|p| frame(p.as_ref(), shard_len)).collect();
    let parity = if code.originals() == 1 {
        // The codec wants two originals at least in some shapes; one packet's parity is itself.
        vec![framed[0].clone(); code.parity_capacity()]
    } else {
        rs::encode(code.originals(), code.parity_capacity(), &framed)?
    };
    Ok(EncodedBlock { code, shard_len, parity })
}

/// One received shard: framed if parity, the bare packet if original.
#[derive(Clone, Copy, Debug)]
pub struct Shard<'a> {
    pub index: ShardIndex,
    pub bytes: &'a [u8],
}

/// The k original packets of a block, from any k distinct shards (more are ignored).
/// Originals are given as bare packets, parity shards as received (`shard_len` bytes each).
pub fn decode_block(code: BlockCode, shard_len: usize, shards: &[Shard<'_>]) -> Result<Vec<Vec<u8>>, FecError> {
    check_shard_len(shard_len)?;
    let k = code.originals();
    let mut originals: Vec<Option<Vec<u8>>> = vec![None; k];
    let mut parity: Vec<(usize, &[u8])> = Vec::new();
    let mut seen_parity = std::collections::BTreeSet::new();
    for shard in shards {
        code.check_index(shard.index)?;
        match shard.index {
            ShardIndex::Original(i) => {
                let slot = &mut originals[usize::from(i)];
                if slot.is_some() {
                    return Err(FecError::DuplicateShard(shard.index));
                }
                if shard.bytes.len() + LENGTH_PREFIX > shard_len {
                    return Err(FecError::WrongShardLength { index: shard.index, expected: shard_len, got: shard.bytes.len() });
                }
                *slot = Some(frame(shard.bytes, shard_len));
            }
            ShardIndex::Parity(i) => {
                if shard.bytes.len() != shard_len {
                    return Err(FecError::WrongShardLength { index: shard.index, expected: shard_len, got: shard.bytes.len() });
                }
                if !seen_parity.insert(i) {
                    return Err(FecError::DuplicateShard(shard.index));
                }
                parity.push((usize::from(i), shard.bytes));
            }
        }
    }
    let present = originals.iter().filter(|o| o.is_some()).count();
    let have = present + parity.len();
    if have < k {
        return Err(FecError::NotEnoughShards { have, need: k });
    }
    if present < k {
        restore_missing(code, &mut originals, &parity)?;
    }
    originals
        .into_iter()
        .enumerate()
        .map(|(i, framed)| {
            let index = ShardIndex::Original(i as u16);
            let framed = framed.ok_or(FecError::NotEnoughShards { have, need: k })?;
            unframe(&framed, index).map(<[u8]>::to_vec)
        })
        .collect()
}

/// Fills the missing framed originals from the parity shards (at least enough are present).
fn restore_missing(code: BlockCode, originals: &mut [Option<Vec<u8>>], parity: &[(usize, &[u8])]) -> Result<(), FecError> {
    if code.originals() == 1 {
        // Single-packet blocks: every parity shard is the framed packet.
        originals[0] = Some(parity[0].1.to_vec());
        return Ok(());
    }
    // Only as many parity shards as originals missing: the codec needs no more.
    let missing = originals.iter().filter(|o| o.is_none()).count();
    let given: Vec<(usize, &[u8])> = originals.iter().enumerate().filter_map(|(i, o)| Some((i, o.as_deref()?))).collect();
    let restored = rs::decode(code.originals(), code.parity_capacity(), given, parity.iter().take(missing).copied())?;
    for (i, framed) in restored {
        if let Some(slot) = originals.get_mut(i) {
            *slot = Some(framed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn packets(k: usize) -> Vec<Vec<u8>> {
        (0..k).map(|i| (0..(100 + 37 * i)).map(|b| (b * 7 + i) as u8).collect()).collect()
    }

    fn parity_shard(block: &EncodedBlock, i: usize) -> Shard<'_> {
        Shard { index: ShardIndex::Parity(i as u16), bytes: &block.parity[i] }
    }

    #[test]
    fn decodes_from_parity_alone() {
        let originals = packets(10);
        let code = BlockCode::new(10, 10).unwrap();
        let block = encode_block(code, &originals).unwrap();
        let shards: Vec<Shard> = (0..10).map(|i| parity_shard(&block, i)).collect();
        assert_eq!(decode_block(code, block.shard_len, &shards).unwrap(), originals);
    }

    #[test]
    fn single_packet_blocks_decode_from_any_parity() {
        let originals = packets(1);
        let code = BlockCode::new(1, 3).unwrap();
        let block = encode_block(code, &originals).unwrap();
        assert_eq!(decode_block(code, block.shard_len, &[parity_shard(&block, 2)]).unwrap(), originals);
    }

    #[test]
    fn hostile_shards_are_typed_errors() {
        let originals = packets(4);
        let code = BlockCode::new(4, 4).unwrap();
        let block = encode_block(code, &originals).unwrap();
        let len = block.shard_len;
        let p = |i: u16| Shard { index: ShardIndex::Parity(i), bytes: &block.parity[usize::from(i) % 4] };
        let o = |i: u16| Shard { index: ShardIndex::Original(i), bytes: &originals[usize::from(i) % 4] };
        assert_eq!(decode_block(code, len, &[p(0), p(1), p(2)]), Err(FecError::NotEnoughShards { have: 3, need: 4 }));
        assert!(matches!(decode_block(code, len, &[p(0), p(1), p(2), p(9)]), Err(FecError::IndexOutOfRange { .. })));
        assert!(matches!(decode_block(code, len, &[o(4), p(1), p(2), p(3)]), Err(FecError::IndexOutOfRange { .. })));
        assert_eq!(decode_block(code, len, &[p(0), p(0), p(1), p(2)]), Err(FecError::DuplicateShard(ShardIndex::Parity(0))));
        assert_eq!(decode_block(code, len, &[o(1), o(1), p(1), p(2)]), Err(FecError::DuplicateShard(ShardIndex::Original(1))));
        let short = Shard { index: ShardIndex::Parity(3), bytes: &block.parity[3][1..] };
        assert!(matches!(decode_block(code, len, &[p(0), p(1), p(2), short]), Err(FecError::WrongShardLength { .. })));
        assert_eq!(decode_block(code, 3, &[p(0)]), Err(FecError::BadShardLength(3)));
        assert_eq!(decode_block(code, 1 << 20, &[p(0)]), Err(FecError::BadShardLength(1 << 20)));
        let long = vec![0u8; MAX_PACKET_LEN + 1];
        assert!(matches!(encode_block(code, &[&long[..], &[], &[], &[]]), Err(FecError::PacketTooLong { .. })));
        assert!(matches!(encode_block(code, &originals[..3]), Err(FecError::WrongOriginalCount { .. })));
        assert_eq!(BlockCode::new(0, 1), Err(FecError::EmptyBlock));
        assert!(BlockCode::new(MAX_ORIGINALS + 1, 1).is_err() && BlockCode::new(4, 0).is_err());
        assert!(block.parity_range(3, 2).is_err() && block.parity_range(usize::MAX, 2).is_err());
    }

    #[test]
    fn a_corrupted_length_prefix_is_a_framing_error_not_a_panic() {
        let originals = packets(2);
        let code = BlockCode::new(2, 2).unwrap();
        let mut block = encode_block(code, &originals).unwrap();
        for shard in &mut block.parity {
            shard[0] = 0xff;
        }
        let shards = [parity_shard(&block, 0), parity_shard(&block, 1)];
        assert!(matches!(decode_block(code, block.shard_len, &shards), Err(FecError::BadFraming(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any k of the k + m shards give back the originals, byte for byte.
        #[test]
        fn any_k_of_k_plus_m_shards_decode(
            lens in prop::collection::vec(0usize..300, 1..12),
            m in 1usize..12,
            order in any::<prop::sample::Index>(),
            seed in any::<u8>(),
        ) {
            let k = lens.len();
            let originals: Vec<Vec<u8>> = lens.iter().enumerate().map(|(i, &n)| (0..n).map(|b| (b as u8) ^ seed ^ (i as u8)).collect()).collect();
            let code = BlockCode::new(k, m).unwrap();
            let block = encode_block(code, &originals).unwrap();
            let mut all: Vec<Shard> = (0..k).map(|i| Shard { index: ShardIndex::Original(i as u16), bytes: &originals[i] }).collect();
            all.extend((0..m).map(|i| parity_shard(&block, i)));
            // A pseudo-random rotation and stride picks k distinct shards.
            let n = all.len();
            let start = order.index(n);
            let stride = (1..n).rev().find(|s| gcd(*s, n) == 1).unwrap_or(1);
            let chosen: Vec<Shard> = (0..k).map(|j| all[(start + j * stride) % n]).collect();
            prop_assert_eq!(decode_block(code, block.shard_len, &chosen).unwrap(), originals);
        }
    }

    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
}
