"""DPoP (RFC 9449, issue 15) end to end on loopback: the real proxy between
a token endpoint that binds tokens to the proof's key and a partner that
checks every request as a resource server must (the proof's signature with
its embedded key, typ, htm, htu, iat, a jti never seen, ath, the token's
bound thumbprint, its own nonce)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from conftest import eventually, log_events, samples, value, write_private_key
from proxy.config.load import load_config, parse_config
from proxy.errors import ConfigError
from proxy.server import ProxyServer


def thumbprint(jwk: dict[str, Any]) -> str:
    required = {
        "EC": ("crv", "kty", "x", "y"),
        "RSA": ("e", "kty", "n"),
        "OKP": ("crv", "kty", "x"),
    }
    members = {k: jwk[k] for k in required[jwk["kty"]]}
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).decode().rstrip("=")


def verify_proof(proof: str | None, method: str, url: str) -> dict[str, Any]:
    """RFC 9449 §4.3 as a server checks it; raises ValueError saying why."""
    if not proof:
        raise ValueError("no DPoP proof")
    header = jwt.get_unverified_header(proof)
    if header.get("typ") != "dpop+jwt" or "jwk" not in header:
        raise ValueError("not a dpop+jwt with a jwk")
    if any(k in header["jwk"] for k in ("d", "p", "q")):
        raise ValueError("a private key in the proof")
    key = jwt.PyJWK(header["jwk"]).key
    claims = jwt.decode(proof, key, algorithms=[header["alg"]], options={"verify_aud": False})
    if claims.get("htm") != method or claims.get("htu") != url:
        raise ValueError(f"htm/htu {claims.get('htm')} {claims.get('htu')} for {method} {url}")
    if abs(claims["iat"] - time.time()) > 60:
        raise ValueError("iat outside the window")
    return {**claims, "_jkt": thumbprint(header["jwk"]), "_alg": header["alg"]}


@dataclass
class DpopServers:
    """A token endpoint and a partner that speak DPoP."""

    as_nonce: str | None = None  # the token endpoint asks for this nonce when set
    rs_nonce: str | None = None  # the partner asks for this nonce when set
    token_type: str = "DPoP"
    bound: dict[str, str] = field(default_factory=dict)  # token -> jkt
    jtis: set[str] = field(default_factory=set)
    token_calls: int = 0
    mints: int = 0
    token_proofs: list[dict[str, Any]] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)  # accepted partner requests
    refused: list[str] = field(default_factory=list)
    expired: set[str] = field(default_factory=set)
    stale_nonce: bool = False  # ask for rs_nonce even when the proof carries it
    jwt_jkt: str | None = None  # issue JWT access tokens with this cnf.jkt
    dpop_fields: list[int] = field(default_factory=list)  # DPoP fields per partner request
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self.token)
        app.router.add_route("*", "/api/{tail:.*}", self.api)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def _fresh_jti(self, claims: dict[str, Any]) -> None:
        if claims["jti"] in self.jtis:
            raise ValueError("jti seen before")
        self.jtis.add(claims["jti"])

    async def token(self, request: web.Request) -> web.Response:
        self.token_calls += 1
        form = await request.post()
        assert request.headers.get("Authorization", "").startswith("Basic ")
        assert form.get("grant_type") == "client_credentials"
        try:
            claims = verify_proof(request.headers.get("DPoP"), "POST", f"{self.url}/token")
            self._fresh_jti(claims)
        except (ValueError, jwt.PyJWTError) as exc:
            return web.json_response(
                {"error": "invalid_dpop_proof", "error_description": str(exc)}, status=400
            )
        self.token_proofs.append(claims)
        if self.as_nonce is not None and claims.get("nonce") != self.as_nonce:
            return web.json_response(
                {"error": "use_dpop_nonce", "error_description": "nonce required"},
                status=400,
                headers={"DPoP-Nonce": self.as_nonce},
            )
        token = "dpop-" + secrets.token_urlsafe(12)
        if self.jwt_jkt is not None:
            token = jwt.encode(
                {"jti": token, "cnf": {"jkt": self.jwt_jkt}}, "k" * 32, algorithm="HS256"
            )
        self.bound[token] = claims["_jkt"]
        self.mints += 1
        return web.json_response(
            {"access_token": token, "token_type": self.token_type, "expires_in": 3600}
        )

    async def api(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.dpop_fields.append(len(request.headers.getall("DPoP", [])))
        if len(request.headers.getall("DPoP", [])) > 1:  # RFC 9449 §4.3, check 1
            return web.Response(status=400)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        url = f"{self.url}{request.raw_path.split('?', 1)[0]}"

        def refuse(error: str, why: str, **headers: str) -> web.Response:
            self.refused.append(why)
            return web.Response(
                status=401,
                headers={
                    "WWW-Authenticate": f'DPoP error="{error}", error_description="{why}"',
                    **headers,
                },
            )

        if scheme != "DPoP" or token not in self.bound:
            return refuse("invalid_token", f"not a DPoP token we issued ({scheme})")
        try:
            claims = verify_proof(request.headers.get("DPoP"), request.method, url)
            self._fresh_jti(claims)
        except (ValueError, jwt.PyJWTError) as exc:
            return refuse("invalid_dpop_proof", str(exc))
        ath = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).decode().rstrip("=")
        if claims.get("ath") != ath:
            return refuse("invalid_dpop_proof", "ath does not match the token")
        if claims["_jkt"] != self.bound[token]:
            return refuse("invalid_token", "the proof key is not the key the token is bound to")
        if self.rs_nonce is not None and claims.get("nonce") != self.rs_nonce:
            return refuse("use_dpop_nonce", "nonce required", **{"DPoP-Nonce": self.rs_nonce})
        if self.rs_nonce is not None and self.stale_nonce:
            return refuse(
                "use_dpop_nonce", "nonce required (stale)", **{"DPoP-Nonce": self.rs_nonce}
            )
        if token in self.expired:
            return refuse("invalid_token", "The access token expired")
        self.seen.append({**claims, "_token": token, "_body": body})
        return web.json_response({"path": request.raw_path, "length": len(body)})


@pytest.fixture
async def servers() -> AsyncIterator[DpopServers]:
    found = DpopServers()
    await found.start()
    yield found
    await found.stop()


def config_text(servers: DpopServers, key_file: Path, extra: str = "") -> str:
    return f"""
listen: 127.0.0.1:0
clients:
  bank:
    token_url: {servers.url}/token
    client_id: demo-client
    client_secret_file: {key_file.parent / "secret"}
    dpop:
      key_file: {key_file}
{extra}
routes:
  - name: bank
    match: {{path_prefix: /bank/}}
    upstream: {servers.url}/api/
    client: bank
"""


@pytest.fixture
def dpop_key(tmp_path: Path) -> Path:
    path = tmp_path / "dpop.pem"
    write_private_key(path, ec.generate_private_key(ec.SECP256R1()))
    (tmp_path / "secret").write_text("demo-secret")
    (tmp_path / "secret").chmod(0o600)
    return path


@pytest.fixture
async def proxy_for(
    servers: DpopServers, dpop_key: Path, log_stream: Any, tmp_path: Path
) -> AsyncIterator[Any]:
    started: list[ProxyServer] = []

    async def start(extra: str = "", key: Path | None = None) -> ProxyServer:
        path = tmp_path / "proxy.yaml"
        path.write_text(config_text(servers, key or dpop_key, extra))
        proxy = ProxyServer(load_config(str(path)))
        await proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()


def metric(proxy: ProxyServer, name: str, **labels: str) -> float:
    return value(samples(proxy.metrics.render().decode()), name, **labels)


async def test_a_dpop_client_mints_with_a_proof_and_proves_every_request(
    servers: DpopServers, proxy_for: Any, dpop_key: Path
) -> None:
    proxy = await proxy_for()
    async with aiohttp.ClientSession() as http:
        for i in range(3):
            async with http.post(f"{proxy.url}/bank/pay?n={i}", data=b"amount=%d" % i) as answer:
                assert answer.status == 200, await answer.text()
    assert servers.mints == 1 and servers.token_calls == 1
    (token_proof,) = servers.token_proofs
    assert token_proof["htm"] == "POST" and "ath" not in token_proof
    assert len(servers.seen) == 3 and servers.refused == []
    assert {s["htu"] for s in servers.seen} == {f"{servers.url}/api/pay"}  # no query
    assert len({s["jti"] for s in servers.seen}) == 3
    assert [s["_body"] for s in servers.seen] == [b"amount=0", b"amount=1", b"amount=2"]
    jkt = {s["_jkt"] for s in servers.seen} | {token_proof["_jkt"]}
    assert len(jkt) == 1


async def test_the_token_endpoints_nonce_is_used_within_one_mint(
    servers: DpopServers, proxy_for: Any
) -> None:
    servers.as_nonce = "as-nonce-1"
    proxy = await proxy_for()
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/bank/x") as answer:
        assert answer.status == 200, await answer.text()
    assert servers.token_calls == 2 and servers.mints == 1
    assert [p.get("nonce") for p in servers.token_proofs] == [None, "as-nonce-1"]
    assert metric(proxy, "authproxy_token_mints_total", client="bank", outcome="success") == 1


async def test_two_hundred_concurrent_requests_one_mint_two_hundred_proofs(
    servers: DpopServers, proxy_for: Any
) -> None:
    proxy = await proxy_for()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(i: int) -> int:
            async with http.get(f"{proxy.url}/bank/n/{i}") as answer:
                await answer.read()
                return answer.status

        statuses = await asyncio.gather(*(one(i) for i in range(200)))
    assert statuses == [200] * 200
    assert servers.mints == 1
    assert len({s["jti"] for s in servers.seen}) == 200 and servers.refused == []


async def test_a_partner_nonce_challenge_is_replayed_once_with_the_same_body(
    servers: DpopServers, proxy_for: Any, log_stream: Any
) -> None:
    servers.rs_nonce = "rs-nonce-1"
    proxy = await proxy_for()
    body = os.urandom(3000)
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{proxy.url}/bank/doc", data=body) as answer:
            assert answer.status == 200, await answer.text()
        async with http.put(f"{proxy.url}/bank/doc", data=body) as answer:  # the nonce is known now
            assert answer.status == 200
    assert servers.refused == ["nonce required"]
    assert [s["_body"] for s in servers.seen] == [body, body]
    assert [s.get("nonce") for s in servers.seen] == ["rs-nonce-1", "rs-nonce-1"]
    assert servers.mints == 1
    assert metric(proxy, "authproxy_dpop_nonce_replays_total", route="bank") == 1
    lines = [e for e in log_events(log_stream) if e["event"] == "access"]
    assert lines[0]["replay"] == "nonce" and lines[0]["replayed"] is True


async def test_a_nonce_challenge_repeating_the_known_nonce_is_not_replayed_again(
    servers: DpopServers, proxy_for: Any
) -> None:
    """A partner that keeps asking for the nonce the proof already carries gets
    its 401 passed on: one replay, never a loop."""
    servers.rs_nonce = "rs-nonce-1"
    servers.stale_nonce = True
    proxy = await proxy_for()
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/bank/a") as answer:
        assert answer.status == 401
        assert "use_dpop_nonce" in answer.headers["WWW-Authenticate"]
    assert servers.refused == ["nonce required", "nonce required (stale)"]
    assert metric(proxy, "authproxy_dpop_nonce_replays_total", route="bank") == 1
    assert servers.mints == 1


async def test_an_expired_dpop_token_is_reminted_once_with_a_new_proof(
    servers: DpopServers, proxy_for: Any
) -> None:
    proxy = await proxy_for()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/bank/a") as answer:
            assert answer.status == 200
        servers.expired.update(servers.bound)
        async with http.post(f"{proxy.url}/bank/b", data=b"payload") as answer:
            assert answer.status == 200, await answer.text()
    assert servers.mints == 2
    assert servers.refused == ["The access token expired"]
    first, second = servers.seen
    assert second["_token"] != first["_token"] and second["_body"] == b"payload"
    assert second["ath"] != first["ath"]


async def test_a_bearer_answer_to_a_dpop_client_is_used_as_bearer_with_one_warning(
    servers: DpopServers, proxy_for: Any, log_stream: Any
) -> None:
    servers.token_type = "Bearer"
    proxy = await proxy_for()
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/bank/a") as answer:
        assert answer.status == 401  # this partner wants DPoP: a Bearer token is refused
    assert servers.refused == ["not a DPoP token we issued (Bearer)"]
    warnings = [e for e in log_events(log_stream) if e["event"] == "dpop_answered_bearer"]
    assert len(warnings) == 1 and warnings[0]["client"] == "bank"


async def test_a_proof_of_another_key_is_refused_and_the_proxy_never_makes_one(
    servers: DpopServers, proxy_for: Any, dpop_key: Path, tmp_path: Path
) -> None:
    proxy = await proxy_for()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/bank/a") as answer:
            assert answer.status == 200
        (token,) = servers.bound
        # The partner's check works: a proof of another key for the same token is refused.
        other = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(other.public_key()))
        ath = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).decode().rstrip("=")
        forged = jwt.encode(
            {
                "jti": "forged",
                "htm": "GET",
                "htu": f"{servers.url}/api/a",
                "iat": int(time.time()),
                "ath": ath,
            },
            other,
            algorithm="ES256",
            headers={"typ": "dpop+jwt", "jwk": jwk},
        )
        async with http.get(
            f"{servers.url}/api/a", headers={"Authorization": f"DPoP {token}", "DPoP": forged}
        ) as answer:
            assert answer.status == 401
    assert servers.refused == ["the proof key is not the key the token is bound to"]
    assert {s["_jkt"] for s in servers.seen} == {servers.bound[token]}


async def test_a_new_key_at_the_same_path_means_a_new_token(
    servers: DpopServers, proxy_for: Any, dpop_key: Path
) -> None:
    proxy = await proxy_for()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/bank/a") as answer:
            assert answer.status == 200
        write_private_key(dpop_key, ec.generate_private_key(ec.SECP256R1()))
        assert proxy.reload_from_file().ok
        async with http.get(f"{proxy.url}/bank/b") as answer:
            assert answer.status == 200, await answer.text()
    assert servers.mints == 2
    assert len({s["_jkt"] for s in servers.seen}) == 2
    assert servers.refused == []


@pytest.mark.parametrize(
    ("make", "alg"),
    [
        (lambda: rsa.generate_private_key(65537, 2048), "PS256"),
        (lambda: rsa.generate_private_key(65537, 2048), "RS256"),
        (lambda: ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
    ],
)
async def test_rsa_and_ed25519_keys_sign_proofs_a_server_accepts(
    servers: DpopServers, proxy_for: Any, tmp_path: Path, make: Any, alg: str
) -> None:
    key = tmp_path / "other.pem"
    write_private_key(key, make())
    extra = f"      alg: {alg}" if alg == "RS256" else ""
    proxy = await proxy_for(extra=extra, key=key)
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/bank/a") as answer:
        assert answer.status == 200, await answer.text()
    assert servers.seen[0]["_alg"] == alg


async def test_no_key_token_or_proof_in_any_log_line(
    servers: DpopServers, proxy_for: Any, dpop_key: Path, log_stream: Any
) -> None:
    servers.as_nonce = "as-n"
    servers.rs_nonce = "rs-n"
    proxy = await proxy_for()
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/bank/a") as answer:
        assert answer.status == 200
    await eventually(lambda: any(e["event"] == "access" for e in log_events(log_stream)))
    text = log_stream.getvalue() + proxy.metrics.render().decode()
    (token,) = servers.bound
    assert token not in text
    key_lines = [line for line in dpop_key.read_text().splitlines() if "-----" not in line]  # noqa: ASYNC240
    assert not any(line in text for line in key_lines)
    assert not any(s["jti"] in text for s in servers.seen)  # no proof either


@pytest.mark.parametrize(
    ("make", "alg", "message"),
    [
        (lambda: ec.generate_private_key(ec.SECP384R1()), None, "must be P-256"),
        (lambda: rsa.generate_private_key(65537, 1024), None, "2048 bits"),  # noqa: S505 - refused
        (lambda: ec.generate_private_key(ec.SECP256R1()), "PS256", "does not fit"),
        (lambda: ed25519.Ed25519PrivateKey.generate(), "ES256", "does not fit"),
    ],
)
def test_a_key_that_cannot_sign_proofs_is_a_config_error_naming_the_file(
    servers: DpopServers, tmp_path: Path, make: Any, alg: str | None, message: str
) -> None:
    key = tmp_path / "k.pem"
    write_private_key(key, make())
    (tmp_path / "secret").write_text("demo-secret")
    extra = f"      alg: {alg}" if alg else ""
    with pytest.raises(ConfigError, match=message) as caught:
        parse_config(config_text(servers, key, extra), "test.yaml")
    assert "clients.bank.dpop.key_file" in str(caught.value) and str(key) in str(caught.value)


def test_a_dpop_route_must_send_the_token_in_authorization(
    servers: DpopServers, dpop_key: Path
) -> None:
    text = config_text(servers, dpop_key).replace(
        "    client: bank\n", "    client: bank\n    token_header: X-Api-Token\n"
    )
    with pytest.raises(ConfigError, match="DPoP tokens, which go in Authorization"):
        parse_config(text, "test.yaml")


async def test_a_token_bound_to_another_dpop_key_is_never_sent(
    servers: DpopServers, proxy_for: Any
) -> None:
    """A JWT access token whose cnf.jkt names another key is refused at mint."""
    other = ec.generate_private_key(ec.SECP256R1())
    jkt = thumbprint(json.loads(jwt.algorithms.ECAlgorithm.to_jwk(other.public_key())))
    servers.jwt_jkt = jkt
    proxy = await proxy_for()
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/bank/a") as answer:
        assert answer.status == 502
        document = await answer.json()
    assert document["error"] == "token_response_invalid" and "cnf.jkt" in document["message"]
    assert servers.seen == [] and servers.refused == []


async def test_a_partner_rotating_its_nonce_under_load_costs_no_app_a_401(
    servers: DpopServers, proxy_for: Any
) -> None:
    """Fifty requests in flight all meet the new nonce: each is replayed once
    (the nonce is new to each request, whichever stored it first)."""
    servers.rs_nonce = "rs-nonce-1"
    proxy = await proxy_for()
    async with aiohttp.ClientSession() as http, http.get(f"{proxy.url}/bank/warm") as answer:
        assert answer.status == 200
    servers.rs_nonce = "rs-nonce-2"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def one(i: int) -> int:
            async with http.get(f"{proxy.url}/bank/n/{i}") as answer:
                await answer.read()
                return answer.status

        assert await asyncio.gather(*(one(i) for i in range(50))) == [200] * 50
    assert {s.get("nonce") for s in servers.seen[1:]} == {"rs-nonce-2"}


async def test_two_scopes_minting_at_once_both_use_the_token_endpoints_nonce(
    servers: DpopServers, dpop_key: Path, tmp_path: Path
) -> None:
    servers.as_nonce = "as-nonce-1"
    text = (
        config_text(servers, dpop_key)
        + f"""
  - name: bank2
    match: {{path_prefix: /bank2/}}
    upstream: {servers.url}/api/
    client: bank
    scope: other
"""
    )
    proxy = ProxyServer(parse_config(text, "test.yaml"))
    await proxy.start()
    try:
        async with aiohttp.ClientSession() as http:

            async def one(path: str) -> int:
                async with http.get(f"{proxy.url}/{path}/x") as answer:
                    return answer.status

            assert await asyncio.gather(one("bank"), one("bank2")) == [200, 200]
    finally:
        await proxy.stop()
    assert servers.mints == 2


async def test_an_apps_own_dpop_header_never_reaches_the_partner(
    servers: DpopServers, proxy_for: Any
) -> None:
    proxy = await proxy_for()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{proxy.url}/bank/a", headers={"DPoP": "app-supplied-proof"}) as answer,
    ):
        assert answer.status == 200  # one proof, the proxy's: a second would be refused
    assert servers.dpop_fields == [1]
