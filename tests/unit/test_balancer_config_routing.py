"""Config validation (every error with its path) and routing (model-name peek, splits)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from modelyard.balancer.config import ConfigError, config_from_dict, load_config
from modelyard.balancer.discovery import parse_endpoint_list
from modelyard.balancer.routing import Router, peek_model_name
from modelyard.protos import grpc_service_pb2 as pb

INFER = "/inference.GRPCInferenceService/ModelInfer"


def test_invalid_config_lists_every_error_with_its_path() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({
            "bogus": 1,
            "workers": 0,
            "pools": {"cpu": {"picker": "nope", "retry": {"max_attempts": 0},
                              "endpoints": {"static": ["no-port"]}, "health_check": {"interval": "x"}}},
            "routes": [{"pool": "gpu"}],
        })
    errors = "\n".join(info.value.errors)
    for needle in ("bogus: unknown field", "workers: must be >= 1", "pools.cpu.picker: unknown picker 'nope'",
                   "pools.cpu.retry.max_attempts: must be >= 1", "pools.cpu.endpoints.static[0].address",
                   "pools.cpu.health_check.interval: expected a number", "routes[0].pool: unknown pool 'gpu'"):
        assert needle in errors


def test_minimal_config_gets_a_default_route(tmp_path: Path) -> None:
    f = tmp_path / "b.yaml"
    f.write_text("pools:\n  cpu:\n    endpoints:\n      static: [127.0.0.1:8001, {address: 127.0.0.1:8011, weight: 2}]\n")
    cfg = load_config(f)
    assert cfg.routes[0].pool == "cpu"
    assert [(s.address, s.weight) for s in cfg.pools["cpu"].endpoints.static] == [
        ("127.0.0.1:8001", 1.0), ("127.0.0.1:8011", 2.0)]


def test_bad_yaml_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "b.yaml"
    f.write_text("pools: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_peek_model_name_reads_field_one_without_parsing() -> None:
    req = pb.ModelInferRequest(model_name="text_sentiment_demo", id="42")
    req.inputs.add(name="x", datatype="INT32", shape=[1])
    assert peek_model_name(req.SerializeToString()) == "text_sentiment_demo"
    long_name = "m" * 300  # two-byte length varint
    assert peek_model_name(pb.ModelInferRequest(model_name=long_name).SerializeToString()) == long_name


def test_peek_model_name_finds_field_one_after_other_fields_and_survives_garbage() -> None:
    # field 2 (model_version) written before field 1
    buf = b"\x12\x011" + b"\x0a\x03abc"
    assert peek_model_name(buf) == "abc"
    assert peek_model_name(b"") is None
    assert peek_model_name(b"\xff\xff\xff") is None
    assert peek_model_name(b"\x0a\x7f") is None  # length past the end


def router(routes: list[dict]) -> Router:
    cfg = config_from_dict({"pools": {"cpu": {}, "gpu": {}, "blue": {}, "green": {}}, "routes": routes})
    return Router(cfg.routes, random.Random(0))


def test_routes_by_model_name_then_default() -> None:
    r = router([
        {"match": {"model": "text_*"}, "pool": "cpu"},
        {"match": {"model": "resnet*"}, "pool": "gpu"},
        {"match": {}, "pool": "cpu"},
    ])
    needs_model, resolve = r.resolver(INFER)
    assert needs_model
    assert resolve(pb.ModelInferRequest(model_name="resnet50").SerializeToString()) == "gpu"
    assert resolve(pb.ModelInferRequest(model_name="text_sentiment_demo").SerializeToString()) == "cpu"
    needs_model, resolve = r.resolver("/grpc.health.v1.Health/Check")
    assert not needs_model and resolve(None) == "cpu"


def test_routes_by_service_and_method() -> None:
    r = router([
        {"match": {"service": "grpc.health.v1.*"}, "pool": "gpu"},
        {"match": {"method": "Model*"}, "pool": "blue"},
    ])
    assert r.resolver("/grpc.health.v1.Health/Check")[1](None) == "gpu"
    assert r.resolver(INFER)[1](b"") == "blue"
    assert r.resolver("/other.Svc/Call")[1](None) is None


def test_weighted_split_for_canary() -> None:
    r = router([{"match": {}, "split": [{"pool": "blue", "weight": 90}, {"pool": "green", "weight": 10}]}])
    resolve = r.resolver(INFER)[1]
    counts = Counter(resolve(b"") for _ in range(5000))
    assert 0.08 < counts["green"] / 5000 < 0.12


def test_models_for_pool_lists_exact_names_only() -> None:
    r = router([{"match": {"model": "identity"}, "pool": "cpu"}, {"match": {"model": "res*"}, "pool": "cpu"},
                {"match": {}, "pool": "gpu"}])
    assert r.models_for_pool("cpu") == ["identity"]


def test_endpoint_list_formats() -> None:
    assert parse_endpoint_list(["a:1", {"address": "b:2", "weight": 3}]) == [("a:1", 1.0), ("b:2", 3.0)]
    assert parse_endpoint_list({"endpoints": ["a:1"]}) == [("a:1", 1.0)]
    with pytest.raises(ValueError, match="host:port"):
        parse_endpoint_list(["nope"])
