"""The admin listener, against the real proxy between the fake token endpoint and
partner: exact metric values after a scripted run, /tokens without tokens,
readiness, live reload (routes added under a stream in flight, invalid files,
credentials changed)."""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path

import aiohttp

from conftest import Stack, StackFactory, eventually, free_port, log_events, samples, value

ADMIN = "admin: 127.0.0.1:0"


async def scrape(stack: Stack) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with stack.http.get(stack.proxy.admin_url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return samples(await response.text())


async def get(stack: Stack, path: str) -> int:
    async with stack.http.get(stack.url(path)) as response:
        await response.read()
        return response.status


async def test_metrics_after_a_scripted_run_are_exact(make_stack: StackFactory) -> None:
    stack = await make_stack(top=ADMIN)
    statuses = await asyncio.gather(*(get(stack, f"/demo/r{i}") for i in range(50)))
    assert statuses == [200] * 50
    stack.partner.expire_all()
    assert await get(stack, "/demo/after-expiry") == 200  # one 401, one replay
    assert await get(stack, "/nowhere") == 404
    m = await scrape(stack)
    route = "demo-orders"
    assert value(m, "authproxy_requests_total", route=route, status="200") == 51
    assert value(m, "authproxy_requests_total", route="(none)", status="404") == 1
    assert value(m, "authproxy_request_duration_seconds_count", route=route) == 51
    # 50 first attempts + the 401 and its replay.
    assert value(m, "authproxy_upstream_duration_seconds_count", route=route) == 52
    assert value(m, "authproxy_token_mints_total", client="demo", outcome="success") == 2
    assert value(m, "authproxy_token_mints_total", client="demo", outcome="error") == 0
    assert value(m, "authproxy_token_mint_duration_seconds_count", client="demo") == 2
    assert value(m, "authproxy_replays_total", route=route, outcome="replayed") == 1
    assert value(m, "authproxy_replays_total", route=route, outcome="passed_through") == 0
    # Concurrent cold start: one request misses and mints, the others wait on the
    # same mint (also misses); every later request hits.
    misses = value(m, "authproxy_token_cache_total", client="demo", result="miss")
    hits = value(m, "authproxy_token_cache_total", client="demo", result="hit")
    assert misses + hits == 51 and 1 <= misses <= 50
    assert value(m, "authproxy_inflight_requests") == 0
    assert value(m, "authproxy_cache_backend_up") == 1
    expires_in = value(m, "authproxy_token_expires_in_seconds", client="demo", scope="orders.read")
    assert expires_in == 3570  # the fake's 3600 s minus the 30 s margin (the clock is frozen)
    assert stack.tokens.mint_count == 2


async def test_mint_errors_and_passed_through_replays_are_counted(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(top=ADMIN)
    stack.tokens.mode = "invalid_client"
    assert await get(stack, "/demo/x") == 502
    stack.tokens.mode = "ok"
    stack.clock.advance(31)  # past the rejected-credentials cool-down
    assert await get(stack, "/demo/x") == 200
    stack.partner.expire_all()
    assert await get(stack, "/demo/x") == 200  # replayed
    stack.partner.expire_all()
    assert await get(stack, "/demo/x") == 401  # the quota guard passes it through
    m = await scrape(stack)
    assert value(m, "authproxy_token_mints_total", client="demo", outcome="error") == 1
    assert value(m, "authproxy_token_mints_total", client="demo", outcome="success") == 2
    assert value(m, "authproxy_replays_total", route="demo-orders", outcome="replayed") == 1
    assert value(m, "authproxy_replays_total", route="demo-orders", outcome="passed_through") == 1
    assert value(m, "authproxy_requests_total", route="demo-orders", status="502") == 1
    assert value(m, "authproxy_requests_total", route="demo-orders", status="401") == 1


async def test_too_large_replays_are_counted(make_stack: StackFactory) -> None:
    stack = await make_stack(top=ADMIN, route="    replay_limit: 10")
    assert await get(stack, "/demo/warm") == 200
    stack.partner.expire_all()
    async with stack.http.post(stack.url("/demo/x"), data=b"y" * 100) as response:
        assert response.status == 401
    m = await scrape(stack)
    assert value(m, "authproxy_replays_total", route="demo-orders", outcome="too_large") == 1


async def test_tokens_page_shows_state_never_the_token(
    make_stack: StackFactory, log_stream: io.StringIO
) -> None:
    stack = await make_stack(top=ADMIN)
    assert await get(stack, "/demo/x") == 200
    async with stack.http.get(stack.proxy.admin_url + "/tokens") as response:
        assert response.status == 200
        text = await response.text()
    (entry,) = json.loads(text)["tokens"]
    assert entry["client"] == "demo" and entry["scope"] == "orders.read"
    assert entry["cached"] is True and entry["last_error"] is None
    assert entry["expires_in_s"] == 3570
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", entry["minted_at"])
    (token,) = stack.tokens.issued
    for page in ("/tokens", "/metrics", "/readyz", "/healthz"):
        async with stack.http.get(stack.proxy.admin_url + page) as response:
            body = await response.text()
        assert token not in body and "demo-secret" not in body
    stack.tokens.mode = "invalid_client"
    stack.partner.expire_all()
    assert await get(stack, "/demo/x") == 502
    async with stack.http.get(stack.proxy.admin_url + "/tokens") as response:
        (entry,) = (await response.json())["tokens"]
    assert entry["cached"] is False
    assert "invalid_client" in entry["last_error"]


async def test_health_and_readiness(make_stack: StackFactory) -> None:
    stack = await make_stack(top=ADMIN)
    for path in ("/healthz", "/readyz"):
        async with stack.http.get(stack.proxy.admin_url + path) as response:
            assert response.status == 200
    # The admin port serves nothing else, and the apps' port has no admin pages.
    async with stack.http.get(stack.proxy.admin_url + "/demo/x") as response:
        assert response.status == 404
    assert await get(stack, "/metrics") == 404
    assert stack.partner.requests == []


async def test_warm_client_is_minted_at_start_and_then_ready(make_stack: StackFactory) -> None:
    stack = await make_stack(top=ADMIN, client="    warm: true")
    await eventually(lambda: stack.tokens.mint_count == 1)
    await eventually(lambda: stack.proxy.ready_reason() is None)
    async with stack.http.get(stack.proxy.admin_url + "/readyz") as response:
        assert response.status == 200
    assert await get(stack, "/demo/x") == 200
    assert stack.tokens.mint_count == 1  # the app's first request used the warmed token


async def test_warm_client_whose_endpoint_fails_keeps_readyz_503(
    make_stack: StackFactory,
) -> None:
    closed = free_port()
    stack = await make_stack(
        top=ADMIN,
        client=f"""  cold:
    token_url: http://127.0.0.1:{closed}/token
    client_id: cold-client
    client_secret: cold-secret
    warm: true
""",
        extra_routes="""  - name: cold-route
    match: {path_prefix: /cold/}
    upstream: {partner}/v2/
    client: cold
""",
    )
    await eventually(lambda: "unreachable" in (stack.proxy.ready_reason() or ""))
    async with stack.http.get(stack.proxy.admin_url + "/readyz") as response:
        assert response.status == 503
        body = await response.json()
    assert body["ready"] is False
    assert body["reason"].startswith("warming: client 'cold' has no token yet")
    assert "cold-secret" not in json.dumps(body)
    assert await get(stack, "/demo/x") == 200  # other clients keep working


async def test_reload_adds_a_route_while_a_stream_is_in_flight(
    make_stack: StackFactory, tmp_path: Path, log_stream: io.StringIO
) -> None:
    path = tmp_path / "proxy.yaml"
    stack = await make_stack(path=path, top=ADMIN)
    assert await get(stack, "/demo/warm") == 200
    async with stack.http.get(stack.url("/demo/stream?n=10&delay=0.1")) as streaming:
        assert streaming.status == 200
        first = await streaming.content.readline()
        extra = f"""
  - name: added
    match: {{path_prefix: /added/}}
    upstream: {stack.partner.url}/v3/
    client: demo
"""
        path.write_text(path.read_text() + extra)
        async with stack.http.post(stack.proxy.admin_url + "/reload") as response:
            assert response.status == 200
            assert (await response.json())["reloaded"] is True
        assert await get(stack, "/added/x") == 200  # new route, new connection or not
        rest = await streaming.read()
    assert first + rest == b"".join(f"chunk-{i}\n".encode() for i in range(10))
    assert stack.partner.requests[-1].raw_path == "/v3/x"
    assert stack.tokens.mint_count == 1  # same credentials: the token was kept
    assert [e["routes"] for e in log_events(log_stream) if e["event"] == "reloaded"] == [
        ["demo-orders", "added"]
    ]


async def test_invalid_reload_keeps_the_old_config(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    stack = await make_stack(path=path, top=ADMIN)
    good = path.read_text()
    path.write_text(good.replace("    client: demo\n", "    client: nobody\n", 1))
    async with stack.http.post(stack.proxy.admin_url + "/reload") as response:
        assert response.status == 400
        body = await response.json()
    assert body["error"] == "config_invalid"
    assert re.match(
        rf"{re.escape(str(path))}:\d+: routes\[0\]\.client: no client named 'nobody'",
        body["message"],
    )
    assert await get(stack, "/demo/x") == 200
    async with stack.http.get(stack.proxy.admin_url + "/metrics") as response:
        m = samples(await response.text())
    assert value(m, "authproxy_config_reloads_total", outcome="error") == 1


async def test_reload_with_new_credentials_mints_anew(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    stack = await make_stack(path=path, top=ADMIN)
    assert await get(stack, "/demo/x") == 200
    stack.tokens.client_secret = "rotated-secret"
    path.write_text(path.read_text().replace("demo-secret", "rotated-secret"))
    async with stack.http.post(stack.proxy.admin_url + "/reload") as response:
        assert response.status == 200
    # Make before break (issue 13): the new credentials mint in the background
    # while the old token serves; then the new token is in use.
    await eventually(lambda: stack.tokens.mint_count == 2)
    assert await get(stack, "/demo/x") == 200
    assert stack.tokens.mint_count == 2
    assert stack.partner.requests[-1].token == stack.tokens.issued[-1]
    # Only a margin change: the token is kept.
    path.write_text(
        path.read_text().replace(
            "scope: orders.read", "scope: orders.read\n    expiry_margin: 20s", 1
        )
    )
    async with stack.http.post(stack.proxy.admin_url + "/reload") as response:
        assert response.status == 200
    assert await get(stack, "/demo/x") == 200
    assert stack.tokens.mint_count == 2


async def test_request_id_is_kept_or_made_and_logged(stack: Stack, log_stream: io.StringIO) -> None:
    async with stack.http.get(stack.url("/demo/x"), headers={"X-Request-Id": "app-42"}) as r:
        assert r.status == 200
    async with stack.http.get(stack.url("/demo/y")) as r:
        assert r.status == 200
    seen = [
        dict((k.lower(), v) for k, v in req.headers)["x-request-id"]
        for req in stack.partner.requests
    ]
    assert seen[0] == "app-42"
    assert re.fullmatch(r"[0-9a-f]{32}", seen[1])
    access = [e for e in log_events(log_stream) if e["event"] == "access"]
    assert [e["request_id"] for e in access] == seen


async def test_access_log_can_be_switched_off(
    make_stack: StackFactory, log_stream: io.StringIO
) -> None:
    stack = await make_stack(top="access_log: false")
    assert await get(stack, "/demo/x") == 200
    events = [e["event"] for e in log_events(log_stream)]
    assert "access" not in events and "mint" in events


async def test_admin_error_bodies_carry_the_request_id(stack: Stack) -> None:
    async with stack.http.get(stack.url("/nowhere"), headers={"X-Request-Id": "r-1"}) as r:
        assert r.status == 404
        assert (await r.json())["request_id"] == "r-1"


async def test_admin_only_on_its_own_port(make_stack: StackFactory) -> None:
    stack = await make_stack(top=ADMIN)
    assert stack.proxy.admin_port not in (None, 0, stack.proxy.port)
    async with aiohttp.ClientSession() as http:
        async with http.get(stack.proxy.admin_url + "/healthz") as response:
            assert (await response.json()) == {"status": "ok"}


async def test_reload_keeps_start_only_keys_and_says_so(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    stack = await make_stack(path=path, top=ADMIN)
    port = stack.proxy.port
    path.write_text(path.read_text().replace("listen: 127.0.0.1:0", "listen: 127.0.0.1:1"))
    async with stack.http.post(stack.proxy.admin_url + "/reload") as response:
        assert response.status == 200
        body = await response.json()
    assert body["restart_needed"] == ["listen_port"]
    assert stack.proxy.config.listen_port == 0 and stack.proxy.port == port
    assert await get(stack, "/demo/x") == 200


async def test_build_info_names_the_version(make_stack: StackFactory) -> None:
    from importlib import metadata

    stack = await make_stack(top=ADMIN)
    scraped = await scrape(stack)
    assert value(scraped, "authproxy_build_info", version=metadata.version("authproxy")) == 1


async def test_the_status_page_of_the_real_server(make_stack: StackFactory) -> None:
    stack = await make_stack(top=ADMIN)
    async with stack.http.get(stack.url("/demo/x")) as response:
        assert response.status == 200
    async with stack.http.get(stack.proxy.admin_url + "/") as response:
        page = await response.text()
        assert response.status == 200, page[:500]
    assert "demo-orders" in page and "demo" in page
    assert "demo-secret" not in page and stack.tokens.issued[0] not in page
    status = await stack.proxy.status()
    (route,) = status["routes"]
    assert (route["requests"], route["errors"]) == (1, 0)
    (client,) = status["clients"]
    assert client["tokens"][0]["cached"] is True and client["tokens"][0]["lifetime_s"] > 0
