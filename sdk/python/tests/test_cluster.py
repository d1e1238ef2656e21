"""The client against a real cluster, and a service on the participant
framework in a transaction with KV participants."""

import json
import subprocess
import sys
import os
import threading

import grpc
import pytest

import decree
from conftest import EXAMPLES, wait_for


def test_a_transaction_commits_and_its_values_read_back(cluster):
    with decree.connect(cluster.url) as c:
        result = c.transact(put={"greeting": "hello", "other": b"\x00\x01"}, add={"visits": 3})
        assert result.committed, result.reason
        assert result.outcome is decree.Outcome.COMMITTED and result.code == "REASON_UNSPECIFIED"
        assert c.get_many(["greeting", "other", "visits", "absent"]) == {
            "greeting": b"hello",
            "other": b"\x00\x01",
            "visits": b"3",
            "absent": None,
        }
        assert c.status(result.txid) is decree.Outcome.COMMITTED
        assert set(result.participants) <= {"p1", "p2"}


def test_more_keys_than_one_get_carries_are_read_in_several(cluster):
    with decree.connect(cluster.url) as c:
        assert c.transact(put={"many-0": "first", "many-24999": "last"}).committed
        keys = [f"many-{i}" for i in range(25_000)]
        owners = [c.route(k) for k in keys]
        # Some owner gets more than one Get's worth (10,000) of these.
        assert max(owners.count(p) for p in set(owners)) > decree.client.GET_KEYS
        values = c.get_many(keys)
        assert len(values) == len(keys)
        assert values["many-0"] == b"first" and values["many-24999"] == b"last"
        assert sum(v is not None for v in values.values()) == 2


def test_keys_go_where_the_ring_says(cluster):
    with decree.connect(cluster.url) as c:
        keys = [f"k{i}" for i in range(40)]
        assert c.transact(put={k: k for k in keys}).committed
        for key in keys:
            owner = c.route(key)
            stub = c._kv(owner)
            answer = stub.Get(decree.client.kv_pb2.GetRequest(keys=[key], ring_epoch=c.routing.epoch))
            assert [kv.value for kv in answer.values] == [key.encode()], f"{key} is not at {owner}"


def test_a_failed_expect_aborts_and_changes_nothing(cluster):
    with decree.connect(cluster.url) as c:
        assert c.transact(put={"a": "1"}).committed
        result = c.transact(put={"a": "2", "b": "2"}, expect={"a": "0"})
        assert result.outcome is decree.Outcome.ABORTED
        assert result.code == "REASON_VALIDATION_FAILED", result
        assert "voted NO" in result.reason
        assert c.get_many(["a", "b"]) == {"a": b"1", "b": None}
        assert c.status(result.txid) is decree.Outcome.ABORTED


def test_bad_input_is_refused_before_anything_is_sent(cluster):
    with decree.connect(cluster.url) as c:
        with pytest.raises(ValueError):
            c.transact(put={"": "x"})
        with pytest.raises(ValueError):
            c.transact(put={"k" * 1025: "x"})
        with pytest.raises(ValueError):
            c.transact()
        with pytest.raises(decree.RpcError) as err:
            c.status("not-a-txid")
        assert err.value.code.name == "INVALID_ARGUMENT"
    with pytest.raises(decree.DecreeError):
        decree.connect("https://127.0.0.1:1")


def test_an_interactive_transaction_reads_its_own_writes_and_commits(cluster):
    with decree.connect(cluster.url) as c:
        assert c.transact(put={"alice": "100", "bob": "0"}).committed
        with c.begin() as tx:
            balance = tx.get_int("alice")
            tx.add("alice", -30)
            tx.add("bob", 30)
            assert tx.get_int("alice") == balance - 30, "a read sees the transaction's own write"
            tx.put("memo", "rent")
        assert tx.result is not None and tx.result.committed, tx.result
        assert c.get_many(["alice", "bob", "memo"]) == {"alice": b"70", "bob": b"30", "memo": b"rent"}


def test_an_interactive_transaction_outlives_a_coordinator_restart(cluster):
    with decree.connect(cluster.url) as c:
        tx = c.begin()
        tx.put("kept-a", "1")
        tx.put("kept-b", "2")
        cluster.restart_coordinator()
        # The restarted coordinator knows the transaction: more work, then Commit.
        tx.put("kept-c", "3")
        result = tx.commit()
        assert result.committed, result
        assert c.get_many(["kept-a", "kept-b", "kept-c"]) == {"kept-a": b"1", "kept-b": b"2", "kept-c": b"3"}
    assert "an interactive transaction is active again" in cluster.log("coordinator")


def test_an_interactive_transaction_that_raises_is_aborted(cluster):
    with decree.connect(cluster.url) as c:
        assert c.transact(put={"x": "1"}).committed
        with pytest.raises(RuntimeError):
            with c.begin() as tx:
                tx.put("x", "2")
                raise RuntimeError("changed my mind")
        assert tx.result is None
        assert c.status(tx.txid) is decree.Outcome.ABORTED
        assert c.get("x") == b"1"
        assert c.transact(put={"x": "3"}).committed, "the key is unlocked"


def test_an_abort_sent_while_the_coordinator_is_down_reaches_it_once_back(cluster):
    with decree.connect(cluster.url) as c:
        assert c.transact(put={"held": "1"}).committed
        # An idle timeout far beyond the test: only the Abort can free the key in time.
        tx = c.begin(timeout=600)
        tx.put("held", "2")
        proc = cluster.procs.pop("coordinator")
        proc.kill()
        proc.wait()
        back = threading.Timer(0.3, cluster.spawn_coordinator)
        back.start()
        tx.abort()  # sent while the coordinator is down, again until it answers
        back.join()
        assert c.status(tx.txid) is decree.Outcome.ABORTED
        wait_for("the key to be free", lambda: c.transact(put={"held": "3"}).committed)
        assert c.get("held") == b"3"


class _NoAnswer(grpc.RpcError):
    """A call that failed with ``code``, as grpc raises it."""

    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "no answer"

    def trailing_metadata(self):
        return ()


def test_a_repeatable_call_is_sent_again_when_no_answer_came_in_time():
    # grpc's own deadline ends a call as DEADLINE_EXCEEDED: no answer, as the Rust client takes it.
    coordinators = decree.client.Coordinators("http://127.0.0.1:1")
    for code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        calls = []

        def call(channel):
            calls.append(channel)
            if len(calls) == 1:
                raise _NoAnswer(code)
            return "answered"

        assert coordinators.ask("Abort", call, read=False, repeatable=True) == "answered", code
        assert len(calls) == 2, code
        # Not repeatable: the first failure is the answer.
        calls.clear()
        with pytest.raises(decree.RpcError):
            coordinators.ask("Begin", call, read=False)
        assert len(calls) == 1, code
    # A refusal is an answer, repeatable or not.
    calls = []

    def refused(channel):
        calls.append(channel)
        raise _NoAnswer(grpc.StatusCode.FAILED_PRECONDITION)

    with pytest.raises(decree.RpcError):
        coordinators.ask("Abort", refused, read=False, repeatable=True)
    assert len(calls) == 1
    coordinators.close()


def test_participants_are_listed(cluster):
    with decree.connect(cluster.url) as c:
        listed = {p.name: p for p in c.participants()}
        assert set(listed) == {"p1", "p2"}
        assert all(p.state == "up" and p.role == "member" and p.in_ring for p in listed.values())
        assert abs(sum(p.share for p in listed.values()) - 1.0) < 1e-9


def ledger_state(data_dir):
    out = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "ledger.py"), "--show", "--data-dir", data_dir],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def test_a_python_service_commits_and_aborts_with_the_kv_participants(cluster):
    data = cluster.service("ledger", "ledger.py")
    with decree.connect(cluster.url) as c:
        owner = c.route("balance")
        marker = {n: c.key_at(owner, f"marker-{n}-") for n in (1, 2, 3)}

        def transfer(n, amount, extra=()):
            kv = decree.kv_payload([decree.put(marker[n], "1"), decree.add("balance", -amount), *extra])
            return c.transact_branches({owner: kv, "ledger": json.dumps({"changes": {"acct": amount}}).encode()})

        done = transfer(1, 10)
        assert done.committed, done.reason
        assert c.get(marker[1]) == b"1" and c.get("balance") == b"-10"
        assert wait_for("the ledger to apply", lambda: ledger_state(data)["applied"] == [done.txid])
        assert ledger_state(data)["balances"] == {"acct": 10}

        refused = transfer(2, -50)
        assert refused.outcome is decree.Outcome.ABORTED
        assert "insufficient funds in acct" in refused.reason and refused.code == "REASON_VALIDATION_FAILED"

        kv_no = transfer(3, 5, [decree.expect(c.key_at(owner, "never-"), "x")])
        assert kv_no.outcome is decree.Outcome.ABORTED
        state = wait_for("the ledger's branch to abort", lambda: (s := ledger_state(data))["in_doubt"] == [] and s)
        assert state["balances"] == {"acct": 10} and state["applied"] == [done.txid]
        assert c.get_many([marker[2], marker[3]]) == {marker[2]: None, marker[3]: None}
        assert c.get("balance") == b"-10"
