"""Assembly: from a :class:`~proxy.config.Config` to a listening proxy.

:class:`ProxyServer` owns the two client sessions, one
:class:`~proxy.source.SharedTokenSource` per (client, scope), the route table
and the listening socket. It is where the pieces are wired, and nowhere else.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Final, cast

import aiohttp
from aiohttp import web

from .cache import CacheKey, FallbackTokenCache, MemoryTokenCache, TokenCache, cache_key
from .config import ClientConfig, Config
from .forward import Forwarder, RouteTable, route_runtime
from .log import get_logger
from .minter import ClientCredentialsMinter
from .session import token_session, upstream_session
from .source import SharedTokenSource

SHUTDOWN_GRACE: Final = 20.0  # seconds in-flight requests get to finish on SIGTERM
WORKER_PORT_ENV: Final = "AUTHPROXY_WORKER_PORT"  # set by the supervisor for its workers
RUNTIME_DIR_ENV: Final = "AUTHPROXY_RUNTIME_DIR"

log = get_logger("proxy.server")


def bound_port(site: web.TCPSite) -> int:
    """The port a started site listens on (the chosen one when asked for port 0)."""
    server = cast(asyncio.Server, site._server)
    return int(server.sockets[0].getsockname()[1])


class TokenSources:
    """One :class:`SharedTokenSource` per (client, scope), created on first use.

    Sources survive a reload for clients whose configuration did not change, so
    their cached tokens are kept.
    """

    def __init__(
        self, cache: TokenCache, session: aiohttp.ClientSession, clock: Callable[[], float]
    ) -> None:
        self._cache = cache
        self._session = session
        self._clock = clock
        self._sources: dict[CacheKey, tuple[ClientConfig, SharedTokenSource]] = {}

    def get(self, client: ClientConfig, scope: str | None) -> SharedTokenSource:
        key = cache_key(client.name, scope)
        known = self._sources.get(key)
        if known is not None and known[0] == client:
            return known[1]
        minter = ClientCredentialsMinter(client, self._session, self._clock)
        source = SharedTokenSource(
            key,
            minter,
            self._cache,
            remint_min_interval=client.remint_min_interval,
            clock=self._clock,
        )
        self._sources[key] = (client, source)
        return source

    def all(self) -> list[SharedTokenSource]:
        return [source for _, source in self._sources.values()]


def build_table(config: Config, sources: TokenSources) -> RouteTable:
    runtimes = {
        route.name: route_runtime(route, sources.get(config.clients[route.client], route.scope))
        for route in config.routes
    }
    return RouteTable(config, runtimes)


def build_cache(config: Config, runtime_dir: str | None, clock: Callable[[], float]) -> TokenCache:
    """The token cache the config asks for.

    ``memory`` with one worker is a dict; with several workers (``runtime_dir``
    set by the supervisor) a file cache shared by the host's workers, so that
    N workers never silently become N tokens. ``redis`` falls back to memory
    while Redis is down.
    """
    settings = config.cache
    if settings.backend == "redis":
        from .redis_cache import RedisTokenCache

        assert settings.url is not None
        primary = RedisTokenCache(
            settings.url, key_prefix=settings.key_prefix, lock_ttl=settings.lock_ttl, clock=clock
        )
        return FallbackTokenCache(primary, MemoryTokenCache(clock))
    if runtime_dir is not None:
        from .file_cache import FileTokenCache

        return FileTokenCache(runtime_dir, clock)
    return MemoryTokenCache(clock)


class ProxyServer:
    """The running proxy. ``start()`` then ``stop()``; not restartable.

    ``clock`` is wall-clock seconds, injected by tests to move time. A worker
    started by the supervisor passes ``port`` (the port the supervisor
    reserved), ``reuse_port`` and its ``runtime_dir``.
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        port: int | None = None,
        reuse_port: bool = False,
        runtime_dir: str | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._reuse_port = reuse_port
        self._runtime_dir = runtime_dir
        self.cache: TokenCache | None = None
        self._runner: web.ServerRunner | None = None
        self._upstream: aiohttp.ClientSession | None = None
        self._tokens: aiohttp.ClientSession | None = None
        self.sources: TokenSources | None = None
        self.forwarder: Forwarder | None = None
        self.port: int = config.listen_port if port is None else port

    async def start(self) -> None:
        self._upstream = upstream_session()
        self._tokens = token_session()
        self.cache = build_cache(self.config, self._runtime_dir, self._clock)
        self.sources = TokenSources(self.cache, self._tokens, self._clock)
        self.forwarder = Forwarder(build_table(self.config, self.sources), self._upstream)
        server = web.Server(
            self.forwarder.handle,
            handler_cancellation=True,  # an app that goes away cancels its upstream request
            access_log=None,  # our own access line replaces aiohttp's
            auto_decompress=False,  # gzip request bodies pass through compressed
        )
        self._runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_GRACE)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.config.listen_host, self.port, reuse_port=self._reuse_port or None
        )
        await site.start()
        self.port = bound_port(site)
        log.info(
            "listening",
            host=self.config.listen_host,
            port=self.port,
            routes=[route.name for route in self.config.routes],
            config=self.config.source,
        )

    @property
    def url(self) -> str:
        host = self.config.listen_host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        for session in (self._upstream, self._tokens):
            if session is not None:
                await session.close()
        primary = getattr(self.cache, "primary", None)
        if primary is not None and hasattr(primary, "close"):
            await primary.close()
        log.info("stopped")


async def _watch_parent(parent: int, stop: asyncio.Event) -> None:
    """A worker whose supervisor died (even by SIGKILL) stops by itself."""
    while not stop.is_set():
        if os.getppid() != parent:
            log.warning("supervisor_gone")
            stop.set()
        await asyncio.sleep(1.0)


async def serve_forever(config: Config) -> None:
    """Run until SIGINT or SIGTERM, then stop cleanly.

    Under the supervisor (``AUTHPROXY_WORKER_PORT`` set) this is one worker:
    it binds the supervisor's port with SO_REUSEPORT and shares its runtime dir.
    """
    worker_port = os.environ.get(WORKER_PORT_ENV)
    server = ProxyServer(
        config,
        port=int(worker_port) if worker_port else None,
        reuse_port=worker_port is not None,
        runtime_dir=os.environ.get(RUNTIME_DIR_ENV),
    )
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watcher = None
    if worker_port is not None:
        watcher = loop.create_task(_watch_parent(os.getppid(), stop))
    try:
        await stop.wait()
        log.info("shutting_down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if watcher is not None:
            watcher.cancel()
        await server.stop()
