"""``modelyard up`` and ``modelyard autoscale`` as a user runs them: real processes end to end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelyard.launcher import Process, modelyard_argv

STACK = {
    "listen": "127.0.0.1:0",
    "rest_listen": "127.0.0.1:0",
    "balancer_admin": "127.0.0.1:0",
    "autoscaler_admin": "127.0.0.1:0",
    "tick": 0.5,
    "pools": {
        "text": {"models": ["text_embed_demo"],
                 "policy": {"mode": "concurrency", "target": 3, "min_replicas": 1, "max_replicas": 3,
                            "stable_window": 8, "panic_window": 2}},
    },
    "traffic": [{"model": "text_embed_demo", "inputs": ['TEXT=["scale me"]'], "profile": "20:4,220:10,20:14"}],
}


def write(tmp_path: Path, doc: dict[str, Any], name: str = "stack.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def descendants(pid: int) -> set[int]:
    """Every process whose parent chain leads to ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        children = {p for p, pp in parents.items() if pp in frontier} - found
        found |= children
        frontier = children
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_up_follows_stepped_load_up_and_down_and_no_request_fails(tmp_path: Path) -> None:
    stack = write(tmp_path, STACK)
    timeline, plot = tmp_path / "timeline.json", tmp_path / "up.png"
    done = subprocess.run(modelyard_argv("up", "--config", str(stack), "--demo", "--no-view", "--timeline",
                                         str(timeline), "--plot", str(plot)),
                          capture_output=True, text=True, timeout=150, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(timeline.read_text())
    replicas = [row["pools"]["text"]["replicas"] for row in data["timeline"]]
    assert max(replicas) >= 2, replicas           # rose with the step
    assert replicas[-1] < max(replicas), replicas  # and fell after it
    (report,) = [t["report"] for t in data["traffic"]]
    assert report["errors"] == 0 and report["count"] > 2000, report
    assert "no request failed" in done.stdout
    assert plot.exists() and plot.stat().st_size > 10_000


@pytest.mark.slow
def test_ctrl_c_stops_every_process_of_the_stack(tmp_path: Path) -> None:
    doc = {**STACK, "traffic": [], "pools": {
        **STACK["pools"],  # type: ignore[dict-item]
        "tools": {"models": ["identity"], "policy": {"min_replicas": 2, "max_replicas": 2}},
    }}
    up = Process(modelyard_argv("up", "--config", str(write(tmp_path, doc)), "--no-view"), name="up",
                 start_timeout=90)
    with up:
        assert up.endpoints is not None and up.endpoints.grpc
        tree = descendants(up.pid or 0)
        # balancer + 1 text replica + 2 tools replicas (plus what they run themselves)
        assert len(tree) >= 4, tree
        up.signal(signal.SIGINT)
        assert up.wait(60) == 0, up.log_tail()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in tree if alive(p)], "processes left behind after Ctrl-C"


def test_up_refuses_an_invalid_stack_with_every_error(tmp_path: Path) -> None:
    bad = {"pools": {"a": {"models": ["m"], "policy": {"target": 0}},
                     "b": {"models": ["m"], "start_timeout": 0}}, "tick": "fast"}
    done = subprocess.run(modelyard_argv("up", "--config", str(write(tmp_path, bad))), capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2
    for needle in ("tick: expected a number", "pools.a.policy.target: must be > 0",
                   "pools.b.start_timeout: must be > 0", "pools.b.models: model 'm' is already served"):
        assert needle in done.stderr, done.stderr


def test_autoscale_refuses_an_invalid_config_and_checks_a_good_one(tmp_path: Path) -> None:
    bad = {"tick": 0, "pools": {"text": {"policy": {"panic_window": 100, "min_replicas": 0},
                                         "actuator": {"kind": "kubernetes"}},
                                "x": {"actuator": {"kind": "ec2"}}}}
    done = subprocess.run(modelyard_argv("autoscale", "--config", str(write(tmp_path, bad, "a.yaml"))),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    for needle in ("tick: must be > 0", "pools.text.policy.panic_window: must be within",
                   "pools.text.policy.min_replicas: may be 0 only with scale_to_zero",
                   "pools.text.actuator.kubernetes: is required", "pools.x.actuator.kind: must be one of"):
        assert needle in done.stderr, done.stderr
    good = {"pools": {"text": {"source": {"balancer_admin": "127.0.0.1:9901"}}}}
    done = subprocess.run(modelyard_argv("autoscale", "--config", str(write(tmp_path, good, "g.yaml")), "--check"),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "config ok" in done.stdout, done.stderr


@pytest.mark.slow
def test_autoscale_daemon_holds_when_metrics_are_down_and_leaves_replicas_on_sigterm(tmp_path: Path) -> None:
    """The metrics source is unreachable: no data, so the daemon holds (and says so once); SIGTERM ends the
    daemon and leaves its replica serving."""
    import urllib.request

    from modelyard.launcher import BalancerProcess

    cfg = {"listeners": [{"address": "127.0.0.1:0"}], "admin": {"address": "127.0.0.1:0"},
           "pools": {"text": {"endpoints": {"static": []}}}}
    with BalancerProcess(config=cfg, extra_args=["--log-level", "WARNING"]) as balancer:
        assert balancer.endpoints is not None
        doc = {"tick": 0.2, "admin": "127.0.0.1:0", "pools": {"text": {
            "policy": {"min_replicas": 1, "max_replicas": 2, "stable_window": 2, "panic_window": 1},
            "source": {"balancer_admin": "127.0.0.1:9", "replicas": False, "timeout": 0.2},
            "actuator": {"kind": "local", "local": {"models": ["identity"],
                                                    "balancer_admin": balancer.endpoints.admin}}}}}
        daemon = Process(modelyard_argv("autoscale", "--config", str(write(tmp_path, doc, "d.yaml"))),
                         name="autoscale", env={**os.environ, "PYTHONUNBUFFERED": "1"})
        replicas: set[int] = set()
        try:
            with daemon:
                assert daemon.endpoints is not None and daemon.endpoints.admin
                deadline = time.monotonic() + 30
                text, holds = "", 0.0
                ready = 'modelyard_autoscaler_ready_replicas{pool="text"} 1.0'
                # the replica starts meanwhile (seconds on a loaded machine): wait for both, not just the holds
                while time.monotonic() < deadline and (holds < 5 or ready not in text):
                    with urllib.request.urlopen(f"http://{daemon.endpoints.admin}/metrics", timeout=5) as r:
                        text = r.read().decode()
                    key = 'modelyard_autoscaler_decisions_total{kind="no_data",pool="text"} '
                    holds = float(text.split(key)[1].split()[0]) if key in text else 0.0
                    time.sleep(0.2)
                assert holds >= 5 and 'modelyard_autoscaler_metrics_missing{pool="text"} 1.0' in text
                assert ready in text
                replicas = descendants(daemon.pid or 0)
                daemon.signal(signal.SIGTERM)
                assert daemon.wait(30) == 0
                log = daemon.read_log()
            assert log.count("not answering") == 1, log  # once per change of state, not once per tick
            assert replicas and all(alive(p) for p in replicas), "SIGTERM must leave the replicas as they are"
        finally:
            for pid in replicas:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


@pytest.mark.slow
def test_scale_from_zero_holds_the_first_request_until_a_replica_is_ready_then_returns_to_zero(
        tmp_path: Path) -> None:
    import urllib.request

    import grpc

    from modelyard.protos import grpc_service_pb2 as pb

    doc = {"listen": "127.0.0.1:0", "rest_listen": "127.0.0.1:0", "balancer_admin": "127.0.0.1:0", "autoscaler_admin": "127.0.0.1:0", "tick": 0.5,
           "pools": {"tools": {"models": ["identity"], "policy": {
               "min_replicas": 0, "scale_to_zero": True, "scale_to_zero_grace": 3, "max_replicas": 2,
               "stable_window": 4, "panic_window": 2}}}}
    up = Process(modelyard_argv("up", "--config", str(write(tmp_path, doc)), "--no-view"), name="up",
                 start_timeout=60)

    def status() -> dict[str, Any]:
        assert up.endpoints is not None
        with urllib.request.urlopen(f"http://{up.endpoints.fields['autoscaler']}/status", timeout=5) as r:
            return dict(json.loads(r.read())["tools"])

    with up:
        assert up.endpoints is not None
        assert status()["replicas"] == 0
        req = pb.ModelInferRequest(model_name="identity")
        req.inputs.add(name="INPUT0", datatype="INT32", shape=[1])
        req.raw_input_contents.append((7).to_bytes(4, "little"))
        t0 = time.monotonic()
        with grpc.insecure_channel(up.endpoints.grpc) as ch:
            resp = pb.ModelInferResponse.FromString(
                ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")(req.SerializeToString(), timeout=20))
        first = time.monotonic() - t0
        assert resp.raw_output_contents[0] == (7).to_bytes(4, "little")
        assert first < 10, f"first request took {first:.2f}s"
        assert status()["ready"] == 1
        # the stack's REST listener reaches the same replica (the actuator gave the balancer its HTTP port)
        body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "INT32", "data": [7]}]}).encode()
        rest = urllib.request.Request(f"http://{up.endpoints.http}/v2/models/identity/infer", data=body,
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(rest, timeout=20) as r:
            assert json.loads(r.read())["outputs"][0]["data"] == [7]
        deadline = time.monotonic() + 40
        while status()["replicas"] != 0:
            assert time.monotonic() < deadline, "the idle pool did not return to zero"
            time.sleep(0.2)
        kinds = [d["kind"] for d in status()["decisions"]]
        assert kinds[0] in ("activation", "scale_up") and "scale_to_zero" in kinds, kinds
