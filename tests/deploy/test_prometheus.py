"""deploy/prometheus and deploy/grafana, checked by the real Prometheus (Debian's `prometheus` package:
`prometheus` and `promtool`; skipped with a message where they are absent).

promtool checks both scrape configs and the rules and runs the alert unit tests; then a real Prometheus,
with the shipped rules and the shipped jobs pointed at a live `modelyard serve` + `modelyard balance` +
`modelyard autoscale` carrying traffic, must return at least one series for every recording rule and
for every expression of the Grafana dashboard."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelyard.launcher import BalancerProcess, Process, ServerProcess, free_port, modelyard_argv

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULES = sorted((PROM / "rules").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "modelyard.json"


def binary(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} not found: `make test` installs Debian's prometheus package when run as root "
                    "(apt-get install prometheus)")
    return found


def promtool(*args: str | Path) -> None:
    done = subprocess.run([binary("promtool"), *map(str, args)], capture_output=True, text=True, timeout=120,
                          check=False)
    if done.returncode != 0:
        pytest.fail(f"promtool {' '.join(map(str, args))} failed:\n{done.stdout}{done.stderr}")


# ------------------------------------------------------------------ promtool


def test_compose_scrape_config_and_the_rules_it_loads_pass_promtool_check_config() -> None:
    promtool("check", "config", PROM / "prometheus.yml")


def kubernetes_sd_supported() -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.yml"
        probe.write_text("scrape_configs: [{job_name: x, kubernetes_sd_configs: [{role: pod}]}]\n")
        done = subprocess.run([binary("promtool"), "check", "config", str(probe)], capture_output=True, text=True,
                              timeout=60, check=False)
        return "kubernetes_sd_configs not found" not in done.stdout + done.stderr


def test_kubernetes_scrape_config_passes_promtool_check_config() -> None:
    if not kubernetes_sd_supported():
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's package leaves it "
                    "out); the relabelling is checked by the next test")
    promtool("check", "config", PROM / "prometheus-kubernetes.yml")


def test_kubernetes_scrape_config_relabelling_passes_promtool_with_the_discovery_swapped_out(tmp_path: Path) -> None:
    # Everything but kubernetes_sd_configs (which Debian's build cannot parse): relabel rules, jobs, rules.
    cfg = yaml.safe_load((PROM / "prometheus-kubernetes.yml").read_text())
    for job in cfg["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs"), job["job_name"]
        job["static_configs"] = [{"targets": ["127.0.0.1:1"]}]
    cfg["rule_files"] = [str(PROM / r) for r in cfg["rule_files"]]
    path = tmp_path / "prometheus-kubernetes.static.yml"
    path.write_text(yaml.safe_dump(cfg))
    promtool("check", "config", path)


def test_recording_and_alerting_rules_pass_promtool_check_rules() -> None:
    promtool("check", "rules", *RULES)


def test_burn_rate_alerts_fire_and_resolve_as_their_unit_tests_say() -> None:
    promtool("test", "rules", PROM / "tests" / "alerts_test.yml")


def test_a_broken_rule_fails_promtool_with_its_message_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "modelyard-recording.yml"
    bad.write_text((PROM / "rules" / "modelyard-recording.yml").read_text().replace(
        "sum by (pool) (rate(modelyard_balancer_requests_total[1m]))", "sum by (pool) (rate(modelyard_balancer_requests_total))", 1))
    with pytest.raises(pytest.fail.Exception) as refused:
        promtool("check", "rules", bad)
    assert str(bad) in str(refused.value) and "range vector" in str(refused.value)


# ------------------------------------------------------------------ a live Prometheus


def dashboard_expressions() -> list[str]:
    """Every query of the dashboard, with Grafana's variables as a query of "all" would give them."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    return [e.replace("$__rate_interval", "1m").replace("$pool", ".*").replace("$model", ".*") for e in exprs]


def recorded_names() -> list[str]:
    names = []
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            names += [r["record"] for r in group["rules"] if "record" in r]
    return sorted(set(names))


def test_the_dashboard_queries_recorded_series_and_names_a_datasource_variable() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "modelyard" and dash["templating"]["list"][0]["type"] == "datasource"
    targets = [t for p in dash["panels"] for t in p.get("targets", [])]
    assert targets and all(t["datasource"]["uid"] == "${datasource}" for t in targets)
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("request rate", "error", "p50 / p95 / p99 per pool", "per model", "queue depth",
                  "batch size", "utilisation", "routable", "ejections", "desired"):
        assert topic in titles, topic


def prometheus_ready(port: int, deadline_s: float = 60.0) -> None:
    """Until Prometheus says it is ready (its port opens before the TSDB is: queries answer 503 until then)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"Prometheus not ready after {deadline_s:g}s")
        time.sleep(0.2)


def query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:  # a bad expression: Prometheus says why (400)
        raise AssertionError(f"Prometheus refused {expr!r}: {exc.read().decode()}") from exc
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def scrape_config_for(targets: dict[str, dict[str, Any]], tmp: Path) -> Path:
    """The shipped prometheus.yml with each job pointed at a live process: same jobs, same rules; the
    discovery (compose DNS) becomes static targets carrying the labels discovery would have set."""
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str(PROM / r) for r in cfg["rule_files"]]
    jobs = []
    for job in cfg["scrape_configs"]:
        static = targets.pop(job["job_name"])
        jobs.append({"job_name": job["job_name"], "metrics_path": job.get("metrics_path", "/metrics"),
                     "static_configs": [static]})
    assert not targets, f"jobs the shipped config lacks: {sorted(targets)}"
    cfg["scrape_configs"] = jobs
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """serve + balance + autoscale + traffic through the balancer + a real Prometheus; yields its port."""
    prometheus = binary("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    started: list[Process] = []
    try:
        server = ServerProcess(["--model", "text_embed_demo", "--model", "identity"], name="serve")
        started.append(server)
        server.start()
        balancer = BalancerProcess(config={
            "listeners": [{"address": "127.0.0.1:0"}], "admin": {"address": "127.0.0.1:0"},
            "routes": [{"match": {}, "pool": "text"}],
            "pools": {"text": {"endpoints": {"static": [server.grpc_url]},
                               "health_check": {"interval": 0.5}}}})
        started.append(balancer)
        balancer.start()
        assert balancer.endpoints is not None
        autoscale = tmp / "autoscale.yaml"
        # one replica, held there (min = max): the autoscaler's metrics without a stack to autoscale
        autoscale.write_text(yaml.safe_dump({"tick": 1.0, "admin": "127.0.0.1:0", "pools": {"text": {
            "policy": {"min_replicas": 1, "max_replicas": 1, "stable_window": 6, "panic_window": 2},
            "source": {"balancer_admin": balancer.endpoints.admin},
            "actuator": {"kind": "local", "local": {"models": ["text_embed_demo"],
                                                     "balancer_admin": balancer.endpoints.admin}}}}}))
        autoscaler = Process(modelyard_argv("autoscale", "--config", str(autoscale)), name="autoscale")
        started.append(autoscaler)
        autoscaler.start()
        assert autoscaler.endpoints is not None
        port = free_port()
        config = scrape_config_for({
            "modelyard-server": {"targets": [server.endpoints.http], "labels": {"pool": "text"}},  # type: ignore[union-attr]
            "modelyard-balancer": {"targets": [balancer.endpoints.admin]},
            "modelyard-autoscaler": {"targets": [autoscaler.endpoints.admin]},
        }, tmp)
        prom = Process([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
                        f"--web.listen-address=127.0.0.1:{port}"], ready=port, name="prometheus")
        started.append(prom)
        prom.start()
        prometheus_ready(port)
        # open loop, bounded in rate and time: enough for every rate() window to hold samples
        traffic = Process(modelyard_argv("bench", "text_embed_demo", "-i", 'TEXT=["hello"]', "--url",
                                         balancer.endpoints.grpc, "--rate", "20", "--duration", "90",
                                         "--no-progress"), ready=None, name="bench")
        started.append(traffic)
        traffic.start()
        yield port
    finally:
        for p in reversed(started):
            p.stop(timeout=10)


def missing_series(port: int, exprs: list[str], deadline_s: float) -> list[str]:
    """The expressions that still return no series when the deadline passes (polled, never slept blind)."""
    deadline = time.monotonic() + deadline_s
    pending = list(exprs)
    while pending and time.monotonic() < deadline:
        pending = [e for e in pending if not query(port, e)]
        if pending:
            time.sleep(0.5)
    return pending


@pytest.mark.slow
def test_every_recording_rule_returns_series_from_a_live_stack(stack: int) -> None:
    names = recorded_names()
    assert len(names) >= 30
    empty = missing_series(stack, names, deadline_s=60)
    assert not empty, f"recording rules with no series: {empty}"


@pytest.mark.slow
def test_every_dashboard_expression_returns_series_from_a_live_stack(stack: int) -> None:
    exprs = dashboard_expressions()
    assert len(exprs) >= 20
    empty = missing_series(stack, exprs, deadline_s=60)
    assert not empty, "dashboard expressions with no series:\n" + "\n".join(empty)


@pytest.mark.slow
def test_live_latency_and_error_slis_are_sane(stack: int) -> None:
    # the demo model takes ~16 ms a request: a p99 between it and the SLO, and no server-side error
    p99 = query(stack, 'pool:modelyard_balancer_request_duration_seconds:quantile_rate1m{quantile="0.99",pool="text"}')
    assert p99 and 0.005 < float(p99[0]["value"][1]) < 0.1, p99
    errors = query(stack, 'pool:modelyard_slo_errors:ratio_rate5m{pool="text"}')
    assert errors and float(errors[0]["value"][1]) == 0.0, errors
