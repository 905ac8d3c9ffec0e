"""The lean upstream client against a scripted HTTP/1.1 server on a real
loopback socket: every byte on the wire is the test's choice, so framing,
keep-alive and failure handling are checked exactly."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.errors import (
    BodyFailed,
    ConnectFailed,
    ConnectTimedOut,
    Dropped,
    UpstreamBodyFailed,
    UpstreamProtocolError,
)
from proxy.http1.policy import request_head
from proxy.http1.upstream import LeanClient
from proxy.routing.table import Endpoint

Reply = Callable[["Seen"], Awaitable[bytes | None]]


class Seen:
    """One request as the server read it: head and body bytes."""

    def __init__(self, head: bytes, body: bytes, connection: int, complete: bool) -> None:
        self.head = head
        self.body = body
        self.connection = connection
        self.complete = complete

    @property
    def lines(self) -> list[str]:
        return self.head.decode("latin-1").split("\r\n")

    def header(self, name: str) -> str | None:
        for line in self.lines[1:]:
            key, _, value = line.partition(":")
            if key.lower() == name.lower():
                return value.strip()
        return None


class ScriptedServer:
    """Reads requests (Content-Length or chunked bodies) and writes whatever
    ``reply`` returns; ``None`` closes the connection without answering."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.connections = 0
        self.requests: list[Seen] = []
        self.closed = asyncio.Event()
        self.close_after_answer = False  # as a server whose idle timeout fired would
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                seen = Seen(head, b"", number, True)
                self.requests.append(seen)
                length = seen.header("Content-Length")
                try:
                    if length is not None:
                        seen.body = await reader.readexactly(int(length))
                    elif (seen.header("Transfer-Encoding") or "").lower() == "chunked":
                        seen.body = await _read_chunked(reader)
                except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                    seen.complete = False
                    return
                answer = await self.reply(seen)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
                if self.close_after_answer:
                    return
        finally:
            writer.close()
            self.closed.set()


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return body
        body += await reader.readexactly(size)
        await reader.readexactly(2)


def ok(body: bytes = b"hello", extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def fixed(answer: bytes) -> Reply:
    async def reply(_: Seen) -> bytes:
        return answer

    return reply


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Reply], Awaitable[ScriptedServer]]]:
    servers: list[ScriptedServer] = []

    async def make(reply: Reply) -> ScriptedServer:
        server = ScriptedServer(reply)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


@pytest.fixture
async def client() -> AsyncIterator[LeanClient]:
    lean = LeanClient()
    yield lean
    await lean.close()


def endpoint(port: int, read_timeout: float = 5.0) -> Endpoint:
    return Endpoint.build(f"http://127.0.0.1:{port}", True, 2.0, read_timeout)


async def get(
    client: LeanClient,
    server: ScriptedServer,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: Any = None,
    read_timeout: float = 5.0,
) -> tuple[int, bytes, Any]:
    response = await client.request(
        endpoint(server.port, read_timeout),
        method,
        f"http://127.0.0.1:{server.port}/x",
        "/x?q=1",
        headers if headers is not None else [("Host", f"127.0.0.1:{server.port}")],
        body,
    )
    try:
        data = await response.content.read()
    finally:
        response.close()
    return response.status, data, response


async def test_keep_alive_connection_is_reused(scripted: Any, client: LeanClient) -> None:
    server = await scripted(await fixed(ok(b"one answer")))
    for _ in range(5):
        status, body, _ = await get(client, server)
        assert (status, body) == (200, b"one answer")
    assert len(server.requests) == 5
    assert server.connections == 1
    assert server.requests[0].lines[0] == "GET /x?q=1 HTTP/1.1"


async def test_connection_close_is_obeyed(scripted: Any, client: LeanClient) -> None:
    server = await scripted(await fixed(ok(b"bye", "Connection: close\r\n")))
    for _ in range(3):
        assert (await get(client, server))[:2] == (200, b"bye")
    assert server.connections == 3


async def test_head_204_and_304_have_no_body_and_keep_the_connection(
    scripted: Any, client: LeanClient
) -> None:
    answers = {
        "HEAD": b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        "DELETE": b"HTTP/1.1 204 No Content\r\n\r\n",
        "GET": b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
    }

    async def reply(seen: Seen) -> bytes:
        return answers[seen.lines[0].split()[0]]

    server = await scripted(reply)
    status, body, response = await get(client, server, "HEAD")
    assert (status, body, response.headers["Content-Length"]) == (200, b"", "1000")
    assert (await get(client, server, "DELETE"))[:2] == (204, b"")
    status, body, response = await get(client, server, "GET")
    assert (status, body, response.headers["ETag"]) == (304, b"", '"x"')
    assert server.connections == 1


async def test_close_delimited_body_is_read_to_the_end(client: LeanClient) -> None:
    payload = b"x" * 300_000  # no Content-Length, not chunked: the body ends at close

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        response = await client.request(endpoint(port), "GET", "", "/", [("Host", "h")], None)
        assert response.status == 200
        assert await response.content.read() == payload
        response.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_a_close_delimited_body_cut_by_a_reset_is_a_broken_body(client: LeanClient) -> None:
    """A reset is not an end (RFC 9112 §8): the app must not get the part as
    a whole body (issue 11, fifth outside round)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nhello")
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        response = await client.request(endpoint(port), "GET", "", "/", [("Host", "h")], None)
        assert response.status == 200
        with pytest.raises(UpstreamBodyFailed):
            await response.content.read()
        response.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_informational_answers_are_handed_on_except_100(
    scripted: Any, client: LeanClient
) -> None:
    # Issue 11, item 6: RFC 9110 §15.2, a proxy forwards the 1xx it did not ask for.
    server = await scripted(
        await fixed(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 102 Processing\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>; rel=preload\r\n\r\n" + ok(b"final")
        )
    )
    seen: list[tuple[int, str, list[tuple[str, str]]]] = []

    async def interim(status: int, reason: str, fields: list[tuple[str, str]]) -> None:
        seen.append((status, reason, fields))

    response = await client.request(
        endpoint(server.port), "GET", "", "/", [("Host", "h")], None, interim
    )
    assert (response.status, await response.content.read()) == (200, b"final")
    assert "Link" not in response.headers  # the final answer's own headers only
    assert seen == [
        (102, "Processing", []),
        (103, "Early Hints", [("link", "</s.css>; rel=preload")]),
    ]
    assert (await get(client, server))[:2] == (200, b"final")  # no callback: skipped
    assert server.connections == 1


async def test_response_fields_keep_their_spelling_and_bytes(
    scripted: Any, client: LeanClient
) -> None:
    # Issue 11, items 10 and 11: names as sent (not "Etag"), obs-text byte for byte.
    answer = b'HTTP/1.1 200 OK\r\nETag: "v1"\r\nx-latin: caf\xe9\r\nContent-Length: 0\r\n\r\n'
    server = await scripted(await fixed(answer))
    _, _, response = await get(client, server)
    assert response.fields == [
        ("ETag", '"v1"'),
        ("x-latin", "caf\udce9"),
        ("Content-Length", "0"),
    ]
    assert request_head("GET", "/", response.fields).endswith(
        b"x-latin: caf\xe9\r\nContent-Length: 0\r\n\r\n"
    )


async def test_a_response_trailer_never_becomes_a_header_of_the_next_answer(
    scripted: Any, client: LeanClient
) -> None:
    # Issue 11, item 3: llhttp kept the last trailer pending and gave it to the
    # next answer parsed on the pooled connection (another app's).
    answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\nX-Status: done\r\n\r\n",
        ok(b"second"),
    ]

    async def reply(_: Seen) -> bytes:
        return answers.pop(0)

    server = await scripted(reply)
    first = await get(client, server)
    assert first[:2] == (200, b"body")
    status, body, response = await get(client, server)
    assert (status, body) == (200, b"second")
    assert server.connections == 1  # the same pooled connection
    assert "X-Status" not in response.headers
    assert [name for name, _ in response.fields] == ["Content-Length"]


async def test_framing_of_request_bodies(scripted: Any, client: LeanClient) -> None:
    server = await scripted(await fixed(ok()))
    host = [("Host", "h")]

    async def stream() -> AsyncIterator[bytes]:
        for part in (b"abc", b"", b"defgh" * 1000):
            yield part

    await get(client, server, "POST", host, stream())
    chunked = server.requests[-1]
    assert chunked.header("Transfer-Encoding") == "chunked"
    assert chunked.header("Content-Length") is None
    assert chunked.body == b"abc" + b"defgh" * 1000

    async def stream_with_length() -> AsyncIterator[bytes]:
        yield b"12345"
        yield b"67890"

    await get(client, server, "PUT", [*host, ("Content-Length", "10")], stream_with_length())
    raw = server.requests[-1]
    assert (raw.header("Transfer-Encoding"), raw.body) == (None, b"1234567890")

    await get(client, server, "POST", host, b"replayed body")
    assert server.requests[-1].header("Content-Length") == "13"
    assert server.requests[-1].body == b"replayed body"

    big = bytes(range(256)) * 1024
    await get(client, server, "POST", host, big)
    assert server.requests[-1].body == big

    await get(client, server, "POST", host, None)
    assert server.requests[-1].header("Content-Length") == "0"
    await get(client, server, "GET", host, None)
    assert server.requests[-1].header("Content-Length") is None
    assert server.connections == 1  # every one of them on the same connection


def test_header_values_with_cr_or_lf_are_refused() -> None:
    assert request_head("GET", "/", [("A", "b")]) == b"GET / HTTP/1.1\r\nA: b\r\n\r\n"
    for bad in ("tok\r\nX-Injected: 1", "tok\nX: 1", "tok\r"):
        with pytest.raises(ValueError, match="CR or LF"):
            request_head("GET", "/", [("Authorization", bad)])
    with pytest.raises(ValueError):
        request_head("GET", "/ HTTP/1.1\r\nX: y", [])
    # raw bytes the inbound parser surrogate-escaped go out unchanged
    raw = "caf\udcc3\udca9"
    assert request_head("GET", "/", [("X", raw)]).endswith(b"X: caf\xc3\xa9\r\n\r\n")


async def test_a_closed_connection_before_any_answer_is_dropped(
    scripted: Any, client: LeanClient
) -> None:
    async def hang_up(_: Seen) -> None:
        return None

    server = await scripted(hang_up)
    with pytest.raises(Dropped):
        await get(client, server)


async def test_a_pooled_connection_the_server_closed_is_not_used(
    scripted: Any, client: LeanClient
) -> None:
    server = await scripted(await fixed(ok(b"fine")))  # keep-alive by the headers...
    server.close_after_answer = True  # ...but closed right after, without a word
    assert (await get(client, server))[:2] == (200, b"fine")
    await asyncio.wait_for(server.closed.wait(), 5)
    await asyncio.sleep(0.05)  # the client's side sees the FIN
    assert (await get(client, server))[:2] == (200, b"fine")
    assert server.connections == 2 and len(server.requests) == 2


async def test_read_timeout(scripted: Any, client: LeanClient) -> None:
    async def never(_: Seen) -> bytes:
        await asyncio.sleep(30)
        return b""

    server = await scripted(never)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await get(client, server, read_timeout=0.3)
    assert 0.25 < loop.time() - started < 3


async def test_read_timeout_on_a_reused_connection(scripted: Any, client: LeanClient) -> None:
    # The deadline moves with every read and one timer checks it: after a
    # quick exchange on a connection, a silent second one must still time out.
    async def first_fast_then_silent(seen: Seen) -> bytes:
        if len(server.requests) > 1:
            await asyncio.sleep(30)
        return ok(b"fast")

    server = await scripted(first_fast_then_silent)
    assert (await get(client, server, read_timeout=0.3))[:2] == (200, b"fast")
    await asyncio.sleep(0.2)  # part of the first deadline passes while idle
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await get(client, server, read_timeout=0.3)
    assert 0.25 < loop.time() - started < 3
    assert server.connections == 1


async def test_the_read_deadline_belongs_to_the_request_not_the_connection(
    scripted: Any, client: LeanClient
) -> None:
    # Issue 11, item 5: two routes to one origin share pooled connections; the
    # check armed for the first request's 30 s outlived it, so a 1 s route
    # waited 30 s on that connection.
    async def second_is_slow(seen: Seen) -> bytes:
        if len(server.requests) > 1:
            await asyncio.sleep(5)
        return ok(b"fast")

    server = await scripted(second_is_slow)
    assert (await get(client, server, read_timeout=30))[:2] == (200, b"fast")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await get(client, server, read_timeout=0.5)
    assert loop.time() - started < 1.5
    assert server.connections == 1


async def test_a_connect_timeout_is_named_as_such(client: LeanClient) -> None:
    # Issue 11, item 13: a full accept backlog read as "did not answer within 30s".
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # fill the backlog: later SYNs go unanswered
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        quick = Endpoint.build(f"http://127.0.0.1:{port}", True, 0.3, 30.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ConnectTimedOut) as failed:
            await client.request(quick, "GET", "", "/", [("Host", "h")], None)
        assert loop.time() - started < 2
        assert failed.value.reason == "no connection within connect_timeout (0.3s)"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_a_stalled_body_times_out_between_chunks(scripted: Any, client: LeanClient) -> None:
    async def stall(_: Seen) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"

    server = await scripted(stall)
    response = await client.request(
        endpoint(server.port, 0.3), "GET", "", "/", [("Host", "h")], None
    )
    assert await response.content.read(3) == b"abc"
    with pytest.raises(TimeoutError):
        await response.content.read(7)
    response.close()


async def test_connect_failure_names_the_reason(client: LeanClient) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(ConnectFailed) as failed:
        await client.request(endpoint(port), "GET", "", "/", [("Host", "h")], None)
    assert "refused" in failed.value.reason.lower() or "connect" in failed.value.reason.lower()


async def test_localhost_is_resolved_once_per_ttl(
    scripted: Any, client: LeanClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await scripted(await fixed(ok(b"named", "Connection: close\r\n")))
    loop = asyncio.get_running_loop()
    calls = []
    real = loop.getaddrinfo

    async def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return await real(*args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", counting)
    named = Endpoint.build(f"http://localhost:{server.port}", True, 2.0, 5.0)
    for _ in range(3):
        response = await client.request(named, "GET", "", "/", [("Host", "h")], None)
        assert await response.content.read() == b"named"
        response.close()
    assert server.connections == 3  # Connection: close each time
    assert calls == ["localhost"]


async def test_a_garbage_answer_is_a_protocol_failure(scripted: Any, client: LeanClient) -> None:
    server = await scripted(await fixed(b"SSH-2.0-OpenSSH_9.2\r\n\r\n"))
    with pytest.raises(UpstreamProtocolError) as failed:  # translated in the engine, once
        await get(client, server)
    reason = failed.value.reason
    assert reason.startswith("Bad status line"), reason  # the parser's reason
    assert "SSH" not in reason  # never the partner's bytes


async def test_an_early_answer_leaves_the_connection_out_of_the_pool(
    client: LeanClient,
) -> None:
    connections = 0
    release = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 4\r\n\r\nbig!")
        await writer.drain()
        try:
            while await reader.read(65536):
                pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sent: list[bytes] = []

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"first"
        sent.append(b"first")
        await release.wait()
        yield b"never"

    try:
        response = await client.request(
            endpoint(port), "POST", "", "/", [("Host", "h"), ("Content-Length", "10")], slow_body()
        )
        assert response.status == 413 and await response.content.read() == b"big!"
        response.close()  # the request is half sent: this connection must not be reused
        assert sent == [b"first"]
        again = await client.request(endpoint(port), "GET", "", "/", [("Host", "h")], None)
        assert again.status == 413
        again.close()
        assert connections == 2
    finally:
        server.close()
        await server.wait_closed()


async def test_a_failing_body_source_leaves_the_request_visibly_incomplete(
    scripted: Any, client: LeanClient
) -> None:
    server = await scripted(await fixed(ok()))

    async def broken() -> AsyncIterator[bytes]:
        yield b"part"
        raise ValueError("the app's body ended early")

    with pytest.raises(BodyFailed):
        await get(client, server, "POST", [("Host", "h")], broken())
    await asyncio.wait_for(server.closed.wait(), 5)
    assert len(server.requests) == 1 and not server.requests[0].complete


async def test_extra_bytes_after_an_answer_keep_the_connection_out_of_the_pool(
    scripted: Any, client: LeanClient
) -> None:
    server = await scripted(await fixed(ok(b"one") + ok(b"unasked")))
    assert (await get(client, server))[:2] == (200, b"one")
    await asyncio.sleep(0.05)
    assert (await get(client, server))[:2] == (200, b"one")
    assert server.connections == 2


async def test_idle_connections_expire(scripted: Any) -> None:
    client = LeanClient(keepalive=0.2)
    try:
        server = await scripted(await fixed(ok()))
        await get(client, server)
        await get(client, server)
        assert server.connections == 1
        await asyncio.sleep(0.35)
        await get(client, server)
        assert server.connections == 2
        await asyncio.wait_for(server.closed.wait(), 2)  # the sweep closed the first one
    finally:
        await client.close()


async def test_large_answers_stream_whole(scripted: Any, client: LeanClient) -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB, past the read buffer
    server = await scripted(await fixed(ok(payload)))
    response = await client.request(endpoint(server.port), "GET", "", "/", [("Host", "h")], None)
    chunks = [chunk async for chunk in response.content.iter_any()]
    response.close()
    assert b"".join(chunks) == payload and len(chunks) > 1
    assert (await get(client, server))[1] == payload
    assert server.connections == 1


@pytest.mark.parametrize(
    "sent", [b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Le"]
)
async def test_a_connection_closed_after_a_byte_of_the_answer_is_not_dropped_but_broken(
    client: LeanClient, sent: bytes
) -> None:
    """Issue 11, sixth outside round: the partner had the request (it began
    to answer), so it is never resent: not Dropped, a protocol failure."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(sent)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(UpstreamProtocolError):
            await client.request(endpoint(port), "PUT", "", "/", [("Host", "h")], b"abc")
    finally:
        server.close()
        await server.wait_closed()


async def test_a_head_trickled_byte_by_byte_is_bounded_by_the_read_timeout(
    client: LeanClient,
) -> None:
    """Issue 11, sixth outside round: each byte of a head used to move the
    deadline, so a partner dripping its head held the request for ever."""
    head = b"HTTP/1.1 200 OK\r\nX-Slow: 1\r\nContent-Length: 2\r\n\r\nok"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            for byte in head:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(TimeoutError):
            await client.request(
                endpoint(port, read_timeout=0.5), "GET", "", "/", [("Host", "h")], None
            )
        assert loop.time() - started < 1.5  # the head needs 5 s at this pace
    finally:
        server.close()
        await server.wait_closed()
