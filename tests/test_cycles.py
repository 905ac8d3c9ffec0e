"""The request paths leave no reference cycles behind (proxy/server.py).

The collector's thresholds in proxy/server.py run the generation-1 pass ten
times less often than Python's default (issue 16: at 1,000 connections that
pass and the full ones took 13 % of the time and found nothing to free).
That is free only while a request's objects die by reference count. Here
every kind of request runs through the real stack with the collector off,
and what a collection then finds unreachable must hold nothing of the
proxy's: its classes, coroutines or frames. A new cycle on a request path
fails this test; break it (or change the thresholds and say why).
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import proxy
from conftest import StackFactory, raw_exchange, raw_status

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


async def test_no_request_leaves_a_cycle_of_the_proxys(make_stack: StackFactory) -> None:
    stack = await make_stack(
        extra_routes="""
  - name: dead
    match: {path_prefix: /dead/}
    upstream: http://127.0.0.1:1/
    client: demo
  - name: impatient
    match: {path_prefix: /impatient/}
    upstream: {partner}/v2/
    client: demo
    timeout: 100ms
"""
    )
    port = stack.proxy.port

    async def every_kind() -> None:
        async with stack.http.get(stack.url("/demo/a")) as r:
            assert r.status == 200
            await r.read()
        async with stack.http.post(stack.url("/demo/b"), data=b"x" * 70_000) as r:
            assert r.status == 200
            await r.read()
        stack.clock.advance(600)  # past the minimum time between two mints
        stack.partner.expire_all()  # an expired-token 401: a mint and a replay
        async with stack.http.post(stack.url("/demo/c"), data=b"y" * 1000) as r:
            assert r.status == 200
            await r.read()
        async with stack.http.get(stack.url("/dead/x")) as r:  # connect refused: 502
            assert r.status == 502
            await r.read()
        async with stack.http.get(stack.url("/impatient/slow?delay=0.5")) as r:
            assert r.status == 504  # the upstream's answer is late
            await r.read()
        cut = b"GET /demo/cut HTTP/1.1\r\nHost: a\r\n\r\n"  # the upstream drops mid-body
        assert raw_status(await raw_exchange(port, cut, timeout=2.0)) == 200
        closing = b"GET /demo/d HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        assert raw_status(await raw_exchange(port, closing)) == 200
        bad = b"GET /demo/%2e%2e/x HTTP/1.1\r\nHost: a\r\n\r\n"
        assert raw_status(await raw_exchange(port, bad)) == 400

    await every_kind()  # first-use objects (pools, caches, lazy imports) made here
    await asyncio.sleep(0.05)
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            await every_kind()
        await asyncio.sleep(0.05)  # closed connections' callbacks run
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found = [obj for obj in gc.garbage if _ours(obj)]
        names = sorted({_name(obj) for obj in found})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not found, f"{len(found)} of the proxy's objects in reference cycles: {names}"
