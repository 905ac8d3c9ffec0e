"""Key and certificate files, read and checked at config load: a private key
for ``private_key_jwt`` (RFC 7523) and the thumbprints of its certificate.
Messages name the file and what is wrong with it, never the key.
"""

from __future__ import annotations

import json
from typing import Any, Final

from proxy.units import b64url

KEY_ALGORITHMS: Final = frozenset({"RS256", "PS256", "ES256"})
# RFC 9449 §5.1: the JWS algorithms a DPoP key may sign with, by key type; the
# first is what the key signs with when ``dpop.alg`` is not set.
DPOP_ALGORITHMS: Final = {"EC": ("ES256",), "RSA": ("PS256", "RS256"), "OKP": ("EdDSA",)}
SECRET_ALGORITHMS: Final = frozenset({"HS256"})


def jwt_module() -> Any:
    """PyJWT, or a ValueError that says which extra to install."""
    try:
        import jwt
    except ImportError:  # pragma: no cover - depends on the install
        raise ValueError(
            "JWT client authentication needs PyJWT with cryptography: pip install 'authproxy[jwt]'"
        ) from None
    return jwt


def read_private_key(path: str) -> tuple[bytes, Any]:
    """The bytes of the PEM file ``path`` and the private key in it.
    ValueError naming the file, never quoting it."""
    from cryptography.hazmat.primitives import serialization

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{path!r} is not an unencrypted PEM private key") from None
    return data, key


def load_private_key(path: str, algorithm: str) -> str:
    """The PEM text of ``path`` after checking it is a private key that fits
    ``algorithm`` (RSA for RS256/PS256, EC P-256 for ES256). Raises ValueError
    with a message that never quotes the key."""
    jwt_module()
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    data, key = read_private_key(path)
    if algorithm in ("RS256", "PS256") and not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{path!r} is not an RSA key, which {algorithm} needs")
    if algorithm == "ES256" and not (
        isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    ):
        raise ValueError(f"{path!r} is not an EC P-256 key, which ES256 needs")
    return data.decode("ascii")


def certificate_thumbprints(path: str) -> tuple[tuple[str, str], ...]:
    """``x5t`` (SHA-1) and ``x5t#S256`` headers for the certificate of the signing
    key (RFC 7515 §4.1.7-8), for IdPs that pick the key by certificate
    (Microsoft Entra ID's certificate credentials)."""
    jwt_module()
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror}") from None
    except ValueError:
        raise ValueError(f"{path!r} is not a PEM certificate") from None
    der = cert.public_bytes(Encoding.DER)
    return (
        ("x5t", b64url(hashlib.sha1(der).digest())),  # noqa: S324 - a thumbprint, not security
        ("x5t#S256", b64url(hashlib.sha256(der).digest())),
    )


def _uint(value: int, size: int | None = None) -> str:
    return b64url(value.to_bytes(size or max(1, (value.bit_length() + 7) // 8), "big"))


def load_dpop_key(path: str, alg: str | None) -> tuple[str, str, str]:
    """A DPoP key (RFC 9449): its PEM text, the algorithm it signs with (EC
    P-256: ES256; RSA of 2048 bits or more: PS256, or RS256; Ed25519: EdDSA;
    ``alg`` must fit the key) and its public JWK as canonical JSON (RFC 7638
    §3: the required members, sorted, no whitespace; its SHA-256 is the
    thumbprint). ValueError naming the file, never quoting the key."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    except ImportError:  # pragma: no cover - depends on the install
        raise ValueError("DPoP needs cryptography: pip install 'authproxy[jwt]'") from None
    data, key = read_private_key(path)
    jwk: dict[str, str]
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name != "secp256r1":
            raise ValueError(
                f"{path!r}: an EC DPoP key must be P-256 (ES256), not {key.curve.name}"
            )
        point = key.public_key().public_numbers()
        jwk = {"crv": "P-256", "kty": "EC", "x": _uint(point.x, 32), "y": _uint(point.y, 32)}
    elif isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise ValueError(
                f"{path!r}: an RSA DPoP key needs 2048 bits or more, not {key.key_size}"
            )
        numbers = key.public_key().public_numbers()
        jwk = {"e": _uint(numbers.e), "kty": "RSA", "n": _uint(numbers.n)}
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        jwk = {"crv": "Ed25519", "kty": "OKP", "x": b64url(raw)}
    else:
        raise ValueError(f"{path!r}: a DPoP key must be EC P-256, RSA or Ed25519")
    allowed = DPOP_ALGORITHMS[jwk["kty"]]
    chosen = alg or allowed[0]
    if chosen not in allowed:
        raise ValueError(f"{path!r}: alg {chosen} does not fit this key (use {', '.join(allowed)})")
    canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":"))
    return data.decode("ascii"), chosen, canonical
