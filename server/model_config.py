"""Model configuration: ``<repo>/<model>/config.yaml``, validated with field paths.

The schema follows Triton's ``model_config.proto`` (snake_case YAML), so a Triton
user recognises every field; :func:`to_proto` turns it into the wire message.
Every problem is reported at once, each with its path (``input[1].dims``).
Defaults live here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modelyard.protos import model_config_pb2 as mc
from modelyard.protos.tensors import CONFIG_TYPES, DTYPES
from modelyard.server.errors import ConfigError

#: a datatype that accepts anything (the identity demo model); reported as TYPE_INVALID on the wire
ANY = "ANY"
INSTANCE_KINDS = ("CPU", "GPU", "AUTO")


@dataclass(slots=True)
class TensorSpec:
    """An input or output: name, protocol datatype, dims without the batch dimension (-1 = variable)."""

    name: str
    datatype: str
    #: None = any rank and shape (only for datatype-agnostic demo models)
    dims: list[int] | None
    optional: bool = False


@dataclass(slots=True)
class InstanceGroup:
    """``count`` instances of ``kind`` (CPU, GPU or AUTO); GPU instances spread over ``gpus``."""

    count: int = 1
    kind: str = "CPU"
    gpus: list[int] = field(default_factory=list)


@dataclass(slots=True)
class VersionPolicy:
    """Which versions of a model to serve: latest N, all, or a specific list."""

    kind: str = "latest"  # latest | all | specific
    num_versions: int = 1
    versions: list[int] = field(default_factory=list)


@dataclass(slots=True)
class DynamicBatching:
    """Triton's dynamic batcher knobs (microseconds as in Triton)."""

    preferred_batch_size: list[int] = field(default_factory=list)
    max_queue_delay_microseconds: int = 0
    #: 0 = unbounded; beyond it requests are rejected with RESOURCE_EXHAUSTED at once
    max_queue_size: int = 0
    #: 0 = no per-request timeout by default
    default_timeout_microseconds: int = 0
    priority_levels: int = 0
    default_priority_level: int = 0
    preserve_ordering: bool = False


@dataclass(slots=True)
class WarmupSample:
    """One warmup request; inputs map name -> {data_type, dims, zero_data|random_data|input_data_file|value}."""

    name: str
    batch_size: int = 1
    count: int = 1
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(slots=True)
class ResponseCache:
    """Opt-in response cache per model."""

    enable: bool = False
    max_entries: int = 1024
    max_bytes: int = 64 * 1024 * 1024


@dataclass(slots=True)
class ModelConfig:
    """A validated model configuration."""

    name: str
    backend: str = "python"
    platform: str = ""
    max_batch_size: int = 0
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    version_policy: VersionPolicy = field(default_factory=VersionPolicy)
    instance_group: list[InstanceGroup] = field(default_factory=lambda: [InstanceGroup()])
    dynamic_batching: DynamicBatching | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    model_warmup: list[WarmupSample] = field(default_factory=list)
    response_cache: ResponseCache = field(default_factory=ResponseCache)
    #: decoupled models may send zero or many responses per request (streaming only)
    decoupled: bool = False
    #: modelyard: requests in flight for this model beyond which RESOURCE_EXHAUSTED (0 = unbounded)
    max_concurrency: int = 0
    #: modelyard: per-instance execution in a thread (default) or a worker process
    execution: str = "thread"
    #: file name inside a version directory the runtime loads (runtime-specific default when empty)
    default_model_filename: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

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


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}")


def _int(value: Any, path: str, problems: _Problems, *, minimum: int | None = 0, default: int = 0) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        problems.add(path, f"must be an integer, got {value!r}")
        return default
    if minimum is not None and value < minimum:
        problems.add(path, f"must be >= {minimum}, got {value}")
    return value


def _datatype(entry: dict[str, Any], path: str, problems: _Problems) -> str:
    raw = entry.get("data_type", entry.get("datatype"))
    if raw is None:
        problems.add(f"{path}.data_type", "is required (e.g. TYPE_FP32 or FP32)")
        return "FP32"
    text = str(raw).upper()
    if text == ANY:
        return ANY
    if text in CONFIG_TYPES:
        return CONFIG_TYPES[text]
    if text in DTYPES:
        return text
    problems.add(f"{path}.data_type", f"unknown datatype {raw!r}; one of {', '.join(DTYPES)} or ANY")
    return "FP32"


def _tensors(value: Any, path: str, problems: _Problems) -> list[TensorSpec]:
    if value is None:
        return []
    if not isinstance(value, list):
        problems.add(path, "must be a list of tensors")
        return []
    specs: list[TensorSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(value):
        p = f"{path}[{i}]"
        if not isinstance(entry, dict):
            problems.add(p, "must be a mapping with name, data_type, dims")
            continue
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            problems.add(f"{p}.name", "is required")
            name = f"?{i}"
        elif name in seen:
            problems.add(f"{p}.name", f"duplicate tensor name {name!r}")
        seen.add(name)
        datatype = _datatype(entry, p, problems)
        dims_raw = entry.get("dims", entry.get("shape"))
        dims: list[int] | None
        if dims_raw is None:
            dims = None
            if datatype != ANY:
                problems.add(f"{p}.dims", "is required (use -1 for a variable dimension)")
        elif isinstance(dims_raw, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in dims_raw):
            dims = [int(d) for d in dims_raw]
            if any(d < -1 or d == 0 for d in dims):
                problems.add(f"{p}.dims", f"dimensions must be positive or -1, got {dims}")
        else:
            problems.add(f"{p}.dims", f"must be a list of integers, got {dims_raw!r}")
            dims = None
        specs.append(TensorSpec(name=name, datatype=datatype, dims=dims, optional=bool(entry.get("optional", False))))
    return specs


def _version_policy(value: Any, problems: _Problems) -> VersionPolicy:
    if value is None:
        return VersionPolicy()
    if not isinstance(value, dict) or len(value) != 1:
        problems.add("version_policy", "must be one of {latest: {num_versions: N}}, {all: {}}, {specific: {versions: [...]}}")
        return VersionPolicy()
    kind, body = next(iter(value.items()))
    body = body or {}
    if kind == "latest":
        return VersionPolicy("latest", num_versions=_int(body.get("num_versions", 1), "version_policy.latest.num_versions", problems, minimum=1, default=1))
    if kind == "all":
        return VersionPolicy("all")
    if kind == "specific":
        versions = body.get("versions")
        if not isinstance(versions, list) or not versions or not all(isinstance(v, int) and v > 0 for v in versions):
            problems.add("version_policy.specific.versions", "must be a non-empty list of positive integers")
            versions = []
        return VersionPolicy("specific", versions=list(versions))
    problems.add("version_policy", f"unknown policy {kind!r}; use latest, all or specific")
    return VersionPolicy()


def _instance_groups(value: Any, problems: _Problems) -> list[InstanceGroup]:
    if value is None:
        return [InstanceGroup()]
    if not isinstance(value, list) or not value:
        problems.add("instance_group", "must be a non-empty list")
        return [InstanceGroup()]
    groups = []
    for i, entry in enumerate(value):
        p = f"instance_group[{i}]"
        if not isinstance(entry, dict):
            problems.add(p, "must be a mapping with count, kind, gpus")
            continue
        kind = str(entry.get("kind", "CPU")).upper().removeprefix("KIND_")
        if kind not in INSTANCE_KINDS:
            problems.add(f"{p}.kind", f"must be CPU, GPU or AUTO, got {entry.get('kind')!r}")
        gpus = entry.get("gpus", [])
        if not isinstance(gpus, list) or not all(isinstance(g, int) and g >= 0 for g in gpus):
            problems.add(f"{p}.gpus", "must be a list of GPU indices")
            gpus = []
        groups.append(InstanceGroup(count=_int(entry.get("count", 1), f"{p}.count", problems, minimum=1, default=1), kind=kind, gpus=list(gpus)))
    return groups


def _dynamic_batching(value: Any, max_batch_size: int, problems: _Problems) -> DynamicBatching | None:
    if value is None:
        return None
    if value is True or value == {}:
        value = {}
    if not isinstance(value, dict):
        problems.add("dynamic_batching", "must be a mapping")
        return None
    p = "dynamic_batching"
    preferred = value.get("preferred_batch_size", [])
    if not isinstance(preferred, list) or not all(isinstance(x, int) and x > 0 for x in preferred):
        problems.add(f"{p}.preferred_batch_size", "must be a list of positive integers")
        preferred = []
    if max_batch_size and any(x > max_batch_size for x in preferred):
        problems.add(f"{p}.preferred_batch_size", f"sizes must not exceed max_batch_size ({max_batch_size})")
    if max_batch_size == 0:
        problems.add(p, "needs max_batch_size > 0 (a model that cannot batch cannot be dynamically batched)")
    queue_policy = value.get("default_queue_policy") or {}
    db = DynamicBatching(
        preferred_batch_size=sorted(preferred),
        max_queue_delay_microseconds=_int(value.get("max_queue_delay_microseconds", 0), f"{p}.max_queue_delay_microseconds", problems),
        max_queue_size=_int(value.get("max_queue_size", queue_policy.get("max_queue_size", 0)), f"{p}.max_queue_size", problems),
        default_timeout_microseconds=_int(
            value.get("default_timeout_microseconds", queue_policy.get("default_timeout_microseconds", 0)),
            f"{p}.default_timeout_microseconds",
            problems,
        ),
        priority_levels=_int(value.get("priority_levels", 0), f"{p}.priority_levels", problems),
        default_priority_level=_int(value.get("default_priority_level", 0), f"{p}.default_priority_level", problems),
        preserve_ordering=bool(value.get("preserve_ordering", False)),
    )
    if db.priority_levels and not 0 < db.default_priority_level <= db.priority_levels:
        problems.add(f"{p}.default_priority_level", f"must be in 1..priority_levels ({db.priority_levels})")
    return db


def _warmup(value: Any, problems: _Problems) -> list[WarmupSample]:
    if value is None:
        return []
    if not isinstance(value, list):
        problems.add("model_warmup", "must be a list")
        return []
    samples = []
    for i, entry in enumerate(value):
        p = f"model_warmup[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("inputs"), dict):
            problems.add(p, "must be a mapping with name and inputs")
            continue
        samples.append(
            WarmupSample(
                name=str(entry.get("name", f"warmup{i}")),
                batch_size=_int(entry.get("batch_size", 1), f"{p}.batch_size", problems, minimum=1, default=1),
                count=_int(entry.get("count", 1), f"{p}.count", problems, minimum=1, default=1),
                inputs=dict(entry["inputs"]),
            )
        )
    return samples


def parse_config(data: Any, default_name: str, source: str = "config.yaml") -> ModelConfig:
    """Validate a config mapping; raises ConfigError listing every problem with its path."""
    problems = _Problems()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, ["<root>: must be a mapping"])
    known = {
        "name", "backend", "platform", "max_batch_size", "input", "inputs", "output", "outputs",
        "version_policy", "instance_group", "dynamic_batching", "parameters", "model_warmup",
        "response_cache", "model_transaction_policy", "decoupled", "max_concurrency", "execution",
        "default_model_filename",
    }
    for key in data:
        if key not in known:
            problems.add(str(key), "unknown field")
    name = data.get("name", default_name)
    if name != default_name:
        problems.add("name", f"must match the model directory name {default_name!r}, got {name!r}")
    backend = data.get("backend", "python")
    if not isinstance(backend, str) or not backend:
        problems.add("backend", "must be a non-empty string")
        backend = "python"
    max_batch_size = _int(data.get("max_batch_size", 0), "max_batch_size", problems)
    inputs = _tensors(data.get("input", data.get("inputs")), "input", problems)
    outputs = _tensors(data.get("output", data.get("outputs")), "output", problems)
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        problems.add("parameters", "must be a mapping")
        params = {}
    # Triton writes parameters as {key: {string_value: "..."}}; accept both shapes.
    params = {k: (v.get("string_value") if isinstance(v, dict) and "string_value" in v else v) for k, v in params.items()}
    cache_raw = data.get("response_cache") or {}
    cache = ResponseCache()
    if isinstance(cache_raw, dict):
        cache = ResponseCache(
            enable=bool(cache_raw.get("enable", False)),
            max_entries=_int(cache_raw.get("max_entries", 1024), "response_cache.max_entries", problems, minimum=1, default=1024),
            max_bytes=_int(cache_raw.get("max_bytes", cache.max_bytes), "response_cache.max_bytes", problems, minimum=1, default=cache.max_bytes),
        )
    else:
        problems.add("response_cache", "must be a mapping")
    decoupled = bool(data.get("decoupled", (data.get("model_transaction_policy") or {}).get("decoupled", False)))
    model_file = str(data.get("default_model_filename", ""))
    if model_file and (Path(model_file).name != model_file or model_file in (".", "..")):
        problems.add("default_model_filename", f"must be a file name inside the version directory, got {model_file!r}")
    execution = str(data.get("execution", "thread"))
    if execution not in ("thread", "process"):
        problems.add("execution", f"must be thread or process, got {execution!r}")
    cfg = ModelConfig(
        name=default_name,
        backend=backend,
        platform=str(data.get("platform", "")),
        max_batch_size=max_batch_size,
        inputs=inputs,
        outputs=outputs,
        version_policy=_version_policy(data.get("version_policy"), problems),
        instance_group=_instance_groups(data.get("instance_group"), problems),
        dynamic_batching=_dynamic_batching(data.get("dynamic_batching"), max_batch_size, problems),
        parameters=params,
        model_warmup=_warmup(data.get("model_warmup"), problems),
        response_cache=cache,
        decoupled=decoupled,
        max_concurrency=_int(data.get("max_concurrency", 0), "max_concurrency", problems),
        execution=execution,
        default_model_filename=model_file,
        raw=dict(data),
    )
    if problems.items:
        raise ConfigError(source, problems.items)
    return cfg


def load_config(model_dir: Path) -> ModelConfig:
    """Read and validate ``model_dir/config.yaml`` (or ``config.yml``)."""
    for fname in ("config.yaml", "config.yml"):
        path = model_dir / fname
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as exc:
                raise ConfigError(str(path), [f"<root>: not valid YAML: {exc}"]) from None
            return parse_config(data, model_dir.name, str(path))
    raise ConfigError(str(model_dir), ["config.yaml: missing"])


_PROTO_TYPE = {v: k for k, v in CONFIG_TYPES.items() if k != "TYPE_BYTES"}


def _proto_dtype(datatype: str) -> int:
    if datatype == ANY:
        return mc.TYPE_INVALID
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
