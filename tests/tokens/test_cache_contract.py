"""One contract, every token cache backend: memory (one process), file (the
host's workers), Redis (every replica), Redis behind the fallback
wrapper, a Sentinel-managed primary and a Redis Cluster (issue 17). A backend that differs from the others fails here; the one
difference docs/design.md names is that the memory cache has no lock across
processes (it is not shared; single-flight within a process is the source's).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.tokens.cache import FallbackTokenCache, MemoryTokenCache, TokenCache, cache_key
from proxy.tokens.file_cache import FileTokenCache
from proxy.tokens.redis_cache import RedisTokenCache
from proxy.tokens.token import Token, make_token

BACKENDS = ("memory", "file", "redis", "redis-with-fallback", "redis-sentinel", "redis-cluster")
KEY = cache_key("acme", "read", "fingerprint-1")


def token(name: str, lifetime: float = 60.0) -> Token:
    return make_token(
        name, minted_at=time.time(), lifetime=lifetime, margin=0, refresh_ahead=0.1, scope="read"
    )


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TokenCache]:
    kind = request.param
    closing: list[RedisTokenCache] = []
    made: TokenCache
    if kind == "memory":
        made = MemoryTokenCache(time.time)
    elif kind == "file":
        (tmp_path / "cache").mkdir(mode=0o700)  # the supervisor makes it so
        made = FileTokenCache(str(tmp_path / "cache"), time.time)
    else:
        cluster = kind == "redis-cluster"
        if kind == "redis-sentinel":
            redis_url = request.getfixturevalue("sentinel_set").url
        elif cluster:
            redis_url = request.getfixturevalue("cluster_set").url
        else:
            redis_url = request.getfixturevalue("redis_url")
        redis = RedisTokenCache(
            redis_url,
            key_prefix=f"contract-{secrets.token_hex(4)}",
            lock_ttl=2.0,
            clock=time.time,
            cluster=cluster,
        )
        closing.append(redis)
        made = redis if kind == "redis" else FallbackTokenCache(redis, MemoryTokenCache(time.time))
    yield made
    for redis in closing:
        await redis.close()


async def test_a_token_put_is_the_token_got_every_field_kept(backend: TokenCache) -> None:
    assert await backend.get(KEY) is None
    held = token("tok-1")
    await backend.put(KEY, held)
    assert await backend.get(KEY) == held


async def test_keys_are_independent(backend: TokenCache) -> None:
    other = cache_key("acme", "write", "fingerprint-1")
    rotated = cache_key("acme", "read", "fingerprint-2")  # new credentials: another key
    await backend.put(KEY, token("tok-read"))
    assert await backend.get(other) is None
    assert await backend.get(rotated) is None


async def test_invalidate_removes_only_the_token_named(backend: TokenCache) -> None:
    newer = token("tok-newer")
    await backend.put(KEY, newer)
    await backend.invalidate(KEY, token("tok-older"))  # another process replaced it already
    assert await backend.get(KEY) == newer
    await backend.invalidate(KEY, newer)
    assert await backend.get(KEY) is None


async def test_a_replacing_put_wins(backend: TokenCache) -> None:
    await backend.put(KEY, token("tok-1"))
    second = token("tok-2")
    await backend.put(KEY, second)
    assert await backend.get(KEY) == second


async def test_an_expired_token_is_never_returned(backend: TokenCache) -> None:
    await backend.put(KEY, token("tok-dead", lifetime=-1.0))  # expired when put
    assert await backend.get(KEY) is None
    await backend.put(KEY, token("tok-brief", lifetime=0.3))
    await asyncio.sleep(0.45)  # Redis expires by its own clock: real time here
    assert await backend.get(KEY) is None


async def test_a_shared_backend_lock_lets_one_holder_at_a_time(backend: TokenCache) -> None:
    if isinstance(backend, MemoryTokenCache):
        # The one difference (docs/design.md): one process's cache, nothing to
        # exclude; the source's single flight is the lock.
        assert backend.shared is False
        return
    assert backend.shared is True
    inside = 0
    most = 0

    async def hold() -> None:
        nonlocal inside, most
        async with backend.mint_lock(KEY):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.02)
            inside -= 1

    await asyncio.gather(*(hold() for _ in range(10)))
    assert most == 1
