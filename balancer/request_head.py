"""What the proxy needs from a request's headers, parsed once per distinct header list."""

from __future__ import annotations

from modelyard.balancer.grpcwire import parse_timeout
from modelyard.balancer.h2.hpack import Headers, encode_field
from modelyard.balancer.routing import SEQUENCE_METHODS
from modelyard.security.rules import Rule, rule_for

#: RFC 7540 8.1.2.2: connection-specific headers, never forwarded
HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade",
                         b"te", b"host"})


class RequestHead:
    """What the proxy needs from a request's headers; cached per header list (without a timeout)."""

    __slots__ = ("authorization", "block", "error", "has_authority", "idempotent", "method", "path", "rule",
                 "sequenced", "timeout", "traceparent", "unary")

    def __init__(self, headers: Headers, unary: frozenset[bytes] = frozenset(),
                 idempotent: frozenset[bytes] = frozenset()) -> None:
        self.error: tuple[bytes, str] | None = None
        self.timeout: float | None = None
        #: W3C trace context: not in ``block``; each attempt sends it (as received, or with the balancer's span)
        self.traceparent: bytes | None = None
        #: the ``authorization`` header (checked when the balancer has ``auth``; forwarded either way)
        self.authorization: str | None = None
        path = verb = ctype = authority = b""
        scheme = b"http"
        rest: list[tuple[bytes, bytes]] = []
        for k, v in headers:
            if k[:1] == b":":
                if k == b":path":
                    path = v
                elif k == b":method":
                    verb = v
                elif k == b":authority":
                    authority = v
                elif k == b":scheme":
                    scheme = v
            elif k == b"grpc-timeout":
                self.timeout = parse_timeout(v)
            elif k == b"traceparent":
                self.traceparent = v
            elif k == b"content-type":
                ctype = v
                rest.append((k, v))
            elif k == b"authorization":
                self.authorization = v.decode("latin-1")
                rest.append((k, v))
            elif k not in HOP_HEADERS:
                rest.append((k, v))
        self.path = path
        self.method = path.decode("utf-8", "replace")
        #: what the call needs from its caller (kind, model field, admin operation): security/rules.py
        self.rule: Rule = rule_for(self.method)
        #: a unary method (its request can be kept and sent again), and one safe to send twice (hedging)
        self.unary = path in unary
        self.idempotent = self.unary and path in idempotent
        #: its first message may carry a ``sequence_id`` (sequence affinity peeks it)
        self.sequenced = self.method in SEQUENCE_METHODS
        if verb != b"POST":
            self.error = (b"405", f"gRPC needs POST, not {verb.decode('latin-1') or 'nothing'}")
        elif not ctype.startswith(b"application/grpc"):
            self.error = (b"415", f"content-type {ctype.decode('latin-1')!r} is not application/grpc")
        elif not path.startswith(b"/"):
            self.error = (b"400", "missing :path")
        fields = [(b":method", b"POST"), (b":scheme", scheme), (b":path", path)]
        #: without one, the attempt adds the endpoint's address (grpc C-core servers reset such streams)
        self.has_authority = bool(authority)
        if authority:
            fields.append((b":authority", authority))
        fields.append((b"te", b"trailers"))
        self.block = b"".join([encode_field(h) for h in (*fields, *rest)])


class HeadCache(dict[Headers, RequestHead]):
    """Parsed request heads by header list (without a timeout), bounded in bytes, not entries.

    Header values are the client's choice: the cache is cleared when it reaches ``budget`` bytes
    (headers, the encoded block and ~100 bytes of Python objects per field), and a head over 1/16
    of the budget is never cached. Lookups are plain ``dict.get``.
    """

    __slots__ = ("budget", "nbytes")

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget
        self.nbytes = 0

    def put(self, headers: Headers, head: RequestHead) -> None:
        cost = 300 + len(head.block) + sum(len(k) + len(v) + 100 for k, v in headers)
        if cost * 16 > self.budget:
            return
        total = self.nbytes + cost
        if total > self.budget:
            self.clear()
            total = cost
        self.nbytes = total
        self[headers] = head
