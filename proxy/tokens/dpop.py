"""DPoP proofs (RFC 9449): the key a client's tokens are bound to, the proof
JWT sent with each token request and each partner request, and the nonces
servers hand out. Pure: no I/O beyond reading the key at config load, no
aiohttp.

A proof is a compact JWS with ``typ: dpop+jwt`` and the public ``jwk`` in
its header, and ``jti``, ``htm``, ``htu``, ``iat`` (and ``ath``, ``nonce``)
as claims (RFC 9449 §4.2). The header and the key's thumbprint are made once
per key; a proof costs one signature.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
from collections import OrderedDict
from typing import Any, Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

# The algorithm each kind of key signs with, and the ones it may be told to use.
DEFAULT_ALG: Final = {"EC": "ES256", "RSA": "PS256", "OKP": "EdDSA"}
ALLOWED_ALGS: Final = {"EC": ("ES256",), "RSA": ("PS256", "RS256"), "OKP": ("EdDSA",)}
MAX_NONCE: Final = 512  # characters of a DPoP-Nonce kept (RFC 9449 §8.1: NQCHAR)
MAX_ORIGINS: Final = 1024  # origins whose last nonce is remembered
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _uint(value: int, size: int | None = None) -> str:
    length = size if size is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url(value.to_bytes(length, "big"))


class DpopKey:
    """One client's DPoP key. Immutable after construction; safe to share
    between tasks. ``thumbprint`` is its RFC 7638 JWK thumbprint (what a
    token's ``cnf.jkt`` names)."""

    __slots__ = ("_header", "_key", "alg", "jwk", "thumbprint")

    def __init__(self, key: PrivateKey, alg: str | None = None) -> None:
        public = key.public_key()
        jwk: dict[str, str]
        if isinstance(key, ec.EllipticCurvePrivateKey):
            if key.curve.name != "secp256r1":
                raise ValueError(f"an EC DPoP key must be P-256 (ES256), not {key.curve.name}")
            numbers = key.public_key().public_numbers()
            jwk = {
                "crv": "P-256",
                "kty": "EC",
                "x": _uint(numbers.x, 32),
                "y": _uint(numbers.y, 32),
            }
        elif isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < 2048:
                raise ValueError(f"an RSA DPoP key must have 2048 bits or more, not {key.key_size}")
            numbers_rsa = key.public_key().public_numbers()
            jwk = {"e": _uint(numbers_rsa.e), "kty": "RSA", "n": _uint(numbers_rsa.n)}
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            jwk = {"crv": "Ed25519", "kty": "OKP", "x": b64url(raw)}
        else:
            raise ValueError("a DPoP key must be EC P-256, RSA or Ed25519")
        kind = jwk["kty"]
        chosen = alg or DEFAULT_ALG[kind]
        if chosen not in ALLOWED_ALGS[kind]:
            raise ValueError(
                f"alg {chosen} does not fit a {kind} key (use {', '.join(ALLOWED_ALGS[kind])})"
            )
        self._key = key
        self.alg = chosen
        self.jwk = jwk
        # RFC 7638 §3: the required members, sorted, no whitespace.
        canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()
        self.thumbprint = b64url(hashlib.sha256(canonical).digest())
        header = {"typ": "dpop+jwt", "alg": chosen, "jwk": jwk}
        self._header = b64url(json.dumps(header, separators=(",", ":")).encode())

    @classmethod
    def load(cls, path: str, alg: str | None = None) -> DpopKey:
        """The key in the PEM file ``path``; ValueError naming the file, never
        quoting it."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ValueError(f"cannot read {path!r}: {exc.strerror}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise ValueError(f"{path!r} is not an unencrypted PEM private key") from None
        if not isinstance(
            key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)
        ):
            raise ValueError(f"{path!r}: a DPoP key must be EC P-256, RSA or Ed25519")
        try:
            return cls(key, alg)
        except ValueError as exc:
            raise ValueError(f"{path!r}: {exc}") from None

    def proof(
        self,
        method: str,
        url: str,
        *,
        now: float,
        nonce: str | None = None,
        access_token: str | None = None,
    ) -> str:
        """A fresh proof for ``method url`` (``url`` without query or fragment,
        RFC 9449 §4.2); ``ath`` binds it to ``access_token`` when given. Every
        call has its own ``jti``: a proof is never reused."""
        claims: dict[str, Any] = {
            "jti": secrets.token_urlsafe(16),
            "htm": method,
            "htu": url,
            "iat": int(now),
        }
        if access_token is not None:
            claims["ath"] = b64url(hashlib.sha256(access_token.encode("ascii")).digest())
        if nonce is not None:
            claims["nonce"] = nonce
        signing_input = (
            f"{self._header}.{b64url(json.dumps(claims, separators=(',', ':')).encode())}"
        )
        return f"{signing_input}.{b64url(self._sign(signing_input.encode('ascii')))}"

    def _sign(self, data: bytes) -> bytes:
        key = self._key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")  # RFC 7518 §3.4: R || S
        if isinstance(key, rsa.RSAPrivateKey):
            if self.alg == "RS256":
                return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)  # RFC 7518 §3.5
            return key.sign(data, pss, hashes.SHA256())
        return key.sign(data)


def htu(url: str) -> str:
    """The ``htu`` of a request URL: without query and fragment (RFC 9449 §4.2)."""
    return url.split("#", 1)[0].split("?", 1)[0]


class Nonces:
    """The last ``DPoP-Nonce`` each origin (a token endpoint, a partner) sent,
    bounded; thread- and task-safe. A server's nonce replaces the one before."""

    def __init__(self, limit: int = MAX_ORIGINS) -> None:
        self._by_origin: OrderedDict[str, str] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def get(self, origin: str) -> str | None:
        return self._by_origin.get(origin)

    def seen(self, origin: str, value: str | None) -> bool:
        """Remember ``value`` (a ``DPoP-Nonce`` field) for ``origin``; False
        when there is none or it is not a nonce (NQCHAR, bounded)."""
        if not value:
            return False
        value = value.strip()
        if (
            not value
            or len(value) > MAX_NONCE
            or not all(0x21 <= ord(c) <= 0x7E and c not in '"\\' for c in value)
        ):
            return False
        with self._lock:
            self._by_origin[origin] = value
            self._by_origin.move_to_end(origin)
            while len(self._by_origin) > self._limit:
                self._by_origin.popitem(last=False)
        return True
