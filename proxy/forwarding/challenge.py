"""The expired-token rule (pure): does a partner's 401 mean "this token has
expired" (worth one re-mint and replay), or something minting will not fix?"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from proxy.config.model import ExpiredTokenRule

MAX_401_BODY: Final = 8 * 1024  # bytes of a 401 body read for a body rule
# RFC 9110 §11.2 auth-param: token "=" ( token / quoted-string )
_AUTH_PARAM = re.compile(r'([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)')
_BEARER = re.compile(r"(?:^|,)\s*bearer(?:\s+|$|,)", re.IGNORECASE)


def bearer_params(www_authenticate: str) -> dict[str, str] | None:
    """The auth-params of the Bearer challenge in a header value (RFC 6750 §3),
    keys lower-cased and quoted values unquoted; ``None`` without a Bearer challenge."""
    match = _BEARER.search(www_authenticate)
    if match is None:
        return None
    params: dict[str, str] = {}
    for name, value in _AUTH_PARAM.findall(www_authenticate[match.end() :]):
        key = name.lower()
        if key in params:
            break  # a repeated param starts the next challenge's list
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[key] = value
    return params


def is_default_expiry(www_authenticate: Iterable[str]) -> bool:
    """RFC 6750 §3.1: ``error="invalid_token"`` whose description says "expired"."""
    for value in www_authenticate:
        params = bearer_params(value)
        if (
            params is not None
            and params.get("error") == "invalid_token"
            and "expired" in params.get("error_description", "").lower()
        ):
            return True
    return False


def says_expired(
    status: int,
    www_authenticate: Iterable[str],
    body: bytes | None,
    rule: ExpiredTokenRule,
) -> bool:
    """True only for a 401 that the default rule or the route's own rules call
    an expired token. ``body`` is the (capped) start of the 401 body, or
    ``None`` when it was not read."""
    if status != 401:
        return False
    values = list(www_authenticate)
    if is_default_expiry(values):
        return True
    if rule.www_authenticate is not None and any(rule.www_authenticate.search(v) for v in values):
        return True
    return rule.body is not None and body is not None and rule.body.search(body) is not None
