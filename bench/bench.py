"""The benchmark: authproxy against nginx with a static header (the ceiling), a
minimal aiohttp proxy (the par) and the upstream direct, on loopback.

    bash bench/run            # installs wrk and nginx, a venv, then runs this
    python bench/bench.py --duration 5 --rounds 3 --out bench/results/latest.json

Every process is started by this script and stopped by PID. The proxy under
test is pinned to CPU 0 with taskset; wrk and the upstream share CPU 1
(except in the two-worker scenario, where nothing is pinned). Contenders
alternate round by round, and per scenario the script prints median req/s,
p50/p99 latency, CPU µs per request of the proxy (all its processes), the
ratios to nginx, minimal and direct, the mint count and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"status":"ok","items":[1,2,3,4]}'  # 33 bytes, the upstream's answer
assert len(BODY) == 33
BIG = 512 * 1024 * 1024
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in descendants(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
    return total


def memory(pid: int, key: str) -> int:
    """VmRSS or VmHWM summed over the process tree, in bytes."""
    total = 0
    for p in descendants(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


@dataclass
class Proc:
    name: str
    port: int
    popen: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def spawn(cmd: list[str], cpus: str | None, **kw: Any) -> subprocess.Popen[bytes]:
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    return subprocess.Popen(cmd, preexec_fn=raise_nofile, **kw)


NGINX_COMMON = """
error_log {dir}/{name}.error.log warn;
pid {dir}/{name}.pid;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {dir}/{name}.body; proxy_temp_path {dir}/{name}.proxy;
  fastcgi_temp_path {dir}/{name}.fcgi; uwsgi_temp_path {dir}/{name}.uwsgi;
  scgi_temp_path {dir}/{name}.scgi;
  {body}
}}
"""


def nginx(
    name: str, workers: int, body: str, tmp: Path, cpus: str | None
) -> subprocess.Popen[bytes]:
    conf = tmp / f"{name}.conf"
    text = f"worker_processes {workers};\n" + NGINX_COMMON.format(dir=tmp, name=name, body=body)
    conf.write_text(text)
    return spawn(["nginx", "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"], cpus)


def upstream(tmp: Path, sink: int) -> Proc:
    port = free_port()
    big = tmp / "big.bin"
    with open(big, "wb") as f:
        f.truncate(BIG)  # sparse: served from the page cache, costs no disk
    big.chmod(0o644)
    body = f"""
  server {{
    listen 127.0.0.1:{port} backlog=8192;
    client_max_body_size 0;
    location = /big {{ alias {big}; }}
    location = /sink {{
      proxy_pass http://127.0.0.1:{sink}/sink;
      proxy_http_version 1.1;
      proxy_request_buffering off;
    }}
    location /expiring/ {{
      if ($http_authorization = "Bearer tok-1") {{
        add_header WWW-Authenticate 'Bearer error="invalid_token", error_description="The access token expired"' always;
        return 401;
      }}
      default_type application/json; return 200 '{BODY.decode()}';
    }}
    location / {{ default_type application/json; return 200 '{BODY.decode()}'; }}
  }}"""
    proc = Proc("upstream", port, nginx("upstream", 1, body, tmp, "1"))
    wait_port(port)
    return proc


def nginx_static(up: int, tmp: Path, workers: int, cpus: str | None) -> Proc:
    port = free_port()
    body = f"""
  upstream partner {{ server 127.0.0.1:{up}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port} backlog=8192;
    client_max_body_size 0;
    location / {{
      proxy_pass http://partner;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer static-token";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}"""
    proc = Proc("nginx", port, nginx(f"static{workers}", workers, body, tmp, cpus))
    wait_port(port)
    return proc


def minimal(up: int, cpus: str | None) -> Proc:
    port = free_port()
    popen = spawn(
        [
            sys.executable,
            str(ROOT / "bench" / "minimal_proxy.py"),
            str(port),
            f"http://127.0.0.1:{up}",
        ],
        cpus,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # its tracebacks on reset connections are noise here
    )
    wait_port(port)
    return Proc("minimal", port, popen)


def token_endpoint() -> Proc:
    port = free_port()
    popen = spawn([sys.executable, str(ROOT / "bench" / "token_endpoint.py"), str(port)], "1",
                  stdout=subprocess.DEVNULL)  # fmt: skip
    wait_port(port)
    return Proc("tokens", port, popen)


def mints(tokens: Proc) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{tokens.port}/count", timeout=5) as r:
        return int(json.load(r)["mints"])


def authproxy(up: int, tokens: Proc, tmp: Path, workers: int, cpus: str | None,
              client: str = "lean", sampled: float | None = None,
              access_log: bool = False) -> Proc:  # fmt: skip
    """``sampled``: tracing on, this share of requests sampled (exported to
    the token endpoint's OTLP sink); None: tracing off. ``access_log``: on,
    its lines (stderr) written to a file, as a log collector would read them."""
    port, admin = free_port(), free_port()
    # One file per proxy: a running proxy re-reads its file (watch_interval),
    # and one rewritten for the next proxy would move it to that one's endpoint.
    config = tmp / f"authproxy{workers}-{client}-{sampled}-{access_log}-{port}.yaml"
    tracing = "" if sampled is None else f"tracing: {{enabled: true, sample_ratio: {sampled}}}"
    config.write_text(f"""
listen: 127.0.0.1:{port}
admin: 127.0.0.1:{admin}
workers: {workers}
access_log: {str(access_log).lower()}
{tracing}
clients:
  bench:
    token_url: http://127.0.0.1:{tokens.port}/token
    client_id: bench
    client_secret: ${{BENCH_SECRET}}
  bench-dpop:
    token_url: http://127.0.0.1:{tokens.port}/token
    client_id: bench
    client_secret: ${{BENCH_SECRET}}
    dpop: {{key_file: {dpop_key(tmp)}}}
routes:
  - name: partner-dpop             # the dpop_get scenario: a proof per request
    match: {{path_prefix: /dpop/}}
    upstream: http://127.0.0.1:{up}/
    client: bench-dpop
  - name: partner
    match: {{path_prefix: /}}
    upstream: http://127.0.0.1:{up}/
    client: bench
""")
    popen = spawn(
        [sys.executable, "-m", "proxy", "serve", "--config", str(config)],
        cpus,
        cwd=ROOT,
        env={
            **os.environ,
            "BENCH_SECRET": "bench-secret",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{tokens.port}/v1/traces",
        },
        stderr=open(tmp / f"{config.stem}.log", "wb") if access_log else subprocess.DEVNULL,
    )
    wait_port(port)
    if workers > 1:
        time.sleep(1.5)  # every worker listening
    return Proc("authproxy", port, popen, {"admin": admin})


def dpop_key(tmp: Path) -> Path:
    """An EC P-256 DPoP key for the bench's DPoP client (ES256, the usual choice)."""
    path = tmp / "dpop.pem"
    if not path.exists():
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-out", str(path)],
            check=True, capture_output=True,
        )  # fmt: skip
        path.chmod(0o600)
    return path


WRK_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
UNIT = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def wrk(port: int, path: str, duration: float, connections: int, script: str | None,
        cpus: str | None) -> dict[str, Any]:  # fmt: skip
    cmd = [
        "wrk",
        "-t2",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "--timeout",
        "5s",
    ]
    if script:
        cmd += ["-s", script]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, preexec_fn=raise_nofile
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    lat = {p: float(v) * UNIT[u] for p, v, u in WRK_LATENCY.findall(out)}
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    return {"rps": rps, "requests": total, "p50_ms": lat.get("50"), "p99_ms": lat.get("99"),
            "errors": errors}  # fmt: skip


PACED_LUA = """
-- paced: each connection waits a random 0.5-1.5 times its period before each
-- request, so that 64 connections send R requests a second in all, spread
-- out (hey's -q tickers start together and send bursts of 64 at once)
local period = {period}
function init(args)
  local seed = tonumber(tostring({{}}):match("0x(%x+)"), 16) or os.time()
  math.randomseed(seed)
end
function delay()
  return period * (0.5 + math.random())
end
"""


def paced_script(tmp: Path, rate: float, connections: int) -> str:
    """A wrk script for ``rate`` requests a second over ``connections``."""
    path = tmp / f"paced-{round(rate)}.lua"
    path.write_text(PACED_LUA.format(period=round(1000 * connections / rate, 3)))
    return str(path)


def core_busy(core: int) -> tuple[int, int]:
    """(busy, total) jiffies of one CPU so far, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            ticks = [int(x) for x in line.split()[1:]]
            idle = ticks[3] + ticks[4]  # idle + iowait
            return sum(ticks) - idle, sum(ticks)
    return 0, 0


def settle(core: int = 0, quiet: float = 0.05, longest: float = 10.0) -> None:
    """Wait until the proxies' core is idle (under ``quiet`` busy for 0.2 s):
    the contender before may still be working off the requests wrk left
    queued when it stopped (1,000 connections: up to a second), and every
    contender shares that core."""
    deadline = time.monotonic() + longest
    while time.monotonic() < deadline:
        busy, total = core_busy(core)
        time.sleep(0.2)
        busy2, total2 = core_busy(core)
        if total2 == total or (busy2 - busy) / (total2 - total) < quiet:
            return
    print(f"bench: CPU {core} still busy after {longest:.0f} s; measuring anyway", file=sys.stderr)


def measured(proc: Proc | None, run: Any) -> dict[str, Any]:
    settle()
    before = cpu_seconds(proc.popen.pid) if proc and proc.popen else None
    result = run()
    if before is not None and proc and proc.popen:
        used = cpu_seconds(proc.popen.pid) - before
        result["cpu_us_per_req"] = round(used / max(1, result["requests"]) * 1e6, 1)
        result["rss_mib"] = round(memory(proc.popen.pid, "VmRSS") / 2**20, 1)
    return result


def transfer(port: int, direction: str) -> dict[str, Any]:
    """Stream 512 MiB through with curl (one connection), timing it."""
    url = (
        f"http://127.0.0.1:{port}/big"
        if direction == "download"
        else f"http://127.0.0.1:{port}/sink"
    )
    started = time.monotonic()
    if direction == "download":
        cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", url]
    else:
        # The sink answers with the byte count it read: "bytes" is what arrived.
        cmd = ["sh", "-c", f"head -c {BIG} /dev/zero | curl -sS -w ' %{{http_code}}' "
                           f"-H 'Transfer-Encoding: chunked' -H 'Expect:' --data-binary @- {url}"]  # fmt: skip
    out = subprocess.run(
        ["taskset", "-c", "1", *cmd], capture_output=True, text=True, check=True
    ).stdout
    if direction == "download":
        status, size = out.split()
    else:
        answer, _, status = out.rpartition(" ")
        size = str(json.loads(answer)["bytes"]) if status == "200" else "0"
    seconds = time.monotonic() - started
    return {"status": int(status), "bytes": int(float(size)), "seconds": round(seconds, 2),
            "mib_per_s": round(BIG / 2**20 / seconds, 1), "requests": 1}  # fmt: skip


SPIN = "import time\nt=time.monotonic()\nn=0\nwhile time.monotonic()-t<2:\n    for i in range(10000): n+=1\nprint(n)"


def machine_scaling() -> float:
    """What this machine gives two busy processes over one: a CPU-bound loop
    alone, then two at once (unpinned, like the workers). On a VM whose two
    vCPUs are not two free cores this is well under 2, and it bounds what any
    two-worker proxy can show here."""

    def spin(n: int) -> float:  # loops per 2 s of wall time, all processes together
        procs = [subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
                 for _ in range(n)]  # fmt: skip
        return float(sum(int(p.communicate()[0]) for p in procs))

    one = statistics.median(spin(1) for _ in range(3))
    two = statistics.median(spin(2) for _ in range(3))
    return round(two / one, 2)


def median_of(rounds: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rounds if r.get(key) is not None]
    return round(statistics.median(values), 2) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description="authproxy benchmark")
    parser.add_argument("--duration", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    parser.add_argument("--skip-big", action="store_true", help="skip the 512 MiB transfers")
    parser.add_argument("--only", default="", help="comma-separated scenarios, e.g. get,post_16k")
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "taskset", "curl"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (bash bench/run installs it)", file=sys.stderr)
            return 1
    raise_nofile()
    tmp = Path(tempfile.mkdtemp(prefix="authproxy-bench-"))
    tmp.chmod(0o755)  # nginx workers run unprivileged and serve the big file from here
    post = tmp / "post.lua"
    post.write_text('wrk.method = "POST"\nwrk.body = string.rep("a", 16384)\n'
                    'wrk.headers["Content-Type"] = "application/octet-stream"\n')  # fmt: skip
    procs: list[Proc] = []
    compiled = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proxy").rglob("*.so"))
    print(f"build: {'compiled, ' + str(len(compiled)) + ' modules' if compiled else 'pure Python'}")
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                               "compiled_modules": compiled,
                               "duration_s": args.duration, "rounds": args.rounds, "scenarios": {}}  # fmt: skip
    try:
        tokens = token_endpoint()
        up = upstream(tmp, tokens.port)
        procs += [up, tokens]
        contenders = {
            "direct": None,
            "nginx": nginx_static(up.port, tmp, 1, "0"),
            "minimal": minimal(up.port, "0"),
            "authproxy": authproxy(up.port, tokens, tmp, 1, "0"),
            # the default a user runs: the access log on, its lines to a file
            "authproxy_log": authproxy(up.port, tokens, tmp, 1, "0", access_log=True),
        }
        procs += [p for p in contenders.values() if p]
        scenarios = {
            "get": ("/api/x", 64, None),
            "post_16k": ("/api/x", 64, str(post)),
            "c1000": ("/api/x", 1000, None),
        }
        only = set(filter(None, args.only.split(",")))

        def wanted(name: str) -> bool:
            return not only or name in only

        for name, (path, conns, script) in scenarios.items():
            if not wanted(name):
                continue
            rounds: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
            for _ in range(args.rounds):
                for cname, proc in contenders.items():
                    port = proc.port if proc else up.port
                    rounds[cname].append(
                        measured(proc, partial(wrk, port, path, args.duration, conns, script, "1"))
                    )
            results["scenarios"][name] = summarise(rounds)
            report(name, results["scenarios"][name])
        if wanted("paced") and "get" in results["scenarios"]:
            # Latency that is not queueing: every contender at one fixed rate,
            # half of authproxy's own maximum in the get scenario above.
            rate = results["scenarios"]["get"]["authproxy"]["rps"] / 2
            paced: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders if c != "minimal"}
            for _ in range(args.rounds):
                for cname in paced:
                    proc = contenders[cname]
                    port = proc.port if proc else up.port
                    script = paced_script(tmp, rate, 64)
                    paced[cname].append(
                        measured(proc, partial(wrk, port, "/api/x", args.duration, 64, script, "1"))
                    )
            summary = summarise(paced)
            summary["rate"] = round(rate)
            for cname in ("authproxy", "authproxy_log"):
                summary[f"{cname}_minus_nginx_ms"] = {
                    key: round((summary[cname][key] or 0) - (summary["nginx"][key] or 0), 2)
                    for key in ("p50_ms", "p99_ms")
                }
            results["scenarios"]["paced"] = summary
            report("paced", summary)
        if wanted("dpop_get"):
            # issue 15: the same small GET on a DPoP route (a proof signed per
            # request) and on the bearer route, alternating, same process.
            ap = contenders["authproxy"]
            assert ap is not None
            pair: dict[str, list[dict[str, Any]]] = {"bearer": [], "dpop": []}
            for _ in range(args.rounds):
                for cname, path in (("bearer", "/api/x"), ("dpop", "/dpop/api/x")):
                    pair[cname].append(
                        measured(ap, partial(wrk, ap.port, path, args.duration, 64, None, "1"))
                    )
            summary = summarise(pair)
            summary["dpop_over_bearer"] = {
                "per_round": [round(d["rps"] / b["rps"], 3) for d, b in zip(pair["dpop"], pair["bearer"], strict=True)],
                "cpu_us_added": round((summary["dpop"]["cpu_us_per_req"] or 0) - (summary["bearer"]["cpu_us_per_req"] or 0), 1),
            }  # fmt: skip
            results["scenarios"]["dpop_get"] = summary
            report("dpop_get", summary)
        if wanted("tracing"):
            # issue 17: the small GET with tracing off, on at 1 % and at 100 %,
            # each its own pinned process, alternating round by round.
            traced = {"off": contenders["authproxy"],
                      "sampled_1pct": authproxy(up.port, tokens, tmp, 1, "0", sampled=0.01),
                      "sampled_100pct": authproxy(up.port, tokens, tmp, 1, "0", sampled=1.0)}  # fmt: skip
            procs += [p for name, p in traced.items() if name != "off" and p]
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in traced}
            for _ in range(args.rounds):
                for name, proc in traced.items():
                    assert proc is not None
                    runs[name].append(
                        measured(proc, partial(wrk, proc.port, "/api/x", args.duration, 64, None, "1"))
                    )
            results["scenarios"]["tracing"] = summarise(runs)
            report("tracing", results["scenarios"]["tracing"])
        if wanted("get") and wanted("c1000"):
            results["rss_flat"] = {"after_get_c64_mib": results["scenarios"]["get"]["authproxy"]["rss_mib"],
                                   "after_c1000_mib": results["scenarios"]["c1000"]["authproxy"]["rss_mib"]}  # fmt: skip

        # The transfers run on fresh proxies: VmHWM is a lifetime peak, and
        # the 1,000-connection scenario's would stand in for the stream's.
        fresh: dict[str, Proc | None] = dict(contenders)
        if not args.skip_big and (wanted("download_512mib") or wanted("upload_512mib")):
            fresh["authproxy"] = authproxy(up.port, tokens, tmp, 1, "0")
            fresh["authproxy_log"] = authproxy(up.port, tokens, tmp, 1, "0", access_log=True)
            procs += [fresh["authproxy"], fresh["authproxy_log"]]
        for direction in ("download", "upload"):
            if not args.skip_big and wanted(f"{direction}_512mib"):
                rounds = {c: [] for c in fresh}
                for cname, proc in fresh.items():
                    port = proc.port if proc else up.port
                    rounds[cname].append(measured(proc, partial(transfer, port, direction)))
                    if proc and proc.popen:
                        rounds[cname][-1]["peak_rss_mib"] = round(
                            memory(proc.popen.pid, "VmHWM") / 2**20, 1
                        )
                results["scenarios"][f"{direction}_512mib"] = {c: r[0] for c, r in rounds.items()}
                report(f"{direction}_512mib", results["scenarios"][f"{direction}_512mib"], big=True)

        if wanted("expiry_storm"):
            # Expiry storm: a fresh authproxy and token endpoint (its first token is tok-1),
            # a cold cache, and a partner that calls tok-1 expired: every request of the
            # first wave gets a 401, and one mint replaces the token for all of them.
            storm_tokens = token_endpoint()
            storm = authproxy(up.port, storm_tokens, tmp, 1, "0")
            procs += [storm_tokens, storm]
            result = wrk(storm.port, "/expiring/x", args.duration, 64, None, "1")
            result["mints"] = mints(storm_tokens)
            results["scenarios"]["expiry_storm"] = {"authproxy": result}
            print(f"\nexpiry_storm: {result['requests']} requests, {result['errors']} errors, "
                  f"{result['mints']} mints (1 first, 1 after the expiry)")  # fmt: skip
            storm.stop()

        if wanted("workers_2"):
            # Two workers, nothing pinned: authproxy workers: 2 against nginx with 2 workers.
            for p in list(contenders.values()):
                if p:
                    p.stop()
            two = {"nginx": nginx_static(up.port, tmp, 2, None), "authproxy": authproxy(up.port, tokens, tmp, 2, None),
                   "authproxy_1worker": authproxy(up.port, tokens, tmp, 1, None)}  # fmt: skip
            procs += list(two.values())
            rounds = {c: [] for c in two}
            for _ in range(args.rounds):
                for cname, proc in two.items():
                    rounds[cname].append(
                        measured(
                            proc,
                            lambda p=proc.port: wrk(p, "/api/x", args.duration, 64, None, None),
                        )
                    )
            summary = summarise(rounds)
            summary["scaling_2_over_1"] = round(
                summary["authproxy"]["rps"] / summary["authproxy_1worker"]["rps"], 2
            )
            summary["machine_scaling_2_over_1"] = machine_scaling()
            results["scenarios"]["workers_2"] = summary
            report("workers_2", summary)
        results["mints_total"] = mints(tokens)
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


def summarise(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for cname, rs in rounds.items():
        summary[cname] = {
            k: median_of(rs, k) for k in ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "rss_mib")
        }
        summary[cname]["errors"] = sum(r["errors"] for r in rs)
        summary[cname]["rounds_rps"] = [r["rps"] for r in rs]
        summary[cname]["rounds_p99_ms"] = [r.get("p99_ms") for r in rs]
    for mine in ("authproxy", "authproxy_log"):
        if mine not in rounds:
            continue
        ours = rounds[mine]
        for other in ("nginx", "minimal", "direct"):
            if other in rounds:
                per_round = [
                    round(a["rps"] / b["rps"], 3) for a, b in zip(ours, rounds[other], strict=True)
                ]
                summary[f"{mine}_over_{other}"] = {"per_round": per_round,
                                                   "median": round(statistics.median(per_round), 3)}  # fmt: skip
    return summary


def report(name: str, summary: dict[str, Any], big: bool = False) -> None:
    print(f"\n== {name}")
    for cname, s in summary.items():
        if not isinstance(s, dict) or "_over_" in cname or "_minus_" in cname or "scaling" in cname:
            print(f"   {cname}: {s}")
            continue
        if big:
            print(f"   {cname:18} {s.get('mib_per_s')} MiB/s  status {s.get('status')}  "
                  f"bytes {s.get('bytes')}  peak RSS {s.get('peak_rss_mib')} MiB")  # fmt: skip
        else:
            print(f"   {cname:18} {s['rps']:>10} req/s  p50 {s['p50_ms']} ms  p99 {s['p99_ms']} ms  "
                  f"cpu {s['cpu_us_per_req']} us/req  rss {s['rss_mib']} MiB  errors {s['errors']}")  # fmt: skip


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"


if __name__ == "__main__":
    sys.exit(main())
