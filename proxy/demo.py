"""``authproxy demo``: the whole lifecycle in a few seconds, with no partner
and no secrets. Starts a mock token endpoint and a mock partner API on free
loopback ports, the real proxy in front of them, and narrates what happens."""

from __future__ import annotations

import asyncio
import io
import json
import sys

import aiohttp

from .config import parse_config
from .fakes import FakePartner, FakeTokenEndpoint
from .log import configure_logging
from .server import ProxyServer

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
    tokens = FakeTokenEndpoint()
    partner = FakePartner(tokens)
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


if __name__ == "__main__":
    sys.exit(asyncio.run(run_demo()))
