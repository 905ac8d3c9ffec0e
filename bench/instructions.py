"""Instructions per proxied GET (or 16 KiB POST), counted by valgrind (callgrind): a figure
that does not move with the machine's load, for comparing two versions of
the code where req/s and CPU time differ by ±15 % between identical runs.

    bench/.venv/bin/python bench/instructions.py [--log] [--post] [--requests 1000] [--keep]

Starts the bench's nginx upstream and token endpoint and one authproxy under
``valgrind --tool=callgrind`` (the checkout as it is: with the compiled
modules beside their sources when ``setup.py build_ext --inplace`` made
them), warms it up, zeroes the counters, sends ``--requests`` GETs over
``--connections`` keep-alive connections, and prints the proxy process's
instructions per request. User-space only: the kernel's share (loopback TCP,
about a fifth of the CPU time) is not in it. Needs ``apt-get install
valgrind``.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

REQUEST = b"GET /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
POST = (  # the bench's post_16k
    b"POST /api/x HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 16384\r\n\r\n" + b"a" * 16384
)


async def load(port: int, requests: int, connections: int, request: bytes = REQUEST) -> None:
    """``requests`` requests, one at a time on each of ``connections``."""

    async def one(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"the proxy answered {head[:40]!r}")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
        writer.close()

    await asyncio.gather(*(one(requests // connections) for _ in range(connections)))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", action="store_true", help="access log on (to a file)")
    parser.add_argument("--post", action="store_true", help="POST 16 KiB (post_16k), not GET")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the callgrind dump (path printed)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("instructions: valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 1
    bench.raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="authproxy-instructions-"))
    tmp.chmod(0o755)
    out = tmp / "callgrind.out"
    tokens = bench.token_endpoint()
    up = bench.upstream(tmp, tokens.port)
    spawn, wait_port = bench.spawn, bench.wait_port

    def under_valgrind(cmd: list[str], cpus: str | None, **kw: Any) -> Any:
        pre = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        return spawn([*pre, *cmd], None, **kw)

    bench.spawn = under_valgrind  # type: ignore[assignment]
    bench.wait_port = lambda port, timeout=20: wait_port(port, 300)  # type: ignore[assignment]
    try:
        proxy = bench.authproxy(up.port, tokens, tmp, 1, None, access_log=args.log)
    finally:
        bench.spawn, bench.wait_port = spawn, wait_port
    try:
        assert proxy.popen is not None
        pid = str(proxy.popen.pid)
        request = POST if args.post else REQUEST
        asyncio.run(load(proxy.port, 400, args.connections, request))  # warm: pool, token, caches
        subprocess.run(["callgrind_control", "--zero", pid], check=True, capture_output=True)
        asyncio.run(load(proxy.port, args.requests, args.connections, request))
        subprocess.run(["callgrind_control", "--dump", pid], check=True, capture_output=True)
        time.sleep(1)
        dump = sorted(glob.glob(f"{out}.*"), key=os.path.getmtime)[-1]
        total = re.search(r"^(?:summary|totals): (\d+)", Path(dump).read_text(), re.M)
        assert total is not None
        compiled = sorted(Path(bench.ROOT, "proxy").rglob("*.so"))
        print(
            f"{int(total.group(1)) / args.requests:,.0f} instructions a request "
            f"({'POST 16 KiB' if args.post else 'GET'}, access log {'on' if args.log else 'off'}, "
            f"{len(compiled)} compiled modules in the checkout)"
        )
        if args.keep:
            print(f"callgrind dump: {dump} (callgrind_annotate --inclusive=yes {dump})")
    finally:
        proxy.stop()
        up.stop()
        tokens.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
