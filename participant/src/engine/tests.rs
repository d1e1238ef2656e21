use super::*;
use std::time::Duration;

fn tx(seq: u64) -> TxId {
    TxId::new(0xabcd, 2, seq)
}

fn keys(names: &[&str]) -> Vec<String> {
    names.iter().map(|k| k.to_string()).collect()
}

fn prepare(engine: &mut Engine, txid: TxId, names: &[&str], one_phase: bool) -> Vec<Command> {
    engine.on_event(Event::PrepareRequested {
        txid,
        keys: keys(names),
        payload: vec![9],
        one_phase,
        incarnation: 2,
        interactive: false,
    });
    engine.take_commands()
}

fn event(engine: &mut Engine, event: Event) -> Vec<Command> {
    engine.on_event(event);
    engine.take_commands()
}

/// Runs a branch to the prepared state.
fn prepared(engine: &mut Engine, txid: TxId, names: &[&str]) {
    prepare(engine, txid, names, false);
    event(engine, Event::Validated { txid, result: Validated::Ready { redo: vec![7] } });
    let commands = event(engine, Event::PreparedLogged { txid, at: Instant::now() });
    assert_eq!(commands, vec![Command::Vote { txid, vote: Vote::Yes }]);
}

fn no(txid: TxId, code: Reason, reason: &str) -> Command {
    Command::Vote { txid, vote: Vote::No { code, reason: reason.into() } }
}

#[test]
fn prepare_locks_validates_logs_then_votes_yes() {
    let mut engine = Engine::new();
    let t = tx(1);
    assert_eq!(
        prepare(&mut engine, t, &["a", "b"], false),
        vec![Command::Validate { txid: t, payload: vec![9] }]
    );
    assert_eq!(engine.locks().len(), 2);
    assert_eq!(
        event(&mut engine, Event::Validated { txid: t, result: Validated::Ready { redo: vec![7] } }),
        vec![Command::LogPrepared { txid: t, keys: keys(&["a", "b"]), redo: vec![7] }],
        "no vote before the prepared record is durable"
    );
    let at = Instant::now();
    assert_eq!(
        event(&mut engine, Event::PreparedLogged { txid: t, at }),
        vec![Command::Vote { txid: t, vote: Vote::Yes }]
    );
    assert_eq!(engine.in_doubt(), vec![InDoubt { txid: t, since: at, keys: keys(&["a", "b"]) }]);
}

#[test]
fn a_conflicting_prepare_votes_no_and_changes_nothing() {
    let mut engine = Engine::new();
    let (t1, t2) = (tx(1), tx(2));
    prepared(&mut engine, t1, &["a"]);
    assert_eq!(
        prepare(&mut engine, t2, &["b", "a"], false),
        vec![no(t2, Reason::LockConflict, &format!("lock conflict on key \"a\" (held by {t1})"))]
    );
    assert_eq!(engine.locks(), BTreeMap::from([("a".to_string(), t1)]), "b was not locked");
}

#[test]
fn a_prepare_refused_for_a_conflict_is_aborted_for_good_and_a_repeat_votes_no() {
    let mut engine = Engine::new();
    let (t1, t2) = (tx(1), tx(2));
    prepared(&mut engine, t1, &["a"]);
    prepare(&mut engine, t2, &["a"], true);
    event(&mut engine, Event::CommitRequested { txid: t1 });
    event(&mut engine, Event::CommitLogged { txid: t1 });
    assert!(engine.locks().is_empty());
    assert_eq!(
        prepare(&mut engine, t2, &["a"], true),
        vec![no(t2, Reason::AlreadyDecided, "transaction already aborted here")],
        "a one-phase Prepare that voted NO must never commit on a later copy, the key free or not"
    );
}

#[test]
fn a_repeated_prepare_under_way_gets_the_first_ones_vote_not_a_no() {
    let mut engine = Engine::new();
    let t = tx(1);
    prepare(&mut engine, t, &["a"], true);
    assert_eq!(prepare(&mut engine, t, &["a"], true), vec![], "validating: the vote to come answers both");
    event(&mut engine, Event::Validated { txid: t, result: Validated::Ready { redo: vec![7] } });
    assert_eq!(prepare(&mut engine, t, &["a"], true), vec![], "committing one-phase: the same");
    assert_eq!(
        event(&mut engine, Event::CommitLogged { txid: t }),
        vec![Command::Vote { txid: t, vote: Vote::Committed }]
    );
}

#[test]
fn commit_applies_durably_then_releases_and_acks() {
    let mut engine = Engine::new();
    let t = tx(1);
    prepared(&mut engine, t, &["a"]);
    assert_eq!(
        event(&mut engine, Event::CommitRequested { txid: t }),
        vec![Command::LogCommit { txid: t, redo: vec![7], one_phase: false }]
    );
    assert_eq!(
        event(&mut engine, Event::CommitRequested { txid: t }),
        vec![],
        "a duplicate waits for durability"
    );
    assert_eq!(engine.locks().len(), 1, "locked until applied");
    assert_eq!(
        event(&mut engine, Event::CommitLogged { txid: t }),
        vec![Command::AckCommit { txid: t, ack: Ack::Done }]
    );
    assert!(engine.locks().is_empty());
    assert_eq!(engine.outcome(t), Some(Outcome::Committed));
    assert_eq!(
        event(&mut engine, Event::CommitRequested { txid: t }),
        vec![Command::AckCommit { txid: t, ack: Ack::Done }],
        "commit is idempotent"
    );
}

#[test]
fn abort_of_a_prepared_branch_releases_and_acks() {
    let mut engine = Engine::new();
    let t = tx(1);
    prepared(&mut engine, t, &["a"]);
    assert_eq!(
        event(&mut engine, Event::AbortRequested { txid: t }),
        vec![Command::LogAbort { txid: t, prepared: true }]
    );
    assert_eq!(
        event(&mut engine, Event::AbortLogged { txid: t }),
        vec![Command::AckAbort { txid: t, ack: Ack::Done }]
    );
    assert!(engine.locks().is_empty());
    assert_eq!(
        event(&mut engine, Event::AbortRequested { txid: t }),
        vec![Command::AckAbort { txid: t, ack: Ack::Done }]
    );
    assert_eq!(
        prepare(&mut engine, t, &["a"], false),
        vec![no(t, Reason::AlreadyDecided, "transaction already aborted here")]
    );
}

#[test]
fn abort_for_an_unknown_txid_leaves_a_tombstone_so_a_late_prepare_votes_no() {
    let mut engine = Engine::new();
    let t = tx(5);
    assert_eq!(
        event(&mut engine, Event::AbortRequested { txid: t }),
        vec![Command::LogAbort { txid: t, prepared: false }]
    );
    assert_eq!(
        event(&mut engine, Event::AbortLogged { txid: t }),
        vec![Command::AckAbort { txid: t, ack: Ack::Done }]
    );
    assert_eq!(
        prepare(&mut engine, t, &["a"], false),
        vec![no(t, Reason::AlreadyDecided, "transaction already aborted here")]
    );
    assert!(engine.locks().is_empty());
}

#[test]
fn commit_for_an_unknown_txid_is_answered_without_effect() {
    let mut engine = Engine::new();
    let t = tx(5);
    assert_eq!(
        event(&mut engine, Event::CommitRequested { txid: t }),
        vec![Command::AckCommit { txid: t, ack: Ack::Done }]
    );
    assert_eq!(engine.outcome(t), None);
}

#[test]
fn contradictions_are_refused() {
    let mut engine = Engine::new();
    let (t1, t2) = (tx(1), tx(2));
    event(&mut engine, Event::AbortRequested { txid: t1 });
    event(&mut engine, Event::AbortLogged { txid: t1 });
    assert!(matches!(
        event(&mut engine, Event::CommitRequested { txid: t1 }).as_slice(),
        [Command::AckCommit { ack: Ack::Refused { .. }, .. }]
    ));
    prepared(&mut engine, t2, &["a"]);
    event(&mut engine, Event::CommitRequested { txid: t2 });
    event(&mut engine, Event::CommitLogged { txid: t2 });
    assert!(matches!(
        event(&mut engine, Event::AbortRequested { txid: t2 }).as_slice(),
        [Command::AckAbort { ack: Ack::Refused { .. }, .. }]
    ));
}

#[test]
fn a_refused_branch_votes_no_and_releases() {
    let mut engine = Engine::new();
    let t = tx(1);
    prepare(&mut engine, t, &["a"], false);
    assert_eq!(
        event(
            &mut engine,
            Event::Validated { txid: t, result: Validated::Refused { reason: "expect failed".into() } }
        ),
        vec![no(t, Reason::ValidationFailed, "expect failed")]
    );
    assert!(engine.locks().is_empty());
}

#[test]
fn read_only_branches_release_at_once() {
    let mut engine = Engine::new();
    let (t1, t2) = (tx(1), tx(2));
    prepare(&mut engine, t1, &["a"], false);
    assert_eq!(
        event(&mut engine, Event::Validated { txid: t1, result: Validated::ReadOnly }),
        vec![Command::Vote { txid: t1, vote: Vote::ReadOnly }]
    );
    prepare(&mut engine, t2, &["a"], true);
    assert_eq!(
        event(&mut engine, Event::Validated { txid: t2, result: Validated::ReadOnly }),
        vec![Command::Vote { txid: t2, vote: Vote::Committed }]
    );
    assert!(engine.locks().is_empty());
}

#[test]
fn one_phase_commits_in_one_durable_step() {
    let mut engine = Engine::new();
    let t = tx(1);
    prepare(&mut engine, t, &["a"], true);
    assert_eq!(
        event(&mut engine, Event::Validated { txid: t, result: Validated::Ready { redo: vec![1] } }),
        vec![Command::LogCommit { txid: t, redo: vec![1], one_phase: true }]
    );
    assert_eq!(
        event(&mut engine, Event::CommitLogged { txid: t }),
        vec![Command::Vote { txid: t, vote: Vote::Committed }]
    );
    assert!(engine.locks().is_empty());
    assert_eq!(prepare(&mut engine, t, &["a"], true), vec![Command::Vote { txid: t, vote: Vote::Committed }]);
}

#[test]
fn an_abort_during_a_one_phase_commit_is_answered_committed_once_durable() {
    let mut engine = Engine::new();
    let t = tx(1);
    prepare(&mut engine, t, &["a"], true);
    event(&mut engine, Event::Validated { txid: t, result: Validated::Ready { redo: vec![1] } });
    assert_eq!(
        event(&mut engine, Event::AbortRequested { txid: t }),
        vec![],
        "not before the commit is durable"
    );
    let reason = format!("transaction {t} was committed here");
    assert_eq!(
        event(&mut engine, Event::CommitLogged { txid: t }),
        vec![
            Command::Vote { txid: t, vote: Vote::Committed },
            Command::AckAbort { txid: t, ack: Ack::Refused { code: Reason::AlreadyDecided, reason } }
        ]
    );
}

/// The coordinator of a one-phase branch whose vote it lost asks with an
/// Abort, and takes the ack as "never commits". A branch still validating is
/// acked only once its abort tombstone is recorded: acked before, a crash
/// would lose the tombstone, and a late copy of the Prepare could then commit
/// what the client was told aborted.
#[test]
fn a_one_phase_branch_aborted_while_validating_is_acked_once_its_tombstone_is_recorded() {
    let mut engine = Engine::new();
    let t = tx(1);
    prepare(&mut engine, t, &["a"], true);
    assert_eq!(event(&mut engine, Event::AbortRequested { txid: t }), vec![], "not before the tombstone");
    assert_eq!(
        event(&mut engine, Event::Validated { txid: t, result: Validated::Ready { redo: vec![1] } }),
        vec![
            Command::LogAbort { txid: t, prepared: false },
            no(t, Reason::AlreadyDecided, "aborted while preparing")
        ],
        "never committed"
    );
    assert_eq!(
        event(&mut engine, Event::AbortLogged { txid: t }),
        vec![Command::AckAbort { txid: t, ack: Ack::Done }]
    );
    assert!(engine.locks().is_empty());
    assert_eq!(
        prepare(&mut engine, t, &["a"], true),
        vec![no(t, Reason::AlreadyDecided, "transaction already aborted here")]
    );
}

#[test]
fn an_abort_while_preparing_never_becomes_yes() {
    let mut engine = Engine::new();
    let (t1, t2) = (tx(1), tx(2));
    // Abort before validation finished.
    prepare(&mut engine, t1, &["a"], false);
    assert_eq!(event(&mut engine, Event::AbortRequested { txid: t1 }), vec![], "acked once recorded");
    assert_eq!(
        event(&mut engine, Event::Validated { txid: t1, result: Validated::Ready { redo: vec![] } }),
        vec![
            Command::LogAbort { txid: t1, prepared: false },
            no(t1, Reason::AlreadyDecided, "aborted while preparing")
        ]
    );
    assert_eq!(engine.outcome(t1), Some(Outcome::Aborted), "a late Prepare will vote NO");
    assert_eq!(
        event(&mut engine, Event::AbortLogged { txid: t1 }),
        vec![Command::AckAbort { txid: t1, ack: Ack::Done }]
    );
    // Abort while the prepared record is being written.
    prepare(&mut engine, t2, &["a"], false);
    event(&mut engine, Event::Validated { txid: t2, result: Validated::Ready { redo: vec![] } });
    event(&mut engine, Event::AbortRequested { txid: t2 });
    assert_eq!(
        event(&mut engine, Event::PreparedLogged { txid: t2, at: Instant::now() }),
        vec![
            Command::LogAbort { txid: t2, prepared: true },
            no(t2, Reason::AlreadyDecided, "aborted while preparing")
        ]
    );
    event(&mut engine, Event::AbortLogged { txid: t2 });
    assert!(engine.locks().is_empty());
}

#[test]
fn a_stale_prepare_from_an_older_incarnation_votes_no() {
    let mut engine = Engine::new();
    event(&mut engine, Event::CoordinatorIncarnation { incarnation: 3 });
    let t = tx(1);
    assert_eq!(
        prepare(&mut engine, t, &["a"], false),
        vec![no(t, Reason::Stale, "stale Prepare from coordinator incarnation 2 (current is 3)")]
    );
    assert!(engine.locks().is_empty());
}

#[test]
fn a_duplicate_prepare_repeats_yes() {
    let mut engine = Engine::new();
    let t = tx(1);
    prepared(&mut engine, t, &["a"]);
    assert_eq!(prepare(&mut engine, t, &["a"], false), vec![Command::Vote { txid: t, vote: Vote::Yes }]);
}

#[test]
fn recovered_branches_lock_again_and_wait_for_the_coordinator() {
    let mut engine = Engine::new();
    let (t1, t2) = (tx(1), tx(2));
    let at = Instant::now();
    event(&mut engine, Event::Recovered { txid: t1, keys: keys(&["a"]), redo: vec![3], at });
    assert_eq!(engine.in_doubt().len(), 1);
    assert!(matches!(
        prepare(&mut engine, t2, &["a"], false).as_slice(),
        [Command::Vote { vote: Vote::No { .. }, .. }]
    ));
    assert_eq!(
        event(&mut engine, Event::OutcomeLearned { txid: t1, outcome: Outcome::Committed }),
        vec![Command::LogCommit { txid: t1, redo: vec![3], one_phase: false }]
    );
    event(&mut engine, Event::CommitLogged { txid: t1 });
    assert!(engine.locks().is_empty());
    assert!(engine.in_doubt().is_empty());
}

/// The tombstones remembered so far made old enough for the bounds to evict them.
fn age(engine: &mut Engine) {
    let start = Instant::now();
    event(engine, Event::ForgetOld { now: start });
    event(engine, Event::ForgetOld { now: start + super::tombstones::MIN_AGE });
}

#[test]
fn tombstones_are_bounded() {
    let mut engine = Engine::new();
    for seq in 1..=(TOMBSTONES as u64 + 10) {
        engine.on_event(Event::RecoveredTombstone { txid: tx(seq), outcome: Outcome::Aborted });
    }
    assert_eq!(engine.outcome(tx(1)), Some(Outcome::Aborted), "kept until it is old enough to go");
    age(&mut engine);
    assert_eq!(engine.outcome(tx(1)), None);
    assert_eq!(engine.outcome(tx(TOMBSTONES as u64 + 10)), Some(Outcome::Aborted));
}

mod lock_wait {
    use super::*;

    const WAIT: Duration = Duration::from_millis(100);

    fn engine() -> Engine {
        Engine::with_waits(WAIT, Duration::ZERO)
    }

    #[test]
    fn a_younger_prepare_waits_for_an_older_holder_and_runs_when_it_releases() {
        let mut engine = engine();
        let (old, young) = (tx(1), tx(2));
        prepared(&mut engine, old, &["a"]);
        assert_eq!(
            prepare(&mut engine, young, &["a", "b"], false),
            vec![Command::ArmLockWait { txid: young, after: WAIT }]
        );
        assert_eq!(engine.waiting(), vec![young]);
        assert!(!engine.locks().contains_key("b"), "a waiter holds no lock");
        event(&mut engine, Event::CommitRequested { txid: old });
        assert_eq!(
            event(&mut engine, Event::CommitLogged { txid: old }),
            vec![
                Command::Validate { txid: young, payload: vec![9] },
                Command::AckCommit { txid: old, ack: Ack::Done }
            ]
        );
        assert_eq!(engine.locks().get("a"), Some(&young));
        assert!(engine.waiting().is_empty());
        event(&mut engine, Event::LockWaitExpired { txid: young });
        assert_eq!(engine.take_commands(), vec![], "a granted waiter's timer is stale");
    }

    #[test]
    fn an_older_prepare_never_waits_for_a_younger_holder() {
        let mut engine = engine();
        let (old, young) = (tx(1), tx(2));
        prepared(&mut engine, young, &["a"]);
        assert_eq!(
            prepare(&mut engine, old, &["a"], false),
            vec![no(old, Reason::LockConflict, &format!("lock conflict on key \"a\" (held by {young})"))]
        );
        assert!(engine.waiting().is_empty());
    }

    #[test]
    fn a_wait_that_runs_out_votes_no_with_lock_conflict() {
        let mut engine = engine();
        let (old, young) = (tx(1), tx(2));
        prepared(&mut engine, old, &["a"]);
        prepare(&mut engine, young, &["a"], false);
        assert_eq!(
            event(&mut engine, Event::LockWaitExpired { txid: young }),
            vec![no(
                young,
                Reason::LockConflict,
                &format!("lock conflict on key \"a\" (held by {old}; waited 100 ms)")
            )]
        );
        event(&mut engine, Event::AbortRequested { txid: old });
        assert_eq!(
            event(&mut engine, Event::AbortLogged { txid: old }),
            vec![Command::AckAbort { txid: old, ack: Ack::Done }]
        );
        assert!(engine.locks().is_empty(), "the expired waiter is not granted later");
    }

    #[test]
    fn no_one_overtakes_an_older_waiter_and_waiters_are_granted_oldest_first() {
        let mut engine = engine();
        let (holder, w1, w2, w0) = (tx(1), tx(3), tx(4), tx(2));
        prepared(&mut engine, holder, &["a"]);
        prepare(&mut engine, w1, &["a", "b"], false);
        prepare(&mut engine, w2, &["b"], false);
        assert_eq!(engine.waiting(), vec![w1, w2], "b is free, but w1 (older) waits for it");
        assert_eq!(
            prepare(&mut engine, w0, &["b"], false),
            vec![no(
                w0,
                Reason::LockConflict,
                "lock conflict: an older transaction is waiting for the same keys"
            )],
            "w0 is older than the waiter w1: it may not wait behind it"
        );
        event(&mut engine, Event::AbortRequested { txid: holder });
        assert_eq!(
            event(&mut engine, Event::AbortLogged { txid: holder }),
            vec![
                Command::Validate { txid: w1, payload: vec![9] },
                Command::AckAbort { txid: holder, ack: Ack::Done }
            ]
        );
        assert_eq!(engine.waiting(), vec![w2], "w2 now waits for w1");
    }

    #[test]
    fn an_abort_of_a_waiting_prepare_answers_it_and_leaves_a_tombstone() {
        let mut engine = engine();
        let (old, young) = (tx(1), tx(2));
        prepared(&mut engine, old, &["a"]);
        prepare(&mut engine, young, &["a"], false);
        assert_eq!(
            event(&mut engine, Event::AbortRequested { txid: young }),
            vec![
                no(young, Reason::AlreadyDecided, "aborted while waiting for locks"),
                Command::LogAbort { txid: young, prepared: false }
            ]
        );
        assert!(engine.waiting().is_empty());
        assert_eq!(engine.outcome(young), Some(Outcome::Aborted));
    }

    #[test]
    fn waits_only_point_from_younger_to_older_so_no_cycle_can_form() {
        // Two participants, two transactions, each prepared at one and asking
        // at the other: the classic deadlock. Only the younger one waits.
        let (mut p1, mut p2) = (engine(), engine());
        let (t1, t2) = (tx(1), tx(2));
        prepared(&mut p1, t1, &["x"]);
        prepared(&mut p2, t2, &["y"]);
        assert!(matches!(
            prepare(&mut p2, t1, &["y"], false).as_slice(),
            [Command::Vote { vote: Vote::No { .. }, .. }]
        ));
        assert_eq!(prepare(&mut p1, t2, &["x"], false), vec![Command::ArmLockWait { txid: t2, after: WAIT }]);
    }
}

mod read_wait {
    use super::*;

    const READ_WAIT: Duration = Duration::from_millis(1000);

    #[test]
    fn a_read_of_a_locked_key_waits_until_the_decision_is_applied() {
        let mut engine = Engine::with_waits(Duration::ZERO, READ_WAIT);
        let t = tx(1);
        prepared(&mut engine, t, &["a"]);
        assert_eq!(
            event(&mut engine, Event::ReadRequested { read: 7, keys: keys(&["b", "a"]) }),
            vec![Command::ArmReadWait { read: 7, after: READ_WAIT }]
        );
        assert_eq!(
            event(&mut engine, Event::ReadRequested { read: 8, keys: keys(&["b"]) }),
            vec![Command::Read { read: 8 }]
        );
        event(&mut engine, Event::CommitRequested { txid: t });
        assert_eq!(
            event(&mut engine, Event::CommitLogged { txid: t }),
            vec![Command::Read { read: 7 }, Command::AckCommit { txid: t, ack: Ack::Done }],
            "the read goes only once the commit is applied"
        );
        assert_eq!(event(&mut engine, Event::ReadWaitExpired { read: 7 }), vec![], "a stale timer");
    }

    /// The branch voted YES: its transaction may have committed, so the value
    /// committed here may be stale; the read is refused, not answered with it.
    #[test]
    fn a_read_blocked_by_a_branch_in_doubt_is_refused_after_the_wait() {
        for wait in [READ_WAIT, Duration::ZERO] {
            let mut engine = Engine::with_waits(Duration::ZERO, wait);
            let t = tx(1);
            event(
                &mut engine,
                Event::Recovered { txid: t, keys: keys(&["a"]), redo: vec![], at: Instant::now() },
            );
            let mut commands = event(&mut engine, Event::ReadRequested { read: 1, keys: keys(&["b", "a"]) });
            if !wait.is_zero() {
                assert_eq!(commands, vec![Command::ArmReadWait { read: 1, after: wait }]);
                commands = event(&mut engine, Event::ReadWaitExpired { read: 1 });
            }
            assert_eq!(
                commands,
                vec![Command::RefuseRead { read: 1, key: "a".into(), holder: t }],
                "wait {wait:?}: the read refused, naming the key and its holder"
            );
            assert_eq!(engine.in_doubt().len(), 1, "the read changed nothing");
        }
    }

    /// Interactive work not yet prepared cannot have committed: a read that
    /// waited for it reads what is committed here.
    #[test]
    fn a_read_blocked_by_work_not_yet_prepared_reads_what_is_committed_after_the_wait() {
        let mut engine = Engine::with_waits(Duration::ZERO, READ_WAIT);
        let t = tx(1);
        event(&mut engine, Event::WorkRequested { txid: t, work: 1, keys: keys(&["a"]), at: Instant::now() });
        assert_eq!(
            event(&mut engine, Event::ReadRequested { read: 2, keys: keys(&["a"]) }),
            vec![Command::ArmReadWait { read: 2, after: READ_WAIT }]
        );
        assert_eq!(event(&mut engine, Event::ReadWaitExpired { read: 2 }), vec![Command::Read { read: 2 }]);
    }
}

/// An interactive transaction's Prepare from coordinator incarnation `incarnation`.
fn interactive_prepare(txid: TxId, one_phase: bool, incarnation: u64) -> Event {
    Event::PrepareRequested { txid, keys: vec![], payload: vec![], one_phase, incarnation, interactive: true }
}

mod interactive {
    use super::*;

    const WAIT: Duration = Duration::from_millis(100);

    fn engine() -> Engine {
        Engine::with_waits(WAIT, Duration::ZERO)
    }

    fn work(engine: &mut Engine, txid: TxId, work: u64, names: &[&str]) -> Vec<Command> {
        event(engine, Event::WorkRequested { txid, work, keys: keys(names), at: Instant::now() })
    }

    #[test]
    fn a_stale_interactive_prepare_aborts_the_branch_and_frees_its_keys() {
        let mut engine = engine();
        let t = tx(1);
        work(&mut engine, t, 1, &["a", "b"]);
        done(&mut engine, t, b"w");
        event(&mut engine, Event::CoordinatorIncarnation { incarnation: 3 });
        // A Prepare the coordinator's last incarnation sent before it crashed, delivered now.
        let prepare = interactive_prepare(t, false, 2);
        let commands = event(&mut engine, prepare);
        assert!(commands.contains(&Command::LogAbort { txid: t, prepared: false }), "{commands:?}");
        assert!(
            commands.iter().any(|c| matches!(c, Command::Vote { txid, vote: Vote::No { code: Reason::Stale, .. } } if *txid == t)),
            "{commands:?}"
        );
        assert_eq!(engine.outcome(t), Some(Outcome::Aborted));
        assert!(engine.locks().is_empty(), "its keys are free: {:?}", engine.locks());
    }

    #[test]
    fn work_of_an_older_incarnation_outlives_a_newer_one_which_prepares_it() {
        let mut engine = engine();
        let (old, prepared_old) = (tx(1), tx(2));
        work(&mut engine, old, 1, &["a"]);
        done(&mut engine, old, b"w");
        super::prepared(&mut engine, prepared_old, &["p"]);
        // The coordinator restarted, or its group changed leader: it knows
        // every interactive transaction begun (its `a/` records), so the
        // work waits for the Commit or Abort of the new incarnation.
        let commands = event(&mut engine, Event::CoordinatorIncarnation { incarnation: 3 });
        assert_eq!(commands, vec![], "nothing aborted");
        assert_eq!(engine.outcome(old), None);
        assert_eq!(engine.locks().keys().collect::<Vec<_>>(), ["a", "p"], "both keep their locks");
        let prepare = interactive_prepare(old, false, 3);
        assert_eq!(
            event(&mut engine, prepare),
            vec![Command::Validate { txid: old, payload: b"w".to_vec() }],
            "the new incarnation's Prepare takes the work"
        );
    }

    /// The coordinator sends no Abort to a participant that voted NO: a
    /// Prepare that finds work still running votes NO and rolls the branch
    /// back itself, so its keys do not wait for an idle timeout.
    #[test]
    fn a_prepare_during_running_work_votes_no_and_frees_the_keys() {
        let mut engine = engine();
        let (running, waiting, other) = (tx(1), tx(2), tx(3));
        work(&mut engine, running, 1, &["a"]);
        // A second transaction's work waits behind `other`'s lock: busy too.
        work(&mut engine, other, 2, &["b"]);
        done(&mut engine, other, b"w");
        work(&mut engine, waiting, 3, &["b"]);
        for (txid, work_refused) in [(running, false), (waiting, true)] {
            let prepare = interactive_prepare(txid, false, 2);
            let commands = event(&mut engine, prepare);
            let vote = no(txid, Reason::InProgress, "work of this transaction is still running here");
            assert_eq!(commands.last(), Some(&vote), "{commands:?}");
            assert!(commands.contains(&Command::LogAbort { txid, prepared: false }), "{commands:?}");
            let refused = commands.iter().any(|c| matches!(c, Command::WorkRefused { work: 3, .. }));
            assert_eq!(refused, work_refused, "the waiting work hears it: {commands:?}");
            assert_eq!(engine.outcome(txid), Some(Outcome::Aborted));
        }
        assert_eq!(engine.locks().keys().collect::<Vec<_>>(), ["b"], "only `other` holds a key");
        done(&mut engine, running, b"late");
        assert_eq!(engine.take_commands(), vec![], "the late work changes nothing");
        assert_eq!(engine.locks().keys().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn a_one_shot_prepare_for_a_transaction_with_interactive_work_here_votes_no_and_frees_the_keys() {
        let mut engine = engine();
        let (active, waiting, other) = (tx(1), tx(2), tx(3));
        work(&mut engine, active, 1, &["a"]);
        done(&mut engine, active, b"w");
        // A second transaction's work waits behind `other`'s lock.
        work(&mut engine, other, 2, &["b"]);
        done(&mut engine, other, b"w");
        work(&mut engine, waiting, 3, &["b"]);
        // A work has its (busy) branch from its arrival, waiting or not.
        let why = "this transaction has interactive work here";
        for (txid, work_refused) in [(active, false), (waiting, true)] {
            let prepare = Event::PrepareRequested {
                txid,
                keys: vec!["c".into()],
                payload: vec![],
                one_phase: false,
                incarnation: 2,
                interactive: false,
            };
            let commands = event(&mut engine, prepare);
            assert_eq!(commands.last(), Some(&no(txid, Reason::InProgress, why)), "{commands:?}");
            assert!(commands.contains(&Command::LogAbort { txid, prepared: false }), "{commands:?}");
            let refused = commands.iter().any(|c| matches!(c, Command::WorkRefused { work: 3, .. }));
            assert_eq!(refused, work_refused, "the waiting work hears it: {commands:?}");
            assert_eq!(engine.outcome(txid), Some(Outcome::Aborted));
        }
        assert_eq!(engine.locks().keys().collect::<Vec<_>>(), ["b"], "only `other` holds a key");
    }

    #[test]
    fn superseded_work_is_aborted_but_a_prepared_branch_is_left_to_its_decision() {
        let mut engine = engine();
        let (active, prepared) = (tx(1), tx(2));
        work(&mut engine, active, 1, &["a"]);
        done(&mut engine, active, b"w");
        super::prepared(&mut engine, prepared, &["p"]);
        assert!(engine.supersede(active));
        assert_eq!(engine.take_commands(), vec![Command::LogAbort { txid: active, prepared: false }]);
        assert!(engine.supersede(tx(9)), "no branch: nothing can commit");
        assert!(!engine.supersede(prepared), "prepared: only its decision ends it");
        assert_eq!(engine.locks().keys().collect::<Vec<_>>(), ["p"]);
    }

    fn done(engine: &mut Engine, txid: TxId, payload: &[u8]) {
        event(engine, Event::WorkDone { txid, done: Some(payload.to_vec()), at: Instant::now() });
    }

    fn commit(engine: &mut Engine, txid: TxId, one_phase: bool) -> Vec<Command> {
        event(engine, interactive_prepare(txid, one_phase, 2))
    }

    fn granted(work: u64, so_far: &[u8], first: bool) -> Command {
        Command::WorkGranted { work, so_far: so_far.to_vec(), first }
    }

    #[test]
    fn work_locks_its_keys_buffers_its_writes_and_prepare_takes_them() {
        let mut engine = engine();
        let t = tx(1);
        assert_eq!(work(&mut engine, t, 0, &["a", "b"]), vec![granted(0, b"", true)]);
        done(&mut engine, t, &[1, 2]);
        assert_eq!(work(&mut engine, t, 1, &["b", "c"]), vec![granted(1, &[1, 2], false)]);
        done(&mut engine, t, &[3]);
        assert_eq!(engine.locks().into_values().collect::<Vec<_>>(), vec![t, t, t], "a, b and c");
        assert_eq!(
            commit(&mut engine, t, false),
            vec![Command::Validate { txid: t, payload: vec![1, 2, 3] }]
        );
        assert_eq!(engine.locks().len(), 3, "the locks stay through Prepare");
    }

    #[test]
    fn one_request_at_a_time_per_transaction_and_failed_work_adds_nothing() {
        let mut engine = engine();
        let t = tx(1);
        work(&mut engine, t, 0, &["a"]);
        assert!(matches!(
            work(&mut engine, t, 1, &["a"]).as_slice(),
            [Command::WorkRefused { work: 1, aborted: false, .. }]
        ));
        event(&mut engine, Event::WorkDone { txid: t, done: None, at: Instant::now() });
        assert_eq!(work(&mut engine, t, 2, &["a"]), vec![granted(2, b"", false)]);
    }

    #[test]
    fn two_transactions_that_would_deadlock_end_with_the_younger_dead_and_the_older_going_on() {
        let mut engine = engine();
        let (old, young) = (tx(1), tx(2));
        work(&mut engine, old, 0, &["a"]);
        done(&mut engine, old, &[1]);
        work(&mut engine, young, 1, &["b"]);
        done(&mut engine, young, &[2]);
        // The older one wants b (held by the younger): it waits.
        assert_eq!(work(&mut engine, old, 2, &["b"]), vec![Command::ArmLockWait { txid: old, after: WAIT }]);
        // The younger one wants a (held by the older): it dies, and its death lets the older go on.
        let commands = work(&mut engine, young, 3, &["a"]);
        assert_eq!(
            commands,
            vec![
                Command::LogAbort { txid: young, prepared: false },
                granted(2, &[1], false),
                Command::WorkRefused {
                    work: 3,
                    code: Reason::LockConflict,
                    reason: format!("lock conflict on key \"a\" (held by {old})"),
                    aborted: true
                },
            ]
        );
        assert_eq!(engine.locks(), [("a".to_string(), old), ("b".to_string(), old)].into_iter().collect());
        assert_eq!(engine.outcome(young), Some(Outcome::Aborted));
        assert!(matches!(
            commit(&mut engine, young, false).as_slice(),
            [Command::Vote { vote: Vote::No { .. }, .. }]
        ));
        assert_eq!(engine.lock_stats(), LockStats { waits: 1, wait_timeouts: 0, conflicts: 1 });
    }

    #[test]
    fn a_younger_work_waiter_dies_when_older_work_queues_for_the_same_key() {
        let mut engine = engine();
        let (older, holder, young) = (tx(1), tx(3), tx(2));
        work(&mut engine, holder, 0, &["k"]);
        done(&mut engine, holder, &[]);
        // young (2) is older than the holder (3): it waits.
        work(&mut engine, young, 1, &["y"]);
        done(&mut engine, young, &[]);
        assert_eq!(
            work(&mut engine, young, 2, &["k"]),
            vec![Command::ArmLockWait { txid: young, after: WAIT }]
        );
        // older (1) queues for k too and goes first: young would wait for it, so young dies.
        let commands = work(&mut engine, older, 3, &["k"]);
        assert_eq!(commands[0], Command::ArmLockWait { txid: older, after: WAIT });
        assert!(commands.contains(&Command::LogAbort { txid: young, prepared: false }), "{commands:?}");
        assert!(commands.iter().any(|c| matches!(c, Command::WorkRefused { work: 2, aborted: true, .. })));
        assert_eq!(engine.waiting(), vec![older]);
        assert!(!engine.locks().contains_key("y"), "the dead branch's locks are released");
    }

    #[test]
    fn a_one_shot_prepare_never_waits_for_interactive_work() {
        let mut engine = engine();
        let (old, young) = (tx(1), tx(2));
        work(&mut engine, old, 0, &["a"]);
        assert!(matches!(
            prepare(&mut engine, young, &["a"], false).as_slice(),
            [Command::Vote { vote: Vote::No { .. }, .. }]
        ));
    }

    #[test]
    fn interactive_work_may_wait_for_a_preparing_branch() {
        let mut engine = engine();
        let (old, young) = (tx(1), tx(2));
        prepared(&mut engine, old, &["a"]);
        assert_eq!(
            work(&mut engine, young, 0, &["a"]),
            vec![Command::ArmLockWait { txid: young, after: WAIT }]
        );
        let table = engine.lock_table();
        assert_eq!(
            table,
            vec![LockEntry { key: "a".into(), holder: old, state: "prepared", waiters: vec![young] }]
        );
        event(&mut engine, Event::CommitRequested { txid: old });
        let commands = event(&mut engine, Event::CommitLogged { txid: old });
        assert_eq!(commands[0], granted(0, b"", true));
    }

    #[test]
    fn a_prepare_without_work_here_votes_no_and_work_after_an_abort_is_refused() {
        let mut engine = engine();
        let (t1, t2) = (tx(1), tx(2));
        assert!(matches!(
            commit(&mut engine, t1, false).as_slice(),
            [Command::Vote { vote: Vote::No { .. }, .. }]
        ));
        assert!(matches!(
            work(&mut engine, t1, 0, &["a"]).as_slice(),
            [Command::WorkRefused { aborted: true, .. }]
        ));
        work(&mut engine, t2, 1, &["b"]);
        done(&mut engine, t2, &[5]);
        assert_eq!(
            event(&mut engine, Event::AbortRequested { txid: t2 }),
            vec![Command::LogAbort { txid: t2, prepared: false }]
        );
        assert!(engine.locks().is_empty());
        assert_eq!(
            event(&mut engine, Event::AbortLogged { txid: t2 }),
            vec![Command::AckAbort { txid: t2, ack: Ack::Done }]
        );
    }

    #[test]
    fn idle_interactive_branches_are_aborted_but_not_while_their_work_runs() {
        let mut engine = engine();
        let (idle, busy) = (tx(1), tx(2));
        work(&mut engine, idle, 0, &["a"]);
        done(&mut engine, idle, &[1]);
        work(&mut engine, busy, 1, &["b"]);
        let later = Instant::now() + Duration::from_secs(60);
        assert_eq!(
            event(&mut engine, Event::IdleCheck { since: later }),
            vec![Command::LogAbort { txid: idle, prepared: false }]
        );
        assert_eq!(engine.locks().into_keys().collect::<Vec<_>>(), vec!["b".to_string()]);
        assert_eq!(engine.outcome(idle), Some(Outcome::Aborted));
    }

    #[test]
    fn a_one_phase_interactive_commit_validates_in_one_step() {
        let mut engine = engine();
        let t = tx(1);
        work(&mut engine, t, 0, &["a"]);
        done(&mut engine, t, &[4]);
        commit(&mut engine, t, true);
        assert_eq!(
            event(&mut engine, Event::Validated { txid: t, result: Validated::Ready { redo: vec![8] } }),
            vec![Command::LogCommit { txid: t, redo: vec![8], one_phase: true }]
        );
    }
}

mod heuristics {
    use super::*;

    #[test]
    fn an_operator_abort_is_recorded_then_applied_and_a_later_commit_is_acked_and_flagged() {
        let mut engine = Engine::new();
        let t = tx(1);
        prepared(&mut engine, t, &["a"]);
        assert_eq!(
            event(&mut engine, Event::HeuristicRequested { txid: t, commit: false, op: 7 }),
            vec![Command::LogHeuristic { txid: t, commit: false, op: 7 }],
            "recorded before anything is applied"
        );
        assert_eq!(engine.locks().len(), 1, "still locked until the record is durable");
        assert_eq!(
            event(&mut engine, Event::HeuristicLogged { txid: t, commit: false, op: 7 }),
            vec![
                Command::HeuristicAnswer { op: 7, refused: None },
                Command::LogAbort { txid: t, prepared: true }
            ]
        );
        event(&mut engine, Event::AbortLogged { txid: t });
        assert!(engine.locks().is_empty());
        assert_eq!(engine.unsettled_heuristics(), vec![t]);
        assert_eq!(
            event(&mut engine, Event::CommitRequested { txid: t }),
            vec![
                Command::HeuristicOutcome { txid: t, coordinator: Outcome::Committed, contradicted: true },
                Command::AckCommit { txid: t, ack: Ack::Done },
            ],
            "the coordinator cannot undo it: acked, and the contradiction recorded"
        );
        assert!(engine.unsettled_heuristics().is_empty());
    }

    #[test]
    fn an_operator_commit_that_agrees_is_settled_quietly() {
        let mut engine = Engine::new();
        let t = tx(2);
        prepared(&mut engine, t, &["a"]);
        event(&mut engine, Event::HeuristicRequested { txid: t, commit: true, op: 1 });
        let commands = event(&mut engine, Event::HeuristicLogged { txid: t, commit: true, op: 1 });
        assert_eq!(commands[1], Command::LogCommit { txid: t, redo: vec![7], one_phase: false });
        event(&mut engine, Event::CommitLogged { txid: t });
        assert_eq!(
            event(&mut engine, Event::OutcomeLearned { txid: t, outcome: Outcome::Committed }),
            vec![Command::HeuristicOutcome { txid: t, coordinator: Outcome::Committed, contradicted: false }]
        );
    }

    #[test]
    fn a_decision_recorded_by_hand_but_not_applied_before_a_crash_is_applied_at_start() {
        let mut engine = Engine::new();
        let t = tx(5);
        engine.on_event(Event::Recovered { txid: t, keys: keys(&["a"]), redo: vec![1], at: Instant::now() });
        assert_eq!(
            event(&mut engine, Event::RecoveredHeuristic { txid: t, commit: true, settled: false }),
            vec![Command::LogCommit { txid: t, redo: vec![1], one_phase: false }]
        );
        assert_eq!(engine.unsettled_heuristics(), vec![t]);
    }

    #[test]
    fn only_a_branch_in_doubt_can_be_decided_by_hand() {
        let mut engine = Engine::new();
        let (unknown, committed) = (tx(3), tx(4));
        prepared(&mut engine, committed, &["b"]);
        event(&mut engine, Event::CommitRequested { txid: committed });
        for txid in [unknown, committed] {
            let commands = event(&mut engine, Event::HeuristicRequested { txid, commit: false, op: 9 });
            assert!(
                matches!(commands.as_slice(), [Command::HeuristicAnswer { op: 9, refused: Some(_) }]),
                "{commands:?}"
            );
        }
        assert!(engine.unsettled_heuristics().is_empty());
    }
}

/// Decides `txid` by aborting it (a Prepare that voted NO leaves a tombstone the same way).
fn aborted(engine: &mut Engine, txid: TxId) {
    let commands = event(engine, Event::AbortRequested { txid });
    assert_eq!(commands, vec![Command::LogAbort { txid, prepared: false }]);
    event(engine, Event::AbortLogged { txid });
}

#[test]
fn a_message_for_a_forgotten_txid_is_refused_as_stale_never_taken_for_new() {
    let retention = TombstoneRetention { max: 2, max_age: Duration::from_secs(3600) };
    let mut engine = Engine::new().with_tombstones(retention);
    for s in 1..=4 {
        aborted(&mut engine, tx(s));
    }
    age(&mut engine);
    assert_eq!(engine.tombstone_count(), 2);
    let reason = |t: TxId| {
        format!(
            "transaction {t} is older than this participant remembers (decided transactions up to {} are \
             forgotten): a stale message",
            tx(2)
        )
    };
    // A late Prepare of a forgotten abort: NO, and nothing is locked.
    assert_eq!(prepare(&mut engine, tx(1), &["a"], false), vec![no(tx(1), Reason::Stale, &reason(tx(1)))]);
    assert!(engine.locks().is_empty());
    // A late interactive Prepare too, and it leaves no tombstone that could lie later.
    let commands = event(&mut engine, interactive_prepare(tx(2), true, 2));
    assert_eq!(commands, vec![no(tx(2), Reason::Stale, &reason(tx(2)))]);
    // Work for it is refused, the branch aborted.
    let commands = event(
        &mut engine,
        Event::WorkRequested { txid: tx(1), work: 7, keys: keys(&["a"]), at: Instant::now() },
    );
    assert_eq!(
        commands,
        vec![Command::WorkRefused { work: 7, code: Reason::Stale, reason: reason(tx(1)), aborted: true }]
    );
    // An Abort is answered "forgotten": it may have been a one-phase commit, "done" could lie.
    let commands = event(&mut engine, Event::AbortRequested { txid: tx(2) });
    assert_eq!(
        commands,
        vec![Command::AckAbort { txid: tx(2), ack: Ack::Forgotten { reason: reason(tx(2)) } }]
    );
    // A Commit can only be a repeat of one applied here: done.
    let commands = event(&mut engine, Event::CommitRequested { txid: tx(1) });
    assert_eq!(commands, vec![Command::AckCommit { txid: tx(1), ack: Ack::Done }]);
    // Still remembered, and new txids above the horizon, are what they always were.
    assert_eq!(
        prepare(&mut engine, tx(4), &["a"], false),
        vec![no(tx(4), Reason::AlreadyDecided, "transaction already aborted here")]
    );
    assert_eq!(
        prepare(&mut engine, tx(9), &["a"], false),
        vec![Command::Validate { txid: tx(9), payload: vec![9] }]
    );
}

#[test]
fn forgotten_tombstones_are_deleted_up_to_a_horizon_once_per_move_and_age_out() {
    let retention = TombstoneRetention { max: 100, max_age: Duration::from_secs(60) };
    let mut engine = Engine::new().with_tombstones(retention);
    let start = Instant::now();
    for s in 1..=3 {
        aborted(&mut engine, tx(s));
    }
    assert_eq!(event(&mut engine, Event::ForgetOld { now: start }), vec![], "nothing is old yet");
    aborted(&mut engine, tx(4));
    assert_eq!(event(&mut engine, Event::ForgetOld { now: start + Duration::from_secs(30) }), vec![]);
    assert_eq!(
        event(&mut engine, Event::ForgetOld { now: start + Duration::from_secs(61) }),
        vec![Command::ForgetTombstones { horizons: vec![tx(3)], forgotten: 3 }],
        "the three decided before the first tick are a minute old"
    );
    assert_eq!(engine.tombstone_count(), 1);
    assert_eq!(event(&mut engine, Event::ForgetOld { now: start + Duration::from_secs(62) }), vec![]);
}

#[test]
fn a_recovered_horizon_refuses_what_is_below_it() {
    let mut engine = Engine::new();
    event(&mut engine, Event::RecoveredHorizon { horizon: tx(10) });
    let commands = prepare(&mut engine, tx(10), &["a"], false);
    assert!(matches!(&commands[..], [Command::Vote { vote: Vote::No { code: Reason::Stale, .. }, .. }]));
    assert_eq!(
        prepare(&mut engine, tx(11), &["a"], false),
        vec![Command::Validate { txid: tx(11), payload: vec![9] }]
    );
}

/// The lock table under random request sequences: whatever arrives, in
/// whatever order its I/O completes, no cycle of waits ever forms (so no
/// deadlock), and a key has at most one holder.
mod wait_rule {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// A one-shot Prepare of transaction `t` over the keys in `mask`.
        Prepare {
            t: u64,
            mask: u8,
        },
        /// Interactive work of transaction `t` over the keys in `mask`.
        Work {
            t: u64,
            mask: u8,
        },
        Commit {
            t: u64,
        },
        Abort {
            t: u64,
        },
        /// A lock wait runs out.
        Expire {
            t: u64,
        },
        /// The runtime finishes the `n`-th pending step (validation, a write, work).
        Finish {
            n: usize,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        let t = 1..8u64;
        prop_oneof![
            (t.clone(), 1..16u8).prop_map(|(t, mask)| Op::Prepare { t, mask }),
            (t.clone(), 1..16u8).prop_map(|(t, mask)| Op::Work { t, mask }),
            t.clone().prop_map(|t| Op::Commit { t }),
            t.clone().prop_map(|t| Op::Abort { t }),
            t.prop_map(|t| Op::Expire { t }),
            (0..6usize).prop_map(|n| Op::Finish { n }),
            (0..6usize).prop_map(|n| Op::Finish { n }),
        ]
    }

    fn keys_of(mask: u8) -> Vec<String> {
        (0..4).filter(|i| mask & (1 << i) != 0).map(|i| format!("k{i}")).collect()
    }

    /// Edges "waits for": each waiter to each holder of a key it wants, and to
    /// each older waiter queued for one of them (it may not overtake it).
    fn has_cycle(table: &[LockEntry]) -> Option<Vec<TxId>> {
        let mut edges: BTreeMap<TxId, BTreeSet<TxId>> = BTreeMap::new();
        for entry in table {
            for (i, waiter) in entry.waiters.iter().enumerate() {
                let out = edges.entry(*waiter).or_default();
                if *waiter != entry.holder {
                    out.insert(entry.holder);
                }
                out.extend(entry.waiters[..i].iter().copied());
            }
        }
        fn visit(
            node: TxId,
            edges: &BTreeMap<TxId, BTreeSet<TxId>>,
            path: &mut Vec<TxId>,
            done: &mut BTreeSet<TxId>,
        ) -> Option<Vec<TxId>> {
            if let Some(at) = path.iter().position(|n| *n == node) {
                return Some(path[at..].to_vec());
            }
            if !done.insert(node) {
                return None;
            }
            path.push(node);
            for next in edges.get(&node).into_iter().flatten() {
                if let Some(cycle) = visit(*next, edges, path, done) {
                    return Some(cycle);
                }
            }
            path.pop();
            None
        }
        let mut done = BTreeSet::new();
        edges.keys().find_map(|start| visit(*start, &edges, &mut Vec::new(), &mut done))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        #[test]
        fn no_cycle_of_waits_ever_forms(ops in proptest::collection::vec(op(), 1..60)) {
            let mut engine = Engine::with_waits(Duration::from_millis(100), Duration::ZERO);
            let mut pending: Vec<Event> = Vec::new();
            let mut next_work = 0u64;
            let now = Instant::now();
            for op in ops {
                match op {
                    Op::Prepare { t, mask } => engine.on_event(Event::PrepareRequested {
                        txid: tx(t),
                        keys: keys_of(mask),
                        payload: vec![],
                        one_phase: false,
                        incarnation: 2,
                        interactive: false,
                    }),
                    Op::Work { t, mask } => {
                        next_work += 1;
                        engine.on_event(Event::WorkRequested { txid: tx(t), work: next_work, keys: keys_of(mask), at: now });
                    }
                    Op::Commit { t } => engine.on_event(Event::CommitRequested { txid: tx(t) }),
                    Op::Abort { t } => engine.on_event(Event::AbortRequested { txid: tx(t) }),
                    Op::Expire { t } => {
                        if engine.waiting().contains(&tx(t)) {
                            engine.on_event(Event::LockWaitExpired { txid: tx(t) });
                        }
                    }
                    Op::Finish { n } => {
                        if !pending.is_empty() {
                            let event = pending.remove(n % pending.len());
                            engine.on_event(event);
                        }
                    }
                }
                // What the runtime would feed back, completed later in any order.
                for command in engine.take_commands() {
                    match command {
                        Command::Validate { txid, .. } => {
                            pending.push(Event::Validated { txid, result: Validated::Ready { redo: vec![1] } })
                        }
                        Command::LogPrepared { txid, .. } => pending.push(Event::PreparedLogged { txid, at: now }),
                        Command::LogCommit { txid, .. } => pending.push(Event::CommitLogged { txid }),
                        Command::LogAbort { txid, .. } => pending.push(Event::AbortLogged { txid }),
                        Command::WorkGranted { .. } => {}
                        _ => {}
                    }
                }
                let table = engine.lock_table();
                prop_assert!(has_cycle(&table).is_none(), "a cycle of waits: {:?} in {table:?}", has_cycle(&table));
                let mut keys: Vec<&str> = table.iter().map(|e| e.key.as_str()).collect();
                let all = keys.len();
                keys.dedup();
                prop_assert_eq!(keys.len(), all, "a key with two holders");
            }
        }
    }
}
