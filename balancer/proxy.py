"""The data plane: a service-agnostic gRPC proxy forwarding raw message bytes.

One generic handler serves every method. Methods known to be unary (the inference
service's unary methods, health Check, plus ``unary_methods`` from the config) use a
unary-unary handler and upstream call — the fast path, and the only one that
retries. Everything else is proxied as a bidirectional stream, which on the wire is
compatible with every call kind, so unknown services (reflection, your own) just work.

Forwarded: request metadata (minus transport headers), the remaining deadline (min
with the pool timeout), response headers, trailers, status code and details.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from typing import Any

import grpc

from modelyard.balancer.clock import MONOTONIC, Clock
from modelyard.balancer.endpoint import Endpoint, NoEndpoint, Outcome
from modelyard.balancer.pool import Pool
from modelyard.balancer.retry import backoff
from modelyard.balancer.routing import Router

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
#: serialized grpc.health.v1.HealthCheckResponse{status: NOT_SERVING}
NOT_SERVING_RESPONSE = b"\x08\x02"

#: codes that say the endpoint (not the request) is bad: outlier detection and the EWMA penalty
FAILURE_CODES = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
})
#: metadata keys that belong to the transport, not the application
_HOP_HEADERS = frozenset({
    "user-agent", "te", "content-type", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding",
    "grpc-message-type", "host", ":authority", ":path", ":method", ":scheme", "connection",
    "accept-encoding", "grpc-status", "grpc-message", "lb-token", "content-length",
})


def default_unary_methods() -> set[str]:
    """Unary methods of the services we know (inference, health) from their descriptors."""
    from modelyard.protos import grpc_service_pb2

    out = {HEALTH_CHECK}
    for svc in grpc_service_pb2.DESCRIPTOR.services_by_name.values():
        for m in svc.methods:
            if not m.client_streaming and not m.server_streaming:
                out.add(f"/{svc.full_name}/{m.name}")
    return out


def _clean_metadata(md: Any) -> tuple[tuple[str, Any], ...]:
    if not md:
        return ()
    return tuple((k, v) for k, v in md if k not in _HOP_HEADERS and not k.startswith(":"))


class Proxy(grpc.GenericRpcHandler):
    """Generic handler: route -> pool -> pick -> forward, with retries, circuit breaking and stats."""

    def __init__(
        self,
        router: Router,
        pools: dict[str, Pool],
        unary_methods: set[str],
        *,
        clock: Clock = MONOTONIC,
        rng: random.Random | None = None,
    ) -> None:
        self.router = router
        self.pools = pools
        self.unary_methods = unary_methods
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.draining = False
        self.in_flight = 0
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    # grpc calls this once per RPC; the handler objects are cached per method
    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        h = self._handlers.get(method)
        if h is None:
            h = self._make_handler(method)
            if len(self._handlers) < 10000:  # garbage method names must not grow memory forever
                self._handlers[method] = h
        return h

    def _make_handler(self, method: str) -> grpc.RpcMethodHandler:
        needs_model, resolve = self.router.resolver(method)
        if method in self.unary_methods:
            async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                return await self._unary(method, resolve, request, context)
            return grpc.unary_unary_rpc_method_handler(unary)

        async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
            await self._stream(method, needs_model, resolve, context)
        return grpc.stream_stream_rpc_method_handler(stream)

    # ------------------------------------------------------------------ helpers

    def _pool_for(self, resolve: Callable[[bytes | None], str | None], msg: bytes | None, method: str) -> Pool | None:
        name = resolve(msg)
        return None if name is None else self.pools.get(name)

    def _timeout(self, pool: Pool, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        # grpc reports "no deadline" as a huge number
        if remaining is not None and remaining > 1e8:
            remaining = None
        t = pool.config.timeout
        if t is not None and (remaining is None or t < remaining):
            return t
        return remaining

    # ------------------------------------------------------------------ unary

    async def _unary(self, method: str, resolve: Any, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if self.draining and method == HEALTH_CHECK:
            return NOT_SERVING_RESPONSE
        pool = self._pool_for(resolve, request, method)
        if pool is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"no route for {method}")
        assert pool is not None
        cb = pool.config.circuit_breakers
        stats = pool.stats
        if pool.active >= cb.max_requests:
            stats.count(pool.name, "circuit_open_requests")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"pool '{pool.name}' is over its max_requests ({cb.max_requests})")
        timeout = self._timeout(pool, context)
        deadline = None if timeout is None else self.clock.now() + timeout
        # None, not (), when empty: grpc.aio then skips its per-call tuple -> Metadata conversion
        md = _clean_metadata(context.invocation_metadata()) or None
        pool.budget.deposit()
        rcfg = pool.config.retry
        picker = pool.picker
        now = self.clock.now
        start = now()
        attempt = 1
        exclude: Endpoint | None = None
        self.in_flight += 1
        pool.active += 1
        try:
            while True:
                try:
                    ep = picker.pick(pool.snapshot, exclude)
                except NoEndpoint as exc:
                    stats.count(pool.name, "no_endpoint")
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
                up = ep.extra.get("upstream")
                if up is None:  # retired between snapshot and pick
                    exclude = ep
                    continue
                pending = not up.ready and up.connecting()
                if pending:
                    if pool.pending >= cb.max_pending:
                        stats.count(pool.name, "circuit_open_pending")
                        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                            f"pool '{pool.name}' is over its max_pending ({cb.max_pending})")
                    pool.pending += 1
                is_retry = attempt > 1
                if is_retry:
                    pool.active_retries += 1
                ep.outstanding += 1
                t0 = now()
                call = up.unary(method)(request, timeout=None if deadline is None else deadline - t0, metadata=md)
                try:
                    response = await call
                except grpc.aio.AioRpcError as err:
                    t1 = now()
                    code = err.code()
                    failure = code in FAILURE_CODES
                    ep.outstanding -= 1
                    pool.record(ep, Outcome.FAILURE if failure else Outcome.APP_ERROR, t1 - t0, code.name)
                    if (
                        code is grpc.StatusCode.UNAVAILABLE
                        and attempt < rcfg.max_attempts
                        and len(pool.snapshot) > 0
                    ):
                        delay = backoff(attempt, rcfg, self.rng)
                        if deadline is not None and t1 + delay >= deadline:
                            stats.count(pool.name, "retry_deadline_exceeded")
                        elif pool.active_retries >= cb.max_retries:
                            stats.count(pool.name, "circuit_open_retries")
                        elif not pool.budget.try_withdraw():
                            stats.count(pool.name, "retry_budget_exhausted")
                        else:
                            stats.count(pool.name, "retries")
                            attempt += 1
                            exclude = ep
                            if delay > 0:
                                await asyncio.sleep(delay)
                            continue
                    up.ready = False  # re-check connectivity for max_pending from now on
                    stats.observe_latency(pool.name, now() - start)
                    im = err.initial_metadata()
                    if im:
                        await context.send_initial_metadata(_clean_metadata(im))
                    await context.abort(code, err.details() or "", _clean_metadata(err.trailing_metadata()))
                    raise  # unreachable: abort raises
                except asyncio.CancelledError:
                    ep.outstanding -= 1
                    call.cancel()
                    pool.record(ep, Outcome.APP_ERROR, now() - t0, "CANCELLED")
                    raise
                finally:
                    if pending:
                        pool.pending -= 1
                    if is_retry:
                        pool.active_retries -= 1
                t1 = now()
                ep.outstanding -= 1
                pool.record(ep, Outcome.SUCCESS, t1 - t0, "OK")
                stats.observe_latency(pool.name, t1 - start)
                im = await call.initial_metadata()
                if im:
                    await context.send_initial_metadata(_clean_metadata(im))
                tm = await call.trailing_metadata()
                if tm:
                    context.set_trailing_metadata(_clean_metadata(tm))
                return response
        finally:
            pool.active -= 1
            self.in_flight -= 1

    # ------------------------------------------------------------------ streaming

    async def _stream(self, method: str, needs_model: bool, resolve: Any, context: grpc.aio.ServicerContext) -> None:
        first: Any = None
        if needs_model:
            first = await context.read()
            if first is grpc.aio.EOF:
                first = None
        pool = self._pool_for(resolve, first, method)
        if pool is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"no route for {method}")
        assert pool is not None
        cb = pool.config.circuit_breakers
        stats = pool.stats
        if pool.active >= cb.max_requests:
            stats.count(pool.name, "circuit_open_requests")
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"pool '{pool.name}' is over its max_requests ({cb.max_requests})")
        try:
            ep = pool.picker.pick(pool.snapshot)
        except NoEndpoint as exc:
            stats.count(pool.name, "no_endpoint")
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        up = ep.extra.get("upstream")
        if up is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"endpoint {ep.address} of pool '{pool.name}' went away")
        timeout = self._timeout(pool, context)
        # None, not (), when empty: grpc.aio then skips its per-call tuple -> Metadata conversion
        md = _clean_metadata(context.invocation_metadata()) or None
        now = self.clock.now
        t0 = now()
        call = up.stream(method)(timeout=timeout, metadata=md)
        self.in_flight += 1
        pool.active += 1
        ep.outstanding += 1
        code_name = "UNKNOWN"
        outcome = Outcome.FAILURE

        async def pump() -> None:
            # client -> upstream; upstream failures surface on the read side
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                if needs_model and first is not None:
                    await call.write(first)
                if not (needs_model and first is None):
                    while True:
                        msg = await context.read()
                        if msg is grpc.aio.EOF:
                            break
                        await call.write(msg)
                await call.done_writing()

        pump_task = asyncio.ensure_future(pump())
        try:
            try:
                im = await call.initial_metadata()
                if im:
                    await context.send_initial_metadata(_clean_metadata(im))
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        break
                    await context.write(msg)
                code = await call.code()
            except grpc.aio.AioRpcError as err:
                code = err.code()
            code_name = code.name
            outcome = (Outcome.SUCCESS if code is grpc.StatusCode.OK
                       else Outcome.FAILURE if code in FAILURE_CODES else Outcome.APP_ERROR)
            tm = _clean_metadata(await call.trailing_metadata())
            if code is not grpc.StatusCode.OK:
                await context.abort(code, await call.details() or "", tm)
            if tm:
                context.set_trailing_metadata(tm)
        except asyncio.CancelledError:
            code_name, outcome = "CANCELLED", Outcome.APP_ERROR
            call.cancel()
            raise
        finally:
            pump_task.cancel()
            ep.outstanding -= 1
            pool.active -= 1
            self.in_flight -= 1
            t1 = now()
            pool.record(ep, outcome, t1 - t0, code_name)
            stats.observe_latency(pool.name, t1 - t0)
