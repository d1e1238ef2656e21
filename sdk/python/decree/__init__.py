"""decree's Python SDK: a client for two-phase-commit transactions
(:func:`connect`), and a framework for services that take part in them
(:mod:`decree.participant`)."""

from decree.client import (
    Aborted,
    Client,
    DecreeError,
    Outcome,
    OutcomeUnknown,
    Participant,
    Result,
    RpcError,
    Transaction,
    add,
    connect,
    delete,
    expect,
    kv_payload,
    put,
)
from decree.participant import READ_ONLY, Ready, Refused, Service
from decree.ring import Ring, Routing, hash64
from decree.tls import Policy, Tls, TlsError

__all__ = [
    "Aborted",
    "Client",
    "DecreeError",
    "Outcome",
    "OutcomeUnknown",
    "Participant",
    "Policy",
    "READ_ONLY",
    "Ready",
    "Refused",
    "Result",
    "Ring",
    "Routing",
    "RpcError",
    "Service",
    "Tls",
    "TlsError",
    "Transaction",
    "add",
    "connect",
    "delete",
    "expect",
    "hash64",
    "kv_payload",
    "put",
]
