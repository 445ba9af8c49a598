//! A controller absorbing another group and splitting it off again (Caronni et al. 3.5,
//! docs/merge.md). Both controllers belong to one operator, whose driver carries the state
//! between them:
//!
//! 1. the absorbed (right) controller gives its state ([`Controller::merge_side`]);
//! 2. the absorbing (left) controller merges it ([`Controller::absorb`]): it logs the merge,
//!    multicasts the merge rekey on its own channel and returns a [`MergeTicket`];
//! 3. the right controller sends, on its channel, its notice naming the merged group and then
//!    the merge rekey ([`Controller::hand_off`]), and serves its group no more;
//! 4. at the split the merged controller sends the right members a notice naming their own
//!    controller, rekeys its side, and returns a [`Handback`] ([`Controller::split`]);
//! 5. the right controller resumes from it ([`Controller::resume`]) and rekeys its side.
//!
//! Member ids: the right group's ids take the left controller's next id as offset, and the
//! merged group issues ids above both groups' (joiners go to the smaller side, so a joiner on
//! the right has an id above the offset and goes back with the right side at the split).

use crate::graph::merge::{merge_trees, MergedTrees, Subtree};
use crate::graph::{MemberId, RekeyPlan, Scheme};
use crate::keygen::{BatchSeed, KeyGen};
use crate::wire::control::RefusalReason;
use crate::wire::{MergeNotice, Move};

use super::super::heartbeats::epoch_at;
use super::super::merge::{Contact, Destination};
use super::super::merge_state::{import_tree, Handback, MergeRecord, MergeSide, MergeTicket, Merged, RightGroup};
use super::super::pending::Pending;
use super::{Controller, ControllerError, MemberRecord, Output, Record, Request};

/// Key stream of a split's seed drawn from the entropy handed to [`Controller::split`] (the
/// same entropy closes the batch of requests waiting before it).
const SPLIT_STREAM: u64 = u64::MAX - 19;

fn refused(why: &'static str) -> ControllerError {
    ControllerError::Merge(why)
}

impl Controller {
    /// This group's state for a merge into another, with where its members come back to at the
    /// split (`here`: this controller's addresses and TLS server name). The group must not
    /// change until [`Controller::hand_off`].
    pub fn merge_side(&self, here: Contact) -> Result<MergeSide, ControllerError> {
        if self.merged.is_some() || self.handed_off.is_some() {
            return Err(refused("a merged or absorbed group merges no further"));
        }
        self.runs_a_tree()?;
        let right = RightGroup {
            fixed: self.policy.fixed(),
            signer: self.signer.verifying_key(),
            created_ms: self.created_ms,
            rekey_seq: self.rekey_seq,
            next_member: self.next_member,
            contact: here,
        };
        Ok(MergeSide {
            right,
            graph: self.graph.export(),
            members: self.members.iter().map(|(m, r)| (*m, r.identity.clone())).collect(),
            pending: self.pending.iter().filter(|r| !matches!(r, Request::Join { .. })).cloned().collect(),
        })
    }

    /// Absorbs the group of `side`: one rekey, active at once, brings both groups' members the
    /// new root. `here` is this controller's TLS address, server name and multicast group, for
    /// the right side's notice. Returns the outputs (the record first) and what the right
    /// controller sends.
    pub fn absorb(&mut self, side: MergeSide, here: Contact, now_ms: u64, entropy: [u8; 32]) -> Result<(Vec<Output>, MergeTicket), ControllerError> {
        if self.merged.is_some() || self.handed_off.is_some() {
            return Err(refused("a merged or absorbed group absorbs no other"));
        }
        if side.right.fixed.group == self.policy.group {
            return Err(refused("a group does not absorb itself"));
        }
        self.runs_a_tree()?;
        self.policy.packets.check()?;
        let epoch = self.epoch_at(now_ms).max(self.epoch);
        let (seq, offset, right_seq) = (self.rekey_seq + 1, self.next_member, side.right.rekey_seq);
        let record = MergeRecord { seq, epoch, offset, seed: entropy, side };
        let plan = self.apply_merge(&record, now_ms)?;
        let (packets, bytes) = self.encode(&plan, seq, epoch, epoch)?;
        self.last_rekey = packets.clone();
        let merged = Destination { group: self.policy.group, signer: self.signer.verifying_key(), contact: here };
        let ticket = MergeTicket { merged, epoch, last_seq: seq - 1, offset, rekey: packets.clone(), right_seq };
        let mut out = vec![Output::Persist(Record::Merged(Box::new(record)))];
        out.push(Output::Rekeyed { seq, epoch, wraps: plan.wraps.len(), packets: packets.len(), bytes, parity: 0, parity_bytes: 0 });
        out.extend(packets.into_iter().map(Output::Multicast));
        Ok((out, ticket))
    }

    /// Only trees merge: the graph in force, not the configured scheme, decides (a flat group
    /// that switched to a tree merges, a tree group that switched to a flat table does not).
    fn runs_a_tree(&self) -> Result<(), ControllerError> {
        match self.graph.config().scheme {
            Scheme::Flat { .. } => Err(refused("a flat group does not merge (a group that switched to a flat table neither, until it switches back to a tree)")),
            Scheme::Tree { .. } | Scheme::Star => Ok(()),
        }
    }

    /// The merge of `record` applied to the state (also when the log is replayed).
    pub(super) fn apply_merge(&mut self, record: &MergeRecord, now_ms: u64) -> Result<RekeyPlan, ControllerError> {
        let MergeRecord { seq, epoch, offset, seed, side } = record;
        // The tree the absorbed group ran, which may be one it switched to from its configured
        // flat table: the graph's export says which.
        let right_graph = import_tree(&side.graph).map_err(|_| refused("the absorbed group's graph is not a tree (a flat group does not merge)"))?;
        if side.members.len() != right_graph.stats().members || side.members.iter().any(|(m, _)| !right_graph.contains(*m)) {
            return Err(refused("the absorbed group's members and graph disagree"));
        }
        if side.pending.iter().any(|r| side.members.binary_search_by_key(&r.member(), |(m, _)| *m).is_err()) {
            return Err(refused("a request of the absorbed group names no member of it"));
        }
        if side.members.iter().any(|(_, identity)| self.by_identity.contains_key(identity)) {
            return Err(refused("an identity is a member of both groups"));
        }
        let merge = merge_trees(&*self.graph, &*right_graph, *offset, &BatchSeed::from_bytes(*seed))?;
        let plan = merge.rekey();
        let moved = |m: MemberId| MemberId(m.0 + offset);
        for (member, identity) in &side.members {
            let record = MemberRecord { identity: identity.clone(), last_seen_ms: now_ms, joined_seq: *seq, liveness_counter: 0, udp_resync_ms: 0 };
            self.members.insert(moved(*member), record);
            self.by_identity.insert(identity.clone(), moved(*member));
        }
        for request in &side.pending {
            self.pending.push(match request {
                Request::Leave { member } => Request::Leave { member: moved(*member) },
                Request::Evict { member } => Request::Evict { member: moved(*member) },
                Request::Join { .. } => return Err(refused("joins are not handed over")),
            });
        }
        self.graph = Box::new(merge.graph);
        self.next_member = self.next_member.max(offset.saturating_add(side.right.next_member));
        self.merged = Some(Merged { right: side.right.clone(), offset: *offset });
        self.install_group_key(*seq, *epoch, plan.group_key, *epoch);
        Ok(plan)
    }

    /// Sends this group's members to the merged group of `ticket`: the notice, then the merge
    /// rekey, on this group's channel. From then on the controller serves nothing (joins are
    /// refused, ticks send only heartbeats, which repeat the notice) until [`Controller::resume`].
    pub fn hand_off(&mut self, ticket: &MergeTicket) -> Result<Vec<Output>, ControllerError> {
        if self.merged.is_some() || self.handed_off.is_some() {
            return Err(refused("a merged or absorbed group is handed off no further"));
        }
        if ticket.right_seq != self.rekey_seq {
            return Err(refused("the group rekeyed after its state was taken for the merge"));
        }
        let to = &ticket.merged;
        let notice = MergeNotice {
            group: self.policy.group,
            after_seq: self.rekey_seq,
            change: Move::Merge(Subtree::Right),
            member_offset: ticket.offset,
            next_group: to.group,
            next_epoch: ticket.epoch,
            next_seq: ticket.last_seq,
            next_signer: to.signer,
            controller: to.contact.controller,
            server_name: to.contact.server_name.clone(),
            multicast: to.contact.multicast,
        };
        let notice = notice.sign(&self.signer).encode();
        let mut out = vec![Output::Persist(Record::HandedOff { to: to.group, seq: self.rekey_seq, notice: notice.clone() })];
        // Joins waiting for this group's batch will not get one.
        let waiting: Vec<String> = self.pending.iter().filter_map(|r| if let Request::Join { identity, .. } = r { Some(identity.clone()) } else { None }).collect();
        for identity in waiting {
            let detail = format!("group {} is merged into group {}", self.policy.group.0, to.group.0);
            out.extend(self.drop_queued_join(&identity, super::refuse(RefusalReason::UnknownGroup, detail)));
        }
        self.handed_off = Some(to.group);
        // A member that missed the notice hears it again with the heartbeats: 16 times with
        // the other notices, then with every heartbeat until the split.
        self.hand_off_notice = Some(std::sync::Arc::new(notice.clone()));
        self.announce(notice.clone());
        out.push(Output::Multicast(notice));
        out.extend(ticket.rekey.iter().cloned().map(Output::Multicast));
        Ok(out)
    }

    /// True while this controller runs a merged group.
    pub fn is_merged(&self) -> bool {
        self.merged.is_some()
    }

    /// The group this one was absorbed into, while it is.
    pub fn handed_off_to(&self) -> Option<crate::wire::GroupId> {
        self.handed_off
    }

    /// Splits the merged group: requests waiting are applied first (one batch), then the right
    /// side's members get a notice naming their own controller again, and this side a new group
    /// key. Returns the outputs (records first) and the right side's state for
    /// [`Controller::resume`].
    pub fn split(&mut self, now_ms: u64, entropy: [u8; 32]) -> Result<(Vec<Output>, Handback), ControllerError> {
        let Some(merged) = self.merged.clone() else { return Err(refused("the group is not merged")) };
        self.policy.packets.check()?;
        let mut out = Vec::new();
        if !self.pending.is_empty() {
            out.extend(self.close_epoch(now_ms, entropy, true)?);
        }
        let mut seed = [0u8; 32];
        seed.copy_from_slice(KeyGen::new(&BatchSeed::from_bytes(entropy), SPLIT_STREAM).next_key().as_bytes());
        let epoch = self.epoch_at(now_ms).max(self.epoch);
        let seq = self.rekey_seq + 1;
        let (plan, handback) = self.apply_split(seq, epoch, &seed)?;
        let right = merged.right;
        let notice = MergeNotice {
            group: self.policy.group,
            after_seq: seq - 1,
            change: Move::Split,
            member_offset: merged.offset,
            next_group: right.fixed.group,
            next_epoch: epoch_at(right.created_ms, right.fixed.epoch_ms, now_ms),
            next_seq: right.rekey_seq,
            next_signer: right.signer,
            controller: right.contact.controller,
            server_name: right.contact.server_name.clone(),
            multicast: right.contact.multicast,
        };
        let (packets, bytes) = self.encode(&plan, seq, epoch, epoch)?;
        self.last_rekey = packets.clone();
        out.push(Output::Persist(Record::Split { seq, epoch, seed }));
        out.push(Output::Multicast(notice.sign(&self.signer).encode()));
        out.push(Output::Rekeyed { seq, epoch, wraps: plan.wraps.len(), packets: packets.len(), bytes, parity: 0, parity_bytes: 0 });
        out.extend(packets.into_iter().map(Output::Multicast));
        Ok((out, handback))
    }

    /// The split applied to the state (also when the log is replayed): the left side stays,
    /// the right side's graph and members are handed back.
    pub(super) fn apply_split(&mut self, seq: u64, epoch: u64, seed: &[u8; 32]) -> Result<(RekeyPlan, Handback), ControllerError> {
        let Some(merged) = self.merged.clone() else { return Err(ControllerError::BadLog("a split of a group that is not merged")) };
        let graph = MergedTrees::import(&self.graph.export())?;
        graph.can_split()?;
        let right_ids: Vec<MemberId> = self.members.keys().copied().filter(|m| graph.subtree_of(*m) == Some(Subtree::Right)).collect();
        let split = graph.split(&BatchSeed::from_bytes(*seed))?;
        let mut members = Vec::with_capacity(right_ids.len());
        for member in &right_ids {
            if let Some(record) = self.members.remove(member) {
                self.by_identity.remove(&record.identity);
                members.push((MemberId(member.0 - merged.offset), record.identity));
            }
        }
        self.pending.retain(|r| !right_ids.contains(&r.member()));
        self.graph = split.left;
        self.merged = None;
        self.install_group_key(seq, epoch, split.left_rekey.group_key, epoch);
        let next_member = members.iter().map(|(m, _)| m.0.saturating_add(1)).fold(merged.right.next_member, u64::max);
        let handback = Handback { right: merged.right, graph: split.right, rekey: split.right_rekey, members, next_member };
        Ok((split.left_rekey, handback))
    }

    /// Takes this group back from the merged controller's `handback`: its members (those who
    /// joined while merged included), a new group key sent at once under its previous root, and
    /// a snapshot that starts its log again. Members this group's ACL does not list, or whose
    /// identity it revoked (the merged controller's ACL admitted them), are then removed at
    /// once, in one batch.
    pub fn resume(&mut self, handback: Handback, now_ms: u64, entropy: [u8; 32]) -> Result<Vec<Output>, ControllerError> {
        if self.handed_off.is_none() {
            return Err(refused("the group was not handed off"));
        }
        // The tree it ran when absorbed (its configured scheme, or the tree it switched to).
        if handback.right.fixed != self.policy.fixed() || handback.graph.config() != self.graph.config() {
            return Err(refused("the handback is for another group"));
        }
        self.policy.packets.check()?;
        let epoch = self.epoch_at(now_ms).max(self.epoch);
        let seq = self.rekey_seq + 1;
        let (packets, bytes) = self.encode(&handback.rekey, seq, epoch, epoch)?;
        self.members.clear();
        self.by_identity.clear();
        for (member, identity) in handback.members {
            let record = MemberRecord { identity: identity.clone(), last_seen_ms: now_ms, joined_seq: seq, liveness_counter: 0, udp_resync_ms: 0 };
            self.members.insert(member, record);
            self.by_identity.insert(identity, member);
        }
        self.next_member = self.next_member.max(handback.next_member);
        self.pending = Pending::default();
        self.waiting_joins.clear();
        self.graph = handback.graph;
        self.group_keys.clear();
        self.install_group_key(seq, epoch, handback.rekey.group_key, epoch);
        self.handed_off = None;
        self.hand_off_notice = None;
        self.announcements.clear();
        self.last_rekey = packets.clone();
        self.batches_since_snapshot = 0;
        let mut out = vec![Output::Persist(Record::Snapshot(Box::new(self.whole_state())))];
        out.push(Output::Rekeyed { seq, epoch, wraps: handback.rekey.wraps.len(), packets: packets.len(), bytes, parity: 0, parity_bytes: 0 });
        out.extend(packets.into_iter().map(Output::Multicast));
        out.extend(self.remove_outsiders(now_ms, entropy)?);
        Ok(out)
    }

    /// Removes, in one batch, the members whose identity this controller's ACL does not list
    /// or that it revoked.
    fn remove_outsiders(&mut self, now_ms: u64, entropy: [u8; 32]) -> Result<Vec<Output>, ControllerError> {
        let outsiders: Vec<MemberId> =
            self.members.iter().filter(|(_, r)| !self.acl.contains(&r.identity) || self.revoked.contains(&r.identity)).map(|(m, _)| *m).collect();
        if outsiders.is_empty() {
            return Ok(Vec::new());
        }
        let mut out: Vec<Output> = outsiders.into_iter().flat_map(|member| self.request(Request::Evict { member })).collect();
        out.extend(self.close_epoch(now_ms, entropy, true)?);
        Ok(out)
    }
}
