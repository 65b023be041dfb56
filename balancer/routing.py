"""Routes: (service, method, model name) -> pool, or a weighted split of pools.

The model name of ModelInfer / ModelStreamInfer is peeked from field 1 of the
serialized request (a length-delimited string), and Triton's ``sequence_id``
request parameter from the entries of field 4 (``map<string, InferParameter>
parameters``), by walking the top-level wire format only as far as needed — no
protobuf parse.
"""

from __future__ import annotations

import fnmatch
import random
from typing import Protocol

from modelyard.balancer.affinity import choose_by_key
from modelyard.balancer.config import RouteConfig

#: methods whose first request message starts with the model name in field 1
MODEL_METHODS = frozenset({
    "/inference.GRPCInferenceService/ModelInfer",
    "/inference.GRPCInferenceService/ModelStreamInfer",
    "/inference.GRPCInferenceService/ModelReady",
    "/inference.GRPCInferenceService/ModelMetadata",
    "/inference.GRPCInferenceService/ModelConfig",
    "/inference.GRPCInferenceService/ModelStatistics",
})

#: methods whose first request message may carry Triton's ``sequence_id`` parameter (sequence affinity)
SEQUENCE_METHODS = frozenset({
    "/inference.GRPCInferenceService/ModelInfer",
    "/inference.GRPCInferenceService/ModelStreamInfer",
})


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


#: :func:`peek_string`'s answer when the field may still come in later bytes
MORE = object()


def peek_string(buf: bytes, number: int) -> object:
    """Field ``number`` (length-delimited) of the start of a serialized message, decoded as UTF-8, without
    parsing it: the string; :data:`MORE` when ``buf`` ends before the field did (or before it was found);
    None when the bytes are malformed or the field is not a valid string."""
    # fast path: serializers write fields in number order, so field 1 comes first with a one-byte length
    if number == 1 and len(buf) >= 2 and buf[0] == 0x0A and buf[1] < 0x80:
        end = 2 + buf[1]
        if end <= len(buf):
            try:
                return buf[2:end].decode()
            except UnicodeDecodeError:
                return None
    i, n = 0, len(buf)
    try:
        while i < n:
            key, i = _varint(buf, i)
            field_no, wire = key >> 3, key & 7
            if wire == 0:
                _, i = _varint(buf, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                length, i = _varint(buf, i)
                if field_no == number:
                    if i + length > n:
                        return MORE
                    return buf[i:i + length].decode()
                i += length
            else:
                return None
    except ValueError:  # a varint cut by the end of buf
        return MORE
    except UnicodeDecodeError:
        return None
    return MORE


def peek_model_name(buf: bytes) -> str | None:
    """Field 1 (length-delimited) of a serialized message, decoded as UTF-8; None if absent or malformed."""
    found = peek_string(buf, 1)
    return found if isinstance(found, str) else None


#: ModelInferRequest's ``parameters`` (field 4, length-delimited): its tag byte, and the first field after it
_PARAMETERS_TAG = (4 << 3) | 2
_SEQUENCE_ID = b"sequence_id"


def peek_sequence_id(buf: bytes) -> int | str | None:
    """Triton's ``sequence_id`` request parameter of the start of a serialized ModelInferRequest, without
    parsing it: an int (``int64_param`` / ``uint64_param``) or a str (``string_param``); None when the
    message has none (or 0 / ""), when it has another kind of value, or when the bytes are malformed or
    end before the parameters did.

    Serializers write fields in number order, so the walk stops at the first field after 4 (``inputs``):
    a request without parameters costs a few tag reads, never a look at its tensors.
    """
    i, n = 0, len(buf)
    found: int | str | None = None
    try:
        while i < n:
            tag = buf[i]
            if tag < 0x80:  # every field up to 15 has a one-byte tag
                i += 1
            else:
                tag, i = _varint(buf, i)
            field_no, wire = tag >> 3, tag & 7
            if field_no > 4:
                return found
            if wire == 2:
                length, i = _varint(buf, i)
                end = i + length
                if end > n:
                    return None  # cut short: the rest of the parameters is not here
                # an entry is written key first: one whose key is not 11 bytes long is another parameter
                if tag == _PARAMETERS_TAG and not (end - i > 2 and buf[i] == 0x0A and buf[i + 1] != 11):
                    entry = _sequence_entry(buf, i, end)
                    if entry is not _OTHER_KEY:
                        found = entry  # type: ignore[assignment]  # a map's last entry for a key wins
                i = end
            elif wire == 0:
                _, i = _varint(buf, i)
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            else:
                return None
    except ValueError:  # a varint cut by the end of buf, or too long
        return None
    return found if i == n else None


#: :func:`_sequence_entry`'s answer for a map entry whose key is not ``sequence_id``
_OTHER_KEY = object()


def _sequence_entry(buf: bytes, i: int, end: int) -> object:
    """One ``parameters`` map entry (key = field 1, value = field 2, an InferParameter): its value when the
    key is ``sequence_id`` (None when that value is not a usable correlation ID), else :data:`_OTHER_KEY`."""
    key: bytes | None = None
    value: int | str | None = None
    while i < end:
        tag, i = _varint(buf, i)
        field_no, wire = tag >> 3, tag & 7
        if wire == 2:
            length, i = _varint(buf, i)
            stop = i + length
            if stop > end:
                raise ValueError("map entry overruns its length")
            if field_no == 1:
                key = buf[i:stop]
                if key != _SEQUENCE_ID:
                    return _OTHER_KEY
            elif field_no == 2:
                value = _parameter_value(buf, i, stop)
            i = stop
        elif wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError("bad wire type")
    if key != _SEQUENCE_ID:
        return _OTHER_KEY
    return value


def _parameter_value(buf: bytes, i: int, end: int) -> int | str | None:
    """An InferParameter's value if it can be a correlation ID: ``int64_param`` (2) or ``uint64_param`` (5)
    above 0, a non-empty UTF-8 ``string_param`` (3); None for bool, double, 0, "" or a negative int64."""
    value: int | str | None = None
    while i < end:
        tag, i = _varint(buf, i)
        field_no, wire = tag >> 3, tag & 7
        if wire == 0:
            v, i = _varint(buf, i)
            # a oneof's last field on the wire wins; a negative int64 is a varint of 2**63 or more
            limit = 1 << 64 if field_no == 5 else 1 << 63 if field_no == 2 else 0
            value = v if 0 < v < limit else None
        elif wire == 2:
            length, i = _varint(buf, i)
            stop = i + length
            if stop > end:
                raise ValueError("value overruns its length")
            if field_no == 3:
                try:
                    value = buf[i:stop].decode() or None
                except UnicodeDecodeError:
                    value = None
            else:
                value = None
            i = stop
        elif wire == 1:
            i += 8
            value = None  # double_param
        elif wire == 5:
            i += 4
            value = None
        else:
            raise ValueError("bad wire type")
    return value


def split_method(method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    _, service, name = ([*method.split("/", 2), "", ""])[:3]
    return service, name


class _Route:
    __slots__ = ("cfg", "pools", "weights")

    def __init__(self, cfg: RouteConfig) -> None:
        self.cfg = cfg
        if cfg.split:
            self.pools = [a.pool for a in cfg.split]
            self.weights = [a.weight for a in cfg.split]
        else:
            assert cfg.pool is not None
            self.pools = [cfg.pool]
            self.weights = [1.0]

    def matches(self, service: str, method: str, model: str | None) -> bool:
        m = self.cfg.match
        if m.service and not fnmatch.fnmatchcase(service, m.service):
            return False
        if m.method and not fnmatch.fnmatchcase(method, m.method):
            return False
        return not (m.model and (model is None or not fnmatch.fnmatchcase(model, m.model)))


class Resolver(Protocol):
    """Given the first request message (or None) and the request's sequence-affinity key (or None: a
    weighted split is then drawn at random), the pool name to use."""

    def __call__(self, msg: bytes | None, key: bytes | None = None, /) -> str | None: ...


#: resolvers kept per method name (the names come from clients)
MAX_CACHED_METHODS = 10_000


class Router:
    """Compiles routes into a per-method resolver; unmatched requests resolve to None."""

    def __init__(self, routes: list[RouteConfig], rng: random.Random | None = None) -> None:
        self.routes = [_Route(r) for r in routes]
        self.rng = rng if rng is not None else random.Random()
        self._cache: dict[str, tuple[bool, Resolver]] = {}
        #: REST: the routes that match on models only (a gRPC service or method means nothing to REST)
        self._rest_routes = [r for r in self.routes if not r.cfg.match.service and not r.cfg.match.method]
        self._rest_cache: dict[str | None, _Route | None] = {}

    def _choose(self, route: _Route, key: bytes | None = None) -> str:
        if len(route.pools) == 1:
            return route.pools[0]
        if key is not None:  # a sequence stays on one side of a split
            return choose_by_key(key, route.pools, route.weights)
        return self.rng.choices(route.pools, weights=route.weights)[0]

    def resolver(self, method: str) -> tuple[bool, Resolver]:
        """(needs_model, resolve) for ``method``; cached. ``needs_model`` = resolve wants the first message."""
        hit = self._cache.get(method)
        if hit is not None:
            return hit
        service, name = split_method(method)
        candidates = [r for r in self.routes if r.matches(service, name, None) or r.cfg.match.model]
        needs_model = method in MODEL_METHODS and any(r.cfg.match.model for r in candidates)
        resolve: Resolver
        if not needs_model:
            fixed = next((r for r in self.routes if r.matches(service, name, None)), None)

            def resolve_fixed(_msg: bytes | None, key: bytes | None = None, /) -> str | None:
                return None if fixed is None else self._choose(fixed, key)

            resolve = resolve_fixed
        else:
            def resolve_by_model(msg: bytes | None, key: bytes | None = None, /) -> str | None:
                model = peek_model_name(msg) if msg is not None else None
                for r in candidates:
                    if r.matches(service, name, model):
                        return self._choose(r, key)
                return None

            resolve = resolve_by_model
        if len(self._cache) < MAX_CACHED_METHODS:  # client-chosen method names must not grow memory forever
            self._cache[method] = (needs_model, resolve)
        return needs_model, resolve

    def rest_pool(self, model: str | None, key: bytes | None = None) -> str | None:
        """The pool of a REST request for ``model`` (None: the request names no model): the first route
        without a service or method pattern whose model glob matches; None when none does. ``key``: the
        request's sequence-affinity key (a weighted split then chooses by it)."""
        cache = self._rest_cache
        if model in cache:
            route = cache[model]
        else:
            route = next((r for r in self._rest_routes if r.matches("", "", model)), None)
            if len(cache) < MAX_CACHED_METHODS:  # model names come from clients
                cache[model] = route
        return None if route is None else self._choose(route, key)

    def models_for_pool(self, pool: str) -> list[str]:
        """Exact model names routed to ``pool`` (for per-model health checks); globs are skipped."""
        out = []
        for r in self.routes:
            model = r.cfg.match.model
            if model and pool in r.pools and not any(c in model for c in "*?["):
                out.append(model)
        return out
