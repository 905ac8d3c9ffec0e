"""One request to a partner: a send, the one resend of an idempotent request
that never reached the partner's application, and what each transport fact
means to the app (a 502 that names the upstream, a 504 that names the
timeout, or the app's own body when that is what failed).
"""

from __future__ import annotations

import time
from typing import Any, Final

from proxy.config.model import RouteConfig
from proxy.errors import (
    BodyFailed,
    ConnectFailed,
    ConnectTimedOut,
    Dropped,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnreachable,
    route_prefix,
)
from proxy.forwarding.body import BodyTee, broken, stalled, too_large
from proxy.forwarding.headers import transfer_codings
from proxy.forwarding.seams import Interim, UpstreamClient, UpstreamResponse
from proxy.log import get_logger
from proxy.routing.table import RouteRuntime
from proxy.tokens.dpop import Proofs
from proxy.tracing import Tracing

events = get_logger("proxy.forward")

# RFC 9110 §9.2.2, less TRACE: the proxy never forwards TRACE (a 405 of its own).
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class Outbound:
    """The request as it goes upstream. Built once from the inbound request;
    only ``headers`` changes between the first send and a replay (the token).
    (Its own ``__init__``, not a dataclass's, which the compiled build leaves
    interpreted: issue 16.)"""

    __slots__ = ("body", "has_body", "headers", "method", "proof", "target", "url")

    def __init__(
        self,
        method: str,
        url: str,
        target: str,
        headers: list[tuple[str, str]],
        has_body: bool,
        body: bytes | None = None,
        proof: Proofs | None = None,
    ) -> None:
        self.method = method
        self.url = url
        self.target = target  # the url's path and query: the request line's target
        self.headers = headers
        self.has_body = has_body
        self.body = body  # a small body read whole before sending (BUFFERED_BODY)
        # A DPoP token's proof (RFC 9449 §7): made afresh for every send, a
        # resend and a replay included, so no proof is ever sent twice.
        self.proof = proof

    def with_token(self, headers: list[tuple[str, str]], proof: Proofs | None) -> Outbound:
        """The same request with other headers (another token) and proof."""
        return Outbound(
            self.method, self.url, self.target, headers, self.has_body, self.body, proof
        )


class Sender:
    """Sends :class:`Outbound` requests on an engine's
    :class:`~proxy.forwarding.seams.UpstreamClient`. Safe for concurrent use."""

    def __init__(self, client: UpstreamClient, tracing: Tracing | None = None) -> None:
        self._client = client
        self.tracing = tracing  # one "upstream" span per attempt when on

    async def send(
        self,
        runtime: RouteRuntime,
        outbound: Outbound,
        data: Any,
        tee: BodyTee | None,
        interim: Interim,
    ) -> UpstreamResponse:
        """Send once; a request that was refused a connection (or whose reused
        keep-alive connection turned out dead) is sent once more on a fresh
        connection when it is idempotent and its body, if any, is whole in hand.
        A connect timeout is not tried again: that would double the wait."""
        try:
            if self.tracing is None:  # one coroutine less on every request
                return await self._attempt(runtime, outbound, data, tee, interim, None)
            return await self._once(runtime, outbound, data, tee, interim)
        except UpstreamError as failed:
            if not failed.resend:
                raise
            route = runtime.config
            retry_body: Any = data if isinstance(data, bytes) or data is None else None
            if tee is not None and retry_body is None:
                if tee.untouched:  # never connected: the body was not read yet
                    retry_body = tee.stream()
                elif tee.replayable:
                    retry_body = tee.body()
            if (
                route.retry_idempotent
                and outbound.method in IDEMPOTENT
                and (not outbound.has_body or retry_body is not None)
            ):
                events.info("upstream_retry", route=route.name, reason=failed.code)
                return await self._once(runtime, outbound, retry_body, tee, interim)
            raise

    async def _once(
        self,
        runtime: RouteRuntime,
        outbound: Outbound,
        data: Any,
        tee: BodyTee | None,
        interim: Interim,
    ) -> UpstreamResponse:
        tracing = self.tracing
        if tracing is None:
            return await self._attempt(runtime, outbound, data, tee, interim, None)
        route = runtime.config
        with tracing.span(
            "upstream",
            "client",
            **{"authproxy.route": route.name, "http.request.method": outbound.method,
               "server.address": runtime.endpoint.host, "server.port": runtime.endpoint.port},
        ) as span:  # fmt: skip
            response = await self._attempt(runtime, outbound, data, tee, interim, span)
            span.set_attribute("http.response.status_code", response.status)
            return response

    async def _attempt(
        self,
        runtime: RouteRuntime,
        outbound: Outbound,
        data: Any,
        tee: BodyTee | None,
        interim: Interim,
        span: Any,
    ) -> UpstreamResponse:
        route = runtime.config
        started = time.monotonic()
        headers = outbound.headers
        if outbound.proof is not None:
            headers = [*headers, ("DPoP", outbound.proof())]
        if span is not None:
            assert self.tracing is not None
            # The partner's parent: this attempt, or the unsampled request
            # (its traceparent then says so, and the partner does not sample).
            headers = (
                self.tracing.inject(span, headers)
                if span.is_recording()
                else self.tracing.inject_current(headers)
            )
        try:
            response = await self._client.request(
                runtime.endpoint,
                outbound.method,
                outbound.url,
                outbound.target,
                headers,
                data,
                interim,
            )
        except TimeoutError:
            _inbound_failure(route, tee)
            raise UpstreamTimeout.at(
                route.name,
                f"upstream did not answer within {route.timeout:g}s",
                client=route.client,
            ) from None
        except ConnectFailed as exc:
            raise UpstreamUnreachable(
                f"{route_prefix(route.name)}cannot connect to upstream {runtime.base.origin}: "
                f"{exc.reason}",
                route=route.name,
                client=route.client,
                resend=not isinstance(exc, ConnectTimedOut),  # a second wait would double it
            ) from None
        except Dropped:
            _inbound_failure(route, tee)
            raise UpstreamError(  # e.g. a keep-alive connection the partner had closed
                f"{route_prefix(route.name)}upstream {runtime.base.origin} closed the "
                "connection without answering",
                route=route.name,
                client=route.client,
                resend=True,
            ) from None
        except (UpstreamProtocolError, BodyFailed) as exc:
            _inbound_failure(route, tee)
            raise UpstreamError.at(
                route.name,
                f"upstream {runtime.base.origin} failed: {exc.reason}",
                client=route.client,
            ) from None
        runtime.metrics.upstream.observe(time.monotonic() - started)
        if response.status == 407:
            # Proxy-Authenticate is hop-by-hop: the challenge is addressed to
            # this hop, which has no proxy credentials; relayed without it, a
            # 407 would read as authproxy's own demand (RFC 9110 §15.5.8).
            response.close()
            raise UpstreamError.at(
                route.name,
                f"upstream {runtime.base.origin} asked for proxy authentication (407); "
                "the proxy holds no proxy credentials",
                client=route.client,
            )
        codings = response.header_values("Transfer-Encoding")
        if codings and transfer_codings(codings) != ["chunked"]:
            # RFC 9112 §6.1: the proxy would strip the chunking and pass the
            # other coding's bytes on unlabelled; nginx answers 502 as well.
            response.close()
            raise UpstreamError.at(
                route.name,
                f"upstream {runtime.base.origin} answered with transfer coding "
                f"{', '.join(codings)!r}; the proxy implements only chunked",
                client=route.client,
            )
        return response


def _inbound_failure(route: RouteConfig, tee: BodyTee | None) -> None:
    """The exchange failed because the app's body did: say so, not "upstream"."""
    if tee is None:
        return
    if tee.too_large:
        raise too_large(route)
    if tee.timed_out:
        raise stalled(route)
    if tee.inbound_failed:
        raise broken(route)
