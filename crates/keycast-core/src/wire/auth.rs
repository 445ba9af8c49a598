//! Authentication of multicast messages: Ed25519 signatures (aws-lc-rs, the provider used
//! everywhere else) over a hash tree of packets (Wong, Gouda and Lam section 4, one signature
//! for many messages, generalised to a Merkle tree).
//!
//! Nodes are SHA-256 truncated to 16 bytes. The signer is the trusted controller, so a forger
//! needs a second preimage of a node, not a collision: 2^128 work, the level SPHINCS+-128
//! relies on for its trees. Full 32-byte nodes would double the bytes every path costs.

use aws_lc_rs::digest::{Context, SHA256};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use super::codec::Reader;
use super::guard::Reject;
use super::DecodeError;

/// Bytes of an Ed25519 signature and public key.
pub const SIGNATURE_LEN: usize = 64;
pub const PUBLIC_KEY_LEN: usize = 32;
/// Bytes of a hash-tree node.
pub const NODE_LEN: usize = 16;

pub type Node = [u8; NODE_LEN];
pub type Signature = [u8; SIGNATURE_LEN];

const LEAF_PREFIX: u8 = 0;
const INNER_PREFIX: u8 = 1;
/// Domain of a signed rekey root; the heartbeat has its own.
pub(crate) const REKEY_ROOT_DOMAIN: &[u8] = b"keycast/v1 rekey root";
pub(crate) const HEARTBEAT_DOMAIN: &[u8] = b"keycast/v1 heartbeat";
/// Domain of a signed root of one round of a rekey's parity packets.
pub(crate) const PARITY_ROOT_DOMAIN: &[u8] = b"keycast/v2 rekey parity root";

/// The controller's signing key. Its seed stays inside aws-lc; Debug shows only the public key.
pub struct Signer {
    pair: Ed25519KeyPair,
}

impl core::fmt::Debug for Signer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Signer({:?})", self.verifying_key())
    }
}

impl Signer {
    /// A signing key from a 32-byte seed (RFC 8032 private key).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).expect("any 32 bytes are an Ed25519 seed");
        Signer { pair }
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        let mut bytes = [0u8; PUBLIC_KEY_LEN];
        bytes.copy_from_slice(self.pair.public_key().as_ref());
        VerifyingKey(bytes)
    }

    pub(crate) fn sign(&self, domain: &[u8], message: &[u8]) -> Signature {
        // A rekey root (the common case) is signed from the stack.
        let (mut stack, heap);
        let input: &[u8] = if domain.len() + message.len() <= 64 {
            stack = [0u8; 64];
            stack[..domain.len()].copy_from_slice(domain);
            stack[domain.len()..domain.len() + message.len()].copy_from_slice(message);
            &stack[..domain.len() + message.len()]
        } else {
            heap = [domain, message].concat();
            &heap
        };
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(self.pair.sign(input).as_ref());
        out
    }
}

/// The controller's public key, as members learn it at join time.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VerifyingKey(pub [u8; PUBLIC_KEY_LEN]);

impl core::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "VerifyingKey(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

impl VerifyingKey {
    pub(crate) fn verify(&self, domain: &[u8], message: &[u8], signature: &Signature) -> bool {
        let mut input = Vec::with_capacity(domain.len() + message.len());
        input.extend_from_slice(domain);
        input.extend_from_slice(message);
        UnparsedPublicKey::new(&ED25519, &self.0).verify(&input, signature).is_ok()
    }

    /// Checks a message whose last 64 bytes are `signature` over `domain` and the rest (a
    /// heartbeat or membership delta that has already decoded).
    pub(crate) fn verify_signed_message(&self, domain: &[u8], bytes: &[u8], signature: &Signature) -> Result<(), Reject> {
        match self.verify(domain, &bytes[..bytes.len() - SIGNATURE_LEN], signature) {
            true => Ok(()),
            false => Err(Reject::BadSignature),
        }
    }
}

/// The hash-tree leaf of one packet body (public for measurements of what hashing costs).
pub fn leaf_hash(body: &[u8]) -> Node {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[LEAF_PREFIX]);
    ctx.update(body);
    truncate(ctx.finish().as_ref())
}

fn inner_hash(left: &Node, right: &Node) -> Node {
    let mut ctx = Context::new(&SHA256);
    ctx.update(&[INNER_PREFIX]);
    ctx.update(left);
    ctx.update(right);
    truncate(ctx.finish().as_ref())
}

fn truncate(digest: &[u8]) -> Node {
    let mut node = [0u8; NODE_LEN];
    node.copy_from_slice(&digest[..NODE_LEN]);
    node
}

/// A hash tree over some leaves, built level by level: nodes are paired left to right and an
/// odd last node moves up unchanged (the same tree as RFC 9162's). Every level is kept,
/// bottom-up, in one list whose last node is the root.
pub(crate) struct HashTree {
    nodes: Vec<Node>,
    leaves: usize,
}

impl HashTree {
    pub(crate) fn new(leaves: Vec<Node>) -> Self {
        assert!(!leaves.is_empty(), "a tree has at least one leaf");
        let count = leaves.len();
        let mut nodes = leaves;
        nodes.reserve(count);
        let (mut start, mut len) = (0, count);
        while len > 1 {
            for i in (0..len).step_by(2) {
                let node = if i + 1 < len { inner_hash(&nodes[start + i], &nodes[start + i + 1]) } else { nodes[start + i] };
                nodes.push(node);
            }
            start += len;
            len = len.div_ceil(2);
        }
        HashTree { nodes, leaves: count }
    }

    pub(crate) fn root(&self) -> Node {
        *self.nodes.last().expect("a root")
    }

    /// The sibling nodes from leaf `index` up to the root.
    pub(crate) fn path(&self, mut index: usize) -> impl Iterator<Item = &Node> {
        let (mut start, mut len) = (0, self.leaves);
        std::iter::from_fn(move || {
            while len > 1 {
                let (sibling, level) = (index ^ 1, start);
                let present = sibling < len;
                start += len;
                len = len.div_ceil(2);
                index >>= 1;
                if present {
                    return Some(&self.nodes[level + sibling]);
                }
            }
            None
        })
    }
}

/// First index and size of the signing block of packet `index` of `count`, in blocks of
/// 2^block_bits consecutive packets (the last block may be shorter).
pub(crate) fn signing_block(index: u32, count: u32, block_bits: u8) -> (u32, u32) {
    let size = 1u32 << block_bits;
    let first = index & !(size - 1);
    (first, size.min(count - first))
}

/// Signs `packets` (bodies so far) in blocks of 2^block_bits: appends to each its block's
/// signature under `domain` and its path, so that each packet verifies alone.
pub(crate) fn sign_in_blocks(packets: &mut [Vec<u8>], block_bits: u8, domain: &[u8], signer: &Signer) {
    for block in packets.chunks_mut(1 << block_bits) {
        let tree = HashTree::new(block.iter().map(|body| leaf_hash(body)).collect());
        let signature = signer.sign(domain, &tree.root());
        for (i, packet) in block.iter_mut().enumerate() {
            packet.extend_from_slice(&signature);
            tree.path(i).for_each(|node| packet.extend_from_slice(node));
        }
    }
}

/// Signed roots already verified, so that the other packets of a signing block cost a hash
/// path instead of a signature check: a member hears every packet of a rekey, and one
/// signature covers up to 2^block_bits of them. A forged packet reaches a kept root only with
/// a second preimage of a node (see the module's note).
#[derive(Debug, Default)]
pub struct VerifiedRoots {
    signer: Option<VerifyingKey>,
    recent: std::collections::VecDeque<(&'static [u8], Node)>,
}

/// Roots kept: the signing blocks of the last rekey or two and their parity rounds.
const KEPT_ROOTS: usize = 64;

impl VerifiedRoots {
    /// Whether `signature` over `root` under `domain` is `signer`'s, from the cache when seen.
    fn verify(&mut self, domain: &'static [u8], root: Node, signature: &Signature, signer: &VerifyingKey) -> bool {
        if self.signer != Some(*signer) {
            self.recent.clear();
            self.signer = Some(*signer);
        }
        if self.recent.iter().any(|(d, r)| *d == domain && *r == root) {
            return true;
        }
        if !signer.verify(domain, &root, signature) {
            return false;
        }
        if self.recent.len() == KEPT_ROOTS {
            self.recent.pop_front();
        }
        self.recent.push_back((domain, root));
        true
    }
}

/// Whether `body` (packet `index` of `count`) with its `path` leads to a root that `signer`
/// signed under `domain` (or that `roots` holds as verified).
pub(crate) fn verify_in_block(
    body: &[u8],
    (index, count, block_bits): (u32, u32, u8),
    (signature, path): (&Signature, &[Node]),
    (domain, signer): (&'static [u8], &VerifyingKey),
    roots: &mut VerifiedRoots,
) -> bool {
    let (first, size) = signing_block(index, count, block_bits);
    root_from_path(leaf_hash(body), (index - first) as usize, size as usize, path).is_some_and(|root| roots.verify(domain, root, signature, signer))
}

/// The signed body of a packet whose `bytes` end in a signature and `path_nodes` path nodes
/// (`None` if they are too short to).
pub(crate) fn signed_body(bytes: &[u8], path_nodes: usize) -> Option<&[u8]> {
    bytes.get(..bytes.len().checked_sub(SIGNATURE_LEN + path_nodes * NODE_LEN)?)
}

/// Reads what ends every signed packet: its block's signature and the path of packet
/// `index` of `count` (blocks of 2^block_bits), which must take exactly the bytes left.
pub(crate) fn read_signature_and_path(mut r: Reader<'_>, (index, count, block_bits): (u32, u32, u8)) -> Result<(Signature, Vec<Node>), DecodeError> {
    let signature = r.array::<SIGNATURE_LEN>("signature")?;
    let (first, size) = signing_block(index, count, block_bits);
    let nodes = path_len((index - first) as usize, size as usize);
    if r.remaining() != nodes * NODE_LEN {
        return Err(DecodeError::BadValue { field: "path length", value: r.remaining() as u64 });
    }
    let path = (0..nodes).map(|_| r.array::<NODE_LEN>("path node")).collect::<Result<_, _>>()?;
    r.finish()?;
    Ok((signature, path))
}

/// Number of path nodes for leaf `index` of a tree of `size` leaves.
pub fn path_len(mut index: usize, mut size: usize) -> usize {
    let mut len = 0;
    while size > 1 {
        if index ^ 1 < size {
            len += 1;
        }
        index >>= 1;
        size = size.div_ceil(2);
    }
    len
}

/// The root implied by a leaf, its place and its path; `None` if the path has the wrong
/// length for that place.
pub(crate) fn root_from_path(leaf: Node, mut index: usize, mut size: usize, path: &[Node]) -> Option<Node> {
    if index >= size || path.len() != path_len(index, size) {
        return None;
    }
    let mut node = leaf;
    let mut siblings = path.iter();
    while size > 1 {
        if index ^ 1 < size {
            let sibling = siblings.next()?;
            node = if index & 1 == 1 { inner_hash(sibling, &node) } else { inner_hash(&node, sibling) };
        }
        index >>= 1;
        size = size.div_ceil(2);
    }
    Some(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Node> {
        (0..n).map(|i| leaf_hash(&(i as u64).to_be_bytes())).collect()
    }

    #[test]
    fn every_path_leads_to_the_root_and_no_other_place_does() {
        for size in 1..=70 {
            let leaves = leaves(size);
            let tree = HashTree::new(leaves.clone());
            let root = tree.root();
            let paths: Vec<Vec<Node>> = (0..size).map(|i| tree.path(i).copied().collect()).collect();
            for (i, path) in paths.iter().enumerate() {
                assert_eq!(path.len(), path_len(i, size));
                assert_eq!(root_from_path(leaves[i], i, size, path), Some(root), "size {size} leaf {i}");
                if size > 1 {
                    let other = (i + 1) % size;
                    assert_ne!(root_from_path(leaves[i], other, size, path), Some(root));
                }
            }
        }
    }

    #[test]
    fn signatures_bind_domain_and_key() {
        let signer = Signer::from_seed(&[7; 32]);
        let sig = signer.sign(REKEY_ROOT_DOMAIN, b"root");
        assert!(signer.verifying_key().verify(REKEY_ROOT_DOMAIN, b"root", &sig));
        assert!(!signer.verifying_key().verify(HEARTBEAT_DOMAIN, b"root", &sig));
        assert!(!Signer::from_seed(&[8; 32]).verifying_key().verify(REKEY_ROOT_DOMAIN, b"root", &sig));
        assert!(!format!("{signer:?}").contains("0707"));
    }

    #[test]
    fn a_cached_root_admits_its_block_and_nothing_forged_or_under_another_key() {
        let signer = Signer::from_seed(&[7; 32]);
        let bodies: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 40]).collect();
        let mut packets = bodies.clone();
        sign_in_blocks(&mut packets, 2, REKEY_ROOT_DOMAIN, &signer);
        let key = signer.verifying_key();
        let mut roots = VerifiedRoots::default();
        let check = |roots: &mut VerifiedRoots, i: usize, body: &[u8], key: &VerifyingKey| {
            let tail = &packets[i][bodies[i].len()..];
            let signature: Signature = tail[..SIGNATURE_LEN].try_into().unwrap();
            let path: Vec<Node> = tail[SIGNATURE_LEN..].chunks(NODE_LEN).map(|c| c.try_into().unwrap()).collect();
            verify_in_block(body, (i as u32, 6, 2), (&signature, &path), (REKEY_ROOT_DOMAIN, key), roots)
        };
        for (i, body) in bodies.iter().enumerate() {
            assert!(check(&mut roots, i, body, &key), "packet {i}");
        }
        assert_eq!(roots.recent.len(), 2, "one signature check per signing block");
        let mut forged = bodies[1].clone();
        forged[0] ^= 1;
        assert!(!check(&mut roots, 1, &forged, &key), "a forged body does not reach a cached root");
        let stranger = Signer::from_seed(&[8; 32]).verifying_key();
        assert!(!check(&mut roots, 1, &bodies[1], &stranger), "a root cached under one key proves nothing under another");
    }
}
