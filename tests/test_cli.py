"""The authproxy command, run as a real process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
from fakes import FakePartner, FakeTokenEndpoint

ROOT = Path(__file__).resolve().parent.parent


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_check_accepts_the_shipped_example() -> None:
    code, out, _ = await run(
        "check", "--config", "proxy.yaml", env={"ACME_CLIENT_ID": "x", "ACME_CLIENT_SECRET": "y"}
    )
    assert code == 0
    assert "OK (1 clients, 2 routes)" in out


async def test_check_names_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "clients:\n  a:\n    token_url: https://t/x\n    client_id: i\n    client_secret: s\n"
        "routes:\n  - match: {path_prefix: /a/}\n    upstream: https://u/\n    client: b\n"
    )
    code, _, err = await run("check", "--config", str(bad))
    assert code == 1
    assert f"{bad}:9: routes[0].client: no client named 'b'" in err
    assert "Traceback" not in err


async def test_check_uses_env_var_for_the_path(tmp_path: Path) -> None:
    code, _, err = await run("check", env={"AUTHPROXY_CONFIG": str(tmp_path / "none.yaml")})
    assert code == 1 and "none.yaml: cannot read the config file" in err


async def test_demo_runs_and_exits_zero() -> None:
    code, out, err = await run("demo")
    assert code == 0, out + err
    assert "demo OK: 2 mints" in out


async def test_serve_proxies_logs_and_stops_on_sigterm(tmp_path: Path) -> None:
    tokens = FakeTokenEndpoint()
    await tokens.start()
    partner = FakePartner(tokens)
    await partner.start()
    config = tmp_path / "proxy.yaml"
    config.write_text(f"""
listen: 127.0.0.1:0
clients:
  demo:
    token_url: {tokens.token_url}
    client_id: ${{DEMO_ID}}
    client_secret_file: {tmp_path / "secret"}
routes:
  - match: {{path_prefix: /demo/}}
    upstream: {partner.url}/v2/
    client: demo
""")
    (tmp_path / "secret").write_text("demo-secret\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(config),
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "DEMO_ID": "demo-client"},
    )
    try:
        assert process.stderr is not None
        lines: list[dict[str, object]] = []
        while not any(line["event"] == "listening" for line in lines):
            raw = await asyncio.wait_for(process.stderr.readline(), 30)
            assert raw, "proxy exited before listening"
            lines.append(json.loads(raw))
        port = lines[-1]["port"]
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/demo/x") as response,
        ):
            assert response.status == 200
        assert tokens.mint_count == 1
        process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(process.stderr.read(), 30)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        text = rest.decode()
        assert '"event": "access"' in text and '"event": "stopped"' in text
        assert tokens.issued[0] not in text and "demo-secret" not in text
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await partner.stop()
        await tokens.stop()


def _token_config(
    tmp_path: Path,
    tokens: FakeTokenEndpoint,
    secret: str = "demo-secret",  # noqa: S107
) -> str:
    path = tmp_path / "token.yaml"
    path.write_text(f"""
clients:
  demo:
    token_url: {tokens.token_url}
    client_id: demo-client
    client_secret: {secret}
    scope: orders.read
routes:
  - match: {{path_prefix: /demo/}}
    upstream: http://127.0.0.1:9/
    client: demo
""")
    return str(path)


async def test_token_command_prints_metadata_never_the_token(tmp_path: Path) -> None:
    tokens = FakeTokenEndpoint()
    await tokens.start()
    try:
        tokens.expires_in = 120
        path = _token_config(tmp_path, tokens)
        code, out, err = await run("token", "--config", path, "demo", "--scope", "orders.write")
        assert code == 0, err
        info = json.loads(out)
        (token,) = tokens.issued
        assert token not in out and token not in err and "demo-secret" not in out + err
        assert info["client"] == "demo" and info["token_type"] == "Bearer"
        assert info["lifetime_s"] == 120
        assert info["scopes_granted"] == ["orders.write"]
        assert info["jwt"] is False and info["length"] == len(token)
        assert tokens.requests[0].form["scope"] == "orders.write"
        assert tokens.mint_count == 1
    finally:
        await tokens.stop()


async def test_token_command_reports_a_rejection(tmp_path: Path) -> None:
    tokens = FakeTokenEndpoint()
    await tokens.start()
    try:
        path = _token_config(tmp_path, tokens, secret="wrong-secret")
        code, out, err = await run("token", "--config", path, "demo")
        assert code == 1 and out == ""
        assert "invalid_client" in err and "wrong-secret" not in err
        assert tokens.calls == 1
        code, _, err = await run("token", "--config", path, "nobody")
        assert code == 1 and "no client named 'nobody' (clients: demo)" in err
    finally:
        await tokens.stop()


ACME = {"ACME_CLIENT_ID": "x", "ACME_CLIENT_SECRET": "y"}


async def test_version_is_the_packages() -> None:
    code, out, _ = await run("--version")
    version = next(
        line.split('"')[1]
        for line in (ROOT / "pyproject.toml").read_text().splitlines()
        if line.startswith("version = ")
    )
    assert code == 0 and out.strip() == f"authproxy {version}"


async def test_flags_are_held_to_their_yaml_keys_rules() -> None:
    code, _, err = await run("serve", "-c", "proxy.yaml", "--workers", "0", env=ACME)
    assert code == 1 and "workers" in err and "1 to 64" in err
    code, _, err = await run("serve", "-c", "proxy.yaml", "--log-level", "verbose", env=ACME)
    assert code == 1 and "level 'verbose'" in err
    code, _, err = await run("serve", "-c", "proxy.yaml", "--log-format", "xml", env=ACME)
    assert code == 1 and "format 'xml'" in err
    code, _, _ = await run("serve", "--no-such-flag")
    assert code == 2  # usage


async def test_check_prints_the_warnings_serve_would(tmp_path: Path) -> None:
    text = (ROOT / "proxy.yaml").read_text().replace("${ACME_CLIENT_SECRET}", "literal-secret")
    config = tmp_path / "proxy.yaml"
    config.write_text(text)
    code, out, err = await run("check", "-c", str(config), env=ACME)
    assert code == 0 and "OK" in out
    assert "warning:" in err and "literal secret" in err and "literal-secret" not in err


async def test_token_drop_asks_the_running_proxy(tmp_path: Path) -> None:
    """authproxy token CLIENT --drop: the running proxy's tokens for CLIENT go."""
    from conftest import ProxyProcess, free_port

    tokens = FakeTokenEndpoint()
    await tokens.start()
    partner = FakePartner(tokens)
    await partner.start()
    admin = free_port()
    text = f"""
listen: 127.0.0.1:0
admin: 127.0.0.1:{admin}
clients:
  demo: {{token_url: {tokens.token_url}, client_id: demo-client, client_secret: demo-secret}}
routes:
  - {{match: {{path_prefix: /demo/}}, upstream: "{partner.url}/v2/", client: demo}}
"""
    proxy = ProxyProcess(text, tmp_path, "dropped")
    try:
        await proxy.start()
        async with aiohttp.ClientSession() as http, http.get(proxy.url + "/demo/a") as r:
            assert r.status == 200
        code, out, err = await run("token", "demo", "--drop", "-c", str(proxy.config))
        assert code == 0, err
        assert json.loads(out) == {"client": "demo", "dropped": 1}
        async with aiohttp.ClientSession() as http, http.get(proxy.url + "/demo/b") as r:
            assert r.status == 200
        assert tokens.mint_count == 2
        code, _, _ = await run("token", "nobody", "--drop", "-c", str(proxy.config))
        assert code == 1
    finally:
        await proxy.stop()
        await partner.stop()
        await tokens.stop()
