"""Turning command-line ``--input NAME=VALUE`` into numpy arrays.

VALUE is JSON (a number, string, or nested list) or ``@path.npy``. When the model
declares a datatype and shape for the input, those win: the JSON is converted to the
declared datatype and reshaped to the declared shape (variable dimensions, -1, take
what the data needs, leading ones 1). Otherwise the datatype comes from the JSON:
strings -> BYTES, booleans -> BOOL, integers -> INT64, any float -> FP32.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modelyard.protos.tensors import DTYPES, as_bytes_array, element_count

ANY = "ANY"


class InputError(ValueError):
    """An input the command line cannot turn into a tensor; the message names the input."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What the model declares for one input (datatype ANY / shape None: not declared)."""

    name: str
    datatype: str = ANY
    shape: tuple[int, ...] | None = None


def normalize_datatype(name: str) -> str:
    """``fp32`` / ``TYPE_FP32`` / ``string`` -> ``FP32`` / ``BYTES``; raises InputError if unknown."""
    key = name.strip().upper().removeprefix("TYPE_")
    key = {"STRING": "BYTES", "STR": "BYTES"}.get(key, key)
    if key not in DTYPES:
        raise InputError(f"unknown datatype '{name}'; one of: {', '.join(DTYPES)}")
    return key


def split_assignment(text: str, what: str = "--input") -> tuple[str, str]:
    """``NAME=VALUE`` -> (NAME, VALUE)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise InputError(f"{what} '{text}' is not NAME=VALUE")
    return name.strip(), value


def _nested(name: str, value: Any) -> tuple[tuple[int, ...], list[Any]]:
    """Shape and row-major leaves of a rectangular nested list."""
    if not isinstance(value, list):
        return (), [value]
    if not value:
        return (0,), []
    parts = [_nested(name, item) for item in value]
    inner = parts[0][0]
    if any(shape != inner for shape, _ in parts):
        raise InputError(f"input '{name}': nested lists are ragged (every row needs the same length)")
    return (len(value), *inner), [leaf for _, leaves in parts for leaf in leaves]


def _guess_datatype(name: str, leaves: list[Any]) -> str:
    kinds = {type(v) for v in leaves}
    if not kinds:
        raise InputError(f"input '{name}': an empty list needs --datatype")
    if kinds <= {str}:
        return "BYTES"
    if kinds <= {bool}:
        return "BOOL"
    if kinds <= {int}:
        return "INT64"
    if kinds <= {int, float}:
        return "FP32"
    raise InputError(f"input '{name}': values mix {', '.join(sorted(k.__name__ for k in kinds))}; give --datatype")


def _convert(name: str, leaves: list[Any], datatype: str) -> np.ndarray:
    """Leaves -> a flat array of ``datatype``, refusing lossy or nonsensical conversions."""
    if datatype == "BYTES":
        bad = [v for v in leaves if not isinstance(v, str)]
        if bad:
            raise InputError(f"input '{name}' is BYTES: give strings, got {bad[0]!r}")
        return as_bytes_array(leaves)
    for v in leaves:
        if not isinstance(v, (bool, int, float)):
            raise InputError(f"input '{name}' is {datatype}: give numbers, got {v!r}")
    dt = DTYPES[datatype]
    if datatype == "BOOL":
        if any(not isinstance(v, bool) and v not in (0, 1) for v in leaves):
            raise InputError(f"input '{name}' is BOOL: give true/false (or 0/1)")
        return np.array([bool(v) for v in leaves], dtype=dt)
    if dt.kind in ("i", "u"):
        info = np.iinfo(dt)
        for v in leaves:
            if isinstance(v, float) and not v.is_integer():
                raise InputError(f"input '{name}' is {datatype}: {v!r} is not an integer")
            if not info.min <= v <= info.max:
                raise InputError(f"input '{name}' is {datatype}: {v!r} is out of range [{info.min}, {info.max}]")
        return np.array([int(v) for v in leaves], dtype=dt)
    values = [float(v) for v in leaves]
    if dt.itemsize < 8 and any(math.isfinite(v) and abs(v) > np.finfo(dt).max for v in values):
        raise InputError(f"input '{name}' is {datatype}: a value is out of range (max {np.finfo(dt).max})")
    return np.array(values, dtype=dt)


def fit_shape(name: str, arr: np.ndarray, declared: Sequence[int] | None) -> np.ndarray:
    """Reshape ``arr`` to the declared shape; -1 dims take what the data needs, leading ones 1.

    Only adds or fills dimensions: data with more dimensions than an all-variable shape is left
    for the server to judge.
    """
    if declared is None:
        return arr
    dims = [int(d) for d in declared]
    if len(dims) == arr.ndim and all(d in (-1, n) for d, n in zip(dims, arr.shape, strict=True)):
        return arr
    if all(d < 0 for d in dims) and arr.ndim >= len(dims):
        # All-variable dims may mean "not declared" (the server reports those as [-1]): never flatten.
        return arr
    fixed = element_count([d for d in dims if d >= 0])
    variable = [i for i, d in enumerate(dims) if d < 0]
    shape = [1 if d < 0 else d for d in dims]
    if variable and fixed:
        shape[variable[-1]] = arr.size // fixed
    if element_count(shape) != arr.size:
        raise InputError(
            f"input '{name}': {arr.size} value(s) in shape {list(arr.shape)} do not fit the declared shape {dims}"
        )
    return arr.reshape(shape)


def array_from_json(name: str, value: Any, spec: TensorSpec | None = None, datatype: str | None = None) -> np.ndarray:
    """A parsed JSON value -> an array of the declared (or given, or guessed) datatype and shape."""
    shape, leaves = _nested(name, value)
    chosen = datatype or (spec.datatype if spec is not None and spec.datatype != ANY else None)
    chosen = normalize_datatype(chosen) if chosen else _guess_datatype(name, leaves)
    arr = _convert(name, leaves, chosen).reshape(shape)
    return fit_shape(name, arr, spec.shape if spec is not None else None)


def array_from_npy(name: str, path: str, spec: TensorSpec | None = None, datatype: str | None = None) -> np.ndarray:
    """Load ``path`` (.npy, no pickles); cast to the declared datatype when that is lossless."""
    try:
        arr = np.load(Path(path).expanduser(), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"input '{name}': cannot load {path}: {exc}") from None
    chosen = datatype or (spec.datatype if spec is not None and spec.datatype != ANY else None)
    if chosen:
        chosen = normalize_datatype(chosen)
        if chosen == "BYTES":
            if arr.dtype.kind not in ("U", "S", "O"):
                raise InputError(f"input '{name}' is BYTES but {path} holds {arr.dtype}")
            arr = as_bytes_array(arr.reshape(-1).tolist(), arr.shape)
        elif arr.dtype != DTYPES[chosen]:
            if not np.can_cast(arr.dtype, DTYPES[chosen], casting="same_kind"):
                raise InputError(f"input '{name}' is {chosen} but {path} holds {arr.dtype}")
            arr = arr.astype(DTYPES[chosen])
    elif arr.dtype.kind in ("U", "S"):
        arr = as_bytes_array(arr.reshape(-1).tolist(), arr.shape)
    return fit_shape(name, arr, spec.shape if spec is not None else None)


def parse_input(text: str, spec: TensorSpec | None = None, datatype: str | None = None) -> tuple[str, np.ndarray]:
    """``NAME=JSON`` or ``NAME=@file.npy`` -> (NAME, array).

    A value that is not valid JSON is taken as a plain string when the input is BYTES,
    so ``--input TEXT=hello`` works without shell-quoted JSON quotes.
    """
    name, raw = split_assignment(text)
    if raw.startswith("@"):
        return name, array_from_npy(name, raw[1:], spec, datatype)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        declared = datatype or (spec.datatype if spec is not None else ANY)
        if declared != ANY and normalize_datatype(declared) == "BYTES":
            value = raw
        else:
            raise InputError(
                f"input '{name}': {raw!r} is not JSON (strings need quotes: '\"text\"', or use @file.npy)"
            ) from None
    return name, array_from_json(name, value, spec, datatype)
