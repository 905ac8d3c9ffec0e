"""The reference contender: a minimal hand-written aiohttp streaming proxy.

One ClientSession, a static Authorization header, the body streamed both ways,
hop-by-hop headers dropped. What a team would write in an afternoon instead
of deploying authproxy; authproxy must be at least as fast.

    python bench/minimal_proxy.py PORT UPSTREAM_URL
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
       "proxy-connection", "proxy-authorization", "host", "content-length"}  # fmt: skip


async def main(port: int, upstream: str) -> None:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        headers["Authorization"] = "Bearer static-token"
        async with session.request(
            request.method,
            upstream + request.raw_path,
            headers=headers,
            data=request.content if request.body_exists else None,
            allow_redirects=False,
        ) as upstream_response:
            out = web.StreamResponse(
                status=upstream_response.status,
                headers={
                    k: v for k, v in upstream_response.headers.items() if k.lower() not in HOP
                },
            )
            if upstream_response.content_length is not None:
                out.content_length = upstream_response.content_length
            await out.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    server = web.Server(handle, access_log=None, auto_decompress=False)
    runner = web.ServerRunner(server)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=2048).start()
    print("listening", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
