"""The authproxy command, run as a real process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
from fakes import FakePartner, FakeTokenEndpoint

from proxy.config.load import parse_config
from proxy.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """\
listen: 127.0.0.1:0
clients:
  demo: {token_url: "http://127.0.0.1:9/token", client_id: i, client_secret: "${S:-s}"}
routes:
  - {match: {path_prefix: /demo/}, upstream: "http://127.0.0.1:9/", client: demo}
"""


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


@pytest.mark.parametrize("flag", ["--version", "-V"])
async def test_version_flags_agree(flag: str) -> None:
    import proxy

    code, out, _ = await run(flag)
    assert code == 0 and out == f"authproxy {proxy.__version__}\n"


def _yaml_message(key_line: str) -> str:
    """What the config loader says about ``key_line`` appended to a good file."""
    with pytest.raises(ConfigError) as raised:
        parse_config(MINIMAL + key_line + "\n", "p.yaml", {})
    return str(raised.value).split(": ", 2)[2]  # past "p.yaml:N: key"


@pytest.mark.parametrize(
    ("flags", "key_line"),
    [
        (("--workers", "0"), "workers: 0"),
        (("--workers", "65"), "workers: 65"),
        (("--workers", "two"), "workers: two"),
        (("--log-level", "verbose"), "log: {level: verbose}"),
        (("--log-format", "xml"), "log: {format: xml}"),
    ],
)
async def test_flags_are_refused_as_their_yaml_keys_are(
    flags: tuple[str, str], key_line: str
) -> None:
    """A flag value its YAML key would refuse is a usage error (2) with the
    key's own message, before any config is read."""
    code, _, err = await run("serve", "-c", "/nonexistent.yaml", *flags)
    assert code == 2
    assert f"authproxy serve: error: argument {flags[0]}: {_yaml_message(key_line)}\n" in err


async def test_flags_the_yaml_keys_accept_pass(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.yaml")
    flags = ("--workers", "64", "--log-level", "WARNING", "--log-format", "console")
    code, _, err = await run("serve", "-c", missing, *flags)
    assert code == 1 and err == f"authproxy: {missing}: cannot read the config file: " + (
        "No such file or directory\n"
    )
    code, _, err = await run("token", "demo", "-c", missing, "--log-format", "console")
    assert code == 1 and "cannot read the config file" in err
    code, _, err = await run("serve", "--no-such-flag")
    assert code == 2 and "unrecognized arguments: --no-such-flag" in err  # usage


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


async def _serve_on_a_taken_port(tmp_path: Path, top: str, *flags: str) -> tuple[int, str, int]:
    """``authproxy serve`` with ``top`` ({port} a port something else holds)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "proxy.yaml"
        config.write_text(MINIMAL.replace("listen: 127.0.0.1:0\n", top.format(port=port)))
        code, _, err = await run("serve", "-c", str(config), *flags)
    return code, err, port


async def test_a_port_in_use_is_one_clean_line_and_exit_1(tmp_path: Path) -> None:
    """No 'Unclosed client session' after the failed bind: ProxyServer.start
    closes the sessions it opened before listening."""
    code, err, port = await _serve_on_a_taken_port(tmp_path, "listen: 127.0.0.1:{port}\n")
    assert code == 1
    assert err.lower() == f"authproxy: cannot listen on 127.0.0.1:{port}: address already in use\n"


async def test_an_admin_port_in_use_names_the_admin_address(tmp_path: Path) -> None:
    top = "listen: 127.0.0.1:0\nadmin: 127.0.0.1:{port}\n"
    code, err, port = await _serve_on_a_taken_port(tmp_path, top)
    assert code == 1
    assert err.lower() == f"authproxy: cannot listen on 127.0.0.1:{port}: address already in use\n"


async def test_a_port_in_use_under_the_supervisor_is_one_clean_line(tmp_path: Path) -> None:
    code, err, port = await _serve_on_a_taken_port(
        tmp_path, "listen: 127.0.0.1:{port}\n", "--workers", "2"
    )
    assert code == 1
    assert err.lower() == f"authproxy: cannot listen on 127.0.0.1:{port}: address already in use\n"


def _edit(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


async def test_token_logs_in_the_configured_format_and_keeps_stdout_for_json(
    tmp_path: Path,
) -> None:
    tokens = FakeTokenEndpoint()
    await tokens.start()
    try:
        path = Path(_token_config(tmp_path, tokens, secret="wrong-secret"))
        code, out, err = await run("token", "-c", str(path), "demo")
        assert code == 1 and out == ""
        assert json.loads(err.splitlines()[0])["event"] == "mint"  # json, the default
        _edit(path, "routes:", "log: {format: console}\nroutes:")
        for flags in ((), ("--log-format", "console")):
            code, out, err = await run("token", "-c", str(path), "demo", *flags)
            assert code == 1 and out == ""
            first = err.splitlines()[0]
            assert first.startswith("[warning  ] mint ") and "client=demo" in first
        code, out, err = await run("token", "-c", str(path), "demo", "--log-format", "json")
        assert json.loads(err.splitlines()[0])["event"] == "mint"  # the flag wins
        _edit(path, "wrong-secret", "demo-secret")
        code, out, err = await run("token", "-c", str(path), "demo")
        assert code == 0 and json.loads(out)["client"] == "demo"  # stdout: only the JSON
    finally:
        await tokens.stop()
