"""Where a proxied request's CPU goes: py-spy on the pinned proxy under wrk.

    bench/.venv/bin/python bench/profile.py [get|post|dpop] [--seconds 8]

Starts the bench's nginx upstream and token endpoint, one authproxy pinned to
CPU 0, drives it with wrk (64 connections, or ``--connections``) and samples it with py-spy. Prints
the share of samples per function (self time: where the interpreter was) and
per area. Python lines that make a system call (``transport.write``) carry
the time of that call; "event loop" is uvloop's C code (reads, epoll, timers).
"""

from __future__ import annotations

import argparse
import collections
import linecache
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

AREAS = (  # first match wins; lines that call transport.write are "system calls" first
    ("event loop (uvloop: reads, epoll, timers)", re.compile(r"runners\.py|base_events")),
    ("aiohttp: parsers, protocols", re.compile(r"aiohttp/")),
    ("authproxy: apps' side (http1/listener)", re.compile(r"proxy/http1/listener\.py")),
    ("authproxy: partners' side (http1/upstream)", re.compile(r"proxy/http1/upstream\.py")),
    ("authproxy: HTTP rules (http1/policy)", re.compile(r"proxy/http1/policy\.py")),
    ("authproxy: forwarding (forwarding/)", re.compile(r"proxy/forwarding/")),
    ("authproxy: routing, tokens", re.compile(r"proxy/(routing|tokens)/|<string>")),
    ("metrics (prometheus_client)", re.compile(r"prometheus_client|proxy/metrics")),
    ("access log (structlog, logging)", re.compile(r"structlog|logging/|proxy/log\.py")),
)


SOURCES = {"proxy": bench.ROOT / "proxy", "aiohttp": Path(aiohttp.__file__).parent}


def writes(frame: str) -> bool:
    """Is this sampled line a ``transport.write`` (its time is the system call)?"""
    found = re.search(r"\((\w+)/([\w./]+):(\d+)\)$", frame)
    if not found or found.group(1) not in SOURCES:
        return False
    line = linecache.getline(str(SOURCES[found.group(1)] / found.group(2)), int(found.group(3)))
    return "transport.write" in line or "writelines(" in line or "connection.write(" in line


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", nargs="?", default="get", choices=("get", "post", "dpop"))
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--lines", type=int, default=0, help="also the N hottest lines")
    parser.add_argument("--log", action="store_true", help="access log on (to a file)")
    parser.add_argument("--connections", type=int, default=64, help="wrk's connections")
    parser.add_argument("--sampled", type=float, default=None, help="tracing on, this ratio sampled")
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("profile: py-spy is not installed (bash bench/run installs it)", file=sys.stderr)
        return 1
    bench.raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="authproxy-profile-"))
    tmp.chmod(0o755)
    script = None
    if args.scenario == "post":
        post = tmp / "post.lua"
        post.write_text('wrk.method = "POST"\nwrk.body = string.rep("a", 16384)\n')
        script = str(post)
    raw = tmp / "profile.txt"
    procs: list[bench.Proc] = []
    try:
        tokens = bench.token_endpoint()
        up = bench.upstream(tmp, tokens.port)
        procs += [tokens, up]
        proxy = bench.authproxy(
            up.port, tokens, tmp, 1, "0", sampled=args.sampled, access_log=args.log
        )
        procs.append(proxy)
        assert proxy.popen is not None
        path = "/dpop/api/x" if args.scenario == "dpop" else "/api/x"  # dpop: a proof per request
        bench.wrk(proxy.port, path, 2, 64, script, "1")  # warm up
        sampler = subprocess.Popen(
            [
                spy,
                "record",
                "-r",
                "200",
                "-d",
                str(int(args.seconds)),
                "-f",
                "raw",
                "-o",
                str(raw),
                "-p",
                str(proxy.popen.pid),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        result = bench.wrk(proxy.port, path, args.seconds + 1, args.connections, script, "1")
        sampler.wait()
    finally:
        for proc in reversed(procs):
            proc.stop()
    by_function: collections.Counter[str] = collections.Counter()
    by_area: collections.Counter[str] = collections.Counter()
    by_line: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        leaf = stack.split(";")[-1]
        by_function[re.sub(r":\d+\)$", ")", leaf)] += n
        by_line[leaf] += n
        if writes(leaf):
            area = "system calls: socket writes"
        else:
            area = next((name for name, pattern in AREAS if pattern.search(leaf)), "other")
        by_area[area] += n
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.scenario}: {result['rps']} req/s under py-spy, "
          f"{total} samples\n")  # fmt: skip
    for name, n in by_area.most_common():
        print(f"{100 * n / total:5.1f} %  {name}")
    print()
    for name, n in by_function.most_common(25):
        print(f"{100 * n / total:5.1f} %  {name}")
    if args.lines:
        print()
        for name, n in by_line.most_common(args.lines):
            found = re.search(r"\((\w+)/([\w./]+):(\d+)\)$", name)
            text = ""
            if found and found.group(1) in SOURCES:
                path = SOURCES[found.group(1)] / found.group(2)
                text = linecache.getline(str(path), int(found.group(3))).strip()[:70]
            print(f"{100 * n / total:5.1f} %  {name}  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
