"""Minting: the one piece that talks to a token endpoint.

:class:`ClientCredentialsMinter` performs the RFC 6749 §4.4 client-credentials
grant for one client and returns a :class:`~proxy.token.Token`. It knows
nothing of caching, single-flight or routing; those wrap it (see source.py).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from typing import Final, Protocol
from urllib.parse import quote_plus

import aiohttp

from .config import ClientConfig
from .errors import (
    TokenEndpointTimeout,
    TokenEndpointUnreachable,
    TokenError,
    TokenResponseInvalid,
)
from .log import get_logger
from .session import ssl_context
from .token import MAX_TOKEN_RESPONSE_BYTES, Token, parse_token_response

USER_AGENT: Final = "authproxy"

log = get_logger("proxy.minter")


class Minter(Protocol):
    """Anything that can produce a fresh token for a scope. Safe to call concurrently."""

    async def mint(self, scope: str | None) -> Token: ...


def basic_credentials(client_id: str, client_secret: str) -> str:
    """The ``Authorization: Basic`` value of RFC 6749 §2.3.1: both parts are
    form-urlencoded *before* base64, which many clients forget."""
    pair = f"{quote_plus(client_id, safe='')}:{quote_plus(client_secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def token_request_form(client: ClientConfig, scope: str | None) -> list[tuple[str, str]]:
    form = [("grant_type", "client_credentials")]
    if scope:
        form.append(("scope", scope))
    form.extend(client.params)
    if client.auth_method == "client_secret_post":
        form.append(("client_id", client.client_id))
        form.append(("client_secret", client.client_secret or ""))
    return form


async def _read_capped(response: aiohttp.ClientResponse, cap: int) -> bytes | None:
    """At most ``cap`` bytes of the body; ``None`` when the body is larger."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > cap:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class ClientCredentialsMinter:
    """Mints tokens for one configured client over ``session``.

    ``clock`` returns wall-clock seconds (injected for tests). Every mint is
    logged once with its outcome; the token and secret never are.
    """

    def __init__(
        self,
        client: ClientConfig,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self._session = session
        self._clock = clock
        self._headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        if client.auth_method == "client_secret_basic":
            self._headers["Authorization"] = basic_credentials(
                client.client_id, client.client_secret or ""
            )

    async def mint(self, scope: str | None) -> Token:
        started = time.monotonic()
        try:
            token = await self._mint(scope)
        except TokenError as exc:
            log.warning(
                "mint",
                client=self.client.name,
                scope=scope,
                outcome="error",
                error=exc.code,
                reason=exc.message,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )
            raise
        log.info(
            "mint",
            client=self.client.name,
            scope=scope,
            outcome="success",
            lifetime_s=round(token.lifetime, 3),
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return token

    async def _mint(self, scope: str | None) -> Token:
        name = self.client.name
        # The lifetime counts from before the request left: the server's clock
        # started no earlier, so the expiry we compute is never later than its.
        sent_at = self._clock()
        try:
            async with asyncio.timeout(self.client.timeout):
                async with self._session.post(
                    self.client.token_url,
                    data=token_request_form(self.client, scope),
                    headers=self._headers,
                    allow_redirects=False,
                    ssl=ssl_context(self.client.ca_file),
                ) as response:
                    body = await _read_capped(response, MAX_TOKEN_RESPONSE_BYTES)
                    status = response.status
                    content_type = response.headers.get("Content-Type", "")
        except TimeoutError:
            raise TokenEndpointTimeout(
                f"token endpoint for client {name!r} did not answer within "
                f"{self.client.timeout:g}s",
                client=name,
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            # str() of aiohttp's errors names the host and the OS reason; their
            # repr() would print request headers, Authorization included.
            raise TokenEndpointUnreachable(
                f"token endpoint for client {name!r} is unreachable: {type(exc).__name__}: {exc}",
                client=name,
            ) from None
        if body is None:
            raise TokenResponseInvalid(
                f"token endpoint for client {name!r} sent a body over "
                f"{MAX_TOKEN_RESPONSE_BYTES} bytes",
                client=name,
            )
        return parse_token_response(
            status,
            content_type,
            body,
            client=name,
            now=sent_at,
            default_lifetime=self.client.default_lifetime,
            margin=self.client.expiry_margin,
            refresh_ahead=self.client.refresh_ahead,
            requested_scope=scope,
        )
