"""What each gRPC call of the inference protocol needs from its caller: the kind of call (for
``auth.exempt``), the request field naming its model (checked against the token's ``models``), and
the admin operation it is. One table for ``serve`` (which reads the field from the parsed request)
and ``balance`` (which peeks it, by number, from the serialized request without parsing it).
"""

from __future__ import annotations

from dataclasses import dataclass

from modelyard.security.config import HEALTH, METRICS, REFLECTION

#: a call that needs only a known token (server metadata, lists, inference before its model is known)
SERVER = "server"
INFERENCE_SERVICE = "inference.GRPCInferenceService"
#: health services besides GRPCInferenceService's own ServerLive/ServerReady/ModelReady
HEALTH_SERVICES = frozenset({"grpc.health.v1.Health", "modelyard.Health"})


@dataclass(frozen=True, slots=True)
class Rule:
    kind: str = SERVER
    #: the request field naming the model ("" = none), and its field number
    model_field: str = ""
    model_number: int = 0
    #: the admin operation the call is ("" = none)
    operation: str = ""


ANY_CALLER = Rule()
HEALTH_RULE = Rule(HEALTH)
REFLECTION_RULE = Rule(REFLECTION)

#: GRPCInferenceService methods by name; a method not here is ANY_CALLER
RULES: dict[str, Rule] = {
    "ServerLive": HEALTH_RULE,
    "ServerReady": HEALTH_RULE,
    "ModelReady": Rule(HEALTH, "name", 1),
    "ModelMetadata": Rule(SERVER, "name", 1),
    "ModelConfig": Rule(SERVER, "name", 1),
    "ModelStatistics": Rule(SERVER, "name", 1),
    "ModelInfer": Rule(SERVER, "model_name", 1),
    "ModelStreamInfer": Rule(SERVER, "model_name", 1),
    "RepositoryModelLoad": Rule(SERVER, "model_name", 2, "load"),
    "RepositoryModelUnload": Rule(SERVER, "model_name", 2, "unload"),
    "SystemSharedMemoryRegister": Rule(SERVER, "", 0, "shared_memory"),
    "SystemSharedMemoryUnregister": Rule(SERVER, "", 0, "shared_memory"),
    "SystemSharedMemoryStatus": Rule(SERVER, "", 0, "shared_memory"),
    "CudaSharedMemoryRegister": Rule(SERVER, "", 0, "shared_memory"),
    "CudaSharedMemoryUnregister": Rule(SERVER, "", 0, "shared_memory"),
    "CudaSharedMemoryStatus": Rule(SERVER, "", 0, "shared_memory"),
}


def rule_for(path: str) -> Rule:
    """The rule of a gRPC ``:path`` (``/package.Service/Method``)."""
    service, _, name = path.lstrip("/").partition("/")
    if service == INFERENCE_SERVICE:
        return RULES.get(name, ANY_CALLER)
    if service in HEALTH_SERVICES:
        return HEALTH_RULE
    if service.startswith("grpc.reflection."):
        return REFLECTION_RULE
    return ANY_CALLER


#: REST paths that are health checks (``auth.exempt: [health]`` lets them answer without a token)
_REST_HEALTH = frozenset({"/v2/health/live", "/v2/health/ready", "/health", "/healthz", "/readyz"})


def rest_rule_for(path: str) -> tuple[Rule, str]:
    """The rule of a REST request path (KServe v2 / OpenAI), and the model the path names ("" = none;
    inference bodies name theirs in JSON)."""
    parts = path.strip("/").split("/")
    if path in _REST_HEALTH:
        return HEALTH_RULE, ""
    if path == "/metrics":
        return Rule(METRICS), ""
    if parts == ["v2", "models", "stats"]:  # every model's statistics (lists are filtered by replicas with auth)
        return ANY_CALLER, ""
    if parts[:2] == ["v2", "models"] and len(parts) >= 3:
        if parts[-1] == "ready":
            return HEALTH_RULE, parts[2]
        return ANY_CALLER, parts[2]
    if parts[:3] == ["v2", "repository", "models"] and len(parts) == 5 and parts[4] in ("load", "unload"):
        return Rule(SERVER, "model_name", 0, parts[4]), parts[3]
    if parts[:2] == ["v2", "systemsharedmemory"] or parts[:2] == ["v2", "cudasharedmemory"]:
        return Rule(SERVER, "", 0, "shared_memory"), ""
    return ANY_CALLER, ""
