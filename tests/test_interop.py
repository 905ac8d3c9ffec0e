"""Interop with OAuth 2.0 servers nobody here wrote: panva's oidc-provider (an
OpenID Certified implementation) and oauth2-mock-server, run with Node on
loopback. The proxy mints through them with each client authentication method,
and a local partner verifies every bearer it receives against the server's
JWKS (signature, issuer, audience, expiry)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fakes import LocalServer

from conftest import free_port, write_private_key
from proxy.config.load import parse_config
from proxy.server import ProxyServer

INTEROP = Path(__file__).resolve().parent / "interop"
RESOURCE = "https://api.partner.example"
JWT_SECRET = "interop-client-secret-at-least-32-bytes"


def node_ready() -> None:
    if shutil.which("node") and (INTEROP / "node_modules" / "oidc-provider").is_dir():
        return
    reason = "needs node and `npm install --prefix tests/interop` (.ci/run does both)"
    if os.environ.get("AUTHPROXY_REQUIRE_INTEROP"):
        pytest.fail(f"interop servers required here (AUTHPROXY_REQUIRE_INTEROP): {reason}")
    pytest.skip(reason)


class NodeServer:
    def __init__(self, argv: list[str], port: int) -> None:
        self.port = port
        self.process = subprocess.Popen(  # noqa: S603 - our own fixed argv
            argv, cwd=INTEROP, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    async def ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise RuntimeError("the interop server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        assert self.process.stdout is not None
        self.process.stdout.close()


class CountingRelay(LocalServer):
    """Sits in front of a token endpoint: counts calls, can drop expires_in."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.calls = 0
        self.drop_expires_in = False
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.calls += 1
        if self.session is None:
            self.session = aiohttp.ClientSession()
        body = await request.read()
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        async with self.session.post(self.target, data=body, headers=headers) as upstream:
            data = await upstream.read()
            if self.drop_expires_in and upstream.status == 200:
                document = json.loads(data)
                document.pop("expires_in", None)
                data = json.dumps(document).encode()
            return web.Response(status=upstream.status, body=data, content_type="application/json")

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
        await super().stop()


@dataclass
class VerifyingPartner(LocalServer):
    """Accepts a request only if its bearer verifies against the issuer's JWKS."""

    jwks_url: str = ""
    issuer: str = ""
    audience: str | None = None
    verified: list[dict[str, Any]] = field(default_factory=list)
    rejected: int = 0

    def __post_init__(self) -> None:
        super().__init__()
        self._keys: jwt.PyJWKSet | None = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self._keys is None:
            async with aiohttp.ClientSession() as http, http.get(self.jwks_url) as r:
                self._keys = jwt.PyJWKSet.from_dict(await r.json())
        auth = request.headers.get("Authorization", "")
        try:
            token = auth.removeprefix("Bearer ")
            kid = jwt.get_unverified_header(token)["kid"]
            key = next(k for k in self._keys.keys if k.key_id == kid)
            claims = jwt.decode(
                token, key.key, algorithms=["RS256", "PS256", "ES256"], issuer=self.issuer,
                audience=self.audience, options={"verify_aud": self.audience is not None},
            )  # fmt: skip
        except (jwt.PyJWTError, StopIteration, KeyError):
            self.rejected += 1
            return web.json_response({"error": "invalid_token"}, status=401)
        self.verified.append(claims)
        return web.json_response({"ok": True, "client": claims.get("client_id")})


def rsa_key(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "client.pem"
    write_private_key(path, key)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    public.update(kid="interop-key-1", use="sig", alg="RS256")
    return path, public


Factory = Callable[..., Awaitable[Any]]


@pytest.fixture
async def cleanup() -> AsyncIterator[list[Any]]:
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        result = thing()
        if asyncio.iscoroutine(result):
            await result


def client_block(name: str, token_url: str, method: str, extra: str = "") -> str:
    secret = {
        "client_secret_basic": "basic-secret",
        "client_secret_post": "post-secret",
        "client_secret_jwt": JWT_SECRET,
    }.get(method)
    lines = [f"  {name}:", f"    token_url: {token_url}", f"    client_id: {name}",
             f"    auth_method: {method}", "    scope: orders.read", "    mint_attempts: 1"]  # fmt: skip
    if secret:
        lines.append(f"    client_secret: {secret}")
    return "\n".join(lines) + ("\n" + extra if extra else "") + "\n"


async def start_oidc_provider(
    tmp_path: Path, cleanup: list[Any], wrong: str | None = None, *, dpop_nonce: bool = False
) -> tuple[str, CountingRelay, VerifyingPartner, str]:
    node_ready()
    key_path, public_jwk = rsa_key(tmp_path)
    common = {"grant_types": ["client_credentials"], "redirect_uris": [], "response_types": []}
    clients = [
        {**common, "client_id": "basic", "client_secret": "basic-secret", "token_endpoint_auth_method": "client_secret_basic"},
        {**common, "client_id": "post", "client_secret": "post-secret", "token_endpoint_auth_method": "client_secret_post"},
        {**common, "client_id": "hsjwt", "client_secret": JWT_SECRET, "token_endpoint_auth_method": "client_secret_jwt"},
        {**common, "client_id": "pkjwt", "jwks": {"keys": [public_jwk]}, "token_endpoint_auth_method": "private_key_jwt"},
        {**common, "client_id": "dpop", "client_secret": "dpop-secret", "token_endpoint_auth_method": "client_secret_basic",
         "dpop_bound_access_tokens": True},
    ]  # fmt: skip
    port = free_port()
    argv = ["node", "oidc_provider.mjs", str(port), json.dumps(clients)]
    server = NodeServer([*argv, "dpop-nonce"] if dpop_nonce else argv, port)
    cleanup.append(server.stop)
    await server.ready()
    issuer = f"http://127.0.0.1:{port}"
    relay = CountingRelay(f"{issuer}/token")
    await relay.start()
    cleanup.append(relay.stop)
    partner = VerifyingPartner(jwks_url=f"{issuer}/jwks", issuer=issuer, audience=RESOURCE)
    await partner.start()
    cleanup.append(partner.stop)
    return issuer, relay, partner, str(key_path)


async def start_proxy(text: str, cleanup: list[Any]) -> tuple[ProxyServer, aiohttp.ClientSession]:
    proxy = ProxyServer(parse_config(text, "interop.yaml"))
    await proxy.start()
    cleanup.append(proxy.stop)
    http = aiohttp.ClientSession()
    cleanup.append(http.close)
    return proxy, http


def routes(partner: VerifyingPartner, names: list[str]) -> str:
    return "routes:\n" + "".join(
        f"  - name: {n}\n    match: {{path_prefix: /{n}/}}\n    upstream: {partner.url}/\n    client: {n}\n"
        for n in names
    )


async def test_oidc_provider_every_auth_method(tmp_path: Path, cleanup: list[Any]) -> None:
    _, relay, partner, key_path = await start_oidc_provider(tmp_path, cleanup)
    token_url = f"{relay.url}/token"
    text = "listen: 127.0.0.1:0\nclients:\n" + "".join(
        [
            client_block("basic", token_url, "client_secret_basic"),
            client_block("post", token_url, "client_secret_post"),
            client_block("hsjwt", token_url, "client_secret_jwt",
                         # oidc-provider accepts its issuer or the token endpoint as aud;
                         # through the relay the token endpoint URL differs, so name the issuer.
                         f"    assertion_audience: {relay.target.removesuffix('/token')}"),
            client_block("pkjwt", token_url, "private_key_jwt",
                         f"    private_key_file: {key_path}\n    key_id: interop-key-1\n"
                         f"    assertion_audience: {relay.target.removesuffix('/token')}"),
        ]
    ) + routes(partner, ["basic", "post", "hsjwt", "pkjwt"])  # fmt: skip
    proxy, http = await start_proxy(text, cleanup)
    for name in ("basic", "post", "hsjwt", "pkjwt"):
        for _ in range(3):
            async with http.get(f"{proxy.url}/{name}/orders") as response:
                assert response.status == 200, (name, await response.text())
                assert (await response.json())["client"] == name
    assert relay.calls == 4  # one mint per client, reused for the other requests
    assert partner.rejected == 0
    assert [c["client_id"] for c in partner.verified] == [
        n for n in ("basic", "post", "hsjwt", "pkjwt") for _ in range(3)
    ]
    assert all(c["aud"] == RESOURCE and c["exp"] > time.time() for c in partner.verified)


async def test_oidc_provider_wrong_secret_is_named_and_not_stormed(
    tmp_path: Path, cleanup: list[Any]
) -> None:
    _, relay, partner, _ = await start_oidc_provider(tmp_path, cleanup)
    block = client_block("basic", f"{relay.url}/token", "client_secret_basic").replace(
        "basic-secret", "not-the-secret"
    )
    proxy, http = await start_proxy(
        f"listen: 127.0.0.1:0\nclients:\n{block}" + routes(partner, ["basic"]), cleanup
    )
    statuses = []
    for _ in range(20):
        async with http.get(f"{proxy.url}/basic/orders") as response:
            statuses.append(response.status)
            body = await response.json()
    assert statuses == [502] * 20
    assert "invalid_client" in body["message"] and "not-the-secret" not in json.dumps(body)
    assert relay.calls == 1  # cooled down: no retry storm against the real server
    assert partner.verified == [] and partner.rejected == 0


async def test_oidc_provider_wrong_key_is_named_and_not_stormed(
    tmp_path: Path, cleanup: list[Any]
) -> None:
    _, relay, partner, _ = await start_oidc_provider(tmp_path, cleanup)
    other_key, _ = rsa_key(tmp_path / "other")
    block = client_block(
        "pkjwt",
        f"{relay.url}/token",
        "private_key_jwt",
        f"    private_key_file: {other_key}\n    key_id: interop-key-1\n"
        f"    assertion_audience: {relay.target.removesuffix('/token')}",
    )
    proxy, http = await start_proxy(
        f"listen: 127.0.0.1:0\nclients:\n{block}" + routes(partner, ["pkjwt"]), cleanup
    )
    for _ in range(10):
        async with http.get(f"{proxy.url}/pkjwt/orders") as response:
            assert response.status == 502
            body = await response.json()
    assert "invalid_client" in body["message"]
    assert relay.calls == 1
    assert partner.verified == []


async def test_oidc_provider_jwt_exp_used_without_expires_in(
    tmp_path: Path, cleanup: list[Any]
) -> None:
    _, relay, partner, _ = await start_oidc_provider(tmp_path, cleanup)
    relay.drop_expires_in = True
    block = client_block("basic", f"{relay.url}/token", "client_secret_basic")
    proxy, http = await start_proxy(
        f"listen: 127.0.0.1:0\nclients:\n{block}" + routes(partner, ["basic"]), cleanup
    )
    async with http.get(f"{proxy.url}/basic/x") as response:
        assert response.status == 200
    (entry,) = await proxy.token_report()
    # The provider's accessTokenTTL is 600 s; default_lifetime (300 s) would show < 300.
    assert 540 <= entry["expires_in_s"] <= 570


async def test_oauth2_mock_server_as_a_second_implementation(
    tmp_path: Path, cleanup: list[Any]
) -> None:
    node_ready()
    port = free_port()
    server = NodeServer(
        ["node", "node_modules/oauth2-mock-server/dist/oauth2-mock-server.mjs", "-a", "127.0.0.1", "-p", str(port)],
        port,
    )  # fmt: skip
    cleanup.append(server.stop)
    await server.ready()
    partner = VerifyingPartner(
        jwks_url=f"http://127.0.0.1:{port}/jwks", issuer=f"http://localhost:{port}"
    )
    await partner.start()
    cleanup.append(partner.stop)
    text = (
        "listen: 127.0.0.1:0\nclients:\n"
        + client_block("basic", f"http://127.0.0.1:{port}/token", "client_secret_basic")
        + client_block("post", f"http://127.0.0.1:{port}/token", "client_secret_post")
        + routes(partner, ["basic", "post"])
    )
    proxy, http = await start_proxy(text, cleanup)
    for name in ("basic", "post", "basic", "post"):
        async with http.get(f"{proxy.url}/{name}/x") as response:
            assert response.status == 200, await response.text()
    assert len(partner.verified) == 4 and partner.rejected == 0
    assert proxy.sources is not None
    assert sorted(source.mints for _, source in proxy.sources.all()) == [1, 1]


@dataclass
class DpopVerifyingPartner(VerifyingPartner):
    """A resource server for DPoP-bound JWT access tokens (RFC 9449 §7): the
    token verifies against the issuer's JWKS, the proof against its own key
    (typ, htm, htu, iat, a jti never seen, ath), the token's ``cnf.jkt`` is
    the proof key's thumbprint, and the proof carries this partner's nonce."""

    nonce: str = "rs-nonce-1"
    jtis: set[str] = field(default_factory=set)
    refused: list[str] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        from test_dpop import verify_proof

        if self._keys is None:
            async with aiohttp.ClientSession() as http, http.get(self.jwks_url) as r:
                self._keys = jwt.PyJWKSet.from_dict(await r.json())
        body = await request.read()
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")

        def refuse(error: str, why: str) -> web.Response:
            self.refused.append(why)
            headers = {"WWW-Authenticate": f'DPoP error="{error}", error_description="{why}"'}
            if error == "use_dpop_nonce":
                headers["DPoP-Nonce"] = self.nonce
            return web.Response(status=401, headers=headers)

        try:
            kid = jwt.get_unverified_header(token)["kid"]
            key = next(k for k in self._keys.keys if k.key_id == kid)
            claims = jwt.decode(
                token, key.key, algorithms=["RS256", "PS256", "ES256"], issuer=self.issuer,
                audience=self.audience,
            )  # fmt: skip
            proof = verify_proof(
                request.headers.get("DPoP"), request.method, f"{self.url}{request.path}"
            )
        except (jwt.PyJWTError, StopIteration, KeyError, ValueError) as exc:
            return refuse("invalid_token", type(exc).__name__)
        if scheme != "DPoP":
            return refuse("invalid_token", f"scheme {scheme}")
        if proof["jti"] in self.jtis:
            return refuse("invalid_dpop_proof", "jti replayed")
        self.jtis.add(proof["jti"])
        ath = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).decode().rstrip("=")
        if proof.get("ath") != ath:
            return refuse("invalid_dpop_proof", "ath")
        if claims.get("cnf", {}).get("jkt") != proof["_jkt"]:
            return refuse("invalid_token", "cnf.jkt is not the proof key")
        if proof.get("nonce") != self.nonce:
            return refuse("use_dpop_nonce", "nonce")
        self.verified.append(claims)
        self.bodies.append(body)
        return web.json_response({"ok": True, "client": claims.get("client_id")})


@pytest.mark.parametrize("as_nonce", [False, True], ids=["no-as-nonce", "as-nonce"])
async def test_oidc_provider_dpop_bound_tokens(
    tmp_path: Path, cleanup: list[Any], as_nonce: bool
) -> None:
    """RFC 9449 against a certified server: the proxy mints DPoP-bound JWT access
    tokens (with and without the server's nonce), and a resource server that
    checks everything accepts every request; its own nonce challenge is
    answered once, with the same body."""
    issuer, _, _, _ = await start_oidc_provider(tmp_path, cleanup, dpop_nonce=as_nonce)
    partner = DpopVerifyingPartner(jwks_url=f"{issuer}/jwks", issuer=issuer, audience=RESOURCE)
    await partner.start()
    cleanup.append(partner.stop)
    key = tmp_path / "dpop.pem"
    write_private_key(key, ec.generate_private_key(ec.SECP256R1()))
    block = client_block(
        "dpop", f"{issuer}/token", "client_secret_basic", f"    dpop: {{key_file: {key}}}"
    ).replace("basic-secret", "dpop-secret")
    proxy, http = await start_proxy(
        f"listen: 127.0.0.1:0\nclients:\n{block}" + routes(partner, ["dpop"]), cleanup
    )
    async with http.post(f"{proxy.url}/dpop/orders", data=b"first") as response:
        assert response.status == 200, await response.text()

    async def one(i: int) -> int:
        async with http.get(f"{proxy.url}/dpop/orders/{i}") as response:
            return response.status

    assert await asyncio.gather(*(one(i) for i in range(50))) == [200] * 50
    assert partner.refused == ["nonce"]  # the partner's own nonce, once
    assert partner.bodies[0] == b"first"
    assert len(partner.verified) == 51 and len(partner.jtis) == 52
    assert {c["cnf"]["jkt"] for c in partner.verified} == {thumbprint_of(key)}
    assert proxy.sources is not None
    assert [source.mints for _, source in proxy.sources.all()] == [1]


def thumbprint_of(path: Path) -> str:
    from cryptography.hazmat.primitives import serialization
    from test_dpop import thumbprint

    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return thumbprint(json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key())))


async def test_oidc_provider_certificate_bound_tokens(tmp_path: Path, cleanup: list[Any]) -> None:
    """RFC 8705 against a certified server: self_signed_tls_client_auth over
    real mutual TLS, JWT access tokens bound to the client certificate
    (cnf.x5t#S256), and a partner that accepts each only over a connection
    presenting that certificate; the proxy presents it on its own
    (certificate_bound: true)."""
    node_ready()
    from cryptography.hazmat.primitives import serialization
    from test_cert_bound import x5t
    from test_tls import Pki, _cert

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("interop CA", ca_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    paths = Pki(
        *(tmp_path / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")),
        issuer=(ca.subject, ca_key),
    )
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(
        _cert("127.0.0.1", server_key, (ca.subject, ca_key), ip="127.0.0.1").public_bytes(
            serialization.Encoding.PEM
        )
    )
    write_private_key(paths.server_key, server_key)
    # A self-signed client certificate, registered by its thumbprint (RFC 8705 §2.2).
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _cert("mtls-client", client_key, None)
    paths.client_cert.write_bytes(client_cert.public_bytes(serialization.Encoding.PEM))
    write_private_key(paths.client_key, client_key)
    der = client_cert.public_bytes(serialization.Encoding.DER)
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(client_key.public_key()))
    jwk["x5t#S256"] = x5t(der)
    jwk["x5c"] = [base64.b64encode(der).decode()]
    clients = [{
        "client_id": "mtls", "grant_types": ["client_credentials"], "redirect_uris": [],
        "response_types": [], "token_endpoint_auth_method": "self_signed_tls_client_auth",
        "tls_client_certificate_bound_access_tokens": True, "jwks": {"keys": [jwk]},
    }]  # fmt: skip
    port = free_port()
    server = NodeServer(
        ["node", "oidc_provider.mjs", str(port), json.dumps(clients), "-",
         str(paths.server_cert), str(paths.server_key)],
        port,
    )  # fmt: skip
    cleanup.append(server.stop)
    await server.ready()
    issuer = f"https://127.0.0.1:{port}"
    trust = ssl.create_default_context(cafile=str(paths.ca))
    async with aiohttp.ClientSession() as http, http.get(f"{issuer}/jwks", ssl=trust) as r:
        keys = jwt.PyJWKSet.from_dict(await r.json())
    verified: list[dict[str, Any]] = []
    refused: list[str] = []

    async def api(request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        peer = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        try:
            kid = jwt.get_unverified_header(token)["kid"]
            key = next(k for k in keys.keys if k.key_id == kid)
            claims = jwt.decode(token, key.key, algorithms=["RS256", "PS256", "ES256"],
                                issuer=issuer, audience=RESOURCE)  # fmt: skip
        except (jwt.PyJWTError, StopIteration, KeyError) as exc:
            refused.append(type(exc).__name__)
            return web.Response(status=401)
        if peer is None or claims.get("cnf", {}).get("x5t#S256") != x5t(peer):
            refused.append("certificate")
            return web.Response(status=401)
        verified.append(claims)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", api)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    cleanup.append(runner.cleanup)
    partner_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    partner_tls.load_cert_chain(paths.server_cert, paths.server_key)
    partner_tls.verify_mode = ssl.CERT_OPTIONAL
    partner_tls.load_verify_locations(paths.client_cert)  # the self-signed client, trusted here
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=partner_tls)
    await site.start()
    partner_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    text = f"""listen: 127.0.0.1:0
clients:
  mtls:
    token_url: {issuer}/token
    client_id: mtls
    auth_method: self_signed_tls_client_auth
    scope: orders.read
    mint_attempts: 1
    ca_file: {paths.ca}
    client_cert_file: {paths.client_cert}
    client_key_file: {paths.client_key}
    certificate_bound: true
routes:
  - name: mtls
    match: {{path_prefix: /mtls/}}
    upstream: https://127.0.0.1:{partner_port}/
    client: mtls
    ca_file: {paths.ca}
"""
    proxy, http = await start_proxy(text, cleanup)
    for i in range(5):
        async with http.get(f"{proxy.url}/mtls/orders/{i}") as response:
            assert response.status == 200, await response.text()
    assert refused == [] and len(verified) == 5
    assert {c["cnf"]["x5t#S256"] for c in verified} == {x5t(der)}
    assert proxy.sources is not None
    assert [source.mints for _, source in proxy.sources.all()] == [1]
