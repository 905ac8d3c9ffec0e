"""The forwarding path, in one place: inbound request → token → upstream →
streamed answer, with the one expired-token replay.

The inbound request is read-only here (as in Go's ``httputil.ReverseProxy``):
an :class:`Outbound` is built from it once, and a replay is "send the same
Outbound again with a new token".
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any, Final

from proxy.config.model import INTERCEPT_PORT, RouteConfig
from proxy.egress.policy import Intercept, parse_connect_target
from proxy.errors import (
    ConnectFailed,
    ConnectTimedOut,
    HandshakeFailed,
    MethodNotAllowed,
    NoRoute,
    RequestFailed,
    UpstreamBodyFailed,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.forwarding.body import BodyTee, read_whole, too_large
from proxy.forwarding.challenge import MAX_401_BODY, asks_for_nonce, says_expired
from proxy.forwarding.headers import (
    VIA,
    decrement_max_forwards,
    downstream_response_headers,
    request_id,
    upstream_request_headers,
)
from proxy.forwarding.seams import (
    AppSide,
    Fields,
    Interim,
    UpstreamClient,
    UpstreamResponse,
)
from proxy.forwarding.send import Outbound, Sender
from proxy.log import access, common_access, get_logger
from proxy.metrics import UNROUTED, Metrics, RouteMetrics
from proxy.routing.access import check_access
from proxy.routing.router import RequestTarget, parse_target, tunnel_target, upstream_url
from proxy.routing.table import RouteRuntime, RouteTable
from proxy.tokens.dpop import Proofs, htu
from proxy.tokens.token import Token
from proxy.tracing import Tracing

events = get_logger("proxy.forward")
# A body with a Content-Length up to this many bytes (and within the route's
# replay_limit) is read whole and sent in one write, as nginx buffers request
# bodies by default: no streaming task per request, and the replay copy is the
# body itself. Larger and chunked bodies stream as they arrive.
BUFFERED_BODY: Final = 64 * 1024
_NOT_REPLAYABLE: Final = object()  # a body over replay_limit


class Exchange:
    """Facts about one request, for the access log. (A class with its own
    ``__init__``, not a dataclass: the compiled build leaves a dataclass's
    generated one interpreted, 3,100 instructions a request; issue 16.)"""

    __slots__ = ("extra", "replayed", "request_id", "route", "upstream_status", "waited_for_mint")

    def __init__(self, request_id: str = "") -> None:
        self.route: str | None = None
        self.request_id = request_id
        self.upstream_status: int | None = None
        self.replayed = False
        self.waited_for_mint = False
        self.extra: dict[str, Any] = {}


async def json_error(
    app: AppSide, exc: RequestFailed, request_id: str | None = None, *, close: bool = False
) -> None:
    body = exc.as_json()
    if request_id:
        body["request_id"] = request_id
    await app.respond(
        exc.status,
        json.dumps(body).encode(),
        dict(exc.headers) if exc.headers else None,
        # the rest of the request may still be on the wire
        close=close or exc.status in (400, 408, 413),
    )


def answers_options(request: AppSide) -> bool:
    """An OPTIONS the proxy answers itself: ``OPTIONS *`` asks about the
    server, not a partner, and ``Max-Forwards: 0`` names this hop as the
    recipient (RFC 9110 §7.6.2)."""
    if request.raw_path == "*":
        return True
    hops = request.headers.get("Max-Forwards", "").strip()
    return hops.isdigit() and int(hops) == 0  # "00" is a zero too


def _interim_to(request: AppSide, via: str | None) -> Interim:
    """The partner's 1xx answers, passed to the app as its final answer is:
    hop-by-hop fields dropped, Via added as a forward proxy."""

    async def interim(status: int, reason: str, fields: Fields) -> None:
        await request.interim(status, reason, downstream_response_headers(fields, via=via))

    return interim


def _credential(route: RouteConfig, token: Token) -> str:
    if token.token_type == "DPoP":  # noqa: S105 - RFC 9449 §7.1: the DPoP scheme
        return "DPoP " + token.access_token
    return route.token_prefix + token.access_token


def _prover(runtime: RouteRuntime, method: str, url: str, token: Token) -> Proofs | None:
    """Proofs for ``token`` on ``method url``: each call a new one, with the
    partner's current nonce (RFC 9449 §7, §9); None for a Bearer token."""
    key, nonces = runtime.dpop, runtime.nonces
    if key is None or nonces is None or token.token_type != "DPoP":  # noqa: S105
        return None
    # The partner's nonce is per origin.
    return Proofs(key.prover(method, htu(url), token.access_token), nonces, runtime.base.origin)


class Forwarder:
    """The proxy's request handler. ``table`` may be replaced at any time (reload);
    a request in flight keeps the table it started with."""

    def __init__(
        self,
        table: RouteTable,
        client: UpstreamClient,
        metrics: Metrics,
        tracing: Tracing | None = None,
    ) -> None:
        self.table = table
        self._tracing = tracing
        self._sender = Sender(client, tracing)
        self._metrics = metrics
        self._unrouted = metrics.for_route(UNROUTED)
        self.inflight = 0

    async def serve(self, request: AppSide) -> None:
        """Answer ``request``: forwarded, or a JSON error of the proxy's own."""
        started = time.monotonic()
        self.inflight += 1
        metrics = self._metrics
        metrics.inflight_count += 1
        if not metrics.fold_due:
            metrics.fold_soon()
        facts = Exchange(request_id=request_id(request.headers.get("X-Request-Id")))
        try:
            if self._tracing is None:
                await self._handle(request, started, facts)
            else:
                await self._traced(self._tracing, request, started, facts)
        finally:
            self.inflight -= 1
            metrics.inflight_count -= 1
            if not metrics.fold_due:
                metrics.fold_soon()

    async def _traced(
        self, tracing: Tracing, request: AppSide, started: float, facts: Exchange
    ) -> None:
        """``_handle`` inside the request's server span (issue 17)."""
        span = tracing.request(request.headers)
        token = tracing.attach(span)
        try:
            await self._handle(request, started, facts)
        finally:
            tracing.detach(token)
            self._end_request(tracing, span, request, facts)

    @staticmethod
    def _end_request(tracing: Tracing, span: Any, request: AppSide, facts: Exchange) -> None:
        if not span.is_recording():  # not sampled: nothing to say
            span.end()
        else:
            attributes: dict[str, str | int | bool] = {
                "http.request.method": request.method,
                "http.response.status_code": request.status,
                "authproxy.request_id": facts.request_id,
                "authproxy.replayed": facts.replayed,
            }
            if facts.route is not None:
                attributes["authproxy.route"] = facts.route
            if "client" in facts.extra:
                attributes["authproxy.client"] = str(facts.extra["client"])
            if facts.upstream_status is not None:
                attributes["authproxy.upstream_status"] = facts.upstream_status
            if "error" in facts.extra:
                attributes["error.type"] = str(facts.extra["error"])
            tracing.finish(span, attributes, failed=request.status >= 500)

    async def _handle(self, request: AppSide, started: float, facts: Exchange) -> None:
        table = self.table  # a reload swaps self.table; this request keeps its own
        route_metrics = self._unrouted
        try:
            # The engine checked the framing (one Host, transfer codings, version).
            if request.method == "OPTIONS" and answers_options(request):
                # RFC 9110 §7.6.2 / §9.3.7: the proxy is the recipient.
                await request.respond(200, b"", dict(MethodNotAllowed.headers), close=False)
                facts.extra["answered"] = "locally"
                return await self._finished(request, table, facts, route_metrics, started)
            if request.tunnel is not None:  # inside an intercepted CONNECT: https://tunnel/...
                target = tunnel_target(
                    request.method, request.raw_path, request.headers.get("Host"), request.tunnel
                )
            elif request.method == "CONNECT":
                return await self._connect(request, table, facts, started)
            else:
                target = parse_target(request.method, request.raw_path, request.headers.get("Host"))
            matched = table.router.route_for(target)
            if matched is None:
                where = f"host {target.host!r} " if target.host else ""
                raise NoRoute(f"no route matches {where}path {target.path[:200]!r}")
            route, runtime = matched
            facts.route = route.name
            route_metrics = runtime.metrics
            if runtime.guarded:
                check_access(route, request.remote, request.headers)
            url = upstream_url(route, runtime.base, target)
            if route.max_body is not None and (request.content_length or 0) > route.max_body:
                raise too_large(route, f", got Content-Length {request.content_length}")
            gate = runtime.gate
            if gate.limit is None:
                await self._exchange(request, runtime, url, target, table, facts)
            else:
                gate.enter(route.name)
                try:
                    await self._exchange(request, runtime, url, target, table, facts)
                finally:
                    gate.leave()
        except RequestFailed as exc:
            # After a CONNECT (one inside a tunnel) come bytes that are not HTTP.
            await json_error(request, exc, facts.request_id, close=request.method == "CONNECT")
            facts.extra["error"] = exc.code
            if exc.status >= 500:
                events.warning(
                    "request_failed",
                    route=facts.route,
                    error=exc.code,
                    status=exc.status,
                    reason=exc.message,
                    request_id=facts.request_id,
                )
        await self._finished(request, table, facts, route_metrics, started)

    async def _connect(
        self, request: AppSide, table: RouteTable, facts: Exchange, started: float
    ) -> None:
        """``CONNECT host:port`` (docs/egress.md): intercepted, relayed
        blind, or refused, as ``egress:`` and the routes say. A refusal closes
        the connection: what the app sends after a CONNECT is not HTTP."""
        metrics = self._metrics
        outcome = "refused"
        try:
            # A refused CONNECT's line names the host:port asked for (round
            # 12); a malformed target is named by no line (it could be anything).
            facts.extra["connect"] = str(parse_connect_target(request.raw_path))
            plan = table.egress.plan(request.raw_path)
            facts.extra["connect"] = (
                f"{plan.host}:{INTERCEPT_PORT}"
                if isinstance(plan, Intercept)
                else f"{plan.host}:{plan.port}"
            )
            if isinstance(plan, Intercept):
                outcome = "failed"
                try:
                    await request.intercept(plan.host, plan.context)
                except HandshakeFailed as exc:
                    facts.extra["reason"] = str(exc)
                    events.warning(
                        "tunnel_handshake_failed",
                        host=plan.host,
                        reason=str(exc),
                        request_id=facts.request_id,
                    )
                else:
                    outcome = "intercepted"
            else:
                outcome = "failed"
                up, down = metrics.tunnel_bytes.labels("up"), metrics.tunnel_bytes.labels("down")
                relayed = await request.relay(
                    plan.host,
                    plan.port,
                    connect_timeout=plan.connect_timeout,
                    idle_timeout=plan.idle_timeout,
                    on_up=up.inc,
                    on_down=down.inc,
                )
                outcome = "tunneled"
                facts.extra.update(
                    tunnel=plan.entry, up=relayed.up, down=relayed.down, ended=relayed.ended
                )
        except RequestFailed as exc:
            await json_error(request, exc, facts.request_id, close=True)
            facts.extra["error"] = exc.code
        except ConnectFailed as exc:  # the tunnel host: 504 for a timeout, 502 otherwise
            kind = UpstreamTimeout if isinstance(exc, ConnectTimedOut) else UpstreamUnreachable
            failed = kind(f"tunnel to {facts.extra.get('connect')}: {exc}")
            await json_error(request, failed, facts.request_id, close=True)
            facts.extra["error"] = failed.code
            events.warning("tunnel_failed", reason=failed.message, request_id=facts.request_id)
        facts.extra["outcome"] = outcome
        metrics.connects.labels(outcome).inc()
        await self._finished(request, table, facts, self._unrouted, started)

    async def _finished(
        self,
        request: AppSide,
        table: RouteTable,
        facts: Exchange,
        route_metrics: RouteMetrics,
        started: float,
    ) -> None:
        duration = time.monotonic() - started
        route_metrics.finished(request.status, duration)
        if table.config.access_log:
            raw_path = request.raw_path
            extra = facts.extra
            common = common_access()
            method = request.method
            if (
                common is not None
                and raw_path[:1] == "/"
                and method != "CONNECT"
                and len(extra) == 1
                and type(client := extra.get("client")) is str
            ):
                # the usual request: one format string, no dict (issue 16)
                common.write_common(
                    facts.request_id,
                    facts.route,
                    method,
                    raw_path.partition("?")[0],
                    request.status,
                    facts.upstream_status,
                    round(duration * 1000, 2),
                    facts.replayed,
                    facts.waited_for_mint,
                    client,
                )
                return
            fields: dict[str, Any] = {
                "request_id": facts.request_id,
                "route": facts.route,
                "method": method,
            }
            fields.update(_logged_target(method, raw_path))
            fields["status"] = request.status
            fields["upstream_status"] = facts.upstream_status
            fields["duration_ms"] = round(duration * 1000, 2)
            fields["replayed"] = facts.replayed
            fields["waited_for_mint"] = facts.waited_for_mint
            fields.update(extra)
            access(fields)

    async def _exchange(
        self,
        request: AppSide,
        runtime: RouteRuntime,
        url: str,
        target: RequestTarget,
        table: RouteTable,
        facts: Exchange,
    ) -> None:
        route = runtime.config
        source = runtime.source
        token = source.cached()
        if token is None:
            facts.waited_for_mint = True
            try:
                if self._tracing is None:
                    token = await source.token()
                else:
                    with self._tracing.span("wait for token", **{"authproxy.client": route.client}):
                        token = await source.token()
            except RequestFailed as exc:  # shared by every waiter: never rewritten
                raise exc.on_route(route.name) from None
        facts.extra["client"] = route.client
        headers = upstream_request_headers(
            request.fields,
            upstream_host=runtime.base.host_header,
            authorization=_credential(route, token),
            authorization_header=route.token_header,
            request_id=facts.request_id,
            client_ip=request.remote,
            inbound_host=target.authority,
            inbound_proto=request.scheme,
            trust_forwarded=table.config.trust_forwarded_headers,
            drop=runtime.drop_headers,
            received=_version_text(request.version),
        )
        if request.method == "OPTIONS":
            headers = decrement_max_forwards(headers)
        outbound = Outbound(
            request.method,
            url,
            url[len(runtime.base.origin) :],
            headers,
            request.body_exists,
            proof=_prover(runtime, request.method, url, token),
        )
        tee: BodyTee | None = None
        data: bytes | AsyncIterator[bytes] | None = None
        length = request.content_length
        if not outbound.has_body:
            pass
        elif length is not None and length <= BUFFERED_BODY and length <= route.replay_limit:
            data = outbound.body = await read_whole(
                await request.open_body(), length, route, runtime.body_timeout
            )
        else:
            tee = BodyTee(
                await request.open_body(),
                route.replay_limit,
                max_body=route.max_body,
                gap=runtime.body_timeout,
            )
            data = tee.stream()
        # RFC 9110 §7.6.3: as a forward proxy (absolute-form target) the proxy
        # adds Via to the answers it forwards; as a gateway it need not.
        via = VIA if target.absolute else None
        interim = _interim_to(request, via)
        upstream = await self._sender.send(runtime, outbound, data, tee, interim)
        facts.upstream_status = upstream.status
        prefix: bytes | None = None
        try:
            fresh_nonce = _new_nonce(runtime, outbound.proof, upstream)
            if upstream.status == 401:
                if runtime.reads_401_body:
                    prefix = await _read_up_to(upstream, MAX_401_BODY, route.name)
                challenges = upstream.header_values("WWW-Authenticate")
                if fresh_nonce and asks_for_nonce(challenges):
                    # RFC 9449 §9: the same token, a new proof with the nonce.
                    replay = await self._replay_with_nonce(
                        runtime, outbound, tee, upstream, facts, interim
                    )
                    if replay is not None:
                        upstream = replay
                        prefix = None
                        facts.upstream_status = upstream.status
                        _new_nonce(runtime, outbound.proof, upstream)
                elif says_expired(401, challenges, prefix, route.expired_token):
                    replay = await self._maybe_replay(
                        runtime, outbound, tee, token, upstream, facts, interim
                    )
                    if replay is not None:
                        upstream = replay
                        prefix = None
                        facts.upstream_status = upstream.status
            if self._tracing is None:
                await self._relay(request, upstream, prefix, route, via)
            else:
                with self._tracing.span("relay response"):
                    await self._relay(request, upstream, prefix, route, via)
        finally:
            upstream.close()

    async def _replay_with_nonce(
        self,
        runtime: RouteRuntime,
        outbound: Outbound,
        tee: BodyTee | None,
        upstream: UpstreamResponse,
        facts: Exchange,
        interim: Interim,
    ) -> UpstreamResponse | None:
        """Send ``outbound`` once more, its proof now with the partner's nonce;
        ``None`` to pass the 401 on (a body over ``replay_limit``)."""
        body = await self._replay_body(runtime, outbound, tee, upstream, facts, "nonce")
        if body is _NOT_REPLAYABLE:
            return None
        runtime.metrics.nonce_replays.inc()
        upstream.release()
        facts.replayed = True
        facts.extra["replay"] = "nonce"
        return await self._sender.send(runtime, outbound, body, None, interim)

    async def _replay_body(
        self,
        runtime: RouteRuntime,
        outbound: Outbound,
        tee: BodyTee | None,
        upstream: UpstreamResponse,
        facts: Exchange,
        why: str,
        failed: Token | None = None,
    ) -> Any:
        """The body to send again, or ``_NOT_REPLAYABLE`` when it is over the
        route's ``replay_limit`` (counted and logged here)."""
        route = runtime.config
        if tee is None:
            return outbound.body
        if not tee.complete:
            # The partner answered before reading the whole body: this
            # connection carries a half-sent request and must not be reused.
            upstream.close()
        if not await tee.finish():
            runtime.metrics.too_large.inc()
            facts.extra["replay"] = "too_large"
            then = ""
            if failed is not None:  # an expired token: dropped, unless the quota guard holds
                then = (
                    " and the next request gets a fresh token"
                    if runtime.source.forget(failed)
                    else " and the token is kept: an expiry re-mint came less than "
                    "remint_min_interval ago"
                )
            events.warning(
                "replay_too_large" if why == "nonce" else "expired_token_not_replayed",
                route=route.name,
                client=route.client,
                reason=(
                    f"request body is larger than replay_limit ({route.replay_limit} bytes); "
                    "the 401 goes back to the app" + then
                ),
            )
            return _NOT_REPLAYABLE
        return tee.body()

    async def _maybe_replay(
        self,
        runtime: RouteRuntime,
        outbound: Outbound,
        tee: BodyTee | None,
        failed: Token,
        upstream: UpstreamResponse,
        facts: Exchange,
        interim: Interim,
    ) -> UpstreamResponse | None:
        """Replay ``outbound`` once with a fresh token, or ``None`` to pass the 401 on."""
        route = runtime.config
        body = await self._replay_body(runtime, outbound, tee, upstream, facts, "expired", failed)
        if body is _NOT_REPLAYABLE:
            return None
        mints_before = runtime.source.mints
        try:
            fresh = await runtime.source.replace_expired(failed)
        except RequestFailed as exc:
            raise exc.on_route(route.name) from None
        if fresh is None:
            runtime.metrics.passed_through.inc()
            facts.extra["replay"] = "suppressed"
            return None
        runtime.metrics.replayed.inc()
        runtime.metrics.replays += 1
        facts.waited_for_mint = runtime.source.mints != mints_before
        upstream.release()  # its connection goes back to the pool if the 401 was read whole
        headers = [
            (name, _credential(route, fresh) if name == route.token_header else value)
            for name, value in outbound.headers
        ]
        facts.replayed = True
        return await self._sender.send(
            runtime,
            # the same request, another token (and a proof bound to it)
            outbound.with_token(headers, _prover(runtime, outbound.method, outbound.url, fresh)),
            body,
            None,
            interim,
        )

    async def _relay(
        self,
        request: AppSide,
        upstream: UpstreamResponse,
        prefix: bytes | None,
        route: RouteConfig,
        via: str | None,
    ) -> None:
        """Stream the upstream's answer to the app as it arrives."""
        content = upstream.content
        whole = content.is_eof()  # a small answer is often whole in hand already
        await request.start(
            upstream.status,
            upstream.reason,
            downstream_response_headers(upstream.fields, via=via),
            hold=whole,  # then head and body leave in one write
        )
        try:
            if prefix:
                await request.write(prefix)
            if whole:
                await request.write(content.read_nowait())
            else:
                async for chunk in content.iter_any():
                    await request.write(chunk)
        except (UpstreamBodyFailed, TimeoutError) as exc:
            # Headers are gone already: the only honest signal left is to cut the
            # app's connection, so a Content-Length or chunked framing shows the
            # body is incomplete (never a silently truncated 200).
            events.warning(
                "upstream_body_failed",
                route=route.name,
                client=route.client,
                reason=exc.reason if isinstance(exc, UpstreamBodyFailed) else "timeout",
            )
            request.abort()
            return
        await request.finish()


def _logged_target(method: str, raw_path: str) -> dict[str, str | None]:
    """The access line's ``path`` (never the query: it may hold a key) and,
    for an absolute-form target, its ``host`` (never userinfo); a CONNECT
    names its target in ``connect``."""
    if method == "CONNECT":
        return {"path": None}
    lowered = raw_path[:8].lower()
    if lowered.startswith(("http://", "https://")):
        rest = raw_path.partition("://")[2]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i != -1), default=len(rest))
        return {
            "path": rest[cut:].partition("?")[0] or "/",
            "host": rest[:cut].rpartition("@")[2][:255],
        }
    return {"path": raw_path.partition("?")[0]}


def _new_nonce(runtime: RouteRuntime, proofs: Proofs | None, upstream: UpstreamResponse) -> bool:
    """Remember the partner's ``DPoP-Nonce`` (RFC 9449 §9); True when it is
    not the one this request's last proof carried."""
    if proofs is None:
        return False
    assert runtime.nonces is not None
    given = runtime.nonces.seen(runtime.base.origin, upstream.headers.get("DPoP-Nonce"))
    return given is not None and given != proofs.nonce


async def _read_up_to(upstream: UpstreamResponse, cap: int, route: str) -> bytes:
    """Up to ``cap`` bytes of a 401 body, for the route's body rule; the rest
    stays unread and is streamed to the app after it."""
    chunks: list[bytes] = []
    size = 0
    try:
        while size < cap:
            chunk = await upstream.content.read(cap - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except (UpstreamBodyFailed, TimeoutError):
        raise UpstreamError.at(route, "upstream broke while sending a 401 body") from None
    return b"".join(chunks)


_VERSIONS: Final = {(1, 1): "1.1", (1, 0): "1.0"}


def _version_text(version: tuple[int, int]) -> str:
    """``1.1`` for (1, 1): the Via header's received-protocol (a dict for
    the usual ones: compiled, ``str.format`` is 1,500 instructions)."""
    return _VERSIONS.get(version) or f"{version[0]}.{version[1]}"
