"""The apps' side of the socket: aiohttp's low-level server with limits.

aiohttp bounds header sizes and counts and closes idle keep-alive
connections, but has no deadline for receiving a request's head: a client
that trickles one header byte at a time (slowloris) holds a connection for
ever. :class:`GuardedHandler` adds that deadline. (It reads two counters of
aiohttp's ``RequestHandler``; tests/test_hardening.py fails if they change.)
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from multidict import CIMultiDictProxy

from .config import InboundLimits
from .errors import malformed_reason
from .log import get_logger

log = get_logger("proxy.inbound")


class GuardedHandler(RequestHandler):
    __slots__ = ("_head_count", "_head_timeout", "_head_timer")

    def __init__(self, *args: Any, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timeout = head_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_count = 0

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._disarm()
        elif self._head_timer is None and not self._request_in_progress and not self._messages:
            # Bytes of a request head arrived, the head is not complete: start the clock.
            self._head_count = before
            self._head_timer = self._loop.call_later(self._head_timeout, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._request_count == self._head_count and not self._request_in_progress:
            log.warning("request_head_timeout", client=self._peer(), after_s=self._head_timeout)
            if self.transport is not None:
                self.transport.close()

    def _peer(self) -> str | None:
        if self.transport is None:
            return None
        peer = self.transport.get_extra_info("peername")
        return str(peer[0]) if peer else None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's own error log would quote the offending request bytes (an
        Authorization header among them); ours names the error, not the data."""
        error = kw.get("exc_info")
        if isinstance(error, BaseException) and isinstance(error, HttpProcessingError):
            return  # a malformed request: logged by handle_error below
        log.error("internal_error", exc_info=error if isinstance(error, BaseException) else True)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        if request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        reason = malformed_reason(exc) if status < 500 else "internal error"
        if status < 500:
            log.warning(
                "malformed_request",
                client=request.remote,
                status=status,
                error=type(exc).__name__ if exc else None,
                reason=reason,
            )
        else:
            self.log_exception("request handler failed", exc_info=exc)
        response = web.json_response(
            {"error": "bad_request" if status < 500 else "internal_error", "message": reason},
            status=status,
        )
        response.force_close()
        return response


class AiohttpExchange:
    """The forwarder's view of one request (forward.AppSide) on aiohttp's
    ``web.Server``: the request is aiohttp's, the answer a StreamResponse or,
    for the proxy's own errors, a Response that aiohttp sends after the handler."""

    __slots__ = (
        "body_exists",
        "content_length",
        "headers",
        "method",
        "raw_path",
        "remote",
        "request",
        "response",
        "scheme",
        "status",
        "version",
    )

    def __init__(self, request: BaseRequest) -> None:
        self.request = request
        self.method: str = request.method
        self.raw_path: str = request.raw_path
        self.version: tuple[int, int] = request.version
        self.headers: CIMultiDictProxy[str] = request.headers
        self.remote = request.remote
        self.scheme: str = request.scheme
        self.content_length = request.content_length
        self.body_exists = request.body_exists
        self.status = 0
        self.response: StreamResponse | None = None

    async def open_body(self) -> Any:
        """The body as aiohttp's StreamReader; answers ``Expect: 100-continue``
        first (aiohttp's low-level server leaves that to the handler)."""
        request = self.request
        if (
            request.version >= (1, 1)
            and request.headers.get("Expect", "").lower() == "100-continue"
            and request.body_exists
        ):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return request.content

    async def start(
        self,
        status: int,
        reason: str | None,
        headers: list[tuple[str, str]],
        *,
        hold: bool = False,  # aiohttp sends the head with the first body bytes anyway
    ) -> None:
        self.status = status
        self.response = StreamResponse(status=status, reason=reason, headers=headers)
        await self.response.prepare(self.request)

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def finish(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def abort(self) -> None:
        if self.response is not None:
            self.response.force_close()
        if self.request.transport is not None:
            self.request.transport.close()

    async def respond(
        self, status: int, body: bytes, headers: dict[str, str] | None, *, close: bool
    ) -> None:
        self.status = status
        response = web.Response(
            status=status, body=body, content_type="application/json", headers=headers
        )
        if close:
            response.force_close()
        self.response = response


def aiohttp_handler(serve: Any) -> Any:
    """A ``web.Server`` handler around ``Forwarder.serve``."""

    async def handle(request: BaseRequest) -> StreamResponse:
        exchange = AiohttpExchange(request)
        await serve(exchange)
        assert exchange.response is not None
        return exchange.response

    return handle


class InboundServer(web.Server):
    """``web.Server`` whose connections get :class:`GuardedHandler` and the limits."""

    def __init__(self, handler: Any, limits: InboundLimits, **kwargs: Any) -> None:
        super().__init__(
            handler,
            max_line_size=limits.max_header_size,
            max_field_size=limits.max_header_size,
            max_headers=limits.max_headers,
            keepalive_timeout=limits.idle_timeout,
            **kwargs,
        )
        self._head_timeout = limits.header_timeout

    def __call__(self) -> RequestHandler:
        return GuardedHandler(
            self, loop=self._loop, head_timeout=self._head_timeout, **self._kwargs
        )
