"""The apps' side of the engine: HTTP/1.1 connections parsed by aiohttp's own
C request parser, answered by the forwarder directly.

What aiohttp's ``web.Server`` does per request that a proxy does not need
(a ``BaseRequest`` with its URL, cookies, match info and lazy properties; a
``StreamResponse`` with content-type, charset and compression logic) is
skipped: about half of the proxy's CPU per request on the benchmark machine
(docs/performance.md). The limits (``inbound:``): request-line and header
sizes, header count, a deadline for a request's head (slowloris), idle
keep-alive connections closed, a bounded queue of pipelined requests;
malformed requests get a JSON refusal (http1/policy.py) that never quotes
their bytes.

Connections are served one request at a time, in order (pipelined requests
wait in the queue). A request whose body was not read to its end closes the
connection after the answer, gracefully: our side is shut for writing and the
rest of the body is read and dropped for up to :data:`LINGER` seconds, so the
app sees the answer rather than a reset.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import errno
import json
import os
import re
import socket
import ssl
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Final

from aiohttp import hdrs
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpRequestParser  # the C parser (proxy/compat.py checks it)
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDictProxy

from proxy.compiled import mypyc_attr
from proxy.config.model import InboundLimits
from proxy.errors import (
    AppBodyFailed,
    BadRequest,
    HandshakeFailed,
    HeadTimeout,
    NotImplementedByProxy,
    RequestFailed,
    untraced,
)
from proxy.forwarding.seams import AppBody, Fields
from proxy.http1.policy import (
    METHOD_START,
    READ_BUFFER,
    DateHeader,
    framing_error,
    raw_fields,
    refusal_for,
    response_head,
    without_length,
)
from proxy.http1.spelling import SpellingParser
from proxy.http1.tunnel import Relay, RelayResult
from proxy.log import get_logger

log = get_logger("proxy.inbound")

LINGER: Final = 2.0  # seconds to drain an unread request body before closing
MAX_PIPELINED: Final = 16  # parsed requests waiting on one connection before reading pauses
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
_LATER_MINOR: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ HTTP/1\.[2-9]\r?\n")
_AFTER_CLOSE: Final = "Data after `Connection: close`"
# The start of a request line that is all method so far (a token, no space yet).
_PARTIAL_METHOD: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")
# RFC 9110 §9.3.6: a 2xx to CONNECT has no Content-Length or Transfer-Encoding.
CONNECT_ESTABLISHED: Final = b"HTTP/1.1 200 Connection Established\r\n\r\n"
Handler = Callable[[Any], Awaitable[None]]  # Forwarder.serve, which takes an AppExchange


_REFUSED_LINE: Final = re.compile(r"\n\n  (b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\")\n")
_TOKEN_CHAR: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]")


def _could_be_a_method(exc: BadHttpMethod) -> bool:
    """Whether the line llhttp refused as a method starts like one (a token
    character, RFC 9110 §9.1). aiohttp quotes that line in its message; when
    it cannot be read, the answer is yes (the Python parser decides)."""
    found = _REFUSED_LINE.search(str(getattr(exc, "message", "") or ""))
    if found is None:
        return True
    try:
        line = ast.literal_eval(found.group(1))
    except (ValueError, SyntaxError):
        return True
    return not isinstance(line, bytes) or _TOKEN_CHAR.match(line.lstrip(b"\r\n")) is not None


def _end_of_messages(
    window: bytes, start: int, prior: Any, before: int, messages: Sequence[tuple[Any, Any]]
) -> int | None:
    """Where in ``window`` (a read, ``start`` bytes of the stream before it
    first) the last of ``messages`` ends, walking the read message by
    message: the rest of ``prior``'s sized body, then each message's head
    (its request line, as many field lines as it has, the empty line) and
    its Content-Length body. The first head may have begun in an earlier
    read: it ends at the window's first CRLF CRLF. ``None`` when the walk
    cannot be made (a chunked message, a head not where it should be)."""
    position = start
    if prior is not None and prior[1] is not None and not prior[0].chunked:
        owed = int(prior[0].headers.get(hdrs.CONTENT_LENGTH) or 0) - before
        position += max(owed, 0)  # the prior body's bytes that came in this read
    for index, (message, _) in enumerate(messages):
        if message.chunked:
            return None
        version = message.version
        line = f"{message.method} {message.path} HTTP/{version[0]}.{version[1]}\r\n".encode(
            "utf-8", "surrogateescape"
        )
        while window.startswith((b"\r\n", b"\n"), position):  # blank lines before a head
            position += 2 if window.startswith(b"\r\n", position) else 1
        if window.startswith(line, position):
            position += len(line)
            for _ in range(len(message.raw_headers)):
                found = window.find(b"\r\n", position)
                if found <= position:  # none, or an empty line too soon
                    return None
                position = found + 2
            if not window.startswith(b"\r\n", position):
                return None
            position += 2
        elif index == 0:  # the head began in an earlier read: its end is the first CRLF CRLF
            found = window.find(b"\r\n\r\n", max(position - 3, 0))
            if found == -1:
                return None
            position = found + 4
        else:
            return None
        position += int(message.headers.get(hdrs.CONTENT_LENGTH) or 0)
        if position > len(window):
            return None
    return position


def _fail_body(payload: Any, error: BaseException) -> None:
    """End a request body's reader with ``error``. aiohttp's ``readany``
    looks for an exception only as it starts: a wake-up already on its way
    (a chunk that ended in the read that also broke the framing) sends it
    back to waiting past the exception, until body_timeout (round 13). So
    the exception is set again on the next loop iteration, when the reader
    waits anew; a second set on a reader that is not waiting changes nothing."""
    payload.set_exception(error)
    asyncio.get_running_loop().call_soon(payload.set_exception, error)


class _Body:
    """aiohttp's StreamReader for a request body, behind seams.AppBody: what
    it raises (a reset, bad chunking, a body cut short) becomes AppBodyFailed."""

    def __init__(self, payload: Any) -> None:
        self._payload = payload

    async def readany(self) -> bytes:
        try:
            data: bytes = await self._payload.readany()
        except (RequestPayloadError, HttpProcessingError, OSError, ValueError) as exc:
            raise AppBodyFailed(type(untraced(exc)).__name__) from None
        return data

    def read_ready(self) -> bytes:
        try:
            data: bytes = self._payload.read_nowait()
        except (RequestPayloadError, HttpProcessingError, OSError, ValueError) as exc:
            raise AppBodyFailed(type(untraced(exc)).__name__) from None
        return data


class AppExchange:
    """One request from an app and the means to answer it. The request side is
    read-only; the answer is started once, then written, then finished (or the
    connection is cut with :meth:`abort` when its body cannot be completed)."""

    def __init__(self, connection: AppConnection, message: Any, payload: Any) -> None:
        self._connection = connection
        self.method: str = message.method
        self.raw_path: str = message.path
        self.version: tuple[int, int] = message.version
        self.headers: CIMultiDictProxy[str] = message.headers
        self._raw = message.raw_headers
        self.remote = connection.remote
        # The apps' side is plain HTTP (docs/security.md), or TLS the proxy
        # completed itself inside an intercepted CONNECT to ``tunnel``.
        self.tunnel: str | None = connection.tunnel
        self.scheme = "http" if self.tunnel is None else "https"
        self._payload = payload
        length = self.headers.get(hdrs.CONTENT_LENGTH)
        self.content_length: int | None = int(length) if length is not None else None
        self.body_exists: bool = message.chunked or bool(self.content_length)
        self.closes: bool = (
            message.should_close or connection.closing or message is connection.last_served
        )
        # RFC 9110 §10.1.1: answer "100-continue" only when the body is wanted.
        self._continue = (
            self.body_exists
            and self.version >= (1, 1)
            and self.headers.get(hdrs.EXPECT, "").lower() == "100-continue"
        )
        self.started = False
        self.status = 0
        self._chunked = False
        self._by_close = False  # the answer's body ends with the connection
        self._no_body = False
        self._head: bytes | None = None

    @property
    def fields(self) -> Fields:
        """The header fields as the app spelled them, in order, repeats kept."""
        return raw_fields(self._raw)

    async def interim(self, status: int, reason: str, headers: Fields) -> None:
        """A 1xx answer from the partner (103 Early Hints...), passed on before
        the final one; never to an HTTP/1.0 app (RFC 9110 §15.2)."""
        if self.version < (1, 1) or self.started:
            return
        self._connection.write(response_head(status, reason, without_length(headers)))

    async def open_body(self) -> AppBody:
        """The body (seams.AppBody); the first call sends 100 Continue."""
        if self._continue:
            self._continue = False
            self._connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return _Body(self._payload)

    @property
    def body_complete(self) -> bool:
        return not self.body_exists or self._payload.is_eof()

    def _finish_headers(self, headers: list[tuple[str, str]], has_length: bool) -> None:
        status = self.status
        self._no_body = self.method == "HEAD" or status in (204, 304) or status < 200
        if not self._no_body and not has_length:
            if self.version >= (1, 1):
                headers.append(("Transfer-Encoding", "chunked"))
                self._chunked = True
            else:
                self.closes = True  # HTTP/1.0: the body ends when the connection does
                self._by_close = True
        if self.closes:
            headers.append(("Connection", "close"))
        elif self.version < (1, 1):
            headers.append(("Connection", "keep-alive"))

    async def start(
        self,
        status: int,
        reason: str | None,
        headers: list[tuple[str, str]],
        *,
        hold: bool = False,
    ) -> None:
        """Send the status line and ``headers`` (hop-by-hop ones already gone);
        framing and ``Connection`` are this hop's and are added here. With
        ``hold`` (the body is already in hand) the head waits for the first
        body bytes, so that a small answer leaves in one write."""
        self.started = True
        self.status = status
        if status == 204:
            headers = without_length(headers)
        if self._connection.closing:
            self.closes = True  # draining: tell the app this connection ends
        has_length = False
        has_date = False
        for name, _ in headers:
            if len(name) == 14 and name.lower() == "content-length":
                has_length = True
            elif len(name) == 4 and name.lower() == "date":
                has_date = True
        if not has_date:
            headers.append(("Date", DateHeader.now()))
        if not self.body_complete:
            self.closes = True
        self._finish_headers(headers, has_length)
        head = response_head(status, reason, headers)
        if hold:
            self._head = head
        else:
            self._connection.write(head)

    async def write(self, data: bytes) -> None:
        if not data or self._no_body:
            return
        connection = self._connection
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self._head is not None:
            data = self._head + data
            self._head = None
        connection.write(data)
        if connection.writing_paused:
            await connection.drained()

    async def finish(self) -> None:
        tail = b"0\r\n\r\n" if self._chunked else b""
        if self._head is not None:
            tail = self._head + tail
            self._head = None
        if tail:
            self._connection.write(tail)
        if self._connection.writing_paused:
            await self._connection.drained()

    def abort(self) -> None:
        """Cut the connection: the answer cannot be completed, and an app must
        see a short body as an error, never as a whole one. A Content-Length
        or chunked framing shows the cut on a plain close; an answer that ends
        with the connection (HTTP/1.0) would read as whole, so it ends in a
        reset (round 11)."""
        self.closes = True
        if self._by_close:
            self._connection.reset()
        else:
            self._connection.close()

    async def intercept(self, host: str, context: ssl.SSLContext) -> None:
        """Answer this CONNECT with 200 and complete the app's TLS handshake
        with ``context``; the connection then carries requests for
        ``https://host``. Raises BadRequest when the app sent bytes before the
        answer, HandshakeFailed when the handshake fails (the connection is
        closed then)."""
        connection = self._connection
        if connection.held:
            raise BadRequest("the app sent bytes after CONNECT before its answer; wait for the 200")
        transport = connection.transport
        if transport is None or transport.is_closing():
            raise HandshakeFailed("the app closed the connection")
        self.started = True
        self.status = 200
        transport.write(CONNECT_ESTABLISHED)
        try:
            tls = await connection._loop.start_tls(
                transport,
                connection,
                context,
                server_side=True,
                ssl_handshake_timeout=self._connection._listener.limits.header_timeout,
            )
        except ssl.SSLError as exc:
            self.closes = True
            connection.close()
            raise HandshakeFailed(exc.reason or type(exc).__name__) from None
        except (OSError, TimeoutError, ConnectionError) as exc:
            self.closes = True
            connection.close()
            reason = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            raise HandshakeFailed(reason) from None
        if tls is None:  # the app went away during the handshake
            self.closes = True
            connection.close()
            raise HandshakeFailed("the app closed the connection")
        # The connection now carries the tunnel's requests: a CONNECT's own
        # version or Connection field (http.client sends HTTP/1.0) says
        # nothing of them.
        self.closes = connection.closing
        connection.inner(tls, host)

    async def relay(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        idle_timeout: float,
        on_up: Callable[[int], None],
        on_down: Callable[[int], None],
    ) -> RelayResult:
        """Connect to ``host:port``, answer this CONNECT with 200, then relay
        bytes both ways until the tunnel ends. Raises ConnectFailed (or
        ConnectTimedOut) before the answer when the host cannot be reached."""
        connection = self._connection
        relay = Relay(connection, idle_timeout, on_up, on_down)
        await relay.open(host, port, connect_timeout)
        self.started = True
        self.status = 200
        self.closes = True
        connection.write(CONNECT_ESTABLISHED)
        held = bytes(connection.held or b"")
        connection.held = None
        connection.relay = relay
        if connection._buffer_paused:
            connection._resume_reading_for_buffer()
        relay.up(held)
        if connection.app_eof:
            relay.app_eof()
        return await relay.wait()

    async def respond(
        self, status: int, body: bytes, headers: dict[str, str] | None, *, close: bool
    ) -> None:
        """A whole answer of the proxy's own (a JSON error)."""
        if close:
            self.closes = True
        fields = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if headers:
            fields.extend(headers.items())
        await self.start(status, None, fields, hold=True)
        await self.write(body)
        await self.finish()


@mypyc_attr(native_class=False)
class AppConnection(BaseProtocol):
    """One app connection: parses requests, runs the handler for each in turn."""

    def __init__(self, listener: Listener) -> None:
        loop = listener.loop
        super().__init__(loop)
        self._listener = listener
        self._parser: Any = self._new_parser(HttpRequestParser)
        # The parser has consumed every byte and sits between two messages.
        self._clean = True
        # The last request this connection serves, when the requests after it
        # in the queue's read are dropped: its answer says Connection: close.
        self.last_served: Any = None
        self._last: tuple[Any, Any] | None = None  # the latest message parsed
        self._previous = b""  # the bytes of the read before, to name a field in a refusal
        self._tail = b""  # the stream's last 3 bytes before this read (a message's end spans reads)
        self._discard = False  # bytes after a request that cannot be parsed safely
        self._messages: deque[tuple[Any, Any]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._current: AppExchange | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_pending = False  # bytes of a request head not yet whole
        self._after_blank = True  # the last read held nothing past its messages but blank lines
        self._idle_timer: asyncio.TimerHandle | None = None
        self._lingering = False
        self._last_active = loop.time()
        self.closing = False
        self.remote: str | None = None
        # After a CONNECT head: the bytes that follow it, until the CONNECT
        # is answered (None while no CONNECT is pending).
        self.held: bytearray | None = None
        self.relay: Relay | None = None  # a blind tunnel's, once it is open
        self.app_eof = False
        self.tunnel: str | None = None  # the host of an intercepted CONNECT, inside it
        self._method_part = b""  # a request line's first bytes, all method so far

    # --- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if peer else None
        self._listener.connections.add(self)
        self._arm_idle()
        self._task = self._loop.create_task(self._serve())

    def _new_parser(self, kind: Any) -> Any:
        limits = self._listener.limits
        return kind(
            self,
            self._loop,
            READ_BUFFER,
            max_line_size=limits.max_header_size,
            max_headers=limits.max_headers,
            max_field_size=limits.max_header_size,
            payload_exception=RequestPayloadError,
            auto_decompress=False,  # gzip request bodies pass through compressed
        )

    def _feed(self, data: bytes) -> Sequence[tuple[Any, Any]]:
        """Parse ``data``: the messages it completes (a refusal in place of a
        message that cannot be served). Keeps two facts about llhttp that
        aiohttp's C parser does not handle:

        - the last trailer field of a chunked request stays pending in the
          parser and becomes a header of the next request. After a chunked
          request that ends exactly where the read ends, a fresh parser takes
          over; when more bytes followed it in the same read, the requests
          after it are not served and the connection closes after its answer.
        - methods outside llhttp's table fail to parse: when such a request
          starts where the parser stands between messages, the connection
          moves to aiohttp's Python parser (any token is a method there).
        """
        parser = self._parser
        clean = self._clean
        self._clean = False
        self._after_blank = True
        prior = self._last
        prior_open = prior is not None and prior[0].chunked and not prior[1].is_eof()
        before = getattr(prior[1], "total_bytes", 0) if prior is not None else 0
        if clean and isinstance(parser, HttpRequestParser):
            method = METHOD_START.match(data)
            if method is not None and not method.group().isupper():
                # A lower-case method: only SpellingParser keeps its case.
                self._parser = parser = self._new_parser(SpellingParser)
        try:
            messages: Sequence[tuple[Any, Any]]
            messages, upgraded, tail = parser.feed_data(data)
        except BadHttpMethod as exc:
            if not METHOD_START.match(data):
                return [(self._refuse(exc, data), None)]  # not a token: 400
            if not _could_be_a_method(exc):
                # The line llhttp refused starts with no token character (a
                # space, "@", a NUL after a request): no extension method, a
                # 400 now, after the requests before it (round 15; the Python
                # parser would wait for the line's end, then header_timeout).
                return self._refused_read(type(parser), data, exc, clean=clean)
            if not clean:
                return [(self._refuse(exc, data, unframed=True), None)]
            self._parser = parser = self._new_parser(SpellingParser)
            try:
                messages, upgraded, tail = parser.feed_data(data)
            except HttpProcessingError as again:
                return self._refused_read(SpellingParser, data, again, clean=True)
        except HttpProcessingError as exc:
            text = str(exc)
            if clean and _LATER_MINOR.match(data) and "Invalid HTTP version" in text:
                # RFC 9110 §2.5: HTTP/1.2 and later minors are served as 1.1;
                # llhttp refuses them, aiohttp's Python parser does not.
                self._parser = self._new_parser(SpellingParser)
                self._clean = True
                return self._feed(data)
            return self._refused_read(type(parser), data, exc, clean=clean)
        if messages and messages[-1][0].method == "CONNECT":
            # What follows a CONNECT head is the tunnel's, not HTTP: held
            # until the CONNECT is answered (RFC 9110 §9.3.6).
            held = bytearray(tail)
            payload = messages[-1][1]
            if not held and hasattr(payload, "read_nowait"):
                # The Python parser reads what follows a CONNECT as its body.
                held += payload.read_nowait()
            self.held = held
            return messages
        if upgraded:
            # The parser stops at an Upgrade request (RFC 9110 §7.8), but the
            # proxy never upgrades (Upgrade and Connection are hop-by-hop; the
            # partner answers in HTTP/1.1): what follows is the next request,
            # parsed afresh, never dropped.
            self._parser = self._new_parser(type(parser))
            self._clean = True
            self._last = messages[-1] if messages else prior
            return [*messages, *(self._feed(bytes(tail)) if tail else ())]
        if messages and getattr(messages[-1][0], "upgrade", False):  # a refusal is no message
            # llhttp stops at an Upgrade request, and aiohttp hands on what
            # follows it only for the upgrades it knows (websocket, above).
            # For others (h2c, TLS/1.0...) the rest of the read is gone: the
            # answer to this request closes the connection, so the app
            # resends what was not answered (RFC 9112 §9.3.2), never a
            # shifted answer.
            self.last_served = messages[-1][0]
        last = messages[-1] if messages else prior
        self._last = last
        if last is None:
            self._clean = not data
            return messages
        python = not isinstance(parser, HttpRequestParser)  # it drops trailers itself
        followed = (prior_open and bool(messages)) or (
            len(messages) > 1 and any(m.chunked for m, _ in messages[:-1])
        )
        if followed and not python:
            return self._poison(messages)
        message, payload = last
        # Where the read's blank tail starts: a message ends with CRLF CRLF
        # after a byte that is not CR or LF (a head's last field, a last
        # chunk's size), or with its body. The end of a message that came in
        # this read may have begun in reads before it (a head's last CRLF in
        # reads of a byte or two): the tests look at the stream's 3 bytes
        # before this read too (round 14).
        core = len(data.rstrip(b"\r\n"))
        window = self._tail + data
        ends_here = window.endswith(b"\r\n\r\n")
        window_core = len(window.rstrip(b"\r\n"))
        ends_blank = window.startswith(b"\r\n\r\n", window_core)
        if message.chunked:
            ended_now = payload.is_eof() and ((last is prior and prior_open) or bool(messages))
            if not ended_now:
                self._after_blank = not core  # a body still open, or what follows an old one
                return messages
            if ends_here:  # a chunked request ended exactly where this read ends
                if not python:
                    self._parser = self._new_parser(HttpRequestParser)
                self._clean = True
                return messages
            self._after_blank = ends_blank
            return messages if python else self._poison(messages)
        length = int(message.headers.get(hdrs.CONTENT_LENGTH) or 0)  # digits: the parser checked
        if not length:
            self._clean = bool(messages) and ends_here
            self._after_blank = ends_blank if messages else not core
        elif not payload.is_eof():
            self._clean = False
        elif messages:  # head and whole body in this read: the head ends where the body starts
            self._clean = len(data) >= length + 4 and data[-length - 4 : -length] == b"\r\n\r\n"
            end = _end_of_messages(window, len(window) - len(data), prior, before, messages)
            if end is not None:
                self._clean = end == len(window)
                self._after_blank = not window[end:].strip(b"\r\n")
            else:  # the head began in an earlier read: a head's CRLF CRLF
                # `length` bytes before a point of the blank tail, if anywhere
                self._after_blank = (
                    window.find(b"\r\n\r\n", max(window_core - length - 4, 0), len(window) - length)
                    != -1
                )
        else:  # the body's end came in this read, and nothing after it
            self._clean = length - before == len(data)
            self._after_blank = not data[length - before :].strip(b"\r\n")
        return messages

    def _refused_read(
        self, kind: Any, data: bytes, exc: HttpProcessingError, *, clean: bool
    ) -> Sequence[tuple[Any, Any]]:
        """A read the parser refused as a whole. From a clean boundary it is
        parsed again, one message at a time, on a fresh parser of the same
        kind, so the requests before the fault (or up to a close) are served."""
        if clean and _AFTER_CLOSE in str(exc):
            return self._until_close(kind, data)
        if clean:
            return self._salvage(kind, data, exc)
        return [(self._refuse(exc, data), None)]

    def _reparse(self, kind: Any, data: bytes) -> list[tuple[Any, Any]]:
        """Parse ``data`` again on a fresh parser, one message at a time,
        after the read as a whole was refused: the requests it held before
        the fault (or up to one that says ``Connection: close``). Both
        parsers lose the messages of a read they refuse."""
        parser = self._parser = self._new_parser(kind)
        kept: list[tuple[Any, Any]] = []
        at = 0
        while at < len(data) and not (kept and kept[-1][0].should_close and kept[-1][1].is_eof()):
            end = data.find(b"\r\n\r\n", at)
            end = len(data) if end == -1 else end + 4
            if kept and not kept[-1][1].is_eof():
                length = kept[-1][0].headers.get(hdrs.CONTENT_LENGTH)
                if length is not None and length.isdigit():
                    end = at + int(length) - kept[-1][1].total_bytes
            try:
                kept.extend(parser.feed_data(data[at:end])[0])
            except HttpProcessingError:
                break
            at = end
            if kept and kept[-1][0].chunked and kept[-1][1].is_eof():
                parser = self._parser = self._new_parser(kind)  # no trailer carried over
        if kept and not kept[-1][1].is_eof():
            kept.pop()  # the request the fault is in
        return kept

    def _until_close(self, kind: Any, data: bytes) -> Sequence[tuple[Any, Any]]:
        """Requests pipelined after one that says ``Connection: close``: the
        requests up to the closing one are served, the rest not (RFC 9112
        §9.6); the connection closes once the answers owed are sent."""
        kept = self._reparse(kind, data)
        while kept and not kept[-1][0].should_close:
            kept.pop()
        return self._serve_only(kept)

    def _salvage(
        self, kind: Any, data: bytes, exc: HttpProcessingError
    ) -> Sequence[tuple[Any, Any]]:
        """A malformed request pipelined after good ones in one read: the
        good ones are answered first, in order (RFC 9112 §9.3.2), then the
        refusal, then the connection closes."""
        kept: list[tuple[Any, Any]] = list(self._reparse(kind, data))
        refusal = self._refuse(exc, data)
        if kept:
            self.closing = False  # not yet: the requests before it are answered first
        return [*kept, (refusal, None)]

    def _poison(self, messages: Sequence[tuple[Any, Any]]) -> Sequence[tuple[Any, Any]]:
        """After a chunked request, more bytes came in the same read: they may
        carry its trailer as a header. Keep the messages up to that request;
        drop the rest and every later byte; the connection closes once the
        answers owed are sent (an app retries what was not answered,
        RFC 9112 §9.3.2)."""
        kept = list(messages)
        while kept and not kept[-1][0].chunked:
            kept.pop()
        return self._serve_only(kept)

    def _serve_only(self, kept: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        """Read nothing more; answer ``kept`` in order, then close."""
        self._discard = True
        if kept:
            self.last_served = kept[-1][0]
        else:
            self.closing = True
        return kept

    def _refuse(
        self, exc: HttpProcessingError, data: bytes, *, unframed: bool = False
    ) -> RequestFailed:
        """A malformed request (or, ``unframed``, an extension method after
        other requests, where no parser can take over): nothing after it can
        be trusted."""
        self.closing = True
        self._discard = True
        refusal = (
            NotImplementedByProxy(
                "the request method is outside the parser's table and came after other "
                "requests on this connection; send it on a new connection"
            )
            if unframed
            else refusal_for(exc, self._previous + data, self._listener.limits)
        )
        current = self._current
        if current is not None and not current.body_complete:
            _fail_body(current._payload, RequestPayloadError(refusal.message))
        return refusal

    def data_received(self, data: bytes) -> None:
        if self.relay is not None:
            self.relay.up(data)
            return
        if self.held is not None:
            self.held.extend(data)
            if len(self.held) > READ_BUFFER and not self._buffer_paused:
                self._pause_reading_for_buffer()
            return
        parser = self._parser
        if (
            parser is None
            or self._lingering
            or self._discard
            or (self.closing and self._current is None)
        ):
            return
        if self._clean and (self._method_part or _PARTIAL_METHOD.fullmatch(data)):
            # A method split across reads (RFC 9110 §9.1: any token, its case
            # kept): nothing can be decided on part of it, so the bytes wait
            # for the space after it (a request is the same whatever the TCP
            # segmentation, issue 11, sixth outside round).
            data = self._method_part + data
            self._method_part = b""
            if _PARTIAL_METHOD.fullmatch(data):
                self._method_part = data
                data = b""
        messages = self._feed(data) if data else []
        self._previous = data
        # the stream's last 3 bytes, without copying a large read
        self._tail = data[-3:] if len(data) >= 3 else (self._tail + data)[-3:]
        # Bytes of a next request head are in (the parser is past the last
        # message, whose body is whole): its header_timeout runs once no
        # request is in flight, also when it started while one was (round 7).
        # Not after a CONNECT (what follows is the tunnel's), nor when all
        # the read held past its messages is blank lines: a CRLF after a body
        # (RFC 9112 §2.2) or a chunked body's last LF is no head, and a 408
        # on an idle connection could be read as the answer to the app's
        # next request. A head whose read ends a line is one (round 9, R2).
        last = self._last
        self._head_pending = bool(self._method_part) or (
            bool(data)
            and not self._clean
            and not self._discard
            and not self._holds()  # (a method: _feed may have set it since the check above)
            and not self._after_blank
            and (last is None or last[1] is None or last[1].is_eof())
        )
        if messages:
            self._disarm_head()
            self._messages.extend(messages)
            if len(self._messages) >= MAX_PIPELINED and not self._buffer_paused:
                self._pause_reading_for_buffer()
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif (
            (data.strip(b"\r\n") or self._method_part)  # an empty line is no head (RFC 9112 §2.2)
            and self._current is None
            and not self._messages
            and self._head_timer is None
        ):
            # Bytes of a request head arrived, the head is not complete: start the clock.
            self._head_timer = self._loop.call_later(
                self._listener.limits.header_timeout, self._head_expired
            )

    def _holds(self) -> bool:
        """A CONNECT's bytes are held (read through a call: mypy, and so
        the compiled build, narrow ``self.held`` across one that sets it)."""
        return self.held is not None

    def eof_received(self) -> bool | None:
        """The app shut its write side. In a blind tunnel the host is told and
        may still answer. A request body cut short by it is answered 400
        (``bad_request``), then the connection closes. Otherwise the app is
        taken as gone, as nginx takes it (its 499): the connection closes and
        a request in flight is cancelled upstream."""
        self.app_eof = True
        if self.relay is not None:
            self.relay.app_eof()
            return True
        if self.held is not None:
            return True  # a pending CONNECT may still be answered
        last = self._last
        if last is not None and last[1] is not None and not last[1].is_eof():
            # The body would end with the connection: cut short (RFC 9112
            # §8), never forwarded as if whole; the 400 still goes out.
            _fail_body(last[1], RequestPayloadError("the app ended its body early"))
            self.closing = True
            # Over TLS (an intercepted tunnel) the EOF closes the connection
            # anyway: asyncio's TLS layer ignores a True here.
            return True if self.tunnel is None else None
        return None

    def pause_reading(self) -> None:
        """A request body's buffer is full (aiohttp's StreamReader says so):
        hold the socket, never the parser. aiohttp 3.14 also pauses its parser
        and resumes it with ``data_received(b"")``, leaving unparsed bytes
        inside it that this connection's per-read bookkeeping (``_feed``)
        cannot see; the socket's pause alone bounds memory to a read."""
        self._reading_paused = True
        self._pause_transport_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False
        if not self._buffer_paused:
            self._resume_transport_reading()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.relay is not None:
            self.relay.app_paused()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.relay is not None:
            self.relay.app_resumed()

    def inner(self, tls: asyncio.BaseTransport, host: str) -> None:
        """The app's TLS inside an intercepted CONNECT is up: from here on the
        connection parses requests for ``https://host`` afresh; nothing of
        the CONNECT's parser state carries over."""
        # What the app sent in the read that finished its handshake arrived
        # here already (the TLS layer delivers it before start_tls returns),
        # and a large one paused reading: on the raw transport, which is the
        # one to resume (the TLS one was never paused).
        if self._buffer_paused:
            self._resume_reading_for_buffer()
        self.transport = tls  # type: ignore[assignment]
        self.tunnel = host
        self._method_part = b""
        self._head_pending = False
        early = bytes(self.held or b"")
        self.held = None
        self._parser = self._new_parser(HttpRequestParser)
        self._clean = True
        self._last = None
        self._previous = b""
        self._tail = b""
        self._discard = False
        self.last_served = None
        if early:
            self.data_received(early)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        relay = self.relay
        if relay is not None:  # a tunnel's normal end: its task logs it, uncancelled
            relay.end("closed" if exc is None else "app_lost")
        self._listener.forget(self)
        self._disarm_head()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        current = self._current
        if current is not None and not current.body_complete:
            _fail_body(current._payload, ConnectionResetError("the app closed the connection"))
        if self._task is not None and not self._task.done() and relay is None:
            self._task.cancel()  # an app that goes away cancels its upstream request
        self._parser = None
        # Requests still queued (or the latest parsed) are never served now;
        # their payloads point back here (a cycle for each such connection).
        self._messages.clear()
        self._last = None

    # --- writing ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    async def drained(self) -> None:
        await self._drain_helper()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0), not a FIN: what is unsent is
        dropped, and the app's next read fails rather than ends."""
        self.closing = True
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        transport.abort()

    # --- timers -------------------------------------------------------------

    def _disarm_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self._current is None and not self._messages:
            after = self._listener.limits.header_timeout
            log.warning("request_head_timeout", client=self.remote, after_s=after)
            self.closing = True
            self._discard = True
            self._refused(HeadTimeout(f"the request head did not arrive within {after:g}s"))

    def _arm_idle(self) -> None:
        """One timer per connection, re-armed only when it fires: a busy
        connection costs a timestamp per request, not a timer."""
        self._idle_timer = self._loop.call_at(
            self._last_active + self._listener.limits.idle_timeout, self._idle_expired
        )

    def _idle_expired(self) -> None:
        self._idle_timer = None
        idle = self._current is None and not self._messages and self._head_timer is None
        if idle and self._loop.time() >= self._last_active + self._listener.limits.idle_timeout:
            self.close()
        elif self.transport is not None:
            if not idle:
                self._last_active = self._loop.time()
            self._arm_idle()

    # --- the request loop ---------------------------------------------------

    async def _serve(self) -> None:
        handler = self._listener.handler
        try:
            while not self.closing or self._messages:
                if not self._messages:
                    self._waiter = self._loop.create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
                    continue
                message, payload = self._messages.popleft()
                if self._parser is not None:
                    self._parser.message_consumed()
                if self._buffer_paused and len(self._messages) < MAX_PIPELINED // 2:
                    self._resume_reading_for_buffer()
                if isinstance(message, RequestFailed):
                    self._refused(message)
                    return
                framing = framing_error(message)
                if framing is not None:
                    self.closing = True
                    self._discard = True
                    self._refused(framing)
                    return
                exchange = AppExchange(self, message, payload)
                self._current = exchange
                try:
                    await handler(exchange)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug: the app gets a 500, not a traceback
                    log.error("internal_error", exc_info=exc)
                    if not exchange.started:
                        failed = RequestFailed("internal error")  # the tree's 500
                        await exchange.respond(
                            failed.status, json.dumps(failed.as_json()).encode(), None, close=True
                        )
                    else:
                        exchange.abort()
                self._current = None
                if exchange.closes or self.transport is None:
                    self._end(exchange)
                    return
                self._last_active = self._loop.time()
                if self._head_pending and not self._messages and self._head_timer is None:
                    self._head_timer = self._loop.call_later(
                        self._listener.limits.header_timeout, self._head_expired
                    )
        except asyncio.CancelledError:
            return
        except Exception as exc:  # a bug outside the handler: never a hung connection
            log.error("internal_error", exc_info=exc)
            self.close()
            return
        finally:
            # A cancelled exchange (the app went away) and this task would
            # otherwise hold this connection in a cycle (tests/test_cycles.py).
            self._current = None
            self._task = None
        if not self._lingering:
            self.close()  # drained, or the loop ended for a shutdown

    def _refused(self, refusal: RequestFailed) -> None:
        """Answer a request that cannot be served, and close: its framing, or
        what follows it, cannot be trusted. The log line and the answer name
        the fault (a field's name and size), never the request's bytes."""
        # A fresh id: the app's own X-Request-Id is in the bytes not trusted.
        # It ties the answer to the log line, as for every other error.
        rid = os.urandom(16).hex()
        log.warning(
            "malformed_request",
            client=self.remote,
            status=refusal.status,
            error=refusal.code,
            reason=refusal.message,
            request_id=rid,
        )
        body = json.dumps({**refusal.as_json(), "request_id": rid}).encode()
        self.write(
            response_head(
                refusal.status,
                None,
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("Date", DateHeader.now()),
                    ("Connection", "close"),
                ],
            )
            + body
        )
        self._linger()

    def _end(self, exchange: AppExchange) -> None:
        if exchange.body_complete or exchange.method == "CONNECT":
            # After a CONNECT come a tunnel's bytes, never a body to drain.
            self.close()
        else:
            self._linger()

    def _linger(self) -> None:
        """Shut our side, drop what the app still sends, close on its EOF or
        after LINGER seconds: an app still sending its body then reads the
        answer instead of a connection reset."""
        transport = self.transport
        self.closing = True
        if transport is None or transport.is_closing():
            return
        self._lingering = True
        if self._reading_paused or self._buffer_paused:
            try:
                transport.resume_reading()
            except (AttributeError, NotImplementedError, RuntimeError):
                pass
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(LINGER, transport.close)


BACKLOG: Final = 4096  # the kernel's queue of connections not yet accepted
ACCEPT_BATCH: Final = 512  # connections accepted each time the socket is readable
ACCEPT_PAUSE: Final = 0.5  # seconds between accepts after EMFILE and the like
_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _close_if_cancelled(conn: socket.socket, task: asyncio.Task[Any]) -> None:
    """A connection accepted but never adopted (a shutdown): its socket is ours."""
    if task.cancelled():
        conn.close()


class Listener:
    """A listening socket and its app connections; :meth:`shutdown` drains."""

    def __init__(self, handler: Handler, limits: InboundLimits) -> None:
        self.handler = handler
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.connections: set[AppConnection] = set()
        self._sockets: list[socket.socket] = []
        self._accepting: set[asyncio.Task[Any]] = set()
        self._resume: asyncio.TimerHandle | None = None
        self._none_left = asyncio.Event()

    def forget(self, connection: AppConnection) -> None:
        self.connections.discard(connection)
        if not self.connections:
            self._none_left.set()

    def __call__(self) -> AppConnection:
        return AppConnection(self)

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen; return the bound port (the chosen one for port 0).

        The proxy accepts connections itself, up to ACCEPT_BATCH each time
        the socket is readable: uvloop's libuv accepts one a loop iteration
        (libuv PR 3696), and under load, with hundreds of requests served in
        each iteration, a burst of new connections waited seconds in the
        kernel's queue while the first ones were served again and again
        (issue 16: 1,000 connections, p99 2.4 s)."""
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        seen: set[tuple[int, object]] = set()
        for family, kind, proto, _, address in infos:
            if (family, address[0]) in seen:
                continue
            seen.add((family, address[0]))
            # A name with several addresses (localhost: 127.0.0.1 and ::1)
            # listens on each, as asyncio's create_server does; on one port,
            # the one the first bind chose when ``port`` is 0.
            chosen = self._sockets[0].getsockname()[1] if self._sockets else port
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:  # as asyncio and uvloop do: IPv4 on its own socket
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], chosen, *address[2:]))
                sock.listen(BACKLOG)
                sock.setblocking(False)
            except OSError:
                sock.close()
                self._stop_accepting()
                raise
            self._sockets.append(sock)
            self.loop.add_reader(sock.fileno(), self._accept, sock)
        return int(self._sockets[0].getsockname()[1])

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # that app gave up; the next may be waiting
            except OSError as exc:
                log.warning("accept_failed", reason=exc.strerror or type(exc).__name__)
                if exc.errno in _OUT_OF_RESOURCES:  # pause, as asyncio does
                    self.loop.remove_reader(sock.fileno())
                    self._resume = self.loop.call_later(ACCEPT_PAUSE, self._resume_accepting, sock)
                return
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self.loop.create_task(self._adopt(conn))
            self._accepting.add(task)
            task.add_done_callback(self._accepting.discard)
            task.add_done_callback(partial(_close_if_cancelled, conn))

    def _resume_accepting(self, sock: socket.socket) -> None:
        self._resume = None
        if sock in self._sockets:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    async def _adopt(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self, sock=conn)
        except OSError:
            conn.close()  # the app went away before its transport was made
        except asyncio.CancelledError:
            conn.close()  # a shutdown
            raise

    def _stop_accepting(self) -> None:
        sockets, self._sockets = self._sockets, []
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        for sock in sockets:
            self.loop.remove_reader(sock.fileno())
            sock.close()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; close idle connections now and busy ones after their
        answer; after ``grace`` seconds, cut whatever is left."""
        self._stop_accepting()
        for task in list(self._accepting):
            task.cancel()
        for connection in list(self.connections):
            connection.closing = True
            if connection._current is None and not connection._messages:
                connection.close()
            elif connection._waiter is not None and not connection._waiter.done():
                connection._waiter.set_result(None)
        if self.connections:
            self._none_left.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._none_left.wait(), grace)
        for connection in list(self.connections):
            connection.close()
