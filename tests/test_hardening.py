"""Who may use a route, and what an app may cost: allow_from, inbound keys,
body and concurrency limits, slow clients, header limits, idempotent retries,
apps that go away. Real proxy, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
from pathlib import Path

import pytest
from aiohttp import web
from fakes import LocalServer
from multidict import CIMultiDict

from conftest import Stack, StackFactory, log_events, raw_exchange, raw_status


async def status_of(stack: Stack, path: str = "/demo/x", **kwargs: object) -> int:
    async with stack.http.get(stack.url(path), **kwargs) as response:  # type: ignore[arg-type]
        await response.read()
        return response.status


async def test_allow_from_refuses_other_sources(make_stack: StackFactory) -> None:
    stack = await make_stack(
        route="    allow_from: [10.0.0.0/8, '::1/128']",
        extra_routes="""  - name: local
    match: {path_prefix: /local/}
    upstream: {partner}/v2/
    client: demo
    allow_from: [127.0.0.0/8]
""",
    )
    async with stack.http.get(stack.url("/demo/x")) as response:
        assert response.status == 403
        body = await response.json()
    assert body["error"] == "source_not_allowed" and "127.0.0.1" in body["message"]
    assert stack.tokens.calls == 0 and stack.partner.requests == []
    assert await status_of(stack, "/local/x") == 200


async def test_inbound_key_is_required_checked_and_never_forwarded(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# apps allowed on this route\nkey-of-app-one\nkey-of-app-two\n")
    keys.chmod(0o600)
    stack = await make_stack(route=f"    inbound_auth: {{header: X-Proxy-Key, keys_file: {keys}}}")
    twice = [("X-Proxy-Key", "key-of-app-one"), ("X-Proxy-Key", "wrong")]  # either order
    for headers in (
        {},
        {"X-Proxy-Key": "wrong"},
        {"X-Proxy-Key": ""},
        CIMultiDict(twice),
        CIMultiDict(twice[::-1]),
    ):
        async with stack.http.get(stack.url("/demo/x"), headers=headers) as response:
            assert response.status == 401
            assert (await response.json())["error"] == "proxy_key_required"
            # RFC 9110 §15.5.2: a 401 carries a challenge (round 7, F6)
            challenge = response.headers["WWW-Authenticate"]
            assert challenge == 'ProxyKey realm="authproxy", header="X-Proxy-Key"'
    assert stack.tokens.calls == 0 and stack.partner.requests == []
    assert await status_of(stack, headers={"X-Proxy-Key": "key-of-app-two"}) == 200
    (seen,) = stack.partner.requests
    assert "x-proxy-key" not in {name.lower() for name, _ in seen.headers}
    assert "key-of-app-two" not in str(seen.headers)


async def test_a_proxy_key_never_reaches_the_partner_of_another_route(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    """An app that sends its proxy key on every call (a default header) hands
    it to no partner, on the keyed route or any other (issue 11, round 5)."""
    keys = tmp_path / "keys"
    keys.write_text("key-of-app-one\n")
    keys.chmod(0o600)
    stack = await make_stack(
        extra_routes=f"""  - name: keyed
    match: {{path_prefix: /keyed/}}
    upstream: {{partner}}/k/
    client: demo
    inbound_auth: {{header: X-Proxy-Key, keys_file: {keys}}}"""
    )
    for path in ("/demo/x", "/keyed/x"):
        assert await status_of(stack, path, headers={"X-Proxy-Key": "key-of-app-one"}) == 200
    # Round 10 (F2): the "_" spelling, which CGI-style stacks read as the
    # "-" one, is not forwarded either (it authenticates nothing here).
    both = {"X-Proxy-Key": "key-of-app-one", "X_Proxy_Key": "key-of-app-one"}
    for path, headers in (("/demo/x", {"X_Proxy_Key": "key-of-app-one"}), ("/keyed/x", both)):
        assert await status_of(stack, path, headers=headers) == 200
    assert await status_of(stack, "/keyed/x", headers={"X_Proxy_Key": "key-of-app-one"}) == 401
    assert len(stack.partner.requests) == 4
    for seen in stack.partner.requests:
        assert not {"x-proxy-key", "x_proxy_key"} & {name.lower() for name, _ in seen.headers}
        assert "key-of-app-one" not in str(seen.headers)


async def test_literal_secret_and_readable_secret_file_are_warned_about(
    make_stack: StackFactory, tmp_path: Path, log_stream: io.StringIO
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("demo-secret\n")
    secret.chmod(0o644)
    stack = await make_stack(
        client=f"""  other:
    token_url: http://127.0.0.1:9/token
    client_id: other
    client_secret_file: {secret}
"""
    )
    assert stack.config.warnings
    reasons = [e["reason"] for e in log_events(log_stream) if e["event"] == "config_warning"]
    assert any("clients.demo.client_secret: a literal secret" in r for r in reasons)
    assert any("clients.other.client_secret_file" in r and "mode 0644" in r for r in reasons)
    assert "demo-secret" not in log_stream.getvalue()


async def test_max_body_by_content_length_and_by_stream(make_stack: StackFactory) -> None:
    stack = await make_stack(route="    max_body: 1KiB")
    async with stack.http.post(stack.url("/demo/sink"), data=b"x" * 2000) as response:
        assert response.status == 413
        assert (await response.json())["error"] == "body_too_large"
    assert stack.partner.sunk == [] and stack.tokens.calls == 0  # refused before anything

    async def chunks() -> object:
        for _ in range(20):
            yield b"y" * 100

    async with stack.http.post(stack.url("/demo/sink"), data=chunks()) as response:
        assert response.status == 413
    assert stack.partner.sunk == []  # the partner never got a whole (or truncated) body
    async with stack.http.post(stack.url("/demo/sink"), data=b"z" * 1024) as response:
        assert response.status == 200
    assert stack.partner.sunk[-1][0] == 1024


async def test_max_concurrent_answers_503_with_retry_after(make_stack: StackFactory) -> None:
    stack = await make_stack(route="    max_concurrent: 2")

    async def one() -> tuple[int, str | None]:
        async with stack.http.get(stack.url("/demo/slow?delay=0.5")) as response:
            await response.read()
            return response.status, response.headers.get("Retry-After")

    results = await asyncio.gather(*(one() for _ in range(6)))
    assert sorted(results, key=str) == [(200, None)] * 2 + [(503, "1")] * 4
    assert len(stack.partner.requests) == 2
    assert await status_of(stack) == 200  # the slots are free again


async def test_slow_request_head_is_cut_off(make_stack: StackFactory) -> None:
    stack = await make_stack(top="inbound: {header_timeout: 300ms}")
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(b"GET /demo/x HTTP/1.1\r\nHost: a\r\n")

    async def trickle() -> None:  # a patient slowloris: one byte every 100 ms
        for _ in range(50):
            await asyncio.sleep(0.1)
            try:
                writer.write(b"X")
                await writer.drain()
            except OSError:
                return

    trickling = asyncio.ensure_future(trickle())
    try:
        answer = b""
        with contextlib.suppress(OSError):
            answer = await asyncio.wait_for(reader.read(), 3)  # 408, then closed
        closed_after = loop.time() - started
    finally:
        trickling.cancel()
        writer.close()
    assert 0.25 < closed_after < 1.5
    assert raw_status(answer) == 408 and answer.endswith(b'"}')
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "request_head_timeout"
    assert stack.partner.requests == []
    assert await status_of(stack) == 200  # ordinary requests are not affected


async def test_stalled_request_body_gets_408(make_stack: StackFactory) -> None:
    stack = await make_stack(top="inbound: {body_timeout: 300ms}")
    head = (
        b"POST /demo/sink HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
    )  # then nothing
    response = await raw_exchange(stack.proxy.port, head, timeout=3)
    assert raw_status(response) == 408
    assert b"body_timeout" in response
    assert stack.partner.sunk == []


async def test_a_small_body_cut_short_never_reaches_the_partner(make_stack: StackFactory) -> None:
    # Small bodies are read whole before sending (BUFFERED_BODY). An app that
    # stops after 10 of 100 bytes and goes away leaves nothing at the partner,
    # and the proxy keeps serving.
    stack = await make_stack()
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(b"POST /demo/sink HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    writer.write_eof()
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert response == b"" or raw_status(response) == 400  # nobody left to answer
    await asyncio.sleep(0.2)
    assert stack.partner.sunk == [] and stack.partner.requests == []
    assert await status_of(stack) == 200


async def test_header_count_and_size_limits(make_stack: StackFactory) -> None:
    stack = await make_stack(top="inbound: {max_headers: 20, max_header_size: 1KiB}")
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(30))
    response = await raw_exchange(
        stack.proxy.port, b"GET /demo/x HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n"
    )
    assert raw_status(response) == 431  # RFC 6585 §5
    assert b"more than 20 header fields" in response
    big = b"X-Big: " + b"v" * 2000 + b"\r\n"
    response = await raw_exchange(
        stack.proxy.port, b"GET /demo/x HTTP/1.1\r\nHost: a\r\n" + big + b"\r\n"
    )
    assert raw_status(response) == 431
    assert b"header field 'X-Big' is longer than 1024 bytes" in response
    assert b"vvvv" not in response  # named, never quoted
    line = b"GET /demo/" + b"p" * 2000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    response = await raw_exchange(stack.proxy.port, line)
    assert raw_status(response) == 414  # RFC 9112 §3
    assert b"pppp" not in response
    assert stack.partner.requests == []


class DroppingUpstream(LocalServer):
    """Closes the first ``drops`` connections after reading a request, without an answer."""

    def __init__(self, drops: int) -> None:
        super().__init__()
        self.drops = drops
        self.seen: list[tuple[str, int]] = []  # (method, body length) of every request

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        self.seen.append((request.method, len(body)))
        if self.drops:
            self.drops -= 1
            assert request.transport is not None
            request.transport.close()
        return web.Response(text="ok")


async def test_idempotent_requests_are_retried_once_posts_never(make_stack: StackFactory) -> None:
    upstream = DroppingUpstream(drops=1)
    await upstream.start()
    try:
        stack = await make_stack(
            extra_routes=f"""  - name: flaky
    match: {{path_prefix: /flaky/}}
    upstream: {upstream.url}/
    client: demo
"""
        )
        async with stack.http.get(stack.url("/flaky/a")) as response:
            assert response.status == 200
        assert upstream.seen == [("GET", 0), ("GET", 0)]
        upstream.drops = 1
        async with stack.http.post(stack.url("/flaky/b"), data=b"12345") as response:
            assert response.status == 502
            assert (await response.json())["error"] == "upstream_error"
        assert upstream.seen[2:] == [("POST", 5)]  # exactly once
        upstream.drops = 1
        async with stack.http.put(stack.url("/flaky/c"), data=b"123") as response:
            assert response.status == 200
        assert upstream.seen[3:] == [("PUT", 3), ("PUT", 3)]
    finally:
        await upstream.stop()


async def test_apps_that_go_away_cancel_upstream_and_leak_nothing(stack: Stack) -> None:
    assert await status_of(stack) == 200
    baseline = len(asyncio.all_tasks())
    fds = len(os.listdir("/proc/self/fd"))

    async def abort() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
        writer.write(b"GET /demo/slow?delay=5 HTTP/1.1\r\nHost: a\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    for _ in range(5):
        await asyncio.gather(*(abort() for _ in range(40)))
    await asyncio.sleep(0.3)
    assert len(stack.partner.requests) == 201  # each aborted request went up once, none replayed
    assert stack.tokens.mint_count == 1
    assert len(asyncio.all_tasks()) <= baseline + 2
    assert len(os.listdir("/proc/self/fd")) <= fds + 10
    assert await status_of(stack) == 200


_SLOW_GET = "GET /demo/slow?delay=0.6 HTTP/1.1\r\nHost: a\r\n\r\n"
_SLOW_POST = "POST /demo/slow?delay=0.6 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize(
    ("first", "partial"),
    [
        (_SLOW_GET, b"GET /demo/x HTTP/1.1\r\nHo"),
        (_SLOW_GET, b"GE"),
        (_SLOW_GET, b"GET /demo/x HTTP/1.1\r\nHost: a\r\n"),  # a read ending in a line's end
        (_SLOW_POST + "GET /demo/x HTTP/1.1\r\nHost: a\r\n", b""),  # after a body, same read
        (_SLOW_GET + "\r\nGET /demo/x HTTP/1.1\r\n", b""),
        # round 15: blank lines, then a partial head as long as the body
        (_SLOW_POST + "\r\n\r\nGE", b""),
        (
            _SLOW_POST.replace("Length: 2", "Length: 20").replace("ok", "x" * 20)
            + "\r\n\r\nGET /demo/x HTTP/1.1",
            b"",
        ),
        (_SLOW_POST.replace("ok", "\r\n") + "GE", b""),
        # round 16: the head began in an earlier read (the "first" write)
        (
            "POST /demo/slow?delay=0.6 HT",
            b"TP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab\r\n\r\nGE",
        ),
        # round 16: a body that repeats its own head
        (
            _SLOW_POST.replace("Length: 2", "Length: 50").replace(
                "ok", "POST /demo/slow?delay=0.6 HTTP/1.1\r\nA: a\r\nB: b\r\n\r\n"
            )
            + ("GET /demo/x HTTP/1.1\r\nHost: a\r\nX-Pad: " + "y" * 40)[:50],  # as long
            b"",
        ),
    ],
)
async def test_a_head_begun_while_a_request_is_in_flight_is_cut_off_too(
    make_stack: StackFactory, first: str, partial: bytes
) -> None:
    """header_timeout bounds a head whose first bytes came while the request
    before it was in flight, from when that request is answered (round 7,
    F3: it was held until idle_timeout, with no 408), and a head that is
    only a method's first bytes. Also when the read ends a line, or the
    head's bytes follow a body in the same read (round 9, R2: such a head
    waited for idle_timeout)."""
    stack = await make_stack(top="inbound: {header_timeout: 400ms, idle_timeout: 30s}")
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    loop = asyncio.get_running_loop()
    writer.write(first.encode())
    await writer.drain()
    await asyncio.sleep(0.2)  # the first request is at the partner
    writer.write(partial)
    await writer.drain()
    started = loop.time()
    answer = b""
    with contextlib.suppress(OSError):
        answer = await asyncio.wait_for(reader.read(), 5)  # 200, 408, then closed
    closed_after = loop.time() - started
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"request_head_timeout" in answer
    assert closed_after < 2.5  # 0.4 s after the first answer (~0.4 s in), not idle_timeout


@pytest.mark.parametrize(
    "spelling",
    [
        "/x/./admin/users",
        "/x//admin/users",
        "/x/%61dmin/users",
        "/x/admin%2Fusers",
        "/x/y%5C..%5Cadmin/users",
        "/x/;/admin/users",  # round 10 (F1)
        "/x/;a=b/admin/users",
        "/x/y/;/../admin/users",
        "/x/admin",  # round 11: the prefix without its slash (nginx redirects it, Spring serves it)
        "/x/admin;v=1",
        "/x/%61dmin",
    ],
)
async def test_a_guarded_route_cannot_be_reached_through_a_broader_one(
    make_stack: StackFactory, spelling: str
) -> None:
    """Round 7 (F1): ``/x/admin/`` allows 10/8 only; its path spelled so that
    only ``/x/`` matches the raw bytes is refused (400 ambiguous_path), never
    forwarded with the token to a partner that would read it as
    ``/v2/admin/users``."""
    stack = await make_stack(
        extra_routes="""  - name: x-admin
    match: {path_prefix: /x/admin/}
    upstream: {partner}/v2/admin/
    client: demo
    allow_from: [10.0.0.0/8]
  - name: x
    match: {path_prefix: /x/}
    upstream: {partner}/v2/
    client: demo
"""
    )
    assert await status_of(stack, "/x/admin/users") == 403
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(f"GET {spelling} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw_status(answer) == 400, answer
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["error"] == "ambiguous_path" and "x-admin" in body["message"]
    assert stack.partner.requests == [] and stack.tokens.calls == 0
    assert await status_of(stack, "/x/other/./y") == 200  # the same route either way: served


@pytest.mark.parametrize(
    "parts",
    [
        (b"POST /demo/a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok\r\n",),
        (b"POST /demo/a HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n\r\n\r\n\r\n\r\n",),
        (b"GET /demo/a HTTP/1.1\r\nHost: a\r\n\r\n\r\n\r\n",),
        (b"POST /demo/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",),
        # a head's end in reads of its own (review of round 9's fix)
        (b"GET /demo/a HTTP/1.1\r\nHost: a\r\n", b"\r\n"),
        (b"GET /demo/a HTTP/1.1\r\nHost: a\r\n\r", b"\n"),
        (b"POST /demo/a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r", b"\nok"),
        (b"POST /demo/a HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n", b"\r\nok\r\n"),
        # reads of a byte or two (round 14)
        (b"GET /demo/a HTTP/1.1\r\nHost: a\r", b"\n\r", b"\n"),
        (b"GET /demo/a HTTP/1.1\r\nHost: a", b"\r", b"\n", b"\r", b"\n"),
    ],
)
async def test_a_bare_crlf_after_a_body_starts_no_head_timer(
    make_stack: StackFactory, parts: tuple[bytes, ...]
) -> None:
    """RFC 9112 §2.2: a CRLF after a body is no request head; an idle
    connection after it gets no 408 (which an app could read as the answer
    to its next request) and serves the next request. Also when the end of
    a request comes in a read of its own."""
    stack = await make_stack(top="inbound: {header_timeout: 300ms, idle_timeout: 30s}")
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    for index, part in enumerate(parts):
        if index:
            await writer.drain()
            await asyncio.sleep(0.05)  # a read of its own
        writer.write(part)
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert raw_status(first) == 200
    await asyncio.sleep(0.9)  # past header_timeout
    writer.write(b"GET /demo/b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert b"request_head_timeout" not in rest and b"HTTP/1.1 200" in rest, rest[:300]


@pytest.mark.parametrize(
    "ending",
    [
        (b"0\r", b"\n\r\n"),
        (b"0\r\n", b"\r\n"),
        (b"0\r\n\r", b"\n"),
        (b"0\r\nX-T: 1\r\n", b"\r\n"),
        (b"0;ext=1\r\n\r", b"\n"),
        (b"0", b"\r", b"\n", b"\r", b"\n"),
    ],
)
async def test_a_chunked_request_whose_end_spans_reads_keeps_its_connection(
    make_stack: StackFactory, ending: tuple[bytes, ...]
) -> None:
    """Round 14 (F2): a chunked request that ends where a read ends keeps
    the connection (docs/design.md), also when its last CRLFs come in reads
    of their own; it was answered with Connection: close. (A 0.5 s wait
    past header_timeout checks no 408 follows either.)"""
    stack = await make_stack(top="inbound: {header_timeout: 300ms, idle_timeout: 30s}")
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    head = b"POST /demo/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    for part in (head, *ending):
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(0.05)  # a read of its own
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert raw_status(first) == 200 and b"connection: close" not in first.lower(), first
    await asyncio.sleep(0.5)
    writer.write(b"GET /demo/b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert b"request_head_timeout" not in rest and b"HTTP/1.1 200" in rest, rest[:300]
    seen = [(r.method, r.body) for r in stack.partner.requests]
    assert seen == [("POST", b"abc"), ("GET", b"")], seen


async def test_an_empty_line_on_an_idle_connection_starts_no_head_timer(
    make_stack: StackFactory,
) -> None:
    """Round 9 (R1): a CRLF in a read of its own on an idle keep-alive
    connection is no request head (RFC 9112 §2.2): no 408 after
    header_timeout, and the next request is served."""
    stack = await make_stack(top="inbound: {header_timeout: 300ms, idle_timeout: 30s}")
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(b"GET /demo/a HTTP/1.1\r\nHost: a\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert raw_status(first) == 200
    await asyncio.sleep(0.2)
    writer.write(b"\r\n")
    await asyncio.sleep(0.8)  # past header_timeout
    writer.write(b"GET /demo/b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert b"request_head_timeout" not in rest and b"HTTP/1.1 200" in rest, rest[:300]
