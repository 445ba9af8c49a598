//! `keycast sim`: build a group, apply one batch, report what the rekey cost.

use std::time::Instant;

use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use keycast_core::strategy::{package, package_size};
use keycast_core::wire::rekey::{RekeyContext, DEFAULT_BLOCK_BITS};
use keycast_core::wire::{encode_rekey, GroupId, PacketConfig, Signer, DEFAULT_MTU};
use keycast_core::{
    new_graph, Batch, BatchSeed, FlatIds, GraphConfig, JoinPolicy, KeyGraph, MemberId, Scheme, Strategy,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

#[derive(Subcommand)]
pub enum SimCommand {
    /// Build a group of N members, apply one batch of joins and leaves, report its rekey.
    Rekey(RekeyArgs),
    /// Simulate rekey delivery under loss: FEC blocks, adaptive proactivity, NAK rounds, unicast.
    Delivery(crate::sim_delivery::DeliveryArgs),
    /// Reproduce the papers' figures: CSV, SVG and PNG per figure, and figures.md.
    Figures(crate::figures::FiguresArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SchemeArg {
    Star,
    Tree,
    Flat,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Placement {
    /// Leavers chosen uniformly at random (seeded).
    Random,
    /// Leavers spread evenly over the members (Mukkamalla and Katz's worst case).
    Even,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum StrategyArg {
    Group,
    Key,
    User,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum JoinPolicyArg {
    /// Joiners' keys get a new version (Wong's join).
    Version,
    /// Joiners' keys advance one revision; existing members derive it (Caronni).
    Revision,
}

impl JoinPolicyArg {
    pub(crate) fn policy(self) -> JoinPolicy {
        match self {
            JoinPolicyArg::Version => JoinPolicy::NewVersion,
            JoinPolicyArg::Revision => JoinPolicy::Revision,
        }
    }
}

#[derive(Args)]
pub struct RekeyArgs {
    #[arg(long, value_enum, default_value = "tree")]
    scheme: SchemeArg,
    /// Tree degree (tree scheme only; default 4).
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=65536))]
    degree: Option<u32>,
    /// Members before the batch.
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(1..=(1 << 27)))]
    members: u64,
    /// Members joining in the batch.
    #[arg(long, default_value_t = 0)]
    joins: u64,
    /// Members leaving in the batch.
    #[arg(long, default_value_t = 1)]
    leaves: u64,
    #[arg(long, value_enum, default_value = "random")]
    placement: Placement,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, value_enum, default_value = "group")]
    strategy: StrategyArg,
    #[arg(long = "join-policy", value_enum, default_value = "version")]
    join_policy: JoinPolicyArg,
    /// Bits of a flat member ID (flat scheme only); default: enough for every member.
    #[arg(long = "id-bits")]
    id_bits: Option<u8>,
    /// Largest packet on the wire, in bytes.
    #[arg(long, default_value_t = DEFAULT_MTU, value_parser = mtu_in_range)]
    mtu: usize,
    /// How wraps are spread over packets: auto (user up to one signing block, tiered above),
    /// user (each member's entries in one packet), tiered (at most two packets per member) or
    /// compact (each wrap once).
    #[arg(long = "packet-placement", default_value = "auto")]
    packet_placement: keycast_core::wire::Placement,
    /// Packets are signed in blocks of 2^BITS (one signature per block).
    #[arg(long = "block-bits", default_value_t = DEFAULT_BLOCK_BITS, value_parser = clap::value_parser!(u8).range(0..=10))]
    block_bits: u8,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn mtu_in_range(text: &str) -> Result<usize, String> {
    let mtu: usize = text.parse().map_err(|e| format!("{e}"))?;
    if !(300..=keycast_core::wire::MAX_MESSAGE_LEN).contains(&mtu) {
        return Err(format!("{mtu} is not between 300 and {}", keycast_core::wire::MAX_MESSAGE_LEN));
    }
    Ok(mtu)
}

pub fn run(command: SimCommand) -> Result<(), String> {
    match command {
        SimCommand::Rekey(args) => rekey(&args),
        SimCommand::Delivery(args) => crate::sim_delivery::run(&args),
        SimCommand::Figures(args) => crate::figures::run(&args),
    }
}

fn config(args: &RekeyArgs) -> Result<GraphConfig, String> {
    if args.degree.is_some() && !matches!(args.scheme, SchemeArg::Tree) {
        return Err("--degree applies to --scheme tree only (a star is a tree of height 1; flat has --id-bits)".into());
    }
    if args.id_bits.is_some() && !matches!(args.scheme, SchemeArg::Flat) {
        return Err("--id-bits applies to --scheme flat only".into());
    }
    let scheme = match args.scheme {
        SchemeArg::Star => Scheme::Star,
        SchemeArg::Tree => Scheme::Tree { degree: args.degree.unwrap_or(4) },
        SchemeArg::Flat => {
            let needed = (64 - (args.members + args.joins).saturating_sub(1).leading_zeros()).max(1) as u8;
            let id_bits = args.id_bits.unwrap_or(needed);
            if id_bits < needed {
                return Err(format!("--id-bits {id_bits} cannot number {} members", args.members + args.joins));
            }
            Scheme::Flat { id_bits, ids: FlatIds::Sequential }
        }
    };
    Ok(GraphConfig { scheme, join_policy: args.join_policy.policy() })
}

/// Builds a group of `members` (member i joins i-th) in batches, with a progress bar.
pub fn build_group(config: GraphConfig, members: u64, seed: &mut BatchSeed, quiet: bool) -> Result<Box<dyn KeyGraph>, String> {
    let mut graph = new_graph(config, seed).map_err(|e| e.to_string())?;
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(members) };
    bar.set_style(
        ProgressStyle::with_template("building group {bar:40} {pos}/{len} members ({eta} left)")
            .expect("valid template"),
    );
    let chunk = (members / 64).max(4096);
    let mut next = 0;
    while next < members {
        let end = (next + chunk).min(members);
        *seed = seed.next();
        graph.apply(&Batch { joins: (next..end).map(MemberId).collect(), leaves: vec![] }, seed).map_err(|e| e.to_string())?;
        bar.set_position(end);
        next = end;
    }
    bar.finish_and_clear();
    Ok(graph)
}

fn choose_leavers(args: &RekeyArgs) -> Vec<MemberId> {
    let (n, k) = (args.members, args.leaves);
    match args.placement {
        Placement::Even => (0..k).map(|i| MemberId(i * n / k)).collect(),
        Placement::Random => {
            let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
            let mut chosen = std::collections::BTreeSet::new();
            while (chosen.len() as u64) < k {
                chosen.insert(MemberId(rng.next_u64() % n));
            }
            chosen.into_iter().collect()
        }
    }
}

fn rekey(args: &RekeyArgs) -> Result<(), String> {
    if args.leaves > args.members {
        return Err(format!("--leaves {} exceeds --members {}", args.leaves, args.members));
    }
    let config = config(args)?;
    let mut seed = BatchSeed::from_u64(args.seed);
    let mut graph = build_group(config, args.members, &mut seed, args.json)?;
    let batch = Batch {
        joins: (args.members..args.members + args.joins).map(MemberId).collect(),
        leaves: choose_leavers(args),
    };
    seed = seed.next();
    let start = Instant::now();
    let plan = graph.apply(&batch, &seed).map_err(|e| e.to_string())?;
    let micros = start.elapsed().as_micros();
    let strategy = match args.strategy {
        StrategyArg::Group => Strategy::GroupOriented,
        StrategyArg::Key => Strategy::KeyOriented,
        StrategyArg::User => Strategy::UserOriented,
    };
    let size = package_size(&package(&plan, strategy));
    let mut signer_seed = [0u8; 32];
    ChaCha8Rng::seed_from_u64(args.seed ^ 0x5167).fill_bytes(&mut signer_seed);
    let signer = Signer::from_seed(&signer_seed);
    let context = RekeyContext { group: GroupId(args.seed), epoch: 1, seq: 1, activation: 2 };
    let packet_config = PacketConfig { mtu: args.mtu, block_bits: args.block_bits, placement: args.packet_placement, ..PacketConfig::default() };
    let start = Instant::now();
    let wire = encode_rekey(&plan, context, packet_config, &signer).map_err(|e| e.to_string())?;
    let encode_micros = start.elapsed().as_micros();
    let wire_stats = wire.stats;
    let stats = graph.stats();
    let report = serde_json::json!({
        "scheme": scheme_name(config.scheme),
        "degree": match config.scheme { Scheme::Tree { degree } => Some(degree), _ => None },
        "id_bits": match config.scheme { Scheme::Flat { id_bits, .. } => Some(id_bits), _ => None },
        "members_before": args.members,
        "joins": args.joins,
        "leaves": args.leaves,
        "members_after": stats.members,
        "excluded": plan.excluded.len(),
        "height": stats.height,
        "changed_keys": plan.changed_keys(),
        "wraps": plan.wraps.len(),
        "messages": size.messages,
        "message_wraps": size.wraps,
        "packets": wire_stats.packets,
        "bytes": wire_stats.bytes,
        "auth_bytes": wire_stats.auth_bytes,
        "signatures": wire_stats.signatures,
        "packet_entries": wire_stats.entries,
        "micros": micros as u64,
        "encode_micros": encode_micros as u64,
    });
    if args.json {
        println!("{report}");
    } else {
        println!("scheme         {}, join policy {:?}", scheme_text(config.scheme), config.join_policy);
        println!("members        {} -> {} (height {})", args.members, stats.members, stats.height);
        println!("batch          {} joins, {} leaves ({} excluded with them)", args.joins, args.leaves, plan.excluded.len());
        println!("changed keys   {} ({} replaced, {} revised)", plan.changed_keys(), plan.replaced.len(), plan.revised.len());
        println!("wraps          {}", plan.wraps.len());
        println!("messages       {} ({:?}, {} wraps in all)", size.messages, strategy, size.wraps);
        println!(
            "on the wire    {} packets, {} bytes ({} wraps placed, {} signatures, {:.1}% authentication)",
            wire_stats.packets,
            wire_stats.bytes,
            wire_stats.entries,
            wire_stats.signatures,
            100.0 * wire_stats.auth_bytes as f64 / wire_stats.bytes as f64
        );
        println!("time           {micros} us to plan the rekey, {encode_micros} us to packetise and sign it");
    }
    Ok(())
}

fn scheme_name(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::Star => "star",
        Scheme::Tree { .. } => "tree",
        Scheme::Flat { .. } => "flat",
    }
}

fn scheme_text(scheme: Scheme) -> String {
    match scheme {
        Scheme::Star => "star".into(),
        Scheme::Tree { degree } => format!("tree of degree {degree}"),
        Scheme::Flat { id_bits, .. } => format!("flat table of {id_bits}-bit IDs"),
    }
}
