"""The xDS resources the control plane builds from the balancer's pools (pure: no server)."""

from __future__ import annotations

import pytest

pytest.importorskip("envoy.config.endpoint.v3.endpoint_pb2")

from modelyard.balancer.config import config_from_dict
from modelyard.balancer.endpoint import Health, Outcome
from modelyard.balancer.pool import Pool
from modelyard.balancer.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE, build_resources, version_of
from modelyard.clock import FakeClock


def setup(**extra: object) -> tuple[object, dict[str, Pool], FakeClock]:
    cfg = config_from_dict({
        "xds": {"address": "127.0.0.1:0", "envoy_listener": "127.0.0.1:10000"},
        "routes": [{"match": {"model": "m"}, "pool": "a"}, {"match": {"service": "inference.*"}, "pool": "a"},
                   {"match": {}, "split": [{"pool": "a", "weight": 3}, {"pool": "b", "weight": 1}]}],
        "pools": {"a": {"picker": "least_latency", "endpoints": {"static": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]}},
                  "b": {"endpoints": {"static": ["127.0.0.1:4"]}}}, **extra})
    clock = FakeClock()
    pools = {n: Pool(n, p, clock=clock) for n, p in cfg.pools.items()}
    for name, pool in pools.items():
        pool.set_source("static", [(s.address, s.weight) for s in cfg.pools[name].endpoints.static])
    return cfg, pools, clock


def test_endpoints_carry_health_drain_and_weights_from_the_latency_view() -> None:
    cfg, pools, clock = setup()
    a = pools["a"]
    for _ in range(30):  # 1 is fast, 2 is four times slower
        clock.advance(0.01)
        a.record(a.endpoints["127.0.0.1:1"], Outcome.SUCCESS, 0.005, "OK")
        a.record(a.endpoints["127.0.0.1:2"], Outcome.SUCCESS, 0.020, "OK")
    a.set_health("127.0.0.1:3", Health.UNHEALTHY)
    res = build_resources(cfg, pools, clock.now(), "grpc")  # type: ignore[arg-type]
    cla = res[ENDPOINT]["a"]
    by = {loc.lb_endpoints[0].endpoint.address.socket_address.port_value: loc for loc in cla.endpoints}
    assert by[1].load_balancing_weight.value == 100 and 20 <= by[2].load_balancing_weight.value <= 30  # ~1/4
    assert by[1].lb_endpoints[0].health_status == 1  # HEALTHY
    assert by[3].lb_endpoints[0].health_status == 2  # UNHEALTHY
    a.set_draining("127.0.0.1:2", True)
    res = build_resources(cfg, pools, clock.now(), "grpc")  # type: ignore[arg-type]
    ports = {loc.lb_endpoints[0].endpoint.address.socket_address.port_value: loc.lb_endpoints[0].health_status
             for loc in res[ENDPOINT]["a"].endpoints}
    assert ports[2] == 3  # DRAINING


def test_routes_follow_the_balancers_but_model_routes_stay_with_its_own_data_plane() -> None:
    cfg, pools, clock = setup()
    (route_config,) = build_resources(cfg, pools, clock.now(), "envoy")[ROUTE].values()  # type: ignore[arg-type]
    routes = route_config.virtual_hosts[0].routes
    assert len(routes) == 2  # the model-name route needs the request body: not expressible in xDS
    assert routes[0].match.prefix == "/inference.*/" or routes[0].match.safe_regex.regex
    split = routes[1].route.weighted_clusters.clusters
    assert [(c.name, c.weight.value) for c in split] == [("a", 750), ("b", 250)]


def test_envoy_gets_a_socket_listener_and_grpc_clients_an_api_listener() -> None:
    cfg, pools, clock = setup()
    envoy = build_resources(cfg, pools, clock.now(), "envoy")  # type: ignore[arg-type]
    grpc_ = build_resources(cfg, pools, clock.now(), "grpc")  # type: ignore[arg-type]
    (lst,) = envoy[LISTENER].values()
    assert lst.address.socket_address.port_value == 10000
    assert grpc_[LISTENER]["modelyard"].HasField("api_listener")
    assert envoy[CLUSTER]["a"].lb_policy != grpc_[CLUSTER]["a"].lb_policy  # least request vs round robin
    # versions are content digests: the same state, the same version
    assert version_of(envoy[CLUSTER]) == version_of(build_resources(cfg, pools, clock.now(), "envoy")[CLUSTER])  # type: ignore[arg-type]
