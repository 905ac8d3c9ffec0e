"""A highly available shared cache (issue 17), with real servers on
loopback: a Sentinel-managed primary killed mid-traffic, and a Redis
Cluster whose slot moves mid-traffic. Traffic comes from two proxy
instances of two workers each; every app request must succeed, and the
token endpoint sees at most one extra mint per failover."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakePartner, FakeTokenEndpoint
from redis_sets import ClusterSet, SentinelSet
from test_workers import config, workers_serving

from conftest import ProxyProcess, fire
from proxy.tokens.cache import cache_key, key_digest

Factory = Callable[[str], ProxyProcess]


def ha_config(tokens: FakeTokenEndpoint, partner: FakePartner, url: str, cluster: bool) -> str:
    text = config(tokens, partner, workers=2, redis_url=url, prefix="ha")
    return (
        text.replace("  lock_ttl: 15s\n", "  lock_ttl: 15s\n  cluster: true\n") if cluster else text
    )


async def two_by_two(proxy_processes: Factory, text: str) -> list[ProxyProcess]:
    """Two proxy instances of two workers each, all serving."""
    instances = [proxy_processes(text) for _ in range(2)]
    for instance in instances:
        await instance.start()
        await workers_serving(instance, 2)
    return instances


async def traffic(urls: list[str], seconds: float, during: Any) -> list[int]:
    """Waves of 20 requests spread over ``urls`` for ``seconds``; ``during``
    runs in a thread after the first waves (the fault)."""
    statuses: list[int] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    fault: asyncio.Future[Any] | None = None
    while loop.time() < end:
        statuses += await fire(urls, 20)
        if fault is None and len(statuses) >= 60:
            fault = loop.run_in_executor(None, during)
        await asyncio.sleep(0.05)
    if fault is not None:
        await fault
    return statuses


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    found = SentinelSet(tmp_path / "sentinel")
    found.start()
    yield found
    found.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterSet]:
    found = ClusterSet(tmp_path / "cluster")
    found.start()
    yield found
    found.stop()


async def test_a_sentinel_failover_costs_no_request_and_no_mint_storm(
    servers: tuple[FakeTokenEndpoint, FakePartner],
    sentinels: SentinelSet,
    proxy_processes: Factory,
) -> None:
    tokens, partner = servers
    instances = await two_by_two(proxy_processes, ha_config(tokens, partner, sentinels.url, False))
    urls = [instance.url for instance in instances]

    def fail_over() -> None:
        sentinels.kill_primary()
        sentinels.wait_failover()

    statuses = await traffic(urls, 12.0, fail_over)
    assert statuses == [200] * len(statuses) and len(statuses) >= 200
    assert sentinels.primary_port() == sentinels.replica.port  # the replica was promoted
    assert tokens.mint_count <= 2  # the first mint, and at most one more for the failover
    for instance in instances:
        downs = instance.events("cache_backend_down")
        ups = instance.events("cache_backend_up")
        assert len(downs) <= 2 and len(ups) == len(downs)  # one warning per worker, and back
    # Back on the new primary by themselves: new traffic, no new mint.
    mints = tokens.mint_count
    assert await fire(urls, 40) == [200] * 40
    assert tokens.mint_count == mints


async def test_a_cluster_slot_migration_mid_traffic_costs_no_request(
    servers: tuple[FakeTokenEndpoint, FakePartner],
    cluster: ClusterSet,
    proxy_processes: Factory,
) -> None:
    tokens, partner = servers
    instances = await two_by_two(proxy_processes, ha_config(tokens, partner, cluster.url, True))
    urls = [instance.url for instance in instances]
    assert await fire(urls, 400) == [200] * 400  # 400 concurrent, 4 workers: one token
    assert tokens.mint_count == 1
    # The token's key, as the cache names it (the client's fingerprint is the proxy's).
    keys = [k for k in _cluster_keys(cluster) if k.startswith("ha:token:")]
    assert len(keys) == 1
    source = cluster.node_of(keys[0])
    target = next(n for n in cluster.nodes if n is not source)

    statuses = await traffic(urls, 6.0, lambda: cluster.migrate_slot(keys[0], target))
    assert statuses == [200] * len(statuses)
    assert cluster.node_of(keys[0]) is target
    assert tokens.mint_count == 1  # the token moved with its slot


def _cluster_keys(cluster: ClusterSet) -> list[str]:
    from redis_sets import _cli

    found: list[str] = []
    for node in cluster.nodes:
        found += _cli(node.port, "KEYS", "*").split()
    return found


def test_the_token_and_its_lock_share_a_slot() -> None:
    from redis.crc import key_slot

    from proxy.tokens.redis_cache import RedisTokenCache

    cache = RedisTokenCache("redis://127.0.0.1:9/0", key_prefix="ha")
    key = cache_key("demo", None, "fingerprint")
    token, lock = cache._token_key(key), cache._lock_key(key)
    assert key_digest(key) in token and token != lock
    assert key_slot(token.encode()) == key_slot(lock.encode())
