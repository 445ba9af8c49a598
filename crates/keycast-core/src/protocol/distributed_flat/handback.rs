//! Distributed flat back to centralized flat (Caronni et al., figure 6: "a participant or a new
//! controller is appointed and collects the table"), sans-IO. Each participant hands its ID,
//! TEK and KEKs ([`Participant::held_keys`](super::Participant::held_keys)) to the appointed
//! controller over the mutually authenticated channel; the collector checks every handover
//! against the others (one TEK; for every KEK slot, all holders agree on the ref and the key)
//! and then builds the controller's flat table. Live participants that did not hand over are
//! put in the table and removed by the new controller's first rekeys, one leave each (a flat
//! table removes several members in one batch only by excluding every member all of whose
//! KEKs they hold), which replace the TEK and every KEK they held: they are out and must rejoin.
//!
//! The new controller learns every key of the table: it must be trusted as any controller is.

use std::collections::{BTreeMap, BTreeSet};


use crate::graph::flat::Flat;
use crate::graph::{Batch, JoinPolicy, KeyGraph, MemberId, RekeyPlan};
use crate::key::{Key, KeyRef};
use crate::keygen::{BatchSeed, KeyGen};

use super::plan::{bit, kek_slot};
use super::{Identity, TEK_ID};

/// Why a handover or the table was refused; the collector is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandbackRefused {
    #[error("{0} is not the live participant of ID {1}")]
    NotInRoster(Identity, u64),
    #[error("{0}, or its ID, has handed over already")]
    Duplicate(Identity),
    #[error("not one TEK and one KEK per ID bit of this ID")]
    NotItsKeys,
    #[error("TEK {0} is not the TEK in force")]
    OtherTek(KeyRef),
    #[error("{0} disagrees with an earlier handover")]
    Conflict(KeyRef),
    #[error("nobody handed over")]
    Empty,
    #[error("the table does not import: {0}")]
    Table(String),
}

/// The appointed controller's collection of the participants' keys.
pub struct TableCollector {
    id_bits: u8,
    roster: BTreeMap<u64, Identity>,
    tek_in_force: KeyRef,
    tek: Option<(KeyRef, Key)>,
    keks: Vec<[Option<(KeyRef, Key)>; 2]>,
    handed: BTreeMap<u64, Identity>,
}

impl core::fmt::Debug for TableCollector {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("TableCollector").field("id_bits", &self.id_bits).field("handed", &self.handed).finish()
    }
}

/// The new controller's start: its table, each member's individual key (to hand it over the
/// member's channel), and its first rekeys.
pub struct Handback {
    pub graph: Box<dyn KeyGraph>,
    /// Members that handed over: member ID (their flat ID) and individual key.
    pub members: BTreeMap<Identity, (MemberId, (KeyRef, Key))>,
    /// Live participants that did not hand over, removed by `rekeys`.
    pub removed: BTreeMap<u64, Identity>,
    /// The rekeys that remove them, one leave each in ascending ID order (none if everyone
    /// handed over): the members apply them in order.
    pub rekeys: Vec<RekeyPlan>,
}

impl TableCollector {
    /// A collection for the live participants `roster` at TEK `tek_in_force`, as the appointed
    /// controller knows them (a participant itself, or told by one it trusts): anyone else, or
    /// keys of another TEK, are refused, so a stale participant cannot poison the collection.
    pub fn new(id_bits: u8, roster: BTreeMap<u64, Identity>, tek_in_force: KeyRef) -> Self {
        TableCollector { id_bits, roster, tek_in_force, tek: None, keks: vec![[None, None]; id_bits as usize], handed: BTreeMap::new() }
    }

    /// Participants that handed over, by ID.
    pub fn handed(&self) -> &BTreeMap<u64, Identity> {
        &self.handed
    }

    /// `who` (the identity its certificate proved) hands over its ID and keys: checked against
    /// every earlier handover before anything is kept.
    pub fn hand_over(&mut self, who: &Identity, id: u64, keys: &[(KeyRef, Key)]) -> Result<(), HandbackRefused> {
        let bits = self.id_bits;
        if self.roster.get(&id) != Some(who) {
            return Err(HandbackRefused::NotInRoster(who.clone(), id));
        }
        if self.handed.contains_key(&id) || self.handed.values().any(|w| w == who) {
            return Err(HandbackRefused::Duplicate(who.clone()));
        }
        let mut tek = None;
        let mut keks: Vec<Option<&(KeyRef, Key)>> = vec![None; bits as usize];
        for pair in keys {
            match kek_slot(pair.0.id, bits) {
                None if pair.0.id == TEK_ID && tek.is_none() => tek = Some(pair),
                Some((j, v)) if bit(id, j) == v && keks[j as usize].is_none() => keks[j as usize] = Some(pair),
                _ => return Err(HandbackRefused::NotItsKeys),
            }
        }
        let (Some(tek), true) = (tek, keks.iter().all(Option::is_some)) else { return Err(HandbackRefused::NotItsKeys) };
        if tek.0 != self.tek_in_force {
            return Err(HandbackRefused::OtherTek(tek.0));
        }
        // Key equality is constant-time.
        let agrees = |known: &Option<(KeyRef, Key)>, new: &(KeyRef, Key)| known.as_ref().is_none_or(|k| k == new);
        if !agrees(&self.tek, tek) {
            return Err(HandbackRefused::Conflict(tek.0));
        }
        for (j, kek) in keks.iter().flatten().enumerate() {
            if !agrees(&self.keks[j][bit(id, j as u8) as usize], kek) {
                return Err(HandbackRefused::Conflict(kek.0));
            }
        }
        self.tek = Some(tek.clone());
        for (j, kek) in keks.into_iter().flatten().enumerate() {
            self.keks[j][bit(id, j as u8) as usize] = Some(kek.clone());
        }
        self.handed.insert(id, who.clone());
        Ok(())
    }

    /// The controller's flat table, from the handovers: member IDs are the flat IDs (`FlatIds::FromMemberId`); a
    /// slot nobody handed over gets a fresh key; key versions continue above every version
    /// handed over. Live participants that did not hand over are members of the table only
    /// until `rekeys` remove them.
    pub fn build(self, join_policy: JoinPolicy, seed: &BatchSeed) -> Result<Handback, HandbackRefused> {
        let Some(tek) = &self.tek else { return Err(HandbackRefused::Empty) };
        let bits = self.id_bits;
        let mut keys = KeyGen::new(seed, 0);
        let removed: BTreeMap<u64, Identity> = self.roster.iter().filter(|(id, _)| !self.handed.contains_key(id) && *id >> bits == 0).map(|(id, w)| (*id, w.clone())).collect();
        let members: BTreeSet<u64> = self.handed.keys().chain(removed.keys()).copied().collect();
        let handed_versions = self.keks.iter().flatten().flatten().map(|(r, _)| r.version);
        let top_version = handed_versions.chain([tek.0.version.saturating_mul(2).saturating_add(1)]).max().unwrap_or(1);
        // A KEK slot nobody handed over (no live participant holds it) gets a fresh key.
        let mut fresh = || (KeyRef::new(TEK_ID, top_version, 0), keys.next_key());
        let keks = self.keks.iter().map(|pair| pair.clone().map(|slot| slot.unwrap_or_else(&mut fresh))).collect();
        let members = members.iter().map(|&id| (id, keys.next_key())).collect();
        let table = Flat::from_table(bits, join_policy, top_version, tek, keks, members).map_err(|e| HandbackRefused::Table(e.to_string()))?;
        let mut graph: Box<dyn KeyGraph> = Box::new(table);
        let mut rekeys = Vec::with_capacity(removed.len());
        for (n, id) in removed.keys().enumerate() {
            let batch = Batch { joins: Vec::new(), leaves: vec![MemberId(*id)] };
            let seed = BatchSeed::from_bytes(KeyGen::new(seed, 1 + n as u64).next_key().as_bytes().to_owned());
            rekeys.push(graph.apply(&batch, &seed).map_err(|e| HandbackRefused::Table(e.to_string()))?);
        }
        let individual = |id: u64| graph.member_keys(MemberId(id)).and_then(|(_, keys)| keys.into_iter().next());
        let members = self.handed.iter().filter_map(|(id, who)| Some((who.clone(), (MemberId(*id), individual(*id)?)))).collect();
        Ok(Handback { graph, members, removed, rekeys })
    }
}
