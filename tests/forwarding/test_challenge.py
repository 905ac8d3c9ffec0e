import re

import pytest

from proxy.config.model import ExpiredTokenRule
from proxy.forwarding.challenge import bearer_params, says_expired

NONE = ExpiredTokenRule()


@pytest.mark.parametrize(
    ("header", "expired"),
    [
        ('Bearer error="invalid_token", error_description="The access token expired"', True),
        (
            'Bearer realm="x", error="invalid_token", error_description="Token EXPIRED at 12:00"',
            True,
        ),
        ('bearer error=invalid_token, error_description="expired"', True),
        ('Basic realm="x", Bearer error="invalid_token", error_description="token expired"', True),
        (
            'Bearer error="invalid_token", error_description="The access token has been revoked"',
            False,
        ),
        ('Bearer error="invalid_token"', False),
        ('Bearer error="insufficient_scope", error_description="expired scope"', False),
        ('Basic realm="expired"', False),
        ('Bearer error="invalid_token", error_description="malformed \\"expired\\" claim"', True),
        ("", False),
    ],
)
def test_default_rule(header: str, expired: bool) -> None:
    assert says_expired(401, [header], None, NONE) is expired


def test_only_401s_count() -> None:
    header = 'Bearer error="invalid_token", error_description="expired"'
    assert says_expired(403, [header], None, NONE) is False
    assert says_expired(200, [header], None, NONE) is False


def test_route_rules_add_to_the_default() -> None:
    rule = ExpiredTokenRule(
        www_authenticate=re.compile(r"token_expired", re.I),
        body=re.compile(rb'"code":\s*"TOKEN_EXPIRED"', re.I),
    )
    assert says_expired(401, ['Bearer error="token_expired"'], None, rule)
    assert says_expired(401, [], b'{"code": "TOKEN_EXPIRED"}', rule)
    assert not says_expired(401, [], b'{"code": "REVOKED"}', rule)
    assert not says_expired(401, [], None, rule)
    assert says_expired(
        401, ['Bearer error="invalid_token", error_description="expired"'], None, rule
    )


def test_bearer_params() -> None:
    assert bearer_params('Bearer realm="a b", error=invalid_token') == {
        "realm": "a b",
        "error": "invalid_token",
    }
    assert bearer_params("Basic realm=x") is None
