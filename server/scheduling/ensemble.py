"""Ensembles (Triton's ``ensemble_scheduling``): a model that is a graph of other models.

An ensemble has no instances and no batcher of its own. Each step is an ordinary request to its
composing model's :meth:`ModelVersion.infer`, so that model's scheduler batches ensemble steps
together with its other traffic, and its statistics and metrics count them. Tensors pass between
steps as the numpy arrays the steps returned: nothing is serialised or copied.

A step starts as soon as every ensemble tensor it reads exists, so independent branches run
concurrently. Steps that contribute nothing to the requested outputs are not run, and each step
is asked only for the outputs that are read later. The first failing step fails the request
(with its own status code, the message naming the step's model) and cancels the steps still running.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from modelyard.server.errors import ConfigError, ModelExecutionError, ModelNotReady, as_modelyard_error
from modelyard.server.model_config import ModelConfig, TensorSpec
from modelyard.server.scheduling.scheduler import BatchObserver, Scheduler
from modelyard.server.types import InferRequest, InferResponse

if TYPE_CHECKING:
    from modelyard.server.model import ModelVersion

#: (model name, version or "" for the highest loaded) -> that model version; the repository's ``get``
Resolve = Callable[[str, str], "ModelVersion"]


# ------------------------------------------------------------------ load-time checks


@dataclass(slots=True)
class _Node:
    """One side of an ensemble tensor: who declares it, its datatype and its shape with the batch dimension."""

    who: str
    spec: TensorSpec
    batching: bool

    def full_dims(self) -> list[int] | None:
        if self.spec.dims is None:
            return None
        return ([-1] if self.batching else []) + list(self.spec.dims)


def _dims_agree(a: list[int] | None, b: list[int] | None) -> bool:
    if a is None or b is None:  # a tensor of any shape: checked per request by the model itself
        return True
    return len(a) == len(b) and all(x == -1 or y == -1 or x == y for x, y in zip(a, b, strict=True))


def _consistent(producer: _Node, consumer: _Node) -> str:
    """Why ``consumer`` cannot read what ``producer`` writes ("" when it can)."""
    if not consumer.spec.accepts(producer.spec.datatype) and not producer.spec.accepts(consumer.spec.datatype):
        return f"datatype {producer.spec.datatype} from {producer.who} but {consumer.spec.datatype} in {consumer.who}"
    if not (_dims_agree(producer.spec.dims, consumer.spec.dims)
            or _dims_agree(producer.full_dims(), consumer.full_dims())):
        return f"shape {producer.full_dims()} from {producer.who} but {consumer.full_dims()} in {consumer.who}"
    return ""


def check_composition(cfg: ModelConfig, configs: Mapping[str, ModelConfig]) -> None:
    """Check an ensemble against its composing models' configs; ConfigError listing every problem.

    The graph itself was checked when the config was parsed; here: each step's model exists and is
    not decoupled, allows the ensemble's batch size, every input_map/output_map key is one of its
    tensors, every required input is mapped, and each ensemble tensor has one datatype and shape
    wherever it is written and read.
    """
    es = cfg.ensemble_scheduling
    assert es is not None
    errors: list[str] = []
    batching = cfg.max_batch_size > 0
    written: dict[str, _Node] = {s.name: _Node(f"ensemble input {s.name!r}", s, batching) for s in cfg.inputs}
    reads: list[tuple[str, str, _Node]] = []  # (path, ensemble tensor, reader)
    for i, step in enumerate(es.step):
        at = f"ensemble_scheduling.step[{i}]"
        model = configs.get(step.model_name)
        if model is None:
            errors.append(f"{at}.model_name: model {step.model_name!r} is not loaded")
            continue
        if model.decoupled:
            errors.append(f"{at}.model_name: model {step.model_name!r} is decoupled; ensembles of decoupled "
                          "models are not supported")
        if batching and 0 < model.max_batch_size < cfg.max_batch_size:
            errors.append(f"{at}.model_name: the ensemble allows batch size {cfg.max_batch_size} but model "
                          f"{step.model_name!r} only {model.max_batch_size}")
        step_batching = model.max_batch_size > 0
        for name, tensor in step.input_map.items():
            spec = model.input(name)
            if spec is None:
                errors.append(f"{at}.input_map.{name}: model {step.model_name!r} has no input {name!r} "
                              f"(inputs: {sorted(s.name for s in model.inputs)})")
            else:
                reads.append((f"{at}.input_map.{name}", tensor,
                              _Node(f"input {name!r} of model {step.model_name!r}", spec, step_batching)))
        for spec in model.inputs:
            if spec.name not in step.input_map and not spec.optional:
                errors.append(f"{at}.input_map: input {spec.name!r} of model {step.model_name!r} is not mapped "
                              "to any ensemble tensor")
        for name, tensor in step.output_map.items():
            spec = model.output(name)
            if spec is None:
                errors.append(f"{at}.output_map.{name}: model {step.model_name!r} has no output {name!r} "
                              f"(outputs: {sorted(s.name for s in model.outputs)})")
            else:
                written[tensor] = _Node(f"output {name!r} of model {step.model_name!r}", spec, step_batching)
    for i, spec in enumerate(cfg.outputs):
        reads.append((f"output[{i}]", spec.name, _Node(f"ensemble output {spec.name!r}", spec, batching)))
    for path, tensor, reader in reads:
        writer = written.get(tensor)
        if writer is not None and (why := _consistent(writer, reader)):
            errors.append(f"{path}: ensemble tensor {tensor!r} is inconsistent: {why}")
    if errors:
        raise ConfigError(errors, f"ensemble {cfg.name!r}")


# ------------------------------------------------------------------ execution


@dataclass(frozen=True, slots=True)
class _Plan:
    """The steps one set of requested outputs needs, and the model outputs each must return."""

    steps: tuple[int, ...]
    outputs: dict[int, list[str]]
    #: ensemble tensors that some needed step (or the response) reads
    needed: frozenset[str]


class EnsembleScheduler(Scheduler):
    """Runs an ensemble's steps on their own models (``resolve`` finds them when each step runs)."""

    def __init__(self, config: ModelConfig, resolve: Resolve, observer: BatchObserver | None = None) -> None:
        assert config.ensemble_scheduling is not None
        super().__init__(None, observer)  # type: ignore[arg-type]  # no instances of its own
        self.config = config
        self.resolve = resolve
        self.steps = config.ensemble_scheduling.step
        self._producer = {t: i for i, s in enumerate(self.steps) for t in s.output_map.values()}
        self._plans: dict[frozenset[str], _Plan] = {}
        self._closed = False

    def plan(self, wanted: frozenset[str]) -> _Plan:
        """Walk back from the requested outputs to the steps that produce them (cached per output set)."""
        plan = self._plans.get(wanted)
        if plan is None:
            needed, todo, steps = set(wanted), list(wanted), set()
            while todo:
                i = self._producer.get(todo.pop())
                if i is None or i in steps:
                    continue
                steps.add(i)
                for t in self.steps[i].input_map.values():
                    if t not in needed:
                        needed.add(t)
                        todo.append(t)
            outputs = {i: [m for m, t in self.steps[i].output_map.items() if t in needed] for i in steps}
            plan = self._plans[wanted] = _Plan(tuple(sorted(steps)), outputs, frozenset(needed))
        return plan

    async def infer(self, request: InferRequest) -> InferResponse:
        if self._closed:
            raise ModelNotReady(f"ensemble '{self.config.name}' is unloading")
        t0 = time.perf_counter_ns()
        wanted = frozenset(request.outputs) if request.outputs else frozenset(s.name for s in self.config.outputs)
        plan = self.plan(wanted)
        tensors = dict(request.inputs)
        waiting = list(plan.steps)
        running: dict[asyncio.Task[InferResponse], int] = {}
        try:
            while True:
                for i in [i for i in waiting if all(t in tensors for t in self.steps[i].input_map.values())]:
                    waiting.remove(i)
                    task = asyncio.ensure_future(self._step(i, request, tensors, plan.outputs[i]))
                    running[task] = i
                if not running:
                    break
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    i = running.pop(task)
                    exc = task.exception()
                    if exc is not None:
                        raise self._step_error(i, exc) from None
                    self._collect(i, task.result(), tensors, plan.needed)
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        if waiting:  # cannot happen for a config that passed validation; never hang on one that did not
            raise ModelExecutionError(f"ensemble '{self.config.name}': steps {waiting} never got their inputs")
        if self.observer is not None:
            self.observer(request.batch_size(), [0], time.perf_counter_ns() - t0, "")
        return InferResponse(outputs={name: tensors[name] for name in wanted if name in tensors})

    async def stream(self, request: InferRequest) -> AsyncIterator[InferResponse]:
        yield await self.infer(request)

    async def _step(self, i: int, request: InferRequest, tensors: dict[str, object],
                    outputs: list[str]) -> InferResponse:
        step = self.steps[i]
        mv = self.resolve(step.model_name, "" if step.model_version == -1 else str(step.model_version))
        sub = InferRequest(model=step.model_name, version=mv.version, id=request.id,
                           inputs={m: tensors[t] for m, t in step.input_map.items()},  # type: ignore[misc]
                           parameters=request.parameters, outputs=outputs, priority=request.priority,
                           deadline=request.deadline)
        return await mv.infer(sub, step=True)

    def _collect(self, i: int, response: InferResponse, tensors: dict[str, object], needed: frozenset[str]) -> None:
        step = self.steps[i]
        for name, tensor in step.output_map.items():
            if tensor not in needed:
                continue
            value = response.outputs.get(name)
            if value is None:
                raise ModelExecutionError(f"in ensemble '{self.config.name}', step {i} (model '{step.model_name}') "
                                          f"returned no output '{name}'")
            tensors[tensor] = value

    def _step_error(self, i: int, exc: BaseException) -> BaseException:
        """The step's own error (same status code), its message naming the ensemble, step and model."""
        if isinstance(exc, asyncio.CancelledError):
            return exc
        err = copy.copy(as_modelyard_error(exc))
        err.message = f"in ensemble '{self.config.name}', step {i} (model '{self.steps[i].model_name}'): {err.message}"
        err.args = (err.message,)
        return err

    async def close(self) -> None:
        """New requests are refused; running ones finish (the model version waits for them)."""
        self._closed = True
