"""The sequence batcher's decisions (SequenceTable), driven with a fake clock: order within a
sequence, one request of a sequence at a time, slots and backlog, direct instance affinity,
oldest batching, idle expiry, END then START, deadlines."""

from __future__ import annotations

import numpy as np
import pytest

from modelyard.server.errors import DeadlineExceeded, InvalidInput
from modelyard.server.model_config import (
    SequenceBatching,
    SequenceControl,
    SequenceControlInput,
    SequenceDirect,
    SequenceOldest,
)
from modelyard.server.scheduling.sequence import Item, SequenceTable, control_tensors


def table(*, oldest: SequenceOldest | None = None, direct: SequenceDirect | None = None, instances: int = 1,
          max_batch_size: int = 2, idle_us: int = 1_000_000) -> SequenceTable:
    sb = SequenceBatching(max_sequence_idle_microseconds=idle_us, oldest=oldest, direct=direct)
    return SequenceTable("m", sb, instances=instances, max_batch_size=max_batch_size)


def names(plan_batches: list[tuple[int, list[Item]]]) -> list[tuple[int, list[str]]]:
    return [(inst, [i.payload for i in items]) for inst, items in plan_batches]


def test_a_sequence_runs_one_request_at_a_time_in_order():
    t = table()
    t.submit(1, True, False, 0.0, payload="a0")
    t.submit(1, False, False, 0.0, payload="a1")
    t.submit(1, False, True, 0.0, payload="a2")
    plan = t.plan(0.0, [0])
    assert names(plan.batches) == [(0, ["a0"])]
    # the sequence is busy: nothing more until its request comes back, even with an idle instance
    assert t.plan(0.0, [0]).batches == []
    t.finished(plan.batches[0][1], 0.01)
    plan = t.plan(0.01, [0])
    assert names(plan.batches) == [(0, ["a1"])]
    t.finished(plan.batches[0][1], 0.02)
    plan = t.plan(0.02, [0])
    assert names(plan.batches) == [(0, ["a2"])]
    t.finished(plan.batches[0][1], 0.03)
    assert t.live == {} and t.free_slots == {0, 1}  # END released the slot


def test_sequences_are_batched_together_one_request_each():
    t = table(max_batch_size=4)
    for sid in (1, 2, 3):
        t.submit(sid, True, False, 0.0, payload=f"{sid}:0")
        t.submit(sid, False, False, 0.0, payload=f"{sid}:1")
    plan = t.plan(0.0, [0])
    assert names(plan.batches) == [(0, ["1:0", "2:0", "3:0"])]


def test_start_and_correlation_id_are_required():
    t = table()
    with pytest.raises(InvalidInput, match="non-zero or non-empty correlation ID"):
        t.submit(None, True, False, 0.0)
    with pytest.raises(InvalidInput, match="sequence 7 to model 'm' must specify the START flag"):
        t.submit(7, False, False, 0.0)
    # 1 and "1" are different sequences
    t.submit(1, True, False, 0.0)
    with pytest.raises(InvalidInput, match="START"):
        t.submit("1", False, False, 0.0)


def test_sequences_beyond_the_slots_wait_in_the_backlog_in_order():
    t = table(max_batch_size=1)  # one slot
    t.submit(1, True, True, 0.0, payload="1")
    t.submit(2, True, True, 0.0, payload="2")
    t.submit(3, True, True, 0.0, payload="3")
    plan = t.plan(0.0, [0])
    assert names(plan.batches) == [(0, ["1"])]
    t.finished(plan.batches[0][1], 0.1)
    plan = t.plan(0.1, [0])
    assert names(plan.batches) == [(0, ["2"])]
    t.finished(plan.batches[0][1], 0.2)
    assert names(t.plan(0.2, [0]).batches) == [(0, ["3"])]


def test_direct_keeps_a_sequence_on_its_instance():
    t = table(instances=2, max_batch_size=1)
    t.submit(1, True, False, 0.0, payload="1a")
    t.submit(2, True, False, 0.0, payload="2a")  # spread: the other instance
    plan = t.plan(0.0, [0, 1])
    assert sorted(names(plan.batches)) == [(0, ["1a"]), (1, ["2a"])]
    for _, items in plan.batches:
        t.finished(items, 0.1)
    t.submit(1, False, True, 0.1, payload="1b")
    # instance 0 is busy: sequence 1 waits for it although instance 1 is idle
    assert t.plan(0.1, [1]).batches == []
    assert names(t.plan(0.1, [0]).batches) == [(0, ["1b"])]


def test_direct_minimum_slot_utilization_waits_up_to_the_delay():
    t = table(max_batch_size=4, direct=SequenceDirect(max_queue_delay_microseconds=10_000, minimum_slot_utilization=0.5))
    t.submit(1, True, False, 0.0, payload="1")
    plan = t.plan(0.0, [0])
    assert plan.batches == [] and plan.wake_at == pytest.approx(0.01)
    t.submit(2, True, False, 0.001, payload="2")  # 2 of 4 slots ready: run now
    assert names(t.plan(0.001, [0]).batches) == [(0, ["1", "2"])]
    t2 = table(max_batch_size=4, direct=SequenceDirect(max_queue_delay_microseconds=10_000, minimum_slot_utilization=0.5))
    t2.submit(1, True, False, 0.0, payload="1")
    assert names(t2.plan(0.011, [0]).batches) == [(0, ["1"])]  # the delay passed


def test_oldest_batches_the_oldest_requests_on_any_instance():
    t = table(oldest=SequenceOldest(max_candidate_sequences=3, max_queue_delay_microseconds=5_000), max_batch_size=2,
              instances=2)
    t.submit(1, True, False, 0.000, payload="1")
    plan = t.plan(0.000, [0, 1])
    assert plan.batches == [] and plan.wake_at == pytest.approx(0.005)
    t.submit(2, True, False, 0.001, payload="2")
    t.submit(3, True, False, 0.002, payload="3")
    t.submit(4, True, False, 0.003, payload="4")  # a 4th sequence: no candidate slot, backlog
    plan = t.plan(0.003, [1, 0])
    # a full batch of the two oldest at once; the third waits for the delay or a partner
    assert names(plan.batches) == [(1, ["1", "2"])]
    assert plan.wake_at == pytest.approx(0.007)
    plan = t.plan(0.007, [0])
    assert names(plan.batches) == [(0, ["3"])]


def test_oldest_cuts_to_a_preferred_batch_size_after_the_delay():
    t = table(oldest=SequenceOldest(preferred_batch_size=[2], max_queue_delay_microseconds=1_000), max_batch_size=4)
    for sid in (1, 2, 3):
        t.submit(sid, True, False, 0.0, payload=str(sid))
    plan = t.plan(0.0, [0])
    assert names(plan.batches) == [(0, ["1", "2"])]  # reached the largest preferred size: at once


def test_idle_sequence_is_released_and_frees_its_slot_for_the_backlog():
    t = table(max_batch_size=1, idle_us=100_000)
    t.submit(1, True, False, 0.0, payload="1")
    plan = t.plan(0.0, [0])
    t.finished(plan.batches[0][1], 0.01)
    t.submit(2, True, False, 0.02, payload="2")  # backlog: the only slot is sequence 1's
    plan = t.plan(0.05, [0])
    assert plan.batches == [] and plan.wake_at == pytest.approx(0.11)
    plan = t.plan(0.11, [0])
    assert plan.released == [1]
    assert names(plan.batches) == [(0, ["2"])]
    with pytest.raises(InvalidInput, match="START"):
        t.submit(1, False, False, 0.12)


def test_requests_queued_behind_an_end_fail_unless_a_start_follows():
    t = table()
    t.submit(1, True, True, 0.0, payload="end")
    t.submit(1, False, False, 0.0, payload="orphan")
    t.submit(1, True, False, 0.0, payload="restart")
    plan = t.plan(0.0, [0])
    failed = t.finished(plan.batches[0][1], 0.1)
    assert [(i.payload, type(e)) for i, e in failed] == [("orphan", InvalidInput)]
    assert names(t.plan(0.1, [0]).batches) == [(0, ["restart"])]


def test_expired_and_removed_requests_are_never_computed():
    t = table()
    a = t.submit(1, True, False, 0.0, deadline=0.5, payload="a")
    t.submit(2, True, False, 0.0, payload="b")
    t.remove(t.submit(3, True, False, 0.0, payload="c"))
    plan = t.plan(1.0, [0])
    assert [(i.payload, type(e)) for i, e in plan.failed] == [("a", DeadlineExceeded)]
    assert a.done
    assert names(plan.batches) == [(0, ["b"])]
    assert len(t) == 0


def test_control_tensors_carry_triton_values():
    sb = SequenceBatching(control_input=[
        SequenceControlInput("S", [SequenceControl("CONTROL_SEQUENCE_START", fp32_false_true=[0.0, 1.0])]),
        SequenceControlInput("E", [SequenceControl("CONTROL_SEQUENCE_END", int32_false_true=[5, 9])]),
        SequenceControlInput("R", [SequenceControl("CONTROL_SEQUENCE_READY", bool_false_true=[False, True])]),
        SequenceControlInput("C", [SequenceControl("CONTROL_SEQUENCE_CORRID", data_type="UINT32")]),
    ])
    out = control_tensors(sb, 2**32 + 7, True, False, batched=True)
    assert out["S"].dtype == np.float32 and out["S"].tolist() == [[1.0]]
    assert out["E"].dtype == np.int32 and out["E"].tolist() == [[5]]
    assert out["R"].dtype == np.bool_ and out["R"].tolist() == [[True]]
    assert out["C"].dtype == np.uint32 and out["C"].tolist() == [[7]]  # low 32 bits, as Triton
    assert control_tensors(sb, 3, False, True, batched=False)["E"].shape == (1,)


def test_a_sequence_config_survives_the_json_round_trip_of_a_load_override():
    """Triton's JSON (what get_model_config returns and load(config=...) takes) leaves out a START
    control's kind (the proto's 0): a config read back from the wire and loaded again keeps it."""
    import json

    from google.protobuf import json_format

    from modelyard.server.model_config import parse_config, to_proto
    from modelyard.server.model_control import parse_override

    cfg = parse_config({"backend": "python", "max_batch_size": 2,
                        "input": [{"name": "INPUT", "data_type": "TYPE_INT32", "dims": [1]}],
                        "output": [{"name": "OUTPUT", "data_type": "TYPE_INT32", "dims": [1]}],
                        "sequence_batching": {"oldest": {"max_candidate_sequences": 3}, "control_input": [
                            {"name": "START", "control": [{"kind": "CONTROL_SEQUENCE_START", "int32_false_true": [0, 1]}]},
                            {"name": "CORRID", "control": [{"kind": "CONTROL_SEQUENCE_CORRID", "data_type": "TYPE_UINT64"}]},
                        ]}}, "m")
    text = json_format.MessageToJson(to_proto(cfg), preserving_proto_field_name=True)
    assert "CONTROL_SEQUENCE_START" not in text  # protobuf JSON omits the default enum value
    again = parse_override("m", text)
    assert again.sequence_batching is not None
    assert [(n, c.kind) for n, c in again.sequence_batching.controls()] == [
        ("START", "CONTROL_SEQUENCE_START"), ("CORRID", "CONTROL_SEQUENCE_CORRID")]
    assert again.sequence_batching.oldest is not None and again.sequence_batching.oldest.max_candidate_sequences == 3
    assert json.loads(text)["sequence_batching"]["max_sequence_idle_microseconds"] == "1000000"


def test_a_uint64_correlation_id_keeps_its_bits_in_signed_and_32_bit_controls():
    def corrid(datatype: str) -> np.ndarray:
        sb = SequenceBatching(control_input=[
            SequenceControlInput("C", [SequenceControl("CONTROL_SEQUENCE_CORRID", data_type=datatype)])])
        return control_tensors(sb, 2**63 + 2**32 + 7, True, False, batched=False)["C"]

    assert corrid("UINT64").tolist() == [2**63 + 2**32 + 7]
    assert corrid("INT64").tolist() == [2**63 + 2**32 + 7 - 2**64]  # two's complement, as a C cast
    assert corrid("UINT32").tolist() == [7] and corrid("INT32").tolist() == [7]
