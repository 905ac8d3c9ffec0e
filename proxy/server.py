"""Assembly: from a :class:`~proxy.config.model.Config` to a listening proxy.

:class:`ProxyServer` owns the two client sessions, one
:class:`~proxy.tokens.source.SharedTokenSource` per (client, scope), the route table
and the listening socket. It is where the pieces are wired, and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import aiohttp
from aiohttp import web

from proxy.compiled import compiled_modules
from proxy.config.load import load_config
from proxy.config.model import Config
from proxy.egress.policy import build_policy
from proxy.errors import CacheUnavailable, ConfigError, TokenError
from proxy.forwarding.forwarder import Forwarder
from proxy.forwarding.seams import UpstreamClient
from proxy.http1.listener import AppExchange, Listener
from proxy.http1.upstream import LeanClient
from proxy.log import configure_logging, flush_logs, get_logger
from proxy.metrics import Metrics
from proxy.routing.table import RouteTable, route_runtime
from proxy.tokens.cache import (
    TokenCache,
)
from proxy.tokens.dpop import Nonces
from proxy.tokens.minter import ClientCredentialsMinter
from proxy.tokens.session import token_session
from proxy.tokens.source import SharedTokenSource
from proxy.tokens.sources import TokenSources, build_cache
from proxy.tokens.token import iso_time
from proxy.tracing import Tracing
from proxy.tracing import build as build_tracing

WORKER_PORT_ENV: Final = "AUTHPROXY_WORKER_PORT"  # set by the supervisor for its workers
ADMIN_PORT_ENV: Final = "AUTHPROXY_ADMIN_PORT"  # ... and the admin port it reserved
RUNTIME_DIR_ENV: Final = "AUTHPROXY_RUNTIME_DIR"
WARM_RETRY_MAX: Final = 30.0  # seconds between attempts to warm a client that keeps failing
# Young passes before a middle-generation pass (Python: 10), Python 3.11-3.13.
GC_OLDER_EVERY: Final = 100
# Keys that shape sockets, processes or the shared cache: read at start only.
RESTART_ONLY: Final = (
    "listen_host", "listen_port", "admin", "workers", "cache", "shutdown_grace", "inbound",
    "engine", "tracing",
)  # fmt: skip
log = get_logger("proxy.server")


def bound_port(site: web.TCPSite) -> int:
    """The port a started site listens on (the chosen one when asked for port 0)."""
    server = cast(asyncio.Server, site._server)
    return int(server.sockets[0].getsockname()[1])


def build_table(
    config: Config,
    sources: TokenSources,
    metrics: Metrics,
    previous: RouteTable | None = None,
    nonces: Nonces | None = None,
) -> RouteTable:
    """The request-time form of ``config``. Raises ConfigError (the egress CA)
    before it changes anything."""
    egress = build_policy(
        config,
        previous=previous.egress if previous is not None else None,
        on_issue=metrics.leaf_certificates.inc,
    )
    key_headers = frozenset(
        route.inbound_auth.header.lower() for route in config.routes if route.inbound_auth
    )
    runtimes = {
        route.name: route_runtime(
            route,
            sources.get(config.clients[route.client], route.scope),
            metrics,
            config.inbound.body_timeout,
            config.clients[route.client],
            nonces,
            key_headers,
        )
        for route in config.routes
    }
    sources.keep_only({(route.client, route.scope or "") for route in config.routes})
    return RouteTable(config, runtimes, egress)


@dataclass(slots=True)
class ReloadResult:
    ok: bool
    message: str
    restart_needed: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"reloaded": self.ok, "message": self.message}
        if self.restart_needed:
            body["restart_needed"] = self.restart_needed
        return body


class ProxyServer:
    """The running proxy. ``start()`` then ``stop()``; not restartable.

    ``clock`` is wall-clock seconds, injected by tests to move time. A worker
    started by the supervisor passes ``port`` and ``admin_port`` (the ports the
    supervisor reserved), ``reuse_port`` and its ``runtime_dir``.
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        port: int | None = None,
        admin_port: int | None = None,
        reuse_port: bool = False,
        runtime_dir: str | None = None,
        supervised: bool = False,
        manage_logging: bool = False,
    ) -> None:
        self.config = config
        self._manage_logging = manage_logging
        self._clock = clock
        self._reuse_port = reuse_port
        self._runtime_dir = runtime_dir
        self._supervised = supervised
        self.cache: TokenCache | None = None
        self.metrics = Metrics()
        self.nonces = Nonces()  # DPoP-Nonce by origin: the token and partner sides share it
        self.tracing: Tracing | None = None
        self._listener: Listener | None = None
        self._admin_runner: web.AppRunner | None = None
        self._admin_server: asyncio.Server | None = None
        self._upstream: UpstreamClient | None = None
        self._tokens: aiohttp.ClientSession | None = None
        self._warming: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.sources: TokenSources | None = None
        self.forwarder: Forwarder | None = None
        self.port: int = config.listen_port if port is None else port
        self.admin_port: int | None = (
            admin_port if admin_port is not None else (config.admin.port if config.admin else None)
        )
        self.draining = False
        self.listening = False
        self._loaded = config  # as last read from the file: what the watcher compares
        self._started_at = clock()
        self._loaded_at = self._started_at
        self._last_reload: tuple[float, str] | None = None  # (when, "success" | "error")
        self._watcher: asyncio.Task[None] | None = None
        self._watch_error: str | None = None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            # A bind that fails leaves no session or admin listener open.
            await self._stop_admin()
            await self._close_clients()
            raise
        watched = os.path.isfile(self.config.source)  # noqa: ASYNC240 - one stat at start
        if self.config.watch_interval > 0 and watched:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_files())

    async def _watch_files(self) -> None:
        """Re-read the config file and every file it names each
        ``watch_interval``; a change in any (a secret swapped through its
        Kubernetes symlink, a new certificate) reloads, as SIGHUP does."""
        while True:
            await asyncio.sleep(self.config.watch_interval)
            if self.draining:
                return
            try:
                new = await asyncio.to_thread(load_config, self.config.source)
            except ConfigError as exc:
                if str(exc) != self._watch_error:  # once per distinct fault
                    self._watch_error = str(exc)
                    log.warning("watch_reload_rejected", config=self.config.source, reason=str(exc))
                continue
            self._watch_error = None
            if new != self._loaded:
                log.info("config_files_changed", config=self.config.source)
                self.reload(new)

    async def _start(self) -> None:
        self._upstream = LeanClient()
        self._tokens = token_session()
        self.cache = build_cache(
            self.config, self._runtime_dir, self._clock, self.metrics.cache_backend_up.set
        )
        tokens, clock, nonces = self._tokens, self._clock, self.nonces
        self.tracing = tracing = build_tracing(self.config.tracing)
        self.sources = TokenSources(
            self.cache,
            lambda client: ClientCredentialsMinter(
                client, tokens, clock, nonces=nonces, tracing=tracing
            ),
            clock,
            self.metrics,
        )
        self.forwarder = Forwarder(
            build_table(self.config, self.sources, self.metrics, nonces=self.nonces),
            self._upstream,
            self.metrics,
            tracing,
        )
        if self.config.admin is not None:
            await self._start_admin(self.config.admin.host)
        serve: Callable[[AppExchange], Awaitable[None]] = self.forwarder.serve  # AppSide check
        self._listener = Listener(serve, self.config.inbound)
        self.port = await self._listener.start(
            self.config.listen_host, self.port, reuse_port=self._reuse_port
        )
        self.listening = True
        self._warm()
        for warning in (*self.config.warnings, *self.forwarder.table.egress.warnings):
            log.warning("config_warning", reason=warning)
        log.info(
            "listening",
            host=self.config.listen_host,
            port=self.port,
            admin_port=self.admin_port,
            routes=[route.name for route in self.config.routes],
            config=self.config.source,
            compiled=compiled_modules(),  # the compiled build's modules (setup.py); [] when pure
        )

    async def _start_admin(self, host: str) -> None:
        from proxy.ops.admin import MAX_HEADERS as ADMIN_MAX_HEADERS
        from proxy.ops.admin import MAX_LINE as ADMIN_MAX_LINE
        from proxy.ops.admin import AdminRequestHandler, admin_app, loopback_name

        auth_token = None
        assert self.config.admin is not None
        if self.config.admin.auth_token_file is not None:
            with open(self.config.admin.auth_token_file, encoding="utf-8") as file:  # noqa: ASYNC230 - once, at start
                auth_token = file.read().strip()
        app = admin_app(self, auth_token, loopback_only=loopback_name(host))
        self._admin_runner = web.AppRunner(app, access_log=None)
        await self._admin_runner.setup()
        # The runner's server, with the admin port's own connection handler
        # (its refusals never quote the request: AdminRequestHandler).
        manager = self._admin_runner.server
        assert manager is not None
        loop = asyncio.get_running_loop()
        self._admin_server = await loop.create_server(
            lambda: AdminRequestHandler(
                manager,
                loop=loop,
                access_log=None,  # type: ignore[arg-type]  # no access log, as AppRunner(access_log=None)
                max_line_size=ADMIN_MAX_LINE,
                max_field_size=ADMIN_MAX_LINE,
                max_headers=ADMIN_MAX_HEADERS,
            ),
            host,
            self.admin_port,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
        )
        self.admin_port = int(self._admin_server.sockets[0].getsockname()[1])

    async def _stop_admin(self) -> None:
        if self._admin_server is not None:
            self._admin_server.close()  # no new connections; the runner ends the open ones
            self._admin_server = None
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://{_host(self.config.listen_host)}:{self.port}"

    @property
    def admin_url(self) -> str:
        assert self.config.admin is not None
        return f"http://{_host(self.config.admin.host)}:{self.admin_port}"

    # ------------------------------------------------------------ readiness

    def _warm(self) -> None:
        """Start one background mint per source of a ``warm: true`` client."""
        assert self.sources is not None
        loop = asyncio.get_running_loop()
        for client, source in self.sources.all():
            name = (client.name, source.key[1])
            if client.warm and name not in self._warming:
                self._warming[name] = loop.create_task(self._warm_one(source))

    async def _warm_one(self, source: SharedTokenSource) -> None:
        delay = 1.0
        while True:
            try:
                await source.token()
                return
            except TokenError as exc:
                log.warning("warm_failed", client=source.key[0], reason=exc.message)
            await asyncio.sleep(delay)
            delay = min(WARM_RETRY_MAX, delay * 2)

    def ready_reason(self) -> str | None:
        """Why this process should not get traffic now, or ``None`` when it should."""
        if self.draining:
            return "draining: shutting down, finishing in-flight requests"
        if not self.listening:
            return "starting"
        assert self.sources is not None
        for client, source in self.sources.all():
            if client.warm and source.cached() is None:
                why = f" ({source.last_error})" if source.last_error else ""
                return f"warming: client {client.name!r} has no token yet{why}"
        return None

    async def token_report(self) -> list[dict[str, Any]]:
        """Per (client, scope): is a token cached, its remaining life and
        minted-at time, the last mint error. Never the token itself."""
        assert self.sources is not None and self.cache is not None
        now = self._clock()
        report = []
        for client, source in self.sources.all():
            token = source.current
            with contextlib.suppress(CacheUnavailable):
                shared = await self.cache.get(source.key)
                if shared is not None and (token is None or shared.expires_at > token.expires_at):
                    token = shared
            valid = token is not None and token.valid(now)
            entry: dict[str, Any] = {
                "client": client.name,
                "scope": source.key[1] or None,
                "cached": valid,
                "last_error": source.last_error,
                # New credentials not yet minted; the previous ones' token serves.
                "rotation_pending": source.rotating,
                "mints_by_this_process": source.mints,
                "circuit": self.sources.guard(client).describe(now),
            }
            if token is not None and valid:
                entry.update(
                    expires_in_s=round(token.expires_at - now, 1),
                    refresh_in_s=round(max(0.0, token.refresh_at - now), 1),
                    minted_at=iso_time(token.minted_at),
                    expires_at=iso_time(token.expires_at),
                )
            report.append(entry)
        return report

    async def refresh_gauges(self) -> None:
        """Point-in-time gauges, set just before a scrape."""
        for entry in await self.token_report():
            self.metrics.token_expires_in.labels(entry["client"], entry["scope"] or "").set(
                entry.get("expires_in_s", 0.0)
            )
        self.metrics.cache_backend_up.set(1 if getattr(self.cache, "up", True) else 0)

    # ---------------------------------------------------------------- reload

    def reload(self, new: Config) -> ReloadResult:
        """Swap in ``new`` for new requests; in-flight ones finish on the old
        table. Tokens of clients whose credentials did not change are kept."""
        assert self.sources is not None and self.forwarder is not None
        loaded = new
        restart = [key for key in RESTART_ONLY if getattr(new, key) != getattr(self.config, key)]
        if restart:
            # Keep what cannot change live, so the running state stays coherent.
            new = _with_restart_only_keys(new, self.config)
        try:
            table = build_table(new, self.sources, self.metrics, self.forwarder.table, self.nonces)
        except ConfigError as exc:
            self.metrics.config_reloads.labels("error").inc()
            self._last_reload = (self._clock(), "error")
            log.error("reload_rejected", config=new.source, reason=str(exc))
            return ReloadResult(False, str(exc))
        self._loaded = loaded
        self._loaded_at = self._clock()
        self._last_reload = (self._loaded_at, "success")
        self.forwarder.table = table
        for warning in table.egress.warnings:
            log.warning("config_warning", reason=warning)
        if self._manage_logging and new.log != self.config.log:
            configure_logging(new.log.level, log_format=new.log.format, gather=True)
        self.config = new
        self._warm()
        for warning in new.warnings:
            log.warning("config_warning", reason=warning)
        self.metrics.config_reloads.labels("success").inc()
        message = f"{new.source}: {len(new.routes)} routes, {len(new.clients)} clients"
        log.info("reloaded", config=new.source, routes=[route.name for route in new.routes])
        if restart:
            log.warning(
                "restart_needed",
                config=new.source,
                keys=restart,
                reason="these keys are read at start only; the running values are kept",
            )
        return ReloadResult(True, message, restart)

    def reload_from_file(self) -> ReloadResult:
        """Re-read the config file; an invalid one changes nothing."""
        try:
            new = load_config(self.config.source)
        except ConfigError as exc:
            self.metrics.config_reloads.labels("error").inc()
            self._last_reload = (self._clock(), "error")
            log.error("reload_rejected", config=self.config.source, reason=str(exc))
            return ReloadResult(False, str(exc))
        return self.reload(new)

    def request_reload(self) -> ReloadResult:
        """``POST /reload``: one process reloads itself; a worker validates the
        file, then asks the supervisor to reload every worker (SIGHUP)."""
        if not self._supervised:
            return self.reload_from_file()
        try:
            load_config(self.config.source)
        except ConfigError as exc:
            self.metrics.config_reloads.labels("error").inc()
            log.error("reload_rejected", config=self.config.source, reason=str(exc))
            return ReloadResult(False, str(exc))
        os.kill(os.getppid(), signal.SIGHUP)
        return ReloadResult(True, "valid; every worker is reloading")

    # ------------------------------------------------------------------ stop

    async def _close_clients(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._upstream is not None:
            await self._upstream.close()
            self._upstream = None
        if self._tokens is not None:
            await self._tokens.close()
            self._tokens = None
        primary = getattr(self.cache, "primary", None)
        if primary is not None and hasattr(primary, "close"):
            await primary.close()
        if self.tracing is not None:
            # The batch exporter's last spans go out (its own timeout bounds it).
            await asyncio.to_thread(self.tracing.shutdown)
            self.tracing = None

    async def status(self) -> dict[str, Any]:
        """The status page's data (proxy.ops.status.Status); no secret in it."""
        assert self.sources is not None and self.forwarder is not None
        now = self._clock()
        report = await self.token_report()
        runtimes = self.forwarder.table.router
        routes = []
        for route in self.config.routes:
            matched = next((rt for r, rt in runtimes.entries if r.name == route.name), None)
            metrics = matched.metrics if matched is not None else None
            routes.append(
                {
                    "name": route.name,
                    "client": route.client,
                    "upstream": route.upstream,
                    "requests": metrics.requests if metrics else 0,
                    "errors": metrics.errors if metrics else 0,
                    "replays": metrics.replays if metrics else 0,
                }
            )
        clients = []
        for name, client in self.config.clients.items():
            circuit = self.sources.guard(client).describe(now)
            tokens = []
            for entry in (e for e in report if e["client"] == name):
                source = next(
                    (
                        s
                        for c, s in self.sources.all()
                        if c.name == name and (s.key[1] or None) == entry["scope"]
                    ),
                    None,
                )
                held = source.current if source is not None else None
                tokens.append(
                    {
                        "scope": entry["scope"],
                        "cached": entry["cached"],
                        "expires_in_s": entry.get("expires_in_s"),
                        "lifetime_s": (held.expires_at - held.minted_at) if held else None,
                        "minted_at": entry.get("minted_at"),
                        "last_mint_outcome": (
                            "error" if entry["last_error"] else ("success" if held else None)
                        ),
                        "last_error": entry["last_error"],
                        "rotation_pending": entry["rotation_pending"],
                    }
                )
            clients.append(
                {
                    "name": name,
                    "circuit": str(circuit.get("state", "closed")),
                    "circuit_reason": circuit.get("reason"),
                    "circuit_open_for_s": circuit.get("open_for_s"),
                    "tokens": tokens,
                }
            )
        settings = self.config.cache
        backend = (
            settings.backend if settings.backend == "redis" or not self._runtime_dir else "file"
        )
        try:
            content = await asyncio.to_thread(Path(self.config.source).read_bytes)
            stamp = hashlib.sha256(content).hexdigest()[:12]
        except OSError:
            stamp = "-"
        reason = self.ready_reason()
        return {
            "generated_at": iso_time(now),
            "uptime_s": round(now - self._started_at, 1),
            "ready": reason is None,
            "ready_reason": reason,
            "routes": routes,
            "clients": clients,
            "workers_configured": self.config.workers,
            "workers": [{"name": "this", "pid": os.getpid(), "this": True}],
            "cache": {
                "backend": backend,
                "url": settings.url,
                "up": bool(getattr(self.cache, "up", True)),
            },
            "config": {
                "source": self.config.source,
                "stamp": stamp,
                "loaded_at": iso_time(self._loaded_at),
                "last_reload_at": iso_time(self._last_reload[0]) if self._last_reload else None,
                "last_reload_outcome": self._last_reload[1] if self._last_reload else None,
            },
        }

    async def drop_tokens(self, client: str) -> dict[str, Any]:
        """``POST /tokens/CLIENT/drop``: the client's credentials are
        compromised; its tokens go here and in the shared cache, and the next
        request mints once (other workers stop using theirs within a second,
        when their shared-cache watcher looks). KeyError: no such client."""
        assert self.sources is not None
        dropped = await self.sources.drop(client)
        return {"client": client, "dropped": dropped}

    async def stop(self) -> None:
        """Draining stop: refuse new connections, let in-flight requests (long
        streams too) finish for up to ``shutdown_grace``, then close."""
        self.draining = True
        inflight = self.forwarder.inflight if self.forwarder else 0
        log.info("draining", inflight=inflight, grace_s=self.config.shutdown_grace)
        for task in self._warming.values():
            task.cancel()
        if self.sources is not None:
            self.sources.close()
        if self._listener is not None:
            await self._listener.shutdown(self.config.shutdown_grace)
        await self._stop_admin()
        await self._close_clients()
        self.metrics.fold()  # the last requests' counts, before the loop (and its timer) ends
        log.info("stopped")
        flush_logs()  # every gathered line out before the process may be killed


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _with_restart_only_keys(new: Config, old: Config) -> Config:
    from dataclasses import replace

    return replace(new, **{key: getattr(old, key) for key in RESTART_ONLY})


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor died (even by SIGKILL) stops by itself."""
    while not stop.is_set():
        if os.getppid() != parent:
            log.warning("supervisor_gone")
            stop.set()
        await asyncio.sleep(1.0)


async def serve_forever(config: Config) -> None:
    """Run until SIGINT or SIGTERM, then drain and stop; SIGHUP reloads.

    Under the supervisor (``AUTHPROXY_WORKER_PORT`` set) this is one worker:
    it binds the supervisor's ports with SO_REUSEPORT and shares its runtime dir.
    """
    worker_port = os.environ.get(WORKER_PORT_ENV)
    admin_port = os.environ.get(ADMIN_PORT_ENV)
    server = ProxyServer(
        config,
        port=int(worker_port) if worker_port else None,
        admin_port=int(admin_port) if admin_port else None,
        reuse_port=worker_port is not None,
        runtime_dir=os.environ.get(RUNTIME_DIR_ENV),
        supervised=worker_port is not None,
        manage_logging=True,
    )
    await server.start()
    # Everything built at start (modules, config, route table) lives as long as
    # the process: move it out of the collector's way, so that a full
    # collection walks only what requests allocate (shorter pauses, lower p99).
    gc.collect()
    gc.freeze()
    # A request's objects die by reference count: no request path makes a
    # cycle (tests/test_cycles.py holds that). The collector's passes over the
    # older generations then find nothing, and at 1,000 connections, where
    # every request in flight survives the young pass, they took 12 % of the
    # time (docs/performance.md, "The collector"). The middle pass runs after
    # 100 young ones instead of 10, and the full pass, which follows every
    # 10th middle one, ten times less often with it; the young threshold
    # keeps Python's default. Python 3.14's collector reads threshold1
    # differently (incremental): left at its default there.
    if sys.version_info < (3, 14):
        young, _, oldest = gc.get_threshold()
        gc.set_threshold(young, GC_OLDER_EVERY, oldest)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_from_file)
    watcher = None
    if worker_port is not None:
        watcher = loop.create_task(_watch_parent(os.getppid(), stop))
    try:
        await stop.wait()
        log.info("shutting_down")
        # A second SIGTERM while draining (an impatient orchestrator, a second ^C)
        # must not cut the streams the drain is waiting for.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: log.info("already_draining"))
        loop.remove_signal_handler(signal.SIGHUP)
    finally:
        if watcher is not None:
            watcher.cancel()
        await server.stop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
