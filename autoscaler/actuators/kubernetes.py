"""The ``kubernetes`` actuator: a Deployment's ``scale`` subresource, through kubernetes-asyncio.

- **Reads** the Deployment with a watch (list, then watch from the list's resourceVersion; a 410
  Gone or any broken watch re-lists): ``spec.replicas``, ``status.readyReplicas`` and the
  annotations ``autoscaling.modelyard.io/min-replicas`` / ``max-replicas``, which bound the policy's
  desire when present.
- **Writes** with optimistic concurrency: GET ``deployments/{name}/scale``, then PATCH it carrying
  that resourceVersion. A 409 (someone changed it in between) re-reads and tries again; it never
  patches from stale data.
- **Faults** (403 when RBAC forbids, timeouts when the API server does not answer, 5xx): retried
  with exponential backoff and full jitter, logged once per change of state; the loop never dies.
- **Events**: one ``v1`` Event on the Deployment for every scale it applies (``reason:
  ModelyardScaleUp``/``ModelyardScaleDown``, the policy's sentence as the message) and a Warning when
  it cannot (``ModelyardScaleFailed``).

Configuration: in a Pod, the service account (``kubeconfig: ""``); elsewhere a kubeconfig file.
The RBAC it needs is exactly: list/watch ``deployments`` (it reads one by name with a field selector),
get/patch ``deployments/scale``, create ``events`` (see ``deploy/k8s``, where the Role also names the Deployments).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from modelyard.config import Check

log = logging.getLogger("modelyard.autoscaler")

MIN_ANNOTATION = "autoscaling.modelyard.io/min-replicas"
MAX_ANNOTATION = "autoscaling.modelyard.io/max-replicas"


@dataclass
class KubernetesConfig:
    """Which Deployment a pool scales, and how to reach the API server."""

    deployment: str = ""
    namespace: str = "default"
    #: kubeconfig file; empty = the in-cluster service-account configuration
    kubeconfig: str = ""
    #: context in the kubeconfig (empty = its current context)
    context: str = ""
    #: seconds one API request may take
    request_timeout: float = 5.0
    #: first retry delay after a failure (s); doubles up to ``backoff_max``, full jitter
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    #: post an Event on the Deployment for every scale applied (and every failure)
    events: bool = True
    #: seconds a watch request stays open before it is renewed
    watch_timeout: int = 120

    def validate(self, check: Check) -> None:
        check(bool(self.deployment), "deployment", "is required")
        check(bool(self.namespace), "namespace", "is required")
        check(self.request_timeout > 0, "request_timeout", "must be > 0")
        check(0 < self.backoff_initial <= self.backoff_max, "backoff_initial", "must be within (0, backoff_max]")
        check(self.watch_timeout >= 1, "watch_timeout", "must be >= 1")


def _annotation_int(annotations: dict[str, str] | None, key: str) -> int | None:
    value = (annotations or {}).get(key)
    if value is None:
        return None
    try:
        return max(0, int(value))
    except ValueError:
        log.warning("annotation %s=%r is not an integer: ignored", key, value)
        return None


class KubernetesActuator:
    """Keeps one Deployment's replicas at the policy's desire."""

    kind = "kubernetes"

    def __init__(self, pool: str, config: KubernetesConfig, *, on_event: Callable[[str], None] | None = None,
                 api_client: Any = None, rng: random.Random | None = None,
                 before_patch: Callable[[], Awaitable[None]] | None = None) -> None:
        self.pool = pool
        self.config = config
        self.on_event = on_event or (lambda text: None)
        self.rng = rng or random.Random()
        #: test seam: awaited between the read and the write of a scale (a concurrent writer can act there)
        self.before_patch = before_patch
        self._client = api_client
        self._own_client = api_client is None
        #: last known state of the Deployment
        self.spec_replicas = 0
        self.ready_replicas = 0
        self.min_override: int | None = None
        self.max_override: int | None = None
        self.uid = ""
        self.synced = asyncio.Event()
        self.desired: int | None = None
        self.reason = ""
        #: counters (for /status and tests)
        self.applied = 0
        self.conflicts = 0
        self.failures = 0
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._fault = ""

    # ------------------------------------------------------------------ client

    async def _api(self) -> Any:
        if self._client is None:
            from kubernetes_asyncio import client, config

            if self.config.kubeconfig:
                cfg = client.Configuration()
                await config.load_kube_config(config_file=self.config.kubeconfig,
                                              context=self.config.context or None, client_configuration=cfg)
                self._client = client.ApiClient(cfg)
            else:
                config.load_incluster_config()
                self._client = client.ApiClient()
        return self._client

    # ------------------------------------------------------------------ actuator interface

    async def start(self) -> None:
        self._tasks.append(asyncio.ensure_future(self._watch()))
        self._tasks.append(asyncio.ensure_future(self._writer()))

    async def scale(self, desired: int, reason: str = "") -> None:
        self.desired = desired
        self.reason = reason
        self._wake.set()

    def counts(self) -> tuple[int, int]:
        return self.spec_replicas, self.ready_replicas

    def metrics_urls(self) -> list[str]:
        return []

    def view(self) -> list[dict[str, Any]]:
        return [{"name": f"{self.config.namespace}/{self.config.deployment}", "state": "ready" if self.synced.is_set()
                 else "unknown", "replicas": self.spec_replicas, "ready": self.ready_replicas,
                 "min_override": self.min_override, "max_override": self.max_override, "fault": self._fault}]

    def bounded(self, desired: int) -> int:
        """``desired`` within the Deployment's min/max annotations, where it has them."""
        if self.min_override is not None:
            desired = max(desired, self.min_override)
        if self.max_override is not None:
            desired = min(desired, self.max_override)
        return desired

    # ------------------------------------------------------------------ faults

    def _state(self, fault: str) -> None:
        """Log a fault (or its end) once per change of state."""
        if fault == self._fault:
            return
        if fault:
            log.warning("pool %s: Kubernetes: %s (retrying with backoff)", self.pool, fault)
            self.on_event(f"kubernetes: {fault}")
        else:
            log.info("pool %s: Kubernetes API answers again", self.pool)
        self._fault = fault

    @staticmethod
    def _describe(exc: BaseException) -> str:
        status = getattr(exc, "status", None)
        if status == 403:
            return "403 Forbidden (RBAC: the service account may not do this)"
        if status is not None:
            return f"HTTP {status} {getattr(exc, 'reason', '')}".strip()
        if isinstance(exc, TimeoutError | asyncio.TimeoutError):
            return "timed out (the API server does not answer)"
        return f"{type(exc).__name__}: {exc}"

    def _backoff(self, attempt: int) -> float:
        c = self.config
        return self.rng.uniform(0, min(c.backoff_max, c.backoff_initial * 2 ** attempt))

    # ------------------------------------------------------------------ reading (list + watch)

    def _observe(self, dep: Any) -> None:
        meta, spec, status = dep.metadata, dep.spec, dep.status
        self.uid = meta.uid or self.uid
        self.spec_replicas = spec.replicas if spec.replicas is not None else 1
        self.ready_replicas = (status.ready_replicas or 0) if status is not None else 0
        self.min_override = _annotation_int(meta.annotations, MIN_ANNOTATION)
        self.max_override = _annotation_int(meta.annotations, MAX_ANNOTATION)
        self.synced.set()

    async def _watch(self) -> None:
        from kubernetes_asyncio import client, watch
        from kubernetes_asyncio.client.exceptions import ApiException

        c = self.config
        attempt = 0
        while True:
            try:
                apps = client.AppsV1Api(await self._api())
                selector = f"metadata.name={c.deployment}"
                listed = await apps.list_namespaced_deployment(c.namespace, field_selector=selector,
                                                               _request_timeout=c.request_timeout)
                for dep in listed.items:
                    self._observe(dep)
                version = listed.metadata.resource_version
                attempt = 0
                w = watch.Watch()
                async with w.stream(apps.list_namespaced_deployment, c.namespace, field_selector=selector,
                                    resource_version=version, timeout_seconds=c.watch_timeout,
                                    _request_timeout=c.watch_timeout + c.request_timeout) as events:
                    async for event in events:
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self._observe(event["object"])
                        elif event["type"] == "DELETED":
                            self.spec_replicas = self.ready_replicas = 0
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status == 410:  # our resourceVersion is too old: list again, at once
                    log.info("pool %s: watch expired (410 Gone): re-listing", self.pool)
                    continue
                self._state(f"watch: {self._describe(exc)}")
                await asyncio.sleep(self._backoff(attempt))
                attempt += 1
            except Exception as exc:  # timeouts, connection errors: back off and re-list
                self._state(f"watch: {self._describe(exc)}")
                await asyncio.sleep(self._backoff(attempt))
                attempt += 1

    # ------------------------------------------------------------------ writing (GET + PATCH with resourceVersion)

    async def _writer(self) -> None:
        attempt = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.desired is not None:
                try:
                    done = await self.apply_once(self.desired)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.failures += 1
                    self._state(self._describe(exc))
                    await self._post_event("Warning", "ModelyardScaleFailed",
                                           f"cannot scale to {self.desired}: {self._describe(exc)}")
                    await asyncio.sleep(self._backoff(attempt))
                    attempt += 1
                    continue
                attempt = 0
                if done:
                    self._state("")
                    break

    async def apply_once(self, desired: int) -> bool:
        """One read-then-write of the scale subresource; False after a 409 (read again and retry)."""
        from kubernetes_asyncio import client
        from kubernetes_asyncio.client.exceptions import ApiException

        c = self.config
        apps = client.AppsV1Api(await self._api())
        target = self.bounded(desired)
        scale = await apps.read_namespaced_deployment_scale(c.deployment, c.namespace,
                                                            _request_timeout=c.request_timeout)
        current = scale.spec.replicas or 0
        if current == target:
            self.spec_replicas = current
            return True
        if self.before_patch is not None:
            await self.before_patch()
        body = {"metadata": {"resourceVersion": scale.metadata.resource_version}, "spec": {"replicas": target}}
        try:
            await apps.patch_namespaced_deployment_scale(c.deployment, c.namespace, body,
                                                         _request_timeout=c.request_timeout)
        except ApiException as exc:
            if exc.status == 409:
                self.conflicts += 1
                log.info("pool %s: scale of %s changed under us (409): reading it again", self.pool, c.deployment)
                return False
            raise
        self.applied += 1
        self.spec_replicas = target
        verb = "ScaleUp" if target > current else "ScaleDown"
        bound = "" if target == desired else f" (bounded by the Deployment's annotations from {desired})"
        message = f"{current} -> {target} replicas{bound}: {self.reason or 'modelyard autoscaler'}"
        log.info("pool %s: %s/%s scaled %s", self.pool, c.namespace, c.deployment, message)
        self.on_event(f"scaled {current} -> {target}")
        await self._post_event("Normal", f"Modelyard{verb}", message)
        return True

    async def _post_event(self, kind: str, reason: str, message: str) -> None:
        if not self.config.events:
            return
        from kubernetes_asyncio import client

        c = self.config
        now = datetime.datetime.now(datetime.UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{c.deployment}."),
            involved_object=client.V1ObjectReference(api_version="apps/v1", kind="Deployment", name=c.deployment,
                                                     namespace=c.namespace, uid=self.uid or None),
            reason=reason, message=message[:1024], type=kind, count=1, first_timestamp=now, last_timestamp=now,
            source=client.V1EventSource(component="modelyard-autoscaler"))
        try:
            await client.CoreV1Api(await self._api()).create_namespaced_event(c.namespace, event,
                                                                              _request_timeout=c.request_timeout)
        except Exception as exc:  # an Event is worth a log line, never a failed scale
            log.debug("pool %s: could not post event %s: %s", self.pool, reason, exc)

    async def close(self, stop_replicas: bool = True) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._own_client and self._client is not None:
            await self._client.close()
            self._client = None
