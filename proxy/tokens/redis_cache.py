"""Redis token cache: one live token per (client, scope) across every worker
and replica that shares the Redis.

Layout (``<p>`` is ``key_prefix``, ``<k>`` the key's digest):

- ``<p>:token:{<k>}``: the token as JSON, with a TTL equal to its remaining life.
- ``<p>:lock:{<k>}``: the mint lock, ``SET NX PX lock_ttl`` with a random value;
  released only by its holder (compare-and-delete in Lua). A holder that dies
  blocks the others at most ``lock_ttl``.

``{<k>}`` is a Redis Cluster hash tag: a token and its lock live in one slot,
and every command the cache sends names one key (no cross-slot command), so
the same layout serves a single Redis, a Sentinel-managed primary
(``redis+sentinel://``) and a Cluster (``cache.cluster``). Through a failover
each command fails fast and the fallback in cache.py serves; redis-py's
Sentinel and Cluster clients find the new primary by themselves.

Every redis-py error or timeout is translated, here and once, into
:class:`~proxy.errors.CacheUnavailable`; the fallback wrapper in cache.py
decides what to do about it.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from proxy.config.model import SentinelTarget
from proxy.errors import CacheUnavailable
from proxy.tokens.cache import CacheKey, decode_token, encode_token, key_digest
from proxy.tokens.token import Token

T = TypeVar("T")
OP_TIMEOUT: Final = 0.5  # seconds; a slow Redis must not stall mints for long
LOCK_POLL: Final = 0.025  # seconds between tries for a held mint lock
# Delete KEYS[1] only if it still holds ARGV[1] (the lock's value).
_RELEASE = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)
# Delete KEYS[1] only if its token is still ARGV[1]: a newer token is kept.
_INVALIDATE = (
    "local v = redis.call('GET', KEYS[1]) "
    "if v and cjson.decode(v)['access_token'] == ARGV[1] then "
    "return redis.call('DEL', KEYS[1]) end return 0"
)


def redis_client(url: str, *, cluster: bool, op_timeout: float) -> tuple[Any, list[Any]]:
    """The redis-py client for ``url``: a plain one, a Sentinel-discovered
    primary (``redis+sentinel://``) or a Cluster; and the clients to close
    with it (a Sentinel's own connections to the sentinels). Every one fails
    fast (one try, ``op_timeout``): the process cache is the retry."""
    common: dict[str, Any] = {
        "socket_timeout": op_timeout,
        "socket_connect_timeout": op_timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if url.startswith(("redis+sentinel://", "rediss+sentinel://")):
        from redis.asyncio.sentinel import Sentinel

        target = SentinelTarget.parse(url)
        options: dict[str, Any] = dict(common)
        if target.password:
            options["password"] = target.password
        sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=options, **options)
        primary = sentinel.master_for(target.service, db=target.db, ssl=target.tls, **common)
        return primary, list(sentinel.sentinels)
    if cluster:
        from redis.asyncio.cluster import RedisCluster

        # A moved slot or a lost primary: the client re-reads the topology.
        return RedisCluster.from_url(url, **common), []
    return aioredis.Redis.from_url(url, **common), []


class RedisTokenCache:
    """Safe for concurrent use by many tasks; one connection pool per process."""

    shared = True

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "authproxy",
        lock_ttl: float = 15.0,
        clock: Callable[[], float] = time.time,
        op_timeout: float = OP_TIMEOUT,
        cluster: bool = False,
    ) -> None:
        self._redis, self._also = redis_client(url, cluster=cluster, op_timeout=op_timeout)
        self._cluster = cluster
        self._ready = False
        self._topology = asyncio.Lock()
        self._prefix = key_prefix
        self._lock_ttl_ms = max(1, int(lock_ttl * 1000))
        self._clock = clock
        self._release = self._redis.register_script(_RELEASE)
        self._invalidate = self._redis.register_script(_INVALIDATE)

    def _token_key(self, key: CacheKey) -> str:
        return f"{self._prefix}:token:{{{key_digest(key)}}}"

    def _lock_key(self, key: CacheKey) -> str:
        return f"{self._prefix}:lock:{{{key_digest(key)}}}"

    async def _call(self, operation: str, awaitable: Awaitable[T]) -> T:
        try:
            if self._cluster and not self._ready:
                await self._initialize()
            return await awaitable
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()  # never awaited when the topology could not be read
            raise CacheUnavailable(f"redis {operation} failed: {type(exc).__name__}") from None

    async def _initialize(self) -> None:
        """Read a Cluster's topology once before the first command: redis-py's
        cluster client, told not to retry, fails the commands that race to
        read it themselves."""
        async with self._topology:
            if not self._ready:
                await self._redis.initialize()
                self._ready = True

    async def get(self, key: CacheKey) -> Token | None:
        raw = await self._call("GET", self._redis.get(self._token_key(key)))
        return decode_token(raw) if raw is not None else None

    async def put(self, key: CacheKey, token: Token) -> None:
        ttl_ms = math.ceil((token.expires_at - self._clock()) * 1000)
        if ttl_ms <= 0:
            return
        await self._call(
            "SET", self._redis.set(self._token_key(key), encode_token(token), px=ttl_ms)
        )

    async def invalidate(self, key: CacheKey, token: Token) -> None:
        await self._call(
            "EVAL invalidate",
            self._invalidate(keys=[self._token_key(key)], args=[token.access_token]),
        )

    @asynccontextmanager
    async def mint_lock(self, key: CacheKey) -> AsyncIterator[None]:
        name = self._lock_key(key)
        value = secrets.token_hex(16)
        # Other processes and hosts hold this lock, so there is no local event to wait on:
        # poll. The caller bounds the wait (the client's timeout); the lock's TTL bounds a
        # dead holder.
        while True:
            if await self._call(
                "SET NX", self._redis.set(name, value, nx=True, px=self._lock_ttl_ms)
            ):
                break
            await asyncio.sleep(LOCK_POLL)
        try:
            yield
        finally:
            try:
                await self._call("EVAL release", self._release(keys=[name], args=[value]))
            except CacheUnavailable:
                pass  # the lock expires by itself after lock_ttl

    async def ping(self) -> None:
        await self._call("PING", self._redis.ping())

    async def close(self) -> None:
        await self._redis.aclose()
        for client in self._also:
            await client.aclose()
