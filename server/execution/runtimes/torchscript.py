"""The ``torchscript`` backend: ``<version>/model.pt`` (or ``default_model_filename``), I/O from config.

Inputs are passed to ``forward`` positionally in config order; a tensor output (or
a tuple/list of them) maps to the config outputs in order. Requests of a batch are
joined along dim 0 when their trailing shapes agree, otherwise run one by one
(a scripted model cannot be padded generically).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelyard.server.errors import ConfigError, InvalidInput
from modelyard.server.execution.runtimes.base import Result, Runtime
from modelyard.server.execution.runtimes.transformers import default_threads, param_int
from modelyard.server.types import InferRequest, InferResponse


class TorchScriptRuntime(Runtime):
    """A scripted/traced torch module on one device."""

    def load(self) -> None:
        import torch

        self.torch = torch
        cfg = self.config
        source = f"model {cfg.name!r}"
        if not cfg.inputs or not cfg.outputs:
            raise ConfigError(["input/output: the torchscript backend needs both declared (names map positionally)"], source)
        if any(s.datatype == "BYTES" for s in cfg.inputs):
            raise ConfigError(["input: the torchscript backend takes numeric tensors only"], source)
        torch.set_num_threads(param_int(cfg.parameters, "torch_threads", default_threads(cfg), source))
        path = self.version_dir / (cfg.default_model_filename or "model.pt")
        if not path.is_file():
            raise ConfigError([f"{path.name}: missing in {self.version_dir}"], source)
        self.module = torch.jit.load(str(path), map_location=self.device).eval()

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            out: Any = self.module(*[torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays])
        outs = list(out) if isinstance(out, list | tuple) else [out]
        if len(outs) < len(self.config.outputs):
            raise RuntimeError(f"model returned {len(outs)} tensors, config declares {len(self.config.outputs)} outputs")
        return [t.detach().cpu().numpy() for t in outs[: len(self.config.outputs)]]

    def _respond(self, arrays: list[np.ndarray]) -> InferResponse:
        return InferResponse(outputs={spec.name: a for spec, a in zip(self.config.outputs, arrays, strict=True)})

    def execute(self, requests: list[InferRequest]) -> list[Result]:
        names = [s.name for s in self.config.inputs]
        try:
            per_req = [[r.inputs[n] for n in names] for r in requests]
        except KeyError as exc:
            return [InvalidInput(f"missing input {exc}")] * len(requests)
        batched = self.config.max_batch_size > 0 and len(requests) > 1 and all(
            [a.shape[1:] for a in arrs] == [a.shape[1:] for a in per_req[0]] for arrs in per_req)
        if not batched:
            return [self._respond(self._run(arrs)) for arrs in per_req]
        joined = [np.concatenate([arrs[k] for arrs in per_req]) for k in range(len(names))]
        outs = self._run(joined)
        results: list[Result] = []
        start = 0
        for arrs in per_req:
            n = arrs[0].shape[0]
            results.append(self._respond([o[start:start + n] for o in outs]))
            start += n
        return results
