"""Where tokens are kept between requests: a small protocol and its backends.

The cache is the shared store: this process (:class:`MemoryTokenCache`), the
workers of one host (:class:`~proxy.file_cache.FileTokenCache`), or every
worker of every replica (:class:`~proxy.redis_cache.RedisTokenCache`). It
knows nothing of minting; the single-flight logic in source.py wraps it and
uses :meth:`TokenCache.mint_lock` so that only one process mints at a time.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol, TypeVar

from proxy.errors import CacheUnavailable
from proxy.log import get_logger
from proxy.tokens.token import Token

T = TypeVar("T")

CacheKey = tuple[str, str, str]


"""(client name, scope, credentials fingerprint); the scope is ``""`` when the
client sends none. The fingerprint changes when the client's credentials or
token endpoint change, so that a reload with new credentials never adopts a
token minted with the old ones, in this process or any other."""


def cache_key(client: str, scope: str | None, fingerprint: str = "") -> CacheKey:
    return (client, scope or "", fingerprint)


def credentials_fingerprint(*parts: object) -> str:
    """A short digest of what decides who a token belongs to (token URL, client
    id, secret, auth method, extra parameters). Only digests are stored."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def key_digest(key: CacheKey) -> str:
    """A fixed-length, character-safe name for ``key`` (file names, Redis keys)."""
    return hashlib.sha256("\0".join(key).encode()).hexdigest()[:32]


def encode_token(token: Token) -> bytes:
    return json.dumps(
        {
            "access_token": token.access_token,
            "minted_at": token.minted_at,
            "expires_at": token.expires_at,
            "refresh_at": token.refresh_at,
            "scope": token.scope,
            "lifetime": token.lifetime,
            "token_type": token.token_type,
        }
    ).encode()


def decode_token(raw: bytes | str) -> Token | None:
    """The token in ``raw``, or ``None`` for anything malformed (treated as a miss)."""
    try:
        data = json.loads(raw)
        return Token(
            access_token=str(data["access_token"]),
            minted_at=float(data["minted_at"]),
            expires_at=float(data["expires_at"]),
            refresh_at=float(data["refresh_at"]),
            scope=data.get("scope"),
            lifetime=float(data.get("lifetime", 0.0)),
            token_type="DPoP" if data.get("token_type") == "DPoP" else "Bearer",
        )
    except (ValueError, KeyError, TypeError):
        return None


class TokenCache(Protocol):
    """A store of one token per :data:`CacheKey`. Implementations are safe to
    use from many concurrent tasks (and, for shared backends, processes)."""

    async def get(self, key: CacheKey) -> Token | None:
        """The stored token, or ``None``. May return an expired token; callers check."""

    async def put(self, key: CacheKey, token: Token) -> None:
        """Store ``token`` for ``key``, replacing any other."""

    async def invalidate(self, key: CacheKey, token: Token) -> None:
        """Forget ``token`` if, and only if, it is still the one stored for ``key``
        (a newer token that someone else already stored is kept)."""

    def mint_lock(self, key: CacheKey) -> AbstractAsyncContextManager[None]:
        """Held around "check again, mint, store" so that only one holder per key
        mints at a time across everyone sharing this cache."""

    shared: bool
    """True when other processes write to this cache too (so a token in hand
    may have been replaced or invalidated elsewhere)."""


@asynccontextmanager
async def _no_lock() -> AsyncIterator[None]:
    yield


class MemoryTokenCache:
    """In-process backend: a dict. Single-flight within the process is done by
    the source, so its mint lock is a no-op."""

    shared = False  # nobody else writes here: no need to look again

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._tokens: dict[CacheKey, Token] = {}
        self._clock = clock

    async def get(self, key: CacheKey) -> Token | None:
        token = self._tokens.get(key)
        if token is not None and not token.valid(self._clock()):
            del self._tokens[key]
            return None
        return token

    async def put(self, key: CacheKey, token: Token) -> None:
        self._tokens[key] = token

    async def invalidate(self, key: CacheKey, token: Token) -> None:
        current = self._tokens.get(key)
        if current is not None and current.access_token == token.access_token:
            del self._tokens[key]

    def mint_lock(self, key: CacheKey) -> AbstractAsyncContextManager[None]:
        return _no_lock()


class FallbackTokenCache:
    """A shared backend that degrades to an in-process one while it is down.

    Any :class:`~proxy.errors.CacheUnavailable` from ``primary`` switches to
    ``fallback`` (still single-flight within this process), logs one warning
    for the outage, and tries ``primary`` again at most every
    ``retry_interval`` seconds; the first success logs the recovery. A Redis
    outage therefore never becomes a 5xx while the token endpoint works.
    ``up`` tells the current state (a metric reads it).
    """

    shared = True

    def __init__(
        self,
        primary: TokenCache,
        fallback: TokenCache,
        *,
        name: str = "redis",
        retry_interval: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        self.primary = primary
        self._on_state = on_state
        self.fallback = fallback
        self.up = True
        self._name = name
        self._retry_interval = retry_interval
        self._monotonic = monotonic
        self._retry_at = 0.0

    def _use_primary(self) -> bool:
        return self.up or self._monotonic() >= self._retry_at

    def _failed(self, exc: Exception) -> None:
        self._retry_at = self._monotonic() + self._retry_interval
        if self.up:
            self.up = False
            if self._on_state is not None:
                self._on_state(False)
            get_logger("proxy.cache").warning(
                "cache_backend_down",
                backend=self._name,
                reason=str(exc),
                fallback="memory (per process) until it is back",
            )

    def _succeeded(self) -> None:
        if not self.up:
            self.up = True
            if self._on_state is not None:
                self._on_state(True)
            get_logger("proxy.cache").warning("cache_backend_up", backend=self._name)

    async def _on_primary(self, call: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
        """``call`` against the primary when it is (or may again be) up:
        (True, its result), or (False, None) when it is down or just failed."""
        if not self._use_primary():
            return False, None
        try:
            result = await call()
        except CacheUnavailable as exc:
            self._failed(exc)
            return False, None
        self._succeeded()
        return True, result

    async def get(self, key: CacheKey) -> Token | None:
        answered, token = await self._on_primary(lambda: self.primary.get(key))
        if not answered:
            return await self.fallback.get(key)
        if token is not None:
            # Kept locally too, as a put is: a process that only ever read the
            # token still has it when the primary fails (a failover is no
            # reason for every process to mint its own: issue 17).
            await self.fallback.put(key, token)
        return token

    async def put(self, key: CacheKey, token: Token) -> None:
        await self.fallback.put(key, token)  # kept locally too: ready for an outage
        await self._on_primary(lambda: self.primary.put(key, token))

    async def invalidate(self, key: CacheKey, token: Token) -> None:
        await self.fallback.invalidate(key, token)
        await self._on_primary(lambda: self.primary.invalidate(key, token))

    @asynccontextmanager
    async def mint_lock(self, key: CacheKey) -> AsyncIterator[None]:
        if self._use_primary():
            lock = self.primary.mint_lock(key)
            try:
                await lock.__aenter__()
            except CacheUnavailable as exc:
                self._failed(exc)
            else:
                try:
                    yield
                finally:
                    await lock.__aexit__(None, None, None)
                return
        async with self.fallback.mint_lock(key):
            yield
