"""The balancer's admission without sockets: the model scanner over arbitrary chunkings, the rules of
gRPC paths and REST paths, refusal trailers."""

from __future__ import annotations

import pytest

from modelyard.balancer.grpcwire import status_block
from modelyard.balancer.guard import SCAN_LIMIT, ModelScanner, admit
from modelyard.balancer.h2.hpack import Decoder
from modelyard.balancer.routing import MORE, peek_string
from modelyard.protos import grpc_service_pb2 as pb
from modelyard.security.config import AuthConfig, RateLimitConfig
from modelyard.security.guard import Caller, Guard, PermissionDenied, RateLimited, Unauthenticated
from modelyard.security.rules import HEALTH, REFLECTION, SERVER, rest_rule_for, rule_for
from modelyard.security.tokens import Principal

PATH = "/inference.GRPCInferenceService/"


def framed(msg: bytes, compressed: bool = False) -> bytes:
    return bytes([1 if compressed else 0]) + len(msg).to_bytes(4, "big") + msg


def infer(model: str, payload: int = 0) -> bytes:
    req = pb.ModelInferRequest(model_name=model)
    if payload:
        req.raw_input_contents.append(b"x" * payload)
    return req.SerializeToString()


def scanner(models: tuple[str, ...] = ("identity*",), number: int = 1) -> ModelScanner:
    guard = Guard(AuthConfig(), RateLimitConfig())
    return ModelScanner(Caller(guard, Principal("t", models), "t"), number)


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 100_000])
def test_every_message_is_checked_whatever_the_chunking(chunk: int) -> None:
    stream = framed(infer("identity", 300)) + framed(infer("identity_2")) + framed(infer("add_sub", 10))
    s = scanner()
    with pytest.raises(PermissionDenied, match="add_sub"):
        for i in range(0, len(stream), chunk):
            s.feed(stream[i:i + chunk])
    # refused as soon as the forbidden model name is whole: before the rest of its message went by
    third = len(stream) - len(framed(infer("add_sub", 10)))
    assert i < third + 5 + 2 + len("add_sub") or chunk > len(stream) - third


def test_allowed_messages_pass_and_state_resets_between_them() -> None:
    s = scanner()
    data = b"".join(framed(infer("identity", n)) for n in (0, 5, 70_000, 1))
    for i in range(0, len(data), 4096):
        s.feed(data[i:i + 4096])
    assert s.checked and s.need == 0 and not s.body


def test_model_field_after_other_fields_and_empty_messages() -> None:
    msg = pb.RepositoryModelLoadRequest(repository_name="r", model_name="secret").SerializeToString()
    with pytest.raises(PermissionDenied, match="secret"):
        scanner(number=2).feed(framed(msg))
    scanner().feed(framed(b""))  # no model named: the replica answers that


def test_compressed_or_hidden_model_names_are_refused_for_restricted_tokens() -> None:
    with pytest.raises(PermissionDenied, match="compressed"):
        scanner().feed(framed(infer("identity"), compressed=True))
    # protobuf writes model_name (field 1) first; a crafted message hides it behind a big field 2
    crafted = b"\x12" + _varint(SCAN_LIMIT + 1000) + b"x" * (SCAN_LIMIT + 1000) + b"\x0a\x08identity"
    with pytest.raises(PermissionDenied, match="first"):
        scanner().feed(framed(crafted)[:SCAN_LIMIT + 100])


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_peek_string_says_when_it_needs_more() -> None:
    msg = infer("identity")
    assert peek_string(msg, 1) == "identity"
    assert peek_string(msg[:5], 1) is MORE
    assert peek_string(b"\x0a\xff", 1) is MORE  # a length varint cut short
    assert peek_string(b"\x0a\x02\xff\xfe", 1) is None  # not UTF-8


def test_rules_of_grpc_paths() -> None:
    assert rule_for(PATH + "ModelInfer").model_number == 1
    load = rule_for(PATH + "RepositoryModelLoad")
    assert (load.model_number, load.operation) == (2, "load")
    assert rule_for(PATH + "ServerLive").kind == HEALTH
    assert rule_for("/grpc.health.v1.Health/Watch").kind == HEALTH
    assert rule_for("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo").kind == REFLECTION
    assert rule_for(PATH + "SystemSharedMemoryStatus").operation == "shared_memory"
    assert rule_for(PATH + "CudaSharedMemoryRegister").operation == "shared_memory"
    assert rule_for("/other.Service/Method").kind == SERVER


def test_rules_of_rest_paths() -> None:
    assert rest_rule_for("/v2/health/ready")[0].kind == HEALTH
    assert rest_rule_for("/v2/models/m/versions/2/ready") == (rest_rule_for("/v2/models/m/ready")[0], "m")
    rule, model = rest_rule_for("/v2/repository/models/bert/unload")
    assert (rule.operation, model) == ("unload", "bert")
    assert rest_rule_for("/v2/models/bert/infer")[1] == "bert"
    assert rest_rule_for("/v2/systemsharedmemory/region/r/register")[0].operation == "shared_memory"
    assert rest_rule_for("/v1/chat/completions") == (rule_for("/x/y"), "")
    assert rest_rule_for("/v2/models/stats") == (rule_for("/x/y"), "")


def test_admit_refuses_with_the_right_codes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text('"limited-0123456789abcdef": {name: lim, models: ["identity"]}\n'
                      '"all-0123456789abcdefghij": {name: all, models: ["*"], rate_limit: {rps: 1, burst: 1}}\n')
    guard = Guard(AuthConfig(tokens_file=str(tokens), reload_interval=0), RateLimitConfig())
    infer_rule, load_rule = rule_for(PATH + "ModelInfer"), rule_for(PATH + "RepositoryModelLoad")
    with pytest.raises(Unauthenticated) as e:
        admit(guard, infer_rule, None, lambda: "10.0.0.1")
    assert e.value.grpc_code == 16 and e.value.http == 401
    with pytest.raises(PermissionDenied) as d:
        admit(guard, load_rule, "Bearer limited-0123456789abcdef", lambda: "10.0.0.1")
    assert d.value.grpc_code == 7
    assert admit(guard, infer_rule, "Bearer limited-0123456789abcdef", lambda: "x") is not None  # scans
    assert admit(guard, infer_rule, "Bearer all-0123456789abcdefghij", lambda: "x") is None  # every model: no scan
    with pytest.raises(RateLimited) as r:
        admit(guard, infer_rule, "Bearer all-0123456789abcdefghij", lambda: "x")
    assert r.value.grpc_code == 8 and r.value.retry_after_ms and r.value.retry_after_ms > 0


def test_refusal_trailers_carry_the_retry_after_hint() -> None:
    block = status_block(8, "slow down", True, ((b"retry-after-ms", b"250"),))
    fields = dict(Decoder().decode(block))
    assert fields[b"grpc-status"] == b"8" and fields[b"retry-after-ms"] == b"250"
    assert fields[b":status"] == b"200"


def test_peer_addresses_keep_the_whole_host_for_the_rate_limiter() -> None:
    from modelyard.security.guard import peer_address, peer_host

    assert peer_host(peer_address(("10.0.0.7", 51234))) == "10.0.0.7"
    assert peer_host(peer_address(("::1", 51234, 0, 0))) == "::1"
    assert peer_host(peer_address(None)) == ""
