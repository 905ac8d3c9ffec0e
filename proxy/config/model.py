"""The configuration model: frozen, slotted dataclasses, validated at
construction, with the defaults and their reasons. Pure: no YAML, no aiohttp;
:mod:`proxy.config.load` is the only place that knows a file format.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from types import MappingProxyType
from typing import Final, Literal, get_args

from proxy.errors import ConfigError
from proxy.units import b64url

# RFC 6749 §2.3, RFC 7523 §2.2, RFC 8705 §2: how a client proves itself.
AuthMethod = Literal[
    "client_secret_basic",
    "client_secret_post",
    "client_secret_jwt",
    "private_key_jwt",
    "tls_client_auth",
    "self_signed_tls_client_auth",  # RFC 8705 §2.2: the AS knows the certificate itself
    "none",
]
TLS_METHODS: Final = frozenset({"tls_client_auth", "self_signed_tls_client_auth"})
AUTH_METHODS: Final = frozenset(get_args(AuthMethod))
SECRET_METHODS: Final = frozenset(
    {"client_secret_basic", "client_secret_post", "client_secret_jwt"}
)
TokenRequestFormat = Literal["form", "json"]  # RFC 6749 says form; some endpoints want JSON
TOKEN_REQUEST_FORMATS: Final = frozenset(get_args(TokenRequestFormat))
CacheBackend = Literal["memory", "redis"]
CACHE_BACKENDS: Final = frozenset(get_args(CacheBackend))
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: Final = frozenset(get_args(LogLevel))
LogFormat = Literal["json", "console"]
LOG_FORMATS: Final = frozenset(get_args(LogFormat))
# The HTTP/1.1 engine on both sides: only "lean" (proxy/http1: our own
# connections on aiohttp's C parsers). The aiohttp engine (web.Server and
# ClientSession) was removed in 0.2: docs/design.md says why.
Engine = Literal["lean"]
ENGINES: Final = get_args(Engine)

# Defaults, with the reason each has the value it has.
DEFAULT_LISTEN: Final = "127.0.0.1:8080"  # loopback: reaching the proxy means being trusted
DEFAULT_EXPIRY_MARGIN: Final = 30.0  # clock skew between us, the IdP and the partner
DEFAULT_REFRESH_AHEAD: Final = 0.10  # re-mint in the background with 10% of life left
DEFAULT_LIFETIME: Final = 300.0  # no expires_in and no JWT exp: assume 5 minutes
DEFAULT_REMINT_MIN_INTERVAL: Final = 10.0  # quota guard for expiry-triggered re-mints
DEFAULT_TOKEN_TIMEOUT: Final = 10.0  # whole mint exchange with the token endpoint
DEFAULT_MINT_ATTEMPTS: Final = 3  # calls per mint for transient failures, within the timeout
DEFAULT_FAILURE_COOLDOWN: Final = 30.0  # no call after rejected credentials (doubles on repeat)
DEFAULT_ROUTE_TIMEOUT: Final = 30.0  # to response headers, and between body chunks
DEFAULT_CONNECT_TIMEOUT: Final = 5.0  # a partner that takes longer to accept is not answering
DEFAULT_REPLAY_LIMIT: Final = 1024 * 1024  # request body kept for an expired-token replay
DEFAULT_LOCK_TTL: Final = 15.0  # a dead mint-lock holder blocks others at most this long
DEFAULT_SHUTDOWN_GRACE: Final = 20.0  # in-flight requests get this long to finish on SIGTERM
# How often the config file and every file it names (secrets, keys,
# certificates) are re-read: a Kubernetes secret swapped through its symlink
# is in use within this long, with no SIGHUP. 0 turns watching off.
DEFAULT_WATCH_INTERVAL: Final = 10.0
MAX_WORKERS: Final = 64  # more processes than this on one host is a misconfiguration
# inbound: aiohttp's and nginx's own defaults (8 KiB lines, 100 fields), so an
# app that works through either works through this proxy.
DEFAULT_MAX_HEADER_SIZE: Final = 8190  # bytes of the request line and of each header line
DEFAULT_MAX_HEADERS: Final = 100
DEFAULT_HEADER_TIMEOUT: Final = 10.0  # to receive a request's head (slowloris)
DEFAULT_BODY_TIMEOUT: Final = 60.0  # nginx's client_body_timeout: between two body chunks
DEFAULT_IDLE_TIMEOUT: Final = 60.0  # a keep-alive connection with no request in flight
# egress: (issue 14, docs/egress.md)
DEFAULT_LEAF_LIFETIME: Final = 86400.0  # a day: a leaked leaf key is short-lived
DEFAULT_TUNNEL_IDLE_TIMEOUT: Final = 300.0  # a blind tunnel with no byte either way is closed
DEFAULT_TUNNEL_CONNECT_TIMEOUT: Final = DEFAULT_CONNECT_TIMEOUT
INTERCEPT_PORT: Final = 443  # interception is for HTTPS on its port; any other port is refused


def _require(condition: bool, where: str, what: str) -> None:
    """Construction-time validation: the loader names the file and line; a
    model built in code gets the field."""
    if not condition:
        raise ConfigError(f"{where}: {what}")


@dataclass(frozen=True, slots=True)
class DpopConfig:
    """``clients.<name>.dpop``: the key this client's tokens are bound to
    (RFC 9449), read at load. A new key (a new file at the same path too)
    means new tokens: the key is part of the client's fingerprint."""

    key_file: str
    alg: str  # ES256, PS256, RS256 or EdDSA; checked against the key at load
    key: str = field(repr=False, default="")  # PEM
    jwk: str = ""  # the public key as canonical JSON (RFC 7638 §3)

    @property
    def thumbprint(self) -> str:
        """RFC 7638: what a DPoP-bound token's ``cnf.jkt`` names."""
        return b64url(hashlib.sha256(self.jwk.encode()).digest())


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """One OAuth 2.0 client (RFC 6749 §4.4 client-credentials grant)."""

    name: str
    token_url: str
    client_id: str
    client_secret: str | None = field(repr=False)
    auth_method: AuthMethod = "client_secret_basic"
    scope: str | None = None
    params: tuple[tuple[str, str], ...] = ()
    expiry_margin: float = DEFAULT_EXPIRY_MARGIN
    refresh_ahead: float = DEFAULT_REFRESH_AHEAD
    default_lifetime: float = DEFAULT_LIFETIME
    remint_min_interval: float = DEFAULT_REMINT_MIN_INTERVAL
    timeout: float = DEFAULT_TOKEN_TIMEOUT
    ca_file: str | None = None
    warm: bool = False  # mint at start; /readyz waits for it
    private_key: str | None = field(default=None, repr=False)  # PEM, for private_key_jwt
    private_key_file: str | None = None
    key_id: str | None = None  # the assertion's "kid"
    algorithm: str | None = None  # of the assertion: HS256 (secret) or RS256/PS256/ES256 (key)
    assertion_audience: str | None = None  # "aud" of the assertion; default the token_url
    assertion_headers: tuple[tuple[str, str], ...] = ()  # x5t / x5t#S256 from certificate_file
    client_cert_file: str | None = None  # mTLS to the token endpoint (tls_client_auth)
    client_key_file: str | None = None
    tls_stamp: str = ""  # digest of ca/cert/key contents: a reload with new files differs
    token_headers: tuple[tuple[str, str], ...] = ()  # extra headers on the token request
    token_request_format: TokenRequestFormat = "form"  # noqa: S105
    mint_attempts: int = DEFAULT_MINT_ATTEMPTS
    failure_cooldown: float = DEFAULT_FAILURE_COOLDOWN
    dpop: DpopConfig | None = None  # sender-constrained tokens (RFC 9449)
    # RFC 8705 §3: tokens bound to the client certificate; every route of the
    # client presents it to the partner. ``certificate_thumbprint`` is its
    # x5t#S256, what a bound token's ``cnf`` names.
    certificate_bound: bool = False
    certificate_thumbprint: str = ""

    def __post_init__(self) -> None:
        where = f"client {self.name!r}"
        _require(self.auth_method in AUTH_METHODS, where, f"auth_method {self.auth_method!r}")
        _require(
            self.token_request_format in TOKEN_REQUEST_FORMATS,
            where,
            f"token_request_format {self.token_request_format!r}",
        )
        _require(
            self.auth_method not in SECRET_METHODS or bool(self.client_secret),
            where,
            f"auth_method {self.auth_method} needs a client_secret",
        )
        _require(self.timeout > 0, where, "timeout must be positive")
        _require(self.mint_attempts >= 1, where, "mint_attempts must be at least 1")
        _require(0 <= self.refresh_ahead < 1, where, "refresh_ahead must be in [0, 1)")
        _require(self.expiry_margin >= 0, where, "expiry_margin must not be negative")


@dataclass(frozen=True, slots=True)
class ExpiredTokenRule:
    """Extra, per-route ways a partner says "this token has expired".

    Either pattern may be ``None``. They add to the RFC 6750 default rule; they
    never replace it.
    """

    www_authenticate: re.Pattern[str] | None = None
    body: re.Pattern[bytes] | None = None


@dataclass(frozen=True, slots=True)
class InboundAuth:
    """Keys an app must present in ``header`` to use a route (one key a line in
    ``keys_file``). Only digests are held; the header never goes upstream."""

    header: str
    key_digests: tuple[bytes, ...] = field(repr=False)
    keys_file: str = ""


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """One partner route. ``scope`` is the effective scope (route's, else client's)."""

    name: str
    upstream: str
    client: str
    host: str | None = None
    path_prefix: str | None = None
    scope: str | None = None
    timeout: float = DEFAULT_ROUTE_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    ca_file: str | None = None
    replay_limit: int = DEFAULT_REPLAY_LIMIT
    expired_token: ExpiredTokenRule = ExpiredTokenRule()
    client_cert_file: str | None = None  # mTLS to the upstream
    client_key_file: str | None = None
    tls_stamp: str = ""
    token_header: str = "Authorization"  # noqa: S105 - a header name: where the token goes
    token_prefix: str = "Bearer "  # noqa: S105 - what precedes the token in that header
    max_body: int | None = None  # bytes; None: unlimited (streamed)
    max_concurrent: int | None = None  # requests in flight on this route; None: unlimited
    retry_idempotent: bool = True  # retry GET/HEAD/OPTIONS/PUT/DELETE once on a failed connection
    allow_from: tuple[IPv4Network | IPv6Network, ...] = ()  # empty: anyone who reaches us
    inbound_auth: InboundAuth | None = None

    def __post_init__(self) -> None:
        where = f"route {self.name!r}"
        _require(bool(self.host or self.path_prefix), where, "needs a host or a path_prefix")
        _require(self.timeout > 0, where, "timeout must be positive")
        _require(self.connect_timeout > 0, where, "connect_timeout must be positive")
        _require(self.replay_limit >= 0, where, "replay_limit must not be negative")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Where tokens are shared. ``memory``: this host (across its workers);
    ``redis``: every worker of every replica that uses the same Redis."""

    backend: CacheBackend = "memory"
    # redis://, rediss://, unix://, or redis+sentinel://[:password@]h1:p1,h2:p2/SERVICE[/DB]
    url: str | None = field(default=None, repr=False)  # may hold a password
    key_prefix: str = "authproxy"
    lock_ttl: float = DEFAULT_LOCK_TTL
    cluster: bool = False  # url names a node of a Redis Cluster

    def __post_init__(self) -> None:
        _require(self.backend in CACHE_BACKENDS, "cache", f"backend {self.backend!r}")
        _require(self.backend != "redis" or bool(self.url), "cache", "redis needs a url")
        _require(self.lock_ttl > 0, "cache", "lock_ttl must be positive")
        # The key's digest is the hash tag ({...}) that keeps a token and its
        # lock in one cluster slot: the prefix must not carry one of its own.
        _require("{" not in self.key_prefix and "}" not in self.key_prefix, "cache",
                 "key_prefix must not contain { or }")  # fmt: skip


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A ``redis+sentinel://`` URL, parsed: where the sentinels are and which
    primary they watch. ``password`` authenticates to the primary and to the
    sentinels alike."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> SentinelTarget:
        """Raises ValueError, never quoting the URL (it may hold a password)."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("redis+sentinel", "rediss+sentinel"):
            raise ValueError("expected redis+sentinel://[:password@]host:port,.../SERVICE[/DB]")
        userinfo, at, rest = rest.rpartition("@")
        password = userinfo.partition(":")[2] if at else None
        hosts, _, path = rest.partition("/")
        service, _, db = path.partition("/")
        sentinels = []
        for item in hosts.split(","):
            host, colon, port = item.strip().rpartition(":")
            if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("each sentinel must be host:port (26379 is the usual port)")
            sentinels.append((host.strip("[]"), int(port)))
        if not service:
            raise ValueError("name the primary's service after the hosts: .../SERVICE[/DB]")
        if db and not db.isdigit():
            raise ValueError("the database after the service must be a number")
        return cls(
            tuple(sentinels), service, int(db or 0), password or None, scheme == "rediss+sentinel"
        )


@dataclass(frozen=True, slots=True)
class InboundLimits:
    """``inbound:``: what the apps' side may cost the proxy."""

    max_header_size: int = DEFAULT_MAX_HEADER_SIZE
    max_headers: int = DEFAULT_MAX_HEADERS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT

    def __post_init__(self) -> None:
        for name in ("max_header_size", "max_headers", "header_timeout", "body_timeout",
                     "idle_timeout"):  # fmt: skip
            _require(getattr(self, name) > 0, "inbound", f"{name} must be positive")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``log:``: the level, and ``json`` for machines or ``console`` for a person."""

    level: LogLevel = "info"
    format: LogFormat = "json"

    def __post_init__(self) -> None:
        _require(self.level in LOG_LEVELS, "log", f"level {self.level!r}")
        _require(self.format in LOG_FORMATS, "log", f"format {self.format!r}")


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """``tracing:``: OpenTelemetry traces (issue 17, docs/operations.md). Off
    unless ``enabled``; the exporter, its endpoint and the sampler follow the
    standard ``OTEL_*`` variables, which ``sample_ratio`` and
    ``service_name`` (when set) override."""

    enabled: bool = False
    sample_ratio: float | None = None  # parent-based ratio sampling; None: OTEL_TRACES_SAMPLER
    service_name: str | None = None  # None: OTEL_SERVICE_NAME, else "authproxy"

    def __post_init__(self) -> None:
        _require(
            self.sample_ratio is None or 0.0 <= self.sample_ratio <= 1.0,
            "tracing",
            "sample_ratio must be from 0 to 1",
        )


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """``admin:``: the operations listener. ``auth_token_file`` holds the
    bearer token every admin endpoint but /healthz and /readyz asks for;
    without one the listener must be on loopback unless
    ``allow_unauthenticated`` says otherwise."""

    host: str
    port: int
    auth_token_file: str | None = None
    allow_unauthenticated: bool = False


_LABEL: Final = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9])?"  # a DNS label, lower-case
_TUNNEL_HOST: Final = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*")


@dataclass(frozen=True, slots=True)
class TunnelEntry:
    """One ``egress.tunnel`` entry: a host name (or ``*.`` and a domain, for
    any name below it, not the domain itself) and the one port it may be
    reached on, through a blind tunnel."""

    host: str  # lower-case, no trailing dot
    port: int

    def __post_init__(self) -> None:
        where = f"egress.tunnel {self.host}:{self.port}"
        _require(_TUNNEL_HOST.fullmatch(self.host) is not None, where, "expected a host name")
        _require(
            not self.host.replace(".", "").isdigit(),
            where,
            "IP addresses are refused: name the host",
        )
        _require(1 <= self.port <= 65535, where, "the port must be 1 to 65535")

    def covers(self, host: str, port: int) -> bool:
        if port != self.port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class InterceptConfig:
    """``egress.intercept``: the CA that signs the leaf certificates the proxy
    shows apps inside CONNECT tunnels to routed hosts."""

    ca_cert_file: str
    ca_key_file: str
    leaf_lifetime: float = DEFAULT_LEAF_LIFETIME
    stamp: str = ""  # digest of the CA files' contents: a reload with new files differs
    # "file:line: egress.intercept", for the CA errors found after the load
    where: str = field(default="egress.intercept", compare=False)

    def __post_init__(self) -> None:
        _require(self.leaf_lifetime >= 60, "egress.intercept", "leaf_lifetime must be 1m or more")


@dataclass(frozen=True, slots=True)
class EgressConfig:
    """``egress:``: what a ``CONNECT`` may reach. Without it every CONNECT is
    refused (the proxy is a closed proxy)."""

    intercept: InterceptConfig | None = None
    tunnel: tuple[TunnelEntry, ...] = ()
    tunnel_idle_timeout: float = DEFAULT_TUNNEL_IDLE_TIMEOUT
    tunnel_connect_timeout: float = DEFAULT_TUNNEL_CONNECT_TIMEOUT

    def __post_init__(self) -> None:
        _require(self.tunnel_idle_timeout > 0, "egress", "tunnel_idle_timeout must be positive")
        _require(
            self.tunnel_connect_timeout > 0, "egress", "tunnel_connect_timeout must be positive"
        )

    def tunnel_for(self, host: str, port: int) -> TunnelEntry | None:
        for entry in self.tunnel:
            if entry.covers(host, port):
                return entry
        return None


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated proxy.yaml. ``clients`` is read-only (a
    mapping proxy over a copy), like everything else here."""

    listen_host: str
    listen_port: int
    clients: Mapping[str, ClientConfig]
    routes: tuple[RouteConfig, ...]
    trust_forwarded_headers: bool = False
    workers: int = 1
    cache: CacheConfig = CacheConfig()
    admin: AdminConfig | None = None  # off when None
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    watch_interval: float = DEFAULT_WATCH_INTERVAL
    log: LogConfig = LogConfig()
    access_log: bool = True
    inbound: InboundLimits = InboundLimits()
    engine: Engine = "lean"
    egress: EgressConfig = EgressConfig()
    tracing: TracingConfig = TracingConfig()
    source: str = "<memory>"
    warnings: tuple[str, ...] = ()  # allowed but unwise (a literal secret, a readable key file)

    def __post_init__(self) -> None:
        object.__setattr__(self, "clients", MappingProxyType(dict(self.clients)))
        _require(1 <= self.workers <= MAX_WORKERS, "workers", f"1 to {MAX_WORKERS}")
        _require(self.engine in ENGINES, "engine", f"{self.engine!r}")
        names = [route.name for route in self.routes]
        _require(len(set(names)) == len(names), "routes", "route names must be unique")
        for route in self.routes:
            _require(
                route.client in self.clients,
                f"route {route.name!r}",
                f"client {route.client!r} is not defined",
            )
            client = self.clients.get(route.client)
            _require(
                client is None
                or client.dpop is None
                or route.token_header.lower() == "authorization",
                f"route {route.name!r}",
                f"client {route.client!r} has DPoP tokens, which go in Authorization (RFC 9449 "
                f"§7.1), not {route.token_header}",
            )
            if route.host is not None:
                entry = self.egress.tunnel_for(route.host, INTERCEPT_PORT)
                _require(
                    entry is None,
                    f"egress.tunnel {entry}",
                    f"covers {route.host}, the host of route {route.name!r}: a tunnel host "
                    "never gets a token; remove the entry or the route",
                )
