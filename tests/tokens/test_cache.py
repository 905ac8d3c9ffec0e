"""Cache backends without the network: memory, the host-local file cache, and
the fallback wrapper's outage handling."""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import os
import stat
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from conftest import FakeClock, log_events
from proxy.errors import CacheUnavailable
from proxy.tokens.cache import (
    FallbackTokenCache,
    MemoryTokenCache,
    cache_key,
    decode_token,
    encode_token,
)
from proxy.tokens.file_cache import FileTokenCache
from proxy.tokens.token import Token, make_token

KEY = cache_key("c", "s")


def token(name: str, clock: FakeClock, lifetime: float = 100) -> Token:
    return make_token(name, minted_at=clock(), lifetime=lifetime, margin=0, refresh_ahead=0)


def test_encoding_round_trip_and_garbage(clock: FakeClock) -> None:
    original = token("abc", clock)
    assert decode_token(encode_token(original)) == original
    assert decode_token(b"not json") is None
    assert decode_token(b'{"access_token": "x"}') is None


async def test_file_cache_shares_and_protects(tmp_path: Path, clock: FakeClock) -> None:
    one, two = FileTokenCache(str(tmp_path), clock), FileTokenCache(str(tmp_path), clock)
    await one.put(KEY, token("t1", clock))
    assert (await two.get(KEY)) == token("t1", clock)
    files = list(tmp_path.iterdir())  # noqa: ASYNC240 - a test's local directory
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    await two.invalidate(KEY, token("other", clock))
    assert await one.get(KEY) is not None
    await two.invalidate(KEY, token("t1", clock))
    assert await one.get(KEY) is None


def _hold_lock_then_die(directory: str, ready: multiprocessing.synchronize.Event) -> None:
    import fcntl

    from proxy.tokens.cache import key_digest

    fd = os.open(Path(directory) / f"{key_digest(KEY)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    ready.set()
    os._exit(0)  # dies holding the lock: the kernel must release it


async def test_file_lock_of_a_dead_process_is_released(tmp_path: Path, clock: FakeClock) -> None:
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=_hold_lock_then_die, args=(str(tmp_path), ready))
    child.start()
    child.join(10)
    assert ready.is_set()
    cache = FileTokenCache(str(tmp_path), clock)
    lock: AbstractAsyncContextManager[None] = cache.mint_lock(KEY)
    await asyncio.wait_for(lock.__aenter__(), 2)
    await lock.__aexit__(None, None, None)


class BrokenCache(MemoryTokenCache):
    """A primary that can be switched off, like a Redis that went away."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.down = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise CacheUnavailable("redis GET failed: ConnectionError")

    async def get(self, key: tuple[str, str]) -> Token | None:
        self._check()
        return await super().get(key)

    async def put(self, key: tuple[str, str], value: Token) -> None:
        self._check()
        await super().put(key, value)


async def test_fallback_warns_once_per_outage_and_recovers(
    clock: FakeClock, log_stream: io.StringIO
) -> None:
    primary = BrokenCache(clock)
    now = [0.0]
    cache = FallbackTokenCache(primary, MemoryTokenCache(clock), monotonic=lambda: now[0])
    await cache.put(KEY, token("t1", clock))
    primary.down = True
    for _ in range(50):
        assert await cache.get(KEY) == token("t1", clock)  # served from the local copy
    assert cache.up is False
    assert primary.calls == 2  # one put, one failed get; then no retry before the interval
    now[0] += 1.0
    primary.down = False
    await cache.get(KEY)
    assert cache.up is True
    names = [e["event"] for e in log_events(log_stream)]
    assert names.count("cache_backend_down") == 1
    assert names.count("cache_backend_up") == 1
    assert "ConnectionError" in log_stream.getvalue()


async def test_a_token_only_read_from_the_primary_survives_its_outage(clock: FakeClock) -> None:
    """Another process minted it; this one only read it. When the primary goes
    (a Sentinel failover), this process still has it: no mint of its own."""
    primary = BrokenCache(clock)
    await primary.put(KEY, token("minted-elsewhere", clock))
    cache = FallbackTokenCache(primary, MemoryTokenCache(clock))
    assert await cache.get(KEY) == token("minted-elsewhere", clock)
    primary.down = True
    assert await cache.get(KEY) == token("minted-elsewhere", clock)
