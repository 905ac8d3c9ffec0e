"""Minting: the one piece that talks to a token endpoint.

:class:`ClientCredentialsMinter` performs the RFC 6749 §4.4 client-credentials
grant for one client and returns a :class:`~proxy.tokens.token.Token`. It knows
nothing of caching, single-flight or routing; those wrap it (see source.py).
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final
from urllib.parse import quote_plus

import aiohttp

from proxy.config.model import ClientConfig
from proxy.errors import (
    MintBlocked,
    TokenEndpointRejected,
    TokenEndpointTimeout,
    TokenEndpointUnreachable,
    TokenError,
    TokenResponseInvalid,
    untraced,
)
from proxy.log import get_logger
from proxy.tls import ssl_context
from proxy.tokens.assertion import ASSERTION_TYPE, client_assertion
from proxy.tokens.breaker import Failure, MintGuard
from proxy.tokens.dpop import htu, says_use_dpop_nonce, token_origin
from proxy.tokens.token import (
    MAX_TOKEN_RESPONSE_BYTES,
    Minter,
    Token,
    jwt_claims,
    parse_retry_after,
    parse_token_response,
)

if TYPE_CHECKING:
    from proxy.tokens.dpop import DpopKey, Nonces
    from proxy.tracing import Tracing

USER_AGENT: Final = "authproxy"
MINTED_REMEMBERED: Final = 4  # tokens of this client redacted from endpoint error text
RETRY_FIRST: Final = 0.2  # seconds before the first retry of a transient failure, doubling
log = get_logger("proxy.minter")


def basic_credentials(client_id: str, client_secret: str) -> str:
    """The ``Authorization: Basic`` value of RFC 6749 §2.3.1: both parts are
    form-urlencoded *before* base64, which many clients forget."""
    pair = f"{quote_plus(client_id, safe='')}:{quote_plus(client_secret, safe='')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def token_request_form(
    client: ClientConfig, scope: str | None, now: float | None = None
) -> list[tuple[str, str]]:
    """The form body of RFC 6749 §4.4.2, with the client authentication that
    goes in the body: ``client_secret_post`` (§2.3.1), ``client_secret_jwt`` and
    ``private_key_jwt`` (RFC 7523 §2.2: a fresh assertion each call), ``none``."""
    form = [("grant_type", "client_credentials")]
    if scope:
        form.append(("scope", scope))
    form.extend(client.params)
    method = client.auth_method
    if method == "client_secret_post":
        form.append(("client_id", client.client_id))
        form.append(("client_secret", client.client_secret or ""))
    elif method in ("client_secret_jwt", "private_key_jwt"):
        key = client.private_key if method == "private_key_jwt" else client.client_secret
        form.append(("client_id", client.client_id))
        form.append(("client_assertion_type", ASSERTION_TYPE))
        form.append(
            (
                "client_assertion",
                client_assertion(
                    client_id=client.client_id,
                    audience=client.assertion_audience or client.token_url,
                    key=key or "",
                    algorithm=client.algorithm or "RS256",
                    key_id=client.key_id,
                    now=time.time() if now is None else now,
                    extra_headers=client.assertion_headers,
                ),
            )
        )
    elif method in ("none", "tls_client_auth", "self_signed_tls_client_auth"):
        # RFC 8705 §2: with mutual TLS the client_id goes in the body; TLS proves it.
        form.append(("client_id", client.client_id))
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
        monotonic: Callable[[], float] = time.monotonic,
        nonces: Nonces | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.client = client
        self._tracing = tracing
        self._session = session
        # RFC 9449: a client with a DPoP key proves it on every token request;
        # the nonces the endpoint hands out are shared with the partner side.
        self._dpop: DpopKey | None = None
        self._nonces = nonces
        self._warned_bearer = False
        self._warned_cnf = False
        if client.dpop is not None:
            from proxy.tokens.dpop import DpopKey, Nonces

            self._dpop = DpopKey(client.dpop)
            if self._nonces is None:
                self._nonces = Nonces()
        self._clock = clock
        self._monotonic = monotonic
        self._headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        self._headers.update(client.token_headers)
        self._ssl = ssl_context(
            client.ca_file, client.client_cert_file, client.client_key_file, client.tls_stamp
        )
        # The last tokens minted here: an endpoint that echoes one in an error
        # (a debug page of the request that follows) gets it redacted too.
        self._minted: deque[str] = deque(maxlen=MINTED_REMEMBERED)
        if client.auth_method == "client_secret_basic":
            self._headers["Authorization"] = basic_credentials(
                client.client_id, client.client_secret or ""
            )

    async def mint(self, scope: str | None) -> Token:
        if self._tracing is None:
            return await self._logged(scope)
        # A child of the request whose miss started the mint (its task copied
        # that context); the waiters' "wait for token" spans cover the wait.
        with self._tracing.span(
            "token endpoint", "client", **{"authproxy.client": self.client.name,
                                           "authproxy.scope": scope or ""},
        ) as span:  # fmt: skip
            token = await self._logged(scope)
            span.set_attribute("authproxy.outcome", "success")
            return token

    async def _logged(self, scope: str | None) -> Token:
        started = self._monotonic()
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
                duration_ms=round((self._monotonic() - started) * 1000, 1),
            )
            raise
        self._minted.append(token.access_token)
        log.info(
            "mint",
            client=self.client.name,
            scope=scope,
            outcome="success",
            lifetime_s=round(token.lifetime, 3),
            duration_ms=round((self._monotonic() - started) * 1000, 1),
        )
        return token

    def _sent_secrets(self, form: list[tuple[str, str]]) -> tuple[str, ...]:
        """Every form in which this request carried a secret: the client
        secret as is and form-encoded, the Basic credential, an assertion."""
        secret = self.client.client_secret or ""
        basic = self._headers.get("Authorization", "").removeprefix("Basic ")
        assertion = dict(form).get("client_assertion", "")
        key = self.client.private_key or ""
        return (secret, quote_plus(secret, safe=""), basic, assertion, key, *self._minted)

    async def _mint(self, scope: str | None) -> Token:
        name = self.client.name
        # The lifetime counts from before the request left: the server's clock
        # started no earlier, so the expiry we compute is never later than its.
        sent_at = self._clock()
        proofs: list[str] = []
        try:
            async with asyncio.timeout(self.client.timeout):
                while True:
                    form = token_request_form(self.client, scope, self._clock())
                    as_json = self.client.token_request_format == "json"  # noqa: S105
                    headers = self._headers
                    sent: str | None = None  # the nonce the proof carries
                    if self._dpop is not None:
                        assert self._nonces is not None
                        sent = self._nonces.get(token_origin(self.client.token_url))
                        proofs.append(self._proof(sent))
                        headers = {**headers, "DPoP": proofs[-1]}
                    async with self._session.post(
                        self.client.token_url,
                        data=None if as_json else form,
                        json=dict(form) if as_json else None,
                        headers=headers,
                        allow_redirects=False,
                        ssl=self._ssl,
                    ) as response:
                        body = await _read_capped(response, MAX_TOKEN_RESPONSE_BYTES)
                        status = response.status
                        content_type = response.headers.get("Content-Type", "")
                        retry_after = response.headers.get("Retry-After")
                        nonce = response.headers.get("DPoP-Nonce")
                    if self._nonce_asked(status, body, nonce, sent) and len(proofs) == 1:
                        continue  # RFC 9449 §8: once more, with the nonce; still one mint
                    break
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
        try:
            token = parse_token_response(
                status,
                content_type,
                body,
                client=name,
                now=sent_at,
                default_lifetime=self.client.default_lifetime,
                margin=self.client.expiry_margin,
                refresh_ahead=self.client.refresh_ahead,
                requested_scope=scope,
                redact_secrets=(*self._sent_secrets(form), *proofs),
                dpop=self._dpop is not None,
            )
        except TokenEndpointRejected as exc:
            if status not in (429, 503):
                raise
            raise TokenEndpointRejected(
                exc.message,
                http_status=exc.http_status,
                oauth_error=exc.oauth_error,
                retry_after=parse_retry_after(retry_after, self._clock()),
                route=exc.route,
                client=exc.client,
            ) from None
        self._check_binding(token)
        if self._dpop is not None and token.token_type != "DPoP" and not self._warned_bearer:  # noqa: S105
            self._warned_bearer = True
            log.warning(
                "dpop_answered_bearer",
                client=name,
                reason="the token endpoint answered a DPoP token request with a Bearer token; "
                "it is used as Bearer (is DPoP enabled for this client at the server?)",
            )
        return token

    def _check_binding(self, token: Token) -> None:
        """A JWT access token that names its key (``cnf``: RFC 9449 §6.1,
        RFC 8705 §3.1) must name this client's: a token bound to another key
        or certificate is refused, never sent."""
        claims = jwt_claims(token.access_token)
        cnf = claims.get("cnf") if claims else None
        if not isinstance(cnf, dict):
            return
        name = self.client.name
        jkt, x5t = cnf.get("jkt"), cnf.get("x5t#S256")
        if jkt is not None and (self._dpop is None or jkt != self._dpop.thumbprint):
            raise TokenResponseInvalid(
                f"token endpoint for client {name!r} sent a token bound to a DPoP key "
                "(cnf.jkt) that is not this client's dpop key",
                client=name,
            )
        if x5t is not None and x5t != self.client.certificate_thumbprint:
            raise TokenResponseInvalid(
                f"token endpoint for client {name!r} sent a token bound to a certificate "
                "(cnf.x5t#S256) that is not this client's client_cert_file",
                client=name,
            )
        if x5t is not None and not self.client.certificate_bound and not self._warned_cnf:
            self._warned_cnf = True
            log.warning(
                "certificate_bound_token",
                client=name,
                reason="the token is bound to the client certificate (cnf.x5t#S256); set "
                "certificate_bound: true so that a route with another certificate is refused "
                "at load and a new certificate never carries an old token",
            )

    def _proof(self, nonce: str | None) -> str:
        assert self._dpop is not None
        return self._dpop.proof("POST", htu(self.client.token_url), now=self._clock(), nonce=nonce)

    def _nonce_asked(
        self, status: int, body: bytes | None, nonce: str | None, sent: str | None
    ) -> bool:
        """Remember the endpoint's ``DPoP-Nonce``; True when the answer is RFC
        9449 §8's ``use_dpop_nonce`` error with a nonce other than the one sent
        (another mint may have stored it already: it is still new to this one)."""
        if self._dpop is None or self._nonces is None:
            return False
        given = self._nonces.seen(token_origin(self.client.token_url), nonce)
        return (
            given is not None
            and given != sent
            and status == 400
            and body is not None
            and says_use_dpop_nonce(body)
        )


class GuardedMinter:
    """Wraps a :class:`Minter` with the client's :class:`~proxy.tokens.breaker.MintGuard`
    and bounded retries: transient failures (timeouts, connection errors, 5xx)
    are retried with jittered exponential backoff while the budget (the
    client's ``timeout``) lasts, at most ``attempts`` calls; rejections and
    throttling are not retried, and while the guard is open no call goes out.

    A failure that opens the guard is raised restated as the guard's message,
    the one every call blocked by it gets (:attr:`~proxy.tokens.breaker.Blocked.message`),
    so that the first answer and the cooled-down ones say the same (issue 11).
    """

    def __init__(
        self,
        inner: Minter,
        guard: MintGuard,
        *,
        client: str,
        budget: float,
        attempts: int,
        clock: Callable[[], float] = time.time,
        on_state: Callable[[MintGuard], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.inner = inner
        self._monotonic = monotonic
        self._sleep = sleep
        self.guard = guard
        self._client = client
        self._budget = budget
        self._attempts = attempts
        self._clock = clock
        self._on_state = on_state

    async def mint(self, scope: str | None) -> Token:
        deadline = self._monotonic() + self._budget
        attempt = 0
        while True:
            blocked = self.guard.check(self._clock())
            if blocked is not None:
                raise MintBlocked(blocked.message, code=blocked.code, client=self._client)
            remaining = deadline - self._monotonic()
            try:
                async with asyncio.timeout(remaining):
                    token = await self.inner.mint(scope)
            except TimeoutError:
                exc: TokenError = TokenEndpointTimeout(
                    f"token endpoint for client {self._client!r} did not answer within "
                    f"the {self._budget:g}s budget ({attempt + 1} "
                    f"{'attempt' if attempt == 0 else 'attempts'})",
                    client=self._client,
                )
            except TokenError as error:
                # Kept past this attempt: without its traceback, which holds
                # this frame (a cycle for every failed mint otherwise).
                untraced(error)
                exc = error
            else:
                self.guard.success()
                self._changed()
                return token
            kind = self.guard.failure(self._clock(), exc)
            opened = self.guard.opened
            self._changed()
            attempt += 1
            delay = RETRY_FIRST * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)  # noqa: S311
            if (
                kind is not Failure.TRANSIENT
                or attempt >= self._attempts
                or self._monotonic() + delay >= deadline
            ):
                raise exc if opened is None else exc.with_message(opened.message)
            log.info(
                "mint_retry",
                client=self._client,
                attempt=attempt + 1,
                in_s=round(delay, 3),
                reason=exc.code,
            )
            await self._sleep(delay)

    def _changed(self) -> None:
        if self._on_state is not None:
            self._on_state(self.guard)
