use super::*;

const TIMEOUT: Duration = Duration::from_millis(500);

fn tx(seq: u64) -> TxId {
    TxId::new(0xabcd, 1, seq)
}

fn p(name: &str) -> ParticipantName {
    name.parse().unwrap()
}

fn engine_preparing(txid: TxId, names: &[&str]) -> Engine {
    let mut engine = Engine::new();
    let branches = names.iter().map(|n| (p(n), n.as_bytes().to_vec())).collect();
    engine.on_event(Event::Transact { txid, branches, timeout: TIMEOUT }).unwrap();
    engine.take_commands();
    engine
}

fn vote(engine: &mut Engine, txid: TxId, name: &str, vote: VoteResult) -> Vec<Command> {
    engine.on_event(Event::Voted { txid, participant: p(name), vote }).unwrap();
    engine.take_commands()
}

fn aborted(txid: TxId, code: Reason, reason: &str) -> Command {
    Command::Reply { txid, decided: Decided::Aborted { code, reason: reason.into() } }
}

fn committing(t: TxId, names: &[&str]) -> Engine {
    let mut engine = engine_preparing(t, names);
    for name in names {
        vote(&mut engine, t, name, VoteResult::Yes);
    }
    engine.on_event(Event::DecisionLogged { txid: t }).unwrap();
    engine.take_commands();
    engine
}

#[test]
fn transact_sends_prepare_to_every_branch_and_arms_the_deadline() {
    let mut engine = Engine::new();
    let t = tx(1);
    let branches = vec![(p("a"), b"pa".to_vec()), (p("b"), b"pb".to_vec())];
    engine.on_event(Event::Transact { txid: t, branches, timeout: TIMEOUT }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![
            Command::SendPrepare {
                txid: t,
                participant: p("a"),
                payload: b"pa".to_vec(),
                one_phase: false,
                interactive: false
            },
            Command::SendPrepare {
                txid: t,
                participant: p("b"),
                payload: b"pb".to_vec(),
                one_phase: false,
                interactive: false
            },
            Command::ArmTimer { txid: t, kind: TimerKind::Prepare, after: TIMEOUT },
        ]
    );
    assert_eq!(engine.known(t), Some(Known::Pending));
}

#[test]
fn all_yes_logs_the_decision_and_sends_nothing_before_it_is_durable() {
    let t = tx(1);
    let mut engine = engine_preparing(t, &["a", "b"]);
    assert_eq!(vote(&mut engine, t, "a", VoteResult::Yes), vec![]);
    assert_eq!(
        vote(&mut engine, t, "b", VoteResult::Yes),
        vec![Command::LogDecision { txid: t, participants: vec![p("a"), p("b")] }]
    );
    assert_eq!(engine.known(t), Some(Known::Pending), "not committed until the decision is durable");

    engine.on_event(Event::DecisionLogged { txid: t }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![
            Command::SendCommit { txid: t, participant: p("a"), recovery: false },
            Command::SendCommit { txid: t, participant: p("b"), recovery: false },
            Command::Reply { txid: t, decided: Decided::Committed },
        ]
    );
    assert_eq!(engine.known(t), Some(Known::Committing));
}

#[test]
fn end_is_logged_only_after_every_ack() {
    let t = tx(1);
    let mut engine = committing(t, &["a", "b"]);
    engine.on_event(Event::CommitAcked { txid: t, participant: p("a") }).unwrap();
    assert_eq!(engine.take_commands(), vec![]);
    engine.on_event(Event::CommitAcked { txid: t, participant: p("a") }).unwrap();
    assert_eq!(engine.take_commands(), vec![], "a duplicate ack is not b's ack");
    engine.on_event(Event::CommitAcked { txid: t, participant: p("b") }).unwrap();
    assert_eq!(engine.take_commands(), vec![Command::LogEnd { txid: t }]);
    assert_eq!(engine.known(t), None);
    assert_eq!(engine.in_flight(), 0);
}

#[test]
fn one_no_aborts_and_tells_the_yes_voters_and_the_silent() {
    let t = tx(1);
    let mut engine = engine_preparing(t, &["a", "b", "c"]);
    vote(&mut engine, t, "a", VoteResult::Yes);
    let commands = vote(
        &mut engine,
        t,
        "b",
        VoteResult::No { code: Reason::LockConflict, reason: "lock conflict".into() },
    );
    assert_eq!(
        commands,
        vec![
            Command::SendAbort { txid: t, participant: p("a") },
            Command::SendAbort { txid: t, participant: p("c") },
            aborted(t, Reason::LockConflict, "participant b voted NO: lock conflict"),
        ]
    );
    assert_eq!(engine.known(t), None);
    // c's late vote changes nothing but gets an Abort, so it need not wait to ask.
    assert_eq!(
        vote(&mut engine, t, "c", VoteResult::Yes),
        vec![Command::SendAbort { txid: t, participant: p("c") }]
    );
    assert_eq!(
        vote(&mut engine, t, "c", VoteResult::No { code: Reason::Unspecified, reason: "x".into() }),
        vec![]
    );
}

#[test]
fn a_failed_prepare_aborts_with_the_error() {
    let t = tx(1);
    let mut engine = engine_preparing(t, &["a", "b"]);
    let commands = vote(&mut engine, t, "a", VoteResult::Failed { error: "unreachable".into() });
    assert_eq!(
        commands,
        vec![
            Command::SendAbort { txid: t, participant: p("a") },
            Command::SendAbort { txid: t, participant: p("b") },
            aborted(t, Reason::ParticipantUnreachable, "participant a failed to prepare: unreachable"),
        ]
    );
}

#[test]
fn the_prepare_deadline_aborts_and_names_the_late() {
    let t = tx(1);
    let mut engine = engine_preparing(t, &["a", "b", "c"]);
    vote(&mut engine, t, "b", VoteResult::Yes);
    engine.on_event(Event::TimerFired { txid: t, kind: TimerKind::Prepare }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![
            Command::SendAbort { txid: t, participant: p("a") },
            Command::SendAbort { txid: t, participant: p("b") },
            Command::SendAbort { txid: t, participant: p("c") },
            aborted(t, Reason::Timeout, "prepare timed out waiting for a, c"),
        ]
    );
}

#[test]
fn a_deadline_after_the_votes_is_stale() {
    let t = tx(1);
    let mut engine = engine_preparing(t, &["a", "b"]);
    vote(&mut engine, t, "a", VoteResult::Yes);
    vote(&mut engine, t, "b", VoteResult::Yes);
    engine.on_event(Event::TimerFired { txid: t, kind: TimerKind::Prepare }).unwrap();
    assert_eq!(engine.take_commands(), vec![]);
    assert_eq!(engine.known(t), Some(Known::Pending));
}

#[test]
fn phase_two_follows_request_order_not_vote_order() {
    let t = tx(1);
    let mut engine = engine_preparing(t, &["a", "b", "c"]);
    vote(&mut engine, t, "c", VoteResult::Yes);
    vote(&mut engine, t, "a", VoteResult::Yes);
    assert_eq!(
        vote(&mut engine, t, "b", VoteResult::Yes),
        vec![Command::LogDecision { txid: t, participants: vec![p("a"), p("b"), p("c")] }]
    );
}

#[test]
fn read_only_voters_leave_phase_two() {
    let t = tx(1);
    let mut engine = engine_preparing(t, &["a", "b"]);
    vote(&mut engine, t, "a", VoteResult::ReadOnly);
    assert_eq!(
        vote(&mut engine, t, "b", VoteResult::Yes),
        vec![Command::LogDecision { txid: t, participants: vec![p("b")] }]
    );
}

#[test]
fn all_read_only_commits_without_a_log_write() {
    let t = tx(1);
    let mut engine = engine_preparing(t, &["a", "b"]);
    vote(&mut engine, t, "a", VoteResult::ReadOnly);
    assert_eq!(
        vote(&mut engine, t, "b", VoteResult::ReadOnly),
        vec![Command::Reply { txid: t, decided: Decided::Committed }]
    );
    assert_eq!(engine.in_flight(), 0);
}

#[test]
fn a_single_participant_commits_in_one_phase_without_a_decision_record() {
    let mut engine = Engine::new();
    let t = tx(1);
    engine
        .on_event(Event::Transact { txid: t, branches: vec![(p("a"), vec![1])], timeout: TIMEOUT })
        .unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![
            Command::SendPrepare {
                txid: t,
                participant: p("a"),
                payload: vec![1],
                one_phase: true,
                interactive: false
            },
            Command::ArmTimer { txid: t, kind: TimerKind::Prepare, after: TIMEOUT },
        ]
    );
    assert_eq!(
        vote(&mut engine, t, "a", VoteResult::Committed),
        vec![
            Command::LogOnePhaseCommit { txid: t, participant: p("a"), in_doubt: false },
            Command::Reply { txid: t, decided: Decided::Committed },
        ]
    );
    assert_eq!(engine.in_flight(), 0);
}

#[test]
fn a_failed_one_phase_prepare_is_not_reported_aborted_before_asking() {
    let t = tx(1);
    let mut engine = engine_preparing(t, &["a"]);
    assert_eq!(
        vote(&mut engine, t, "a", VoteResult::Failed { error: "connection reset".into() }),
        vec![Command::ResolveOnePhase { txid: t, participant: p("a") }],
        "the participant may have committed before the reply was lost"
    );
    assert_eq!(engine.known(t), Some(Known::Pending));

    engine.on_event(Event::OnePhaseResolved { txid: t, found: OnePhaseFound::Committed }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![
            Command::LogOnePhaseCommit { txid: t, participant: p("a"), in_doubt: false },
            Command::Reply { txid: t, decided: Decided::Committed },
        ]
    );
    assert_eq!(engine.in_flight(), 0);
}

#[test]
fn a_one_phase_timeout_asks_and_an_acked_abort_means_aborted() {
    let t = tx(1);
    let mut engine = engine_preparing(t, &["a"]);
    engine.on_event(Event::TimerFired { txid: t, kind: TimerKind::Prepare }).unwrap();
    assert_eq!(engine.take_commands(), vec![Command::ResolveOnePhase { txid: t, participant: p("a") }]);
    engine.on_event(Event::OnePhaseResolved { txid: t, found: OnePhaseFound::Aborted }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![aborted(t, Reason::Timeout, "prepare timed out waiting for a; it did not commit")]
    );
    assert_eq!(engine.known(t), None);
}

#[test]
fn an_unreachable_one_phase_participant_is_unknown_to_the_client_once_recorded_and_asked_until_it_answers() {
    let t = tx(1);
    let mut engine = engine_preparing(t, &["a"]);
    vote(&mut engine, t, "a", VoteResult::Failed { error: "unreachable".into() });
    engine.on_event(Event::OnePhaseResolved { txid: t, found: OnePhaseFound::Unreachable }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![
            Command::LogOnePhaseInDoubt { txid: t, participant: p("a") },
            Command::ScheduleRedelivery { txid: t, participant: p("a"), attempt: 1 },
        ],
        "the client hears nothing before the question is durable"
    );
    engine.on_event(Event::OnePhaseInDoubtLogged { txid: t }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![Command::Reply {
            txid: t,
            decided: Decided::Unknown {
                code: Reason::ParticipantUnreachable,
                reason: "participant a failed to answer: unreachable; whether it committed is not known yet"
                    .into()
            }
        }]
    );
    assert_eq!(engine.known(t), Some(Known::Pending), "GetOutcome must not presume abort yet");
    engine.on_event(Event::RedeliveryDue { txid: t, participant: p("a") }).unwrap();
    assert_eq!(engine.take_commands(), vec![Command::ResolveOnePhase { txid: t, participant: p("a") }]);
    engine.on_event(Event::OnePhaseResolved { txid: t, found: OnePhaseFound::Unreachable }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![Command::ScheduleRedelivery { txid: t, participant: p("a"), attempt: 2 }],
        "recorded once, the client answered once"
    );
    engine.on_event(Event::OnePhaseResolved { txid: t, found: OnePhaseFound::Committed }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![Command::LogOnePhaseCommit { txid: t, participant: p("a"), in_doubt: true }]
    );
    assert_eq!(engine.in_flight(), 0);
}

#[test]
fn a_one_phase_outcome_the_participant_forgot_ends_as_forgotten_once_the_client_heard_unknown() {
    let t = tx(1);
    let mut engine = engine_preparing(t, &["a"]);
    vote(&mut engine, t, "a", VoteResult::Failed { error: "unreachable".into() });
    engine.on_event(Event::OnePhaseResolved { txid: t, found: OnePhaseFound::Forgotten }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![
            Command::LogOnePhaseInDoubt { txid: t, participant: p("a") },
            Command::ScheduleRedelivery { txid: t, participant: p("a"), attempt: 1 },
        ],
        "first the question is made durable and the client told unknown, as for no answer"
    );
    engine.on_event(Event::OnePhaseResolved { txid: t, found: OnePhaseFound::Forgotten }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![Command::ScheduleRedelivery { txid: t, participant: p("a"), attempt: 2 }],
        "the client has not heard yet: nothing ends before it does"
    );
    engine.on_event(Event::OnePhaseInDoubtLogged { txid: t }).unwrap();
    assert!(matches!(engine.take_commands()[..], [Command::Reply { decided: Decided::Unknown { .. }, .. }]));
    engine.on_event(Event::OnePhaseResolved { txid: t, found: OnePhaseFound::Forgotten }).unwrap();
    assert_eq!(engine.take_commands(), vec![Command::LogOnePhaseForgotten { txid: t }]);
    assert_eq!(engine.in_flight(), 0, "nothing will ever tell more: it is not asked forever");
    assert_eq!(engine.known(t), None, "GetOutcome reads the log, which answers FORGOTTEN");
}

#[test]
fn an_interactive_one_phase_outcome_the_participant_forgot_ends_as_forgotten_and_its_client_hears() {
    let t = tx(9);
    let mut engine = Engine::new();
    engine.on_event(Event::Begin { txid: t, idle_timeout: TIMEOUT }).unwrap();
    engine.enlist(t, p("a"), 7).unwrap();
    engine.on_event(Event::CommitRequested { txid: t, timeout: TIMEOUT }).unwrap();
    engine.take_commands();
    // The question is durable before the Prepare goes (the client has had the txid since Begin).
    engine.on_event(Event::OnePhaseInDoubtLogged { txid: t }).unwrap();
    engine.take_commands();
    vote(&mut engine, t, "a", VoteResult::Failed { error: "unreachable".into() });
    engine.take_commands();
    engine.on_event(Event::OnePhaseResolved { txid: t, found: OnePhaseFound::Forgotten }).unwrap();
    let commands = engine.take_commands();
    assert_eq!(commands[0], Command::LogOnePhaseForgotten { txid: t });
    assert!(
        matches!(commands[1..], [Command::Reply { decided: Decided::Unknown { .. }, .. }]),
        "{commands:?}"
    );
    assert_eq!(engine.in_flight(), 0, "not asked forever");
}

#[test]
fn a_one_phase_outcome_learned_before_its_record_is_durable_is_the_answer() {
    let t = tx(1);
    let mut engine = engine_preparing(t, &["a"]);
    vote(&mut engine, t, "a", VoteResult::Failed { error: "unreachable".into() });
    engine.on_event(Event::OnePhaseResolved { txid: t, found: OnePhaseFound::Unreachable }).unwrap();
    engine.take_commands();
    engine.on_event(Event::OnePhaseResolved { txid: t, found: OnePhaseFound::Aborted }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![
            Command::LogOnePhaseAborted { txid: t },
            aborted(
                t,
                Reason::ParticipantUnreachable,
                "participant a failed to answer: unreachable; it did not commit"
            ),
        ]
    );
    engine.on_event(Event::OnePhaseInDoubtLogged { txid: t }).unwrap();
    assert_eq!(engine.take_commands(), vec![], "the client has its answer: no \"unknown\" after it");
}

#[test]
fn an_interactive_one_phase_prepare_waits_for_its_record_and_a_restart_asks_again() {
    let t = tx(1);
    let mut engine = Engine::new();
    engine.on_event(Event::Begin { txid: t, idle_timeout: TIMEOUT }).unwrap();
    engine.enlist(t, p("a"), 7).unwrap();
    engine.take_commands();
    engine.on_event(Event::CommitRequested { txid: t, timeout: TIMEOUT }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![Command::ForgetActive { txid: t }, Command::LogOnePhaseInDoubt { txid: t, participant: p("a") }],
        "its client has the txid: a restart must not answer ABORTED for a branch that may commit"
    );
    assert_eq!(engine.known(t), Some(Known::Pending));
    engine.on_event(Event::OnePhaseInDoubtLogged { txid: t }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![
            Command::SendPrepare {
                txid: t,
                participant: p("a"),
                payload: vec![],
                one_phase: true,
                interactive: true
            },
            Command::ArmTimer { txid: t, kind: TimerKind::Prepare, after: TIMEOUT },
        ]
    );
    assert_eq!(
        vote(&mut engine, t, "a", VoteResult::Committed),
        vec![
            Command::LogOnePhaseCommit { txid: t, participant: p("a"), in_doubt: true },
            Command::Reply { txid: t, decided: Decided::Committed },
        ]
    );

    // A restart finds the record: it asks, and GetOutcome says PENDING meanwhile.
    let mut engine = Engine::new();
    engine.on_event(Event::RecoveredOnePhase { txid: t, participant: p("a") }).unwrap();
    assert_eq!(engine.take_commands(), vec![Command::ResolveOnePhase { txid: t, participant: p("a") }]);
    assert_eq!(engine.known(t), Some(Known::Pending));
    engine.on_event(Event::OnePhaseResolved { txid: t, found: OnePhaseFound::Aborted }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![Command::LogOnePhaseAborted { txid: t }],
        "no client waits for it"
    );
}

#[test]
fn a_one_phase_no_aborts_without_phase_two() {
    let t = tx(1);
    let mut engine = engine_preparing(t, &["a"]);
    assert_eq!(
        vote(
            &mut engine,
            t,
            "a",
            VoteResult::No { code: Reason::ValidationFailed, reason: "expect failed".into() }
        ),
        vec![aborted(t, Reason::ValidationFailed, "participant a voted NO: expect failed")]
    );
}

#[test]
fn failed_commits_are_redelivered_with_growing_attempts_until_acked() {
    let t = tx(1);
    let mut engine = committing(t, &["a", "b"]);
    for attempt in 1..=3 {
        engine.on_event(Event::CommitFailed { txid: t, participant: p("b") }).unwrap();
        assert_eq!(
            engine.take_commands(),
            vec![Command::ScheduleRedelivery { txid: t, participant: p("b"), attempt }]
        );
        engine.on_event(Event::RedeliveryDue { txid: t, participant: p("b") }).unwrap();
        assert_eq!(
            engine.take_commands(),
            vec![Command::SendCommit { txid: t, participant: p("b"), recovery: false }]
        );
    }
    engine.on_event(Event::CommitAcked { txid: t, participant: p("b") }).unwrap();
    engine.on_event(Event::RedeliveryDue { txid: t, participant: p("b") }).unwrap();
    assert_eq!(engine.take_commands(), vec![], "no redelivery after the ack");
}

#[test]
fn recovery_redrives_and_enrollment_redelivers_at_once_what_is_owed() {
    let t = tx(1);
    let mut engine = Engine::new();
    engine.on_event(Event::Recovered { txid: t, participants: vec![p("a"), p("b")] }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![
            Command::SendCommit { txid: t, participant: p("a"), recovery: true },
            Command::SendCommit { txid: t, participant: p("b"), recovery: true },
        ]
    );
    assert_eq!(engine.known(t), Some(Known::Committing));
    engine.on_event(Event::CommitAcked { txid: t, participant: p("a") }).unwrap();
    engine.on_event(Event::Enrolled { participant: p("a") }).unwrap();
    assert_eq!(engine.take_commands(), vec![]);
    engine.on_event(Event::Enrolled { participant: p("b") }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![Command::ScheduleRedelivery { txid: t, participant: p("b"), attempt: 0 }],
        "no backoff, only the participant's retry budget"
    );
    engine.on_event(Event::RedeliveryDue { txid: t, participant: p("b") }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![Command::SendCommit { txid: t, participant: p("b"), recovery: true }]
    );
    assert_eq!(engine.unacked(), vec![(t, p("b"))]);
}

#[test]
fn a_refused_commit_stops_redelivery_until_an_operator_retries() {
    let t = tx(1);
    let mut engine = committing(t, &["a", "b"]);
    let reason = "transaction was aborted here".to_owned();
    engine.on_event(Event::CommitAcked { txid: t, participant: p("a") }).unwrap();
    engine.on_event(Event::CommitRefused { txid: t, participant: p("b"), reason: reason.clone() }).unwrap();
    assert_eq!(engine.take_commands(), vec![], "no redelivery is scheduled");
    assert_eq!(engine.stuck(), vec![Stuck { txid: t, participant: p("b"), reason }]);
    assert_eq!(engine.known(t), Some(Known::Committing), "still committed, still owed");

    // Neither a stale redelivery, a transient failure nor a re-enrollment resumes it.
    engine.on_event(Event::RedeliveryDue { txid: t, participant: p("b") }).unwrap();
    engine.on_event(Event::CommitFailed { txid: t, participant: p("b") }).unwrap();
    engine.on_event(Event::Enrolled { participant: p("b") }).unwrap();
    assert_eq!(engine.take_commands(), vec![]);

    assert_eq!(engine.retry(t), vec![p("b")]);
    assert_eq!(
        engine.take_commands(),
        vec![Command::SendCommit { txid: t, participant: p("b"), recovery: false }]
    );
    assert_eq!(engine.stuck(), vec![]);
    engine.on_event(Event::CommitAcked { txid: t, participant: p("b") }).unwrap();
    assert_eq!(engine.take_commands(), vec![Command::LogEnd { txid: t }]);
    assert_eq!(engine.in_flight(), 0);
}

#[test]
fn an_enlist_from_another_run_of_a_participant_is_refused_its_earlier_work_is_lost() {
    let t = tx(8);
    let mut engine = Engine::new();
    engine.on_event(Event::Begin { txid: t, idle_timeout: TIMEOUT }).unwrap();
    assert_eq!(engine.enlist(t, p("a"), 7), Ok(7), "new: recorded before it is answered");
    assert_eq!(
        engine.enlist(t, p("a"), 7),
        Ok(7),
        "a repeated Enlist of the same run is taken, and recorded again: the first record may not have landed"
    );
    assert_eq!(
        engine.enlist(t, p("a"), 9),
        Err(EngineError::WorkLost { txid: t, participant: p("a") }),
        "the participant restarted: the work of its first run is gone"
    );
    assert_eq!(engine.enlist(t, p("b"), 0), Ok(0));
    assert_eq!(engine.enlist(t, p("b"), 0), Ok(0), "a participant that names no run: every Enlist is taken");
    assert_eq!(engine.enlist(t, p("b"), 3), Ok(3), "then naming one: taken, and recorded");
    assert_eq!(engine.enlist(t, p("b"), 0), Ok(3), "a repeat naming none records the run recorded, not none");
    assert!(engine.enlist(t, p("b"), 4).is_err());
}

#[test]
fn an_interactive_transaction_found_at_start_is_active_with_its_enlisted_and_its_idle_deadline() {
    let t = tx(8);
    let mut engine = Engine::new();
    let enlisted: BTreeMap<_, _> = [(p("a"), 7), (p("b"), 3)].into_iter().collect();
    let idle_remaining = Duration::from_millis(1234);
    engine.on_event(Event::RecoveredActive { txid: t, enlisted: enlisted.clone(), idle_remaining }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![Command::ArmTimer { txid: t, kind: TimerKind::Idle, after: idle_remaining }]
    );
    assert_eq!(engine.known(t), Some(Known::Pending), "GetOutcome: not ABORTED, its client may commit");
    assert_eq!(
        engine.on_event(Event::RecoveredActive { txid: t, enlisted, idle_remaining }),
        Err(EngineError::Duplicate(t))
    );
    assert_eq!(engine.enlist(t, p("a"), 7), Ok(7), "the same run, as recorded");
    assert_eq!(engine.enlist(t, p("a"), 8), Err(EngineError::WorkLost { txid: t, participant: p("a") }));
    engine.on_event(Event::CommitRequested { txid: t, timeout: TIMEOUT }).unwrap();
    let commands = engine.take_commands();
    assert_eq!(commands[0], Command::ForgetActive { txid: t }, "{commands:?}");
    let prepared: Vec<_> = commands
        .iter()
        .filter_map(|c| match c {
            Command::SendPrepare { participant, interactive: true, one_phase: false, .. } => {
                Some(participant.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(prepared, vec![p("a"), p("b")], "every recorded branch is prepared: {commands:?}");
}

#[test]
fn an_interactive_transaction_leaving_the_active_state_drops_its_records() {
    for end in ["commit", "abort", "idle"] {
        let t = tx(5);
        let mut engine = Engine::new();
        engine.on_event(Event::Begin { txid: t, idle_timeout: TIMEOUT }).unwrap();
        engine.enlist(t, p("a"), 7).unwrap();
        engine.enlist(t, p("b"), 7).unwrap();
        engine.take_commands();
        match end {
            "commit" => engine.on_event(Event::CommitRequested { txid: t, timeout: TIMEOUT }).unwrap(),
            "abort" => engine.on_event(Event::AbortRequested { txid: t }).unwrap(),
            _ => engine.on_event(Event::TimerFired { txid: t, kind: TimerKind::Idle }).unwrap(),
        }
        let commands = engine.take_commands();
        assert_eq!(
            commands.iter().filter(|c| **c == Command::ForgetActive { txid: t }).count(),
            1,
            "{end}: {commands:?}"
        );
    }
}

#[test]
fn interactive_commit_prepares_the_enlisted_with_empty_payloads() {
    let t = tx(7);
    let mut engine = Engine::new();
    engine.on_event(Event::Begin { txid: t, idle_timeout: TIMEOUT }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![Command::ArmTimer { txid: t, kind: TimerKind::Idle, after: TIMEOUT }]
    );
    engine.enlist(t, p("b"), 7).unwrap();
    engine.enlist(t, p("a"), 7).unwrap();
    engine.enlist(t, p("a"), 7).unwrap();
    engine.on_event(Event::CommitRequested { txid: t, timeout: TIMEOUT }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![
            Command::ForgetActive { txid: t },
            Command::SendPrepare {
                txid: t,
                participant: p("a"),
                payload: vec![],
                one_phase: false,
                interactive: true
            },
            Command::SendPrepare {
                txid: t,
                participant: p("b"),
                payload: vec![],
                one_phase: false,
                interactive: true
            },
            Command::ArmTimer { txid: t, kind: TimerKind::Prepare, after: TIMEOUT },
        ]
    );
    assert_eq!(engine.enlist(t, p("c"), 7), Err(EngineError::NotActive(t)), "too late to enlist");
    engine.on_event(Event::TimerFired { txid: t, kind: TimerKind::Idle }).unwrap();
    assert_eq!(engine.take_commands(), vec![], "the idle timer is stale once preparing");
}

#[test]
fn interactive_idle_timeout_and_client_abort() {
    let mut engine = Engine::new();
    let (t1, t2) = (tx(1), tx(2));
    for t in [t1, t2] {
        engine.on_event(Event::Begin { txid: t, idle_timeout: TIMEOUT }).unwrap();
        engine.enlist(t, p("a"), 7).unwrap();
    }
    engine.take_commands();
    engine.on_event(Event::TimerFired { txid: t1, kind: TimerKind::Idle }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![
            Command::ForgetActive { txid: t1 },
            Command::SendAbort { txid: t1, participant: p("a") },
            aborted(t1, Reason::Timeout, "idle timeout before commit")
        ]
    );
    engine.on_event(Event::AbortRequested { txid: t2 }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![
            Command::ForgetActive { txid: t2 },
            Command::SendAbort { txid: t2, participant: p("a") },
            aborted(t2, Reason::ClientAborted, "aborted by the client")
        ]
    );
    assert_eq!(engine.on_event(Event::AbortRequested { txid: t2 }), Err(EngineError::NotActive(t2)));
    assert_eq!(
        engine.on_event(Event::CommitRequested { txid: t1, timeout: TIMEOUT }),
        Err(EngineError::NotActive(t1))
    );
}

#[test]
fn an_interactive_transaction_with_no_work_commits_trivially() {
    let mut engine = Engine::new();
    let t = tx(3);
    engine.on_event(Event::Begin { txid: t, idle_timeout: TIMEOUT }).unwrap();
    engine.take_commands();
    engine.on_event(Event::CommitRequested { txid: t, timeout: TIMEOUT }).unwrap();
    assert_eq!(
        engine.take_commands(),
        vec![Command::ForgetActive { txid: t }, Command::Reply { txid: t, decided: Decided::Committed }]
    );
}

#[test]
fn duplicate_txids_are_refused() {
    let t = tx(1);
    let mut engine = engine_preparing(t, &["a"]);
    let again = Event::Transact { txid: t, branches: vec![(p("a"), vec![])], timeout: TIMEOUT };
    assert_eq!(engine.on_event(again), Err(EngineError::Duplicate(t)));
    assert_eq!(engine.take_commands(), vec![]);
}

#[test]
fn retry_redelivers_phase_two_to_the_unacked_only() {
    let t = tx(9);
    let mut engine = committing(t, &["a", "b"]);
    engine.on_event(Event::CommitAcked { txid: t, participant: p("a") }).unwrap();
    engine.take_commands();
    assert_eq!(engine.retry(t), vec![p("b")]);
    assert_eq!(
        engine.take_commands(),
        vec![Command::SendCommit { txid: t, participant: p("b"), recovery: false }]
    );
    assert_eq!(engine.retry(tx(10)), Vec::<ParticipantName>::new(), "unknown: nothing to redeliver");
    assert_eq!(engine.take_commands(), vec![]);
}
