//! `decree-sim`: runs seeds of the deterministic simulation.
//!
//! - `decree-sim --seeds N [--from S]` runs N seeds and stops at the first
//!   that breaks an invariant, printing the command that replays it;
//! - `decree-sim --seed S` replays one seed and prints its event trace;
//! - `--mutation NAME` plants a bug (see `--help`), to see it caught.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use decree_sim::{render, run, Mutation, Options};

#[derive(Parser, Debug)]
#[command(
    name = "decree-sim",
    about = "Deterministic simulation of decree: seeds of faults, checked against the invariants"
)]
struct Args {
    /// Run this many seeds, from --from on; stop at the first violation.
    #[arg(long, conflicts_with = "seed")]
    seeds: Option<u64>,
    /// The first seed of --seeds.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Replay one seed and print its event trace.
    #[arg(long)]
    seed: Option<u64>,
    /// Plant a bug: commit-before-durable, yes-before-durable, ack-before-durable,
    /// decide-alone, failed-vote-is-yes, presume-commit, skip-redelivery, presume-abort-unasked,
    /// keep-moved-keys, no-fence-at-new-owner, cursor-before-commit, reenlist-taken,
    /// enlist-not-durable.
    #[arg(long, value_parser = |s: &str| s.parse::<Mutation>())]
    mutation: Option<Mutation>,
    /// With --seed: print only the summary, not the trace.
    #[arg(long)]
    quiet: bool,
    /// Check only effects (the data, the outcomes, liveness), not the I3
    /// checks made as messages leave: how a planted bug shows in the data.
    #[arg(long)]
    effects_only: bool,
}

fn replay_command(seed: u64, mutation: Option<Mutation>) -> String {
    match mutation {
        Some(m) => format!("decree-sim --seed {seed} --mutation {}", m.name()),
        None => format!("decree-sim --seed {seed}"),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(seed) = args.seed {
        let report = run(&Options {
            seed,
            mutation: args.mutation,
            trace: !args.quiet,
            effects_only: args.effects_only,
        });
        print!("{}", render(&report));
        println!("seed {seed}: {:?}", report.stats);
        println!("trace hash {:016x}", report.trace_hash);
        if report.ok() {
            println!("seed {seed}: every invariant holds");
            return ExitCode::SUCCESS;
        }
        for violation in &report.violations {
            println!("violation: {violation}");
        }
        return ExitCode::FAILURE;
    }
    let seeds = args.seeds.unwrap_or(100);
    let started = Instant::now();
    let mut events = 0;
    for seed in args.from..args.from + seeds {
        let report =
            run(&Options { seed, mutation: args.mutation, trace: false, effects_only: args.effects_only });
        events += report.stats.events;
        if !report.ok() {
            eprintln!(
                "seed {seed}: {} violation(s); the first: {}",
                report.violations.len(),
                report.violations[0]
            );
            eprintln!("replay: {}", replay_command(seed, args.mutation));
            eprintln!("after {} seeds in {:.1} s", seed - args.from + 1, started.elapsed().as_secs_f64());
            return ExitCode::FAILURE;
        }
        let done = seed - args.from + 1;
        if done % 1000 == 0 {
            eprintln!("{done} seeds, {:.0} seeds/s", done as f64 / started.elapsed().as_secs_f64());
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{seeds} seeds from {}: every invariant holds ({elapsed:.1} s, {:.0} seeds/s, {:.0} events/s)",
        args.from,
        seeds as f64 / elapsed,
        events as f64 / elapsed
    );
    ExitCode::SUCCESS
}
