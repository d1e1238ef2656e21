"""Mutual TLS and the role policy, as decree's servers speak them
(docs/security.md).

A process has one identity: its certificate (whose first DNS name is the
identity), its key, and the CA that vouches for every peer. Both sides of
every connection present a certificate. The same environment variables the
binaries read configure the SDK::

    DECREE_TLS_CERT, DECREE_TLS_KEY, DECREE_TLS_CA   (PEM files)
    DECREE_POLICY                                     (a participant's policy file)

A client connects to ``https://`` URLs with :meth:`Tls.from_env` (or the
``tls`` it is given). A participant with TLS serves only peers the CA
vouches for, and with a policy file only those whose roles the method
accepts: Prepare, Commit and Abort from the coordinator, the operator's
reads and resolutions from operators and observers, as the Rust
participants do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Optional

import grpc

try:  # Python 3.11 and later
    import tomllib as _toml
except ImportError:  # pragma: no cover - older Pythons with tomli installed
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ImportError:
        _toml = None  # type: ignore[assignment]

ENV_CERT = "DECREE_TLS_CERT"
ENV_KEY = "DECREE_TLS_KEY"
ENV_CA = "DECREE_TLS_CA"
ENV_POLICY = "DECREE_POLICY"

ROLES = frozenset({"participant", "coordinator", "client", "operator", "observer"})

#: The methods a participant serves and the roles that may call them (the
#: same table as the Rust policy's, tls/src/policy.rs).
METHODS: Dict[str, FrozenSet[str]] = {
    "/decree.v1.Participant/Prepare": frozenset({"coordinator"}),
    "/decree.v1.Participant/PrepareStream": frozenset({"coordinator"}),
    "/decree.v1.Participant/Commit": frozenset({"coordinator"}),
    "/decree.v1.Participant/CommitBatch": frozenset({"coordinator"}),
    "/decree.v1.Participant/CommitStream": frozenset({"coordinator"}),
    "/decree.v1.Participant/Abort": frozenset({"coordinator"}),
    "/decree.v1.Participant/ListInDoubt": frozenset({"operator", "observer"}),
    "/decree.v1.Participant/ListLocks": frozenset({"operator", "observer"}),
    "/decree.v1.Participant/Resolve": frozenset({"operator"}),
    "/decree.v1.Participant/ListHeuristics": frozenset({"operator", "observer"}),
}

#: Open to every peer the CA vouches for.
OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class TlsError(Exception):
    """A certificate, key, CA or policy that cannot be used: nothing was started."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise TlsError(f"cannot read the {what} {path}: {err.strerror}") from None


@dataclass(frozen=True)
class Tls:
    """This process's identity for mutual TLS: PEM certificate, key and CA."""

    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def load(cls, cert: str, key: str, ca: str) -> "Tls":
        return cls(_read(cert, "certificate"), _read(key, "key"), _read(ca, "CA"))

    @classmethod
    def from_env(cls) -> Optional["Tls"]:
        """From DECREE_TLS_CERT, DECREE_TLS_KEY and DECREE_TLS_CA; ``None``
        when none is set; an error naming what is missing when only some are."""
        paths = {name: os.environ.get(name, "") for name in (ENV_CERT, ENV_KEY, ENV_CA)}
        given = [name for name, path in paths.items() if path]
        if not given:
            return None
        missing = [name for name, path in paths.items() if not path]
        if missing:
            raise TlsError(f"{', '.join(given)} set without {', '.join(missing)}: mutual TLS needs all three")
        return cls.load(paths[ENV_CERT], paths[ENV_KEY], paths[ENV_CA])

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )


@dataclass(frozen=True)
class Policy:
    """Which identities hold which roles (``[identities]`` in TOML; ``"*"``: every peer)."""

    identities: Dict[str, FrozenSet[str]] = field(default_factory=dict)
    anyone: FrozenSet[str] = frozenset()

    @classmethod
    def parse(cls, text: str) -> "Policy":
        if _toml is None:
            raise TlsError("reading a policy needs Python 3.11 or later, or the tomli package")
        try:
            table = _toml.loads(text)
        except _toml.TOMLDecodeError as err:
            raise TlsError(f"the policy is not TOML: {err}") from None
        identities = table.get("identities", {})
        if not isinstance(identities, dict):
            raise TlsError("the policy's [identities] must be a table of role lists")
        parsed: Dict[str, FrozenSet[str]] = {}
        for identity, roles in identities.items():
            if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                raise TlsError(f"identity {identity!r}: roles must be a list of strings")
            unknown = sorted(set(roles) - ROLES)
            if unknown:
                raise TlsError(f"identity {identity!r}: unknown role {unknown[0]!r}: one of {', '.join(sorted(ROLES))}")
            parsed[identity] = frozenset(roles)
        anyone = parsed.pop("*", frozenset())
        return cls(identities=parsed, anyone=anyone)

    @classmethod
    def read(cls, path: str) -> "Policy":
        try:
            return cls.parse(_read(path, "policy").decode())
        except TlsError as err:
            raise TlsError(f"{path}: {err}") from None

    def roles(self, identity: Optional[str]) -> FrozenSet[str]:
        return self.anyone | (self.identities.get(identity, frozenset()) if identity else frozenset())

    def refusal(self, method: str, identity: Optional[str]) -> Optional[str]:
        """Why ``identity`` may not call ``method`` (``None``: it may)."""
        if method.startswith(OPEN):
            return None
        needed = METHODS.get(method, frozenset())
        roles = self.roles(identity)
        if needed & roles:
            return None
        who = identity or "a peer without identity"
        if not needed:
            return f"{method} is not a decree method: refused to {who}"
        wants = f"the {next(iter(needed))} role" if len(needed) == 1 else f"one of the roles {', '.join(sorted(needed))}"
        held = f"roles: {', '.join(sorted(roles))}" if roles else "no role"
        return f"{who} ({held}) may not call {method}: it needs {wants}"


def _identity(context: grpc.ServicerContext) -> Optional[str]:
    """The caller's identity: the first name its certificate gives."""
    names = context.peer_identities()
    return names[0].decode() if names else None


class Authorize(grpc.ServerInterceptor):
    """Refuses, with PERMISSION_DENIED and before any handler runs, every
    call whose caller lacks the roles its method needs."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        policy = self.policy

        def guard(behaviour: Callable[..., Any]) -> Callable[..., Any]:
            def guarded(request: Any, context: grpc.ServicerContext) -> Any:
                why = policy.refusal(method, _identity(context))
                if why is not None:
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
                return behaviour(request, context)

            return guarded

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                guard(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                guard(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                guard(handler.stream_unary), handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            guard(handler.stream_stream), handler.request_deserializer, handler.response_serializer
        )
