"""OpenTelemetry traces (issue 17, docs/operations.md "Traces").

Off by default and then free: nothing here is imported on the request path
unless ``tracing.enabled`` is set, and the forwarder checks one ``None``.
When on, ``authproxy[otel]`` (the SDK and its OTLP/HTTP exporter) exports
one server span per app request with children for the wait on a mint, the
token endpoint call, each upstream attempt (a replay is a second one) and
the relay of the answer. The exporter's endpoint, headers and the sampler
follow the standard ``OTEL_*`` variables; ``tracing.sample_ratio`` and
``tracing.service_name`` override the sampler and the service name.

W3C ``traceparent``/``tracestate`` from the app make the request span join
the app's trace; the upstream request carries the proxy's upstream span as
parent (the app's fields are replaced). Without tracing they pass through
untouched, as every other field. Attributes are names from proxy.yaml,
methods, statuses and ids: never a token, a secret, a path or a query.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

from proxy.config.model import TracingConfig
from proxy.errors import ConfigError

TRACE_FIELDS: Final = frozenset({"traceparent", "tracestate"})  # W3C Trace Context
Attributes = Mapping[str, str | int | bool | float]


class Tracing:
    """The process's tracer: one TracerProvider, its batch exporter, and the
    W3C propagator. Made once at start (``build``); ``shutdown`` flushes."""

    def __init__(self, config: TracingConfig) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
            from opentelemetry.trace import (
                INVALID_SPAN,
                SpanKind,
                Status,
                StatusCode,
                get_current_span,
                set_span_in_context,
            )
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError:
            raise ConfigError(
                "tracing.enabled needs OpenTelemetry: pip install 'authproxy[otel]'"
            ) from None
        name = config.service_name or os.environ.get("OTEL_SERVICE_NAME") or "authproxy"
        sampler = (
            ParentBased(TraceIdRatioBased(config.sample_ratio))
            if config.sample_ratio is not None
            else None  # the SDK reads OTEL_TRACES_SAMPLER / _ARG
        )
        self.provider = TracerProvider(
            resource=Resource.create({SERVICE_NAME: name}), sampler=sampler
        )
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("authproxy")
        self._propagator = TraceContextTextMapPropagator()
        self._kinds = {"server": SpanKind.SERVER, "client": SpanKind.CLIENT,
                       "internal": SpanKind.INTERNAL}  # fmt: skip
        self._in_context = set_span_in_context
        self._current = get_current_span
        self._unsampled = INVALID_SPAN  # takes attributes and does nothing
        self._error = Status(StatusCode.ERROR)

    def request(self, headers: Mapping[str, str]) -> Any:
        """The server span of an app request, a child of the app's
        ``traceparent`` when it sent one. The caller ends it (``finish``)."""
        parent = self._propagator.extract(carrier=headers)
        return self.tracer.start_span("authproxy request", context=parent,
                                      kind=self._kinds["server"])  # fmt: skip

    def attach(self, span: Any) -> object:
        """Make ``span`` the current one (for the children and the mint task
        started under it); returns the token for :meth:`detach`."""
        from opentelemetry import context

        return context.attach(self._in_context(span))

    def detach(self, token: object) -> None:
        from opentelemetry import context

        context.detach(token)  # type: ignore[arg-type]

    @contextmanager
    def span(self, name: str, kind: str = "internal", **attributes: Any) -> Iterator[Any]:
        """A child of the current span; an exception marks it failed. Under
        a request that is not sampled, nothing is made (the cost of an
        unsampled request is its server span, not five)."""
        if not self._current().is_recording():
            yield self._unsampled
            return
        with self.tracer.start_as_current_span(
            name, kind=self._kinds[kind], attributes=attributes, record_exception=False,
            set_status_on_exception=False,
        ) as span:  # fmt: skip
            try:
                yield span
            except BaseException as exc:
                span.set_status(self._error)
                span.set_attribute("error.type", type(exc).__name__)
                raise

    def inject(self, span: Any, fields: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """``fields`` with the app's trace fields replaced by ``span``'s."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._in_context(span))
        kept = [(n, v) for n, v in fields if n.lower() not in TRACE_FIELDS]
        return kept + list(carrier.items())

    def inject_current(self, fields: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """As :meth:`inject`, for the current span (an unsampled request's)."""
        return self.inject(self._current(), fields)

    def finish(self, span: Any, attributes: Attributes, failed: bool) -> None:
        span.set_attributes(dict(attributes))
        if failed:
            span.set_status(self._error)
        span.end()

    def shutdown(self) -> None:
        """Export what is buffered (bounded by the SDK's own timeout)."""
        self.provider.shutdown()


def build(config: TracingConfig) -> Tracing | None:
    """The tracer the config asks for; None (and nothing imported) when off."""
    return Tracing(config) if config.enabled else None
