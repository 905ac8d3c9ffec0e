"""The one error tree of authproxy.

Every error the proxy raises on purpose derives from :class:`AuthProxyError`.
Errors that reach an app carry the HTTP status they map to and a short
machine-readable code; their message names the route and the client, and never
contains a token, a client secret or an ``Authorization`` value.

::

    AuthProxyError
    ├── ConfigError                    bad proxy.yaml (never reaches an app)
    │   └── CAError                    an egress CA file that cannot serve, or a
    │                                  name it may not sign for
    ├── CacheUnavailable               the shared token cache failed (never reaches
    │                                  an app: the proxy falls back to memory)
    ├── TransportFailure               an engine's fact about a connection; the
    │   │                              forwarder answers each with a RequestFailed
    │   ├── ConnectFailed              never connected (refused, DNS, TLS)
    │   │   └── ConnectTimedOut        not within connect_timeout
    │   ├── Dropped                    closed before any answer: safe to resend
    │   ├── BodyFailed                 the app's body failed while going upstream
    │   ├── AppBodyFailed              the app's body broke (reset, bad chunking)
    │   ├── UpstreamBodyFailed         the partner's answer broke mid-body
    │   ├── UpstreamProtocolError      the partner's answer cannot be parsed
    │   └── HandshakeFailed            an app's TLS handshake inside a CONNECT failed
    └── RequestFailed                  answered to the app as JSON
        ├── BadRequest            400  malformed request (named, never quoted)
        │   ├── PathEscapesRoute  400  dot-segments climb out of the route
        │   └── AmbiguousPath     400  normalised, the path is another route's
        ├── ProxyKeyRequired      401  the route's inbound_auth key is missing or wrong
        ├── SourceNotAllowed      403  the app's address is not in the route's allow_from
        ├── ConnectNotAllowed     403  a CONNECT to neither a routed host nor a tunnel entry
        ├── NoRoute               404  no route matches host/path
        ├── MethodNotAllowed      405  TRACE; CONNECT to a routed host without interception
        ├── HeadTimeout           408  the request head did not arrive in time
        ├── BodyTimeout           408  the app stopped sending its request body
        ├── BodyTooLarge          413  the body is over the route's max_body
        ├── UriTooLong            414  the request line is over the limit
        ├── MisdirectedRequest    421  a Host inside a CONNECT tunnel that is not its host
        ├── HeaderTooLarge        431  a header field, or their number, is over the limit
        ├── NotImplementedByProxy 501  a transfer coding other than chunked
        ├── VersionNotSupported   505  not HTTP/1.x
        ├── RouteBusy             503  max_concurrent requests already in flight
        ├── TokenError            502  no token could be had
        │   ├── TokenEndpointRejected   the endpoint answered an RFC 6749 §5.2 error
        │   ├── TokenEndpointUnreachable connect/reset/TLS failure
        │   ├── TokenEndpointTimeout     no answer within the client's timeout
        │   ├── TokenResponseInvalid     2xx but not a usable bearer token
        │   └── MintBlocked              not called: the client's circuit is open
        └── UpstreamError         502  the partner API failed
            ├── UpstreamUnreachable 502
            └── UpstreamTimeout     504

Library exceptions (aiohttp, OSError, asyncio.TimeoutError) are translated into
this tree once, at the boundary where they happen, with ``raise ... from exc``.
"""

from __future__ import annotations

import os
import re
from typing import Final, Self


class AuthProxyError(Exception):
    """Root of every error authproxy raises on purpose."""


class ConfigError(AuthProxyError):
    """The configuration is invalid; the message names the file, line and key."""


class CAError(ConfigError):
    """The egress CA (proxy/egress/ca.py): a file that cannot serve, or a
    name it may not sign for. The message names the file or host, never key
    material."""


class CacheUnavailable(AuthProxyError):
    """A shared cache backend (Redis) failed or timed out. The message names the
    operation and the error class, never the URL (it may carry a password)."""


class TransportFailure(AuthProxyError):
    """A fact an engine reports about a connection, translated from the
    library's exceptions once, where they happen (proxy/http1/upstream.py,
    proxy/http1/listener.py). ``reason`` is safe to show: no request bytes."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ConnectFailed(TransportFailure):
    """No connection could be made (refused, unreachable, DNS, TLS handshake)."""


def untraced(exc: BaseException) -> BaseException:
    """``exc`` and the exceptions it was raised from, without tracebacks.
    aiohttp keeps a payload's or a connection's exception, and a mint's
    failure is shared by its waiters, to be raised again; each raise leaves a
    traceback on it that holds the frames it passed through, and those hold
    the object that keeps the exception: a reference cycle for every failed
    request (tests/test_cycles.py). Drop them once the exception is read."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain is short; a cycle of causes is not followed forever
        if seen is None:
            break
        seen.__traceback__ = None
        seen = seen.__cause__ or seen.__context__
    return exc


def os_reason(exc: OSError) -> str:
    """What an OSError says, from its errno ("Connection refused"): asyncio's
    own text ("Connect call failed ('10.1.2.3', 443)") names the address a
    name resolved to, which is the proxy's business, not the app's."""
    number = exc.errno
    if not number:  # asyncio's "Multiple exceptions: [Errno 111] ..., [Errno 111] ..."
        found = re.search(r"\[Errno (\d+)\]", str(exc))
        number = int(found.group(1)) if found else None
    if number:
        try:
            return os.strerror(number)
        except ValueError:
            pass
    return type(exc).__name__


class ConnectTimedOut(ConnectFailed):
    """No connection within the route's ``connect_timeout``."""


class Dropped(TransportFailure):
    """The connection closed before any byte of an answer: the request may not
    have reached the application, so an idempotent one can be sent again."""


class BodyFailed(TransportFailure):
    """The request body's source (the app's inbound body) raised while being sent."""


class AppBodyFailed(TransportFailure):
    """The app's request body broke: reset, bad chunking, cut short."""


class UpstreamBodyFailed(TransportFailure):
    """The partner's answer broke after its head (reset, bad chunking)."""


class UpstreamProtocolError(TransportFailure):
    """The partner's answer is not HTTP/1.1 the proxy can relay."""


class HandshakeFailed(TransportFailure):
    """The app's TLS handshake inside an intercepted CONNECT failed: it does
    not trust the proxy's CA, named another host in its SNI, or offered no
    version or cipher the proxy accepts. ``reason`` is OpenSSL's short name."""


class RequestFailed(AuthProxyError):
    """An error answered to the app with ``status`` and a JSON body.

    ``route`` and ``client`` are names from proxy.yaml (or ``None`` when the
    failure happened before a route was chosen).
    """

    status: int = 500
    code: str = "internal_error"
    headers: tuple[tuple[str, str], ...] = ()  # extra response headers (Retry-After, ...)

    def __init__(
        self, message: str, *, route: str | None = None, client: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.route = route
        self.client = client

    @classmethod
    def at(cls, route: str, text: str, *, client: str | None = None) -> Self:
        """``route 'NAME': text``, with ``route`` (and ``client``) set: the
        one way a message names the route it happened on."""
        return cls(route_prefix(route) + text, route=route, client=client)

    def on_route(self, route: str) -> Self:
        """A new error of the same class and facts for a request on ``route``:
        ``route`` set and the message prefixed ``route 'NAME': `` (once).

        ``self`` is not changed: one error may be shared by every request that
        waited on the same mint, and rewriting it for each made the messages
        grow with the number of waiters (issue 11). Raise the copy.
        """
        prefix = route_prefix(route)
        message = self.message if self.message.startswith(prefix) else prefix + self.message
        return self._copy(message, route=route)

    def with_message(self, message: str) -> Self:
        """A new error of the same class and facts that says ``message``;
        ``self`` is not changed."""
        return self._copy(message, route=self.route)

    def _copy(self, message: str, *, route: str | None) -> Self:
        # Not copy.copy: it rebuilds through __init__ with the positional
        # message only, which loses (or, for keyword-only fields such as
        # http_status, refuses) the subclass's fields. Every field lives in
        # the instance dict, so copying that keeps them all.
        clone = type(self).__new__(type(self), message)  # args == (message,)
        clone.__dict__.update(vars(self))
        clone.message = message
        clone.route = route
        return clone

    def as_json(self) -> dict[str, str]:
        body = {"error": self.code, "message": self.message}
        if self.route is not None:
            body["route"] = self.route
        if self.client is not None:
            body["client"] = self.client
        return body


class BadRequest(RequestFailed):
    status = 400
    code = "bad_request"


class PathEscapesRoute(BadRequest):
    code = "path_escapes_route"


class AmbiguousPath(BadRequest):
    """A path another route serves once decoded and normalised."""

    code = "ambiguous_path"


class ProxyKeyRequired(RequestFailed):
    """A route's ``inbound_auth`` key is missing or wrong. A 401 carries a
    challenge (RFC 9110 §15.5.2): this one names the proxy's scheme and the
    header the key goes in, so an app tells it from a partner's 401."""

    status = 401
    code = "proxy_key_required"
    headers = (("WWW-Authenticate", 'ProxyKey realm="authproxy"'),)

    @classmethod
    def for_header(cls, route: str, header: str) -> ProxyKeyRequired:
        failed = cls.at(route, f"needs a valid key in one {header} header")
        failed.headers = (("WWW-Authenticate", f'ProxyKey realm="authproxy", header="{header}"'),)
        return failed


class SourceNotAllowed(RequestFailed):
    status = 403
    code = "source_not_allowed"


class ConnectNotAllowed(RequestFailed):
    """A CONNECT the proxy will not open: an IP literal, a port not listed, a
    host covered by no route and no ``egress.tunnel`` entry (docs/egress.md).
    The proxy stays a closed proxy."""

    status = 403
    code = "connect_not_allowed"


class MisdirectedRequest(RequestFailed):
    """RFC 9110 §15.5.20: a request inside a CONNECT tunnel whose ``Host``
    names another host than the tunnel's; it would be routed by a name its
    TLS connection was not made for."""

    status = 421
    code = "misdirected_request"


class BodyTimeout(RequestFailed):
    status = 408
    code = "body_timeout"


class BodyTooLarge(RequestFailed):
    status = 413
    code = "body_too_large"


class RouteBusy(RequestFailed):
    status = 503
    code = "route_busy"
    headers = (("Retry-After", "1"),)


class NoRoute(RequestFailed):
    status = 404
    code = "no_route"


class MethodNotAllowed(RequestFailed):
    """TRACE, and CONNECT to a routed host while ``egress.intercept`` is off.
    RFC 9110 §15.5.6: a 405 lists what is allowed; every
    other method (extension methods too) is forwarded."""

    status = 405
    code = "method_not_allowed"
    headers = (("Allow", "GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),)


class TokenError(RequestFailed):
    status = 502
    code = "token_error"


class TokenEndpointRejected(TokenError):
    """The token endpoint answered with an error (RFC 6749 §5.2) or a non-2xx status.

    ``oauth_error`` is the RFC 6749 error code when the body had one, else ``None``.
    """

    code = "token_endpoint_rejected"

    def __init__(
        self,
        message: str,
        *,
        http_status: int,
        oauth_error: str | None = None,
        retry_after: float | None = None,
        route: str | None = None,
        client: str | None = None,
    ) -> None:
        super().__init__(message, route=route, client=client)
        self.http_status = http_status
        self.oauth_error = oauth_error
        self.retry_after = retry_after  # seconds the endpoint asked us to wait (429/503)


class TokenEndpointUnreachable(TokenError):
    code = "token_endpoint_unreachable"


class TokenEndpointTimeout(TokenError):
    code = "token_endpoint_timeout"


class TokenResponseInvalid(TokenError):
    code = "token_response_invalid"


class MintBlocked(TokenError):
    """No call to the token endpoint was made: the client's circuit is open.
    ``code`` is the code of the failure that opened it."""

    def __init__(self, message: str, *, code: str, client: str | None = None) -> None:
        super().__init__(message, client=client)
        self.code = code


class UpstreamError(RequestFailed):
    """``resend``: the request never reached the partner's application (no
    connection, or a kept-alive one found closed), so an idempotent one may be
    sent once more."""

    status = 502
    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        route: str | None = None,
        client: str | None = None,
        resend: bool = False,
    ) -> None:
        super().__init__(message, route=route, client=client)
        self.resend = resend


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


def route_prefix(route: str) -> str:
    return f"route {route!r}: "


# What a parser's complaint may contribute to a refusal: its leading words (a
# capital, then letters, spaces, commas, hyphens), up to the first character
# that could start quoted request bytes (':', a quote, '/', '?', '=' ...). Built
# this way, no target, query, header value or token can pass into an answer or
# a log line, whatever the parser or URL library put in its message.
_SAFE_WORDS: Final = re.compile(r"[A-Z][A-Za-z ,-]{2,80}")


# A field name the parser quotes: in backquotes (`Transfer-Encoding`, the
# parsers' own wording, never the request's bytes) or, before " header", in
# single quotes ('Host'); a name is no secret.
_QUOTED_NAME: Final = re.compile(
    r"`([A-Za-z][A-Za-z0-9-]{0,39})`|'([A-Za-z][A-Za-z0-9-]{0,39})'(?= header\b)"
)


def malformed_reason(exc: BaseException | None) -> str:
    """An HTTP parser's complaint without any of the request bytes it quotes."""
    text = str(getattr(exc, "message", None) or (type(exc).__name__ if exc else ""))
    text = text.replace("`Connection: close`", "Connection close").replace("can't", "cannot")
    text = _QUOTED_NAME.sub(lambda found: found.group(1) or found.group(2), text)
    found = _SAFE_WORDS.match(text.strip())
    words = found.group().strip(" ,-") if found else ""
    return "malformed request: " + (words or "bad request")


class UriTooLong(RequestFailed):
    """RFC 9112 §3: a request line over the limit is answered 414."""

    status = 414
    code = "uri_too_long"


class HeaderTooLarge(RequestFailed):
    """RFC 6585 §5: a header field over the limit, or too many of them."""

    status = 431
    code = "header_too_large"


class HeadTimeout(RequestFailed):
    """The request's head did not arrive within ``inbound.header_timeout``."""

    status = 408
    code = "request_head_timeout"


class NotImplementedByProxy(RequestFailed):
    """RFC 9112 §6.1 / RFC 9110 §15.6.2: a transfer coding (or a method the
    parser cannot frame) that the proxy does not implement."""

    status = 501
    code = "not_implemented"


class VersionNotSupported(RequestFailed):
    """RFC 9110 §15.6.6: only HTTP/1.0 and HTTP/1.1 are spoken here."""

    status = 505
    code = "http_version_not_supported"
