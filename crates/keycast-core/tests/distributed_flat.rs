//! Distributed flat key management (Caronni et al. 3.4) over a deterministic simulated
//! network: messages between participants are delivered one at a time in an order drawn from
//! a seed, timers fire when the network is quiet, and the properties are checked once the
//! announcements settle.

use std::collections::{BTreeMap, BTreeSet};

use keycast_core::key::{Key, KeyId, KeyRef};
use keycast_core::keygen::BatchSeed;
use keycast_core::protocol::distributed_flat::audit::derive_keys;
use keycast_core::protocol::distributed_flat::message::change_digest;
use keycast_core::protocol::distributed_flat::{Announcement, Body, ChangeDigest, Config, Directory, Event, Identity, Output, Participant, Refused};
use keycast_core::wire::{GroupId, Signer};
use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

const SETTLE_MS: u64 = 100;
const TEK_ID: KeyId = KeyId(0);

fn name(i: usize) -> Identity {
    Identity::new(&format!("participant-{i}")).unwrap()
}

fn signer_seed(who: &Identity) -> [u8; 32] {
    let mut seed = [0u8; 32];
    for (i, b) in who.as_str().bytes().enumerate() {
        seed[i % 32] ^= b.wrapping_add(i as u8);
    }
    seed
}

enum Delivery {
    Multicast(Vec<u8>),
    Private { from: Identity, bytes: Vec<u8> },
}

#[derive(Default, Clone, Copy, Debug)]
struct Traffic {
    multicast: usize,
    multicast_bytes: usize,
    private: usize,
    private_bytes: usize,
}

/// N participants and the messages between them, delivered in a seeded order.
struct Net {
    config: Config,
    directory: Directory,
    nodes: BTreeMap<Identity, Participant>,
    queue: Vec<(Identity, Delivery)>,
    timers: Vec<(u64, Identity)>,
    now: u64,
    order: ChaCha20Rng,
    entropy: u64,
    traffic: Traffic,
    /// Every announcement ever multicast (what an outsider records).
    log: Vec<Vec<u8>>,
    /// Every key each participant ever held.
    ever_held: BTreeMap<Identity, BTreeMap<KeyRef, Key>>,
    /// The TEK version that removed each departed participant.
    departed_at: BTreeMap<Identity, u32>,
    /// Participants cut off from everyone else (a partition), if any.
    cut: BTreeSet<Identity>,
    /// Every TEK some settled participant held: the keys traffic may be sealed under (the
    /// TEK of an exclusion round still open is provisional, see docs/distributed-flat.md).
    teks_in_force: BTreeMap<KeyRef, Key>,
    /// Participants that found another history ranking above theirs.
    diverged: BTreeSet<Identity>,
}

impl Net {
    fn new(id_bits: u8, identities: usize, seed: u64) -> Net {
        let mut net = Net::empty(id_bits, identities, seed);
        let first = name(0);
        let p = Participant::create(net.config, first.clone(), Self::signer(&first), net.directory.clone(), &net.fresh()).unwrap();
        net.nodes.insert(first.clone(), p);
        net.remember(&first);
        net
    }

    /// A network with no participant yet.
    fn empty(id_bits: u8, identities: usize, seed: u64) -> Net {
        let directory = (0..identities).map(|i| (name(i), Signer::from_seed(&signer_seed(&name(i))).verifying_key())).collect();
        let config = Config { group: GroupId(7), id_bits, settle_ms: SETTLE_MS };
        Net {
            config,
            directory,
            nodes: BTreeMap::new(),
            queue: Vec::new(),
            timers: Vec::new(),
            now: 0,
            order: ChaCha20Rng::seed_from_u64(seed),
            entropy: seed << 20,
            traffic: Traffic::default(),
            log: Vec::new(),
            ever_held: BTreeMap::new(),
            departed_at: BTreeMap::new(),
            cut: BTreeSet::new(),
            teks_in_force: BTreeMap::new(),
            diverged: BTreeSet::new(),
        }
    }

    fn signer(who: &Identity) -> Signer {
        Signer::from_seed(&signer_seed(who))
    }

    fn fresh(&mut self) -> BatchSeed {
        self.entropy += 1;
        BatchSeed::from_u64(self.entropy)
    }

    fn live(&self) -> Vec<Identity> {
        self.nodes.iter().filter(|(_, p)| p.is_live()).map(|(who, _)| who.clone()).collect()
    }

    fn remember(&mut self, who: &Identity) {
        let node = &self.nodes[who];
        if let Some((r, k)) = node.tek().filter(|_| node.is_settled()) {
            self.teks_in_force.insert(r, k.clone());
        }
        let held = self.nodes[who].held_keys();
        self.ever_held.entry(who.clone()).or_default().extend(held);
    }

    fn reachable(&self, from: &Identity, to: &Identity) -> bool {
        self.cut.contains(from) == self.cut.contains(to)
    }

    fn dispatch(&mut self, from: &Identity, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Multicast(bytes) => {
                    self.traffic.multicast += 1;
                    self.traffic.multicast_bytes += bytes.len();
                    self.log.push(bytes.clone());
                    let to: Vec<Identity> = self.nodes.keys().filter(|w| *w != from && self.reachable(from, w)).cloned().collect();
                    to.into_iter().for_each(|w| self.queue.push((w, Delivery::Multicast(bytes.clone()))));
                }
                Output::Private { to, bytes } => {
                    self.traffic.private += 1;
                    self.traffic.private_bytes += bytes.len();
                    if self.reachable(from, &to) {
                        self.queue.push((to, Delivery::Private { from: from.clone(), bytes: bytes.to_vec() }));
                    }
                }
                Output::Timer { at_ms } => self.timers.push((at_ms, from.clone())),
                Output::Event(Event::Departed { tek_version }) => {
                    self.departed_at.insert(from.clone(), tek_version);
                }
                Output::Event(Event::Diverged { .. }) => {
                    self.diverged.insert(from.clone());
                }
                Output::Event(_) => {}
            }
        }
    }

    /// Delivers everything, firing timers whenever the network is quiet, until nothing is left.
    fn settle(&mut self) {
        for _ in 0..200_000 {
            if !self.queue.is_empty() {
                let index = (self.order.next_u64() % self.queue.len() as u64) as usize;
                let (to, delivery) = self.queue.swap_remove(index);
                let entropy = self.fresh();
                let Some(node) = self.nodes.get_mut(&to) else { continue };
                let result = match &delivery {
                    Delivery::Multicast(bytes) => node.receive(bytes, &entropy, self.now),
                    Delivery::Private { from, bytes } => node.receive_private(from, bytes, &entropy, self.now),
                };
                if let Ok(outputs) = result {
                    self.dispatch(&to, outputs);
                }
                self.remember(&to);
            } else if let Some(&(at, _)) = self.timers.iter().min_by_key(|(at, _)| *at) {
                self.now = self.now.max(at);
                let due: Vec<Identity> = self.timers.iter().filter(|(t, _)| *t <= self.now).map(|(_, w)| w.clone()).collect();
                self.timers.retain(|(t, _)| *t > self.now);
                for who in due.into_iter().collect::<BTreeSet<_>>() {
                    let entropy = self.fresh();
                    let outputs = self.nodes.get_mut(&who).unwrap().tick(&entropy, self.now);
                    self.dispatch(&who, outputs);
                    self.remember(&who);
                }
            } else {
                return;
            }
        }
        panic!("the network did not settle");
    }

    fn join(&mut self, joiner: Identity, introducer: &Identity) -> Result<(), Refused> {
        let entropy = self.fresh();
        let outputs = self.nodes.get_mut(introducer).unwrap().admit(&joiner, &entropy, self.now)?;
        let p = Participant::joining(self.config, joiner.clone(), Self::signer(&joiner), self.directory.clone());
        self.nodes.insert(joiner, p);
        self.dispatch(introducer, outputs);
        Ok(())
    }

    fn evict(&mut self, target: &Identity, excluder: &Identity) -> Result<(), Refused> {
        let entropy = self.fresh();
        let id = self.nodes[target].id();
        let outputs = self.nodes.get_mut(excluder).unwrap().exclude(id, true, &entropy, self.now)?;
        self.dispatch(excluder, outputs);
        Ok(())
    }

    fn leave(&mut self, who: &Identity) {
        let outputs = self.nodes.get_mut(who).unwrap().leave(self.now).unwrap();
        self.dispatch(who, outputs);
    }

    /// After settling: every live participant holds all its keys, the same TEK and roster,
    /// and every KEK slot has one value among its holders.
    fn assert_agreement(&self) {
        let live = self.live();
        let first = &self.nodes[&live[0]];
        let (tek_ref, tek) = first.tek().expect("a TEK");
        let ids: BTreeSet<u64> = live.iter().map(|w| self.nodes[w].id()).collect();
        let mut slots: BTreeMap<KeyId, (KeyRef, Key)> = BTreeMap::new();
        for who in &live {
            let p = &self.nodes[who];
            assert!(p.is_settled(), "{who} is not settled");
            let (r, k) = p.tek().unwrap();
            assert_eq!((r, k), (tek_ref, tek), "{who} holds another TEK");
            assert_eq!(p.roster().keys().copied().collect::<BTreeSet<_>>(), ids, "{who}'s roster");
            for (key_ref, key) in p.held_keys().into_iter().skip(1) {
                let held = slots.entry(key_ref.id).or_insert((key_ref, key.clone()));
                assert_eq!((held.0, &held.1), (key_ref, &key), "{who} disagrees on KEK {key_ref}");
            }
        }
    }
}

/// Whether `derived` holds a TEK that was in force, of `version` or later.
fn derives_tek_from(net: &Net, derived: &BTreeMap<KeyRef, Key>, version: u32) -> bool {
    derived.iter().any(|(r, k)| r.id == TEK_ID && r.version >= version && net.teks_in_force.get(r) == Some(k))
}

#[derive(Clone, Debug)]
enum Step {
    Join { introducer: usize },
    Leave { who: usize },
    Evict { target: usize, excluder: usize },
    /// Two excluders at once, each before hearing of the other.
    ConcurrentEvict { targets: (usize, usize), excluders: (usize, usize) },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => any::<usize>().prop_map(|introducer| Step::Join { introducer }),
        1 => any::<usize>().prop_map(|who| Step::Leave { who }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(target, excluder)| Step::Evict { target, excluder }),
        1 => (any::<(usize, usize)>(), any::<(usize, usize)>()).prop_map(|(targets, excluders)| Step::ConcurrentEvict { targets, excluders }),
    ]
}

const IDENTITIES: usize = 40;

fn run_history(id_bits: u8, seed: u64, steps: &[Step]) -> Net {
    let mut net = Net::new(id_bits, IDENTITIES, seed);
    let mut next_identity = 1;
    for step in steps {
        let live = net.live();
        let pick = |i: usize| live[i % live.len()].clone();
        match *step {
            Step::Join { introducer } if next_identity < IDENTITIES => {
                let joiner = name(next_identity);
                next_identity += 1;
                match net.join(joiner, &pick(introducer)) {
                    Ok(()) | Err(Refused::NoFreeId(_)) => {}
                    Err(other) => panic!("join refused: {other}"),
                }
            }
            Step::Leave { who } if live.len() > 1 => net.leave(&pick(who)),
            Step::Evict { target, excluder } if live.len() > 1 && pick(target) != pick(excluder) => {
                net.evict(&pick(target), &pick(excluder)).unwrap();
            }
            Step::ConcurrentEvict { targets, excluders } if live.len() > 3 => {
                let (t1, t2, x1, x2) = (pick(targets.0), pick(targets.1), pick(excluders.0), pick(excluders.1));
                let distinct = x1 != x2 && ![&x1, &x2].contains(&&t1) && ![&x1, &x2].contains(&&t2);
                if distinct {
                    net.evict(&t1, &x1).unwrap();
                    net.evict(&t2, &x2).unwrap();
                }
            }
            _ => {}
        }
        net.settle();
        net.assert_agreement();
    }
    net
}

/// Cases per property: 2,048 in the test profile; `KEYCAST_DFLAT_CASES` for a longer run.
fn cases() -> u32 {
    std::env::var("KEYCAST_DFLAT_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2048)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    /// After each step settles every live participant holds the same TEK and roster and its
    /// KEKs agree with every other holder's; no departed participant, alone, derives a TEK of
    /// the change that removed it or any later one from all the announcements ever sent.
    #[test]
    fn live_participants_agree_and_no_departed_one_derives_a_later_tek(
        id_bits in 5u8..=8,
        seed in any::<u64>(),
        steps in proptest::collection::vec(step(), 1..24),
    ) {
        let net = run_history(id_bits, seed, &steps);
        for (who, &version) in &net.departed_at {
            let derived = derive_keys(&net.ever_held[who], &net.log);
            prop_assert!(!derives_tek_from(&net, &derived, version), "{} derives a TEK of version {} or later", who, version);
        }
    }
}

/// Identities that hash to complementary IDs: together they hold both KEKs of every bit.
fn complementary_pair(id_bits: u8, net: &Net) -> (Identity, Identity) {
    let ids: Vec<(Identity, u64)> = (1..IDENTITIES).map(|i| (name(i), keycast_core::protocol::distributed_flat::participant_id(net.config.group, &name(i), 0, id_bits))).collect();
    let mask = (1u64 << id_bits) - 1;
    for (a, ia) in &ids {
        if let Some((b, _)) = ids.iter().find(|(_, ib)| ia ^ ib == mask) {
            return (a.clone(), b.clone());
        }
    }
    panic!("no complementary pair among the identities");
}

#[test]
fn two_departed_participants_with_complementary_ids_derive_later_teks_and_neither_does_alone() {
    let id_bits = 5;
    let mut net = Net::new(id_bits, IDENTITIES, 11);
    let (a, b) = complementary_pair(id_bits, &net);
    let others: Vec<Identity> = (1..IDENTITIES).map(name).filter(|w| *w != a && *w != b).take(10).collect();
    for who in [a.clone(), b.clone()].into_iter().chain(others) {
        if net.join(who, &name(0)).is_ok() {
            net.settle();
        }
    }
    net.assert_agreement();
    net.evict(&a, &name(0)).unwrap();
    net.settle();
    net.evict(&b, &name(0)).unwrap();
    net.settle();
    net.assert_agreement();
    let version_b = net.departed_at[&b];
    let alone_a = derive_keys(&net.ever_held[&a], &net.log);
    let alone_b = derive_keys(&net.ever_held[&b], &net.log);
    assert!(!derives_tek_from(&net, &alone_a, net.departed_at[&a]), "a alone");
    assert!(!derives_tek_from(&net, &alone_b, version_b), "b alone");
    let mut together = net.ever_held[&a].clone();
    together.extend(net.ever_held[&b].clone());
    let derived = derive_keys(&together, &net.log);
    let (tek_ref, tek) = net.nodes[&name(0)].tek().unwrap();
    assert_eq!(tek_ref.version, version_b);
    assert_eq!(derived.get(&tek_ref), Some(tek), "the coalition the paper admits reads the TEK that removed b");
}

/// The exclusions built on TEK version `version`, as (digest, departed ID), lowest first.
fn exclusions_of(net: &Net, version: u32) -> Vec<(ChangeDigest, u64)> {
    let mut found: Vec<_> = net
        .log
        .iter()
        .filter_map(|bytes| match Announcement::decode(bytes).ok()?.0.body {
            Body::Exclusion(e) if e.base.tek_version == version => Some((change_digest(bytes), e.departed)),
            _ => None,
        })
        .collect();
    found.sort();
    found
}

fn group_of(size: usize, seed: u64) -> Net {
    let mut net = Net::new(6, IDENTITIES, seed);
    for i in 1..size {
        net.join(name(i), &name(0)).unwrap();
        net.settle();
    }
    net
}

#[test]
fn concurrent_exclusions_settle_on_the_lowest_digest_and_the_loser_is_excluded_again() {
    let mut net = group_of(9, 5);
    let version = net.nodes[&name(0)].tek().unwrap().0.version;
    let (t1, t2) = (name(4), name(5));
    net.evict(&t2, &name(2)).unwrap();
    net.evict(&t1, &name(1)).unwrap();
    net.settle();
    net.assert_agreement();
    let competing = exclusions_of(&net, version);
    assert_eq!(competing.len(), 2, "two exclusions of one TEK");
    let id_of = |who: &Identity| net.nodes[who].id();
    let (winner, loser) = if competing[0].1 == id_of(&t1) { (&t1, &t2) } else { (&t2, &t1) };
    assert_eq!(net.departed_at[winner], version + 1, "the exclusion with the lower digest wins");
    assert_eq!(net.departed_at[loser], version + 2, "the losing excluder excluded its target again");
    assert_eq!(net.nodes[&name(0)].tek().unwrap().0.version, version + 2);
}

#[test]
fn after_a_partition_heals_the_history_with_the_lower_digest_wins_and_the_other_side_diverges() {
    let mut net = group_of(10, 8);
    let version = net.nodes[&name(0)].tek().unwrap().0.version;
    let side_b: BTreeSet<Identity> = (6..10).map(name).collect();
    net.cut = side_b.clone();
    net.evict(&name(5), &name(1)).unwrap();
    net.evict(&name(9), &name(7)).unwrap();
    net.settle();
    let change_a = net.nodes[&name(0)].change();
    let change_b = net.nodes[&name(6)].change();
    assert_eq!((change_a.tek_version, change_b.tek_version), (version + 1, version + 1));
    assert_ne!(change_a, change_b, "each side made its own change");
    net.cut.clear();
    // Each side speaks once after the partition heals.
    net.leave(&name(4));
    net.leave(&name(8));
    net.settle();
    let a_wins = change_a.change < change_b.change;
    let (winners, losers): (Vec<Identity>, Vec<Identity>) = if a_wins {
        ((0..5).map(name).collect(), vec![name(6), name(7), name(8)])
    } else {
        (vec![name(6), name(7)], (0..5).filter(|i| *i != 4).map(name).collect())
    };
    for who in &losers {
        assert!(net.diverged.contains(who), "{who} kept a losing history");
    }
    for who in &winners {
        assert!(!net.diverged.contains(who), "{who} left the winning history");
    }
}

#[test]
fn forged_replayed_and_foreign_announcements_are_refused() {
    let mut net = Net::new(6, IDENTITIES, 3);
    net.join(name(1), &name(0)).unwrap();
    net.settle();
    net.join(name(2), &name(1)).unwrap();
    let joined = net.log.last().unwrap().clone();
    net.settle();
    let entropy = BatchSeed::from_u64(1);
    let p = net.nodes.get_mut(&name(0)).unwrap();
    assert!(matches!(p.receive(&joined, &entropy, 0), Err(Refused::Replay { .. })));
    let mut forged = joined.clone();
    let last = forged.len() - 70;
    forged[last] ^= 1;
    // A seen seq is refused before the signature is checked.
    assert!(matches!(p.receive(&forged, &entropy, 0), Err(Refused::Replay { .. })));
    // A fresh one (2's leave request, not delivered) with one byte changed fails the signature.
    let fresh = net.nodes.get_mut(&name(2)).unwrap().leave(0).unwrap();
    let Output::Multicast(fresh) = &fresh[0] else { panic!("a multicast") };
    let mut forged = fresh.clone();
    let last = forged.len() - 70;
    forged[last] ^= 1;
    let p = net.nodes.get_mut(&name(0)).unwrap();
    assert!(matches!(p.receive(&forged, &entropy, 0), Err(Refused::BadSignature(_)) | Err(Refused::Decode(_))));
    // An identity outside the directory, with a well-formed signature of its own.
    let stranger = Identity::new("stranger").unwrap();
    let outsider = Participant::create(net.config, stranger.clone(), Signer::from_seed(&[9; 32]), Directory::new(), &entropy).unwrap();
    let mut outsider = outsider;
    let leave = outsider.leave(0).unwrap();
    let Output::Multicast(bytes) = &leave[0] else { panic!("a multicast") };
    assert!(matches!(p.receive(bytes, &entropy, 0), Err(Refused::UnknownSigner(_)) | Err(Refused::WrongGroup(_))));
    assert!(p.receive(&bytes[..bytes.len() - 1], &entropy, 0).is_err());
}

#[test]
fn an_evicted_identity_is_not_admitted_again() {
    let mut net = Net::new(6, IDENTITIES, 4);
    net.join(name(1), &name(0)).unwrap();
    net.settle();
    net.join(name(2), &name(0)).unwrap();
    net.settle();
    net.evict(&name(2), &name(1)).unwrap();
    net.settle();
    net.assert_agreement();
    let entropy = BatchSeed::from_u64(2);
    for introducer in [name(0), name(1)] {
        let refused = net.nodes.get_mut(&introducer).unwrap().admit(&name(2), &entropy, net.now);
        assert!(matches!(refused, Err(Refused::Invalid(_))), "{introducer} admitted an evicted identity");
    }
}

/// Mean cost of one operation at `members` participants with `id_bits`-bit IDs.
fn measure(id_bits: u8, members: usize, seed: u64) -> (Traffic, Traffic, usize) {
    let mut net = Net::new(id_bits, members + 40, seed);
    let mut joins = Traffic::default();
    let mut n = 1;
    while net.live().len() < members {
        let before = net.traffic;
        let introducer = net.live()[n % net.live().len()].clone();
        if net.join(name(n), &introducer).is_ok() {
            net.settle();
            joins = add(joins, diff(net.traffic, before));
        }
        n += 1;
    }
    let joined = net.live().len() - 1;
    let mut leaves = Traffic::default();
    let rounds = (members / 2).min(8);
    for r in 0..rounds {
        let live = net.live();
        let before = net.traffic;
        net.evict(&live[(r * 7 + 3) % live.len()], &live[(r * 5 + 1) % live.len()]).ok();
        net.settle();
        net.assert_agreement();
        leaves = add(leaves, diff(net.traffic, before));
    }
    (scale(joins, joined), scale(leaves, rounds), net.live().len())
}

fn diff(a: Traffic, b: Traffic) -> Traffic {
    Traffic { multicast: a.multicast - b.multicast, multicast_bytes: a.multicast_bytes - b.multicast_bytes, private: a.private - b.private, private_bytes: a.private_bytes - b.private_bytes }
}

fn add(a: Traffic, b: Traffic) -> Traffic {
    Traffic { multicast: a.multicast + b.multicast, multicast_bytes: a.multicast_bytes + b.multicast_bytes, private: a.private + b.private, private_bytes: a.private_bytes + b.private_bytes }
}

fn scale(t: Traffic, n: usize) -> Traffic {
    Traffic { multicast: t.multicast / n, multicast_bytes: t.multicast_bytes / n, private: t.private / n, private_bytes: t.private_bytes / n }
}

/// Prints the cost table of docs/distributed-flat.md (`-- --nocapture`) and checks the
/// distributed leave stays within the paper's bound of 2I multicast messages.
#[test]
fn message_counts_per_operation() {
    println!("| I | participants | central leave: wraps, bytes | distributed leave: multicasts, bytes, private grants | join: multicasts, private messages, bytes |");
    println!("| --- | --- | --- | --- | --- |");
    for (id_bits, members) in [(8u8, 16usize), (12, 32), (16, 64), (16, 8)] {
        let (join, leave, _) = measure(id_bits, members, 1);
        let central_wraps = 2 * id_bits as usize;
        // I wraps of the TEK under one key (73 bytes) and I replacements under KEK and TEK (85).
        let central_bytes = id_bits as usize * (73 + 85);
        println!(
            "| {id_bits} | {members} | {central_wraps}, {central_bytes} | {}, {}, {} | {}, {}, {} |",
            leave.multicast, leave.multicast_bytes, leave.private, join.multicast, join.private, join.multicast_bytes + join.private_bytes
        );
        assert!(leave.multicast <= 2 * id_bits as usize, "the paper's worst case is 2I multicast messages");
        assert!(leave.multicast_bytes >= central_bytes / 2, "a leave still carries the table's wraps");
        assert_eq!(join.multicast, 1, "a join is one announcement");
    }
}

/// Figure 6, centralized flat to distributed flat: a controller's members, with the keys they
/// hold, continue without it; the group then admits and excludes on its own. The lost
/// controller knew every KEK, so its table still opens the TEK of an exclusion made after the
/// transition (the paper's footnote: the previous group manager cannot be expelled).
#[test]
fn a_centralized_flat_group_continues_as_distributed_flat_and_its_old_controller_cannot_be_expelled() {
    use keycast_core::{new_graph, Batch, FlatIds, GraphConfig, JoinPolicy, MemberId, Position, Scheme};
    let id_bits = 6;
    let config = GraphConfig { scheme: Scheme::Flat { id_bits, ids: FlatIds::Sequential }, join_policy: JoinPolicy::Revision };
    let mut graph = new_graph(config, &BatchSeed::from_u64(1)).unwrap();
    graph.apply(&Batch { joins: (0..10).map(MemberId).collect(), leaves: vec![] }, &BatchSeed::from_u64(2)).unwrap();
    graph.apply(&Batch { joins: vec![MemberId(10)], leaves: vec![MemberId(3)] }, &BatchSeed::from_u64(3)).unwrap();
    graph.apply(&Batch { joins: vec![MemberId(11)], leaves: vec![] }, &BatchSeed::from_u64(4)).unwrap();
    let members: Vec<MemberId> = (0..12).map(MemberId).filter(|m| graph.contains(*m)).collect();
    let controller_knew: BTreeMap<KeyRef, Key> = members.iter().flat_map(|m| graph.member_keys(*m).unwrap().1).collect();

    let mut net = Net::empty(id_bits, IDENTITIES, 9);
    let mut outputs = Vec::new();
    for m in &members {
        let (Position::Flat { id, .. }, keys) = graph.member_keys(*m).unwrap() else { panic!("a flat position") };
        let shares: Vec<(KeyRef, Key)> = keys.into_iter().filter(|(r, _)| r.id.0 <= 2 * id_bits as u32).collect();
        let who = name(m.0 as usize);
        let (p, out) = Participant::from_centralized(net.config, who.clone(), Net::signer(&who), net.directory.clone(), id, shares, 0).unwrap();
        net.nodes.insert(who.clone(), p);
        outputs.push((who, out));
    }
    drop(graph);
    for (who, out) in outputs {
        net.dispatch(&who, out);
    }
    net.settle();
    net.assert_agreement();
    assert_eq!(net.live().len(), members.len());
    let before = net.nodes[&name(0)].tek().unwrap().0;

    net.join(name(20), &name(1)).unwrap();
    net.settle();
    net.evict(&name(5), &name(2)).unwrap();
    net.settle();
    net.leave(&name(7));
    net.settle();
    net.assert_agreement();
    let after = net.nodes[&name(20)].tek().unwrap().0;
    assert_eq!(after.version, before.version + 2, "two exclusions after the transition");
    for who in [name(5), name(7)] {
        let derived = derive_keys(&net.ever_held[&who], &net.log);
        assert!(!derives_tek_from(&net, &derived, net.departed_at[&who]), "{who} alone");
    }
    let derived = derive_keys(&controller_knew, &net.log);
    assert!(derives_tek_from(&net, &derived, after.version), "the old controller's table reads the TEK in force");
}

/// Figure 6's handover when the handovers come in after the settle time (a slow host, N²
/// signed datagrams): ended by the settle time, each participant lists only itself; ended
/// when the roster reaches the centralized group's size (within a bound), all list everyone.
#[test]
fn a_handover_that_ends_when_the_roster_is_complete_lists_every_member_however_late() {
    use keycast_core::{new_graph, Batch, FlatIds, GraphConfig, JoinPolicy, MemberId, Position, Scheme};
    let id_bits = 6;
    let config = GraphConfig { scheme: Scheme::Flat { id_bits, ids: FlatIds::Sequential }, join_policy: JoinPolicy::Revision };
    let mut graph = new_graph(config, &BatchSeed::from_u64(1)).unwrap();
    graph.apply(&Batch { joins: (0..8).map(MemberId).collect(), leaves: vec![] }, &BatchSeed::from_u64(2)).unwrap();
    for until_complete in [false, true] {
        let mut net = Net::empty(id_bits, IDENTITIES, 3);
        let mut outputs = Vec::new();
        for m in 0..8 {
            let (Position::Flat { id, .. }, keys) = graph.member_keys(MemberId(m)).unwrap() else { panic!("a flat position") };
            let shares: Vec<(KeyRef, Key)> = keys.into_iter().filter(|(r, _)| r.id.0 <= 2 * id_bits as u32).collect();
            let who = name(m as usize);
            let (mut p, mut out) = Participant::from_centralized(net.config, who.clone(), Net::signer(&who), net.directory.clone(), id, shares, 0).unwrap();
            if until_complete {
                out.extend(p.end_handover_when(8, 100 * SETTLE_MS));
            }
            // The settle time passes before any handover is taken in.
            out.extend(p.tick(&BatchSeed::from_u64(m), SETTLE_MS));
            net.nodes.insert(who.clone(), p);
            outputs.push((who, out));
        }
        net.now = SETTLE_MS;
        for (who, out) in outputs {
            net.dispatch(&who, out);
        }
        net.settle();
        let rosters: Vec<usize> = net.nodes.values().map(|p| p.roster().len()).collect();
        if until_complete {
            assert_eq!(rosters, vec![8; 8]);
            net.assert_agreement();
        } else {
            assert_eq!(rosters, vec![1; 8], "handovers after the settle time are refused");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Hostile bytes on either channel are refused with an error, never a panic, and leave the
    /// participant as it was.
    #[test]
    fn arbitrary_bytes_are_refused_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400), kind in 0x30u8..0x3B) {
        let mut net = group_of(3, 1);
        let mut message = vec![2u8, kind];
        message.extend_from_slice(&bytes);
        let entropy = BatchSeed::from_u64(3);
        let p = net.nodes.get_mut(&name(0)).unwrap();
        let tek = p.tek().map(|(r, _)| r);
        prop_assert!(p.receive(&message, &entropy, 0).is_err());
        prop_assert!(p.receive_private(&name(1), &message, &entropy, 0).is_err());
        prop_assert_eq!(p.tek().map(|(r, _)| r), tek);
        prop_assert!(p.is_settled());
    }
}

mod handback {
    use super::*;
    use keycast_core::protocol::distributed_flat::audit::derive_from_wraps;
    use keycast_core::protocol::distributed_flat::handback::{HandbackRefused, TableCollector};
    use keycast_core::strategy::Strategy as Packaging;
    use keycast_core::{package, JoinPolicy, MemberKeys};

    /// The appointed controller's collector for `net`'s live participants, at their TEK.
    fn collector(net: &Net, id_bits: u8) -> TableCollector {
        let appointed = &net.nodes[&net.live()[0]];
        TableCollector::new(id_bits, appointed.roster().clone(), appointed.tek().unwrap().0)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        /// Distributed flat back to centralized flat after a random history: the participants
        /// that hand over become members of the new controller with the keys they hold (plus an
        /// individual key), follow its first rekeys and hold exactly its keys for them; none of
        /// those that did not hand over derives the TEK after them from every key it ever held.
        #[test]
        fn handing_participants_follow_the_new_controller_and_the_others_are_out(
            id_bits in 5u8..=8,
            seed in any::<u64>(),
            steps in proptest::collection::vec(step(), 1..16),
            keep in any::<u64>(),
        ) {
            let net = run_history(id_bits, seed, &steps);
            let live = net.live();
            let tek_before = net.nodes[&live[0]].tek().unwrap().0;
            let (handing, staying): (Vec<_>, Vec<_>) = live.iter().enumerate().partition(|(i, _)| *i == 0 || keep >> (i % 64) & 1 == 1);
            let mut collector = collector(&net, id_bits);
            for (_, who) in &handing {
                let p = &net.nodes[*who];
                collector.hand_over(who, p.id(), &p.held_keys()).unwrap();
            }
            let handback = collector.build(JoinPolicy::Revision, &BatchSeed::from_u64(seed)).unwrap();
            prop_assert_eq!(handback.removed.len(), staying.len());
            prop_assert_eq!(handback.rekeys.len(), staying.len());
            let (group_ref, group_key) = handback.graph.group_key();
            for (_, who) in &handing {
                let p = &net.nodes[*who];
                let (member, individual) = &handback.members[*who];
                let (position, controller_keys) = handback.graph.member_keys(*member).unwrap();
                let mut keys = vec![individual.clone()];
                keys.extend(p.held_keys());
                let mut state = MemberKeys::from_snapshot(position, keys, tek_before);
                for plan in &handback.rekeys {
                    state.apply(&package(plan, Packaging::GroupOriented)).unwrap();
                }
                prop_assert!(state.group_key() == Some((group_ref, group_key.clone())), "{} follows the first rekey", who);
                for (key_ref, key) in controller_keys {
                    prop_assert!(state.key(key_ref) == Some(key), "{} holds the controller's {}", who, key_ref);
                }
            }
            if !staying.is_empty() {
                prop_assert!(group_ref.version > tek_before.version);
                let wraps: Vec<_> = handback.rekeys.iter().flat_map(|plan| plan.wraps.iter().cloned()).collect();
                for (_, who) in &staying {
                    let derived = derive_from_wraps(&net.ever_held[*who], &wraps);
                    prop_assert!(derived.get(&group_ref) != Some(group_key), "{} did not hand over and reads the new TEK", who);
                }
            }
        }
    }

    /// The collector checks each handover against the others and the roster: a KEK that
    /// disagrees with an earlier holder's, keys of another TEK, an identity that is not the
    /// live participant of that ID and a second handover are refused, and refused handovers
    /// change nothing.
    #[test]
    fn inconsistent_handovers_are_refused() {
        let mut net = group_of(8, 5);
        net.evict(&name(7), &name(1)).unwrap();
        net.settle();
        let id_bits = net.config.id_bits;
        let live = net.live();
        let (a, b) = (&net.nodes[&live[0]], &net.nodes[&live[1]]);
        let mut collector = collector(&net, id_bits);
        collector.hand_over(&live[0], a.id(), &a.held_keys()).unwrap();
        let shared = (0..id_bits).find(|&j| (a.id() >> j) & 1 == (b.id() >> j) & 1).expect("two IDs share a bit value");
        let mut forged = b.held_keys();
        forged[1 + shared as usize].1 = Key::from_bytes([7; 32]);
        assert!(matches!(collector.hand_over(&live[1], b.id(), &forged), Err(HandbackRefused::Conflict(_))));
        let mut other_tek = b.held_keys();
        other_tek[0].0.version += 1;
        assert!(matches!(collector.hand_over(&live[1], b.id(), &other_tek), Err(HandbackRefused::OtherTek(_))));
        assert!(matches!(collector.hand_over(&live[2], b.id(), &b.held_keys()), Err(HandbackRefused::NotInRoster(..))));
        assert!(matches!(collector.hand_over(&name(7), b.id(), &b.held_keys()), Err(HandbackRefused::NotInRoster(..))));
        assert!(matches!(collector.hand_over(&live[0], a.id(), &a.held_keys()), Err(HandbackRefused::Duplicate(_))));
        assert_eq!(collector.handed().len(), 1);
        collector.hand_over(&live[1], b.id(), &b.held_keys()).unwrap();
        let handback = collector.build(JoinPolicy::Revision, &BatchSeed::from_u64(1)).unwrap();
        assert_eq!(handback.members.len(), 2);
        assert_eq!(handback.removed.len(), live.len() - 2);
    }
}
