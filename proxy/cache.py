"""Where tokens are kept between requests: a small protocol and its backends.

The cache is the shared store (this process for ``memory``; every worker and
replica for Redis, in a later backend). It knows nothing of minting: the
single-flight logic in source.py wraps it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from .token import Token

CacheKey = tuple[str, str]
"""(client name, scope); the scope is ``""`` when the client sends none."""


def cache_key(client: str, scope: str | None) -> CacheKey:
    return (client, scope or "")


class TokenCache(Protocol):
    """A store of one token per :data:`CacheKey`. Implementations are safe to
    use from many concurrent tasks."""

    async def get(self, key: CacheKey) -> Token | None:
        """The stored token, or ``None``. May return an expired token; callers check."""

    async def put(self, key: CacheKey, token: Token) -> None:
        """Store ``token`` for ``key``, replacing any other."""

    async def invalidate(self, key: CacheKey, token: Token) -> None:
        """Forget ``token`` if, and only if, it is still the one stored for ``key``
        (a newer token that another task already stored is kept)."""


class MemoryTokenCache:
    """In-process backend: a dict. Expired entries are dropped as they are read."""

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
