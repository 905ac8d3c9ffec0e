"""The token lifecycle without sockets: a counting minter and an injected clock."""

from __future__ import annotations

import asyncio

import pytest

from conftest import FakeClock
from proxy.errors import TokenEndpointRejected
from proxy.tokens.cache import MemoryTokenCache, cache_key
from proxy.tokens.source import SharedTokenSource
from proxy.tokens.token import Token, make_token


class CountingMinter:
    def __init__(
        self,
        clock: FakeClock,
        lifetime: float = 100.0,
        delay: float = 0.0,
        refresh_ahead: float = 0.1,
    ) -> None:
        self.clock = clock
        self.refresh_ahead = refresh_ahead
        self.lifetime = lifetime
        self.delay = delay
        self.calls = 0
        self.fail: Exception | None = None

    async def mint(self, scope: str | None) -> Token:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return make_token(
            f"t{self.calls}",
            minted_at=self.clock(),
            lifetime=self.lifetime,
            margin=30,
            refresh_ahead=self.refresh_ahead,
            scope=scope,
        )


def make(clock: FakeClock, minter: CountingMinter, interval: float = 10.0) -> SharedTokenSource:
    return SharedTokenSource(
        cache_key("c", "s"),
        minter,
        MemoryTokenCache(clock),
        remint_min_interval=interval,
        clock=clock,
    )


async def test_concurrent_cold_callers_share_one_mint(clock: FakeClock) -> None:
    minter = CountingMinter(clock, delay=0.05)
    source = make(clock, minter)
    tokens = await asyncio.gather(*(source.token() for _ in range(500)))
    assert minter.calls == 1
    assert {t.access_token for t in tokens} == {"t1"}


async def test_cached_path_awaits_nothing(clock: FakeClock) -> None:
    minter = CountingMinter(clock)
    source = make(clock, minter)
    assert source.cached() is None
    await source.token()
    token = source.cached()
    assert token is not None and token.access_token == "t1"


@pytest.mark.parametrize(("elapsed", "mints"), [(69.999999, 1), (70.0, 2)])
async def test_reuse_until_expiry_boundary(clock: FakeClock, elapsed: float, mints: int) -> None:
    # lifetime 100, margin 30: usable for 70 s; no refresh-ahead to blur the edge
    minter = CountingMinter(clock, refresh_ahead=0.0)
    source = make(clock, minter)
    await source.token()
    clock.advance(elapsed)
    token = await source.token()
    await asyncio.sleep(0.01)
    assert minter.calls == mints
    assert token.access_token == f"t{mints}"


async def test_refresh_ahead_keeps_serving_while_it_runs_and_after_it_fails(
    clock: FakeClock,
) -> None:
    minter = CountingMinter(clock)
    source = make(clock, minter)
    await source.token()
    clock.advance(64)  # refresh window starts at 63 s
    minter.fail = TokenEndpointRejected("down", http_status=503, client="c")
    token = await source.token()
    assert token.access_token == "t1"  # never waits on the background mint
    await asyncio.sleep(0.01)
    assert minter.calls == 2
    assert source.last_error == "down"
    await source.token()
    await asyncio.sleep(0.01)
    assert minter.calls == 2  # backing off, not hammering
    clock.advance(1.5)  # past the first backoff (at most 1 s)
    minter.fail = None
    assert (await source.token()).access_token == "t1"
    await asyncio.sleep(0.01)
    assert minter.calls == 3
    assert (await source.token()).access_token == "t3"
    assert source.last_error is None


async def test_replace_expired_mints_once_for_many(clock: FakeClock) -> None:
    minter = CountingMinter(clock, delay=0.05)
    source = make(clock, minter)
    first = await source.token()
    replaced = await asyncio.gather(*(source.replace_expired(first) for _ in range(100)))
    assert minter.calls == 2
    assert {t.access_token for t in replaced if t} == {"t2"}
    # a late 401 for the old token: current one, no mint
    assert (await source.replace_expired(first)).access_token == "t2"  # type: ignore[union-attr]
    assert minter.calls == 2


async def test_quota_guard(clock: FakeClock) -> None:
    minter = CountingMinter(clock)
    source = make(clock, minter, interval=10)
    first = await source.token()
    second = await source.replace_expired(first)
    assert second is not None
    assert await source.replace_expired(second) is None  # within 10 s: pass the 401 through
    assert source.cached() is second  # and keep the token: no back-door mint
    clock.advance(10)
    third = await source.replace_expired(second)
    assert third is not None and third.access_token == "t3"


async def test_failed_mint_is_shared_then_retried(clock: FakeClock) -> None:
    minter = CountingMinter(clock, delay=0.02)
    minter.fail = TokenEndpointRejected("nope", http_status=401, client="c")
    source = make(clock, minter)
    results = await asyncio.gather(*(source.token() for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, TokenEndpointRejected) for r in results)
    assert minter.calls == 1
    minter.fail = None
    assert (await source.token()).access_token == "t2"


async def test_cancelled_waiter_does_not_cancel_the_mint(clock: FakeClock) -> None:
    minter = CountingMinter(clock, delay=0.05)
    source = make(clock, minter)
    impatient = asyncio.ensure_future(source.token())
    patient = asyncio.ensure_future(source.token())
    await asyncio.sleep(0.01)
    impatient.cancel()
    assert (await patient).access_token == "t1"
    assert minter.calls == 1


async def test_forget_drops_the_token_without_minting(clock: FakeClock) -> None:
    minter = CountingMinter(clock)
    source = make(clock, minter)
    token = await source.token()
    source.forget(token)
    assert source.cached() is None
    assert minter.calls == 1
    assert (await source.token()).access_token == "t2"


async def test_forget_keeps_the_token_within_the_remint_interval(clock: FakeClock) -> None:
    minter = CountingMinter(clock)
    source = make(clock, minter)
    first = await source.token()
    assert source.forget(first) is True
    second = await source.token()
    assert source.forget(second) is False  # the quota guard: one drop per interval
    assert source.cached() is second and minter.calls == 2
    assert await source.replace_expired(second) is None  # a re-mint is held the same way
