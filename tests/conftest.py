"""Shared fixtures: real ``modelyard serve`` processes on free ports, always cleaned up."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelyard import launcher


class ServerProcess(launcher.ServerProcess):
    """A ``modelyard serve`` subprocess, started on construction; ``grpc_url`` / ``http_url``."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 60.0) -> None:
        super().__init__(args, start_timeout=ready_timeout, env=env)
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    @property
    def grpc_port(self) -> int:
        return int(self.grpc_url.rsplit(":", 1)[1])

    @property
    def http_port(self) -> int:
        return int(self.http_url.rsplit(":", 1)[1])

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        return self.stop(timeout)

    def close(self) -> None:
        self.stop(timeout=5.0)


@pytest.fixture
def start_server() -> Iterator[type[ServerProcess]]:
    """Factory: ``start_server("--model-repository", path)``; every server started is killed at teardown."""
    started: list[ServerProcess] = []

    class _Tracked(ServerProcess):
        def __init__(self, *args: str, **kwargs: object) -> None:
            started.append(self)
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    yield _Tracked
    for server in started:
        server.close()


@pytest.fixture(scope="module")
def demo_server() -> Iterator[ServerProcess]:
    """One server on the built-in demo models, shared by a test module."""
    server = ServerProcess()
    try:
        yield server
    finally:
        server.close()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


@pytest.fixture
def poll():  # type: ignore[no-untyped-def]
    """``poll(predicate, timeout=...)``: wait for a condition with a deadline (tests never sleep blindly)."""
    return wait_for


@pytest.fixture(scope="session")
def server_cls() -> type[ServerProcess]:
    """The ServerProcess class, for module-scoped fixtures that start their own server
    (test modules cannot import conftest under --import-mode=importlib)."""
    return ServerProcess


# ------------------------------------------------------------------ a real Kubernetes API server

K8S_DIR = Path(os.environ.get("MODELYARD_K8S_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "k8s"))


@dataclass(frozen=True)
class KubeAPI:
    """A running kube-apiserver (+ etcd) on loopback: where it listens and how to be its admin."""

    url: str
    token: str
    kubeconfig: str
    run_dir: Path

    def pid(self, name: str = "kube-apiserver") -> int:
        return int((self.run_dir / f"{name}.pid").read_text())

    def kubeconfig_for(self, token: str, path: Path) -> str:
        """A kubeconfig file that authenticates with ``token`` (e.g. a ServiceAccount's)."""
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters: [{{name: local, cluster: {{server: '{self.url}', insecure-skip-tls-verify: true}}}}]\n"
            f"users: [{{name: u, user: {{token: '{token}'}}}}]\n"
            "contexts: [{name: c, context: {cluster: local, user: u}}]\ncurrent-context: c\n")
        return str(path)


@pytest.fixture(scope="session")
def kube_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPI]:
    """kube-apiserver v1.20.2 + etcd from ../shared/k8s (skipped where that folder is absent)."""
    script = K8S_DIR / "start-apiserver.sh"
    if not script.exists():
        pytest.skip(f"no Kubernetes API server here: {script} is absent (set MODELYARD_K8S_DIR to its folder)")
    run_dir = tmp_path_factory.mktemp("kube")
    done = subprocess.run(["bash", str(script), str(run_dir)], capture_output=True, text=True, timeout=240,
                          check=False)
    try:
        if done.returncode != 0:
            pytest.fail(f"start-apiserver.sh failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        env = dict(line.split("=", 1) for line in (run_dir / "env").read_text().split())
        yield KubeAPI(f"https://127.0.0.1:{env['API_PORT']}", env["TOKEN"], env["KUBECONFIG"], run_dir)
    finally:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            pidfile = run_dir / f"{name}.pid"
            if pidfile.exists():
                pid = int(pidfile.read_text())
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)  # a test may have stopped it
                    os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)


@pytest.fixture
async def kube_admin(kube_api: KubeAPI):  # type: ignore[no-untyped-def]
    """A kubernetes_asyncio ApiClient with the test API server's admin token (closed after the test)."""
    from kubernetes_asyncio import client, config

    cfg = client.Configuration()
    await config.load_kube_config(config_file=kube_api.kubeconfig, client_configuration=cfg)
    api = client.ApiClient(cfg)
    try:
        yield api
    finally:
        await api.close()


# ------------------------------------------------------------------ certificates made at test time (trustme)


@dataclass(frozen=True)
class Certs:
    """PEM files: a test CA, a server certificate for 127.0.0.1/localhost, a client certificate from the
    same CA (mTLS), and a client certificate from another CA the server does not trust."""

    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path

    def serve_args(self, mtls: bool = True) -> list[str]:
        """``modelyard serve`` flags for TLS (and mTLS with this CA)."""
        args = ["--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key)]
        return args + (["--tls-client-ca", str(self.ca)] if mtls else [])


def make_certs(directory: Path, organization: str = "modelyard tests") -> Certs:
    """Write a fresh CA and certificates into ``directory`` (trustme)."""
    import trustme

    ca, rogue_ca = trustme.CA(organization_name=organization), trustme.CA(organization_name="rogue")
    server = ca.issue_cert("127.0.0.1", "localhost", organization_name=organization)
    client, rogue = ca.issue_cert("client@modelyard.test"), rogue_ca.issue_cert("rogue@modelyard.test")
    directory.mkdir(parents=True, exist_ok=True)
    files = Certs(directory, *(directory / n for n in ("ca.pem", "server.pem", "server.key", "client.pem",
                                                        "client.key", "rogue.pem", "rogue.key")))
    ca.cert_pem.write_to_path(str(files.ca))
    for cert, pem, key in ((server, files.server_cert, files.server_key), (client, files.client_cert, files.client_key),
                           (rogue, files.rogue_cert, files.rogue_key)):
        cert.private_key_pem.write_to_path(str(key))
        cert.cert_chain_pems[0].write_to_path(str(pem))
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(str(pem), append=True)
    return files


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """One set of test certificates for the session (see :class:`Certs`)."""
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def cert_factory():  # type: ignore[no-untyped-def]
    """``cert_factory(directory, organization)``: certificates of a test's own (reload tests replace them)."""
    return make_certs
