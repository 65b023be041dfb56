"""A bare HTTP/1.1 backend answering KServe v2 JSON inference -- the REST baseline the benchmarks compare against.

    python benchmarks/http_echo.py --port P

Every request gets ``200`` with the identity model's JSON response to the benchmark's request (a fixed
body, Content-Length, keep-alive), so what is measured is the proxy in front of it, not a model.
uvloop + an asyncio protocol + httptools; prints the ``modelyard ready http=...`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import httptools

from modelyard.launcher import print_ready

PY = sys.executable
SCRIPT = str(Path(__file__).resolve())

#: what benchmarks/rest_balancer.py posts to /v2/models/identity/infer
REQUEST = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [float(i) for i in range(16)]}]}
RESPONSE = {"model_name": "identity", "model_version": "1",
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 16], "data": [float(i) for i in range(16)]}]}


def http_echo_cmd(port: int) -> list[str]:
    return [PY, SCRIPT, "--port", str(port)]


class Echo(asyncio.Protocol):
    body = json.dumps(RESPONSE).encode()
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self) -> None:
        self.transport.write(self.reply)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port, backlog=1024)
    print_ready(http=f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0)
    import uvloop

    uvloop.run(main(ap.parse_args().port))
