"""REST routing, endpoint HTTP addresses from every source, the pool's REST snapshot, W3C traceparent."""

from __future__ import annotations

import pytest

from modelyard.balancer.config import ConfigError, RouteConfig, config_from_dict
from modelyard.balancer.discovery import parse_endpoint_list
from modelyard.balancer.endpoint import Outcome
from modelyard.balancer.k8s import slice_endpoints, slice_members
from modelyard.balancer.pool import Pool
from modelyard.balancer.rest.wire import (
    BadBody,
    code_name,
    error_response,
    model_from_body,
    model_from_path,
    outcome_of,
)
from modelyard.balancer.routing import Router
from modelyard.config import load
from modelyard.tracing import format_traceparent, parse_traceparent


@pytest.mark.parametrize(("path", "model"), [
    (b"/v2/models/identity/infer", "identity"),
    (b"/v2/models/identity", "identity"),
    (b"/v2/models/identity/versions/3/infer", "identity"),
    (b"/v2/models/my%2Fmodel/ready", "my/model"),
    (b"/v2/repository/models/text/load", "text"),
    (b"/v2/models/stats", None),           # every model's statistics, not a model named "stats"
    (b"/v2/models/stats/ready", "stats"),
    (b"/v2/health/ready", None),
    (b"/v2/models/", None),
    (b"/v1/embeddings", None),
])
def test_the_model_a_kserve_path_names(path: bytes, model: str | None) -> None:
    assert model_from_path(path) == model


def test_the_model_an_openai_body_names_or_what_is_wrong_with_it() -> None:
    assert model_from_body(b'{"model": "gpt", "input": "x"}') == "gpt"
    for body, words in [(b"{nope", "not valid JSON"), (b"[1]", "JSON object"), (b'{"input": 1}', "'model'"),
                        (b'{"model": 3}', "'model'"), (b'{"model": ""}', "'model'"), (b"\xff", "not valid JSON")]:
        with pytest.raises(BadBody, match=words):
            model_from_body(body)


def test_http_statuses_count_like_the_grpc_codes_the_server_maps_them_from() -> None:
    assert [code_name(s) for s in (200, 204, 400, 404, 429, 500, 503, 504)] == [
        "OK", "OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE",
        "DEADLINE_EXCEEDED"]
    assert outcome_of(200) is Outcome.SUCCESS and outcome_of(404) is Outcome.APP_ERROR
    assert outcome_of(503) is Outcome.FAILURE and outcome_of(500) is Outcome.FAILURE


def test_error_responses_are_json_in_kserve_or_openai_shape() -> None:
    kserve = error_response(404, "no route", close=True)
    assert kserve.startswith(b"HTTP/1.1 404 Not Found\r\n") and b"connection: close\r\n" in kserve
    assert kserve.endswith(b'{"error": "no route"}')
    openai = error_response(400, "bad", openai=True)
    assert b'"error": {"message": "bad", "type": "invalid_request_error"' in openai


def test_rest_routes_use_model_globs_and_skip_routes_that_match_grpc_services() -> None:
    routes = [load(RouteConfig, r) for r in (
        {"match": {"service": "grpc.health.v1.*"}, "pool": "health"},
        {"match": {"model": "text_*"}, "pool": "text"},
        {"match": {"method": "ModelInfer", "model": "identity"}, "pool": "grpc-only"},
        {"match": {}, "pool": "default"},
    )]
    router = Router(routes)
    assert router.rest_pool("text_embed") == "text"
    assert router.rest_pool("identity") == "default"
    assert router.rest_pool(None) == "default"
    assert Router(routes[1:2]).rest_pool("identity") is None  # no catch-all: no route


def test_every_source_can_give_an_endpoints_http_address() -> None:
    assert parse_endpoint_list(["a:1", {"address": "b:2", "weight": 3, "http": "b:3"}]) == [
        ("a:1", 1.0), ("b:2", 3.0, "b:3")]
    with pytest.raises(ValueError, match="http"):
        parse_endpoint_list([{"address": "b:2", "http": "nope"}])
    item = {"ports": [{"name": "grpc", "port": 8001}, {"name": "http", "port": 8000}],
            "endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["fd00::1"]},
                          {"addresses": ["10.0.0.2"], "conditions": {"ready": False}}]}
    assert slice_members(item, "grpc", "http") == [("10.0.0.1:8001", "10.0.0.1:8000"), ("[fd00::1]:8001", "[fd00::1]:8000")]
    assert slice_members(item, "grpc", "metrics") == [("10.0.0.1:8001", None), ("[fd00::1]:8001", None)]
    assert slice_endpoints(item, "grpc") == ["10.0.0.1:8001", "[fd00::1]:8001"]
    cfg = config_from_dict({"pools": {"p": {"endpoints": {"static": ["a:1", {"address": "b:2", "http": "b:3"}]}}},
                            "rest": {"listeners": ["127.0.0.1:9000"]}})
    assert [(s.address, s.http) for s in cfg.pools["p"].endpoints.static] == [("a:1", None), ("b:2", "b:3")]
    with pytest.raises(ConfigError) as info:
        config_from_dict({"pools": {"p": {"endpoints": {"static": [{"address": "b:2", "http": "x"}]}}},
                          "rest": {"listeners": ["nope"], "max_headers": 0, "idempotent_paths": ["v2"]}})
    text = str(info.value)
    for path in ("pools.p.endpoints.static[0].http", "rest.listeners[0].address", "rest.max_headers",
                 "rest.idempotent_paths"):
        assert path in text, text


def test_the_rest_snapshot_is_the_grpc_snapshot_when_every_endpoint_has_an_http_address() -> None:
    pool = Pool("p", config_from_dict({"pools": {"p": {}}}).pools["p"])
    pool.set_source("static", [("a:1", 1.0, "a:2"), ("b:1", 1.0, "b:2")])
    assert pool.http_snapshot is pool.snapshot  # one snapshot: pickers see the same object
    pool.set_source("static", [("a:1", 1.0, "a:2"), ("b:1", 1.0)])
    assert [e.address for e in pool.http_snapshot.endpoints] == ["a:1"]
    assert len(pool.snapshot) == 2
    pool.add("b:1", source="admin", http="b:2")  # another source knows its HTTP address
    assert pool.endpoints["b:1"].http == "b:2" and pool.http_snapshot is pool.snapshot
    assert {r["address"]: r["http"] for r in pool.describe()} == {"a:1": "a:2", "b:1": "b:2"}
    worker = Pool("p", pool.config)
    worker.apply_control_state(pool.control_state())  # workers learn the HTTP addresses too
    assert worker.endpoints["b:1"].http == "b:2"


def test_traceparent_is_parsed_as_w3c_specifies() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert parse_traceparent(tp) == (0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7, 1)
    assert parse_traceparent(tp.encode()) == parse_traceparent(tp)
    assert format_traceparent(*parse_traceparent(tp)) == tp  # type: ignore[misc]
    # a future version may append fields; version 00 may not
    assert parse_traceparent("01" + tp[2:] + "-extra") is not None
    for bad in (None, "", tp + "-x", "ff" + tp[2:], tp.upper(), tp.replace("4bf9", "zzzz"),
                "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",
                tp.replace("-", "_")):
        assert parse_traceparent(bad) is None, bad
