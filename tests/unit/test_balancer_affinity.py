"""Sequence affinity: peeking ``sequence_id`` from ModelInferRequest bytes and REST JSON, and the
rendezvous choice of an endpoint (balancer/affinity.py)."""

from __future__ import annotations

import collections
import json
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelyard.balancer.affinity import choose_by_key, pick_by_key, rendezvous, sequence_key
from modelyard.balancer.config import RouteConfig, RouteMatch, WeightedPool
from modelyard.balancer.endpoint import Endpoint, NoEndpoint, Snapshot
from modelyard.balancer.rest.wire import json_length, mentions, sequence_from_json
from modelyard.balancer.retry import decide_retry
from modelyard.balancer.routing import Router, peek_sequence_id
from modelyard.protos import grpc_service_pb2 as pb

INFER = "/inference.GRPCInferenceService/ModelInfer"


def request(model: str = "acc", **params: Any) -> pb.ModelInferRequest:
    """A ModelInferRequest as tritonclient builds one: parameters, then an input and its raw bytes."""
    req = pb.ModelInferRequest(model_name=model, model_version="1", id="req-7")
    for name, value in params.items():
        p = req.parameters[name]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            if value < 0:
                p.int64_param = value
            else:
                p.uint64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            assert isinstance(value, str)
            p.string_param = value
    req.inputs.add(name="INPUT", datatype="INT32", shape=[1, 1])
    req.raw_input_contents.append(b"\x05\x00\x00\x00" * 1000)
    return req


# ---------------------------------------------------------------------- the gRPC peek


def test_peek_reads_a_uint64_an_int64_and_a_string_sequence_id() -> None:
    assert peek_sequence_id(request(sequence_id=7, sequence_start=True).SerializeToString()) == 7
    assert peek_sequence_id(request(sequence_id=2**64 - 1).SerializeToString()) == 2**64 - 1
    req = request()
    req.parameters["sequence_id"].int64_param = 2**63 - 1
    assert peek_sequence_id(req.SerializeToString()) == 2**63 - 1
    assert peek_sequence_id(request(sequence_id="user-42:turn", sequence_end=True).SerializeToString()) == \
        "user-42:turn"
    assert peek_sequence_id(request(sequence_id="ünïcode").SerializeToString()) == "ünïcode"


def test_peek_finds_nothing_without_parameters_or_with_other_ones() -> None:
    assert peek_sequence_id(request().SerializeToString()) is None
    assert peek_sequence_id(request(priority=3, timeout=1000, sequence_start=True).SerializeToString()) is None
    assert peek_sequence_id(request(sequence_ix=5, abcdefghijk="x").SerializeToString()) is None  # 11 bytes too
    assert peek_sequence_id(b"") is None
    assert peek_sequence_id(pb.ModelInferRequest(model_name="m").SerializeToString()) is None


def test_peek_refuses_values_that_are_no_correlation_id() -> None:
    # the replica answers these with INVALID_ARGUMENT (or treats 0 / "" as no sequence): no key
    for value in (0, "", -3, True, 1.5):
        assert peek_sequence_id(request(sequence_id=value).SerializeToString()) is None, value


def test_peek_finds_the_key_among_many_parameters_in_any_entry_order() -> None:
    req = request(sequence_start=True, sequence_end=False, priority=1, sequence_id=99, custom="x" * 300)
    assert peek_sequence_id(req.SerializeToString()) == 99
    # a map entry written value first, then key (legal on the wire), before the other fields
    value = b"\x28\x05"  # uint64_param = 5
    entry = b"\x12" + bytes([len(value)]) + value + b"\x0a\x0bsequence_id"
    buf = b"\x0a\x03acc" + b"\x22" + bytes([len(entry)]) + entry + request().SerializeToString()[5:]
    assert peek_sequence_id(buf) == 5


def test_peek_stops_at_the_inputs_without_reading_them() -> None:
    # whatever follows field 4 is never looked at: garbage after the first input tag does not matter
    head = request(sequence_id=11).SerializeToString()
    cut = head.index(b"\x2a")  # field 5 (inputs), length-delimited
    assert peek_sequence_id(head[:cut + 1] + b"\xff" * 50) == 11
    assert peek_sequence_id(request().SerializeToString()[:12] + b"\x2a\xff\xff") is None


def test_peek_of_a_truncated_message_is_the_id_or_nothing_and_never_raises() -> None:
    buf = request(sequence_start=True, sequence_id="s-1").SerializeToString()
    end_of_params = buf.index(b"\x2a")
    answers = {peek_sequence_id(buf[:n]) for n in range(end_of_params)}
    assert answers <= {None, "s-1"}
    assert peek_sequence_id(buf[:end_of_params]) == "s-1"
    assert peek_sequence_id(buf[:buf.index(b"sequence_id") + 3]) is None  # cut inside the entry


@given(st.binary(max_size=200))
def test_peek_survives_garbage(buf: bytes) -> None:
    assert peek_sequence_id(buf) is None or isinstance(peek_sequence_id(buf), int | str)


@given(st.one_of(st.integers(1, 2**64 - 1), st.text(min_size=1, max_size=40)),
       st.dictionaries(st.text(max_size=10).filter(lambda k: k not in ("sequence_id", "model")), st.integers(0, 2**60), max_size=4))
def test_peek_agrees_with_the_protobuf_parse(seq: int | str, others: dict[str, int]) -> None:
    req = request("acc", **others)
    if isinstance(seq, int):
        req.parameters["sequence_id"].uint64_param = seq
    else:
        req.parameters["sequence_id"].string_param = seq
    assert peek_sequence_id(req.SerializeToString()) == seq


# ---------------------------------------------------------------------- the REST peek


def test_rest_json_sequence_id_int_string_and_not() -> None:
    def body(params: object) -> bytes:
        return json.dumps({"inputs": [{"name": "INPUT", "shape": [1], "datatype": "INT32", "data": [1]}],
                           "parameters": params}).encode()

    assert sequence_from_json(body({"sequence_id": 7, "sequence_start": True})) == 7
    assert sequence_from_json(body({"sequence_id": "abc"})) == "abc"
    bad: object
    for bad in ({"sequence_id": 0}, {"sequence_id": ""}, {"sequence_id": True}, {"sequence_id": 1.0},
                {"sequence_id": -1}, {"sequence_id": 2**64}, {}, [], "x"):
        assert sequence_from_json(body(bad)) is None, bad
    assert sequence_from_json(b'{"parameters": {"sequence_id": 7') is None  # not JSON
    assert sequence_from_json(b"[1, 2]") is None


def test_rest_mentions_finds_the_marker_across_chunks_and_only_in_the_json_part() -> None:
    doc = b'{"parameters": {"sequence_id": 5}}'
    for cut in range(len(doc) + 1):
        assert mentions([doc[:cut], doc[cut:]], b'"sequence_id"')
    assert mentions([bytes([c]) for c in doc], b'"sequence_id"')  # one byte per chunk
    assert not mentions([b'{"inputs": []}', b"binary"], b'"sequence_id"')
    assert not mentions([b"{}", b'"sequence_id"'], b'"sequence_id"', limit=2)  # in the binary part: no
    assert mentions([b"{}", b'"sequence_id"'], b'"sequence_id"', limit=15)
    assert json_length([(b"Host", b"x"), (b"Inference-Header-Content-Length", b"120")]) == 120
    assert json_length([(b"inference-header-content-length", b"x")]) is None
    assert json_length([]) is None


# ---------------------------------------------------------------------- rendezvous


def endpoints(n: int, weight: float = 1.0) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}:8001", weight=weight) for i in range(n)]


KEYS = [sequence_key("acc", i) for i in range(1, 6001)]


def owners(eps: list[Endpoint]) -> dict[bytes, Endpoint]:
    snap = Snapshot.of("p", tuple(eps))
    return {k: pick_by_key(snap, k) for k in KEYS}


def test_sequence_key_tells_models_and_id_types_apart() -> None:
    keys = {sequence_key("a", 1), sequence_key("a", "1"), sequence_key("b", 1), sequence_key(None, 1)}
    assert len(keys) == 4
    assert sequence_key(None, 1) == sequence_key("", 1)


def test_rendezvous_is_deterministic_and_ignores_endpoint_order() -> None:
    eps = endpoints(5)
    a = owners(eps)
    shuffled = eps[:]
    random.Random(1).shuffle(shuffled)
    assert owners(shuffled) == a
    # the score depends on addresses, never on objects: another process with its own Endpoints agrees
    assert {k: e.address for k, e in owners(endpoints(5)).items()} == {k: e.address for k, e in a.items()}


def test_rendezvous_spreads_keys_evenly() -> None:
    counts = collections.Counter(e.address for e in owners(endpoints(5)).values())
    assert len(counts) == 5
    assert all(abs(c - 1200) < 150 for c in counts.values()), counts  # 1200 ± 4.5 sigma


def test_removing_an_endpoint_moves_only_its_own_keys() -> None:
    eps = endpoints(5)
    before = owners(eps)
    gone = eps[2]
    after = owners([e for e in eps if e is not gone])
    moved = [k for k in KEYS if before[k] is not after[k]]
    assert moved and all(before[k] is gone for k in moved)
    assert len(moved) == sum(1 for e in before.values() if e is gone)
    # its keys spread over the others, not onto one of them
    assert len({after[k].address for k in moved}) == 4


def test_adding_an_endpoint_moves_about_one_in_n_keys_all_to_it() -> None:
    eps = endpoints(4)
    before = owners(eps)
    new = Endpoint("10.0.0.99:8001")
    after = owners([*eps, new])
    moved = [k for k in KEYS if before[k] is not after[k]]
    assert all(after[k] is new for k in moved)
    assert abs(len(moved) - len(KEYS) / 5) < 150, len(moved)


def test_weights_give_each_endpoint_its_share() -> None:
    eps = endpoints(3)
    eps[0].weight = 2.0
    counts = collections.Counter(e.address for e in owners(eps).values())
    assert abs(counts[eps[0].address] - 3000) < 200, counts
    assert abs(counts[eps[1].address] - 1500) < 200, counts


def test_equal_weights_rank_as_the_plain_highest_hash() -> None:
    cands = [(e, e.address, 3.0) for e in endpoints(4)]
    assert all(rendezvous(k, cands, weighted=True) is rendezvous(k, cands, weighted=False) for k in KEYS)


def test_slow_start_weights_do_not_move_keys() -> None:
    eps = endpoints(3)
    full = owners(eps)
    ramping = Snapshot("p", tuple(Snapshot.of("p", tuple(eps)).entries[i]._replace(weight=0.1 if i == 0 else 1.0)
                                  for i in range(3)))
    assert {k: pick_by_key(ramping, k) for k in KEYS} == full


def test_empty_snapshot_raises_no_endpoint() -> None:
    with pytest.raises(NoEndpoint):
        pick_by_key(Snapshot("p", ()), KEYS[0])
    assert rendezvous(KEYS[0], []) is None


def test_a_weighted_split_keeps_a_sequence_on_one_side() -> None:
    assert len({choose_by_key(KEYS[0], ["blue", "green"], [90, 10]) for _ in range(20)}) == 1
    sides = collections.Counter(choose_by_key(k, ["blue", "green"], [90, 10]) for k in KEYS)
    assert abs(sides["green"] - 600) < 120, sides
    router = Router([RouteConfig(match=RouteMatch(model="acc"),
                                 split=[WeightedPool("blue", 90), WeightedPool("green", 10)])])
    resolve = router.resolver(INFER)[1]
    msg = request(sequence_id=1).SerializeToString()
    assert len({resolve(msg, KEYS[7]) for _ in range(20)}) == 1
    assert len({resolve(msg) for _ in range(200)}) == 2  # without a key: drawn at random, as before
    assert len({router.rest_pool("acc", KEYS[7]) for _ in range(20)}) == 1


def test_a_pinned_call_is_neither_retried_nor_hedged() -> None:
    common = dict(retryable=True, idempotent=True, response_started=False, attempts=1, max_attempts=3,
                  candidates=3, now=0.0, deadline=None, backoff_delay=0.0, retries_in_flight=0, max_retries=64,
                  budget_available=True)
    for kind in ("retry", "hedge"):
        assert decide_retry(kind, **common, pinned=True).counter == "retry_pinned"  # type: ignore[arg-type]
        assert decide_retry(kind, **common).go  # type: ignore[arg-type]
