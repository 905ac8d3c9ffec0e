"""What a ``CONNECT`` may reach (issue 14, docs/egress.md): the plan for one
CONNECT target, decided from ``egress:`` and the routes, and never more.

- port 443 of a host some route matches, with ``egress.intercept`` set:
  :class:`Intercept` (the proxy completes the app's TLS itself with a leaf
  of its CA; the requests inside are routed as ``https://host/...``);
- a ``host:port`` an ``egress.tunnel`` entry covers: :class:`Tunnel` (a
  blind relay, no token, no look inside);
- anything else: :class:`~proxy.errors.ConnectNotAllowed` (403), naming
  the host. A routed host without interception keeps the 405 and says how to
  turn it on. The proxy stays a closed proxy: no IP literal, no other port.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from proxy.config.model import INTERCEPT_PORT, Config, EgressConfig
from proxy.errors import BadRequest, CAError, ConfigError, ConnectNotAllowed, MethodNotAllowed
from proxy.log import get_logger

if TYPE_CHECKING:
    from proxy.egress.ca import CertificateAuthority

log = get_logger("proxy.egress")

# RFC 9112 §3.2.3: authority-form is uri-host ":" port, nothing else.
_AUTHORITY_FORM: Final = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^:/?#@\[\]\s]+):([0-9]{1,5})")
_IPV4: Final = re.compile(r"[0-9]+(?:\.[0-9]+){3}")
MAX_SNI: Final = 255  # a DNS name's limit: what a log line quotes of an app's SNI


@dataclass(frozen=True, slots=True)
class ConnectTarget:
    host: str  # lower-case, no trailing dot; an IPv6 literal keeps its brackets
    port: int

    @property
    def literal(self) -> bool:
        """An IP address rather than a name."""
        return self.host.startswith("[") or _IPV4.fullmatch(self.host) is not None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_connect_target(raw: str) -> ConnectTarget:
    """The target of ``CONNECT host:port``; raises BadRequest (never quoting it)."""
    match = _AUTHORITY_FORM.fullmatch(raw)
    if match is None or not 0 < int(match.group(2)) <= 65535:
        raise BadRequest("a CONNECT target must be host:port (RFC 9112 §3.2.3)")
    return ConnectTarget(match.group(1).lower().rstrip("."), int(match.group(2)))


class LeafIssuer(Protocol):
    """The egress CA as the policy needs it (proxy/egress/ca.py)."""

    def permits(self, host: str) -> bool: ...

    def leaf_context(self, host: str) -> ssl.SSLContext: ...


@dataclass(frozen=True, slots=True)
class Intercept:
    host: str
    context: ssl.SSLContext  # the app's side of the TLS: a leaf for ``host``, SNI checked


@dataclass(frozen=True, slots=True)
class Tunnel:
    host: str
    port: int
    entry: str  # the egress.tunnel entry that covers it, for the log
    connect_timeout: float
    idle_timeout: float


Plan = Intercept | Tunnel
SNIGuard = Callable[[ssl.SSLObject, str | None, ssl.SSLContext], int | None]


class EgressPolicy:
    """One loaded config's CONNECT rules; immutable, swapped with the route
    table on reload. ``routed`` maps each routed host to its first route."""

    def __init__(
        self,
        config: EgressConfig,
        routed: Mapping[str, str],
        issuer: LeafIssuer | None,
        warnings: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self._routed = dict(routed)
        self._issuer = issuer
        self.warnings = warnings
        self._guards = {host: _sni_guard(host) for host in self._routed}

    def plan(self, raw_target: str) -> Plan:
        """The plan for ``CONNECT raw_target``; raises BadRequest,
        ConnectNotAllowed or MethodNotAllowed."""
        target = parse_connect_target(raw_target)
        if target.literal:
            raise ConnectNotAllowed(
                f"CONNECT to {target}: IP addresses are refused; the proxy reaches named "
                "hosts only (docs/egress.md)"
            )
        route = self._routed.get(target.host)
        if route is not None and target.port == INTERCEPT_PORT:
            if self._issuer is None:
                raise MethodNotAllowed(
                    f"CONNECT to {target} (route {route!r}): HTTPS interception is off; set "
                    "egress.intercept with a CA the apps trust (docs/egress.md), or send the "
                    "request as plain http:// to the proxy"
                )
            return Intercept(target.host, self._context(target.host))
        entry = self.config.tunnel_for(target.host, target.port)
        if entry is not None:
            return Tunnel(
                target.host,
                target.port,
                str(entry),
                self.config.tunnel_connect_timeout,
                self.config.tunnel_idle_timeout,
            )
        if route is not None:
            raise ConnectNotAllowed(
                f"CONNECT to {target}: route {route!r} is intercepted on port {INTERCEPT_PORT} only"
            )
        raise ConnectNotAllowed(
            f"CONNECT to {target}: no route and no egress.tunnel entry covers this host and port"
        )

    @property
    def authority(self) -> CertificateAuthority | None:
        """The CA, when it is one (a reload with the same files reuses it)."""
        from proxy.egress.ca import CertificateAuthority

        return self._issuer if isinstance(self._issuer, CertificateAuthority) else None

    def _context(self, host: str) -> ssl.SSLContext:
        assert self._issuer is not None
        try:
            context = self._issuer.leaf_context(host)  # cached per host, renewed before expiry
        except CAError as exc:  # never a leaf outside the CA's constraints
            raise ConnectNotAllowed(f"CONNECT to {host}:{INTERCEPT_PORT}: {exc}") from None
        guard = self._guards[host]
        if context.sni_callback is not guard:
            context.sni_callback = guard
        return context


def _sni_guard(host: str) -> SNIGuard:
    """The SNI an app sends must name the CONNECT host (an app that sends
    none gets the CONNECT host's certificate): a mismatch fails the handshake
    (``unrecognized_name``; asyncio closes without sending the alert, so the
    app sees a reset) and a log line names both."""

    def check(_ssl: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext) -> int | None:
        if server_name is None or server_name.lower().rstrip(".") == host:
            return None
        log.warning("tunnel_sni_mismatch", host=host, sni=server_name[:MAX_SNI])
        return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME

    return check


def routed_hosts(config: Config) -> dict[str, str]:
    """Each host some route matches, and the first such route's name."""
    hosts: dict[str, str] = {}
    for route in config.routes:
        if route.host is not None:
            hosts.setdefault(route.host, route.name)
    return hosts


def build_policy(
    config: Config,
    *,
    previous: EgressPolicy | None = None,
    on_issue: Callable[[], None] | None = None,
) -> EgressPolicy:
    """The policy of ``config``, its CA loaded and checked: every routed host
    must lie inside the CA's name constraints. ``previous`` (the running
    policy, on reload) lends its CA and leaf cache when the CA files did not
    change. Raises ConfigError naming the host or the CA file; what is
    allowed but unwise is in the policy's ``warnings``."""
    routed = routed_hosts(config)
    intercept = config.egress.intercept
    if intercept is None:
        return EgressPolicy(config.egress, routed, None)
    ca: CertificateAuthority | None = None
    if previous is not None and previous.config.intercept == intercept:
        ca = previous.authority
    if ca is None:
        try:
            from proxy.egress.ca import CertificateAuthority
        except ImportError:  # pragma: no cover - depends on the install
            raise ConfigError(
                "egress.intercept needs the cryptography package: pip install 'authproxy[egress]'"
            ) from None
        try:
            ca = CertificateAuthority.load(
                intercept.ca_cert_file,
                intercept.ca_key_file,
                leaf_lifetime=intercept.leaf_lifetime,
                on_issue=on_issue,
            )
        except CAError as exc:
            raise ConfigError(f"{intercept.where}: {exc}") from None
    for host, route in routed.items():
        if not ca.permits(host):
            permitted = ", ".join(ca.constraints.permitted) or "none"
            raise ConfigError(
                f"{intercept.where}: route {route!r} has host {host}, which lies outside the "
                f"name constraints of the CA in {intercept.ca_cert_file!r} (permitted: "
                f"{permitted}); make a CA that permits it (authproxy ca init --permit {host})"
            )
    warnings: tuple[str, ...] = ()
    if not ca.constrained:
        warnings = (
            f"{intercept.where}: the CA in {intercept.ca_cert_file!r} carries no name "
            "constraints, so its key can sign for any name; make one that names the routed "
            "hosts (authproxy ca init --permit HOST)",
        )
    return EgressPolicy(config.egress, routed, ca, warnings)
