"""Tracing: W3C trace context, the request id in log lines, and OpenTelemetry spans over OTLP.

OFF by default, and then free: nothing here imports OpenTelemetry, and the hot paths only test
``tracing.ACTIVE is None``. :func:`setup` (``tracing: {enabled: true}`` in the server's or the
balancer's config, or ``--otlp-endpoint``) imports the SDK -- the optional extra
``pip install 'modelyard[tracing]'`` -- and exports spans in batches to an OTLP/gRPC collector.

* W3C ``traceparent`` (https://www.w3.org/TR/trace-context/): :func:`parse_traceparent`,
  :func:`format_traceparent`. A request that carries one joins its trace; one that does not starts one.
* Request ids in logs: :func:`bind_request` puts the request on a contextvar, :class:`RequestIdFilter`
  writes ``request_id`` on every record logged while it is handled. The id is resolved only when a
  line is logged: the client's ``x-request-id``, else the trace id of its ``traceparent``, else a
  process-unique ``r<n>``.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelyard.config import Check

__all__ = ["ACTIVE", "RequestIdFilter", "Tracing", "TracingConfig", "bind_request", "format_traceparent",
           "parse_traceparent", "setup", "shutdown"]

_HEX = frozenset("0123456789abcdef")


def parse_traceparent(value: str | bytes | None) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a W3C ``traceparent``; None when absent or invalid.

    Version 00 exactly as specified; a higher version is read by its first four fields (the spec's
    forward compatibility); version ff, all-zero ids and non-lowercase-hex are invalid.
    """
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if len(text) < 55 or (len(text) > 55 and (text[:2] == "00" or text[55] != "-")):
        return None
    version, trace, span, flags = text[:2], text[3:35], text[36:52], text[53:55]
    if text[2] != "-" or text[35] != "-" or text[52] != "-" or version == "ff":
        return None
    if not _HEX.issuperset(text[:2] + trace + span + flags):
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, int(flags, 16)


def format_traceparent(trace_id: int, span_id: int, flags: int = 1) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


# ---------------------------------------------------------------------- request ids in logs

_COUNTER = itertools.count(1)
_PREFIX = f"r{os.getpid():x}."


#: ``lookup(request, name)``: a header or metadata value of ``request`` by lower-case name, or None
Lookup = Callable[[Any, str], "str | bytes | None"]


class RequestTag:
    """A request as log lines see it: its id is worked out on first use (most requests log nothing)."""

    __slots__ = ("_id", "_lookup", "_request")

    def __init__(self, request: Any, lookup: Lookup) -> None:
        self._request = request
        self._lookup = lookup
        self._id: str | None = None

    @property
    def id(self) -> str:
        rid = self._id
        if rid is None:
            found: str | bytes | None = None
            try:
                found = self._lookup(self._request, "x-request-id")
                if not found:
                    tp = parse_traceparent(self._lookup(self._request, "traceparent"))
                    found = f"{tp[0]:032x}" if tp is not None else None
            except Exception:  # a lookup on a finished request: never break a log line
                found = None
            if isinstance(found, bytes):
                found = found.decode("latin-1")
            self._id = rid = (found or f"{_PREFIX}{next(_COUNTER)}")[:128]
        return rid


_REQUEST: contextvars.ContextVar[RequestTag | None] = contextvars.ContextVar("modelyard_request", default=None)


def bind_request(request: Any, lookup: Lookup) -> contextvars.Token[RequestTag | None]:
    """Log lines from here on in this context (task) carry this request's id; reset with the token."""
    return _REQUEST.set(RequestTag(request, lookup))


def unbind_request(token: contextvars.Token[RequestTag | None]) -> None:
    _REQUEST.reset(token)


def current_request_id() -> str | None:
    tag = _REQUEST.get()
    return None if tag is None else tag.id


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id``: the id of the request being handled, or ``-``."""

    def filter(self, record: logging.LogRecord) -> bool:
        tag = _REQUEST.get()
        record.request_id = "-" if tag is None else tag.id
        return True


#: the log format of every modelyard command
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(level: int | str) -> None:
    """``logging.basicConfig`` with :data:`LOG_FORMAT` and the request-id filter on the root handlers."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())


# ---------------------------------------------------------------------- OpenTelemetry


@dataclass
class TracingConfig:
    """OpenTelemetry tracing (needs ``pip install 'modelyard[tracing]'``); off unless ``enabled``."""

    enabled: bool = False
    #: OTLP/gRPC collector address (host:port, or http://host:port)
    endpoint: str = "127.0.0.1:4317"
    #: ``service.name`` of the spans (empty: the component's, e.g. modelyard-serve)
    service_name: str = ""
    #: share of new traces recorded (a request with a traceparent follows its sampled flag)
    sample_ratio: float = 1.0
    #: seconds between span exports (the batch processor's delay)
    export_interval: float = 1.0

    def validate(self, check: Check) -> None:
        check(bool(self.endpoint), "endpoint", "is required")
        check(0.0 <= self.sample_ratio <= 1.0, "sample_ratio", "must be within 0..1")
        check(self.export_interval > 0, "export_interval", "must be > 0")


SERVER, CLIENT, INTERNAL = "server", "client", "internal"


class Tracing:
    """A tracer provider exporting over OTLP/gRPC, and span helpers taking W3C parents."""

    def __init__(self, cfg: TracingConfig, service: str, exporter: Any = None) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        except ImportError as exc:
            raise RuntimeError("tracing needs the OpenTelemetry SDK: pip install 'modelyard[tracing]'") from exc
        self._trace = trace
        self._kinds = {SERVER: trace.SpanKind.SERVER, CLIENT: trace.SpanKind.CLIENT,
                       INTERNAL: trace.SpanKind.INTERNAL}
        self.provider = TracerProvider(resource=Resource.create({"service.name": cfg.service_name or service}),
                                       sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)))
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            endpoint = cfg.endpoint
            insecure = not endpoint.startswith("https://")
            exporter = OTLPSpanExporter(endpoint=endpoint, insecure=insecure)
        self.provider.add_span_processor(BatchSpanProcessor(exporter,
                                                            schedule_delay_millis=int(cfg.export_interval * 1000)))
        self.tracer = self.provider.get_tracer("modelyard")
        #: wall-clock ns minus perf_counter ns: places spans measured with perf_counter_ns
        self.epoch_offset_ns = time.time_ns() - time.perf_counter_ns()

    def _context(self, parent: Any) -> Any:
        trace = self._trace
        if parent is None:
            return None
        if isinstance(parent, str | bytes):
            tp = parse_traceparent(parent)
            if tp is None:
                return None
            ctx = trace.SpanContext(tp[0], tp[1], is_remote=True, trace_flags=trace.TraceFlags(tp[2] & 1))
            return trace.set_span_in_context(trace.NonRecordingSpan(ctx))
        return trace.set_span_in_context(parent)

    def start(self, name: str, parent: Any = None, kind: str = INTERNAL, start_ns: int | None = None,
              attributes: dict[str, Any] | None = None) -> Any:
        """A span (end it with ``span.end()``) under ``parent``: a span, a ``traceparent`` string, or None."""
        return self.tracer.start_span(name, context=self._context(parent), kind=self._kinds[kind],
                                      start_time=start_ns, attributes=attributes)

    def record(self, name: str, parent: Any, start_perf_ns: int, end_perf_ns: int,
               attributes: dict[str, Any] | None = None) -> Any:
        """A span that already happened, timed with ``time.perf_counter_ns`` (queue, batch, compute)."""
        span = self.tracer.start_span(name, context=self._context(parent), kind=self._kinds[INTERNAL],
                                      start_time=start_perf_ns + self.epoch_offset_ns, attributes=attributes)
        span.end(end_time=end_perf_ns + self.epoch_offset_ns)
        return span

    @staticmethod
    def traceparent(span: Any) -> str:
        """The ``traceparent`` that makes ``span`` the parent of the receiver's spans."""
        ctx = span.get_span_context()
        return format_traceparent(ctx.trace_id, ctx.span_id, int(ctx.trace_flags))

    def error(self, span: Any, message: str) -> None:
        trace = self._trace
        span.set_status(trace.Status(trace.StatusCode.ERROR, message))

    def shutdown(self) -> None:
        self.provider.shutdown()


#: the process's tracing, or None (off): hot paths test this and nothing else
ACTIVE: Tracing | None = None


def setup(cfg: TracingConfig, service: str, exporter: Any = None) -> Tracing | None:
    """Turn tracing on for this process when ``cfg.enabled`` (imports OpenTelemetry only then)."""
    global ACTIVE
    if not cfg.enabled:
        return None
    ACTIVE = Tracing(cfg, service, exporter)
    return ACTIVE


def shutdown() -> None:
    """Flush and stop the exporter (end of the process)."""
    global ACTIVE
    t, ACTIVE = ACTIVE, None
    if t is not None:
        t.shutdown()
