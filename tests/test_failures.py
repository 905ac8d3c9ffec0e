"""What the app sees when the token endpoint or the partner misbehaves, and
that no secret ever reaches a log line or an error body."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import resource

import pytest

from conftest import Stack, StackFactory, log_events


@pytest.mark.parametrize(
    ("mode", "error", "needle"),
    [
        ("invalid_client", "token_endpoint_rejected", "invalid_client"),
        ("server_error", "token_endpoint_rejected", "500"),
        ("html", "token_response_invalid", "HTML"),
        ("no_access_token", "token_response_invalid", "no access_token"),
        ("wrong_token_type", "token_response_invalid", "DPoP"),
        ("error_in_200", "token_endpoint_rejected", "invalid_scope"),
    ],
)
async def test_token_endpoint_failures_give_the_app_a_502_json(
    stack: Stack, mode: str, error: str, needle: str
) -> None:
    stack.tokens.mode = mode
    async with stack.http.get(stack.url("/demo/x")) as response:
        assert response.status == 502
        assert response.content_type == "application/json"
        body = await response.json()
    assert body["error"] == error
    assert needle in body["message"]
    assert body["route"] == "demo-orders" and body["client"] == "demo"
    assert "demo-secret" not in str(body)
    assert stack.partner.requests == []  # nothing was sent without a token


async def test_token_endpoint_timeout_gives_502(make_stack: StackFactory) -> None:
    stack = await make_stack(client="    timeout: 200ms")
    stack.tokens.delay = 2
    async with stack.http.get(stack.url("/demo/x")) as response:
        assert response.status == 502
        body = await response.json()
    assert body["error"] == "token_endpoint_timeout"
    assert "0.2s" in body["message"]


async def test_token_endpoint_unreachable_gives_502(make_stack: StackFactory) -> None:
    stack = await make_stack()
    await stack.tokens.stop()
    async with stack.http.get(stack.url("/demo/x")) as response:
        assert response.status == 502
        assert (await response.json())["error"] == "token_endpoint_unreachable"


async def test_concurrent_requests_share_one_failing_mint(stack: Stack) -> None:
    stack.tokens.mode = "server_error"
    stack.tokens.delay = 0.2

    async def one() -> int:
        async with stack.http.get(stack.url("/demo/x")) as response:
            await response.read()
            return response.status

    assert await asyncio.gather(*(one() for _ in range(50))) == [502] * 50
    assert stack.tokens.calls == 3  # one shared mint: its bounded retries (mint_attempts)


REJECTED = (
    "credentials or request rejected: token endpoint for client 'demo' answered 401 "
    "invalid_client: Client authentication failed"
)


async def fetch_error(stack: Stack) -> tuple[int, dict[str, str]]:
    """Status and JSON body of one request, without its (per-request) request_id."""
    async with stack.http.get(stack.url("/demo/x")) as response:
        body = await response.json()
    body.pop("request_id")
    return response.status, body


@pytest.mark.parametrize(
    ("mode", "cause"),
    [
        ("invalid_client", f"{REJECTED}; not calling the token endpoint for another 30s"),
        (
            "server_error",
            "token endpoint for client 'demo' answered 500 "
            "(text/plain; charset=utf-8): 'upstream exploded'",
        ),
    ],
)
async def test_fifty_waiters_on_one_failed_mint_get_one_short_message(
    make_stack: StackFactory, mode: str, cause: str
) -> None:
    # Issue 11, item 14: the one exception all waiters share was rewritten for
    # each of them, so messages grew "route 'x': route 'x': ..." up to ~1.2 KB.
    stack = await make_stack(client="    mint_attempts: 1")
    stack.tokens.mode = mode
    stack.tokens.delay = 0.3
    results = await asyncio.gather(*(fetch_error(stack) for _ in range(50)))
    assert stack.tokens.calls == 1
    assert [status for status, _ in results] == [502] * 50
    message = f"route 'demo-orders': {cause}"
    assert [body["message"] for _, body in results] == [message] * 50
    assert len(message) < 200 and message.count("demo-orders") == 1
    assert {(body["route"], body["client"]) for _, body in results} == {("demo-orders", "demo")}


async def test_the_first_rejection_says_what_the_cooled_down_ones_say(stack: Stack) -> None:
    # Issue 11, item 15: one cause, one message. The first answer used to be
    # only the endpoint's words; "credentials or request rejected" came later.
    stack.tokens.mode = "invalid_client"
    first = await fetch_error(stack)
    stack.clock.advance(10)
    later = await fetch_error(stack)
    assert stack.tokens.calls == 1

    def answer(wait: int) -> tuple[int, dict[str, str]]:
        message = (
            f"route 'demo-orders': {REJECTED}; not calling the token endpoint for another {wait}s"
        )
        return 502, {
            "error": "token_endpoint_rejected",
            "message": message,
            "route": "demo-orders",
            "client": "demo",
        }

    assert first == answer(30)
    assert later == answer(20)
    assert "demo-secret" not in str(first) + str(later)


async def test_recovery_after_token_endpoint_failure(stack: Stack) -> None:
    stack.tokens.mode = "server_error"
    async with stack.http.get(stack.url("/demo/x")) as response:
        assert response.status == 502
    stack.tokens.mode = "ok"
    async with stack.http.get(stack.url("/demo/x")) as response:
        assert response.status == 200
    assert stack.tokens.mint_count == 1


async def test_body_over_replay_limit_streams_with_bounded_memory(stack: Stack) -> None:
    size = 160 * 1024 * 1024
    block = os.urandom(1024 * 1024)
    digest = hashlib.sha256()

    async def body():  # type: ignore[no-untyped-def]
        for _ in range(size // len(block)):
            digest.update(block)
            yield block

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    async with stack.http.post(stack.url("/demo/sink"), data=body()) as response:
        assert response.status == 200
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert stack.partner.sunk == [(size, digest.hexdigest())]
    # Proxy, partner and client share this process: a proxy that kept the body
    # would have grown by >= 160 MiB. Streaming costs a few buffers.
    assert grown_mib < 64, grown_mib


async def test_no_secret_or_token_in_logs_or_errors(stack: Stack, log_stream: io.StringIO) -> None:
    async with stack.http.get(
        stack.url("/demo/a"), headers={"Authorization": "Bearer app-own-secret-value"}
    ) as response:
        assert response.status == 200
    stack.partner.expire_all()
    async with stack.http.post(stack.url("/demo/b"), data=b"x") as response:
        assert response.status == 200
    stack.partner.revoked.update(stack.tokens.issued)
    async with stack.http.get(stack.url("/demo/c")) as response:
        assert response.status == 401
    stack.tokens.mode = "invalid_client"
    stack.clock.advance(10_000)
    async with stack.http.get(stack.url("/demo/d")) as response:
        assert response.status == 502
        error_body = await response.text()
    text = log_stream.getvalue()
    events = log_events(log_stream)
    assert [e["event"] for e in events if e["event"] == "mint"] == ["mint"] * 3
    assert sum(1 for e in events if e["event"] == "access") == 4
    assert len(stack.tokens.issued) == 2
    for secret in [*stack.tokens.issued, "demo-secret", "app-own-secret-value", "ZGVtby1jbGllbnQ6"]:
        assert secret not in text, secret
        assert secret not in error_body, secret


async def test_access_and_mint_lines_carry_the_facts(stack: Stack, log_stream: io.StringIO) -> None:
    async with stack.http.get(stack.url("/demo/a?secret=q")) as response:
        assert response.status == 200
    stack.partner.expire_all()
    async with stack.http.get(stack.url("/demo/b")) as response:
        assert response.status == 200
    events = log_events(log_stream)
    access = [e for e in events if e["event"] == "access"]
    assert access[0]["route"] == "demo-orders"
    assert access[0]["path"] == "/demo/a"  # no query string
    assert access[0]["status"] == 200 and access[0]["upstream_status"] == 200
    assert access[0]["waited_for_mint"] is True and access[0]["replayed"] is False
    assert access[1]["replayed"] is True and access[1]["waited_for_mint"] is True
    mints = [e for e in events if e["event"] == "mint"]
    assert [m["outcome"] for m in mints] == ["success", "success"]
    assert mints[0]["client"] == "demo" and mints[0]["scope"] == "orders.read"
    assert mints[0]["lifetime_s"] == 3600


async def test_unreplayable_expired_401s_cost_one_mint_per_remint_interval(
    make_stack: StackFactory,
) -> None:
    """The quota guard holds for bodies over replay_limit too (issue 11,
    seventh outside round): dropping the token for each such 401 would let
    every next request mint, one mint per upload against a partner that keeps
    calling tokens expired."""
    stack = await make_stack(route="    replay_limit: 100")
    for _ in range(4):
        async with stack.http.post(stack.url("/demo/early401"), data=b"x" * 200) as response:
            assert response.status == 401
            await response.read()
    assert stack.tokens.mint_count == 2  # the first token, one drop within the interval
    stack.clock.advance(11)  # past remint_min_interval: one more drop is allowed
    for _ in range(2):
        async with stack.http.post(stack.url("/demo/early401"), data=b"x" * 200) as response:
            assert response.status == 401
    assert stack.tokens.mint_count == 3


async def test_an_absolute_form_access_line_names_path_and_host(
    stack: Stack, log_stream: io.StringIO
) -> None:
    """Round 8 (N3): an app using the proxy as HTTP_PROXY sends absolute-form
    targets; its access lines said "path": null. The path (no query) and the
    host (no userinfo) are logged; a refused userinfo target leaks none."""
    for target in (b"http://nowhere.example:8080/v1/x?api_key=K9", b"http://u:PW7@h.example/a"):
        reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
    lines = [e for e in log_events(log_stream) if e["event"] == "access"]
    assert (lines[0]["path"], lines[0]["host"]) == ("/v1/x", "nowhere.example:8080")
    assert (lines[1]["path"], lines[1]["host"]) == ("/a", "h.example")
    assert "K9" not in log_stream.getvalue() and "PW7" not in log_stream.getvalue()
