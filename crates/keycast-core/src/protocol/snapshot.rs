//! The controller's whole state in one record: a restart reads the newest snapshot and the
//! records after it, and the log before it (with every earlier batch's seed) is dropped, so a
//! copy of the database no longer holds the keys of the group's past.
//!
//! Encoded like a wire message (big-endian, counted, strict); it holds key material, so the
//! encoding lives in zeroized memory.

use std::collections::BTreeSet;

use zeroize::Zeroizing;

use crate::graph::{FlatIds, GraphConfig, JoinPolicy, MemberId, Scheme};
use crate::key::{Key, KeyRef, KEY_LEN};
use crate::wire::codec::{Reader, Writer};
use crate::wire::DecodeError;

use super::controller::{FixedPolicy, Request};
use super::merge_state::{put_requests, put_right_group, read_requests, read_right_group, Merged};

const SNAPSHOT_FORMAT: u8 = NAMED_FORMAT;
/// Snapshots written before merges were built: read, never written.
const BEFORE_MERGES_FORMAT: u8 = 1;
const MERGE_FORMAT: u8 = 2;
/// Format 3 adds the graph's scheme after a flat <-> tree switch.
const SWITCH_FORMAT: u8 = 3;
/// Format 4 adds the absorbed group's TLS server name to the merge in force (before, "localhost").
const NAMED_FORMAT: u8 = 4;
/// Longest identity (a certificate name) a snapshot holds.
const MAX_IDENTITY: usize = 1024;
const MAX_ITEMS: usize = 1 << 28;

/// A snapshot of the controller, as persisted.
#[derive(Clone)]
pub struct Snapshot {
    pub(crate) created_ms: u64,
    pub(crate) signing_seed: Zeroizing<[u8; 32]>,
    pub(crate) signer_changes: u64,
    pub(crate) fixed: FixedPolicy,
    pub(crate) next_member: u64,
    pub(crate) epoch: u64,
    pub(crate) rekey_seq: u64,
    /// (member, identity, rekey that admitted it)
    pub(crate) members: Vec<(MemberId, String, u64)>,
    /// (rekey seq, ref, activation epoch, key)
    pub(crate) group_keys: Vec<(u64, KeyRef, u64, Key)>,
    pub(crate) revoked: BTreeSet<String>,
    pub(crate) acl_added: BTreeSet<String>,
    pub(crate) acl_removed: BTreeSet<String>,
    /// Leaves and evictions waiting for their batch.
    pub(crate) pending: Vec<Request>,
    pub(crate) last_rekey: Vec<Vec<u8>>,
    pub(crate) graph: Zeroizing<Vec<u8>>,
    /// The merge in force, if the group is merged (`graph` is then a merged group's).
    pub(crate) merged: Option<Merged>,
    /// The graph's scheme after a flat <-> tree switch (`graph` is then of it); none while the
    /// graph is of the fixed scheme.
    pub(crate) switched: Option<GraphConfig>,
}

impl core::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Snapshot {{ rekey_seq: {}, members: {}, keys: <redacted> }}", self.rekey_seq, self.members.len())
    }
}

impl PartialEq for Snapshot {
    fn eq(&self, other: &Self) -> bool {
        self.encode() == other.encode()
    }
}
impl Eq for Snapshot {}

pub(crate) fn put_text(out: &mut Vec<u8>, text: &str) {
    out.put_u16(text.len() as u16);
    out.extend_from_slice(text.as_bytes());
}

pub(crate) fn read_text(r: &mut Reader<'_>, field: &'static str) -> Result<String, DecodeError> {
    let len = r.count(2, MAX_IDENTITY, 1, field)?;
    core::str::from_utf8(r.take(len, field)?).map(str::to_owned).map_err(|_| DecodeError::BadText)
}

fn put_texts(out: &mut Vec<u8>, texts: &BTreeSet<String>) {
    out.put_u32(texts.len() as u32);
    texts.iter().for_each(|t| put_text(out, t));
}

fn read_texts(r: &mut Reader<'_>, field: &'static str) -> Result<BTreeSet<String>, DecodeError> {
    let count = r.count(4, MAX_ITEMS, 2, field)?;
    (0..count).map(|_| read_text(r, field)).collect()
}

pub(crate) fn put_fixed(out: &mut Vec<u8>, fixed: &FixedPolicy) {
    out.put_u64(fixed.group.0);
    match fixed.graph.scheme {
        Scheme::Star => out.put_u8(0),
        Scheme::Tree { degree } => {
            out.put_u8(1);
            out.put_u32(degree);
        }
        Scheme::Flat { id_bits, ids } => {
            out.put_u8(2);
            out.put_u8(id_bits);
            out.put_u8(u8::from(ids == FlatIds::FromMemberId));
        }
    }
    out.put_u8(u8::from(fixed.graph.join_policy == JoinPolicy::Revision));
    out.put_u64(fixed.epoch_ms);
}

pub(crate) fn read_fixed(r: &mut Reader<'_>) -> Result<FixedPolicy, DecodeError> {
    let group = r.group()?;
    let scheme = match r.u8("scheme")? {
        0 => Scheme::Star,
        1 => Scheme::Tree { degree: r.u32("degree")? },
        2 => {
            let id_bits = r.u8("id bits")?;
            let ids = if r.flag("flat ids from member ids")? { FlatIds::FromMemberId } else { FlatIds::Sequential };
            Scheme::Flat { id_bits, ids }
        }
        value => return Err(DecodeError::BadValue { field: "scheme", value: value.into() }),
    };
    let join_policy = if r.flag("join policy")? { JoinPolicy::Revision } else { JoinPolicy::NewVersion };
    Ok(FixedPolicy { group, graph: GraphConfig { scheme, join_policy }, epoch_ms: r.u64("epoch ms")? })
}

impl Snapshot {
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        // Sized up front: a growing buffer would leave copies of keys in freed memory.
        let texts = |set: &BTreeSet<String>| set.iter().map(|t| 2 + t.len()).sum::<usize>();
        let capacity = 256
            + self.graph.len()
            + self.members.iter().map(|(_, identity, _)| 18 + identity.len()).sum::<usize>()
            + self.group_keys.len() * (28 + KEY_LEN)
            + texts(&self.revoked)
            + texts(&self.acl_added)
            + texts(&self.acl_removed)
            + 9 * self.pending.len()
            + 256
            + self.last_rekey.iter().map(|p| 4 + p.len()).sum::<usize>();
        let mut out = Zeroizing::new(Vec::with_capacity(capacity));
        out.put_u8(SNAPSHOT_FORMAT);
        out.put_u64(self.created_ms);
        out.extend_from_slice(&self.signing_seed[..]);
        out.put_u64(self.signer_changes);
        put_fixed(&mut out, &self.fixed);
        out.put_u64(self.next_member);
        out.put_u64(self.epoch);
        out.put_u64(self.rekey_seq);
        out.put_u32(self.members.len() as u32);
        for (member, identity, joined_seq) in &self.members {
            out.put_u64(member.0);
            put_text(&mut out, identity);
            out.put_u64(*joined_seq);
        }
        out.put_u32(self.group_keys.len() as u32);
        for (seq, key_ref, activation, key) in &self.group_keys {
            out.put_u64(*seq);
            out.put_ref(*key_ref);
            out.put_u64(*activation);
            out.extend_from_slice(key.as_bytes());
        }
        put_texts(&mut out, &self.revoked);
        put_texts(&mut out, &self.acl_added);
        put_texts(&mut out, &self.acl_removed);
        put_requests(&mut out, &self.pending);
        out.put_u32(self.last_rekey.len() as u32);
        for packet in &self.last_rekey {
            out.put_u32(packet.len() as u32);
            out.extend_from_slice(packet);
        }
        out.put_u64(self.graph.len() as u64);
        out.extend_from_slice(&self.graph);
        match &self.merged {
            None => out.put_u8(0),
            Some(merged) => {
                out.put_u8(1);
                put_right_group(&mut out, &merged.right);
                out.put_u64(merged.offset);
            }
        }
        match &self.switched {
            None => out.put_u8(0),
            Some(config) => {
                out.put_u8(1);
                put_fixed(&mut out, &FixedPolicy { graph: *config, ..self.fixed });
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Snapshot, DecodeError> {
        let mut r = Reader::new(bytes);
        let format = r.u8("snapshot format")?;
        if ![NAMED_FORMAT, SWITCH_FORMAT, MERGE_FORMAT, BEFORE_MERGES_FORMAT].contains(&format) {
            return Err(DecodeError::BadValue { field: "snapshot format", value: format.into() });
        }
        let created_ms = r.u64("created at")?;
        let signing_seed = Zeroizing::new(r.array::<32>("signing seed")?);
        let signer_changes = r.u64("signer changes")?;
        let fixed = read_fixed(&mut r)?;
        let (next_member, epoch, rekey_seq) = (r.u64("next member")?, r.u64("epoch")?, r.u64("rekey seq")?);
        let count = r.count(4, MAX_ITEMS, 18, "members")?;
        let mut members = Vec::with_capacity(count);
        for _ in 0..count {
            members.push((r.member()?, read_text(&mut r, "identity")?, r.u64("joined seq")?));
        }
        let count = r.count(4, MAX_ITEMS, 28 + KEY_LEN, "group keys")?;
        let mut group_keys = Vec::with_capacity(count);
        for _ in 0..count {
            group_keys.push((r.u64("key seq")?, r.key_ref("group key")?, r.u64("activation")?, r.key("group key")?));
        }
        let revoked = read_texts(&mut r, "revoked identities")?;
        let acl_added = read_texts(&mut r, "identities added to the ACL")?;
        let acl_removed = read_texts(&mut r, "identities removed from the ACL")?;
        let pending = read_requests(&mut r)?;
        let count = r.count(4, MAX_ITEMS, 4, "last rekey")?;
        let mut last_rekey = Vec::with_capacity(count);
        for _ in 0..count {
            let len = r.count(4, crate::wire::MAX_MESSAGE_LEN, 1, "rekey packet")?;
            last_rekey.push(r.take(len, "rekey packet")?.to_vec());
        }
        let len = r.u64("graph length")?;
        let graph = Zeroizing::new(r.take(usize::try_from(len).unwrap_or(usize::MAX), "graph")?.to_vec());
        // Format 1 (before merges) ends here; format 2 says whether a merge is in force.
        let merged = match format {
            MERGE_FORMAT | SWITCH_FORMAT | NAMED_FORMAT if r.flag("merged")? => {
                Some(Merged { right: read_right_group(&mut r, format == NAMED_FORMAT)?, offset: r.u64("member offset")? })
            }
            _ => None,
        };
        let switched = match format {
            SWITCH_FORMAT | NAMED_FORMAT if r.flag("switched")? => Some(read_fixed(&mut r)?.graph),
            _ => None,
        };
        r.finish()?;
        Ok(Snapshot {
            created_ms,
            signing_seed,
            signer_changes,
            fixed,
            next_member,
            epoch,
            rekey_seq,
            members,
            group_keys,
            revoked,
            acl_added,
            acl_removed,
            pending,
            last_rekey,
            graph,
            merged,
            switched,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::merge_state::tests::{right_group, without_name};
    use crate::wire::TlsServerName;

    /// A merged controller's snapshot, without keys or members (decoding does not import the graph).
    fn merged_snapshot() -> Snapshot {
        let right = right_group();
        Snapshot {
            created_ms: 1,
            signing_seed: Zeroizing::new([3; 32]),
            signer_changes: 0,
            fixed: FixedPolicy { group: crate::wire::GroupId(7), ..right.fixed },
            next_member: 5,
            epoch: 6,
            rekey_seq: 7,
            members: Vec::new(),
            group_keys: Vec::new(),
            revoked: BTreeSet::new(),
            acl_added: BTreeSet::new(),
            acl_removed: BTreeSet::new(),
            pending: Vec::new(),
            last_rekey: Vec::new(),
            graph: Zeroizing::new(vec![1, 2, 3]),
            merged: Some(Merged { right, offset: 9 }),
            switched: None,
        }
    }

    #[test]
    fn snapshots_written_before_server_names_still_read_with_localhost() {
        let snapshot = merged_snapshot();
        let bytes = snapshot.encode();
        assert_eq!(bytes[0], NAMED_FORMAT);
        let read = Snapshot::decode(&bytes).unwrap();
        assert_eq!(read.merged, snapshot.merged);
        for format in [SWITCH_FORMAT, MERGE_FORMAT] {
            let old = if format == MERGE_FORMAT {
                // Format 2 ends before the switch flag.
                let named = without_name(&bytes, format);
                named[..named.len() - 1].to_vec()
            } else {
                without_name(&bytes, format)
            };
            let read = Snapshot::decode(&old).unwrap_or_else(|e| panic!("format {format}: {e}"));
            let merged = read.merged.as_ref().expect("the merge in force");
            assert_eq!(merged.right.contact.server_name, TlsServerName::localhost(), "format {format}");
            assert_eq!(merged.right.contact.controller, snapshot.merged.as_ref().unwrap().right.contact.controller);
            assert_eq!(read.encode()[0], NAMED_FORMAT, "written again in today's format");
        }
    }
}
