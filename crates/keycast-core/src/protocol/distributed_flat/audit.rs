//! What an outsider derives from recorded announcements: for audits of removed participants
//! (tests, the demo). It holds `known` keys and tries every value it knows for a key id,
//! whatever its version (a replacement that reused old material would be found), advanced to
//! the revision each wrap names, until nothing new opens.

use std::collections::BTreeMap;

use crate::key::{Key, KeyRef};
use crate::wrap::{derive_revision, flat_replacement_wrapping_key, Wrap, Wrapper};

use super::{Announcement, Body, TEK_ID};

/// Whether a removed participant that held `held` (every key it ever held) derives, from
/// `announcements`, one of `group_teks` (TEKs the group used) of a version after the last TEK
/// it held.
pub fn derives_later_tek(held: &BTreeMap<KeyRef, Key>, group_teks: &BTreeMap<KeyRef, Key>, announcements: &[Vec<u8>]) -> bool {
    let last_version = held.keys().filter(|r| r.id == TEK_ID).map(|r| r.version).max().unwrap_or(0);
    let derived = derive_keys(held, announcements);
    let later = group_teks.iter().filter(|(r, _)| r.id == TEK_ID && r.version > last_version);
    later.into_iter().any(|(r, k)| derived.get(r) == Some(k))
}

/// Every key derivable from `known` and the wraps of `announcements` (undecodable bytes and
/// presences are skipped; signatures are not checked: an outsider would not either).
pub fn derive_keys(known: &BTreeMap<KeyRef, Key>, announcements: &[Vec<u8>]) -> BTreeMap<KeyRef, Key> {
    let wraps: Vec<Wrap> = announcements
        .iter()
        .filter_map(|bytes| match Announcement::decode(bytes).ok()?.0.body {
            Body::Exclusion(e) => Some(e.wraps),
            Body::Relay(r) => Some(r.wraps),
            _ => None,
        })
        .flatten()
        .collect();
    derive_from_wraps(known, &wraps)
}

/// Every key derivable from `known` and `wraps` (any wraps: e.g. a controller's rekey).
pub fn derive_from_wraps(known: &BTreeMap<KeyRef, Key>, wraps: &[Wrap]) -> BTreeMap<KeyRef, Key> {
    let mut known = known.clone();
    loop {
        let before = known.len();
        for w in wraps {
            if known.contains_key(&w.key) {
                continue;
            }
            let wrapping: Vec<Key> = match w.under {
                Wrapper::Key(under) => candidates(&known, under),
                Wrapper::KekAndTek { kek, tek } => {
                    let teks = candidates(&known, tek);
                    candidates(&known, kek).iter().flat_map(|k| teks.iter().map(|t| flat_replacement_wrapping_key(k, kek, t, tek))).collect()
                }
            };
            if let Some(key) = wrapping.iter().find_map(|k| w.open(k).ok()) {
                known.insert(w.key, key);
            }
        }
        if known.len() == before {
            return known;
        }
    }
}

/// Every known value of `to`'s key id, advanced to `to`'s revision where it can be.
fn candidates(known: &BTreeMap<KeyRef, Key>, to: KeyRef) -> Vec<Key> {
    let same_id = known.iter().filter(|(r, _)| r.id == to.id);
    same_id.filter_map(|(r, k)| derive_revision(k, KeyRef { version: to.version, ..*r }, to)).collect()
}
