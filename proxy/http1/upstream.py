"""HTTP/1.1 to the partner APIs: the upstream half of the engine.

:class:`LeanClient` implements :class:`~proxy.forwarding.seams.UpstreamClient`:
a keep-alive pool per origin and a request writer of its own, on aiohttp's
response protocol and C parser (``ResponseHandler``). It skips what
``ClientSession`` does per request that a transparent proxy does not need (URL
objects, cookie jars, redirects, tracing, header normalisation, a response
object with charset and content-type logic), and forwards what
``ClientSession`` cannot (1xx answers, header spelling).

Transport failures are translated here, once, into the facts the forwarder
acts on: :class:`~proxy.errors.ConnectFailed` (never connected;
``ConnectTimedOut`` within ``connect_timeout``), :class:`~proxy.errors.Dropped`
(closed before any answer: safe to resend an idempotent request),
``TimeoutError``, and :class:`~proxy.errors.UpstreamProtocolError` for an
answer that is not one (http1/policy.py says what an answer may be).
"""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_module
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final, cast

import aiohttp
from aiohttp import hdrs
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDictProxy

from proxy.compiled import mypyc_attr
from proxy.errors import (
    BodyFailed,
    ConnectFailed,
    ConnectTimedOut,
    Dropped,
    UpstreamBodyFailed,
    UpstreamProtocolError,
    os_reason,
    untraced,
)
from proxy.forwarding.seams import Body, Fields, Interim, UpstreamResponse
from proxy.http1.policy import (
    READ_BUFFER,
    answer_end,
    bad_field_name,
    partner_fault,
    raw_fields,
    request_framing,
    request_head,
    starts_folded,
)
from proxy.routing.table import Endpoint

KEEPALIVE_TIMEOUT: Final = 30.0  # below the usual 60 s idle timeout of partner load balancers
DNS_CACHE_TTL: Final = 60.0  # seconds; a name is resolved per new connection at most this often
MAX_IDLE_PER_ORIGIN: Final = 1024  # idle keep-alive connections kept per origin


@mypyc_attr(native_class=False)
class _Connection(ResponseHandler):
    """aiohttp's response protocol, with two savings per request:

    - it remembers the parameters its parser was made with: a keep-alive
      connection keeps its parser (llhttp parses one answer after another)
      until a request needs different ones (HEAD);
    - the read timeout is a deadline moved by each read, checked by one timer
      that re-arms itself when it fires early, instead of a timer cancelled and
      made again on every read (aiohttp's way).
    """

    params: tuple[bool, float] | None = None
    _deadline: float | None = None
    folded = False  # the answer's first field line started with whitespace

    answered = False  # a byte of an answer (a 1xx included) came for the request in flight

    def data_received(self, data: bytes) -> None:
        if data:
            self.answered = True
        if data.startswith(b"HTTP/1."):
            if starts_folded(data):
                self.folded = True
            end = answer_end(data, self.params is not None and self.params[0])
            if end is not None and end < len(data):
                # Bytes after a whole answer (a body longer than its
                # Content-Length, a body after a 204, 304 or HEAD answer):
                # llhttp would parse them as the next answer and drop this one
                # with an error. The answer is kept, the bytes are not, and the
                # connection is not reused (nginx does the same).
                self.force_close()
                data = data[:end]
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if exc is not None and self._payload is not None and not self._payload.is_eof():
            # A reset is not an end (RFC 9112 §8): a body framed by the close
            # is incomplete, and aiohttp would end it as if the close were clean.
            self._payload.set_exception(
                aiohttp.ClientPayloadError("the partner reset the connection")
            )
        # No local holds the payload here: aiohttp's connection_lost gives it an
        # exception whose cause's traceback holds this frame (a cycle otherwise).
        super().connection_lost(exc)

    # While a head is awaited, the deadline is fixed: the route's timeout bounds
    # the wait for the whole head, and a partner that trickles it byte by
    # byte does not move it (issue 11, sixth outside round). Body reads move
    # it: there it bounds each gap.
    _head_fixed = False

    def start_timeout(self) -> None:
        """The request is sent: the wait for a head (a 1xx or the answer) starts."""
        self._head_fixed = False
        self._reschedule_timeout()
        self._head_fixed = True

    def head_received(self) -> None:
        """The answer's head is in: from here each read moves the deadline."""
        self._head_fixed = False
        self._reschedule_timeout()

    def _reschedule_timeout(self) -> None:
        if self._head_fixed:
            return
        timeout = self._read_timeout
        if not timeout:
            self._deadline = None
            return
        self._deadline = deadline = self._loop.time() + timeout
        handle = self._read_timeout_handle
        if handle is not None and handle.when() > deadline:
            # A check armed for a longer timeout (the previous request on this
            # pooled connection was another route's): the deadline belongs to
            # this request, so the check moves earlier.
            handle.cancel()
            handle = None
        if handle is None:
            self._read_timeout_handle = self._loop.call_at(deadline, self._check_deadline)

    def _drop_timeout(self) -> None:
        self._deadline = None  # a pending check finds nothing to do

    def _check_deadline(self) -> None:
        self._read_timeout_handle = None
        deadline = self._deadline
        if deadline is None:
            return
        if self._loop.time() >= deadline:
            self._on_read_timeout()
        else:
            self._read_timeout_handle = self._loop.call_at(deadline, self._check_deadline)


# What aiohttp's response parser and StreamReader raise for a broken body.
_BROKEN: Final = (aiohttp.ClientError, HttpProcessingError, OSError, ValueError)


class LeanBody:
    """aiohttp's StreamReader for an answer, behind seams.UpstreamBody: its
    exceptions become UpstreamBodyFailed (or TimeoutError) here, once."""

    __slots__ = ("_payload",)

    def __init__(self, payload: Any) -> None:
        self._payload = payload

    def is_eof(self) -> bool:
        return bool(self._payload.is_eof())

    def read_nowait(self) -> bytes:
        try:
            data: bytes = self._payload.read_nowait()
        except _BROKEN as exc:
            raise UpstreamBodyFailed(_reason(exc)) from None
        return data

    async def read(self, n: int = -1) -> bytes:
        try:
            data: bytes = await self._payload.read(n)
        except TimeoutError as exc:
            raise _timed_out(exc) from None
        except _BROKEN as exc:
            raise UpstreamBodyFailed(_reason(exc)) from None
        return data

    def iter_any(self) -> AsyncIterator[bytes]:
        return _Chunks(self._payload)


def _reason(exc: BaseException) -> str:
    """What a failed body read or answer says (its traceback dropped)."""
    return partner_fault(untraced(exc))


def _timed_out(exc: BaseException) -> TimeoutError:
    """A body read's timeout as a new TimeoutError: the payload keeps the one
    it raised, to raise it again (see _untraced)."""
    return TimeoutError(str(untraced(exc)))


class _Chunks:
    """LeanBody.iter_any's iterator (a class: mypyc compiles no async generators)."""

    def __init__(self, payload: Any) -> None:
        self._payload = payload

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            chunk: bytes = await self._payload.readany()
        except TimeoutError as exc:
            raise _timed_out(exc) from None
        except _BROKEN as exc:
            raise UpstreamBodyFailed(_reason(exc)) from None
        if not chunk:
            raise StopAsyncIteration
        return chunk


class LeanResponse:
    """An answer on a pooled connection. The connection goes back to the pool
    by itself when the body's end has been parsed and the request was written
    whole; ``close()`` before that closes it."""

    __slots__ = (
        "_client",
        "_key",
        "_protocol",
        "_writer",
        "content",
        "headers",
        "raw",
        "reason",
        "status",
    )

    def __init__(
        self,
        client: LeanClient,
        key: tuple[str, Any],
        protocol: _Connection,
        message: Any,
        payload: Any,
        writer: asyncio.Task[None] | None,
    ) -> None:
        self.status: int = message.code
        self.reason: str | None = message.reason
        self.headers: CIMultiDictProxy[str] = message.headers
        self.raw: Sequence[tuple[bytes, bytes]] = message.raw_headers
        self.content = LeanBody(payload)
        self._client = client
        self._key = key
        self._protocol: _Connection | None = protocol
        self._writer = writer
        payload.on_eof(self._ended)

    def _ended(self) -> None:
        protocol = self._protocol
        if protocol is None:
            return
        writer = self._writer
        if writer is not None and not (
            writer.done() and not writer.cancelled() and writer.exception() is None
        ):
            return  # the partner answered before the body was sent: close() will close
        self._protocol = None
        self._client.give_back(self._key, protocol)

    @property
    def fields(self) -> Fields:
        return raw_fields(self.raw)

    def header_values(self, name: str) -> list[str]:
        return self.headers.getall(name, [])

    def release(self) -> None:
        self.close()

    def close(self) -> None:
        protocol = self._protocol
        if protocol is None:
            return
        self._protocol = None
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        protocol.close()


class LeanClient:
    """Keep-alive HTTP/1.1 connections per (origin, TLS context), most recently
    used first; idle ones close after :data:`KEEPALIVE_TIMEOUT`. Safe for any
    number of concurrent requests on one event loop; there is no cap on
    connections (apps bound their own concurrency; routes have max_concurrent).
    """

    def __init__(self, keepalive: float = KEEPALIVE_TIMEOUT) -> None:
        self._keepalive = keepalive
        self._idle: dict[tuple[str, Any], list[tuple[_Connection, float]]] = {}
        self._names: dict[tuple[str, int], tuple[float, list[tuple[Any, ...]]]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._writers: set[asyncio.Task[None]] = set()
        self._closed = False

    async def request(
        self,
        endpoint: Endpoint,
        method: str,
        url: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: Body,
        interim: Interim | None = None,
    ) -> UpstreamResponse:
        extra, chunked = request_framing(method, headers, body)
        head = request_head(method, target, headers, extra)
        key = (endpoint.origin, endpoint.ssl)
        protocol = self._take(key)
        if protocol is None:
            protocol = await self._connect(endpoint)
        params = (method == "HEAD", endpoint.read_timeout)
        if protocol.params != params:
            protocol.set_response_params(
                skip_payload=params[0],
                read_until_eof=True,
                auto_decompress=False,
                read_timeout=params[1],
                read_bufsize=READ_BUFFER,
            )
            protocol.params = params
        transport = protocol.transport
        assert transport is not None
        protocol.answered = False
        writer: asyncio.Task[None] | None = None
        if body is None:
            transport.write(head)
            protocol.start_timeout()
        elif isinstance(body, bytes):
            # One system call, no copy: uvloop writes the two as one writev
            # (asyncio 3.11 joins them; head + body here copied the body).
            transport.writelines((head, body))
            protocol.start_timeout()
        else:
            transport.write(head)
            writer = asyncio.ensure_future(_write_body(protocol, body, chunked))
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        try:
            while True:
                # Any: the C parser's message is no NamedTuple at run time
                answer: Any = await cast(Any, protocol).read()
                message, payload = answer
                code = message.code
                if code < 100 or code > 599:
                    # RFC 9110 §15: a status is 100-599; anything else is no answer.
                    raise UpstreamProtocolError(f"status {code} is outside 100-599")
                if code == 101:
                    # The proxy never asks for an upgrade (it drops Upgrade), so a
                    # switch of protocols is an answer to a question not asked.
                    raise UpstreamProtocolError("101 Switching Protocols, no Upgrade asked")
                if code > 199:
                    protocol.head_received()
                    break
                # A 1xx says the partner is at work (102 Processing): the wait
                # for the next head starts again, bounded as the first.
                protocol.start_timeout()
                # RFC 9110 §15.2: a proxy forwards the 1xx answers it did not
                # ask for (103 Early Hints, 102); 100 Continue is this hop's.
                if code != 100 and interim is not None:
                    await interim(code, message.reason, raw_fields(message.raw_headers))
        except BaseException as exc:
            if writer is not None:
                writer.cancel()
            protocol.close()
            if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
                if protocol.answered:
                    # A 1xx or part of a head came: the request reached the
                    # partner's application, so it is never sent again (and the
                    # app never gets one attempt's 1xx and another's answer).
                    raise UpstreamProtocolError(
                        f"the connection closed in the answer ({type(exc).__name__})"
                    ) from None
                raise Dropped(type(exc).__name__) from untraced(exc)
            if isinstance(exc, TimeoutError):
                raise _timed_out(exc) from None  # the connection keeps the one it raised
            if isinstance(exc, (BodyFailed, UpstreamProtocolError, asyncio.CancelledError)):
                raise
            if isinstance(exc, _BROKEN):
                raise UpstreamProtocolError(_reason(exc)) from None
            raise
        if message.version[0] != 1 or protocol.folded or bad_field_name(message.raw_headers):
            protocol.close()
            if writer is not None:
                writer.cancel()
            raise UpstreamProtocolError(
                f"HTTP/{message.version[0]}.{message.version[1]} status line"
                if message.version[0] != 1
                else "a header field name that is not a token (RFC 9112 §5.1)"
            )
        if code == 204 and (
            hdrs.CONTENT_LENGTH in message.headers or hdrs.TRANSFER_ENCODING in message.headers
        ):
            # RFC 9110 §15.3.5: a 204 has no content, whatever its fields say;
            # bytes the partner sent anyway would open the next answer read on
            # this connection, so it is not reused.
            protocol.force_close()
        if message.chunked:
            # llhttp keeps a response's last trailer field pending and hands it
            # to the next answer parsed on this connection as a header: the
            # next request on it gets a fresh parser.
            protocol.params = None
        return LeanResponse(self, key, protocol, message, payload, writer)

    def _take(self, key: tuple[str, Any]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        oldest = time.monotonic() - self._keepalive
        while idle:
            protocol, since = idle.pop()
            if since > oldest and protocol.is_connected() and not protocol.should_close:
                return protocol
            protocol.close()
        return None

    def give_back(self, key: tuple[str, Any], protocol: _Connection) -> None:
        """Called when an answer has been read whole: keep the connection if
        both sides allow it (no Connection: close, nothing left over)."""
        if self._closed or protocol.should_close or not protocol.is_connected():
            protocol.close()
            return
        idle = self._idle.setdefault(key, [])
        if len(idle) >= MAX_IDLE_PER_ORIGIN:
            protocol.close()
            return
        idle.append((protocol, time.monotonic()))
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive / 2, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        oldest = time.monotonic() - self._keepalive
        for key, idle in list(self._idle.items()):
            kept = []
            for protocol, since in idle:
                if since > oldest and protocol.is_connected():
                    kept.append((protocol, since))
                else:
                    protocol.close()
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        if self._idle and not self._closed:
            self._sweeper = asyncio.get_running_loop().call_later(self._keepalive / 2, self._sweep)

    async def _addresses(self, host: str, port: int) -> list[tuple[Any, ...]]:
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        except OSError:
            pass
        else:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            return [(family, host, port)]
        cached = self._names.get((host, port))
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        addresses = [(family, sockaddr[0], sockaddr[1]) for family, _, _, _, sockaddr in infos]
        self._names[(host, port)] = (now + DNS_CACHE_TTL, addresses)
        return addresses

    async def _connect(self, endpoint: Endpoint) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(endpoint.connect_timeout):
                try:
                    addresses = await self._addresses(endpoint.host, endpoint.port)
                except OSError as exc:  # a resolver error: its own words
                    raise ConnectFailed(exc.strerror or os_reason(exc)) from None
                # The last refusal's words, not the exception: kept in this
                # frame, its traceback would make a cycle (tests/test_cycles.py).
                last = ""
                for family, address, port in addresses:
                    try:
                        _, protocol = await loop.create_connection(
                            lambda: _Connection(loop),
                            address,
                            port,
                            family=family,
                            ssl=endpoint.ssl,
                            server_hostname=endpoint.host if endpoint.ssl else None,
                        )
                    except ssl_module.SSLError as exc:
                        raise ConnectFailed(f"TLS handshake failed: {exc.reason}") from None
                    except OSError as exc:
                        last = os_reason(exc)
                        continue
                    return protocol
                raise ConnectFailed(last or "no address to connect to")
        except TimeoutError:
            raise ConnectTimedOut(
                f"no connection within connect_timeout ({endpoint.connect_timeout:g}s)"
            ) from None

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for protocol, _ in idle:
                protocol.close()
        self._idle.clear()
        for writer in list(self._writers):
            writer.cancel()


async def _write_body(protocol: ResponseHandler, body: AsyncIterator[bytes], chunked: bool) -> None:
    """Send a streamed body, waiting whenever the socket's buffer is full. If
    the source fails, the request is left visibly incomplete (no last chunk,
    short of Content-Length, connection closed) and the failure is put where
    the answer is awaited."""
    try:
        async for chunk in body:
            transport = protocol.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("upstream connection closed while sending the body")
            if not chunk:
                continue
            if chunked:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                transport.write(chunk)
            if protocol.writing_paused:
                await protocol._drain_helper()
        if chunked and protocol.transport is not None:
            protocol.transport.write(b"0\r\n\r\n")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        failure: BaseException = exc if isinstance(exc, OSError) else BodyFailed(repr(exc))
        protocol.set_exception(failure)
        protocol.close()
        return
    protocol.start_timeout()
