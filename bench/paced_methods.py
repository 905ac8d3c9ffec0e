"""The paced scenario's load generator, checked: how ways of sending a fixed
rate space their requests, and what each measures for nginx-static and
authproxy at half authproxy's maximum (docs/performance.md, "does the paced
load's shape make the tail?").

    bench/.venv/bin/python bench/paced_methods.py [--rate R] [--rounds 2] [--out FILE]

The ways: wrk with the bench's Lua ``delay()`` (the paced scenario's), and
``bench/pace.c`` (compiled here with gcc) with evenly spaced and with
exponential gaps; Debian's ``h2load --rps`` too for the spacing, when it is
installed. First each is aimed at a recorder (this script with ``--record``:
an answer at once, a timestamp per read) to see the arrivals: the share of
gaps under 20 µs, and the burst a request arrives in (a chain of arrivals,
each less than 20 µs after the one before). Then each is run against both
proxies, pinned to CPU 0 as in bench.py, rounds alternating. The two tools
time differently: wrk from when it writes a request, each connection waiting
for its answer before the next (a slow server gets a lower rate); pace from
each request's due time, its own lateness included (``late_p99_ms``), at the
rate asked. Run it with the compiled build in place for the figures in the
docs (bench/run builds it; or ``setup.py build_ext --inplace``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CLOSE = 20_000  # ns: arrivals closer than this count as one burst


def record(port: int, out: str) -> None:
    """Answer every request at once; on SIGTERM write each read's arrival time (ns)."""
    stamps: list[int] = []

    class Recorder(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            stamps.append(time.monotonic_ns())
            self.transport.write(ANSWER * max(1, data.count(b"\r\n\r\n")))

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Recorder, "127.0.0.1", port, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()
        Path(out).write_text("\n".join(map(str, stamps)))

    try:
        import uvloop  # the bench's venv has it: a faster recorder bunches fewer reads

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())


def spacing(stamps: list[int]) -> dict[str, Any]:
    """The share of gaps under CLOSE, and the burst a request arrives in (p50, p99)."""
    stamps.sort()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    bursts, size = [], 1
    for gap in gaps:
        if gap < CLOSE:
            size += 1
        else:
            bursts.append(size)
            size = 1
    bursts.append(size)
    each = sorted(s for s in bursts for _ in range(s))  # per request: its burst's size
    return {
        "arrivals": len(stamps),
        "gaps_under_20us": round(sum(g < CLOSE for g in gaps) / max(1, len(gaps)), 2),
        "burst_p50": each[len(each) // 2],
        "burst_p99": each[int(len(each) * 0.99)],
    }


def pace(binary: Path, port: int, rate: float, seconds: float, mode: str) -> dict[str, Any]:
    """One run of pace.c; its JSON line (pace.c's header says what each key is)."""
    cmd = ["taskset", "-c", "1", str(binary), str(port), "/api/x", f"{rate:.1f}", "64"]
    cmd += [str(seconds)] + (["poisson"] if mode == "poisson" else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"pace failed ({done.returncode}): {done.stderr.strip()[:500]}")
    if done.stderr.strip():
        print(f"pace: {done.stderr.strip()[:300]}", file=sys.stderr)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def h2load(port: int, rate: float, seconds: float) -> dict[str, Any]:
    """Debian's h2load at ``rate`` over 64 connections (``--rps`` is a connection's)."""
    url = f"http://127.0.0.1:{port}/api/x"
    cmd = ["taskset", "-c", "1", "h2load", "--h1", "-c64", "-t1", f"--rps={rate / 64:.2f}"]
    subprocess.run([*cmd, f"-D{max(1, round(seconds))}", url], capture_output=True, check=True)
    return {}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", nargs=2, metavar=("PORT", "FILE"), help=argparse.SUPPRESS)
    parser.add_argument("--rate", type=float, help="req/s (default: half authproxy's maximum)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.record:
        record(int(args.record[0]), args.record[1])
        return 0
    bench.raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="authproxy-paced-"))
    tmp.chmod(0o755)
    binary = tmp / "pace"
    source = Path(__file__).with_name("pace.c")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(source), "-lm"], check=True)
    tokens = bench.token_endpoint()
    up = bench.upstream(tmp, tokens.port)
    procs = {
        "nginx": bench.nginx_static(up.port, tmp, 1, "0"),
        "authproxy": bench.authproxy(up.port, tokens, tmp, 1, "0"),
    }
    results: dict[str, Any] = {"machine": bench.machine(), "saturated": {}, "spacing": {},
                               "latency": {}}  # fmt: skip
    try:
        for proc in procs.values():
            bench.wrk(proc.port, "/api/x", 3, 64, None, "1")  # warm: pool, token
        for name, proc in procs.items():
            got = bench.measured(proc, partial(bench.wrk, proc.port, "/api/x", args.duration, 64,
                                               None, "1"))  # fmt: skip
            results["saturated"][name] = {k: got.get(k) for k in ("rps", "cpu_us_per_req")}
        rate = args.rate or results["saturated"]["authproxy"]["rps"] / 2
        results["rate"] = round(rate)
        print(f"saturated: {results['saturated']}; paced at {rate:,.0f} req/s", flush=True)
        script = bench.paced_script(tmp, rate, 64)

        def load(mode: str, port: int) -> dict[str, Any]:
            if mode == "wrk":
                return bench.wrk(port, "/api/x", args.duration, 64, script, "1")
            if mode == "h2load":
                return h2load(port, rate, args.duration)
            return pace(binary, port, rate, args.duration, mode)

        modes = ("wrk", "even", "poisson")
        shapes = (*modes, "h2load") if shutil.which("h2load") else modes
        for mode in shapes:
            port, file = bench.free_port(), tmp / f"arrivals-{mode}.txt"
            recorder = bench.spawn([sys.executable, __file__, "--record", str(port), str(file)],
                                   "0")  # fmt: skip
            bench.wait_port(port)
            load(mode, port)
            recorder.send_signal(signal.SIGTERM)
            recorder.wait(15)
            stamps = [int(x) for x in file.read_text().split()]
            results["spacing"][mode] = spacing(stamps)
            print(f"arrivals, {mode}: {results['spacing'][mode]}", flush=True)
        for rnd in range(args.rounds):
            for mode in modes:
                for name, proc in procs.items():
                    row = bench.measured(proc, partial(load, mode, proc.port))
                    results["latency"].setdefault(mode, {}).setdefault(name, []).append(row)
                    if row.get("errors"):
                        print(f"bench: {row['errors']} errors in this round", file=sys.stderr)
                    keep = ("rps", "p50_ms", "p99_ms", "errors", "waited", "late_p99_ms",
                            "cpu_us_per_req")  # fmt: skip
                    print(f"round {rnd + 1}, {mode}, {name}: {dict((k, row.get(k)) for k in keep)}",
                          flush=True)  # fmt: skip
    finally:
        for proc in (*procs.values(), up, tokens):
            proc.stop()
        if args.out:  # what was measured, also when a round failed
            args.out.write_text(json.dumps(results, indent=1) + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
