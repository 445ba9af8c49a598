//! The requests waiting for the epoch's batch, in arrival order, with the indexes a controller
//! of a million members needs: a burst of joins or leaves must cost O(log n) per request, not
//! a scan of everything queued before it.

use std::collections::{BTreeMap, BTreeSet};

use super::controller::Request;
use crate::graph::MemberId;

#[derive(Default)]
pub(crate) struct Pending {
    requests: Vec<Request>,
    /// Queued joins by identity.
    joins: BTreeMap<String, MemberId>,
    /// Members named by a queued request, and how many requests name each.
    named: BTreeMap<MemberId, u32>,
    /// Queued leaves (false) and evictions (true).
    departures: BTreeSet<(MemberId, bool)>,
}

impl Pending {
    pub(crate) fn from_requests(requests: &[Request]) -> Pending {
        let mut pending = Pending::default();
        for request in requests {
            pending.push(request.clone());
        }
        pending
    }

    pub(crate) fn push(&mut self, request: Request) {
        *self.named.entry(request.member()).or_default() += 1;
        match &request {
            Request::Join { member, identity } => drop(self.joins.insert(identity.clone(), *member)),
            Request::Leave { member } => drop(self.departures.insert((*member, false))),
            Request::Evict { member } => drop(self.departures.insert((*member, true))),
        }
        self.requests.push(request);
    }

    pub(crate) fn contains(&self, request: &Request) -> bool {
        match request {
            Request::Join { member, identity } => self.joins.get(identity) == Some(member),
            Request::Leave { member } => self.departures.contains(&(*member, false)),
            Request::Evict { member } => self.departures.contains(&(*member, true)),
        }
    }

    /// True while a leave or eviction of `member` waits.
    pub(crate) fn departing(&self, member: MemberId) -> bool {
        self.departures.range((member, false)..=(member, true)).next().is_some()
    }

    /// True if any queued request names `member`.
    pub(crate) fn names(&self, member: MemberId) -> bool {
        self.named.contains_key(&member)
    }

    pub(crate) fn queued_join(&self, identity: &str) -> Option<MemberId> {
        self.joins.get(identity).copied()
    }

    pub(crate) fn joins(&self) -> usize {
        self.joins.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Request> {
        self.requests.iter()
    }

    /// Withdraws the queued join of `identity`; its member id.
    pub(crate) fn remove_join(&mut self, identity: &str) -> Option<MemberId> {
        let member = self.joins.get(identity).copied()?;
        self.retain(|r| !matches!(r, Request::Join { identity: i, .. } if i == identity));
        Some(member)
    }

    /// Every request, in arrival order; nothing stays queued.
    pub(crate) fn take(&mut self) -> Vec<Request> {
        std::mem::take(self).requests
    }

    pub(crate) fn retain(&mut self, keep: impl FnMut(&Request) -> bool) {
        let mut requests = self.take();
        requests.retain(keep);
        *self = Pending::from_requests(&requests);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The indexes answer what a scan of the queue answers, through pushes, withdrawn joins and
    /// retains in a fixed pseudo-random order.
    #[test]
    fn the_indexes_agree_with_a_scan_of_the_queue() {
        let mut pending = Pending::default();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |bound: u64| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % bound
        };
        for step in 0..2_000 {
            let member = MemberId(next(40));
            match next(6) {
                0 | 1 => {
                    let join = Request::Join { member, identity: format!("id{}", member.0) };
                    if pending.queued_join(&format!("id{}", member.0)).is_none() {
                        pending.push(join);
                    }
                }
                2 => pending.push(Request::Leave { member }),
                3 => pending.push(Request::Evict { member }),
                4 => drop(pending.remove_join(&format!("id{}", member.0))),
                _ => pending.retain(|r| r.member() != member),
            }
            let scan: Vec<Request> = pending.iter().cloned().collect();
            for m in (0..40).map(MemberId) {
                let identity = format!("id{}", m.0);
                assert_eq!(pending.names(m), scan.iter().any(|r| r.member() == m), "step {step}");
                assert_eq!(pending.departing(m), scan.iter().any(|r| matches!(r, Request::Leave { member } | Request::Evict { member } if *member == m)));
                assert_eq!(pending.queued_join(&identity), scan.iter().find_map(|r| match r {
                    Request::Join { member, identity: i } if *i == identity => Some(*member),
                    _ => None,
                }));
                for r in [Request::Leave { member: m }, Request::Evict { member: m }] {
                    assert_eq!(pending.contains(&r), scan.contains(&r));
                }
            }
            assert_eq!(pending.joins(), scan.iter().filter(|r| matches!(r, Request::Join { .. })).count());
        }
    }
}
