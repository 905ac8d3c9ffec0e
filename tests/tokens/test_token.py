"""Expiry maths and strict parsing of token responses, at the boundaries."""

import base64
import json

import pytest

from proxy.errors import TokenEndpointRejected, TokenResponseInvalid
from proxy.tokens.token import Token, effective_margin, jwt_claims, make_token, parse_token_response

NOW = 1_800_000_000.0


def parse(
    body: object, status: int = 200, content_type: str = "application/json", **kw: object
) -> Token:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    options = {
        "client": "acme",
        "now": NOW,
        "default_lifetime": 300.0,
        "margin": 30.0,
        "refresh_ahead": 0.1,
        "requested_scope": "read",
    }
    options.update(kw)
    return parse_token_response(status, content_type, raw, **options)  # type: ignore[arg-type]


def jwt(claims: dict[str, object]) -> str:
    def part(obj: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(claims)}.sig"


def test_margin_and_expiry() -> None:
    token = make_token("t", minted_at=NOW, lifetime=3600, margin=30, refresh_ahead=0.1)
    assert token.expires_at == NOW + 3570
    assert token.refresh_at == pytest.approx(NOW + 3570 - 357)


@pytest.mark.parametrize(("offset", "valid"), [(-1e-6, True), (0.0, False), (1e-6, False)])
def test_validity_one_microsecond_either_side_of_expiry(offset: float, valid: bool) -> None:
    token = make_token("t", minted_at=NOW, lifetime=100, margin=30, refresh_ahead=0.0)
    assert token.valid(token.expires_at + offset) is valid


def test_margin_not_smaller_than_lifetime_uses_half() -> None:
    assert effective_margin(20, 30) == 10
    assert effective_margin(30, 30) == 15
    assert effective_margin(31, 30) == 30
    token = make_token("t", minted_at=NOW, lifetime=20, margin=30, refresh_ahead=0.1)
    assert token.expires_at == NOW + 10


def test_token_repr_hides_the_value() -> None:
    token = make_token("very-secret-token", minted_at=NOW, lifetime=60, margin=0, refresh_ahead=0)
    assert "very-secret-token" not in repr(token)


@pytest.mark.parametrize("expires_in", [3600, "3600", 3600.0, " 3600 "])
def test_expires_in_number_or_string(expires_in: object) -> None:
    token = parse({"access_token": "a", "token_type": "bearer", "expires_in": expires_in})
    assert token.lifetime == 3600
    assert token.expires_at == NOW + 3570
    assert token.scope == "read"


def test_missing_expires_in_uses_jwt_exp_then_default() -> None:
    token = parse({"access_token": jwt({"exp": NOW + 600}), "token_type": "Bearer"})
    assert token.lifetime == 600
    token = parse({"access_token": "opaque", "token_type": "Bearer"})
    assert token.lifetime == 300
    token = parse({"access_token": "opaque", "token_type": "Bearer", "expires_in": "soon"})
    assert token.lifetime == 300


def test_jwt_already_expired_is_refused() -> None:
    with pytest.raises(TokenResponseInvalid, match="exp is already past"):
        parse({"access_token": jwt({"exp": NOW - 1}), "token_type": "Bearer"})


def test_jwt_claims_of_non_jwt() -> None:
    assert jwt_claims("abc") is None
    assert jwt_claims("a.!!!.c") is None
    assert jwt_claims(jwt({"exp": 5})) == {"exp": 5}


def test_granted_scope_is_kept() -> None:
    token = parse({"access_token": "a", "token_type": "Bearer", "scope": "read write"})
    assert token.scope == "read write"


@pytest.mark.parametrize(
    ("status", "body", "exc", "needle"),
    [
        (
            401,
            {"error": "invalid_client", "error_description": "bad secret"},
            TokenEndpointRejected,
            "invalid_client: bad secret",
        ),
        (400, {"error": "invalid_scope"}, TokenEndpointRejected, "invalid_scope"),
        (200, {"error": "invalid_grant"}, TokenEndpointRejected, "invalid_grant"),
        (500, b"<html>oops</html>", TokenEndpointRejected, "500"),
        (200, b"<html>login</html>", TokenResponseInvalid, "not a JSON object"),
        (200, b"[1, 2]", TokenResponseInvalid, "not a JSON object"),
        (200, {"token_type": "Bearer"}, TokenResponseInvalid, "no access_token"),
        (
            200,
            {"access_token": "", "token_type": "Bearer"},
            TokenResponseInvalid,
            "no access_token",
        ),
        (200, {"access_token": "a", "token_type": "mac"}, TokenResponseInvalid, "only Bearer"),
        (200, {"access_token": "a"}, TokenResponseInvalid, "only Bearer"),
    ],
)
def test_failures(status: int, body: object, exc: type[Exception], needle: str) -> None:
    with pytest.raises(exc, match=needle) as info:
        parse(body, status=status)
    assert "acme" in str(info.value)


def test_rejection_keeps_the_oauth_code() -> None:
    with pytest.raises(TokenEndpointRejected) as info:
        parse({"error": "invalid_client"}, status=401)
    assert info.value.oauth_error == "invalid_client"
    assert info.value.http_status == 401
    assert info.value.status == 502
