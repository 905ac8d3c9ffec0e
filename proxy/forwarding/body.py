"""The request body on its way upstream: :class:`BodyTee` streams it while
keeping a bounded copy for the one expired-token replay; :func:`read_whole`
reads a small one; and the three ways an app's body fails, named once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from proxy.config.model import RouteConfig
from proxy.errors import AppBodyFailed, BadRequest, BodyTimeout, BodyTooLarge
from proxy.forwarding.seams import (
    AppBody,
)


class BodyTee:
    """Streams the inbound body upstream while keeping a copy of up to ``limit``
    bytes for an expired-token replay. Past ``limit`` the copy is dropped and
    memory stays bounded by the engine's read buffer.
    """

    def __init__(
        self,
        content: AppBody,
        limit: int,
        *,
        max_body: int | None = None,
        gap: float | None = None,
    ) -> None:
        self._content = content
        self._limit = limit
        self._max_body = max_body
        self._gap = gap
        self.too_large = False
        self.timed_out = False
        self._chunks: list[bytes] = []
        self._size = 0
        self._running = False
        self._stopped = asyncio.Event()
        self.overflowed = False
        self.complete = False
        # The app's body broke (reset, bad chunking, limits). A flag, not the
        # exception: kept here, its traceback would hold this tee (a cycle).
        self.inbound_failed = False

    async def _read(self) -> bytes:
        try:
            async with asyncio.timeout(self._gap):
                chunk = await self._content.readany()
        except TimeoutError:
            self.timed_out = True
            raise
        if self._max_body is not None and self._size + len(chunk) > self._max_body:
            self.too_large = True
            raise ValueError("request body over max_body")
        return chunk

    def _keep(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self.overflowed:
            return
        if self._size > self._limit:
            self.overflowed = True
            self._chunks = []
        else:
            self._chunks.append(chunk)

    async def stream(self) -> AsyncIterator[bytes]:
        self._running = True
        try:
            while True:
                try:
                    chunk = await self._read()
                except Exception:  # the app's body broke (reset, bad chunking, limits)
                    self.inbound_failed = True
                    raise
                if not chunk:
                    self.complete = True
                    return
                self._keep(chunk)
                yield chunk
        finally:
            self._running = False
            self._stopped.set()

    async def finish(self) -> bool:
        """After the upstream answered early: read what the upstream did not,
        so the whole body can be replayed. True when a full copy is in hand."""
        if self._running:
            await self._stopped.wait()
        while not self.complete and not self.overflowed:
            chunk = await self._read()
            if not chunk:
                self.complete = True
            else:
                self._keep(chunk)
        return self.replayable

    @property
    def untouched(self) -> bool:
        """Nothing of the body has been read yet (the upstream never connected)."""
        return self._size == 0 and not self._running and not self.complete

    @property
    def replayable(self) -> bool:
        return self.complete and not self.overflowed

    def body(self) -> bytes:
        return b"".join(self._chunks)


async def read_whole(content: AppBody, length: int, route: RouteConfig, gap: float) -> bytes:
    """A small body of known ``length``; ``gap`` (body_timeout) bounds each
    wait, as for a streamed body, not the whole read. Bytes already here are
    taken without a wait (or its timer: usually the whole body came with
    the head)."""
    try:
        chunks: list[bytes] = []
        missing = length
        while missing > 0:
            chunk = content.read_ready()
            if not chunk:
                async with asyncio.timeout(gap):
                    chunk = await content.readany()
            if not chunk:
                raise AppBodyFailed("the body ended before its Content-Length")
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)
    except TimeoutError:
        raise stalled(route) from None
    except AppBodyFailed:
        raise broken(route) from None


def too_large(route: RouteConfig, got: str = "") -> BodyTooLarge:
    return BodyTooLarge.at(route.name, f"accepts bodies up to {route.max_body} bytes{got}")


def stalled(route: RouteConfig) -> BodyTimeout:
    return BodyTimeout.at(route.name, "the request body stalled (no data within the body timeout)")


def broken(route: RouteConfig) -> BadRequest:
    return BadRequest.at(
        route.name, "the request body ended early or was malformed", client=route.client
    )
