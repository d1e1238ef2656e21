//! The coordinator's protocol engine: presumed-abort two-phase commit as a
//! state machine, with no I/O.
//!
//! [`Engine::on_event`] takes one [`Event`] (a request, a vote, an ack, a
//! durable write finished, a timer fired) and queues [`Command`]s (send this
//! message, persist that record, answer the client, arm that timer). The
//! runtime executes the commands and feeds their results back as events. The
//! engine never imports tokio, tonic or RocksDB, and it never waits.
//!
//! The rules it enforces (docs/protocol.md has the argument):
//! - a Commit is sent only after [`Event::DecisionLogged`] (I3);
//! - any NO, failed Prepare or timeout aborts, and an abort persists nothing;
//! - the end record is asked for only after every participant acked;
//! - a committed transaction keeps being redelivered until acked.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use decree_proto::{ParticipantName, Reason, TxId};
use foldhash::HashMap;

/// A participant's answer to Prepare, or what happened instead of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoteResult {
    Yes,
    No {
        code: Reason,
        reason: String,
    },
    ReadOnly,
    /// A one-phase Prepare committed.
    Committed,
    /// The Prepare RPC failed (unreachable, error, bad answer).
    Failed {
        error: String,
    },
}

/// The answer a client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decided {
    Committed,
    Aborted {
        code: Reason,
        reason: String,
    },
    /// Not known here yet. One-phase: the participant could not be reached
    /// to learn whether it committed (`code` ParticipantUnreachable); the
    /// coordinator keeps asking, `GetOutcome` says PENDING. Or this replica
    /// stopped leading its group while the transaction was under way
    /// (`code` NotLeader): the next leader's `GetOutcome` answers.
    Unknown {
        code: Reason,
        reason: String,
    },
}

/// What asking a one-phase participant (with an Abort) found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnePhaseFound {
    /// The Abort was acked: the branch did not commit and now never will.
    Aborted,
    /// The Abort was refused: the branch committed.
    Committed,
    /// No answer.
    Unreachable,
    /// The participant no longer remembers the branch: it decided it long
    /// ago (its tombstone is pruned) and can never say whether it committed.
    Forgotten,
}

/// What a timer was armed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimerKind {
    /// An interactive transaction idle before Commit.
    Idle,
    /// Votes not all in by the prepare deadline.
    Prepare,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A one-shot transaction: prepare these branches now.
    Transact { txid: TxId, branches: Vec<(ParticipantName, Vec<u8>)>, timeout: Duration },
    /// An interactive transaction begins; it aborts if not committed within
    /// `idle_timeout`. The runtime makes it durable before the client hears
    /// the txid (as each new enlistment, [`Engine::enlist`]), and found at
    /// start it comes back as [`Event::RecoveredActive`].
    Begin { txid: TxId, idle_timeout: Duration },
    /// The client asks to commit an interactive transaction.
    CommitRequested { txid: TxId, timeout: Duration },
    /// The client asks to abort an interactive transaction.
    AbortRequested { txid: TxId },
    /// A Prepare was answered (or failed).
    Voted { txid: TxId, participant: ParticipantName, vote: VoteResult },
    /// The COMMIT decision record is durable.
    DecisionLogged { txid: TxId },
    /// A participant acked Commit.
    CommitAcked { txid: TxId, participant: ParticipantName },
    /// A Commit RPC failed; it will be redelivered.
    CommitFailed { txid: TxId, participant: ParticipantName },
    /// A Commit was refused for a reason retrying cannot mend (an invalid
    /// request, a branch the participant says it aborted): redelivery stops
    /// and the branch waits for an operator ([`Engine::stuck`], `decree retry`).
    CommitRefused { txid: TxId, participant: ParticipantName, reason: String },
    /// A timer armed by [`Command::ArmTimer`] fired.
    TimerFired { txid: TxId, kind: TimerKind },
    /// A redelivery scheduled by [`Command::ScheduleRedelivery`] is due.
    RedeliveryDue { txid: TxId, participant: ParticipantName },
    /// A participant enrolled (again): redeliver what it owes at once.
    Enrolled { participant: ParticipantName },
    /// Found at start: a COMMIT decision with no end record.
    Recovered { txid: TxId, participants: Vec<ParticipantName> },
    /// The answer to [`Command::ResolveOnePhase`].
    OnePhaseResolved { txid: TxId, found: OnePhaseFound },
    /// The record of a one-phase outcome not known yet is durable
    /// ([`Command::LogOnePhaseInDoubt`]): the client may be told "unknown".
    OnePhaseInDoubtLogged { txid: TxId },
    /// Found at start: a one-phase transaction whose client was told
    /// "unknown" and whose outcome was never learned.
    RecoveredOnePhase { txid: TxId, participant: ParticipantName },
    /// Found at start (a restart, or a group's next leader): an interactive
    /// transaction begun and not committed or aborted, with each participant
    /// enlisted and its run; its idle timeout fires after `idle_remaining`.
    RecoveredActive { txid: TxId, enlisted: BTreeMap<ParticipantName, u64>, idle_remaining: Duration },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    SendPrepare {
        txid: TxId,
        participant: ParticipantName,
        payload: Vec<u8>,
        one_phase: bool,
        /// A branch of an interactive transaction: its work is at the participant.
        interactive: bool,
    },
    /// Write the COMMIT decision with a synced write, then feed back [`Event::DecisionLogged`].
    LogDecision {
        txid: TxId,
        participants: Vec<ParticipantName>,
    },
    /// Note a one-phase commit (not synced: the participant holds the truth),
    /// and, `in_doubt`, drop the record of [`Command::LogOnePhaseInDoubt`]
    /// (synced then: until it goes, a restart asks the participant again).
    LogOnePhaseCommit {
        txid: TxId,
        participant: ParticipantName,
        in_doubt: bool,
    },
    /// A one-phase outcome is unknown and its client is about to be told so
    /// (and may ask `GetOutcome`): record that it is unknown, with a synced
    /// write, then feed back [`Event::OnePhaseInDoubtLogged`]. Without it a
    /// restart would forget the question and answer ABORTED (presumed abort)
    /// for a branch that may have committed.
    LogOnePhaseInDoubt {
        txid: TxId,
        participant: ParticipantName,
    },
    /// The one-phase branch of [`Command::LogOnePhaseInDoubt`] did not commit:
    /// drop its record (synced); from then on no record means ABORTED.
    LogOnePhaseAborted {
        txid: TxId,
    },
    /// The participant of [`Command::LogOnePhaseInDoubt`] forgot the outcome:
    /// replace the question with a record that answers FORGOTTEN (soon
    /// synced; until then a restart asks again and hears the same).
    LogOnePhaseForgotten {
        txid: TxId,
    },
    /// `recovery` is set for redrives of decisions found at start.
    SendCommit {
        txid: TxId,
        participant: ParticipantName,
        recovery: bool,
    },
    SendAbort {
        txid: TxId,
        participant: ParticipantName,
    },
    /// An interactive transaction left the active state (its Commit began,
    /// or it aborted): drop the records of its Begin and Enlists (synced
    /// soon; nothing waits for it).
    ForgetActive {
        txid: TxId,
    },
    /// Every participant acked: write the end record (not synced).
    LogEnd {
        txid: TxId,
    },
    Reply {
        txid: TxId,
        decided: Decided,
    },
    ArmTimer {
        txid: TxId,
        kind: TimerKind,
        after: Duration,
    },
    /// Redeliver Commit (or ask a one-phase participant again) after a
    /// backoff, within the participant's retry budget, then feed back
    /// [`Event::RedeliveryDue`]; `attempt` counts failures so far (0: no
    /// failure, the participant just came back: no backoff, budget only).
    ScheduleRedelivery {
        txid: TxId,
        participant: ParticipantName,
        attempt: u32,
    },
    /// A one-phase Prepare failed: send Abort to learn the outcome, then feed
    /// back [`Event::OnePhaseResolved`].
    ResolveOnePhase {
        txid: TxId,
        participant: ParticipantName,
    },
}

/// A transaction's state. Aborted and ended transactions are not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Txn {
    /// Interactive, before Commit: participants enlist.
    /// Each enlisted participant with the run it enlisted from (0: not said).
    Active { enlisted: BTreeMap<ParticipantName, u64> },
    /// Interactive and one-phase: its client knows the txid from Begin and
    /// may ask `GetOutcome` before any answer, so the question is recorded
    /// ([`Command::LogOnePhaseInDoubt`]) before the Prepare (carrying
    /// `payload`) goes. (A group's leader, whose one-shot clients hear
    /// their txids first too, asks every participant instead about a txid
    /// it holds nothing of: see `Handle::outcome`.)
    Recording { participant: ParticipantName, payload: Vec<u8>, timeout: Duration },
    /// Waiting for votes from `waiting`. `recorded`: one-phase, and its
    /// question is on disk (interactive).
    Preparing {
        order: Vec<ParticipantName>,
        waiting: BTreeSet<ParticipantName>,
        yes: Vec<ParticipantName>,
        recorded: bool,
    },
    /// All voted YES; the decision is being made durable.
    Logging { participants: Vec<ParticipantName> },
    /// Decided COMMIT and durable; `unacked` maps to failed deliveries so far;
    /// `stuck` holds the unacked branches whose Commit was refused for good,
    /// with the reason: not redelivered until an operator asks.
    Committing {
        unacked: BTreeMap<ParticipantName, u32>,
        stuck: BTreeMap<ParticipantName, String>,
        recovered: bool,
    },
    /// One-phase, outcome unknown (the Prepare failed or timed out); asking.
    /// `answered`: the client was told the outcome is unknown; `recorded`:
    /// the question is on disk (or being written: the client is told once it
    /// is); `durable`: it is on disk.
    Resolving {
        participant: ParticipantName,
        code: Reason,
        reason: String,
        attempts: u32,
        answered: bool,
        recorded: bool,
        durable: bool,
    },
}

/// What the coordinator knows of a transaction right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Not decided yet.
    Pending,
    /// Decided COMMIT (durable), phase two under way.
    Committing,
}

/// A transaction in memory, as an operator sees it ([`Engine::in_flight_view`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    pub txid: TxId,
    /// "active" (interactive, before Commit), "preparing", "deciding" (the
    /// decision being made durable), "committing" (phase two) or "resolving"
    /// (a one-phase outcome being asked).
    pub state: &'static str,
    pub participants: Vec<ParticipantName>,
    /// Those it waits for: votes while preparing, acks while committing.
    pub waiting: Vec<ParticipantName>,
}

/// A committed branch whose redelivery stopped: see [`Event::CommitRefused`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stuck {
    pub txid: TxId,
    pub participant: ParticipantName,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("transaction {0} is not active (unknown, already committing, or over)")]
    NotActive(TxId),
    #[error("transaction {0} already exists")]
    Duplicate(TxId),
    #[error(
        "{participant} enlisted in {txid} again from another run: the work its earlier run did is lost (a \
         restart), so the transaction cannot commit with it"
    )]
    WorkLost { txid: TxId, participant: ParticipantName },
}

#[derive(Debug, Default)]
pub struct Engine {
    txns: HashMap<TxId, Txn>,
    commands: Vec<Command>,
}

fn view(txid: TxId, txn: &Txn) -> InFlight {
    let (state, participants, waiting) = match txn {
        Txn::Active { enlisted } => ("active", enlisted.keys().cloned().collect(), Vec::new()),
        Txn::Recording { participant, .. } => {
            ("preparing", vec![participant.clone()], vec![participant.clone()])
        }
        Txn::Preparing { order, waiting, .. } => {
            ("preparing", order.clone(), waiting.iter().cloned().collect())
        }
        Txn::Logging { participants } => ("deciding", participants.clone(), Vec::new()),
        Txn::Committing { unacked, .. } => {
            let owing: Vec<ParticipantName> = unacked.keys().cloned().collect();
            ("committing", owing.clone(), owing)
        }
        Txn::Resolving { participant, .. } => {
            ("resolving", vec![participant.clone()], vec![participant.clone()])
        }
    };
    InFlight { txid, state, participants, waiting }
}

impl Engine {
    pub fn new() -> Self {
        Engine::default()
    }

    /// Commands queued by events so far, oldest first.
    pub fn take_commands(&mut self) -> Vec<Command> {
        std::mem::take(&mut self.commands)
    }

    /// Transactions in memory: undecided or in phase two.
    pub fn in_flight(&self) -> usize {
        self.txns.len()
    }

    /// True when no transaction is deciding or in phase two (interactive ones
    /// not yet committed may remain).
    pub fn settled(&self) -> bool {
        self.txns.values().all(|txn| matches!(txn, Txn::Active { .. }))
    }

    /// What is known of `txid` in memory; `None` means aborted, ended or never seen
    /// (the durable log tells which of committed or aborted).
    pub fn known(&self, txid: TxId) -> Option<Known> {
        self.txns.get(&txid).map(|txn| match txn {
            Txn::Active { .. }
            | Txn::Recording { .. }
            | Txn::Preparing { .. }
            | Txn::Logging { .. }
            | Txn::Resolving { .. } => Known::Pending,
            Txn::Committing { .. } => Known::Committing,
        })
    }

    /// Participants that still owe an ack, per committing transaction.
    pub fn unacked(&self) -> Vec<(TxId, ParticipantName)> {
        let mut out = Vec::new();
        for (txid, txn) in &self.txns {
            if let Txn::Committing { unacked, .. } = txn {
                out.extend(unacked.keys().map(|p| (*txid, p.clone())));
            }
        }
        out.sort();
        out
    }

    /// The participants of `txid` in memory (enlisted, voting or owing acks).
    pub fn participants(&self, txid: TxId) -> Vec<ParticipantName> {
        self.txns.get(&txid).map(|txn| view(txid, txn).participants).unwrap_or_default()
    }

    /// Every transaction in memory, by txid.
    pub fn in_flight_view(&self) -> Vec<InFlight> {
        let mut out: Vec<InFlight> = self.txns.iter().map(|(txid, txn)| view(*txid, txn)).collect();
        out.sort_by_key(|t| t.txid);
        out
    }

    /// Committed branches whose redelivery stopped, waiting for an operator.
    pub fn stuck(&self) -> Vec<Stuck> {
        let mut out = Vec::new();
        for (txid, txn) in &self.txns {
            if let Txn::Committing { stuck, .. } = txn {
                out.extend(stuck.iter().map(|(participant, reason)| Stuck {
                    txid: *txid,
                    participant: participant.clone(),
                    reason: reason.clone(),
                }));
            }
        }
        out.sort_by_key(|s| s.txid);
        out
    }

    /// Adds `participant` to an active interactive transaction.
    /// `participant`, in process run `run` (0: not said), joins `txid`. A
    /// repeated Enlist from the same run is taken; one from another run means
    /// the participant restarted and lost the work of its first: refused
    /// (the participant then aborts its branch, and so the transaction).
    ///
    /// Ok: the run to record for the enlistment, which must be durable
    /// before the participant is answered, so that a restart or the group's
    /// next leader prepares this branch too. A repeated Enlist is recorded
    /// again too: it may come while the first one's record is still being
    /// written (a duplicated message, a retry), and answered at once it let
    /// the participant go on with work that the next leader did not know of
    /// (simulator seed 5157392: one branch of an interactive transaction
    /// committed one-phase, the other never prepared). The record is the same
    /// both times, so whichever lands first makes the enlistment durable.
    pub fn enlist(&mut self, txid: TxId, participant: ParticipantName, run: u64) -> Result<u64, EngineError> {
        match self.txns.get_mut(&txid) {
            Some(Txn::Active { enlisted }) => match enlisted.get(&participant) {
                Some(&before) if before != 0 && run != 0 && before != run => {
                    Err(EngineError::WorkLost { txid, participant })
                }
                Some(&before) if before != 0 || run == 0 => Ok(before),
                _ => {
                    enlisted.insert(participant, run);
                    Ok(run)
                }
            },
            _ => Err(EngineError::NotActive(txid)),
        }
    }

    /// Redelivers phase two of `txid` at once (an operator's `decree retry`),
    /// whatever the backoff: Commit to every participant that has not acked
    /// (stuck ones too: the operator says the cause is mended), or the
    /// one-phase question again. Returns the participants asked; none if the
    /// transaction is not in phase two here (ended, aborted, unknown).
    pub fn retry(&mut self, txid: TxId) -> Vec<ParticipantName> {
        match self.txns.get_mut(&txid) {
            Some(Txn::Committing { unacked, stuck, recovered }) => {
                stuck.clear();
                let recovery = *recovered;
                let participants: Vec<ParticipantName> = unacked.keys().cloned().collect();
                for participant in &participants {
                    self.commands.push(Command::SendCommit {
                        txid,
                        participant: participant.clone(),
                        recovery,
                    });
                }
                participants
            }
            Some(Txn::Resolving { participant, .. }) => {
                let participant = participant.clone();
                self.commands.push(Command::ResolveOnePhase { txid, participant: participant.clone() });
                vec![participant]
            }
            _ => Vec::new(),
        }
    }

    pub fn on_event(&mut self, event: Event) -> Result<(), EngineError> {
        match event {
            Event::Transact { txid, branches, timeout } => {
                if self.txns.contains_key(&txid) {
                    return Err(EngineError::Duplicate(txid));
                }
                self.start_prepare(txid, branches, timeout, false);
            }
            Event::Begin { txid, idle_timeout } => {
                if self.txns.contains_key(&txid) {
                    return Err(EngineError::Duplicate(txid));
                }
                self.txns.insert(txid, Txn::Active { enlisted: BTreeMap::new() });
                self.commands.push(Command::ArmTimer { txid, kind: TimerKind::Idle, after: idle_timeout });
            }
            Event::CommitRequested { txid, timeout } => match self.txns.remove(&txid) {
                Some(Txn::Active { enlisted }) => {
                    self.commands.push(Command::ForgetActive { txid });
                    let branches = enlisted.into_keys().map(|p| (p, Vec::new())).collect();
                    self.start_prepare(txid, branches, timeout, true);
                }
                Some(other) => {
                    self.txns.insert(txid, other);
                    return Err(EngineError::NotActive(txid));
                }
                None => return Err(EngineError::NotActive(txid)),
            },
            Event::AbortRequested { txid } => match self.txns.remove(&txid) {
                Some(Txn::Active { enlisted }) => {
                    self.commands.push(Command::ForgetActive { txid });
                    self.abort(
                        txid,
                        enlisted.into_keys(),
                        Reason::ClientAborted,
                        "aborted by the client".into(),
                    );
                }
                Some(other) => {
                    self.txns.insert(txid, other);
                    return Err(EngineError::NotActive(txid));
                }
                None => return Err(EngineError::NotActive(txid)),
            },
            Event::Voted { txid, participant, vote } => self.on_vote(txid, participant, vote),
            Event::DecisionLogged { txid } => self.on_decision_logged(txid),
            Event::CommitAcked { txid, participant } => self.on_commit_acked(txid, &participant),
            Event::CommitFailed { txid, participant } => {
                if let Some(Txn::Committing { unacked, stuck, .. }) = self.txns.get_mut(&txid) {
                    if let (Some(attempt), false) =
                        (unacked.get_mut(&participant), stuck.contains_key(&participant))
                    {
                        *attempt += 1;
                        let attempt = *attempt;
                        self.commands.push(Command::ScheduleRedelivery { txid, participant, attempt });
                    }
                }
            }
            Event::CommitRefused { txid, participant, reason } => {
                if let Some(Txn::Committing { unacked, stuck, .. }) = self.txns.get_mut(&txid) {
                    if let Some(attempt) = unacked.get_mut(&participant) {
                        *attempt += 1;
                        stuck.insert(participant, reason);
                    }
                }
            }
            Event::RedeliveryDue { txid, participant } => match self.txns.get(&txid) {
                Some(Txn::Committing { unacked, stuck, recovered })
                    if unacked.contains_key(&participant) && !stuck.contains_key(&participant) =>
                {
                    let recovery = *recovered;
                    self.commands.push(Command::SendCommit { txid, participant, recovery });
                }
                Some(Txn::Resolving { .. }) => {
                    self.commands.push(Command::ResolveOnePhase { txid, participant })
                }
                _ => {}
            },
            Event::Enrolled { participant } => {
                // Owed Commits go out without waiting for their backoff, paced
                // by the participant's retry budget; stuck ones wait for an operator.
                // In txid order: the same events always give the same commands.
                let mut owed: Vec<TxId> = self
                    .txns
                    .iter()
                    .filter(|(_, txn)| {
                        matches!(txn, Txn::Committing { unacked, stuck, .. }
                            if unacked.contains_key(&participant) && !stuck.contains_key(&participant))
                    })
                    .map(|(txid, _)| *txid)
                    .collect();
                owed.sort();
                for txid in owed {
                    self.commands.push(Command::ScheduleRedelivery {
                        txid,
                        participant: participant.clone(),
                        attempt: 0,
                    });
                }
            }
            Event::TimerFired { txid, kind } => self.on_timer(txid, kind),
            Event::OnePhaseResolved { txid, found } => self.on_one_phase_resolved(txid, found),
            Event::OnePhaseInDoubtLogged { txid } => match self.txns.get_mut(&txid) {
                Some(Txn::Resolving { reason, answered: answered @ false, durable, .. }) => {
                    (*answered, *durable) = (true, true);
                    let unknown = format!("{reason}; whether it committed is not known yet");
                    self.commands.push(Command::Reply {
                        txid,
                        decided: Decided::Unknown { code: Reason::ParticipantUnreachable, reason: unknown },
                    });
                }
                Some(Txn::Recording { .. }) => {
                    let Some(Txn::Recording { participant, payload, timeout }) = self.txns.remove(&txid)
                    else {
                        unreachable!()
                    };
                    self.send_prepares(txid, vec![(participant, payload)], timeout, true, true);
                }
                _ => {}
            },
            Event::RecoveredOnePhase { txid, participant } => {
                if self.txns.contains_key(&txid) {
                    return Err(EngineError::Duplicate(txid));
                }
                self.commands.push(Command::ResolveOnePhase { txid, participant: participant.clone() });
                let reason = "recovered at start".to_owned();
                let code = Reason::ParticipantUnreachable;
                let txn = Txn::Resolving {
                    participant,
                    code,
                    reason,
                    attempts: 0,
                    answered: true,
                    recorded: true,
                    durable: true,
                };
                self.txns.insert(txid, txn);
            }
            Event::RecoveredActive { txid, enlisted, idle_remaining } => {
                if self.txns.contains_key(&txid) {
                    return Err(EngineError::Duplicate(txid));
                }
                self.txns.insert(txid, Txn::Active { enlisted });
                self.commands.push(Command::ArmTimer { txid, kind: TimerKind::Idle, after: idle_remaining });
            }
            Event::Recovered { txid, participants } => {
                assert!(!participants.is_empty(), "a decision record names its participants");
                if self.txns.contains_key(&txid) {
                    return Err(EngineError::Duplicate(txid));
                }
                for participant in &participants {
                    self.commands.push(Command::SendCommit {
                        txid,
                        participant: participant.clone(),
                        recovery: true,
                    });
                }
                let unacked = participants.into_iter().map(|p| (p, 0)).collect();
                self.txns.insert(txid, Txn::Committing { unacked, stuck: BTreeMap::new(), recovered: true });
            }
        }
        Ok(())
    }

    fn start_prepare(
        &mut self,
        txid: TxId,
        branches: Vec<(ParticipantName, Vec<u8>)>,
        timeout: Duration,
        interactive: bool,
    ) {
        if branches.is_empty() {
            // Nothing enlisted: nothing to prepare, nothing to log.
            self.commands.push(Command::Reply { txid, decided: Decided::Committed });
            return;
        }
        if interactive && branches.len() == 1 {
            let (participant, payload) = branches.into_iter().next().expect("one branch");
            self.commands.push(Command::LogOnePhaseInDoubt { txid, participant: participant.clone() });
            self.txns.insert(txid, Txn::Recording { participant, payload, timeout });
            return;
        }
        self.send_prepares(txid, branches, timeout, interactive, false);
    }

    fn send_prepares(
        &mut self,
        txid: TxId,
        branches: Vec<(ParticipantName, Vec<u8>)>,
        timeout: Duration,
        interactive: bool,
        recorded: bool,
    ) {
        let one_phase = branches.len() == 1;
        let order: Vec<_> = branches.iter().map(|(p, _)| p.clone()).collect();
        let waiting: BTreeSet<_> = order.iter().cloned().collect();
        assert_eq!(waiting.len(), order.len(), "branches name distinct participants");
        for (participant, payload) in branches {
            self.commands.push(Command::SendPrepare { txid, participant, payload, one_phase, interactive });
        }
        self.commands.push(Command::ArmTimer { txid, kind: TimerKind::Prepare, after: timeout });
        self.txns.insert(txid, Txn::Preparing { order, waiting, yes: Vec::new(), recorded });
    }

    fn on_vote(&mut self, txid: TxId, participant: ParticipantName, vote: VoteResult) {
        let Some(Txn::Preparing { order, waiting, yes, recorded }) = self.txns.get_mut(&txid) else {
            if vote == VoteResult::Yes && !self.txns.contains_key(&txid) {
                // A YES that arrived after the transaction aborted: that branch
                // is prepared and would otherwise wait to ask. Tell it now.
                self.commands.push(Command::SendAbort { txid, participant });
            }
            return;
        };
        if !waiting.remove(&participant) {
            return; // a duplicate or a stranger's vote
        }
        // A failed Prepare may still have prepared the branch (the reply was
        // lost): it is told to abort like a YES voter. A NO voter rolled back.
        let recorded = *recorded;
        let reason: Option<(Reason, String)> = match vote {
            VoteResult::Yes => {
                yes.push(participant);
                None
            }
            VoteResult::ReadOnly => None,
            VoteResult::Committed => {
                assert_eq!(order.len(), 1, "only a one-phase Prepare commits");
                self.txns.remove(&txid);
                self.commands.push(Command::LogOnePhaseCommit { txid, participant, in_doubt: recorded });
                self.commands.push(Command::Reply { txid, decided: Decided::Committed });
                return;
            }
            VoteResult::No { code, reason } => {
                Some((code, format!("participant {participant} voted NO: {reason}")))
            }
            VoteResult::Failed { error } if order.len() == 1 => {
                // One-phase: it may have committed before the reply was lost.
                let reason = format!("participant {participant} failed to answer: {error}");
                self.txns.remove(&txid);
                self.resolve_one_phase(txid, participant, Reason::ParticipantUnreachable, reason, recorded);
                return;
            }
            VoteResult::Failed { error } => {
                let reason = format!("participant {participant} failed to prepare: {error}");
                yes.push(participant);
                Some((Reason::ParticipantUnreachable, reason))
            }
        };
        if let Some((code, reason)) = reason {
            let Some(Txn::Preparing { order, waiting, yes, .. }) = self.txns.remove(&txid) else {
                unreachable!()
            };
            if recorded {
                self.commands.push(Command::LogOnePhaseAborted { txid });
            }
            // Abort everyone that may hold a prepared branch: YES voters, failed
            // Prepares, and those not heard from.
            let targets: Vec<_> =
                order.into_iter().filter(|p| waiting.contains(p) || yes.contains(p)).collect();
            self.abort(txid, targets, code, reason);
            return;
        }
        if !waiting.is_empty() {
            return;
        }
        // Phase two goes out in request order, whatever order the votes came in.
        let mut yes = std::mem::take(yes);
        yes.sort_by_key(|p| order.iter().position(|o| o == p));
        if yes.is_empty() {
            // Every participant was read-only: nothing to commit, nothing to log.
            self.txns.remove(&txid);
            self.commands.push(Command::Reply { txid, decided: Decided::Committed });
            return;
        }
        self.commands.push(Command::LogDecision { txid, participants: yes.clone() });
        self.txns.insert(txid, Txn::Logging { participants: yes });
    }

    fn on_decision_logged(&mut self, txid: TxId) {
        let Some(Txn::Logging { participants }) = self.txns.remove(&txid) else {
            panic!("decision logged for {txid}, which was not being logged");
        };
        for participant in &participants {
            self.commands.push(Command::SendCommit {
                txid,
                participant: participant.clone(),
                recovery: false,
            });
        }
        self.commands.push(Command::Reply { txid, decided: Decided::Committed });
        let unacked = participants.into_iter().map(|p| (p, 0)).collect();
        self.txns.insert(txid, Txn::Committing { unacked, stuck: BTreeMap::new(), recovered: false });
    }

    fn on_commit_acked(&mut self, txid: TxId, participant: &ParticipantName) {
        let Some(Txn::Committing { unacked, stuck, .. }) = self.txns.get_mut(&txid) else {
            return; // a duplicate ack after the end
        };
        unacked.remove(participant);
        stuck.remove(participant);
        if unacked.is_empty() {
            self.txns.remove(&txid);
            self.commands.push(Command::LogEnd { txid });
        }
    }

    fn on_timer(&mut self, txid: TxId, kind: TimerKind) {
        match (self.txns.get(&txid), kind) {
            (Some(Txn::Active { .. }), TimerKind::Idle) => {
                let Some(Txn::Active { enlisted }) = self.txns.remove(&txid) else { unreachable!() };
                self.commands.push(Command::ForgetActive { txid });
                self.abort(txid, enlisted.into_keys(), Reason::Timeout, "idle timeout before commit".into());
            }
            (Some(Txn::Preparing { order, recorded, .. }), TimerKind::Prepare) if order.len() == 1 => {
                let (participant, recorded) = (order[0].clone(), *recorded);
                self.txns.remove(&txid);
                let reason = format!("prepare timed out waiting for {participant}");
                self.resolve_one_phase(txid, participant, Reason::Timeout, reason, recorded);
            }
            (Some(Txn::Preparing { .. }), TimerKind::Prepare) => {
                let Some(Txn::Preparing { order, waiting, yes, .. }) = self.txns.remove(&txid) else {
                    unreachable!()
                };
                let late: Vec<_> =
                    order.iter().filter(|p| waiting.contains(*p)).map(|p| p.to_string()).collect();
                let reason = format!("prepare timed out waiting for {}", late.join(", "));
                let targets: Vec<_> =
                    order.into_iter().filter(|p| waiting.contains(p) || yes.contains(p)).collect();
                self.abort(txid, targets, Reason::Timeout, reason);
            }
            // A timer for a state the transaction has left: stale, ignore.
            (Some(Txn::Active { .. }), TimerKind::Prepare)
            | (Some(Txn::Preparing { .. }), TimerKind::Idle)
            | (Some(Txn::Recording { .. }), _)
            | (Some(Txn::Logging { .. }), _)
            | (Some(Txn::Committing { .. }), _)
            | (Some(Txn::Resolving { .. }), _)
            | (None, _) => {}
        }
    }

    /// A one-phase Prepare got no answer: ask the participant with an Abort.
    fn resolve_one_phase(
        &mut self,
        txid: TxId,
        participant: ParticipantName,
        code: Reason,
        reason: String,
        recorded: bool,
    ) {
        self.commands.push(Command::ResolveOnePhase { txid, participant: participant.clone() });
        // Recorded before its Prepare (interactive): the question is durable already.
        let txn = Txn::Resolving {
            participant,
            code,
            reason,
            attempts: 0,
            answered: false,
            recorded,
            durable: recorded,
        };
        self.txns.insert(txid, txn);
    }

    fn on_one_phase_resolved(&mut self, txid: TxId, found: OnePhaseFound) {
        let Some(Txn::Resolving { participant, code, reason, attempts, answered, recorded, durable }) =
            self.txns.remove(&txid)
        else {
            return; // a duplicate answer
        };
        match found {
            OnePhaseFound::Aborted => {
                if recorded {
                    self.commands.push(Command::LogOnePhaseAborted { txid });
                }
                if !answered {
                    let reason = format!("{reason}; it did not commit");
                    self.commands.push(Command::Reply { txid, decided: Decided::Aborted { code, reason } });
                }
            }
            OnePhaseFound::Committed => {
                self.commands.push(Command::LogOnePhaseCommit { txid, participant, in_doubt: recorded });
                if !answered {
                    self.commands.push(Command::Reply { txid, decided: Decided::Committed });
                }
            }
            // Forgotten, and the question is durable: nothing will ever tell
            // more; the outcome is FORGOTTEN from now on (never ABORTED: the
            // branch may have committed), and a client still waiting hears so.
            OnePhaseFound::Forgotten if durable => {
                self.commands.push(Command::LogOnePhaseForgotten { txid });
                if !answered {
                    let reason =
                        format!("{reason}; the participant no longer remembers whether it committed");
                    self.commands.push(Command::Reply {
                        txid,
                        decided: Decided::Unknown { code: Reason::ParticipantUnreachable, reason },
                    });
                }
            }
            // Unreachable, or forgotten before the question is durable: record
            // it (the client hears "unknown" once it is) and ask again.
            OnePhaseFound::Unreachable | OnePhaseFound::Forgotten => {
                if !recorded {
                    // The client hears "unknown" once the question is durable, so
                    // that GetOutcome never answers ABORTED for it after a restart.
                    self.commands
                        .push(Command::LogOnePhaseInDoubt { txid, participant: participant.clone() });
                }
                let attempt = attempts + 1;
                self.commands.push(Command::ScheduleRedelivery {
                    txid,
                    participant: participant.clone(),
                    attempt,
                });
                let txn = Txn::Resolving {
                    participant,
                    code,
                    reason,
                    attempts: attempt,
                    answered,
                    recorded: true,
                    durable,
                };
                self.txns.insert(txid, txn);
            }
        }
    }

    /// Aborts: tells `targets`, answers the client, persists nothing (presumed abort).
    fn abort(
        &mut self,
        txid: TxId,
        targets: impl IntoIterator<Item = ParticipantName>,
        code: Reason,
        reason: String,
    ) {
        debug_assert!(!self.txns.contains_key(&txid));
        for participant in targets {
            self.commands.push(Command::SendAbort { txid, participant });
        }
        self.commands.push(Command::Reply { txid, decided: Decided::Aborted { code, reason } });
    }
}

#[cfg(test)]
mod tests;
