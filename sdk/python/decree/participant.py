"""A framework for services that take part in decree transactions.

A service says what a branch means; the framework owns the protocol, as
decree's Rust participant library does: the lock table, the durable prepared
record, idempotent phase two, tombstones, in-doubt recovery that asks the
coordinator and never decides alone, enrollment and heartbeats, named crash
points, and the gRPC Participant service.

Everything durable lives in one SQLite database (``<data-dir>/decree.sqlite``,
WAL, ``synchronous=FULL``: every commit is fsynced). The service keeps its own
tables there too, and each of its calls runs inside the framework's
transaction: what ``prepare`` writes becomes durable with the prepared record,
what ``commit`` writes with the commit record, in one synced SQLite commit. So
a decision is applied exactly once, whatever crashes when.

    class Ledger(decree.Service):
        def open(self, db):
            db.execute("CREATE TABLE IF NOT EXISTS balance (account TEXT PRIMARY KEY, amount INTEGER)")

        def keys(self, payload):
            return [json.loads(payload)["account"]]

        def prepare(self, db, txid, payload):
            ...validate; raise decree.Refused("insufficient funds") to vote NO...
            return decree.Ready(redo=payload)

        def commit(self, db, txid, redo):
            ...apply redo to the tables...

    decree.participant.main(Ledger())   # --coordinator URL --name NAME --listen ADDR --data-dir DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import grpc

from decree import crash
from decree.client import Coordinators, DecreeError
from decree.tls import ENV_CA, ENV_CERT, ENV_KEY, ENV_POLICY, Authorize, Policy, Tls, TlsError
from decree.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, participant_pb2, participant_pb2_grpc
from decree.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger("decree.participant")

#: Most decided txids remembered (tombstones), and for how long (seconds).
TOMBSTONES = 100_000
TOMBSTONE_AGE = 3600.0
#: Seconds a tombstone is kept whatever the bounds say: a coordinator group
#: leases txids to client streams, and a lower leased txid may still start
#: (for a lease's life, 2 s) after higher ones are decided; a horizon above
#: it would refuse it as stale. The Rust participant keeps the same least age.
MIN_AGE = 5.0


# -- what a service implements ------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """The branch can commit: ``redo`` is kept in the prepared record and handed to ``commit``."""

    redo: bytes = b""


#: The branch changes nothing here: it takes no part in phase two.
READ_ONLY = object()


class Refused(Exception):
    """Raised by ``keys`` or ``prepare``: the branch cannot commit (the vote is NO, with this reason)."""


class Service:
    """A service's part in decree transactions. The framework calls:

    1. :meth:`open` once at start, inside a transaction: create tables;
    2. :meth:`keys` when a Prepare arrives; the keys are then locked (a key
       locked by another branch votes NO at once, reason LOCK_CONFLICT);
    3. :meth:`prepare` with the keys locked, inside the transaction that
       writes the prepared record: return :class:`Ready` (the vote is YES
       once the record is synced), :data:`READ_ONLY`, or raise
       :class:`Refused`; a refusal rolls back whatever it wrote;
    4. exactly one of :meth:`commit` or :meth:`abort`, each inside the
       transaction that records the decision (so each runs to durable
       completion exactly once);
    5. :meth:`recover` at start with the branches still in doubt, for state
       kept in memory.
    """

    def open(self, db: sqlite3.Connection) -> None:
        pass

    def keys(self, payload: bytes) -> Sequence[str]:
        return ()

    def prepare(self, db: sqlite3.Connection, txid: str, payload: bytes) -> object:
        raise NotImplementedError

    def commit(self, db: sqlite3.Connection, txid: str, redo: bytes) -> None:
        raise NotImplementedError

    def abort(self, db: sqlite3.Connection, txid: str, redo: bytes) -> None:
        pass

    def recover(self, db: sqlite3.Connection, in_doubt: Sequence[Tuple[str, bytes]]) -> None:
        pass


# -- txids --------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class TxId:
    """``<coordinator>-<incarnation>-<sequence>`` (proto/decree/v1/common.proto)."""

    coordinator: str
    incarnation: int
    sequence: int

    @classmethod
    def parse(cls, text: str) -> "TxId":
        parts = text.split("-")
        ok = (
            len(parts) == 3
            and len(parts[0]) == 8
            and all(c in "0123456789abcdef" for c in parts[0])
            and all(p.isdigit() and p == str(int(p)) and int(p) >= 1 for p in parts[1:])
        )
        if not ok:
            raise ValueError(f"invalid txid {text[:64]!r}: expected <8 hex digits>-<incarnation>-<sequence>")
        return cls(parts[0], int(parts[1]), int(parts[2]))

    def __str__(self) -> str:
        return f"{self.coordinator}-{self.incarnation}-{self.sequence}"


# -- the engine: state, storage and the protocol's rules ----------------------


class Fatal(Exception):
    """The database cannot be opened."""


def fatal(why: str) -> None:
    """A storage failure while serving: stop at once (exit 70) rather than trust a failed sync."""
    log.error("fatal storage error: %s; stopping", why)
    os.write(2, f"decree-participant: fatal storage error: {why}\n".encode())
    os._exit(70)


@dataclass
class _Prepared:
    keys: List[str]
    redo: bytes
    incarnation: int
    since: float
    #: Found at start: ask the coordinator at once.
    recovered: bool = False


class Engine:
    """The participant's state and rules, over its SQLite database. Every
    method runs under one lock; answers are (vote or ack, reason code, reason)."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS decree_prepared (
            txid TEXT PRIMARY KEY, keys TEXT NOT NULL, redo BLOB NOT NULL, incarnation INTEGER NOT NULL);
        CREATE TABLE IF NOT EXISTS decree_decided (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, txid TEXT UNIQUE NOT NULL, committed INTEGER NOT NULL,
            at REAL NOT NULL);
        CREATE TABLE IF NOT EXISTS decree_horizon (
            coordinator TEXT PRIMARY KEY, incarnation INTEGER NOT NULL, sequence INTEGER NOT NULL);
        CREATE TABLE IF NOT EXISTS decree_heuristic (
            txid TEXT PRIMARY KEY, commit_ INTEGER NOT NULL, reason TEXT NOT NULL, operator TEXT NOT NULL,
            at_ms INTEGER NOT NULL, coordinator_outcome INTEGER NOT NULL DEFAULT 0,
            contradicted INTEGER NOT NULL DEFAULT 0);
    """

    def __init__(
        self,
        service: Service,
        data_dir: str,
        name: str,
        tombstones: int = TOMBSTONES,
        tombstone_age: float = TOMBSTONE_AGE,
    ) -> None:
        self.service = service
        self.name = name
        self.tombstones, self.tombstone_age = tombstones, tombstone_age
        self.lock = threading.RLock()
        os.makedirs(data_dir, exist_ok=True)
        path = os.path.join(data_dir, "decree.sqlite")
        try:
            self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(self.SCHEMA)
            with self._txn():
                service.open(self.db)
            rows = self.db.execute("SELECT txid, keys, redo, incarnation FROM decree_prepared").fetchall()
        except sqlite3.DatabaseError as err:
            raise Fatal(f"{path}: {err}") from err
        now = time.monotonic()
        self.prepared: Dict[str, _Prepared] = {
            txid: _Prepared(json.loads(keys), bytes(redo), inc, now, recovered=True)
            for txid, keys, redo, inc in rows
        }
        self.locks: Dict[str, str] = {k: txid for txid, b in self.prepared.items() for k in b.keys}
        self.incarnation = 0
        self.conflicts = 0
        with self._txn():
            service.recover(self.db, [(t, b.redo) for t, b in sorted(self.prepared.items())])

    # storage

    class _Txn:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, kind: object, value: object, _tb: object) -> None:
            if kind is None:
                try:
                    self.db.execute("COMMIT")  # synced: synchronous=FULL
                except sqlite3.DatabaseError as err:
                    fatal(f"commit failed: {err}")
            else:
                self.db.execute("ROLLBACK")

    def _txn(self) -> "Engine._Txn":
        return Engine._Txn(self.db)

    def _decided(self, txid: str) -> Optional[bool]:
        row = self.db.execute("SELECT committed FROM decree_decided WHERE txid = ?", (txid,)).fetchone()
        return None if row is None else bool(row[0])

    def _remember(self, txid: str, committed: bool) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO decree_decided (txid, committed, at) VALUES (?, ?, ?)",
            (txid, int(committed), time.time()),
        )

    def _forgotten(self, txid: TxId) -> Optional[str]:
        """The horizon at or below which ``txid`` falls, if its tombstone may have been forgotten."""
        row = self.db.execute(
            "SELECT incarnation, sequence FROM decree_horizon WHERE coordinator = ?", (txid.coordinator,)
        ).fetchone()
        if row and (txid.incarnation, txid.sequence) <= (row[0], row[1]):
            return f"{txid.coordinator}-{row[0]}-{row[1]}"
        return None

    def prune(self) -> int:
        """Forgets tombstones beyond the count or older than the age bound;
        the highest forgotten txid of each coordinator becomes its horizon
        (in the same synced commit). Returns how many were forgotten."""
        with self.lock, self._txn() as db:
            total = db.execute("SELECT COUNT(*) FROM decree_decided").fetchone()[0]
            over = max(total - self.tombstones, 0)
            # Never one younger than MIN_AGE: a lower txid leased by a group may still start.
            now = time.time()
            old = db.execute(
                "SELECT seq, txid FROM decree_decided WHERE at < ? AND (seq IN "
                "(SELECT seq FROM decree_decided ORDER BY seq LIMIT ?) OR at < ?) ORDER BY seq",
                (now - MIN_AGE, over, now - self.tombstone_age),
            ).fetchall()
            highest: Dict[str, Tuple[int, int]] = {}
            for _, text in old:
                t = TxId.parse(text)
                highest[t.coordinator] = max(highest.get(t.coordinator, (0, 0)), (t.incarnation, t.sequence))
            for coordinator, (inc, seq) in highest.items():
                row = db.execute(
                    "SELECT incarnation, sequence FROM decree_horizon WHERE coordinator = ?", (coordinator,)
                ).fetchone()
                if row is None or (inc, seq) > (row[0], row[1]):
                    db.execute(
                        "INSERT OR REPLACE INTO decree_horizon VALUES (?, ?, ?)", (coordinator, inc, seq)
                    )
            db.executemany("DELETE FROM decree_decided WHERE seq = ?", [(seq,) for seq, _ in old])
            return len(old)

    def _release(self, txid: str) -> None:
        branch = self.prepared.pop(txid, None)
        for key in branch.keys if branch else ():
            if self.locks.get(key) == txid:
                del self.locks[key]

    # phase one

    def prepare(
        self, text: str, payload: bytes, one_phase: bool, incarnation: int, interactive: bool
    ) -> Tuple[int, int, str]:
        """The vote on a Prepare: (vote, reason code, reason)."""
        txid = TxId.parse(text)
        no = common_pb2.VOTE_NO
        with self.lock:
            decided = self._decided(text)
            if decided is not None:
                if not decided:
                    return no, common_pb2.REASON_ALREADY_DECIDED, "transaction already aborted here"
                return (common_pb2.VOTE_COMMITTED if one_phase else common_pb2.VOTE_YES), 0, ""
            if text in self.prepared:
                return common_pb2.VOTE_YES, 0, ""
            horizon = self._forgotten(txid)
            if horizon:
                return no, common_pb2.REASON_STALE, _forgotten(text, horizon)
            if incarnation < self.incarnation:
                why = f"stale Prepare from coordinator incarnation {incarnation} (current is {self.incarnation})"
                return no, common_pb2.REASON_STALE, why
            if interactive:
                return no, common_pb2.REASON_WORK_LOST, "this participant takes no interactive work"
            try:
                keys = list(dict.fromkeys(self.service.keys(payload)))
            except Refused as refused:
                return no, common_pb2.REASON_VALIDATION_FAILED, str(refused)
            busy = next((k for k in keys if self.locks.get(k, text) != text), None)
            if busy is not None:
                self.conflicts += 1
                why = f"lock conflict on key {busy!r} (held by {self.locks[busy]})"
                return no, common_pb2.REASON_LOCK_CONFLICT, why
            try:
                with self._txn() as db:
                    ready = self.service.prepare(db, text, payload)
                    if ready is READ_ONLY:
                        return (common_pb2.VOTE_COMMITTED if one_phase else common_pb2.VOTE_READ_ONLY), 0, ""
                    if not isinstance(ready, Ready):
                        raise TypeError(f"prepare returned {ready!r}, not Ready(redo) or READ_ONLY")
                    if one_phase:
                        self.service.commit(db, text, ready.redo)
                        self._remember(text, True)
                    else:
                        crash.point(crash.PREPARE_BEFORE_LOG)
                        db.execute(
                            "INSERT INTO decree_prepared VALUES (?, ?, ?, ?)",
                            (text, json.dumps(keys), ready.redo, incarnation),
                        )
            except Refused as refused:
                with self._txn():
                    self._remember(text, False)
                return no, common_pb2.REASON_VALIDATION_FAILED, str(refused)
            if one_phase:
                return common_pb2.VOTE_COMMITTED, 0, ""
            # The prepared record is durable: lock its keys and vote YES.
            self.prepared[text] = _Prepared(keys, ready.redo, incarnation, time.monotonic())
            for key in keys:
                self.locks[key] = text
            crash.point(crash.PREPARE_AFTER_LOG)
            return common_pb2.VOTE_YES, 0, ""

    # phase two

    def _settle_heuristic(self, db: sqlite3.Connection, txid: str, committed: bool) -> bool:
        """The coordinator's decision for a branch an operator decided by hand:
        compared and recorded (a contradiction is logged); True if there was one."""
        row = db.execute(
            "SELECT commit_, coordinator_outcome FROM decree_heuristic WHERE txid = ?", (txid,)
        ).fetchone()
        if row is None:
            return False
        if row[1] == 0:
            outcome = common_pb2.OUTCOME_COMMITTED if committed else common_pb2.OUTCOME_ABORTED
            contradicted = bool(row[0]) != committed
            db.execute(
                "UPDATE decree_heuristic SET coordinator_outcome = ?, contradicted = ? WHERE txid = ?",
                (outcome, int(contradicted), txid),
            )
            if contradicted:
                log.error(
                    "heuristic hazard: %s was %s by hand, the coordinator %s it",
                    txid,
                    "committed" if row[0] else "aborted",
                    "committed" if committed else "aborted",
                )
        return True

    def commit(self, text: str) -> Tuple[int, int, str]:
        """The ack of a Commit: (ack, reason code, reason)."""
        TxId.parse(text)
        with self.lock:
            branch = self.prepared.get(text)
            if branch is None:
                with self._txn() as db:
                    if self._settle_heuristic(db, text, True):
                        return common_pb2.ACK_DONE, 0, ""
                if self._decided(text) is False:
                    return common_pb2.ACK_REFUSED, common_pb2.REASON_ALREADY_DECIDED, f"transaction {text} was aborted here"
                return common_pb2.ACK_DONE, 0, ""  # committed already, or never seen
            crash.point(crash.COMMIT_BEFORE_APPLY)
            with self._txn() as db:
                self.service.commit(db, text, branch.redo)
                db.execute("DELETE FROM decree_prepared WHERE txid = ?", (text,))
                self._remember(text, True)
            self._release(text)
            crash.point(crash.COMMIT_AFTER_APPLY)
            return common_pb2.ACK_DONE, 0, ""

    def abort(self, text: str) -> Tuple[int, int, str]:
        """The ack of an Abort: (ack, reason code, reason)."""
        txid = TxId.parse(text)
        with self.lock:
            branch = self.prepared.get(text)
            if branch is None:
                with self._txn() as db:
                    if self._settle_heuristic(db, text, False):
                        return common_pb2.ACK_DONE, 0, ""
                    decided = self._decided(text)
                    if decided:
                        why = f"transaction {text} was committed here"
                        return common_pb2.ACK_REFUSED, common_pb2.REASON_ALREADY_DECIDED, why
                    if decided is None:
                        horizon = self._forgotten(txid)
                        if horizon:
                            # It may have been a one-phase commit here: "aborted" could be a lie.
                            return common_pb2.ACK_FORGOTTEN, common_pb2.REASON_STALE, _forgotten(text, horizon)
                        self._remember(text, False)  # so that a late Prepare votes NO
                return common_pb2.ACK_DONE, 0, ""
            crash.point(crash.ABORT_BEFORE_APPLY)
            with self._txn() as db:
                self.service.abort(db, text, branch.redo)
                db.execute("DELETE FROM decree_prepared WHERE txid = ?", (text,))
                self._remember(text, False)
            self._release(text)
            return common_pb2.ACK_DONE, 0, ""

    def resolve(self, text: str, commit: bool, reason: str, operator: str) -> None:
        """An operator decides a branch in doubt by hand (recorded, synced, then applied)."""
        TxId.parse(text)
        if not reason.strip():
            raise ValueError("a heuristic decision needs a reason")
        with self.lock:
            branch = self.prepared.get(text)
            if branch is None:
                raise LookupError(f"transaction {text} is not in doubt here")
            with self._txn() as db:
                db.execute(
                    "INSERT INTO decree_heuristic (txid, commit_, reason, operator, at_ms) VALUES (?, ?, ?, ?, ?)",
                    (text, int(commit), reason, operator, int(time.time() * 1000)),
                )
                if commit:
                    self.service.commit(db, text, branch.redo)
                else:
                    self.service.abort(db, text, branch.redo)
                db.execute("DELETE FROM decree_prepared WHERE txid = ?", (text,))
            self._release(text)
            log.warning("%s %s by hand by %s: %s", text, "committed" if commit else "aborted", operator, reason)

    def heuristics(self) -> List[participant_pb2.Heuristic]:
        with self.lock:
            rows = self.db.execute(
                "SELECT txid, commit_, reason, operator, at_ms, coordinator_outcome, contradicted "
                "FROM decree_heuristic ORDER BY at_ms"
            ).fetchall()
        return [
            participant_pb2.Heuristic(
                txid=t, commit=bool(c), reason=r, operator=o, decided_at_unix_ms=at,
                coordinator_outcome=out, contradicted=bool(x),
            )
            for t, c, r, o, at, out, x in rows
        ]

    def learn_incarnation(self, incarnation: int) -> None:
        with self.lock:
            self.incarnation = max(self.incarnation, incarnation)

    def to_ask(self, in_doubt_after: float) -> List[str]:
        """Branches to ask the coordinator about: found at start, of an older
        coordinator incarnation, or prepared for longer than ``in_doubt_after``."""
        now = time.monotonic()
        with self.lock:
            return [
                t
                for t, b in sorted(self.prepared.items())
                if b.recovered or b.incarnation < self.incarnation or now - b.since > in_doubt_after
            ]


def _forgotten(txid: str, horizon: str) -> str:
    return (
        f"transaction {txid} is older than this participant remembers (decided transactions up to {horizon} "
        "are forgotten): a stale message"
    )


# -- the gRPC service ---------------------------------------------------------


class _Servicer(participant_pb2_grpc.ParticipantServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _txid_error(self, context: grpc.ServicerContext, err: ValueError) -> None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    def Prepare(self, request, context):  # noqa: N802 (gRPC's names)
        try:
            vote, code, reason = self.engine.prepare(
                request.txid, request.payload, request.one_phase, request.coordinator_incarnation, request.interactive
            )
        except ValueError as err:
            self._txid_error(context, err)
        return participant_pb2.PrepareResponse(vote=vote, reason=reason, reason_code=code)

    def _ack(self, result, typed: bool, response, context):
        ack, code, reason = result
        if typed:
            return response(ack=ack, reason_code=code, reason=reason)
        if ack == common_pb2.ACK_REFUSED:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, reason)
        if ack == common_pb2.ACK_FORGOTTEN:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, reason)
        return response()

    def Commit(self, request, context):  # noqa: N802
        try:
            result = self.engine.commit(request.txid)
        except ValueError as err:
            self._txid_error(context, err)
        return self._ack(result, request.typed_ack, participant_pb2.CommitResponse, context)

    def Abort(self, request, context):  # noqa: N802
        try:
            result = self.engine.abort(request.txid)
        except ValueError as err:
            self._txid_error(context, err)
        return self._ack(result, request.typed_ack, participant_pb2.AbortResponse, context)

    def ListInDoubt(self, request, context):  # noqa: N802
        now = time.monotonic()
        with self.engine.lock:
            branches = [
                participant_pb2.InDoubtBranch(txid=t, age_ms=int((now - b.since) * 1000), locked_keys=sorted(b.keys))
                for t, b in sorted(self.engine.prepared.items())
            ]
        return participant_pb2.ListInDoubtResponse(branches=branches, participant=self.engine.name)

    def ListLocks(self, request, context):  # noqa: N802
        with self.engine.lock:
            locks = [
                participant_pb2.LockEntry(key=k, holder=t, state="prepared")
                for k, t in sorted(self.engine.locks.items())
            ]
            conflicts = self.engine.conflicts
        return participant_pb2.ListLocksResponse(participant=self.engine.name, locks=locks, conflicts=conflicts)

    def Resolve(self, request, context):  # noqa: N802
        try:
            self.engine.resolve(request.txid, request.commit, request.reason, request.operator or "unknown")
        except ValueError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except LookupError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        return participant_pb2.ResolveResponse()

    def ListHeuristics(self, request, context):  # noqa: N802
        return participant_pb2.ListHeuristicsResponse(participant=self.engine.name, heuristics=self.engine.heuristics())


# -- the process: serve, enroll, recover --------------------------------------


@dataclass
class Options:
    coordinator: str
    name: str
    data_dir: str
    listen: str = "127.0.0.1:0"
    #: The URL the coordinator reaches this participant at (default: http://<listen>).
    advertise_url: str = ""
    heartbeat: float = 0.5
    #: A branch prepared longer than this is asked about (seconds).
    in_doubt_after: float = 5.0
    resolve_interval: float = 0.5
    tombstones: int = TOMBSTONES
    tombstone_age: float = TOMBSTONE_AGE
    #: Mutual TLS: served only to peers its CA vouches for, and speaking to
    #: the coordinator as this identity (its URLs then are https).
    tls: Optional[Tls] = None
    #: With ``tls``: the roles each caller needs (docs/security.md).
    policy: Optional[Policy] = None


class Participant:
    """A running participant: the gRPC server, enrollment and recovery threads."""

    def __init__(self, service: Service, options: Options) -> None:
        self.options = options
        self.engine = Engine(service, options.data_dir, options.name, options.tombstones, options.tombstone_age)
        if options.policy is not None and options.tls is None:
            raise DecreeError("a policy needs mutual TLS: its roles are given to certificate identities")
        interceptors = [Authorize(options.policy)] if options.policy is not None else []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), interceptors=interceptors)
        participant_pb2_grpc.add_ParticipantServicer_to_server(_Servicer(self.engine), self.server)
        if options.tls is not None:
            self.port = self.server.add_secure_port(options.listen, options.tls.server_credentials())
        else:
            self.port = self.server.add_insecure_port(options.listen)
        if self.port == 0:
            raise DecreeError(f"cannot listen on {options.listen}")
        host = options.listen.rsplit(":", 1)[0]
        scheme = "https" if options.tls is not None else "http"
        self.url = options.advertise_url or f"{scheme}://{host}:{self.port}"
        self.coordinators = Coordinators(options.coordinator, options.tls)
        self.stopping = threading.Event()
        self._enrolled = threading.Event()

    def start(self) -> "Participant":
        self.server.start()
        threading.Thread(target=self._enroll_loop, name="decree-enroll", daemon=True).start()
        threading.Thread(target=self._resolve_loop, name="decree-resolve", daemon=True).start()
        return self

    def stop(self, grace: float = 2.0) -> None:
        self.stopping.set()
        self.server.stop(grace).wait()
        self.coordinators.close()

    def wait_enrolled(self, timeout: float) -> bool:
        return self._enrolled.wait(timeout)

    def _enroll_loop(self) -> None:
        """Enrolls, then heartbeats; enrolls again whenever the coordinator does not know us."""
        registry = lambda ch: registry_pb2_grpc.RegistryStub(ch)  # noqa: E731
        enrolled = False
        while not self.stopping.is_set():
            try:
                if not enrolled:
                    request = registry_pb2.EnrollRequest(
                        name=self.options.name, address=self.url, role=registry_pb2.ROLE_SERVICE
                    )
                    answer = self.coordinators.ask(
                        "Enroll", lambda ch: registry(ch).Enroll(request, timeout=2), read=False
                    )
                    self.engine.learn_incarnation(answer.coordinator_incarnation)
                    enrolled = True
                    self._enrolled.set()
                    log.info("enrolled as %s at %s", self.options.name, self.url)
                else:
                    request = registry_pb2.HeartbeatRequest(name=self.options.name, address=self.url)
                    answer = self.coordinators.ask(
                        "Heartbeat", lambda ch: registry(ch).Heartbeat(request, timeout=2), read=True
                    )
                    self.engine.learn_incarnation(answer.coordinator_incarnation)
                    enrolled = answer.known
            except DecreeError as err:
                log.info("coordinator: %s", err)
                enrolled = False
            self.stopping.wait(self.options.heartbeat)

    def _resolve_loop(self) -> None:
        """Asks the coordinator about branches in doubt; a branch that voted YES
        is only ever decided by its answer."""
        recovered = bool(self.engine.prepared)
        if recovered:
            crash.point(crash.RECOVERY_BEFORE_RESOLVE)
        pruned_at = time.monotonic()
        while not self.stopping.wait(self.options.resolve_interval):
            for txid in self.engine.to_ask(self.options.in_doubt_after):
                request = coordinator_pb2.GetOutcomeRequest(txid=txid)
                try:
                    answer = self.coordinators.ask(
                        "GetOutcome",
                        lambda ch: coordinator_pb2_grpc.CoordinatorStub(ch).GetOutcome(request, timeout=2),
                        read=True,
                    )
                except DecreeError as err:
                    log.info("in doubt about %s: %s", txid, err)
                    break
                if answer.outcome == common_pb2.OUTCOME_COMMITTED:
                    self.engine.commit(txid)
                    log.info("%s committed, as its coordinator decided", txid)
                elif answer.outcome in (common_pb2.OUTCOME_ABORTED, common_pb2.OUTCOME_FORGOTTEN):
                    self.engine.abort(txid)
                    log.info("%s aborted, as its coordinator decided", txid)
            if time.monotonic() - pruned_at > 1.0:
                pruned_at = time.monotonic()
                self.engine.prune()


def options_from_args(argv: Optional[Sequence[str]] = None) -> Options:
    """The command line every decree participant takes."""
    parser = argparse.ArgumentParser(description="a decree participant")
    parser.add_argument("--coordinator", required=True, help="the coordinator's URL (a group's: comma-separated)")
    parser.add_argument("--name", required=True, help="the name it enrolls under")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port to serve gRPC on")
    parser.add_argument("--data-dir", required=True, help="where its SQLite database lives")
    parser.add_argument("--advertise-url", default="", help="the URL the coordinator reaches it at")
    parser.add_argument("--crash-at", default="", help="crash points to arm (also $DECREE_CRASH_AT)")
    parser.add_argument("--in-doubt-after-ms", type=int, default=5000)
    parser.add_argument("--heartbeat-ms", type=int, default=500)
    parser.add_argument("--resolve-interval-ms", type=int, default=500)
    parser.add_argument("--tombstones", type=int, default=int(os.environ.get("DECREE_TOMBSTONES", TOMBSTONES)))
    parser.add_argument(
        "--tombstone-age-ms", type=int, default=int(os.environ.get("DECREE_TOMBSTONE_AGE_MS", TOMBSTONE_AGE * 1000))
    )
    parser.add_argument("--tls-cert", default=os.environ.get(ENV_CERT, ""), help=f"PEM certificate (${ENV_CERT})")
    parser.add_argument("--tls-key", default=os.environ.get(ENV_KEY, ""), help=f"PEM key (${ENV_KEY})")
    parser.add_argument("--tls-ca", default=os.environ.get(ENV_CA, ""), help=f"PEM CA (${ENV_CA})")
    parser.add_argument("--policy", default=os.environ.get(ENV_POLICY, ""), help=f"role policy, TOML (${ENV_POLICY})")
    args = parser.parse_args(argv)
    tls, policy = None, None
    files = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key, "--tls-ca": args.tls_ca}
    try:
        if any(files.values()):
            missing = [flag for flag, path in files.items() if not path]
            if missing:
                parser.error(f"mutual TLS needs {', '.join(missing)} too")
            tls = Tls.load(args.tls_cert, args.tls_key, args.tls_ca)
        if args.policy:
            if tls is None:
                parser.error("--policy needs mutual TLS (--tls-cert, --tls-key, --tls-ca)")
            policy = Policy.read(args.policy)
    except TlsError as err:
        parser.error(str(err))
    try:
        crash.arm(crash.parse(",".join(filter(None, [os.environ.get(crash.ENV, ""), args.crash_at]))))
    except ValueError as err:
        parser.error(str(err))
    return Options(
        coordinator=args.coordinator,
        name=args.name,
        data_dir=args.data_dir,
        listen=args.listen,
        advertise_url=args.advertise_url,
        heartbeat=args.heartbeat_ms / 1000,
        in_doubt_after=args.in_doubt_after_ms / 1000,
        resolve_interval=args.resolve_interval_ms / 1000,
        tombstones=args.tombstones,
        tombstone_age=args.tombstone_age_ms / 1000,
        tls=tls,
        policy=policy,
    )


def main(service: Service, argv: Optional[Sequence[str]] = None) -> None:
    """Runs ``service`` as a participant until SIGTERM or SIGINT (then exits 0).
    A storage failure exits 70; bad arguments exit 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = options_from_args(argv)
    try:
        participant = Participant(service, options).start()
    except Fatal as err:
        sys.exit(f"decree-participant: cannot open {options.data_dir}: {err}")
    print(f"participant {options.name} serving at {participant.url}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    participant.stop()

