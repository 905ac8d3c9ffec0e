"""Shared fixtures: the real proxy between a real local token endpoint and a
real local partner API, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes import FakePartner, FakeTokenEndpoint
from prometheus_client.parser import text_string_to_metric_families

from proxy.config.load import load_config, parse_config
from proxy.config.model import Config
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
    secret: str = "demo-secret",  # noqa: S107 - the fakes' test secret
    secret_file: str = "",
) -> str:
    credential = f"client_secret_file: {secret_file}" if secret_file else f"client_secret: {secret}"
    return f"""
listen: 127.0.0.1:0
{top}
clients:
  demo:
    token_url: {tokens.token_url}
    client_id: demo-client
    {credential}
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

    async def factory(
        path: Path | None = None,
        tls_tokens: Any = None,
        tls_partner: Any = None,
        **yaml_parts: str,
    ) -> Stack:
        """A running stack; with ``path`` the config is written there and loaded
        from the file (so that reloads can re-read it); ``tls_tokens`` and
        ``tls_partner`` are server SSL contexts that make the fakes HTTPS."""
        tokens = FakeTokenEndpoint()
        tokens.ssl_context = tls_tokens
        await tokens.start()
        partner = FakePartner(tokens)
        partner.ssl_context = tls_partner
        await partner.start()
        servers.extend([partner, tokens])
        text = stack_yaml(tokens, partner, **yaml_parts)
        if path is not None:
            path.write_text(text)  # noqa: ASYNC240 - a small test file
            config = load_config(str(path))
        else:
            config = parse_config(text, "test.yaml")
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


def write_private_key(path: Path, key: Any) -> None:
    """A test key as unencrypted PKCS#8 PEM, readable by its owner only."""
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until `condition()` holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)


def raw_status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


# --------------------------------------------------------------------- Redis


class RedisProcess:
    """A private redis-server on a free loopback port, stoppable and restartable."""

    def __init__(self, binary: str, directory: str, *extra: str) -> None:
        self.binary = binary
        self.directory = directory
        self.extra = extra
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(  # noqa: S603 - our own fixed argv
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("AUTHPROXY_REQUIRE_REDIS"):
            pytest.fail("redis-server is required here (AUTHPROXY_REQUIRE_REDIS) but not installed")
        pytest.skip("no redis-server binary on this machine (apt-get install redis-server)")
    return binary


@pytest.fixture
def redis_process(tmp_path: Any) -> Iterator[RedisProcess]:
    server = RedisProcess(redis_binary(), str(tmp_path))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(tmp_path: Any) -> Iterator[str]:
    """The CI-started Redis when there is one (AUTHPROXY_TEST_REDIS_URL), else a private one."""
    shared = os.environ.get("AUTHPROXY_TEST_REDIS_URL")
    if shared:
        yield shared
        return
    server = RedisProcess(redis_binary(), str(tmp_path))
    server.start()
    yield server.url
    server.stop()


# ------------------------------------------------------ proxies as processes


@pytest.fixture
async def servers() -> AsyncIterator[tuple[FakeTokenEndpoint, FakePartner]]:
    """A fake token endpoint and partner in this process, for proxies run as processes."""
    tokens = FakeTokenEndpoint()
    await tokens.start()
    partner = FakePartner(tokens)
    await partner.start()
    yield tokens, partner
    await partner.stop()
    await tokens.stop()


ROOT = Path(__file__).resolve().parent.parent


class ProxyProcess:
    """``python -m proxy serve`` as a child process; its JSON log lines are collected."""

    def __init__(self, config_text: str, directory: Path, name: str) -> None:
        self.config = directory / f"{name}.yaml"
        self.config.write_text(config_text)
        self.process: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self.port = 0
        self._reader: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    async def start(self, *extra: str) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--config",
            str(self.config),
            *extra,
            cwd=ROOT,
            stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read())
        await asyncio.wait_for(self._listening.wait(), 30)

    async def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        while raw := await self.process.stderr.readline():
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"event": "non_json", "text": raw.decode(errors="replace")}
            self.lines.append(line)
            if line.get("event") in ("supervisor_listening", "listening") and not self.port:
                self.port = int(line["port"])
                self._listening.set()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    async def wait_for(self, name: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events(name)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} x {name!r} in {self.lines[-20:]}")
            await asyncio.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        first = next(line for line in self.lines if line.get("admin_port"))
        return f"http://127.0.0.1:{first['admin_port']}"

    async def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.returncode is None:
            if not self.events("shutting_down") and not self.events("supervisor_stopping"):
                self.process.send_signal(signal.SIGTERM)  # else: already draining, just wait
            try:
                await asyncio.wait_for(self.process.wait(), 40)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 10)
        return self.process.returncode or 0


@pytest.fixture
async def proxy_processes(tmp_path: Path) -> AsyncIterator[Callable[[str], ProxyProcess]]:
    made: list[ProxyProcess] = []

    def factory(config_text: str) -> ProxyProcess:
        process = ProxyProcess(config_text, tmp_path, f"proxy{len(made)}")
        made.append(process)
        return process

    yield factory
    for process in made:
        await process.stop()


# ------------------------------------------------------------ shared helpers


async def fire(
    urls: list[str], count: int, path: str = "/demo/x", method: str = "GET"
) -> list[int]:
    connector = aiohttp.TCPConnector(
        limit=0, force_close=True
    )  # new connections: spread by the kernel
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(i: int) -> int:
            async with http.request(
                method, urls[i % len(urls)] + path, data=b"body" if method == "POST" else None
            ) as r:
                await r.read()
                return r.status

        return list(await asyncio.gather(*(one(i) for i in range(count))))


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a scrape, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(scrape: Samples, name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="session")
def sentinel_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A primary, a replica and three sentinels, for the whole session (a
    test that kills the primary makes its own: tests/tokens/test_failover.py)."""
    from redis_sets import SentinelSet

    found = SentinelSet(tmp_path_factory.mktemp("sentinel"))
    found.start()
    yield found
    found.stop()


@pytest.fixture(scope="session")
def cluster_set(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Three Redis Cluster primaries, for the whole session."""
    from redis_sets import ClusterSet

    found = ClusterSet(tmp_path_factory.mktemp("cluster"))
    found.start()
    yield found
    found.stop()
