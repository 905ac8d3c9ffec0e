"""When not to call a token endpoint: a circuit breaker per client (pure).

The token endpoint is rate-limited and its quota is shared with everyone else
using the same client; calling it harder while it fails only makes things
worse. :class:`MintGuard` decides, from what the last calls returned, whether a
new call may go out now:

- **rejected** (``invalid_client``, ``unauthorized_client``, ``invalid_scope``,
  ``invalid_grant``, or any other 400/401/403): the credentials or the request
  are wrong and retrying cannot help. No call for ``cooldown`` seconds (30 s by
  default), doubling on each repeat up to ``max_cooldown``.
- **throttled** (429, or 503 with ``Retry-After``): no call before the time the
  endpoint named (429 without ``Retry-After``: ``cooldown / 6``, growing).
- **transient** (timeouts, connection errors, 5xx): retried within the
  request's budget by the caller; after ``threshold`` failures in a row the
  circuit opens for ``cooldown`` (doubling on each trip).

After an open period the circuit is **half-open**: one call probes; success
closes the circuit, failure opens it again. Nothing here does I/O or reads a
clock: ``now`` is passed in.

One cause, one message (issue 11): the answer to the call that opened the
circuit and every answer while it stays open say the same thing,
:attr:`Blocked.message`, e.g. ``credentials or request rejected: token endpoint
for client 'acme' answered 401 invalid_client: ...; not calling the token
endpoint for another 30s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Final

from proxy.errors import (
    TokenEndpointRejected,
    TokenEndpointTimeout,
    TokenEndpointUnreachable,
    TokenError,
)

REJECTING_ERRORS: Final = frozenset(
    {
        "invalid_client",
        "unauthorized_client",
        "invalid_scope",
        "invalid_grant",
        "invalid_request",
        "unsupported_grant_type",
        "access_denied",
    }
)
MAX_RETRY_AFTER: Final = 3600.0  # never obey a Retry-After longer than an hour
# The default first cooldown is config's failure_cooldown (30 s); each
# rejection in a row doubles it up to MAX_COOLDOWN, so a revoked secret costs
# the endpoint one call per 5 minutes, not one per request.
DEFAULT_COOLDOWN: Final = 30.0
MAX_COOLDOWN: Final = 300.0
# Transient failures (5xx, timeouts) in a row before the circuit opens: enough
# to ride out a blip, few enough that a dead endpoint is not hammered.
FAILURE_THRESHOLD: Final = 5


class Failure(Enum):
    REJECTED = "rejected"
    THROTTLED = "throttled"
    TRANSIENT = "transient"
    INVALID = "invalid"  # a 2xx that is not a usable token: not retried, counts to the breaker


def classify(exc: TokenError) -> Failure:
    if isinstance(exc, TokenEndpointRejected):
        if exc.http_status == 429 or (exc.http_status == 503 and exc.retry_after is not None):
            return Failure.THROTTLED
        if exc.oauth_error in REJECTING_ERRORS or exc.http_status in (400, 401, 403):
            return Failure.REJECTED
        if exc.http_status >= 500:
            return Failure.TRANSIENT
        return Failure.REJECTED  # another 4xx: the request is wrong, not the weather
    if isinstance(exc, (TokenEndpointTimeout, TokenEndpointUnreachable)):
        return Failure.TRANSIENT
    return Failure.INVALID


class State(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class Blocked:
    """Why no call may go out now, and for how long."""

    reason: str
    code: str
    wait: float

    @property
    def message(self) -> str:
        """What the app is told: the cause, then how long no call goes out."""
        wait = f" for another {self.wait:.0f}s" if self.wait >= 1 else ""
        return f"{self.reason}; not calling the token endpoint{wait}"


class MintGuard:
    def __init__(
        self,
        *,
        cooldown: float = DEFAULT_COOLDOWN,
        max_cooldown: float = MAX_COOLDOWN,
        threshold: int = FAILURE_THRESHOLD,
    ) -> None:
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.threshold = threshold
        self.state = State.CLOSED
        self.open_until = 0.0
        self.reason: str | None = None
        # What the last call to failure() did to the circuit: the Blocked it
        # opened, or None when the circuit did not open on it.
        self.opened: Blocked | None = None
        self._code = "token_endpoint_circuit_open"
        self._failures = 0  # in a row
        self._trips = 0  # openings in a row, for the growing cool-down
        self._probing = False

    def check(self, now: float) -> Blocked | None:
        """``None`` when a call may go out now (and, half-open, it is the probe)."""
        if self.state is State.OPEN:
            if now < self.open_until:
                return Blocked(self.reason or "", self._code, self.open_until - now)
            self.state = State.HALF_OPEN
            self._probing = False
        if self.state is State.HALF_OPEN:
            if self._probing:
                return Blocked(self.reason or "", self._code, 0.0)
            self._probing = True
        return None

    def success(self) -> None:
        self.state = State.CLOSED
        self.reason = None
        self.opened = None
        self._failures = 0
        self._trips = 0
        self._probing = False

    def failure(self, now: float, exc: TokenError) -> Failure:
        """Record a failed call; returns its kind (the caller retries transient ones).

        When this failure opens the circuit, :attr:`opened` says so and how:
        its :attr:`Blocked.message` is the app's answer for this call too.
        """
        kind = classify(exc)
        self._failures += 1
        self._probing = False
        self.opened = None
        if kind is Failure.REJECTED:
            self._open(now, self._grown(self.cooldown), exc, "credentials or request rejected")
        elif kind is Failure.THROTTLED:
            wait = getattr(exc, "retry_after", None)
            if wait is None:
                wait = self._grown(self.cooldown / 6)
            self._open(now, min(wait, MAX_RETRY_AFTER), exc, "token endpoint asked to wait")
        elif self.state is State.HALF_OPEN or self._failures >= self.threshold:
            self._open(now, self._grown(self.cooldown), exc, f"{self._failures} failures in a row")
        return kind

    def _grown(self, base: float) -> float:
        return float(min(self.max_cooldown, base * 2.0**self._trips))

    def _open(self, now: float, seconds: float, exc: TokenError, why: str) -> None:
        self.state = State.OPEN
        self.open_until = now + seconds
        self._trips += 1
        self._code = exc.code
        self.reason = f"{why}: {exc.message}"
        self.opened = Blocked(self.reason, self._code, seconds)

    def describe(self, now: float) -> dict[str, object]:
        """For /tokens: the state, how long it stays open, and why."""
        info: dict[str, object] = {"state": self.state.value}
        if self.state is State.OPEN:
            info["open_for_s"] = round(max(0.0, self.open_until - now), 1)
        if self.reason:
            info["reason"] = self.reason
        return info
