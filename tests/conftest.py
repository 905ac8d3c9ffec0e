"""Shared fixtures: the real proxy between a real local token endpoint and a
real local partner API, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from proxy.config import Config, parse_config
from proxy.fakes import FakePartner, FakeTokenEndpoint
from proxy.log import configure_logging
from proxy.server import ProxyServer


class FakeClock:
    """Wall-clock seconds that only move when a test says so."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def log_stream() -> io.StringIO:
    """Everything structlog writes during the test, one JSON object a line."""
    stream = io.StringIO()
    configure_logging("debug", stream)
    return stream


def log_events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


@dataclass
class Stack:
    tokens: FakeTokenEndpoint
    partner: FakePartner
    proxy: ProxyServer
    http: aiohttp.ClientSession
    clock: FakeClock
    config: Config

    def url(self, path: str) -> str:
        return f"{self.proxy.url}{path}"


StackFactory = Callable[..., Awaitable[Stack]]


def stack_yaml(
    tokens: FakeTokenEndpoint,
    partner: FakePartner,
    *,
    client: str = "",
    route: str = "",
    extra_routes: str = "",
    top: str = "",
) -> str:
    return f"""
listen: 127.0.0.1:0
{top}
clients:
  demo:
    token_url: {tokens.token_url}
    client_id: demo-client
    client_secret: demo-secret
    scope: orders.read
{client}
routes:
  - name: demo-orders
    match: {{path_prefix: /demo/}}
    upstream: {partner.url}/v2/
    client: demo
{route}
{extra_routes.replace("{partner}", partner.url)}
"""


@pytest.fixture
async def make_stack(clock: FakeClock, log_stream: io.StringIO) -> AsyncIterator[StackFactory]:
    started: list[Stack] = []
    servers: list[FakePartner | FakeTokenEndpoint] = []

    async def factory(**yaml_parts: str) -> Stack:
        tokens = FakeTokenEndpoint()
        await tokens.start()
        partner = FakePartner(tokens)
        await partner.start()
        servers.extend([partner, tokens])
        config = parse_config(stack_yaml(tokens, partner, **yaml_parts), "test.yaml")
        proxy = ProxyServer(config, clock=clock)
        await proxy.start()
        http = aiohttp.ClientSession(auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
        stack = Stack(tokens, partner, proxy, http, clock, config)
        started.append(stack)
        return stack

    yield factory
    for stack in started:
        await stack.http.close()
        await stack.proxy.stop()
    for server in servers:
        await server.stop()


@pytest.fixture
async def stack(make_stack: StackFactory) -> Stack:
    return await make_stack()


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port and read until the server closes or
    ``timeout`` passes; for requests no HTTP client would write."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                break
        return b"".join(chunks)
    finally:
        writer.close()
        await writer.wait_closed()


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return head.lower().find(b"transfer-encoding: chunked") == -1 or body.endswith(b"0\r\n\r\n")


def raw_status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])
