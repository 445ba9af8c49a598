//! `keycast`: scalable group key management for secure multicast.

mod admin_tree;
mod bench;
mod demo;
mod demo_controller_dies;
mod demo_distributed;
mod demo_relays;
mod figures;
mod measure;
mod member_events;
mod member_run;
mod net;
mod participant;
mod participant_data;
mod sim;
mod sim_delivery;
mod stats_text;

use clap::{Parser, Subcommand};

mod allocator;

/// A rekey of a large batch allocates about 100 MB (its wraps and packets). glibc hands such
/// blocks back to the kernel when freed, so every rekey took them again as fresh zeroed pages:
/// at 10% of 2^20 members that cost 0.3-0.4 of the crypto floor. mimalloc keeps them for reuse
/// (for how long: `allocator::keep_freed_memory`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "keycast", version, about = "Scalable group key management for secure multicast")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a controller and 200 members (or 100 participants of a distributed flat group) on
    /// loopback under churn and report what happened.
    Demo(demo::DemoArgs),
    /// Create a CA, certificates for a controller, members and an admin, and commented configs.
    Init(net::InitArgs),
    /// Run a group's controller.
    Server(net::ConfigArg),
    /// Run a relay: a member of its parent group and the controller of its subgroup, carrying
    /// data between them.
    Relay(net::ConfigArg),
    /// Join a group as a member, print its events, optionally send a test stream.
    #[command(after_help = net::MEMBER_EXIT_STATUS)]
    Member(member_run::MemberArgs),
    /// Administer a running controller: list, evict, readmit, acl, stats.
    Admin(net::AdminArgs),
    /// Simulations that reproduce the papers' measurements.
    #[command(subcommand)]
    Sim(sim::SimCommand),
    /// Rekey costs against the crypto floor (and against MLS with the mls-peer feature).
    Bench(bench::BenchArgs),
    /// The simulated members of `bench --net --members` (started by the bench).
    #[command(hide = true)]
    LoadMembers(bench::simulated::SimulatedArgs),
}

/// Exit status of `keycast member` when the controller evicted it (1 is any failure).
const EXIT_EVICTED: u8 = 3;

fn main() -> std::process::ExitCode {
    allocator::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Init(args) => net::init(&args),
        Command::Server(args) => net::server(&args),
        Command::Relay(args) => net::relay(&args),
        Command::Member(args) => match member_run::member(&args) {
            Ok(net::MemberEnd::Evicted) => return std::process::ExitCode::from(EXIT_EVICTED),
            other => other.map(drop),
        },
        Command::Admin(args) => net::admin(&args),
        Command::Sim(command) => sim::run(command),
        Command::Bench(args) => bench::run(&args),
        Command::LoadMembers(args) => bench::simulated::run(&args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("keycast: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
