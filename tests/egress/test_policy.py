"""What a CONNECT may reach (proxy/egress/policy.py), as plain values: no
socket, a stand-in issuer."""

from __future__ import annotations

import ssl

import pytest

from proxy.config.model import EgressConfig, TunnelEntry
from proxy.egress.policy import EgressPolicy, Intercept, Tunnel, parse_connect_target
from proxy.errors import BadRequest, CAError, ConnectNotAllowed, MethodNotAllowed


class Issuer:
    def __init__(self) -> None:
        self.asked: list[str] = []

    def permits(self, host: str) -> bool:
        return host.endswith(".example")

    def leaf_context(self, host: str) -> ssl.SSLContext:
        self.asked.append(host)
        if not self.permits(host):
            raise CAError(f"the egress CA may not sign for {host}")
        return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)


EGRESS = EgressConfig(
    tunnel=(TunnelEntry("pypi.org", 443), TunnelEntry("*.cdn.example", 8443)),
    tunnel_idle_timeout=7.0,
    tunnel_connect_timeout=2.0,
)
ROUTED = {"api.acme.example": "acme", "api.other.test": "other"}


def policy(issuer: Issuer | None = None) -> EgressPolicy:
    return EgressPolicy(EGRESS, ROUTED, issuer)


@pytest.mark.parametrize(
    ("raw", "host", "port"),
    [
        ("API.Acme.Example:443", "api.acme.example", 443),
        ("h.:1", "h", 1),
        ("[::1]:443", "[::1]", 443),
    ],
)
def test_an_authority_form_target(raw: str, host: str, port: int) -> None:
    target = parse_connect_target(raw)
    assert (target.host, target.port) == (host, port)


@pytest.mark.parametrize(
    "raw",
    [
        "hq",
        "hq:",
        "hq:0",
        "hq:65536",
        "/path",
        "http://hq:443",
        "u@hq:443",
        "hq:443/x",
        "hq :443",
        ":443",
    ],
)
def test_anything_else_is_a_400_that_quotes_nothing(raw: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_connect_target(raw)
    assert raw not in caught.value.message


def test_a_routed_host_on_443_is_intercepted_with_its_sni_guard() -> None:
    issuer = Issuer()
    plan = policy(issuer).plan("api.acme.example:443")
    assert isinstance(plan, Intercept) and plan.host == "api.acme.example"
    assert plan.context.sni_callback is not None
    assert plan.context.sni_callback(None, "API.acme.example.", plan.context) is None  # type: ignore[arg-type]
    assert plan.context.sni_callback(None, None, plan.context) is None  # type: ignore[arg-type]
    refused = plan.context.sni_callback(None, "evil.example", plan.context)  # type: ignore[arg-type]
    assert refused == ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME


def test_without_intercept_a_routed_host_is_405_naming_the_route() -> None:
    with pytest.raises(MethodNotAllowed, match=r"route 'acme'.*egress\.intercept"):
        policy().plan("api.acme.example:443")


def test_a_tunnel_entry_gets_a_blind_tunnel_with_the_entry_and_timeouts() -> None:
    plan = policy(Issuer()).plan("a.b.cdn.example:8443")
    assert plan == Tunnel("a.b.cdn.example", 8443, "*.cdn.example:8443", 2.0, 7.0)
    assert isinstance(policy().plan("pypi.org:443"), Tunnel)


@pytest.mark.parametrize(
    "raw",
    [
        "10.1.2.3:443",
        "[::1]:443",
        "api.acme.example:8443",  # a routed host, another port
        "pypi.org:80",  # a tunnel host, another port
        "cdn.example:8443",  # *.cdn.example covers names below only
        "elsewhere.example:443",
    ],
)
def test_everything_else_is_403_naming_the_target_and_asks_for_no_leaf(raw: str) -> None:
    issuer = Issuer()
    with pytest.raises(ConnectNotAllowed) as caught:
        policy(issuer).plan(raw)
    assert raw.lower() in caught.value.message
    assert issuer.asked == []


def test_a_leaf_the_ca_may_not_sign_is_a_403_not_a_crash() -> None:
    with pytest.raises(ConnectNotAllowed, match="may not sign"):
        policy(Issuer()).plan("api.other.test:443")
