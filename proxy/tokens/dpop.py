"""DPoP (RFC 9449): the proof JWT sent with each token request and each
partner request of a client with a DPoP key, the nonces servers hand out,
and how their answers ask for one. No I/O, no aiohttp; ``cryptography`` is
imported only when a key is made (a client with ``dpop:``).

A proof is a compact JWS with ``typ: dpop+jwt`` and the public ``jwk`` in
its header, and ``jti``, ``htm``, ``htu``, ``iat`` (and ``ath``, ``nonce``)
as claims (RFC 9449 §4.2). The header is encoded once per key; a proof costs
one signature and a random ``jti``.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final
from urllib.parse import urlsplit

from proxy.config.model import DpopConfig
from proxy.units import b64url

MAX_NONCE: Final = 512  # characters of a DPoP-Nonce kept
MAX_ORIGINS: Final = 1024  # origins whose last nonce is remembered
# RFC 9449 §8.1: nonce = 1*NQCHAR (%x21 / %x23-5B / %x5D-7E)
_NONCE: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,512}")


def htu(url: str) -> str:
    """The ``htu`` of a request URL: without query and fragment (RFC 9449 §4.2)."""
    return url.split("#", 1)[0].split("?", 1)[0]


def origin(url: str) -> str:
    """Scheme, host and port: what a server's nonce belongs to."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def token_origin(url: str) -> str:
    """The nonce key of a token endpoint: kept apart from a partner's nonce
    on the same origin (RFC 9449 §8 and §9 are separate servers' nonces)."""
    return "token " + origin(url)


def says_use_dpop_nonce(body: bytes) -> bool:
    """A token endpoint's 400 that asks for a nonce (RFC 9449 §8)."""
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return isinstance(document, dict) and document.get("error") == "use_dpop_nonce"


class DpopKey:
    """One client's DPoP key. Immutable after construction; safe to share
    between tasks. ``thumbprint`` is its RFC 7638 JWK thumbprint (what a
    token's ``cnf.jkt`` names)."""

    __slots__ = ("_header", "_sign", "alg", "jwk", "thumbprint")

    def __init__(self, config: DpopConfig) -> None:
        self.alg = config.alg
        self.jwk: dict[str, str] = json.loads(config.jwk)
        self.thumbprint = config.thumbprint
        header = {"typ": "dpop+jwt", "alg": config.alg, "jwk": self.jwk}
        self._header = b64url(json.dumps(header, separators=(",", ":")).encode())
        self._sign = _signer(config)

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
        return self.prover(method, url, access_token)(now, nonce)

    def prover(
        self, method: str, url: str, access_token: str | None
    ) -> Callable[[float, str | None], str]:
        """``proof(method, url, access_token=...)`` as a function of the clock
        and the nonce only, with what is fixed per request (the JSON of
        ``htm``, ``htu``, ``ath``) encoded once: a proof per send then costs
        a random ``jti`` and one signature."""
        fixed = {"htm": method, "htu": url}
        if access_token is not None:
            fixed["ath"] = b64url(hashlib.sha256(access_token.encode("ascii")).digest())
        tail = json.dumps(fixed, separators=(",", ":"))[1:]  # '"htm":...}'
        header, sign = self._header, self._sign

        def proof(now: float, nonce: str | None) -> str:
            extra = "" if nonce is None else ',"nonce":' + json.dumps(nonce)
            claims = f'{{"jti":"{secrets.token_urlsafe(16)}","iat":{int(now)}{extra},{tail}'
            signing_input = f"{header}.{b64url(claims.encode())}"
            return f"{signing_input}.{b64url(sign(signing_input.encode('ascii')))}"

        return proof


def _signer(config: DpopConfig) -> Callable[[bytes], bytes]:
    """The JWS signature function of ``config``'s key (RFC 7518 §3)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    key = serialization.load_pem_private_key(config.key.encode("ascii"), password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        ecdsa = ec.ECDSA(hashes.SHA256())

        def es256(data: bytes) -> bytes:
            r, s = decode_dss_signature(key.sign(data, ecdsa))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")  # §3.4: R || S, not DER

        return es256
    if isinstance(key, rsa.RSAPrivateKey):
        scheme: padding.AsymmetricPadding = (
            padding.PKCS1v15()
            if config.alg == "RS256"
            else padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)  # §3.5
        )
        sha256 = hashes.SHA256()
        return lambda data: key.sign(data, scheme, sha256)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key.sign


class Nonces:
    """The last ``DPoP-Nonce`` each origin (a token endpoint, a partner) sent,
    bounded; safe from any task or thread. A server's nonce replaces the one
    before; the token side and the partner side of a process share one."""

    def __init__(self, limit: int = MAX_ORIGINS) -> None:
        self._by_origin: OrderedDict[str, str] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def get(self, origin: str) -> str | None:
        return self._by_origin.get(origin)

    def seen(self, origin: str, value: str | None) -> str | None:
        """Remember ``value`` (a ``DPoP-Nonce`` field) for ``origin``; the nonce
        when it is one (RFC 9449 §8.1), else None. Whether to send a request
        again is the caller's: when the nonce differs from the one its proof
        carried (another request may have stored it first)."""
        if value is None:
            return None
        value = value.strip()
        if not _NONCE.fullmatch(value):
            return None
        with self._lock:
            self._by_origin[origin] = value
            self._by_origin.move_to_end(origin)
            while len(self._by_origin) > self._limit:
                self._by_origin.popitem(last=False)
        return value


class Proofs:
    """The proofs of one outbound request (a new one per send), remembering
    the nonce the last one carried: a server's challenge is answered only
    with a nonce other than that one (never a loop)."""

    __slots__ = ("_at", "_make", "_nonces", "nonce")

    def __init__(self, make: Callable[[float, str | None], str], nonces: Nonces, at: str) -> None:
        self._make = make
        self._nonces = nonces
        self._at = at
        self.nonce: str | None = None

    def __call__(self) -> str:
        self.nonce = self._nonces.get(self._at)
        return self._make(time.time(), self.nonce)
