"""Mutual TLS: tls_client_auth at the token endpoint (RFC 8705) and a client
certificate towards the upstream; plus token_headers and JSON token requests.
Real TLS on loopback with a private CA made here."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import StackFactory, eventually, write_private_key
from proxy.config.load import parse_config
from proxy.config.model import ClientConfig
from proxy.errors import ConfigError
from proxy.tokens.sources import client_fingerprint


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey]

    def issue_client(self) -> None:
        """Rotate the client certificate: a new key and a new certificate from
        the same CA, written over ``client_cert`` and ``client_key``."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert("demo-client", key, self.issuer)
        self.client_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_private_key(self.client_key, key)

    def server_context(self, require_client: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server_cert, self.server_key)
        if require_client:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.ca)
        return context


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool = False, ip: str | None = None) -> x509.Certificate:  # fmt: skip
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer else (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("authproxy test CA", ca_key, None, ca=True)
    issuer = (ca.subject, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    paths = Pki(
        *(tmp_path / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")),
        issuer=issuer,
    )
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(
        _cert("127.0.0.1", server_key, issuer, ip="127.0.0.1").public_bytes(
            serialization.Encoding.PEM
        )
    )
    write_private_key(paths.server_key, server_key)
    paths.issue_client()
    return paths


async def test_tls_client_auth_at_the_token_endpoint(make_stack: StackFactory, pki: Pki) -> None:
    stack = await make_stack(
        client=f"""    auth_method: tls_client_auth
    ca_file: {pki.ca}
    client_cert_file: {pki.client_cert}
    client_key_file: {pki.client_key}""",
        tls_tokens=pki.server_context(require_client=True),
    )
    async with stack.http.get(stack.url("/demo/x")) as response:
        assert response.status == 200, await response.text()
    (mint,) = stack.tokens.requests
    assert mint.client_cert is not None  # the certificate was presented and verified
    assert mint.form["client_id"] == "demo-client" and "client_secret" not in mint.form
    assert mint.authorization is None


async def test_a_rotated_client_certificate_gets_a_new_tls_context_and_token(
    make_stack: StackFactory, pki: Pki, tmp_path: Path
) -> None:
    # Issue 11, item 16: the client's fingerprint left the certificate out, so
    # after a reload with new cert/key files the old token kept being used.
    path = tmp_path / "proxy.yaml"
    stack = await make_stack(
        path=path,
        client=f"""    auth_method: tls_client_auth
    ca_file: {pki.ca}
    client_cert_file: {pki.client_cert}
    client_key_file: {pki.client_key}""",
        tls_tokens=pki.server_context(require_client=True),
    )
    async with stack.http.get(stack.url("/demo/x")) as response:
        assert response.status == 200, await response.text()
    pki.issue_client()
    result = stack.proxy.reload_from_file()  # what SIGHUP does
    assert result.ok, result.message
    # Make before break (issue 13): the new certificate mints in the background.
    await eventually(lambda: stack.tokens.mint_count == 2)
    async with stack.http.get(stack.url("/demo/y")) as response:
        assert response.status == 200, await response.text()
    assert stack.tokens.mint_count == 2
    old, new = (mint.client_cert for mint in stack.tokens.requests)
    assert old["subject"] == new["subject"] and old["serialNumber"] != new["serialNumber"]
    first, second = stack.partner.requests
    assert (first.token, second.token) == tuple(stack.tokens.issued)
    # The same files again: the token is kept.
    assert stack.proxy.reload_from_file().ok
    async with stack.http.get(stack.url("/demo/z")) as response:
        assert response.status == 200
    assert stack.tokens.mint_count == 2 and stack.partner.requests[-1].token == second.token


async def test_without_the_client_certificate_the_handshake_fails(
    make_stack: StackFactory, pki: Pki
) -> None:
    stack = await make_stack(
        client=f"    ca_file: {pki.ca}", tls_tokens=pki.server_context(require_client=True)
    )
    async with stack.http.get(stack.url("/demo/x")) as response:
        assert response.status == 502
        assert (await response.json())["error"] == "token_endpoint_unreachable"
    assert stack.tokens.requests == []


async def test_client_certificate_towards_the_upstream(make_stack: StackFactory, pki: Pki) -> None:
    stack = await make_stack(
        route=f"""    ca_file: {pki.ca}
    client_cert_file: {pki.client_cert}
    client_key_file: {pki.client_key}""",
        tls_partner=pki.server_context(require_client=True),
    )
    async with stack.http.get(stack.url("/demo/x")) as response:
        assert response.status == 200, await response.text()
    assert len(stack.partner.requests) == 1


async def test_token_headers_and_json_token_requests(make_stack: StackFactory) -> None:
    stack = await make_stack(
        client="""    auth_method: client_secret_post
    token_request_format: json
    token_headers: {X-Tenant: acme, X-Api-Version: '2'}"""
    )
    async with stack.http.get(stack.url("/demo/x")) as response:
        assert response.status == 200
    (mint,) = stack.tokens.requests
    assert mint.content_type == "application/json"
    assert (
        mint.form["grant_type"] == "client_credentials" and mint.form["client_id"] == "demo-client"
    )
    assert mint.headers["X-Tenant"] == "acme" and mint.headers["X-Api-Version"] == "2"


def _config(client: str) -> str:
    return f"""clients:
  demo:
    token_url: https://idp.example/token
    client_id: demo
{client}
routes:
  - match: {{path_prefix: /d/}}
    upstream: https://api.example/
    client: demo
"""


@pytest.mark.parametrize(
    ("client", "message"),
    [
        ("    auth_method: tls_client_auth", r"client_cert_file: is required for auth_method tls_client_auth"),
        ("    client_secret: s\n    client_cert_file: CERT", r"client_cert_file and client_key_file go together"),
        ("    client_secret: s\n    client_cert_file: CERT\n    client_key_file: CA", r"cannot load the certificate and key"),
        ("    client_secret: s\n    token_request_format: xml", r"token_request_format: expected form or json"),
        ("    client_secret: s\n    token_headers: {Authorization: x}", r"token_headers.Authorization: is set by the proxy"),
    ],
)  # fmt: skip
def test_bad_tls_and_token_request_configs(pki: Pki, client: str, message: str) -> None:
    text = _config(client.replace("CERT", str(pki.client_cert)).replace("CA", str(pki.ca)))
    with pytest.raises(ConfigError, match=message):
        parse_config(text, "p.yaml")


def test_new_certificate_files_change_the_config(pki: Pki) -> None:
    text = _config(f"    auth_method: tls_client_auth\n    client_cert_file: {pki.client_cert}\n"
                   f"    client_key_file: {pki.client_key}")  # fmt: skip
    before = parse_config(text, "p.yaml").clients["demo"]
    again = parse_config(text, "p.yaml").clients["demo"]
    assert before == again  # same files: tokens and TLS contexts are kept on reload
    pki.client_cert.write_bytes(pki.client_cert.read_bytes() + b"\n")
    after = parse_config(text, "p.yaml").clients["demo"]
    assert after != before and after.tls_stamp != before.tls_stamp


@pytest.mark.parametrize(
    ("change", "new_token"),
    [
        ({"tls_stamp": "0123456789abcdef"}, True),  # new ca/cert/key contents
        ({"private_key": "-----BEGIN PRIVATE KEY-----..."}, True),
        ({"client_secret": "rotated"}, True),
        ({"expiry_margin": 20.0}, False),
        ({"timeout": 1.0}, False),
    ],
)
def test_the_fingerprint_covers_every_credential(
    change: dict[str, object], new_token: bool
) -> None:
    client = ClientConfig(
        name="demo", token_url="https://idp.example/token", client_id="demo", client_secret="s"
    )
    changed = dataclasses.replace(client, **change)  # type: ignore[arg-type]
    assert (client_fingerprint(changed) != client_fingerprint(client)) is new_token
