"""The admin listener: a separate port (``admin:`` in proxy.yaml), so that no
partner route can shadow it and the apps' port exposes nothing but routes.

``/healthz`` (alive), ``/readyz`` (send me traffic), ``/metrics`` (Prometheus),
``/tokens`` (token state without tokens), ``POST /reload``.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from aiohttp import web

from proxy.metrics import CONTENT_TYPE, Metrics


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
        """Discard ``client``'s tokens everywhere; KeyError for an unknown client."""
        ...


SERVER_KEY: web.AppKey[Operated] = web.AppKey("server")


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body, indent=1).encode() + b"\n",
        content_type="application/json",
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
        return _json(await request.app[SERVER_KEY].drop_tokens(client))
    except KeyError:
        return _json(
            {"error": "unknown_client", "message": f"no route uses a client named {client!r}"},
            404,
        )


# /healthz and /readyz answer anyone: orchestrators probe them without a token.
OPEN_PATHS: Final = frozenset({"/healthz", "/readyz"})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guard(token: str) -> Any:
    """Bearer authentication for every admin path but the probes, compared in
    constant time; the presented value is never logged or echoed."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        presented = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(presented, expected):
            response = _json(
                {
                    "error": "admin_auth_required",
                    "message": "send Authorization: Bearer <admin token>",
                },
                401,
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="authproxy-admin"'
            return response
        return await handler(request)

    return check


def admin_app(server: Operated, auth_token: str | None = None) -> web.Application:
    """The admin app; with ``auth_token`` (admin.auth_token_file) every path
    but /healthz and /readyz asks for ``Authorization: Bearer <token>``."""
    app = web.Application(middlewares=[_guard(auth_token)] if auth_token else [])
    app[SERVER_KEY] = server
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/tokens", tokens)
    app.router.add_post("/reload", reload)
    app.router.add_post("/tokens/{client}/drop", drop)
    return app
