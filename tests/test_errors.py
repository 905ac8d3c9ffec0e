"""The error tree: an error shared by many requests is never changed; each
request gets its own copy naming its route (issue 11, item 14)."""

from __future__ import annotations

import pytest

from proxy.errors import (
    BadRequest,
    MintBlocked,
    RequestFailed,
    TokenEndpointRejected,
    TokenEndpointTimeout,
    UpstreamTimeout,
    malformed_reason,
)

CAUSES = [
    TokenEndpointRejected(
        "token endpoint for client 'demo' answered 429 slow_down",
        http_status=429,
        oauth_error="slow_down",
        retry_after=120.0,
        client="demo",
    ),
    MintBlocked(
        "credentials or request rejected: ...", code="token_endpoint_rejected", client="demo"
    ),
    TokenEndpointTimeout(
        "token endpoint for client 'demo' did not answer within 5s", client="demo"
    ),
    UpstreamTimeout("upstream did not answer within 30s"),
    BadRequest("expected exactly one Host header, got 2"),
]


def fields(exc: RequestFailed) -> dict[str, object]:
    """Everything an error carries: its own attributes and its class's status/code/headers."""
    return {**vars(exc), "status": exc.status, "code": exc.code, "headers": exc.headers}


@pytest.mark.parametrize("cause", CAUSES, ids=lambda exc: type(exc).__name__)
def test_on_route_is_a_new_error_with_the_same_facts(cause: RequestFailed) -> None:
    before = fields(cause)
    routed = cause.on_route("orders-route")
    assert routed is not cause and type(routed) is type(cause)
    assert fields(cause) == before and str(cause) == cause.message  # the cause is untouched
    message = "route 'orders-route': " + cause.message
    assert routed.message == message and str(routed) == message and routed.args == (message,)
    assert routed.route == "orders-route"
    expected = {**before, "route": "orders-route", "message": message}
    assert fields(routed) == expected  # http_status, oauth_error, retry_after, MintBlocked.code
    assert routed.as_json() == {
        "error": cause.code,
        "message": message,
        "route": "orders-route",
        **({"client": "demo"} if cause.client else {}),
    }


def test_on_route_names_the_route_once() -> None:
    cause = TokenEndpointTimeout("did not answer within 5s", client="demo")
    routed = cause.on_route("orders-route").on_route("orders-route")
    assert routed.message == "route 'orders-route': did not answer within 5s"


def test_fifty_waiters_get_fifty_identical_messages() -> None:
    shared = TokenEndpointRejected("answered 500", http_status=500, client="demo")
    messages = {shared.on_route("orders-route").message for _ in range(50)}
    assert messages == {"route 'orders-route': answered 500"}
    assert shared.message == "answered 500" and shared.route is None


def test_with_message_restates_without_changing_the_cause() -> None:
    cause = TokenEndpointRejected(
        "answered 401 invalid_client", http_status=401, oauth_error="invalid_client"
    )
    restated = cause.with_message("credentials or request rejected: answered 401 invalid_client")
    assert type(restated) is TokenEndpointRejected and restated is not cause
    assert (
        str(restated)
        == restated.message
        == "credentials or request rejected: answered 401 invalid_client"
    )
    assert (restated.http_status, restated.oauth_error) == (401, "invalid_client")
    assert cause.message == str(cause) == "answered 401 invalid_client"


def test_malformed_reason_never_quotes_the_request_bytes() -> None:
    from aiohttp.http_exceptions import BadHttpMessage, InvalidHeader, LineTooLong

    from proxy.errors import malformed_reason

    secret = b"Authorization: Bearer app-secret\x01"
    for exc in (
        InvalidHeader(secret),
        BadHttpMessage("Invalid header value char:\n\n  b'Bearer app-secret'\n  ^"),
        LineTooLong(b"Bearer app-secret...", 8190),
    ):
        reason = malformed_reason(exc)
        assert reason.startswith("malformed request: ") and "app-secret" not in reason, reason


def test_the_drawn_tree_is_the_tree() -> None:
    """errors.py's docstring draws every error class, under its real parent,
    and nothing else; no other module defines an exception of its own."""
    import ast
    import inspect
    import re
    from pathlib import Path

    import proxy.errors as errors

    drawn: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        found = re.match(r"^\s{4}([│ ]*[├└]── )?([A-Z][A-Za-z]+)\b", line)
        if not found:
            continue
        depth = len(found.group(1) or "")
        while stack and stack[-1][0] >= depth:
            stack.pop()
        drawn[found.group(2)] = stack[-1][1] if stack else None
        stack.append((depth, found.group(2)))
    actual = {
        name: (cls.__bases__[0].__name__ if cls is not errors.AuthProxyError else None)
        for name, cls in vars(errors).items()
        if inspect.isclass(cls) and issubclass(cls, errors.AuthProxyError)
    }
    assert drawn == actual
    package = Path(errors.__file__).parent
    elsewhere = [
        f"{path.relative_to(package)}: {node.name}"
        for path in package.rglob("*.py")
        if path.name != "errors.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
        and any(getattr(b, "id", "").endswith(("Error", "Exception")) for b in node.bases)
    ]
    assert elsewhere == []


@pytest.mark.parametrize(
    ("message", "said"),
    [
        ("Invalid `Transfer-Encoding` header value:\n\n  b'Transfer-Encoding: chunked, chunked'",
         "Invalid Transfer-Encoding header value"),
        ("Duplicate 'Max-Forwards' header found.", "Duplicate Max-Forwards header found"),
        ("Missing 'Host' header in request.", "Missing Host header in request"),
        ("Transfer-Encoding can't be present with Content-Length:\n\n  b'x'",
         "Transfer-Encoding cannot be present with Content-Length"),
        ("Bad status 'tok-secret-1' seen", "Bad status"),  # a quoted word that names no header
        # round 10 (F3): the name ends the sentence
        ("Request has invalid `Transfer-Encoding`:\n\n  b''\n    ^",
         "Request has invalid Transfer-Encoding"),
    ],
)  # fmt: skip
def test_a_refusal_names_the_field_the_parser_quotes_and_nothing_else(
    message: str, said: str
) -> None:
    """Issue 11, fifth outside round: "malformed request: Invalid" said nothing."""

    class Complaint(Exception):
        def __init__(self, text: str) -> None:
            self.message = text

    assert malformed_reason(Complaint(message)) == f"malformed request: {said}"


def test_os_reason_says_the_errno_never_the_address() -> None:
    """asyncio's connect errors name the resolved address; the app's 502
    says what failed (review of round 12's fix: a name with two addresses
    raised "Multiple exceptions", with no errno, and read as "OSError")."""
    from proxy.errors import os_reason

    refused = "Connect call failed ('10.9.8.7', 443)"
    assert os_reason(OSError(111, refused)) == "Connection refused"
    several = OSError(f"Multiple exceptions: [Errno 111] {refused}, [Errno 113] x")
    assert os_reason(several) == "Connection refused"
    assert os_reason(OSError("no number")) == "OSError"
