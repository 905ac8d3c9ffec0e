"""A counting client-credentials token endpoint for the bench.

    python bench/token_endpoint.py PORT

POST /token mints ``tok-<n>`` (expires_in 3600); GET /count says how many.
POST /v1/traces takes OTLP/HTTP trace exports (the tracing scenario).
POST /sink reads a body of any size and answers ``{"bytes": n}``: the nginx
upstream passes its /sink there, so that an upload is consumed to its end (an
upstream that answers before reading would let a proxy stop early).
"""

from __future__ import annotations

import asyncio
import itertools
import sys

from aiohttp import web


async def main(port: int) -> None:
    serial = itertools.count(1)
    minted = [0]

    async def token(request: web.Request) -> web.Response:
        await request.read()
        minted[0] += 1
        # A DPoP token request (RFC 9449) gets a DPoP token; the proof is not
        # checked here (tests/test_dpop.py does): the bench measures its cost.
        kind = "DPoP" if request.headers.get("DPoP") else "Bearer"
        return web.json_response(
            {"access_token": f"tok-{next(serial)}", "token_type": kind, "expires_in": 3600}
        )

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"mints": minted[0]})

    async def traces(request: web.Request) -> web.Response:
        # An OTLP/HTTP sink for the tracing scenario: read the export, say OK
        # (an empty ExportTraceServiceResponse is zero bytes of protobuf).
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def sink(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.json_response({"bytes": size})

    app = web.Application(client_max_size=0)
    app.router.add_post("/sink", sink)
    app.router.add_post("/token", token)
    app.router.add_get("/count", count)
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("listening", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
