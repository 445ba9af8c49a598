//! Packaging a rekey plan into messages (Wong, Gouda and Lam, section 3).

use std::collections::HashMap;

use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::graph::RekeyPlan;
use crate::key::KeyRef;
use crate::wrap::{Wrap, Wrapper};

/// How a rekey is split into messages.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Strategy {
    /// One message with every wrap, for the whole group.
    GroupOriented,
    /// One message per new key, with all of that key's wraps.
    KeyOriented,
    /// One message per set of members that need the same new keys: each entry point (a wrap
    /// under a key that did not change) with every wrap that follows from it. Upper keys are
    /// repeated across messages, so the total is larger but each member needs one message.
    UserOriented,
}

impl core::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "group" | "group-oriented" => Ok(Strategy::GroupOriented),
            "key" | "key-oriented" => Ok(Strategy::KeyOriented),
            "user" | "user-oriented" => Ok(Strategy::UserOriented),
            other => Err(format!("unknown strategy {other:?} (expected group, key or user)")),
        }
    }
}

/// One rekey message: the header every member needs, and some wraps.
#[derive(Clone, Debug)]
pub struct RekeyMessage<'a> {
    pub group_key: KeyRef,
    pub wraps: Vec<&'a Wrap>,
}

/// Version and type bytes, group key ref, and the wrap count.
const HEADER_LEN: usize = 2 + KeyRef::ENCODED_LEN + 4;

impl RekeyMessage<'_> {
    /// Bytes of this message on the wire, before packetisation and signatures.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN
            + self.wraps.iter().map(|w| w.encoded_len()).sum::<usize>()
    }
}

/// Splits `plan` into messages according to `strategy`.
pub fn package<'a>(plan: &'a RekeyPlan, strategy: Strategy) -> Vec<RekeyMessage<'a>> {
    let message = |wraps: Vec<&'a Wrap>| RekeyMessage { group_key: plan.group_key, wraps };
    match strategy {
        Strategy::GroupOriented => vec![message(plan.wraps.iter().collect())],
        Strategy::KeyOriented => {
            let mut order: Vec<KeyRef> = Vec::new();
            let mut by_key: HashMap<KeyRef, Vec<&Wrap>> = HashMap::new();
            for w in &plan.wraps {
                by_key.entry(w.key).or_insert_with(|| {
                    order.push(w.key);
                    Vec::new()
                });
                by_key.get_mut(&w.key).expect("inserted").push(w);
            }
            let mut messages: Vec<_> = order.iter().map(|k| message(by_key.remove(k).expect("present"))).collect();
            if messages.is_empty() {
                messages.push(message(Vec::new()));
            }
            messages
        }
        Strategy::UserOriented => user_oriented(plan).into_iter().map(message).collect(),
    }
}

fn user_oriented(plan: &RekeyPlan) -> Vec<Vec<&Wrap>> {
    let mut messages: Vec<Vec<&Wrap>> =
        entry_chains(plan).into_iter().map(|chain| chain.into_iter().map(|i| &plan.wraps[i]).collect()).collect();
    if messages.is_empty() {
        messages.push(Vec::new());
    }
    messages
}

/// For each entry point of a rekey (a wrap under a key its receivers already hold), the
/// indices in `plan.wraps` of that wrap and of every wrap that follows from it: everything one
/// set of members needs, bottom-up.
pub(crate) fn entry_chains(plan: &RekeyPlan) -> Vec<Vec<usize>> {
    let wraps = &plan.wraps;
    // Refs are the controller's own, not attacker input: a fast non-keyed hash is safe here.
    let new_keys: FxHashSet<KeyRef> = wraps.iter().map(|w| w.key).collect();
    let revised: FxHashSet<KeyRef> = plan.revised.iter().copied().collect();
    // Wraps that open once a given new key is known (for flat replacements, the new TEK).
    let mut sealed_under: FxHashMap<KeyRef, Vec<usize>> = FxHashMap::default();
    let mut entries = Vec::new();
    for (i, w) in wraps.iter().enumerate() {
        match w.under {
            Wrapper::Key(r) if new_keys.contains(&r) => {
                sealed_under.entry(r).or_default().push(i);
                // Existing members derive a revised key themselves: for them this is an entry.
                if revised.contains(&r) {
                    entries.push(i);
                }
            }
            Wrapper::KekAndTek { tek, .. } => sealed_under.entry(tek).or_default().push(i),
            Wrapper::Key(_) => entries.push(i),
        }
    }
    let follows: Vec<&[usize]> =
        wraps.iter().map(|w| sealed_under.get(&w.key).map(Vec::as_slice).unwrap_or_default()).collect();
    let chain = |entry: usize| {
        let mut chain = vec![entry];
        let mut next = 0;
        while next < chain.len() {
            for &i in follows[chain[next]] {
                if !chain.contains(&i) {
                    chain.push(i);
                }
            }
            next += 1;
        }
        chain
    };
    // Handing a few chains to the thread pool costs more than building them here.
    if entries.len() < PARALLEL_MIN {
        entries.into_iter().map(chain).collect()
    } else {
        entries.into_par_iter().map(chain).collect()
    }
}

/// Fewer items than this are processed on the calling thread: waking the pool from outside
/// costs tens of microseconds, more than a single leave's whole rekey.
pub(crate) const PARALLEL_MIN: usize = 256;

/// Messages, wraps and bytes of a packaged rekey.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackageSize {
    pub messages: usize,
    pub wraps: usize,
    pub bytes: usize,
}

pub fn package_size(messages: &[RekeyMessage<'_>]) -> PackageSize {
    PackageSize {
        messages: messages.len(),
        wraps: messages.iter().map(|m| m.wraps.len()).sum(),
        bytes: messages.iter().map(|m| m.encoded_len()).sum(),
    }
}
