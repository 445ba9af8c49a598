//! What two controllers hand each other at a merge and a split (docs/merge.md), and how the
//! merged controller persists it: the absorbed group's state in the merge's log record, and
//! the merge in force in its snapshots.
//!
//! Encoded like the snapshot (big-endian, counted, strict, one encoding); the absorbed
//! group's graph holds key material, so its encoding lives in zeroized memory.

use zeroize::Zeroizing;

use crate::graph::{KeyGraph, MemberId, RekeyPlan};
use crate::wire::codec::{Reader, Writer};
use crate::wire::merge_notice::{put_addr, put_server_name, read_addr, read_server_name};
use crate::wire::{DecodeError, TlsServerName, VerifyingKey};

use super::controller::{FixedPolicy, Request};
use super::merge::{Contact, Destination};
use super::snapshot::{put_fixed, put_text, read_fixed, read_text};

const MERGE_RECORD_FORMAT: u8 = NAMED_FORMAT;
/// Before the controllers' TLS server names: merge records of it are read (the name is then
/// "localhost"), never written; the states two controllers hand each other are of one format.
const BEFORE_NAMES_FORMAT: u8 = 1;
/// Format 2 adds the server name after each controller address.
const NAMED_FORMAT: u8 = 2;
const MAX_ITEMS: usize = 1 << 28;

/// The absorbed (right) group as the merged controller keeps it, to hand it back at the split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RightGroup {
    /// Its group id, graph configuration and epoch length.
    pub fixed: FixedPolicy,
    pub signer: VerifyingKey,
    pub created_ms: u64,
    /// The last rekey it sent before the merge: its split rekey takes the next.
    pub rekey_seq: u64,
    /// The next member id it would have issued (ids of its own numbering).
    pub next_member: u64,
    /// Where its members go back to at the split.
    pub contact: Contact,
}

/// Everything the absorbing controller takes of the absorbed one ([`super::Controller::merge_side`]).
#[derive(Clone, PartialEq, Eq)]
pub struct MergeSide {
    pub right: RightGroup,
    /// Its key graph's export.
    pub graph: Zeroizing<Vec<u8>>,
    /// Its members and their identities, ascending by id (its own numbering).
    pub members: Vec<(MemberId, String)>,
    /// Leaves and evictions waiting for its next batch (its own numbering): the merged group's
    /// first batch applies them.
    pub pending: Vec<Request>,
}

impl core::fmt::Debug for MergeSide {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "MergeSide {{ group: {}, members: {}, graph: <redacted> }}", self.right.fixed.group.0, self.members.len())
    }
}

/// A merge, as the merged controller logs it: replaying it with the same seed and side
/// rebuilds the same merged group.
#[derive(Clone, PartialEq, Eq)]
pub struct MergeRecord {
    pub seq: u64,
    pub epoch: u64,
    /// What the absorbed group's member ids took.
    pub offset: u64,
    pub seed: [u8; 32],
    pub side: MergeSide,
}

impl core::fmt::Debug for MergeRecord {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Merged {{ seq: {}, epoch: {}, offset: {}, side: {:?}, seed: <redacted> }}", self.seq, self.epoch, self.offset, self.side)
    }
}

/// A merge in force, as the merged controller keeps it (and its snapshots hold).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merged {
    pub right: RightGroup,
    pub offset: u64,
}

/// What the absorbing controller gives the absorbed one to send on its own channel, in this
/// order: its notice (naming `merged`), then the merge's rekey packets.
#[derive(Clone, Debug)]
pub struct MergeTicket {
    pub merged: Destination,
    /// The merged group's epoch and its last rekey before the merge's.
    pub epoch: u64,
    pub last_seq: u64,
    pub offset: u64,
    pub rekey: Vec<Vec<u8>>,
    /// The absorbed group's last rekey when its state was taken: it must not have changed since.
    pub right_seq: u64,
}

/// What the merged controller hands back at a split: the absorbed group's graph (its own key
/// names again, a new group key), the rekey that brings that key (its controller signs it), and
/// its members (its own numbering: members who joined the merged group on its side included).
pub struct Handback {
    pub right: RightGroup,
    pub graph: Box<dyn KeyGraph>,
    pub rekey: RekeyPlan,
    pub members: Vec<(MemberId, String)>,
    pub next_member: u64,
}

impl core::fmt::Debug for Handback {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Handback {{ group: {}, members: {}, keys: <redacted> }}", self.right.fixed.group.0, self.members.len())
    }
}

/// The TLS address, server name and multicast group.
fn put_contact(out: &mut Vec<u8>, contact: &Contact) {
    put_addr(out, contact.controller);
    put_server_name(out, &contact.server_name);
    put_addr(out, contact.multicast);
}

/// `named`: the record's format has the server name (older ones name "localhost").
fn read_contact(r: &mut Reader<'_>, named: bool, field: &'static str) -> Result<Contact, DecodeError> {
    let controller = read_addr(r, field)?;
    let server_name = if named { read_server_name(r, field)? } else { TlsServerName::localhost() };
    Ok(Contact { controller, server_name, multicast: read_addr(r, field)? })
}

pub(crate) fn put_right_group(out: &mut Vec<u8>, right: &RightGroup) {
    put_fixed(out, &right.fixed);
    out.extend_from_slice(&right.signer.0);
    out.put_u64(right.created_ms);
    out.put_u64(right.rekey_seq);
    out.put_u64(right.next_member);
    put_contact(out, &right.contact);
}

/// `named` as in [`read_contact`].
pub(crate) fn read_right_group(r: &mut Reader<'_>, named: bool) -> Result<RightGroup, DecodeError> {
    Ok(RightGroup {
        fixed: read_fixed(r)?,
        signer: VerifyingKey(r.array("right signer")?),
        created_ms: r.u64("right created at")?,
        rekey_seq: r.u64("right rekey seq")?,
        next_member: r.u64("right next member")?,
        contact: read_contact(r, named, "right controller")?,
    })
}

pub(crate) fn put_requests(out: &mut Vec<u8>, requests: &[Request]) {
    out.put_u32(requests.len() as u32);
    for request in requests {
        let (kind, member) = match request {
            Request::Leave { member } => (0, member),
            Request::Evict { member } => (1, member),
            Request::Join { .. } => unreachable!("joins wait on a connection and are not handed over"),
        };
        out.put_u8(kind);
        out.put_u64(member.0);
    }
}

pub(crate) fn read_requests(r: &mut Reader<'_>) -> Result<Vec<Request>, DecodeError> {
    let count = r.count(4, MAX_ITEMS, 9, "pending requests")?;
    let mut pending = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = r.u8("request kind")?;
        let member = r.member()?;
        pending.push(match kind {
            0 => Request::Leave { member },
            1 => Request::Evict { member },
            value => return Err(DecodeError::BadValue { field: "request kind", value: value.into() }),
        });
    }
    Ok(pending)
}

/// Members and identities in ascending order of id.
fn put_members(out: &mut Vec<u8>, members: &[(MemberId, String)]) {
    out.put_u32(members.len() as u32);
    for (member, identity) in members {
        out.put_u64(member.0);
        put_text(out, identity);
    }
}

/// Strict: ascending ids (one encoding).
fn read_members(r: &mut Reader<'_>) -> Result<Vec<(MemberId, String)>, DecodeError> {
    let count = r.count(4, MAX_ITEMS, 10, "right members")?;
    let mut members: Vec<(MemberId, String)> = Vec::with_capacity(count);
    for _ in 0..count {
        let member = r.member()?;
        if members.last().is_some_and(|(previous, _)| *previous >= member) {
            return Err(DecodeError::BadValue { field: "right member", value: member.0 });
        }
        members.push((member, read_text(r, "right identity")?));
    }
    Ok(members)
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.put_u64(bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn read_bytes(r: &mut Reader<'_>, field: &'static str) -> Result<Zeroizing<Vec<u8>>, DecodeError> {
    let len = r.u64(field)?;
    Ok(Zeroizing::new(r.take(usize::try_from(len).unwrap_or(usize::MAX), field)?.to_vec()))
}

/// A tree or star graph from its export, whatever scheme its group was configured with: a
/// group merges (and comes back at the split) as the tree it runs, which may be one it
/// switched to from a flat table (docs/merge.md).
pub(crate) fn import_tree(bytes: &[u8]) -> Result<Box<dyn KeyGraph>, DecodeError> {
    let mut r = Reader::new(bytes);
    let tree = crate::graph::tree::Tree::import(&mut r)?;
    r.finish()?;
    Ok(Box::new(tree))
}

fn check_format(r: &mut Reader<'_>, field: &'static str) -> Result<(), DecodeError> {
    match r.u8(field)? {
        MERGE_RECORD_FORMAT => Ok(()),
        format => Err(DecodeError::BadValue { field, value: format.into() }),
    }
}

/// A log record's format: whether it has server names (the current one) or not (the one
/// before, still in logs written before names).
fn record_format(r: &mut Reader<'_>) -> Result<bool, DecodeError> {
    let field = "merge record format";
    match r.u8(field)? {
        NAMED_FORMAT => Ok(true),
        BEFORE_NAMES_FORMAT => Ok(false),
        format => Err(DecodeError::BadValue { field, value: format.into() }),
    }
}

impl MergeSide {
    fn capacity(&self) -> usize {
        256 + self.graph.len() + self.members.iter().map(|(_, i)| 10 + i.len()).sum::<usize>() + 9 * self.pending.len()
    }

    fn put(&self, out: &mut Vec<u8>) {
        put_right_group(out, &self.right);
        put_members(out, &self.members);
        put_requests(out, &self.pending);
        put_bytes(out, &self.graph);
    }

    fn read(r: &mut Reader<'_>, named: bool) -> Result<MergeSide, DecodeError> {
        let right = read_right_group(r, named)?;
        let members = read_members(r)?;
        let pending = read_requests(r)?;
        let graph = read_bytes(r, "graph")?;
        Ok(MergeSide { right, graph, members, pending })
    }

    /// For the trip from the absorbed controller to the absorbing one (`keycast admin merge`).
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        // Sized up front: a growing buffer would leave copies of keys in freed memory.
        let mut out = Zeroizing::new(Vec::with_capacity(self.capacity()));
        out.put_u8(MERGE_RECORD_FORMAT);
        self.put(&mut out);
        out
    }

    /// Strict, as any decoder (the graph is imported, and checked, by the absorbing controller).
    pub fn decode(bytes: &[u8]) -> Result<MergeSide, DecodeError> {
        let mut r = Reader::new(bytes);
        check_format(&mut r, "merge side format")?;
        let side = MergeSide::read(&mut r, true)?;
        r.finish()?;
        Ok(side)
    }
}

/// Rekey packets a ticket may carry (a merge rekey is one packet).
const MAX_TICKET_PACKETS: usize = 64;

impl MergeTicket {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u8(MERGE_RECORD_FORMAT);
        out.put_u64(self.merged.group.0);
        out.extend_from_slice(&self.merged.signer.0);
        put_contact(&mut out, &self.merged.contact);
        for value in [self.epoch, self.last_seq, self.offset, self.right_seq] {
            out.put_u64(value);
        }
        out.put_u32(self.rekey.len() as u32);
        for packet in &self.rekey {
            out.put_u32(packet.len() as u32);
            out.extend_from_slice(packet);
        }
        out
    }

    /// Strict; the packets are sent as they are (members verify them).
    pub fn decode(bytes: &[u8]) -> Result<MergeTicket, DecodeError> {
        let mut r = Reader::new(bytes);
        check_format(&mut r, "merge ticket format")?;
        let group = r.group()?;
        let signer = VerifyingKey(r.array("merged signer")?);
        let merged = Destination { group, signer, contact: read_contact(&mut r, true, "merged controller")? };
        let (epoch, last_seq, offset, right_seq) = (r.u64("epoch")?, r.u64("last seq")?, r.u64("member offset")?, r.u64("right seq")?);
        let count = r.count(4, MAX_TICKET_PACKETS, 4, "merge rekey packets")?;
        let mut rekey = Vec::with_capacity(count);
        for _ in 0..count {
            let len = r.count(4, crate::wire::MAX_MESSAGE_LEN, 1, "merge rekey packet")?;
            rekey.push(r.take(len, "merge rekey packet")?.to_vec());
        }
        r.finish()?;
        Ok(MergeTicket { merged, epoch, last_seq, offset, rekey, right_seq })
    }
}

/// Wraps a handback's rekey may hold (a split rekey is one wrap).
const MAX_HANDBACK_WRAPS: usize = 64;

impl Handback {
    /// For the trip from the merged controller to the absorbed one (`keycast admin split`).
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let graph = self.graph.export();
        let rekey = &self.rekey;
        let capacity = 256 + graph.len() + self.members.iter().map(|(_, i)| 10 + i.len()).sum::<usize>() + 12 * rekey.replaced.len() + 128 * rekey.wraps.len();
        let mut out = Zeroizing::new(Vec::with_capacity(capacity));
        out.put_u8(MERGE_RECORD_FORMAT);
        put_right_group(&mut out, &self.right);
        put_members(&mut out, &self.members);
        out.put_u64(self.next_member);
        put_bytes(&mut out, &graph);
        out.put_ref(rekey.group_key);
        out.extend_from_slice(&rekey.salt);
        out.put_u32(rekey.replaced.len() as u32);
        rekey.replaced.iter().for_each(|r| out.put_ref(*r));
        out.put_u32(rekey.wraps.len() as u32);
        rekey.wraps.iter().for_each(|w| out.put_wrap(w));
        out
    }

    /// Strict; the graph is imported as a tree ([`super::Controller::resume`] checks it is the
    /// tree the right group ran when it was absorbed).
    pub fn decode(bytes: &[u8]) -> Result<Handback, DecodeError> {
        let mut r = Reader::new(bytes);
        check_format(&mut r, "handback format")?;
        let right = read_right_group(&mut r, true)?;
        let members = read_members(&mut r)?;
        let next_member = r.u64("next member")?;
        let graph = import_tree(&read_bytes(&mut r, "graph")?)?;
        let group_key = r.key_ref("group key")?;
        let salt = r.array("nonce salt")?;
        let count = r.count(4, MAX_HANDBACK_WRAPS, 12, "replaced keys")?;
        let replaced = (0..count).map(|_| r.key_ref("replaced key")).collect::<Result<Vec<_>, _>>()?;
        let count = r.count(4, MAX_HANDBACK_WRAPS, 12, "wraps")?;
        let wraps = (0..count).map(|_| r.wrap(&salt)).collect::<Result<Vec<_>, _>>()?;
        r.finish()?;
        if members.iter().any(|(m, _)| !graph.contains(*m)) || members.len() != graph.stats().members {
            return Err(DecodeError::BadValue { field: "handback members", value: members.len() as u64 });
        }
        let rekey = RekeyPlan { group_key, replaced, wraps, salt, ..RekeyPlan::default() };
        Ok(Handback { right, graph, rekey, members, next_member })
    }
}

impl MergeRecord {
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        // Sized up front: a growing buffer would leave copies of keys in freed memory.
        let mut out = Zeroizing::new(Vec::with_capacity(64 + self.side.capacity()));
        out.put_u8(MERGE_RECORD_FORMAT);
        out.put_u64(self.seq);
        out.put_u64(self.epoch);
        out.put_u64(self.offset);
        out.extend_from_slice(&self.seed);
        self.side.put(&mut out);
        out
    }

    /// Strict: members in ascending order (one encoding), nothing after the graph. A record of
    /// the format before server names reads with "localhost" (and encodes in today's format).
    pub fn decode(bytes: &[u8]) -> Result<MergeRecord, DecodeError> {
        let mut r = Reader::new(bytes);
        let named = record_format(&mut r)?;
        let (seq, epoch, offset) = (r.u64("merge seq")?, r.u64("merge epoch")?, r.u64("member offset")?);
        let seed = r.array::<32>("merge seed")?;
        let side = MergeSide::read(&mut r, named)?;
        r.finish()?;
        Ok(MergeRecord { seq, epoch, offset, seed, side })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::graph::{GraphConfig, JoinPolicy, Scheme};
    use crate::wire::GroupId;

    pub(crate) const NAME: &str = "right.keycast.test";

    pub(crate) fn right_group() -> RightGroup {
        let graph = GraphConfig { scheme: Scheme::Tree { degree: 3 }, join_policy: JoinPolicy::NewVersion };
        RightGroup {
            fixed: FixedPolicy { group: GroupId(8), graph, epoch_ms: 100 },
            signer: VerifyingKey([7; 32]),
            created_ms: 1,
            rekey_seq: 4,
            next_member: 3,
            contact: Contact {
                controller: "127.0.0.1:7000".parse().unwrap(),
                server_name: NAME.parse().unwrap(),
                multicast: "239.255.0.9:7001".parse().unwrap(),
            },
        }
    }

    /// `bytes` as the format before server names wrote them: format byte 1, no name.
    pub(crate) fn without_name(bytes: &[u8], format_before: u8) -> Vec<u8> {
        let name = [&[NAME.len() as u8][..], NAME.as_bytes()].concat();
        let at = bytes.windows(name.len()).position(|w| w == name).expect("the name is encoded");
        let mut old = [&bytes[..at], &bytes[at + name.len()..]].concat();
        old[0] = format_before;
        old
    }

    fn record() -> MergeRecord {
        let side = MergeSide {
            right: right_group(),
            graph: Zeroizing::new(vec![1, 2, 3]),
            members: vec![(MemberId(1), "right-1".into()), (MemberId(2), "right-2".into())],
            pending: vec![Request::Leave { member: MemberId(2) }],
        };
        MergeRecord { seq: 16, epoch: 17, offset: 9, seed: [6; 32], side }
    }

    #[test]
    fn merge_records_written_before_server_names_still_read_with_localhost() {
        let record = record();
        let bytes = record.encode();
        assert_eq!(MergeRecord::decode(&bytes), Ok(record.clone()));
        let old = without_name(&bytes, BEFORE_NAMES_FORMAT);
        let read = MergeRecord::decode(&old).expect("a record of the format before names");
        assert_eq!(read.side.right.contact.server_name, TlsServerName::localhost());
        let mut expected = record.clone();
        expected.side.right.contact.server_name = TlsServerName::localhost();
        assert_eq!(read, expected, "everything else as written");
        assert_eq!(read.encode()[0], NAMED_FORMAT, "written again in today's format");
        // The states two controllers hand each other have one format: the current one.
        assert!(MergeSide::decode(&without_name(&record.side.encode(), BEFORE_NAMES_FORMAT)).is_err());
        let mut unknown = bytes.to_vec();
        unknown[0] = 3;
        assert!(matches!(MergeRecord::decode(&unknown), Err(DecodeError::BadValue { field: "merge record format", value: 3 })));
    }
}
