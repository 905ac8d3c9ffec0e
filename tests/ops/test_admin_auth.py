"""The admin port's bearer authentication (admin.auth_token_file) and the
drop endpoint (issue 13), against the real proxy."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from conftest import Stack, StackFactory, log_events, raw_exchange, raw_status

ADMIN_TOKEN = "adm-9f2c-not-a-real-one"


@pytest.fixture
async def guarded(make_stack: StackFactory, tmp_path: Path) -> Stack:
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    token_file.chmod(0o400)
    top = f"admin: {{listen: 127.0.0.1:0, auth_token_file: {token_file}}}"
    try:
        return await make_stack(top=top)
    except Exception as exc:  # the long form is not in the loader yet
        pytest.fail(f"admin long form refused: {exc}")


async def call(stack: Stack, method: str, path: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with stack.http.request(method, stack.proxy.admin_url + path, headers=headers) as r:
        body = await r.read()
        assert (token or "\x00").encode() not in body
        return r.status


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/metrics"), ("GET", "/tokens"), ("POST", "/reload"), ("POST", "/tokens/demo/drop")],
)
async def test_every_admin_path_but_the_probes_needs_the_token(
    guarded: Stack, method: str, path: str, log_stream: io.StringIO
) -> None:
    assert await call(guarded, method, path, None) == 401
    assert await call(guarded, method, path, "wrong-token") == 401
    assert await call(guarded, method, path, ADMIN_TOKEN) in (200, 400)
    assert ADMIN_TOKEN not in log_stream.getvalue() and "wrong-token" not in log_stream.getvalue()


async def test_the_probes_answer_without_a_token(guarded: Stack) -> None:
    assert await call(guarded, "GET", "/healthz", None) == 200
    assert await call(guarded, "GET", "/readyz", None) in (200, 503)


async def test_drop_names_an_unknown_client(guarded: Stack) -> None:
    async with guarded.http.get(guarded.url("/demo/a")) as response:
        assert response.status == 200
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with guarded.http.post(
        guarded.proxy.admin_url + "/tokens/demo/drop", headers=headers
    ) as response:
        assert await response.json() == {"client": "demo", "dropped": 1}
    async with guarded.http.post(
        guarded.proxy.admin_url + "/tokens/nobody/drop", headers=headers
    ) as response:
        assert response.status == 404 and "nobody" in (await response.json())["message"]


@pytest.fixture
async def loopback(make_stack: StackFactory) -> Stack:
    return await make_stack(top="admin: 127.0.0.1:0")  # the documented default: no token


async def admin_call(stack: Stack, method: str, path: str, **headers: str) -> tuple[int, str]:
    async with stack.http.request(method, stack.proxy.admin_url + path, headers=headers) as r:
        body = await r.json() if r.content_type == "application/json" else {}
        return r.status, body.get("error", "")


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://attacker.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "null", "Content-Type": "application/x-www-form-urlencoded"},
    ],
)
async def test_a_cross_site_page_cannot_drop_tokens_or_reload(
    loopback: Stack, headers: dict[str, str]
) -> None:
    """Round 7 (F2): a form or no-cors fetch from another site's page (no
    preflight) must not burn the partner's token quota through /drop."""
    async with loopback.http.get(loopback.url("/demo/a")) as response:
        assert response.status == 200
    for path in ("/tokens/demo/drop", "/reload"):
        assert await admin_call(loopback, "POST", path, **headers) == (403, "admin_cross_site")
    async with loopback.http.get(loopback.url("/demo/b")) as response:
        assert response.status == 200
    assert loopback.tokens.mint_count == 1  # nothing was dropped
    # curl, and the status page's own origin, still can
    port = loopback.proxy.admin_url.rsplit(":", 1)[1]
    same = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    assert (await admin_call(loopback, "POST", "/tokens/demo/drop", **same))[0] == 200
    assert (await admin_call(loopback, "POST", "/tokens/demo/drop"))[0] == 200
    # behind a TLS-terminating proxy the status page's Origin is the outer name
    behind = {"Origin": "https://admin.example", "Sec-Fetch-Site": "same-origin"}
    assert (await admin_call(loopback, "POST", "/tokens/demo/drop", **behind))[0] == 200


@pytest.mark.parametrize("host", ["rebound.attacker.example:9090", "10.1.2.3", "attacker"])
async def test_a_loopback_admin_without_a_token_answers_only_loopback_names(
    loopback: Stack, host: str
) -> None:
    """Round 7 (F2): DNS rebinding; a page of another name that resolves to
    127.0.0.1 must not read /tokens, /metrics or the status page."""
    for path in ("/tokens", "/metrics", "/"):
        assert await admin_call(loopback, "GET", path, Host=host) == (403, "admin_host_not_allowed")
    assert (await admin_call(loopback, "GET", "/healthz", Host=host))[0] == 200  # probes
    for good in ("localhost:9090", "127.0.0.1", "[::1]:9090", "app.localhost"):
        assert (await admin_call(loopback, "GET", "/tokens", Host=good))[0] == 200


async def test_with_a_token_any_host_is_answered(guarded: Stack) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Host": "authproxy.internal:9090"}
    assert (await admin_call(guarded, "GET", "/tokens", **headers))[0] == 200


@pytest.mark.parametrize("stray", [b"\r", b"\x01", b"\x7f", b"\x00"])
async def test_a_malformed_request_on_the_admin_port_never_echoes_or_logs_the_token(
    guarded: Stack, log_stream: io.StringIO, stray: bytes
) -> None:
    """Round 11 (N2): aiohttp's own 400 quoted the refused line, the admin
    token with it, in its body and in a plain-text traceback; the answer and
    the log line name the fault, as on the apps' port, and every line is JSON."""
    line = b"Authorization: Bearer " + ADMIN_TOKEN.encode() + stray
    answer = await raw_exchange(
        guarded.proxy.admin_port,
        b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n" + line + b"\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert ADMIN_TOKEN.encode() not in answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "bad_request"
    await asyncio.sleep(0.05)
    assert ADMIN_TOKEN not in log_stream.getvalue()
    events = log_events(log_stream)  # every line parses as JSON
    assert any(e["event"] == "admin_malformed_request" for e in events), events


async def test_two_authorization_fields_on_the_admin_port_are_refused(guarded: Stack) -> None:
    """Which field counts would depend on the order (round 11): neither does."""
    good, bad = f"Bearer {ADMIN_TOKEN}", "Bearer wrong"
    for fields in ((good, bad), (bad, good)):
        data = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        data += b"".join(b"Authorization: " + f.encode() + b"\r\n" for f in fields)
        answer = await raw_exchange(guarded.proxy.admin_port, data + b"Connection: close\r\n\r\n")
        assert raw_status(answer) == 401, answer[:200]


@pytest.mark.parametrize(
    ("data", "status", "error"),
    [
        (b"GET /healthz HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET /healthz HTTP/3.0\r\nHost: 127.0.0.1\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET /healthz HTTP/1.2\r\nHost: 127.0.0.1\r\n\r\n", 505, "http_version_not_supported"),
        (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
         431, "header_too_large"),
        (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
         + b"".join(b"X-%d: v\r\n" % i for i in range(130)) + b"\r\n", 431, "header_too_large"),
    ],
)  # fmt: skip
async def test_the_admin_port_refuses_as_the_apps_port_does(
    guarded: Stack, data: bytes, status: int, error: str
) -> None:
    """Round 12 (F3): HTTP/2.0 was served as "HTTP/2.0 200 OK", an
    over-long field was a 400 reading "Got more than"."""
    answer = await raw_exchange(guarded.proxy.admin_port, data)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[
        :200
    ]  # in HTTP/1.1, as the apps' port
    document = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert document["error"] == error and "Got more than" not in document["message"]
    if status == 505:  # names what was refused (round 14: it said "HTTP/1.1 is not served")
        assert "HTTP/1.1 is not" not in document["message"], document
