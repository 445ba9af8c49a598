//! Caronni et al.'s distributed flat key management (section 3.4), sans-IO: no controller;
//! every participant holds the TEK and the KEKs of its ID bits, admits newcomers as an
//! introducer, removes others as an excluder and relays keys it holds for others' changes.
//!
//! Inputs are the driver's: announcements from the multicast channel, private messages from
//! the authenticated channel (with the identity its certificate proved), orders (admit,
//! exclude, leave), entropy and the time. Outputs are messages to send and timers to set.
//! See docs/distributed-flat.md for the protocol, the conflict rule and the costs.

pub mod audit;
pub mod handback;
pub mod message;
pub mod plan;
pub mod traffic;

use std::collections::{BTreeMap, BTreeSet};

use zeroize::Zeroizing;

use crate::graph::flat::flat_kek_id;
use crate::key::{Key, KeyId, KeyRef};
use crate::keygen::{nonce_salt, BatchSeed, KeyGen};
use crate::wire::auth::{Signer, VerifyingKey};
use crate::wire::{DecodeError, GroupId};
use crate::wrap::{derive_revision, flat_replacement_wrapping_key, Wrap, Wrapper};

pub use message::{Announcement, Appointment, Body, ChangeDigest, ChangeRef, Exclusion, HandbackKeys, Handover, Identity, JoinGrant, Joined, Presence, Private, Relay};
pub use plan::{participant_id, relay_plan, RelayPlan};

use plan::{bit, contributor, kek_slot, own_kek_id, MAX_ID_ATTEMPTS};

const TEK_ID: KeyId = KeyId(0);
/// Announcements kept until the change they build on arrives.
const MAX_PENDING: usize = 64;
/// TEK grants kept until their exclusion arrives.
const MAX_EARLY_GRANTS: usize = 8;

/// Settings every participant of a group shares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub group: GroupId,
    /// Bits of a participant ID: 2 KEKs per bit.
    pub id_bits: u8,
    /// How long competing exclusions of one TEK are awaited before the winner is final.
    pub settle_ms: u64,
}

/// The certificates of the group's ACL: who may take part, and the key each signs with.
pub type Directory = BTreeMap<Identity, VerifyingKey>;

#[derive(Debug)]
pub enum Output {
    Multicast(Vec<u8>),
    /// Over the authenticated, encrypted channel to `to` (it carries keys).
    Private { to: Identity, bytes: Zeroizing<Vec<u8>> },
    /// Call [`Participant::tick`] at this time.
    Timer { at_ms: u64 },
    Event(Event),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The TEK in force changed (new version or revision).
    TekChanged(KeyRef),
    /// This participant is no longer in the group (the TEK version that removed it).
    Departed { tek_version: u32 },
    /// Another history of the group (after a partition) ranks above this participant's: it
    /// stops and must rejoin through an introducer of that history.
    Diverged { winner: ChangeRef },
}

/// Why an input or an order was refused; the participant is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("message for group {0:?}")]
    WrongGroup(GroupId),
    #[error("{0} is not in the group's directory")]
    UnknownSigner(Identity),
    #[error("signature does not verify under {0}'s key")]
    BadSignature(Identity),
    #[error("replayed announcement {seq} of {signer}")]
    Replay { signer: Identity, seq: u64 },
    #[error("{0} is not a live participant")]
    NotLive(Identity),
    #[error("announcement built on a change this participant has passed")]
    Stale,
    #[error("invalid: {0}")]
    Invalid(&'static str),
    #[error("busy: an exclusion is settling or keys are missing")]
    Busy,
    #[error("this participant is not (or no longer) in the group")]
    NotInGroup,
    #[error("no free ID for {0} after {MAX_ID_ATTEMPTS} attempts")]
    NoFreeId(Identity),
    /// A handback to the appointed controller, refused by its collection.
    #[error("handback refused: {0}")]
    Handback(#[from] handback::HandbackRefused),
}

/// A key this participant holds.
#[derive(Clone)]
struct Held {
    key_ref: KeyRef,
    key: Key,
}

impl Held {
    fn pair(&self) -> (KeyRef, Key) {
        (self.key_ref, self.key.clone())
    }

    /// This key advanced to `to`'s revision, if `to` is this key at the same or a later one.
    fn at(&self, to: KeyRef) -> Option<Key> {
        derive_revision(&self.key, self.key_ref, to)
    }
}

/// What a participant knows of the group: its keys and the public state.
#[derive(Clone)]
struct GroupState {
    change: ChangeRef,
    /// None while the TEK of a change has not reached this participant yet.
    tek: Option<Held>,
    /// KEK of each ID bit (None: awaited from a relay or a contributor).
    keks: Vec<Option<Held>>,
    /// Current ref of every KEK slot and whether a live participant holds it.
    table: Vec<[(KeyRef, bool); 2]>,
    roster: BTreeMap<u64, Identity>,
    revoked: BTreeSet<Identity>,
}

impl GroupState {
    fn live_without(&self, departed: u64) -> BTreeSet<u64> {
        self.roster.keys().copied().filter(|p| *p != departed).collect()
    }

    fn id_of(&self, who: &Identity) -> Option<u64> {
        self.roster.iter().find(|(_, w)| *w == who).map(|(id, _)| *id)
    }
}

/// An exclusion round: the state before it and every message for it. The state in force is
/// recomputed from these, so it depends on the set of messages and not on their order.
struct Round {
    base: GroupState,
    opened_ms: u64,
    /// Competing exclusions of `base`, by rank: (digest, excluder ID); the first wins.
    exclusions: BTreeMap<(ChangeDigest, u64), (Identity, Exclusion)>,
    relays: Vec<(u64, Relay)>,
    /// New TEKs known directly: made here or granted by their excluder.
    teks: BTreeMap<ChangeDigest, Key>,
    relayed: BTreeSet<ChangeDigest>,
}

#[derive(Clone, Copy, Debug, Default)]
struct SeqWindow {
    highest: u64,
    seen: u64,
}

impl SeqWindow {
    /// Whether `accept` would take `seq` (changes nothing).
    fn fresh(&self, seq: u64) -> bool {
        let back = self.highest.saturating_sub(seq);
        seq > self.highest || (back < 64 && (self.seen >> back) & 1 == 0)
    }

    /// Accepts each seq once, and none more than 64 behind the highest.
    fn accept(&mut self, seq: u64) -> bool {
        if seq > self.highest {
            let shift = seq - self.highest;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift } | 1;
            self.highest = seq;
            return true;
        }
        let back = self.highest - seq;
        if back >= 64 || (self.seen >> back) & 1 == 1 {
            return false;
        }
        self.seen |= 1 << back;
        true
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Joining,
    Live,
    Departed,
    Diverged,
}

/// One participant of a distributed flat group.
pub struct Participant {
    config: Config,
    me: Identity,
    id: u64,
    signer: Signer,
    directory: Directory,
    phase: Phase,
    seq: u64,
    state: GroupState,
    round: Option<Round>,
    replay: BTreeMap<Identity, SeqWindow>,
    /// With the time each arrived.
    pending: Vec<(Announcement, ChangeDigest, u64)>,
    early_keys: Vec<(Identity, (KeyRef, Key))>,
    /// TEK grants that came before their exclusion.
    early_teks: Vec<(Identity, ChangeDigest, (KeyRef, Key))>,
    /// IDs this participant must see removed (its own exclusions, whether evictions, and
    /// leaves it carries out): excluded again after a competing change won.
    watching: BTreeMap<u64, bool>,
    now_ms: u64,
    /// Set while the members of a centralized group hand over (until this time).
    handover_until: Option<u64>,
    /// The roster size that ends the handover early (the centralized group's size), if known.
    handover_members: Option<usize>,
    out: Vec<Output>,
}

impl core::fmt::Debug for Participant {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Participant").field("identity", &self.me).field("id", &self.id).field("phase", &self.phase).finish()
    }
}

impl Participant {
    /// The first participant: it finds no group and creates the TEK and its own KEKs.
    pub fn create(config: Config, me: Identity, signer: Signer, directory: Directory, entropy: &BatchSeed) -> Result<Self, Refused> {
        if !(1..=63).contains(&config.id_bits) {
            return Err(Refused::Invalid("ID bits must be between 1 and 63"));
        }
        let id = participant_id(config.group, &me, 0, config.id_bits);
        let mut keys = KeyGen::new(entropy, 0);
        let genesis = ChangeRef { tek_version: 1, change: [0; 16] };
        let mut table = vec![[(KeyRef::default(), false); 2]; config.id_bits as usize];
        let mut keks = Vec::with_capacity(config.id_bits as usize);
        for j in 0..config.id_bits {
            for value in 0..2 {
                table[j as usize][value as usize] = (KeyRef::new(flat_kek_id(j, value), creation_version(1), 0), false);
            }
            let key_ref = KeyRef::new(own_kek_id(id, j), creation_version(1), 0);
            table[j as usize][bit(id, j) as usize].1 = true;
            keks.push(Some(Held { key_ref, key: keys.next_key() }));
        }
        let state = GroupState {
            change: genesis,
            tek: Some(Held { key_ref: KeyRef::new(TEK_ID, 1, 0), key: keys.next_key() }),
            keks,
            table,
            roster: BTreeMap::from([(id, me.clone())]),
            revoked: BTreeSet::new(),
        };
        let mut participant = Participant::joining(config, me, signer, directory);
        participant.id = id;
        participant.state = state;
        participant.phase = Phase::Live;
        Ok(participant)
    }

    /// A member of a centralized flat group whose controller is lost continues as a participant
    /// with the keys it holds (figure 6): it multicasts its ID and key refs, collects the
    /// others' for `settle_ms`, and then works as any participant. `keys` are the member's TEK
    /// and KEKs (other keys, such as its individual key, are left out by the caller).
    pub fn from_centralized(config: Config, me: Identity, signer: Signer, directory: Directory, id: u64, keys: Vec<(KeyRef, Key)>, now_ms: u64) -> Result<(Self, Vec<Output>), Refused> {
        let bits = config.id_bits;
        if !(1..=63).contains(&bits) || id >> bits != 0 {
            return Err(Refused::Invalid("ID does not fit the ID bits"));
        }
        let mut participant = Participant::joining(config, me, signer, directory);
        let (mut tek, mut keks) = (None, vec![None; bits as usize]);
        for (key_ref, key) in keys {
            match kek_slot(key_ref.id, bits) {
                None if key_ref.id == TEK_ID && tek.is_none() => tek = Some(Held { key_ref, key }),
                Some((j, v)) if bit(id, j) == v && keks[j as usize].is_none() => keks[j as usize] = Some(Held { key_ref, key }),
                _ => return Err(Refused::Invalid("not one TEK and one KEK per ID bit of this ID")),
            }
        }
        let tek = tek.ok_or(Refused::Invalid("no TEK"))?;
        if keks.iter().any(Option::is_none) {
            return Err(Refused::Invalid("a KEK of this ID is missing"));
        }
        let mut table = vec![[(KeyRef::default(), false); 2]; bits as usize];
        for (j, held) in keks.iter().flatten().enumerate() {
            table[j][bit(id, j as u8) as usize] = (held.key_ref, true);
        }
        let handover = Handover {
            base: ChangeRef { tek_version: tek.key_ref.version, change: [0; 16] },
            id,
            tek: tek.key_ref,
            keks: keks.iter().flatten().map(|h| h.key_ref).collect(),
        };
        participant.id = id;
        participant.state = GroupState {
            change: handover.base,
            tek: Some(tek),
            keks,
            table,
            roster: BTreeMap::from([(id, participant.me.clone())]),
            revoked: BTreeSet::new(),
        };
        participant.phase = Phase::Live;
        participant.now_ms = now_ms;
        participant.handover_until = Some(now_ms.saturating_add(config.settle_ms));
        let bytes = participant.announce(Body::Handover(handover));
        participant.out.push(Output::Multicast(bytes));
        participant.out.push(Output::Timer { at_ms: now_ms.saturating_add(config.settle_ms) });
        let outputs = participant.drain();
        Ok((participant, outputs))
    }

    /// A newcomer waiting for its introducer's grant.
    pub fn joining(config: Config, me: Identity, signer: Signer, directory: Directory) -> Self {
        let state = GroupState {
            change: ChangeRef { tek_version: 0, change: [0; 16] },
            tek: None,
            keks: vec![None; config.id_bits as usize],
            table: Vec::new(),
            roster: BTreeMap::new(),
            revoked: BTreeSet::new(),
        };
        Participant {
            config,
            me,
            id: 0,
            signer,
            directory,
            phase: Phase::Joining,
            seq: 0,
            state,
            round: None,
            replay: BTreeMap::new(),
            pending: Vec::new(),
            early_keys: Vec::new(),
            early_teks: Vec::new(),
            watching: BTreeMap::new(),
            now_ms: 0,
            handover_until: None,
            handover_members: None,
            out: Vec::new(),
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.me
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn is_live(&self) -> bool {
        self.phase == Phase::Live
    }

    /// Whether this participant holds the TEK and all its KEKs and no exclusion is settling.
    pub fn is_settled(&self) -> bool {
        self.is_live() && self.round.is_none() && self.handover_until.is_none() && self.state.tek.is_some() && self.state.keks.iter().all(Option::is_some)
    }

    /// Why this participant is not settled, for diagnostics: whether an exclusion round is
    /// open, and the ID bits whose KEK it awaits.
    pub fn awaiting(&self) -> (bool, Vec<u8>) {
        let missing = (0..self.config.id_bits).filter(|&j| self.state.keks[j as usize].is_none()).collect();
        (self.round.is_some(), missing)
    }

    /// The change that made the TEK version in force.
    pub fn change(&self) -> ChangeRef {
        self.state.change
    }

    /// The TEK in force, if this participant holds it.
    pub fn tek(&self) -> Option<(KeyRef, &Key)> {
        self.state.tek.as_ref().map(|h| (h.key_ref, &h.key))
    }

    /// Every key held (TEK first), for audits and tests: this is secret material.
    pub fn held_keys(&self) -> Vec<(KeyRef, Key)> {
        self.state.tek.iter().chain(self.state.keks.iter().flatten()).map(Held::pair).collect()
    }

    /// This participant's signed presence: its private channel listens at `listener`.
    pub fn presence(&self, listener: std::net::SocketAddrV4, now_ms: u64) -> Vec<u8> {
        Presence { group: self.config.group, signer: self.me.clone(), at_ms: now_ms, listener }.sign(&self.signer)
    }

    /// Live participants as this participant knows them.
    pub fn roster(&self) -> &BTreeMap<u64, Identity> {
        &self.state.roster
    }

    /// Admits `joiner` (its certificate already checked by the driver): the introducer's
    /// part of a join. Outputs the Joined announcement and the grant to the joiner.
    pub fn admit(&mut self, joiner: &Identity, entropy: &BatchSeed, now_ms: u64) -> Result<Vec<Output>, Refused> {
        self.now_ms = now_ms;
        if !self.is_settled() {
            return Err(Refused::Busy);
        }
        self.check_admissible(joiner)?;
        let attempt = (0..MAX_ID_ATTEMPTS)
            .find(|&a| !self.state.roster.contains_key(&participant_id(self.config.group, joiner, a, self.config.id_bits)))
            .ok_or_else(|| Refused::NoFreeId(joiner.clone()))?;
        let joiner_id = participant_id(self.config.group, joiner, attempt, self.config.id_bits);
        let tek = self.state.tek.as_ref().expect("settled").key_ref.next_revision().ok_or(Refused::Invalid("revision space exhausted"))?;
        let mut keys = KeyGen::new(entropy, 0);
        let (mut revised, mut created, mut created_keys) = (Vec::new(), Vec::new(), Vec::new());
        for j in 0..self.config.id_bits {
            let (slot_ref, held) = self.state.table[j as usize][bit(joiner_id, j) as usize];
            if held {
                revised.push(slot_ref.next_revision().ok_or(Refused::Invalid("revision space exhausted"))?);
            } else {
                let key_ref = KeyRef::new(own_kek_id(joiner_id, j), creation_version(self.state.change.tek_version), 0);
                created.push(key_ref);
                created_keys.push((key_ref, keys.next_key()));
            }
        }
        let joined = Joined { base: self.state.change, joiner: joiner.clone(), attempt, joiner_id, tek, revised, created };
        self.apply_joined(self.id, joined.clone())?;
        let bytes = self.announce(Body::Joined(joined));
        let shared = (0..self.config.id_bits).filter(|&j| bit(self.id, j) == bit(joiner_id, j));
        let keks = shared.filter_map(|j| self.state.keks[j as usize].as_ref().map(Held::pair)).chain(created_keys).collect();
        let grant = JoinGrant {
            attempt,
            change: self.state.change,
            tek: self.state.tek.as_ref().expect("settled").pair(),
            keks,
            table: self.state.table.clone(),
            roster: self.state.roster.iter().map(|(id, who)| (*id, who.clone())).collect(),
            revoked: self.state.revoked.iter().cloned().collect(),
        };
        self.out.push(Output::Multicast(bytes));
        self.out.push(Output::Private { to: joiner.clone(), bytes: Private::JoinGrant(grant).encode(self.config.group) });
        Ok(self.drain())
    }

    /// Removes participant `departed` as its excluder (an eviction also revokes its identity).
    pub fn exclude(&mut self, departed: u64, eviction: bool, entropy: &BatchSeed, now_ms: u64) -> Result<Vec<Output>, Refused> {
        self.now_ms = now_ms;
        if !self.is_settled() {
            return Err(Refused::Busy);
        }
        let departed_identity = self.state.roster.get(&departed).cloned().ok_or(Refused::Invalid("not a participant"))?;
        if departed == self.id {
            return Err(Refused::Invalid("an excluder cannot exclude itself; leave instead"));
        }
        let version = self.state.change.tek_version.checked_add(1).ok_or(Refused::Invalid("version space exhausted"))?;
        let new_tek = KeyRef::new(TEK_ID, version, 0);
        let plan = relay_plan(&self.state.live_without(departed), self.config.id_bits, self.id, departed);
        let mut keys = KeyGen::new(entropy, 0);
        let tek = keys.next_key();
        let wraps = self.relay_wraps(&plan, new_tek, &tek, &self.state, entropy);
        let exclusion = Exclusion { base: self.state.change, departed, departed_identity, eviction, new_tek, wraps };
        let bytes = self.announce(Body::Exclusion(exclusion.clone()));
        let digest = message::change_digest(&bytes);
        self.open_round(self.id, self.me.clone(), exclusion, digest);
        let round = self.round.as_mut().expect("opened");
        round.teks.insert(digest, tek.clone());
        round.relayed.insert(digest);
        self.watching.insert(departed, eviction);
        self.out.push(Output::Multicast(bytes));
        for grantee in &plan.grants {
            let to = self.state.roster[grantee].clone();
            let grant = Private::TekGrant { change: digest, tek: (new_tek, tek.clone()) };
            self.out.push(Output::Private { to, bytes: grant.encode(self.config.group) });
        }
        self.recompute(entropy);
        Ok(self.drain())
    }

    /// Asks to leave: the lowest other participant excludes this one.
    pub fn leave(&mut self, now_ms: u64) -> Result<Vec<Output>, Refused> {
        self.now_ms = now_ms;
        if !self.is_live() {
            return Err(Refused::NotInGroup);
        }
        let bytes = self.announce(Body::LeaveRequest { base: self.state.change });
        self.out.push(Output::Multicast(bytes));
        Ok(self.drain())
    }

    /// An announcement from the multicast channel.
    pub fn receive(&mut self, bytes: &[u8], entropy: &BatchSeed, now_ms: u64) -> Result<Vec<Output>, Refused> {
        self.now_ms = now_ms;
        if self.phase != Phase::Live {
            return Err(Refused::NotInGroup);
        }
        let (ann, signature) = Announcement::decode(bytes)?;
        if ann.group != self.config.group {
            return Err(Refused::WrongGroup(ann.group));
        }
        let key = self.directory.get(&ann.signer).ok_or_else(|| Refused::UnknownSigner(ann.signer.clone()))?;
        // A seq the window would refuse is refused before the signature check (a repeated
        // handover comes N times to each of N participants); the window changes only after it.
        if self.replay.get(&ann.signer).is_some_and(|w| !w.fresh(ann.seq)) {
            return Err(Refused::Replay { signer: ann.signer, seq: ann.seq });
        }
        if !Announcement::verify(bytes, &signature, key) {
            return Err(Refused::BadSignature(ann.signer));
        }
        if !self.replay.entry(ann.signer.clone()).or_default().accept(ann.seq) {
            return Err(Refused::Replay { signer: ann.signer, seq: ann.seq });
        }
        if let Some(winner) = ann.body.base().filter(|base| self.ranks_below(*base)) {
            self.diverge(winner);
            return Ok(self.drain());
        }
        let digest = message::change_digest(bytes);
        match self.apply(ann.clone(), digest) {
            Err(Refused::Stale) if self.builds_on_unknown(&ann.body) => self.stash(ann, digest),
            Err(refused) => return Err(refused),
            Ok(()) => self.retry_pending(entropy),
        }
        self.recompute(entropy);
        Ok(self.drain())
    }

    /// A private message from `from` (identity proven by the channel's certificate).
    pub fn receive_private(&mut self, from: &Identity, bytes: &[u8], entropy: &BatchSeed, now_ms: u64) -> Result<Vec<Output>, Refused> {
        self.now_ms = now_ms;
        match Private::decode(bytes, self.config.group)? {
            Private::JoinGrant(grant) => self.install_grant(from, grant)?,
            Private::KeyGrant { key } if self.phase == Phase::Joining => self.early_keys.push((from.clone(), key)),
            Private::KeyGrant { key } => self.accept_kek(from, key)?,
            Private::TekGrant { change, tek } => match self.accept_tek_grant(from, change, tek.clone()) {
                Err(Refused::Stale) if self.early_teks.len() < MAX_EARLY_GRANTS => self.early_teks.push((from.clone(), change, tek)),
                other => other?,
            },
        }
        self.recompute(entropy);
        Ok(self.drain())
    }

    /// The time passed: an exclusion round older than the settle time becomes final, and an
    /// exclusion this participant made but that lost is made again.
    pub fn tick(&mut self, entropy: &BatchSeed, now_ms: u64) -> Vec<Output> {
        self.now_ms = now_ms;
        if self.handover_until.is_some_and(|until| now_ms >= until) {
            self.finish_handover();
        }
        if let Some(round) = &self.round {
            if now_ms >= round.opened_ms.saturating_add(self.config.settle_ms) {
                self.round = None;
                if !self.state.roster.contains_key(&self.id) {
                    self.phase = Phase::Departed;
                    self.out.push(Output::Event(Event::Departed { tek_version: self.state.change.tek_version }));
                }
            } else {
                self.out.push(Output::Timer { at_ms: round.opened_ms.saturating_add(self.config.settle_ms) });
            }
        }
        self.retry_pending(entropy);
        if let Some(winner) = self.longer_history(now_ms) {
            self.diverge(winner);
            return self.drain();
        }
        self.watching.retain(|d, _| self.state.roster.contains_key(d));
        if let Some((&departed, &eviction)) = self.watching.iter().next() {
            if self.is_settled() {
                let outputs = self.exclude(departed, eviction, &entropy.next(), now_ms).unwrap_or_default();
                self.out.extend(outputs);
            }
        }
        self.drain()
    }

    fn drain(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    fn announce(&mut self, body: Body) -> Vec<u8> {
        self.seq += 1;
        let ann = Announcement { group: self.config.group, signer: self.me.clone(), seq: self.seq, body };
        let bytes = ann.sign(&self.signer);
        self.replay.entry(self.me.clone()).or_default().accept(self.seq);
        bytes
    }

    fn check_admissible(&self, joiner: &Identity) -> Result<(), Refused> {
        if !self.directory.contains_key(joiner) {
            return Err(Refused::UnknownSigner(joiner.clone()));
        }
        if self.state.revoked.contains(joiner) || self.state.id_of(joiner).is_some() {
            return Err(Refused::Invalid("joiner revoked or already in the group"));
        }
        Ok(())
    }

    fn signer_id(&self, who: &Identity) -> Result<u64, Refused> {
        self.state.id_of(who).ok_or_else(|| Refused::NotLive(who.clone()))
    }

    /// Whether an announcement refused as stale may instead build on a change not seen yet.
    fn builds_on_unknown(&self, body: &Body) -> bool {
        match body {
            Body::Exclusion(e) => e.base.tek_version > self.state.change.tek_version,
            Body::Joined(j) => j.base.tek_version > self.state.change.tek_version,
            Body::Relay(r) => self.round.as_ref().is_none_or(|round| !round.exclusions.keys().any(|(d, _)| *d == r.change)),
            Body::LeaveRequest { base } => base.tek_version > self.state.change.tek_version,
            Body::Handover(_) => false,
        }
    }

    fn stash(&mut self, ann: Announcement, digest: ChangeDigest) {
        if self.pending.len() == MAX_PENDING {
            self.pending.remove(0);
        }
        self.pending.push((ann, digest, self.now_ms));
        self.out.push(Output::Timer { at_ms: self.now_ms.saturating_add(self.config.settle_ms) });
    }

    /// The history rule: of two histories, the one with the higher TEK version wins, then
    /// the one whose last change has the lower digest (the rule of a round, lifted). True if
    /// `base`, the change another participant builds on, is of a history that beats this one.
    fn ranks_below(&self, base: ChangeRef) -> bool {
        let mine = self.state.change;
        let in_round = self.round.as_ref().is_some_and(|r| r.exclusions.keys().any(|(d, _)| *d == base.change));
        base.tek_version == mine.tek_version && base.change < mine.change && !in_round
    }

    /// A change of a later TEK version that has been built on for a whole settle time and never
    /// reached this participant: its history is longer and wins.
    fn longer_history(&self, now_ms: u64) -> Option<ChangeRef> {
        let overdue = self.pending.iter().filter(|(_, _, arrived)| now_ms >= arrived.saturating_add(self.config.settle_ms));
        let bases = overdue.filter_map(|(ann, _, _)| ann.body.base()).filter(|b| b.tek_version > self.state.change.tek_version);
        bases.max_by_key(|b| (b.tek_version, std::cmp::Reverse(b.change)))
    }

    fn diverge(&mut self, winner: ChangeRef) {
        self.phase = Phase::Diverged;
        self.round = None;
        self.pending.clear();
        self.out.push(Output::Event(Event::Diverged { winner }));
    }

    fn retry_pending(&mut self, entropy: &BatchSeed) {
        loop {
            let pending = std::mem::take(&mut self.pending);
            let before = pending.len();
            for (ann, digest, arrived) in pending {
                match self.apply(ann.clone(), digest) {
                    Err(Refused::Stale) if self.builds_on_unknown(&ann.body) => self.pending.push((ann, digest, arrived)),
                    _ => self.recompute(entropy),
                }
            }
            if self.pending.len() == before {
                return;
            }
        }
    }

    /// Applies a verified announcement to the state (or its round).
    fn apply(&mut self, ann: Announcement, digest: ChangeDigest) -> Result<(), Refused> {
        if let Body::Handover(handover) = ann.body {
            return self.apply_handover(&ann.signer, handover);
        }
        // A competing excluder may have been removed by the change its exclusion competes with.
        let in_round_base = self.round.as_ref().and_then(|r| r.base.id_of(&ann.signer));
        let signer_id = self.state.id_of(&ann.signer).or(in_round_base).ok_or_else(|| Refused::NotLive(ann.signer.clone()))?;
        match ann.body {
            Body::Joined(joined) => self.apply_joined(signer_id, joined),
            Body::Exclusion(exclusion) => self.apply_exclusion(&ann.signer, signer_id, exclusion, digest),
            Body::Relay(relay) => self.apply_relay(signer_id, relay),
            Body::LeaveRequest { base } => self.apply_leave_request(signer_id, base),
            Body::Handover(handover) => self.apply_handover(&ann.signer, handover),
        }
    }

    /// Another member's handover: it joins the roster and its refs the table (per slot the
    /// latest revision). Only during the handover, from members at the same TEK version; of two
    /// claims on one ID the first stays.
    fn apply_handover(&mut self, signer: &Identity, handover: Handover) -> Result<(), Refused> {
        if self.handover_until.is_none() || handover.base != self.state.change {
            return Err(Refused::Stale);
        }
        let bits = self.config.id_bits;
        if self.state.roster.contains_key(&handover.id) || self.state.id_of(signer).is_some() || handover.id >> bits != 0 {
            return Err(Refused::Invalid("handover of a taken ID or by a participant already in"));
        }
        let fits = handover.keks.len() == bits as usize
            && handover.keks.iter().enumerate().all(|(j, r)| kek_slot(r.id, bits) == Some((j as u8, bit(handover.id, j as u8))));
        if !fits || handover.tek.id != TEK_ID {
            return Err(Refused::Invalid("handed over keys are not one KEK per bit of the ID"));
        }
        for (j, key_ref) in handover.keks.iter().enumerate() {
            let slot = &mut self.state.table[j][bit(handover.id, j as u8) as usize];
            if !slot.1 || slot.0 < *key_ref {
                *slot = (*key_ref, true);
            }
        }
        if let Some(tek) = self.state.tek.as_mut().filter(|t| t.key_ref < handover.tek) {
            *tek = advance(tek, handover.tek).ok_or(Refused::Invalid("handed over TEK is not a revision of this one"))?;
        }
        self.state.roster.insert(handover.id, signer.clone());
        self.finish_handover_if_complete();
        Ok(())
    }

    /// Ends the handover as soon as the roster lists `members` participants (the centralized
    /// group's size, as its controller last told the members) and at the latest at `until_ms`,
    /// instead of after the settle time: however slowly the handovers come in (N² signed
    /// datagrams), every participant then lists every member that handed over by then.
    pub fn end_handover_when(&mut self, members: usize, until_ms: u64) -> Vec<Output> {
        if self.handover_until.is_some() {
            self.handover_members = Some(members);
            self.handover_until = Some(until_ms);
            self.out.push(Output::Timer { at_ms: until_ms });
            self.finish_handover_if_complete();
        }
        self.drain()
    }

    fn finish_handover_if_complete(&mut self) {
        if self.handover_members.is_some_and(|members| self.state.roster.len() >= members) {
            self.finish_handover();
        }
    }

    /// The handover is over: own KEKs advance to the latest revision any holder named.
    fn finish_handover(&mut self) {
        self.handover_until = None;
        self.handover_members = None;
        for j in 0..self.config.id_bits {
            let slot_ref = self.state.table[j as usize][bit(self.id, j) as usize].0;
            let held = self.state.keks[j as usize].take();
            self.state.keks[j as usize] = held.and_then(|h| advance(&h, slot_ref));
        }
    }

    fn apply_joined(&mut self, introducer: u64, joined: Joined) -> Result<(), Refused> {
        if joined.base != self.state.change {
            return Err(Refused::Stale);
        }
        if !self.state.roster.contains_key(&introducer) {
            return Err(Refused::Invalid("the introducer is not live"));
        }
        self.check_admissible(&joined.joiner)?;
        let id_of = |a: u8| participant_id(self.config.group, &joined.joiner, a, self.config.id_bits);
        let lowest_free = (0..=joined.attempt).find(|&a| !self.state.roster.contains_key(&id_of(a)));
        if lowest_free != Some(joined.attempt) || id_of(joined.attempt) != joined.joiner_id {
            return Err(Refused::Invalid("joiner ID is not the lowest free attempt of its identity"));
        }
        let new_table = self.joined_table(&joined)?;
        let tek = self.state.tek.as_ref();
        if joined.tek.id != TEK_ID || tek.is_some_and(|t| !t.key_ref.precedes_revision_of(joined.tek)) {
            return Err(Refused::Invalid("joined TEK is not a later revision of the TEK in force"));
        }
        self.round = None;
        self.state.table = new_table;
        self.state.tek = self.state.tek.take().and_then(|t| advance(&t, joined.tek));
        for j in 0..self.config.id_bits {
            let slot_ref = self.state.table[j as usize][bit(self.id, j) as usize].0;
            if let Some(held) = self.state.keks[j as usize].take() {
                self.state.keks[j as usize] = if held.key_ref.id == slot_ref.id { advance(&held, slot_ref) } else { Some(held) };
            }
        }
        self.state.roster.insert(joined.joiner_id, joined.joiner.clone());
        if let Some(tek) = &self.state.tek {
            self.out.push(Output::Event(Event::TekChanged(tek.key_ref)));
        }
        self.contribute(introducer, &joined);
        Ok(())
    }

    /// The key table after a join: each of the joiner's slots revised or created, exactly once.
    fn joined_table(&self, joined: &Joined) -> Result<Vec<[(KeyRef, bool); 2]>, Refused> {
        let mut table = self.state.table.clone();
        let mut covered = BTreeSet::new();
        for (key_ref, is_new) in joined.revised.iter().map(|r| (r, false)).chain(joined.created.iter().map(|r| (r, true))) {
            let (j, value) = kek_slot(key_ref.id, self.config.id_bits).ok_or(Refused::Invalid("not a KEK of this table"))?;
            if bit(joined.joiner_id, j) != value || !covered.insert(j) {
                return Err(Refused::Invalid("joined keys are not the joiner's slots, once each"));
            }
            let (current, held) = table[j as usize][value as usize];
            let valid = if is_new {
                !held && key_ref.version == creation_version(self.state.change.tek_version) && key_ref.revision == 0
            } else {
                held && current.precedes_revision_of(*key_ref)
            };
            if !valid {
                return Err(Refused::Invalid("joined key does not follow the key table"));
            }
            table[j as usize][value as usize] = (*key_ref, true);
        }
        if covered.len() != self.config.id_bits as usize {
            return Err(Refused::Invalid("joined keys do not cover every bit"));
        }
        Ok(table)
    }

    /// Hands the joiner the KEKs this participant is the designated contributor of.
    fn contribute(&mut self, introducer: u64, joined: &Joined) {
        for key_ref in &joined.revised {
            let Some((j, _)) = kek_slot(key_ref.id, self.config.id_bits) else { continue };
            let designated = contributor(&self.state.roster, introducer, joined.joiner_id, j);
            if designated == Some(self.id) && introducer != self.id {
                if let Some(held) = &self.state.keks[j as usize] {
                    let grant = Private::KeyGrant { key: held.pair() };
                    self.out.push(Output::Private { to: joined.joiner.clone(), bytes: grant.encode(self.config.group) });
                }
            }
        }
    }

    fn apply_exclusion(&mut self, signer: &Identity, excluder: u64, exclusion: Exclusion, digest: ChangeDigest) -> Result<(), Refused> {
        let competes = self.round.as_ref().is_some_and(|r| r.base.change == exclusion.base);
        let base = match &self.round {
            Some(round) if competes => &round.base,
            _ if exclusion.base == self.state.change => &self.state,
            _ => return Err(Refused::Stale),
        };
        if base.roster.get(&exclusion.departed) != Some(&exclusion.departed_identity) || exclusion.departed == excluder {
            return Err(Refused::Invalid("departed participant is not another live participant"));
        }
        let expected_tek = KeyRef::new(TEK_ID, exclusion.base.tek_version.checked_add(1).ok_or(Refused::Stale)?, 0);
        if exclusion.new_tek != expected_tek {
            return Err(Refused::Invalid("new TEK is not the next version"));
        }
        match &mut self.round {
            Some(round) if competes => {
                round.exclusions.insert((digest, excluder), (signer.clone(), exclusion));
            }
            _ => self.open_round(excluder, signer.clone(), exclusion, digest),
        }
        Ok(())
    }

    /// Starts the round of an exclusion built on the state in force (closing any earlier one).
    fn open_round(&mut self, excluder: u64, signer: Identity, exclusion: Exclusion, digest: ChangeDigest) {
        let round = Round {
            base: self.state.clone(),
            opened_ms: self.now_ms,
            exclusions: BTreeMap::from([((digest, excluder), (signer, exclusion))]),
            relays: Vec::new(),
            teks: BTreeMap::new(),
            relayed: BTreeSet::new(),
        };
        self.round = Some(round);
        self.out.push(Output::Timer { at_ms: self.now_ms.saturating_add(self.config.settle_ms) });
    }

    fn apply_relay(&mut self, relay_id: u64, relay: Relay) -> Result<(), Refused> {
        let round = self.round.as_mut().ok_or(Refused::Stale)?;
        if !round.exclusions.keys().any(|(d, _)| *d == relay.change) {
            return Err(Refused::Stale);
        }
        if round.relays.iter().any(|(s, r)| *s == relay_id && r.change == relay.change) {
            return Err(Refused::Invalid("a second relay message for one change"));
        }
        round.relays.push((relay_id, relay));
        Ok(())
    }

    /// The lowest other participant carries out a leave (when it is settled: [`Self::tick`]).
    fn apply_leave_request(&mut self, leaver: u64, base: ChangeRef) -> Result<(), Refused> {
        if base != self.state.change {
            return Err(Refused::Stale);
        }
        let designated = self.state.roster.keys().copied().find(|p| *p != leaver);
        if designated == Some(self.id) {
            self.watching.entry(leaver).or_insert(false);
            self.out.push(Output::Timer { at_ms: self.now_ms });
        }
        Ok(())
    }

    fn install_grant(&mut self, introducer: &Identity, grant: JoinGrant) -> Result<(), Refused> {
        if self.phase != Phase::Joining {
            return Err(Refused::Invalid("a join grant to a participant already in the group"));
        }
        let bits = self.config.id_bits;
        let id = participant_id(self.config.group, &self.me, grant.attempt, bits);
        let roster: BTreeMap<u64, Identity> = grant.roster.into_iter().collect();
        if roster.get(&id) != Some(&self.me) || !roster.values().any(|who| who == introducer) {
            return Err(Refused::Invalid("grant does not list this joiner and its introducer"));
        }
        if grant.table.len() != bits as usize || grant.tek.0.id != TEK_ID || grant.tek.0.version != grant.change.tek_version {
            return Err(Refused::Invalid("grant's key table or TEK does not fit this group"));
        }
        let mut keks = vec![None; bits as usize];
        for (key_ref, key) in grant.keks {
            let slot = kek_slot(key_ref.id, bits).filter(|&(j, v)| bit(id, j) == v && grant.table[j as usize][v as usize].0 == key_ref);
            let (j, _) = slot.ok_or(Refused::Invalid("granted KEK is not one of the joiner's slots"))?;
            keks[j as usize] = Some(Held { key_ref, key });
        }
        self.id = id;
        self.state = GroupState {
            change: grant.change,
            tek: Some(Held { key_ref: grant.tek.0, key: grant.tek.1 }),
            keks,
            table: grant.table,
            roster,
            revoked: grant.revoked.into_iter().collect(),
        };
        self.phase = Phase::Live;
        for (from, key) in std::mem::take(&mut self.early_keys) {
            // A key that does not fit is dropped, as it would have been on arrival.
            let _ = self.accept_kek(&from, key);
        }
        Ok(())
    }

    /// A KEK from a key holder, for a slot this joiner still misses.
    fn accept_kek(&mut self, from: &Identity, (key_ref, key): (KeyRef, Key)) -> Result<(), Refused> {
        let from_id = self.signer_id(from)?;
        let slot = kek_slot(key_ref.id, self.config.id_bits).filter(|&(j, v)| {
            bit(self.id, j) == v && bit(from_id, j) == v && self.state.keks[j as usize].is_none() && self.state.table[j as usize][v as usize].0 == key_ref
        });
        let (j, _) = slot.ok_or(Refused::Invalid("not a KEK this participant awaits from that holder"))?;
        self.state.keks[j as usize] = Some(Held { key_ref, key });
        Ok(())
    }

    /// The new TEK of an exclusion, from its excluder, for a relay that could not open it.
    fn accept_tek_grant(&mut self, from: &Identity, change: ChangeDigest, (tek_ref, key): (KeyRef, Key)) -> Result<(), Refused> {
        let round = self.round.as_mut().ok_or(Refused::Stale)?;
        let found = round.exclusions.iter().find(|((d, _), _)| *d == change);
        let ((_, excluder), (signer, exclusion)) = found.ok_or(Refused::Stale)?;
        let plan = relay_plan(&round.base.live_without(exclusion.departed), self.config.id_bits, *excluder, exclusion.departed);
        if signer != from || exclusion.new_tek != tek_ref || !plan.grants.contains(&self.id) {
            return Err(Refused::Invalid("not a TEK grant this participant awaits from that excluder"));
        }
        round.teks.insert(change, key);
        Ok(())
    }

    /// Recomputes the state in force from the open round: its base, the winning exclusion (the
    /// lowest digest) and that exclusion's relay messages; then does this
    /// participant's relay work for the winner, once it holds the new TEK.
    fn recompute(&mut self, entropy: &BatchSeed) {
        for (from, change, tek) in std::mem::take(&mut self.early_teks) {
            if let Err(Refused::Stale) = self.accept_tek_grant(&from, change, tek.clone()) {
                self.early_teks.push((from, change, tek));
            }
        }
        let Some(round) = &self.round else { return };
        let Some((&(digest, excluder), (_, winner))) = round.exclusions.first_key_value() else { return };
        let before = self.state.tek.as_ref().map(|t| t.key_ref);
        self.state = self.settle_change(round, excluder, digest, winner);
        let after = self.state.tek.as_ref().map(|t| t.key_ref);
        if let Some(tek) = after.filter(|a| Some(*a) != before) {
            self.out.push(Output::Event(Event::TekChanged(tek)));
        }
        self.relay_for_winner(entropy);
    }

    fn settle_change(&self, round: &Round, excluder: u64, digest: ChangeDigest, winner: &Exclusion) -> GroupState {
        let bits = self.config.id_bits;
        let mut state = round.base.clone();
        let departed = winner.departed;
        let live = state.live_without(departed);
        let plan = relay_plan(&live, bits, excluder, departed);
        let relays = round.relays.iter().filter(|(s, r)| r.change == digest && *s != excluder && plan.has_work(*s));
        let sources: Vec<(u64, &[Wrap])> = std::iter::once((excluder, &winner.wraps[..])).chain(relays.map(|(s, r)| (*s, &r.wraps[..]))).collect();
        let tek = match self.id == departed {
            true => None,
            false => round.teks.get(&digest).cloned().or_else(|| self.open_tek(&round.base, &sources, winner.new_tek)),
        };
        for j in (0..bits).filter(|&j| bit(self.id, j) == bit(departed, j)) {
            let replaced = tek.as_ref().and_then(|t| open_replacement(&round.base.keks[j as usize], plan.replacer(j), &sources, t, winner.new_tek));
            if self.id != departed {
                state.keks[j as usize] = replaced;
            }
        }
        state.tek = tek.map(|key| Held { key_ref: winner.new_tek, key });
        for j in 0..bits {
            let value = bit(departed, j);
            let held = live.iter().any(|&p| bit(p, j) == value);
            let key_ref = KeyRef::new(flat_kek_id(j, value), replacement_version(winner.new_tek.version), 0);
            state.table[j as usize][value as usize] = (key_ref, held);
        }
        state.roster.remove(&departed);
        if winner.eviction {
            state.revoked.insert(winner.departed_identity.clone());
        }
        state.change = ChangeRef { tek_version: winner.new_tek.version, change: digest };
        state
    }

    /// The new TEK from any wrap under one of this participant's KEKs.
    fn open_tek(&self, base: &GroupState, sources: &[(u64, &[Wrap])], tek_ref: KeyRef) -> Option<Key> {
        let wraps = sources.iter().flat_map(|(_, wraps)| wraps.iter()).filter(|w| w.key == tek_ref);
        wraps.into_iter().find_map(|w| {
            let Wrapper::Key(under) = w.under else { return None };
            let (j, _) = kek_slot(under.id, self.config.id_bits).filter(|&(j, v)| bit(self.id, j) == v)?;
            let held = base.keks[j as usize].as_ref()?;
            w.open(&held.at(under)?).ok()
        })
    }

    /// Sends this participant's relay message for the winning exclusion, once.
    fn relay_for_winner(&mut self, entropy: &BatchSeed) {
        let Some(round) = &self.round else { return };
        let Some((&(digest, excluder), (_, winner))) = round.exclusions.first_key_value() else { return };
        if excluder == self.id || round.relayed.contains(&digest) {
            return;
        }
        let plan = relay_plan(&round.base.live_without(winner.departed), self.config.id_bits, excluder, winner.departed);
        let Some(tek) = self.state.tek.as_ref().filter(|t| t.key_ref == winner.new_tek && plan.has_work(self.id)) else { return };
        let wraps = self.relay_wraps(&plan, winner.new_tek, &tek.key, &round.base, entropy);
        let relay = Relay { change: digest, wraps };
        let bytes = self.announce(Body::Relay(relay.clone()));
        let round = self.round.as_mut().expect("a round");
        round.relays.push((self.id, relay));
        round.relayed.insert(digest);
        self.out.push(Output::Multicast(bytes));
        self.recompute(entropy);
    }

    /// This participant's wraps of an exclusion: the new TEK under each KEK it covers, and a
    /// new key for each tainted KEK it replaces, under f(old KEK, new TEK).
    /// A KEK still awaited from its contributor is skipped: its holders are reached by the rest.
    fn relay_wraps(&self, plan: &RelayPlan, tek_ref: KeyRef, tek: &Key, base: &GroupState, entropy: &BatchSeed) -> Vec<Wrap> {
        let salt = nonce_salt(entropy);
        let mut keys = KeyGen::new(entropy, 1);
        let mut wraps = Vec::new();
        let held = |j: &u8| base.keks[*j as usize].as_ref();
        for held in plan.tek_wraps.get(&self.id).into_iter().flatten().filter_map(held) {
            wraps.push(Wrap::seal(&held.key, Wrapper::Key(held.key_ref), tek_ref, tek, &salt));
        }
        for old in plan.replacements.get(&self.id).into_iter().flatten().filter_map(held) {
            let new_ref = KeyRef::new(old.key_ref.id, replacement_version(tek_ref.version), 0);
            let wrapping = flat_replacement_wrapping_key(&old.key, old.key_ref, tek, tek_ref);
            let under = Wrapper::KekAndTek { kek: old.key_ref, tek: tek_ref };
            wraps.push(Wrap::seal(&wrapping, under, new_ref, &keys.next_key(), &salt));
        }
        wraps
    }
}

/// The replacement of a tainted KEK this participant held, from its designated replacer.
fn open_replacement(old: &Option<Held>, replacer: Option<u64>, sources: &[(u64, &[Wrap])], tek: &Key, tek_ref: KeyRef) -> Option<Held> {
    let (old, replacer) = (old.as_ref()?, replacer?);
    let wraps = sources.iter().filter(|(s, _)| *s == replacer).flat_map(|(_, wraps)| wraps.iter());
    wraps.into_iter().find_map(|w| {
        let Wrapper::KekAndTek { kek, tek: under_tek } = w.under else { return None };
        let fits = under_tek == tek_ref && kek.id == old.key_ref.id && w.key.id == kek.id && w.key.version == replacement_version(tek_ref.version);
        if !fits {
            return None;
        }
        let wrapping = flat_replacement_wrapping_key(&old.at(kek)?, kek, tek, tek_ref);
        w.open(&wrapping).ok().map(|key| Held { key_ref: w.key, key })
    })
}

/// Version of the KEKs created while TEK version `tek_version` is in force; KEKs replaced by
/// the exclusion that makes TEK version v get version 2v, so no two values share a ref.
fn creation_version(tek_version: u32) -> u32 {
    tek_version.saturating_mul(2).saturating_add(1)
}

fn replacement_version(tek_version: u32) -> u32 {
    tek_version.saturating_mul(2)
}

/// `held` advanced to `to`'s revision; unchanged if `to` is not later; None if it cannot be.
fn advance(held: &Held, to: KeyRef) -> Option<Held> {
    if to.revision <= held.key_ref.revision && to.version == held.key_ref.version {
        return Some(held.clone());
    }
    held.at(to).map(|key| Held { key_ref: to, key })
}
