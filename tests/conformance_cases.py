"""The wire-level conformance table: plain data, one ``Case`` per behaviour.

Each case is the exact bytes apps send and the exact bytes the partner answers,
with either the exact requests the partner must receive and the exact answers
the apps must receive, or the statuses the proxy must answer itself without
contacting the partner. Written from RFC 9110/9112 and the docs, not from the
implementation. ``tests/test_conformance.py`` runs it through the proxy;
``bench/differential.py`` runs it through the proxy and nginx.

Conventions (see tests/wire.py for the comparison):

- The proxy listens with the routes of ``ROUTES``: ``/acme/`` -> partner
  ``/v2/``, ``/beta/`` -> ``/v3/`` (a second route to the same origin),
  ``/small/`` -> ``/s/`` with ``max_body: 16``, and host ``partner.example`` ->
  ``/h/`` for absolute-form targets. ``inbound.body_timeout`` is 1 s.
- Expected forwarded requests leave out the proxy's own fields
  (``wire.PROXY_FIELDS``: Host, Authorization, Via, X-Forwarded-*,
  X-Request-Id); the test checks those on their own. Everything else is
  compared as written: names with their spelling, order and repeats, values
  byte for byte, the body, its framing and its trailers.
- An expectation that is a tuple lists the answers RFC 9112 allows, any one
  of which passes (a proxy may re-frame a body, or drop trailers).
- ``send`` items are written one at a time, each once the answers owed so far
  have arrived; ``NEXT_APP`` starts another app on a new connection.
- Every partner answer carries a ``Date`` so that the proxy has none to add.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

Expect = bytes | tuple[bytes, ...]
Step = bytes | float

NEXT_APP: Final = b""
DATE: Final = b"Date: Tue, 01 Dec 2026 12:00:00 GMT\r\n"
LARGE: Final = 70_000  # past the 64 KiB a body is read whole below: the streamed path

ROUTES: Final = (
    # (name, prefix or host, upstream path, extra keys): the proxy.yaml routes and nginx locations
    ("acme", "/acme/", "/v2/", ""),
    ("beta", "/beta/", "/v3/", ""),
    ("small", "/small/", "/s/", "max_body: 16"),
    ("hosted", "host:partner.example", "/h/", ""),
)


@dataclass(frozen=True, slots=True)
class Case:
    """One behaviour. ``replies`` are the partner's answers, one per request it
    receives, in order (bytes, or steps: bytes written and seconds slept).
    ``forwarded``/``answers`` or ``status`` describe the outcome; a case
    with ``forwarded`` and ``status`` is forwarded and then answered by the
    proxy itself (a 502 for an answer it refuses to relay). ``after_continue`` is written once the proxy said 100 Continue.
    ``secret`` is a byte string the app sends that must appear in no answer
    and no log line. ``why`` cites the rule."""

    name: str
    send: tuple[bytes, ...]
    replies: tuple[bytes | tuple[Step, ...], ...] = ()
    forwarded: tuple[Expect, ...] = ()
    answers: tuple[Expect, ...] = ()
    status: tuple[int, ...] = ()
    after_continue: bytes = b""
    secret: bytes = b""
    why: str = ""
    spoils_upstream: bool = False  # the partner's answer leaves its connection unfit for reuse

    @property
    def local(self) -> bool:
        """The proxy answers this itself and the partner sees nothing."""
        return bool(self.status) and not self.forwarded


# ------------------------------------------------------------------ helpers


def request(line: bytes, *fields: bytes, body: bytes = b"") -> bytes:
    """An app's request: the start line, then each ``Name: value`` field."""
    return line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body


def response(line: bytes, *fields: bytes, body: bytes = b"", date: bool = True) -> bytes:
    """A partner's answer (with a Date unless told otherwise)."""
    head = line + b"\r\n" + (DATE if date else b"") + b"".join(f + b"\r\n" for f in fields)
    return head + b"\r\n" + body


def ok(body: bytes = b"ok", *fields: bytes) -> bytes:
    return response(b"HTTP/1.1 200 OK", *fields, b"Content-Length: %d" % len(body), body=body)


def chunked(
    data: bytes, size: int = 0, ext: bytes = b"", trailers: tuple[bytes, ...] = ()
) -> bytes:
    """``data`` chunked in pieces of ``size`` (one piece when 0), each size line
    carrying ``ext``, ended by the trailer fields."""
    size = size or max(len(data), 1)
    out = b"".join(
        b"%x%s\r\n%s\r\n" % (len(data[i : i + size]), ext, data[i : i + size])
        for i in range(0, len(data), size)
    )
    return out + b"0" + ext + b"\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"


def body_variants(
    line: bytes, fields: tuple[bytes, ...], content: bytes, trailers: tuple[bytes, ...] = ()
) -> tuple[bytes, ...]:
    """Every framing a proxy may forward a chunked request body in (RFC 9112
    §7.1: re-chunked, trailers forwarded or dropped, §7.1.3: or as a
    Content-Length once the body is whole): never a trailer as a header."""
    out = [
        request(
            line, *fields, b"Transfer-Encoding: chunked", body=chunked(content, 0, b"", trailers)
        ),
        request(line, *fields, b"Content-Length: %d" % len(content), body=content),
    ]
    if trailers:
        out.append(request(line, *fields, b"Transfer-Encoding: chunked", body=chunked(content)))
    return tuple(out)


def answer_variants(
    line: bytes, fields: tuple[bytes, ...], content: bytes, trailers: tuple[bytes, ...] = ()
) -> tuple[bytes, ...]:
    """What an HTTP/1.1 app may receive for a chunked answer: chunked, with or
    without its trailers (RFC 9110 §6.5.1 lets an intermediary drop them)."""
    head = (line, DATE.rstrip(b"\r\n"), *fields, b"Transfer-Encoding: chunked")
    out = [response(*head, body=chunked(content, 0, b"", trailers), date=False)]
    if trailers:
        out.append(response(*head, body=chunked(content), date=False))
    return tuple(out)


def sized(size: int, seed: bytes = b"0123456789abcdef") -> bytes:
    return (seed * (size // len(seed) + 1))[:size]


H: Final = b"Host: app.internal"
SMALL_BODY: Final = b'{"sku":"A-1","qty":2}'
LARGE_BODY: Final = sized(LARGE, b"large-body-bytes/")


CASES: list[Case] = []


def case(name: str, send: bytes | tuple[bytes, ...], **kwargs: object) -> None:
    if any(c.name == name for c in CASES):
        raise ValueError(f"duplicate case {name}")
    CASES.append(Case(name, send if isinstance(send, tuple) else (send,), **kwargs))  # type: ignore[arg-type]


def forwarded_get(
    name: str,
    app: bytes,
    partner: bytes,
    reply: bytes = b"",
    answer: Expect = b"",
    why: str = "",
) -> None:
    """A request forwarded as ``partner`` and answered with ``reply`` relayed
    unchanged as ``answer`` (``reply`` itself when not given)."""
    reply = reply or ok()
    case(name, app, replies=(reply,), forwarded=(partner,), answers=(answer or reply,), why=why)


# ------------------------------------------------------------------ methods

for method in (b"GET", b"DELETE", b"OPTIONS"):
    forwarded_get(
        f"method_{method.decode().lower()}",
        request(method + b" /acme/orders/7 HTTP/1.1", H, b"Accept: application/json"),
        request(method + b" /v2/orders/7 HTTP/1.1", b"Accept: application/json"),
        why="RFC 9110 §9.3",
    )

for method in (b"POST", b"PUT", b"PATCH"):
    for size, content in (("small", SMALL_BODY), ("large", LARGE_BODY)):
        fields = (b"Content-Type: application/json", b"Content-Length: %d" % len(content))
        forwarded_get(
            f"method_{method.decode().lower()}_{size}",
            request(method + b" /acme/orders HTTP/1.1", H, *fields, body=content),
            request(method + b" /v2/orders HTTP/1.1", *fields, body=content),
            reply=response(
                b"HTTP/1.1 201 Created", b"Location: /v2/orders/8", b"Content-Length: 0"
            ),
            why="RFC 9110 §9.3; small bodies are read whole, large ones stream",
        )

forwarded_get(
    "method_head",
    request(b"HEAD /acme/orders/7 HTTP/1.1", H),
    request(b"HEAD /v2/orders/7 HTTP/1.1"),
    reply=response(b"HTTP/1.1 200 OK", b"Content-Type: text/plain", b"Content-Length: 1234"),
    why="RFC 9110 §9.3.2: the answer to HEAD has the GET's Content-Length and no body",
)

for method in (b"FOOBAR", b"BAN", b"PURGE", b"PROPFIND", b"MKCALENDAR", b"get"):
    forwarded_get(
        f"method_extension_{method.decode()}",
        request(method + b" /acme/x HTTP/1.1", H),
        request(method + b" /v2/x HTTP/1.1"),
        why="RFC 9110 §9.1: a method is any token (case-sensitive); forward what you do not know",
    )

forwarded_get(
    "method_extension_with_body",
    request(
        b"REPORT /acme/cal HTTP/1.1",
        H,
        b"Content-Type: application/xml",
        b"Content-Length: 9",
        body=b"<report/>",
    ),
    request(
        b"REPORT /v2/cal HTTP/1.1",
        b"Content-Type: application/xml",
        b"Content-Length: 9",
        body=b"<report/>",
    ),
    why="RFC 9110 §9.1; Content-Length frames the body whatever the method",
)

case(
    "method_trace_refused",
    request(b"TRACE /acme/t HTTP/1.1", H, b"Cookie: session=abc"),
    status=(405,),
    why="RFC 9110 §9.3.8: TRACE would echo the proxy's Authorization back to the app",
)
case(
    "method_trace_max_forwards_0",
    request(b"TRACE /acme/t HTTP/1.1", H, b"Max-Forwards: 0"),
    status=(405,),
    why="RFC 9110 §7.6.2, §9.3.8: answered by the proxy, never forwarded",
)
case(
    "method_options_max_forwards_0",
    request(b"OPTIONS /acme/x HTTP/1.1", H, b"Max-Forwards: 0"),
    status=(200, 204),
    why="RFC 9110 §7.6.2: Max-Forwards 0 means the proxy is the final recipient",
)
forwarded_get(
    "method_options_max_forwards_decremented",
    request(b"OPTIONS /acme/x HTTP/1.1", H, b"Max-Forwards: 5"),
    request(b"OPTIONS /v2/x HTTP/1.1", b"Max-Forwards: 4"),
    why="RFC 9110 §7.6.2: a forwarded Max-Forwards is decremented",
)
case(
    "method_connect_unrouted",
    request(b"CONNECT elsewhere.example:443 HTTP/1.1", b"Host: elsewhere.example:443"),
    status=(403,),
    why="docs/egress.md: a CONNECT no route and no egress.tunnel entry covers is 403",
)
case(
    "method_connect",
    request(b"CONNECT partner.example:443 HTTP/1.1", b"Host: partner.example:443"),
    status=(405,),
    why="docs/egress.md: a CONNECT to a routed host without egress.intercept is 405, with advice",
)

# ------------------------------------------------------------------ targets

forwarded_get(
    "target_query",
    request(b"GET /acme/orders?status=open&page=2 HTTP/1.1", H),
    request(b"GET /v2/orders?status=open&page=2 HTTP/1.1"),
    why="docs/configuration.md: the rest of the path and the query go on byte for byte",
)
forwarded_get(
    "target_percent_encoding_raw",
    request(b"GET /acme/a%2Fb/%7euser/caf%C3%A9?q=a%20b+c&x=%2f%3D HTTP/1.1", H),
    request(b"GET /v2/a%2Fb/%7euser/caf%C3%A9?q=a%20b+c&x=%2f%3D HTTP/1.1"),
    why="no re-encoding, no case change of escapes",
)
forwarded_get(
    "target_double_slash_kept",
    request(b"GET /acme//x//y HTTP/1.1", H),
    request(b"GET /v2//x//y HTTP/1.1"),
    why="docs/configuration.md: no slash merging",
)
forwarded_get(
    "target_empty_query_dropped",
    request(b"GET /acme/x? HTTP/1.1", H),
    request(b"GET /v2/x HTTP/1.1"),
    why="docs/security.md: the one normalisation, a bare ? is dropped",
)
forwarded_get(
    "target_absolute_form",
    request(b"GET http://partner.example/orders?x=1 HTTP/1.1", b"Host: partner.example"),
    request(b"GET /h/orders?x=1 HTTP/1.1"),
    why="RFC 9112 §3.2.2; sent by apps using the proxy as HTTP_PROXY",
)
case(
    "target_absolute_form_unrouted_host",
    request(b"GET http://evil.example/acme/x HTTP/1.1", b"Host: evil.example"),
    status=(404,),
    why="docs: absolute-form targets only match routes that name the host; not an open proxy",
)
case(
    "target_no_route",
    request(b"GET /nowhere/x HTTP/1.1", H),
    status=(404,),
    why="docs: a request no route matches gets 404",
)

# ---------------------------------------------------- header spelling, order

forwarded_get(
    "headers_spelling_and_order_kept",
    request(
        b"GET /acme/x HTTP/1.1",
        H,
        b"accept-language: de-CH",
        b"X-lower-Mixed: 1",
        b"ETag-Like: x",
        b"ACCEPT: text/plain",
        b"x-empty:",
    ),
    request(
        b"GET /v2/x HTTP/1.1",
        b"accept-language: de-CH",
        b"X-lower-Mixed: 1",
        b"ETag-Like: x",
        b"ACCEPT: text/plain",
        b"x-empty: ",
    ),
    why="issue 11 (11.); docs/design.md: headers arrive intact",
)
forwarded_get(
    "headers_response_spelling_kept",
    request(b"GET /acme/x HTTP/1.1", H),
    request(b"GET /v2/x HTTP/1.1"),
    reply=response(
        b"HTTP/1.1 200 OK",
        b'ETag: "v1"',
        b"content-type: text/plain",
        b"X-RateLimit-Remaining: 99",
        b"WWW-Authenticate: Basic realm=x",
        b"Content-Length: 2",
        body=b"ok",
    ),
    why="issue 11 (11.): ETag must not become Etag",
)
forwarded_get(
    "headers_repeated_request_fields",
    request(
        b"GET /acme/x HTTP/1.1",
        H,
        b"Accept: text/html",
        b"X-Trace: a",
        b"Accept: application/json",
        b"X-Trace: b",
        b"Cache-Control: no-cache",
        b"Cache-Control: max-age=0",
    ),
    request(
        b"GET /v2/x HTTP/1.1",
        b"Accept: text/html",
        b"X-Trace: a",
        b"Accept: application/json",
        b"X-Trace: b",
        b"Cache-Control: no-cache",
        b"Cache-Control: max-age=0",
    ),
    why="RFC 9110 §5.3: repeated fields keep their order; a proxy MUST NOT reorder values",
)
forwarded_get(
    "headers_repeated_response_fields",
    request(b"GET /acme/x HTTP/1.1", H),
    request(b"GET /v2/x HTTP/1.1"),
    reply=response(
        b"HTTP/1.1 200 OK",
        b"Set-Cookie: a=1; Path=/",
        b"Vary: Accept",
        b"Set-Cookie: b=2; Path=/",
        b"Vary: Accept-Language",
        b"Content-Length: 2",
        body=b"ok",
    ),
    why="RFC 9110 §5.3: Set-Cookie is never combined; order kept",
)
forwarded_get(
    "headers_value_bytes_kept",
    request(b"GET /acme/x HTTP/1.1", H, b"X-Spaces: a  b\t c", b"X-Quote: \"q\" ; x=',;'"),
    request(b"GET /v2/x HTTP/1.1", b"X-Spaces: a  b\t c", b"X-Quote: \"q\" ; x=',;'"),
    why="RFC 9110 §5.5: only leading and trailing whitespace is not part of the value",
)
forwarded_get(
    "headers_obs_text_request",
    request(
        b"GET /acme/x HTTP/1.1", H, b"X-Latin: caf\xe9", b"X-Utf8: caf\xc3\xa9", b"X-High: \x80\xff"
    ),
    request(
        b"GET /v2/x HTTP/1.1", b"X-Latin: caf\xe9", b"X-Utf8: caf\xc3\xa9", b"X-High: \x80\xff"
    ),
    why="RFC 9110 §5.5: obs-text is part of field-value; pass byte for byte",
)
forwarded_get(
    "headers_obs_text_response",
    request(b"GET /acme/x HTTP/1.1", H),
    request(b"GET /v2/x HTTP/1.1"),
    reply=response(
        b"HTTP/1.1 200 OK",
        b"X-Latin: caf\xe9",
        b'Content-Disposition: attachment; filename="r\xe9sum\xe9.pdf"',
        b"Content-Length: 2",
        body=b"ok",
    ),
    why="RFC 9110 §5.5",
)
forwarded_get(
    "headers_hop_by_hop_dropped",
    request(
        b"GET /acme/x HTTP/1.1",
        H,
        b"Connection: keep-alive, X-Hop",
        b"X-Hop: drop me",
        b"Keep-Alive: timeout=5",
        b"Proxy-Connection: keep-alive",
        b"TE: trailers",
        b"X-End-To-End: keep me",
        b"Proxy-Authorization: Basic YWxhZGRpbjpvcGVuc2VzYW1l",
    ),
    request(b"GET /v2/x HTTP/1.1", b"X-End-To-End: keep me"),
    why="RFC 9110 §7.6.1; docs/security.md",
)
forwarded_get(
    "headers_response_hop_by_hop_dropped",
    request(b"GET /acme/x HTTP/1.1", H),
    request(b"GET /v2/x HTTP/1.1"),
    reply=response(
        b"HTTP/1.1 200 OK",
        b"Connection: X-Partner-Hop",
        b"X-Partner-Hop: 1",
        b"Keep-Alive: timeout=5, max=100",
        b"X-Kept: 1",
        b"Content-Length: 2",
        body=b"ok",
    ),
    answer=response(b"HTTP/1.1 200 OK", b"X-Kept: 1", b"Content-Length: 2", body=b"ok"),
    why="RFC 9110 §7.6.1, both directions",
)
forwarded_get(
    "headers_app_authorization_replaced",
    request(b"GET /acme/x HTTP/1.1", H, b"Authorization: Bearer app-own-credential", b"X-After: 1"),
    request(b"GET /v2/x HTTP/1.1", b"X-After: 1"),
    why="docs/design.md: the app's Authorization is dropped (the test checks the one left is the proxy's)",
)
forwarded_get(
    "status_reason_and_unknown_code_kept",
    request(b"GET /acme/x HTTP/1.1", H),
    request(b"GET /v2/x HTTP/1.1"),
    reply=response(b"HTTP/1.1 299 Partner Specific", b"Content-Length: 2", body=b"ok"),
    why="RFC 9110 §15: an unknown status is relayed; docs/design.md: status and reason intact",
)
forwarded_get(
    "status_reason_obs_text_kept",
    request(b"GET /acme/x HTTP/1.1", H),
    request(b"GET /v2/x HTTP/1.1"),
    reply=response(b"HTTP/1.1 409 D\xe9j\xe0 pris", b"Content-Length: 2", body=b"no"),
    why="RFC 9112 §4: reason-phrase may hold obs-text",
)
forwarded_get(
    "status_401_without_expiry_passes",
    request(b"GET /acme/x HTTP/1.1", H),
    request(b"GET /v2/x HTTP/1.1"),
    reply=response(
        b"HTTP/1.1 401 Unauthorized",
        b'WWW-Authenticate: Bearer error="invalid_token", error_description="revoked"',
        b"Content-Length: 7",
        body=b"revoked",
    ),
    why="README: every other 401 goes back to the app untouched (exactly one partner request)",
)

# ----------------------------------------------------------------- framing

for size, content in (("small", b"hello, chunked world"), ("large", LARGE_BODY)):
    case(
        f"request_chunked_extensions_trailers_{size}",
        request(
            b"POST /acme/upload HTTP/1.1",
            H,
            b"Content-Type: application/octet-stream",
            b"Transfer-Encoding: chunked",
            body=chunked(
                content, 4096 if size == "large" else 5, b";sig=abc", (b"X-Checksum: 77",)
            ),
        ),
        replies=(ok(),),
        forwarded=(
            body_variants(
                b"POST /v2/upload HTTP/1.1",
                (b"Content-Type: application/octet-stream",),
                content,
                (b"X-Checksum: 77",),
            ),
        ),
        answers=(ok(),),
        why="RFC 9112 §7.1: chunk extensions are ignored, trailers forwarded or dropped, never headers",
    )
    case(
        f"response_chunked_extensions_trailers_{size}",
        request(b"GET /acme/stream HTTP/1.1", H),
        replies=(
            response(
                b"HTTP/1.1 200 OK",
                b"Content-Type: text/plain",
                b"Transfer-Encoding: chunked",
                b"Trailer: X-Status",
                body=chunked(
                    content, 4096 if size == "large" else 5, b";e=1", (b"X-Status: done",)
                ),
            ),
        ),
        forwarded=(request(b"GET /v2/stream HTTP/1.1"),),
        answers=(
            answer_variants(
                b"HTTP/1.1 200 OK",
                (b"Content-Type: text/plain", b"Trailer: X-Status"),
                content,
                (b"X-Status: done",),
            )
            # trailers dropped, and with them the Trailer field that announced them
            + answer_variants(b"HTTP/1.1 200 OK", (b"Content-Type: text/plain",), content),
        ),
        why="RFC 9112 §7.1; RFC 9110 §6.5",
    )
    forwarded_get(
        f"response_content_length_{size}",
        request(b"GET /acme/file HTTP/1.1", H),
        request(b"GET /v2/file HTTP/1.1"),
        reply=ok(content, b"Content-Type: application/octet-stream"),
        why="Content-Length kept, body byte for byte",
    )
    case(
        f"response_close_delimited_{size}",
        request(b"GET /acme/legacy HTTP/1.1", H),
        replies=(
            response(
                b"HTTP/1.1 200 OK", b"Content-Type: text/plain", b"Connection: close", body=content
            ),
        ),
        forwarded=(request(b"GET /v2/legacy HTTP/1.1"),),
        answers=(
            (
                response(
                    b"HTTP/1.1 200 OK",
                    b"Content-Type: text/plain",
                    b"Transfer-Encoding: chunked",
                    body=chunked(content),
                ),
                response(
                    b"HTTP/1.1 200 OK",
                    b"Content-Type: text/plain",
                    b"Content-Length: %d" % len(content),
                    body=content,
                ),
                response(b"HTTP/1.1 200 OK", b"Content-Type: text/plain", body=content),
                response(
                    b"HTTP/1.1 200 OK",
                    b"Content-Type: text/plain",
                    b"Connection: close",
                    body=content,
                ),
            ),
        ),
        why="RFC 9112 §6.3 (7.): the body ends with the connection; re-framed or close-delimited to the app",
    )

case(
    "request_content_length_zero",
    request(b"POST /acme/ping HTTP/1.1", H, b"Content-Length: 0"),
    replies=(ok(),),
    forwarded=(request(b"POST /v2/ping HTTP/1.1", b"Content-Length: 0"),),
    answers=(ok(),),
    why="an empty body is still framed",
)
case(
    "request_chunked_empty",
    request(b"POST /acme/ping HTTP/1.1", H, b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
    replies=(ok(),),
    forwarded=(body_variants(b"POST /v2/ping HTTP/1.1", (), b""),),
    answers=(ok(),),
    why="RFC 9112 §7.1",
)
forwarded_get(
    "response_204",
    request(b"DELETE /acme/orders/7 HTTP/1.1", H),
    request(b"DELETE /v2/orders/7 HTTP/1.1"),
    reply=response(b"HTTP/1.1 204 No Content", b"X-Deleted: 7"),
    why="RFC 9110 §15.3.5: no body",
)
forwarded_get(
    "response_304",
    request(b"GET /acme/orders/7 HTTP/1.1", H, b'If-None-Match: "v1"'),
    request(b"GET /v2/orders/7 HTTP/1.1", b'If-None-Match: "v1"'),
    reply=response(b"HTTP/1.1 304 Not Modified", b'ETag: "v1"', b"Cache-Control: max-age=60"),
    why="RFC 9110 §15.4.5: no body, validators kept",
)
forwarded_get(
    "response_head_chunked",
    request(b"HEAD /acme/stream HTTP/1.1", H),
    request(b"HEAD /v2/stream HTTP/1.1"),
    reply=response(b"HTTP/1.1 200 OK", b"Content-Type: text/plain", b"Transfer-Encoding: chunked"),
    answer=(
        response(b"HTTP/1.1 200 OK", b"Content-Type: text/plain", b"Transfer-Encoding: chunked"),
        response(b"HTTP/1.1 200 OK", b"Content-Type: text/plain"),
    ),
    why="RFC 9112 §6.3 (1.): the answer to HEAD has no body whatever its fields say",
)
case(
    "head_then_get_same_connection",
    (request(b"HEAD /acme/a HTTP/1.1", H), request(b"GET /acme/b HTTP/1.1", H)),
    replies=(
        response(b"HTTP/1.1 200 OK", b"Content-Length: 5"),
        ok(b"hello"),
    ),
    forwarded=(request(b"HEAD /v2/a HTTP/1.1"), request(b"GET /v2/b HTTP/1.1")),
    answers=(response(b"HTTP/1.1 200 OK", b"Content-Length: 5"), ok(b"hello")),
    why="a HEAD answer's Content-Length frames nothing; the connection goes on",
)
case(
    "http10_app_chunked_answer",
    request(b"GET /acme/stream HTTP/1.0", H),
    replies=(
        response(
            b"HTTP/1.1 200 OK",
            b"Content-Type: text/plain",
            b"Transfer-Encoding: chunked",
            body=chunked(b"hello", 2),
        ),
    ),
    forwarded=(request(b"GET /v2/stream HTTP/1.1"),),
    answers=(
        (
            response(b"HTTP/1.1 200 OK", b"Content-Type: text/plain", body=b"hello"),
            response(
                b"HTTP/1.1 200 OK", b"Content-Type: text/plain", b"Connection: close", body=b"hello"
            ),
            response(
                b"HTTP/1.1 200 OK", b"Content-Type: text/plain", b"Content-Length: 5", body=b"hello"
            ),
            response(
                b"HTTP/1.1 200 OK",
                b"Content-Type: text/plain",
                b"Content-Length: 5",
                b"Connection: close",
                body=b"hello",
            ),
        ),
    ),
    why="RFC 9112 §7.1: an HTTP/1.0 recipient cannot take chunked",
)

# --------------------------------------------------------------------- 1xx

EARLY_HINTS: Final = response(
    b"HTTP/1.1 103 Early Hints", b"Link: </style.css>; rel=preload; as=style", date=False
)
case(
    "interim_103_early_hints",
    request(b"GET /acme/page HTTP/1.1", H),
    replies=((EARLY_HINTS, 0.05, ok(b"page")),),
    forwarded=(request(b"GET /v2/page HTTP/1.1"),),
    answers=(EARLY_HINTS, ok(b"page")),
    why="RFC 9110 §15.2: a proxy MUST forward 1xx responses",
)
case(
    "interim_102_processing",
    request(b"POST /acme/batch HTTP/1.1", H, b"Content-Length: 2", body=b"{}"),
    replies=((response(b"HTTP/1.1 102 Processing", date=False), 0.05, ok(b"done")),),
    forwarded=(request(b"POST /v2/batch HTTP/1.1", b"Content-Length: 2", body=b"{}"),),
    answers=(response(b"HTTP/1.1 102 Processing", date=False), ok(b"done")),
    why="RFC 9110 §15.2",
)
case(
    "interim_two_103_in_a_row",
    request(b"GET /acme/page HTTP/1.1", H),
    replies=(
        (
            EARLY_HINTS,
            response(b"HTTP/1.1 103 Early Hints", b"Link: </a.js>; rel=preload", date=False),
            ok(b"page"),
        ),
    ),
    forwarded=(request(b"GET /v2/page HTTP/1.1"),),
    answers=(
        EARLY_HINTS,
        response(b"HTTP/1.1 103 Early Hints", b"Link: </a.js>; rel=preload", date=False),
        ok(b"page"),
    ),
    why="RFC 9110 §15.2: any number of interim answers",
)
case(
    "interim_103_not_sent_to_http10_app",
    request(b"GET /acme/page HTTP/1.0", H),
    replies=((EARLY_HINTS, ok(b"page")),),
    forwarded=(request(b"GET /v2/page HTTP/1.1"),),
    answers=(ok(b"page"),),
    why="RFC 9110 §15.2: a proxy MUST NOT forward a 1xx to an HTTP/1.0 client",
)
case(
    "expect_100_continue_answered_by_proxy",
    request(b"PUT /acme/doc HTTP/1.1", H, b"Content-Length: 5", b"Expect: 100-continue"),
    after_continue=b"hello",
    replies=(ok(),),
    forwarded=(request(b"PUT /v2/doc HTTP/1.1", b"Content-Length: 5", body=b"hello"),),
    answers=(b"HTTP/1.1 100 Continue\r\n\r\n", ok()),
    why="docs/design.md: the proxy answers Expect itself; the partner sees no Expect",
)

# ------------------------------------------- pipelining and keep-alive reuse

for count in (3, 17, 40):
    gets = tuple(request(b"GET /acme/p/%d HTTP/1.1" % i, H) for i in range(count))
    case(
        f"pipelined_{count}_gets",
        b"".join(gets),
        replies=tuple(ok(b"answer %d" % i) for i in range(count)),
        forwarded=tuple(request(b"GET /v2/p/%d HTTP/1.1" % i) for i in range(count)),
        answers=tuple(ok(b"answer %d" % i) for i in range(count)),
        why="RFC 9112 §9.3.2: answers in order; issue 11 (12.): past 16 in one write",
    )
case(
    "pipelined_post_then_get",
    request(b"POST /acme/a HTTP/1.1", H, b"Content-Length: 3", body=b"abc")
    + request(b"GET /acme/b HTTP/1.1", H),
    replies=(ok(b"one"), ok(b"two")),
    forwarded=(
        request(b"POST /v2/a HTTP/1.1", b"Content-Length: 3", body=b"abc"),
        request(b"GET /v2/b HTTP/1.1"),
    ),
    answers=(ok(b"one"), ok(b"two")),
    why="RFC 9112 §9.3.2",
)
case(
    "keep_alive_across_routes",
    (
        request(b"GET /acme/a HTTP/1.1", H, b"X-First: 1"),
        request(b"GET /beta/b HTTP/1.1", H),
        request(b"GET /acme/c HTTP/1.1", H),
    ),
    replies=(ok(b"a", b"X-Answer: 1"), ok(b"b"), ok(b"c")),
    forwarded=(
        request(b"GET /v2/a HTTP/1.1", b"X-First: 1"),
        request(b"GET /v3/b HTTP/1.1"),
        request(b"GET /v2/c HTTP/1.1"),
    ),
    answers=(ok(b"a", b"X-Answer: 1"), ok(b"b"), ok(b"c")),
    why="style guide: per-message state is reset per message",
)
case(
    "http10_keep_alive",
    (
        request(b"GET /acme/a HTTP/1.0", H, b"Connection: keep-alive"),
        request(b"GET /acme/b HTTP/1.0", H, b"Connection: keep-alive"),
    ),
    replies=(ok(b"a"), ok(b"b")),
    forwarded=(request(b"GET /v2/a HTTP/1.1"), request(b"GET /v2/b HTTP/1.1")),
    answers=(
        (ok(b"a"), ok(b"a", b"Connection: keep-alive")),
        (ok(b"b"), ok(b"b", b"Connection: keep-alive")),
    ),
    why="RFC 9112 §9.3: an HTTP/1.0 app asks for keep-alive explicitly",
)

POST_WITH_TRAILERS: Final = request(
    b"POST /acme/u HTTP/1.1",
    H,
    b"Transfer-Encoding: chunked",
    body=chunked(b"data", 0, b"", (b"X-Injected: 1", b"Authorization: Bearer forged")),
)
case(
    "isolation_request_trailer_not_a_header_of_next_pipelined",
    (POST_WITH_TRAILERS + request(b"GET /acme/n HTTP/1.1", H),),
    replies=(ok(b"one"),),
    # The GET came in the read that ended the chunked POST: the parser has
    # seen it after the trailer, so it is not served on this connection; the
    # POST's answer says Connection: close and the app resends the GET
    # (RFC 9112 §9.3.2; docs/design.md, "Trailers are dropped").
    forwarded=(body_variants(b"POST /v2/u HTTP/1.1", (), b"data", (b"X-Injected: 1",)),),
    answers=(ok(b"one"),),
    why="issue 11 (2.); RFC 9112 §7.1.2: trailers never become header fields",
)
for mode, send in (("sequential", (POST_WITH_TRAILERS, request(b"GET /acme/n HTTP/1.1", H))),):
    case(
        f"isolation_request_trailer_not_a_header_of_next_{mode}",
        send,
        replies=(ok(b"one"), ok(b"two")),
        # Forwarded as a trailer, or dropped; an Authorization trailer is never
        # passed on (RFC 9110 §6.5.1: authentication cannot live in trailers).
        forwarded=(
            body_variants(b"POST /v2/u HTTP/1.1", (), b"data", (b"X-Injected: 1",)),
            request(b"GET /v2/n HTTP/1.1"),
        ),
        answers=(ok(b"one"), ok(b"two")),
        why="issue 11 (2.); RFC 9112 §7.1.2: trailers never become header fields",
    )

case(
    "isolation_response_trailer_not_a_header_for_another_app",
    (request(b"GET /acme/a HTTP/1.1", H), NEXT_APP, request(b"GET /acme/b HTTP/1.1", H)),
    replies=(
        response(
            b"HTTP/1.1 200 OK",
            b"Transfer-Encoding: chunked",
            body=chunked(b"a", 0, b"", (b"X-Status: done",)),
        ),
        ok(b"b"),
    ),
    forwarded=(request(b"GET /v2/a HTTP/1.1"), request(b"GET /v2/b HTTP/1.1")),
    answers=(answer_variants(b"HTTP/1.1 200 OK", (), b"a", (b"X-Status: done",)), ok(b"b")),
    why="issue 11 (3.): a pooled connection's parser keeps no trailer of the last answer",
)
case(
    "isolation_request_headers_per_app",
    (
        request(b"GET /acme/a HTTP/1.1", H, b"X-App: one", b"Cookie: a=1"),
        NEXT_APP,
        request(b"GET /acme/b HTTP/1.1", H),
    ),
    replies=(ok(b"a", b"Set-Cookie: s=1"), ok(b"b")),
    forwarded=(
        request(b"GET /v2/a HTTP/1.1", b"X-App: one", b"Cookie: a=1"),
        request(b"GET /v2/b HTTP/1.1"),
    ),
    answers=(ok(b"a", b"Set-Cookie: s=1"), ok(b"b")),
    why="docs/design.md: no cookie jar; nothing of one app reaches another",
)

# ---------------------------------------------------------- limits, errors

case(
    "limit_413_content_length_over_max_body",
    request(b"POST /small/x HTTP/1.1", H, b"Content-Length: 17", body=b"x" * 17),
    status=(413,),
    why="docs/configuration.md: max_body, checked on Content-Length before anything is sent",
)
case(
    "limit_413_chunked_over_max_body",
    request(
        b"POST /small/x HTTP/1.1", H, b"Transfer-Encoding: chunked", body=chunked(b"x" * 40, 8)
    ),
    status=(413,),
    why="docs/configuration.md: max_body, checked while streaming",
)
forwarded_get(
    "limit_max_body_exactly",
    request(b"POST /small/x HTTP/1.1", H, b"Content-Length: 16", body=b"x" * 16),
    request(b"POST /s/x HTTP/1.1", b"Content-Length: 16", body=b"x" * 16),
    why="max_body is the largest body allowed",
)
case(
    "limit_414_request_line",
    request(b"GET /acme/" + b"a" * 9000 + b" HTTP/1.1", H),
    status=(414,),
    why="RFC 9112 §3: a target longer than the server parses is 414",
)
case(
    "limit_431_long_header",
    request(b"GET /acme/x HTTP/1.1", H, b"X-Long: " + b"long-value-" * 900),
    status=(431,),
    secret=b"long-value-long-value-",
    why="RFC 6585 §5",
)
case(
    "limit_431_long_authorization_never_echoed",
    request(b"GET /acme/x HTTP/1.1", H, b"Authorization: Bearer app-secret-" + b"s3cr3t" * 1500),
    status=(431,),
    secret=b"app-secret-",
    why="issue 11 (4.): name and length of the field only; docs/security.md",
)
case(
    "limit_431_too_many_headers",
    request(b"GET /acme/x HTTP/1.1", H, *(b"X-H%d: v" % i for i in range(120))),
    status=(431,),
    why="RFC 6585 §5; inbound.max_headers is 100",
)
case(
    "limit_408_body_stalls",
    request(b"POST /acme/x HTTP/1.1", H, b"Content-Length: 10", body=b"abc"),
    status=(408,),
    why="docs/configuration.md: inbound.body_timeout, 408 past it",
)
for name, coding in (
    ("gzip_chunked", b"gzip, chunked"),
    ("unknown_chunked", b"x-custom, chunked"),
    ("deflate_chunked", b"deflate, chunked"),
):
    case(
        f"limit_501_transfer_coding_{name}",
        request(
            b"POST /acme/x HTTP/1.1",
            H,
            b"Transfer-Encoding: " + coding,
            body=chunked(b"\x1f\x8b data"),
        ),
        status=(501,),
        why="RFC 9112 §6.1: a transfer coding the proxy does not implement is 501 (issue 11, 8.)",
    )
case(
    "limit_unknown_transfer_coding_alone",
    request(b"POST /acme/x HTTP/1.1", H, b"Transfer-Encoding: x-custom", body=b"data"),
    status=(400, 501),
    why="RFC 9112 §6.1 says 501, §6.3 (4.) says 400 when chunked is not final: either, never forwarded",
)
for version in (b"2.0", b"3.0"):
    case(
        f"limit_505_http_{version.decode().replace('.', '_')}",
        request(b"GET /acme/x HTTP/" + version, H),
        status=(505,),
        why="RFC 9110 §15.6.6: a major version the proxy does not speak in HTTP/1.1 framing",
    )
case(
    "malformed_400_space_in_field_name",
    request(b"GET /acme/x HTTP/1.1", H, b"Bad Name: x"),
    status=(400,),
    why="RFC 9112 §5",
)
case(
    "malformed_400_no_host",
    request(b"GET /acme/x HTTP/1.1", b"Accept: */*"),
    status=(400,),
    why="RFC 9112 §3.2: exactly one Host in HTTP/1.1",
)
case(
    "malformed_400_bad_chunk_size",
    request(
        b"POST /acme/x HTTP/1.1", H, b"Transfer-Encoding: chunked", body=b"zz\r\nabc\r\n0\r\n\r\n"
    ),
    status=(400,),
    why="RFC 9112 §7.1",
)
case(
    "malformed_400_content_length_not_a_number",
    request(b"POST /acme/x HTTP/1.1", H, b"Content-Length: 3x", body=b"abc"),
    status=(400,),
    why="RFC 9110 §8.6",
)
case(
    "malformed_400_method_not_a_token",
    request(b"G@T /acme/x HTTP/1.1", H),
    status=(400,),
    why="RFC 9110 §9.1: not a token",
)

# ------------------------------------- issue 11, second outside round

case(
    "response_204_with_content_length",
    (request(b"GET /acme/a HTTP/1.1", H), request(b"GET /acme/b HTTP/1.1", H)),
    replies=(
        response(b"HTTP/1.1 204 No Content", b"Content-Length: 5", body=b"hello"),
        ok(b"two"),
    ),
    forwarded=(request(b"GET /v2/a HTTP/1.1"), request(b"GET /v2/b HTTP/1.1")),
    answers=(response(b"HTTP/1.1 204 No Content"), ok(b"two")),
    why="RFC 9110 §8.6, §15.3.5: no Content-Length in a 204, and its stray bytes never open "
    "the next answer (the upstream connection is not reused)",
)
case(
    "response_204_with_content_length_late_bytes",
    (request(b"GET /acme/a HTTP/1.1", H), request(b"GET /acme/b HTTP/1.1", H)),
    replies=(
        (response(b"HTTP/1.1 204 No Content", b"Content-Length: 5"), 0.05, b"hello"),
        ok(b"two"),
    ),
    forwarded=(request(b"GET /v2/a HTTP/1.1"), request(b"GET /v2/b HTTP/1.1")),
    answers=(response(b"HTTP/1.1 204 No Content"), ok(b"two")),
    why="RFC 9110 §15.3.5: bytes after a 204 that come later never open the next answer",
)
case(
    "interim_103_with_content_length_and_hop_by_hop",
    request(b"GET /acme/page HTTP/1.1", H),
    replies=(
        (
            response(
                b"HTTP/1.1 103 Early Hints",
                b"Link: </s.css>; rel=preload",
                b"Content-Length: 0",
                b"Connection: X-Hop",
                b"X-Hop: 1",
                b"Keep-Alive: timeout=5",
                date=False,
            ),
            0.05,
            ok(b"page"),
        ),
    ),
    forwarded=(request(b"GET /v2/page HTTP/1.1"),),
    answers=(
        response(b"HTTP/1.1 103 Early Hints", b"Link: </s.css>; rel=preload", date=False),
        ok(b"page"),
    ),
    why="RFC 9110 §7.6.1, §8.6: a forwarded 1xx loses its hop-by-hop fields and any Content-Length",
)
for version in (b"1.1", b"1.0"):
    case(
        f"response_101_without_upgrade_http_{version.decode().replace('.', '_')}",
        request(b"GET /acme/ws HTTP/" + version, H),
        replies=(
            response(
                b"HTTP/1.1 101 Switching Protocols",
                b"Upgrade: websocket",
                b"Connection: Upgrade",
                date=False,
            ),
        ),
        forwarded=(request(b"GET /v2/ws HTTP/1.1"),),
        status=(502,),
        why="the proxy asks for no upgrade (Upgrade is hop-by-hop): a 101 is no answer to relay",
    )
case(
    "response_status_600",
    request(b"GET /acme/x HTTP/1.1", H),
    replies=(response(b"HTTP/1.1 600 Odd", b"Content-Length: 2", body=b"ok"),),
    forwarded=(request(b"GET /v2/x HTTP/1.1"),),
    status=(502,),
    why="RFC 9110 §15: status codes are 100-599",
)
case(
    "response_empty_reason_phrase_kept",
    request(b"GET /acme/x HTTP/1.1", H),
    replies=(response(b"HTTP/1.1 200 ", b"Content-Length: 2", body=b"ok"),),
    forwarded=(request(b"GET /v2/x HTTP/1.1"),),
    answers=(response(b"HTTP/1.1 200 ", b"Content-Length: 2", body=b"ok"),),
    why="RFC 9112 §4: the reason phrase is optional and carries no meaning; it is relayed as is",
)
forwarded_get(
    "version_http_1_2_served_as_1_1",
    request(b"GET /acme/x HTTP/1.2", H),
    request(b"GET /v2/x HTTP/1.1"),
    why="RFC 9110 §2.5: a higher minor version is processed as the highest one implemented",
)
case(
    "method_options_max_forwards_00",
    request(b"OPTIONS /acme/x HTTP/1.1", H, b"Max-Forwards: 00"),
    status=(200, 204),
    why="RFC 9110 §7.6.2: Max-Forwards is a number; 00 is zero",
)
case(
    "pipelined_after_connection_close",
    request(b"GET /acme/a HTTP/1.1", H, b"Connection: close") + request(b"GET /acme/b HTTP/1.1", H),
    replies=(ok(b"one"),),
    forwarded=(request(b"GET /v2/a HTTP/1.1"),),
    answers=(ok(b"one"),),
    why="RFC 9112 §9.6: the request that says close is answered; nothing after it is served",
)
case(
    "pipelined_after_connection_close_post",
    request(b"POST /acme/a HTTP/1.1", H, b"Connection: close", b"Content-Length: 3", body=b"abc")
    + request(b"GET /acme/b HTTP/1.1", H),
    replies=(ok(b"one"),),
    forwarded=(request(b"POST /v2/a HTTP/1.1", b"Content-Length: 3", body=b"abc"),),
    answers=(ok(b"one"),),
    why="RFC 9112 §9.6, with a body before the pipelined bytes",
)
case(
    "pipelined_after_upgrade_websocket",
    request(b"GET /acme/ws HTTP/1.1", H, b"Upgrade: websocket", b"Connection: Upgrade")
    + request(b"GET /acme/b HTTP/1.1", H),
    replies=(ok(b"one"), ok(b"two")),
    forwarded=(request(b"GET /v2/ws HTTP/1.1"), request(b"GET /v2/b HTTP/1.1")),
    answers=(ok(b"one"), ok(b"two")),
    why="RFC 9110 §7.8: the proxy does not upgrade; the next request in the read is served (issue 11, round 5)",
)
for name, value in (("2_63", b"9223372036854775808"), ("2_64_plus_3", b"18446744073709551619")):
    case(
        f"malformed_400_content_length_{name}",
        request(b"POST /acme/x HTTP/1.1", H, b"Content-Length: " + value, body=b"abc")
        + request(b"GET /beta/next HTTP/1.1", H),
        status=(400,),
        why="RFC 9110 §8.6: a Content-Length past 2^63-1 is refused, never copied (issue 11, round 6)",
    )
case(
    "pipelined_after_upgrade_h2c_get",
    request(
        b"GET /acme/up HTTP/1.1",
        H,
        b"Upgrade: h2c",
        b"Connection: Upgrade, HTTP2-Settings",
        b"HTTP2-Settings: AAMAAABkAAQAAP__",
    )
    + request(b"GET /acme/b HTTP/1.1", H),
    replies=(ok(b"one"),),
    forwarded=(request(b"GET /v2/up HTTP/1.1"),),
    answers=(ok(b"one"),),
    why="RFC 9112 §9.3.2: a bodiless h2c upgrade too: answered, then closed (issue 11, round 6)",
)
case(
    "pipelined_after_upgrade_h2c_post",
    request(
        b"POST /acme/up HTTP/1.1",
        H,
        b"Upgrade: h2c",
        b"Connection: Upgrade, HTTP2-Settings",
        b"HTTP2-Settings: AAMAAABkAAQAAP__",
        b"Content-Length: 3",
        body=b"abc",
    )
    + request(b"GET /acme/b HTTP/1.1", H),
    replies=(ok(b"one"),),
    forwarded=(request(b"POST /v2/up HTTP/1.1", b"Content-Length: 3", body=b"abc"),),
    answers=(ok(b"one"),),
    why="RFC 9112 §9.3.2: the parser drops what follows an h2c upgrade; answered, then closed, never a shifted answer",
)
for name, host in (
    ("space", b"a b"),
    ("userinfo", b"u@partner.example"),
    ("slash", b"a/b"),
    ("port_99999", b"partner.example:99999"),  # round 7 (F5): as in an absolute-form target
    ("port_30_digits", b"a:123456789012345678901234567890"),
):
    case(
        f"malformed_400_host_{name}",
        request(b"GET /acme/x HTTP/1.1", b"Host: " + host),
        status=(400,),
        why="RFC 9110 §7.2: Host is host[:port]; never copied into X-Forwarded-Host",
    )
case(
    "method_extension_after_content_length_body",
    (
        request(b"POST /acme/a HTTP/1.1", H, b"Content-Length: 3", body=b"abc"),
        request(b"BAN /acme/b HTTP/1.1", H),
    ),
    replies=(ok(b"one"), ok(b"two")),
    forwarded=(
        request(b"POST /v2/a HTTP/1.1", b"Content-Length: 3", body=b"abc"),
        request(b"BAN /v2/b HTTP/1.1"),
    ),
    answers=(ok(b"one"), ok(b"two")),
    why="RFC 9110 §9.1: an extension method on a kept-alive connection after a sized body",
)
forwarded_get(
    "target_absolute_form_response_via",
    request(b"GET http://partner.example/v HTTP/1.1", b"Host: partner.example"),
    request(b"GET /h/v HTTP/1.1"),
    why="RFC 9110 §7.6.3: as a forward proxy it adds Via to the answers (checked by the runner)",
)

# ------------------------------------- issue 11, third outside round

for name, reply in (
    ("space_before_colon", response(b"HTTP/1.1 200 OK", b"Content-Length : 2", body=b"ok")),
    ("leading_whitespace_line", response(b"HTTP/1.1 200 OK", b" X-Lead: v", DATE.rstrip(), b"Content-Length: 2", body=b"ok", date=False)),
    ("http_2_0_status_line", response(b"HTTP/2.0 200 OK", b"Content-Length: 2", body=b"ok")),
    ("407_from_partner", response(b"HTTP/1.1 407 Proxy Authentication Required", b'Proxy-Authenticate: Basic realm="p"', b"Content-Length: 0")),
):  # fmt: skip
    case(
        f"response_refused_{name}",
        request(b"GET /acme/x HTTP/1.1", H),
        replies=(reply,),
        forwarded=(request(b"GET /v2/x HTTP/1.1"),),
        status=(502,),
        why="RFC 9112 §5.1, §2.2 (a field name is a token; no whitespace before the colon or "
        "at a line start), §2.3; RFC 9110 §15.5.8 (a 407 is addressed to this hop)",
    )
case(
    "response_longer_than_its_content_length",
    (request(b"GET /acme/a HTTP/1.1", H), request(b"GET /acme/b HTTP/1.1", H)),
    replies=(response(b"HTTP/1.1 200 OK", b"Content-Length: 2", body=b"abcd"), ok(b"two")),
    forwarded=(request(b"GET /v2/a HTTP/1.1"), request(b"GET /v2/b HTTP/1.1")),
    answers=(response(b"HTTP/1.1 200 OK", b"Content-Length: 2", body=b"ab"), ok(b"two")),
    spoils_upstream=True,
    why="RFC 9112 §6.3: Content-Length ends the answer; bytes after it are dropped with the "
    "connection, in whatever reads they come (nginx does the same)",
)
forwarded_get(
    "headers_rewrite_and_client_ip_fields_dropped",
    request(
        b"GET /acme/x HTTP/1.1",
        H,
        b"X-Original-URL: /admin",
        b"X-Rewrite-URL: /admin",
        b"True-Client-IP: 10.0.0.1",
        b"X-Client-IP: 10.0.0.1",
        b"X-Forwarded-Port: 443",
        b"X-Forwarded-Prefix: /other",
        b"X-Kept: 1",
    ),
    request(b"GET /v2/x HTTP/1.1", b"X-Kept: 1"),
    why="docs/security.md: fields partners' stacks read as the original URL or the client",
)
case(
    "pipelined_two_then_connection_close_then_more",
    request(b"GET /acme/a HTTP/1.1", H)
    + request(b"GET /acme/b HTTP/1.1", H, b"Connection: close")
    + request(b"GET /acme/c HTTP/1.1", H),
    replies=(ok(b"one"), ok(b"two")),
    forwarded=(request(b"GET /v2/a HTTP/1.1"), request(b"GET /v2/b HTTP/1.1")),
    answers=(ok(b"one"), ok(b"two")),
    why="RFC 9112 §9.6: every request up to the one that says close is answered",
)
case(
    "target_path_parameter_dot_segment",
    request(b"GET /acme/..;/admin HTTP/1.1", H),
    status=(400,),
    why="Tomcat and Jetty read ..;x as ..: it would climb out of the route",
)

# ------------------------------------- issue 11, fourth outside round

APP_SECRET: Final = b"APPSECRET-Zq9"
for name, sent in (
    ("userinfo_bad_port", request(b"GET http://user:" + APP_SECRET + b"@partner.example:99999/x HTTP/1.1", H)),
    ("bad_port_query_key", request(b"GET http://partner.example:99999/x?api_key=" + APP_SECRET + b" HTTP/1.1", H)),
    ("bad_ipv6_query_key", request(b"GET http://[::1/x?k=" + APP_SECRET + b" HTTP/1.1", H)),
    ("bare_lf_authorization", b"BAN /acme/s HTTP/1.1\nAuthorization: Bearer " + APP_SECRET + b"\nHost: a\r\n\r\n"),
    ("ext_method_bad_version", (request(b"BAN /acme/b1 HTTP/1.1", H), b"GET /acme/s?api_key=" + APP_SECRET + b" HTTP/1.x\r\nHost: a\r\n\r\n")),
):  # fmt: skip
    case(
        f"refusal_never_quotes_{name}",
        sent if isinstance(sent, tuple) else (sent,),
        replies=(ok(b"ban"),) if isinstance(sent, tuple) else (),
        forwarded=(request(b"BAN /v2/b1 HTTP/1.1"),) if isinstance(sent, tuple) else (),
        status=(400, 505),
        secret=APP_SECRET,
        why="docs/security.md: a refusal names the fault, never the request's bytes",
    )

BAN: Final = request(b"BAN /acme/b1 HTTP/1.1", H)
GOOD_GET: Final = request(b"GET /acme/g HTTP/1.1", H)
BAD_FIELD: Final = request(b"GET /acme/bad HTTP/1.1", H, b"X A: b")
case(
    "extension_connection_good_then_malformed_same_read",
    BAN + BAD_FIELD,
    replies=(ok(b"ban"),),
    forwarded=(request(b"BAN /v2/b1 HTTP/1.1"),),
    status=(400,),
    why="RFC 9112 §9.3.2 on the Python parser too: the good request is answered, then the 400",
)
case(
    "extension_connection_later_good_then_malformed",
    (BAN, GOOD_GET + BAD_FIELD),
    replies=(ok(b"ban"), ok(b"get")),
    forwarded=(request(b"BAN /v2/b1 HTTP/1.1"), request(b"GET /v2/g HTTP/1.1")),
    status=(400,),
    why="RFC 9112 §9.3.2: a connection that began with an extension method keeps the rule",
)
case(
    "extension_connection_close_then_more",
    request(b"BAN /acme/b1 HTTP/1.1", H, b"Connection: close") + GOOD_GET,
    replies=(ok(b"ban"),),
    forwarded=(request(b"BAN /v2/b1 HTTP/1.1"),),
    answers=(ok(b"ban"),),
    why="RFC 9112 §9.6 on the Python parser",
)
case(
    "extension_connection_later_http10_then_more",
    (BAN, request(b"GET /acme/c HTTP/1.0", H) + GOOD_GET),
    replies=(ok(b"ban"), ok(b"c")),
    forwarded=(request(b"BAN /v2/b1 HTTP/1.1"), request(b"GET /v2/c HTTP/1.1")),
    answers=(ok(b"ban"), ok(b"c")),
    why="RFC 9112 §9.3: an HTTP/1.0 request without keep-alive is the last on its connection",
)

for name, tail in (("plain", ()), ("with_trailer", (b"X-T: 1",))):
    case(
        f"response_chunked_whole_then_junk_{name}",
        (request(b"GET /acme/a HTTP/1.1", H), request(b"GET /acme/b HTTP/1.1", H)),
        replies=(
            response(
                b"HTTP/1.1 200 OK",
                b"Transfer-Encoding: chunked",
                body=chunked(b"hello", 2, b"", tail) + b"JUNK",
            ),
            ok(b"two"),
        ),
        forwarded=(request(b"GET /v2/a HTTP/1.1"), request(b"GET /v2/b HTTP/1.1")),
        answers=(answer_variants(b"HTTP/1.1 200 OK", (), b"hello", tail), ok(b"two")),
        spoils_upstream=True,
        why="RFC 9112 §7.1: the last chunk ends the answer; bytes after it are dropped with the connection",
    )

case(
    "response_reason_with_control_bytes_replaced",
    request(b"GET /acme/x HTTP/1.1", H),
    replies=(response(b"HTTP/1.1 200 O\x00K\x1b", b"Content-Length: 2", body=b"ok"),),
    forwarded=(request(b"GET /v2/x HTTP/1.1"),),
    answers=(response(b"HTTP/1.1 200 OK", b"Content-Length: 2", body=b"ok"),),
    why="RFC 9112 §4: no control bytes in a reason phrase; the status's own is sent instead",
)

CASES_BY_NAME: Final = {c.name: c for c in CASES}


def authproxy_yaml(token_url: str, partner_url: str, extra: str = "") -> str:
    """The proxy.yaml every case runs against: ``ROUTES`` to one partner, one
    client at ``token_url`` (the fakes' demo credentials)."""
    routes = []
    for name, match, path, keys in ROUTES:
        matcher = (
            f"{{host: {match[5:]}}}" if match.startswith("host:") else f"{{path_prefix: {match}}}"
        )
        routes.append(
            f"  - name: {name}\n    match: {matcher}\n    upstream: {partner_url}{path}\n"
            f"    client: demo\n" + (f"    {keys}\n" if keys else "")
        )
    return f"""
listen: 127.0.0.1:0
inbound: {{body_timeout: 1s}}
clients:
  demo:
    token_url: {token_url}
    client_id: demo-client
    client_secret: demo-secret
    scope: orders.read
routes:
{"".join(routes)}{extra}
"""
