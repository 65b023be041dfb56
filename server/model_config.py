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

    @classmethod
    def normalize(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping):
            return raw
        out = dict(raw)
        for key in ("data_type", "datatype"):
            if key in out:
                out[key] = _datatype(out[key])
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
        f = self.default_model_filename
        check(not f or (Path(f).name == f and f not in (".", "..")), "default_model_filename",
              f"must be a file name inside the version directory, got {f!r}")

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
        backend=cfg.backend,
        max_batch_size=cfg.max_batch_size,
        default_model_filename=cfg.default_model_filename,
    )
    for spec in cfg.inputs:
        msg.input.add(name=spec.name, data_type=_proto_dtype(spec.datatype), dims=spec.dims or [-1], optional=spec.optional)
    for spec in cfg.outputs:
        msg.output.add(name=spec.name, data_type=_proto_dtype(spec.datatype), dims=spec.dims or [-1])
    vp = cfg.version_policy
    if vp.kind == "all":
        msg.version_policy.all.SetInParent()
    elif vp.kind == "specific":
        msg.version_policy.specific.versions.extend(vp.versions)
    else:
        msg.version_policy.latest.num_versions = vp.num_versions
    kinds = {"CPU": mc.ModelInstanceGroup.KIND_CPU, "GPU": mc.ModelInstanceGroup.KIND_GPU, "AUTO": mc.ModelInstanceGroup.KIND_AUTO}
    for i, group in enumerate(cfg.instance_group):
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
    return msg
