"""Differential run: every case of tests/conformance_cases.py through nginx (a
plain reverse proxy with a static Authorization header) and through
authproxy, against the same recording partner (tests/wire.py), on loopback.
Prints every case where the two differ: the status lines the app got and
what the partner received, with the proxies' own fields left out.

    .venv/bin/python bench/differential.py [--json FILE] [--only NAME,...]

Needs Debian's nginx (``apt-get install nginx-light``). Exit code 0 unless the
harness itself fails (or, with ``--strict``, a difference is not a documented one); the differences are for a person to judge: each is
either fixed or listed in docs/design.md ("Differences from nginx").
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from conformance_cases import CASES, ROUTES, authproxy_yaml  # noqa: E402
from fakes import FakeTokenEndpoint  # noqa: E402
from wire import RecordingPartner, run_case  # noqa: E402

from proxy.config.load import parse_config  # noqa: E402
from proxy.log import configure_logging  # noqa: E402
from proxy.server import ProxyServer  # noqa: E402

# The differences docs/design.md lists ("Differences from nginx"), each a
# choice with its reason. A case outside this set that differs fails the run
# (exit 1): fix it, or list it there and here.
KNOWN: frozenset[str] = frozenset(
    {
        "method_extension_get",
        "method_trace_refused",
        "method_trace_max_forwards_0",
        "method_options_max_forwards_0",
        "method_options_max_forwards_decremented",
        "method_connect",
        "method_connect_unrouted",
        "pipelined_after_upgrade_h2c_post",
        "pipelined_after_upgrade_h2c_get",
        "target_percent_encoding_raw",
        "target_double_slash_kept",
        "target_absolute_form_unrouted_host",
        "headers_hop_by_hop_dropped",
        "request_chunked_extensions_trailers_small",
        "request_chunked_extensions_trailers_large",
        "request_chunked_empty",
        "interim_103_early_hints",
        "interim_102_processing",
        "interim_two_103_in_a_row",
        "interim_103_not_sent_to_http10_app",
        "isolation_request_trailer_not_a_header_of_next_pipelined",
        "isolation_request_trailer_not_a_header_of_next_sequential",
        "limit_414_request_line",
        "limit_431_long_header",
        "limit_431_long_authorization_never_echoed",
        "limit_431_too_many_headers",
        "limit_408_body_stalls",
        "limit_unknown_transfer_coding_alone",
        "interim_103_with_content_length_and_hop_by_hop",
        "malformed_400_host_userinfo",
        "malformed_400_host_port_99999",
        "malformed_400_host_port_30_digits",
        "method_options_max_forwards_00",
        "response_101_without_upgrade_http_1_0",
        "response_101_without_upgrade_http_1_1",
        "response_204_with_content_length_late_bytes",
        "response_status_600",
        "headers_rewrite_and_client_ip_fields_dropped",
        "response_refused_407_from_partner",
        "response_refused_http_2_0_status_line",
        "target_path_parameter_dot_segment",
        "refusal_never_quotes_bad_port_query_key",
        "refusal_never_quotes_bare_lf_authorization",
        "response_reason_with_control_bytes_replaced",
    }
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nginx_conf(port: int, partner_port: int, tmp: Path) -> str:
    locations = []
    hosted = []
    for _, match, path, keys in ROUTES:
        size = "client_max_body_size 16;" if "max_body: 16" in keys else ""
        block = (
            f"proxy_pass http://partner{path};\n"
            "      proxy_http_version 1.1;\n"
            '      proxy_set_header Connection "";\n'
            '      proxy_set_header Authorization "Bearer static";\n'
            f"      {size}"
        )
        if match.startswith("host:"):
            hosted.append(
                f"  server {{ listen 127.0.0.1:{port}; server_name {match[5:]};\n"
                f"    location / {{ {block} }} }}"
            )
        else:
            locations.append(f"    location {match} {{ {block} }}")
    return f"""
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  client_body_timeout 1s;
  upstream partner {{ server 127.0.0.1:{partner_port}; keepalive 16; }}
  server {{ listen 127.0.0.1:{port} default_server; server_name _;
{chr(10).join(locations)}
  }}
{chr(10).join(hosted)}
}}
"""


def summary(outcome: object) -> dict[str, object]:
    answers = [m.start_line.decode("latin-1") for m in outcome.answers]  # type: ignore[attr-defined]
    received = [
        m.message.canonical(frozenset(_OWN)).render(300)  # type: ignore[attr-defined]
        for m in outcome.received  # type: ignore[attr-defined]
    ]
    return {"answers": answers, "partner_received": received}


# Fields each proxy sets itself and the other does not (or differently): left out.
_OWN = {
    b"host",
    b"authorization",
    b"via",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-request-id",
    b"connection",
}


async def run(only: set[str]) -> list[dict[str, object]]:
    configure_logging("error", io.StringIO())
    tokens = FakeTokenEndpoint()
    await tokens.start()
    partner = RecordingPartner()
    await partner.start()
    proxy = ProxyServer(
        parse_config(authproxy_yaml(tokens.token_url, partner.url), "differential.yaml")
    )
    await proxy.start()
    tmp = Path(tempfile.mkdtemp(prefix="differential-"))
    tmp.chmod(0o777)  # nginx's workers run unprivileged and buffer bodies here
    nginx_port = free_port()
    (tmp / "nginx.conf").write_text(nginx_conf(nginx_port, int(partner.url.rsplit(":", 1)[1]), tmp))
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    nginx = subprocess.Popen(
        [binary, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    differences = []
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                await asyncio.open_connection("127.0.0.1", nginx_port)
                break
            except OSError:
                if time.monotonic() > deadline or nginx.poll() is not None:
                    raise RuntimeError(f"nginx did not start: {(tmp / 'error.log').read_text()}")
                await asyncio.sleep(0.05)
        for case in CASES:
            if only and case.name not in only:
                continue
            partner.reset()
            theirs = summary(await run_case(case, nginx_port, partner, timeout=3.0))
            partner.reset()
            ours = summary(await run_case(case, proxy.port, partner, timeout=3.0))
            if theirs != ours:
                differences.append(
                    {"case": case.name, "why": case.why, "nginx": theirs, "authproxy": ours}
                )
    finally:
        nginx.terminate()
        nginx.wait(10)
        await proxy.stop()
        await partner.stop()
        await tokens.stop()
    return differences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the differences to this file")
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a difference is not a documented one"
    )
    args = parser.parse_args()
    differences = asyncio.run(run(set(filter(None, args.only.split(",")))))
    for item in differences:
        print(f"== {item['case']}  ({item['why']})")
        for side in ("nginx", "authproxy"):
            data = item[side]
            assert isinstance(data, dict)
            print(f"  {side:9} app got: {data['answers']}")
            for received in data["partner_received"]:
                assert isinstance(received, str)
                print(
                    "            partner got: "
                    + received.replace("\n", "\n                         ")
                )
    print(f"{len(differences)} of {len(CASES)} cases differ between nginx and authproxy")
    if args.json:
        Path(args.json).write_text(json.dumps(differences, indent=2))
    new = sorted({str(item["case"]) for item in differences} - KNOWN)
    if args.strict and new:
        print(f"not in docs/design.md's list: {', '.join(new)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
