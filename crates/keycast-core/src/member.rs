//! The member's side of a key graph: the keys on its path, updated from rekey messages.

use crate::graph::flat::flat_member_needs;
use crate::graph::merge::{Subtree, MERGED_ROOT_ID};
use crate::graph::tree::{ancestor, tree_key_position};
use crate::graph::{Position, Welcome};
use crate::key::{Key, KeyId, KeyRef};
use crate::keyring::KeyRing;
use crate::strategy::RekeyMessage;
use crate::wrap::{UnwrapError, Wrap, Wrapper};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemberError {
    #[error("no rekey message given")]
    NoMessages,
    #[error("rekey messages disagree on the group key ({0} and {1})")]
    InconsistentMessages(KeyRef, KeyRef),
    /// The member lacks a key it must hold after this rekey: a message is missing or the
    /// member was removed. Resync over the unicast channel.
    #[error("missing key {0}: a rekey message is missing or this member was removed")]
    MissingKey(KeyRef),
    #[error(transparent)]
    Unwrap(#[from] UnwrapError),
}

/// What one rekey changed for this member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberUpdate {
    pub group_key: KeyRef,
    /// Wraps this member opened.
    pub unwraps: usize,
}

/// The keys one member holds.
#[derive(Clone, Debug)]
pub struct MemberKeys {
    position: Position,
    individual: KeyId,
    group_key: Option<KeyRef>,
    ring: KeyRing,
    /// The side of a merged group this member sits on, if its group is merged.
    subtree: Option<Subtree>,
}

impl MemberKeys {
    /// A joiner's state: only its individual key until it processes the rekey of its batch.
    pub fn from_welcome(welcome: &Welcome) -> Self {
        let mut ring = KeyRing::new();
        ring.insert(welcome.individual, welcome.individual_key.clone());
        MemberKeys { position: welcome.position, individual: welcome.individual.id, group_key: None, ring, subtree: None }
    }

    /// A full state handed over the unicast channel (resync), as from `KeyGraph::member_keys`
    /// (individual key first).
    pub fn from_snapshot(position: Position, keys: Vec<(KeyRef, Key)>, group_key: KeyRef) -> Self {
        let individual = keys.first().map(|(r, _)| r.id).unwrap_or(KeyId(0));
        // A merged group's member holds its root: its side is the one its own keys are named for.
        let merged = keys.iter().any(|(r, _)| r.id == MERGED_ROOT_ID);
        let subtree = merged.then(|| if Subtree::Right.own_id(individual).is_some() { Subtree::Right } else { Subtree::Left });
        let mut ring = KeyRing::new();
        for (r, k) in keys {
            ring.insert(r, k);
        }
        MemberKeys { position, individual, group_key: Some(group_key), ring, subtree }
    }

    pub fn position(&self) -> Position {
        self.position
    }

    /// The group key this member holds, if it has processed a rekey naming it.
    pub fn group_key(&self) -> Option<(KeyRef, Key)> {
        let group_key = self.group_key?;
        Some((group_key, self.ring.get(group_key)?))
    }

    /// Every key this member holds (audits: what it takes with it when it leaves).
    pub fn keyring(&self) -> &KeyRing {
        &self.ring
    }

    /// This member's individual key (the newest version held): what its liveness key derives from.
    pub fn individual_key(&self) -> Option<Key> {
        let newest = self.ring.refs().filter(|r| r.id == self.individual).max_by_key(|r| (r.version, r.revision))?;
        self.ring.get(newest)
    }

    /// The ref and key for `key_ref` if held (audits and tests).
    pub fn key(&self, key_ref: KeyRef) -> Option<Key> {
        self.ring.get(key_ref)
    }

    pub fn refs(&self) -> Vec<KeyRef> {
        let mut refs: Vec<KeyRef> = self.ring.refs().collect();
        refs.sort();
        refs
    }

    /// The side of a merged group this member sits on, if its group is merged.
    pub fn subtree(&self) -> Option<Subtree> {
        self.subtree
    }

    /// Enters a merged group on `subtree` (told by the merge notice): the keys held are renamed
    /// to the merged group's ids, so the merge rekey and every later one can name them.
    pub fn merge_into(&mut self, subtree: Subtree) {
        self.rename(|id| subtree.merged_id(id));
        self.subtree = Some(subtree);
    }

    /// Marks a joiner of a merged group (its welcome already names merged ids) as on `subtree`.
    pub fn joined_merged(&mut self, subtree: Subtree) {
        self.subtree = Some(subtree);
    }

    /// Leaves a merged group at its split: drops the merged root and takes back the ids of a
    /// group of its own. The split rekey then brings the side's new group key.
    pub fn split_out(&mut self) {
        let Some(subtree) = self.subtree.take() else { return };
        self.group_key = None;
        self.rename(|id| subtree.own_id(id).unwrap_or(MERGED_ROOT_ID));
        let kept: Vec<KeyRef> = self.ring.refs().filter(|r| r.id != MERGED_ROOT_ID).collect();
        self.ring.retain_exactly(kept);
    }

    fn rename(&mut self, rename: impl Fn(KeyId) -> KeyId) {
        let mut ring = KeyRing::new();
        for r in self.ring.refs() {
            if let Some(key) = self.ring.get(r) {
                ring.insert(KeyRef { id: rename(r.id), ..r }, key);
            }
        }
        self.ring = ring;
        self.individual = rename(self.individual);
        self.group_key = self.group_key.map(|g| KeyRef { id: rename(g.id), ..g });
    }

    /// True if key `id` is on this member's path in a graph whose group key is `group_key`.
    fn needs(&self, id: KeyId, group_key: KeyRef) -> bool {
        self.needs_below(id, group_key, None)
    }

    /// [`Self::needs`] in a merged group whose subtree on this member's side has its root at
    /// `subtree_top` (if known): keys above it are a root the subtree dropped.
    fn needs_below(&self, id: KeyId, group_key: KeyRef, subtree_top: Option<u32>) -> bool {
        if let Some(subtree) = self.subtree {
            return id == MERGED_ROOT_ID || subtree.own_id(id).is_some_and(|own| self.needs_unmerged(own, subtree_top.unwrap_or(u32::MAX)));
        }
        self.needs_unmerged(id, tree_key_position(group_key.id).0)
    }

    /// The height of this side's subtree root in a merged group's rekey: the key the merged
    /// root is wrapped under on this side.
    fn subtree_top(&self, messages: &[RekeyMessage<'_>]) -> Option<u32> {
        let subtree = self.subtree?;
        let wraps = messages.iter().flat_map(|m| m.wraps.iter());
        wraps.filter(|w| w.key.id == MERGED_ROOT_ID).find_map(|w| match w.under {
            Wrapper::Key(r) => subtree.own_id(r.id).map(|own| tree_key_position(own).0),
            Wrapper::KekAndTek { .. } => None,
        })
    }

    /// [`Self::needs`] in a group of its own, or in this member's subtree: `top` bounds a tree path.
    fn needs_unmerged(&self, id: KeyId, top: u32) -> bool {
        match self.position {
            Position::Tree { leaf, degree } => {
                let (height, position) = tree_key_position(id);
                height <= top && ancestor(leaf, degree, height) == position
            }
            Position::Flat { id: member_id, id_bits } => flat_member_needs(id, member_id, id_bits, self.individual),
        }
    }

    /// True if `message` holds an entry for this member: a wrap sealed under a key on its
    /// path that it holds, or that the message itself does not deliver (under tiered
    /// placement that key arrives in the member's other packet of the same rekey); or, when
    /// the group key only advanced a revision (a batch of joins alone), the header itself.
    pub fn has_entry(&self, message: &RekeyMessage<'_>) -> bool {
        let delivered_elsewhere = |r: KeyRef| {
            self.needs(r.id, message.group_key) && !message.wraps.iter().any(|d| d.key == r)
        };
        self.derives_new_revision(message.group_key)
            || message.wraps.iter().any(|w| match w.under {
                Wrapper::Key(r) => self.ring.holds(r) || delivered_elsewhere(r),
                Wrapper::KekAndTek { kek, tek } => self.ring.holds(kek) && (self.ring.holds(tek) || delivered_elsewhere(tek)),
            })
    }

    /// True if `group_key` is a later revision of the group key this member holds: it derives
    /// the key itself, and every key below it on its path changed by revision at most.
    fn derives_new_revision(&self, group_key: KeyRef) -> bool {
        let held = self.group_key.filter(|g| g.id == group_key.id && g.version == group_key.version);
        held.is_some_and(|g| g.revision < group_key.revision && self.ring.holds(group_key))
    }

    /// Applies the messages of one rekey; the state changes only if the member ends with
    /// every key it must hold.
    pub fn apply(&mut self, messages: &[RekeyMessage<'_>]) -> Result<MemberUpdate, MemberError> {
        let group_key = messages.first().ok_or(MemberError::NoMessages)?.group_key;
        if let Some(m) = messages.iter().find(|m| m.group_key != group_key) {
            return Err(MemberError::InconsistentMessages(group_key, m.group_key));
        }
        let wraps = messages.iter().flat_map(|m| m.wraps.iter().copied());
        let subtree_top = self.subtree_top(messages);
        let needs = |id: KeyId| self.needs_below(id, group_key, subtree_top);
        let mut ring = self.ring.clone();
        let unwraps = ring.absorb_where(wraps.clone(), |r| self.needs(r.id, group_key))?;

        // A revision reaches members only as a ref some message names (the group key, a
        // wrapped key or a wrapper); each member derives it from the revision it holds.
        let named: Vec<KeyRef> = messages
            .iter()
            .flat_map(|m| m.wraps.iter().flat_map(|w| named_refs(w)))
            .chain([group_key])
            .collect();
        let newest = ring.newest(&named);
        // Every version of a path key the rekey names, as wrapped key or as wrapper, is one
        // this member must end with: a wrap sealed under a new version it lacks means another
        // packet of the rekey (its lower tier) is still missing, even when the old versions
        // it holds already opened the group key.
        for wanted in named.iter().filter(|r| needs(r.id)) {
            match newest.get(&wanted.id) {
                Some(held) if (held.version, held.revision) >= (wanted.version, wanted.revision) => {}
                _ => return Err(MemberError::MissingKey(*wanted)),
            }
        }
        ring.retain_exactly(newest.into_values().filter(|r| needs(r.id)));
        if !ring.holds(group_key) {
            return Err(MemberError::MissingKey(group_key));
        }
        self.ring = ring;
        self.group_key = Some(group_key);
        Ok(MemberUpdate { group_key, unwraps })
    }
}

/// The refs a wrap names: the key it delivers and the key(s) it is sealed under.
fn named_refs(wrap: &Wrap) -> impl Iterator<Item = KeyRef> {
    let (a, b) = match wrap.under {
        Wrapper::Key(r) => (r, None),
        Wrapper::KekAndTek { kek, tek } => (kek, Some(tek)),
    };
    [wrap.key, a].into_iter().chain(b)
}
