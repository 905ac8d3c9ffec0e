"""The admin port's bearer authentication (admin.auth_token_file) and the
drop endpoint (issue 13), against the real proxy."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from conftest import Stack, StackFactory

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
