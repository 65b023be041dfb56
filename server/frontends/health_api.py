"""The health state (:mod:`modelyard.server.health`) on both ports: ``GET /health`` and
``modelyard.Health/Check`` (protos/modelyard_health.proto), the same document either way."""

from __future__ import annotations

import json
from collections.abc import Callable

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from modelyard.protos import modelyard_health_pb2 as hpb
from modelyard.server.frontends.grpc_api import guarded
from modelyard.server.frontends.rest_api import respond_json
from modelyard.server.guard import HEALTH, Guard
from modelyard.server.health import DEGRADED, HEALTHY, UNHEALTHY, HealthReport

HEALTH_SERVICE = hpb.DESCRIPTOR.services_by_name["Health"].full_name
_STATES = {HEALTHY: hpb.HealthCheckResponse.HEALTHY, DEGRADED: hpb.HealthCheckResponse.DEGRADED,
           UNHEALTHY: hpb.HealthCheckResponse.UNHEALTHY}


def add_health_route(app: web.Application, report: Callable[[], HealthReport]) -> None:
    """``GET /health``: 200 when healthy or degraded, 503 when unhealthy."""

    async def handler(request: web.Request) -> web.Response:
        r = report()
        return await respond_json(request, r.as_json(), status=503 if r.status == UNHEALTHY else 200)

    app.router.add_get("/health", handler)


def add_grpc_health(servicer: health.aio.HealthServicer, server: grpc.aio.Server, guard: Guard | None = None) -> None:
    """``grpc.health.v1.Health`` (Check, Watch); behind ``guard`` as a health call when there is one."""
    if guard is None:
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        return
    request, response = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(guarded(servicer.Check, guard, HEALTH), request.FromString,
                                                     response.SerializeToString),
        "Watch": grpc.unary_stream_rpc_method_handler(guarded(servicer.Watch, guard, HEALTH), request.FromString,
                                                      response.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(health.SERVICE_NAME, handlers),))


def add_health_service(report: Callable[[], HealthReport], server: grpc.aio.Server, guard: Guard | None = None) -> None:
    """``modelyard.Health/Check``: the state, the reasons and the whole JSON document; always OK
    (an unhealthy server still answers, with state UNHEALTHY)."""

    async def check(request: hpb.HealthCheckRequest, context: grpc.aio.ServicerContext) -> hpb.HealthCheckResponse:
        r = report()
        return hpb.HealthCheckResponse(state=_STATES[r.status], reasons=r.reasons, detail_json=json.dumps(r.as_json()))

    handler = grpc.unary_unary_rpc_method_handler(
        guarded(check, guard, HEALTH), request_deserializer=hpb.HealthCheckRequest.FromString,
        response_serializer=hpb.HealthCheckResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(HEALTH_SERVICE, {"Check": handler}),))
