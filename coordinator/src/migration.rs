//! The migration's decisions, free of I/O: which ring changes are safe
//! ([`plan`]), where a batch ends, what each member is sent, and how the
//! ring record moves after a batch, at start and at the end. The runtime's
//! migration task (`membership`) and the simulator drive the same functions.
//! See docs/elasticity.md.

use std::collections::BTreeMap;

use decree_proto::ring::{Cursor, Move, Ring, Routing, MAX_WEIGHT, VNODES};
use decree_proto::{v1, ParticipantName, TxId};

use crate::registry::Role;
use crate::store::RingRecord;

/// A ring change an operator (or a joining member) asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Add { name: ParticipantName, weight: u32 },
    Remove { name: ParticipantName },
    Weight { name: ParticipantName, weight: u32 },
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Add { name, weight: 1 } => write!(f, "add {name}"),
            Change::Add { name, weight } => write!(f, "add {name} (weight {weight})"),
            Change::Remove { name } => write!(f, "remove {name}"),
            Change::Weight { name, weight } => write!(f, "weight {name} {weight}"),
        }
    }
}

/// Why a change was refused; nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Unsafe(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<Refused> for tonic::Status {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Unsafe(why) => tonic::Status::failed_precondition(why),
            Refused::Invalid(why) => tonic::Status::invalid_argument(why),
        }
    }
}

/// One step of a batch: OUT (lock, read and delete what leaves) or IN
/// (write what arrives), under the batch's routing `step` and range start `lo`.
pub fn step(
    direction: v1::migration_step::Direction,
    step: &v1::Routing,
    lo: &str,
    entries: Vec<v1::KeyValue>,
) -> v1::MigrationStep {
    v1::MigrationStep { direction: direction as i32, routing: Some(step.clone()), lo: lo.to_owned(), entries }
}

/// The Kv.Execute that runs `step` as work of the batch `txid`.
pub fn step_request(txid: TxId, step: v1::MigrationStep) -> v1::ExecuteRequest {
    v1::ExecuteRequest { txid: txid.to_string(), ops: Vec::new(), get: Vec::new(), migration: Some(step) }
}

/// Where a batch ends: where the first old owner's next keys end
/// (each `end` a ScanMoving answer), or at the end of the keyspace.
pub fn batch_end(ends: impl IntoIterator<Item = Option<String>>) -> Cursor {
    ends.into_iter().flatten().min().map_or(Cursor::End, Cursor::Key)
}

/// The routing a batch ending at `hi` leads to.
pub fn batch_routing(routing: &Routing, target: &Ring, hi: Cursor) -> Routing {
    Routing {
        epoch: routing.epoch,
        current: routing.current.clone(),
        migration: Some(Move { target: target.clone(), cursor: hi }),
    }
}

/// What the OUT steps answered, by new owner, with the keys and bytes moved.
pub type Arrivals = (BTreeMap<String, Vec<v1::KeyValue>>, u64, u64);

/// The values the old owners gave up, grouped by the member of `target` that takes each.
pub fn arrivals(leaving: impl IntoIterator<Item = v1::KeyValue>, target: &Ring) -> Result<Arrivals, String> {
    let (mut by_owner, mut keys, mut bytes) = (BTreeMap::<String, Vec<v1::KeyValue>>::new(), 0, 0);
    for kv in leaving {
        let owner = target.route(&kv.key).ok_or("the target ring is empty")?.to_owned();
        keys += 1;
        bytes += kv.value.as_ref().map_or(0, Vec::len) as u64;
        by_owner.entry(owner).or_default().push(kv);
    }
    Ok((by_owner, keys, bytes))
}

/// The record once batch `record.batch` committed, having moved `keys` and
/// `bytes`: the routing is `step` (its cursor at the batch's end), and the progress counts it.
pub fn batch_committed(record: &mut RingRecord, step: &Routing, keys: u64, bytes: u64) {
    record.batch.clear();
    record.batch_routing = None;
    record.routing = Some(step.to_wire());
    if let Some(m) = record.migration.as_mut() {
        m.moved_keys += keys;
        m.moved_bytes += bytes;
        m.batches += 1;
        m.remaining_keys = m.remaining_keys.saturating_sub(keys);
        m.last_error.clear();
    }
}

/// At start: a batch whose COMMIT is in the log (`committed`) but whose
/// cursor was not recorded takes effect in the record, since its members
/// already route by it. True if the record changed.
pub fn settle_at_start(record: &mut RingRecord, committed: bool) -> bool {
    if record.batch.parse::<TxId>().is_err() || !committed {
        return false;
    }
    if let Some(routing) = record.batch_routing.take() {
        record.routing = Some(routing);
        if let Some(m) = record.migration.as_mut() {
            m.batches += 1;
        }
    }
    record.batch.clear();
    true
}

/// Every key has moved: the record with the target as the ring, and the
/// migration that ended (stamped `now_ms`). `None` if nothing was migrating.
pub fn finished(record: &mut RingRecord, now_ms: u64) -> Option<(Routing, Option<v1::Migration>)> {
    let routing = record.routing.as_ref().map(Routing::from_wire)?;
    let Move { target, .. } = routing.migration?;
    let settled = Routing { epoch: routing.epoch, current: target, migration: None };
    record.routing = Some(settled.to_wire());
    let done = record.migration.take().map(|m| v1::Migration { finished_unix_ms: now_ms, ..m });
    record.last = done.clone();
    Some((settled, done))
}

/// Every member of either ring, in name order: the members a batch involves.
pub fn members(routing: &Routing) -> Vec<String> {
    let mut names: Vec<String> =
        routing.current.names().iter().chain(routing.settled().names()).cloned().collect();
    names.sort();
    names.dedup();
    names
}

/// The routing after `change`, or why it is not safe. `status` tells each
/// participant's role and liveness (`None`: not enrolled).
pub fn plan(
    routing: &Routing,
    change: &Change,
    status: impl Fn(&ParticipantName) -> Option<(Role, bool)>,
) -> Result<Routing, Refused> {
    if let Some(Move { target, .. }) = &routing.migration {
        return Err(Refused::Unsafe(format!(
            "a migration is in progress (to {}): wait until `decree ring` shows it done",
            target.names().join(", ")
        )));
    }
    let ring = &routing.current;
    let weight_ok = |weight: u32| {
        if (1..=MAX_WEIGHT).contains(&weight) {
            Ok(weight)
        } else {
            Err(Refused::Invalid(format!("weight {weight}: must be between 1 and {MAX_WEIGHT}")))
        }
    };
    let must_be_up = |name: &ParticipantName| match status(name) {
        None => Err(Refused::Unsafe(format!("{name} is not enrolled with this coordinator"))),
        Some((Role::Service, _)) => {
            Err(Refused::Unsafe(format!("{name} is a service: it takes branches by name, never ring keys")))
        }
        Some((Role::Member, false)) => {
            Err(Refused::Unsafe(format!("{name} is down: keys can only move between members that are up")))
        }
        Some((Role::Member, true)) => Ok(()),
    };
    let mut members: Vec<(String, u32)> = ring.members().map(|(n, w)| (n.to_owned(), w)).collect();
    match change {
        Change::Add { name, weight } => {
            let weight = weight_ok((*weight).max(1))?;
            if ring.contains(name.as_str()) {
                return Err(Refused::Unsafe(format!("{name} is in the ring already")));
            }
            must_be_up(name)?;
            members.push((name.to_string(), weight));
        }
        Change::Remove { name } => {
            if !ring.contains(name.as_str()) {
                return Err(Refused::Unsafe(format!("{name} is not in the ring")));
            }
            if ring.names().len() == 1 {
                return Err(Refused::Unsafe(format!(
                    "{name} is the last member: its keys would have nowhere to go"
                )));
            }
            members.retain(|(n, _)| n != name.as_str());
        }
        Change::Weight { name, weight } => {
            let weight = weight_ok(*weight)?;
            match ring.weight(name.as_str()) {
                None => return Err(Refused::Unsafe(format!("{name} is not in the ring"))),
                Some(w) if w == weight => {
                    return Err(Refused::Unsafe(format!("{name} has weight {weight} already")))
                }
                Some(_) => {}
            }
            for (n, w) in members.iter_mut() {
                if n == name.as_str() {
                    *w = weight;
                }
            }
        }
    }
    // Every member of the ring now takes part in every batch.
    for member in ring.names() {
        let name: ParticipantName =
            member.parse().map_err(|e: decree_proto::InvalidInput| Refused::Invalid(e.to_string()))?;
        must_be_up(&name)?;
    }
    let vnodes = if ring.is_empty() { VNODES } else { ring.vnodes() };
    let target = Ring::weighted(members, vnodes);
    Ok(Routing {
        epoch: routing.epoch + 1,
        current: ring.clone(),
        migration: Some(Move { target, cursor: Cursor::Key(String::new()) }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use decree_proto::ring::LEGACY_VNODES;

    fn name(n: &str) -> ParticipantName {
        n.parse().unwrap()
    }

    fn settled(names: &[&str]) -> Routing {
        Routing { epoch: 3, current: Ring::new(names.iter().copied()), migration: None }
    }

    fn up(n: &ParticipantName) -> Option<(Role, bool)> {
        match n.as_str() {
            "svc" => Some((Role::Service, true)),
            "gone" => Some((Role::Member, false)),
            "stranger" => None,
            _ => Some((Role::Member, true)),
        }
    }

    #[test]
    fn an_add_bumps_the_epoch_and_targets_the_larger_ring() {
        let next = plan(&settled(&["p1", "p2"]), &Change::Add { name: name("p3"), weight: 2 }, up).unwrap();
        assert_eq!(next.epoch, 4);
        let m = next.migration.unwrap();
        assert_eq!(m.target.names(), ["p1", "p2", "p3"]);
        assert_eq!(m.target.weight("p3"), Some(2));
        assert_eq!(m.cursor, Cursor::Key(String::new()));
    }

    #[test]
    fn unsafe_changes_are_refused_with_the_reason() {
        let ring = settled(&["p1", "p2"]);
        let refused = |change: Change, routing: &Routing| plan(routing, &change, up).unwrap_err().to_string();
        assert!(refused(Change::Remove { name: name("p9") }, &ring).contains("not in the ring"));
        assert!(refused(Change::Remove { name: name("p1") }, &settled(&["p1"])).contains("last member"));
        assert!(refused(Change::Add { name: name("svc"), weight: 1 }, &ring).contains("is a service"));
        assert!(refused(Change::Add { name: name("gone"), weight: 1 }, &ring).contains("is down"));
        assert!(refused(Change::Add { name: name("stranger"), weight: 1 }, &ring).contains("not enrolled"));
        assert!(refused(Change::Add { name: name("p1"), weight: 1 }, &ring).contains("already"));
        assert!(refused(Change::Weight { name: name("p1"), weight: 1 }, &ring).contains("already"));
        assert!(refused(Change::Weight { name: name("p1"), weight: 65 }, &ring).contains("between 1 and 64"));
        assert!(
            refused(Change::Add { name: name("p3"), weight: 1 }, &settled(&["p1", "gone"])).contains("down")
        );
        let moving = plan(&ring, &Change::Add { name: name("p3"), weight: 1 }, up).unwrap();
        assert!(refused(Change::Remove { name: name("p2") }, &moving).contains("in progress"));
    }

    #[test]
    fn a_batch_ends_at_the_first_old_owner_s_end_and_moves_the_record_with_it() {
        assert_eq!(
            batch_end([Some("k5\0".to_owned()), None, Some("k2\0".to_owned())]),
            Cursor::Key("k2\0".into())
        );
        assert_eq!(batch_end([None, None]), Cursor::End, "nothing left anywhere: the last batch");
        let routing =
            plan(&settled(&["p1", "p2"]), &Change::Add { name: name("p3"), weight: 1 }, up).unwrap();
        let target = routing.migration.clone().unwrap().target;
        let step = batch_routing(&routing, &target, Cursor::Key("m".into()));
        let mut record = RingRecord {
            routing: Some(routing.to_wire()),
            migration: Some(v1::Migration { remaining_keys: 10, ..v1::Migration::default() }),
            batch: "00000001-1-1".into(),
            batch_routing: Some(step.to_wire()),
            ..RingRecord::default()
        };
        // Committed before a crash, its cursor not recorded: start takes the batch's routing.
        let mut crashed = record.clone();
        assert!(settle_at_start(&mut crashed, true));
        assert_eq!(crashed.routing, Some(step.to_wire()));
        assert!(crashed.batch.is_empty() && crashed.batch_routing.is_none());
        let mut undecided = record.clone();
        assert!(!settle_at_start(&mut undecided, false), "not committed: left for the abort");
        assert_eq!(undecided, record);
        batch_committed(&mut record, &step, 4, 40);
        let m = record.migration.clone().unwrap();
        assert_eq!((m.moved_keys, m.moved_bytes, m.batches, m.remaining_keys), (4, 40, 1, 6));
        assert_eq!(record.routing, Some(step.to_wire()));
        let (ring, done) = finished(&mut record, 7).unwrap();
        assert_eq!(ring.current.names(), ["p1", "p2", "p3"]);
        assert!(ring.migration.is_none());
        assert_eq!(done.unwrap().finished_unix_ms, 7);
        assert!(record.migration.is_none() && record.last.is_some());
        assert!(finished(&mut record, 8).is_none(), "nothing migrating any more");
    }

    #[test]
    fn what_leaves_goes_to_its_owner_in_the_target_ring() {
        let target = Ring::new(["p1", "p2", "p3"]);
        let kv = |key: &str, value: &[u8]| v1::KeyValue { key: key.into(), value: Some(value.to_vec()) };
        let leaving = vec![kv("a", b"12"), kv("b", b"3"), kv("c", b"")];
        let (by_owner, keys, bytes) = arrivals(leaving.clone(), &target).unwrap();
        assert_eq!((keys, bytes), (3, 3));
        for kv in &leaving {
            let owner = target.route(&kv.key).unwrap();
            assert!(by_owner[owner].contains(kv), "{} goes to {owner}", kv.key);
        }
        assert!(arrivals(leaving, &Ring::new(Vec::<String>::new())).is_err(), "an empty target is refused");
    }

    #[test]
    fn a_legacy_ring_keeps_its_points_so_only_the_new_members_keys_move() {
        let legacy = Routing {
            epoch: 1,
            current: Ring::weighted([("p1".into(), 1), ("p2".into(), 1)], LEGACY_VNODES),
            migration: None,
        };
        let next = plan(&legacy, &Change::Add { name: name("p3"), weight: 1 }, up).unwrap();
        assert_eq!(next.migration.unwrap().target.vnodes(), LEGACY_VNODES);
        let fresh = plan(&settled(&[]), &Change::Add { name: name("p1"), weight: 1 }, up).unwrap();
        assert_eq!(fresh.migration.unwrap().target.vnodes(), VNODES);
    }
}
