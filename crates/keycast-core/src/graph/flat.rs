//! Caronni et al.'s centralized flat key management (section 3.3).
//!
//! The table holds the TEK and two KEKs per bit of an `id_bits`-bit member ID; a member with
//! ID x holds KEK(i, bit i of x) for every i. A leave replaces the TEK, sends it wrapped under
//! every KEK the leavers lack, and replaces each KEK they held, wrapped under a function of
//! the old KEK and the new TEK: 2 * id_bits wraps for one leaver, whatever the group size.
//!
//! Several leavers in one batch are removed by over-specifying the range: every KEK any of
//! them held is tainted, so no coalition of them can obtain the new TEK. The price is that any
//! remaining member whose KEKs are all tainted is excluded too; the plan reports them in
//! `excluded` and they must rejoin. With k random leavers a member survives if its ID differs
//! from the union of their bits somewhere; once k approaches id_bits the union tends to cover
//! both values of every bit and most of the group is excluded, so large batches of leaves
//! belong in a tree.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

use rayon::prelude::*;

use super::{
    validate_batch, BatchCounter, Batch, GraphConfig, GraphError, GraphStats, JoinPolicy, KeyGraph, MemberId,
    Position, RekeyPlan, Scheme, Welcome,
};
use crate::key::{Key, KeyId, KeyRef, KEY_LEN};
use crate::wire::codec::{Reader, Writer};
use crate::wire::DecodeError;
use super::tree::{join_policy_byte, read_join_policy};
use crate::keygen::{nonce_salt, BatchSeed, KeyGen};
use crate::wrap::{flat_replacement_wrapping_key, next_revision, NonceSalt, Wrap, Wrapper};

/// How members get their flat IDs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum FlatIds {
    /// The lowest free ID.
    Sequential,
    /// The member id itself, e.g. an IPv4 address and port packed into 48 bits (Caronni).
    FromMemberId,
}

const TEK_ID: KeyId = KeyId(0);
const INDIVIDUAL_BASE: u32 = 1 << 30;
/// Most individual key slots (and so members) a flat table tracks.
const MAX_SLOTS: u64 = 1 << 30;

pub fn flat_kek_id(bit: u8, value: u8) -> KeyId {
    KeyId(1 + 2 * bit as u32 + value as u32)
}

struct Slot {
    key: Key,
    version: u32,
    revision: u32,
}

impl Slot {
    fn key_ref(&self, id: KeyId) -> KeyRef {
        KeyRef::new(id, self.version, self.revision)
    }
}

struct FlatMember {
    id: u64,
    slot: u32,
    individual: Slot,
}

pub struct Flat {
    id_bits: u8,
    ids: FlatIds,
    policy: JoinPolicy,
    tek: Slot,
    keks: Vec<[Slot; 2]>,
    members: HashMap<MemberId, FlatMember>,
    by_id: HashMap<u64, MemberId>,
    free_ids: BinaryHeap<Reverse<u64>>,
    next_id: u64,
    free_slots: BinaryHeap<Reverse<u32>>,
    slots: u32,
    batches: BatchCounter,
}

fn bit(id: u64, i: u8) -> usize {
    ((id >> i) & 1) as usize
}

impl Flat {
    pub fn new(id_bits: u8, ids: FlatIds, policy: JoinPolicy, seed: &BatchSeed) -> Result<Self, GraphError> {
        if !(1..=64).contains(&id_bits) {
            return Err(GraphError::Config("flat ID bits must be between 1 and 64"));
        }
        let mut keys = KeyGen::new(seed, super::CREATION_STREAM);
        let mut fresh = || Slot { key: keys.next_key(), version: 1, revision: 0 };
        let tek = fresh();
        let keks = (0..id_bits).map(|_| [fresh(), fresh()]).collect();
        Ok(Flat {
            id_bits,
            ids,
            policy,
            tek,
            keks,
            members: HashMap::new(),
            by_id: HashMap::new(),
            free_ids: BinaryHeap::new(),
            next_id: 0,
            free_slots: BinaryHeap::new(),
            slots: 0,
            batches: BatchCounter::new(),
        })
    }

    fn capacity(&self) -> u64 {
        (1u64.checked_shl(self.id_bits as u32).unwrap_or(0).wrapping_sub(1)).min(MAX_SLOTS - 1) + 1
    }

    fn kek_ref(&self, i: u8, b: usize) -> KeyRef {
        self.keks[i as usize][b].key_ref(flat_kek_id(i, b as u8))
    }

    /// KEKs held by any leaver: `tainted[i][b]`.
    fn tainted(&self, leaves: &[MemberId]) -> Vec<[bool; 2]> {
        let mut tainted = vec![[false; 2]; self.id_bits as usize];
        for m in leaves {
            let id = self.members[m].id;
            for i in 0..self.id_bits {
                tainted[i as usize][bit(id, i)] = true;
            }
        }
        tainted
    }

    /// Remaining members all of whose KEKs are tainted: indistinguishable from the leavers.
    /// Their IDs fix every bit where only one value is tainted, so when that set of IDs is
    /// smaller than the group it is enumerated instead of scanning every member.
    fn collateral(&self, leaves: &[MemberId], tainted: &[[bool; 2]]) -> Vec<MemberId> {
        if leaves.is_empty() {
            return Vec::new();
        }
        let leaving: HashSet<MemberId> = leaves.iter().copied().collect();
        let covered = |id: u64| (0..self.id_bits).all(|i| tainted[i as usize][bit(id, i)]);
        let free_bits: Vec<u8> = (0..self.id_bits).filter(|&i| tainted[i as usize] == [true, true]).collect();
        let mut out: Vec<MemberId> = if free_bits.len() < 63 && (1u64 << free_bits.len()) < self.members.len() as u64 {
            let fixed: u64 = (0..self.id_bits)
                .filter(|&i| tainted[i as usize] == [false, true])
                .fold(0, |acc, i| acc | (1u64 << i));
            (0..1u64 << free_bits.len())
                .map(|combo| free_bits.iter().enumerate().fold(fixed, |id, (j, &i)| id | (((combo >> j) & 1) << i)))
                .filter_map(|id| self.by_id.get(&id).copied())
                .filter(|m| !leaving.contains(m))
                .collect()
        } else {
            self.members.iter().filter(|(m, fm)| covered(fm.id) && !leaving.contains(m)).map(|(m, _)| *m).collect()
        };
        out.sort_unstable();
        out
    }

    /// The flat ID each joiner will get, checked before anything changes.
    fn plan_ids(&self, joins: &[MemberId], freed: &[MemberId]) -> Result<Vec<u64>, GraphError> {
        let freed_ids: HashSet<u64> = freed.iter().map(|m| self.members[m].id).collect();
        let taken = |id: u64| self.by_id.contains_key(&id) && !freed_ids.contains(&id);
        match self.ids {
            FlatIds::FromMemberId => joins
                .iter()
                .map(|&m| {
                    if self.id_bits < 64 && m.0 >> self.id_bits != 0 {
                        Err(GraphError::FlatIdTooWide { member: m, id: m.0, id_bits: self.id_bits })
                    } else if taken(m.0) {
                        Err(GraphError::FlatIdTaken { member: m, id: m.0 })
                    } else {
                        Ok(m.0)
                    }
                })
                .collect(),
            FlatIds::Sequential => {
                let mut free: Vec<u64> = self.free_ids.iter().map(|Reverse(id)| *id).chain(freed_ids).collect();
                free.sort_unstable();
                let fresh = (self.next_id..).take(joins.len().saturating_sub(free.len()));
                let ids: Vec<u64> = free.into_iter().chain(fresh).take(joins.len()).collect();
                match ids.last() {
                    Some(&last) if last >= self.capacity() => Err(GraphError::Full(self.capacity())),
                    _ => Ok(ids),
                }
            }
        }
    }

    fn remove(&mut self, member: MemberId) {
        let fm = self.members.remove(&member).expect("validated member");
        self.by_id.remove(&fm.id);
        if self.ids == FlatIds::Sequential {
            self.free_ids.push(Reverse(fm.id));
        }
        self.free_slots.push(Reverse(fm.slot));
    }

    fn add(&mut self, member: MemberId, id: u64, version: u32, keys: &mut KeyGen) -> Welcome {
        if self.ids == FlatIds::Sequential {
            if self.free_ids.peek() == Some(&Reverse(id)) {
                self.free_ids.pop();
            } else {
                self.next_id = id + 1;
            }
        }
        let slot = match self.free_slots.pop() {
            Some(Reverse(slot)) => slot,
            None => {
                self.slots += 1;
                self.slots - 1
            }
        };
        let individual = Slot { key: keys.next_key(), version, revision: 0 };
        let welcome = Welcome {
            member,
            position: Position::Flat { id, id_bits: self.id_bits },
            individual: individual.key_ref(KeyId(INDIVIDUAL_BASE + slot)),
            individual_key: individual.key.clone(),
        };
        self.members.insert(member, FlatMember { id, slot, individual });
        self.by_id.insert(id, member);
        welcome
    }

    /// New TEK for every untainted KEK; each tainted KEK replaced under f(old KEK, new TEK).
    #[allow(clippy::needless_range_loop)] // `b` is both an index and the bit value
    fn rekey_leave(&mut self, version: u32, tainted: &[[bool; 2]], keys: &mut KeyGen, plan: &mut RekeyPlan) {
        let tek_ref = KeyRef::new(TEK_ID, version, 0);
        let tek = keys.next_key();
        for i in 0..self.id_bits {
            for b in 0..2 {
                if !tainted[i as usize][b] {
                    let kek = &self.keks[i as usize][b];
                    plan.wraps.push(Wrap::seal(&kek.key, Wrapper::Key(self.kek_ref(i, b)), tek_ref, &tek, &plan.salt));
                }
            }
        }
        for i in 0..self.id_bits {
            for b in 0..2 {
                if tainted[i as usize][b] {
                    let old_ref = self.kek_ref(i, b);
                    let new_ref = KeyRef::new(old_ref.id, version, 0);
                    let new_kek = keys.next_key();
                    let wrapping = flat_replacement_wrapping_key(&self.keks[i as usize][b].key, old_ref, &tek, tek_ref);
                    let under = Wrapper::KekAndTek { kek: old_ref, tek: tek_ref };
                    plan.wraps.push(Wrap::seal(&wrapping, under, new_ref, &new_kek, &plan.salt));
                    plan.replaced.push(new_ref);
                    self.keks[i as usize][b] = Slot { key: new_kek, version: new_ref.version, revision: 0 };
                }
            }
        }
        plan.replaced.push(tek_ref);
        self.tek = Slot { key: tek, version: tek_ref.version, revision: 0 };
    }

    /// Moves a key a joiner will receive past every value it may have protected before.
    fn refresh_for_joiner(
        policy: JoinPolicy,
        version: u32,
        slot: &mut Slot,
        id: KeyId,
        keys: &mut KeyGen,
        plan: &mut RekeyPlan,
    ) -> Result<(), GraphError> {
        let old_ref = slot.key_ref(id);
        match policy {
            JoinPolicy::Revision => {
                let (new_ref, key) = next_revision(&slot.key, old_ref).ok_or(GraphError::VersionOverflow)?;
                plan.revised.push(new_ref);
                *slot = Slot { key, version: new_ref.version, revision: new_ref.revision };
            }
            JoinPolicy::NewVersion => {
                let new_ref = KeyRef::new(id, version, 0);
                let key = keys.next_key();
                plan.wraps.push(Wrap::seal(&slot.key, Wrapper::Key(old_ref), new_ref, &key, &plan.salt));
                plan.replaced.push(new_ref);
                *slot = Slot { key, version: new_ref.version, revision: 0 };
            }
        }
        Ok(())
    }

    fn rekey_join(&mut self, version: u32, ids: &[u64], tek_fresh: bool, fresh_keks: &[[bool; 2]], keys: &mut KeyGen, plan: &mut RekeyPlan) -> Result<(), GraphError> {
        if !tek_fresh {
            Self::refresh_for_joiner(self.policy, version, &mut self.tek, TEK_ID, keys, plan)?;
        }
        let mut needed = vec![[false; 2]; self.id_bits as usize];
        for &id in ids {
            for i in 0..self.id_bits {
                needed[i as usize][bit(id, i)] = true;
            }
        }
        for i in 0..self.id_bits {
            for b in 0..2 {
                if needed[i as usize][b] && !fresh_keks[i as usize][b] {
                    let slot = &mut self.keks[i as usize][b];
                    Self::refresh_for_joiner(self.policy, version, slot, flat_kek_id(i, b as u8), keys, plan)?;
                }
            }
        }
        Ok(())
    }

    /// The TEK and the joiner's KEKs, under its individual key.
    fn wraps_for_joiner(&self, welcome: &Welcome, salt: &NonceSalt) -> Vec<Wrap> {
        let Position::Flat { id, .. } = welcome.position else { unreachable!("flat welcome") };
        let under = Wrapper::Key(welcome.individual);
        let mut wraps = Vec::with_capacity(1 + self.id_bits as usize);
        wraps.push(Wrap::seal(&welcome.individual_key, under, self.tek.key_ref(TEK_ID), &self.tek.key, salt));
        for i in 0..self.id_bits {
            let b = bit(id, i);
            wraps.push(Wrap::seal(&welcome.individual_key, under, self.kek_ref(i, b), &self.keks[i as usize][b].key, salt));
        }
        wraps
    }
}

impl KeyGraph for Flat {
    fn config(&self) -> GraphConfig {
        GraphConfig { scheme: Scheme::Flat { id_bits: self.id_bits, ids: self.ids }, join_policy: self.policy }
    }

    fn apply(&mut self, batch: &Batch, seed: &BatchSeed) -> Result<RekeyPlan, GraphError> {
        validate_batch(batch, |m| self.members.contains_key(&m))?;
        let tainted = self.tainted(&batch.leaves);
        let excluded = self.collateral(&batch.leaves, &tainted);
        let removed: Vec<MemberId> = batch.leaves.iter().chain(&excluded).copied().collect();
        let ids = self.plan_ids(&batch.joins, &removed)?;

        if batch.is_empty() {
            return Ok(RekeyPlan { group_key: self.group_key().0, ..RekeyPlan::default() });
        }
        let version = self.batches.next_version()?;
        let mut keys = KeyGen::new(seed, 0);
        let mut plan = RekeyPlan { departed: batch.leaves.clone(), excluded, salt: nonce_salt(seed), ..RekeyPlan::default() };
        for &m in &removed {
            self.remove(m);
        }
        if !batch.leaves.is_empty() {
            self.rekey_leave(version, &tainted, &mut keys, &mut plan);
        }
        if !batch.joins.is_empty() {
            let fresh_keks = if batch.leaves.is_empty() { vec![[false; 2]; self.id_bits as usize] } else { tainted };
            self.rekey_join(version, &ids, !batch.leaves.is_empty(), &fresh_keks, &mut keys, &mut plan)?;
            for (&member, &id) in batch.joins.iter().zip(&ids) {
                let welcome = self.add(member, id, version, &mut keys);
                plan.welcomes.push(welcome);
            }
            let wraps: Vec<Vec<Wrap>> = plan.welcomes.par_iter().map(|w| self.wraps_for_joiner(w, &plan.salt)).collect();
            plan.wraps.extend(wraps.into_iter().flatten());
        }
        plan.group_key = self.tek.key_ref(TEK_ID);
        Ok(plan)
    }

    fn group_key(&self) -> (KeyRef, &Key) {
        (self.tek.key_ref(TEK_ID), &self.tek.key)
    }

    fn contains(&self, member: MemberId) -> bool {
        self.members.contains_key(&member)
    }

    fn individual_key(&self, member: MemberId) -> Option<Key> {
        Some(self.members.get(&member)?.individual.key.clone())
    }

    fn member_keys(&self, member: MemberId) -> Option<(Position, Vec<(KeyRef, Key)>)> {
        let fm = self.members.get(&member)?;
        let mut keys = vec![
            (fm.individual.key_ref(KeyId(INDIVIDUAL_BASE + fm.slot)), fm.individual.key.clone()),
            (self.tek.key_ref(TEK_ID), self.tek.key.clone()),
        ];
        for i in 0..self.id_bits {
            let b = bit(fm.id, i);
            keys.push((self.kek_ref(i, b), self.keks[i as usize][b].key.clone()));
        }
        Some((Position::Flat { id: fm.id, id_bits: self.id_bits }, keys))
    }

    fn export(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let mut out = zeroize::Zeroizing::new(Vec::new());
        Flat::export(self, &mut out);
        out
    }

    fn max_members(&self) -> u64 {
        self.capacity()
    }

    fn stats(&self) -> GraphStats {
        GraphStats {
            members: self.members.len(),
            stored_keys: 1 + 2 * self.id_bits as usize + self.members.len(),
            height: self.id_bits as u32,
        }
    }
}

/// True if `id` names a key that the member at flat ID `member_id` must hold.
pub fn flat_member_needs(id: KeyId, member_id: u64, id_bits: u8, individual: KeyId) -> bool {
    if id == TEK_ID || id == individual {
        return true;
    }
    let k = id.0.wrapping_sub(1);
    id.0 >= 1 && k < 2 * id_bits as u32 && bit(member_id, (k / 2) as u8) == (k % 2) as usize
}

/// A table handed over by a distributed flat group, or made from a tree (Caronni et al.,
/// figure 6).
impl Flat {
    /// The table of `tek` and `keks` (per ID bit, the KEKs of bit values 0 and 1) with
    /// `members`, each a flat ID (also its member ID) and its individual key; keys made by
    /// later batches get versions above `version`. Checked as a snapshot's table is.
    pub(crate) fn from_table(
        id_bits: u8,
        policy: JoinPolicy,
        version: u32,
        tek: &(KeyRef, Key),
        keks: Vec<[(KeyRef, Key); 2]>,
        members: Vec<(u64, Key)>,
    ) -> Result<Flat, DecodeError> {
        let members = members.into_iter().map(|(id, key)| (MemberId(id), id, key)).collect();
        Flat::from_parts(id_bits, FlatIds::FromMemberId, policy, version, tek, keks, members)
    }

    /// [`Flat::from_table`] with `members` as (member, flat ID, individual key) and IDs given
    /// out by `ids` from now on (sequential IDs continue above the highest one given).
    pub(crate) fn from_parts(
        id_bits: u8,
        ids: FlatIds,
        policy: JoinPolicy,
        version: u32,
        tek: &(KeyRef, Key),
        keks: Vec<[(KeyRef, Key); 2]>,
        members: Vec<(MemberId, u64, Key)>,
    ) -> Result<Flat, DecodeError> {
        if !(1..=64).contains(&id_bits) || keks.len() != usize::from(id_bits) {
            return Err(DecodeError::BadValue { field: "id bits", value: id_bits.into() });
        }
        let slot = |(key_ref, key): &(KeyRef, Key)| Slot { key: key.clone(), version: key_ref.version, revision: key_ref.revision };
        let slots = u32::try_from(members.len()).map_err(|_| DecodeError::BadValue { field: "flat members", value: members.len() as u64 })?;
        let next_id = match ids {
            FlatIds::Sequential => members.iter().map(|(_, id, _)| id.saturating_add(1)).max().unwrap_or(0),
            FlatIds::FromMemberId => 0,
        };
        let mut table = Flat {
            id_bits,
            ids,
            policy,
            tek: slot(tek),
            keks: keks.iter().map(|[zero, one]| [slot(zero), slot(one)]).collect(),
            members: HashMap::with_capacity(members.len()),
            by_id: HashMap::with_capacity(members.len()),
            free_ids: BinaryHeap::new(),
            next_id,
            free_slots: BinaryHeap::new(),
            slots,
            batches: BatchCounter(version),
        };
        for (n, (member, id, key)) in members.into_iter().enumerate() {
            let individual = Slot { key, version, revision: 0 };
            if table.by_id.insert(id, member).is_some() || table.members.insert(member, FlatMember { id, slot: n as u32, individual }).is_some() {
                return Err(DecodeError::BadValue { field: "flat member", value: id });
            }
        }
        if ids == FlatIds::Sequential {
            // Free IDs are listed one by one: a sparse sequential table would list too many.
            if next_id - u64::from(slots) > MAX_SLOTS {
                return Err(DecodeError::BadValue { field: "next flat id", value: next_id });
            }
            table.free_ids = (0..next_id).filter(|id| !table.by_id.contains_key(id)).map(Reverse).collect();
        }
        table.check_imported()?;
        Ok(table)
    }
}

/// What the flat-to-tree transition ([`super::transition`]) reads of a table.
impl Flat {
    pub(crate) fn id_bits(&self) -> u8 {
        self.id_bits
    }

    pub(crate) fn policy(&self) -> JoinPolicy {
        self.policy
    }

    /// The version the last batch gave its keys.
    pub(crate) fn batch_count(&self) -> u32 {
        self.batches.0
    }

    /// KEK(bit, value) and its ref.
    pub(crate) fn kek(&self, bit: u8, value: u8) -> (KeyRef, &Key) {
        (self.kek_ref(bit, value as usize), &self.keks[bit as usize][value as usize].key)
    }

    /// Every member with its flat ID and individual key, in ID order.
    pub(crate) fn members_by_id(&self) -> Vec<(MemberId, u64, Key)> {
        let mut members: Vec<(MemberId, u64, Key)> = self.members.iter().map(|(&m, fm)| (m, fm.id, fm.individual.key.clone())).collect();
        members.sort_unstable_by_key(|(_, id, _)| *id);
        members
    }
}

/// The table's whole state, for the controller's snapshots.
impl Flat {
    pub(crate) fn export(&self, out: &mut Vec<u8>) {
        let put_slot = |out: &mut Vec<u8>, slot: &Slot| {
            out.extend_from_slice(slot.key.as_bytes());
            out.put_u32(slot.version);
            out.put_u32(slot.revision);
        };
        // Sized up front: a growing buffer would leave copies of keys in freed memory.
        let slot = KEY_LEN + 8;
        out.reserve_exact(7 + slot * (1 + 2 * self.id_bits as usize) + 4 + (20 + slot) * self.members.len() + 4 + 8 * self.free_ids.len() + 8 + 4 + 4 * self.free_slots.len() + 4);
        out.put_u8(self.id_bits);
        out.put_u8(u8::from(self.ids == FlatIds::FromMemberId));
        out.put_u8(join_policy_byte(self.policy));
        out.put_u32(self.batches.0);
        put_slot(out, &self.tek);
        for pair in &self.keks {
            pair.iter().for_each(|slot| put_slot(out, slot));
        }
        let mut members: Vec<(&MemberId, &FlatMember)> = self.members.iter().collect();
        members.sort_unstable_by_key(|(m, _)| **m);
        out.put_u32(members.len() as u32);
        for (member, fm) in members {
            out.put_u64(member.0);
            out.put_u64(fm.id);
            out.put_u32(fm.slot);
            put_slot(out, &fm.individual);
        }
        let mut free_ids: Vec<u64> = self.free_ids.iter().map(|Reverse(id)| *id).collect();
        free_ids.sort_unstable();
        out.put_u32(free_ids.len() as u32);
        free_ids.iter().for_each(|id| out.put_u64(*id));
        out.put_u64(self.next_id);
        let mut free_slots: Vec<u32> = self.free_slots.iter().map(|Reverse(s)| *s).collect();
        free_slots.sort_unstable();
        out.put_u32(free_slots.len() as u32);
        free_slots.iter().for_each(|s| out.put_u32(*s));
        out.put_u32(self.slots);
    }

    pub(crate) fn import(r: &mut Reader<'_>) -> Result<Flat, DecodeError> {
        let read_slot = |r: &mut Reader<'_>| -> Result<Slot, DecodeError> {
            Ok(Slot { key: r.key("flat key")?, version: r.u32("key version")?, revision: r.u32("key revision")? })
        };
        let id_bits = r.u8("id bits")?;
        if !(1..=64).contains(&id_bits) {
            return Err(DecodeError::BadValue { field: "id bits", value: id_bits.into() });
        }
        let ids = if r.flag("flat ids from member ids")? { FlatIds::FromMemberId } else { FlatIds::Sequential };
        let policy = read_join_policy(r)?;
        let batches = BatchCounter(r.u32("batch counter")?);
        let tek = read_slot(r)?;
        let mut keks = Vec::with_capacity(id_bits as usize);
        for _ in 0..id_bits {
            keks.push([read_slot(r)?, read_slot(r)?]);
        }
        let count = r.count(4, MAX_SLOTS as usize, 20 + KEY_LEN + 8, "flat members")?;
        // Members, free ids and free slots in ascending order, as `export` writes them.
        let (mut members, mut by_id) = (HashMap::with_capacity(count), HashMap::with_capacity(count));
        let mut previous = None;
        for _ in 0..count {
            let member = r.member()?;
            let (id, slot) = (r.u64("flat id")?, r.u32("individual slot")?);
            let individual = read_slot(r)?;
            if previous.is_some_and(|p| p >= member) || by_id.insert(id, member).is_some() {
                return Err(DecodeError::BadValue { field: "flat member", value: member.0 });
            }
            previous = Some(member);
            members.insert(member, FlatMember { id, slot, individual });
        }
        let free_ids = super::read_ascending(r, "free flat ids", MAX_SLOTS as usize, 8, |r| r.u64("free flat id"))?;
        let next_id = r.u64("next flat id")?;
        let free_slots = super::read_ascending(r, "free slots", MAX_SLOTS as usize, 4, |r| r.u32("free slot"))?;
        let slots = r.u32("slots")?;
        let flat = Flat { id_bits, ids, policy, tek, keks, members, by_id, free_ids, next_id, free_slots, slots, batches };
        flat.check_imported()?;
        Ok(flat)
    }

    /// A snapshot's table must be one the table itself could hold: ids within its bits and
    /// below the next id, individual slots allocated once, free ids and slots unused.
    fn check_imported(&self) -> Result<(), DecodeError> {
        let bad = |field: &'static str, value: u64| Err(DecodeError::BadValue { field, value });
        let id_limit = if self.id_bits >= 64 { u64::MAX } else { 1u64 << self.id_bits };
        if self.next_id > id_limit {
            return bad("next flat id", self.next_id);
        }
        if u64::from(self.slots) > MAX_SLOTS {
            return bad("slots", self.slots.into());
        }
        let mut used_slots = std::collections::BTreeSet::new();
        for fm in self.members.values() {
            let sequential_id_too_high = self.ids == FlatIds::Sequential && fm.id >= self.next_id;
            if fm.id >= id_limit || sequential_id_too_high {
                return bad("flat id", fm.id);
            }
            if fm.slot >= self.slots || !used_slots.insert(fm.slot) {
                return bad("individual slot", fm.slot.into());
            }
        }
        if self.free_ids.iter().any(|Reverse(id)| *id >= self.next_id || self.by_id.contains_key(id)) {
            return bad("free flat ids", self.free_ids.len() as u64);
        }
        if self.free_slots.iter().any(|Reverse(s)| *s >= self.slots || used_slots.contains(s)) {
            return bad("free slots", self.free_slots.len() as u64);
        }
        Ok(())
    }
}

