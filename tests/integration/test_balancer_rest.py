"""The balancer's REST listener in front of real ``modelyard serve`` replicas: tritonclient.http, the openai
client (streamed SSE), raw keep-alive and pipelining, bad input, routing by model, retries and ejection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from modelyard.balancer.app import Balancer
from modelyard.balancer.config import config_from_dict
from modelyard.launcher import ServerProcess, free_port
from modelyard.server.demo_models import DEMO_REPOSITORY

CHAT_MODEL = '''
import time

import numpy as np

from modelyard.server.types import InferResponse


class Model:
    """Streams the prompt's last five words (not the chat template's "role:") back, one every 60 ms."""

    def execute(self, requests):
        return [InferResponse(outputs={"TOKEN": np.array([r.inputs["TEXT"].reshape(-1)[0]], dtype=object)})
                for r in requests]

    def stream(self, request, cancelled):
        words = [w for w in request.inputs["TEXT"].reshape(-1)[0].split() if not w.endswith(b":")][-5:]
        for i, w in enumerate(words):
            if cancelled():
                return
            time.sleep(0.06)
            yield InferResponse(outputs={"TOKEN": np.array([w + b" "], dtype=object)}, final=i == len(words) - 1)
'''

CHAT_CONFIG = """
backend: python
max_batch_size: 0
decoupled: true
input: [{name: TEXT, data_type: TYPE_STRING, dims: [1]}]
output: [{name: TOKEN, data_type: TYPE_STRING, dims: [1]}]
parameters: {task: text-generation}
"""


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """identity, an embedding model and a streaming chat model."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(DEMO_REPOSITORY / "identity", root / "identity")
    shutil.copytree(DEMO_REPOSITORY / "text_embed_demo", root / "embed")
    cfg = (root / "embed" / "config.yaml").read_text().replace("parameters:\n", "parameters:\n  task: embedding\n")
    (root / "embed" / "config.yaml").write_text(cfg)
    (root / "chat" / "1").mkdir(parents=True)
    (root / "chat" / "config.yaml").write_text(CHAT_CONFIG)
    (root / "chat" / "1" / "model.py").write_text(CHAT_MODEL)
    return root


@pytest.fixture(scope="module")
def replicas(repository: Path) -> Iterator[list[ServerProcess]]:
    with contextlib.ExitStack() as stack:  # each started, and always stopped
        yield [stack.enter_context(ServerProcess(["--model-repository", str(repository), "--log-level", "warning"],
                                                 name=f"serve{i}")) for i in range(2)]


def member(p: ServerProcess) -> dict[str, str]:
    assert p.endpoints is not None
    return {"address": p.endpoints.grpc, "http": p.endpoints.http}


@contextlib.asynccontextmanager
async def balancer(pools: dict[str, Any], **extra: Any) -> AsyncIterator[Balancer]:
    rest = {"listeners": ["127.0.0.1:0"], **extra.pop("rest", {})}
    cfg = config_from_dict({"listeners": [{"address": "127.0.0.1:0"}], "admin": {"address": "127.0.0.1:0"},
                            "rest": rest, "pools": pools, **extra})
    async with Balancer(cfg) as b:
        yield b


def pool_of(*members: Any, **kw: Any) -> dict[str, Any]:
    return {"picker": "round_robin", "endpoints": {"static": list(members)},
            "health_check": {"interval": 0.2, "timeout": 0.5}, **kw}


def base(b: Balancer) -> str:
    return f"http://127.0.0.1:{b.rest_ports[0]}"


def requests_by_address(b: Balancer) -> dict[str, int]:
    return {r["address"]: r["requests"] for r in b.endpoint_rows()}


INFER_BODY = {"inputs": [{"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]}


# ---------------------------------------------------------------------- real clients


async def test_tritonclient_http_infers_through_the_balancer_on_both_replicas(replicas: list[ServerProcess]) -> None:
    import tritonclient.http as httpclient

    async with balancer({"p": pool_of(*map(member, replicas))}) as b:
        def use_client() -> None:
            client = httpclient.InferenceServerClient(f"127.0.0.1:{b.rest_ports[0]}", concurrency=1)
            try:
                assert client.is_server_ready()
                assert client.get_model_metadata("identity")["name"] == "identity"
                assert client.get_model_config("identity")["name"] == "identity"
                x = np.arange(8, dtype=np.float32).reshape(2, 4)
                for binary in (True, False, True, False):
                    inp = httpclient.InferInput("INPUT0", [2, 4], "FP32")
                    inp.set_data_from_numpy(x, binary_data=binary)
                    result = client.infer("identity", [inp], request_compression_algorithm="gzip" if binary else None)
                    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
            finally:
                client.close()

        await asyncio.to_thread(use_client)
        counts = requests_by_address(b)
        assert all(n >= 2 for n in counts.values()), counts  # round robin over both replicas, one keep-alive client


async def test_openai_client_streams_chat_through_the_balancer_unbuffered(replicas: list[ServerProcess]) -> None:
    import openai

    async with balancer({"p": pool_of(*map(member, replicas))}) as b:
        client = openai.AsyncOpenAI(base_url=base(b) + "/v1", api_key="unused", max_retries=0, timeout=30)
        try:
            t0 = time.monotonic()
            stream = await client.chat.completions.create(
                model="chat", stream=True, messages=[{"role": "user", "content": "one two three four five"}])
            arrivals, text = [], ""
            async for chunk in stream:
                arrivals.append(time.monotonic() - t0)
                text += chunk.choices[0].delta.content or ""
            # five words 60 ms apart: the first arrives long before the last (chunks are relayed as they come)
            assert text.split() == ["one", "two", "three", "four", "five"]
            assert arrivals[-1] - arrivals[0] >= 0.15, arrivals
            plain = await client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}])
            assert plain.choices[0].message.content
            emb = await client.embeddings.create(model="embed", input=["a", "b"], encoding_format="float")
            assert len(emb.data) == 2 and len(emb.data[0].embedding) == 8
            with pytest.raises(openai.NotFoundError):
                await client.embeddings.create(model="no-such-model", input="x")
        finally:
            await client.close()


# ---------------------------------------------------------------------- HTTP/1.1 on the wire


async def raw_exchange(port: int, data: bytes, responses: int) -> tuple[list[tuple[int, dict[str, str], bytes]], bool]:
    """Send ``data`` on one connection; read ``responses`` responses (Content-Length or chunked);
    and whether the server then closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        writer.write(data)
        await writer.drain()
        for _ in range(responses):
            status_line = await asyncio.wait_for(reader.readline(), 10)
            status = int(status_line.split()[1])
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                k, _, v = line.decode().partition(":")
                headers[k.strip().lower()] = v.strip()
            if "content-length" in headers:
                body = await reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding") == "chunked":
                body = b""
                while (size := int((await reader.readline()).strip(), 16)) > 0:
                    body += await reader.readexactly(size)
                    await reader.readline()
                await reader.readline()
            else:
                body = await reader.read()
            out.append((status, headers, body))
        closed = await asyncio.wait_for(reader.read(1), 5) == b""
    except TimeoutError:
        closed = False
    finally:
        writer.close()
    return out, closed


def post(path: str, body: bytes, *extra: str) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", "Content-Type: application/json", f"Content-Length: {len(body)}",
            *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_keep_alive_pipelining_and_connection_close_on_one_socket(replicas: list[ServerProcess]) -> None:
    async with balancer({"p": pool_of(*map(member, replicas))}) as b:
        port = b.rest_ports[0]
        infer = json.dumps(INFER_BODY).encode()
        # three requests written at once (pipelined) are answered in order on the same connection
        data = (b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n" + post("/v2/models/identity/infer", infer)
                + b"GET /v2/models/identity HTTP/1.1\r\nHost: x\r\n\r\n")
        answers, closed = await raw_exchange(port, data, 3)
        assert [a[0] for a in answers] == [200, 200, 200]
        assert json.loads(answers[0][2]) == {"ready": True}
        assert json.loads(answers[1][2])["outputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]
        assert json.loads(answers[2][2])["name"] == "identity"
        assert not closed  # keep-alive: still open after three answers
        # Connection: close is honoured; HTTP/1.0 without keep-alive closes too
        answers, closed = await raw_exchange(port, b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 1)
        assert answers[0][0] == 200 and answers[0][1].get("connection") == "close" and closed
        answers, closed = await raw_exchange(port, b"GET /v2 HTTP/1.0\r\n\r\n", 1)
        assert answers[0][0] == 200 and closed
        # Expect: 100-continue (curl's habit for larger bodies) gets its interim answer, then the response
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = post("/v2/models/identity/infer", b"", "Expect: 100-continue").replace(
            b"Content-Length: 0", f"Content-Length: {len(infer)}".encode())
        writer.write(head)
        assert await asyncio.wait_for(reader.readline(), 5) == b"HTTP/1.1 100 Continue\r\n"
        assert await reader.readline() == b"\r\n"
        writer.write(infer)
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
        writer.close()
        # a chunked request body is read whole and sent on with a Content-Length
        chunked = (b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"".join(b"%x\r\n%s\r\n" % (len(infer[i:i + 10]), infer[i:i + 10])
                              for i in range(0, len(infer), 10)) + b"0\r\n\r\n")
        answers, _ = await raw_exchange(port, chunked, 1)
        assert answers[0][0] == 200


async def test_bad_input_gets_json_errors_and_the_listener_keeps_serving(replicas: list[ServerProcess]) -> None:
    pools = {"p": pool_of(*map(member, replicas))}
    routes = [{"match": {"model": "identity"}, "pool": "p"}, {"match": {"model": "chat"}, "pool": "p"},
              {"match": {"model": "embed"}, "pool": "p"}]
    async with balancer(pools, routes=routes, rest={"max_body_bytes": 4096, "max_header_bytes": 2048}) as b:
        port = b.rest_ports[0]
        cases: list[tuple[bytes, int, str]] = [
            (b"GARBAGE\r\n\r\n", 400, "malformed HTTP/1.1"),
            (b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n", 431, "rest.max_header_bytes"),
            (post("/v2/models/identity/infer", b"x" * 5000), 413, "rest.max_body_bytes"),
            (b"POST /v2/models/identity/infer HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
             400, "malformed"),
            (post("/v2/models/unrouted/infer", b"{}"), 404, "no route for model 'unrouted'"),
            (post("/v1/embeddings", b"{not json"), 400, "not valid JSON"),
            (post("/v1/chat/completions", b'{"messages": []}'), 400, "'model' is required"),
            (post("/v1/completions", b'[1, 2]'), 400, "JSON object"),
        ]
        for data, status, words in cases:
            answers, _ = await raw_exchange(port, data, 1)
            got, headers, body = answers[0]
            assert got == status, (data[:40], got, body)
            assert headers["content-type"] == "application/json"
            error = json.loads(body)["error"]
            message = error["message"] if isinstance(error, dict) else error  # OpenAI's shape on /v1/
            assert words in message, (words, message)
        async with aiohttp.ClientSession() as s, s.post(base(b) + "/v2/models/identity/infer", json=INFER_BODY) as r:
            assert r.status == 200  # and the listener still serves


async def test_a_slow_client_head_times_out_with_408(replicas: list[ServerProcess]) -> None:
    async with balancer({"p": pool_of(*map(member, replicas))}, rest={"header_timeout": 0.5}) as b:
        reader, writer = await asyncio.open_connection("127.0.0.1", b.rest_ports[0])
        writer.write(b"GET /v2 HTTP/1.1\r\nHost: x\r\n")  # never finished
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line.startswith(b"HTTP/1.1 408")
        writer.close()


async def test_routes_by_model_from_path_and_from_the_openai_body(replicas: list[ServerProcess]) -> None:
    a, c = replicas
    pools = {"first": pool_of(member(a)), "second": pool_of(member(c))}
    routes = [{"match": {"model": "identity"}, "pool": "first"}, {"match": {"model": "embed"}, "pool": "second"},
              {"match": {}, "pool": "first"}]
    async with balancer(pools, routes=routes) as b, aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(base(b) + "/v2/models/identity/versions/1/infer", json=INFER_BODY) as r:
                assert r.status == 200
            async with s.post(base(b) + "/v1/embeddings", json={"model": "embed", "input": "hi"}) as r:
                assert r.status == 200
        async with s.get(base(b) + "/v2/health/live") as r:  # no model: the default route
            assert r.status == 200
        counts = requests_by_address(b)
        assert counts[member(a)["address"]] == 4 and counts[member(c)["address"]] == 3, counts


async def test_an_unsent_request_is_retried_and_a_dead_replica_is_ejected(replicas: list[ServerProcess]) -> None:
    dead = {"address": f"127.0.0.1:{free_port()}", "http": f"127.0.0.1:{free_port()}"}
    pool = pool_of(dead, member(replicas[0]), health_check={"enabled": False},
                   outlier_detection={"consecutive_failures": 2, "base_ejection_time": 30})
    async with balancer({"p": pool}) as b, aiohttp.ClientSession() as s:
        for _ in range(10):
            # POST /v2/repository/index is not idempotent: retried only because it never reached the dead one
            async with s.post(base(b) + "/v2/repository/index", json={}) as r:
                assert r.status == 200
        rows = {r["address"]: r for r in b.endpoint_rows()}
        assert rows[dead["address"]]["failures"] >= 2 and rows[dead["address"]]["times_ejected"] >= 1
        assert rows[member(replicas[0])["address"]]["requests"] == 10


async def test_endpoints_without_an_http_address_are_not_picked_for_rest(replicas: list[ServerProcess]) -> None:
    assert replicas[0].endpoints is not None
    grpc_only = replicas[0].endpoints.grpc
    async with balancer({"p": pool_of(grpc_only)}) as b, aiohttp.ClientSession() as s:
        async with s.get(base(b) + "/v2/models/identity") as r:
            assert r.status == 503
            assert "has an HTTP address" in (await r.json())["error"]
        # the admin API adds the HTTP address of the same replica: REST reaches it
        async with s.post(f"http://127.0.0.1:{b.admin_port}/endpoints",
                          json={"pool": "p", "address": grpc_only, "http": replicas[0].endpoints.http}) as r:
            assert r.status == 200
        async with s.get(base(b) + "/v2/models/identity") as r:
            assert r.status == 200
        async with s.get(f"http://127.0.0.1:{b.admin_port}/endpoints") as r:
            assert (await r.json())["endpoints"][0]["http"] == replicas[0].endpoints.http


async def test_a_replica_killed_under_load_fails_no_idempotent_request(repository: Path) -> None:
    procs = [ServerProcess(["--model-repository", str(repository), "--model", "identity", "--log-level", "warning"],
                           name=f"victim{i}") for i in range(2)]
    try:
        for p in procs:
            p.start()
        async with balancer({"p": pool_of(*map(member, procs))}) as b, aiohttp.ClientSession() as s:
            failures: list[int] = []

            async def client() -> None:
                for _ in range(60):
                    async with s.post(base(b) + "/v2/models/identity/infer", json=INFER_BODY) as r:
                        await r.read()
                        if r.status != 200:
                            failures.append(r.status)

            clients = [asyncio.ensure_future(client()) for _ in range(4)]
            await asyncio.sleep(0.2)  # let traffic flow on both replicas
            procs[1].signal(9)
            await asyncio.gather(*clients)
            assert failures == []
    finally:
        for p in procs:
            p.stop(5)


def test_the_rest_port_is_in_the_ready_line(replicas: list[ServerProcess]) -> None:
    from modelyard.launcher import BalancerProcess

    rest = free_port()
    assert replicas[0].endpoints is not None
    eps = replicas[0].endpoints
    with BalancerProcess([eps.grpc], ["--rest-listen", f"127.0.0.1:{rest}", "--http-endpoints", eps.http]) as bp:
        assert bp.endpoints is not None and bp.endpoints.http == f"127.0.0.1:{rest}"
        with socket.create_connection(("127.0.0.1", rest), timeout=5) as sock:
            sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"ready": true}')
