//! Which wraps go into which rekey packet.
//!
//! Every placement visits the wraps in subtree order, so that members who share upper keys
//! share packets. A member's *chain* is its entry (a wrap under a key it already holds) and
//! every wrap that follows from it up to the group key.
//!
//! - User-oriented (Zhang, Lam, Lee and Yang): each chain whole in one packet, so a member
//!   needs exactly one packet; upper wraps are repeated in every packet that needs them.
//! - Tiered: each tree chain is cut at one depth; the lower halves are placed user-oriented,
//!   then the upper halves (one per subtree at the cut), so a member needs at most two
//!   packets. At 10% of 2^20 leaving this is 56 MB against 135 MB user-oriented.
//! - Compact: each wrap once, for measurements. A member cannot tell a compact packet holding
//!   its upper wrap from one it does not need, so a live group's controller refuses it.
//!
//! Tree plans (each new key sealed under by at most one wrap) are walked as a forest in one
//! pass without sorting; other plans (flat tables) fall back to sorting their chains.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::atomic::Ordering::Relaxed;

use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::graph::{RekeyPlan, TreeRuns};
use crate::key::KeyRef;
use crate::strategy::{entry_chains, PARALLEL_MIN};
use crate::wrap::{Wrap, Wrapper};

use super::codec::MIN_WRAP_LEN;

/// How wraps are spread over packets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// User-oriented while the rekey fits in one signing block, tiered above: one packet
    /// per member for the small rekeys of single joins and leaves, half the bytes for large
    /// batches.
    #[default]
    Auto,
    /// Zhang, Lam, Lee and Yang's user-oriented key assignment: each member's entry and every
    /// wrap above it go into one packet, repeating upper wraps in each packet that needs them.
    UserOriented,
    /// Tree chains cut at one depth, each half placed user-oriented: at most two packets per
    /// member (plans that are not trees are placed user-oriented).
    Tiered,
    /// Each wrap once, in the same subtree order: fewest bytes, for measurements. A member may
    /// need several packets and cannot tell them from others, so controllers refuse it.
    Compact,
}

impl core::str::FromStr for Placement {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Placement::Auto),
            "user" | "user-oriented" => Ok(Placement::UserOriented),
            "tiered" => Ok(Placement::Tiered),
            "compact" => Ok(Placement::Compact),
            other => Err(format!("unknown placement {other:?} (expected auto, user, tiered or compact)")),
        }
    }
}

/// Wrap indices per packet, as one list cut into packets.
pub(crate) struct Layout {
    wraps: Vec<u32>,
    /// Packet p holds `wraps[ends[p - 1]..ends[p]]`.
    ends: Vec<u32>,
}

impl Layout {
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    pub(crate) fn packet(&self, p: usize) -> &[u32] {
        let start = if p == 0 { 0 } else { self.ends[p - 1] as usize };
        &self.wraps[start..self.ends[p] as usize]
    }

    pub(crate) fn entries(&self) -> usize {
        self.wraps.len()
    }

    /// Appends `other`'s packets after these (an empty layout is one empty packet: dropped).
    fn append(&mut self, other: Layout) {
        if other.entries() == 0 {
            return;
        }
        if self.entries() == 0 {
            *self = other;
            return;
        }
        let offset = self.wraps.len() as u32;
        self.wraps.extend_from_slice(&other.wraps);
        self.ends.extend(other.ends.iter().map(|e| e + offset));
    }
}

/// Wrap indices per packet, each packet's entries at most `capacity` bytes. `Auto` switches
/// to tiered once user-oriented would take more than `block` packets.
pub(crate) fn place(plan: &RekeyPlan, placement: Placement, capacity: usize, block: usize) -> Layout {
    let Some(forest) = Forest::of(plan) else {
        let mode = if placement == Placement::Compact { Mode::Compact } else { Mode::UserOriented };
        return place_sorted_chains(plan, mode, capacity);
    };
    match placement {
        Placement::UserOriented => forest.place_whole(plan, Mode::UserOriented, capacity, usize::MAX).expect("no limit"),
        Placement::Compact => forest.place_whole(plan, Mode::Compact, capacity, usize::MAX).expect("no limit"),
        Placement::Tiered => forest.place_tiered(plan, capacity),
        // More wraps than a block of packets can hold even once each: straight to tiered.
        Placement::Auto if plan.wraps.len() > block * (capacity / MIN_WRAP_LEN) => forest.place_tiered(plan, capacity),
        Placement::Auto => forest
            .place_whole(plan, Mode::UserOriented, capacity, block)
            .unwrap_or_else(|| forest.place_tiered(plan, capacity)),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A wrap is repeated in every packet whose chains need it.
    UserOriented,
    /// A wrap is placed once.
    Compact,
}

/// Greedy packing of chains into packets, in the order given.
struct Packer<'a> {
    /// Bytes of each wrap's entry.
    lens: &'a [u8],
    mode: Mode,
    capacity: usize,
    /// Stops (returns None) beyond this many packets.
    limit: usize,
    /// For each wrap, 1 + the last packet of this packer it went into (0: not placed). Packers
    /// working on disjoint sets of wraps at once share one list.
    placed_in: &'a [AtomicU32],
    layout: Layout,
    used: usize,
    fresh: Vec<u32>,
}

/// A fresh `placed_in` list for every wrap of `plan`.
fn unplaced(plan: &RekeyPlan) -> Vec<AtomicU32> {
    (0..plan.wraps.len()).map(|_| AtomicU32::new(0)).collect()
}

/// Bytes of a wrap's entry: at most 85 (a flat replacement), so one byte each keeps the packers' reads in cache.
fn entry_len(wrap: &Wrap) -> u8 {
    wrap.encoded_len() as u8
}

impl<'a> Packer<'a> {
    /// A packer expecting about `entries` entries.
    fn new(lens: &'a [u8], mode: Mode, capacity: usize, limit: usize, placed_in: &'a [AtomicU32], entries: usize) -> Self {
        Packer {
            lens,
            mode,
            capacity,
            limit,
            placed_in,
            layout: Layout { wraps: Vec::with_capacity(entries), ends: Vec::with_capacity(entries / 8 + 1) },
            used: 0,
            fresh: Vec::with_capacity(32),
        }
    }

    fn len(&self, i: u32) -> usize {
        self.lens[i as usize] as usize
    }

    /// The number (1-based) of the packet being filled.
    fn current(&self) -> u32 {
        self.layout.ends.len() as u32 + 1
    }

    fn absent(&self, i: u32) -> bool {
        match self.mode {
            Mode::UserOriented => self.placed_in[i as usize].load(Relaxed) != self.current(),
            Mode::Compact => self.placed_in[i as usize].load(Relaxed) == 0,
        }
    }

    /// Collects the wraps of `chain` not yet where they must be; returns their bytes.
    fn collect_fresh(&mut self, chain: impl Iterator<Item = u32>) -> usize {
        self.fresh.clear();
        let mut need = 0;
        for i in chain {
            if self.absent(i) {
                self.fresh.push(i);
                need += self.len(i);
            }
        }
        need
    }

    fn close_packet(&mut self) -> Option<()> {
        self.layout.ends.push(self.layout.wraps.len() as u32);
        self.used = 0;
        (self.layout.ends.len() <= self.limit).then_some(())
    }

    fn current_is_empty(&self) -> bool {
        self.layout.wraps.len() as u32 == self.layout.ends.last().copied().unwrap_or(0)
    }

    fn push(&mut self, i: u32) {
        self.placed_in[i as usize].store(self.current(), Relaxed);
        self.layout.wraps.push(i);
        self.used += self.len(i);
    }

    /// Places one chain, given bottom-up; None once past the packet limit.
    fn chain(&mut self, chain: impl Iterator<Item = u32> + Clone) -> Option<()> {
        let mut need = self.collect_fresh(chain.clone());
        if self.used + need > self.capacity && !self.current_is_empty() {
            self.close_packet()?;
            need = self.collect_fresh(chain);
        }
        let fresh = std::mem::take(&mut self.fresh);
        if need <= self.capacity - self.used {
            fresh.iter().for_each(|&i| self.push(i));
        } else {
            // A chain longer than a packet (a wide flat table): spread it over several.
            for &i in &fresh {
                if self.used + self.len(i) > self.capacity {
                    self.close_packet()?;
                }
                self.push(i);
            }
        }
        self.fresh = fresh;
        Some(())
    }

    fn finish(mut self) -> Option<Layout> {
        if !self.current_is_empty() || self.layout.ends.is_empty() {
            self.close_packet()?;
        }
        Some(self.layout)
    }
}

/// Chains from the generic builder, sorted into subtree order (top-down comparison of up to
/// 16 levels; ties keep the plan's bottom-up, left-to-right order).
fn place_sorted_chains(plan: &RekeyPlan, mode: Mode, capacity: usize) -> Layout {
    let mut chains = entry_chains(plan);
    let order = |chain: &Vec<usize>| {
        let mut key = [0u32; 16];
        for (slot, &i) in key.iter_mut().zip(chain.iter().rev()) {
            *slot = plan.wraps[i].key.id.0;
        }
        key
    };
    if chains.len() < PARALLEL_MIN {
        chains.sort_by_cached_key(order);
    } else {
        chains.par_sort_by_cached_key(order);
    }
    let placed_in = unplaced(plan);
    let lens: Vec<u8> = plan.wraps.iter().map(entry_len).collect();
    let mut packer = Packer::new(&lens, mode, capacity, usize::MAX, &placed_in, 2 * plan.wraps.len());
    for chain in &chains {
        packer.chain(chain.iter().map(|&i| i as u32)).expect("no limit");
    }
    packer.finish().expect("no limit")
}

const NONE: u32 = u32::MAX;
/// Wraps linked per task when a large plan is linked on every core.
const PARALLEL_LINKS: usize = 16 * 1024;
/// Runs followed down per task when a large forest's depths are counted on every core.
const PARALLEL_RUNS: usize = 4 * 1024;

/// Finds the run that delivers a key.
enum RunIndex {
    /// Tree plans: runs in ascending key order, looked up mostly in ascending order too.
    Sorted(Vec<KeyRef>),
    /// Other plans. Refs are the controller's own, not attacker input: an unkeyed hash is safe.
    Hashed(FxHashMap<KeyRef, u32>),
}

impl RunIndex {
    /// None if some key's wraps are not contiguous.
    fn new(keys: Vec<KeyRef>) -> Option<RunIndex> {
        if keys.windows(2).all(|pair| pair[0] < pair[1]) {
            return Some(RunIndex::Sorted(keys));
        }
        let mut map = FxHashMap::default();
        map.reserve(keys.len());
        for (run, key) in keys.into_iter().enumerate() {
            if map.insert(key, run as u32).is_some() {
                return None;
            }
        }
        Some(RunIndex::Hashed(map))
    }

    /// The run of `key`; `hint` is where the previous lookup ended (galloping forward from it
    /// makes ascending lookups cost O(1) each).
    fn find(&self, hint: &mut usize, key: &KeyRef) -> Option<u32> {
        match self {
            RunIndex::Hashed(map) => map.get(key).copied(),
            RunIndex::Sorted(keys) => {
                let lo = if *hint < keys.len() && keys[*hint] <= *key { *hint } else { 0 };
                let (mut hi, mut step) = (lo + 1, 1);
                while hi < keys.len() && keys[hi] <= *key {
                    step *= 2;
                    hi = lo + step;
                }
                let i = lo + keys[lo..hi.min(keys.len())].partition_point(|k| k < key);
                (i < keys.len() && keys[i] == *key).then(|| {
                    *hint = i;
                    i as u32
                })
            }
        }
    }
}

/// Where each run of wraps of one key begins. A large plan's wraps (tens of MB) are scanned
/// in fixed chunks on every core.
fn run_starts(wraps: &[Wrap]) -> Vec<u32> {
    let starts_in = |range: core::ops::Range<usize>| -> Vec<u32> {
        range.filter(|&i| i == 0 || wraps[i - 1].key != wraps[i].key).map(|i| i as u32).collect()
    };
    if wraps.len() < PARALLEL_LINKS {
        return starts_in(0..wraps.len());
    }
    let chunks = wraps.len().div_ceil(PARALLEL_LINKS);
    let parts: Vec<Vec<u32>> = (0..chunks)
        .into_par_iter()
        .map(|c| starts_in(c * PARALLEL_LINKS..((c + 1) * PARALLEL_LINKS).min(wraps.len())))
        .collect();
    parts.concat()
}

/// Runs that no wrap is sealed under (the group key's), in key order; None if some new key
/// has two wraps sealed under it.
fn tops(wraps: &[Wrap], starts: &[u32], below: &[(u32, bool)]) -> Option<Vec<u32>> {
    let runs = starts.len() - 1;
    let sealed_under: Vec<AtomicBool> = (0..runs).map(|_| AtomicBool::new(false)).collect();
    let sealed_twice = |&(run, _): &(u32, bool)| run != NONE && sealed_under[run as usize].swap(true, Relaxed);
    if below.par_iter().with_min_len(PARALLEL_LINKS).any(sealed_twice) {
        return None;
    }
    let mut tops: Vec<u32> = (0..runs as u32).filter(|&r| !sealed_under[r as usize].load(Relaxed)).collect();
    tops.sort_by_key(|&r| wraps[starts[r as usize] as usize].key.id);
    Some(tops)
}

/// A tree plan as a forest: each wrap points down to the wraps that deliver the key it is
/// sealed under. Visiting it depth-first from the group key gives subtree order directly.
#[derive(Debug, PartialEq, Eq)]
struct Forest<'a> {
    /// Wraps of one key are contiguous in a plan: run r is wraps `starts[r]..starts[r + 1]`.
    starts: Cow<'a, [u32]>,
    /// For each wrap: the run delivering the key it is sealed under if that key is new, and
    /// whether it is an entry (sealed under a key its receivers hold or derive).
    below: Cow<'a, [(u32, bool)]>,
    /// Bytes of each wrap's entry.
    lens: Vec<u8>,
    /// Runs that no wrap is sealed under (the group key's), in key order.
    tops: Vec<u32>,
}

/// What the walk is doing at a wrap.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Visit {
    /// The wrap is an entry: `path` (top-down) is one member set's whole chain.
    Entry,
    /// Going down to the wraps that deliver the key this wrap is sealed under.
    Descend,
}

impl<'a> Forest<'a> {
    /// None unless every new key's wraps are contiguous and each new key has at most one
    /// wrap sealed under it.
    fn of(plan: &'a RekeyPlan) -> Option<Forest<'a>> {
        match &plan.tree_runs {
            Some(runs) if runs.below.len() == plan.wraps.len() => {
                let forest = Forest::of_tree(plan, runs);
                debug_assert!(forest.as_ref() == Forest::of_wraps(plan).as_ref(), "a tree's own runs match its wraps");
                forest
            }
            _ => Forest::of_wraps(plan),
        }
    }

    /// From the runs a tree recorded while sealing. Its wraps are all sealed under one key
    /// each, so their entries are all one length.
    fn of_tree(plan: &'a RekeyPlan, runs: &'a TreeRuns) -> Option<Forest<'a>> {
        let lens = vec![plan.wraps.first().map_or(0, entry_len); plan.wraps.len()];
        let tops = tops(&plan.wraps, &runs.starts, &runs.below)?;
        Some(Forest { starts: Cow::Borrowed(&runs.starts), below: Cow::Borrowed(&runs.below), lens, tops })
    }

    fn of_wraps(plan: &RekeyPlan) -> Option<Forest<'a>> {
        let wraps = &plan.wraps;
        let mut starts = run_starts(wraps);
        let keys: Vec<KeyRef> = starts.iter().map(|&start| wraps[start as usize].key).collect();
        starts.push(wraps.len() as u32);
        let index = RunIndex::new(keys)?;
        let revised: FxHashSet<KeyRef> = plan.revised.iter().copied().collect();
        // For each wrap: the run delivering the key it is sealed under, if that key is new.
        let link = |hint: &mut usize, under: &Wrapper| match under {
            Wrapper::Key(r) => Some(match index.find(hint, r) {
                // Existing members derive a revised key themselves: for them this is an entry.
                Some(run) => (run, revised.contains(r)),
                None => (NONE, true),
            }),
            Wrapper::KekAndTek { .. } => None,
        };
        // Written in place, chunk by chunk: no per-chunk lists to copy.
        let link_chunk = |wraps: &[Wrap], below: &mut [(u32, bool)], lens: &mut [u8]| {
            let mut hint = 0;
            wraps.iter().zip(below).zip(lens).all(|((wrap, below), len)| {
                *len = entry_len(wrap);
                link(&mut hint, &wrap.under).map(|linked| *below = linked).is_some()
            })
        };
        let (mut below, mut lens) = (vec![(NONE, false); wraps.len()], vec![0u8; wraps.len()]);
        let linked = if wraps.len() < PARALLEL_LINKS {
            link_chunk(wraps, &mut below, &mut lens)
        } else {
            let chunks = wraps.par_chunks(PARALLEL_LINKS).zip(below.par_chunks_mut(PARALLEL_LINKS)).zip(lens.par_chunks_mut(PARALLEL_LINKS));
            chunks.all(|((wraps, below), lens)| link_chunk(wraps, below, lens))
        };
        if !linked {
            return None;
        }
        let tops = tops(wraps, &starts, &below)?;
        Some(Forest { starts: Cow::Owned(starts), below: Cow::Owned(below), lens, tops })
    }

    /// How many wraps sit at each depth (0: the wraps delivering the group key); its length
    /// is the longest chain.
    fn wraps_per_depth(&self) -> Vec<usize> {
        let (mut level, mut counts) = (self.tops.clone(), Vec::new());
        let wraps = |&run: &u32| self.starts[run as usize]..self.starts[run as usize + 1];
        let new_keys_below = |run: &u32| wraps(run).map(|i| self.below[i as usize].0).filter(|&run| run != NONE);
        while !level.is_empty() {
            counts.push(level.iter().map(|run| wraps(run).len()).sum());
            level = if level.len() < PARALLEL_RUNS {
                level.iter().flat_map(new_keys_below).collect()
            } else {
                level.par_iter().with_min_len(PARALLEL_RUNS).flat_map_iter(new_keys_below).collect()
            };
        }
        counts
    }

    /// Where tiered placement cuts chains: as deep as keeps the upper tier (which user-oriented
    /// placement repeats most) within 1/16 of the wraps, and both halves of a chain within a
    /// packet where the tree allows. Short lower chains repeat little: at 10% of 2^20 (d = 4)
    /// this cuts 3 levels above the leaves, 53 MB against 62 MB when cutting halfway.
    fn tier_cut(&self, capacity: usize) -> usize {
        let counts = self.wraps_per_depth();
        if counts.len() < 2 {
            return 0;
        }
        let total: usize = counts.iter().sum();
        let fits = capacity / self.lens.iter().copied().max().unwrap_or(1).max(1) as usize;
        let (mut upper, mut cut) = (0, 0);
        while cut + 1 < counts.len() && cut < fits && (upper + counts[cut]) * 16 <= total {
            upper += counts[cut];
            cut += 1;
        }
        // Lower chains must fit too; small rekeys still get two tiers when asked.
        cut.max(counts.len().saturating_sub(fits)).clamp(1, counts.len() - 1)
    }

    fn is_entry(&self, i: u32) -> bool {
        self.below[i as usize].1
    }

    /// Depth-first from the tops: at each key its subtrees first, then its own entries, in plan
    /// (left-to-right) order. Deep chains first repeat fewer upper wraps: a single leave at
    /// 2^20 (d = 4) packs 58 entries into its 5 packets instead of 63 with entries first.
    fn walk(&self, visit: &mut dyn FnMut(Visit, &[u32])) {
        self.walk_down_to(usize::MAX, visit);
    }

    /// As [`Forest::walk`], but without going below paths of `depth` wraps.
    fn walk_down_to(&self, depth: usize, visit: &mut dyn FnMut(Visit, &[u32])) {
        let mut path = Vec::with_capacity(32);
        for &top in &self.tops {
            self.walk_run(top, depth, &mut path, visit);
        }
    }

    fn walk_run(&self, run: u32, depth: usize, path: &mut Vec<u32>, visit: &mut dyn FnMut(Visit, &[u32])) {
        let wraps = self.starts[run as usize]..self.starts[run as usize + 1];
        for i in wraps.clone().filter(|&i| self.below[i as usize].0 != NONE) {
            path.push(i);
            visit(Visit::Descend, path);
            if path.len() < depth {
                self.walk_run(self.below[i as usize].0, depth, path, visit);
            }
            path.pop();
        }
        for i in wraps.filter(|&i| self.is_entry(i)) {
            path.push(i);
            visit(Visit::Entry, path);
            path.pop();
        }
    }

    /// Whole chains per packet; None if that takes more than `limit` packets.
    fn place_whole(&self, plan: &RekeyPlan, mode: Mode, capacity: usize, limit: usize) -> Option<Layout> {
        let placed_in = unplaced(plan);
        let mut packer = Packer::new(&self.lens, mode, capacity, limit, &placed_in, 2 * plan.wraps.len());
        let mut over = false;
        self.walk(&mut |visit, path| {
            if visit == Visit::Entry && !over {
                over = packer.chain(path.iter().rev().copied()).is_none();
            }
        });
        if over {
            return None;
        }
        packer.finish()
    }

    /// Chains cut at [`Forest::tier_cut`]: upper halves (each once per subtree at the cut)
    /// then lower halves, each set placed user-oriented. The lower tier is packed in groups of
    /// subtrees at the cut, on every core; the groups are fixed in size, so the packets do not
    /// depend on the machine.
    fn place_tiered(&self, plan: &RekeyPlan, capacity: usize) -> Layout {
        let cut = self.tier_cut(capacity);
        if cut == 0 {
            // One level (a star): nothing to cut.
            return self.place_whole(plan, Mode::UserOriented, capacity, usize::MAX).expect("no limit");
        }
        let placed_in = unplaced(plan);
        let mut upper = Packer::new(&self.lens, Mode::UserOriented, capacity, usize::MAX, &placed_in, plan.wraps.len() / 8);
        // The runs just below the cut, each the root of a lower subtree, in subtree order.
        let mut subtrees = Vec::new();
        self.walk_down_to(cut, &mut |visit, path| {
            let last = *path.last().expect("a wrap");
            let placed = match visit {
                Visit::Entry if path.len() <= cut => upper.chain(path.iter().rev().copied()),
                Visit::Descend if path.len() == cut => {
                    subtrees.push(self.below[last as usize].0);
                    // An entry's chain is already placed.
                    if self.is_entry(last) { Some(()) } else { upper.chain(path.iter().rev().copied()) }
                }
                _ => Some(()),
            };
            placed.expect("no limit");
        });
        let pack_lower = |runs: &[u32]| {
            let mut lower = Packer::new(&self.lens, Mode::UserOriented, capacity, usize::MAX, &placed_in, 64);
            let mut path = Vec::with_capacity(32);
            for &run in runs {
                self.walk_run(run, usize::MAX, &mut path, &mut |visit, path| {
                    if visit == Visit::Entry {
                        lower.chain(path.iter().rev().copied()).expect("no limit");
                    }
                });
            }
            lower.finish().expect("no limit")
        };
        let lower: Vec<Layout> = if subtrees.len() <= SUBTREES_PER_TASK {
            vec![pack_lower(&subtrees)]
        } else {
            subtrees.par_chunks(SUBTREES_PER_TASK).map(pack_lower).collect()
        };
        let mut layout = upper.finish().expect("no limit");
        for part in lower {
            layout.append(part);
        }
        layout
    }
}

/// Lower subtrees packed by one task (a few packets are left part-full at each task's end).
const SUBTREES_PER_TASK: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{new_graph, Batch, GraphConfig, JoinPolicy, MemberId, Scheme};
    use crate::keygen::BatchSeed;

    /// The runs a tree records while sealing are exactly those read back from its wraps, over
    /// batches of joins and leaves of every size, both join policies and several degrees.
    #[test]
    fn a_trees_recorded_runs_match_its_wraps() {
        for (degree, join_policy) in [(2, JoinPolicy::NewVersion), (3, JoinPolicy::Revision), (4, JoinPolicy::NewVersion), (4, JoinPolicy::Revision)] {
            let config = GraphConfig { scheme: Scheme::Tree { degree }, join_policy };
            let mut graph = new_graph(config, &BatchSeed::from_u64(degree as u64)).expect("graph");
            let (mut next, mut members, mut checked) = (0u64, Vec::new(), 0);
            for round in 0..40u64 {
                // Alternating growth and churn: leaves of every third member, a few joins.
                let leaves: Vec<MemberId> = members.iter().copied().filter(|m: &MemberId| (m.0 + round) % 3 == 0).take(round as usize % 7 * 20).collect();
                let joins: Vec<MemberId> = (0..(round % 5) * 30 + 1).map(|i| MemberId(next + i)).collect();
                next += joins.len() as u64;
                members.retain(|m| !leaves.contains(m));
                members.extend(&joins);
                let plan = graph.apply(&Batch { joins, leaves }, &BatchSeed::from_u64(1000 + round)).expect("batch");
                let runs = plan.tree_runs.as_ref().expect("a tree records its runs");
                assert_eq!(Forest::of_tree(&plan, runs), Forest::of_wraps(&plan), "degree {degree}, round {round}");
                checked += plan.wraps.len();
            }
            assert!(checked > 1000, "the batches sealed wraps");
        }
    }
}
