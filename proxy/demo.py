"""``authproxy demo``: the whole lifecycle in a few seconds, with no partner
and no secrets. Starts a mock token endpoint and a mock partner API on free
loopback ports, the real proxy in front of them, and narrates what happens.

The two mocks here are the demo's own and as small as it needs; the behaviour
tests have fuller doubles with failure modes (tests/fakes.py), built on
:class:`LocalServer`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
from aiohttp import web

from proxy.config.load import parse_config
from proxy.log import configure_logging
from proxy.server import ProxyServer, bound_port

# RFC 6750 §3 challenges: only the first one is an expired token the proxy re-mints for.
EXPIRED_CHALLENGE = (
    'Bearer realm="partner", error="invalid_token", error_description="The access token expired"'
)
REVOKED_CHALLENGE = (
    'Bearer realm="partner", error="invalid_token", '
    'error_description="The access token has been revoked"'
)


class LocalServer:
    """An aiohttp low-level server on 127.0.0.1 and a free port."""

    def __init__(self) -> None:
        self._runner: web.ServerRunner | None = None
        self.port = 0
        self.ssl_context: Any = None  # set before start() to serve HTTPS

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raise NotImplementedError

    async def start(self) -> str:
        server = web.Server(
            self.handle, access_log=None, auto_decompress=False, handler_cancellation=True
        )
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        self.port = bound_port(site)
        return self.url

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class DemoTokenEndpoint(LocalServer):
    """A client-credentials token endpoint at ``/oauth2/token`` for one client
    (``client_secret_basic``), counting the tokens it issues."""

    def __init__(
        self,
        client_id: str = "demo-client",
        client_secret: str = "demo-secret",  # noqa: S107
    ) -> None:
        super().__init__()
        self._credentials = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
        self.mint_count = 0
        self.issued: list[str] = []
        self._serial = itertools.count(1)

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth2/token"

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        form = dict(parse_qsl((await request.read()).decode()))
        if request.headers.get("Authorization") != f"Basic {self._credentials}":
            return web.json_response({"error": "invalid_client"}, status=401)
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        token = f"tok-{next(self._serial)}-{secrets.token_hex(8)}"
        self.mint_count += 1
        self.issued.append(token)
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": 3600}
        )


@dataclass
class DemoRequest:
    method: str
    raw_path: str
    body: bytes
    token: str | None


class DemoPartner(LocalServer):
    """A partner API that accepts the tokens ``issuer`` issued, answers 401
    with an expired-token challenge for those in ``expired`` and a revoked one
    for those in ``revoked``, and otherwise echoes what it saw."""

    def __init__(self, issuer: DemoTokenEndpoint) -> None:
        super().__init__()
        self.issuer = issuer
        self.expired: set[str] = set()
        self.revoked: set[str] = set()
        self.requests: list[DemoRequest] = []

    def expire_all(self) -> None:
        self.expired.update(self.issuer.issued)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        presented = request.headers.get("Authorization", "")
        token = presented.removeprefix("Bearer ") if presented.startswith("Bearer ") else None
        body = await request.read()
        self.requests.append(DemoRequest(request.method, request.raw_path, body, token))
        if token is None or token not in self.issuer.issued:
            return web.Response(
                status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        if token in self.revoked:
            return web.Response(status=401, headers={"WWW-Authenticate": REVOKED_CHALLENGE})
        if token in self.expired:
            return web.Response(status=401, headers={"WWW-Authenticate": EXPIRED_CHALLENGE})
        return web.json_response(
            {"method": request.method, "raw_path": request.raw_path, "body_bytes": len(body)}
        )


DEMO_CONFIG = """
listen: 127.0.0.1:0
clients:
  demo:
    token_url: {token_url}
    client_id: demo-client
    client_secret: demo-secret
    scope: orders.read
routes:
  - name: partner
    match: {{path_prefix: /partner/}}
    upstream: {partner}/v2/
    client: demo
"""


def _say(text: str) -> None:
    print(text, flush=True)


async def run_demo() -> int:
    """Run the scripted demo; 0 when everything behaved as it should."""
    configure_logging("warning", io.StringIO())
    tokens = DemoTokenEndpoint()
    partner = DemoPartner(tokens)
    await tokens.start()
    await partner.start()
    config = parse_config(
        DEMO_CONFIG.format(token_url=tokens.token_url, partner=partner.url), "demo"
    )
    proxy = ProxyServer(config)
    await proxy.start()
    problems: list[str] = []

    def expect(condition: bool, what: str) -> None:
        if not condition:
            problems.append(what)
            _say(f"   !! unexpected: {what}")

    try:
        async with aiohttp.ClientSession() as http:
            _say(f"mock token endpoint  {tokens.token_url}")
            _say(f"mock partner API     {partner.url}/v2/")
            _say(f"authproxy            {proxy.url}  (route /partner/ -> partner /v2/)\n")

            _say("1. One plain, unauthenticated GET through the proxy (cold cache):")
            async with http.get(f"{proxy.url}/partner/orders/1") as response:
                seen = json.loads(await response.read())
            _say(
                f"   {response.status}; the partner saw {seen['raw_path']} with a Bearer token;"
                f" token endpoint mints so far: {tokens.mint_count}"
            )
            expect(response.status == 200 and tokens.mint_count == 1, "first request: 200, 1 mint")

            _say("\n2. Fifty concurrent GETs reuse the same cached token:")

            async def get(i: int) -> int:
                async with http.get(f"{proxy.url}/partner/orders/{i}") as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(get(i) for i in range(50)))
            distinct = {r.token for r in partner.requests}
            _say(
                f"   {statuses.count(200)} x 200; mints so far: {tokens.mint_count}; "
                f"distinct tokens the partner saw: {len(distinct)}"
            )
            expect(statuses == [200] * 50 and tokens.mint_count == 1, "50 requests, still 1 mint")

            _say(
                "\n3. The partner now declares the token expired (401, RFC 6750"
                ' error="invalid_token", "The access token expired"):'
            )
            partner.expire_all()
            body = b'{"item": "widget", "quantity": 3}'
            before = len(partner.requests)
            async with http.post(
                f"{proxy.url}/partner/orders",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as response:
                await response.read()
            posts = partner.requests[before:]
            _say(
                f"   the app got {response.status}; behind it: the partner answered "
                f"{len(posts)} POSTs (401 expired, then the replay), the proxy minted once "
                f"more (mints: {tokens.mint_count}), replay body identical: "
                f"{all(p.body == body for p in posts)}"
            )
            expect(
                response.status == 200 and tokens.mint_count == 2 and len(posts) == 2,
                "expired 401: 1 mint, 1 replay, 200",
            )

            _say("\n4. A revoked token is not an expired one: its 401 goes back untouched:")
            partner.revoked.update(tokens.issued)
            async with http.get(f"{proxy.url}/partner/orders/1") as response:
                challenge = response.headers.get("WWW-Authenticate", "")
            _say(
                f"   {response.status} ({challenge.split('error_description=')[-1]}); "
                f"mints still {tokens.mint_count}: retrying would only burn the endpoint's quota"
            )
            expect(response.status == 401 and tokens.mint_count == 2, "revoked 401: no mint")

            _say("\n5. A path that is not routed gets a JSON 404 (the proxy is not open):")
            async with http.get(f"{proxy.url}/elsewhere") as response:
                error = await response.json()
            _say(f"   {response.status} {error}")
            expect(response.status == 404, "unrouted path: 404")
    finally:
        await proxy.stop()
        await partner.stop()
        await tokens.stop()
    if problems:
        _say(f"\ndemo FAILED: {'; '.join(problems)}")
        return 1
    _say(f"\ndemo OK: {tokens.mint_count} mints for {len(partner.requests)} partner requests.")
    _say(
        "Next: copy proxy.yaml, set your partner's token_url and credentials, then run "
        "`authproxy serve --config proxy.yaml`."
    )
    return 0
