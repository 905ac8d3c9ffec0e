"""Real processes: workers behind one port, several proxy instances sharing one
Redis, and the token endpoint still seeing one mint per (client, scope)."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import Callable

import aiohttp
import pytest
from fakes import FakePartner, FakeTokenEndpoint

from conftest import ProxyProcess, RedisProcess, eventually, fire

Factory = Callable[[str], ProxyProcess]


def config(
    tokens: FakeTokenEndpoint,
    partner: FakePartner,
    *,
    workers: int = 1,
    redis_url: str | None = None,
    prefix: str = "t",
    lock_ttl: str = "15s",
    token_timeout: str = "10s",  # noqa: S107 - a duration, not a password
) -> str:
    cache = ""
    if redis_url:
        cache = f"cache:\n  backend: redis\n  url: {redis_url}\n  key_prefix: {prefix}\n  lock_ttl: {lock_ttl}\n"
    return f"""
listen: 127.0.0.1:0
workers: {workers}
{cache}
clients:
  demo:
    token_url: {tokens.token_url}
    client_id: demo-client
    client_secret: demo-secret
    timeout: {token_timeout}
routes:
  - match: {{path_prefix: /demo/}}
    upstream: {partner.url}/v2/
    client: demo
"""


async def workers_serving(process: ProxyProcess, count: int) -> None:
    await process.wait_for("listening", count)


async def test_4_workers_x_2_instances_on_one_redis_make_one_mint(
    servers: tuple[FakeTokenEndpoint, FakePartner], redis_url: str, proxy_processes: Factory
) -> None:
    tokens, partner = servers
    prefix = secrets.token_hex(4)
    instances = [
        proxy_processes(config(tokens, partner, workers=4, redis_url=redis_url, prefix=prefix))
        for _ in range(2)
    ]
    for instance in instances:
        await instance.start()
        await workers_serving(instance, 4)
    tokens.delay = 0.5  # a slow mint: every worker piles up on it
    statuses = await fire([i.url for i in instances], 400)
    assert statuses == [200] * 400
    assert tokens.calls == 1 and tokens.mint_count == 1
    assert len(partner.requests) == 400
    assert {r.token for r in partner.requests} == {tokens.issued[0]}

    # The partner declares the token expired while 200 requests are in flight.
    partner.expire_all()
    tokens.delay = 0.3
    statuses = await fire([i.url for i in instances], 200, method="POST")
    assert statuses == [200] * 200
    assert tokens.mint_count == 2  # exactly one more, for 8 processes
    for instance in instances:
        assert await instance.stop() == 0


async def test_4_workers_on_the_memory_backend_share_one_token(
    servers: tuple[FakeTokenEndpoint, FakePartner], proxy_processes: Factory
) -> None:
    tokens, partner = servers
    proxy = proxy_processes(config(tokens, partner, workers=4))
    await proxy.start()
    await workers_serving(proxy, 4)
    tokens.delay = 0.5
    assert await fire([proxy.url], 400) == [200] * 400
    assert tokens.mint_count == 1
    pids = {line.get("pid") for line in proxy.events("listening")}
    assert len(proxy.events("listening")) == 4 and pids
    partner.expire_all()
    assert await fire([proxy.url], 100) == [200] * 100
    assert tokens.mint_count == 2
    assert await proxy.stop() == 0


async def test_killed_lock_holder_blocks_nobody_past_the_lock_ttl(
    servers: tuple[FakeTokenEndpoint, FakePartner], redis_url: str, proxy_processes: Factory
) -> None:
    tokens, partner = servers
    prefix = secrets.token_hex(4)
    text = config(tokens, partner, redis_url=redis_url, prefix=prefix, lock_ttl="2s")
    holder, other = proxy_processes(text), proxy_processes(text)
    await holder.start()
    await other.start()
    tokens.delay = 30  # the holder's mint hangs
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        stuck = asyncio.ensure_future(http.get(holder.url + "/demo/x"))
        await eventually(lambda: tokens.calls >= 1)  # the holder has the lock and is minting
        assert holder.process is not None
        holder.process.send_signal(signal.SIGKILL)
        tokens.delay = 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with http.get(other.url + "/demo/x") as response:
            assert response.status == 200
        waited = loop.time() - started
        with pytest.raises(aiohttp.ClientError):
            await stuck
    assert 0.5 < waited < 5  # waited for the dead holder's lock to lapse, no longer
    assert tokens.calls == 2 and partner.requests[-1].token == tokens.issued[-1]


async def test_redis_outage_mid_traffic_fails_no_request(
    servers: tuple[FakeTokenEndpoint, FakePartner],
    redis_process: RedisProcess,
    proxy_processes: Factory,
) -> None:
    tokens, partner = servers
    tokens.expires_in = 2  # usable for 1 s (margin capped at half): mints keep happening
    proxy = proxy_processes(config(tokens, partner, redis_url=redis_process.url))
    await proxy.start()
    assert await fire([proxy.url], 20) == [200] * 20
    redis_process.stop()
    mints_before = tokens.mint_count
    results: list[int] = []
    for _ in range(8):
        results += await fire([proxy.url], 20)
        await asyncio.sleep(0.4)
    assert results == [200] * 160
    assert tokens.mint_count >= mints_before + 2  # it kept minting, through the fallback
    await proxy.wait_for("cache_backend_down")
    redis_process.start()
    results = []
    for _ in range(8):
        results += await fire([proxy.url], 20)
        await asyncio.sleep(0.4)
    assert results == [200] * 160
    await proxy.wait_for("cache_backend_up")
    assert len(proxy.events("cache_backend_down")) == 1  # one warning for the outage
    assert await proxy.stop() == 0


async def test_a_killed_worker_is_restarted_and_the_port_keeps_answering(
    servers: tuple[FakeTokenEndpoint, FakePartner], proxy_processes: Factory
) -> None:
    tokens, partner = servers
    proxy = proxy_processes(config(tokens, partner, workers=2))
    await proxy.start()
    await workers_serving(proxy, 2)
    victim = proxy.events("supervisor_listening")[0]["pids"][0]
    os.kill(victim, signal.SIGKILL)
    # Connections the kernel had already queued on the dying worker's socket are reset with
    # it (SO_REUSEPORT gives each worker its own accept queue); once it is gone, every new
    # connection lands on a live worker.
    await proxy.wait_for("worker_exited")
    answered = await fire([proxy.url], 50)
    assert answered == [200] * 50  # the surviving worker kept the port
    await proxy.wait_for("worker_restarted")
    await workers_serving(proxy, 3)  # the replacement is listening too
    assert proxy.events("worker_exited")[0]["pid"] == victim
    assert await fire([proxy.url], 50) == [200] * 50
    assert tokens.mint_count == 1
    assert await proxy.stop() == 0


async def test_an_expiry_learned_by_one_instance_reaches_the_others(
    servers: tuple[FakeTokenEndpoint, FakePartner], redis_url: str, proxy_processes: Factory
) -> None:
    tokens, partner = servers
    prefix = secrets.token_hex(4)
    one, two = (
        proxy_processes(config(tokens, partner, redis_url=redis_url, prefix=prefix))
        for _ in range(2)
    )
    for instance in (one, two):
        await instance.start()
    assert await fire([one.url, two.url], 20) == [200] * 20
    assert len(tokens.issued) == 1
    partner.expire_all()
    assert await fire([one.url], 1) == [200]  # one instance meets the 401 and replays
    assert tokens.mint_count == 2
    await asyncio.sleep(2.5)  # past SHARED_RECHECK: the other instance has looked again
    seen = len(partner.requests)
    assert await fire([two.url], 20) == [200] * 20
    later = partner.requests[seen:]
    assert [r.token for r in later] == [tokens.issued[1]] * 20, [
        (line["event"], line.get("route"), line.get("status")) for line in two.lines[-30:]
    ]  # never the expired one again
    assert tokens.mint_count == 2
    for instance in (one, two):
        assert await instance.stop() == 0


async def test_a_drop_reaches_every_worker_and_instance_and_mints_once(
    servers: tuple[FakeTokenEndpoint, FakePartner], redis_url: str, proxy_processes: Factory
) -> None:
    """issue 13: POST /tokens/CLIENT/drop on one worker of one instance
    discards the client's token in the shared cache and, within a second (the
    shared-cache watcher), in every worker of every instance; the next burst
    makes exactly one mint, shared by all."""
    tokens, partner = servers
    prefix = secrets.token_hex(4)
    text = config(tokens, partner, workers=2, redis_url=redis_url, prefix=prefix)
    text = text.replace("workers: 2\n", "workers: 2\nadmin: 127.0.0.1:0\n")
    instances = [proxy_processes(text) for _ in range(2)]
    for instance in instances:
        await instance.start()
        await workers_serving(instance, 2)
    assert await fire([i.url for i in instances], 100) == [200] * 100
    assert tokens.mint_count == 1
    async with aiohttp.ClientSession() as http:
        async with http.post(instances[0].admin_url + "/tokens/demo/drop") as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["client"] == "demo"
    await asyncio.sleep(1.5)  # every worker's shared-cache watcher has looked
    before = len(partner.requests)
    tokens.delay = 0.3
    assert await fire([i.url for i in instances], 100) == [200] * 100
    assert tokens.mint_count == 2  # one mint for 4 processes
    assert {r.token for r in partner.requests[before:]} == {tokens.issued[1]}
    for instance in instances:
        assert await instance.stop() == 0
