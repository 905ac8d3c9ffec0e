"""File token cache: shares one token per (client, scope) between the worker
processes of one host, with no extra service (the ``memory`` backend with
``workers: N > 1``).

The supervisor creates a private runtime directory (mode 0700); each key has a
token file (0600, replaced atomically) and a lock file held with ``flock``
around "check again, mint, store". The kernel drops a dead holder's lock at
once, so a worker killed mid-mint blocks nobody.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

from proxy.tokens.cache import CacheKey, decode_token, encode_token, key_digest
from proxy.tokens.token import Token

LOCK_POLL: Final = 0.01  # seconds between non-blocking flock attempts


class FileTokenCache:
    """Safe for concurrent use by tasks of many processes on one host."""

    shared = True

    def __init__(self, directory: str, clock: Callable[[], float] = time.time) -> None:
        self._dir = Path(directory)
        self._clock = clock

    def _path(self, key: CacheKey, suffix: str) -> Path:
        return self._dir / f"{key_digest(key)}.{suffix}"

    async def get(self, key: CacheKey) -> Token | None:
        try:
            raw = self._path(key, "token").read_bytes()
        except FileNotFoundError:
            return None
        token = decode_token(raw)
        return token if token is not None and token.valid(self._clock()) else None

    async def put(self, key: CacheKey, token: Token) -> None:
        final = self._path(key, "token")
        temporary = final.with_suffix(f".tmp{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(encode_token(token))
        os.replace(temporary, final)

    async def invalidate(self, key: CacheKey, token: Token) -> None:
        # Called under no lock: take it, so a token stored meanwhile is kept.
        async with self.mint_lock(key):
            current = await self.get(key)
            if current is not None and current.access_token == token.access_token:
                self._path(key, "token").unlink(missing_ok=True)

    @asynccontextmanager
    async def mint_lock(self, key: CacheKey) -> AsyncIterator[None]:
        fd = os.open(self._path(key, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(LOCK_POLL)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock
