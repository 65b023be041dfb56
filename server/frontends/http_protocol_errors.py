"""JSON ``{"error": "..."}`` for the HTTP errors aiohttp answers itself, before any route or middleware
runs: a request line, header or body framing it cannot parse (400), a handler timeout (504).

Every other HTTP error is JSON through ``rest_api.errors_middleware``; without this, these few were
``text/plain``, which tritonclient.http and KServe clients cannot read.
"""

from __future__ import annotations

from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest


class _JsonErrorHandler(RequestHandler):
    __slots__ = ()

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs it; raises when a response was already sent
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
        first = (message or "").strip().splitlines()[0].rstrip(":") if message and status != 500 else ""
        text = f"malformed HTTP request: {first}" if status == 400 and first else (first or phrase)
        resp = web.json_response({"error": text}, status=status)
        resp.force_close()
        return resp


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


def json_protocol_errors(runner: web.BaseRunner) -> None:
    """Make ``runner``'s server (after ``setup()``) answer its own errors as JSON."""
    server = runner.server
    if server is not None and type(server) is web.Server:
        server.__class__ = _JsonErrorServer
