"""HTTP/1.1 pieces of the REST relay: the model a request names, status lines, hop-by-hop headers, errors.

Pure functions and tables; the relay itself is :mod:`modelyard.balancer.rest.proxy`.
"""

from __future__ import annotations

import http
import json
from urllib.parse import unquote

from modelyard.balancer.endpoint import Outcome

#: RFC 9110 7.6.1: connection-specific fields, never forwarded (plus those named in Connection);
#: content-length and transfer-encoding are rewritten by the relay, expect is answered by it
HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
                         b"upgrade", b"content-length", b"expect"})

#: ``b"HTTP/1.1 200 OK\r\n"`` for every status code
STATUS_LINES: dict[int, bytes] = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus}

#: gRPC code names for HTTP statuses, as the server maps them (modelyard.server.errors), so that the
#: balancer's ``requests_total{code}`` means the same for REST and gRPC
_CODE_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               408: "DEADLINE_EXCEEDED", 409: "ALREADY_EXISTS", 413: "RESOURCE_EXHAUSTED", 415: "INVALID_ARGUMENT",
               429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
               502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}

#: statuses that say the endpoint (not the request) is bad: outlier detection, the EWMA penalty
#: (INTERNAL and UNAVAILABLE on gRPC)
FAILURE_STATUSES = frozenset({500, 502, 503})

#: methods idempotent by definition (RFC 9110 9.2.2)
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % status


def code_name(status: int) -> str:
    """The gRPC code name an HTTP status stands for (as the server maps errors)."""
    if status < 400:
        return "OK"
    return _CODE_NAMES.get(status, "INTERNAL" if status >= 500 else "INVALID_ARGUMENT")


def outcome_of(status: int) -> Outcome:
    if status < 400:
        return Outcome.SUCCESS
    return Outcome.FAILURE if status in FAILURE_STATUSES else Outcome.APP_ERROR


def model_from_path(path: bytes) -> str | None:
    """The model a KServe v2 path names: ``/v2/models/{model}[/versions/{v}]/...`` and
    ``/v2/repository/models/{model}/load|unload``; None for the others (``/v2/models/stats`` included)."""
    if path.startswith(b"/v2/models/"):
        rest = path[11:]
        if rest == b"stats":
            return None
    elif path.startswith(b"/v2/repository/models/"):
        rest = path[22:]
    else:
        return None
    name = rest.split(b"/", 1)[0]
    if not name:
        return None
    text = name.decode("utf-8", "replace")
    return unquote(text) if "%" in text else text


class BadBody(ValueError):
    """The JSON body that should name the model does not (400)."""


def model_from_body(body: bytes) -> str:
    """The ``model`` field of an OpenAI-style JSON body; :class:`BadBody` saying what is wrong."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadBody(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadBody("request body must be a JSON object")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise BadBody("'model' is required and must be a non-empty string")
    return model


#: a KServe v2 inference request's JSON is parsed for its ``parameters.sequence_id`` only when it holds this
SEQUENCE_MARKER = b'"sequence_id"'
#: Triton's binary data extension: the body is this many bytes of JSON, then the tensors' bytes
JSON_LENGTH_HEADER = b"inference-header-content-length"


def json_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The size of the JSON part of a body sent with Triton's binary data extension; None without one
    (the whole body is JSON) or when the header is not a number."""
    for name, value in headers:
        if len(name) == 31 and name.lower() == JSON_LENGTH_HEADER:
            return int(value) if value.strip().isdigit() else None
    return None


def mentions(chunks: list[bytes], needle: bytes, limit: int | None = None) -> bool:
    """Whether ``needle`` occurs in the first ``limit`` bytes (all: None) of the body read as ``chunks``,
    looked for chunk by chunk (the body is never joined for it)."""
    k = len(needle) - 1
    tail = b""  # the last k bytes before this chunk: a needle across chunks starts there
    seen = 0
    for chunk in chunks:
        if limit is not None:
            if seen >= limit:
                return False
            if len(chunk) > limit - seen:
                chunk = chunk[:limit - seen]
        seen += len(chunk)
        if needle in chunk or (tail and needle in tail + chunk[:k]):
            return True
        tail = chunk[-k:] if len(chunk) >= k else (tail + chunk)[-k:]
    return False


def sequence_from_json(doc: bytes) -> int | str | None:
    """The ``parameters.sequence_id`` of a KServe v2 inference request's JSON: a non-zero unsigned 64-bit
    int or a non-empty string (1 and "1" are different sequences); None when absent, another type, or
    the JSON is not valid (the replica answers that one)."""
    try:
        req = json.loads(doc)
    except (ValueError, UnicodeDecodeError):
        return None
    params = req.get("parameters") if isinstance(req, dict) else None
    seq = params.get("sequence_id") if isinstance(params, dict) else None
    if isinstance(seq, bool):
        return None
    if isinstance(seq, int):
        return seq if 0 < seq < 1 << 64 else None
    return seq if isinstance(seq, str) and seq else None


def error_body(status: int, message: str, openai: bool) -> bytes:
    """KServe's ``{"error": "..."}``; on the OpenAI-style paths OpenAI's ``{"error": {"message", ...}}``
    (what the server answers on the same paths)."""
    if openai:
        kind = "invalid_request_error" if status < 500 else "server_error"
        doc: object = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    else:
        doc = {"error": message}
    return json.dumps(doc).encode()


def error_response(status: int, message: str, *, openai: bool = False, close: bool = False,
                   retry_after: int | None = None) -> bytes:
    """A whole HTTP/1.1 error response with a JSON body (and ``Retry-After`` seconds when given)."""
    body = error_body(status, message, openai)
    return b"".join((status_line(status), b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
                     b"retry-after: %d\r\n" % retry_after if retry_after is not None else b"",
                     b"connection: close\r\n" if close else b"", b"\r\n", body))
