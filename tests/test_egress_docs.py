"""Black-box checks of docs/egress.md (and the egress keys of
docs/configuration.md) that tests/test_egress.py does not make: config errors
for the egress keys, wildcard tunnel entries, the wire inside an intercepted
tunnel (HTTP/1.0 CONNECT, pipelining, chunked bodies, CONNECT inside, TLS
versions, ALPN), the leaf certificates, and the ``ca init`` and ``check``
commands. Everything on loopback; every CA here is made by the test itself
with ``cryptography`` (or by ``authproxy ca init``), never by the product's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_egress import HOST, ROUTE, connect, metric_value

from conftest import Stack, StackFactory, eventually, log_events
from proxy.config.load import parse_config
from proxy.errors import ConfigError
from proxy.server import ProxyServer

# The command as installed in whatever environment runs the tests (CI's own venv).
AUTHPROXY = (sys.executable, "-m", "proxy")
OTHER = "b.partner.example"  # a second routed host, inside the CA's constraints
OTHER_ROUTE = f"""  - name: partner-b
    match: {{host: {OTHER}}}
    upstream: {{partner}}/b/
    client: demo"""


# ------------------------------------------------------------------ the CAs


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_key(kind: str) -> Any:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def write_key(path: Path, key: Any, *, mode: int = 0o600, password: bytes | None = None) -> None:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    path.chmod(mode)


def make_ca(
    directory: Path,
    *,
    permit: tuple[str, ...] | None = (HOST, ".partner.example"),
    kind: str = "ec",
    is_ca: bool = True,
    key_cert_sign: bool | None = True,  # None: no key usage extension at all
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    key_mode: int = 0o600,
) -> tuple[Path, Path]:
    """A self-signed certificate and its key, written to DIRECTORY/ca.pem and ca.key."""
    directory.mkdir(parents=True, exist_ok=True)
    key = new_key(kind)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test CA {directory.name}")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now() - dt.timedelta(hours=1))
        .not_valid_after(not_after or now() + dt.timedelta(days=365))
        .add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if key_cert_sign is not None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=key_cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if permit:
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.DNSName(name) for name in permit],
                excluded_subtrees=None,
            ),
            critical=True,
        )
    certificate = builder.sign(key, None if kind == "ed25519" else hashes.SHA256())
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    write_key(key_path, key, mode=key_mode)
    return cert_path, key_path


@dataclass
class CA:
    cert: Path
    key: Path

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert.read_bytes())


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(*make_ca(tmp_path / "egress-ca"))


# ---------------------------------------------------------- a blind-tunnel host


@dataclass
class TcpEcho:
    """A plain TCP host for blind tunnels: reads until the app's EOF, answers
    ``echo:`` + what it read, then closes. Records every connection's bytes."""

    port: int = 0
    connections: int = 0
    received: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            data = await reader.read()
            self.received.append(data)
            writer.write(b"echo:" + data)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[TcpEcho]:
    server = TcpEcho()
    await server.start()
    yield server
    await server.stop()


# ----------------------------------------------------------------- helpers


def egress_block(ca: CA, *, intercept_extra: str = "", tunnel: tuple[str, ...] = (),
                 extra: str = "") -> str:  # fmt: skip
    lines = [
        "egress:",
        "  intercept:",
        f"    ca_cert_file: {ca.cert}",
        f"    ca_key_file: {ca.key}",
    ]
    if intercept_extra:
        lines.append(intercept_extra)
    if tunnel:
        lines.append("  tunnel:")
        lines.extend(f'    - "{entry}"' for entry in tunnel)
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


async def start_stack(
    make_stack: StackFactory,
    ca: CA,
    *,
    intercept_extra: str = "",
    tunnel: tuple[str, ...] = (),
    extra: str = "",
    extra_routes: str = ROUTE,
    **parts: Any,
) -> Stack:
    top = egress_block(ca, intercept_extra=intercept_extra, tunnel=tunnel, extra=extra)
    return await make_stack(top=top, extra_routes=extra_routes, **parts)


def client_context(ca: CA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.cert))


async def open_tunnel(
    port: int, context: ssl.SSLContext, *, host: str = HOST, sni: str | None = None,
    request: bytes | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:  # fmt: skip
    """CONNECT HOST:443, check the 200, then the app's TLS handshake."""
    reader, writer, head = await connect(port, f"{host}:443", raw=request)
    assert head.split(b" ", 2)[1] == b"200", head
    await asyncio.wait_for(
        writer.start_tls(context, server_hostname=sni if sni is not None else host), 5
    )
    return reader, writer, head


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response: its head and its (de-chunked) body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            name, _, val = line.partition(b":")
            fields[name.strip().lower()] = val.strip()
    if b"content-length" in fields:
        body = await asyncio.wait_for(reader.readexactly(int(fields[b"content-length"])), 5)
        return head, body
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        body = b""
        while True:
            size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)  # no trailers expected
                return head, body
            body += await asyncio.wait_for(reader.readexactly(size), 5)
            await asyncio.wait_for(reader.readexactly(2), 5)
    return head, b""


async def is_closed(reader: asyncio.StreamReader, timeout: float = 3.0) -> bool:
    """True when the peer closes (EOF or a broken TLS stream) within TIMEOUT."""
    try:
        rest = await asyncio.wait_for(reader.read(65536), timeout)
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        return True
    return rest == b""


def status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def peer_leaf(writer: asyncio.StreamWriter) -> x509.Certificate:
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


def config_text(top: str, routes: str = "") -> str:
    return f"""listen: 127.0.0.1:0
{top}
clients:
  demo:
    token_url: http://127.0.0.1:9/oauth2/token
    client_id: demo-client
    client_secret: ${{DEMO_SECRET:-demo-secret}}
routes:
  - name: acme
    match: {{host: {HOST}}}
    upstream: http://127.0.0.1:9/v2/
    client: demo
{routes}
"""


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "test.yaml")
    message = str(caught.value)
    assert message.startswith("test.yaml:"), message  # file (and line) first, as documented
    return message


async def refused_at_start(text: str) -> str:
    """The ConfigError the proxy stops with: from parsing the file, or from
    starting with it (where the CA files are read)."""
    try:
        config = parse_config(text, "test.yaml")
    except ConfigError as error:
        return str(error)
    server = ProxyServer(config)
    try:
        await server.start()
    except ConfigError as error:
        return str(error)
    await server.stop()
    raise AssertionError("the proxy started with this configuration")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own fixed argv
        [*AUTHPROXY, *args], capture_output=True, text=True, timeout=60, check=False
    )


# ============================================================ config errors


def test_a_valid_egress_block_parses(ca: CA) -> None:
    parse_config(config_text(egress_block(ca, tunnel=(f"{HOST}:8443", "pypi.org:443"))), "t.yaml")


@pytest.mark.parametrize("entry", [f"{HOST}:443", "*.acme.example:443", "API.ACME.EXAMPLE:443"])
def test_a_tunnel_entry_covering_a_routed_host_on_443_is_a_config_error(ca: CA, entry: str) -> None:
    message = config_error(config_text(egress_block(ca, tunnel=(entry,))))
    assert "egress.tunnel" in message, message


@pytest.mark.parametrize("entry", ["10.0.0.5:443", "127.0.0.1:8443", "[::1]:443"])
def test_an_ip_literal_tunnel_entry_is_a_config_error(ca: CA, entry: str) -> None:
    message = config_error(config_text(egress_block(ca, tunnel=(entry,))))
    assert "egress.tunnel" in message, message


@pytest.mark.parametrize("lifetime", ["30s", "59", "500ms"])
def test_a_leaf_lifetime_under_a_minute_is_a_config_error(ca: CA, lifetime: str) -> None:
    text = config_text(egress_block(ca, intercept_extra=f"    leaf_lifetime: {lifetime}"))
    assert "leaf_lifetime" in config_error(text)


def test_a_leaf_lifetime_of_one_minute_is_accepted(ca: CA) -> None:
    parse_config(config_text(egress_block(ca, intercept_extra="    leaf_lifetime: 1m")), "t.yaml")


def test_a_misspelt_intercept_key_is_an_error_with_a_suggestion(ca: CA) -> None:
    text = config_text(egress_block(ca, intercept_extra="    leaf_lifetim: 2h"))
    message = config_error(text)
    assert "leaf_lifetim" in message and "leaf_lifetime" in message.split("leaf_lifetim", 1)[1]


def test_an_intercept_without_ca_key_file_is_a_config_error(ca: CA) -> None:
    top = f"egress:\n  intercept:\n    ca_cert_file: {ca.cert}\n"
    assert "ca_key_file" in config_error(config_text(top))


def test_a_ca_key_file_that_does_not_exist_is_a_config_error(ca: CA, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.key"
    top = egress_block(CA(ca.cert, missing))
    message = config_error(config_text(top))
    assert "ca_key_file" in message or str(missing) in message, message


async def test_a_ca_key_that_does_not_match_the_certificate_stops_the_start(
    ca: CA, tmp_path: Path
) -> None:
    _, stranger = make_ca(tmp_path / "stranger")
    message = await refused_at_start(config_text(egress_block(CA(ca.cert, stranger))))
    assert "egress.intercept" in message or "ca_key_file" in message, message
    assert str(stranger) in message, message
    key_lines = [line for line in stranger.read_text().splitlines() if "-----" not in line]
    assert not any(line in message for line in key_lines)


@pytest.mark.parametrize(
    "kind",
    ["not_a_ca", "no_key_cert_sign", "expired", "not_yet_valid"],
)
async def test_a_certificate_that_cannot_be_the_egress_ca_stops_the_start(
    tmp_path: Path, kind: str
) -> None:
    options: dict[str, Any] = {
        "not_a_ca": {"is_ca": False, "key_cert_sign": False},
        "no_key_cert_sign": {"key_cert_sign": False},
        "expired": {
            "not_before": now() - dt.timedelta(days=30),
            "not_after": now() - dt.timedelta(days=1),
        },
        "not_yet_valid": {
            "not_before": now() + dt.timedelta(days=1),
            "not_after": now() + dt.timedelta(days=30),
        },
    }[kind]
    bad = CA(*make_ca(tmp_path / kind, **options))
    message = await refused_at_start(config_text(egress_block(bad)))
    assert "egress.intercept" in message or "ca_cert_file" in message, message
    assert str(bad.cert) in message, message


async def test_an_encrypted_ca_key_stops_the_start(ca: CA, tmp_path: Path) -> None:
    certificate_key = serialization.load_pem_private_key(ca.key.read_bytes(), None)
    locked = tmp_path / "locked.key"
    write_key(locked, certificate_key, password=b"hunter22")
    message = await refused_at_start(config_text(egress_block(CA(ca.cert, locked))))
    assert "egress.intercept" in message or "ca_key_file" in message, message
    assert str(locked) in message, message
    key_lines = [line for line in locked.read_text().splitlines() if "-----" not in line]
    assert not any(line in message for line in key_lines)


# ====================================================== CONNECT on the wire


async def test_an_http_1_0_connect_is_intercepted_too(make_stack: StackFactory, ca: CA) -> None:
    stack = await start_stack(make_stack, ca)
    reader, writer, _ = await open_tunnel(
        stack.proxy.port,
        client_context(ca),
        request=f"CONNECT {HOST}:443 HTTP/1.0\r\n\r\n".encode(),
    )
    writer.write(f"GET /ten HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    head, body = await read_response(reader)
    close(writer)
    assert status(head) == 200, head
    assert json.loads(body)["raw_path"] == "/v2/ten"
    assert len(stack.partner.requests) == 1 and stack.tokens.calls == 1
    assert stack.partner.requests[0].token == stack.tokens.issued[0]


async def test_pipelined_requests_inside_a_tunnel_come_back_in_order_with_one_token(
    make_stack: StackFactory, ca: CA
) -> None:
    stack = await start_stack(make_stack, ca)
    reader, writer, _ = await open_tunnel(stack.proxy.port, client_context(ca))
    writer.write(
        b"".join(
            f"GET /p/{i} HTTP/1.1\r\nHost: {HOST}\r\nX-N: {i}\r\n\r\n".encode() for i in range(3)
        )
    )
    answers = [await read_response(reader) for _ in range(3)]
    close(writer)
    assert [status(head) for head, _ in answers] == [200, 200, 200]
    assert [json.loads(body)["raw_path"] for _, body in answers] == [
        "/v2/p/0",
        "/v2/p/1",
        "/v2/p/2",
    ]
    assert [r.raw_path for r in stack.partner.requests] == ["/v2/p/0", "/v2/p/1", "/v2/p/2"]
    assert stack.tokens.calls == 1
    assert {r.token for r in stack.partner.requests} == {stack.tokens.issued[0]}
    assert metric_value(stack.proxy, "authproxy_connect_total", outcome="intercepted") == 1


async def test_a_chunked_post_inside_a_tunnel_reaches_the_partner_byte_for_byte(
    make_stack: StackFactory, ca: CA
) -> None:
    stack = await start_stack(make_stack, ca)
    pieces = [os.urandom(1000), os.urandom(17), os.urandom(40_000)]
    chunked = b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
    reader, writer, _ = await open_tunnel(stack.proxy.port, client_context(ca))
    writer.write(
        f"POST /upload HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + chunked
    )
    head, body = await read_response(reader)
    # The connection is still good for another request afterwards.
    writer.write(f"GET /after HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    head2, body2 = await read_response(reader)
    close(writer)
    assert status(head) == 200 and status(head2) == 200, (head, head2)
    assert json.loads(body)["body_length"] == sum(map(len, pieces))
    assert len(stack.partner.requests) == 2
    assert stack.partner.requests[0].method == "POST"
    assert stack.partner.requests[0].body == b"".join(pieces)
    assert json.loads(body2)["raw_path"] == "/v2/after"
    assert stack.tokens.calls == 1


@pytest.mark.parametrize("target", ["elsewhere.example:443", f"{HOST}:443"])
async def test_a_connect_inside_an_intercepted_tunnel_is_405_and_closes(
    make_stack: StackFactory, ca: CA, target: str
) -> None:
    stack = await start_stack(make_stack, ca)
    reader, writer, _ = await open_tunnel(stack.proxy.port, client_context(ca))
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head, body = await read_response(reader)
    assert status(head) == 405, head
    assert json.loads(body)["error"] == "method_not_allowed"
    closed = await is_closed(reader)
    close(writer)
    assert closed, "the connection stayed open after the refused CONNECT"
    assert stack.partner.requests == [] and stack.tokens.calls == 0


@pytest.mark.parametrize(
    "target",
    ["https://other.partner.example/x", f"https://{HOST}:8443/x", "http://b.partner.example/x"],
)
async def test_an_absolute_form_target_naming_another_authority_inside_a_tunnel_is_421(
    make_stack: StackFactory, ca: CA, target: str
) -> None:
    stack = await start_stack(make_stack, ca, extra_routes=ROUTE + "\n" + OTHER_ROUTE)
    reader, writer, _ = await open_tunnel(stack.proxy.port, client_context(ca))
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    head, body = await read_response(reader)
    close(writer)
    assert status(head) == 421, head
    assert json.loads(body)["error"] == "misdirected_request"
    assert stack.partner.requests == [] and stack.tokens.calls == 0


async def test_a_route_max_body_holds_inside_a_tunnel(make_stack: StackFactory, ca: CA) -> None:
    route = ROUTE + "\n    max_body: 10"
    stack = await start_stack(make_stack, ca, extra_routes=route)
    reader, writer, _ = await open_tunnel(stack.proxy.port, client_context(ca))
    writer.write(
        f"POST /big HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100\r\n\r\n".encode() + b"x" * 100
    )
    head, body = await read_response(reader)
    close(writer)
    assert status(head) == 413, head
    assert json.loads(body)["error"] == "body_too_large"
    assert stack.partner.requests == []


async def test_an_intercepted_connect_and_each_request_inside_have_access_lines(
    make_stack: StackFactory, ca: CA, log_stream: Any
) -> None:
    stack = await start_stack(make_stack, ca)
    reader, writer, _ = await open_tunnel(stack.proxy.port, client_context(ca))
    for path in ("/a", "/b"):
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        await read_response(reader)
    close(writer)

    def lines() -> list[dict[str, Any]]:
        return [e for e in log_events(log_stream) if e["event"] == "access"]

    await eventually(lambda: any(e.get("method") == "CONNECT" for e in lines()))
    connects = [e for e in lines() if e.get("method") == "CONNECT"]
    assert len(connects) == 1, connects
    assert connects[0]["connect"] == f"{HOST}:443"
    assert connects[0]["outcome"] == "intercepted"
    inner = [e for e in lines() if e.get("method") == "GET"]
    assert len(inner) == 2, lines()
    assert stack.tokens.issued[0] not in log_stream.getvalue()


# ================================================================ TLS, ALPN


async def test_a_client_offering_only_tls_1_1_is_refused_and_counted(
    make_stack: StackFactory, ca: CA, log_stream: Any
) -> None:
    stack = await start_stack(make_stack, ca)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(cafile=str(ca.cert))
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    _, writer, head = await connect(stack.proxy.port, f"{HOST}:443")
    assert status(head) == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.wait_for(writer.start_tls(old, server_hostname=HOST), 5)
    close(writer)
    await eventually(
        lambda: any(e["event"] == "tunnel_handshake_failed" for e in log_events(log_stream))
    )
    failed = next(e for e in log_events(log_stream) if e["event"] == "tunnel_handshake_failed")
    assert failed["host"] == HOST and failed.get("reason"), failed  # OpenSSL's short reason
    assert metric_value(stack.proxy, "authproxy_connect_total", outcome="failed") == 1
    assert stack.partner.requests == [] and stack.tokens.calls == 0


async def test_a_client_capped_at_tls_1_2_is_served(make_stack: StackFactory, ca: CA) -> None:
    stack = await start_stack(make_stack, ca)
    context = client_context(ca)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    reader, writer, _ = await open_tunnel(stack.proxy.port, context)
    assert writer.get_extra_info("ssl_object").version() == "TLSv1.2"
    writer.write(f"GET /v12 HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    head, _ = await read_response(reader)
    close(writer)
    assert status(head) == 200 and len(stack.partner.requests) == 1


async def test_alpn_offering_h2_and_http_1_1_gets_http_1_1(
    make_stack: StackFactory, ca: CA
) -> None:
    stack = await start_stack(make_stack, ca)
    context = client_context(ca)
    context.set_alpn_protocols(["h2", "http/1.1"])
    reader, writer, _ = await open_tunnel(stack.proxy.port, context)
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    writer.write(f"GET /alpn HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    head, _ = await read_response(reader)
    close(writer)
    assert status(head) == 200 and len(stack.partner.requests) == 1


async def test_a_client_that_offers_only_h2_gets_no_protocol_and_never_h2(
    make_stack: StackFactory, ca: CA, log_stream: Any
) -> None:
    stack = await start_stack(make_stack, ca)
    context = client_context(ca)
    context.set_alpn_protocols(["h2"])
    _, writer, head = await connect(stack.proxy.port, f"{HOST}:443")
    assert status(head) == 200
    await asyncio.wait_for(writer.start_tls(context, server_hostname=HOST), 5)
    negotiated = writer.get_extra_info("ssl_object").selected_alpn_protocol()
    close(writer)
    assert negotiated is None  # docs/egress.md: nothing overlaps, nothing selected
    assert stack.partner.requests == []


async def test_an_app_without_sni_gets_the_connect_hosts_certificate(
    make_stack: StackFactory, ca: CA
) -> None:
    stack = await start_stack(make_stack, ca)
    context = client_context(ca)
    context.check_hostname = False  # an IP-only client: it checks the name itself
    reader, writer, _ = await connect(stack.proxy.port, f"{HOST}:443")
    await asyncio.wait_for(writer.start_tls(context, server_hostname=None), 5)
    leaf = peer_leaf(writer)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [HOST]
    writer.write(f"GET /nosni HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    head, _ = await read_response(reader)
    close(writer)
    assert status(head) == 200
    assert [r.raw_path for r in stack.partner.requests] == ["/v2/nosni"]


# ======================================================== leaf certificates


@pytest.mark.parametrize(("setting", "seconds"), [("", 86400), ("2h", 7200), ("1m", 60)])
async def test_the_leaf_names_the_host_only_and_lives_leaf_lifetime(
    make_stack: StackFactory, ca: CA, setting: str, seconds: int
) -> None:
    extra = f"    leaf_lifetime: {setting}" if setting else ""
    stack = await start_stack(make_stack, ca, intercept_extra=extra)
    _, writer, _ = await open_tunnel(stack.proxy.port, client_context(ca))
    leaf = peer_leaf(writer)
    close(writer)
    moment = now()
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [HOST]
    assert names.get_values_for_type(x509.IPAddress) == []
    assert len(list(names)) == 1
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert leaf.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in list(usages)
    assert leaf.issuer == ca.certificate.subject
    leaf.verify_directly_issued_by(ca.certificate)
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    back = (moment - leaf.not_valid_before_utc).total_seconds()
    ahead = (leaf.not_valid_after_utc - moment).total_seconds()
    assert 240 <= back <= 360, back  # five minutes back
    assert seconds - 60 <= ahead <= seconds + 1, ahead  # leaf_lifetime ahead, not more
    assert metric_value(stack.proxy, "authproxy_leaf_certificates_issued_total") == 1


async def test_a_leaf_never_outlives_its_ca(make_stack: StackFactory, tmp_path: Path) -> None:
    short = CA(*make_ca(tmp_path / "short", not_after=now() + dt.timedelta(hours=3)))
    stack = await start_stack(make_stack, short, intercept_extra="    leaf_lifetime: 24h")
    reader, writer, _ = await open_tunnel(stack.proxy.port, client_context(short))
    leaf = peer_leaf(writer)
    writer.write(f"GET /short HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    head, _ = await read_response(reader)
    close(writer)
    assert leaf.not_valid_after_utc <= short.certificate.not_valid_after_utc
    assert status(head) == 200


async def test_leaves_are_cached_per_host_and_share_one_key(
    make_stack: StackFactory, ca: CA
) -> None:
    stack = await start_stack(make_stack, ca, extra_routes=ROUTE + "\n" + OTHER_ROUTE)
    seen: list[tuple[str, bytes]] = []
    for host in (HOST, OTHER, HOST, OTHER):
        reader, writer, _ = await open_tunnel(stack.proxy.port, client_context(ca), host=host)
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.write(f"GET /leaf HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head, _ = await read_response(reader)
        close(writer)
        assert status(head) == 200, head
        seen.append((host, der))
    first, second, _third, _fourth = (x509.load_der_x509_certificate(d) for _, d in seen)
    assert seen[0][1] == seen[2][1] and seen[1][1] == seen[3][1]  # the cached leaf, same bytes
    assert seen[0][1] != seen[1][1]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    assert first.public_key().public_bytes(pem, spki) == second.public_key().public_bytes(pem, spki)
    assert metric_value(stack.proxy, "authproxy_leaf_certificates_issued_total") == 2
    assert [r.raw_path for r in stack.partner.requests] == ["/v2/leaf", "/b/leaf"] * 2
    assert stack.tokens.calls == 1


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
async def test_a_ca_of_your_own_with_an_rsa_or_ed25519_key_works(
    make_stack: StackFactory, tmp_path: Path, kind: str
) -> None:
    own = CA(*make_ca(tmp_path / kind, kind=kind, permit=(HOST,)))
    stack = await start_stack(make_stack, own)
    reader, writer, _ = await open_tunnel(stack.proxy.port, client_context(own))
    leaf = peer_leaf(writer)
    writer.write(f"GET /own HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    head, _ = await read_response(reader)
    close(writer)
    leaf.verify_directly_issued_by(own.certificate)
    assert status(head) == 200
    assert len(stack.partner.requests) == 1 and stack.tokens.calls == 1


# ============================================================ blind tunnels


@pytest.fixture
def localhost_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names below ``localhost`` resolve to 127.0.0.1 (RFC 6761 §6.3), as
    systemd-resolved does; this machine's resolver does not, and no test may
    ask a DNS server beyond loopback."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, bytes):
            host = host.decode()
        if isinstance(host, str) and host.lower().endswith(".localhost"):
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize("name", ["a.localhost", "deep.b.localhost"])
async def test_a_wildcard_tunnel_entry_covers_names_below_the_domain(
    make_stack: StackFactory, ca: CA, echo: TcpEcho, log_stream: Any, localhost_names: None,
    name: str,
) -> None:  # fmt: skip
    entry = f"*.localhost:{echo.port}"
    stack = await start_stack(make_stack, ca, tunnel=(entry,))
    reader, writer, head = await connect(stack.proxy.port, f"{name}:{echo.port}")
    assert status(head) == 200, head
    payload = os.urandom(3000)
    writer.write(payload)
    writer.write_eof()  # the app is done sending; the host answers and closes
    answer = await asyncio.wait_for(reader.read(), 5)
    close(writer)
    assert answer == b"echo:" + payload
    assert echo.connections == 1 and echo.received == [payload]

    def tunneled() -> list[dict[str, Any]]:
        return [e for e in log_events(log_stream) if e.get("outcome") == "tunneled"]

    await eventually(lambda: bool(tunneled()))
    line = tunneled()[0]
    assert line["method"] == "CONNECT" and line["connect"] == f"{name}:{echo.port}"
    assert line["tunnel"] == entry
    assert (line["up"], line["down"]) == (len(payload), len(payload) + 5)
    assert line["ended"] == "closed"
    assert stack.tokens.calls == 0 and stack.partner.requests == []


@pytest.mark.parametrize("target", ["localhost:{port}", "localhost:443", "x.localhost:443"])
async def test_a_wildcard_tunnel_entry_does_not_cover_the_domain_itself_or_other_ports(
    make_stack: StackFactory, ca: CA, echo: TcpEcho, localhost_names: None, target: str
) -> None:
    stack = await start_stack(make_stack, ca, tunnel=(f"*.localhost:{echo.port}",))
    target = target.format(port=echo.port)
    reader, writer, head = await connect(stack.proxy.port, target)
    body = await asyncio.wait_for(reader.read(), 5)
    close(writer)
    assert status(head) == 403, head
    document = json.loads(body)
    assert document["error"] == "connect_not_allowed" and target in document["message"]
    assert echo.connections == 0


async def test_a_githubusercontent_style_entry_refuses_the_bare_domain(
    make_stack: StackFactory, ca: CA
) -> None:
    stack = await start_stack(make_stack, ca, tunnel=("*.githubusercontent.com:443",))
    reader, writer, head = await connect(stack.proxy.port, "githubusercontent.com:443")
    body = await asyncio.wait_for(reader.read(), 5)
    close(writer)
    assert status(head) == 403, head
    assert json.loads(body)["error"] == "connect_not_allowed"
    assert metric_value(stack.proxy, "authproxy_connect_total", outcome="refused") == 1


async def test_a_tunnel_host_that_never_answers_is_504_after_the_connect_timeout(
    make_stack: StackFactory, ca: CA
) -> None:
    # A listening socket whose accept queue is full: SYNs to it go unanswered.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        probe = socket.socket()
        probe.settimeout(0.5)
        try:
            probe.connect(("127.0.0.1", port))
            pytest.skip("this kernel answers every SYN: no way to make a silent host")
        except (TimeoutError, OSError):
            pass
        finally:
            probe.close()
        stack = await start_stack(
            make_stack, ca, tunnel=(f"localhost:{port}",), extra="  tunnel_connect_timeout: 300ms"
        )
        started = time.monotonic()
        reader, writer, head = await connect(stack.proxy.port, f"localhost:{port}")
        body = await asyncio.wait_for(reader.read(), 5)
        elapsed = time.monotonic() - started
        close(writer)
    finally:
        for filler in fillers:
            filler.close()
        blackhole.close()
    assert status(head) == 504, head
    document = json.loads(body)
    assert document["error"] == "upstream_timeout"
    assert f"localhost:{port}" in document["message"]
    assert 0.2 <= elapsed < 3, elapsed
    assert metric_value(stack.proxy, "authproxy_connect_total", outcome="failed") == 1


# ===================================================================== CLI


def test_ca_init_writes_a_constrained_ten_year_p256_ca_and_a_private_key(
    tmp_path: Path,
) -> None:
    out = tmp_path / "egress-ca"
    run = run_cli("ca", "init", "--out", str(out), "--permit", HOST, "--permit", ".partner.example")
    assert run.returncode == 0, run.stderr
    cert_path, key_path = out / "ca.pem", out / "ca.key"
    assert os.stat(key_path).st_mode & 0o777 == 0o600
    key_lines = [line for line in key_path.read_text().splitlines() if "-----" not in line]
    assert not any(line in run.stdout + run.stderr for line in key_lines)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca is True and constraints.value.path_length == 0
    names = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert names.critical
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3640) <= life <= dt.timedelta(days=3660), life


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> None:
    """A TLS handshake in memory; raises the client's verification error."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    tls_client = client.wrap_bio(c_in, c_out, server_hostname=name)
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(20):
        for i, side in enumerate((tls_client, tls_server)):
            if done[i]:
                continue
            try:
                side.do_handshake()
                done[i] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                if i == 0:
                    raise
                done[i] = True
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            return
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        (HOST, True),
        (f"v1.{HOST}", True),
        ("x.partner.example", True),
        ("partner.example", False),  # .partner.example: only the names below it
        ("acme.example", False),
        ("mail.bank.example", False),
    ],
)
def test_ca_init_name_constraints_make_tls_refuse_other_names(
    tmp_path: Path, name: str, accepted: bool
) -> None:
    out = tmp_path / "ca"
    run = run_cli("ca", "init", "--out", str(out), "--permit", HOST, "--permit", ".partner.example")
    assert run.returncode == 0, run.stderr
    ca_cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
    # Sign a leaf for NAME with the CA's own key: what a thief of the key could do.
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - dt.timedelta(minutes=5))
        .not_valid_after(now() + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    write_key(tmp_path / "leaf.key", leaf_key)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    client = ssl.create_default_context(cafile=str(out / "ca.pem"))
    if accepted:
        _handshake(server, client, name)
    else:
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(server, client, name)


def test_ca_init_never_overwrites_either_file(tmp_path: Path) -> None:
    out = tmp_path / "ca"
    assert run_cli("ca", "init", "--out", str(out), "--permit", HOST).returncode == 0
    cert, key = (out / "ca.pem").read_bytes(), (out / "ca.key").read_bytes()
    again = run_cli("ca", "init", "--out", str(out), "--permit", HOST)
    assert again.returncode != 0
    assert (out / "ca.pem").read_bytes() == cert and (out / "ca.key").read_bytes() == key
    # Only the certificate left: still no overwrite of it.
    (out / "ca.key").unlink()
    third = run_cli("ca", "init", "--out", str(out), "--permit", HOST)
    assert third.returncode != 0
    assert (out / "ca.pem").read_bytes() == cert


def test_ca_init_without_permit_has_no_name_constraints(tmp_path: Path) -> None:
    out = tmp_path / "open"
    assert run_cli("ca", "init", "--out", str(out)).returncode == 0
    cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.NameConstraints)


def _write_config(tmp_path: Path, ca: CA, routes: str = "") -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(config_text(egress_block(ca), routes))
    return path


def test_check_refuses_a_routed_host_outside_the_ca_constraints(tmp_path: Path, ca: CA) -> None:
    routes = """  - name: bank
    match: {host: mail.bank.example}
    upstream: http://127.0.0.1:9/
    client: demo"""
    path = _write_config(tmp_path, ca, routes)
    run = run_cli("check", "-c", str(path))
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert "'bank'" in run.stderr and "mail.bank.example" in run.stderr, run.stderr


def test_check_names_the_file_and_line_of_a_ca_constraint_error(tmp_path: Path, ca: CA) -> None:
    routes = """  - name: bank
    match: {host: mail.bank.example}
    upstream: http://127.0.0.1:9/
    client: demo"""
    path = _write_config(tmp_path, ca, routes)
    run = run_cli("check", "-c", str(path))
    assert run.returncode == 1
    assert re.search(re.escape(path.name) + r":\d+:", run.stderr), run.stderr


def test_check_accepts_the_ca_and_routes_inside_its_constraints(tmp_path: Path, ca: CA) -> None:
    routes = f"""  - name: partner-b
    match: {{host: {OTHER}}}
    upstream: http://127.0.0.1:9/
    client: demo"""
    run = run_cli("check", "-c", str(_write_config(tmp_path, ca, routes)))
    assert run.returncode == 0, run.stderr
    assert "constraint" not in run.stderr.lower(), run.stderr


def test_check_warns_about_a_ca_without_name_constraints(tmp_path: Path) -> None:
    open_ca = CA(*make_ca(tmp_path / "open", permit=None))
    run = run_cli("check", "-c", str(_write_config(tmp_path, open_ca)))
    assert run.returncode == 0, run.stderr
    warnings_ = [line for line in run.stderr.splitlines() if "warning" in line]
    assert any("constraint" in line.lower() for line in warnings_), run.stderr


def test_check_warns_about_a_group_readable_ca_key(tmp_path: Path) -> None:
    loose = CA(*make_ca(tmp_path / "loose", key_mode=0o640))
    run = run_cli("check", "-c", str(_write_config(tmp_path, loose)))
    assert run.returncode == 0, run.stderr
    warnings_ = [line for line in run.stderr.splitlines() if "warning" in line]
    assert any("ca_key_file" in line or str(loose.key) in line for line in warnings_), run.stderr
    key_lines = [line for line in loose.key.read_text().splitlines() if "-----" not in line]
    assert not any(line in run.stdout + run.stderr for line in key_lines)


async def test_serve_logs_a_config_warning_for_an_unconstrained_ca(
    tmp_path: Path, proxy_processes: Any
) -> None:
    open_ca = CA(*make_ca(tmp_path / "open", permit=None))
    process = proxy_processes(config_text(egress_block(open_ca)))
    await process.start()
    warned = [
        line
        for line in process.events("config_warning")
        if "constraint" in json.dumps(line).lower()
    ]
    assert warned, process.lines


async def test_a_reload_with_new_ca_files_reads_them_afresh(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    directory = tmp_path / "rotating"
    first = CA(*make_ca(directory))
    stack = await start_stack(make_stack, first, path=tmp_path / "proxy.yaml")
    old_certificate = first.certificate
    reader, writer, _ = await open_tunnel(stack.proxy.port, client_context(first))
    old_leaf = peer_leaf(writer)
    close(writer)
    # New contents at the same paths: a new CA.
    (directory / "ca.pem").unlink()
    (directory / "ca.key").unlink()
    second = CA(*make_ca(directory))
    assert second.certificate.public_key() != old_certificate.public_key()
    assert stack.proxy.reload_from_file().ok
    reader, writer, _ = await open_tunnel(stack.proxy.port, client_context(second))
    new_leaf = peer_leaf(writer)
    writer.write(f"GET /rotated HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    head, _ = await read_response(reader)
    close(writer)
    assert status(head) == 200
    old_leaf.verify_directly_issued_by(old_certificate)
    new_leaf.verify_directly_issued_by(second.certificate)
    assert metric_value(stack.proxy, "authproxy_leaf_certificates_issued_total") == 2
    assert [r.raw_path for r in stack.partner.requests] == ["/v2/rotated"]
