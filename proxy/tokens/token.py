"""Tokens and the rules of their life, as pure functions over plain values.

Nothing here does I/O. ``now`` is always passed in (seconds since the epoch,
wall clock: expiries are shared across processes and hosts), so every rule can
be tested at the exact boundary without sleeping.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Protocol

from proxy.errors import TokenEndpointRejected, TokenResponseInvalid


def iso_time(epoch: float) -> str:
    """An epoch time as ISO 8601 in UTC, to the second (admin page, CLI)."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


MAX_TOKEN_RESPONSE_BYTES: Final = 64 * 1024  # a token response is < 10 KiB; cap a hostile one
MAX_ERROR_SNIPPET: Final = 200  # characters of an error body quoted in a message


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer token and when it stops being usable.

    ``expires_at`` is the absolute time the token is treated as expired: the
    server's expiry minus the client's safety margin. ``refresh_at`` is when a
    background re-mint should start (before ``expires_at``). The token value is
    kept out of ``repr`` so that it cannot reach a log through a stray ``%r``.
    """

    access_token: str = field(repr=False)
    minted_at: float
    expires_at: float
    refresh_at: float
    scope: str | None = None
    lifetime: float = 0.0  # seconds the server granted (before the margin)
    # "Bearer" (RFC 6750) or "DPoP" (RFC 9449: sent with a proof of the key)
    token_type: str = "Bearer"  # noqa: S105 - a scheme name, not a secret

    def valid(self, now: float) -> bool:
        return now < self.expires_at

    def needs_refresh(self, now: float) -> bool:
        return now >= self.refresh_at

    def remaining(self, now: float) -> float:
        return max(0.0, self.expires_at - now)


def effective_margin(lifetime: float, margin: float) -> float:
    """The margin actually subtracted: ``margin``, or half the lifetime when
    ``margin`` is not smaller than the lifetime (a 20 s token with a 30 s margin
    would otherwise be born expired)."""
    return margin if margin < lifetime else lifetime / 2.0


def make_token(
    access_token: str,
    *,
    minted_at: float,
    lifetime: float,
    margin: float,
    refresh_ahead: float,
    scope: str | None = None,
    token_type: str = "Bearer",  # noqa: S107 - a scheme name
) -> Token:
    """Build a :class:`Token` with its absolute expiry and refresh times.

    ``expires_at = minted_at + lifetime - margin``; the background refresh starts
    when ``refresh_ahead`` (a share, e.g. 0.1) of that usable life is left.
    """
    usable = lifetime - effective_margin(lifetime, margin)
    expires_at = minted_at + usable
    refresh_at = expires_at - refresh_ahead * usable
    return Token(
        access_token=access_token,
        minted_at=minted_at,
        expires_at=expires_at,
        refresh_at=refresh_at,
        scope=scope,
        lifetime=lifetime,
        token_type=token_type,
    )


def jwt_claims(token: str) -> dict[str, object] | None:
    """The (unverified) claims of a compact JWS, or ``None`` if ``token`` is not one.

    Used only to read ``exp`` when the endpoint sent no ``expires_in``; the
    signature is the partner's business, not ours.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        decoded = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(decoded)
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (RFC 9110 §10.2.3): a
    number of seconds or an HTTP date. ``None`` when absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def _lifetime_from(raw: object) -> float | None:
    """``expires_in`` as a number of seconds; real servers send strings too."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            return None
    else:
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    return value


REDACTED: Final = "[redacted]"
# RFC 6750 §2.1: a bearer token is visible ASCII; one with a space, a control
# character (CR LF would split the partner request's head) or non-ASCII
# cannot be sent in a header and is refused at mint time, not at every use.
_TOKEN_CHARS: Final = re.compile(r"[\x21-\x7e]+")


def redact(text: str, secrets: Sequence[str]) -> str:
    """``text`` with each of ``secrets`` replaced: an endpoint that echoes
    what it received (a debug page, a chatty error_description) must not put
    the client's secret into a message."""
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    return text


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text[:MAX_ERROR_SNIPPET] + ("…" if len(text) > MAX_ERROR_SNIPPET else "")


def parse_token_response(
    status: int,
    content_type: str,
    body: bytes,
    *,
    client: str,
    now: float,
    default_lifetime: float,
    margin: float,
    refresh_ahead: float,
    requested_scope: str | None,
    redact_secrets: Sequence[str] = (),
    dpop: bool = False,
) -> Token:
    """Turn a token endpoint's answer into a :class:`Token`, strictly.

    Raises :class:`TokenEndpointRejected` for a non-2xx status or an RFC 6749
    §5.2 error body (even under a 200), and :class:`TokenResponseInvalid` for a
    2xx that is not JSON, lacks ``access_token`` or is not a Bearer token.
    Messages quote the endpoint's error code and description (or the start
    of a body that is not one), never the token, and with each of
    ``redact_secrets`` (the credentials this request sent) replaced.
    """
    document: object = None
    try:
        document = json.loads(body)
    except ValueError:
        document = None

    if isinstance(document, dict) and "error" in document:
        code = redact(str(document.get("error")), redact_secrets)[:64]
        description = document.get("error_description")
        detail = f": {_snippet(redact(str(description), redact_secrets))}" if description else ""
        raise TokenEndpointRejected(
            f"token endpoint for client {client!r} answered {status} {code}{detail}",
            http_status=status,
            oauth_error=code,
            client=client,
        )
    if not 200 <= status < 300:
        kind = "HTML" if "html" in content_type.lower() else (content_type or "no content type")
        raise TokenEndpointRejected(
            f"token endpoint for client {client!r} answered {status} ({kind}): "
            f"{_snippet(redact(body.decode('utf-8', 'replace'), redact_secrets))!r}",
            http_status=status,
            client=client,
        )
    if not isinstance(document, dict):
        kind = "HTML" if "html" in content_type.lower() else "a body that is not a JSON object"
        raise TokenResponseInvalid(
            f"token endpoint for client {client!r} answered {status} with {kind}", client=client
        )
    access_token = document.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise TokenResponseInvalid(
            f"token endpoint for client {client!r} sent no access_token", client=client
        )
    if not _TOKEN_CHARS.fullmatch(access_token):
        raise TokenResponseInvalid(
            f"token endpoint for client {client!r} sent an access_token with characters "
            "a header cannot carry (RFC 6750 §2.1)",
            client=client,
        )
    token_type = document.get("token_type")
    kind = token_type.lower() if isinstance(token_type, str) else ""
    if kind != "bearer" and not (dpop and kind == "dpop"):
        # RFC 6749 §7.1: the type decides how the token is used: Bearer (RFC
        # 6750), or DPoP (RFC 9449) for a client with a DPoP key. A DPoP token
        # without a key, or a MAC token, would be sent wrongly: refused.
        shown = token_type if isinstance(token_type, str) else repr(token_type)
        supported = "Bearer and DPoP are" if dpop else "only Bearer is"
        advice = "" if dpop or kind != "dpop" else " (give the client a dpop key_file)"
        raise TokenResponseInvalid(
            f"token endpoint for client {client!r} sent token_type {shown[:32]!r}, "
            f"{supported} supported{advice}",
            client=client,
        )
    lifetime = _lifetime_from(document.get("expires_in"))
    if lifetime is None:
        claims = jwt_claims(access_token)
        exp = _lifetime_from(claims.get("exp")) if claims else None
        if exp is not None:
            if exp <= now:
                raise TokenResponseInvalid(
                    f"token endpoint for client {client!r} sent a JWT whose exp is already "
                    "past and no expires_in (check the clocks)",
                    client=client,
                )
            lifetime = exp - now
    if lifetime is None:
        lifetime = default_lifetime
    granted = document.get("scope")
    return make_token(
        access_token,
        minted_at=now,
        lifetime=lifetime,
        margin=margin,
        refresh_ahead=refresh_ahead,
        scope=granted if isinstance(granted, str) else requested_scope,
        token_type="DPoP" if kind == "dpop" else "Bearer",
    )


class Minter(Protocol):
    """Anything that can produce a fresh token for a scope (golang/oauth2's
    ``TokenSource``): the token endpoint client, and the guard around it.
    Safe to call concurrently."""

    async def mint(self, scope: str | None) -> Token: ...
