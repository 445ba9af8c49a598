//! Rekey packets: a rekey plan split into packets of at most one MTU, placed so that each
//! member finds all its entries in as few packets as possible, and authenticated in blocks:
//! one signature over the hash-tree root of each block of 2^block_bits packets, and in every
//! packet that signature and the packet's path, so a member verifies its packet alone.

use rayon::prelude::*;

use crate::graph::RekeyPlan;
use crate::key::KeyRef;
use crate::strategy::RekeyMessage;
use crate::wrap::{NonceSalt, Wrap, SALT_LEN};

use super::auth::{self, Node, Signature, Signer, VerifiedRoots, NODE_LEN, REKEY_ROOT_DOMAIN, SIGNATURE_LEN};
use super::codec::{Writer, MIN_WRAP_LEN};
use super::guard::Reject;
use super::placement::{place, Layout};
pub use super::placement::Placement;
use super::{open, start, DecodeError, GroupId, MessageType, VerifyingKey, DEFAULT_MTU};

/// Bytes before the entries: version, type, group, epoch, seq, activation, group key ref,
/// nonce salt, index, count, block bits, entry count.
pub const HEADER_LEN: usize = 2 + 8 + 8 + 8 + 8 + KeyRef::ENCODED_LEN + SALT_LEN + 4 + 4 + 1 + 2;
/// Largest signing block: 2^10 packets.
pub const MAX_BLOCK_BITS: u8 = 10;
/// Default signing block: 64 packets, a 6-node path (96 bytes) per packet.
pub const DEFAULT_BLOCK_BITS: u8 = 6;
/// Largest entry (a flat replacement: wrapped ref, kind, two refs, sealed key).
const MAX_WRAP_LEN: usize = MIN_WRAP_LEN + KeyRef::ENCODED_LEN;

/// The fields every packet of one rekey shares, and this packet's place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RekeyHeader {
    pub group: GroupId,
    /// The epoch whose changes this rekey carries.
    pub epoch: u64,
    /// Rekey sequence number (1, 2, ... per group).
    pub seq: u64,
    /// The epoch in which the new group key comes into force.
    pub activation: u64,
    pub group_key: KeyRef,
    /// The rekey's nonce salt: each wrap's nonce is its wrapped ref XOR this.
    pub salt: NonceSalt,
    pub index: u32,
    pub count: u32,
    /// Packets are signed in blocks of 2^block_bits consecutive indices.
    pub block_bits: u8,
}

impl RekeyHeader {
    /// First index and size of this packet's signing block.
    pub fn block(&self) -> (u32, u32) {
        auth::signing_block(self.index, self.count, self.block_bits)
    }

    /// True if `other` belongs to the same rekey (only index differs).
    pub fn same_rekey(&self, other: &RekeyHeader) -> bool {
        RekeyHeader { index: other.index, ..*self } == *other
    }
}

/// One packet of a rekey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RekeyPacket {
    pub header: RekeyHeader,
    pub wraps: Vec<Wrap>,
    pub signature: Signature,
    /// Sibling nodes from this packet's leaf to its block's root.
    pub path: Vec<Node>,
}

impl RekeyPacket {
    fn put_body<'w>(header: &RekeyHeader, wraps: impl ExactSizeIterator<Item = &'w Wrap>, out: &mut Vec<u8>) {
        out.put_u64(header.group.0);
        out.put_u64(header.epoch);
        out.put_u64(header.seq);
        out.put_u64(header.activation);
        out.put_ref(header.group_key);
        out.extend_from_slice(&header.salt);
        out.put_u32(header.index);
        out.put_u32(header.count);
        out.put_u8(header.block_bits);
        out.put_u16(wraps.len() as u16);
        for w in wraps {
            out.put_wrap(w);
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = start(MessageType::Rekey, DEFAULT_MTU);
        RekeyPacket::put_body(&self.header, self.wraps.iter(), &mut out);
        out.extend_from_slice(&self.signature);
        for node in &self.path {
            out.extend_from_slice(node);
        }
        out
    }

    /// Decodes without checking the signature; see [`RekeyPacket::verify`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = open(bytes, MessageType::Rekey)?;
        let header = RekeyHeader {
            group: r.group()?,
            epoch: r.u64("epoch")?,
            seq: r.u64("rekey seq")?,
            activation: r.u64("activation epoch")?,
            group_key: r.key_ref("group key")?,
            salt: r.array("nonce salt")?,
            index: r.u32("packet index")?,
            count: r.u32("packet count")?,
            block_bits: r.u8("block bits")?,
        };
        if header.count == 0 || header.index >= header.count {
            return Err(DecodeError::BadValue { field: "packet index", value: header.index.into() });
        }
        if header.block_bits > MAX_BLOCK_BITS {
            return Err(DecodeError::BadValue { field: "block bits", value: header.block_bits.into() });
        }
        let count = r.count(2, u16::MAX as usize, MIN_WRAP_LEN, "entries")?;
        let mut wraps = Vec::with_capacity(count);
        for _ in 0..count {
            wraps.push(r.wrap(&header.salt)?);
        }
        let (signature, path) = auth::read_signature_and_path(r, (header.index, header.count, header.block_bits))?;
        Ok(RekeyPacket { header, wraps, signature, path })
    }

    /// Decodes `bytes` and checks that its path leads to a root `signer` signed.
    pub fn verify(bytes: &[u8], signer: &VerifyingKey) -> Result<Self, Reject> {
        RekeyPacket::verify_cached(bytes, signer, &mut VerifiedRoots::default())
    }

    /// [`RekeyPacket::verify`], checking the signature only if `roots` lacks the packet's root.
    pub fn verify_cached(bytes: &[u8], signer: &VerifyingKey, roots: &mut VerifiedRoots) -> Result<Self, Reject> {
        RekeyPacket::decode(bytes)?.verified(bytes, signer, roots)
    }

    /// This packet, which must be `RekeyPacket::decode(bytes)`, if its path leads to a root
    /// `signer` signed (a member decodes first to pass over packets it has no use for).
    pub(crate) fn verified(self, bytes: &[u8], signer: &VerifyingKey, roots: &mut VerifiedRoots) -> Result<Self, Reject> {
        let RekeyHeader { index, count, block_bits, .. } = self.header;
        let body = auth::signed_body(bytes, self.path.len()).ok_or(Reject::BadSignature)?;
        let proof = (&self.signature, &self.path[..]);
        if !auth::verify_in_block(body, (index, count, block_bits), proof, (REKEY_ROOT_DOMAIN, signer), roots) {
            return Err(Reject::BadSignature);
        }
        Ok(self)
    }

    /// This packet's entries as a rekey message for [`crate::MemberKeys::apply`].
    pub fn message(&self) -> RekeyMessage<'_> {
        RekeyMessage { group_key: self.header.group_key, wraps: self.wraps.iter().collect() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketConfig {
    /// Most bytes of one packet.
    pub mtu: usize,
    pub block_bits: u8,
    pub placement: Placement,
    pub fec: FecConfig,
}

impl Default for PacketConfig {
    fn default() -> Self {
        PacketConfig { mtu: DEFAULT_MTU, block_bits: DEFAULT_BLOCK_BITS, placement: Placement::default(), fec: FecConfig::default() }
    }
}

/// Proactive FEC (Zhang, Lam, Lee and Yang): a rekey's packets in blocks of `block` (k), and
/// with each block ceil(rho · k) − k Reed-Solomon parity packets, rho = `proactivity_pct` / 100.
/// A member that lost some packets of a block rebuilds them from any k of its shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FecConfig {
    pub block: u16,
    /// Where rho starts. 100: no parity until NAKs raise it; 160: 60% more packets.
    pub proactivity_pct: u16,
    /// NAKs per rekey that rho adapts toward (Zhang et al. use 20).
    pub target_naks: u16,
    /// The most rho may rise to, in percent: 100 pins it at 1 (no proactive parity: repairs
    /// answer NAKs alone).
    pub max_proactivity_pct: u16,
}

/// Largest FEC block, and the most proactivity a group may configure.
pub const MAX_FEC_BLOCK: u16 = 256;
pub const MAX_PROACTIVITY_PCT: u16 = 400;

impl Default for FecConfig {
    fn default() -> Self {
        FecConfig { block: 10, proactivity_pct: 100, target_naks: 20, max_proactivity_pct: MAX_PROACTIVITY_PCT }
    }
}

impl FecConfig {
    /// Parity packets for a block of `originals` packets.
    pub fn parity_for(&self, originals: usize) -> usize {
        (originals * usize::from(self.proactivity_pct)).div_ceil(100).saturating_sub(originals)
    }
}

impl PacketConfig {
    /// Whether packets of this shape can carry any rekey (checked before a batch changes keys).
    pub fn check(&self) -> Result<(), PacketiseError> {
        let FecConfig { block, proactivity_pct, max_proactivity_pct, .. } = self.fec;
        if !(1..=MAX_FEC_BLOCK).contains(&block) || !(100..=MAX_PROACTIVITY_PCT).contains(&max_proactivity_pct) || !(100..=max_proactivity_pct).contains(&proactivity_pct) {
            return Err(PacketiseError::Fec { block, proactivity_pct, max_proactivity_pct });
        }
        if self.block_bits > MAX_BLOCK_BITS {
            return Err(PacketiseError::BlockBits(self.block_bits));
        }
        let needed = HEADER_LEN + SIGNATURE_LEN + self.block_bits as usize * NODE_LEN + MAX_WRAP_LEN;
        if self.mtu < needed {
            return Err(PacketiseError::MtuTooSmall { mtu: self.mtu, needed });
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketiseError {
    #[error("an MTU of {mtu} bytes cannot hold one entry with its header and signature ({needed} bytes)")]
    MtuTooSmall { mtu: usize, needed: usize },
    #[error("block bits must be at most {MAX_BLOCK_BITS}, not {0}")]
    BlockBits(u8),
    #[error("a rekey of {0} packets is more than a packet index can number")]
    TooManyPackets(usize),
    #[error("FEC blocks of {block} packets with {proactivity_pct}% proactivity, at most {max_proactivity_pct}%: blocks hold 1 to {MAX_FEC_BLOCK} packets, proactivity is 100% (no parity) to its maximum, at most {MAX_PROACTIVITY_PCT}%")]
    Fec { block: u16, proactivity_pct: u16, max_proactivity_pct: u16 },
}

/// Which rekey these packets carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RekeyContext {
    pub group: GroupId,
    pub epoch: u64,
    pub seq: u64,
    pub activation: u64,
}

/// Sizes of an encoded rekey.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RekeyWireStats {
    pub packets: usize,
    pub bytes: usize,
    /// Signature and path bytes.
    pub auth_bytes: usize,
    pub signatures: usize,
    /// Wraps placed, counting repeats.
    pub entries: usize,
}

pub struct EncodedRekey {
    pub packets: Vec<Vec<u8>>,
    pub stats: RekeyWireStats,
}

/// Splits `plan` into signed packets.
pub fn encode_rekey(
    plan: &RekeyPlan,
    context: RekeyContext,
    config: PacketConfig,
    signer: &Signer,
) -> Result<EncodedRekey, PacketiseError> {
    config.check()?;
    let auth_len = SIGNATURE_LEN + config.block_bits as usize * NODE_LEN;
    let block = 1usize << config.block_bits;
    let layout = place(plan, config.placement, config.mtu - HEADER_LEN - auth_len, block);
    let count = u32::try_from(layout.len()).map_err(|_| PacketiseError::TooManyPackets(layout.len()))?;
    let header = RekeyHeader {
        group: context.group,
        epoch: context.epoch,
        seq: context.seq,
        activation: context.activation,
        group_key: plan.group_key,
        salt: plan.salt,
        index: 0,
        count,
        block_bits: config.block_bits,
    };
    let blocks = layout.len().div_ceil(block);
    let encode = |b: usize| BlockEncoder { plan, layout: &layout, header, signer }.encode(b * block..((b + 1) * block).min(layout.len()));
    // Small rekeys (a single leave) stay on this thread: waking the pool costs more.
    let (packets, unsigned) = if blocks <= 1 {
        encode(0)
    } else {
        let parts: Vec<(Vec<Vec<u8>>, usize)> = (0..blocks).into_par_iter().map(encode).collect();
        let unsigned = parts.iter().map(|(_, bodies)| bodies).sum();
        (parts.into_iter().flat_map(|(packets, _)| packets).collect(), unsigned)
    };
    let bytes: usize = packets.iter().map(Vec::len).sum();
    let stats = RekeyWireStats { packets: packets.len(), bytes, auth_bytes: bytes - unsigned, signatures: blocks, entries: layout.entries() };
    Ok(EncodedRekey { packets, stats })
}

/// Encodes, hashes and signs one block of packets.
struct BlockEncoder<'a> {
    plan: &'a RekeyPlan,
    layout: &'a Layout,
    header: RekeyHeader,
    signer: &'a Signer,
}

impl BlockEncoder<'_> {
    /// The block's packets and the bytes of their bodies.
    fn encode(&self, range: core::ops::Range<usize>) -> (Vec<Vec<u8>>, usize) {
        let size = range.len();
        let mut packets = Vec::with_capacity(size);
        let mut bodies = 0;
        for (offset, p) in range.clone().enumerate() {
            let content = self.layout.packet(p);
            let body_len = HEADER_LEN + content.iter().map(|&w| self.plan.wraps[w as usize].encoded_len()).sum::<usize>();
            let mut out = start(MessageType::Rekey, body_len + SIGNATURE_LEN + auth::path_len(offset, size) * NODE_LEN);
            let header = RekeyHeader { index: p as u32, ..self.header };
            RekeyPacket::put_body(&header, content.iter().map(|&w| &self.plan.wraps[w as usize]), &mut out);
            debug_assert_eq!(out.len(), body_len);
            bodies += body_len;
            packets.push(out);
        }
        auth::sign_in_blocks(&mut packets, self.header.block_bits, REKEY_ROOT_DOMAIN, self.signer);
        (packets, bodies)
    }
}


