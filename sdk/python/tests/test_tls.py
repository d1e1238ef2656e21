"""The SDK's role policy and TLS configuration, without a cluster (the
TLS cluster itself is tests/tests/tls.rs)."""

import pytest

import decree
from decree.tls import Policy, Tls, TlsError

POLICY = """
[identities]
coordinator = ["coordinator"]
alice = ["operator"]
dashboard = ["observer"]
"*" = ["client"]
"""


def test_each_role_reaches_its_participant_methods_and_no_others():
    policy = Policy.parse(POLICY)
    assert policy.refusal("/decree.v1.Participant/Prepare", "coordinator") is None
    assert policy.refusal("/decree.v1.Participant/CommitBatch", "coordinator") is None
    assert policy.refusal("/decree.v1.Participant/Resolve", "alice") is None
    assert policy.refusal("/decree.v1.Participant/ListInDoubt", "dashboard") is None
    why = policy.refusal("/decree.v1.Participant/Prepare", "alice")
    # Worded as the Rust servers word it.
    assert why == "alice (roles: client, operator) may not call /decree.v1.Participant/Prepare: it needs the coordinator role"
    assert policy.refusal("/decree.v1.Participant/Resolve", "dashboard") is not None
    # Anyone the CA vouches for holds the "*" roles, and nothing more.
    assert policy.roles("stranger") == frozenset({"client"})
    assert policy.refusal("/decree.v1.Participant/Abort", None) is not None
    # An unknown method is refused to everyone; health checks are open.
    assert policy.refusal("/decree.v1.Participant/Nope", "coordinator") is not None
    assert policy.refusal("/grpc.health.v1.Health/Check", None) is None


@pytest.mark.parametrize(
    "text, why",
    [
        ("[identities", "not TOML"),
        ("identities = 3", "must be a table"),
        ('[identities]\np1 = "participant"', "must be a list"),
        ('[identities]\np1 = ["boss"]', "unknown role 'boss'"),
    ],
)
def test_a_bad_policy_is_refused_naming_what_is_wrong(text, why):
    with pytest.raises(TlsError, match=why):
        Policy.parse(text)


def test_tls_from_the_environment_needs_all_three_files(monkeypatch, tmp_path):
    for name in ("DECREE_TLS_CERT", "DECREE_TLS_KEY", "DECREE_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    assert Tls.from_env() is None
    monkeypatch.setenv("DECREE_TLS_CERT", str(tmp_path / "cert.pem"))
    with pytest.raises(TlsError, match="without DECREE_TLS_KEY, DECREE_TLS_CA"):
        Tls.from_env()
    monkeypatch.setenv("DECREE_TLS_KEY", str(tmp_path / "key.pem"))
    monkeypatch.setenv("DECREE_TLS_CA", str(tmp_path / "ca.pem"))
    with pytest.raises(TlsError, match="cannot read the certificate"):
        Tls.from_env()
    # A client given an https URL reports the same, before connecting.
    with pytest.raises(decree.DecreeError, match="cannot read the certificate"):
        decree.connect("https://127.0.0.1:1")
