"""The server's request context: the request id in its log lines, and -- tracing on -- its spans.

Every gRPC call and REST request binds itself for logging (:func:`modelyard.tracing.bind_request`:
nothing is looked up unless a line is logged). With tracing on (:mod:`modelyard.tracing`), each one is
also a SERVER span, child of the ``traceparent`` it carries, and put on :data:`SPAN`; the schedulers
then record, under it, the request's ``queue`` (waiting for its batch), its ``batch`` (the execution
it was part of: size, instance) and that batch's ``compute``, from the times they measure anyway.
With tracing off the hot path pays one contextvar set per request and a ``tracing.ACTIVE is None``
test per batch; OpenTelemetry is never imported.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from modelyard import tracing

#: the SERVER span of the request being handled (tracing on only)
SPAN: contextvars.ContextVar[Any] = contextvars.ContextVar("modelyard_server_span", default=None)


def _grpc_lookup(context: Any, name: str) -> str | bytes | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def _http_lookup(request: web.Request, name: str) -> str | None:
    return request.headers.get(name)


def enter_grpc(context: Any, method: str) -> Any:
    """A gRPC call starts (its handler's task): bind it for logs; a span when tracing is on.
    Returns the span (None with tracing off), for :func:`exit_grpc`."""
    tracing.bind_request(context, _grpc_lookup)  # the call's own task: nothing to reset
    t = tracing.ACTIVE
    if t is None:
        return None
    span = t.start(method, _grpc_lookup(context, "traceparent"), tracing.SERVER,
                   attributes={"rpc.system": "grpc", "rpc.method": method})
    SPAN.set(span)
    return span


def exit_grpc(span: Any, error: BaseException | None = None) -> None:
    """End the call's span (if any), marked as an error when the call failed."""
    if span is None:
        return
    t = tracing.ACTIVE
    if error is not None and t is not None:
        t.error(span, f"{type(error).__name__}: {error}")
    span.end()


@web.middleware
async def request_context(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """aiohttp middleware: the REST twin of :func:`enter_grpc` / :func:`exit_grpc`."""
    token = tracing.bind_request(request, _http_lookup)
    t = tracing.ACTIVE
    try:
        if t is None:
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        span = t.start(f"{request.method} {route}", request.headers.get("traceparent"), tracing.SERVER,
                       attributes={"http.request.method": request.method, "url.path": request.path})
        span_token = SPAN.set(span)
        try:
            response = await handler(request)
        except BaseException as exc:
            t.error(span, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            SPAN.reset(span_token)
            span.end()
        span.set_attribute("http.response.status_code", response.status)
        if response.status >= 500:
            t.error(span, f"HTTP {response.status}")
        return response
    finally:
        tracing.unbind_request(token)


def current_span() -> Any:
    """The request's span to hang scheduler spans under (None with tracing off)."""
    return SPAN.get() if tracing.ACTIVE is not None else None


def record_execution(parent: Any, queued_ns: int, started_ns: int, finished_ns: int, compute_ns: int,
                     batch_size: int, instance: str, model: str) -> None:
    """``queue`` (queued -> batch start), ``batch`` (start -> results back) and its ``compute`` (the
    instance's own measure, ending when the results came back) under ``parent``; perf_counter ns."""
    t = tracing.ACTIVE
    if t is None or parent is None:
        return
    attrs = {"modelyard.model": model}
    t.record("queue", parent, queued_ns, started_ns, attrs)
    batch = t.record("batch", parent, started_ns, finished_ns,
                     {**attrs, "modelyard.batch_size": batch_size, "modelyard.instance": instance})
    t.record("compute", batch, max(started_ns, finished_ns - compute_ns), finished_ns, attrs)
