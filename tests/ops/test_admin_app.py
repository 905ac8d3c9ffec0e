"""The admin application alone, against a fake Operated: its bearer
authentication (every path but the probes; the presented value is never
echoed nor logged) and ``POST /tokens/{client}/drop``."""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from operated_fake import ADMIN_TOKEN, FakeOperated

from conftest import log_events
from proxy.ops.admin import admin_app

Client = TestClient[Any, Any]
ClientFactory = Callable[[web.Application], Awaitable[Client]]

PROTECTED = [
    ("GET", "/"),
    ("GET", "/metrics"),
    ("GET", "/tokens"),
    ("POST", "/reload"),
    ("POST", "/tokens/acme/drop"),
    ("POST", "/tokens/nobody/drop"),
    ("GET", "/no-such-page"),  # no token, no way to tell which paths exist
]
# (Authorization header or None, the presented value that must never come back)
WRONG: list[tuple[str | None, str | None]] = [
    (None, None),  # no header
    ("Bearer wrong-token-5d2e", "wrong-token-5d2e"),
    (f"Bearer {ADMIN_TOKEN}x", f"{ADMIN_TOKEN}x"),  # longer
    (f"Bearer {ADMIN_TOKEN[:-1]}", ADMIN_TOKEN[:-1]),  # a prefix
    (f"Basic {ADMIN_TOKEN}", ADMIN_TOKEN),  # the right value, the wrong scheme
    (ADMIN_TOKEN, ADMIN_TOKEN),  # no scheme
    ("Bearer ", None),
    ("Bearer wröng-ünicode", "wröng-ünicode"),
]


@pytest.fixture
def operated() -> FakeOperated:
    return FakeOperated()


@pytest.fixture
async def guarded(aiohttp_client: ClientFactory, operated: FakeOperated) -> Client:
    return await aiohttp_client(admin_app(operated, ADMIN_TOKEN))


def bearer(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_every_path_but_the_probes_needs_the_token(
    guarded: Client, operated: FakeOperated, method: str, path: str, log_stream: io.StringIO
) -> None:
    for authorization, presented in WRONG:
        headers = {} if authorization is None else {"Authorization": authorization}
        async with guarded.request(method, path, headers=headers) as response:
            assert response.status == 401, authorization
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="authproxy-admin"'
            assert response.content_type == "application/json"
            body = await response.json()
            raw = await response.read()
        assert body["error"] == "admin_auth_required"
        assert "Bearer" in body["message"]
        if presented is not None:
            assert presented.encode() not in raw
            assert all(presented not in value for value in response.headers.values())
    # Nothing reached the server behind the admin app.
    assert operated.drops == [] and operated.reloads == 0
    assert operated.tokens_held == {"acme": 2, "globex": 0}
    logged = log_stream.getvalue()
    assert ADMIN_TOKEN not in logged and ADMIN_TOKEN[:-1] not in logged
    assert "wrong-token-5d2e" not in logged and "wröng" not in logged
    refusals = [e for e in log_events(log_stream) if e["event"] == "admin_unauthorized"]
    assert len(refusals) == len(WRONG)
    assert {e["path"] for e in refusals} == {path}
    assert {e["credential"] for e in refusals} == {"missing", "wrong"}


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_the_right_token_opens_every_path(
    guarded: Client, method: str, path: str, log_stream: io.StringIO
) -> None:
    expected = {"/no-such-page": 404, "/tokens/nobody/drop": 404}.get(path, 200)
    for scheme in ("Bearer", "bearer"):
        headers = {"Authorization": f"{scheme} {ADMIN_TOKEN}"}
        async with guarded.request(method, path, headers=headers) as response:
            assert response.status == expected
            assert ADMIN_TOKEN.encode() not in await response.read()
    assert ADMIN_TOKEN not in log_stream.getvalue()


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_the_probes_answer_without_a_token(
    guarded: Client, operated: FakeOperated, path: str
) -> None:
    async with guarded.get(path) as response:
        assert response.status == 200
    async with guarded.get(path, headers=bearer("wrong")) as response:
        assert response.status == 200  # a wrong token does not break a probe
    operated.reason = "draining: shutting down, finishing in-flight requests"
    async with guarded.get("/readyz") as response:
        assert response.status == 503
        assert (await response.json())["reason"].startswith("draining")


async def test_without_a_token_everything_is_open(
    aiohttp_client: ClientFactory, operated: FakeOperated
) -> None:
    client = await aiohttp_client(admin_app(operated))
    for method, path in PROTECTED:
        async with client.request(method, path) as response:
            assert response.status in (200, 404), path


async def test_the_token_is_taken_without_its_newline_and_never_empty(
    aiohttp_client: ClientFactory, operated: FakeOperated
) -> None:
    client = await aiohttp_client(admin_app(operated, f"  {ADMIN_TOKEN}\n"))
    async with client.get("/tokens", headers=bearer()) as response:
        assert response.status == 200
    for empty in ("", " \n"):
        with pytest.raises(ValueError, match="empty"):
            admin_app(operated, empty)


async def test_drop_discards_the_clients_tokens(guarded: Client, operated: FakeOperated) -> None:
    async with guarded.post("/tokens/acme/drop", headers=bearer()) as response:
        assert response.status == 200
        assert await response.json() == {"client": "acme", "dropped": 2}
    assert operated.drops == ["acme"]
    async with guarded.post("/tokens/acme/drop", headers=bearer()) as response:
        assert await response.json() == {"client": "acme", "dropped": 0}  # idempotent


async def test_drop_of_an_unknown_client_is_a_404_naming_it(
    guarded: Client, operated: FakeOperated
) -> None:
    async with guarded.post("/tokens/nobody/drop", headers=bearer()) as response:
        assert response.status == 404
        body = await response.json()
    assert body["error"] == "unknown_client"
    assert body["client"] == "nobody" and "'nobody'" in body["message"]
    assert operated.drops == []


async def test_drop_needs_post(guarded: Client, operated: FakeOperated) -> None:
    async with guarded.get("/tokens/acme/drop", headers=bearer()) as response:
        assert response.status == 405
    assert operated.drops == []
