"""Prometheus metrics (prometheus_client), one :class:`Metrics` per running proxy.

Labels are route names, client names and scopes from proxy.yaml, statuses and
fixed outcome words: never a path, a header value or anything an app chose,
so cardinality stays bounded and no secret can become a label.

With several workers the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before
the workers start; prometheus_client then keeps each worker's values in
memory-mapped files there, and ``/metrics`` on any worker reports the sum of
all of them (counters and histograms summed, the in-flight gauge summed over
live workers, point-in-time gauges taken from the worker that wrote last).

The counts taken on every request (answers by route and status, token cache
hits, requests in flight) are plain integers on the request path, folded into
prometheus_client's objects before each scrape and, when they moved, within
:data:`FOLD_DELAY` of the first uncounted request (a scrape of another worker
sees them then): a locked ``inc()`` each costs more than the count itself
(issue 16). Histograms are observed as they happen.
"""

from __future__ import annotations

import asyncio
import os
from importlib import metadata
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
UNROUTED: Final = "(none)"  # the route label of requests that matched no route

# Seconds; proxy overhead is sub-millisecond, partners are tens to thousands of ms.
LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
MINT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FOLD_DELAY: Final = 0.25  # seconds a count may wait before it is folded into prometheus_client


def _version() -> str:
    try:
        return metadata.version("authproxy")
    except metadata.PackageNotFoundError:
        return "unknown"


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class ClientEvents:
    """:class:`~proxy.tokens.source.SourceEvents` for one client, labels bound once."""

    def __init__(self, metrics: Metrics, client: str) -> None:
        self._metrics = metrics
        self._hits = metrics.unfolded_hits(client)  # [hits not yet in the counter]
        self._miss = metrics.token_cache.labels(client, "miss")
        self._refresh = metrics.token_cache.labels(client, "refresh_ahead")
        self._ok = metrics.mints.labels(client, "success")
        self._error = metrics.mints.labels(client, "error")
        self._duration = metrics.mint_duration.labels(client)
        self._rotation = metrics.credentials_pending.labels(client)

    def hit(self) -> None:
        self._hits[0] += 1
        if not self._metrics.fold_due:
            self._metrics.fold_soon()

    def miss(self) -> None:
        self._miss.inc()

    def refresh_ahead(self) -> None:
        self._refresh.inc()

    def minted(self, seconds: float, ok: bool) -> None:
        (self._ok if ok else self._error).inc()
        self._duration.observe(seconds)

    def rotation(self, pending: bool) -> None:
        self._rotation.set(1 if pending else 0)


class RouteMetrics:
    """One route's request metrics, labels bound once at config load."""

    def __init__(self, metrics: Metrics, route: str) -> None:
        self._metrics = metrics
        self._route = route
        # answers by status not yet in the counter, shared by every table's
        # RouteMetrics of this name (a reload makes new ones)
        self._unfolded = metrics.unfolded_answers(route)
        self.duration = metrics.request_duration.labels(route)
        self.upstream = metrics.upstream_duration.labels(route)
        self.replayed = metrics.replays.labels(route, "replayed")
        self.passed_through = metrics.replays.labels(route, "passed_through")
        self.too_large = metrics.replays.labels(route, "too_large")
        self.nonce_replays = metrics.dpop_nonce_replays.labels(route)
        # This process's totals, for the status page (Prometheus has the rest).
        self.requests = 0
        self.errors = 0
        self.replays = 0

    def finished(self, status: int, seconds: float) -> None:
        self.requests += 1
        if status >= 500:
            self.errors += 1
        unfolded = self._unfolded
        unfolded[status] = unfolded.get(status, 0) + 1
        metrics = self._metrics
        if not metrics.fold_due:
            metrics.fold_soon()
        self.duration.observe(seconds)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess_dir()
        # Counts not yet folded, one entry per label set (bounded by the
        # names in proxy.yaml, as the labels are; reloads reuse them).
        self._answers: dict[str, dict[int, int]] = {}  # route -> status -> count
        self._hits: dict[str, list[int]] = {}  # client -> [count]
        self._answer_counters: dict[tuple[str, int], Counter] = {}
        self.fold_due = False  # a fold is scheduled
        self.inflight_count = 0  # requests in flight, folded into the inflight gauge
        r = self.registry
        self.requests = Counter(
            "authproxy_requests",
            "Requests answered, by route and status.",
            ["route", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "authproxy_request_duration_seconds",
            "Time from receiving a request to the end of its streamed response "
            "(the whole exchange as the app sees it, replay included).",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "authproxy_upstream_duration_seconds",
            "Time the upstream took to answer with response headers, per attempt.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.mints = Counter(
            "authproxy_token_mints",
            "Calls to the token endpoint, by client and outcome (success, error).",
            ["client", "outcome"],
            registry=r,
        )
        self.mint_duration = Histogram(
            "authproxy_token_mint_duration_seconds",
            "Duration of token endpoint calls.",
            ["client"],
            buckets=MINT_BUCKETS,
            registry=r,
        )
        self.token_cache = Counter(
            "authproxy_token_cache",
            "Token look-ups: hit (valid token in hand), miss (waited for a mint), "
            "refresh_ahead (a background refresh started).",
            ["client", "result"],
            registry=r,
        )
        self.replays = Counter(
            "authproxy_replays",
            "401s that said the token expired: replayed with a fresh token, passed_through "
            "(quota guard), too_large (body over replay_limit).",
            ["route", "outcome"],
            registry=r,
        )
        self.dpop_nonce_replays = Counter(
            "authproxy_dpop_nonce_replays",
            "Requests sent once more because the partner asked for a DPoP nonce "
            '(401 with DPoP error="use_dpop_nonce", RFC 9449 §9).',
            ["route"],
            registry=r,
        )
        self.token_expires_in = Gauge(
            "authproxy_token_expires_in_seconds",
            "Usable life left of the cached token (negative or absent: none cached).",
            ["client", "scope"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.inflight = Gauge(
            "authproxy_inflight_requests",
            "Requests being served right now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.cache_backend_up = Gauge(
            "authproxy_cache_backend_up",
            "1 while the shared token cache (Redis) answers, 0 while the proxy runs on its "
            "per-process fallback.",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.cache_backend_up.set(1)
        self.circuit_state = Gauge(
            "authproxy_token_circuit_state",
            "The client's token-endpoint circuit: 0 closed, 1 half-open (probing), 2 open "
            "(no calls: rejected credentials, Retry-After, or repeated failures).",
            ["client"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.credentials_pending = Gauge(
            "authproxy_credentials_rotation_pending",
            "1 while a client's new credentials have not minted yet (the previous "
            "credentials' token still serves); alert when it stays 1",
            ["client"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.config_reloads = Counter(
            "authproxy_config_reloads",
            "Config reloads, by outcome (success, error).",
            ["outcome"],
            registry=r,
        )
        self.connects = Counter(
            "authproxy_connect",
            "CONNECT requests, by outcome: intercepted (TLS completed with a leaf of the "
            "proxy's CA), tunneled (blind relay to an egress.tunnel entry), refused (403/405), "
            "failed (the app's TLS handshake failed, or the tunnel host could not be reached).",
            ["outcome"],
            registry=r,
        )
        self.tunnel_bytes = Counter(
            "authproxy_tunnel_bytes",
            "Bytes relayed through blind tunnels: up (app to host), down (host to app).",
            ["direction"],
            registry=r,
        )
        self.leaf_certificates = Counter(
            "authproxy_leaf_certificates_issued",
            "Leaf certificates the egress CA issued for intercepted hosts (one per host and "
            "leaf_lifetime, renewed before it runs out).",
            registry=r,
        )
        self.build_info = Gauge(
            "authproxy_build_info",
            "1, labelled with the running authproxy version.",
            ["version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(_version()).set(1)

    def for_client(self, client: str) -> ClientEvents:
        return ClientEvents(self, client)

    def for_route(self, route: str) -> RouteMetrics:
        return RouteMetrics(self, route)

    def fold_soon(self) -> None:
        """Fold the counts within FOLD_DELAY (the first uncounted one calls this)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # counted outside a loop (a unit test): at once
            self.fold()
            return
        self.fold_due = True
        loop.call_later(FOLD_DELAY, self.fold)

    def unfolded_answers(self, route: str) -> dict[int, int]:
        return self._answers.setdefault(route, {})

    def unfolded_hits(self, client: str) -> list[int]:
        return self._hits.setdefault(client, [0])

    def fold(self) -> None:
        """Move the plain counts into prometheus_client's objects."""
        self.fold_due = False
        for route, answers in self._answers.items():
            for status, count in answers.items():
                counter = self._answer_counters.get((route, status))
                if counter is None:
                    counter = self.requests.labels(route, str(status))
                    self._answer_counters[(route, status)] = counter
                counter.inc(count)
            answers.clear()
        for client, hits in self._hits.items():
            if hits[0]:
                self.token_cache.labels(client, "hit").inc(hits[0])
                hits[0] = 0
        self.inflight.set(self.inflight_count)

    def render(self) -> bytes:
        """The Prometheus text exposition of this proxy (all workers when several)."""
        self.fold()
        if self.multiprocess is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=self.multiprocess)  # type: ignore[no-untyped-call]
        return generate_latest(merged)


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters keep counting in the sum)."""
    path = multiprocess_dir()
    if path is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
