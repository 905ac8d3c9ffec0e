"""Behaviour tests: the real proxy between a real token endpoint and a real
partner, on loopback sockets. Every test counts mints and upstream requests."""

from __future__ import annotations

import asyncio
import gzip
import json
import os

import pytest

from conftest import Stack, StackFactory, raw_exchange, raw_status


async def test_get_is_forwarded_with_a_bearer_token(stack: Stack) -> None:
    async with stack.http.get(stack.url("/demo/orders/7?x=1")) as response:
        assert response.status == 200
        seen = json.loads(await response.read())
    assert stack.tokens.mint_count == 1
    assert len(stack.partner.requests) == 1
    assert seen["raw_path"] == "/v2/orders/7?x=1"
    upstream = stack.partner.requests[0]
    assert upstream.token == stack.tokens.issued[0]


async def test_200_concurrent_requests_on_a_cold_cache_make_one_mint(stack: Stack) -> None:
    stack.tokens.delay = 0.2  # keep the mint in flight while the requests pile up

    async def one(i: int) -> int:
        async with stack.http.get(stack.url(f"/demo/item/{i}")) as response:
            await response.read()
            return response.status

    statuses = await asyncio.gather(*(one(i) for i in range(200)))
    assert statuses == [200] * 200
    assert stack.tokens.calls == 1
    assert stack.tokens.mint_count == 1
    assert len(stack.partner.requests) == 200
    assert {r.token for r in stack.partner.requests} == {stack.tokens.issued[0]}


async def test_token_reused_until_margin_adjusted_expiry_then_reminted(stack: Stack) -> None:
    stack.tokens.expires_in = 100  # default margin 30 s: usable until minted_at + 70
    async with stack.http.get(stack.url("/demo/a")) as response:
        assert response.status == 200
    stack.clock.advance(62)  # inside the refresh window (last 10% of 70 s = 7 s)? no: 62 < 63
    async with stack.http.get(stack.url("/demo/a")) as response:
        assert response.status == 200
    assert stack.tokens.mint_count == 1
    stack.clock.advance(8.1)  # 70.1 s after the mint: past expiry
    async with stack.http.get(stack.url("/demo/a")) as response:
        assert response.status == 200
    assert stack.tokens.mint_count == 2
    assert [r.token for r in stack.partner.requests] == [
        stack.tokens.issued[0],
        stack.tokens.issued[0],
        stack.tokens.issued[1],
    ]


async def test_refresh_ahead_swaps_the_token_in_the_background(stack: Stack) -> None:
    stack.tokens.expires_in = 100  # usable 70 s, refresh in the last 7 s
    async with stack.http.get(stack.url("/demo/a")) as response:
        assert response.status == 200
    stack.clock.advance(64)  # in the refresh window, still valid
    async with stack.http.get(stack.url("/demo/a")) as response:
        assert response.status == 200  # served with the old token, not waiting
    for _ in range(100):
        if stack.tokens.mint_count == 2:
            break
        await asyncio.sleep(0.01)
    assert stack.tokens.mint_count == 2
    async with stack.http.get(stack.url("/demo/a")) as response:
        assert response.status == 200
    tokens = [r.token for r in stack.partner.requests]
    assert tokens == [stack.tokens.issued[0], stack.tokens.issued[0], stack.tokens.issued[1]]


async def test_expired_401_on_post_replays_once_with_identical_body(stack: Stack) -> None:
    body = os.urandom(64 * 1024)
    async with stack.http.get(stack.url("/demo/warm")) as response:
        assert response.status == 200
    stack.partner.expire_all()
    async with stack.http.post(stack.url("/demo/orders"), data=body) as response:
        assert response.status == 200
        seen = json.loads(await response.read())
    assert seen["body_length"] == len(body)
    assert stack.tokens.mint_count == 2
    posts = [r for r in stack.partner.requests if r.method == "POST"]
    assert len(posts) == 2  # the expired attempt and exactly one replay
    assert posts[0].body == body and posts[1].body == body
    assert posts[0].token == stack.tokens.issued[0]
    assert posts[1].token == stack.tokens.issued[1]


async def test_chunked_post_body_is_replayed_identically(stack: Stack) -> None:
    body = os.urandom(100_000)

    async def chunks():  # type: ignore[no-untyped-def]
        for i in range(0, len(body), 7000):
            yield body[i : i + 7000]

    async with stack.http.get(stack.url("/demo/warm")) as response:
        assert response.status == 200
    stack.partner.expire_all()
    async with stack.http.post(stack.url("/demo/orders"), data=chunks()) as response:
        assert response.status == 200
    posts = [r for r in stack.partner.requests if r.method == "POST"]
    assert [p.body for p in posts] == [body, body]
    assert stack.tokens.mint_count == 2


async def test_100_concurrent_expired_401s_make_one_mint(stack: Stack) -> None:
    async with stack.http.get(stack.url("/demo/warm")) as response:
        assert response.status == 200
    stack.partner.expire_all()
    stack.tokens.delay = 0.1

    async def one(i: int) -> int:
        async with stack.http.post(stack.url(f"/demo/o/{i}"), data=b"x" * 100) as response:
            await response.read()
            return response.status

    statuses = await asyncio.gather(*(one(i) for i in range(100)))
    assert statuses == [200] * 100
    assert stack.tokens.mint_count == 2  # the first mint, and one re-mint for all 100
    posts = [r for r in stack.partner.requests if r.method == "POST"]
    assert len(posts) == 200  # each request: one expired attempt, one replay
    assert sum(1 for p in posts if p.token == stack.tokens.issued[1]) == 100


async def test_request_whose_token_was_already_replaced_replays_without_mint(
    stack: Stack,
) -> None:
    async with stack.http.get(stack.url("/demo/warm")) as response:
        assert response.status == 200
    stack.partner.expire_all()
    async with stack.http.get(stack.url("/demo/a")) as response:
        assert response.status == 200
    assert stack.tokens.mint_count == 2
    # A later 401 for the *old* token (say, a slow request) must not mint again.
    source = stack.proxy.sources.all()[0][1]  # type: ignore[union-attr]
    old = source.current
    assert old is not None
    stale = type(old)(access_token=stack.tokens.issued[0], minted_at=0, expires_at=0, refresh_at=0)
    fresh = await source.replace_expired(stale)
    assert fresh is not None and fresh.access_token == stack.tokens.issued[1]
    assert stack.tokens.mint_count == 2


async def test_revoked_and_plain_401_pass_through_without_mint(stack: Stack) -> None:
    async with stack.http.get(stack.url("/demo/warm")) as response:
        assert response.status == 200
    stack.partner.revoked.update(stack.tokens.issued)
    before = len(stack.partner.requests)
    async with stack.http.post(stack.url("/demo/x"), data=b"abc") as response:
        assert response.status == 401
        assert "revoked" in response.headers["WWW-Authenticate"]
    assert len(stack.partner.requests) == before + 1
    async with stack.http.get(stack.url("/demo/plain401")) as response:
        assert response.status == 401
        assert await response.read() == b"go away"
    assert len(stack.partner.requests) == before + 2
    assert stack.tokens.mint_count == 1


async def test_quota_guard_passes_repeated_expiry_through(stack: Stack) -> None:
    async with stack.http.get(stack.url("/demo/warm")) as response:
        assert response.status == 200
    stack.partner.expire_all()
    async with stack.http.get(stack.url("/demo/a")) as response:
        assert response.status == 200
    stack.partner.expire_all()  # the partner calls the fresh token expired too
    async with stack.http.get(stack.url("/demo/a")) as response:
        assert response.status == 401
    assert stack.tokens.mint_count == 2
    stack.clock.advance(11)  # past remint_min_interval
    async with stack.http.get(stack.url("/demo/a")) as response:
        assert response.status == 200
    assert stack.tokens.mint_count == 3


async def test_body_rule_of_a_route_triggers_replay(make_stack: StackFactory) -> None:
    stack = await make_stack(
        route="""    expired_token:
      body: '"code":\\s*"TOKEN_EXPIRED"'"""
    )
    async with stack.http.get(stack.url("/demo/warm")) as response:
        assert response.status == 200
    # early401 answers 401 with only the body saying TOKEN_EXPIRED for every token
    async with stack.http.get(stack.url("/demo/early401")) as response:
        assert response.status == 401
        assert b"TOKEN_EXPIRED" in await response.read()
    assert stack.tokens.mint_count == 2  # one re-mint, one replay, which also got 401
    assert len([r for r in stack.partner.requests if r.raw_path.endswith("early401")]) == 2


async def test_body_over_replay_limit_streams_and_its_401_passes_through(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(route="    replay_limit: 64KiB")
    async with stack.http.get(stack.url("/demo/warm")) as response:
        assert response.status == 200
    stack.partner.expire_all()
    body = os.urandom(300_000)
    async with stack.http.post(stack.url("/demo/big"), data=body) as response:
        assert response.status == 401
    big = [r for r in stack.partner.requests if r.raw_path.endswith("/big")]
    assert len(big) == 1 and big[0].body == body  # forwarded whole, not replayed
    assert stack.tokens.mint_count == 1  # no mint for the 401 itself
    async with stack.http.get(stack.url("/demo/next")) as response:
        assert response.status == 200  # the token was dropped: the next request re-mints
    assert stack.tokens.mint_count == 2


async def test_early_401_before_body_is_read_still_replays_whole_body(stack: Stack) -> None:
    async with stack.http.get(stack.url("/demo/warm")) as response:
        assert response.status == 200
    stack.partner.early_reject = True  # 401 before reading a byte of the body
    stack.partner.expire_all()
    body = os.urandom(200_000)
    async with stack.http.post(stack.url("/demo/x"), data=body) as response:
        assert response.status == 200
        assert json.loads(await response.read())["body_length"] == len(body)
    posts = [r for r in stack.partner.requests if r.method == "POST"]
    assert len(posts) == 2
    assert posts[0].body == b"" and posts[1].body == body
    assert stack.tokens.mint_count == 2


async def test_raw_path_and_query_arrive_byte_identical(stack: Stack) -> None:
    path = "/demo/a%2Fb/%7Euser//x;p=1?x=%2F&y=a+b&z=%zz&empty"
    response = await raw_exchange(
        stack.proxy.port,
        f"GET {path} HTTP/1.1\r\nHost: app.local\r\nConnection: close\r\n\r\n".encode(),
    )
    assert raw_status(response) == 200
    assert stack.partner.requests[-1].raw_path == "/v2/a%2Fb/%7Euser//x;p=1?x=%2F&y=a+b&z=%zz&empty"


async def test_gzip_request_and_response_bodies_stay_compressed(stack: Stack) -> None:
    compressed = gzip.compress(b"hello " * 1000)
    async with stack.http.post(
        stack.url("/demo/upload"),
        data=compressed,
        headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
    ) as response:
        assert response.status == 200
    assert stack.partner.requests[-1].body == compressed
    async with stack.http.get(stack.url("/demo/gzip")) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        raw = await response.read()
    assert gzip.decompress(raw) == b"compressed hello " * 20


async def test_chunked_response_arrives_chunk_by_chunk(stack: Stack) -> None:
    loop = asyncio.get_running_loop()
    arrivals: list[tuple[float, bytes]] = []
    async with stack.http.get(stack.url("/demo/stream?n=3&delay=0.3")) as response:
        assert response.status == 200
        async for chunk in response.content.iter_any():
            arrivals.append((loop.time(), chunk))
    assert b"".join(c for _, c in arrivals) == b"chunk-0\nchunk-1\nchunk-2\n"
    assert len(arrivals) >= 3
    # The first chunk came long before the last: nothing waited for the end.
    assert arrivals[-1][0] - arrivals[0][0] >= 0.5


async def test_set_cookie_twice_stays_twice(stack: Stack) -> None:
    async with stack.http.get(stack.url("/demo/cookies")) as response:
        assert response.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]


async def test_hop_by_hop_headers_are_dropped_both_ways(stack: Stack) -> None:
    async with stack.http.get(
        stack.url("/demo/echo"),
        headers={
            "Connection": "keep-alive, X-Private",
            "X-Private": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "Proxy-Connection": "keep-alive",
            "Upgrade": "websocket",
            "Authorization": "Bearer app-supplied",
            "X-End-To-End": "yes",
        },
    ) as response:
        assert response.status == 200
    sent = {name.lower(): value for name, value in stack.partner.requests[-1].headers}
    for name in (
        "x-private",
        "keep-alive",
        "te",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
    ):
        assert name not in sent, name
    assert sent["x-end-to-end"] == "yes"
    assert sent["authorization"] == f"Bearer {stack.tokens.issued[0]}"
    assert sent["host"] == f"127.0.0.1:{stack.partner.port}"
    assert sent["x-forwarded-for"] == "127.0.0.1"
    assert sent["x-forwarded-proto"] == "http"
    assert sent["x-forwarded-host"] == f"127.0.0.1:{stack.proxy.port}"
    assert sent["via"].endswith("1.1 authproxy")
    assert "user-agent" in sent  # the client's own, not one added by the proxy
    assert sent["user-agent"].startswith("Python/")
    async with stack.http.get(stack.url("/demo/hop")) as response:
        assert response.headers["X-End-To-End"] == "kept"
        assert "X-Secret-Hop" not in response.headers
        assert "Keep-Alive" not in response.headers


async def test_proxy_adds_no_user_agent_or_accept_encoding(stack: Stack) -> None:
    response = await raw_exchange(
        stack.proxy.port, b"GET /demo/echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert raw_status(response) == 200
    names = {name.lower() for name, _ in stack.partner.requests[-1].headers}
    assert not names & {"user-agent", "accept-encoding", "accept", "content-type"}


async def test_absolute_form_to_routed_host_works_and_unrouted_gets_404(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(
        extra_routes="""  - name: by-host
    match: {host: partner.example}
    upstream: {partner}/v2/
    client: demo"""
    )
    response = await raw_exchange(
        stack.proxy.port,
        b"GET http://partner.example/things/1?q=2 HTTP/1.1\r\nHost: partner.example\r\nConnection: close\r\n\r\n",
    )
    assert raw_status(response) == 200
    assert stack.partner.requests[-1].raw_path == "/v2/things/1?q=2"
    count = len(stack.partner.requests)
    response = await raw_exchange(
        stack.proxy.port,
        b"GET http://elsewhere.example/demo/x HTTP/1.1\r\nHost: elsewhere.example\r\nConnection: close\r\n\r\n",
    )
    assert raw_status(response) == 404
    assert b'"no_route"' in response
    # an absolute-form target never falls back to a path-only route
    response = await raw_exchange(
        stack.proxy.port,
        b"GET http://elsewhere.example/demo/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert raw_status(response) == 404
    assert len(stack.partner.requests) == count


async def test_dot_segments_climbing_out_get_400(stack: Stack) -> None:
    for path in ("/demo/../x", "/demo/a/../../x", "/demo/%2e%2e/x", "/demo/a%2f..%2f..%2fx"):
        response = await raw_exchange(
            stack.proxy.port,
            f"GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode(),
        )
        assert raw_status(response) == 400, path
        assert b'"path_escapes_route"' in response
    assert stack.partner.requests == []
    assert stack.tokens.calls == 0


async def test_no_route_and_connect(stack: Stack) -> None:
    async with stack.http.get(stack.url("/nowhere")) as response:
        assert response.status == 404
        assert (await response.json())["error"] == "no_route"
    response = await raw_exchange(
        stack.proxy.port,
        b"CONNECT partner.example:443 HTTP/1.1\r\nHost: partner.example:443\r\n\r\n",
    )
    assert raw_status(response) == 403
    assert b'"connect_not_allowed"' in response and b"partner.example:443" in response
    assert stack.tokens.calls == 0


async def test_upstream_unreachable_is_502_and_timeout_504(make_stack: StackFactory) -> None:
    stack = await make_stack(
        route="    timeout: 300ms",
        extra_routes="""  - name: dead
    match: {path_prefix: /dead/}
    upstream: http://127.0.0.1:9/
    client: demo""",
    )
    async with stack.http.get(stack.url("/dead/x")) as response:
        assert response.status == 502
        body = await response.json()
    assert body["error"] == "upstream_unreachable" and body["route"] == "dead"
    # Round 12: the errno's words, not asyncio's "Connect call failed ('127.0.0.1', 9)"
    assert body["message"].endswith("Connection refused"), body["message"]
    async with stack.http.get(stack.url("/demo/slow?delay=2")) as response:
        assert response.status == 504
        assert (await response.json())["error"] == "upstream_timeout"


async def test_upstream_cut_mid_body_closes_the_app_connection(stack: Stack) -> None:
    response = await raw_exchange(
        stack.proxy.port, b"GET /demo/cut HTTP/1.1\r\nHost: a\r\n\r\n", timeout=3
    )
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"Content-Length: 1000" in head
    assert len(body) < 1000  # cut short and the connection closed: never a "complete" reply


async def test_a_cut_answer_to_an_http_1_0_app_ends_in_a_reset(stack: Stack) -> None:
    """Round 11 (N1): an HTTP/1.0 app's answer ends with the connection
    (no chunked coding in 1.0): a cut closed cleanly read as a whole
    answer. A reset is the only signal left, and the app gets it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.proxy.port)
    writer.write(b"GET /demo/cut-chunked HTTP/1.0\r\nHost: a\r\n\r\n")
    received = b""
    with pytest.raises(ConnectionResetError):
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                break  # a clean end: the failure this test is about
            received += chunk
    writer.close()
    assert received.startswith(b"HTTP/1.1 200") or received == b"", received[:200]
    # The same cut to an HTTP/1.1 app shows in its framing: no last chunk.
    answer = await raw_exchange(
        stack.proxy.port, b"GET /demo/cut-chunked HTTP/1.1\r\nHost: a\r\n\r\n", timeout=3
    )
    assert b"Transfer-Encoding: chunked" in answer and not answer.endswith(b"0\r\n\r\n")


async def test_head_and_204_pass_without_body(stack: Stack) -> None:
    async with stack.http.head(stack.url("/demo/echo")) as response:
        assert response.status == 200
        assert await response.read() == b""
    assert stack.partner.requests[-1].method == "HEAD"


async def test_large_download_streams_through(stack: Stack) -> None:
    size = 20 * 1024 * 1024
    total = 0
    async with stack.http.get(stack.url(f"/demo/download?size={size}")) as response:
        assert response.headers["Content-Length"] == str(size)
        async for chunk in response.content.iter_any():
            total += len(chunk)
    assert total == size
