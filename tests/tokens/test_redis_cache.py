"""The Redis backend against a real redis-server."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from conftest import FakeClock, RedisProcess, StackFactory, redis_binary
from proxy.errors import CacheUnavailable
from proxy.tokens.cache import cache_key, key_digest
from proxy.tokens.redis_cache import RedisTokenCache
from proxy.tokens.token import make_token

KEY = cache_key("acme", "read")


@pytest.fixture
async def prefix() -> str:
    return f"test-{secrets.token_hex(4)}"


@pytest.fixture
async def cache(redis_url: str, prefix: str, clock: FakeClock) -> AsyncIterator[RedisTokenCache]:
    backend = RedisTokenCache(redis_url, key_prefix=prefix, lock_ttl=0.5, clock=clock)
    yield backend
    await backend.close()


async def test_put_get_with_ttl_of_remaining_life(
    cache: RedisTokenCache, redis_url: str, prefix: str, clock: FakeClock
) -> None:
    token = make_token("t1", minted_at=clock(), lifetime=100, margin=30, refresh_ahead=0.1)
    await cache.put(KEY, token)
    assert await cache.get(KEY) == token
    client = aioredis.Redis.from_url(redis_url)
    try:
        ttl = await client.pttl(f"{prefix}:token:{{{key_digest(KEY)}}}")
        assert 69_000 < ttl <= 70_000
    finally:
        await client.aclose()


async def test_a_dead_holders_lock_expires(
    cache: RedisTokenCache, redis_url: str, prefix: str
) -> None:
    # (Exclusion is the cache contract's, tests/tokens/test_cache_contract.py.)
    # A holder that never releases (it died) blocks others only for lock_ttl.
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set(f"{prefix}:lock:{{{key_digest(KEY)}}}", "dead-holder", px=500)
    finally:
        await client.aclose()
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with cache.mint_lock(KEY):
        waited = loop.time() - started
    assert 0.3 < waited < 2.0


async def test_unreachable_redis_raises_cache_unavailable(
    redis_process: RedisProcess, clock: FakeClock
) -> None:
    cache = RedisTokenCache(redis_process.url, lock_ttl=1, clock=clock)
    redis_process.stop()
    with pytest.raises(CacheUnavailable, match="redis GET failed") as info:
        await cache.get(KEY)
    assert str(redis_process.port) not in str(info.value)
    await cache.close()


@pytest.mark.parametrize("password", ["right-pass-7f3a", "wrong-pass-9c1e"])
async def test_acl_password_is_used_and_never_logged(
    password: str, tmp_path: Path, make_stack: StackFactory, log_stream: io.StringIO
) -> None:
    server = RedisProcess(redis_binary(), str(tmp_path), "--requirepass", "right-pass-7f3a")
    server.start()
    try:
        url = f"redis://default:{password}@127.0.0.1:{server.port}/0"
        stack = await make_stack(top=f"cache: {{backend: redis, url: '{url}', key_prefix: acl}}")
        for _ in range(3):
            async with stack.http.get(stack.url("/demo/x")) as response:
                assert response.status == 200  # a Redis it cannot use never fails a request
        assert stack.tokens.mint_count == 1
        admin = aioredis.Redis(port=server.port, password="right-pass-7f3a")
        try:
            stored = await admin.keys("acl:token:*")
        finally:
            await admin.aclose()
        events = [line["event"] for line in map(json.loads, log_stream.getvalue().splitlines())]
        if password == "right-pass-7f3a":
            assert len(stored) == 1 and "cache_backend_down" not in events
        else:
            assert stored == [] and events.count("cache_backend_down") == 1
        assert password not in log_stream.getvalue()
        assert password not in repr(stack.config)
    finally:
        server.stop()
