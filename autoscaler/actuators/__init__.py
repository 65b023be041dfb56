"""Actuators apply a pool's desired replica count: ``local`` (processes on this host) and
``kubernetes`` (a Deployment's scale subresource). Both look the same to the daemon (:class:`Actuator`)."""

from __future__ import annotations

from typing import Any, Protocol


class Actuator(Protocol):
    """What the daemon needs from an actuator."""

    kind: str

    async def start(self) -> None:
        """Begin (background tasks, first reads)."""

    async def scale(self, desired: int, reason: str = "") -> None:
        """Ask for ``desired`` replicas (``reason``: the policy's sentence); returns without waiting for them."""

    def counts(self) -> tuple[int, int]:
        """(replicas asked for, replicas ready) as last known."""

    def metrics_urls(self) -> list[str]:
        """HTTP bases of ready replicas whose ``/metrics`` can be scraped (may be empty)."""

    def view(self) -> list[dict[str, Any]]:
        """Rows for displays: one per replica (or one summary row)."""

    async def close(self, stop_replicas: bool = True) -> None:
        """Stop background work; ``stop_replicas`` only matters where the actuator owns the replicas."""
