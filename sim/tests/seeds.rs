//! The simulator under `cargo test`: a fixed range of seeds holds every
//! invariant and covers every fault kind and crash point; a seed replays
//! exactly; and every planted bug is caught.

use std::collections::BTreeMap;

use decree_runtime::crash;
use decree_sim::{run, Mutation, Options, Stats};

/// Seeds every `cargo test` runs, in slices that run in parallel: every
/// change to an engine, a runtime or the simulator meets these many runs of
/// faults (about 50 s on two cores).
const SEEDS: u64 = 30_000;
const SLICES: u64 = 6;

fn run_slice(slice: u64) -> Vec<Stats> {
    let per = SEEDS / SLICES;
    (slice * per..(slice + 1) * per)
        .map(|seed| {
            let report = run(&Options::seed(seed));
            assert!(
                report.ok(),
                "seed {seed} broke an invariant: {}\nreplay: decree-sim --seed {seed}",
                report.violations.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n")
            );
            report.stats
        })
        .collect()
}

/// One test per slice: each runs its seeds and checks that they covered every fault.
macro_rules! slices {
    ($($name:ident = $slice:literal),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                covers_every_fault(&run_slice($slice));
            }
        )*
    };
}

slices! {
    seeds_0_to_4999_hold_every_invariant = 0,
    seeds_5000_to_9999_hold_every_invariant = 1,
    seeds_10000_to_14999_hold_every_invariant = 2,
    seeds_15000_to_19999_hold_every_invariant = 3,
    seeds_20000_to_24999_hold_every_invariant = 4,
    seeds_25000_to_29999_hold_every_invariant = 5,
}

/// Seeds that once broke an invariant (found by long runs of `decree-sim
/// --seeds`), each with what it found: they hold now.
const FOUND: &[(u64, &str)] = &[
    (
        5_157_392,
        "a repeated Enlist answered before the first one's record had landed: the group's next leader \
         committed the transaction one-phase at the other participant",
    ),
    (
        20_431_557,
        "a migration step sent twice: the copy's refusal lifted the fence the first copy held, and a \
         transaction wrote keys of the range that stayed at their old owner",
    ),
    (
        40_113_328,
        "a stale interactive Prepare (sent before the coordinator restarted) took the active branch \
         out of its map and aborted nothing: its keys stayed locked for good",
    ),
];

#[test]
fn seeds_that_found_bugs_hold_every_invariant() {
    for &(seed, found) in FOUND {
        let report = run(&Options::seed(seed));
        assert!(
            report.ok(),
            "seed {seed} ({found}) broke an invariant: {}",
            report.violations.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n")
        );
    }
}

/// A slice of seeds is only evidence if its faults happened.
fn covers_every_fault(stats: &[Stats]) {
    let total = |f: fn(&Stats) -> u64| stats.iter().map(f).sum::<u64>();
    for (kind, count) in [
        ("lost messages", total(|s| s.lost)),
        ("duplicated messages", total(|s| s.duplicated)),
        ("messages cut by a partition", total(|s| s.partitioned)),
        ("process crashes", total(|s| s.process_crashes)),
        ("machine crashes", total(|s| s.machine_crashes)),
        ("committed transfers", total(|s| s.committed)),
        ("aborted transfers", total(|s| s.aborted)),
        ("ring changes", total(|s| s.ring_changes)),
        ("finished migrations", total(|s| s.migrations)),
        ("keys moved", total(|s| s.moved_keys)),
        ("failed migration batches", total(|s| s.batch_failures)),
        ("reads redirected", total(|s| s.redirects)),
        ("runs of a coordinator group", total(|s| s.group as u64)),
        ("runs whose resource waits to validate", total(|s| s.slow_resource as u64)),
        ("Aborts that reached a branch still validating", total(|s| s.aborts_while_validating)),
        ("group leaders lost", total(|s| s.leader_changes)),
        ("writes replicating that the next leader held", total(|s| s.replicating_kept)),
        ("writes replicating that the next leader lost", total(|s| s.replicating_lost)),
    ] {
        assert!(count > 0, "no {kind} in {} seeds", stats.len());
    }
    let mut points: BTreeMap<&str, u64> = BTreeMap::new();
    for s in stats {
        for (point, n) in &s.crash_points {
            *points.entry(point).or_default() += n;
        }
    }
    for point in crash::ALL {
        assert!(
            points.contains_key(point),
            "crash point {point} never reached in {} seeds: {points:?}",
            stats.len()
        );
    }
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 77, 1234] {
        let first = run(&Options { trace: true, ..Options::seed(seed) });
        let again = run(&Options { trace: true, ..Options::seed(seed) });
        assert!(first.trace.len() > 100, "seed {seed} did little: {} events", first.trace.len());
        if let Some(i) =
            (0..first.trace.len().min(again.trace.len())).find(|&i| first.trace[i] != again.trace[i])
        {
            panic!(
                "seed {seed} ran differently twice from event {i}:\n{}\n{}",
                first.trace[i], again.trace[i]
            );
        }
        assert_eq!(first.trace.len(), again.trace.len(), "seed {seed} ran differently twice");
        assert_eq!(first.trace_hash, again.trace_hash);
        assert_eq!(first.stats, again.stats);
        let quiet = run(&Options::seed(seed));
        assert_eq!(quiet.trace_hash, first.trace_hash, "keeping the trace changes nothing");
    }
    assert_ne!(run(&Options::seed(1)).trace_hash, run(&Options::seed(2)).trace_hash);
}

/// Each planted bug breaks an invariant within a few seeds (docs/testing.md
/// lists how many): the checks can fail.
#[test]
fn every_planted_bug_is_caught() {
    // Two have narrow windows: the fence at a new owner has a test of its own below; a
    // repeated Enlist from another run is caught by the real-process test
    // `more_work_after_a_participant_restart_is_refused_and_nothing_of_the_transaction_commits`.
    let narrow = [Mutation::NoFenceAtNewOwner, Mutation::ReenlistTaken, Mutation::EnlistNotDurable];
    for mutation in Mutation::ALL.into_iter().filter(|m| !narrow.contains(m)) {
        assert!(caught(mutation, 200).is_some(), "{} went unnoticed for 200 seeds", mutation.name());
    }
}

/// The bug the simulator found in the migration (a member joining served a
/// key of a committed batch before the commit reached it): its window is
/// narrow, so this one takes more seeds.
#[test]
fn a_new_owner_without_its_fence_is_caught() {
    let mutation = Mutation::NoFenceAtNewOwner;
    assert!(caught(mutation, 8_000).is_some(), "{} went unnoticed for 8000 seeds", mutation.name());
}

/// An Enlist answered before its record is durable: a restart or failover
/// between a participant's first work and the Commit loses the branch, and
/// the Commit commits without its work. The window (a crash in an
/// interactive transaction's life, after an enlistment) is narrow.
#[test]
fn an_enlistment_answered_before_it_is_durable_is_caught() {
    let mutation = Mutation::EnlistNotDurable;
    assert!(caught(mutation, 4_000).is_some(), "{} went unnoticed for 4000 seeds", mutation.name());
}

fn caught(mutation: Mutation, seeds: u64) -> Option<u64> {
    (0..seeds).find(|&seed| !run(&Options { mutation: Some(mutation), ..Options::seed(seed) }).ok())
}
