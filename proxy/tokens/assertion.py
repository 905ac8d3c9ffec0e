"""Client assertions for the token endpoint (RFC 7523 §2.2, OpenID Connect Core §9):
``client_secret_jwt`` (HMAC with the client secret) and ``private_key_jwt``
(a private key in a PEM file). Signing is PyJWT's (with ``cryptography``); this
module only decides the claims (the keys were read and checked at config
load, :mod:`proxy.config.keys`).
"""

from __future__ import annotations

import secrets
from typing import Final

from proxy.config.keys import jwt_module

ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME: Final = 60  # seconds; RFC 7523 wants short, IdPs cap at 5 minutes


def client_assertion(
    *,
    client_id: str,
    audience: str,
    key: str,
    algorithm: str,
    key_id: str | None,
    now: float,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> str:
    """A signed, single-use assertion: ``iss`` = ``sub`` = the client id, ``aud``
    the token endpoint (or the configured audience), a random ``jti``, and an
    ``exp`` one minute after ``iat``."""
    issued = int(now)
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": secrets.token_urlsafe(24),
        "iat": issued,
        "nbf": issued,
        "exp": issued + ASSERTION_LIFETIME,
    }
    headers = dict(extra_headers)
    if key_id:
        headers["kid"] = key_id
    return str(jwt_module().encode(claims, key, algorithm=algorithm, headers=headers or None))
