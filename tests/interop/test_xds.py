"""modelyard's xDS control plane with real clients: the Envoy binary and grpcio's own xDS client
(``xds:///`` target, bootstrap file). Replicas added and removed through the balancer's admin API show
up in their routing with no failed request; bad xDS clients get the protocol's answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from string import Template
from typing import Any

import grpc
import pytest

from modelyard.launcher import BalancerProcess, Process, ServerProcess, free_port

pytest.importorskip("envoy.service.discovery.v3.ads_pb2")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

CLIENT = r'''
import collections, json, sys, time
import grpc
from modelyard.protos import grpc_service_pb2 as pb
target, seconds = sys.argv[1], float(sys.argv[2])
req = pb.ModelInferRequest(model_name="identity")
req.inputs.add(name="INPUT0", datatype="INT32", shape=[1])
req.raw_input_contents.append(b"\1\0\0\0")
ok, errors = 0, collections.Counter()
with grpc.insecure_channel(target) as ch:
    call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            call(req.SerializeToString(), timeout=10)
            ok += 1
        except grpc.RpcError as e:
            errors[f"{e.code().name}: {e.details()}"] += 1
        time.sleep(0.002)
print(json.dumps({"ok": ok, "errors": dict(errors)}), flush=True)
'''


def identity_requests(server: ServerProcess) -> float:
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith('modelyard_requests_total{model="identity",status="OK"'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def admin(balancer: BalancerProcess, method: str, path: str, body: dict[str, Any]) -> None:
    assert balancer.endpoints is not None
    req = urllib.request.Request(f"http://{balancer.endpoints.admin}{path}", data=json.dumps(body).encode(),
                                 method=method, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).read()


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def replicas() -> Iterator[list[ServerProcess]]:
    servers = [ServerProcess(["--log-level", "warning"]) for _ in range(3)]
    try:
        for s in servers:
            s.start()
        yield servers
    finally:
        for s in servers:
            s.stop(timeout=5)


def balancer_with_xds(endpoints: list[str], envoy_listener: str = "") -> BalancerProcess:
    cfg = {"listeners": [{"address": "127.0.0.1:0"}], "admin": {"address": "127.0.0.1:0"},
           "xds": {"address": "127.0.0.1:0", "envoy_listener": envoy_listener, "weight_interval": 0.5},
           "pools": {"default": {"endpoints": {"static": endpoints},
                                 "health_check": {"interval": 0.5, "timeout": 0.5}}}}
    return BalancerProcess(config=cfg, extra_args=["--log-level", "WARNING"])


def churn(balancer: BalancerProcess, replicas: list[ServerProcess]) -> None:
    """Add replica 2 (traffic must reach it), then drain and remove replica 0 (traffic must leave it)."""
    admin(balancer, "POST", "/endpoints", {"pool": "default", "address": replicas[2].grpc_url})
    wait_for(lambda: identity_requests(replicas[2]) > 20, 20, "traffic on the added replica")
    admin(balancer, "POST", "/endpoints/drain", {"pool": "default", "address": replicas[0].grpc_url})
    time.sleep(1.0)  # the clients see DRAINING and finish what they sent
    admin(balancer, "DELETE", "/endpoints", {"pool": "default", "address": replicas[0].grpc_url})
    before = identity_requests(replicas[0])
    time.sleep(1.5)
    assert identity_requests(replicas[0]) == before, "the removed replica still gets traffic"


def rest(stream: Any) -> list[bytes]:
    """What a response stream still yields until it ends (by the server, or at its deadline)."""
    out = []
    try:
        for msg in stream:
            out.append(msg)
    except grpc.RpcError as exc:
        assert exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    return out


def run_client(target: str, seconds: float, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CLIENT, target, str(seconds)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def client_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    return dict(json.loads(out.strip().splitlines()[-1]))


def test_envoy_takes_pools_and_endpoints_from_modelyard_and_follows_churn(replicas: list[ServerProcess],
                                                                          tmp_path: Path) -> None:
    from envoy_proxy import envoy_binary

    try:
        binary = envoy_binary()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    listen = free_port()
    with balancer_with_xds([r.grpc_url for r in replicas[:2]], f"127.0.0.1:{listen}") as balancer:
        assert balancer.endpoints is not None
        host, port = balancer.endpoints.fields["xds"].rsplit(":", 1)
        boot = tmp_path / "envoy.yaml"
        boot.write_text(Template((ROOT / "envoy" / "xds-bootstrap.yaml").read_text()).substitute(
            node_id="envoy-test", admin_port=free_port(), xds_host=host, xds_port=port))
        with Process([binary, "-c", str(boot), "--concurrency", "1", "-l", "error", "--disable-hot-restart"],
                     ready=listen, name="envoy"):
            client = run_client(f"127.0.0.1:{listen}", 9.0)
            churn(balancer, replicas)
            result = client_result(client)
    assert result["ok"] > 200 and not result["errors"], result


def test_a_proxyless_grpc_client_balances_by_itself_and_follows_churn(replicas: list[ServerProcess],
                                                                      tmp_path: Path) -> None:
    with balancer_with_xds([r.grpc_url for r in replicas[:2]]) as balancer:
        assert balancer.endpoints is not None
        boot = tmp_path / "bootstrap.json"
        boot.write_text(json.dumps({
            "xds_servers": [{"server_uri": balancer.endpoints.fields["xds"], "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": "proxyless-test", "locality": {}}}))
        client = run_client("xds:///modelyard", 9.0, {"GRPC_XDS_BOOTSTRAP": str(boot)})
        wait_for(lambda: identity_requests(replicas[0]) > 20 and identity_requests(replicas[1]) > 20, 20,
                 "the client to balance over both replicas")
        churn(balancer, replicas)
        result = client_result(client)
    assert result["ok"] > 200 and not result["errors"], result


def test_bad_xds_clients_get_the_protocols_answers_and_disturb_no_one(replicas: list[ServerProcess]) -> None:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2
    from google.rpc import status_pb2

    from modelyard.balancer.xds import ADS_METHOD, CLUSTER, DELTA_METHOD, ENDPOINT

    node = base_pb2.Node(id="bad", user_agent_name="envoy")
    with balancer_with_xds([r.grpc_url for r in replicas[:2]]) as balancer, \
            grpc.insecure_channel(balancer.endpoints.fields["xds"]) as ch:  # type: ignore[union-attr]
        raw = ch.stream_stream(ADS_METHOD)
        ads = ch.stream_stream(ADS_METHOD, request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString)
        # garbage bytes: INVALID_ARGUMENT for that stream only
        with pytest.raises(grpc.RpcError) as info:
            list(raw(iter([b"\xff\xff\xff garbage"]), timeout=15))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        # incremental xDS is not served
        with pytest.raises(grpc.RpcError) as info:
            list(ch.stream_stream(DELTA_METHOD)(iter([b""]), timeout=5))
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
        # unknown type and unknown names: nothing for them; a NACK is not answered with the same version
        requests = [
            discovery_pb2.DiscoveryRequest(node=node, type_url="type.googleapis.com/nope.Nope"),
            discovery_pb2.DiscoveryRequest(node=node, type_url=ENDPOINT, resource_names=["no-such-pool", "default"]),
        ]
        stream = ads(iter(requests), timeout=15)
        first = discovery_pb2.DiscoveryResponse.FromString(next(stream))
        assert first.type_url == ENDPOINT and len(first.resources) == 1  # only the pool that exists
        assert rest(stream) == []  # nothing for the unknown type
        nack = discovery_pb2.DiscoveryRequest(node=node, type_url=CLUSTER)
        replies = []

        def requests_with_nack() -> Iterator[discovery_pb2.DiscoveryRequest]:
            yield nack
            while not replies:
                time.sleep(0.01)
            yield discovery_pb2.DiscoveryRequest(node=node, type_url=CLUSTER, response_nonce=replies[0].nonce,
                                                 version_info="", error_detail=status_pb2.Status(code=3, message="no"))
            time.sleep(1.0)

        stream = ads(requests_with_nack(), timeout=15)
        replies.append(discovery_pb2.DiscoveryResponse.FromString(next(stream)))
        assert rest(stream) == []  # the NACKed version is not pushed again
        # meanwhile a good client is served as usual
        good = ads(iter([discovery_pb2.DiscoveryRequest(node=node, type_url=CLUSTER)]), timeout=15)
        assert discovery_pb2.DiscoveryResponse.FromString(next(good)).resources
