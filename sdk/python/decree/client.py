"""A client of a decree coordinator (or of a coordinator group) and its KV
participants: one-shot and interactive transactions, reads, outcomes.

    with decree.connect("http://127.0.0.1:7000") as c:
        result = c.transact(put={"greeting": "hello"}, add={"visits": 1})
        assert result.committed, result.reason
        print(c.get("greeting"))

Keys are routed by the ring exactly as the Rust SDK routes them
(:mod:`decree.ring`). A transaction or read that reached a stale owner, or a
key that was moving, changed nothing: it is sent again on the refreshed ring.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import grpc

from decree.ring import Routing
from decree.tls import Tls, TlsError
from decree.v1 import common_pb2, coordinator_pb2, coordinator_pb2_grpc, kv_pb2, kv_pb2_grpc
from decree.v1 import registry_pb2, registry_pb2_grpc

Value = Union[str, bytes]
T = TypeVar("T")

REASON_METADATA = "decree-reason"
TXID_METADATA = "decree-txid"
LEADER_METADATA = "decree-leader"
KEY_MAX_BYTES = 1024
# The most keys one Kv.Get carries (a participant refuses more).
GET_KEYS = 10_000

#: How many times a request sent to a stale owner or a moving key is sent again.
REROUTES = 60
#: How long a request waits for a coordinator group to have a leader again.
FAILOVER_WAIT = 15.0

#: No coordinator answered: none could be reached, the call broke with it, or
#: no answer came in time (grpc's own deadline; the Rust client's timeouts end a
#: call as CANCELLED, and both clients take either as no answer). Only calls that
#: may be repeated (Abort) are sent again on these.
_UNANSWERED = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


class Outcome(str, enum.Enum):
    """A transaction's outcome, as the coordinator knows it."""

    COMMITTED = "committed"
    ABORTED = "aborted"
    #: Not known yet (ask :meth:`Client.status` later).
    PENDING = "pending"
    #: Older than the coordinator remembers (docs/protocol.md#forgetting).
    FORGOTTEN = "forgotten"

    @classmethod
    def from_wire(cls, value: int) -> "Outcome":
        names = {
            common_pb2.OUTCOME_COMMITTED: cls.COMMITTED,
            common_pb2.OUTCOME_ABORTED: cls.ABORTED,
            common_pb2.OUTCOME_PENDING: cls.PENDING,
            common_pb2.OUTCOME_FORGOTTEN: cls.FORGOTTEN,
        }
        if value not in names:
            raise DecreeError(f"the coordinator sent outcome {value}, which this client does not know")
        return names[value]


class DecreeError(Exception):
    """An error from decree (or reaching it)."""


class RpcError(DecreeError):
    """A call failed: ``code`` is its gRPC status code, ``reason`` decree's reason code (a ``REASON_*`` name)."""

    def __init__(self, what: str, err: grpc.RpcError) -> None:
        self.code: grpc.StatusCode = err.code()
        self.details: str = err.details() or ""
        self.reason: str = reason_name(reason_of(err))
        super().__init__(f"{what}: {self.code.name.lower()}: {self.details}")


class OutcomeUnknown(DecreeError):
    """The transaction's outcome is not known yet: ask :meth:`Client.status` for ``txid``."""

    def __init__(self, txid: str, reason: str) -> None:
        self.txid, self.reason = txid, reason
        super().__init__(f"the outcome of {txid} is not known yet: {reason}")


class Aborted(DecreeError):
    """An interactive transaction was aborted (a lost lock conflict, a timeout)."""

    def __init__(self, txid: str, reason: str, code: str) -> None:
        self.txid, self.reason, self.code = txid, reason, code
        super().__init__(f"transaction {txid} aborted: {reason}")


def reason_of(err: grpc.RpcError) -> int:
    """decree's reason code in a failed call's trailing metadata (0: none)."""
    for key, value in err.trailing_metadata() or ():
        if key == REASON_METADATA:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def _metadata(err: grpc.RpcError, name: str) -> Optional[str]:
    for key, value in err.trailing_metadata() or ():
        if key == name:
            return str(value)
    return None


def reason_name(code: int) -> str:
    """``REASON_LOCK_CONFLICT`` for 1, and so on (``REASON_UNSPECIFIED`` for codes this client does not know)."""
    try:
        return common_pb2.Reason.Name(code)
    except ValueError:
        return "REASON_UNSPECIFIED"


def _rerouted(code: int) -> bool:
    return code in (common_pb2.REASON_WRONG_OWNER, common_pb2.REASON_MIGRATING)


def _bytes(value: Value) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def check_key(key: str) -> None:
    size = len(key.encode())
    if size == 0 or size > KEY_MAX_BYTES:
        raise ValueError(f"a key is 1 to {KEY_MAX_BYTES} bytes of UTF-8, not {size}: {key[:64]!r}")


def _tls_for(urls: Sequence[str]) -> Optional[Tls]:
    """The environment's TLS identity when any of ``urls`` is https."""
    if not any(u.startswith("https://") for u in urls):
        return None
    try:
        return Tls.from_env()
    except TlsError as err:
        raise DecreeError(str(err)) from None


def _channel(url: str, tls: Optional[Tls]) -> grpc.Channel:
    """A channel to ``url``: TLS for ``https://`` (which needs ``tls``), plaintext otherwise."""
    target = _target(url)
    if url.strip().startswith("https://"):
        if tls is None:
            raise DecreeError(f"{url} is https: give tls= or set DECREE_TLS_CERT, DECREE_TLS_KEY and DECREE_TLS_CA")
        return grpc.secure_channel(target, tls.channel_credentials())
    return grpc.insecure_channel(target)


def _target(url: str) -> str:
    """``host:port`` of a URL like ``http://127.0.0.1:7000`` (or of a bare ``host:port``)."""
    url = url.strip()
    url = url.removeprefix("https://").removeprefix("http://").rstrip("/")
    if not url or "/" in url:
        raise DecreeError(f"{url!r} is not a coordinator URL like http://127.0.0.1:7000")
    return url


@dataclass(frozen=True)
class Result:
    """The outcome of a transaction."""

    txid: str
    outcome: Outcome
    #: Why it aborted ("participant p2 voted NO: lock conflict ..."); empty when committed.
    reason: str = ""
    #: The reason as a code: a ``REASON_*`` name.
    code: str = "REASON_UNSPECIFIED"
    participants: Tuple[str, ...] = ()

    @property
    def committed(self) -> bool:
        return self.outcome is Outcome.COMMITTED

    @classmethod
    def from_wire(cls, response: coordinator_pb2.TransactResponse) -> "Result":
        return cls(
            txid=response.txid,
            outcome=Outcome.from_wire(response.outcome),
            reason=response.reason,
            code=reason_name(response.reason_code),
            participants=tuple(response.participants),
        )


@dataclass(frozen=True)
class Participant:
    """An enrolled participant, as the coordinator lists it."""

    name: str
    address: str
    #: "up" or "down".
    state: str
    #: "member" (holds part of the ring) or "service" (named branches only).
    role: str
    share: float
    in_ring: bool


@dataclass
class _View:
    routing: Routing = field(default_factory=Routing)
    channels: Dict[str, Tuple[str, grpc.Channel]] = field(default_factory=dict)


Op = kv_pb2.KvOp


def put(key: str, value: Value) -> Op:
    check_key(key)
    return kv_pb2.KvOp(kind=kv_pb2.KvOp.KIND_PUT, key=key, value=_bytes(value))


def delete(key: str) -> Op:
    check_key(key)
    return kv_pb2.KvOp(kind=kv_pb2.KvOp.KIND_DELETE, key=key)


def add(key: str, delta: int) -> Op:
    check_key(key)
    if not -(1 << 63) <= delta < (1 << 63):
        raise ValueError(f"delta {delta} does not fit in 64 bits")
    return kv_pb2.KvOp(kind=kv_pb2.KvOp.KIND_ADD, key=key, delta=delta)


def expect(key: str, value: Optional[Value]) -> Op:
    """Vote NO unless ``key`` holds exactly ``value`` (None: unless it is absent)."""
    check_key(key)
    if value is None:
        return kv_pb2.KvOp(kind=kv_pb2.KvOp.KIND_EXPECT, key=key)
    return kv_pb2.KvOp(kind=kv_pb2.KvOp.KIND_EXPECT, key=key, value=_bytes(value))


# The builders under names the keyword arguments of Client.transact do not shadow.
_put, _add, _delete, _expect = put, add, delete, expect


def kv_payload(ops: Iterable[Op]) -> bytes:
    """A KV participant's branch payload: an encoded ``decree.v1.KvBatch``."""
    return kv_pb2.KvBatch(ops=list(ops)).SerializeToString()


class Coordinators:
    """The coordinator, or the replicas of a coordinator group, and the one
    believed to lead: requests follow the leader."""

    def __init__(self, url: str, tls: Optional[Tls] = None) -> None:
        given = [u.strip() for u in url.split(",") if u.strip()]
        self.urls = [_target(u) for u in given]
        if not self.urls:
            raise DecreeError("no coordinator URL given")
        self._lock = threading.Lock()
        self._leader = 0
        self.tls = tls if tls is not None else _tls_for(given)
        self.channels = [_channel(u, self.tls) for u in given]

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def ask(self, what: str, call: Callable[[grpc.Channel], T], *, read: bool, repeatable: bool = False) -> T:
        """Sends one request to the coordinator (the group's leader): again, at
        the leader, while a replica refuses it for not leading (nothing was
        done); for a read to a group, while a replica cannot be reached; and
        for a ``repeatable`` request (one sent twice changes nothing: Abort),
        while no coordinator answers at all (one restarting, the call broken)."""
        group = len(self.urls) > 1
        deadline = time.monotonic() + FAILOVER_WAIT
        attempt = 0
        while True:
            index = self._leader
            try:
                return call(self.channels[index])
            except grpc.RpcError as err:
                not_leader = reason_of(err) == common_pb2.REASON_NOT_LEADER
                lost = (read and group and err.code() == grpc.StatusCode.UNAVAILABLE) or (
                    repeatable and err.code() in _UNANSWERED
                )
                if not (not_leader or lost) or time.monotonic() > deadline:
                    raise RpcError(what, err) from None
                hint = _metadata(err, LEADER_METADATA)
                with self._lock:
                    if hint and _target(hint) in self.urls:
                        self._leader = self.urls.index(_target(hint))
                    elif self._leader == index:
                        self._leader = (index + 1) % len(self.urls)
                time.sleep(min(0.02 * (2 ** min(attempt, 4)), 0.25))
                attempt += 1


#: Refusals of a Commit that asking again cannot change.
_DECIDED = frozenset(
    {
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)


class Client:
    """A client of one coordinator (``url``) or of a group (URLs separated by commas)."""

    def __init__(self, url: str, *, timeout: float = 30.0, tls: Optional[Tls] = None) -> None:
        self._group = Coordinators(url, tls)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._view = _View()
        self.refresh()

    # -- plumbing ---------------------------------------------------------

    def close(self) -> None:
        self._group.close()
        for _, channel in self._view.channels.values():
            channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _ask(self, what: str, call: Callable[[grpc.Channel], T], *, read: bool, repeatable: bool = False) -> T:
        return self._group.ask(what, call, read=read, repeatable=repeatable)

    def _coordinator(self, channel: grpc.Channel) -> coordinator_pb2_grpc.CoordinatorStub:
        return coordinator_pb2_grpc.CoordinatorStub(channel)

    def _registry(self, channel: grpc.Channel) -> registry_pb2_grpc.RegistryStub:
        return registry_pb2_grpc.RegistryStub(channel)

    def refresh(self) -> None:
        """Reads the participant list and the ring again."""
        listed = self.participants()
        ring = self._ask(
            "GetRing",
            lambda ch: self._registry(ch).GetRing(registry_pb2.GetRingRequest(), timeout=self._timeout),
            read=True,
        )
        with self._lock:
            known = self._view.channels
            channels = {}
            for p in listed:
                kept = known.get(p.name)
                if kept and kept[0] == p.address:
                    channels[p.name] = kept
                else:
                    channels[p.name] = (p.address, _channel(p.address, self._group.tls))
            self._view = _View(routing=Routing.from_wire(ring.routing), channels=channels)

    def _kv(self, participant: str) -> kv_pb2_grpc.KvStub:
        entry = self._view.channels.get(participant)
        if entry is None:
            raise DecreeError(f"participant {participant!r} is not enrolled")
        return kv_pb2_grpc.KvStub(entry[1])

    def _reroute_pause(self, attempt: int) -> bool:
        if attempt >= REROUTES:
            return False
        time.sleep(min(0.002 * (2 ** min(attempt, 6)), 0.1))
        try:
            self.refresh()
        except DecreeError:
            pass  # the old view is kept: the next try tells
        return True

    # -- routing ----------------------------------------------------------

    @property
    def routing(self) -> Routing:
        return self._view.routing

    def route(self, key: str) -> str:
        """The participant that owns ``key``, as this client knows the ring."""
        owner = self._view.routing.route(key)
        if owner is None:
            raise DecreeError("no participant is in the ring")
        return owner

    def key_at(self, participant: str, prefix: str) -> str:
        """A key ``participant`` owns under this client's ring: the first of
        ``<prefix>0``, ``<prefix>1``, ... that routes to it."""
        routing = self._view.routing
        if participant not in routing.current and not (routing.target and participant in routing.target):
            raise DecreeError(f"{participant!r} holds no part of the ring")
        n = 0
        while routing.route(f"{prefix}{n}") != participant:
            n += 1
        return f"{prefix}{n}"

    # -- transactions -----------------------------------------------------

    def transact(
        self,
        put: Optional[Mapping[str, Value]] = None,
        add: Optional[Mapping[str, int]] = None,
        delete: Iterable[str] = (),
        expect: Optional[Mapping[str, Optional[Value]]] = None,
        ops: Sequence[Op] = (),
    ) -> Result:
        """Runs one transaction over the KV participants: ``put`` values,
        ``add`` deltas to decimal integers, ``delete`` keys, and ``expect``
        values (the transaction aborts unless each holds), or explicit ``ops``
        (built with :func:`decree.put` and friends), applied in that order.
        Each key goes to the participant that owns it."""
        every: List[Op] = list(ops)
        every += [_put(k, v) for k, v in (put or {}).items()]
        every += [_add(k, d) for k, d in (add or {}).items()]
        every += [_delete(k) for k in delete]
        every += [_expect(k, v) for k, v in (expect or {}).items()]
        if not every:
            raise ValueError("a transaction needs at least one operation")
        for op in every:
            check_key(op.key)
        attempt = 0
        while True:
            branches: Dict[str, List[Op]] = {}
            for op in every:
                branches.setdefault(self.route(op.key), []).append(op)
            result = self.transact_branches({p: kv_payload(o) for p, o in sorted(branches.items())})
            moved = result.outcome is Outcome.ABORTED and result.code in ("REASON_WRONG_OWNER", "REASON_MIGRATING")
            if not (moved and self._reroute_pause(attempt)):
                return result
            attempt += 1

    def transact_branches(self, branches: Union[Mapping[str, bytes], Sequence[Tuple[str, bytes]]]) -> Result:
        """Runs a transaction over explicit branches: each participant's payload
        (a service's own format, or :func:`kv_payload` for a KV participant)."""
        pairs = list(branches.items()) if isinstance(branches, Mapping) else list(branches)
        request = coordinator_pb2.TransactRequest(
            branches=[common_pb2.Branch(participant=p, payload=bytes(b)) for p, b in pairs],
            pending_outcome=True,
        )

        def call(ch: grpc.Channel) -> coordinator_pb2.TransactResponse:
            return self._coordinator(ch).Transact(request, timeout=self._timeout)

        response = self._ask("Transact", call, read=False)
        return self._settled(Result.from_wire(response))

    def _settled(self, result: Result) -> Result:
        """A PENDING answer from a leader that lost its leadership: ask the next one until it knows."""
        if result.outcome is not Outcome.PENDING or result.code != "REASON_NOT_LEADER":
            return result
        deadline = time.monotonic() + FAILOVER_WAIT
        while time.monotonic() < deadline:
            try:
                outcome = self.status(result.txid)
            except RpcError:
                outcome = Outcome.PENDING
            if outcome is not Outcome.PENDING:
                return Result(result.txid, outcome, f"told by the group's leader after a failover ({result.reason})")
            time.sleep(0.1)
        raise OutcomeUnknown(result.txid, result.reason)

    def _abort_interactive(self, txid: str) -> None:
        """Aborts the interactive transaction ``txid``, again while no
        coordinator answers (one restarting, a group between leaders), for up
        to ``FAILOVER_WAIT``: an abort repeated changes nothing, and one that
        never arrives leaves the transaction's locks held until its idle timeout."""
        request = coordinator_pb2.AbortTransactionRequest(txid=txid)
        self._ask(
            "Abort",
            lambda ch: self._coordinator(ch).Abort(request, timeout=self._timeout),
            read=False,
            repeatable=True,
        )

    def _abort_in_background(self, txid: str) -> None:
        def run() -> None:
            try:
                self._abort_interactive(txid)
            except RpcError:
                pass  # the coordinator's idle timeout ends it

        threading.Thread(target=run, name=f"abort {txid}", daemon=True).start()

    def _commit_interactive(self, txid: str) -> Result:
        """Commits the interactive transaction ``txid``. One whose coordinator
        was lost, restarted or stopped leading before it answered is asked of
        the next (``GetOutcome``): decided, that is the answer; still active
        there (a coordinator, and a group, knows every interactive transaction
        begun, with its enlisted branches), it is committed again; preparing or
        deciding, it is asked until it is known, for up to ``FAILOVER_WAIT``."""
        request = coordinator_pb2.CommitTransactionRequest(txid=txid, pending_outcome=True)
        deadline = time.monotonic() + FAILOVER_WAIT
        unknown: Optional[str] = None
        attempt = 0
        while True:
            try:
                response = self._ask(
                    "Commit", lambda ch: self._coordinator(ch).Commit(request, timeout=self._timeout), read=False
                )
                result = Result.from_wire(response)
                if result.outcome is not Outcome.PENDING or result.code != "REASON_NOT_LEADER":
                    return result
                why = result.reason
            except RpcError as err:
                if err.code == grpc.StatusCode.FAILED_PRECONDITION and unknown is not None:
                    # Not active any more: an earlier Commit began it; ask its outcome.
                    return self._settled(Result(txid, Outcome.PENDING, unknown, "REASON_NOT_LEADER"))
                if err.code in _DECIDED:
                    raise
                why = str(err)
            try:
                outcome = self.status(txid)
            except RpcError:
                outcome = Outcome.PENDING
            if outcome is not Outcome.PENDING:
                return Result(txid, outcome, f"told by the coordinator after a failover ({why})")
            unknown = why
            if time.monotonic() >= deadline:
                raise OutcomeUnknown(txid, why)
            time.sleep(min(0.02 * (2 ** min(attempt, 3)), 0.1))
            attempt += 1

    def status(self, txid: str) -> Outcome:
        """The coordinator's outcome of ``txid``."""
        response = self._ask(
            "GetOutcome",
            lambda ch: self._coordinator(ch).GetOutcome(
                coordinator_pb2.GetOutcomeRequest(txid=txid), timeout=self._timeout
            ),
            read=True,
        )
        return Outcome.from_wire(response.outcome)

    def begin(self, timeout: float = 0.0) -> "Transaction":
        """Begins an interactive transaction (aborted by the coordinator if it is
        not committed within ``timeout`` seconds of idleness; 0: its default)."""
        request = coordinator_pb2.BeginRequest(timeout_ms=int(timeout * 1000))
        response = self._ask(
            "Begin", lambda ch: self._coordinator(ch).Begin(request, timeout=self._timeout), read=False
        )
        return Transaction(self, response.txid)

    # -- reads ------------------------------------------------------------

    def get(self, key: str) -> Optional[bytes]:
        """The committed value of ``key`` (None when absent)."""
        return self.get_many([key])[key]

    def get_many(self, keys: Iterable[str]) -> Dict[str, Optional[bytes]]:
        """Committed values of ``keys``, each read from its owner."""
        left = list(keys)
        for key in left:
            check_key(key)
        out: Dict[str, Optional[bytes]] = {}
        attempt = 0
        while True:
            epoch = max(self._view.routing.epoch, 1)
            by_owner: Dict[str, List[str]] = {}
            for key in left:
                by_owner.setdefault(self.route(key), []).append(key)
            left = []
            redirect: Optional[Exception] = None
            # A participant takes at most GET_KEYS keys per Get: more to one
            # owner go as several.
            asks = [
                (owner, owned[i : i + GET_KEYS])
                for owner, owned in by_owner.items()
                for i in range(0, len(owned), GET_KEYS)
            ]
            for owner, owned in asks:
                try:
                    response = self._kv(owner).Get(
                        kv_pb2.GetRequest(keys=owned, ring_epoch=epoch), timeout=self._timeout
                    )
                except grpc.RpcError as err:
                    if not _rerouted(reason_of(err)):
                        raise RpcError(f"Get at {owner}", err) from None
                    left += owned
                    redirect = RpcError(f"Get at {owner}", err)
                    continue
                for kv in response.values:
                    out[kv.key] = kv.value if kv.HasField("value") else None
                if response.HasField("redirect"):
                    left += list(response.redirect.keys)
                    redirect = DecreeError(f"Get at {owner}: {response.redirect.reason}")
            if not left:
                return out
            if not self._reroute_pause(attempt):
                raise redirect or DecreeError("keys kept moving")
            attempt += 1

    # -- the cluster ------------------------------------------------------

    def participants(self) -> List[Participant]:
        """Every enrolled participant."""
        response = self._ask(
            "ListParticipants",
            lambda ch: self._registry(ch).ListParticipants(
                registry_pb2.ListParticipantsRequest(), timeout=self._timeout
            ),
            read=True,
        )
        return [
            Participant(
                name=p.name,
                address=p.address,
                state=p.state,
                role="service" if p.role == registry_pb2.ROLE_SERVICE else "member",
                share=p.share,
                in_ring=p.in_ring,
            )
            for p in response.participants
        ]

    def retry(self, txid: str) -> Tuple[List[str], Outcome]:
        """Operator: redelivers phase two of ``txid`` now; the participants asked again, and its outcome."""
        response = self._ask(
            "Retry",
            lambda ch: self._coordinator(ch).Retry(coordinator_pb2.RetryRequest(txid=txid), timeout=self._timeout),
            read=True,
        )
        return list(response.participants), Outcome.from_wire(response.outcome)


class Transaction:
    """An interactive transaction: reads and writes at the KV participants
    under one txid (keys stay locked until the decision; reads see the
    transaction's own writes), then :meth:`commit` or :meth:`abort`.

    As a context manager it commits when the block ends normally and aborts
    when it raises::

        with client.begin() as tx:
            balance = tx.get_int("alice")
            tx.add("alice", -10)
            tx.add("bob", 10)
        print(tx.result.outcome)
    """

    def __init__(self, client: Client, txid: str) -> None:
        self._client = client
        self.txid = txid
        self.result: Optional[Result] = None
        self._aborted: Optional[Aborted] = None
        self._done = False

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if self._done:
            return
        if kind is None:
            self.commit()
        else:
            self.abort()

    def _execute(self, key: str, ops: Sequence[Op], get: Sequence[str]) -> List[Optional[bytes]]:
        if self._done:
            raise DecreeError(f"transaction {self.txid} is over")
        if self._aborted:
            raise self._aborted
        check_key(key)
        request = kv_pb2.ExecuteRequest(txid=self.txid, ops=list(ops), get=list(get))
        attempt = 0
        while True:
            owner = self._client.route(key)
            try:
                response = self._client._kv(owner).Execute(request, timeout=self._client._timeout)
                return [kv.value if kv.HasField("value") else None for kv in response.values]
            except grpc.RpcError as err:
                code = reason_of(err)
                if _rerouted(code) and self._client._reroute_pause(attempt):
                    attempt += 1
                    continue
                if err.code() != grpc.StatusCode.ABORTED:
                    raise RpcError(f"Execute at {owner}", err) from None
                # The branch is gone (a lost lock conflict, or its enlistment failed): end the
                # whole transaction now, so its other branches let go of their locks. The caller
                # hears it at once; the abort reaches the coordinator once one answers.
                self._aborted = Aborted(self.txid, err.details() or "", reason_name(code))
                self._client._abort_in_background(self.txid)
                raise self._aborted from None

    def get(self, key: str) -> Optional[bytes]:
        """The value of ``key`` as this transaction sees it; the key stays locked until the decision."""
        return self._execute(key, (), (key,))[0]

    def get_int(self, key: str) -> int:
        """The value of ``key`` as a decimal integer (absent: 0)."""
        value = self.get(key)
        if value is None:
            return 0
        try:
            return int(value.decode())
        except (UnicodeDecodeError, ValueError):
            raise DecreeError(f"{key!r} holds {value!r}, not a decimal integer") from None

    def put(self, key: str, value: Value) -> None:
        self._execute(key, (_put(key, value),), ())

    def add(self, key: str, delta: int) -> None:
        self._execute(key, (_add(key, delta),), ())

    def delete(self, key: str) -> None:
        self._execute(key, (_delete(key),), ())

    def commit(self) -> Result:
        """Two-phase commit over every participant the transaction worked at."""
        if self._done:
            raise DecreeError(f"transaction {self.txid} is over")
        self._done = True
        if self._aborted:
            self.result = Result(self.txid, Outcome.ABORTED, self._aborted.reason, self._aborted.code)
            return self.result
        self.result = self._client._commit_interactive(self.txid)
        return self.result

    def abort(self) -> None:
        """Every participant releases the transaction's locks and drops its writes."""
        if self._done:
            return
        self._done = True
        if self._aborted:
            return
        self._client._abort_interactive(self.txid)


def connect(url: str, *, timeout: float = 30.0, tls: Optional[Tls] = None) -> Client:
    """Connects to the coordinator at ``url`` (a group: its replicas' URLs
    separated by commas). ``https://`` URLs speak mutual TLS as ``tls``, or
    as the identity in DECREE_TLS_CERT, DECREE_TLS_KEY and DECREE_TLS_CA."""
    return Client(url, timeout=timeout, tls=tls)
