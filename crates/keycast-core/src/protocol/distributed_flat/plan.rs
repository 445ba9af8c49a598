//! Who does what in a distributed flat change, computed alike by every participant from the
//! roster (Caronni et al. 3.4): IDs, the key relays of an exclusion and the contributors of a
//! join. Nothing here holds a key.

use std::collections::{BTreeMap, BTreeSet};

use aws_lc_rs::digest::{Context, SHA256};

use crate::graph::flat::flat_kek_id;
use crate::key::KeyId;
use crate::wire::GroupId;

use super::message::Identity;

const ID_DOMAIN: &[u8] = b"keycast/v2 dflat id";

/// Tries a joiner gets at a free ID before it is refused.
pub const MAX_ID_ATTEMPTS: u8 = 16;

/// Value of bit `bit` of `id`.
pub fn bit(id: u64, bit: u8) -> u8 {
    ((id >> bit) & 1) as u8
}

/// The ID of `identity` at `attempt`: SHA-256 of the group and the identity, cut to `id_bits`.
/// Attempt n is used only when attempts 0..n are held by others (see docs/distributed-flat.md).
pub fn participant_id(group: GroupId, identity: &Identity, attempt: u8, id_bits: u8) -> u64 {
    let mut ctx = Context::new(&SHA256);
    ctx.update(ID_DOMAIN);
    ctx.update(&group.0.to_be_bytes());
    ctx.update(&[attempt]);
    ctx.update(identity.as_str().as_bytes());
    let digest = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    let mask = if id_bits >= 64 { u64::MAX } else { (1u64 << id_bits) - 1 };
    u64::from_be_bytes(first) & mask
}

/// The KEK slot (bit, value) a key id names, if it names one of `id_bits` bits.
pub fn kek_slot(id: KeyId, id_bits: u8) -> Option<(u8, u8)> {
    let index = id.0.checked_sub(1)?;
    let bit = u8::try_from(index / 2).ok().filter(|b| *b < id_bits)?;
    Some((bit, (index % 2) as u8))
}

/// The key id of the KEK a participant with `id` holds for bit `j`.
pub fn own_kek_id(id: u64, j: u8) -> KeyId {
    flat_kek_id(j, bit(id, j))
}

/// The work of one exclusion of `departed` by `excluder`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayPlan {
    /// Participant → bits j under whose untainted KEK K(j, not d_j) it wraps the new TEK.
    pub tek_wraps: BTreeMap<u64, Vec<u8>>,
    /// Participant → bits j whose tainted KEK K(j, d_j) it replaces.
    pub replacements: BTreeMap<u64, Vec<u8>>,
    /// Relays that cannot open any wrap before theirs: the excluder sends them the new TEK over
    /// the private channel ("gaps between unrelated subgroups").
    pub grants: Vec<u64>,
}

impl RelayPlan {
    /// Key relays: everyone with work other than the excluder.
    pub fn relays(&self, excluder: u64) -> BTreeSet<u64> {
        self.tek_wraps.keys().chain(self.replacements.keys()).copied().filter(|p| *p != excluder).collect()
    }

    pub fn has_work(&self, participant: u64) -> bool {
        self.tek_wraps.contains_key(&participant) || self.replacements.contains_key(&participant)
    }

    /// The participant that replaces tainted KEK K(j, d_j), if anyone still holds it.
    pub fn replacer(&self, j: u8) -> Option<u64> {
        self.replacements.iter().find(|(_, bits)| bits.contains(&j)).map(|(p, _)| *p)
    }
}

/// The relay plan for removing `departed`, over `live` (the roster without the departed).
///
/// Every untainted KEK with a live holder must carry a wrap of the new TEK. The excluder covers
/// its own; then, repeatedly, the lowest participant that can already open a wrap and holds an
/// uncovered KEK covers all of its uncovered KEKs; if no one can, the lowest holder of the
/// lowest uncovered KEK gets the TEK privately and covers its KEKs. Each tainted KEK with a live
/// holder is replaced by the excluder if it holds it, else by its lowest live holder.
pub fn relay_plan(live: &BTreeSet<u64>, id_bits: u8, excluder: u64, departed: u64) -> RelayPlan {
    let untainted_held = |p: u64, j: u8| bit(p, j) != bit(departed, j);
    let needed: BTreeSet<u8> = (0..id_bits).filter(|&j| live.iter().any(|&p| untainted_held(p, j))).collect();
    let mut plan = RelayPlan::default();
    let mut covered = BTreeSet::new();
    let assign = |p: u64, covered: &mut BTreeSet<u8>, plan: &mut RelayPlan| {
        let bits: Vec<u8> = needed.iter().copied().filter(|&j| untainted_held(p, j) && !covered.contains(&j)).collect();
        covered.extend(bits.iter().copied());
        if !bits.is_empty() {
            plan.tek_wraps.insert(p, bits);
        }
    };
    assign(excluder, &mut covered, &mut plan);
    while covered.len() < needed.len() {
        let can_open = |p: u64| covered.iter().any(|&j| untainted_held(p, j));
        let holds_uncovered = |p: u64| needed.iter().any(|&j| !covered.contains(&j) && untainted_held(p, j));
        let next = live.iter().copied().find(|&p| can_open(p) && holds_uncovered(p));
        let relay = match next {
            Some(p) => p,
            None => {
                let j = needed.iter().copied().find(|j| !covered.contains(j)).expect("an uncovered bit");
                let p = live.iter().copied().find(|&p| untainted_held(p, j)).expect("needed bits have holders");
                plan.grants.push(p);
                p
            }
        };
        assign(relay, &mut covered, &mut plan);
    }
    for j in 0..id_bits {
        let replacer = if bit(excluder, j) == bit(departed, j) {
            Some(excluder)
        } else {
            live.iter().copied().find(|&p| bit(p, j) == bit(departed, j))
        };
        if let Some(p) = replacer {
            plan.replacements.entry(p).or_default().push(j);
        }
    }
    plan
}

/// Who hands a joiner its KEK for bit `j`: the introducer for the KEKs they share, else the
/// lowest live holder (None: nobody holds it, the introducer creates it).
pub fn contributor(roster: &BTreeMap<u64, Identity>, introducer: u64, joiner: u64, j: u8) -> Option<u64> {
    let value = bit(joiner, j);
    if bit(introducer, j) == value {
        return Some(introducer);
    }
    roster.keys().copied().find(|&p| p != joiner && bit(p, j) == value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_live_participant_is_reached_and_every_tainted_key_replaced() {
        for departed in 0u64..16 {
            for excluder in 0u64..16 {
                if excluder == departed {
                    continue;
                }
                let live: BTreeSet<u64> = (0..16).filter(|p| *p != departed).collect();
                let plan = relay_plan(&live, 4, excluder, departed);
                let wrapped: BTreeSet<u8> = plan.tek_wraps.values().flatten().copied().collect();
                for &p in &live {
                    assert!((0..4).any(|j| bit(p, j) != bit(departed, j) && wrapped.contains(&j)), "{p} gets no wrap");
                }
                for j in 0..4 {
                    assert_eq!(plan.replacer(j).map(|p| bit(p, j)), Some(bit(departed, j)), "bit {j}");
                }
                assert!(plan.grants.is_empty(), "a full table always has a path");
            }
        }
    }

    #[test]
    fn a_relay_that_shares_no_untainted_key_with_the_excluder_gets_a_grant() {
        // departed 00, excluder 01 (reaches bit 0), participant 10 holds only K(1,1) untainted.
        let live = BTreeSet::from([0b01, 0b10]);
        let plan = relay_plan(&live, 2, 0b01, 0b00);
        assert_eq!(plan.grants, vec![0b10]);
        assert_eq!(plan.tek_wraps[&0b10], vec![1]);
    }

    #[test]
    fn ids_fit_their_bits_and_attempts_differ() {
        let who = Identity::new("alice").unwrap();
        let ids: BTreeSet<u64> = (0..8).map(|a| participant_id(GroupId(1), &who, a, 20)).collect();
        assert!(ids.iter().all(|id| *id < 1 << 20));
        assert_eq!(ids.len(), 8);
        assert_eq!(kek_slot(flat_kek_id(3, 1), 4), Some((3, 1)));
        assert_eq!(kek_slot(flat_kek_id(4, 0), 4), None);
        assert_eq!(kek_slot(KeyId(0), 4), None);
    }
}
