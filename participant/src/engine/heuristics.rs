//! Heuristic decisions: an operator decides a branch in doubt by hand, the
//! decision is recorded before it is applied, and the coordinator's outcome,
//! once learned, is compared with it (a contradiction is recorded, never undone).

use decree_proto::TxId;

use super::{Branch, Command, Engine, Outcome};

impl Engine {
    /// Heuristically decided txids whose coordinator outcome is not known yet.
    pub fn unsettled_heuristics(&self) -> Vec<TxId> {
        let mut out: Vec<TxId> =
            self.heuristics.iter().filter(|(_, (_, settled))| !settled).map(|(t, _)| *t).collect();
        out.sort();
        out
    }

    /// Compares the coordinator's outcome with a heuristic decision of `txid`,
    /// once. Returns true if there was one (the caller then acks without
    /// refusing: the coordinator cannot undo it, the operator must).
    pub(super) fn settle_heuristic(&mut self, txid: TxId, coordinator: Outcome) -> bool {
        let Some((commit, settled)) = self.heuristics.get_mut(&txid) else { return false };
        if !*settled {
            *settled = true;
            let contradicted = *commit != (coordinator == Outcome::Committed);
            self.commands.push(Command::HeuristicOutcome { txid, coordinator, contradicted });
        }
        true
    }

    pub(super) fn on_heuristic(&mut self, txid: TxId, commit: bool, op: u64) {
        let refused = match self.branches.get(&txid) {
            Some(Branch::Prepared { .. }) if !self.heuristics.contains_key(&txid) => None,
            Some(Branch::Prepared { .. }) => {
                Some(format!("transaction {txid} is being decided by hand already"))
            }
            Some(_) => Some(format!("transaction {txid} is not in doubt here: it is being decided")),
            None => Some(match self.tombstones.get(&txid) {
                Some(Outcome::Committed) => format!("transaction {txid} is committed here already"),
                Some(Outcome::Aborted) => format!("transaction {txid} is aborted here already"),
                None => format!("transaction {txid} is not in doubt here"),
            }),
        };
        match refused {
            None => {
                // Recorded before it is applied: the record is the audit trail.
                self.heuristics.insert(txid, (commit, false));
                self.commands.push(Command::LogHeuristic { txid, commit, op });
            }
            Some(reason) => self.commands.push(Command::HeuristicAnswer { op, refused: Some(reason) }),
        }
    }
}
