"""The ``modelyard infer | models | health | bench`` subcommands, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelyard.launcher import Endpoints

MODELYARD = str(Path(sys.executable).with_name("modelyard"))
TIMEOUT_S = 60


def modelyard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MODELYARD, *args], capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def test_infer_add_sub_prints_a_table(server: Endpoints) -> None:
    done = modelyard("infer", "add_sub", "-i", "INPUT0=[1,2,3,4]", "-i", "INPUT1=[1,1,1,1]", "--url", server.grpc)
    assert done.returncode == 0, done.stderr
    assert "OUTPUT0" in done.stdout and "[2.0, 3.0, 4.0, 5.0]" in done.stdout


def test_infer_json_uses_declared_datatypes_and_npy_files(server: Endpoints, tmp_path: Path) -> None:
    path = tmp_path / "in.npy"
    np.save(path, np.array([0.5, 1.5, 2.5, 3.5]))
    done = modelyard("infer", "add_sub", "-i", f"INPUT0=@{path}", "-i", "INPUT1=[1,1,1,1]",
                     "-o", "OUTPUT0", "--json", "--url", server.grpc)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert list(out["outputs"]) == ["OUTPUT0"]
    assert out["outputs"]["OUTPUT0"] == {"datatype": "FP32", "shape": [4], "data": [1.5, 2.5, 3.5, 4.5]}


def test_infer_text_batch_and_stream(server: Endpoints) -> None:
    done = modelyard("infer", "text_sentiment_demo", "-i", 'TEXT=["great", "awful"]', "--json", "--url", server.grpc)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"]["LABEL"]["data"] == [["positive"], ["negative"]]
    done = modelyard("infer", "token_stream_demo", "--stream", "--json", "-i", "TEXT=one two", "--url", server.grpc)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["outputs"]["TOKEN"]["data"] for line in lines] == [["one"], ["two"]]


def test_infer_with_datatype_override_for_any_input(server: Endpoints) -> None:
    done = modelyard("infer", "identity", "-i", "INPUT0=[1,2]", "-d", "INPUT0=FP16", "--json", "--url", server.grpc)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outputs"]["OUTPUT0"]["datatype"] == "FP16"


@pytest.mark.parametrize(
    ("args", "status", "needle"),
    [
        (("infer", "no_such_model", "-i", "X=1"), 1, "NOT_FOUND"),
        (("infer", "add_sub", "-i", "INPUT0=[1,2]", "-i", "INPUT1=[1,2,3,4]"), 2, "declared shape"),
        (("infer", "add_sub", "-i", "NOPE=[1]"), 2, "has no input 'NOPE'"),
        (("infer", "identity", "-i", "INPUT0=not-json"), 2, "not JSON"),
    ],
)
def test_errors_are_one_line_with_nonzero_status(server: Endpoints, args: tuple[str, ...], status: int, needle: str) -> None:
    done = modelyard(*args, "--url", server.grpc)
    assert done.returncode == status
    assert needle in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_models_and_health(server: Endpoints) -> None:
    done = modelyard("models", "--json", "--url", server.grpc)
    assert done.returncode == 0, done.stderr
    assert {"name": "identity", "version": "1", "state": "READY", "reason": ""} in json.loads(done.stdout)
    done = modelyard("health", "--url", server.grpc)
    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout and "token_stream_demo" in done.stdout


def test_health_fails_for_unknown_model_and_unreachable_server(server: Endpoints) -> None:
    done = modelyard("health", "-m", "no_such_model", "--json", "--url", server.grpc)
    assert done.returncode == 1
    assert json.loads(done.stdout)["models"] == [{"name": "no_such_model", "ready": False, "health": "SERVICE_UNKNOWN"}]
    done = modelyard("health", "--url", "127.0.0.1:1", "--timeout", "5")
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr and "Traceback" not in done.stderr


def test_bench_reports_counts_and_percentiles(server: Endpoints) -> None:
    done = modelyard("bench", "identity", "-i", "INPUT0=[1.0,2.0]", "-c", "3", "-n", "60", "--json", "--url", server.grpc)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["count"] == 60 and report["errors"] == 0 and report["rps"] > 0
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p90"] <= report["latency_ms"]["p99"]


def test_every_subcommand_has_help() -> None:
    for command in ("infer", "models", "health", "bench"):
        done = modelyard(command, "--help")
        assert done.returncode == 0, done.stderr
        assert "--url" in done.stdout and "--json" in done.stdout
    done = modelyard("--help")
    assert done.returncode == 0
    assert all(c in done.stdout for c in ("infer", "models", "health", "bench"))
