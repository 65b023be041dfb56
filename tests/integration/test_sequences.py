"""Sequence batching end to end: an accumulator model driven the way Triton's sequence examples drive
theirs (unary calls, a pipelined gRPC stream, asyncio, HTTP; integer and string correlation IDs, with
and without the CORRID control), plus idle expiry, missing START and requests after END."""

from __future__ import annotations

import asyncio
import queue
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

ACCUMULATOR = textwrap.dedent('''
    import time
    import numpy as np
    from modelyard.server.types import InferResponse

    class Model:
        """Adds INPUT to the sequence's running sum (kept in request.sequence.state); reports the
        control inputs it was given and the size of the batch it ran in."""

        def load(self, ctx):
            self.delay = float(ctx.config.parameters.get("delay_s", 0))

        def execute(self, requests):
            if self.delay:
                time.sleep(self.delay)
            out = []
            for r in requests:
                seq = r.sequence
                if seq.start:
                    seq.state["sum"] = 0
                seq.state["sum"] += int(r.inputs["INPUT"].reshape(-1)[0])
                outputs = {
                    "OUTPUT": np.array([[seq.state["sum"]]], np.int32),
                    "START": r.inputs["START"].reshape(1, 1).astype(np.int32),
                    "END": r.inputs["END"].reshape(1, 1).astype(np.int32),
                    "READY": r.inputs["READY"].reshape(1, 1).astype(np.int32),
                    "BATCH": np.array([[len(requests)]], np.int32),
                }
                if "CORRID" in r.inputs:
                    outputs["CORRID"] = r.inputs["CORRID"].reshape(1, 1)
                out.append(InferResponse(outputs=outputs))
            return out
''')


def _config(strategy: str, corrid_type: str | None = None, idle_us: int = 5_000_000, delay_s: float = 0.0,
            instances: int = 1) -> str:
    corrid = ""
    outputs = ""
    if corrid_type:
        corrid = f"    - {{name: CORRID, control: [{{kind: CONTROL_SEQUENCE_CORRID, data_type: {corrid_type}}}]}}\n"
        out_type = "TYPE_STRING" if corrid_type == "TYPE_STRING" else "TYPE_UINT64"
        outputs = f"  - {{name: CORRID, data_type: {out_type}, dims: [1]}}\n"
    return (
        "backend: python\n"
        "max_batch_size: 4\n"
        "input:\n  - {name: INPUT, data_type: TYPE_INT32, dims: [1]}\n"
        "output:\n"
        "  - {name: OUTPUT, data_type: TYPE_INT32, dims: [1]}\n"
        "  - {name: START, data_type: TYPE_INT32, dims: [1]}\n"
        "  - {name: END, data_type: TYPE_INT32, dims: [1]}\n"
        "  - {name: READY, data_type: TYPE_INT32, dims: [1]}\n"
        "  - {name: BATCH, data_type: TYPE_INT32, dims: [1]}\n"
        f"{outputs}"
        f"instance_group: [{{count: {instances}, kind: CPU}}]\n"
        f"parameters: {{delay_s: '{delay_s}'}}\n"
        "sequence_batching:\n"
        f"  max_sequence_idle_microseconds: {idle_us}\n"
        f"  {strategy}\n"
        "  control_input:\n"
        "    - {name: START, control: [{kind: CONTROL_SEQUENCE_START, int32_false_true: [0, 1]}]}\n"
        "    - {name: END, control: [{kind: CONTROL_SEQUENCE_END, fp32_false_true: [0, 1]}]}\n"
        "    - {name: READY, control: [{kind: CONTROL_SEQUENCE_READY, bool_false_true: [false, true]}]}\n"
        f"{corrid}"
    )


MODELS = {
    "accumulate": _config("direct: {}"),
    "accumulate_dyna": _config("direct: {}", corrid_type="TYPE_UINT64"),
    "accumulate_string_dyna": _config("direct: {}", corrid_type="TYPE_STRING"),
    # slow enough that pipelined sequences queue up and get batched together
    "accumulate_slow": _config("direct: {}", delay_s=0.05),
    "accumulate_oldest": _config("oldest: {max_candidate_sequences: 2, max_queue_delay_microseconds: 20000}",
                                 delay_s=0.02, instances=2),
    "accumulate_idle": _config("direct: {}", idle_us=300_000),
}

VALUES = [11, 7, 5, 3, 2, 0, 1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, server_cls):
    repo: Path = tmp_path_factory.mktemp("sequences")
    for name, config in MODELS.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.yaml").write_text(config)
        (repo / name / "1" / "model.py").write_text(ACCUMULATOR)
    srv = server_cls("--model-repository", str(repo))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    with grpcclient.InferenceServerClient(server.grpc_url.removeprefix("http://")) as c:
        yield c


def _inputs(value: int, mod=grpcclient):  # type: ignore[no-untyped-def]
    data = np.full((1, 1), value, np.int32)
    inp = mod.InferInput("INPUT", [1, 1], "INT32")
    inp.set_data_from_numpy(data)
    return [inp]


def _sync_sequence(client, model: str, seq_id, values: list[int]) -> list[int]:  # type: ignore[no-untyped-def]
    out = []
    for i, v in enumerate(values):
        r = client.infer(model, _inputs(v), sequence_id=seq_id, sequence_start=i == 0,
                         sequence_end=i == len(values) - 1)
        out.append(int(r.as_numpy("OUTPUT")[0][0]))
    return out


def _sums(values: list[int]) -> list[int]:
    return list(np.cumsum(values))


def test_sync_sequences_accumulate_in_their_own_state(client):
    # two integer sequences and a string one, their requests interleaved one call at a time
    seqs = {1000: [0, *VALUES], 1001: [100, *(-v for v in VALUES)], "0c9d1b9e-seq": [20, *(-v for v in VALUES)]}
    got: dict = {k: [] for k in seqs}
    for i in range(len(VALUES) + 1):
        for sid, values in seqs.items():
            r = client.infer("accumulate", _inputs(values[i]), sequence_id=sid, sequence_start=i == 0,
                             sequence_end=i == len(values) - 1)
            got[sid].append(int(r.as_numpy("OUTPUT")[0][0]))
            assert int(r.as_numpy("START")[0][0]) == (i == 0)
            assert int(r.as_numpy("END")[0][0]) == (i == len(values) - 1)
            assert int(r.as_numpy("READY")[0][0]) == 1
    for sid, values in seqs.items():
        assert got[sid] == _sums(values), sid


def test_streamed_sequences_keep_their_order_when_pipelined(client):
    """Every request of three sequences is sent before any response is read (as Triton's
    stream example does); each sequence's requests must still run in order."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    seqs = {2000: [0, *VALUES], 2001: [100, *(-v for v in VALUES)], "stream-s": [20, *(-v for v in VALUES)]}
    try:
        for sid, values in seqs.items():
            for i, v in enumerate(values):
                client.async_stream_infer("accumulate_slow", _inputs(v), request_id=f"{sid}_{i}", sequence_id=sid,
                                          sequence_start=i == 0, sequence_end=i == len(values) - 1)
        got: dict = {str(k): {} for k in seqs}
        batches = []
        for _ in range(sum(len(v) for v in seqs.values())):
            result, error = results.get(timeout=30)
            assert error is None, error
            sid, i = result.get_response().id.rsplit("_", 1)
            got[sid][int(i)] = int(result.as_numpy("OUTPUT")[0][0])
            batches.append(int(result.as_numpy("BATCH")[0][0]))
    finally:
        client.stop_stream()
    for sid, values in seqs.items():
        assert [got[str(sid)][i] for i in range(len(values))] == _sums(values), sid
    # three sequences with a request waiting each: batched together in their slots
    assert max(batches) > 1, batches


def test_asyncio_stream_and_concurrent_unary_sequences(server):
    async def main() -> None:
        url = server.grpc_url.removeprefix("http://")
        async with grpcaio.InferenceServerClient(url) as c:
            async def requests():  # type: ignore[no-untyped-def]
                for sid in (3000, 3001):
                    for i, v in enumerate(VALUES):
                        yield {"model_name": "accumulate", "inputs": _inputs(v), "request_id": f"{sid}_{i}",
                               "sequence_id": sid, "sequence_start": i == 0, "sequence_end": i == len(VALUES) - 1}

            got: dict = {"3000": {}, "3001": {}}
            async for result, error in c.stream_infer(requests()):
                assert error is None, error
                sid, i = result.get_response().id.split("_")
                got[sid][int(i)] = int(result.as_numpy("OUTPUT")[0][0])
                if sum(len(v) for v in got.values()) == 2 * len(VALUES):
                    break
            for sid in got:
                assert [got[sid][i] for i in range(len(VALUES))] == _sums(VALUES)

            async def one_sequence(sid: int) -> list[int]:
                out = []
                for i, v in enumerate(VALUES):
                    r = await c.infer("accumulate", _inputs(v), sequence_id=sid, sequence_start=i == 0,
                                      sequence_end=i == len(VALUES) - 1)
                    out.append(int(r.as_numpy("OUTPUT")[0][0]))
                return out

            # many sequences at once from one client: each still sums only its own values
            results = await asyncio.gather(*(one_sequence(3100 + n) for n in range(8)))
            assert all(r == _sums(VALUES) for r in results)

    asyncio.run(main())


def test_http_sequence(server):
    with httpclient.InferenceServerClient(server.http_url.removeprefix("http://")) as c:
        out = []
        for i, v in enumerate(VALUES):
            r = c.infer("accumulate", _inputs(v, httpclient), sequence_id=4000, sequence_start=i == 0,
                        sequence_end=i == len(VALUES) - 1)
            out.append(int(r.as_numpy("OUTPUT")[0][0]))
        assert out == _sums(VALUES)
        # a string correlation ID over HTTP too
        assert [int(c.infer("accumulate", _inputs(v, httpclient), sequence_id="h-1", sequence_start=i == 0)
                    .as_numpy("OUTPUT")[0][0]) for i, v in enumerate([5, 6])] == [5, 11]


def test_dynamic_sequence_ids_reach_the_model_as_corrid(client):
    r = client.infer("accumulate_dyna", _inputs(1), sequence_id=2**40 + 5, sequence_start=True, sequence_end=True)
    assert int(r.as_numpy("CORRID")[0][0]) == 2**40 + 5
    r = client.infer("accumulate_string_dyna", _inputs(1), sequence_id="1002", sequence_start=True, sequence_end=True)
    assert r.as_numpy("CORRID")[0][0] == b"1002"
    # an integer CORRID control cannot carry a string ID
    with pytest.raises(InferenceServerException, match="must specify an integer correlation ID") as e:
        client.infer("accumulate_dyna", _inputs(1), sequence_id="abc", sequence_start=True)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_first_request_without_start_is_refused(client):
    with pytest.raises(InferenceServerException) as e:
        client.infer("accumulate", _inputs(1), sequence_id=5000)
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert ("inference request for sequence 5000 to model 'accumulate' must specify the START flag on the first "
            "request of the sequence") in e.value.message()


def test_request_without_correlation_id_is_refused(client):
    with pytest.raises(InferenceServerException) as e:
        client.infer("accumulate", _inputs(1))
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "must specify a non-zero or non-empty correlation ID" in e.value.message()


def test_requests_after_end_need_a_new_start(client):
    assert _sync_sequence(client, "accumulate", 6000, [1, 2]) == [1, 3]
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        client.infer("accumulate", _inputs(4), sequence_id=6000)
    # START again: a new sequence under the same ID, from a fresh state
    assert _sync_sequence(client, "accumulate", 6000, [10, 1]) == [10, 11]


def test_start_on_a_running_sequence_restarts_it(client):
    client.infer("accumulate", _inputs(7), sequence_id=6100, sequence_start=True)
    r = client.infer("accumulate", _inputs(3), sequence_id=6100, sequence_start=True)
    assert int(r.as_numpy("OUTPUT")[0][0]) == 3
    client.infer("accumulate", _inputs(0), sequence_id=6100, sequence_end=True)


def test_stream_reports_out_of_order_requests_in_band(client):
    """A continuation sent before its sequence's START, on a stream: its error comes back in the
    stream, the stream goes on, and the sequence started afterwards is unaffected."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("accumulate", _inputs(5), request_id="early", sequence_id=6200)
        client.async_stream_infer("accumulate", _inputs(1), request_id="a", sequence_id=6200, sequence_start=True)
        client.async_stream_infer("accumulate", _inputs(2), request_id="b", sequence_id=6200, sequence_end=True)
        seen = [results.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    errors = [e for _, e in seen if e is not None]
    assert len(errors) == 1 and "must specify the START flag" in str(errors[0])
    assert sorted(int(r.as_numpy("OUTPUT")[0][0]) for r, e in seen if e is None) == [1, 3]


def test_idle_sequence_is_ended_and_its_slot_freed(client):
    """Four sequences take the model's four slots and go quiet; a fifth waits in the backlog until the
    idle timeout (0.3 s) ends them and frees their slots, then runs. The quiet ones are gone."""
    for sid in range(7000, 7004):
        client.infer("accumulate_idle", _inputs(1), sequence_id=sid, sequence_start=True)
    t0 = time.monotonic()
    r = client.infer("accumulate_idle", _inputs(5), sequence_id=7010, sequence_start=True, client_timeout=20)
    assert int(r.as_numpy("OUTPUT")[0][0]) == 5
    assert time.monotonic() - t0 >= 0.2  # it waited for the idle timeout, not for a free slot
    with pytest.raises(InferenceServerException, match="must specify the START flag"):
        client.infer("accumulate_idle", _inputs(1), sequence_id=7000)
    client.infer("accumulate_idle", _inputs(0), sequence_id=7010, sequence_end=True)
    # the slots are free again: new sequences start and run
    for sid in range(7100, 7104):
        assert _sync_sequence(client, "accumulate_idle", sid, [2, 3]) == [2, 5]


def test_more_sequences_than_slots_wait_in_the_backlog(client):
    """oldest: 2 candidate sequences; 6 sequences on one stream complete, each in order."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    sids = list(range(8000, 8006))
    try:
        for sid in sids:
            for i, v in enumerate([1, 2, 3]):
                client.async_stream_infer("accumulate_oldest", _inputs(v * (sid - 7999)), request_id=f"{sid}_{i}",
                                          sequence_id=sid, sequence_start=i == 0, sequence_end=i == 2)
        got: dict = {}
        batches = []
        for _ in range(len(sids) * 3):
            result, error = results.get(timeout=30)
            assert error is None, error
            sid, i = result.get_response().id.split("_")
            got.setdefault(int(sid), {})[int(i)] = int(result.as_numpy("OUTPUT")[0][0])
            batches.append(int(result.as_numpy("BATCH")[0][0]))
    finally:
        client.stop_stream()
    for sid in sids:
        k = sid - 7999
        assert [got[sid][i] for i in range(3)] == [k, 3 * k, 6 * k]
    assert max(batches) <= 2  # never more sequences in a batch than candidates
    assert 2 in batches


def test_batch_size_above_one_is_refused(client):
    inp = grpcclient.InferInput("INPUT", [2, 1], "INT32")
    inp.set_data_from_numpy(np.ones((2, 1), np.int32))
    with pytest.raises(InferenceServerException, match="must specify batch-size 1"):
        client.infer("accumulate", [inp], sequence_id=9000, sequence_start=True)


def test_config_shows_sequence_batching(client):
    cfg = client.get_model_config("accumulate_dyna", as_json=True)["config"]
    sb = cfg["sequence_batching"]
    assert sb["max_sequence_idle_microseconds"] == "5000000"
    kinds = {ci["name"]: ci["control"][0].get("kind", "CONTROL_SEQUENCE_START") for ci in sb["control_input"]}
    assert kinds == {"START": "CONTROL_SEQUENCE_START", "END": "CONTROL_SEQUENCE_END",
                     "READY": "CONTROL_SEQUENCE_READY", "CORRID": "CONTROL_SEQUENCE_CORRID"}
    assert "direct" in sb
