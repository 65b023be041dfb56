"""Instance placement: CPU, GPU (cuda:N) and AUTO, decided from instance groups."""

from __future__ import annotations

import pytest

from modelyard.server.errors import ConfigError
from modelyard.server.execution import devices
from modelyard.server.model_config import InstanceGroup


def test_cpu_groups_place_every_instance_on_cpu():
    assert devices.resolve_devices("m", [InstanceGroup(count=2, kind="CPU")]) == ["cpu", "cpu"]


def test_gpu_group_without_cuda_is_a_clear_load_error(monkeypatch):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 0)
    with pytest.raises(ConfigError) as err:
        devices.resolve_devices("m", [InstanceGroup(count=1, kind="CPU"), InstanceGroup(count=1, kind="GPU")])
    assert "instance_group[1].kind: GPU requested but no CUDA device is available" in str(err.value)
    assert "kind: AUTO" in str(err.value)


def test_auto_group_falls_back_to_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 0)
    assert devices.resolve_devices("m", [InstanceGroup(count=2, kind="AUTO")]) == ["cpu", "cpu"]


def test_gpu_instances_spread_round_robin_over_listed_gpus(monkeypatch):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 4)
    got = devices.resolve_devices("m", [InstanceGroup(count=3, kind="GPU", gpus=[1, 3])])
    assert got == ["cuda:1", "cuda:3", "cuda:1"]
    assert devices.resolve_devices("m", [InstanceGroup(count=2, kind="AUTO")]) == ["cuda:0", "cuda:1"]


def test_gpu_index_that_does_not_exist_is_refused(monkeypatch):
    monkeypatch.setattr(devices, "cuda_device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"instance_group\[0\].gpus: \[2\] not present \(1 visible\)"):
        devices.resolve_devices("m", [InstanceGroup(count=1, kind="GPU", gpus=[2])])


@pytest.mark.gpu
def test_gpu_instance_runs_on_cuda_when_available():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert devices.cuda_device_count() >= 1
    assert devices.resolve_devices("m", [InstanceGroup(count=1, kind="GPU")]) == ["cuda:0"]
