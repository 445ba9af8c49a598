//! `keycast`: scalable group key management for secure multicast.

mod bench;
mod demo;
mod figures;
mod measure;
mod sim;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "keycast", version, about = "Scalable group key management for secure multicast")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a group under churn in this process and report what happened.
    Demo(demo::DemoArgs),
    /// Simulations that reproduce the papers' measurements.
    #[command(subcommand)]
    Sim(sim::SimCommand),
    /// Rekey costs against the crypto floor (and against MLS with the mls-peer feature).
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Sim(command) => sim::run(command),
        Command::Bench(args) => bench::run(&args),
    };
    if let Err(error) = result {
        eprintln!("keycast: {error}");
        std::process::exit(1);
    }
}
