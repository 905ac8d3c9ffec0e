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
_SCHEMES: Final = {
    scheme: re.compile(rf"(?:^|,)\s*{scheme}(?:\s+|$|,)", re.IGNORECASE)
    for scheme in ("bearer", "dpop")
}


def challenge_params(www_authenticate: str, scheme: str = "bearer") -> dict[str, str] | None:
    """The auth-params of the ``scheme`` challenge (``bearer``, RFC 6750 §3;
    ``dpop``, RFC 9449 §7.1) in a header value, keys lower-cased and quoted
    values unquoted; ``None`` without such a challenge."""
    match = _SCHEMES[scheme].search(www_authenticate)
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


def bearer_params(www_authenticate: str) -> dict[str, str] | None:
    return challenge_params(www_authenticate, "bearer")


def is_default_expiry(www_authenticate: Iterable[str]) -> bool:
    """RFC 6750 §3.1 (and RFC 9449 §7.1 for DPoP tokens): ``error="invalid_token"``
    whose description says "expired"."""
    for value in www_authenticate:
        for scheme in _SCHEMES:
            params = challenge_params(value, scheme)
            if (
                params is not None
                and params.get("error") == "invalid_token"
                and "expired" in params.get("error_description", "").lower()
            ):
                return True
    return False


def asks_for_nonce(www_authenticate: Iterable[str]) -> bool:
    """RFC 9449 §9: a 401 whose DPoP challenge says ``error="use_dpop_nonce"``."""
    return any(
        (params := challenge_params(value, "dpop")) is not None
        and params.get("error") == "use_dpop_nonce"
        for value in www_authenticate
    )


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
