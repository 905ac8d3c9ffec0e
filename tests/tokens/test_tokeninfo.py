"""What `authproxy token` prints: metadata and JWT claims, never the token."""

from __future__ import annotations

import base64
import json

from proxy.tokens.token import make_token
from proxy.tokens.tokeninfo import describe


def b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def test_describe_a_jwt_shows_claims_not_the_token() -> None:
    claims = {"iss": "https://idp", "aud": "api", "exp": 1_900_000_300, "scope": "a b"}
    jwt = f"{b64({'alg': 'RS256'})}.{b64(claims)}.c2lnbmF0dXJl"
    token = make_token(
        jwt, minted_at=1_900_000_000, lifetime=300, margin=30, refresh_ahead=0.1, scope="a b"
    )
    info = describe("acme", token)
    assert info["jwt"] is True and info["jwt_claims"] == claims
    assert info["scopes_granted"] == ["a", "b"] and info["lifetime_s"] == 300
    assert info["minted_at"] == "2030-03-17T17:46:40+00:00"
    assert info["usable_until"] == "2030-03-17T17:51:10+00:00"  # 300 s - 30 s margin
    text = json.dumps(info)
    assert jwt not in text and "c2lnbmF0dXJl" not in text


def test_describe_an_opaque_token() -> None:
    token = make_token("opaque-123", minted_at=0, lifetime=60, margin=30, refresh_ahead=0)
    info = describe("acme", token)
    assert info["jwt"] is False and "jwt_claims" not in info
    assert info["length"] == len("opaque-123") and info["scopes_granted"] == []
    assert "opaque-123" not in json.dumps(info)
