"""gRPC server reflection, both ``grpc.reflection.v1`` (what recent grpcurl asks first) and ``v1alpha``.

grpcio-reflection ships only the v1alpha service. The v1 service is the same protocol under another
package: its messages are field-for-field the v1alpha ones, so one servicer answers both, and
the v1 ``.proto`` descriptor (for ``describe grpc.reflection.v1.ServerReflection``) is derived from
the installed v1alpha descriptor with the package renamed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

V1ALPHA_SERVICE = v1alpha_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def v1_pool() -> descriptor_pool.DescriptorPool:
    """A pool holding ``grpc/reflection/v1/reflection.proto``, derived from the v1alpha file."""
    old = v1alpha_pb2.DESCRIPTOR.package
    fdp = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(fdp)
    fdp.name, fdp.package = V1_FILE, V1_PACKAGE
    fdp.ClearField("options")

    def rename(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
        for m in messages:
            for f in m.field:
                if f.type_name.startswith(f".{old}."):
                    f.type_name = f".{V1_PACKAGE}." + f.type_name[len(old) + 2:]
            rename(m.nested_type)

    rename(fdp.message_type)
    for service in fdp.service:
        for method in service.method:
            method.input_type = method.input_type.replace(f".{old}.", f".{V1_PACKAGE}.")
            method.output_type = method.output_type.replace(f".{old}.", f".{V1_PACKAGE}.")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return pool


class Pools:
    """Reflection over several descriptor pools, the first that knows a symbol wins
    (modelyard's private pool, the v1 reflection file, then protobuf's default one)."""

    def __init__(self, *pools: Any) -> None:
        self._pools = pools

    def _first(self, method: str, *args: Any) -> Any:
        for p in self._pools:
            try:
                return getattr(p, method)(*args)
            except KeyError:
                continue
        raise KeyError(args[0] if args else method)

    def FindFileByName(self, name: str) -> Any:
        return self._first("FindFileByName", name)

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        return self._first("FindFileContainingSymbol", symbol)

    def FindMessageTypeByName(self, name: str) -> Any:
        return self._first("FindMessageTypeByName", name)

    def FindExtensionByNumber(self, message: Any, number: int) -> Any:
        return self._first("FindExtensionByNumber", message, number)

    def FindAllExtensions(self, message: Any) -> Any:
        return self._first("FindAllExtensions", message)


def enable_reflection(server: grpc.aio.Server, services: Iterable[str], *pools: Any, guard: Any = None) -> None:
    """Serve reflection v1 and v1alpha on ``server`` for ``services`` (both reflection services are added);
    behind ``guard`` (:class:`modelyard.server.guard.Guard`) as a reflection call when there is one."""
    from modelyard.server.frontends.grpc_api import guarded
    from modelyard.server.guard import REFLECTION

    names = (*services, V1_SERVICE, V1ALPHA_SERVICE)
    servicer = ReflectionServicer(names, pool=Pools(*pools, v1_pool(), descriptor_pool.Default()))
    handler = grpc.stream_stream_rpc_method_handler(
        guarded(servicer.ServerReflectionInfo, guard, REFLECTION),
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(tuple(
        grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
        for name in (V1_SERVICE, V1ALPHA_SERVICE)
    ))
