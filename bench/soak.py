"""Soak: about 60 s of mixed traffic with faults injected, against the proxy as a
real process. Reports the proxy's RSS, open files and task-visible state
before and after; exits 1 if they grew past the bounds below or if any request
got an answer it should not have.

    .venv/bin/python bench/soak.py [--requests 10000] [--concurrency 64]

Not part of the test run (it takes a minute); loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from fakes import FakePartner, FakeTokenEndpoint  # noqa: E402

RSS_GROWTH_MAX = 30 * 1024 * 1024  # bytes, after warm-up
FD_GROWTH_MAX = 20


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


CONFIG = """
listen: 127.0.0.1:0
admin: 127.0.0.1:0
access_log: false
log: {{level: info}}
clients:
  demo:
    token_url: {token_url}
    client_id: demo-client
    client_secret: ${{SOAK_SECRET}}
    timeout: 2s
    remint_min_interval: 1s
routes:
  - name: demo
    match: {{path_prefix: /demo/}}
    upstream: {partner}/v2/
    client: demo
    timeout: 2s
    max_body: 4MiB
"""


async def start_proxy(config: Path) -> tuple[asyncio.subprocess.Process, int, int]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config),
        cwd=ROOT, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SOAK_SECRET": "demo-secret"},
    )  # fmt: skip
    assert process.stderr is not None
    while True:
        line = await asyncio.wait_for(process.stderr.readline(), 30)
        if not line:
            raise RuntimeError("the proxy exited at start")
        event = json.loads(line)
        if event.get("event") == "listening":
            asyncio.get_running_loop().create_task(_drain(process.stderr))
            return process, int(event["port"]), int(event["admin_port"])


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def one(
    http: aiohttp.ClientSession, base: str, kind: str, tokens: FakeTokenEndpoint,
    partner: FakePartner,
) -> str:  # fmt: skip
    try:
        if kind == "get":
            async with http.get(f"{base}/demo/x?i=1") as r:
                await r.read()
                return f"get:{r.status}"
        if kind == "post":
            body = os.urandom(random.choice([10, 1000, 100_000]))
            async with http.post(f"{base}/demo/sink", data=body) as r:
                await r.read()
                return f"post:{r.status}"
        if kind == "expire":
            # A partner declares the token expired now and then (not faster than the
            # quota guard's 1 s: then it would be a partner bug, passed through).
            if time.monotonic() - LAST_EXPIRY[0] > 2:
                LAST_EXPIRY[0] = time.monotonic()
                partner.expire_all()
            async with http.get(f"{base}/demo/x") as r:
                await r.read()
                return f"expire:{r.status}"
        if kind == "download":
            async with http.get(f"{base}/demo/download?size=262144") as r:
                data = await r.read()
                return f"download:{r.status}:{len(data) == 262144}"
        if kind == "abort":
            reader, writer = await asyncio.open_connection("127.0.0.1", int(base.rsplit(":", 1)[1]))
            writer.write(b"GET /demo/slow?delay=3 HTTP/1.1\r\nHost: a\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.transport.abort()
            return "abort:ok"
        if kind == "bad":
            reader, writer = await asyncio.open_connection("127.0.0.1", int(base.rsplit(":", 1)[1]))
            writer.write(b"POST /demo/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")  # fmt: skip
            await writer.drain()
            status = (await asyncio.wait_for(reader.read(12), 5))[9:12].decode()
            writer.close()
            return f"bad:{status}"
        if kind == "token_fault":
            tokens.script = ["server_error"]
            async with http.get(f"{base}/demo/x") as r:
                await r.read()
                return f"token_fault:{r.status}"
        if kind == "revoked":
            async with http.get(f"{base}/demo/plain401") as r:
                await r.read()
                return f"revoked:{r.status}"
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return f"{kind}:error:{type(exc).__name__}"
    return f"{kind}:?"


LAST_EXPIRY = [0.0]
KINDS = ["get"] * 50 + ["post"] * 15 + ["download"] * 5 + ["abort"] * 10 + ["bad"] * 5 + \
    ["expire"] * 2 + ["token_fault"] * 3 + ["revoked"] * 10  # fmt: skip
ACCEPTABLE = {
    "get:200", "post:200", "expire:200", "download:200:True", "abort:ok", "bad:400",
    "token_fault:200", "revoked:401", "expire:401",  # the quota guard may pass one through
}  # fmt: skip


async def main(requests: int, concurrency: int) -> int:
    tokens = FakeTokenEndpoint()
    await tokens.start()
    partner = FakePartner(tokens)
    await partner.start()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "soak.yaml"
        config.write_text(CONFIG.format(token_url=tokens.token_url, partner=partner.url))
        process, port, admin = await start_proxy(config)
        base = f"http://127.0.0.1:{port}"
        results: Counter[str] = Counter()
        connector = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            # Warm up (connection pools full, first token), then measure.
            for _ in range(5):
                await asyncio.gather(
                    *(one(http, base, "get", tokens, partner) for _ in range(concurrency))
                )
            before = (rss(process.pid), open_files(process.pid))
            started = time.monotonic()
            queue = iter(random.choice(KINDS) for _ in range(requests))

            async def worker() -> None:
                for kind in queue:
                    results[await one(http, base, kind, tokens, partner)] += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.monotonic() - started
            await asyncio.sleep(4)  # let aborted upstream requests and idle sockets settle
            after = (rss(process.pid), open_files(process.pid))
            async with http.get(f"http://127.0.0.1:{admin}/metrics") as r:
                metrics = await r.text()
        process.send_signal(signal.SIGTERM)
        code = await process.wait()
    await partner.stop()
    await tokens.stop()
    mints = [ln for ln in metrics.splitlines() if ln.startswith("authproxy_token_mints_total")]
    bad = {k: v for k, v in results.items() if k not in ACCEPTABLE}
    report = {
        "requests": sum(results.values()),
        "seconds": round(elapsed, 1),
        "results": dict(sorted(results.items())),
        "unexpected": bad,
        "rss_mib_before_after": [round(before[0] / 2**20, 1), round(after[0] / 2**20, 1)],
        "open_files_before_after": list(before[1:]) + list(after[1:]),
        "mints": mints,
        "exit_code": code,
    }
    print(json.dumps(report, indent=2))
    ok = (
        not bad
        and after[0] - before[0] < RSS_GROWTH_MAX
        and after[1] - before[1] < FD_GROWTH_MAX
        and code == 0
    )
    print("soak:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.requests, args.concurrency)))
