"""Key and certificate files, read and checked at config load: a private key
for ``private_key_jwt`` (RFC 7523) and the thumbprints of its certificate.
Messages name the file and what is wrong with it, never the key.
"""

from __future__ import annotations

from typing import Any, Final

KEY_ALGORITHMS: Final = frozenset({"RS256", "PS256", "ES256"})
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


def load_private_key(path: str, algorithm: str) -> str:
    """The PEM text of ``path`` after checking it is a private key that fits
    ``algorithm`` (RSA for RS256/PS256, EC P-256 for ES256). Raises ValueError
    with a message that never quotes the key."""
    jwt_module()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ValueError(f"{path!r} is not an unencrypted PEM private key") from None
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
    import base64
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

    def b64(digest: bytes) -> str:
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    return (
        ("x5t", b64(hashlib.sha1(der).digest())),  # noqa: S324 - a thumbprint, not security
        ("x5t#S256", b64(hashlib.sha256(der).digest())),
    )
