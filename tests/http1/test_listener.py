"""HTTP/1.1 on the apps' side, byte for byte over a real socket: framing,
keep-alive, pipelining, 100-continue, answers to bodies not read
(proxy/listener.py)."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from conftest import Stack, StackFactory, log_events, raw_status
from proxy.http1.policy import response_head


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response: head and body, framed by Content-Length or chunked."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lower = head.lower()
    if b"content-length:" in lower:
        length = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        return head, await asyncio.wait_for(reader.readexactly(length), 5)
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return head, body
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    return head, b""


async def test_pipelined_requests_are_answered_in_order(stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(
        b"GET /demo/first HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /demo/second HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /demo/third HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    paths = []
    for _ in range(3):
        head, body = await read_response(reader)
        assert raw_status(head) == 200
        paths.append(json.loads(body)["raw_path"])
    writer.close()
    assert paths == ["/v2/first", "/v2/second", "/v2/third"]
    assert [r.body for r in stack.partner.requests] == [b"", b"hello", b""]


async def test_expect_100_continue_is_answered_before_the_body(stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(
        b"PUT /demo/x HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100")
    assert stack.partner.requests == []  # nothing went upstream before the body
    writer.write(b"hello world")
    head, body = await read_response(reader)
    writer.close()
    assert raw_status(head) == 200 and json.loads(body)["body_length"] == 11
    assert stack.partner.requests[0].body == b"hello world"
    assert all(name.lower() != "expect" for name, _ in stack.partner.requests[0].headers)


async def test_http_1_0_keep_alive_and_close(stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(b"GET /demo/a HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
    head, body = await read_response(reader)
    assert raw_status(head) == 200 and b"connection: keep-alive" in head.lower()
    writer.write(b"GET /demo/b HTTP/1.0\r\nHost: a\r\n\r\n")  # 1.0 default: close after
    head, body = await read_response(reader)
    assert raw_status(head) == 200 and json.loads(body)["raw_path"] == "/v2/b"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the proxy
    writer.close()
    assert len(stack.partner.requests) == 2


async def test_a_streamed_answer_is_chunked_for_1_1_and_close_delimited_for_1_0(
    stack: Stack,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(b"GET /demo/stream?n=3&delay=0.01 HTTP/1.1\r\nHost: a\r\n\r\n")
    head, body = await read_response(reader)
    writer.close()
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"chunk-0\nchunk-1\nchunk-2\n"

    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(b"GET /demo/stream?n=3&delay=0.01 HTTP/1.0\r\nHost: a\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)  # HTTP/1.0: the body ends at close
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"chunk-0\nchunk-1\nchunk-2\n"


async def test_an_answer_to_an_unread_body_reaches_the_app(make_stack: StackFactory) -> None:
    # The proxy refuses a 4 MiB upload on Content-Length alone (max_body) while
    # the app is still sending it: the app must read the 413, not a reset.
    stack = await make_stack(route="    max_body: 1MiB")
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    size = 4 * 1024 * 1024
    writer.write(b"POST /demo/sink HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)

    async def send_body() -> None:
        block = b"u" * 65536
        try:
            for _ in range(size // len(block)):
                writer.write(block)
                await writer.drain()
        except ConnectionError:
            pass

    sending = asyncio.create_task(send_body())
    head, body = await read_response(reader)
    await sending
    writer.close()
    assert raw_status(head) == 413 and b"body_too_large" in body
    assert b"connection: close" in head.lower()
    assert stack.partner.sunk == []


async def test_idle_keep_alive_connections_are_closed(make_stack: StackFactory) -> None:
    stack = await make_stack(top="inbound: {idle_timeout: 300ms}")
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(b"GET /demo/x HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _ = await read_response(reader)
    assert raw_status(head) == 200
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert 0.2 < asyncio.get_running_loop().time() - started < 3


def test_response_heads_refuse_cr_and_lf() -> None:
    assert response_head(200, "OK", [("A", "b")]) == b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n"
    assert response_head(404, None, []).startswith(b"HTTP/1.1 404 Not Found\r\n")
    # an empty reason phrase from a partner is kept (RFC 9112 §4: it is optional)
    assert response_head(404, "", []) == b"HTTP/1.1 404 \r\n\r\n"
    assert response_head(200, "OK\r\nX: y", []).startswith(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(ValueError, match="CR or LF"):
        response_head(200, "OK", [("Set-Cookie", "a=1\r\nX-Injected: 1")])


async def test_an_upgrade_request_is_answered_without_upgrading(stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(
        b"GET /demo/ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    head, _ = await read_response(reader)
    assert raw_status(head) == 200
    seen = {name.lower() for name, _ in stack.partner.requests[0].headers}
    assert "upgrade" not in seen and "connection" not in seen
    # The connection then either serves the next request or is closed; it never hangs.
    writer.write(b"GET /demo/next HTTP/1.1\r\nHost: a\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert rest == b"" or raw_status(rest) == 200


async def test_a_slow_app_slows_the_partner_instead_of_filling_memory(stack: Stack) -> None:
    # Back-pressure end to end: while the app reads nothing, the partner can only
    # get as far as the socket buffers and the proxy's bounded read buffer allow.
    size = 256 * 1024 * 1024
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port, limit=2**16)
    writer.write(b"GET /demo/download?size=%d HTTP/1.1\r\nHost: a\r\n\r\n" % size)
    await asyncio.sleep(1.0)
    stalled_at = stack.partner.download_sent
    await asyncio.sleep(0.5)
    assert stack.partner.download_sent < 64 * 1024 * 1024, stack.partner.download_sent
    assert stack.partner.download_sent - stalled_at < 4 * 1024 * 1024  # it is waiting on us
    head = await reader.readuntil(b"\r\n\r\n")
    assert raw_status(head) == 200
    received = 0
    while received < size:
        chunk = await asyncio.wait_for(reader.read(2**20), 10)
        assert chunk
        received += len(chunk)
    writer.close()
    assert received == size and stack.partner.download_sent == size


# ---- issue 11: defects found by black-box tests, one test each --------------


# Trailers across requests and 40 pipelined requests: tests/conformance_cases.py
# (isolation_request_trailer_*, pipelined_*), on fresh and pooled connections.


async def test_trace_is_answered_by_the_proxy_and_never_carries_the_token(
    stack: Stack,
) -> None:
    # Item 1: RFC 9110 §9.3.8; a partner that echoes TRACE would show the token.
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(b"TRACE /demo/t HTTP/1.1\r\nHost: a\r\n\r\n")
    head, body = await read_response(reader)
    assert raw_status(head) == 405 and b"allow: get, head, post" in head.lower()
    assert json.loads(body)["error"] == "method_not_allowed"
    writer.write(b"OPTIONS /demo/o HTTP/1.1\r\nHost: a\r\nMax-Forwards: 0\r\n\r\n")
    head, body = await read_response(reader)
    assert raw_status(head) == 200 and b"allow: " in head.lower() and body == b""
    writer.write(b"OPTIONS /demo/o HTTP/1.1\r\nHost: a\r\nMax-Forwards: 3\r\n\r\n")
    head, _ = await read_response(reader)
    writer.close()
    assert raw_status(head) == 200
    (forwarded,) = stack.partner.requests  # only the OPTIONS with hops left
    assert forwarded.method == "OPTIONS"
    assert ("Max-Forwards", "2") in forwarded.headers  # RFC 9110 §7.6.2


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"deflate,chunked", b"x-custom;q=1, chunked"])
async def test_a_transfer_coding_other_than_chunked_gets_501(stack: Stack, coding: bytes) -> None:
    # Item 8: the chunking was removed, the gzip coding dropped, the partner
    # got gzip bytes it could not know about.
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(
        b"POST /demo/u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: "
        + coding
        + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    head, body = await read_response(reader)
    writer.close()
    assert raw_status(head) == 501 and b"connection: close" in head.lower()
    assert json.loads(body)["error"] == "not_implemented"
    assert stack.partner.requests == []


async def test_an_over_long_authorization_is_named_never_quoted(
    make_stack: StackFactory, log_stream: io.StringIO
) -> None:
    # Item 4: the 400 and the log line quoted ~60 bytes of the field: the secret.
    stack = await make_stack(top="inbound: {max_header_size: 1KiB}")
    secret = b"Bearer app-secret-" + b"7" * 2000
    data = b"GET /demo/x HTTP/1.1\r\nHost: a\r\nAuthorization: " + secret + b"\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(data)
    head, body = await read_response(reader)
    writer.close()
    assert raw_status(head) == 431
    assert json.loads(body)["message"] == (
        "header field 'Authorization' is longer than 1024 bytes (inbound.max_header_size)"
    )
    assert b"app-secret" not in head + body
    assert "app-secret" not in log_stream.getvalue()
    (line,) = [e for e in log_events(log_stream) if e["event"] == "malformed_request"]
    assert line["status"] == 431 and "Authorization" in line["reason"]


async def test_http_versions_other_than_1_x_get_505(stack: Stack) -> None:
    for line in (b"GET /demo/x HTTP/2.0", b"GET /demo/x HTTP/3.0"):
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
        writer.write(line + b"\r\nHost: a\r\n\r\n")
        head, body = await read_response(reader)
        writer.close()
        assert raw_status(head) == 505, line
        assert json.loads(body)["error"] == "http_version_not_supported"
    assert stack.partner.requests == []


async def test_a_body_cut_short_by_a_half_close_is_400_and_never_forwarded(stack: Stack) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(b"POST /demo/x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw_status(answer) == 400
    assert b'"bad_request"' in answer
    assert stack.partner.requests == [] or all(r.body != b"abc" for r in stack.partner.requests)


class _Transport(asyncio.Transport):
    """A transport that records whether reading is paused."""

    def __init__(self) -> None:
        super().__init__()
        self.paused = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 5000) if name == "peername" else default

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def close(self) -> None:
        pass


async def test_bytes_held_during_a_handshake_release_the_transport_they_paused() -> None:
    """Issue 14: the TLS layer hands over the app's first request before the
    intercepted handshake is reported, while the CONNECT still holds bytes; a
    large one pauses the raw transport, which ``inner`` must resume (a stall
    until body_timeout, found under load)."""
    from proxy.config.model import InboundLimits
    from proxy.http1.listener import Listener

    async def handler(exchange: object) -> None:
        await asyncio.sleep(0)

    listener = Listener(handler, InboundLimits())
    connection = listener()
    raw, tls = _Transport(), _Transport()
    connection.connection_made(raw)
    connection.held = bytearray()
    connection.data_received(b"x" * 70_000)  # past READ_BUFFER while held
    assert raw.paused
    connection.inner(tls, "api.acme.example")
    assert not raw.paused and not tls.paused
    connection.close()
    await asyncio.sleep(0)


async def test_a_refused_request_has_a_request_id_its_log_line_shares(
    stack: Stack, log_stream: io.StringIO
) -> None:
    """Issue 11, sixth outside round: parser refusals carried none."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(b"GET /demo/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    document = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert len(document["request_id"]) == 32
    (line,) = [e for e in log_events(log_stream) if e["event"] == "malformed_request"]
    assert line["request_id"] == document["request_id"]


async def test_a_burst_of_connections_is_accepted_in_one_go() -> None:
    """Issue 16: libuv (uvloop) accepts one connection a loop iteration; under
    load, with hundreds of requests served in each, 400 of 1,000 new
    connections waited seconds unaccepted while the first ones were served
    again and again. The listener accepts every waiting connection (up to
    ACCEPT_BATCH) each time its socket is readable, on any loop."""
    import socket

    from proxy.config.model import InboundLimits
    from proxy.http1.listener import Listener

    async def handler(exchange: object) -> None:
        await asyncio.sleep(0)

    listener = Listener(handler, InboundLimits())
    port = await listener.start("127.0.0.1", 0)
    (sock,) = listener._sockets
    loop = asyncio.get_running_loop()
    loop.remove_reader(sock.fileno())  # the loop does not accept: we do, once
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        listener._accept(sock)
        await asyncio.sleep(0.05)
        assert len(listener.connections) == 40
    finally:
        for client in clients:
            client.close()
        await listener.shutdown(1)


async def test_a_fast_chunked_upload_resumes_after_flow_control(stack: Stack) -> None:
    """aiohttp 3.14 pauses its parser, not only the socket, when a body's
    buffer is full, and resumes it with ``data_received(b"")``: the proxy
    ignored that empty read and a chunked upload of a MiB or more hung until
    body_timeout (found by bench/bench.py's upload_512mib)."""
    body = b"".join(b"%x\r\n%s\r\n" % (65536, bytes([65 + i % 26]) * 65536) for i in range(64))
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(
        b"POST /demo/sink HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body
        + b"0\r\n\r\n"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert raw_status(head) == 200, head
    assert [size for size, _ in stack.partner.sunk] == [64 * 65536]


async def test_a_name_with_two_addresses_listens_on_both(monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 8 (N1): ``listen: localhost:P`` where localhost is 127.0.0.1 and
    ::1 listens on both, on one port, as asyncio's create_server did."""
    import socket

    from proxy.config.model import InboundLimits
    from proxy.http1.listener import Listener

    real = socket.getaddrinfo

    def both(host: str, port: int, *args: object, **kwargs: object) -> list[object]:
        if host != "twice.test":
            return real(host, port, *args, **kwargs)  # type: ignore[arg-type]
        return [*real("127.0.0.1", port, *args, **kwargs), *real("::1", port, *args, **kwargs)]  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", both)

    async def handler(exchange: object) -> None:
        await asyncio.sleep(0)

    listener = Listener(handler, InboundLimits())
    try:
        port = await listener.start("twice.test", 0)
    except OSError as exc:  # a machine without IPv6 on loopback
        pytest.skip(f"no ::1 here: {exc}")
    try:
        assert {s.getsockname()[1] for s in listener._sockets} == {port}
        for address in ("127.0.0.1", "::1"):
            _, writer = await asyncio.open_connection(address, port)
            writer.close()
    finally:
        await listener.shutdown(1)
