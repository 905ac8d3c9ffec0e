"""OpenTelemetry traces (issue 17), end to end: the real proxy exports over
OTLP/HTTP to a local collector on loopback, which decodes each export with
opentelemetry-proto; the partner sees the proxy's traceparent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from conftest import Stack, StackFactory

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

APP_TRACE = "0af7651916cd43dd8448eb211c80319c"
APP_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{APP_TRACE}-{APP_SPAN}-01"


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent: str
    kind: int
    status: int
    attributes: dict[str, Any]


@dataclass
class Collector:
    spans: list[Span] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self.receive)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bodies.append(body)
        export = ExportTraceServiceRequest.FromString(body)
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                for span in scope.spans:
                    attributes = {}
                    for kv in span.attributes:
                        value = kv.value
                        kind = value.WhichOneof("value")
                        attributes[kv.key] = getattr(value, kind) if kind else None
                    self.spans.append(
                        Span(span.name, span.trace_id.hex(), span.span_id.hex(),
                             span.parent_span_id.hex(), span.kind, span.status.code, attributes)
                    )  # fmt: skip
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]


@pytest.fixture
async def collector(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Collector]:
    found = Collector()
    await found.start()
    monkeypatch.setenv(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{found.port}/v1/traces"
    )
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    yield found
    await found.stop()


TRACED = "tracing:\n  enabled: true\n  service_name: authproxy-test"


async def flushed(stack: Stack, collector: Collector) -> None:
    tracing = stack.proxy.tracing
    assert tracing is not None
    await asyncio.to_thread(tracing.provider.force_flush)


def by_id(collector: Collector) -> dict[str, Span]:
    return {s.span_id: s for s in collector.spans}


async def test_a_request_is_one_server_span_with_its_children(
    make_stack: StackFactory, collector: Collector
) -> None:
    stack = await make_stack(top=TRACED)
    async with stack.http.get(stack.url("/demo/orders"), headers={"traceparent": TRACEPARENT}) as r:
        assert r.status == 200
    await flushed(stack, collector)
    (request,) = collector.named("authproxy request")
    assert request.kind == 2  # SERVER
    assert request.trace_id == APP_TRACE and request.parent == APP_SPAN  # joined the app's trace
    assert request.attributes["authproxy.route"] == "demo-orders"
    assert request.attributes["authproxy.client"] == "demo"
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["authproxy.upstream_status"] == 200
    assert request.attributes["authproxy.replayed"] is False
    (wait,) = collector.named("wait for token")
    (mint,) = collector.named("token endpoint")
    (upstream,) = collector.named("upstream")
    (relay,) = collector.named("relay response")
    assert wait.parent == request.span_id and upstream.parent == request.span_id
    assert relay.parent == request.span_id and mint.parent == wait.span_id
    assert mint.attributes["authproxy.outcome"] == "success" and mint.kind == 3  # CLIENT
    assert {s.trace_id for s in collector.spans} == {APP_TRACE}
    # The partner's parent is the proxy's upstream span, in the same trace.
    (seen,) = stack.partner.requests
    fields = dict((n.lower(), v) for n, v in seen.headers)
    assert fields["traceparent"] == f"00-{APP_TRACE}-{upstream.span_id}-01"


async def test_an_expired_token_replay_is_a_second_upstream_child(
    make_stack: StackFactory, collector: Collector
) -> None:
    stack = await make_stack(top=TRACED)
    async with stack.http.get(stack.url("/demo/warm")) as r:
        assert r.status == 200
    stack.partner.expire_all()
    async with stack.http.post(stack.url("/demo/pay"), data=b"amount=5") as r:
        assert r.status == 200
    await flushed(stack, collector)
    requests = collector.named("authproxy request")
    assert len(requests) == 2
    replayed = next(s for s in requests if s.attributes["authproxy.replayed"])
    children = [s for s in collector.spans if s.parent == replayed.span_id]
    attempts = [s for s in children if s.name == "upstream"]
    assert [a.attributes["http.response.status_code"] for a in attempts] == [401, 200]
    assert len(collector.named("token endpoint")) == 2  # the first mint and the re-mint
    assert stack.tokens.calls == 2


async def test_a_mint_failure_is_an_error_span_naming_no_secret(
    make_stack: StackFactory, collector: Collector
) -> None:
    stack = await make_stack(top=TRACED, client="    mint_attempts: 1")
    stack.tokens.mode = "invalid_client"
    async with stack.http.get(
        stack.url("/demo/x"), headers={"Authorization": "Bearer app-secret-1"}
    ) as r:
        assert r.status == 502
    await flushed(stack, collector)
    (request,) = collector.named("authproxy request")
    (mint,) = collector.named("token endpoint")
    assert request.status == 2 and mint.status == 2  # STATUS_CODE_ERROR
    assert request.attributes["error.type"] == "token_endpoint_rejected"
    assert mint.attributes["error.type"] == "TokenEndpointRejected"
    assert stack.partner.requests == []
    text = json.dumps([s.attributes for s in collector.spans]) + repr(collector.bodies)
    for secret in ("demo-secret", "app-secret-1", *stack.tokens.issued):
        assert secret not in text


async def test_no_token_or_authorization_in_any_span(
    make_stack: StackFactory, collector: Collector
) -> None:
    stack = await make_stack(top=TRACED)
    for _ in range(3):
        async with stack.http.get(
            stack.url("/demo/x?key=q-secret"), headers={"Authorization": "Basic YXBwOnB3"}
        ) as r:
            assert r.status == 200
    await flushed(stack, collector)
    assert len(collector.named("authproxy request")) == 3
    raw = b"".join(collector.bodies)
    for secret in (*stack.tokens.issued, "demo-secret", "YXBwOnB3", "q-secret"):
        assert secret.encode() not in raw


async def test_without_tracing_the_apps_trace_fields_pass_untouched(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack()
    assert stack.proxy.tracing is None
    async with stack.http.get(
        stack.url("/demo/x"), headers={"traceparent": TRACEPARENT, "tracestate": "app=1"}
    ) as r:
        assert r.status == 200
    (seen,) = stack.partner.requests
    fields = dict((n.lower(), v) for n, v in seen.headers)
    assert fields["traceparent"] == TRACEPARENT and fields["tracestate"] == "app=1"
