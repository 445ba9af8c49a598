//! A set of keys and everything it can derive: the member's store and the auditor's model of
//! what a departed member or a coalition can learn from the rekeys it overhears.

use std::collections::HashMap;

use crate::key::{Key, KeyId, KeyRef};
use crate::wrap::{derive_revision, MAX_REVISION_GAP, flat_replacement_wrapping_key, UnwrapError, Wrap, Wrapper};

/// Keys by (id, version), each held at the lowest revision known: every later revision of the
/// same version follows through the one-way function.
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: HashMap<(KeyId, u32), (u32, Key)>,
}

impl core::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "KeyRing({} keys)", self.keys.len())
    }
}

impl KeyRing {
    pub fn new() -> Self {
        KeyRing::default()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn insert(&mut self, key_ref: KeyRef, key: Key) {
        let slot = (key_ref.id, key_ref.version);
        match self.keys.get(&slot) {
            Some((revision, _)) if *revision <= key_ref.revision => {}
            _ => {
                self.keys.insert(slot, (key_ref.revision, key));
            }
        }
    }

    /// Adds every key of `other` (for pooling what several members know).
    pub fn extend(&mut self, other: &KeyRing) {
        for (&(id, version), (revision, key)) in &other.keys {
            self.insert(KeyRef::new(id, version, *revision), key.clone());
        }
    }

    /// True if this ring holds or can derive `key_ref`.
    pub fn holds(&self, key_ref: KeyRef) -> bool {
        matches!(self.keys.get(&(key_ref.id, key_ref.version)),
            Some((r, _)) if *r <= key_ref.revision && key_ref.revision - r <= MAX_REVISION_GAP)
    }

    /// The key named by `key_ref`, derived forward through revisions if needed.
    pub fn get(&self, key_ref: KeyRef) -> Option<Key> {
        let (revision, key) = self.keys.get(&(key_ref.id, key_ref.version))?;
        derive_revision(key, KeyRef { revision: *revision, ..key_ref }, key_ref)
    }

    /// The key a wrap is sealed under, if this ring can produce it.
    pub fn wrapping_key(&self, under: &Wrapper) -> Option<Key> {
        match *under {
            Wrapper::Key(r) => self.get(r),
            Wrapper::KekAndTek { kek, tek } => {
                let (kek_key, tek_key) = (self.get(kek)?, self.get(tek)?);
                Some(flat_replacement_wrapping_key(&kek_key, kek, &tek_key, tek))
            }
        }
    }

    /// Unwraps everything reachable from this ring, repeating until nothing new opens.
    /// Returns how many wraps were opened. A wrap that fails authentication is an error.
    pub fn absorb<'a>(&mut self, wraps: impl IntoIterator<Item = &'a Wrap> + Clone) -> Result<usize, UnwrapError> {
        self.absorb_where(wraps, |_| true)
    }

    /// As [`KeyRing::absorb`], but only for wraps of keys `wanted` accepts.
    pub fn absorb_where<'a>(
        &mut self,
        wraps: impl IntoIterator<Item = &'a Wrap> + Clone,
        wanted: impl Fn(KeyRef) -> bool,
    ) -> Result<usize, UnwrapError> {
        let mut opened = 0;
        loop {
            // Wraps come bottom-up, so one pass normally suffices; repeat only while a pass
            // both opened something and left a wanted wrap it could not yet open.
            let (mut opened_now, mut pending) = (0, false);
            for wrap in wraps.clone() {
                if !wanted(wrap.key) || self.holds(wrap.key) {
                    continue;
                }
                match self.wrapping_key(&wrap.under) {
                    Some(wrapping) => {
                        self.insert(wrap.key, wrap.open(&wrapping)?);
                        opened_now += 1;
                    }
                    None => pending = true,
                }
            }
            opened += opened_now;
            if opened_now == 0 || !pending {
                return Ok(opened);
            }
        }
    }

    /// The newest (version, then revision) ref held for each id, advanced to the revisions
    /// listed in `revised` where they apply.
    pub fn newest(&self, revised: &[KeyRef]) -> HashMap<KeyId, KeyRef> {
        let mut newest: HashMap<KeyId, KeyRef> = HashMap::new();
        for (&(id, version), &(revision, _)) in &self.keys {
            let candidate = KeyRef::new(id, version, revision);
            let entry = newest.entry(id).or_insert(candidate);
            if version > entry.version {
                *entry = candidate;
            }
        }
        for r in revised {
            if let Some(entry) = newest.get_mut(&r.id) {
                if entry.precedes_revision_of(*r) {
                    *entry = *r;
                }
            }
        }
        newest
    }

    /// Keeps only the keys named by `refs`, each at exactly that revision.
    pub fn retain_exactly(&mut self, refs: impl IntoIterator<Item = KeyRef>) {
        let mut kept = HashMap::new();
        for r in refs {
            if let Some(key) = self.get(r) {
                kept.insert((r.id, r.version), (r.revision, key));
            }
        }
        self.keys = kept;
    }

    pub fn refs(&self) -> impl Iterator<Item = KeyRef> + '_ {
        self.keys.iter().map(|(&(id, version), &(revision, _))| KeyRef::new(id, version, revision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ref_far_ahead_in_revisions_is_unknown_not_hours_of_hashing() {
        let mut ring = KeyRing::new();
        let held = KeyRef::new(KeyId(5), 3, 0);
        ring.insert(held, Key::from_bytes([1; 32]));
        let near = KeyRef::new(KeyId(5), 3, MAX_REVISION_GAP);
        let far = KeyRef::new(KeyId(5), 3, u32::MAX);
        assert!(ring.holds(near) && ring.get(near).is_some());
        // Before the bound this derived 2^32 revisions (the fuzz target's slow unit).
        assert!(!ring.holds(far) && ring.get(far).is_none());
    }
}
