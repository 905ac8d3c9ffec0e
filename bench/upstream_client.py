"""How much of a proxied request is aiohttp's ClientSession? An evaluation for
the lean upstream path (issue "performance"), not a contender.

Drives N keep-alive connections of small GETs against an upstream two ways,
in this process (pin it with taskset), and prints CPU µs per request:

- ``aiohttp``: ``ClientSession.request`` + ``read()``, as the proxy does;
- ``lean``: an ``asyncio.Protocol`` per connection that writes the request
  head and parses the answer with aiohttp's own C parser
  (``HttpResponseParser``): roughly what a lean upstream path would cost.

    taskset -c 0 python bench/upstream_client.py http://127.0.0.1:PORT/x [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from typing import Any

import aiohttp
from aiohttp._http_parser import HttpResponseParser
from aiohttp.base_protocol import BaseProtocol
from yarl import URL


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def with_aiohttp(url: str, conns: int, seconds: float) -> int:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=conns), auto_decompress=False
    )
    done = 0
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal done
        target = URL(url, encoded=True)
        while time.monotonic() < deadline:
            async with session.get(target, headers={"Authorization": "Bearer t"}) as r:
                await r.read()
            done += 1

    await asyncio.gather(*(loop() for _ in range(conns)))
    await session.close()
    return done


class LeanConnection(BaseProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.parser = HttpResponseParser(self, loop, 2**16, auto_decompress=False)
        self.waiter: asyncio.Future[Any] | None = None
        self.pending: list[tuple[Any, Any]] = []

    def data_received(self, data: bytes) -> None:
        messages, _, _ = self.parser.feed_data(data)
        for message, payload in messages:
            self.pending.append((message, payload))
        if self.pending and self.pending[-1][1].is_eof() and self.waiter and not self.waiter.done():
            self.waiter.set_result(self.pending.pop())

    async def request(self, head: bytes) -> bytes:
        assert self.transport is not None
        self.waiter = self._loop.create_future()
        self.transport.write(head)
        _, payload = await self.waiter
        return b"".join(payload._buffer)


async def lean(url: str, conns: int, seconds: float) -> int:
    target = URL(url)
    head = (
        f"GET {target.raw_path_qs} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        "Authorization: Bearer t\r\n\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    done = 0
    deadline = time.monotonic() + seconds

    async def one() -> None:
        nonlocal done
        _, protocol = await loop.create_connection(
            lambda: LeanConnection(loop), target.host, target.port
        )
        while time.monotonic() < deadline:
            await protocol.request(head)
            done += 1
        protocol.transport.close()  # type: ignore[union-attr]

    await asyncio.gather(*(one() for _ in range(conns)))
    return done


async def main(url: str, conns: int, seconds: float) -> None:
    for name, run in (("aiohttp", with_aiohttp), ("lean", lean), ("aiohttp", with_aiohttp),
                      ("lean", lean)):  # fmt: skip
        before = cpu()
        count = await run(url, conns, seconds)
        used = cpu() - before
        print(f"{name:8} {count / seconds:9.0f} req/s  {used / count * 1e6:7.1f} CPU µs/req")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(args.url, args.connections, args.seconds))
