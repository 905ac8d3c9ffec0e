"""Unit tests of the token client against aioresponses (no sockets).

aioresponses 0.7.9 builds ClientResponse without the ``stream_writer`` that
aiohttp 3.14 requires (its issue #289); ``Response`` below supplies a stand-in.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses

from conftest import FakeClock
from proxy.config.model import ClientConfig
from proxy.errors import (
    MintBlocked,
    TokenEndpointRejected,
    TokenEndpointTimeout,
    TokenEndpointUnreachable,
    TokenError,
    TokenResponseInvalid,
)
from proxy.tokens.breaker import MintGuard
from proxy.tokens.minter import ClientCredentialsMinter, GuardedMinter, basic_credentials
from proxy.tokens.token import Token

URL = "https://auth.example/oauth2/token"
NOW = 1_800_000_000.0


class _StreamWriterStandIn:
    output_size = 0


class Response(aiohttp.ClientResponse):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", _StreamWriterStandIn())
        super().__init__(*args, **kwargs)


def client(**overrides: Any) -> ClientConfig:
    values: dict[str, Any] = {
        "name": "acme",
        "token_url": URL,
        "client_id": "my id",
        "client_secret": "s&cr:t",
        "scope": "read",
        "params": (("audience", "https://api.example"),),
    }
    values.update(overrides)
    return ClientConfig(**values)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def mocked() -> Any:
    with aioresponses() as m:
        yield m


def captured(mocked: Any) -> tuple[dict[str, str], dict[str, str]]:
    (call,) = next(iter(mocked.requests.values()))
    return dict(
        parse_qsl(
            call.kwargs["data"]
            if isinstance(call.kwargs["data"], str)
            else aiohttp.FormData(call.kwargs["data"])().decode()
        )
    ), dict(call.kwargs["headers"])


async def test_basic_auth_form_urlencodes_before_base64(
    mocked: Any, session: aiohttp.ClientSession
) -> None:
    mocked.post(
        URL,
        payload={"access_token": "abc", "token_type": "Bearer", "expires_in": 60},
        response_class=Response,
    )
    token = await ClientCredentialsMinter(client(), session, lambda: NOW).mint("read")
    assert token.access_token == "abc" and token.lifetime == 60 and token.minted_at == NOW
    form, headers = captured(mocked)
    assert form == {
        "grant_type": "client_credentials",
        "scope": "read",
        "audience": "https://api.example",
    }
    decoded = base64.b64decode(headers["Authorization"][6:]).decode()
    assert decoded == "my+id:s%26cr%3At"  # RFC 6749 §2.3.1
    assert headers["Accept"] == "application/json"


def test_basic_credentials_encoding() -> None:
    assert basic_credentials("a", "b") == "Basic " + base64.b64encode(b"a:b").decode()


async def test_client_secret_post_puts_credentials_in_the_form(
    mocked: Any, session: aiohttp.ClientSession
) -> None:
    mocked.post(
        URL, payload={"access_token": "abc", "token_type": "bearer"}, response_class=Response
    )
    token = await ClientCredentialsMinter(
        client(auth_method="client_secret_post", scope=None, params=()), session, lambda: NOW
    ).mint(None)
    assert token.lifetime == 300  # default_lifetime
    form, headers = captured(mocked)
    assert form == {
        "grant_type": "client_credentials",
        "client_id": "my id",
        "client_secret": "s&cr:t",
    }
    assert "Authorization" not in headers


@pytest.mark.parametrize(
    ("kwargs", "exc", "needle"),
    [
        (
            {"status": 401, "payload": {"error": "invalid_client"}},
            TokenEndpointRejected,
            "invalid_client",
        ),
        (
            {"status": 503, "body": "<html>down</html>", "content_type": "text/html"},
            TokenEndpointRejected,
            "503 \\(HTML\\)",
        ),
        (
            {"status": 200, "body": "not json", "content_type": "text/plain"},
            TokenResponseInvalid,
            "not a JSON object",
        ),
        (
            {"status": 200, "payload": {"token_type": "Bearer"}},
            TokenResponseInvalid,
            "no access_token",
        ),
        (
            {"status": 200, "payload": {"access_token": "x", "token_type": "N_A"}},
            TokenResponseInvalid,
            "only Bearer",
        ),
        ({"timeout": True}, TokenEndpointTimeout, "did not answer"),
        (
            {"exception": aiohttp.ClientConnectionError("refused")},
            TokenEndpointUnreachable,
            "unreachable",
        ),
        ({"status": 200, "body": b"x" * (70 * 1024)}, TokenResponseInvalid, "over 65536 bytes"),
    ],
)
async def test_failures_become_token_errors(
    mocked: Any,
    session: aiohttp.ClientSession,
    kwargs: dict[str, Any],
    exc: type[Exception],
    needle: str,
) -> None:
    mocked.post(URL, response_class=Response, **kwargs)
    with pytest.raises(exc, match=needle) as info:
        await ClientCredentialsMinter(client(), session, lambda: NOW).mint("read")
    assert "s&cr:t" not in str(info.value)


async def test_minted_at_is_taken_before_the_request_leaves(
    mocked: Any, session: aiohttp.ClientSession
) -> None:
    times = iter([NOW, NOW + 5])

    def respond(url: Any, **kwargs: Any) -> CallbackResult:
        return CallbackResult(
            payload={"access_token": "a", "token_type": "Bearer", "expires_in": 100},
            response_class=Response,
        )

    mocked.post(URL, callback=respond, response_class=Response)
    token = await ClientCredentialsMinter(
        client(expiry_margin=0), session, lambda: next(times)
    ).mint("read")
    assert token.minted_at == NOW and token.expires_at == NOW + 100


class FailingMinter:
    """Raises the same error on every call, and counts the calls."""

    def __init__(self, error: TokenError) -> None:
        self.error = error
        self.calls = 0

    async def mint(self, scope: str | None) -> Token:
        self.calls += 1
        raise self.error


async def test_the_first_rejection_says_what_the_blocked_calls_say(clock: FakeClock) -> None:
    # Issue 11, item 15: one message for one cause, from the first answer on.
    cause = TokenEndpointRejected(
        "token endpoint for client 'acme' answered 401 invalid_client: bad credentials",
        http_status=401,
        oauth_error="invalid_client",
        client="acme",
    )
    inner = FailingMinter(cause)
    minter = GuardedMinter(
        inner, MintGuard(cooldown=30), client="acme", budget=5, attempts=3, clock=clock
    )
    said = (
        "credentials or request rejected: token endpoint for client 'acme' answered 401 "
        "invalid_client: bad credentials; not calling the token endpoint for another {}s"
    )
    with pytest.raises(TokenEndpointRejected) as first:
        await minter.mint("read")
    assert first.value.message == str(first.value) == said.format(30)
    assert (first.value.http_status, first.value.oauth_error, first.value.client) == (
        401,
        "invalid_client",
        "acme",
    )
    assert first.value is not cause and cause.message.startswith("token endpoint")  # not mutated
    clock.advance(10)
    with pytest.raises(MintBlocked) as later:
        await minter.mint("read")
    assert later.value.message == said.format(20)
    assert later.value.code == "token_endpoint_rejected" and later.value.client == "acme"
    assert inner.calls == 1


async def test_a_failure_that_does_not_open_the_circuit_is_raised_as_it_came(
    clock: FakeClock,
) -> None:
    cause = TokenEndpointTimeout("token endpoint for client 'acme' did not answer", client="acme")
    inner = FailingMinter(cause)
    minter = GuardedMinter(inner, MintGuard(), client="acme", budget=5, attempts=1, clock=clock)
    with pytest.raises(TokenEndpointTimeout) as raised:
        await minter.mint("read")
    assert raised.value is cause and inner.calls == 1


def _echo(url: Any, **kwargs: Any) -> CallbackResult:
    """A token endpoint that quotes back everything it received."""
    echoed = f"got Authorization={kwargs['headers'].get('Authorization')} body={kwargs['data']}"
    return CallbackResult(
        status=400,
        payload={"error": "invalid_request", "error_description": echoed},
        response_class=Response,
    )


def _echo_page(url: Any, **kwargs: Any) -> CallbackResult:
    echoed = f"<pre>{kwargs['headers'].get('Authorization')}\n{kwargs['data']}</pre>"
    return CallbackResult(
        status=500, body=echoed, content_type="text/html", response_class=Response
    )


@pytest.mark.parametrize("answer", [_echo, _echo_page])
@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_an_endpoint_that_echoes_the_request_cannot_put_a_secret_in_a_message(
    mocked: Any, session: aiohttp.ClientSession, answer: Any, method: str
) -> None:
    """black-box round 2 (1.): the 502 message, /tokens and the log quote the
    endpoint's description or body; the credentials this request sent are
    replaced in them, in every form they travelled."""
    mocked.post(URL, callback=answer, response_class=Response)
    minter = ClientCredentialsMinter(client(auth_method=method), session, lambda: NOW)
    with pytest.raises(TokenEndpointRejected) as info:
        await minter.mint("read")
    message = info.value.message
    basic = basic_credentials("my id", "s&cr:t").removeprefix("Basic ")
    for secret in ("s&cr:t", "s%26cr%3At", basic):
        assert secret not in message, message
    assert "[redacted]" in message


async def test_an_access_token_a_header_cannot_carry_is_refused_at_mint(
    mocked: Any, session: aiohttp.ClientSession
) -> None:
    """black-box round 2 (4.): a token with CR LF was cached and every request
    got a 500 for its lifetime; it is refused when minted."""
    mocked.post(
        URL,
        payload={"access_token": "abc\r\nX-Injected: 1", "token_type": "Bearer"},
        response_class=Response,
    )
    with pytest.raises(TokenResponseInvalid, match="characters a header cannot carry"):
        await ClientCredentialsMinter(client(), session, lambda: NOW).mint("read")


async def test_a_token_minted_here_is_redacted_from_a_later_error(
    mocked: Any, session: aiohttp.ClientSession
) -> None:
    mocked.post(
        URL,
        payload={"access_token": "tok-minted-here-1", "token_type": "Bearer"},
        response_class=Response,
    )
    mocked.post(
        URL,
        status=400,
        payload={"error": "invalid_request", "error_description": "saw tok-minted-here-1"},
        response_class=Response,
    )
    minter = ClientCredentialsMinter(client(), session, lambda: NOW)
    await minter.mint("read")
    with pytest.raises(TokenEndpointRejected) as info:
        await minter.mint("read")
    assert "tok-minted-here-1" not in info.value.message
    assert "saw [redacted]" in info.value.message


async def test_transient_failures_back_off_on_the_injected_clock(clock: FakeClock) -> None:
    """Retries wait on the injected sleep, which moves the injected
    monotonic clock: three calls, doubling jittered delays, no real waiting,
    and no retry once the next wait would pass the budget."""
    cause = TokenEndpointUnreachable("token endpoint for client 'acme' is down", client="acme")
    inner = FailingMinter(cause)
    waited: list[float] = []
    now = [0.0]

    async def sleep(seconds: float) -> None:
        waited.append(seconds)
        now[0] += seconds

    minter = GuardedMinter(
        inner, MintGuard(), client="acme", budget=5, attempts=3, clock=clock,
        monotonic=lambda: now[0], sleep=sleep,
    )  # fmt: skip
    with pytest.raises(TokenEndpointUnreachable):
        await minter.mint("read")
    assert inner.calls == 3 and len(waited) == 2
    assert 0.1 <= waited[0] <= 0.2 and 0.2 <= waited[1] <= 0.4
    now[0] = 0.0
    inner.calls = 0
    tight = GuardedMinter(
        inner, MintGuard(), client="acme", budget=0.05, attempts=3, clock=clock,
        monotonic=lambda: now[0], sleep=sleep,
    )  # fmt: skip
    with pytest.raises(TokenEndpointUnreachable):
        await tight.mint("read")
    assert inner.calls == 1  # the first wait (>= 0.1 s) would pass the 0.05 s budget
