"""The request paths leave no reference cycles behind (proxy/server.py).

proxy/server.py runs the collector's middle-generation pass ten times less
often than Python's default, and the full pass with it (issue 16: at 1,000
connections those passes took 12 % of the time and found nothing to free).
That is free only while a request's objects die by reference count. Here
each kind of request, failures included, runs through the real stack with
the collector off, and what a collection then finds unreachable must hold
nothing of the proxy's: its classes, coroutines or frames. A new cycle on a
request path fails this test; break it (errors.untraced() for an exception
kept to be raised again) or change the thresholds and say why. The pure
build is the one that guards: compiled functions have no frames to hold.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import proxy
from conftest import Stack, StackFactory, raw_exchange, raw_status, stack_yaml
from proxy.config.load import parse_config

PACKAGE = str(Path(proxy.__file__).parent)


def _ours(obj: Any) -> bool:
    code = getattr(obj, "f_code", None) or getattr(obj, "cr_code", None)
    if code is not None:
        return str(code.co_filename).startswith(PACKAGE)
    return str(type(obj).__module__).startswith("proxy")


def _name(obj: Any) -> str:
    code = getattr(obj, "f_code", None) or getattr(obj, "cr_code", None)
    if code is None:
        return type(obj).__qualname__
    return f"{Path(code.co_filename).name}:{code.co_name} (line {getattr(obj, 'f_lineno', '?')})"


ROUTES = """
  - name: dead
    match: {path_prefix: /dead/}
    upstream: http://127.0.0.1:1/
    client: demo
  - name: impatient
    match: {path_prefix: /impatient/}
    upstream: {partner}/v2/
    client: demo
    timeout: 100ms
  - name: garbled
    match: {path_prefix: /garbled/}
    upstream: http://127.0.0.1:GARBLER/
    client: demo
"""
FAILING_ROUTE = """
  - name: failing-tokens
    match: {path_prefix: /failing/}
    upstream: {partner}/v2/
    client: failing
"""
FAILING_CLIENT = """
  failing:
    token_url: TOKENS
    client_id: demo-client
    client_secret: demo-secret
    scope: other.scope
"""


async def _get(stack: Stack, path: str, status: int) -> None:
    async with stack.http.get(stack.url(path)) as r:
        assert r.status == status
        await r.read()


async def _hang_up(port: int, data: bytes, after: float) -> None:
    """Send ``data`` and close the connection ``after`` seconds later."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    await asyncio.sleep(after)
    writer.close()
    await writer.wait_closed()


async def _get_ok(stack: Stack) -> None:
    await _get(stack, "/demo/a", 200)


async def _post(stack: Stack) -> None:
    async with stack.http.post(stack.url("/demo/b"), data=b"x" * 70_000) as r:
        assert r.status == 200
        await r.read()


async def _replay(stack: Stack) -> None:
    stack.clock.advance(600)  # past the minimum time between two mints
    stack.partner.expire_all()  # an expired-token 401: a mint and a replay
    async with stack.http.post(stack.url("/demo/c"), data=b"y" * 1000) as r:
        assert r.status == 200
        await r.read()


async def _refused(stack: Stack) -> None:
    await _get(stack, "/dead/x", 502)


async def _late_head(stack: Stack) -> None:
    await _get(stack, "/impatient/slow?delay=0.5", 504)


async def _late_body(stack: Stack) -> None:
    # The head comes at once, the body's next chunk after the route's timeout.
    request = b"GET /impatient/stream?n=3&delay=0.5 HTTP/1.1\r\nHost: a\r\n\r\n"
    assert raw_status(await raw_exchange(stack.proxy.port, request, timeout=2.0)) == 200


async def _cut_body(stack: Stack) -> None:
    request = b"GET /demo/cut HTTP/1.1\r\nHost: a\r\n\r\n"  # the upstream drops mid-body
    assert raw_status(await raw_exchange(stack.proxy.port, request, timeout=2.0)) == 200


async def _garbled(stack: Stack) -> None:
    await _get(stack, "/garbled/x", 502)  # a status line that is no status line


async def _upload_abandoned(stack: Stack) -> None:
    head = b"POST /demo/up HTTP/1.1\r\nHost: a\r\nContent-Length: 200000\r\n\r\n"
    await _hang_up(stack.proxy.port, head + b"z" * 100_000, after=0.1)


async def _app_gone(stack: Stack) -> None:
    request = b"GET /demo/slow?delay=0.3 HTTP/1.1\r\nHost: a\r\n\r\n"
    await _hang_up(stack.proxy.port, request, after=0.05)
    await asyncio.sleep(0.4)  # the answer comes to a closed connection


async def _mint_fails(stack: Stack) -> None:
    stack.clock.advance(600)  # past any cool-down
    stack.tokens.mode = "server_error"
    try:
        async with stack.http.get(stack.url("/failing/x")) as r:
            assert r.status >= 500
            await r.read()
    finally:
        stack.tokens.mode = "ok"


async def _closing(stack: Stack) -> None:
    request = b"GET /demo/d HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    assert raw_status(await raw_exchange(stack.proxy.port, request)) == 200


async def _refused_target(stack: Stack) -> None:
    request = b"GET /demo/%2e%2e/x HTTP/1.1\r\nHost: a\r\n\r\n"
    assert raw_status(await raw_exchange(stack.proxy.port, request)) == 400


KINDS: dict[str, Callable[[Stack], Awaitable[None]]] = {
    "get": _get_ok,
    "post": _post,
    "expired-token replay": _replay,
    "refused upstream (502)": _refused,
    "late head (504)": _late_head,
    "late body": _late_body,
    "body cut by the upstream": _cut_body,
    "garbled answer (502)": _garbled,
    "upload abandoned by the app": _upload_abandoned,
    "app gone before the answer": _app_gone,
    "token endpoint fails": _mint_fails,
    "Connection: close": _closing,
    "refused target (400)": _refused_target,
}


@pytest.mark.parametrize("kind", list(KINDS))
async def test_no_request_leaves_a_cycle_of_the_proxys(make_stack: StackFactory, kind: str) -> None:
    async def garble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 2x0 Nope\r\n\r\n")
        await writer.drain()
        writer.close()

    garbler = await asyncio.start_server(garble, "127.0.0.1", 0)
    garbler_port = garbler.sockets[0].getsockname()[1]
    try:
        await _no_cycles(make_stack, KINDS[kind], garbler_port)
    finally:
        garbler.close()
        await garbler.wait_closed()


async def _no_cycles(
    make_stack: StackFactory, run: Callable[[Stack], Awaitable[None]], garbler_port: int
) -> None:
    routes = ROUTES.replace("GARBLER", str(garbler_port))
    stack = await make_stack(extra_routes=routes)
    # A second client on the same token endpoint, whose URL is known only now.
    client = FAILING_CLIENT.replace("TOKENS", stack.tokens.token_url)
    text = stack_yaml(
        stack.tokens, stack.partner, client=client, extra_routes=routes + FAILING_ROUTE
    )
    assert stack.proxy.reload(parse_config(text, "test.yaml")).ok
    await run(stack)  # first-use objects (pools, caches, lazy imports) made here
    await asyncio.sleep(0.05)
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            await run(stack)
        await asyncio.sleep(0.1)  # closed connections' callbacks run
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found = [obj for obj in gc.garbage if _ours(obj)]
        names = sorted({_name(obj) for obj in found})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not found, f"{len(found)} of the proxy's objects in reference cycles: {names}"
