"""The admin listener: a separate port (``admin:`` in proxy.yaml), so that no
partner route can shadow it and the apps' port exposes nothing but routes.

``/healthz`` (alive), ``/readyz`` (send me traffic), ``/metrics`` (Prometheus),
``/tokens`` (token state without tokens), ``POST /reload``,
``POST /tokens/{client}/drop`` (discard a client's tokens everywhere) and ``/``
(the status page, :mod:`proxy.ops.status`).

With an ``auth_token`` every endpoint but ``/healthz`` and ``/readyz`` (the
probes) needs ``Authorization: Bearer <auth_token>``, compared in constant
time. A request without it gets a 401 that says what is needed; the value it
presented is never logged nor echoed.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.typedefs import Middleware

from proxy import __version__
from proxy.errors import malformed_reason
from proxy.log import get_logger
from proxy.metrics import CONTENT_TYPE, Metrics
from proxy.ops.status import CSP, render_status

UNAUTHENTICATED_PATHS: Final = frozenset({"/healthz", "/readyz"})  # the probes
REALM: Final = "authproxy-admin"
log = get_logger("proxy.admin")


class Reload(Protocol):
    ok: bool
    message: str

    def as_json(self) -> dict[str, Any]: ...


class Operated(Protocol):
    """What the admin listener asks of the running proxy
    (:class:`proxy.server.ProxyServer`), and nothing more."""

    metrics: Metrics

    def ready_reason(self) -> str | None: ...

    async def refresh_gauges(self) -> None: ...

    async def token_report(self) -> list[dict[str, Any]]: ...

    def request_reload(self) -> Reload: ...

    async def drop_tokens(self, client: str) -> dict[str, Any]:
        """Discard ``client``'s tokens in every worker and the shared cache;
        e.g. ``{"client": "acme", "dropped": 1}``. KeyError: no such client."""
        ...

    async def status(self) -> dict[str, Any]:
        """The status page's data, shaped as :class:`proxy.ops.status.Status`."""
        ...


SERVER_KEY: web.AppKey[Operated] = web.AppKey("server")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body, indent=1).encode() + b"\n",
        content_type="application/json",
        headers=headers,
    )


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    reason = request.app[SERVER_KEY].ready_reason()
    if reason is None:
        return _json({"ready": True})
    return _json({"ready": False, "reason": reason}, status=503)


async def metrics(request: web.Request) -> web.Response:
    server = request.app[SERVER_KEY]
    await server.refresh_gauges()
    return web.Response(body=server.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def tokens(request: web.Request) -> web.Response:
    return _json({"tokens": await request.app[SERVER_KEY].token_report()})


async def reload(request: web.Request) -> web.Response:
    result = request.app[SERVER_KEY].request_reload()
    if result.ok:
        return _json(result.as_json())
    return _json({"reloaded": False, "error": "config_invalid", "message": result.message}, 400)


async def drop(request: web.Request) -> web.Response:
    client = request.match_info["client"]
    try:
        result = await request.app[SERVER_KEY].drop_tokens(client)
    except KeyError:
        return _json(
            {
                "error": "unknown_client",
                "client": client,
                "message": f"no route uses a client named {client!r}",
            },
            404,
        )
    return _json(result)


async def status_page(request: web.Request) -> web.Response:
    data = {"version": __version__, **await request.app[SERVER_KEY].status()}
    return web.Response(
        text=render_status(data),
        content_type="text/html",
        charset="utf-8",
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


def _bearer(request: web.Request) -> bytes | None:
    """The presented bearer credential, or ``None`` (no header, another
    scheme, or two ``Authorization`` fields: which one counts would depend
    on their order)."""
    fields = request.headers.getall("Authorization", [])
    if len(fields) != 1:
        return None
    scheme, _, credential = fields[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return None
    return credential.strip().encode("utf-8", "surrogateescape")


def _require_token(token: str) -> Middleware:
    expected = token.encode()

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in UNAUTHENTICATED_PATHS:
            return await handler(request)
        presented = _bearer(request)
        if presented is not None and hmac.compare_digest(presented, expected):
            return await handler(request)
        problem = "missing" if presented is None else "wrong"
        # Only the path and the kind of failure: never the value presented.
        log.warning(
            "admin_unauthorized",
            method=request.method,
            path=request.path,
            remote=request.remote,
            credential=problem,
        )
        return _json(
            {
                "error": "admin_auth_required",
                "message": f"{problem} admin token: send Authorization: Bearer <the token in "
                "admin.auth_token_file>",
            },
            401,
            headers={"WWW-Authenticate": f'Bearer realm="{REALM}"'},
        )

    return authenticate


def loopback_name(host: str) -> bool:
    """``localhost`` (and its subdomains, RFC 6761 §6.3) or a loopback IP."""
    name = host.lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def _host_name(authority: str) -> str:
    if authority.startswith("["):
        return authority.partition("]")[0] + "]"
    return authority.partition(":")[0]


_SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_SAME_SITE: Final = frozenset({"same-origin", "none"})  # Sec-Fetch-Site: the page itself, or typed


def _refused(request: web.Request, code: str, message: str) -> web.Response:
    log.warning("admin_refused", error=code, method=request.method, path=request.path,
                remote=request.remote)  # fmt: skip
    return _json({"error": code, "message": message}, 403)


def _browser_guard(loopback_only: bool) -> Middleware:
    """What a browser on the proxy's host must not do to the admin port:
    change state from another site's page (a form or ``fetch`` needs no
    preflight for a POST: CSRF), and, on a loopback listener without a
    token, read it under another name (DNS rebinding: a page of
    ``rebound.example`` that resolves to 127.0.0.1)."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host", "")
        if loopback_only and request.path not in UNAUTHENTICATED_PATHS and host:
            if not loopback_name(_host_name(host)):
                return _refused(
                    request,
                    "admin_host_not_allowed",
                    "without admin.auth_token_file the admin port answers only to a loopback "
                    "Host (localhost, 127.0.0.1, [::1])",
                )
        if request.method not in _SAFE_METHODS:
            site = request.headers.get("Sec-Fetch-Site")
            origin = request.headers.get("Origin")
            # A browser's Sec-Fetch-Site decides when it is sent (behind a TLS
            # terminating proxy, Origin names the outer host, not Host);
            # Origin only when it is not.
            if site is not None:
                foreign = site not in _SAME_SITE
            else:
                foreign = origin is not None and origin.partition("://")[2].lower() != host.lower()
            if foreign:
                return _refused(
                    request,
                    "admin_cross_site",
                    "a state-changing admin request from another site's page is refused "
                    "(Origin, Sec-Fetch-Site); send it with curl, or from the status page",
                )
        return await handler(request)

    return guard


def _answer_in_http11(request: web.BaseRequest) -> None:
    """aiohttp writes an answer's status line in the request's version: 2.0
    for an "HTTP/2.0" request line, 1.0 for a head it refused (its stand-in
    request). This port answers in HTTP/1.1, as the apps' port does (RFC 9110
    §2.5). ``version`` is a cached property; the cache is aiohttp's."""
    request._cache["version"] = HttpVersion11


@web.middleware
async def _http1_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """HTTP/1.0 and 1.1, as on the apps' port (RFC 9110 §15.6.6: 505)."""
    version = request.version
    if version.major != 1:
        _answer_in_http11(request)
        reason = f"HTTP/{version.major}.{version.minor} is not served on this port; speak HTTP/1.1"
        log.warning("admin_malformed_request", status=505, remote=request.remote, reason=reason)
        return _json({"error": "http_version_not_supported", "message": reason}, 505)
    return await handler(request)


def admin_app(
    server: Operated, auth_token: str | None = None, *, loopback_only: bool = False
) -> web.Application:
    """The admin application for ``server``; with ``auth_token`` (the contents
    of ``admin.auth_token_file``; surrounding whitespace is ignored) every
    endpoint except ``/healthz`` and ``/readyz`` needs it as a bearer token.
    ``loopback_only`` (a loopback listener with no token) answers only to a
    loopback ``Host``. Cross-site POSTs are refused always."""
    middlewares: list[Middleware] = [
        _http1_only,
        _browser_guard(loopback_only and auth_token is None),
    ]
    if auth_token is not None:
        auth_token = auth_token.strip()
        if not auth_token:
            raise ValueError("the admin auth token is empty")
        middlewares.append(_require_token(auth_token))
    app = web.Application(middlewares=middlewares)
    app[SERVER_KEY] = server
    app.router.add_get("/", status_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/tokens", tokens)
    app.router.add_post("/tokens/{client}/drop", drop)
    app.router.add_post("/reload", reload)
    return app


MAX_LINE: Final = 8190  # aiohttp's limits for the admin port's requests (its defaults)
MAX_HEADERS: Final = 128


class AdminRequestHandler(web.RequestHandler):
    """aiohttp's connection handler for the admin port, its error answers
    made safe. aiohttp's own 400 quotes the line its parser refused in the
    body and in a plain-text traceback, and that line can be
    ``Authorization: Bearer <the admin token>`` with a stray byte (a token
    read from a CRLF file, round 11). This one answers as the apps' port
    does: JSON naming the fault, never its bytes, and one JSON log line."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            # A bug in a handler (500: the traceback, frames and no locals, is
            # ours) or one that ran past aiohttp's handler timeout (504).
            log.error("admin_internal_error", status=status, exc_info=exc)
            body = (
                {"error": "internal_error", "message": "internal error"}
                if status == 500
                else {"error": "admin_timeout", "message": "the admin request did not finish"}
            )
        else:
            text = str(getattr(exc, "message", "") or "")
            if isinstance(exc, LineTooLong) or "Got more than" in text:
                status, error = 431, "header_too_large"
                reason = f"a request line or header field is longer than {MAX_LINE} bytes"
            elif "Too many headers" in text:
                status, error = 431, "header_too_large"
                reason = f"more than {MAX_HEADERS} header fields"
            elif "Invalid HTTP version" in text or "Bad status line" in text:
                # llhttp's words for a version it does not parse (HTTP/1.2, 3.0)
                status, error = 505, "http_version_not_supported"
                reason = "only HTTP/1.0 and HTTP/1.1 are served on this port"
            else:
                error, reason = "bad_request", malformed_reason(exc)
            log.warning(
                "admin_malformed_request", status=status, remote=request.remote, reason=reason
            )
            body = {"error": error, "message": reason}
        if request.writer.output_size > 0:  # as aiohttp: an answer has begun, the connection ends
            raise ConnectionError("the admin answer had begun; closing the connection")
        _answer_in_http11(request)
        response = _json(body, status)
        response.force_close()
        return response
