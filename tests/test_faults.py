"""Fault injection against the real proxy: a token endpoint and a partner that
misbehave on command. Each test counts token-endpoint calls and upstream
requests, so that a retry storm or a lost or duplicated request shows."""

from __future__ import annotations

import asyncio
import email.utils

from conftest import Stack, StackFactory

ADMIN = "admin: 127.0.0.1:0"


async def call(stack: Stack, path: str = "/demo/x") -> tuple[int, dict[str, str]]:
    async with stack.http.get(stack.url(path)) as response:
        body = await response.json() if response.content_type == "application/json" else {}
        return response.status, body


async def test_transient_failures_are_retried_within_the_budget(stack: Stack) -> None:
    stack.tokens.script = ["server_error", "server_error"]
    status, _ = await call(stack)
    assert status == 200
    assert stack.tokens.calls == 3 and stack.tokens.mint_count == 1
    assert len(stack.partner.requests) == 1


async def test_retries_stop_at_the_budget(make_stack: StackFactory) -> None:
    stack = await make_stack(client="    timeout: 300ms")
    stack.tokens.delay = 0.2
    stack.tokens.mode = "server_error"
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, body = await call(stack)
    assert status == 502 and body["error"] in ("token_endpoint_rejected", "token_endpoint_timeout")
    assert loop.time() - started < 1.0  # the budget, not attempts x delay
    assert stack.tokens.calls <= 2


async def test_429_retry_after_is_honoured_and_requests_fail_fast(stack: Stack) -> None:
    stack.tokens.mode = "throttled"
    stack.tokens.retry_after = "120"
    status, body = await call(stack)
    assert status == 502 and "answered 429" in body["message"]
    statuses = await asyncio.gather(*(call(stack) for _ in range(100)))
    assert {s for s, _ in statuses} == {502}
    for _, later in statuses:
        assert "not calling the token endpoint for another 120s" in later["message"]
        assert "token endpoint asked to wait" in later["message"]
    assert stack.tokens.calls == 1  # nobody called it again before Retry-After passed
    assert stack.partner.requests == []
    stack.tokens.mode = "ok"
    stack.clock.advance(119)
    assert (await call(stack))[0] == 502 and stack.tokens.calls == 1
    stack.clock.advance(1)
    assert (await call(stack))[0] == 200 and stack.tokens.calls == 2


async def test_503_with_an_http_date_retry_after(stack: Stack) -> None:
    stack.tokens.mode = "unavailable"
    stack.tokens.retry_after = email.utils.formatdate(stack.clock() + 60, usegmt=True)
    assert (await call(stack))[0] == 502
    assert stack.tokens.calls == 1  # a 503 that says when to come back is not retried
    stack.tokens.mode = "ok"
    stack.clock.advance(59)
    assert (await call(stack))[0] == 502 and stack.tokens.calls == 1
    stack.clock.advance(2)
    assert (await call(stack))[0] == 200 and stack.tokens.calls == 2


async def test_rejected_credentials_1000_requests_make_one_call(stack: Stack) -> None:
    stack.tokens.mode = "invalid_client"
    results = []
    for _ in range(10):  # in waves, so that most requests come after the first failure
        results += await asyncio.gather(*(call(stack) for _ in range(100)))
    assert [s for s, _ in results] == [502] * 1000
    assert stack.tokens.calls == 1
    messages = {b["message"] for _, b in results}
    assert all("invalid_client" in m for m in messages)
    assert any("credentials or request rejected" in m for m in messages)
    assert {b["error"] for _, b in results} == {"token_endpoint_rejected"}
    # The cool-down grows on repeats: 30 s, then 60 s.
    stack.clock.advance(30)
    assert (await call(stack))[0] == 502 and stack.tokens.calls == 2
    stack.clock.advance(59)
    assert (await call(stack))[0] == 502 and stack.tokens.calls == 2
    stack.tokens.mode = "ok"
    stack.clock.advance(1)
    assert (await call(stack))[0] == 200 and stack.tokens.calls == 3


async def test_invalid_scope_is_not_retried(stack: Stack) -> None:
    stack.tokens.mode = "invalid_scope"
    statuses = await asyncio.gather(*(call(stack) for _ in range(20)))
    assert {s for s, _ in statuses} == {502}
    assert stack.tokens.calls == 1


async def test_circuit_opens_after_repeated_failures_and_shows_on_tokens(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(top=ADMIN)
    stack.tokens.mode = "server_error"
    assert (await call(stack))[0] == 502  # 3 calls
    assert (await call(stack))[0] == 502  # 2 more: 5 in a row, the circuit opens
    assert stack.tokens.calls == 5
    status, body = await call(stack)
    assert status == 502 and "not calling the token endpoint" in body["message"]
    assert stack.tokens.calls == 5
    async with stack.http.get(stack.proxy.admin_url + "/tokens") as response:
        (entry,) = (await response.json())["tokens"]
    assert entry["circuit"]["state"] == "open" and entry["circuit"]["open_for_s"] == 30
    async with stack.http.get(stack.proxy.admin_url + "/metrics") as response:
        assert 'authproxy_token_circuit_state{client="demo"} 2.0' in await response.text()
    stack.tokens.mode = "ok"
    stack.clock.advance(30)
    assert (await call(stack))[0] == 200  # the half-open probe succeeded
    async with stack.http.get(stack.proxy.admin_url + "/tokens") as response:
        (entry,) = (await response.json())["tokens"]
    assert entry["circuit"] == {"state": "closed"}


async def test_failing_refresh_keeps_serving_the_valid_token(stack: Stack) -> None:
    assert (await call(stack))[0] == 200
    stack.tokens.mode = "server_error"
    stack.clock.advance(3300)  # inside the refresh window, before the expiry
    for _ in range(20):
        assert (await call(stack))[0] == 200
        await asyncio.sleep(0.01)
    assert stack.tokens.mint_count == 1
    assert {r.token for r in stack.partner.requests} == {stack.tokens.issued[0]}
    assert stack.tokens.calls >= 2  # the background refresh did try
