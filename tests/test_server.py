"""The proxy as a real process: draining stop, reload and metrics across workers."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from fakes import FakePartner, FakeTokenEndpoint

from conftest import ProxyProcess, eventually, fire, samples, value
from proxy.metrics import FOLD_DELAY

Factory = Callable[[str], ProxyProcess]


def config(tokens: FakeTokenEndpoint, partner: FakePartner, *, workers: int = 1) -> str:
    return f"""
listen: 127.0.0.1:0
admin: 127.0.0.1:0
workers: {workers}
shutdown_grace: 10s
clients:
  demo:
    token_url: {tokens.token_url}
    client_id: demo-client
    client_secret: demo-secret
routes:
  - name: demo
    match: {{path_prefix: /demo/}}
    upstream: {partner.url}/v2/
    client: demo
"""


NEW_ROUTE = """
  - name: added
    match: {{path_prefix: /added/}}
    upstream: {partner}/v3/
    client: demo
"""


async def admin_get(proxy: ProxyProcess, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        async with http.get(proxy.admin_url + path) as response:
            return response.status, await response.text()


async def test_sigterm_drains_a_long_stream_then_exits_0(
    servers: tuple[FakeTokenEndpoint, FakePartner], proxy_processes: Factory
) -> None:
    tokens, partner = servers
    proxy = proxy_processes(config(tokens, partner))
    await proxy.start()
    assert (await admin_get(proxy, "/readyz"))[0] == 200
    assert proxy.process is not None
    expected = b"".join(f"chunk-{i}\n".encode() for i in range(15))
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url + "/demo/stream?n=15&delay=0.2") as streaming:  # 3 s
            assert streaming.status == 200
            first = await streaming.content.readline()
            proxy.process.send_signal(signal.SIGTERM)
            await proxy.wait_for("draining")
            status, body = await admin_get(proxy, "/readyz")
            assert status == 503 and "draining" in body
            with pytest.raises(aiohttp.ClientConnectorError):  # no new connections
                async with http.get(proxy.url + "/demo/x"):
                    pass
            rest = await streaming.read()
    assert first + rest == expected
    assert await proxy.stop() == 0
    assert proxy.events("stopped")


def built_here() -> list[str]:
    """The modules compiled in this checkout (setup.py build_ext --inplace)."""
    checkout = Path(__file__).resolve().parent.parent
    return sorted(
        ".".join(path.relative_to(checkout).with_suffix("").with_suffix("").parts)
        for path in (checkout / "proxy").rglob("*.so")
        if "__mypyc" not in path.name  # the build's shared runtime
    )


async def test_the_listening_line_names_the_modules_that_run_compiled(
    servers: tuple[FakeTokenEndpoint, FakePartner], proxy_processes: Factory
) -> None:
    # .ci/run runs the suite twice: pure Python, then with setup.py's build in place
    tokens, partner = servers
    proxy = proxy_processes(config(tokens, partner))
    await proxy.start()
    await proxy.wait_for("listening")
    (line,) = proxy.events("listening")
    assert line["compiled"] == built_here()


async def test_metrics_are_the_sum_of_all_workers(
    servers: tuple[FakeTokenEndpoint, FakePartner], proxy_processes: Factory
) -> None:
    tokens, partner = servers
    proxy = proxy_processes(config(tokens, partner, workers=2))
    await proxy.start()
    await proxy.wait_for("listening", 2)
    assert await fire([proxy.url], 40) == [200] * 40
    served_by = {line["pid"] for line in proxy.lines if line.get("event") == "access"}
    assert len(served_by) == 2  # the kernel spread the connections over both workers
    # A worker folds its request counts into the shared files within
    # FOLD_DELAY of them (proxy/metrics.py); a scrape on the other one sees them then.
    await asyncio.sleep(FOLD_DELAY + 0.2)
    for _ in range(4):  # each scrape may land on either worker: all see the sum
        status, text = await admin_get(proxy, "/metrics")
        assert status == 200
        m = samples(text)
        assert value(m, "authproxy_requests_total", route="demo", status="200") == 40
        assert value(m, "authproxy_token_mints_total", client="demo", outcome="success") == 1
        assert value(m, "authproxy_inflight_requests") == 0
    # A worker that dies keeps its counts in the sum; its replacement adds to them.
    victim = proxy.events("supervisor_listening")[0]["pids"][0]
    os.kill(victim, signal.SIGKILL)
    await proxy.wait_for("worker_restarted")
    await proxy.wait_for("listening", 3)
    assert await fire([proxy.url], 10) == [200] * 10
    await asyncio.sleep(FOLD_DELAY + 0.2)
    m = samples((await admin_get(proxy, "/metrics"))[1])
    assert value(m, "authproxy_requests_total", route="demo", status="200") == 50
    assert tokens.mint_count == 1
    assert await proxy.stop() == 0


async def test_every_worker_reloads_on_sighup_and_on_post_reload(
    servers: tuple[FakeTokenEndpoint, FakePartner], proxy_processes: Factory
) -> None:
    tokens, partner = servers
    proxy = proxy_processes(config(tokens, partner, workers=2))
    await proxy.start()
    await proxy.wait_for("listening", 2)
    assert await fire([proxy.url], 10) == [200] * 10
    assert proxy.process is not None
    proxy.config.write_text(proxy.config.read_text() + NEW_ROUTE.format(partner=partner.url))
    proxy.process.send_signal(signal.SIGHUP)
    await proxy.wait_for("reloaded", 2)
    assert await fire([proxy.url], 20, path="/added/x") == [200] * 20
    assert {line["pid"] for line in proxy.events("reloaded")} == set(
        proxy.events("supervisor_listening")[0]["pids"]
    )
    # An invalid file: POST /reload says why, and nobody reloads.
    good = proxy.config.read_text()
    proxy.config.write_text(good.replace("client: demo\n", "client: ghost\n", 1))
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.admin_url + "/reload") as response:
            assert response.status == 400
            assert "no client named 'ghost'" in (await response.json())["message"]
        await asyncio.sleep(0.5)
        assert len(proxy.events("reloaded")) == 2
        # A valid one through POST /reload reloads every worker too.
        proxy.config.write_text(good)
        async with http.post(proxy.admin_url + "/reload") as response:
            assert response.status == 200
    await proxy.wait_for("reloaded", 4)
    assert await fire([proxy.url], 10, path="/added/y") == [200] * 10
    assert tokens.mint_count == 1  # reloads kept the token
    assert await proxy.stop() == 0


async def test_workers_drain_on_sigterm(
    servers: tuple[FakeTokenEndpoint, FakePartner], proxy_processes: Factory
) -> None:
    tokens, partner = servers
    proxy = proxy_processes(config(tokens, partner, workers=2))
    await proxy.start()
    await proxy.wait_for("listening", 2)
    assert proxy.process is not None
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url + "/demo/stream?n=10&delay=0.2") as streaming:
            first = await streaming.content.readline()
            proxy.process.send_signal(signal.SIGTERM)
            await eventually(lambda: len(proxy.events("draining")) == 2)
            rest = await streaming.read()
    assert first + rest == b"".join(f"chunk-{i}\n".encode() for i in range(10))
    assert await proxy.stop() == 0
    assert proxy.events("supervisor_stopped")
