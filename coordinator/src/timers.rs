//! The coordinator actor's timers ([`Command::ArmTimer`]): what it owns is
//! the order in which they fall due; it never touches the engine itself (the
//! actor asks it which transactions it still holds).
//!
//! [`Command::ArmTimer`]: crate::engine::Command::ArmTimer

use std::collections::BTreeMap;

use decree_proto::TxId;
use tokio::time::Instant;

use crate::engine::TimerKind;

/// The engine's timers, in deadline order, kept by the actor rather than as
/// a sleeping task each: every transaction arms a prepare timer, and nearly
/// every one is decided long before it fires, so a task each was a spawn, a
/// timer registration, a wake-up and an event per transaction, all for
/// nothing. The actor sleeps until the earliest deadline; a timer whose
/// transaction the engine no longer holds is dropped unfired (it would fire
/// into nothing: the engine ignores a timer of a txid it does not hold, and a
/// txid it dropped does not come back), the others fire at their deadline as
/// [`Event::TimerFired`](crate::engine::Event::TimerFired), each once, as a task each would have.
#[derive(Default)]
pub(crate) struct Timers {
    due: BTreeMap<(Instant, u64), (TxId, TimerKind)>,
    armed: u64,
}

impl Timers {
    pub fn arm(&mut self, at: Instant, txid: TxId, kind: TimerKind) {
        self.armed += 1;
        self.due.insert((at, self.armed), (txid, kind));
    }

    /// Takes the timers due at `now`, dropping on the way those whose
    /// transaction is not `held` any more; returns them in deadline order.
    pub fn expire(&mut self, now: Instant, held: impl Fn(TxId) -> bool) -> Vec<(TxId, TimerKind)> {
        let mut fired = Vec::new();
        while let Some(entry) = self.due.first_entry() {
            let (at, _) = *entry.key();
            let (txid, _) = *entry.get();
            if !held(txid) {
                entry.remove();
            } else if at <= now {
                fired.push(entry.remove());
            } else {
                break;
            }
        }
        fired
    }

    /// The earliest deadline left.
    pub fn next(&self) -> Option<Instant> {
        self.due.first_key_value().map(|((at, _), _)| *at)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn txid(sequence: u64) -> TxId {
        TxId::new(1, 1, sequence)
    }

    #[test]
    fn timers_fire_once_at_their_deadline_in_deadline_order() {
        let start = Instant::now();
        let mut timers = Timers::default();
        timers.arm(start + Duration::from_millis(20), txid(2), TimerKind::Idle);
        timers.arm(start + Duration::from_millis(10), txid(1), TimerKind::Prepare);
        timers.arm(start + Duration::from_millis(30), txid(3), TimerKind::Prepare);
        assert_eq!(timers.next(), Some(start + Duration::from_millis(10)));
        assert_eq!(timers.expire(start + Duration::from_millis(5), |_| true), vec![]);
        assert_eq!(
            timers.expire(start + Duration::from_millis(20), |_| true),
            vec![(txid(1), TimerKind::Prepare), (txid(2), TimerKind::Idle)]
        );
        assert_eq!(timers.expire(start + Duration::from_millis(20), |_| true), vec![], "each fires once");
        assert_eq!(timers.next(), Some(start + Duration::from_millis(30)));
    }

    #[test]
    fn a_timer_whose_transaction_is_gone_is_dropped_unfired_before_its_deadline() {
        let start = Instant::now();
        let mut timers = Timers::default();
        timers.arm(start + Duration::from_secs(1), txid(1), TimerKind::Prepare);
        timers.arm(start + Duration::from_secs(2), txid(2), TimerKind::Prepare);
        timers.arm(start + Duration::from_secs(3), txid(3), TimerKind::Prepare);
        // 1 and 3 decided; 2 still held: the sleep then waits for 2's deadline, not 1's.
        let held = |t: TxId| t == txid(2);
        assert_eq!(timers.expire(start, held), vec![]);
        assert_eq!(timers.next(), Some(start + Duration::from_secs(2)));
        // 3, behind a held one, is dropped once it reaches the front.
        assert_eq!(timers.expire(start + Duration::from_secs(2), held), vec![(txid(2), TimerKind::Prepare)]);
        assert_eq!(timers.expire(start + Duration::from_secs(2), held), vec![]);
        assert_eq!(timers.next(), None);
    }

    #[test]
    fn two_timers_of_one_transaction_at_one_instant_both_fire() {
        let at = Instant::now();
        let mut timers = Timers::default();
        timers.arm(at, txid(1), TimerKind::Idle);
        timers.arm(at, txid(1), TimerKind::Prepare);
        assert_eq!(
            timers.expire(at, |_| true),
            vec![(txid(1), TimerKind::Idle), (txid(1), TimerKind::Prepare)]
        );
    }
}
