"""Client authentication beyond shared secrets in the body or Basic header:
private_key_jwt, client_secret_jwt (RFC 7523), none; and token delivery in
another header. Real proxy, fake token endpoint that verifies assertions."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from conftest import Stack, StackFactory, write_private_key
from proxy.config.keys import load_private_key
from proxy.config.load import parse_config
from proxy.errors import ConfigError
from proxy.tokens.assertion import client_assertion

ROUTE = """routes:
  - match: {path_prefix: /demo/}
    upstream: http://127.0.0.1:9/
    client: demo
"""


def write_key(tmp_path: Path, kind: str = "rsa") -> tuple[Path, bytes]:
    key = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    path = tmp_path / f"{kind}.pem"
    write_private_key(path, key)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, public


async def get(stack: Stack) -> int:
    async with stack.http.get(stack.url("/demo/x")) as response:
        await response.read()
        return response.status


@pytest.mark.parametrize(
    ("kind", "algorithm"), [("rsa", "RS256"), ("rsa", "PS256"), ("ec", "ES256")]
)
async def test_private_key_jwt_mints_with_a_verified_assertion(
    make_stack: StackFactory, tmp_path: Path, kind: str, algorithm: str
) -> None:
    path, public = write_key(tmp_path, kind)
    stack = await make_stack(
        client=f"""    auth_method: private_key_jwt
    private_key_file: {path}
    key_id: key-2026
    algorithm: {algorithm}"""
    )
    stack.tokens.assertion_key = public
    assert await get(stack) == 200
    assert await get(stack) == 200
    assert stack.tokens.mint_count == 1
    (claims,) = stack.tokens.assertions
    assert claims["iss"] == claims["sub"] == "demo-client"
    assert claims["aud"] == stack.tokens.token_url
    assert claims["exp"] - claims["iat"] <= 300
    assert claims["_header"]["kid"] == "key-2026" and claims["_header"]["alg"] == algorithm
    (mint,) = stack.tokens.requests
    assert mint.authorization is None and "client_secret" not in mint.form


LONG_SECRET = "a-client-secret-of-at-least-32-bytes"
JWT_CLIENT = "    auth_method: client_secret_jwt"


async def test_client_secret_jwt_signs_with_the_secret(make_stack: StackFactory) -> None:
    stack = await make_stack(client=JWT_CLIENT, secret=LONG_SECRET)
    stack.tokens.assertion_key = LONG_SECRET
    assert await get(stack) == 200
    (claims,) = stack.tokens.assertions
    assert claims["_header"]["alg"] == "HS256" and len(claims["jti"]) >= 20
    (mint,) = stack.tokens.requests
    assert "client_secret" not in mint.form and mint.authorization is None


async def test_each_mint_gets_a_fresh_assertion(make_stack: StackFactory) -> None:
    stack = await make_stack(client=JWT_CLIENT, secret=LONG_SECRET)
    stack.tokens.assertion_key = LONG_SECRET
    assert await get(stack) == 200
    stack.partner.expire_all()
    assert await get(stack) == 200  # replayed after one more mint
    first, second = stack.tokens.assertions
    assert first["jti"] != second["jti"]


async def test_a_wrong_key_is_rejected_and_not_retried(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    path, _ = write_key(tmp_path)
    _, other_public = write_key(tmp_path / ".." / tmp_path.name, "ec")
    stack = await make_stack(
        client=f"    auth_method: private_key_jwt\n    private_key_file: {path}"
    )
    stack.tokens.assertion_key = other_public
    async with stack.http.get(stack.url("/demo/x")) as response:
        assert response.status == 502
        assert "invalid_client" in (await response.json())["message"]
    assert await get(stack) == 502
    assert stack.tokens.calls == 1  # the rejection is cooled down, not retried


async def test_public_client_sends_only_its_id(make_stack: StackFactory) -> None:
    stack = await make_stack(client="    auth_method: none")
    stack.tokens.public_clients = True
    assert await get(stack) == 200
    (mint,) = stack.tokens.requests
    assert mint.form["client_id"] == "demo-client" and "client_secret" not in mint.form
    assert mint.authorization is None


async def test_token_in_another_header_with_another_prefix(make_stack: StackFactory) -> None:
    stack = await make_stack(route="    token_header: X-Api-Token\n    token_prefix: ''")
    stack.partner.token_header, stack.partner.token_prefix = "X-Api-Token", ""
    async with stack.http.get(
        stack.url("/demo/x"), headers={"X-Api-Token": "forged", "Authorization": "Basic x"}
    ) as response:
        assert response.status == 200
    (seen,) = stack.partner.requests
    names = [name.lower() for name, _ in seen.headers]
    assert "authorization" not in names and names.count("x-api-token") == 1
    assert dict(seen.headers)["X-Api-Token"] == stack.tokens.issued[0]
    stack.partner.expire_all()
    assert await get(stack) == 200  # the replay puts the new token in the same header
    assert stack.partner.requests[-1].token == stack.tokens.issued[1]


def config_with(client: str) -> str:
    return f"""clients:
  demo:
    token_url: https://idp.example/token
    client_id: demo
{client}
{ROUTE}"""


@pytest.mark.parametrize(
    ("client", "message"),
    [
        ("    auth_method: private_key_jwt", r"private_key_file: is required"),
        (
            "    auth_method: private_key_jwt\n    private_key_file: /nonexistent.pem",
            r"private_key_file: cannot read '/nonexistent.pem'",
        ),
        ("    auth_method: client_secret_jwt", r"client_secret: is required"),
        (
            "    auth_method: client_secret_jwt\n    client_secret: short",
            r"client_secret: client_secret_jwt \(HS256\) needs a secret of at least 32 bytes",
        ),
        (
            "    auth_method: client_secret_jwt\n    client_secret: s\n    algorithm: RS256",
            r"algorithm: expected HS256",
        ),
        (
            "    client_secret: s\n    algorithm: RS256",
            r"algorithm: applies to client_secret_jwt and private_key_jwt",
        ),
    ],
)
def test_bad_assertion_configs(client: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(config_with(client), "p.yaml")


def test_key_must_fit_the_algorithm(tmp_path: Path) -> None:
    ec_path, _ = write_key(tmp_path, "ec")
    rsa_path, _ = write_key(tmp_path, "rsa")
    with pytest.raises(ValueError, match="not an RSA key"):
        load_private_key(str(ec_path), "RS256")
    with pytest.raises(ValueError, match="not an EC P-256 key"):
        load_private_key(str(rsa_path), "ES256")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="not an unencrypted PEM private key") as info:
        load_private_key(str(garbage), "RS256")
    assert "not a key" not in str(info.value)
    text = config_with(
        f"    auth_method: private_key_jwt\n    private_key_file: {ec_path}\n    algorithm: RS256"
    )
    with pytest.raises(
        ConfigError, match=r"p.yaml:\d+: clients.demo.private_key_file: .* not an RSA key"
    ):
        parse_config(text, "p.yaml")


def test_assertion_claims(tmp_path: Path) -> None:
    path, public = write_key(tmp_path)
    key = load_private_key(str(path), "RS256")
    token = client_assertion(
        client_id="c",
        audience="https://idp/token",
        key=key,
        algorithm="RS256",
        key_id=None,
        now=1000,
    )
    claims = jwt.decode(
        token, public, algorithms=["RS256"], audience="https://idp/token",
        options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
    )  # fmt: skip
    assert claims["iss"] == claims["sub"] == "c" and claims["iat"] == 1000
    assert claims["exp"] == 1060 and "kid" not in jwt.get_unverified_header(token)


async def test_certificate_thumbprints_for_entra_style_keys(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    import base64
    import datetime
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    path, public = write_key(tmp_path)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "demo-client")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )  # fmt: skip
    cert_path = tmp_path / "client.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    stack = await make_stack(
        client=f"""    auth_method: private_key_jwt
    private_key_file: {path}
    certificate_file: {cert_path}"""
    )
    stack.tokens.assertion_key = public
    assert await get(stack) == 200
    (claims,) = stack.tokens.assertions
    der = cert.public_bytes(serialization.Encoding.DER)
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    assert claims["_header"]["x5t#S256"] == expected
    assert "x5t" in claims["_header"] and "kid" not in claims["_header"]
