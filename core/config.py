"""The one config loader: dataclasses that own their defaults and validate themselves.

Every config of modelyard -- a model's ``config.yaml``, ``modelyard serve``'s settings, the
balancer's and the autoscaler's files -- is a tree of dataclasses loaded by :func:`load`:

- **defaults** are the dataclass field defaults, and nowhere else (CLI flags default to None
  and only override, see :func:`override`);
- **types** come from the annotations: ``int``, ``float``, ``bool``, ``str``, ``Any``,
  ``X | None``, ``list[X]``, ``dict[str, X]``, ``Literal[...]`` and nested config dataclasses;
- **names**: a field is read from the key of its own name, or from ``field(metadata={"key": ...})``
  where the file's word differs from the attribute (Triton's ``input`` for ``inputs``), plus any
  ``"aliases"``; error paths use the file's word;
- **shorthands** a class accepts are turned into its plain mapping by an optional
  ``@classmethod normalize(cls, raw) -> raw`` (e.g. a bare ``"host:port"`` string for an endpoint);
- **checks** that span fields live on the class, in an optional ``validate(self, check)``:
  ``check(ok, "field", "must be >= 1")`` records ``<path>.field: must be >= 1`` when ``ok`` is false.

Every problem in the document is reported at once, each with its path
(``pools.cpu.retry.max_attempts: must be >= 1``), as one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration; ``errors`` holds one ``path: message`` line per problem."""

    def __init__(self, errors: Iterable[str], source: str = "config") -> None:
        self.errors = list(errors)
        self.source = source
        #: one line (API error messages, logs); :meth:`report` is the multi-line form for a terminal
        self.message = f"{source}: " + "; ".join(self.errors)
        super().__init__(self.message)

    def report(self) -> str:
        """``invalid <source>:`` and one indented line per problem."""
        return f"invalid {self.source}:\n  " + "\n  ".join(self.errors)


class Check:
    """What ``validate(self, check)`` receives: records a problem under the object's path.

    ``field`` is an attribute name (or a path starting with one, such as ``inputs[1].name``);
    it is written with the file's word for it.
    """

    __slots__ = ("errors", "keys", "prefix", "reported")

    def __init__(self, prefix: str, errors: list[str], keys: Mapping[str, str] | None = None,
                 reported: set[str] | None = None) -> None:
        self.prefix = prefix
        self.errors = errors
        self.keys = keys or {}
        #: paths that already have an error (a value that did not load): not restated
        self.reported = reported or set()

    def __call__(self, ok: bool, field: str, message: str) -> bool:
        """Record ``<path>.<field>: message`` unless ``ok``; returns ``ok``."""
        if not ok:
            self.fail(field, message)
        return ok

    def fail(self, field: str, message: str) -> None:
        if field:
            head = field.split(".", 1)[0].split("[", 1)[0]
            if head in self.keys:
                field = self.keys[head] + field[len(head):]
        path = join(self.prefix, field) if field else (self.prefix or "<root>")
        if path not in self.reported:
            self.errors.append(f"{path}: {message}")


def join(prefix: str, field: str) -> str:
    """``pools.cpu`` + ``retry`` -> ``pools.cpu.retry``; ``input`` + ``[1]`` -> ``input[1]``."""
    if not prefix:
        return field
    return prefix + field if field.startswith("[") else f"{prefix}.{field}"


# ------------------------------------------------------------------ loading


def load(cls: type[T], data: Any, *, source: str = "config", path: str = "") -> T:
    """Build ``cls`` from parsed YAML/JSON and validate the whole tree; raise :class:`ConfigError` with every error."""
    errors: list[str] = []
    cfg = _build(cls, data, path, errors)
    _validate_tree(cfg, path, errors)
    if errors:
        raise ConfigError(errors, source)
    return cfg


def read_yaml(path: str | Path, source: str | None = None) -> Any:
    """Parse a YAML (or JSON) file; :class:`ConfigError` when it cannot be read or parsed."""
    where = source or str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror or exc}"], where) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"], where) from exc


def load_file(cls: type[T], path: str | Path, source: str | None = None) -> T:
    """:func:`load` of a YAML (or JSON) file."""
    return load(cls, read_yaml(path, source), source=source or str(path))


def override(data: Mapping[str, Any] | None, values: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with the dotted paths of ``values`` set, skipping None (a CLI flag that was not given).

    ``override(doc, {"drain.grace": args.drain_grace})`` -- defaults stay in the config classes.
    """
    out: dict[str, Any] = dict(data or {})
    for dotted, value in values.items():
        if value is None:
            continue
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.get(key)
            child = dict(child) if isinstance(child, Mapping) else {}
            node[key] = child
            node = child
        node[leaf] = value
    return out


def key_of(f: dataclasses.Field[Any]) -> str:
    """The word a config file uses for field ``f``."""
    return str(f.metadata.get("key", f.name))


def default(cls: type[Any], name: str) -> Any:
    """The default of field ``name`` of config class ``cls`` (for help texts: stated once, here)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def to_dict(cfg: Any) -> Any:
    """Plain data of a config tree (for ``/config`` views and for writing files)."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type) else cfg


# ------------------------------------------------------------------ internals


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _build(cls: Any, data: Any, path: str, errors: list[str]) -> Any:
    normalize: Callable[[Any], Any] | None = getattr(cls, "normalize", None)
    if normalize is not None:
        try:
            data = normalize(data)
        except (TypeError, ValueError) as exc:
            errors.append(f"{path or '<root>'}: {exc}")
            return cls()
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        errors.append(f"{path or '<root>'}: expected a mapping, got {data!r}")
        return cls()
    hints = _hints(cls)
    kwargs = {}
    known: set[str] = set()
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = key_of(f)
        words = [key, *f.metadata.get("aliases", ())]
        known.update(words)
        given = [w for w in words if w in data]
        if len(given) > 1:
            errors.append(f"{join(path, key)}: given twice (as {' and '.join(given)})")
        if given:
            value = data[given[0]]
            if value is None and not _optional(hints[f.name]):
                continue  # ``key:`` with nothing after it (YAML null): the default
            kwargs[f.name] = _convert(hints[f.name], value, join(path, key), errors)
    for word in data:
        if word not in known:
            errors.append(f"{join(path, str(word))}: unknown field (known: {', '.join(sorted(known))})")
    return cls(**kwargs)


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _convert(tp: Any, value: Any, path: str, errors: list[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _convert(args[0], value, path, errors)
        for a in args:
            if isinstance(value, a):
                return value
        errors.append(f"{path}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
        return None
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            errors.append(f"{path}: must be one of {', '.join(map(str, allowed))}, got {value!r}")
            return allowed[0]
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {value!r}")
            return []
        return [_convert(item, v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if not isinstance(value, Mapping):
            errors.append(f"{path}: expected a mapping, got {value!r}")
            return {}
        if item is Any:
            return {str(k): v for k, v in value.items()}
        return {str(k): _convert(item, v, join(path, str(k)), errors) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, errors)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{path}: expected a number, got {value!r}")
            return 0.0
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {value!r}")
            return 0
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected true or false, got {value!r}")
            return False
        return value
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            errors.append(f"{path}: expected a string, got {value!r}")
            return ""
        return str(value)
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _validate_tree(obj: Any, path: str, errors: list[str], bad: set[str] | None = None) -> None:
    """Children first, then the object's own ``validate``; a field whose value did not load is not
    checked again (that would only restate its error about a placeholder value)."""
    if bad is None:
        bad = {e.split(": ", 1)[0] for e in errors}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = dataclasses.fields(obj)
        paths = [join(path, key_of(f)) for f in fields]
        for f, sub in zip(fields, paths, strict=True):
            _validate_tree(getattr(obj, f.name), sub, errors, bad)
        validate = getattr(obj, "validate", None)
        if validate is not None:
            validate(Check(path, errors, {f.name: key_of(f) for f in fields if "key" in f.metadata}, bad))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _validate_tree(v, f"{path}[{i}]", errors, bad)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _validate_tree(v, join(path, str(k)), errors, bad)
