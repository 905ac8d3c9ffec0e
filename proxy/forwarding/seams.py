"""The typed seam between the forwarder and the HTTP/1.1 engine (pure).

The forwarder (proxy/forwarding/forwarder.py) is written against these
protocols only; the engine (proxy/http1/listener.py on the apps' side,
proxy/http1/upstream.py on the partners' side) implements them and
translates every library exception into the error tree (proxy/errors.py)
before it crosses. No aiohttp type appears
here, as in Go's ``http.RoundTripper`` and ``ResponseWriter``: the forwarder
does not know which library frames the bytes.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

Fields = list[tuple[str, str]]  # header fields as sent: names as spelled, in order, repeats kept
# Called with each interim (1xx) answer the proxy did not ask for (102, 103...).
Interim = Callable[[int, str, Fields], Awaitable[None]]
# A message's header fields, looked up case-insensitively (read-only).
Headers = Mapping[str, str]


class AppBody(Protocol):
    """The app's request body. Raises AppBodyFailed when it breaks."""

    async def readany(self) -> bytes:
        """The next bytes as they arrive; ``b""`` at the end."""
        ...

    def read_ready(self) -> bytes:
        """The bytes already received, without waiting; ``b""`` when none
        are (the end, or not yet: :meth:`readany` tells)."""
        ...


class UpstreamBody(Protocol):
    """A partner's answer body, still on the wire. Raises UpstreamBodyFailed
    when it breaks, TimeoutError when a read waits past the route's timeout."""

    def is_eof(self) -> bool:
        """The whole body is in hand (``read_nowait`` returns the rest)."""
        ...

    def read_nowait(self) -> bytes: ...

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all with -1); ``b""`` at the end."""
        ...

    def iter_any(self) -> AsyncIterator[bytes]: ...


class UpstreamResponse(Protocol):
    """An answer whose body is still on the wire. ``release()`` hands a fully
    read connection back to the pool (closing it otherwise); ``close()`` closes
    it unless it was already handed back. Both are idempotent."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> Headers: ...

    @property
    def fields(self) -> Fields:
        """The header fields as the partner spelled them, in order."""
        ...

    def header_values(self, name: str) -> list[str]:
        """Every value of the field ``name`` (any case), in order."""
        ...

    @property
    def content(self) -> UpstreamBody: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


Body = bytes | AsyncIterator[bytes] | None


class UpstreamClient(Protocol):
    async def request(
        self,
        endpoint: Any,  # the engine's own value, built at load (upstream.Endpoint)
        method: str,
        url: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: Body,
        interim: Interim | None = None,
    ) -> UpstreamResponse:
        """Send one request; ``url`` is absolute, ``target`` its path and query;
        ``interim`` gets the 1xx answers to forward (not 100 Continue: the
        proxy answers that to the app itself). Raises only ConnectFailed,
        Dropped, BodyFailed, UpstreamProtocolError or TimeoutError."""
        ...

    async def close(self) -> None: ...


class AppSide(Protocol):
    """One app request and the means to answer it, as the forwarder sees it
    (proxy/http1/listener.py's AppExchange). The request side is read-only."""

    method: str
    raw_path: str
    version: tuple[int, int]
    remote: str | None
    scheme: str
    # The host of the intercepted CONNECT this request came through (its TLS
    # is the proxy's own, with a leaf for this host); None on plain HTTP.
    tunnel: str | None

    @property
    def headers(self) -> Headers: ...

    @property
    def fields(self) -> Fields:
        """The header fields as the app spelled them, in order."""
        ...

    content_length: int | None
    body_exists: bool
    status: int  # of the answer, once started

    async def open_body(self) -> AppBody:
        """The body; answers Expect: 100-continue first."""
        ...

    async def start(
        self,
        status: int,
        reason: str | None,
        headers: list[tuple[str, str]],
        *,
        hold: bool = False,
    ) -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def finish(self) -> None: ...

    async def interim(self, status: int, reason: str, headers: Fields) -> None:
        """Pass on a 1xx answer of the partner's (103 Early Hints...)."""
        ...

    def abort(self) -> None: ...

    async def respond(
        self, status: int, body: bytes, headers: dict[str, str] | None, *, close: bool
    ) -> None: ...

    async def intercept(self, host: str, context: ssl.SSLContext) -> None:
        """Answer this CONNECT with 200 and complete the app's TLS with
        ``context``; later requests on the connection are for ``https://host``.
        Raises BadRequest (bytes came before the answer) or HandshakeFailed."""
        ...

    async def relay(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        idle_timeout: float,
        on_up: Callable[[int], None],
        on_down: Callable[[int], None],
    ) -> Relayed:
        """Connect to ``host:port``, answer this CONNECT with 200 and relay
        bytes both ways until the tunnel ends. Raises ConnectFailed (or
        ConnectTimedOut) before any answer."""
        ...


class Relayed(Protocol):
    """How a blind tunnel went."""

    @property
    def up(self) -> int: ...

    @property
    def down(self) -> int: ...

    @property
    def ended(self) -> str: ...
