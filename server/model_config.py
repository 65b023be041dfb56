"""Model configuration: ``<repo>/<model>/config.yaml``, validated with field paths.

The schema follows Triton's ``model_config.proto`` (snake_case YAML), so a Triton
user recognises every field; :func:`to_proto` turns it into the wire message.
Loaded by the one config loader (:mod:`modelyard.config`): every problem is reported
at once, each with its path (``input[1].dims``); defaults are the field defaults below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelyard.config import Check, ConfigError, load, read_yaml
from modelyard.protos import model_config_pb2 as mc
from modelyard.protos.tensors import CONFIG_TYPES, DTYPES

#: not a datatype: configs that used it are told to declare one and list the others in accept_datatypes
ANY = "ANY"
INSTANCE_KINDS = ("CPU", "GPU", "AUTO")
FORMATS = ("FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW")


def _datatype(raw: Any) -> Any:
    """``TYPE_FP32`` / ``fp32`` / ``FP32`` -> ``FP32``; anything else is left for validate to name."""
    if not isinstance(raw, str):
        return raw
    text = raw.upper()
    return CONFIG_TYPES.get(text, text)


@dataclass(slots=True)
class TensorSpec:
    """An input or output: name, protocol datatype, dims without the batch dimension (-1 = variable)."""

    name: str = ""
    #: the datatype metadata and the model config report (one of the protocol's)
    datatype: str = field(default="", metadata={"key": "data_type", "aliases": ("datatype",)})
    #: None = any rank and shape (only for tensors with accept_datatypes: datatype-agnostic demo models)
    dims: list[int] | None = field(default=None, metadata={"aliases": ("shape",)})
    optional: bool = False
    #: modelyard: other datatypes this tensor also takes (inputs) or may have (outputs, left uncast);
    #: the protocol's metadata has room for one datatype, so only ``datatype`` is reported
    accept_datatypes: list[str] = field(default_factory=list)
    #: inputs: Triton's image layout hint FORMAT_NONE / FORMAT_NHWC / FORMAT_NCHW (reported in the config)
    format: str = "FORMAT_NONE"
    #: outputs: a file in the model directory with one label per line, for the classification extension
    label_filename: str = ""

    @classmethod
    def normalize(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping):
            return raw
        out = dict(raw)
        for key in ("data_type", "datatype"):
            if key in out:
                out[key] = _datatype(out[key])
        if isinstance(out.get("format"), str):
            fmt = out["format"].upper()
            out["format"] = fmt if fmt.startswith("FORMAT_") else f"FORMAT_{fmt}"
        if isinstance(out.get("accept_datatypes"), list):
            out["accept_datatypes"] = [_datatype(d) for d in out["accept_datatypes"]]
        return out

    def validate(self, check: Check) -> None:
        check(bool(self.name), "name", "is required")
        if not self.datatype:
            check.fail("datatype", "is required (e.g. TYPE_FP32 or FP32)")
        elif self.datatype == ANY:
            check.fail("datatype", "ANY is not a protocol datatype: declare one (e.g. FP32) and list the others "
                                   "the tensor takes in accept_datatypes")
        elif self.datatype not in DTYPES:
            check.fail("datatype", f"unknown datatype {self.datatype!r}; one of {', '.join(DTYPES)}")
        check(self.format in FORMATS, "format", f"must be one of {', '.join(FORMATS)}, got {self.format!r}")
        f = self.label_filename
        check(not f or (Path(f).name == f and f not in (".", "..")), "label_filename",
              f"must be a file name in the model directory, got {f!r}")
        bad = [d for d in self.accept_datatypes if d not in DTYPES]
        check(not bad, "accept_datatypes", f"unknown datatype(s) {bad}; one of {', '.join(DTYPES)}")
        if self.dims is None:
            check(bool(self.accept_datatypes) or not self.datatype, "dims",
                  "is required (use -1 for a variable dimension)")
        else:
            check(all(d == -1 or d > 0 for d in self.dims), "dims",
                  f"dimensions must be positive or -1, got {self.dims}")

    def accepts(self, datatype: str) -> bool:
        return datatype == self.datatype or datatype in self.accept_datatypes


@dataclass(slots=True)
class InstanceGroup:
    """``count`` instances of ``kind`` (CPU, GPU or AUTO); GPU instances spread over ``gpus``."""

    count: int = 1
    kind: str = "CPU"
    gpus: list[int] = field(default_factory=list)

    @classmethod
    def normalize(cls, raw: Any) -> Any:
        if isinstance(raw, Mapping) and isinstance(raw.get("kind"), str):
            return {**raw, "kind": raw["kind"].upper().removeprefix("KIND_")}
        return raw

    def validate(self, check: Check) -> None:
        check(self.count >= 1, "count", f"must be >= 1, got {self.count}")
        check(self.kind in INSTANCE_KINDS, "kind", f"must be CPU, GPU or AUTO, got {self.kind!r}")
        check(all(g >= 0 for g in self.gpus), "gpus", "must be a list of GPU indices")


@dataclass(slots=True)
class VersionPolicy:
    """Which versions of a model to serve: latest N, all, or a specific list.

    Written as in Triton: ``{latest: {num_versions: N}}``, ``{all: {}}`` or ``{specific: {versions: [...]}}``.
    """

    kind: Literal["latest", "all", "specific"] = "latest"
    num_versions: int = 1
    versions: list[int] = field(default_factory=list)

    @classmethod
    def normalize(cls, raw: Any) -> Any:
        if raw is None:
            return {}
        if not isinstance(raw, Mapping) or len(raw) != 1:
            raise ValueError("must be one of {latest: {num_versions: N}}, {all: {}}, {specific: {versions: [...]}}")
        kind, body = next(iter(raw.items()))
        if kind not in ("latest", "all", "specific"):
            raise ValueError(f"unknown policy {kind!r}; use latest, all or specific")
        if body is not None and not isinstance(body, Mapping):
            raise ValueError(f"{kind}: must be a mapping")
        return {"kind": kind, **(body or {})}

    def validate(self, check: Check) -> None:
        if self.kind == "latest":
            check(self.num_versions >= 1, "num_versions", "must be >= 1")
        if self.kind == "specific":
            check(bool(self.versions) and all(v > 0 for v in self.versions), "versions",
                  "must be a non-empty list of positive integers")


@dataclass(slots=True)
class DynamicBatching:
    """Triton's dynamic batcher knobs (microseconds as in Triton).

    ``dynamic_batching: true`` (or ``{}``) turns it on with these defaults; Triton's
    ``default_queue_policy: {max_queue_size, default_timeout_microseconds}`` is accepted too.
    """

    preferred_batch_size: list[int] = field(default_factory=list)
    max_queue_delay_microseconds: int = 0
    #: 0 = unbounded; beyond it requests are rejected with RESOURCE_EXHAUSTED at once
    max_queue_size: int = 0
    #: 0 = no per-request timeout by default
    default_timeout_microseconds: int = 0
    priority_levels: int = 0
    default_priority_level: int = 0
    preserve_ordering: bool = False

    def __post_init__(self) -> None:
        self.preferred_batch_size = sorted(self.preferred_batch_size)

    @classmethod
    def normalize(cls, raw: Any) -> Any:
        if raw is True:
            return {}
        if isinstance(raw, Mapping) and "default_queue_policy" in raw:
            out = dict(raw)
            policy = out.pop("default_queue_policy") or {}
            if not isinstance(policy, Mapping):
                raise ValueError("default_queue_policy: must be a mapping")
            for key in ("max_queue_size", "default_timeout_microseconds"):
                if key in policy:
                    out.setdefault(key, policy[key])
            return out
        return raw

    def validate(self, check: Check) -> None:
        check(all(x > 0 for x in self.preferred_batch_size), "preferred_batch_size",
              "must be a list of positive integers")
        for key in ("max_queue_delay_microseconds", "max_queue_size", "default_timeout_microseconds",
                    "priority_levels", "default_priority_level"):
            value = getattr(self, key)
            check(value >= 0, key, f"must be >= 0, got {value}")
        if self.priority_levels:
            check(0 < self.default_priority_level <= self.priority_levels, "default_priority_level",
                  f"must be in 1..priority_levels ({self.priority_levels})")


CONTROL_KINDS = ("CONTROL_SEQUENCE_START", "CONTROL_SEQUENCE_READY", "CONTROL_SEQUENCE_END", "CONTROL_SEQUENCE_CORRID")
#: datatypes a CORRID control may have (Triton: a 32-bit type keeps the low 32 bits; STRING for string ids)
CORRID_TYPES = ("UINT64", "INT64", "UINT32", "INT32", "BYTES")


@dataclass(slots=True)
class SequenceControl:
    """One control signal of a control input: START/READY/END as a false/true pair, or CORRID with a datatype."""

    #: the proto's default (0) is START: protobuf JSON leaves a START kind out
    kind: str = "CONTROL_SEQUENCE_START"
    int32_false_true: list[int] = field(default_factory=list)
    fp32_false_true: list[float] = field(default_factory=list)
    bool_false_true: list[bool] = field(default_factory=list)
    data_type: str = ""

    @classmethod
    def normalize(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping):
            return raw
        out = dict(raw)
        if isinstance(out.get("kind"), str):
            kind = out["kind"].upper()
            out["kind"] = kind if kind.startswith("CONTROL_") else f"CONTROL_SEQUENCE_{kind}"
        if "data_type" in out:
            out["data_type"] = _datatype(out["data_type"])
        return out

    def validate(self, check: Check) -> None:
        if not check(self.kind in CONTROL_KINDS, "kind", f"must be one of {', '.join(CONTROL_KINDS)}, got {self.kind!r}"):
            return
        pairs = [p for p in (self.int32_false_true, self.fp32_false_true, self.bool_false_true) if p]
        if self.kind == "CONTROL_SEQUENCE_CORRID":
            check(self.data_type in CORRID_TYPES, "data_type",
                  f"a CORRID control needs data_type TYPE_UINT64, TYPE_INT64, TYPE_UINT32, TYPE_INT32 or TYPE_STRING, "
                  f"got {self.data_type or 'none'!r}")
            check(not pairs, "kind", "a CORRID control takes data_type, not a false/true pair")
        else:
            check(len(pairs) == 1 and len(pairs[0]) == 2, "kind",
                  f"{self.kind} needs exactly one of int32_false_true, fp32_false_true or bool_false_true "
                  "with two values [false, true]")

    def tensor_datatype(self) -> str:
        """The datatype of the tensor this control is delivered in."""
        if self.kind == "CONTROL_SEQUENCE_CORRID":
            return self.data_type
        return "INT32" if self.int32_false_true else "FP32" if self.fp32_false_true else "BOOL"

    def value(self, flag: bool) -> Any:
        """The false or true value of a START/READY/END control."""
        pair = self.int32_false_true or self.fp32_false_true or self.bool_false_true
        return pair[1 if flag else 0]


@dataclass(slots=True)
class SequenceControlInput:
    """A model input through which the sequence batcher tells the model START/READY/END/CORRID."""

    name: str = ""
    control: list[SequenceControl] = field(default_factory=list)

    def validate(self, check: Check) -> None:
        check(bool(self.name), "name", "is required")
        check(len(self.control) == 1, "control",
              "needs exactly one control (one signal per input tensor)")


@dataclass(slots=True)
class SequenceDirect:
    """Each sequence keeps one batch slot on one instance for its whole life (Triton's default strategy)."""

    max_queue_delay_microseconds: int = 0
    #: with max_queue_delay: run a batch early once this fraction of the instance's slots have a request
    minimum_slot_utilization: float = 0.0

    def validate(self, check: Check) -> None:
        check(self.max_queue_delay_microseconds >= 0, "max_queue_delay_microseconds", "must be >= 0")
        check(0.0 <= self.minimum_slot_utilization <= 1.0, "minimum_slot_utilization", "must be in 0..1")


@dataclass(slots=True)
class SequenceOldest:
    """Up to ``max_candidate_sequences`` sequences are candidates; batches take the oldest requests of
    different sequences and run on any instance."""

    max_candidate_sequences: int = 0
    preferred_batch_size: list[int] = field(default_factory=list)
    max_queue_delay_microseconds: int = 0
    preserve_ordering: bool = False

    def validate(self, check: Check) -> None:
        check(self.max_candidate_sequences >= 0, "max_candidate_sequences", "must be >= 0 (0 = max_batch_size x instances)")
        check(all(x > 0 for x in self.preferred_batch_size), "preferred_batch_size", "must be positive integers")
        check(self.max_queue_delay_microseconds >= 0, "max_queue_delay_microseconds", "must be >= 0")


@dataclass(slots=True)
class SequenceBatching:
    """Triton's sequence batcher: requests of one correlation ID run in order, on the model's state.

    ``direct`` (default) or ``oldest``; a sequence that gets no request for
    ``max_sequence_idle_microseconds`` (0 = Triton's default, 1 s) is ended and its slot freed.
    """

    max_sequence_idle_microseconds: int = 0
    control_input: list[SequenceControlInput] = field(default_factory=list)
    direct: SequenceDirect | None = None
    oldest: SequenceOldest | None = None

    def validate(self, check: Check) -> None:
        check(self.max_sequence_idle_microseconds >= 0, "max_sequence_idle_microseconds", "must be >= 0")
        check(self.direct is None or self.oldest is None, "direct", "choose one strategy: direct or oldest")
        seen: set[str] = set()
        for i, ci in enumerate(self.control_input):
            kind = ci.control[0].kind if ci.control else ""
            check(kind not in seen, f"control_input[{i}]", f"{kind} is given twice")
            seen.add(kind)

    @property
    def idle_seconds(self) -> float:
        return (self.max_sequence_idle_microseconds or 1_000_000) / 1e6

    def controls(self) -> list[tuple[str, SequenceControl]]:
        """(input name, control) of every control input."""
        return [(ci.name, ci.control[0]) for ci in self.control_input if ci.control]


@dataclass(slots=True)
class WarmupSample:
    """One warmup request; inputs map name -> {data_type, dims, zero_data|random_data|input_data_file|value}."""

    name: str = ""
    batch_size: int = 1
    count: int = 1
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self, check: Check) -> None:
        check(bool(self.inputs), "inputs", "is required (a mapping of input name -> sample spec)")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.count >= 1, "count", "must be >= 1")


@dataclass(slots=True)
class ResponseCache:
    """Opt-in response cache per model."""

    enable: bool = False
    max_entries: int = 1024
    max_bytes: int = 64 * 1024 * 1024

    def validate(self, check: Check) -> None:
        check(self.max_entries >= 1, "max_entries", "must be >= 1")
        check(self.max_bytes >= 1, "max_bytes", "must be >= 1")


#: ``platform`` of a model that is a pipeline of other models (Triton's word)
ENSEMBLE = "ensemble"


@dataclass(slots=True)
class EnsembleStep:
    """One step of an ensemble: run ``model_name`` on ensemble tensors, name its outputs.

    ``input_map`` is {model input: ensemble tensor}, ``output_map`` {model output: ensemble tensor};
    ``model_version`` -1 is the model's highest loaded version when the step runs.
    """

    model_name: str = ""
    model_version: int = -1
    input_map: dict[str, str] = field(default_factory=dict)
    output_map: dict[str, str] = field(default_factory=dict)

    def validate(self, check: Check) -> None:
        check(bool(self.model_name), "model_name", "is required")
        check(self.model_version == -1 or self.model_version > 0, "model_version",
              f"must be -1 (latest) or a positive version, got {self.model_version}")
        check(bool(self.input_map), "input_map", "must map at least one model input to an ensemble tensor")
        check(bool(self.output_map), "output_map", "must map at least one model output to an ensemble tensor")


@dataclass(slots=True)
class EnsembleScheduling:
    """Triton's ``ensemble_scheduling``: the steps of a pipeline, each a model of the repository.

    Steps run as soon as their input tensors exist, so independent branches run concurrently;
    the order of ``step`` is not the order of execution.
    """

    step: list[EnsembleStep] = field(default_factory=list)

    def validate(self, check: Check) -> None:
        check(bool(self.step), "step", "must list at least one step")


@dataclass(slots=True)
class ModelConfig:
    """A validated model configuration."""

    name: str = ""
    backend: str = "python"
    platform: str = ""
    max_batch_size: int = 0
    inputs: list[TensorSpec] = field(default_factory=list, metadata={"key": "input", "aliases": ("inputs",)})
    outputs: list[TensorSpec] = field(default_factory=list, metadata={"key": "output", "aliases": ("outputs",)})
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    instance_group: list[InstanceGroup] = field(default_factory=lambda: [InstanceGroup()])
    dynamic_batching: DynamicBatching | None = None
    #: Triton's sequence batcher (stateful models: requests of one correlation ID in order)
    sequence_batching: SequenceBatching | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    model_warmup: list[WarmupSample] = field(default_factory=list)
    response_cache: ResponseCache = field(default_factory=ResponseCache)
    #: decoupled models may send zero or many responses per request (streaming only);
    #: Triton's ``model_transaction_policy: {decoupled: true}`` is accepted too
    decoupled: bool = False
    #: modelyard: requests in flight for this model beyond which RESOURCE_EXHAUSTED (0 = unbounded)
    max_concurrency: int = 0
    #: modelyard: per-instance execution in a thread (default) or a worker process
    execution: Literal["thread", "process"] = "thread"
    #: file name inside a version directory the runtime loads (runtime-specific default when empty)
    default_model_filename: str = ""
    #: ``platform: ensemble``: the steps (the model has no instances, runtime or batcher of its own)
    ensemble_scheduling: EnsembleScheduling | None = None

    @classmethod
    def normalize(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping):
            return raw
        out = dict(raw)
        policy = out.pop("model_transaction_policy", None)
        if isinstance(policy, Mapping) and "decoupled" in policy:
            out.setdefault("decoupled", policy["decoupled"])
        params = out.get("parameters")
        if isinstance(params, Mapping):
            # Triton writes parameters as {key: {string_value: "..."}}; accept both shapes.
            out["parameters"] = {k: (v["string_value"] if isinstance(v, Mapping) and "string_value" in v else v)
                                 for k, v in params.items()}
        warmup = out.get("model_warmup")
        if isinstance(warmup, list):
            out["model_warmup"] = [{"name": f"warmup{i}", **w} if isinstance(w, Mapping) else w
                                   for i, w in enumerate(warmup)]
        return out

    def validate(self, check: Check) -> None:
        check(bool(self.backend), "backend", "must be a non-empty string")
        check(self.max_batch_size >= 0, "max_batch_size", f"must be >= 0, got {self.max_batch_size}")
        check(self.max_concurrency >= 0, "max_concurrency", f"must be >= 0, got {self.max_concurrency}")
        check(bool(self.instance_group), "instance_group", "must be a non-empty list")
        for attr in ("inputs", "outputs"):
            seen: set[str] = set()
            for i, spec in enumerate(getattr(self, attr)):
                check(spec.name not in seen, f"{attr}[{i}].name", f"duplicate tensor name {spec.name!r}")
                seen.add(spec.name)
        db = self.dynamic_batching
        if db is not None:
            if self.max_batch_size == 0:
                check.fail("dynamic_batching",
                           "needs max_batch_size > 0 (a model that cannot batch cannot be dynamically batched)")
            elif self.max_batch_size > 0 and any(x > self.max_batch_size for x in db.preferred_batch_size):
                check.fail("dynamic_batching.preferred_batch_size",
                           f"sizes must not exceed max_batch_size ({self.max_batch_size})")
        sb = self.sequence_batching
        if sb is not None:
            check(db is None, "sequence_batching", "choose one scheduler: dynamic_batching or sequence_batching")
            check(not self.decoupled, "sequence_batching", "decoupled sequence models are not supported")
            check(not self.response_cache.enable, "response_cache",
                  "a sequence model's answers depend on its state: its responses cannot be cached")
            declared = {spec.name for spec in self.inputs}
            for i, (name, _) in enumerate(sb.controls()):
                check(name not in declared, f"sequence_batching.control_input[{i}].name",
                      f"{name!r} is also a declared input: control inputs are filled in by the server, not sent")
            if sb.oldest is not None and self.max_batch_size > 0:
                check(all(x <= self.max_batch_size for x in sb.oldest.preferred_batch_size),
                      "sequence_batching.oldest.preferred_batch_size",
                      f"sizes must not exceed max_batch_size ({self.max_batch_size})")
        f = self.default_model_filename
        check(not f or (Path(f).name == f and f not in (".", "..")), "default_model_filename",
              f"must be a file name inside the version directory, got {f!r}")
        if self.platform == ENSEMBLE or self.ensemble_scheduling is not None:
            _validate_ensemble(self, check)

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def output(self, name: str) -> TensorSpec | None:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        return None


def _validate_ensemble(cfg: ModelConfig, check: Check) -> None:
    """What an ensemble's own config can tell: the data flow of its steps (no other model needed).

    Every ensemble input is consumed, every step input and ensemble output has exactly one producer
    (a step or an ensemble input), and the steps form no cycle. What needs the composing models'
    configs (their tensor names, datatypes, dims) is checked when the ensemble loads
    (:func:`modelyard.server.scheduling.ensemble.check_composition`).
    """
    es = cfg.ensemble_scheduling
    if cfg.platform != ENSEMBLE:
        check.fail("ensemble_scheduling", f"is only for platform: {ENSEMBLE} (platform is {cfg.platform!r})")
        return
    if es is None:
        check.fail("ensemble_scheduling", f"is required for platform: {ENSEMBLE}")
        return
    check(bool(cfg.inputs), "inputs", "an ensemble needs at least one input")
    check(bool(cfg.outputs), "outputs", "an ensemble needs at least one output")
    check(cfg.dynamic_batching is None, "dynamic_batching",
          "an ensemble is not batched itself: each step is batched by its own model's scheduler")
    check(not cfg.decoupled, "decoupled", "decoupled ensembles are not supported")
    inputs = {s.name for s in cfg.inputs}
    producer: dict[str, int] = {}
    for i, step in enumerate(es.step):
        at = f"ensemble_scheduling.step[{i}]"
        check(step.model_name != cfg.name, f"{at}.model_name", "an ensemble cannot be a step of itself")
        for out, tensor in step.output_map.items():
            if tensor in inputs:
                check.fail(f"{at}.output_map.{out}", f"ensemble tensor {tensor!r} is an ensemble input: "
                                                     "no step may produce it")
            elif tensor in producer:
                check.fail(f"{at}.output_map.{out}", f"ensemble tensor {tensor!r} is already produced by "
                                                     f"step[{producer[tensor]}] ({es.step[producer[tensor]].model_name!r})")
            else:
                producer[tensor] = i
    consumed = {t for step in es.step for t in step.input_map.values()}
    for i, spec in enumerate(cfg.inputs):
        check(spec.name in consumed, f"inputs[{i}].name", f"ensemble input {spec.name!r} is not used by any step")
    for i, spec in enumerate(cfg.outputs):
        check(spec.name in producer, f"outputs[{i}].name",
              f"ensemble output {spec.name!r} is not produced by any step's output_map")
    for i, step in enumerate(es.step):
        for name, tensor in step.input_map.items():
            check(tensor in producer or tensor in inputs, f"ensemble_scheduling.step[{i}].input_map.{name}",
                  f"ensemble tensor {tensor!r} is neither an ensemble input nor produced by any step")
    cycle = _ensemble_cycle(es, producer)
    if cycle:
        check.fail("ensemble_scheduling.step", "the steps form a cycle: " + " -> ".join(
            f"step[{i}] ({es.step[i].model_name!r})" for i in cycle))


def _ensemble_cycle(es: EnsembleScheduling, producer: Mapping[str, int]) -> list[int]:
    """Step indices of one cycle in the data flow (first step repeated at the end), or [] if none."""
    after = [sorted({producer[t] for t in step.input_map.values() if t in producer}) for step in es.step]
    state = [0] * len(es.step)  # 0 unseen, 1 on the current path, 2 done
    path: list[int] = []

    def visit(i: int) -> list[int]:
        state[i] = 1
        path.append(i)
        for j in after[i]:
            if state[j] == 1:
                return [*path[path.index(j):], j]
            if state[j] == 0 and (found := visit(j)):
                return found
        path.pop()
        state[i] = 2
        return []

    for i in range(len(es.step)):
        if state[i] == 0 and (found := visit(i)):
            return found
    return []


def dependencies(cfg: ModelConfig) -> list[str]:
    """The models an ensemble's steps run (each once, in step order); [] for any other model."""
    if cfg.ensemble_scheduling is None:
        return []
    return list(dict.fromkeys(step.model_name for step in cfg.ensemble_scheduling.step))


def parse_config(data: Any, default_name: str, source: str = "config.yaml") -> ModelConfig:
    """Validate a config mapping; raises ConfigError listing every problem with its path."""
    if data is None:
        data = {}
    problems: list[str] = []
    if isinstance(data, Mapping):
        name = data.get("name", default_name)
        if name != default_name:
            problems.append(f"name: must match the model directory name {default_name!r}, got {name!r}")
        data = {**data, "name": default_name}
    try:
        cfg = load(ModelConfig, data, source=source)
    except ConfigError as exc:
        raise ConfigError(problems + exc.errors, source) from None
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(model_dir: Path) -> ModelConfig:
    """Read and validate ``model_dir/config.yaml`` (or ``config.yml``)."""
    for fname in ("config.yaml", "config.yml"):
        path = model_dir / fname
        if path.is_file():
            return parse_config(read_yaml(path), model_dir.name, str(path))
    raise ConfigError(["config.yaml: missing"], str(model_dir))


_PROTO_TYPE = {v: k for k, v in CONFIG_TYPES.items() if k != "TYPE_BYTES"}


def _proto_dtype(datatype: str) -> int:
    return int(mc.DataType.Value(_PROTO_TYPE.get(datatype, "TYPE_INVALID")))


def to_proto(cfg: ModelConfig) -> mc.ModelConfig:
    """The wire ModelConfig (what ModelConfig RPC and tritonclient.get_model_config return)."""
    msg = mc.ModelConfig(
        name=cfg.name,
        platform=cfg.platform or cfg.backend,
        backend="" if cfg.platform == ENSEMBLE else cfg.backend,
        max_batch_size=cfg.max_batch_size,
        default_model_filename=cfg.default_model_filename,
    )
    for spec in cfg.inputs:
        msg.input.add(name=spec.name, data_type=_proto_dtype(spec.datatype), dims=spec.dims or [-1], optional=spec.optional,
                      format=mc.ModelInput.Format.Value(spec.format))
    for spec in cfg.outputs:
        msg.output.add(name=spec.name, data_type=_proto_dtype(spec.datatype), dims=spec.dims or [-1],
                       label_filename=spec.label_filename)
    vp = cfg.version_policy
    if vp.kind == "all":
        msg.version_policy.all.SetInParent()
    elif vp.kind == "specific":
        msg.version_policy.specific.versions.extend(vp.versions)
    else:
        msg.version_policy.latest.num_versions = vp.num_versions
    kinds = {"CPU": mc.ModelInstanceGroup.KIND_CPU, "GPU": mc.ModelInstanceGroup.KIND_GPU, "AUTO": mc.ModelInstanceGroup.KIND_AUTO}
    for i, group in enumerate([] if cfg.platform == ENSEMBLE else cfg.instance_group):  # an ensemble has none
        msg.instance_group.add(name=f"{cfg.name}_{i}", count=group.count, kind=kinds[group.kind], gpus=group.gpus)
    if cfg.dynamic_batching is not None:
        db = cfg.dynamic_batching
        msg.dynamic_batching.preferred_batch_size.extend(db.preferred_batch_size)
        msg.dynamic_batching.max_queue_delay_microseconds = db.max_queue_delay_microseconds
        msg.dynamic_batching.preserve_ordering = db.preserve_ordering
        msg.dynamic_batching.priority_levels = db.priority_levels
        msg.dynamic_batching.default_priority_level = db.default_priority_level
        msg.dynamic_batching.default_queue_policy.max_queue_size = db.max_queue_size
        msg.dynamic_batching.default_queue_policy.default_timeout_microseconds = db.default_timeout_microseconds
    if cfg.sequence_batching is not None:
        _sequence_proto(cfg.sequence_batching, msg.sequence_batching)
    for key, value in cfg.parameters.items():
        msg.parameters[key].string_value = str(value)
    for sample in cfg.model_warmup:
        w = msg.model_warmup.add(name=sample.name, batch_size=sample.batch_size, count=sample.count)
        for iname, wspec in sample.inputs.items():
            wi = w.inputs[iname]
            dt = str(wspec.get("data_type", wspec.get("datatype", "FP32"))).upper()
            wi.data_type = _proto_dtype(CONFIG_TYPES.get(dt, dt))
            wi.dims.extend(int(d) for d in wspec.get("dims", []))
            if wspec.get("random_data"):
                wi.random_data = True
            elif wspec.get("input_data_file"):
                wi.input_data_file = str(wspec["input_data_file"])
            else:
                wi.zero_data = True
    msg.model_transaction_policy.decoupled = cfg.decoupled
    msg.response_cache.enable = cfg.response_cache.enable
    if cfg.ensemble_scheduling is not None:
        for step in cfg.ensemble_scheduling.step:
            msg.ensemble_scheduling.step.add(model_name=step.model_name, model_version=step.model_version,
                                             input_map=step.input_map, output_map=step.output_map)
    return msg


def _sequence_proto(sb: SequenceBatching, msg: mc.ModelSequenceBatching) -> None:
    msg.max_sequence_idle_microseconds = sb.max_sequence_idle_microseconds or 1_000_000
    for name, control in sb.controls():
        ci = msg.control_input.add(name=name)
        c = ci.control.add(kind=mc.ModelSequenceBatching.Control.Kind.Value(control.kind))
        c.int32_false_true.extend(control.int32_false_true)
        c.fp32_false_true.extend(control.fp32_false_true)
        c.bool_false_true.extend(control.bool_false_true)
        if control.data_type:
            c.data_type = mc.DataType.Value("TYPE_STRING") if control.data_type == "BYTES" else _proto_dtype(control.data_type)
    if sb.oldest is not None:
        o = sb.oldest
        msg.oldest.max_candidate_sequences = o.max_candidate_sequences
        msg.oldest.preferred_batch_size.extend(o.preferred_batch_size)
        msg.oldest.max_queue_delay_microseconds = o.max_queue_delay_microseconds
        msg.oldest.preserve_ordering = o.preserve_ordering
    else:
        d = sb.direct or SequenceDirect()
        msg.direct.max_queue_delay_microseconds = d.max_queue_delay_microseconds
        msg.direct.minimum_slot_utilization = d.minimum_slot_utilization
