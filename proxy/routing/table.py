"""One loaded configuration's routes at request time: the immutable
:class:`RouteTable` (swapped whole on reload) and each route's precomputed
:class:`RouteRuntime`: its upstream :class:`Endpoint`, token source,
concurrency gate and metrics.
"""

from __future__ import annotations

import ssl as ssl_module
from collections.abc import Mapping
from dataclasses import dataclass

from yarl import URL

from proxy.config.model import ClientConfig, Config, RouteConfig
from proxy.egress.policy import EgressPolicy
from proxy.errors import (
    RouteBusy,
)
from proxy.metrics import Metrics, RouteMetrics
from proxy.routing.router import Router, UpstreamBase
from proxy.tls import default_tls, ssl_context
from proxy.tokens.dpop import DpopKey, Nonces
from proxy.tokens.source import SharedTokenSource


@dataclass(frozen=True, slots=True)
class RouteRuntime:
    """What a route needs at request time, precomputed at config load."""

    config: RouteConfig
    base: UpstreamBase
    source: SharedTokenSource
    endpoint: Endpoint
    reads_401_body: bool
    metrics: RouteMetrics
    gate: Gate
    drop_headers: frozenset[str]  # the inbound key headers (every route's): never forwarded
    body_timeout: float
    guarded: bool  # allow_from or inbound_auth to check
    # RFC 9449: the client's DPoP key (a proof on every request) and the
    # process's nonces, shared with the token side; None without ``dpop``.
    dpop: DpopKey | None = None
    nonces: Nonces | None = None


class Gate:
    """Counts a route's requests in flight against its ``max_concurrent``."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.inflight = 0

    def enter(self, route: str) -> None:
        if self.limit is not None and self.inflight >= self.limit:
            raise RouteBusy.at(
                route, f"{self.limit} requests in flight (max_concurrent); retry shortly"
            )
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1


class RouteTable:
    """One loaded config's routes, immutable; swapped whole on reload."""

    def __init__(
        self, config: Config, runtimes: Mapping[str, RouteRuntime], egress: EgressPolicy
    ) -> None:
        self.config = config
        self.egress = egress  # what a CONNECT may reach (proxy/egress/policy.py)
        self.router: Router[RouteRuntime] = Router(
            [(route, runtimes[route.name]) for route in config.routes]
        )


def route_runtime(
    route: RouteConfig,
    source: SharedTokenSource,
    metrics: Metrics,
    body_timeout: float,
    client: ClientConfig | None = None,
    nonces: Nonces | None = None,
    key_headers: frozenset[str] = frozenset(),
) -> RouteRuntime:
    """``key_headers``: every route's ``inbound_auth`` header, lower-case: an
    app's proxy key is a credential for the proxy, never for any partner."""
    base = UpstreamBase.parse(route.upstream)
    dpop = None
    if client is not None and client.dpop is not None:
        from proxy.tokens.dpop import DpopKey

        dpop = DpopKey(client.dpop)
    return RouteRuntime(
        config=route,
        base=base,
        source=source,
        # ``timeout`` bounds the wait for the answer's head and each gap between
        # body chunks, never the whole exchange: long downloads and event
        # streams live as long as data keeps coming.
        endpoint=Endpoint.build(
            base.origin,
            ssl_context(
                route.ca_file, route.client_cert_file, route.client_key_file, route.tls_stamp
            ),
            route.connect_timeout,
            route.timeout,
        ),
        reads_401_body=route.expired_token.body is not None,
        metrics=metrics.for_route(route.name),
        gate=Gate(route.max_concurrent),
        drop_headers=key_headers
        | frozenset({route.inbound_auth.header.lower()} if route.inbound_auth else ()),
        body_timeout=body_timeout,
        guarded=bool(route.allow_from) or route.inbound_auth is not None,
        dpop=dpop,
        nonces=nonces if dpop is not None else None,
    )


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a route's requests go and how long to wait; built at config load."""

    origin: str  # scheme://host[:port], the pool key together with ``ssl``
    host: str  # to connect to (no brackets)
    port: int
    ssl: ssl_module.SSLContext | None  # None: plain HTTP
    connect_timeout: float
    read_timeout: float  # for the answer's head and each gap in its body

    @classmethod
    def build(
        cls,
        origin: str,
        tls: ssl_module.SSLContext | bool,
        connect_timeout: float,
        read_timeout: float,
    ) -> Endpoint:
        url = URL(origin)
        https = url.scheme == "https"
        context: ssl_module.SSLContext | None = None
        if https:
            context = tls if isinstance(tls, ssl_module.SSLContext) else default_tls()
        return cls(
            origin=origin,
            host=url.raw_host or "",
            port=url.port or (443 if https else 80),
            ssl=context,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
