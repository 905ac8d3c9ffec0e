"""proxy/metrics.py: per-request counts are plain integers folded into
prometheus_client before a scrape and within FOLD_DELAY of being taken."""

from __future__ import annotations

import asyncio
import sys

from conftest import Stack
from proxy.metrics import FOLD_DELAY, Metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_a_scrape_sees_every_count_taken_before_it() -> None:
    metrics = Metrics()
    route = metrics.for_route("orders")
    client = metrics.for_client("acme")
    for status in (200, 200, 502):
        route.finished(status, 0.01)
    client.hit()
    metrics.inflight_count = 3
    text = metrics.render().decode()
    assert 'authproxy_requests_total{route="orders",status="200"} 2.0' in text
    assert 'authproxy_requests_total{route="orders",status="502"} 1.0' in text
    assert 'authproxy_token_cache_total{client="acme",result="hit"} 1.0' in text
    assert "authproxy_inflight_requests 3.0" in text
    # folded once: a second scrape does not count them again
    assert 'authproxy_requests_total{route="orders",status="200"} 2.0' in metrics.render().decode()


async def test_counts_reach_prometheus_client_within_the_fold_delay_without_a_scrape() -> None:
    # With several workers another worker's scrape reads this one's files: the
    # counts must get there by themselves.
    metrics = Metrics()
    route = metrics.for_route("orders")
    client = metrics.for_client("acme")
    route.finished(200, 0.01)
    client.hit()
    await asyncio.sleep(FOLD_DELAY + 0.1)
    assert sample(metrics, "authproxy_requests_total", route="orders", status="200") == 1
    assert sample(metrics, "authproxy_token_cache_total", client="acme", result="hit") == 1
    route.finished(200, 0.01)  # a fold is scheduled again after one ran
    await asyncio.sleep(FOLD_DELAY + 0.1)
    assert sample(metrics, "authproxy_requests_total", route="orders", status="200") == 2


def test_counts_taken_outside_an_event_loop_are_folded_at_once() -> None:
    metrics = Metrics()
    metrics.for_route("orders").finished(404, 0.01)
    assert sample(metrics, "authproxy_requests_total", route="orders", status="404") == 1


def test_a_reload_neither_loses_counts_nor_keeps_old_route_tables_alive() -> None:
    # A reload builds new RouteMetrics; a request still on the old table
    # counts into the same label set, and the old object can be freed.
    metrics = Metrics()
    old = metrics.for_route("orders")
    new = metrics.for_route("orders")
    old.finished(200, 0.01)
    new.finished(200, 0.01)
    # nothing but this local holds the old one (compiled classes take no weakref)
    assert sys.getrefcount(old) == 2  # the local and getrefcount's argument
    assert 'authproxy_requests_total{route="orders",status="200"} 2.0' in metrics.render().decode()


async def test_a_graceful_stop_folds_the_last_counts(stack: Stack) -> None:
    # With several workers the files outlive the worker: what it counted in
    # its last FOLD_DELAY must be in them when it stops, without a scrape.
    async with stack.http.get(stack.url("/demo/orders")) as response:
        assert response.status == 200
    await stack.proxy.stop()
    registry = stack.proxy.metrics.registry
    labels = {"route": "demo-orders", "status": "200"}
    assert registry.get_sample_value("authproxy_requests_total", labels) == 1
