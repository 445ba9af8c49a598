//! `keycast sim delivery`: the rekey transport alone, without sockets (issue 14).
//!
//! Zhang, Lam, Lee and Yang's protocol (IEEE/ACM ToN 2003) over simulated receivers: the
//! rekey's ENC packets are grouped in FEC blocks of k; round 1 multicasts ceil(rho * k)
//! packets per block (the k originals, then parity); a receiver that got its own packet, or
//! any k packets of its block, has its keys; the others NAK how many packets they still need,
//! and each repair round multicasts, per block, as many fresh parity packets as the largest
//! NAK of the block asked. Receivers still missing keys after the last multicast round get
//! them by unicast. Rho adapts after each rekey from round 1's NAKs
//! (`keycast_core::delivery::proactivity`); the repairs come from
//! `keycast_core::delivery::server_round`.
//!
//! Layouts: `keytree` makes a real batch rekey each time (a d = 4 key tree of N members, L
//! random leavers replaced by L joiners, user-oriented placement at 1200 bytes, so each
//! member needs exactly one packet) and finds which packet each member needs; `uniform`
//! models that each receiver needs one packet, members spread evenly over the packets in
//! member order (as user-oriented placement does), for groups too large to rekey quickly.
//!
//! Loss is per receiver and independent between receivers: Bernoulli, or Gilbert-Elliott
//! (two states, every packet lost in the bad one) with a given mean burst length. A block's
//! packets go out back to back, so a receiver sees them in a row; each round starts from the
//! loss process's stationary state (rounds are far apart). Randomness is a counter-based
//! generator seeded by (seed, rekey, round, member): results do not depend on thread count.

use std::collections::BTreeMap;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use keycast_core::delivery::proactivity::Proactivity;
use keycast_core::delivery::server_round::RepairRound;
use keycast_core::delivery::{BlockNeed, NakRequest};
use keycast_core::wire::{encode_rekey, PacketConfig, Placement, RekeyPacket};
use keycast_core::{Batch, BatchSeed, KeyGraph, KeyRef, MemberId, Scheme, Wrapper};
use rayon::prelude::*;
use serde::Serialize;

use crate::measure::{full_group, sim_signer, CONTEXT};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayoutArg {
    /// A real batch rekey per round (d = 4 tree, user-oriented packets).
    Keytree,
    /// Each receiver needs one packet, members spread evenly over the packets.
    Uniform,
}

#[derive(Args, Clone, Debug)]
pub struct DeliveryArgs {
    /// Group size N (receivers of each rekey).
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u64).range(2..=(1 << 20)))]
    members: u64,
    /// Members leaving (and as many joining) per rekey; default N/4.
    #[arg(long)]
    leaves: Option<u64>,
    #[arg(long, value_enum, default_value = "keytree")]
    layout: LayoutArg,
    /// Uniform layout: members whose keys share one ENC packet.
    #[arg(long = "members-per-packet", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=4096))]
    members_per_packet: u32,
    /// FEC block size k (ENC packets per block).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=256))]
    block: u16,
    /// Loss rate of the ordinary receivers.
    #[arg(long, default_value_t = 0.02)]
    loss: f64,
    /// Fraction of receivers with the high loss rate.
    #[arg(long = "high-loss-fraction", default_value_t = 0.0)]
    high_loss_fraction: f64,
    /// Loss rate of the high-loss receivers.
    #[arg(long = "high-loss", default_value_t = 0.2)]
    high_loss: f64,
    /// Mean burst length in packets: 1 is Bernoulli loss, above 1 Gilbert-Elliott.
    #[arg(long, default_value_t = 1.0)]
    burst: f64,
    /// Consecutive rekeys (rho adapts between them).
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    rekeys: u32,
    /// Target number of first-round NAKs per rekey.
    #[arg(long = "target-naks", default_value_t = 20)]
    target_naks: u32,
    /// Initial proactivity factor; default: the smallest expected to meet the target.
    #[arg(long)]
    rho: Option<f64>,
    #[arg(long = "rho-max", default_value_t = 4.0)]
    rho_max: f64,
    /// Keep rho fixed instead of adapting it.
    #[arg(long = "fixed-rho")]
    fixed_rho: bool,
    /// Multicast rounds (round 1 and repairs) before unicast recovery.
    #[arg(long = "multicast-rounds", default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=8))]
    multicast_rounds: u8,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// A simulation's settings (the CLI's, checked).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct DeliveryConfig {
    pub members: u64,
    pub leaves: u64,
    pub layout: LayoutArg,
    pub members_per_packet: u32,
    pub block: u16,
    pub loss: f64,
    pub high_loss_fraction: f64,
    pub high_loss: f64,
    pub burst: f64,
    pub rekeys: u32,
    pub target_naks: u32,
    pub rho: Option<f64>,
    pub rho_max: f64,
    pub adapt: bool,
    pub multicast_rounds: u8,
    pub seed: u64,
}

impl DeliveryConfig {
    fn from_args(args: &DeliveryArgs) -> Result<Self, String> {
        let config = DeliveryConfig {
            members: args.members,
            leaves: args.leaves.unwrap_or(args.members / 4),
            layout: args.layout,
            members_per_packet: args.members_per_packet,
            block: args.block,
            loss: args.loss,
            high_loss_fraction: args.high_loss_fraction,
            high_loss: args.high_loss,
            burst: args.burst,
            rekeys: args.rekeys,
            target_naks: args.target_naks,
            rho: args.rho,
            rho_max: args.rho_max,
            adapt: !args.fixed_rho,
            multicast_rounds: args.multicast_rounds,
            seed: args.seed,
        };
        config.check()?;
        Ok(config)
    }

    pub fn check(&self) -> Result<(), String> {
        let unit = |name: &str, v: f64| {
            if (0.0..1.0).contains(&v) { Ok(()) } else { Err(format!("--{name} {v} is not in [0, 1)")) }
        };
        unit("loss", self.loss)?;
        unit("high-loss", self.high_loss)?;
        if !(0.0..=1.0).contains(&self.high_loss_fraction) {
            return Err(format!("--high-loss-fraction {} is not in [0, 1]", self.high_loss_fraction));
        }
        if !(self.burst >= 1.0 && self.burst <= 1e6) {
            return Err(format!("--burst {} is not between 1 and 10^6", self.burst));
        }
        if self.leaves >= self.members {
            return Err(format!("--leaves {} must be below --members {}", self.leaves, self.members));
        }
        if self.layout == LayoutArg::Keytree && self.members > KEYTREE_MAX {
            return Err(format!("--layout keytree rekeys a real tree each time: at most {KEYTREE_MAX} members (use --layout uniform)"));
        }
        self.proactivity().map(drop)
    }

    /// Mean loss over receivers (for the default rho).
    pub fn mean_loss(&self) -> f64 {
        self.high_loss_fraction * self.high_loss + (1.0 - self.high_loss_fraction) * self.loss
    }

    fn proactivity(&self) -> Result<Proactivity, String> {
        let k = usize::from(self.block);
        match self.rho {
            Some(rho) => Proactivity::new(k, self.target_naks, rho, self.rho_max),
            None => Proactivity::for_loss(k, self.target_naks, self.rho_max, self.mean_loss(), self.members),
        }
        .map_err(|e| e.to_string())
    }
}

/// Largest group `--layout keytree` rekeys (a real rekey per round, every member's keys read).
pub const KEYTREE_MAX: u64 = 1 << 17;

/// One multicast round of one rekey.
#[derive(Clone, Debug, Serialize)]
pub struct RoundReport {
    pub round: u8,
    /// Packets multicast in this round (originals and parity in round 1, parity after).
    pub packets: u64,
    /// Receivers holding their keys after this round (cumulative).
    pub recovered_fraction: f64,
    /// Receivers still short after this round (they NAK, or go to unicast after the last).
    pub naks: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RekeyReport {
    pub rekey: u32,
    pub rho: f64,
    pub receivers: u64,
    pub enc_packets: u64,
    pub blocks: u64,
    pub rounds: Vec<RoundReport>,
    /// Multicast rounds used (1 if round 1 sufficed).
    pub multicast_rounds: u8,
    /// Multicast packets over ENC packets.
    pub overhead: f64,
    /// Receivers given their keys by unicast.
    pub unicast: u64,
    pub unicast_fraction: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeliveryReport {
    pub config: DeliveryConfig,
    pub rekeys: Vec<RekeyReport>,
    pub summary: Summary,
}

/// Means over the rekeys after the first quarter (rho's warm-up).
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub from_rekey: u32,
    pub rho: f64,
    pub first_round_naks: f64,
    pub first_round_fraction: f64,
    pub overhead: f64,
    /// 1 / (1 - mean loss): the bandwidth any code needs for an average receiver.
    pub overhead_floor: f64,
    pub unicast_fraction: f64,
    pub multicast_rounds: f64,
    /// Receivers that ended without keys (always 0: unicast gives the rest theirs).
    pub receivers_without_keys: u64,
}

pub fn run(args: &DeliveryArgs) -> Result<(), String> {
    let config = DeliveryConfig::from_args(args)?;
    let bar = if args.quiet || args.json { ProgressBar::hidden() } else { ProgressBar::new(u64::from(config.rekeys)) };
    bar.set_style(ProgressStyle::with_template("delivery {bar:40} {pos}/{len} rekeys ({eta} left) {msg}").expect("valid template"));
    let report = simulate(&config, &bar)?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
    } else {
        print_text(&report);
    }
    Ok(())
}

fn print_text(report: &DeliveryReport) {
    let c = &report.config;
    println!(
        "{} members, {} leave and join per rekey, {:?} layout, k = {}, loss {} ({}% at {}), burst {}, target {} NAKs",
        c.members, c.leaves, c.layout, c.block, c.loss, c.high_loss_fraction * 100.0, c.high_loss, c.burst, c.target_naks
    );
    println!("rekey   rho  packets  round: recovered / NAKs ...            overhead  unicast");
    for r in &report.rekeys {
        let rounds: Vec<String> = r.rounds.iter().map(|x| format!("{}: {:.4} / {}", x.round, x.recovered_fraction, x.naks)).collect();
        println!("{:5} {:5.2} {:8}  {:38} {:8.3} {:8.5}", r.rekey, r.rho, r.enc_packets, rounds.join("  "), r.overhead, r.unicast_fraction);
    }
    let s = &report.summary;
    println!(
        "from rekey {}: rho {:.2}, first-round NAKs {:.1}, first round {:.5}, overhead {:.3} (floor 1/(1-p) = {:.3}), unicast {:.5}, {:.2} multicast rounds",
        s.from_rekey, s.rho, s.first_round_naks, s.first_round_fraction, s.overhead, s.overhead_floor, s.unicast_fraction, s.multicast_rounds
    );
}

/// Which packet each receiver of one rekey needs.
struct Layout {
    enc_packets: u32,
    /// Per receiver: its member id (for its loss class and random stream) and packet.
    receivers: Vec<(u64, u32)>,
}

/// Makes each rekey's layout: a real key tree, or the uniform model.
enum Layouts {
    Keytree(Box<KeyTreeLayouts>),
    Uniform { members: u64, members_per_packet: u32 },
}

impl Layouts {
    fn new(config: &DeliveryConfig) -> Self {
        match config.layout {
            LayoutArg::Keytree => Layouts::Keytree(Box::new(KeyTreeLayouts::new(config))),
            LayoutArg::Uniform => Layouts::Uniform { members: config.members, members_per_packet: config.members_per_packet },
        }
    }

    fn next(&mut self, rekey: u32) -> Result<Layout, String> {
        match self {
            Layouts::Keytree(tree) => tree.next(rekey),
            Layouts::Uniform { members, members_per_packet } => {
                let per = u64::from(*members_per_packet);
                let enc_packets = u32::try_from(members.div_ceil(per)).map_err(|e| e.to_string())?;
                Ok(Layout { enc_packets, receivers: (0..*members).map(|m| (m, (m / per) as u32)).collect() })
            }
        }
    }
}

/// A d = 4 key tree rekeyed with L leavers and L joiners each time.
struct KeyTreeLayouts {
    graph: Box<dyn KeyGraph>,
    members: Vec<u64>,
    next_id: u64,
    leaves: u64,
    seed: u64,
}

impl KeyTreeLayouts {
    fn new(config: &DeliveryConfig) -> Self {
        let graph = full_group(Scheme::Tree { degree: 4 }, config.members, config.seed);
        KeyTreeLayouts { graph, members: (0..config.members).collect(), next_id: config.members, leaves: config.leaves, seed: config.seed }
    }

    fn next(&mut self, rekey: u32) -> Result<Layout, String> {
        let mut rng = SimRng::new(&[self.seed, u64::from(rekey), 0x1eaf]);
        let mut leaving = std::collections::BTreeSet::new();
        while (leaving.len() as u64) < self.leaves {
            leaving.insert(self.members[(rng.next() % self.members.len() as u64) as usize]);
        }
        let joins: Vec<MemberId> = (self.next_id..self.next_id + self.leaves).map(MemberId).collect();
        self.next_id += self.leaves;
        let batch = Batch { joins: joins.clone(), leaves: leaving.iter().copied().map(MemberId).collect() };
        let seed = BatchSeed::from_u64(self.seed ^ (u64::from(rekey) << 20));
        let plan = self.graph.apply(&batch, &seed).map_err(|e| e.to_string())?;
        self.members.retain(|m| !leaving.contains(m));
        self.members.extend(joins.iter().map(|m| m.0));
        let config = PacketConfig { placement: Placement::UserOriented, ..PacketConfig::default() };
        let encoded = encode_rekey(&plan, CONTEXT, config, &sim_signer()).map_err(|e| e.to_string())?;
        let entry_packet = entry_packets(&encoded.packets)?;
        let graph = &self.graph;
        let receivers: Vec<(u64, u32)> = self
            .members
            .par_iter()
            .filter_map(|&m| {
                let (_, keys) = graph.member_keys(MemberId(m))?;
                keys.iter().find_map(|(r, _)| entry_packet.get(r)).map(|&p| (m, p))
            })
            .collect();
        Ok(Layout { enc_packets: encoded.packets.len() as u32, receivers })
    }
}

/// For each key that wraps are sealed under but that this rekey does not deliver (a key
/// members already hold): the packet holding those wraps, the members' entry.
fn entry_packets(packets: &[Vec<u8>]) -> Result<BTreeMap<KeyRef, u32>, String> {
    let decoded: Vec<RekeyPacket> = packets.iter().map(|p| RekeyPacket::decode(p)).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    let delivered: std::collections::BTreeSet<KeyRef> = decoded.iter().flat_map(|p| p.wraps.iter().map(|w| w.key)).collect();
    let mut entries = BTreeMap::new();
    for (index, packet) in decoded.iter().enumerate() {
        for wrap in &packet.wraps {
            if let Wrapper::Key(under) = wrap.under {
                if !delivered.contains(&under) {
                    entries.entry(under).or_insert(index as u32);
                }
            }
        }
    }
    Ok(entries)
}

/// splitmix64 over a hash of the inputs: a counter-based generator, so each receiver's
/// stream depends on (seed, rekey, round, member) only. Not for anything but simulation.
struct SimRng(u64);

impl SimRng {
    fn new(parts: &[u64]) -> Self {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for &p in parts {
            state = mix(state ^ p);
        }
        SimRng(state)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// True with probability `p`.
    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < p
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A receiver's loss process over packets sent back to back.
#[derive(Clone, Copy)]
struct LossModel {
    loss: f64,
    /// Gilbert-Elliott: P(bad -> good) per packet; None for Bernoulli.
    recover: Option<f64>,
}

impl LossModel {
    fn new(loss: f64, burst: f64) -> Self {
        LossModel { loss, recover: (burst > 1.0).then(|| 1.0 / burst) }
    }

    /// Which of `count` consecutive packets arrive, as a bit per packet (count <= 64 per call,
    /// the state carried in `bad` between calls).
    fn arrivals(&self, rng: &mut SimRng, bad: &mut bool, count: u32) -> u64 {
        let mut got = 0u64;
        for i in 0..count {
            let lost = match self.recover {
                None => rng.chance(self.loss),
                Some(recover) => {
                    let lost = *bad;
                    // Stationary P(bad) = loss: P(good -> bad) = loss * recover / (1 - loss).
                    let to_bad = self.loss * recover / (1.0 - self.loss);
                    *bad = if *bad { !rng.chance(recover) } else { rng.chance(to_bad) };
                    lost
                }
            };
            if !lost {
                got |= 1 << i;
            }
        }
        got
    }

    /// A round starts far from the last: the state is drawn from the stationary distribution.
    fn start(&self, rng: &mut SimRng) -> bool {
        self.recover.is_some() && rng.chance(self.loss)
    }
}

/// One receiver's progress on its block.
#[derive(Clone, Copy, Default)]
struct ReceiverState {
    /// Distinct packets of its block received so far.
    received: u16,
    done: bool,
}

/// Runs the whole simulation.
pub fn simulate(config: &DeliveryConfig, bar: &ProgressBar) -> Result<DeliveryReport, String> {
    config.check()?;
    let mut proactivity = config.proactivity()?;
    let mut layouts = Layouts::new(config);
    let mut rekeys = Vec::with_capacity(config.rekeys as usize);
    for rekey in 0..config.rekeys {
        let layout = layouts.next(rekey)?;
        let (report, round_one_needed) = simulate_rekey(config, rekey, &layout, &proactivity);
        if config.adapt {
            proactivity.update(&round_one_needed);
        }
        bar.set_message(format!("rho {:.2}, {} NAKs", report.rho, report.rounds[0].naks));
        bar.inc(1);
        rekeys.push(report);
    }
    let summary = summarise(config, &rekeys);
    Ok(DeliveryReport { config: *config, rekeys, summary })
}

/// Blocks of k consecutive ENC packets; the last may be short.
fn block_sizes(enc_packets: u32, k: u16) -> Vec<u16> {
    let k = u32::from(k);
    (0..enc_packets.div_ceil(k)).map(|b| (enc_packets - b * k).min(k) as u16).collect()
}

/// One rekey: round 1, then repairs, then unicast. Returns its report and round 1's NAK needs.
fn simulate_rekey(config: &DeliveryConfig, rekey: u32, layout: &Layout, proactivity: &Proactivity) -> (RekeyReport, Vec<u16>) {
    let k = config.block;
    let sizes = block_sizes(layout.enc_packets, k);
    // Parity each block can ever send: rho_max's worth plus as much again for repairs.
    let capacity: Vec<u16> = sizes.iter().map(|&s| (2.0 * config.rho_max * f64::from(s)).ceil() as u16).collect();
    let round_one: Vec<u16> = sizes.iter().map(|&s| proactivity.round_one_packets(usize::from(s)) as u16).collect();
    let mut parity_sent: Vec<u16> = round_one.iter().zip(&sizes).map(|(&sent, &s)| sent - s).collect();
    let receivers = layout.receivers.len() as u64;
    let models: Vec<LossModel> = layout.receivers.iter().map(|&(m, _)| loss_model(config, m)).collect();

    // Round 1: originals then parity, per block.
    let mut states: Vec<ReceiverState> = layout
        .receivers
        .par_iter()
        .zip(&models)
        .map(|(&(member, packet), model)| {
            let (block, index) = ((packet / u32::from(k)) as usize, (packet % u32::from(k)) as u16);
            let mut rng = SimRng::new(&[config.seed, u64::from(rekey), 1, member]);
            let (received, got_own) = receive_round_one(model, &mut rng, round_one[block], index);
            ReceiverState { received, done: got_own || received >= sizes[block] }
        })
        .collect();
    let mut rounds = vec![round_report(1, round_one.iter().map(|&n| u64::from(n)).sum(), &states)];
    let mut multicast_packets = rounds[0].packets;
    let mut round_one_needed = Vec::new();
    for round in 1..=config.multicast_rounds {
        let plan = collect_naks(rekey, k, layout, &states, &sizes, &capacity, &parity_sent);
        if round == 1 {
            round_one_needed = plan.needed.clone();
        }
        if round == config.multicast_rounds || plan.repairs.is_empty() {
            break;
        }
        let mut repair = vec![0u16; sizes.len()];
        for BlockNeed { block, needed } in &plan.repairs {
            repair[*block as usize] = *needed;
            parity_sent[*block as usize] += needed;
        }
        states.par_iter_mut().zip(&layout.receivers).zip(&models).for_each(|((state, &(member, packet)), model)| {
            let block = (packet / u32::from(k)) as usize;
            if state.done || repair[block] == 0 {
                return;
            }
            let mut rng = SimRng::new(&[config.seed, u64::from(rekey), u64::from(round) + 1, member]);
            state.received += count_arrivals(model, &mut rng, repair[block]);
            state.done = state.received >= sizes[block];
        });
        let sent: u64 = repair.iter().map(|&n| u64::from(n)).sum();
        multicast_packets += sent;
        rounds.push(round_report(round + 1, sent, &states));
    }
    let unicast = states.iter().filter(|s| !s.done).count() as u64;
    let report = RekeyReport {
        rekey,
        rho: proactivity.rho(),
        receivers,
        enc_packets: u64::from(layout.enc_packets),
        blocks: sizes.len() as u64,
        multicast_rounds: rounds.len() as u8,
        rounds,
        overhead: multicast_packets as f64 / f64::from(layout.enc_packets.max(1)),
        unicast,
        unicast_fraction: unicast as f64 / receivers.max(1) as f64,
    };
    (report, round_one_needed)
}

fn loss_model(config: &DeliveryConfig, member: u64) -> LossModel {
    // The class is the member's for life: its own hash, not its place in this rekey.
    let high = SimRng::new(&[config.seed, member, 0xc1a55]).chance(config.high_loss_fraction);
    LossModel::new(if high { config.high_loss } else { config.loss }, config.burst)
}

/// Round 1 for one receiver: of `sent` packets of its block (originals first), how many
/// arrive, and whether its own (original `index`) does.
fn receive_round_one(model: &LossModel, rng: &mut SimRng, sent: u16, index: u16) -> (u16, bool) {
    let mut bad = model.start(rng);
    let (mut received, mut got_own, mut offset) = (0u16, false, 0u16);
    while offset < sent {
        let chunk = (sent - offset).min(64);
        let arrived = model.arrivals(rng, &mut bad, u32::from(chunk));
        if (offset..offset + chunk).contains(&index) {
            got_own = arrived >> (index - offset) & 1 == 1;
        }
        received += arrived.count_ones() as u16;
        offset += chunk;
    }
    (received, got_own)
}

/// How many of `sent` back-to-back packets arrive.
fn count_arrivals(model: &LossModel, rng: &mut SimRng, sent: u16) -> u16 {
    let mut bad = model.start(rng);
    let (mut received, mut left) = (0u16, sent);
    while left > 0 {
        let chunk = left.min(64);
        received += model.arrivals(rng, &mut bad, u32::from(chunk)).count_ones() as u16;
        left -= chunk;
    }
    received
}

/// Every short receiver NAKs its block's need; the server's round collector answers.
fn collect_naks(
    rekey: u32,
    k: u16,
    layout: &Layout,
    states: &[ReceiverState],
    sizes: &[u16],
    capacity: &[u16],
    parity_sent: &[u16],
) -> keycast_core::delivery::server_round::RepairPlan {
    let left: Vec<u16> = capacity.iter().zip(parity_sent).map(|(&c, &s)| c.saturating_sub(s)).collect();
    let mut round = RepairRound::new(u64::from(rekey), left, layout.receivers.len());
    for (state, &(member, packet)) in states.iter().zip(&layout.receivers) {
        if !state.done {
            let block = packet / u32::from(k);
            let needed = sizes[block as usize] - state.received;
            round.on_nak(member, u64::from(rekey), &NakRequest { blocks: vec![BlockNeed { block, needed }] });
        }
    }
    round.finish()
}

fn round_report(round: u8, packets: u64, states: &[ReceiverState]) -> RoundReport {
    let done = states.iter().filter(|s| s.done).count() as u64;
    let total = states.len().max(1) as f64;
    RoundReport { round, packets, recovered_fraction: done as f64 / total, naks: states.len() as u64 - done }
}

fn summarise(config: &DeliveryConfig, rekeys: &[RekeyReport]) -> Summary {
    let from = rekeys.len() / 4;
    let tail = &rekeys[from..];
    let mean = |f: &dyn Fn(&RekeyReport) -> f64| tail.iter().map(f).sum::<f64>() / tail.len().max(1) as f64;
    Summary {
        from_rekey: from as u32,
        rho: mean(&|r| r.rho),
        first_round_naks: mean(&|r| r.rounds[0].naks as f64),
        first_round_fraction: mean(&|r| r.rounds[0].recovered_fraction),
        overhead: mean(&|r| r.overhead),
        overhead_floor: 1.0 / (1.0 - config.mean_loss()),
        unicast_fraction: mean(&|r| r.unicast_fraction),
        multicast_rounds: mean(&|r| f64::from(r.multicast_rounds)),
        receivers_without_keys: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gilbert_elliott_loses_the_asked_fraction_in_bursts() {
        let model = LossModel::new(0.2, 4.0);
        let mut rng = SimRng::new(&[7]);
        let mut bad = model.start(&mut rng);
        let (mut lost, mut runs, mut previous_lost) = (0u64, 0u64, false);
        for _ in 0..20_000 {
            let got = model.arrivals(&mut rng, &mut bad, 50);
            for i in 0..50 {
                let is_lost = got >> i & 1 == 0;
                lost += u64::from(is_lost);
                runs += u64::from(is_lost && !previous_lost);
                previous_lost = is_lost;
            }
        }
        let rate = lost as f64 / 1e6;
        assert!((rate - 0.2).abs() < 0.01, "{rate}");
        let burst = lost as f64 / runs as f64;
        assert!((burst - 4.0).abs() < 0.3, "{burst}");
    }

    #[test]
    fn blocks_cover_every_packet_with_a_short_last_one() {
        assert_eq!(block_sizes(23, 10), vec![10, 10, 3]);
        assert_eq!(block_sizes(20, 10), vec![10, 10]);
    }
}
