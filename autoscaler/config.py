"""``modelyard autoscale``'s file: pools, each with its policy, its metrics source and its actuator.

Loaded by the one config loader (:mod:`modelyard.config`): every knob has its default in its class
and every error is reported with its path (``pools.text.policy.panic_window: must be within ...``).

.. code-block:: yaml

    tick: 1.0                          # seconds between decisions
    admin: 127.0.0.1:9902              # /metrics and /status of the autoscaler (null: none)
    pools:
      text:
        policy: {mode: concurrency, target: 4, min_replicas: 1, max_replicas: 4}
        source: {balancer_admin: 127.0.0.1:9901}
        actuator:
          kind: local                  # or kubernetes
          local: {models: [text_embed_demo], balancer_admin: 127.0.0.1:9901}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from modelyard.autoscaler.actuators.kubernetes import KubernetesConfig
from modelyard.autoscaler.actuators.local import LocalConfig
from modelyard.autoscaler.metrics import SourceConfig
from modelyard.autoscaler.policy import PolicyConfig
from modelyard.config import Check

SOURCE = "autoscaler config"


@dataclass
class ActuatorConfig:
    """Which actuator applies the decisions, and its settings."""

    kind: Literal["local", "kubernetes"] = "local"
    local: LocalConfig = field(default_factory=LocalConfig)
    kubernetes: KubernetesConfig | None = None

    def validate(self, check: Check) -> None:
        if self.kind == "kubernetes":
            check(self.kubernetes is not None, "kubernetes", "is required with kind: kubernetes "
                  "(at least {deployment: NAME})")


@dataclass
class PoolScaling:
    """One pool: how it is scaled, where its load is read, what applies the decision."""

    policy: PolicyConfig = field(default_factory=PolicyConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    actuator: ActuatorConfig = field(default_factory=ActuatorConfig)


@dataclass
class AutoscaleConfig:
    """The whole daemon."""

    #: seconds between two decisions (Knative's tick: 2 s)
    tick: float = 2.0
    #: where /metrics and /status are served (host:port, 127.0.0.1 unless told otherwise); null = nowhere
    admin: str | None = "127.0.0.1:9902"
    pools: dict[str, PoolScaling] = field(default_factory=dict)

    def validate(self, check: Check) -> None:
        check(self.tick > 0, "tick", "must be > 0")
        check(bool(self.pools), "pools", "at least one pool is required")
        if self.admin is not None:
            host, sep, port = self.admin.rpartition(":")
            check(bool(sep and host and port.isdigit() and int(port) < 65536), "admin",
                  f"expected host:port, got {self.admin!r}")
        for name, pool in self.pools.items():
            if pool.policy.panic_window < self.tick:
                check.fail(f"pools.{name}.policy.panic_window", f"must be >= tick ({self.tick:g} s)")
