"""The kubernetes actuator against a real kube-apiserver (../shared/k8s): scale, events, annotations,
409 from a concurrent update, 403 from a removed RoleBinding, timeouts from a stopped API server.
Only the 410 of an expired watch, which a real server does not give on demand, uses an in-test fake."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

pytest.importorskip("kubernetes_asyncio")

from kubernetes_asyncio import client

from modelyard.autoscaler.actuators.kubernetes import MAX_ANNOTATION, KubernetesActuator, KubernetesConfig
from modelyard.launcher import until as launcher_until

pytestmark = pytest.mark.slow


until = partial(launcher_until, timeout=20.0)


@pytest.fixture
def admin(kube_admin: client.ApiClient) -> client.ApiClient:
    return kube_admin


@pytest.fixture
async def deployment(admin: client.ApiClient) -> AsyncIterator[tuple[str, str]]:
    """A fresh namespace with one Deployment (1 replica, max-replicas annotation 5)."""
    ns = f"t-{uuid.uuid4().hex[:8]}"
    core, apps = client.CoreV1Api(admin), client.AppsV1Api(admin)
    await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    labels = {"app": "text"}
    await apps.create_namespaced_deployment(ns, client.V1Deployment(
        metadata=client.V1ObjectMeta(name="text", annotations={MAX_ANNOTATION: "5"}),
        spec=client.V1DeploymentSpec(
            replicas=1, selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(containers=[client.V1Container(name="serve", image="modelyard:test")])))))
    yield ns, "text"
    await core.delete_namespace(ns)


def actuator(kube_api: Any, ns: str, name: str, kubeconfig: str | None = None, **kw: Any) -> KubernetesActuator:
    cfg = KubernetesConfig(deployment=name, namespace=ns, kubeconfig=kubeconfig or kube_api.kubeconfig,
                           request_timeout=kw.pop("request_timeout", 2.0), backoff_initial=0.05, backoff_max=0.5)
    return KubernetesActuator("text", cfg, **kw)


async def spec_replicas(admin: client.ApiClient, ns: str, name: str) -> int:
    scale = await client.AppsV1Api(admin).read_namespaced_deployment_scale(name, ns)
    return int(scale.spec.replicas)


async def wait_replicas(admin: client.ApiClient, ns: str, name: str, want: int, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while (got := await spec_replicas(admin, ns, name)) != want:
        assert time.monotonic() < deadline, f"replicas {got} != {want}"
        await asyncio.sleep(0.1)


async def test_scales_the_deployment_posts_events_and_honours_its_annotations(
        kube_api: Any, admin: client.ApiClient, deployment: tuple[str, str]) -> None:
    ns, name = deployment
    act = actuator(kube_api, ns, name)
    await act.start()
    try:
        await asyncio.wait_for(act.synced.wait(), 10)
        assert act.counts() == (1, 0) and act.max_override == 5
        await act.scale(3, "concurrency 18.0 in flight at 7/replica over 60s -> 3 replica(s)")
        await wait_replicas(admin, ns, name, 3)
        await act.scale(9, "a burst")
        await wait_replicas(admin, ns, name, 5)  # bounded by the max-replicas annotation
        events = (await client.CoreV1Api(admin).list_namespaced_event(ns)).items
        reasons = [(e.reason, e.message) for e in events if e.involved_object.name == name]
        assert any(r == "ModelyardScaleUp" and "1 -> 3" in m and "in flight" in m for r, m in reasons), reasons
        assert any(r == "ModelyardScaleUp" and "bounded by the Deployment's annotations" in m for r, m in reasons)
        # readiness comes from the watch (the test plays the kubelet: it writes the status)
        await client.AppsV1Api(admin).patch_namespaced_deployment_status(
            name, ns, {"status": {"replicas": 5, "readyReplicas": 4, "availableReplicas": 4}})
        await until(lambda: act.counts() == (5, 4), what="the watch to see 4 ready replicas")
    finally:
        await act.close()


async def test_a_concurrent_update_gives_409_and_the_write_is_redone_on_fresh_data(
        kube_api: Any, admin: client.ApiClient, deployment: tuple[str, str]) -> None:
    ns, name = deployment
    apps = client.AppsV1Api(admin)
    raced = []

    async def someone_else_writes() -> None:
        # between our GET and our PATCH, another writer changes the Deployment (its resourceVersion moves)
        if not raced:
            raced.append(True)
            await apps.patch_namespaced_deployment(name, ns, {"metadata": {"labels": {"touched": "yes"}}})

    act = actuator(kube_api, ns, name, before_patch=someone_else_writes)
    await act.start()
    try:
        await act.scale(4)
        await wait_replicas(admin, ns, name, 4)
        assert act.conflicts == 1 and raced
        dep = await apps.read_namespaced_deployment(name, ns)
        assert dep.metadata.labels.get("touched") == "yes"  # the other writer's change survived
    finally:
        await act.close()


async def test_forbidden_without_its_rolebinding_then_works_again(
        kube_api: Any, admin: client.ApiClient, deployment: tuple[str, str], tmp_path: Path) -> None:
    ns, name = deployment
    core, rbac = client.CoreV1Api(admin), client.RbacAuthorizationV1Api(admin)
    await core.create_namespaced_service_account(ns, client.V1ServiceAccount(
        metadata=client.V1ObjectMeta(name="autoscaler")))
    await rbac.create_namespaced_role(ns, client.V1Role(metadata=client.V1ObjectMeta(name="autoscaler"), rules=[
        client.V1PolicyRule(api_groups=["apps"], resources=["deployments"], verbs=["get", "list", "watch"]),
        client.V1PolicyRule(api_groups=["apps"], resources=["deployments/scale"], verbs=["get", "patch"]),
        client.V1PolicyRule(api_groups=[""], resources=["events"], verbs=["create"]),
    ]))
    binding = client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="autoscaler"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="autoscaler"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="autoscaler", namespace=ns)])
    await rbac.create_namespaced_role_binding(ns, binding)
    token = (await core.create_namespaced_service_account_token(
        "autoscaler", ns, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[])))).status.token
    act = actuator(kube_api, ns, name, kubeconfig=kube_api.kubeconfig_for(token, tmp_path / "sa.kubeconfig"))
    await act.start()
    try:
        await act.scale(2)
        await wait_replicas(admin, ns, name, 2)
        await rbac.delete_namespaced_role_binding("autoscaler", ns)
        failures = act.failures
        await act.scale(3)
        await until(lambda: act.failures >= failures + 2, what="403s, retried with backoff")
        assert "403" in act.view()[0]["fault"]
        assert await spec_replicas(admin, ns, name) == 2
        await rbac.create_namespaced_role_binding(ns, binding)
        await wait_replicas(admin, ns, name, 3, timeout=30)
        await until(lambda: act.view()[0]["fault"] == "", what="the fault to clear")
    finally:
        await act.close()


async def test_a_stopped_api_server_times_out_and_the_scale_lands_once_it_resumes(
        kube_api: Any, admin: client.ApiClient, deployment: tuple[str, str]) -> None:
    ns, name = deployment
    act = actuator(kube_api, ns, name, request_timeout=1.0)
    await act.start()
    pid = kube_api.pid()
    try:
        await asyncio.wait_for(act.synced.wait(), 10)
        os.kill(pid, signal.SIGSTOP)
        try:
            await act.scale(4)
            await until(lambda: act.failures >= 2, what="timeouts while the API server is stopped")
            assert "timed out" in act.view()[0]["fault"]
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_replicas(admin, ns, name, 4, timeout=30)
    finally:
        await act.close()


async def test_an_expired_watch_410_is_followed_by_a_fresh_list() -> None:
    """In-test fake: the real server does not hand out 410 Gone on demand."""
    lists: list[str] = []

    def deployment(replicas: int, ready: int, rv: str) -> dict[str, Any]:
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "text", "namespace": "ml", "resourceVersion": rv, "uid": "u1"},
                "spec": {"replicas": replicas, "selector": {"matchLabels": {"a": "b"}},
                         "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": []}}},
                "status": {"readyReplicas": ready}}

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") in ("1", "true", "True"):
            resp = web.StreamResponse()
            await resp.prepare(request)
            if len(lists) == 1:  # the first watch: an expired resourceVersion
                gone = {"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                                    "message": "too old resource version", "reason": "Expired",
                                                    "code": 410}}
                await resp.write(json.dumps(gone).encode() + b"\n")
                return resp
            await asyncio.sleep(30)
            return resp
        lists.append(request.query.get("resourceVersion", ""))
        replicas, ready = (2, 1) if len(lists) == 1 else (3, 3)
        return web.json_response({"apiVersion": "apps/v1", "kind": "DeploymentList",
                                  "metadata": {"resourceVersion": str(10 * len(lists))},
                                  "items": [deployment(replicas, ready, str(10 * len(lists)))]})

    app = web.Application()
    app.router.add_get("/apis/apps/v1/namespaces/ml/deployments", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    api = client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{runner.addresses[0][1]}"))
    act = KubernetesActuator("text", KubernetesConfig(deployment="text", namespace="ml", events=False,
                                                      backoff_initial=0.05, backoff_max=0.2), api_client=api)
    await act.start()
    try:
        await until(lambda: len(lists) >= 2 and act.counts() == (3, 3), what="a re-list after the 410")
        assert act.failures == 0 and act.view()[0]["fault"] == ""  # an expired watch is routine, not a fault
    finally:
        await act.close()
        await api.close()
        await runner.cleanup()
