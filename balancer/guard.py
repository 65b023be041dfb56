"""Admission at the balancer: bearer tokens, per-token model and admin allow lists, per-client rate limits.

The rules are the server's (:mod:`modelyard.security.guard`, :mod:`modelyard.security.rules`), checked
before a call is routed: a refused call never reaches a replica. The ``authorization`` header is
forwarded unchanged, so replicas configured with the same tokens check again (pass-through).

Models are checked without parsing a message: the model field (by number, from the rules table) is
peeked from the serialized request. For a caller whose token does not allow every model, each
message of the request stream goes through a :class:`ModelScanner` before any byte of it is sent on,
so a stream cannot switch to a model its token does not allow after its first message.
"""

from __future__ import annotations

from typing import Any

from modelyard.balancer.routing import MORE, peek_string
from modelyard.security.guard import Caller, Guard, PermissionDenied
from modelyard.security.rules import Rule

#: bytes of a message read to find its model field; a restricted caller's message that hides its
#: model beyond them is refused (serializers write the model name first)
SCAN_LIMIT = 64 << 10


class StatsCounter:
    """Refusals counted in the balancer's stats (``modelyard_balancer_events_total{pool="",event="refused_*"}``)."""

    def __init__(self, stats: Any) -> None:
        self.stats = stats
        self._reason = ""

    def labels(self, reason: str) -> StatsCounter:
        self._reason = reason
        return self

    def inc(self) -> None:
        self.stats.count("", "refused_" + self._reason)


class ModelScanner:
    """Reads the model of every gRPC message of one request stream as its bytes go by and checks it
    against the caller's allowed models (:class:`~modelyard.security.guard.PermissionDenied` otherwise)."""

    __slots__ = ("body", "caller", "checked", "need", "number", "prefix")

    def __init__(self, caller: Caller, number: int) -> None:
        self.caller = caller
        self.number = number
        self.prefix = b""
        #: body bytes of the current message still to come
        self.need = 0
        #: the current message's first bytes, kept until its model is known
        self.body = bytearray()
        self.checked = True

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self.need == 0 and self.checked:  # a 5-byte message prefix
                take = min(5 - len(self.prefix), n - i)
                self.prefix += data[i:i + take]
                i += take
                if len(self.prefix) < 5:
                    return
                flag, size = self.prefix[0], int.from_bytes(self.prefix[1:5], "big")
                self.prefix = b""
                if flag:
                    raise PermissionDenied(f"token '{self._name}' is limited to some models: its request messages "
                                           "must not be compressed (the balancer reads each one's model)")
                self.need, self.checked = size, False
                self.body.clear()
                if size == 0:
                    self._check(True)
                continue
            take = min(self.need, n - i)
            self.need -= take
            i += take
            if not self.checked:  # its model is not known yet
                self.body += data[i - take:i]
                self._check(self.need == 0)

    @property
    def _name(self) -> str:
        p = self.caller.principal
        return p.name if p is not None else "?"

    def _check(self, complete: bool) -> None:
        found = peek_string(bytes(self.body), self.number)
        if found is MORE:
            if not complete:
                if len(self.body) > SCAN_LIMIT:
                    raise PermissionDenied(f"token '{self._name}' is limited to some models: the model name must "
                                           f"come within the first {SCAN_LIMIT} bytes of each message")
                return
            found = ""  # no model field: the replica answers that
        if found is None:
            raise PermissionDenied("the request's model name is not valid UTF-8")
        assert isinstance(found, str)
        if found:
            self.caller.check_model(found)
        self.checked = True
        self.body.clear()


def admit(guard: Guard, rule: Rule, authorization: str | None, peer: Any) -> ModelScanner | None:
    """Authenticate, rate-limit and check the admin operation of one call; a scanner for its messages
    when its caller may not use every model and the call names one. Raises a Refused."""
    caller = guard.admit(authorization, peer, rule.kind)
    if caller is None:
        return None
    if rule.operation:
        caller.check_admin(rule.operation)
    if rule.model_number and caller.restricted:
        return ModelScanner(caller, rule.model_number)
    return None
