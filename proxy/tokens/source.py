"""The token lifecycle, in one place: single-flight minting, reuse until the
margin-adjusted expiry, refresh ahead of it, and replacement of a token the
partner has declared expired.

:class:`SharedTokenSource` serves one (client, scope). It wraps a
:class:`~proxy.tokens.token.Minter` (talks to the token endpoint) and a
:class:`~proxy.tokens.cache.TokenCache` (stores tokens), the way golang/oauth2's
``ReuseTokenSource`` wraps a ``TokenSource``.

Concurrency contract (one asyncio loop): any number of tasks may call
:meth:`token` and :meth:`replace_expired` at once. At most one mint per source
is in flight at any time; every caller that needs it awaits that same mint.
A caller that is cancelled (its app went away) does not cancel the mint for
the others.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Final, Protocol

from proxy.errors import CacheUnavailable, TokenError, untraced
from proxy.log import get_logger
from proxy.tokens.cache import CacheKey, TokenCache
from proxy.tokens.token import Minter, Token

REFRESH_RETRY_FIRST: Final = 1.0  # seconds before retrying a failed background refresh
REFRESH_RETRY_MAX: Final = 30.0  # ... doubling up to this, with jitter
SHARED_RECHECK: Final = (
    1.0  # seconds between looks at a shared cache for a token replaced elsewhere
)
log = get_logger("proxy.source")


class SourceEvents(Protocol):
    """What a source reports as it works (metrics implement it; see proxy/metrics.py)."""

    def hit(self) -> None:
        """A request found a valid token in hand."""

    def miss(self) -> None:
        """A request had to wait for a mint (cold or expired cache)."""

    def refresh_ahead(self) -> None:
        """A background refresh started."""

    def minted(self, seconds: float, ok: bool) -> None:
        """A call to the token endpoint finished (``ok``: a token came back)."""

    def rotation(self, pending: bool) -> None:
        """New credentials are waiting for their first token (``pending``), or got it."""


class NoEvents:
    def hit(self) -> None:
        pass

    def miss(self) -> None:
        pass

    def refresh_ahead(self) -> None:
        pass

    def minted(self, seconds: float, ok: bool) -> None:
        pass

    def rotation(self, pending: bool) -> None:
        pass


class SharedTokenSource:
    """One live token for one (client, scope), shared by every request.

    ``current`` is the token in use, or ``None`` before the first mint. It is
    replaced, never mutated.
    """

    def __init__(
        self,
        key: CacheKey,
        minter: Minter,
        cache: TokenCache,
        *,
        remint_min_interval: float,
        clock: Callable[[], float] = time.time,
        events: SourceEvents | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._monotonic = monotonic
        self.key = key
        self.current: Token | None = None
        self.last_error: str | None = None
        self.mints = 0
        self._minter = minter
        self._cache = cache
        self._clock = clock
        self._remint_min_interval = remint_min_interval
        self._inflight: asyncio.Task[Token] | None = None
        self._refresh_failures = 0
        self._refresh_not_before = 0.0
        self._last_expiry_remint: float | None = None
        self.events: SourceEvents = events or NoEvents()
        self._shared = bool(getattr(cache, "shared", False))
        self._watcher: asyncio.Task[None] | None = None
        # Make-before-break (issue 13): the valid token of the previous
        # credentials, served until the new ones have minted, and its key.
        self._rotating = False
        self._predecessor: tuple[CacheKey, Token] | None = None

    # ------------------------------------------------------------------ reads

    def cached(self) -> Token | None:
        """The valid token in hand, without awaiting anything, or ``None``.

        This is the hot path: no lock, no await. When the token has entered its
        refresh window it also starts (at most) one background re-mint.
        """
        token = self.current
        if token is None:
            return None
        now = self._clock()
        if now >= token.expires_at:
            return None
        due = self._rotating or now >= token.refresh_at
        if due and self._inflight is None and now >= self._refresh_not_before:
            self.events.refresh_ahead()
            self._start(reject=None, background=True)
        self.events.hit()
        return token

    async def _watch(self) -> None:
        """With a shared cache, another process may declare the token in hand
        expired (deleting it there) or replace it: look every SHARED_RECHECK
        seconds, in the background, so that this process stops using it soon,
        busy or idle, without waiting for its own 401 from the partner."""
        while True:
            await asyncio.sleep(SHARED_RECHECK)
            held = self.current
            if held is None or self._inflight is not None:
                continue
            try:
                shared = await self._cache.get(self.key)
            except CacheUnavailable:
                continue
            if self.current is not held or self._inflight is not None:
                continue  # this process moved on meanwhile
            if shared is None:
                self.current = None  # invalidated elsewhere: the next request fills from the cache
            elif shared.access_token != held.access_token and shared.valid(self._clock()):
                self.current = shared

    def close(self) -> None:
        """Stop background work (the shared-cache watcher)."""
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    async def token(self) -> Token:
        """A valid token: the cached one, or the result of the one shared mint.

        Raises :class:`~proxy.errors.TokenError` when the mint fails.
        """
        token = self.cached()
        if token is not None:
            return token
        self.events.miss()
        return await self._join(reject=None)

    async def replace_expired(self, failed: Token) -> Token | None:
        """The partner said ``failed`` has expired: return the token to replay with.

        - ``failed`` was already replaced: the current token, no mint.
        - otherwise: invalidate ``failed`` everywhere and mint once, shared by all
          the requests that met the same 401.
        - ``None`` when the quota guard holds (an expiry-triggered re-mint happened
          less than ``remint_min_interval`` ago): the 401 should pass through.
        """
        now = self._clock()
        current = self.current
        if (
            current is not None
            and current.access_token != failed.access_token
            and current.valid(now)
        ):
            return current
        inflight = self._inflight
        if inflight is not None:
            token = await asyncio.shield(inflight)
            if token.access_token != failed.access_token:
                return token
        if (
            self._last_expiry_remint is not None
            and now - self._last_expiry_remint < self._remint_min_interval
        ):
            log.warning(
                "expired_token_remint_suppressed",
                client=self.key[0],
                scope=self.key[1] or None,
                reason=(
                    "the partner called a token expired again within "
                    f"{self._remint_min_interval:g}s of the last re-mint; passing the 401 "
                    "through (check clocks and the token's audience)"
                ),
            )
            return None
        self._last_expiry_remint = now
        # No await between the checks above and starting the mint: a concurrent
        # caller sees the in-flight task and joins it.
        if self.current is not None and self.current.access_token == failed.access_token:
            self.current = None
        return await self._join(reject=failed)

    def succeed(self, key: CacheKey, predecessor: Token) -> None:
        """Make-before-break: this source's credentials replace those of the
        source that held ``predecessor`` (under ``key``). The predecessor keeps
        serving while the new credentials mint in the background; it is
        replaced only by a token they got. If they are refused it serves until
        it expires, retried with backoff, the failure in ``last_error``."""
        self.current = predecessor
        self._predecessor = (key, predecessor)
        self._rotating = True
        self.events.rotation(pending=True)
        self._start(reject=None, background=True)

    @property
    def rotating(self) -> bool:
        """New credentials have not minted yet; the previous ones' token serves."""
        return self._rotating

    async def drop(self) -> int:
        """Discard this (client, scope)'s tokens here and in the shared cache
        (credentials compromised): the next request mints, once for every
        process that shares the cache. Returns how many tokens were dropped."""
        held, self.current = self.current, None
        self._rotating = False
        dropped: dict[str, tuple[CacheKey, Token]] = {}
        if held is not None:
            dropped[held.access_token] = (self.key, held)
        if self._predecessor is not None:
            dropped[self._predecessor[1].access_token] = self._predecessor
            self._predecessor = None
        shared = await self._cache.get(self.key)
        if shared is not None:
            dropped[shared.access_token] = (self.key, shared)
        for key, token in dropped.values():
            await self._cache.invalidate(key, token)
        self.events.rotation(pending=False)
        log.warning("tokens_dropped", client=self.key[0], scope=self.key[1] or None)
        return len(dropped)

    def forget(self, failed: Token) -> bool:
        """Stop using ``failed`` without minting (the next request mints);
        False when the quota guard keeps it (an expiry-triggered re-mint or
        drop of this key came less than ``remint_min_interval`` ago): the
        drop counts as that re-mint, so 401s that cannot be replayed cost at
        most one mint per interval, as those that can (issue 11, seventh
        outside round).

        Used when a 401 cannot be replayed (its body was too large to keep).
        """
        now = self._clock()
        if (
            self._last_expiry_remint is not None
            and now - self._last_expiry_remint < self._remint_min_interval
        ):
            return False
        if self.current is not None and self.current.access_token == failed.access_token:
            self._last_expiry_remint = now
            self.current = None
            task = asyncio.get_running_loop().create_task(self._cache.invalidate(self.key, failed))
            task.add_done_callback(_consume)
        return True

    # --------------------------------------------------------------- minting

    def _start(self, *, reject: Token | None, background: bool) -> asyncio.Task[Token]:
        task = asyncio.get_running_loop().create_task(self._fill(reject))
        self._inflight = task
        task.add_done_callback(lambda t: self._finished(t, background))
        return task

    async def _join(self, *, reject: Token | None) -> Token:
        task = self._inflight or self._start(reject=reject, background=False)
        try:
            return await asyncio.shield(task)
        except BaseException as exc:
            # Every waiter raises the task's one exception, whose traceback
            # then holds this frame: without the task in it, and with the
            # traceback so far dropped, no cycle (tests/test_cycles.py).
            del task
            untraced(exc)
            raise

    async def _fill(self, reject: Token | None) -> Token:
        """Adopt a usable token from the cache, else mint one and store it."""
        if reject is not None:
            await self._cache.invalidate(self.key, reject)
        if self._shared and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        shared = self._usable(await self._cache.get(self.key), reject)
        if shared is not None:
            self.current = shared
            return shared
        async with self._cache.mint_lock(self.key):
            # Re-check under the lock: another process may have minted meanwhile.
            shared = self._usable(await self._cache.get(self.key), reject)
            if shared is not None:
                self.current = shared
                return shared
            started = self._monotonic()
            try:
                token = await self._minter.mint(self.key[1] or None)
            except Exception:
                self.events.minted(self._monotonic() - started, ok=False)
                raise
            self.events.minted(self._monotonic() - started, ok=True)
            self.mints += 1
            await self._cache.put(self.key, token)
        self.current = token
        return token

    def _usable(self, token: Token | None, reject: Token | None) -> Token | None:
        """``token`` if it can be adopted instead of minting: valid, not due for
        refresh, and not the one just declared expired."""
        now = self._clock()
        if (
            token is not None
            and token.valid(now)
            and not token.needs_refresh(now)
            and (reject is None or token.access_token != reject.access_token)
        ):
            return token
        return None

    def _finished(self, task: asyncio.Task[Token], background: bool) -> None:
        if self._inflight is task:
            self._inflight = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self.last_error = None
            self._refresh_failures = 0
            self._refresh_not_before = 0.0
            if self._rotating:
                self._rotating = False
                self.events.rotation(pending=False)
                log.info("credentials_rotated", client=self.key[0], scope=self.key[1] or None)
            return
        self.last_error = exc.message if isinstance(exc, TokenError) else type(exc).__name__
        if self._rotating and background:
            log.warning(
                "credentials_rotation_failed",
                client=self.key[0],
                scope=self.key[1] or None,
                reason=self.last_error,
                serving="the previous credentials' token, until it expires",
            )
        if background:
            # The token in hand is still valid: keep it, retry with jittered backoff.
            self._refresh_failures += 1
            delay = min(REFRESH_RETRY_MAX, REFRESH_RETRY_FIRST * 2 ** (self._refresh_failures - 1))
            self._refresh_not_before = self._clock() + delay * random.uniform(0.5, 1.0)  # noqa: S311 - jitter
            log.warning(
                "refresh_ahead_failed",
                client=self.key[0],
                scope=self.key[1] or None,
                retry_in_s=round(self._refresh_not_before - self._clock(), 2),
                reason=self.last_error,
            )


def _consume(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
