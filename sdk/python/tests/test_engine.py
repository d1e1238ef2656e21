"""The participant framework's rules, on a real SQLite database in a
temporary directory, without a coordinator: votes, locks, idempotent phase
two, tombstones and their horizon, heuristics, and what a restart keeps."""

import json
import sqlite3

import pytest

from decree import READ_ONLY, Ready, Refused, Service
from decree.participant import MIN_AGE, Engine, TxId
from decree.v1 import common_pb2 as c


class Counter(Service):
    """Payload: JSON {"key": k, "add": n}; refuses a result below zero."""

    def __init__(self):
        self.commits = []
        self.recovered = None

    def open(self, db):
        db.execute("CREATE TABLE IF NOT EXISTS n (k TEXT PRIMARY KEY, v INTEGER)")

    def keys(self, payload):
        body = json.loads(payload)
        if "key" not in body:
            raise Refused("no key")
        return [body["key"]]

    def prepare(self, db, txid, payload):
        body = json.loads(payload)
        if body.get("add", 0) == 0:
            return READ_ONLY
        row = db.execute("SELECT v FROM n WHERE k = ?", (body["key"],)).fetchone()
        if (row[0] if row else 0) + body["add"] < 0:
            raise Refused("below zero")
        return Ready(redo=payload)

    def commit(self, db, txid, redo):
        body = json.loads(redo)
        db.execute(
            "INSERT INTO n VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = v + ?", (body["key"], body["add"], body["add"])
        )
        self.commits.append(txid)

    def recover(self, db, in_doubt):
        self.recovered = list(in_doubt)


def value(engine, key):
    row = engine.db.execute("SELECT v FROM n WHERE k = ?", (key,)).fetchone()
    return row[0] if row else None


def op(key, add):
    return json.dumps({"key": key, "add": add}).encode()


T1, T2, T3 = "0000abcd-1-1", "0000abcd-1-2", "0000abcd-1-3"


@pytest.fixture
def engine(tmp_path):
    return Engine(Counter(), str(tmp_path), "counter")


def prepare(engine, txid, payload, one_phase=False, incarnation=1):
    return engine.prepare(txid, payload, one_phase, incarnation, False)


def test_txids_are_parsed_strictly():
    assert str(TxId.parse("3f9a12c0-2-17")) == "3f9a12c0-2-17"
    for bad in ["", "3f9a12c0-2", "3F9A12C0-2-17", "3f9a12c0-0-1", "3f9a12c0-01-1", "x-1-1", "3f9a12c0-1-1-1"]:
        with pytest.raises(ValueError):
            TxId.parse(bad)


def test_yes_then_commit_applies_once(engine):
    assert prepare(engine, T1, op("a", 5))[0] == c.VOTE_YES
    assert prepare(engine, T1, op("a", 5))[0] == c.VOTE_YES, "a repeated Prepare votes YES again"
    assert engine.commit(T1)[0] == c.ACK_DONE
    assert engine.commit(T1)[0] == c.ACK_DONE, "a repeated Commit is done, without effect"
    assert value(engine, "a") == 5
    assert engine.service.commits == [T1]
    assert prepare(engine, T1, op("a", 5))[0] == c.VOTE_YES, "a late Prepare of a committed branch repeats YES"
    assert engine.abort(T1)[:2] == (c.ACK_REFUSED, c.REASON_ALREADY_DECIDED)


def test_a_refusal_votes_no_and_leaves_nothing(engine):
    vote, code, reason = prepare(engine, T1, op("a", -1))
    assert (vote, code, reason) == (c.VOTE_NO, c.REASON_VALIDATION_FAILED, "below zero")
    assert engine.locks == {} and engine.prepared == {}
    assert prepare(engine, T2, b'{"nokey": 1}')[:2] == (c.VOTE_NO, c.REASON_VALIDATION_FAILED)
    assert prepare(engine, T3, op("a", 0))[0] == c.VOTE_READ_ONLY
    assert prepare(engine, "0000abcd-1-4", op("a", 0), one_phase=True)[0] == c.VOTE_COMMITTED


def test_a_locked_key_votes_no_at_once(engine):
    assert prepare(engine, T1, op("a", 1))[0] == c.VOTE_YES
    vote, code, reason = prepare(engine, T2, op("a", 1))
    assert (vote, code) == (c.VOTE_NO, c.REASON_LOCK_CONFLICT) and T1 in reason
    assert engine.abort(T1)[0] == c.ACK_DONE
    assert engine.locks == {}
    assert prepare(engine, T2, op("a", 1))[0] == c.VOTE_YES


def test_an_abort_is_remembered(engine):
    assert engine.abort(T1)[0] == c.ACK_DONE, "an Abort of a txid never seen"
    assert prepare(engine, T1, op("a", 1))[:2] == (c.VOTE_NO, c.REASON_ALREADY_DECIDED), "a late Prepare"
    assert engine.commit(T1)[:2] == (c.ACK_REFUSED, c.REASON_ALREADY_DECIDED)


def test_one_phase_commits_in_one_step(engine):
    assert prepare(engine, T1, op("a", 3), one_phase=True)[0] == c.VOTE_COMMITTED
    assert value(engine, "a") == 3 and engine.prepared == {}
    assert engine.abort(T1)[:2] == (c.ACK_REFUSED, c.REASON_ALREADY_DECIDED), "how a coordinator learns it"
    assert prepare(engine, T1, op("a", 3), one_phase=True)[0] == c.VOTE_COMMITTED
    assert value(engine, "a") == 3


def test_a_stale_incarnation_votes_no(engine):
    engine.learn_incarnation(3)
    assert prepare(engine, "0000abcd-2-9", op("a", 1), incarnation=2)[:2] == (c.VOTE_NO, c.REASON_STALE)


def test_a_restart_keeps_prepared_branches_locked_and_decided_ones_remembered(tmp_path):
    first = Engine(Counter(), str(tmp_path), "counter")
    assert prepare(first, T1, op("a", 2))[0] == c.VOTE_YES
    assert prepare(first, T2, op("b", 2))[0] == c.VOTE_YES
    assert first.commit(T2)[0] == c.ACK_DONE
    first.db.close()  # as after kill -9: nothing but what was synced
    service = Counter()
    again = Engine(service, str(tmp_path), "counter")
    assert service.recovered == [(T1, op("a", 2))]
    assert again.locks == {"a": T1}
    assert again.to_ask(in_doubt_after=3600) == [T1], "a recovered branch is asked about at once"
    assert prepare(again, T3, op("a", 1))[1] == c.REASON_LOCK_CONFLICT
    assert again.commit(T2)[0] == c.ACK_DONE and value(again, "b") == 2, "committed once, not again"
    assert again.commit(T1)[0] == c.ACK_DONE and value(again, "a") == 2


def test_tombstones_are_bounded_and_what_they_forgot_is_refused(tmp_path):
    engine = Engine(Counter(), str(tmp_path), "counter", tombstones=2)
    for seq in range(1, 6):
        txid = f"0000abcd-1-{seq}"
        assert prepare(engine, txid, op("a", 1))[0] == c.VOTE_YES
        assert engine.commit(txid)[0] == c.ACK_DONE
    assert engine.prune() == 0, "none is MIN_AGE old yet: a lower leased txid may still start"
    engine.db.execute("UPDATE decree_decided SET at = at - ?", (MIN_AGE + 1,))
    assert engine.prune() == 3
    assert engine.db.execute("SELECT COUNT(*) FROM decree_decided").fetchone()[0] == 2
    vote, code, reason = prepare(engine, "0000abcd-1-2", op("a", 1))
    assert (vote, code) == (c.VOTE_NO, c.REASON_STALE) and "0000abcd-1-3" in reason
    assert engine.abort("0000abcd-1-1")[:2] == (c.ACK_FORGOTTEN, c.REASON_STALE)
    assert prepare(engine, "0000abcd-1-5", op("a", 1))[0] == c.VOTE_YES, "still remembered"
    assert prepare(engine, "0000ffff-1-1", op("b", 1))[0] == c.VOTE_YES, "another coordinator's horizon"
    engine.db.close()
    again = Engine(Counter(), str(tmp_path), "counter", tombstones=2)
    assert prepare(again, "0000abcd-1-3", op("a", 1))[1] == c.REASON_STALE, "the horizon is durable"


def test_a_heuristic_decision_is_recorded_and_compared(engine):
    assert prepare(engine, T1, op("a", 4))[0] == c.VOTE_YES
    with pytest.raises(ValueError):
        engine.resolve(T1, True, " ", "ops")
    with pytest.raises(LookupError):
        engine.resolve(T2, True, "coordinator lost", "ops")
    engine.resolve(T1, True, "coordinator lost", "ops")
    assert value(engine, "a") == 4 and engine.locks == {}
    assert engine.abort(T1)[0] == c.ACK_DONE, "the coordinator is acked regardless"
    (h,) = engine.heuristics()
    assert (h.txid, h.commit, h.operator, h.contradicted) == (T1, True, "ops", True)
    assert h.coordinator_outcome == c.OUTCOME_ABORTED


def test_a_bad_txid_is_refused(engine):
    for call in (lambda: prepare(engine, "nope", op("a", 1)), lambda: engine.commit("nope"), lambda: engine.abort("")):
        with pytest.raises(ValueError):
            call()
    assert engine.prepared == {}
