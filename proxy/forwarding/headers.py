"""Header rules of a transparent proxy (pure): what passes, what is dropped,
what the proxy sets."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from random import getrandbits as _getrandbits
from typing import Final

# RFC 9110 §7.6.1: hop-by-hop fields belong to one connection and must not be
# forwarded. Proxy-Connection is not in the RFC but old clients still send it
# (RFC 9112 §C.2.2 notes it); Keep-Alive is the HTTP/1.0 companion of
# Connection. TE and Trailer concern this hop's transfer coding only.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Request headers the proxy sets itself, so any the app sent are dropped first.
# Expect: the listener answers the app's 100-continue itself; the upstream
# client does not wait for the partner's, so forwarding it would be a lie.
# DPoP: the proxy's proof goes with the proxy's token (RFC 9449 §4.3 refuses
# a request with two); an app's own is never forwarded.
_REQUEST_OWNED: Final = frozenset({"host", "authorization", "expect", "dpop"})
# Forwarding headers the app could forge to pose as someone else; replaced by
# the proxy's own unless trust_forwarded_headers is on.
# The second line: fields that proxies and partners' stacks also read as the
# client's address or the request's original URL (IIS/Symfony rewrite
# headers, CDN client-IP fields): an app could climb out of its route or pose
# as another client with them.
# The third line (issue 11, round 5): what CDNs, load balancers and client-IP
# libraries (request-ip, Rack, Django) also read as the client's address or
# scheme. A name with "_" is dropped when its "-" spelling is dropped (these,
# the inbound key headers, the hop-by-hop fields): CGI, WSGI and PHP stacks
# read X_Forwarded_For as X-Forwarded-For (nginx drops every name with "_").
FORWARDING: Final = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"}
    | {"x-forwarded-port", "x-forwarded-prefix", "x-forwarded-scheme", "x-forwarded-server",
       "x-original-url", "x-rewrite-url", "true-client-ip", "x-client-ip", "x-original-host"}
    | {"cf-connecting-ip", "fastly-client-ip", "x-cluster-client-ip", "client-ip",
       "x-forwarded", "forwarded-for", "x-originating-ip", "x-remote-ip", "x-remote-addr",
       "x-forwarded-ssl", "front-end-https", "x-url-scheme"}
    | {"x-forwarded-client-cert", "wl-proxy-client-ip", "proxy-client-ip", "x-original-uri",
       "x-forwarded-uri", "x-envoy-original-path", "x-forwarded-protocol", "x-scheme", "x-host"}
)  # fmt: skip
VIA: Final = "1.1 authproxy"
# "Connection: keep-alive" (every nginx answer) and "close" name nothing beyond
# the hop-by-hop set, so they need no per-message set.
_PLAIN_CONNECTION: Final = frozenset({"keep-alive", "close"})
# Precomputed at import: the hot path only unions in what a request adds.
_DROP_TRUSTED: Final = HOP_BY_HOP | _REQUEST_OWNED
_DROP_UNTRUSTED: Final = _DROP_TRUSTED | FORWARDING
# Set by this hop whatever the app sent (X-Forwarded-For extended when trusted).
_SET_HERE: Final = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id", "via"}
)


def connection_named(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The lower-cased names listed in ``Connection`` headers (RFC 9110 §7.6.1)."""
    named: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            named.update(part.strip().lower() for part in value.split(",") if part.strip())
    return frozenset(named)


def transfer_codings(values: Iterable[str]) -> list[str]:
    """The transfer codings of ``Transfer-Encoding`` fields, lower-cased, in
    order, parameters dropped (RFC 9112 §6.1)."""
    return [
        part.split(";", 1)[0].strip().lower()
        for value in values
        for part in value.split(",")
        if part.strip()
    ]


def decrement_max_forwards(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """RFC 9110 §7.6.2: a forwarded OPTIONS (or TRACE) carries
    ``Max-Forwards`` one lower (a 0 is answered by the proxy itself)."""
    out = []
    for name, value in headers:
        if name.lower() == "max-forwards" and value.strip().isdigit():
            value = str(max(int(value) - 1, 0))
        out.append((name, value))
    return out


REQUEST_ID_HEADER: Final = "X-Request-Id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


_BIT_129: Final = 1 << 128


def request_id(inbound: str | None) -> str:
    """The app's ``X-Request-Id`` when it is a sane token (visible characters,
    at most 128), else a new random one: it goes upstream and into the access log."""
    if inbound is not None and _REQUEST_ID.fullmatch(inbound):
        return inbound
    # 128 bits from random's generator (seeded from os.urandom, re-seeded in
    # a forked child): an id is unique, not a secret, and os.urandom is a
    # system call per request (issue 16).
    # 32 hex digits: hex() of the number with a 129th bit set, less "0x1"
    # (compiled, format(n, "032x") is a generic call at 1,500 instructions).
    return hex(_getrandbits(128) | _BIT_129)[3:]


def upstream_request_headers(
    headers: Iterable[tuple[str, str]],
    *,
    upstream_host: str,
    authorization: str,
    request_id: str,
    client_ip: str | None,
    inbound_host: str | None,
    inbound_proto: str,
    trust_forwarded: bool,
    drop: frozenset[str] = frozenset(),
    authorization_header: str = "Authorization",
    received: str = "1.1",
) -> list[tuple[str, str]]:
    """The headers to send upstream, in the app's order, repeats kept.

    Drops hop-by-hop fields, the app's ``Authorization`` and ``Host``, and (unless
    trusted) its forwarding headers; then sets ``Host``, ``Authorization``,
    ``X-Forwarded-*`` and appends to ``Via``.
    """
    items = [(name, value, name.lower()) for name, value in headers]
    base = _DROP_TRUSTED if trust_forwarded else _DROP_UNTRUSTED
    if drop:
        base = base | drop
    if authorization_header != "Authorization":  # an app's copy of the token header goes too
        base = base | {authorization_header.lower()}
    for _, value, lower in items:
        if lower == "connection" and value.lower() not in _PLAIN_CONNECTION:
            # rare: only then is a per-request set built
            base = base | connection_named((n, v) for n, v, _ in items)
            break
    out: list[tuple[str, str]] = [("Host", upstream_host)]
    prior_xff: list[str] = []
    via: list[str] = []
    for name, value, lower in items:
        if lower in base:
            continue
        if (
            "_" in lower
            and (dashed := lower.replace("_", "-"))
            and (dashed in base or dashed in _SET_HERE)
        ):
            # X_Forwarded_For reads as X-Forwarded-For to CGI-style stacks;
            # so does X_Proxy_Key as an inbound key header (round 10, F2),
            # and X_Request_Id as the field this hop sets.
            continue
        if lower == "x-forwarded-for":
            prior_xff.append(value)
            continue
        if lower in ("x-forwarded-proto", "x-forwarded-host"):
            continue  # always describe the hop into this proxy
        if lower == "via":
            via.append(value)
            continue
        if lower == "x-request-id":
            continue  # replaced by the checked one below
        out.append((name, value))
    out.append((authorization_header, authorization))
    out.append((REQUEST_ID_HEADER, request_id))
    if client_ip:
        out.append(("X-Forwarded-For", ", ".join([*prior_xff, client_ip])))
    out.append(("X-Forwarded-Proto", inbound_proto))
    if inbound_host:
        out.append(("X-Forwarded-Host", inbound_host))
    # RFC 9110 §7.6.3: Via names the protocol the proxy received ("1.0" from an HTTP/1.0 app).
    out.append(("Via", ", ".join([*via, VIA if received == "1.1" else f"{received} authproxy"])))
    return out


def downstream_response_headers(
    headers: Iterable[tuple[str, str]], *, via: str | None = None
) -> list[tuple[str, str]]:
    """The upstream's response headers minus hop-by-hop ones, repeats and order
    kept; with ``via``, this hop appended to ``Via`` (RFC 9110 §7.6.3)."""
    items = [(name, value, name.lower()) for name, value in headers]
    drop = HOP_BY_HOP
    for _, value, lower in items:
        if lower == "connection" and value.lower() not in _PLAIN_CONNECTION:
            # rare: only then is a per-response set built
            drop = HOP_BY_HOP | connection_named((n, v) for n, v, _ in items)
            break
    out = [(name, value) for name, value, lower in items if lower not in drop]
    if via is not None:
        prior = [value for name, value in out if name.lower() == "via"]
        out = [(name, value) for name, value in out if name.lower() != "via"]
        out.append(("Via", ", ".join([*prior, via])))
    return out


def message_head(first_line: str, headers: Sequence[tuple[str, str]], extra: str = "") -> bytes:
    """An HTTP/1.1 head: ``first_line``, the headers, ``extra`` (ready-made
    lines) and the blank line. Values came from aiohttp's parser as
    surrogate-escaped bytes, so they are encoded back byte for byte. A CR or LF
    inside the first line or any header would split the message and raises
    ValueError: counting line ends checks every byte in two C-speed passes."""
    parts = [first_line, "\r\n"]
    for name, value in headers:  # one join of the pieces: no string a line (issue 16)
        parts += (name, ": ", value, "\r\n")
    text = "".join(parts)
    lines = len(headers) + 1
    if text.count("\n") != lines or text.count("\r") != lines:
        raise ValueError("a header or the start line contains CR or LF")
    return (text + extra + "\r\n").encode("utf-8", "surrogateescape")
