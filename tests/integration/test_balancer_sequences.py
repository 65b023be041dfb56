"""Sequence affinity through the balancer: requests of one Triton sequence (same model and ``sequence_id``)
reach the replica that holds its state -- over unary gRPC, a gRPC stream and REST -- while requests
without one are balanced as before; a pinned request is never retried elsewhere nor hedged."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from modelyard.balancer.app import Balancer
from modelyard.balancer.config import config_from_dict
from modelyard.launcher import BalancerProcess, ServerProcess, free_port
from modelyard.protos import grpc_service_pb2 as pb

INFER = "/inference.GRPCInferenceService/ModelInfer"

# the accumulator of tests/integration/test_sequences.py: a running sum kept in the sequence's state
ACCUMULATOR = textwrap.dedent('''
    import numpy as np
    from modelyard.server.types import InferResponse

    class Model:
        def execute(self, requests):
            out = []
            for r in requests:
                seq = r.sequence
                if seq.start:
                    seq.state["sum"] = 0
                seq.state["sum"] += int(r.inputs["INPUT"].reshape(-1)[0])
                out.append(InferResponse(outputs={"OUTPUT": np.array([[seq.state["sum"]]], np.int32)}))
            return out
''')

CONFIG = (
    "backend: python\n"
    "max_batch_size: 8\n"  # 8 slots per replica: all 8 sequences fit on one
    "input:\n  - {name: INPUT, data_type: TYPE_INT32, dims: [1]}\n"
    "output:\n  - {name: OUTPUT, data_type: TYPE_INT32, dims: [1]}\n"
    "sequence_batching:\n"
    "  max_sequence_idle_microseconds: 5000000\n"
    "  direct: {}\n"
    "  control_input:\n"
    "    - {name: START, control: [{kind: CONTROL_SEQUENCE_START, int32_false_true: [0, 1]}]}\n"
)

VALUES = [11, 7, 5, 3, 2, 1]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    repo: Path = tmp_path_factory.mktemp("sequences")
    (repo / "accumulate" / "1").mkdir(parents=True)
    (repo / "accumulate" / "config.yaml").write_text(CONFIG)
    (repo / "accumulate" / "1" / "model.py").write_text(ACCUMULATOR)
    with contextlib.ExitStack() as stack:  # each started, and always stopped
        yield [stack.enter_context(ServerProcess(["--model-repository", str(repo), "--log-level", "warning"],
                                                 name=f"serve{i}")) for i in range(3)]


@contextlib.asynccontextmanager
async def balancer(members: list[Any], **pool: Any) -> AsyncIterator[Balancer]:
    cfg = config_from_dict({
        "listeners": [{"address": "127.0.0.1:0"}],
        "admin": {"address": "127.0.0.1:0"},
        "rest": {"listeners": ["127.0.0.1:0"]},
        "pools": {"p": {"picker": "round_robin", "endpoints": {"static": members},
                        "health_check": {"interval": 0.2, "timeout": 0.5}, **pool}},
    })
    async with Balancer(cfg) as b:
        yield b


def member(p: ServerProcess) -> dict[str, str]:
    assert p.endpoints is not None
    return {"address": p.endpoints.grpc, "http": p.endpoints.http}


def sums(values: list[int]) -> list[int]:
    return [int(x) for x in np.cumsum(values)]


def inputs(value: int, mod: Any = grpcclient) -> list[Any]:
    inp = mod.InferInput("INPUT", [1, 1], "INT32")
    inp.set_data_from_numpy(np.full((1, 1), value, np.int32))
    return [inp]


def output(result: Any) -> int:
    return int(result.as_numpy("OUTPUT")[0][0])


def requests_by_replica(b: Balancer) -> dict[str, int]:
    return {r["address"]: r["requests"] for r in b.endpoint_rows()}


# ---------------------------------------------------------------------- real replicas


async def test_interleaved_unary_sequences_each_reach_their_replica(replicas: list[ServerProcess]) -> None:
    # 8 sequences (integer and string IDs), one call each in turn: round robin alone would send every
    # request after the first to a replica that never saw the START
    ids: list[int | str] = [1, 2, 3, 4, 5, 2**40 + 5, "chat-a", "chat-b"]
    seqs = {sid: [i * 10 + v for v in VALUES] for i, sid in enumerate(ids)}
    async with balancer([member(p) for p in replicas]) as b:
        def drive() -> dict[int | str, list[int]]:
            got: dict[int | str, list[int]] = {sid: [] for sid in seqs}
            with grpcclient.InferenceServerClient(f"127.0.0.1:{b.ports[0]}") as c:
                for i in range(len(VALUES)):
                    for sid, values in seqs.items():
                        r = c.infer("accumulate", inputs(values[i]), sequence_id=sid, sequence_start=i == 0,
                                    sequence_end=i == len(VALUES) - 1)
                        got[sid].append(output(r))
            return got

        got = await asyncio.to_thread(drive)
        for sid, values in seqs.items():
            assert got[sid] == sums(values), sid
        assert b.stats.events[("p", "sequence_pinned")] == len(seqs) * len(VALUES)
        assert sum(1 for n in requests_by_replica(b).values() if n) >= 2  # the sequences are spread


async def test_a_stream_meets_the_unary_requests_of_its_sequence(replicas: list[ServerProcess]) -> None:
    # each sequence: START over unary, the middle over its own stream (pinned by its first message),
    # END over unary again -- all on one replica
    seqs = {100 + i: [i + v for v in VALUES] for i in range(4)}
    async with balancer([member(p) for p in replicas]) as b:
        def drive() -> dict[int, list[int]]:
            got: dict[int, list[int]] = {}
            with grpcclient.InferenceServerClient(f"127.0.0.1:{b.ports[0]}") as c:
                for sid, values in seqs.items():
                    out = [output(c.infer("accumulate", inputs(values[0]), sequence_id=sid, sequence_start=True))]
                    results: queue.Queue[Any] = queue.Queue()
                    c.start_stream(callback=lambda result, error, q=results: q.put((result, error)))
                    try:
                        for v in values[1:-1]:
                            c.async_stream_infer("accumulate", inputs(v), sequence_id=sid)
                        for _ in values[1:-1]:
                            result, error = results.get(timeout=30)
                            assert error is None, error
                            out.append(output(result))
                    finally:
                        c.stop_stream()
                    out.append(output(c.infer("accumulate", inputs(values[-1]), sequence_id=sid,
                                              sequence_end=True)))
                    got[sid] = out
            return got

        got = await asyncio.to_thread(drive)
        for sid, values in seqs.items():
            assert got[sid] == sums(values), sid


async def test_rest_sequences_are_pinned_and_meet_their_grpc_requests(replicas: list[ServerProcess]) -> None:
    ids: list[int | str] = [7, 8, 9, "rest-s"]
    seqs = {sid: [i + v for v in VALUES] for i, sid in enumerate(ids)}
    async with balancer([member(p) for p in replicas]) as b:
        def drive() -> dict[int | str, list[int]]:
            got: dict[int | str, list[int]] = {sid: [] for sid in seqs}
            http = httpclient.InferenceServerClient(f"127.0.0.1:{b.rest_ports[0]}")
            try:
                with grpcclient.InferenceServerClient(f"127.0.0.1:{b.ports[0]}") as g:
                    for i in range(len(VALUES)):
                        for n, (sid, values) in enumerate(seqs.items()):
                            flags = {"sequence_id": sid, "sequence_start": i == 0, "sequence_end": i == len(VALUES) - 1}
                            if (i + n) % 3 == 2:  # every third request over gRPC: both listeners agree
                                got[sid].append(output(g.infer("accumulate", inputs(values[i]), **flags)))
                                continue
                            binary = (i + n) % 2 == 0  # JSON data, or Triton's binary data extension
                            inp = inputs(values[i], httpclient)
                            inp[0].set_data_from_numpy(np.full((1, 1), values[i], np.int32), binary_data=binary)
                            # one JSON over 256 KiB: its sequence_id is parsed in a worker thread
                            big = {"request_id": "r" * 300_000} if sid == "rest-s" and i == 3 else {}
                            got[sid].append(output(http.infer("accumulate", inp, **flags, **big)))
            finally:
                http.close()
            return got

        got = await asyncio.to_thread(drive)
        for sid, values in seqs.items():
            assert got[sid] == sums(values), sid
        assert b.stats.events[("p", "sequence_pinned")] == len(seqs) * len(VALUES)


def test_every_worker_process_pins_a_sequence_to_the_same_replica(replicas: list[ServerProcess]) -> None:
    # a new connection per request: SO_REUSEPORT hands them to either worker, and each hashes alike
    seqs = {300 + i: [i + v for v in VALUES] for i in range(6)}
    cfg = {"listeners": [{"address": f"127.0.0.1:{free_port()}"}], "admin": {"address": "127.0.0.1:0"},
           "workers": 2,
           "pools": {"p": {"picker": "round_robin", "endpoints": {"static": [p.endpoints.grpc for p in replicas
                                                                              if p.endpoints is not None]}}}}
    b = BalancerProcess(config=cfg, extra_args=["--log-level", "WARNING"])
    b.start()
    try:
        got: dict[int, list[int]] = {sid: [] for sid in seqs}
        for i in range(len(VALUES)):
            for sid, values in seqs.items():
                with grpcclient.InferenceServerClient(f"127.0.0.1:{b.port}") as c:
                    got[sid].append(output(c.infer("accumulate", inputs(values[i]), sequence_id=sid,
                                                   sequence_start=i == 0, sequence_end=i == len(VALUES) - 1)))
    finally:
        b.stop()
    for sid, values in seqs.items():
        assert got[sid] == sums(values), sid


# ---------------------------------------------------------------------- in-test backends


class Backend:
    """A ModelInfer service that answers with its name, or refuses (UNAVAILABLE), or hangs."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self.mode = "ok"
        self.server: grpc.aio.Server | None = None
        self.address = ""

    async def start(self) -> None:
        async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.calls += 1
            if self.mode == "refuse":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
            if self.mode == "hang":
                await asyncio.sleep(3600)
            return pb.ModelInferResponse(model_name=self.name).SerializeToString()

        handlers = grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(infer)})
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers((handlers,))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        await self.server.start()


@pytest.fixture
async def backends() -> AsyncIterator[list[Backend]]:
    bs = [Backend(n) for n in "abc"]
    for b in bs:
        await b.start()
    yield bs
    for b in bs:
        assert b.server is not None
        await b.server.stop(0)


def infer_bytes(sequence_id: int | None = None) -> bytes:
    req = pb.ModelInferRequest(model_name="acc")
    if sequence_id is not None:
        req.parameters["sequence_id"].uint64_param = sequence_id
    req.inputs.add(name="INPUT", datatype="INT32", shape=[1, 1])
    req.raw_input_contents.append(b"\x01\x00\x00\x00")
    return req.SerializeToString()


async def answered_by(ch: grpc.aio.Channel, sequence_id: int | None) -> str:
    resp = await ch.unary_unary(INFER)(infer_bytes(sequence_id), timeout=5)
    return pb.ModelInferResponse.FromString(resp).model_name


async def test_unpinned_requests_are_balanced_as_before_and_pinned_ones_stay(backends: list[Backend]) -> None:
    async with balancer([x.address for x in backends], health_check={"enabled": False}) as b, \
            grpc.aio.insecure_channel(f"127.0.0.1:{b.ports[0]}") as ch:
        assert {await answered_by(ch, None) for _ in range(6)} == {"a", "b", "c"}  # round robin
        homes = {sid: {await answered_by(ch, sid) for _ in range(5)} for sid in range(1, 13)}
        assert all(len(h) == 1 for h in homes.values()), homes
        assert len(set.union(*homes.values())) >= 2


async def test_without_sequence_affinity_the_picker_spreads_a_sequence(backends: list[Backend]) -> None:
    async with balancer([x.address for x in backends], health_check={"enabled": False},
                        sequence_affinity=False) as b, grpc.aio.insecure_channel(f"127.0.0.1:{b.ports[0]}") as ch:
        assert {await answered_by(ch, 42) for _ in range(6)} == {"a", "b", "c"}
        assert b.stats.events[("p", "sequence_pinned")] == 0


async def test_a_pinned_request_is_not_retried_elsewhere_nor_hedged(backends: list[Backend]) -> None:
    pool = {"health_check": {"enabled": False}, "outlier_detection": {"enabled": False},
            "hedge": {"min_per_try": 0.05, "initial_per_try": 0.05}}
    async with balancer([x.address for x in backends], **pool) as b, \
            grpc.aio.insecure_channel(f"127.0.0.1:{b.ports[0]}") as ch:
        home = {x.name: x for x in backends}[await answered_by(ch, 77)]
        home.mode = "refuse"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await answered_by(ch, 77)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert b.stats.events[("p", "retry_pinned")] == 1
        assert sum(x.calls for x in backends if x is not home) == 0
        await answered_by(ch, None)  # an unpinned request that meets the refusing replica is retried
        await answered_by(ch, None)
        await answered_by(ch, None)
        home.mode = "hang"
        calls = sum(x.calls for x in backends)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary(INFER)(infer_bytes(77), timeout=0.5)
        assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert sum(x.calls for x in backends) == calls + 1  # no hedge went out
        assert b.stats.events[("p", "hedges")] == 0
