"""Certificate-bound access tokens (RFC 8705 §3, issue 15): real mutual TLS
on loopback with a CA made in the test. The token endpoint binds each JWT
access token to the client certificate of its TLS connection
(``cnf.x5t#S256``); the partner accepts a token only over a connection that
presents that same certificate."""

from __future__ import annotations

import base64
import hashlib
import secrets
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from test_tls import Pki, pki  # noqa: F401 - the fixture

from conftest import log_events
from proxy.config.load import load_config, parse_config
from proxy.errors import ConfigError
from proxy.server import ProxyServer

SIGNING = "cert-bound-test-signing-key-of-32-bytes"


def x5t(der: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def peer_der(request: web.Request) -> bytes | None:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    return ssl_object.getpeercert(binary_form=True) if ssl_object else None


@dataclass
class BoundServers:
    pki: Pki
    wrong_binding: bool = False  # bind tokens to another certificate
    mints: int = 0
    forms: list[dict[str, str]] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)  # accepted requests' paths
    refused: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    runners: list[web.AppRunner] = field(default_factory=list)

    async def start(self) -> None:
        for name, handler in (("as", self.token), ("rs", self.api)):
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handler)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=self.pki.server_context(True))
            await site.start()
            self.ports[name] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.runners.append(runner)

    async def stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()

    async def token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.forms.append({k: str(v) for k, v in form.items()})
        der = peer_der(request)
        assert der is not None and "client_secret" not in form
        bound = x5t(der) if not self.wrong_binding else x5t(b"another certificate")
        self.mints += 1
        claims = {"sub": form["client_id"], "jti": secrets.token_hex(8), "cnf": {"x5t#S256": bound}}
        token = jwt.encode(claims, SIGNING, algorithm="HS256")
        return web.json_response({"access_token": token, "token_type": "Bearer", "expires_in": 600})

    async def api(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        der = peer_der(request)
        try:
            claims = jwt.decode(token, SIGNING, algorithms=["HS256"])
        except jwt.PyJWTError:
            self.refused.append("not our token")
            return web.Response(status=401)
        if der is None or claims["cnf"]["x5t#S256"] != x5t(der):
            self.refused.append("no certificate or another one")
            return web.Response(
                status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        self.seen.append(request.path)
        return web.json_response({"ok": True})


@pytest.fixture
async def bound(pki: Pki) -> AsyncIterator[BoundServers]:  # noqa: F811
    servers = BoundServers(pki)
    await servers.start()
    yield servers
    await servers.stop()


def config(
    servers: BoundServers, *, method: str = "tls_client_auth", bound: str = "true", route: str = ""
) -> str:
    p = servers.pki
    return f"""
listen: 127.0.0.1:0
clients:
  bank:
    token_url: https://127.0.0.1:{servers.ports["as"]}/token
    client_id: bank-client
    auth_method: {method}
    ca_file: {p.ca}
    client_cert_file: {p.client_cert}
    client_key_file: {p.client_key}
    certificate_bound: {bound}
routes:
  - name: bank
    match: {{path_prefix: /bank/}}
    upstream: https://127.0.0.1:{servers.ports["rs"]}/api/
    client: bank
    ca_file: {p.ca}
{route}
"""


async def serve(text: str) -> tuple[ProxyServer, Any]:
    proxy = ProxyServer(parse_config(text, "test.yaml"))
    await proxy.start()
    return proxy, proxy.stop


@pytest.mark.parametrize("method", ["tls_client_auth", "self_signed_tls_client_auth"])
async def test_a_certificate_bound_token_goes_with_the_bound_certificate(
    bound: BoundServers, method: str
) -> None:
    proxy, stop = await serve(config(bound, method=method))
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(3):
                async with http.get(f"{proxy.url}/bank/x{i}") as answer:
                    assert answer.status == 200, await answer.text()
    finally:
        await stop()
    assert bound.seen == ["/api/x0", "/api/x1", "/api/x2"] and bound.refused == []
    assert bound.mints == 1
    assert bound.forms[0]["client_id"] == "bank-client"


async def test_an_undeclared_certificate_bound_token_still_goes_with_the_certificate(
    bound: BoundServers, log_stream: Any
) -> None:
    """Detected in the token (cnf.x5t#S256) rather than declared: the route
    presents the client's certificate all the same (a TLS client method's
    routes always can), and the proxy says once to declare it."""
    proxy, stop = await serve(config(bound, bound="false"))
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(2):
                async with http.get(f"{proxy.url}/bank/x") as answer:
                    assert answer.status == 200
    finally:
        await stop()
    assert len(bound.seen) == 2 and bound.refused == []
    warnings = [e for e in log_events(log_stream) if e["event"] == "certificate_bound_token"]
    assert len(warnings) == 1 and "certificate_bound: true" in warnings[0]["reason"]


async def test_a_token_bound_to_another_certificate_is_never_sent(bound: BoundServers) -> None:
    bound.wrong_binding = True
    proxy, stop = await serve(config(bound))
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/bank/x") as answer:
            assert answer.status == 502
            document = await answer.json()
    finally:
        await stop()
    assert document["error"] == "token_response_invalid"
    assert "cnf.x5t#S256" in document["message"]
    assert bound.seen == [] and bound.refused == []  # nothing reached the partner


def test_a_route_with_another_certificate_is_a_config_error(
    bound: BoundServers, tmp_path: Path
) -> None:
    bound.pki.issue_client()  # a new certificate at the same paths...
    other_cert = tmp_path / "other.pem"
    other_key = tmp_path / "other.key"
    other_cert.write_bytes(bound.pki.client_cert.read_bytes())
    other_key.write_bytes(bound.pki.client_key.read_bytes())
    other_key.chmod(0o600)
    bound.pki.issue_client()  # ...and the client's own is another one again
    route = f"    client_cert_file: {other_cert}\n    client_key_file: {other_key}"
    with pytest.raises(
        ConfigError, match=r"routes\[0\]\.client_cert_file: client 'bank' has certificate-bound"
    ):
        parse_config(config(bound, route=route), "test.yaml")


def test_certificate_bound_needs_a_tls_client_method(bound: BoundServers) -> None:
    text = config(bound, method="client_secret_basic").replace(
        "    certificate_bound: true", "    certificate_bound: true\n    client_secret: s"
    )
    with pytest.raises(ConfigError, match="certificate_bound: needs auth_method tls_client_auth"):
        parse_config(text, "test.yaml")


def test_the_thumbprint_is_the_certificates(bound: BoundServers) -> None:
    client = parse_config(config(bound), "test.yaml").clients["bank"]
    der = ssl.PEM_cert_to_DER_cert(bound.pki.client_cert.read_text())
    assert client.certificate_thumbprint == x5t(der)


async def test_a_rotated_certificate_never_carries_the_old_certificates_token(
    bound: BoundServers, tmp_path: Path
) -> None:
    """A new client certificate: the token bound to the old one is not bridged
    (make-before-break is for credentials, not for a binding)."""
    path = tmp_path / "proxy.yaml"
    path.write_text(config(bound))
    proxy = ProxyServer(load_config(str(path)))
    await proxy.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{proxy.url}/bank/a") as answer:
                assert answer.status == 200
            bound.pki.issue_client()
            assert proxy.reload_from_file().ok
            async with http.get(f"{proxy.url}/bank/b") as answer:
                assert answer.status == 200, bound.refused
    finally:
        await proxy.stop()
    assert bound.refused == [] and bound.mints == 2
