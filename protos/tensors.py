"""numpy <-> Open Inference Protocol tensors, shared by the server and the clients.

Datatype names are the protocol's (``FP32``, ``BYTES``...). Raw contents are
little-endian, row-major; a BYTES tensor in raw form is a sequence of elements,
each a 4-byte little-endian length followed by that many bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from modelyard.protos import grpc_service_pb2 as pb

#: protocol datatype -> numpy dtype (little-endian). BYTES maps to object arrays of ``bytes``.
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

#: which typed-contents field carries each datatype
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

#: config.yaml / Triton ``TYPE_*`` names -> protocol names
CONFIG_TYPES: dict[str, str] = {f"TYPE_{k}": k for k in DTYPES} | {"TYPE_STRING": "BYTES"}

_U32 = struct.Struct("<I")
#: most dimensions a tensor may have (numpy's own limit is 64; no model needs more than a handful)
MAX_DIMS = 32
INT64_MAX = 2**63 - 1


class TensorError(ValueError):
    """A tensor that cannot be decoded; the message names the tensor and the problem."""


#: numpy dtype (either byte order) -> protocol datatype; a dict hit on the hot path
_NAME_OF: dict[np.dtype[Any], str] = {}
for _name, _dt in DTYPES.items():
    if _name != "BYTES":
        _NAME_OF[_dt] = _NAME_OF[_dt.newbyteorder(">")] = _name


def datatype_of(array: np.ndarray) -> str:
    """The protocol datatype name for a numpy array."""
    kind = array.dtype
    name = _NAME_OF.get(kind)
    if name is not None:
        return name
    if kind.kind in ("O", "S", "U"):
        return "BYTES"
    raise TensorError(f"numpy dtype {kind} has no Open Inference Protocol datatype")


def element_count(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def check_shape(shape: Sequence[int], name: str = "", max_elements: int | None = None) -> int:
    """The element count of ``shape``, checked before anything is allocated for it.

    Refused with :class:`TensorError`: more than :data:`MAX_DIMS` dimensions, a negative dimension, a
    dimension or an element count above ``max_elements`` (callers pass the message size limit: every
    element takes at least a byte), an element count past int64 (``[2**32, 2**32]``), and a huge
    dimension hidden by a zero (``[0, 2**62]``: numpy could not represent it either).
    """
    dims = list(shape)
    if len(dims) > MAX_DIMS:
        raise TensorError(f"input '{name}': shape has {len(dims)} dimensions; at most {MAX_DIMS} are supported")
    bound = INT64_MAX if max_elements is None else min(max_elements, INT64_MAX)
    count = 1
    for d in dims:
        if d < 0:
            raise TensorError(f"input '{name}': shape {dims} has a negative dimension")
        if d > bound:
            raise TensorError(f"input '{name}': shape {dims} has a dimension larger than {bound} "
                              f"({'the message size limit' if max_elements is not None else 'int64'})")
        count *= d
    if count > bound:
        what = "the message size limit" if max_elements is not None and max_elements <= INT64_MAX else "int64"
        raise TensorError(f"input '{name}': shape {dims} has {count} elements, more than {bound} ({what})")
    return count


def serialize_bytes(array: np.ndarray) -> bytes:
    """Encode a BYTES tensor as 4-byte little-endian length-prefixed elements."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_U32.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(raw: bytes | memoryview, count: int | None = None, name: str = "") -> list[bytes]:
    """Decode length-prefixed BYTES elements; raises TensorError naming ``name`` on malformed input.

    With ``count``, a buffer too short to hold that many elements (4 bytes of length each) is refused
    before parsing, and parsing stops at the first element past ``count``: memory stays proportional
    to what the shape allows."""
    view = memoryview(raw)
    out: list[bytes] = []
    pos, end = 0, len(view)
    if count is not None and count * 4 > end:
        raise TensorError(f"input '{name}': expected {count} BYTES elements for its shape, but {end} bytes "
                          f"cannot hold them (each needs a 4-byte length)")
    while pos < end:
        if count is not None and len(out) == count:
            raise TensorError(f"input '{name}': more than the {count} BYTES elements its shape holds "
                              f"({end - pos} bytes left over)")
        if pos + 4 > end:
            raise TensorError(f"input '{name}': BYTES element {len(out)} has a truncated 4-byte length prefix")
        (n,) = _U32.unpack_from(view, pos)
        pos += 4
        if pos + n > end:
            raise TensorError(
                f"input '{name}': BYTES element {len(out)} declares {n} bytes but only {end - pos} remain"
            )
        out.append(bytes(view[pos : pos + n]))
        pos += n
    if count is not None and len(out) != count:
        raise TensorError(f"input '{name}': expected {count} BYTES elements for its shape, got {len(out)}")
    return out


def to_raw(array: np.ndarray) -> bytes:
    """The raw little-endian bytes of ``array`` in protocol layout."""
    if datatype_of(array) == "BYTES":
        return serialize_bytes(array)
    arr = np.ascontiguousarray(array)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr.tobytes()


def from_raw(raw: bytes | memoryview, datatype: str, shape: Sequence[int], name: str = "",
             max_elements: int | None = None) -> np.ndarray:
    """Decode raw contents into a numpy array of ``shape``; checks the shape (:func:`check_shape`)
    and the byte size exactly before allocating anything."""
    dt = DTYPES.get(datatype)
    if dt is None:
        raise TensorError(f"input '{name}': unknown datatype '{datatype}'")
    dims = tuple(shape)
    count = check_shape(dims, name, max_elements)
    if datatype == "BYTES":
        items = deserialize_bytes(raw, count, name)
        arr = np.empty(count, dtype=object)
        arr[:] = items
        return arr.reshape(dims)
    expected = count * dt.itemsize
    if len(raw) != expected:
        raise TensorError(f"input '{name}': {datatype} shape {list(dims)} needs {expected} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=dt).reshape(dims)


def from_contents(contents: pb.InferTensorContents, datatype: str, shape: Sequence[int], name: str = "",
                  max_elements: int | None = None) -> np.ndarray:
    """Decode typed ``InferTensorContents`` (what grpcurl/JSON users send); the shape is checked
    (:func:`check_shape`) and must match the number of values, and the values must all be in the
    datatype's field (values in another field are refused, not ignored)."""
    if datatype == "FP16":
        raise TensorError(f"input '{name}': FP16 has no typed contents field; send raw_input_contents")
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise TensorError(f"input '{name}': unknown datatype '{datatype}'")
    count = check_shape(shape, name, max_elements)
    for other, _ in contents.ListFields():
        if other.name != field:
            raise TensorError(f"input '{name}': {datatype} data goes in {field}, but {other.name} is set")
    values = getattr(contents, field)
    if len(values) != count:
        raise TensorError(
            f"input '{name}': shape {list(shape)} needs {count} elements in {field}, got {len(values)}"
        )
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(tuple(shape))
    dt = DTYPES[datatype]
    try:
        return np.asarray(values, dtype=dt).reshape(tuple(shape))
    except (OverflowError, ValueError) as exc:
        raise TensorError(f"input '{name}': values do not fit {datatype}: {exc}") from None


def as_bytes_array(values: Iterable[str | bytes], shape: Sequence[int] | None = None) -> np.ndarray:
    """Build a BYTES (object) array from strings or bytes."""
    items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr.reshape(tuple(shape)) if shape is not None else arr
