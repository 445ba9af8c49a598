//! Messages of distributed flat key management: signed multicast announcements and the
//! private messages (keys in the clear) that the driver carries over the authenticated,
//! encrypted channel between two participants. One encoding per value, strict decoding.

use std::collections::BTreeSet;
use std::net::SocketAddrV4;

use aws_lc_rs::digest::{digest, SHA256};
use zeroize::Zeroizing;

use crate::key::{Key, KeyRef};
use crate::wire::auth::{Signature, Signer, VerifyingKey, SIGNATURE_LEN};
use crate::wire::codec::{Reader, Writer};
use crate::wire::{DecodeError, GroupId, MAX_MESSAGE_LEN, WIRE_VERSION};
use crate::wrap::{NonceSalt, Wrap};

/// Longest identity (a certificate's name) in bytes.
pub const MAX_IDENTITY_LEN: usize = 64;
/// Most participants a join grant lists.
pub const MAX_ROSTER: usize = 1 << 16;
/// Most wraps one announcement carries: the TEK under every KEK and every KEK replaced.
const MAX_WRAPS: usize = 2 * 64 + 1;
const ANNOUNCEMENT_DOMAIN: &[u8] = b"keycast/v2 dflat announcement";

const JOINED: u8 = 0x30;
const EXCLUSION: u8 = 0x31;
const RELAY: u8 = 0x32;
const LEAVE_REQUEST: u8 = 0x33;
const HANDOVER: u8 = 0x34;
const JOIN_GRANT: u8 = 0x38;
const KEY_GRANT: u8 = 0x39;
const TEK_GRANT: u8 = 0x3A;
const PRESENCE: u8 = 0x3B;
const HANDBACK: u8 = 0x3C;
const APPOINTMENT: u8 = 0x3D;
const PRESENCE_DOMAIN: &[u8] = b"keycast/v2 dflat presence";

/// A participant's certificate name: 1 to 64 printable ASCII bytes, so it has one encoding.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Identity(String);

impl Identity {
    pub fn new(name: &str) -> Result<Self, DecodeError> {
        let printable = name.bytes().all(|b| b.is_ascii_graphic());
        if name.is_empty() || name.len() > MAX_IDENTITY_LEN || !printable {
            return Err(DecodeError::BadValue { field: "identity", value: name.len() as u64 });
        }
        Ok(Identity(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl core::fmt::Display for Identity {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

/// First 16 bytes of SHA-256 of a signed exclusion: names the change it makes.
pub type ChangeDigest = [u8; 16];

/// The change that made a TEK version: (version, digest of its exclusion; zeros for the
/// keys the first participant created).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct ChangeRef {
    pub tek_version: u32,
    pub change: ChangeDigest,
}

/// An introducer admitted `joiner`: holders advance the listed keys to the listed revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    pub base: ChangeRef,
    pub joiner: Identity,
    pub attempt: u8,
    pub joiner_id: u64,
    pub tek: KeyRef,
    /// The joiner's KEKs that exist, at their new revision.
    pub revised: Vec<KeyRef>,
    /// The joiner's KEKs nobody held: new keys, from the introducer.
    pub created: Vec<KeyRef>,
}

/// An excluder removed `departed`: the new TEK and the wraps the excluder can make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exclusion {
    pub base: ChangeRef,
    pub departed: u64,
    pub departed_identity: Identity,
    /// An eviction also revokes the identity: no introducer admits it again.
    pub eviction: bool,
    pub new_tek: KeyRef,
    pub wraps: Vec<Wrap>,
}

/// A key relay's share of exclusion `change`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relay {
    pub change: ChangeDigest,
    pub wraps: Vec<Wrap>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Joined(Joined),
    Exclusion(Exclusion),
    Relay(Relay),
    /// The signer asks to leave; the lowest other participant excludes it.
    LeaveRequest { base: ChangeRef },
    /// A member of a centralized flat group whose controller is lost: its ID and the refs of
    /// its keys, so that every participant rebuilds the roster and the key table.
    Handover(Handover),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handover {
    pub base: ChangeRef,
    pub id: u64,
    pub tek: KeyRef,
    /// One KEK per ID bit, bit 0 first.
    pub keks: Vec<KeyRef>,
}

impl Body {
    /// The change an announcement builds on (a relay names its exclusion instead).
    pub fn base(&self) -> Option<ChangeRef> {
        match self {
            Body::Joined(j) => Some(j.base),
            Body::Exclusion(e) => Some(e.base),
            Body::LeaveRequest { base } => Some(*base),
            Body::Handover(h) => Some(h.base),
            Body::Relay(_) => None,
        }
    }
}

/// A multicast announcement, signed by its participant's certificate key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    pub group: GroupId,
    pub signer: Identity,
    /// Per signer, from 1; a window of 64 refuses replays.
    pub seq: u64,
    pub body: Body,
}

impl Announcement {
    fn body_bytes(&self) -> Vec<u8> {
        let kind = match &self.body {
            Body::Joined(_) => JOINED,
            Body::Exclusion(_) => EXCLUSION,
            Body::Relay(_) => RELAY,
            Body::LeaveRequest { .. } => LEAVE_REQUEST,
            Body::Handover(_) => HANDOVER,
        };
        let mut out = vec![WIRE_VERSION, kind];
        out.put_u64(self.group.0);
        put_identity(&mut out, &self.signer);
        out.put_u64(self.seq);
        match &self.body {
            Body::Joined(j) => {
                put_change(&mut out, j.base);
                put_identity(&mut out, &j.joiner);
                out.put_u8(j.attempt);
                out.put_u64(j.joiner_id);
                out.put_ref(j.tek);
                put_refs(&mut out, &j.revised);
                put_refs(&mut out, &j.created);
            }
            Body::Exclusion(e) => {
                put_change(&mut out, e.base);
                out.put_u64(e.departed);
                put_identity(&mut out, &e.departed_identity);
                out.put_u8(e.eviction as u8);
                out.put_ref(e.new_tek);
                put_wraps(&mut out, &e.wraps);
            }
            Body::Relay(r) => {
                out.extend_from_slice(&r.change);
                put_wraps(&mut out, &r.wraps);
            }
            Body::LeaveRequest { base } => put_change(&mut out, *base),
            Body::Handover(h) => {
                put_change(&mut out, h.base);
                out.put_u64(h.id);
                out.put_ref(h.tek);
                put_refs(&mut out, &h.keks);
            }
        }
        out
    }

    /// The signed bytes to multicast.
    pub fn sign(&self, signer: &Signer) -> Vec<u8> {
        signed(self.body_bytes(), ANNOUNCEMENT_DOMAIN, signer)
    }

    /// The announcement with a given signature (re-encoding a decoded one; not checked).
    pub fn encode_with(&self, signature: &Signature) -> Vec<u8> {
        [self.body_bytes(), signature.to_vec()].concat()
    }

    /// Decodes without checking the signature (see [`Announcement::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<(Announcement, Signature), DecodeError> {
        if bytes.len() > MAX_MESSAGE_LEN {
            return Err(DecodeError::Oversized(bytes.len()));
        }
        let mut r = Reader::new(bytes);
        let kind = read_version_and_kind(&mut r)?;
        let group = r.group()?;
        let signer = read_identity(&mut r)?;
        let seq = r.u64("seq")?;
        let body = match kind {
            JOINED => Body::Joined(Joined {
                base: read_change(&mut r)?,
                joiner: read_identity(&mut r)?,
                attempt: r.u8("attempt")?,
                joiner_id: r.u64("joiner id")?,
                tek: r.key_ref("tek")?,
                revised: read_refs(&mut r, "revised keys")?,
                created: read_refs(&mut r, "created keys")?,
            }),
            EXCLUSION => Body::Exclusion(Exclusion {
                base: read_change(&mut r)?,
                departed: r.u64("departed")?,
                departed_identity: read_identity(&mut r)?,
                eviction: r.flag("eviction")?,
                new_tek: r.key_ref("new tek")?,
                wraps: read_wraps(&mut r)?,
            }),
            RELAY => Body::Relay(Relay { change: r.array("change")?, wraps: read_wraps(&mut r)? }),
            LEAVE_REQUEST => Body::LeaveRequest { base: read_change(&mut r)? },
            HANDOVER => Body::Handover(Handover {
                base: read_change(&mut r)?,
                id: r.u64("participant id")?,
                tek: r.key_ref("tek")?,
                keks: read_refs(&mut r, "handed over keys")?,
            }),
            other => return Err(DecodeError::UnknownType(other)),
        };
        let signature = r.array::<SIGNATURE_LEN>("signature")?;
        r.finish()?;
        Ok((Announcement { group, signer, seq, body }, signature))
    }

    /// Whether `bytes` (this announcement, decoded) carry `key`'s signature.
    pub fn verify(bytes: &[u8], signature: &Signature, key: &VerifyingKey) -> bool {
        key.verify(ANNOUNCEMENT_DOMAIN, &bytes[..bytes.len() - SIGNATURE_LEN], signature)
    }
}

/// The digest naming a signed exclusion.
pub fn change_digest(signed: &[u8]) -> ChangeDigest {
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest(&SHA256, signed).as_ref()[..16]);
    out
}

/// A participant's heartbeat on the multicast channel: where its private channel listens, so
/// that others can send it grants and joiners find an introducer. Signed, and newer than any
/// earlier one of the same signer (`at_ms`, its clock), so a replay cannot move an address
/// back; the channel itself proves the identity, so a false address costs a failed connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presence {
    pub group: GroupId,
    pub signer: Identity,
    pub at_ms: u64,
    pub listener: SocketAddrV4,
}

impl Presence {
    fn body_bytes(&self) -> Vec<u8> {
        let mut out = vec![WIRE_VERSION, PRESENCE];
        out.put_u64(self.group.0);
        put_identity(&mut out, &self.signer);
        out.put_u64(self.at_ms);
        put_address(&mut out, self.listener);
        out
    }

    pub fn sign(&self, signer: &Signer) -> Vec<u8> {
        signed(self.body_bytes(), PRESENCE_DOMAIN, signer)
    }

    /// The presence with a given signature (re-encoding a decoded one; not checked).
    pub fn encode_with(&self, signature: &Signature) -> Vec<u8> {
        [self.body_bytes(), signature.to_vec()].concat()
    }

    /// Decodes without checking the signature (see [`Presence::verify`]).
    pub fn decode(bytes: &[u8]) -> Result<(Presence, Signature), DecodeError> {
        let mut r = Reader::new(bytes);
        let kind = read_version_and_kind(&mut r)?;
        if kind != PRESENCE {
            return Err(DecodeError::UnknownType(kind));
        }
        let group = r.group()?;
        let signer = read_identity(&mut r)?;
        let at_ms = r.u64("presence time")?;
        let listener = read_address(&mut r, "listener")?;
        let signature = r.array::<SIGNATURE_LEN>("signature")?;
        r.finish()?;
        Ok((Presence { group, signer, at_ms, listener }, signature))
    }

    /// Whether `bytes` (this presence, decoded) carry `key`'s signature.
    pub fn verify(bytes: &[u8], signature: &Signature, key: &VerifyingKey) -> bool {
        key.verify(PRESENCE_DOMAIN, &bytes[..bytes.len() - SIGNATURE_LEN], signature)
    }

    /// Whether `bytes` are a presence rather than an announcement (dispatch on the kind byte).
    pub fn is_presence(bytes: &[u8]) -> bool {
        bytes.get(1) == Some(&PRESENCE)
    }
}

/// What an introducer hands a joiner: its place, the keys they share, the created keys and
/// the public state every participant keeps (key table, roster, revoked identities).
#[derive(Clone, Debug)]
pub struct JoinGrant {
    pub attempt: u8,
    pub change: ChangeRef,
    pub tek: (KeyRef, Key),
    pub keks: Vec<(KeyRef, Key)>,
    /// Current ref of every KEK slot, bit by bit (value 0 then 1), and whether anyone holds it.
    pub table: Vec<[(KeyRef, bool); 2]>,
    pub roster: Vec<(u64, Identity)>,
    pub revoked: Vec<Identity>,
}

#[derive(Clone, Debug)]
pub enum Private {
    JoinGrant(JoinGrant),
    /// A key holder hands a joiner one of its KEKs.
    KeyGrant { key: (KeyRef, Key) },
    /// An excluder hands a relay the new TEK of `change`.
    TekGrant { change: ChangeDigest, tek: (KeyRef, Key) },
}

impl Private {
    pub fn encode(&self, group: GroupId) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::new());
        let kind = match self {
            Private::JoinGrant(_) => JOIN_GRANT,
            Private::KeyGrant { .. } => KEY_GRANT,
            Private::TekGrant { .. } => TEK_GRANT,
        };
        out.extend_from_slice(&[WIRE_VERSION, kind]);
        out.put_u64(group.0);
        match self {
            Private::JoinGrant(g) => {
                out.put_u8(g.attempt);
                put_change(&mut out, g.change);
                put_key(&mut out, &g.tek);
                out.put_u8(g.keks.len() as u8);
                g.keks.iter().for_each(|k| put_key(&mut out, k));
                out.put_u8(g.table.len() as u8);
                for pair in &g.table {
                    for (r, held) in pair {
                        out.put_ref(*r);
                        out.put_u8(*held as u8);
                    }
                }
                out.put_u32(g.roster.len() as u32);
                for (id, who) in &g.roster {
                    out.put_u64(*id);
                    put_identity(&mut out, who);
                }
                out.put_u32(g.revoked.len() as u32);
                g.revoked.iter().for_each(|who| put_identity(&mut out, who));
            }
            Private::KeyGrant { key } => put_key(&mut out, key),
            Private::TekGrant { change, tek } => {
                out.extend_from_slice(change);
                put_key(&mut out, tek);
            }
        }
        out
    }

    /// Strict decoding: lists bounded, roster and revoked identities strictly ascending.
    pub fn decode(bytes: &[u8], group: GroupId) -> Result<Private, DecodeError> {
        let mut r = Reader::new(bytes);
        let kind = read_version_and_kind(&mut r)?;
        let got = r.group()?;
        if got != group {
            return Err(DecodeError::BadValue { field: "group", value: got.0 });
        }
        let private = match kind {
            JOIN_GRANT => Private::JoinGrant(read_join_grant(&mut r)?),
            KEY_GRANT => Private::KeyGrant { key: read_key(&mut r)? },
            TEK_GRANT => Private::TekGrant { change: r.array("change")?, tek: read_key(&mut r)? },
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish()?;
        Ok(private)
    }
}

/// A participant's keys handed to the controller appointed to take the group back (Caronni
/// et al., figure 6; [`super::handback::TableCollector`]): its ID, the TEK and the KEK of each
/// ID bit, in the clear, so it travels only over the mutually authenticated channel to the
/// appointed controller. Not a [`Private`]: a participant never accepts one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandbackKeys {
    pub id: u64,
    pub tek: (KeyRef, Key),
    /// KEK(i, bit i of `id`) for every ID bit i, bit 0 first.
    pub keks: Vec<(KeyRef, Key)>,
}

impl HandbackKeys {
    /// A participant's handback from what it holds (`Participant::held_keys`: the TEK, then
    /// one KEK per ID bit); None if those are not its TEK and its KEKs in bit order.
    pub fn new(id: u64, held: Vec<(KeyRef, Key)>) -> Option<HandbackKeys> {
        let mut held = held.into_iter();
        let tek = held.next()?;
        let handback = HandbackKeys { id, tek, keks: held.collect() };
        handback.well_formed().then_some(handback)
    }

    /// The TEK's id is 0 and KEK i is KEK(i, bit i of the ID), for 1 to 64 bits the ID fits.
    fn well_formed(&self) -> bool {
        let bits = self.keks.len();
        let fits = bits >= 64 || self.id >> bits == 0;
        let own = |(i, (r, _)): (usize, &(KeyRef, Key))| r.id == super::plan::own_kek_id(self.id, i as u8);
        (1..=64).contains(&bits) && fits && self.tek.0.id == crate::key::KeyId(0) && self.keks.iter().enumerate().all(own)
    }

    pub fn encode(&self, group: GroupId) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(19 + (1 + self.keks.len()) * (KeyRef::ENCODED_LEN + 32)));
        out.extend_from_slice(&[WIRE_VERSION, HANDBACK]);
        out.put_u64(group.0);
        out.put_u64(self.id);
        put_key(&mut out, &self.tek);
        out.put_u8(self.keks.len() as u8);
        self.keks.iter().for_each(|k| put_key(&mut out, k));
        out
    }

    /// Strict decoding: the group, 1 to 64 KEKs, and exactly the TEK and the KEKs of the ID's bits.
    pub fn decode(bytes: &[u8], group: GroupId) -> Result<HandbackKeys, DecodeError> {
        let mut r = Reader::new(bytes);
        read_private_header(&mut r, HANDBACK, group)?;
        let id = r.u64("participant id")?;
        let tek = read_key(&mut r)?;
        let count = r.count(1, 64, KeyRef::ENCODED_LEN + 32, "handed keks")?;
        let keks = (0..count).map(|_| read_key(&mut r)).collect::<Result<_, _>>()?;
        r.finish()?;
        let handback = HandbackKeys { id, tek, keks };
        if !handback.well_formed() {
            return Err(DecodeError::BadValue { field: "handed keys", value: id });
        }
        Ok(handback)
    }

    /// True if `bytes` claim to be a handback (the version and kind bytes).
    pub fn is_handback(bytes: &[u8]) -> bool {
        bytes.get(1) == Some(&HANDBACK)
    }
}

/// The request of the participant appointed to take the group back to a controller (figure
/// 6): hand your keys back to me, then join the controller at `controller` (TLS, proving
/// `server_name`), whose rekeys go to `multicast`. Sent only over the mutually authenticated
/// channel, so the channel proves who appoints; the answer is the receiver's handback.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appointment {
    pub group: GroupId,
    pub controller: SocketAddrV4,
    /// The name the controller's certificate proves (printable ASCII, 1 to 64 bytes).
    pub server_name: Identity,
    pub multicast: SocketAddrV4,
}

impl Appointment {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + 8 + 6 + 1 + self.server_name.0.len() + 6);
        out.extend_from_slice(&[WIRE_VERSION, APPOINTMENT]);
        out.put_u64(self.group.0);
        put_address(&mut out, self.controller);
        put_identity(&mut out, &self.server_name);
        put_address(&mut out, self.multicast);
        out
    }

    /// Strict decoding: this group's, every field once, nothing after.
    pub fn decode(bytes: &[u8], group: GroupId) -> Result<Appointment, DecodeError> {
        let mut r = Reader::new(bytes);
        read_private_header(&mut r, APPOINTMENT, group)?;
        let controller = read_address(&mut r, "controller")?;
        let server_name = read_identity(&mut r)?;
        let multicast = read_address(&mut r, "multicast")?;
        r.finish()?;
        Ok(Appointment { group, controller, server_name, multicast })
    }
}

/// The version, kind and group of a message to one participant: `kind` of `group` only.
fn read_private_header(r: &mut Reader<'_>, kind: u8, group: GroupId) -> Result<(), DecodeError> {
    let got_kind = read_version_and_kind(r)?;
    if got_kind != kind {
        return Err(DecodeError::UnknownType(got_kind));
    }
    let got = r.group()?;
    if got != group {
        return Err(DecodeError::BadValue { field: "group", value: got.0 });
    }
    Ok(())
}

fn put_address(out: &mut Vec<u8>, addr: SocketAddrV4) {
    out.extend_from_slice(&addr.ip().octets());
    out.put_u16(addr.port());
}

fn read_address(r: &mut Reader<'_>, field: &'static str) -> Result<SocketAddrV4, DecodeError> {
    let ip: [u8; 4] = r.array(field)?;
    Ok(SocketAddrV4::new(ip.into(), r.u16(field)?))
}

fn read_join_grant(r: &mut Reader<'_>) -> Result<JoinGrant, DecodeError> {
    let attempt = r.u8("attempt")?;
    let change = read_change(r)?;
    let tek = read_key(r)?;
    let count = r.count(1, 64, KeyRef::ENCODED_LEN + 32, "granted keks")?;
    let keks = (0..count).map(|_| read_key(r)).collect::<Result<_, _>>()?;
    let bits = r.count(1, 64, 2 * (KeyRef::ENCODED_LEN + 1), "key table")?;
    let mut table = Vec::with_capacity(bits);
    for _ in 0..bits {
        let mut slot = || -> Result<(KeyRef, bool), DecodeError> { Ok((r.key_ref("table key")?, r.flag("held")?)) };
        table.push([slot()?, slot()?]);
    }
    let count = r.count(4, MAX_ROSTER, 10, "roster")?;
    let mut roster: Vec<(u64, Identity)> = Vec::with_capacity(count);
    for _ in 0..count {
        let entry = (r.u64("participant id")?, read_identity(r)?);
        if roster.last().is_some_and(|last| last.0 >= entry.0) {
            return Err(DecodeError::NotAscending("roster"));
        }
        roster.push(entry);
    }
    let identities: BTreeSet<&Identity> = roster.iter().map(|(_, who)| who).collect();
    if identities.len() != roster.len() {
        return Err(DecodeError::BadValue { field: "roster identity", value: 0 });
    }
    let count = r.count(4, MAX_ROSTER, 2, "revoked")?;
    let mut revoked: Vec<Identity> = Vec::with_capacity(count);
    for _ in 0..count {
        let who = read_identity(r)?;
        if revoked.last().is_some_and(|last| *last >= who) {
            return Err(DecodeError::NotAscending("revoked"));
        }
        revoked.push(who);
    }
    Ok(JoinGrant { attempt, change, tek, keks, table, roster, revoked })
}

/// `body` followed by `signer`'s signature over `domain` and it.
fn signed(mut body: Vec<u8>, domain: &[u8], signer: &Signer) -> Vec<u8> {
    let signature = signer.sign(domain, &body);
    body.extend_from_slice(&signature);
    body
}

fn read_version_and_kind(r: &mut Reader<'_>) -> Result<u8, DecodeError> {
    let version = r.u8("version")?;
    if version != WIRE_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    r.u8("type")
}

fn put_identity(out: &mut Vec<u8>, who: &Identity) {
    out.put_u8(who.0.len() as u8);
    out.extend_from_slice(who.0.as_bytes());
}

fn read_identity(r: &mut Reader<'_>) -> Result<Identity, DecodeError> {
    let len = r.count(1, MAX_IDENTITY_LEN, 1, "identity")?;
    let bytes = r.take(len, "identity")?;
    Identity::new(core::str::from_utf8(bytes).map_err(|_| DecodeError::BadText)?)
}

fn put_change(out: &mut Vec<u8>, change: ChangeRef) {
    out.put_u32(change.tek_version);
    out.extend_from_slice(&change.change);
}

fn read_change(r: &mut Reader<'_>) -> Result<ChangeRef, DecodeError> {
    Ok(ChangeRef { tek_version: r.u32("base version")?, change: r.array("base change")? })
}

fn put_refs(out: &mut Vec<u8>, refs: &[KeyRef]) {
    out.put_u8(refs.len() as u8);
    refs.iter().for_each(|r| out.put_ref(*r));
}

fn read_refs(r: &mut Reader<'_>, field: &'static str) -> Result<Vec<KeyRef>, DecodeError> {
    let count = r.count(1, 64, KeyRef::ENCODED_LEN, field)?;
    (0..count).map(|_| r.key_ref(field)).collect()
}

/// One salt, then the wraps (every wrap of one announcement shares it).
fn put_wraps(out: &mut Vec<u8>, wraps: &[Wrap]) {
    let salt = wraps.first().map(|w| w.salt).unwrap_or_default();
    out.extend_from_slice(&salt);
    out.put_u8(wraps.len() as u8);
    wraps.iter().for_each(|w| out.put_wrap(w));
}

fn read_wraps(r: &mut Reader<'_>) -> Result<Vec<Wrap>, DecodeError> {
    let salt: NonceSalt = r.array("salt")?;
    let count = r.count(1, MAX_WRAPS, crate::wire::codec::MIN_WRAP_LEN, "wraps")?;
    // With no wrap the salt is unused: only zeros, so the bytes have one encoding.
    if count == 0 && salt != NonceSalt::default() {
        return Err(DecodeError::BadValue { field: "salt of no wraps", value: 1 });
    }
    (0..count).map(|_| r.wrap(&salt)).collect()
}

fn put_key(out: &mut Vec<u8>, (r, key): &(KeyRef, Key)) {
    out.put_ref(*r);
    out.extend_from_slice(key.as_bytes());
}

fn read_key(r: &mut Reader<'_>) -> Result<(KeyRef, Key), DecodeError> {
    Ok((r.key_ref("key ref")?, r.key("key")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyId;

    #[test]
    fn announcements_round_trip_verify_and_refuse_tampering() {
        let signer = Signer::from_seed(&[3; 32]);
        let ann = Announcement {
            group: GroupId(9),
            signer: Identity::new("p1").unwrap(),
            seq: 4,
            body: Body::LeaveRequest { base: ChangeRef { tek_version: 2, change: [7; 16] } },
        };
        let bytes = ann.sign(&signer);
        let (decoded, signature) = Announcement::decode(&bytes).unwrap();
        assert_eq!(decoded, ann);
        assert_eq!(decoded.sign(&signer), bytes, "one encoding per value");
        assert!(Announcement::verify(&bytes, &signature, &signer.verifying_key()));
        let mut forged = bytes.clone();
        forged[12] ^= 1;
        let (_, signature) = Announcement::decode(&forged).unwrap();
        assert!(!Announcement::verify(&forged, &signature, &signer.verifying_key()));
        assert!(Announcement::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(Announcement::decode(&[bytes.clone(), vec![0]].concat()).is_err());
    }

    #[test]
    fn every_announcement_kind_has_one_encoding() {
        let signer = Signer::from_seed(&[4; 32]);
        let base = ChangeRef { tek_version: 3, change: [1; 16] };
        let key_ref = KeyRef::new(KeyId(3), 6, 1);
        let wrap = Wrap::seal(&Key::from_bytes([1; 32]), crate::wrap::Wrapper::Key(key_ref), KeyRef::new(KeyId(0), 4, 0), &Key::from_bytes([2; 32]), &[9; 12]);
        let who = Identity::new("p2").unwrap();
        let bodies = [
            Body::Joined(Joined { base, joiner: who.clone(), attempt: 1, joiner_id: 5, tek: KeyRef::new(KeyId(0), 3, 2), revised: vec![key_ref], created: vec![] }),
            Body::Exclusion(Exclusion { base, departed: 5, departed_identity: who, eviction: true, new_tek: KeyRef::new(KeyId(0), 4, 0), wraps: vec![wrap.clone()] }),
            Body::Relay(Relay { change: [8; 16], wraps: vec![wrap] }),
            Body::LeaveRequest { base },
            Body::Handover(Handover { base, id: 5, tek: KeyRef::new(KeyId(0), 3, 0), keks: vec![key_ref] }),
        ];
        for body in bodies {
            let ann = Announcement { group: GroupId(1), signer: Identity::new("p1").unwrap(), seq: 1, body };
            let bytes = ann.sign(&signer);
            let (decoded, _) = Announcement::decode(&bytes).unwrap();
            assert_eq!(decoded, ann);
            assert_eq!(decoded.sign(&signer), bytes);
        }
    }

    /// Found by the fuzzer: a relay with no wrap carried a salt nothing uses, so two byte
    /// strings decoded to one announcement.
    #[test]
    fn no_wraps_means_a_zero_salt() {
        let signer = Signer::from_seed(&[4; 32]);
        let ann = Announcement { group: GroupId(1), signer: Identity::new("p1").unwrap(), seq: 1, body: Body::Relay(Relay { change: [8; 16], wraps: vec![] }) };
        let bytes = ann.sign(&signer);
        assert_eq!(Announcement::decode(&bytes).unwrap().0, ann);
        let salt_at = bytes.len() - SIGNATURE_LEN - 1 - crate::wrap::SALT_LEN;
        let mut salted = bytes.clone();
        salted[salt_at] = 1;
        assert!(Announcement::decode(&salted).is_err(), "a salt beside no wraps decoded");
    }

    #[test]
    fn a_presence_has_one_encoding_and_its_signature_covers_the_address() {
        let signer = Signer::from_seed(&[6; 32]);
        let presence = Presence { group: GroupId(2), signer: Identity::new("p3").unwrap(), at_ms: 77, listener: "127.0.0.1:4000".parse().unwrap() };
        let bytes = presence.sign(&signer);
        assert!(Presence::is_presence(&bytes) && Announcement::decode(&bytes).is_err());
        let (decoded, signature) = Presence::decode(&bytes).unwrap();
        assert_eq!(decoded, presence);
        assert_eq!(decoded.encode_with(&signature), bytes);
        assert!(Presence::verify(&bytes, &signature, &signer.verifying_key()));
        let mut moved = bytes.clone();
        moved[bytes.len() - SIGNATURE_LEN - 1] ^= 1;
        let (_, signature) = Presence::decode(&moved).unwrap();
        assert!(!Presence::verify(&moved, &signature, &signer.verifying_key()), "a changed port still verifies");
        assert!(Presence::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(Presence::decode(&[bytes, vec![0]].concat()).is_err());
    }

    #[test]
    fn grants_decode_strictly() {
        let grant = Private::KeyGrant { key: (KeyRef::new(KeyId(3), 1, 2), Key::from_bytes([5; 32])) };
        let bytes = grant.encode(GroupId(1));
        assert!(matches!(Private::decode(&bytes, GroupId(1)), Ok(Private::KeyGrant { .. })));
        assert!(Private::decode(&bytes, GroupId(2)).is_err(), "another group's grant");
        assert!(Private::decode(&bytes[..bytes.len() - 1], GroupId(1)).is_err());
        assert!(Identity::new("with space").is_err());
    }

    #[test]
    fn an_appointment_has_one_encoding_and_decodes_strictly() {
        let appointment = Appointment {
            group: GroupId(4),
            controller: "127.0.0.1:7400".parse().unwrap(),
            server_name: Identity::new("localhost").unwrap(),
            multicast: "239.255.0.1:7401".parse().unwrap(),
        };
        let bytes = appointment.encode();
        assert_eq!(Appointment::decode(&bytes, GroupId(4)).unwrap(), appointment);
        assert!(Appointment::decode(&bytes, GroupId(5)).is_err(), "another group's appointment");
        for len in 0..bytes.len() {
            assert!(Appointment::decode(&bytes[..len], GroupId(4)).is_err(), "cut at {len}");
        }
        assert!(Appointment::decode(&[&bytes[..], &[0]].concat(), GroupId(4)).is_err());
        assert!(!HandbackKeys::is_handback(&bytes) && Private::decode(&bytes, GroupId(4)).is_err());
    }

    #[test]
    fn a_handback_decodes_strictly_and_only_with_its_own_keys() {
        let key = |id: u32| (KeyRef::new(KeyId(id), 3, 1), Key::from_bytes([id as u8; 32]));
        // ID 0b10 of 2 bits: KEK(0, 0) has id 1, KEK(1, 1) id 4.
        let handback = HandbackKeys::new(0b10, vec![key(0), key(1), key(4)]).unwrap();
        let bytes = handback.encode(GroupId(1));
        assert_eq!(HandbackKeys::decode(&bytes, GroupId(1)).unwrap(), handback);
        assert!(HandbackKeys::is_handback(&bytes));
        assert!(HandbackKeys::decode(&bytes, GroupId(2)).is_err(), "another group's handback");
        assert!(HandbackKeys::decode(&bytes[..bytes.len() - 1], GroupId(1)).is_err());
        assert!(HandbackKeys::decode(&[&bytes[..], &[0]].concat(), GroupId(1)).is_err());
        assert!(HandbackKeys::new(0b10, vec![key(0), key(2), key(4)]).is_none(), "KEK(0, 1) is not ID 0b10's");
        assert!(HandbackKeys::new(0b110, vec![key(0), key(1), key(4)]).is_none(), "an ID wider than its bits");
        let foreign = HandbackKeys { id: 0b10, tek: key(0), keks: vec![key(2), key(4)] }.encode(GroupId(1));
        assert!(HandbackKeys::decode(&foreign, GroupId(1)).is_err(), "keys of another ID");
        assert!(Private::decode(&bytes, GroupId(1)).is_err(), "a participant never takes a handback");
        assert!(Identity::new("").is_err());
    }
}
