"""MintGuard: when a token endpoint may be called (pure, no clock, no I/O)."""

from __future__ import annotations

import pytest

from proxy.errors import (
    TokenEndpointRejected,
    TokenEndpointTimeout,
    TokenEndpointUnreachable,
    TokenResponseInvalid,
)
from proxy.tokens.breaker import Failure, MintGuard, State, classify
from proxy.tokens.token import parse_retry_after


def rejected(
    status: int, error: str | None = None, retry_after: float | None = None
) -> TokenEndpointRejected:
    return TokenEndpointRejected(
        f"answered {status} {error}", http_status=status, oauth_error=error, retry_after=retry_after
    )


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (rejected(401, "invalid_client"), Failure.REJECTED),
        (rejected(400, "invalid_scope"), Failure.REJECTED),
        (rejected(400, "unauthorized_client"), Failure.REJECTED),
        (rejected(403), Failure.REJECTED),
        (rejected(404), Failure.REJECTED),
        (rejected(429), Failure.THROTTLED),
        (rejected(503, retry_after=5), Failure.THROTTLED),
        (rejected(503), Failure.TRANSIENT),
        (rejected(500), Failure.TRANSIENT),
        (rejected(502, "temporarily_unavailable"), Failure.TRANSIENT),
        (TokenEndpointTimeout("t"), Failure.TRANSIENT),
        (TokenEndpointUnreachable("u"), Failure.TRANSIENT),
        (TokenResponseInvalid("html"), Failure.INVALID),
    ],
)
def test_classify(exc: Exception, kind: Failure) -> None:
    assert classify(exc) is kind  # type: ignore[arg-type]


def test_rejection_opens_at_once_and_the_cooldown_grows() -> None:
    guard = MintGuard(cooldown=30, max_cooldown=100)
    assert guard.check(0) is None
    guard.failure(0, rejected(401, "invalid_client"))
    blocked = guard.check(10)
    assert blocked is not None and blocked.wait == 20
    assert blocked.code == "token_endpoint_rejected"
    assert "credentials or request rejected" in blocked.reason
    assert guard.check(30) is None  # half-open: this call is the probe
    assert guard.state is State.HALF_OPEN
    assert guard.check(30) is not None  # ... and the only one
    guard.failure(30, rejected(401, "invalid_client"))
    assert guard.check(89) is not None and guard.check(90) is None  # 60 s the second time
    guard.failure(90, rejected(401, "invalid_client"))
    assert guard.check(189) is not None and guard.check(190) is None  # capped at 100 s
    guard.success()
    assert guard.state is State.CLOSED and guard.check(190) is None and guard.reason is None


def test_the_opening_failure_and_the_blocked_calls_share_one_message() -> None:
    # Issue 11, item 15: one cause, one message, from the first answer on.
    guard = MintGuard(cooldown=30)
    guard.failure(0, TokenEndpointTimeout("slow"))
    assert guard.opened is None  # one transient failure does not open the circuit
    guard.failure(1, rejected(401, "invalid_client"))
    cause = "credentials or request rejected: answered 401 invalid_client"
    assert guard.opened is not None
    assert guard.opened.message == f"{cause}; not calling the token endpoint for another 30s"
    blocked = guard.check(11)
    assert blocked is not None
    assert blocked.message == f"{cause}; not calling the token endpoint for another 20s"
    blocked = guard.check(30.5)  # under a second left: no count
    assert blocked is not None and blocked.message == f"{cause}; not calling the token endpoint"
    guard.success()
    assert guard.opened is None


def test_retry_after_is_obeyed_exactly() -> None:
    guard = MintGuard()
    guard.failure(0, rejected(429, retry_after=120))
    assert guard.check(119.9) is not None
    assert guard.check(120) is None
    guard.failure(120, rejected(429))  # no Retry-After: a short, growing pause
    assert guard.check(124) is not None and guard.check(130) is None


def test_transient_failures_open_after_the_threshold() -> None:
    guard = MintGuard(cooldown=30, threshold=3)
    for now in (0, 1):
        guard.failure(now, TokenEndpointTimeout("slow"))
        assert guard.check(now) is None
    guard.failure(2, TokenEndpointTimeout("slow"))
    assert guard.state is State.OPEN and guard.check(31) is not None
    assert "3 failures in a row" in (guard.reason or "")
    assert guard.check(32) is None
    guard.failure(32, TokenEndpointTimeout("slow"))  # the probe failed: open again, longer
    assert guard.check(91) is not None and guard.check(92) is None
    assert guard.describe(92)["state"] == "half_open"


def test_success_resets_the_count() -> None:
    guard = MintGuard(threshold=2)
    guard.failure(0, TokenEndpointTimeout("slow"))
    guard.success()
    guard.failure(1, TokenEndpointTimeout("slow"))
    assert guard.state is State.CLOSED


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 60.0),
        ("Wed, 21 Oct 2015 07:26:00 GMT", 0.0),  # in the past: no wait
        ("soon", None),
        ("-5", None),
        (None, None),
        ("", None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    now = 1445412420.0  # Wed, 21 Oct 2015 07:27:00 GMT
    assert parse_retry_after(value, now) == seconds
