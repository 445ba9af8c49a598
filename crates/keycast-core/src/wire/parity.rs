//! Parity packets of a rekey: the Reed-Solomon parity shards of its FEC blocks (the shard
//! bytes come from `delivery::fec`), sent with the rekey (round 1, proactive) and as repairs
//! (rounds 2 and on). Each round's parity packets are signed like rekey packets, in blocks of
//! 2^block_bits with a hash tree, under a domain of their own: a member verifies each parity
//! packet alone before it uses its shard, so forged parity cannot poison a decode.

use super::auth::{self, Node, Signature, Signer, VerifiedRoots, NODE_LEN, PARITY_ROOT_DOMAIN, SIGNATURE_LEN};
use super::codec::Writer;
use super::guard::Reject;
use super::rekey::{PacketiseError, MAX_BLOCK_BITS};
use super::{open, start, DecodeError, GroupId, MessageType, VerifyingKey};

/// Bytes before the shard: version, type, group, seq, round, FEC block, first packet, originals, capacity,
/// parity index, index, count, block bits, shard length.
pub const PARITY_HEADER_LEN: usize = 2 + 8 + 8 + 1 + 4 + 4 + 2 + 2 + 2 + 4 + 4 + 1 + 2;

/// Which shard a parity packet carries, and its place among its round's packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParityHeader {
    pub group: GroupId,
    /// The rekey whose packets this shard repairs.
    pub seq: u64,
    /// 1: sent with the rekey; 2 and on: a repair answering NAKs.
    pub round: u8,
    /// The FEC block's number, and the index of its first rekey packet: it covers packets
    /// `first .. first + originals`.
    pub fec_block: u32,
    pub first: u32,
    /// Packets in this FEC block (k; the last block may hold fewer).
    pub originals: u16,
    /// Parity shards the block's code can make: sender and receiver need the same code.
    pub capacity: u16,
    /// This shard's index among the block's parity shards (below `capacity`).
    pub parity_index: u16,
    /// This packet's place among the round's parity packets, signed in blocks of 2^block_bits.
    pub index: u32,
    pub count: u32,
    pub block_bits: u8,
}

/// One parity packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParityPacket {
    pub header: ParityHeader,
    pub shard: Vec<u8>,
    pub signature: Signature,
    pub path: Vec<Node>,
}

/// A parity shard to send: which block and shard it is, and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParityShard {
    pub fec_block: u32,
    pub first: u32,
    pub originals: u16,
    pub capacity: u16,
    pub parity_index: u16,
    pub shard: Vec<u8>,
}

impl ParityPacket {
    fn put_body(header: &ParityHeader, shard: &[u8], out: &mut Vec<u8>) {
        out.put_u64(header.group.0);
        out.put_u64(header.seq);
        out.put_u8(header.round);
        out.put_u32(header.fec_block);
        out.put_u32(header.first);
        out.put_u16(header.originals);
        out.put_u16(header.capacity);
        out.put_u16(header.parity_index);
        out.put_u32(header.index);
        out.put_u32(header.count);
        out.put_u8(header.block_bits);
        out.put_u16(shard.len() as u16);
        out.extend_from_slice(shard);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = start(MessageType::RekeyParity, PARITY_HEADER_LEN + self.shard.len() + SIGNATURE_LEN + NODE_LEN * self.path.len());
        ParityPacket::put_body(&self.header, &self.shard, &mut out);
        out.extend_from_slice(&self.signature);
        self.path.iter().for_each(|node| out.extend_from_slice(node));
        out
    }

    /// Decodes without checking the signature; see [`ParityPacket::verify`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = open(bytes, MessageType::RekeyParity)?;
        let header = ParityHeader {
            group: r.group()?,
            seq: r.u64("rekey seq")?,
            round: r.u8("round")?,
            fec_block: r.u32("FEC block")?,
            first: r.u32("first packet")?,
            originals: r.u16("originals")?,
            capacity: r.u16("parity capacity")?,
            parity_index: r.u16("parity index")?,
            index: r.u32("packet index")?,
            count: r.u32("packet count")?,
            block_bits: r.u8("block bits")?,
        };
        let bad = |field: &'static str, value: u64| Err(DecodeError::BadValue { field, value });
        if header.round == 0 {
            return bad("round", 0);
        }
        if header.originals == 0 || header.capacity == 0 {
            return bad("FEC block shape", u64::from(header.originals.min(header.capacity)));
        }
        if header.parity_index >= header.capacity {
            return bad("parity index", header.parity_index.into());
        }
        if header.count == 0 || header.index >= header.count {
            return bad("packet index", header.index.into());
        }
        if header.block_bits > MAX_BLOCK_BITS {
            return bad("block bits", header.block_bits.into());
        }
        let len = r.count(2, u16::MAX as usize, 1, "shard")?;
        let shard = r.take(len, "shard")?.to_vec();
        let (signature, path) = auth::read_signature_and_path(r, (header.index, header.count, header.block_bits))?;
        Ok(ParityPacket { header, shard, signature, path })
    }

    /// Decodes `bytes` and checks that its path leads to a parity root `signer` signed.
    pub fn verify(bytes: &[u8], signer: &VerifyingKey) -> Result<Self, Reject> {
        ParityPacket::decode(bytes)?.verified(bytes, signer, &mut VerifiedRoots::default())
    }

    /// This packet, which must be `ParityPacket::decode(bytes)`, if its path leads to a parity
    /// root `signer` signed.
    pub(crate) fn verified(self, bytes: &[u8], signer: &VerifyingKey, roots: &mut VerifiedRoots) -> Result<Self, Reject> {
        let ParityHeader { index, count, block_bits, .. } = self.header;
        let body = auth::signed_body(bytes, self.path.len()).ok_or(Reject::BadSignature)?;
        let proof = (&self.signature, &self.path[..]);
        if !auth::verify_in_block(body, (index, count, block_bits), proof, (PARITY_ROOT_DOMAIN, signer), roots) {
            return Err(Reject::BadSignature);
        }
        Ok(self)
    }
}

/// Which rekey and round these parity packets belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParityRound {
    pub group: GroupId,
    pub seq: u64,
    pub round: u8,
    pub block_bits: u8,
}

/// One round's parity packets, signed.
pub fn encode_parity(round: ParityRound, shards: &[ParityShard], signer: &Signer) -> Result<Vec<Vec<u8>>, PacketiseError> {
    if round.block_bits > MAX_BLOCK_BITS {
        return Err(PacketiseError::BlockBits(round.block_bits));
    }
    let count = u32::try_from(shards.len()).map_err(|_| PacketiseError::TooManyPackets(shards.len()))?;
    let mut packets: Vec<Vec<u8>> = shards
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let header = ParityHeader {
                group: round.group,
                seq: round.seq,
                round: round.round,
                fec_block: s.fec_block,
                first: s.first,
                originals: s.originals,
                capacity: s.capacity,
                parity_index: s.parity_index,
                index: i as u32,
                count,
                block_bits: round.block_bits,
            };
            let mut out = start(MessageType::RekeyParity, PARITY_HEADER_LEN + s.shard.len() + SIGNATURE_LEN + NODE_LEN * round.block_bits as usize);
            ParityPacket::put_body(&header, &s.shard, &mut out);
            out
        })
        .collect();
    auth::sign_in_blocks(&mut packets, round.block_bits, PARITY_ROOT_DOMAIN, signer);
    Ok(packets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(n: usize) -> Vec<ParityShard> {
        (0..n).map(|i| ParityShard { fec_block: (i / 3) as u32, first: (i / 3) as u32 * 10, originals: 10, capacity: 30, parity_index: (i % 3) as u16, shard: vec![i as u8; 100 + 2 * i] }).collect()
    }

    #[test]
    fn every_parity_packet_verifies_alone_and_decodes_to_what_was_sent() {
        let signer = Signer::from_seed(&[5; 32]);
        let round = ParityRound { group: GroupId(3), seq: 9, round: 1, block_bits: 2 };
        let sent = shards(11);
        let packets = encode_parity(round, &sent, &signer).unwrap();
        for (i, bytes) in packets.iter().enumerate() {
            let packet = ParityPacket::verify(bytes, &signer.verifying_key()).unwrap();
            assert_eq!((packet.header.index, packet.header.count, packet.header.round), (i as u32, 11, 1));
            assert_eq!((packet.header.fec_block, packet.header.parity_index), (sent[i].fec_block, sent[i].parity_index));
            assert_eq!(packet.shard, sent[i].shard);
            assert_eq!(&packet.encode(), bytes, "one encoding");
        }
    }

    #[test]
    fn a_changed_byte_or_another_signer_is_refused() {
        let signer = Signer::from_seed(&[5; 32]);
        let packets = encode_parity(ParityRound { group: GroupId(3), seq: 9, round: 2, block_bits: 6 }, &shards(4), &signer).unwrap();
        let other = Signer::from_seed(&[6; 32]).verifying_key();
        assert!(ParityPacket::verify(&packets[0], &other).is_err());
        for at in 2..packets[1].len() {
            let mut forged = packets[1].clone();
            forged[at] ^= 0x40;
            assert!(ParityPacket::verify(&forged, &signer.verifying_key()).is_err(), "byte {at} changed and still verified");
        }
    }

    #[test]
    fn malformed_headers_have_typed_errors() {
        let signer = Signer::from_seed(&[5; 32]);
        let packet = encode_parity(ParityRound { group: GroupId(3), seq: 9, round: 1, block_bits: 6 }, &shards(1), &signer).unwrap().remove(0);
        let with = |at: usize, value: u8| {
            let mut bytes = packet.clone();
            bytes[at] = value;
            ParityPacket::decode(&bytes)
        };
        // Offsets: 2 version/type, 8 group, 8 seq, then round.
        assert_eq!(with(18, 0), Err(DecodeError::BadValue { field: "round", value: 0 }));
        // Then the FEC block (4), first packet (4), originals (2), capacity (2, here 30),
        // parity index (2).
        assert!(matches!(with(30, 0), Err(DecodeError::BadValue { field: "FEC block shape", .. })), "capacity 0");
        assert!(matches!(with(32, 200), Err(DecodeError::BadValue { field: "parity index", .. })), "index 200 of 30");
        assert!(ParityPacket::decode(&packet[..packet.len() - 1]).is_err());
        assert!(ParityPacket::decode(&[packet.clone(), vec![0]].concat()).is_err());
    }
}
