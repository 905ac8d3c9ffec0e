"""Raw HTTP/1.1 on loopback, for the conformance suite and the differential job.

Three pieces, none of which uses an HTTP library:

- ``parse_message``: RFC 9112 framing over raw bytes (Content-Length, chunked,
  close-delimited, the bodiless HEAD/1xx/204/304 answers), keeping the exact
  head and body bytes next to the parsed fields.
- ``RecordingPartner``: an asyncio TCP server that records every request it
  receives exactly as received and answers with scripted raw bytes.
- ``AppConnection``: an app that writes exact bytes to the proxy and reads the
  exact answers back, interim (1xx) responses included.

The one comparison both sides share is ``Canonical``: start line, fields with
their exact spelling, order and repeats, values byte for byte (without the
optional whitespace around them, RFC 9110 §5.5), the body's content and its
trailer fields. Chunk boundaries and chunk extensions belong to one hop's
framing (RFC 9112 §7.1: an intermediary may re-chunk, and unknown extensions
are ignored), so they are the only things it does not compare. The proxy's own
request fields (``PROXY_FIELDS``) are taken out and checked on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

Field = tuple[bytes, bytes]
Framing = Literal["none", "length", "chunked", "close"]

CRLF = b"\r\n"
OWS = b" \t"
# Fields the proxy sets on every forwarded request (docs/design.md, "The
# request, step by step", 5.; docs/operations.md, request ids). Nothing else
# is normalised.
PROXY_FIELDS = frozenset(
    {
        b"authorization",
        b"host",
        b"via",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-request-id",
    }
)
# ... and on the answers it relays (RFC 9110 §7.6.3 asks a proxy for Via both ways).
# Connection is this hop's own (RFC 9110 §7.6.1): "close" to an HTTP/1.0 app, say.
PROXY_RESPONSE_FIELDS = frozenset({b"via", b"x-request-id", b"connection"})


class WireError(Exception):
    """Bytes that are not an HTTP/1.1 message (or not a whole one)."""


class Closed(WireError):
    """The connection ended where a message could start: the answers owed
    stop here (the outcome counts them)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One HTTP/1.1 message exactly as it crossed the wire.

    ``head`` is the start line and field lines up to and including the empty
    line; ``body`` the body with its framing (chunk sizes, extensions,
    trailers). ``fields`` keep the sender's spelling, order and repeats.
    """

    head: bytes
    body: bytes
    start_line: bytes
    fields: tuple[Field, ...]
    framing: Framing
    content: bytes
    trailers: tuple[Field, ...] = ()

    @property
    def raw(self) -> bytes:
        return self.head + self.body

    @property
    def status(self) -> int:
        """The status code of a response (0 when the start line has none)."""
        parts = self.start_line.split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0

    @property
    def method(self) -> bytes:
        return self.start_line.split(b" ", 1)[0]

    @property
    def target(self) -> bytes:
        parts = self.start_line.split(b" ")
        return parts[1] if len(parts) > 2 else b""

    @property
    def interim(self) -> bool:
        return self.start_line.startswith(b"HTTP/") and 100 <= self.status < 200

    def values(self, name: bytes) -> list[bytes]:
        """Every value of the field ``name`` (case-insensitive), in order."""
        wanted = name.lower()
        return [value for key, value in self.fields if key.lower() == wanted]

    def canonical(self, own: frozenset[bytes] = frozenset()) -> Canonical:
        """What two messages must share to be the same message; the fields named
        in ``own`` (lower case) are left out."""
        fields = tuple(f for f in self.fields if f[0].lower() not in own)
        return Canonical(
            self.start_line,
            _without_framing(fields, self.framing),
            self.framing,
            self.content,
            self.trailers,
        )


def _without_framing(fields: tuple[Field, ...], framing: Framing) -> tuple[Field, ...]:
    """The fields without the one that frames the body (a single
    ``Transfer-Encoding: chunked``, or a single Content-Length when it
    delimits the body): framing is compared as ``framing`` and ``content``,
    wherever the sender put that field. Anything unusual (two of them, other
    codings, the Content-Length of a HEAD answer) stays a field."""
    if framing == "chunked":
        name = b"transfer-encoding"
        values = [v for n, v in fields if n.lower() == name]
        if values != [b"chunked"]:
            return fields
    elif framing == "length":
        name = b"content-length"
        if sum(1 for n, _ in fields if n.lower() == name) != 1:
            return fields
    else:
        return fields
    return tuple(f for f in fields if f[0].lower() != name)


@dataclass(frozen=True, slots=True)
class Canonical:
    start_line: bytes
    fields: tuple[Field, ...]
    framing: Framing
    content: bytes
    trailers: tuple[Field, ...]

    def render(self, limit: int = 400) -> str:
        """A readable rendering for failure messages and reports."""
        lines = [repr(self.start_line)[2:-1]]
        lines += [repr(name + b": " + value)[2:-1] for name, value in self.fields]
        body = self.content if len(self.content) <= limit else self.content[:limit] + b"..."
        lines.append(f"[{self.framing}, {len(self.content)} bytes] {repr(body)[2:-1]}")
        lines += ["trailer " + repr(name + b": " + value)[2:-1] for name, value in self.trailers]
        return "\n".join(lines)


# ------------------------------------------------------------------- parsing


def _field_lines(block: bytes) -> tuple[Field, ...]:
    fields = []
    for line in block.split(CRLF):
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip(OWS):
            raise WireError(f"not a field line: {line[:80]!r}")
        fields.append((name, value.strip(OWS)))
    return tuple(fields)


def request_framing(
    start_line: bytes, fields: tuple[Field, ...], *, request: bool, method: bytes
) -> tuple[Framing, int]:
    """RFC 9112 §6.3: how the body of this message is delimited, and its length."""
    lowered = {name.lower() for name, _ in fields}
    if not request:
        status = int(start_line.split(b" ", 2)[1])
        if method == b"HEAD" or status < 200 or status in (204, 304):
            return "none", 0
    if b"transfer-encoding" in lowered:
        codings = b",".join(v for n, v in fields if n.lower() == b"transfer-encoding")
        last = codings.split(b",")[-1].strip().lower()
        if last == b"chunked":
            return "chunked", 0
        if request:
            raise WireError(f"request with Transfer-Encoding {codings!r} has no framing")
        return "close", 0
    if b"content-length" in lowered:
        values = {v for n, v in fields if n.lower() == b"content-length"}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise WireError(f"bad Content-Length {sorted(values)!r}")
        return "length", int(next(iter(values)))
    return ("none" if request else "close"), 0


def _chunked(data: bytes, start: int) -> tuple[int, bytes, tuple[Field, ...]] | None:
    """The end offset, content and trailers of the chunked body at ``start``;
    None while incomplete."""
    pos = start
    content = bytearray()
    while True:
        eol = data.find(CRLF, pos)
        if eol < 0:
            return None
        size_text = data[pos:eol].split(b";", 1)[0].strip(OWS)
        try:
            size = int(size_text, 16)
        except ValueError:
            raise WireError(f"bad chunk size line {data[pos:eol][:80]!r}") from None
        pos = eol + 2
        if size == 0:
            break
        if len(data) < pos + size + 2:
            return None
        content += data[pos : pos + size]
        if data[pos + size : pos + size + 2] != CRLF:
            raise WireError("chunk data not followed by CRLF")
        pos += size + 2
    if data[pos : pos + 2] == CRLF:
        return pos + 2, bytes(content), ()
    end = data.find(CRLF + CRLF, pos)
    if end < 0:
        return None
    return end + 4, bytes(content), _field_lines(data[pos:end])


def parse_message(
    data: bytes, *, request: bool, method: bytes = b"GET", eof: bool = True
) -> tuple[Message, int] | None:
    """The first message in ``data`` and the bytes it took; None when ``data``
    holds only part of it (and more may come: ``eof`` false). ``method`` is
    the method of the request a response answers."""
    end = data.find(CRLF + CRLF)
    if end < 0:
        if eof and data:
            raise WireError(f"incomplete head: {data[:80]!r}")
        return None
    head = data[: end + 4]
    start_line, _, block = data[:end].partition(CRLF)
    fields = _field_lines(block)
    framing, length = request_framing(start_line, fields, request=request, method=method)
    body_start = end + 4
    trailers: tuple[Field, ...] = ()
    if framing == "none":
        stop, content = body_start, b""
    elif framing == "length":
        if len(data) < body_start + length:
            if eof:
                raise WireError(f"body ended after {len(data) - body_start} of {length} bytes")
            return None
        stop, content = body_start + length, data[body_start : body_start + length]
    elif framing == "chunked":
        parsed = _chunked(data, body_start)
        if parsed is None:
            if eof:
                raise WireError("chunked body ended early")
            return None
        stop, content, trailers = parsed
    else:
        if not eof:
            return None
        stop, content = len(data), data[body_start:]
    message = Message(head, data[body_start:stop], start_line, fields, framing, content, trailers)
    return message, stop


def parse_all(data: bytes, *, request: bool, methods: Sequence[bytes] = ()) -> list[Message]:
    """Every message in ``data`` (a whole recording); ``methods`` are the methods
    of the requests that responses answer, in order (GET when not given)."""
    out: list[Message] = []
    pos = 0
    answered = 0
    while pos < len(data):
        method = methods[answered] if answered < len(methods) else b"GET"
        parsed = parse_message(data[pos:], request=request, method=method)
        assert parsed is not None
        message, used = parsed
        out.append(message)
        pos += used
        if not message.interim:
            answered += 1
    return out


def render_bytes(data: bytes, limit: int = 600) -> str:
    text = repr(data[:limit])[2:-1].replace("\\r\\n", "\\r\\n\n")
    return text + ("..." if len(data) > limit else "")


# ------------------------------------------------------------ the partner


@dataclass(frozen=True, slots=True)
class Reply:
    """What the partner writes for one request: byte strings written in order,
    numbers slept between them (seconds). The connection is closed after it
    when ``close`` is set, or when the answer is close-delimited."""

    steps: tuple[bytes | float, ...]
    close: bool = False

    @classmethod
    def of(cls, data: bytes, *, delay: float = 0.0) -> Reply:
        return cls((delay, data) if delay else (data,))

    def data(self) -> bytes:
        return b"".join(step for step in self.steps if isinstance(step, bytes))


@dataclass(frozen=True, slots=True)
class Recorded:
    """One request the partner received: the connection it came on (0, 1, ...)
    and its exact bytes."""

    connection: int
    message: Message
    at: float


class RecordingPartner:
    """A raw HTTP/1.1 server on 127.0.0.1 that records each request exactly and
    answers from ``replies`` (one per request in order of arrival, the last one
    repeated) or from ``answer(message)`` when that is set.

    Not thread-safe; everything runs on the test's event loop. ``connections``
    counts accepted TCP connections, ``requests`` every whole request.
    """

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.replies: list[Reply] = [Reply.of(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")]
        self.answer: Callable[[Message], Reply] | None = None
        self.connections = 0
        self.open_connections = 0
        self.garbage: list[bytes] = []  # bytes that were not a whole request, by connection
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def authority(self) -> bytes:
        return b"127.0.0.1:%d" % self.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, replies: Sequence[Reply | bytes]) -> None:
        """Answer the next requests with these, in order (the last one repeats)."""
        self.replies = [r if isinstance(r, Reply) else Reply.of(r) for r in replies]
        self.answer = None

    def reset(self) -> None:
        self.requests.clear()
        self.garbage.clear()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            await self._server.wait_closed()

    def close_idle(self) -> None:
        """Close every connection (the proxy's pool sees them die)."""
        for writer in list(self._writers):
            writer.close()

    def _next_reply(self, message: Message) -> Reply:
        if self.answer is not None:
            return self.answer(message)
        index = len(self.requests) - 1
        return self.replies[min(index, len(self.replies) - 1)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        number = self.connections
        self.connections += 1
        self.open_connections += 1
        buffer = b""
        try:
            while True:
                parsed = parse_message(buffer, request=True, eof=False) if buffer else None
                if parsed is None:
                    chunk = await reader.read(65536)
                    if not chunk:
                        if buffer.strip():
                            self.garbage.append(buffer)
                        return
                    buffer += chunk
                    continue
                message, used = parsed
                buffer = buffer[used:]
                self.requests.append(Recorded(number, message, time.monotonic()))
                reply = self._next_reply(message)
                for step in reply.steps:
                    if isinstance(step, bytes):
                        writer.write(step)
                        await writer.drain()
                    else:
                        await asyncio.sleep(step)
                if reply.close or _close_delimited(reply.data(), message.method):
                    return
        except WireError:
            self.garbage.append(buffer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open_connections -= 1
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _close_delimited(data: bytes, method: bytes) -> bool:
    """Whether the last answer in a scripted reply ends only when the
    connection does (or says Connection: close)."""
    pos = 0
    while True:
        parsed = parse_message(data[pos:], request=False, method=method, eof=False)
        if parsed is None:
            return data[pos:].strip() != b""
        message, used = parsed
        pos += used
        if not message.interim:
            closes = any(v.lower() == b"close" for v in message.values(b"connection"))
            return closes or (pos >= len(data) and message.framing == "close")


# ---------------------------------------------------------------- the app


class AppConnection:
    """One app's TCP connection to the proxy: exact bytes out, exact bytes in.

    ``received`` is every byte read so far; ``responses`` reads whole answers,
    interim ones included, framing-aware.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._buffer = b""
        self.received = b""
        self.eof = False

    @classmethod
    async def open(cls, port: int) -> AppConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    async def _fill(self, deadline: float) -> bool:
        """Read more bytes; False at end of stream or when the deadline passed."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            chunk = await asyncio.wait_for(self._reader.read(65536), remaining)
        except TimeoutError:
            return False
        except ConnectionError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self._buffer += chunk
        self.received += chunk
        return True

    async def message(self, method: bytes = b"GET", timeout: float = 5.0) -> Message:
        """The next message the proxy sends (an interim one counts as one)."""
        deadline = time.monotonic() + timeout
        while True:
            parsed = parse_message(self._buffer, request=False, method=method, eof=self.eof)
            if parsed is not None:
                message, used = parsed
                self._buffer = self._buffer[used:]
                return message
            if not await self._fill(deadline):
                if self.eof and not self._buffer:
                    raise Closed("the proxy closed the connection")
                if self.eof:
                    continue  # parse once more with eof: close-delimited or an error
                raise WireError(
                    f"no whole answer within {timeout} s; have {render_bytes(self._buffer, 200)}"
                )

    async def response(self, method: bytes = b"GET", timeout: float = 5.0) -> list[Message]:
        """The interim answers and the final answer to one request, in order."""
        out = [await self.message(method, timeout)]
        while out[-1].interim:
            out.append(await self.message(method, timeout))
        return out

    async def closed(self, timeout: float = 2.0) -> bool:
        """Whether the proxy closes the connection within ``timeout`` (bytes
        that arrive meanwhile are kept in ``received``)."""
        deadline = time.monotonic() + timeout
        while await self._fill(deadline):
            pass
        return self.eof

    @property
    def pending(self) -> bytes:
        """Bytes read but not yet taken as a message."""
        return self._buffer

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


@dataclass
class ProxyFields:
    """The proxy's own request fields of one forwarded request, by lower-case name."""

    values: dict[bytes, list[bytes]] = field(default_factory=dict)

    @classmethod
    def of(cls, message: Message) -> ProxyFields:
        found = cls()
        for name, value in message.fields:
            if name.lower() in PROXY_FIELDS:
                found.values.setdefault(name.lower(), []).append(value)
        return found

    def one(self, name: bytes) -> bytes | None:
        values = self.values.get(name, [])
        return values[0] if len(values) == 1 else None


# ------------------------------------------------------ running one case


class CaseLike(Protocol):
    """What the runner needs of a conformance case (tests/conformance_cases.py)."""

    @property
    def name(self) -> str: ...
    @property
    def send(self) -> tuple[bytes, ...]: ...
    @property
    def replies(self) -> tuple[bytes | tuple[bytes | float, ...], ...]: ...
    @property
    def forwarded(self) -> tuple[bytes | tuple[bytes, ...], ...]: ...
    @property
    def answers(self) -> tuple[bytes | tuple[bytes, ...], ...]: ...
    @property
    def status(self) -> tuple[int, ...]: ...
    @property
    def after_continue(self) -> bytes: ...
    @property
    def secret(self) -> bytes: ...
    @property
    def local(self) -> bool: ...


NEXT_APP = b""  # in a case's ``send``: the next writes come from another app
PARTNER_REACHED = (
    b"HTTP/1.1 299 Reached The Partner\r\nDate: Tue, 01 Dec 2026 12:00:00 GMT\r\n"
    b"Content-Length: 0\r\n\r\n"
)  # the partner's answer to a request it should never have received


def alternatives(expect: bytes | tuple[bytes, ...]) -> tuple[bytes, ...]:
    return expect if isinstance(expect, tuple) else (expect,)


def app_requests(case: CaseLike) -> list[list[Message]]:
    """The requests of each of the case's writes (empty when a write holds no
    whole, well-formed request: a limit or malformed case)."""
    out = []
    for item in case.send:
        try:
            out.append(parse_all(item + case.after_continue, request=True))
        except (WireError, ValueError, IndexError):
            out.append([])
    return out


def _first_token(data: bytes) -> bytes:
    return data.split(b" ", 1)[0]


@dataclass
class Outcome:
    """What one run of a case produced: every message the apps received (in
    order, interim ones included), every whole request the partner received,
    the partner connections opened, and a harness-level error (an answer
    that never came)."""

    answers: list[Message]
    received: list[Recorded]
    new_connections: int
    error: str = ""
    app_bytes: bytes = b""
    slot: list[int] = field(default_factory=list)  # expected index of each received request


async def run_case(
    case: CaseLike, port: int, partner: RecordingPartner, *, timeout: float = 5.0
) -> Outcome:
    """Send the case's bytes to the proxy at ``port`` with ``partner`` answering."""
    partner.reset()
    expected_lines = [
        parse_message(alternatives(e)[0], request=True)[0].start_line  # type: ignore[index]
        for e in case.forwarded
    ]
    slots: list[int] = []

    def slot_for(message: Message) -> int:
        for index, line in enumerate(expected_lines):
            if line == message.start_line and index not in slots:
                return index
        return -1

    def answer(message: Message) -> Reply:
        index = slot_for(message)
        slots.append(index)
        if index < 0 or index >= len(case.replies):
            return Reply.of(PARTNER_REACHED)
        reply = case.replies[index]
        return Reply((reply,)) if isinstance(reply, bytes) else Reply(reply)

    partner.answer = answer
    before = partner.connections
    answers: list[Message] = []
    error = ""
    received_bytes = b""
    per_write = app_requests(case)
    app = await AppConnection.open(port)
    try:
        for item, requests in zip(case.send, per_write, strict=True):
            if item == NEXT_APP:
                received_bytes += app.received
                await app.close()
                app = await AppConnection.open(port)
                continue
            await app.send(item)
            methods = [r.method for r in requests] or [_first_token(item)]
            if case.after_continue:
                answers.append(await app.message(methods[0], timeout))
                await app.send(case.after_continue)
            for method in methods:
                answers += await app.response(method, timeout)
    except Closed:
        pass  # fewer answers than requests: check_outcome counts them
    except WireError as exc:
        error = str(exc)
    finally:
        received_bytes += app.received
        await app.close()
    await asyncio.sleep(0.02)  # a request the proxy should not have sent lands meanwhile
    return Outcome(
        answers,
        list(partner.requests),
        partner.connections - before,
        error,
        received_bytes,
        list(slots),
    )


REQUEST_ID_CHARS = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:/+=-"
)


def check_proxy_fields(
    received: Message, app: Message | None, *, authority: bytes, tokens: Sequence[bytes]
) -> list[str]:
    """The proxy's own fields on one forwarded request: each exactly once, with
    the value the docs promise."""
    own = ProxyFields.of(received)
    problems = []
    bearer = own.one(b"authorization")
    if bearer is None or bearer.removeprefix(b"Bearer ") not in tokens:
        problems.append(
            f"Authorization should be one 'Bearer <minted token>', got "
            f"{len(own.values.get(b'authorization', []))} value(s)"
            + (" (not a minted token)" if bearer is not None else "")
        )
    if own.one(b"host") != authority:
        problems.append(f"Host {own.values.get(b'host')!r}, expected [{authority!r}]")
    if own.one(b"x-forwarded-for") != b"127.0.0.1":
        problems.append(f"X-Forwarded-For {own.values.get(b'x-forwarded-for')!r}")
    if own.one(b"x-forwarded-proto") != b"http":
        problems.append(f"X-Forwarded-Proto {own.values.get(b'x-forwarded-proto')!r}")
    request_id = own.one(b"x-request-id")
    if request_id is None or not 0 < len(request_id) <= 128 or set(request_id) - REQUEST_ID_CHARS:
        problems.append(f"X-Request-Id {own.values.get(b'x-request-id')!r}")
    via = own.one(b"via")
    if app is not None:
        version = app.start_line.rsplit(b"/", 1)[-1]
        if via is None or via.split(b" ", 1)[0] != version:
            problems.append(
                f"Via {own.values.get(b'via')!r}: RFC 9110 §7.6.3 wants the received "
                f"protocol {version.decode()} first"
            )
        hosts = app.values(b"host")
        if hosts and own.values.get(b"x-forwarded-host") != hosts:
            problems.append(
                f"X-Forwarded-Host {own.values.get(b'x-forwarded-host')!r}, app sent {hosts!r}"
            )
    return problems


def _matches(
    message: Message,
    expect: bytes | tuple[bytes, ...],
    *,
    request: bool,
    own: frozenset[bytes],
    method: bytes,
) -> bool:
    got = message.canonical(own)
    for alternative in alternatives(expect):
        parsed = parse_message(alternative, request=request, method=method)
        assert parsed is not None
        if parsed[0].canonical() == got:
            return True
    return False


def _explain(
    message: Message,
    expect: bytes | tuple[bytes, ...],
    *,
    request: bool,
    own: frozenset[bytes],
    method: bytes,
) -> str:
    lines = ["  got:", _indent(message.canonical(own).render())]
    for number, alternative in enumerate(alternatives(expect), 1):
        parsed = parse_message(alternative, request=request, method=method)
        assert parsed is not None
        lines += [f"  expected ({number}):", _indent(parsed[0].canonical().render())]
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def check_outcome(
    case: CaseLike,
    outcome: Outcome,
    *,
    authority: bytes | None,
    tokens: Sequence[bytes] = (),
) -> list[str]:
    """Every way ``outcome`` differs from what the case expects; empty when it
    conforms. ``authority`` None skips the proxy's own fields (another proxy)."""
    problems = []
    if outcome.error:
        problems.append(f"the app got no whole answer: {outcome.error}")
    if case.secret and case.secret in outcome.app_bytes:
        problems.append(f"the answer quotes the app's secret bytes {case.secret!r}")
    if case.local:
        if outcome.received:
            first = outcome.received[0].message
            problems.append(
                f"the partner received {len(outcome.received)} request(s); the proxy must "
                f"answer {case.status} itself. First: {render_bytes(first.head, 300)}"
            )
        finals = [m for m in outcome.answers if not m.interim]
        if finals and finals[0].status not in case.status:
            problems.append(
                f"status {finals[0].status}, expected {' or '.join(map(str, case.status))}: "
                f"{render_bytes(finals[0].raw, 300)}"
            )
        return problems
    requests = [r for write in app_requests(case) for r in write]
    if len(outcome.received) != len(case.forwarded):
        problems.append(
            f"the partner received {len(outcome.received)} request(s), expected {len(case.forwarded)}"
        )
    for number, (recorded, slot) in enumerate(zip(outcome.received, outcome.slot, strict=False)):
        message = recorded.message
        if slot < 0:
            problems.append(
                f"partner request {number} was not expected: {render_bytes(message.head, 300)}"
            )
            continue
        if not _matches(message, case.forwarded[slot], request=True, own=PROXY_FIELDS, method=b""):
            problems.append(
                f"partner request {number} differs:\n"
                + _explain(
                    message, case.forwarded[slot], request=True, own=PROXY_FIELDS, method=b""
                )
            )
        if authority is not None:
            app = requests[slot] if slot < len(requests) else None
            for problem in check_proxy_fields(message, app, authority=authority, tokens=tokens):
                problems.append(f"partner request {number}: {problem}")
    finals = [m for m in outcome.answers if not m.interim]
    if case.status:  # forwarded, then answered by the proxy itself
        if not finals or finals[-1].status not in case.status:  # the proxy's own comes last
            got = render_bytes(finals[-1].raw, 300) if finals else "no answer"
            problems.append(f"expected the proxy's {case.status}, got {got}")
        return problems
    if authority is not None:
        for number, (app, answer) in enumerate(zip(requests, finals, strict=False)):
            # RFC 9110 §7.6.3: as a forward proxy it adds Via to what it forwards.
            if app.target.startswith(b"http") and not (answer.values(b"via") or [b""])[-1].endswith(
                b"authproxy"
            ):
                problems.append(f"answer {number} to an absolute-form request has no Via")
    if len(outcome.answers) != len(case.answers):
        problems.append(
            f"the app received {len(outcome.answers)} message(s), expected {len(case.answers)}: "
            + ", ".join(repr(m.start_line) for m in outcome.answers)
        )
    methods = _answered_methods(requests, case.answers)
    for number, (message, expect) in enumerate(zip(outcome.answers, case.answers, strict=False)):
        method = methods[number] if number < len(methods) else b"GET"
        if not _matches(message, expect, request=False, own=PROXY_RESPONSE_FIELDS, method=method):
            problems.append(
                f"answer {number} differs:\n"
                + _explain(message, expect, request=False, own=PROXY_RESPONSE_FIELDS, method=method)
            )
    return problems


def _answered_methods(
    requests: list[Message], answers: Sequence[bytes | tuple[bytes, ...]]
) -> list[bytes]:
    """The request method each expected answer belongs to (interim answers
    belong to the request their final answer answers)."""
    out = []
    index = 0
    for expect in answers:
        first = alternatives(expect)[0]
        method = requests[index].method if index < len(requests) else b"GET"
        out.append(method)
        status = first.split(b" ", 2)[1]
        if not status.startswith(b"1"):
            index += 1
    return out


def outcome_signature(outcome: Outcome, own: bool = True) -> list[Canonical]:
    """A comparable summary of one run: each partner request (in expected
    order) and each answer, canonical."""
    ordered = sorted(zip(outcome.slot, outcome.received, strict=False), key=lambda pair: pair[0])
    request_fields = PROXY_FIELDS if own else frozenset()
    return [r.message.canonical(request_fields) for _, r in ordered] + [
        m.canonical(PROXY_RESPONSE_FIELDS) for m in outcome.answers
    ]
