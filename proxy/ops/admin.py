"""The admin listener: a separate port (``admin:`` in proxy.yaml), so that no
partner route can shadow it and the apps' port exposes nothing but routes.

``/healthz`` (alive), ``/readyz`` (send me traffic), ``/metrics`` (Prometheus),
``/tokens`` (token state without tokens), ``POST /reload``.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

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


def admin_app(server: Operated) -> web.Application:
    app = web.Application()
    app[SERVER_KEY] = server
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/tokens", tokens)
    app.router.add_post("/reload", reload)
    return app
