"""modelyard.security and the server's guard/admission, in-process: tokens, buckets, watched files, TLS contexts."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from modelyard.config import ConfigError, load
from modelyard.protos.tensors import TensorError, check_shape
from modelyard.security.config import AuthConfig, RateLimitConfig, TlsConfig
from modelyard.security.files import LoadError, Reloadable
from modelyard.security.ratelimit import TokenBuckets
from modelyard.security.tls import TlsFiles, client_ssl_context
from modelyard.security.tokens import TokenTable, bearer_token, load_env, parse_document
from modelyard.server.admission import Admission
from modelyard.server.config import ServerConfig
from modelyard.server.errors import DeadlineExceeded, Overloaded, PermissionDenied, Unauthenticated
from modelyard.server.guard import Guard, peer_host
from modelyard.server.types import InferRequest

ALICE, OPS = "alice-token-0123456789", "ops-token-0123456789ab"
TOKENS = f"""
"{ALICE}": {{name: alice, models: ["text_*", identity]}}
"sha256:{hashlib.sha256(OPS.encode()).hexdigest()}": {{name: ops, models: ["*"], admin: [load, unload]}}
"""
OPS_LIST = ("load", "unload", "shared_memory")


def table(text: str = TOKENS) -> TokenTable:
    return TokenTable.parse(parse_document(text, "tokens.yaml"), "tokens.yaml", OPS_LIST)


# ---------------------------------------------------------------------- tokens


def test_lookup_finds_plain_and_hashed_tokens_and_nothing_else():
    t = table()
    alice, ops = t.lookup(ALICE), t.lookup(OPS)
    assert alice is not None and alice.name == "alice"
    assert ops is not None and ops.name == "ops"
    assert t.lookup("alice-token-012345678") is None          # a prefix
    assert t.lookup(ALICE + "x") is None
    assert t.lookup("") is None
    assert alice.may_use("text_embed_demo") and alice.may_use("identity") and not alice.may_use("add_sub")
    assert not alice.may("load") and ops.may("load") and not ops.may("shared_memory")


def test_lookup_compares_every_entry_in_constant_time(monkeypatch):
    """No early exit: compare_digest runs once per entry whichever (if any) matches."""
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a, b):  # type: ignore[no-untyped-def]
        calls.append(len(a))
        return real(a, b)

    monkeypatch.setattr("modelyard.security.tokens.hmac.compare_digest", counting)
    t = table()
    for token in (ALICE, OPS, "no-such-token-0123456789"):
        calls.clear()
        t.lookup(token)
        assert calls == [32, 32], "every stored digest (32 bytes) is compared, whatever matched"


def test_token_file_errors_name_the_entry_never_the_token():
    bad = f"""
"short": {{name: a}}
"{ALICE}": {{name: b, models: "x", admin: [fly], rate: 1}}
"{OPS}": {{models: ["*"]}}
"""
    with pytest.raises(LoadError) as err:
        table(bad)
    text = str(err.value)
    assert "entry #1" in text and "at least 16 characters" in text
    assert "entry #2 (b)" in text and "models must be a list" in text and "unknown admin operation 'fly'" in text
    assert "unknown field(s) rate" in text and "entry #3: name is required" in text
    assert ALICE not in text and OPS not in text and "short" not in text
    with pytest.raises(LoadError, match="not valid YAML or JSON") as err:
        parse_document(f'"{ALICE}": [unclosed', "tokens.yaml")
    assert ALICE not in str(err.value)
    with pytest.raises(LoadError, match="same token appears twice"):
        table(f'"{ALICE}": {{name: a}}\n"sha256:{hashlib.sha256(ALICE.encode()).hexdigest()}": {{name: b}}')


def test_tokens_from_the_environment(monkeypatch):
    monkeypatch.setenv("MY_TOKENS", ALICE)
    p = load_env("MY_TOKENS", OPS_LIST).lookup(ALICE)
    assert p is not None and p.name == "env" and p.may_use("anything") and not p.may("load")
    monkeypatch.setenv("MY_TOKENS", json.dumps({OPS: {"name": "j", "models": ["m"]}}))  # JSON works too
    assert load_env("MY_TOKENS").lookup(OPS).name == "j"  # type: ignore[union-attr]
    monkeypatch.delenv("MY_TOKENS")
    with pytest.raises(LoadError, match="MY_TOKENS is not set"):
        load_env("MY_TOKENS")


def test_bearer_header_parsing():
    assert bearer_token(f"Bearer {ALICE}") == ALICE
    assert bearer_token(f"bearer   {ALICE} ") == ALICE
    for value in (None, "", "Bearer", "Bearer ", f"Basic {ALICE}", ALICE):
        assert bearer_token(value) is None


def test_memo_of_model_globs_is_bounded():
    p = table().lookup(ALICE)
    assert p is not None
    for i in range(3000):
        p.may_use(f"model-{i}")
    assert len(p._memo) <= 1024


# ---------------------------------------------------------------------- token buckets


def test_token_bucket_burst_refill_and_retry_after():
    now = [100.0]
    b = TokenBuckets(rps=10, burst=3, clock=lambda: now[0])
    assert [b.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = b.take("a")
    assert wait == pytest.approx(0.1)             # one token every 100 ms
    assert b.take("b") == 0.0                      # another client has its own bucket
    now[0] += 0.05
    assert b.take("a") == pytest.approx(0.05)
    now[0] += 0.05
    assert b.take("a") == 0.0
    now[0] += 60                                   # refills up to the burst, no more
    assert [b.take("a") for _ in range(4)][-1] > 0
    assert b.take("c", rps=0) == 0.0 and "c" not in b._buckets  # no limit: nothing remembered


def test_token_buckets_are_bounded_lru():
    b = TokenBuckets(rps=1, burst=1, max_clients=100, clock=lambda: 0.0)
    for i in range(10_000):
        b.take(f"10.0.{i // 256}.{i % 256}")
    assert len(b) == 100
    assert b.take("10.0.39.15") > 0               # the most recent ones are still remembered


# ---------------------------------------------------------------------- guard (server rules)


def guard(tmp_path: Path, **limits: float) -> Guard:
    path = tmp_path / "tokens.yaml"
    path.write_text(TOKENS + '"bob-token-0123456789ab": {name: bob, models: [identity], rate_limit: {rps: 2}}\n')
    return Guard(AuthConfig(tokens_file=str(path), exempt=["health"]), RateLimitConfig(**limits))  # type: ignore[arg-type]


def test_guard_unauthenticated_vs_permission_denied(tmp_path):
    g = guard(tmp_path)
    for header, fragment in ((None, "needs a bearer token"), ("Basic abc", "must be 'Bearer <token>'"),
                             ("Bearer nope-nope-nope-nope", "unknown bearer token")):
        with pytest.raises(Unauthenticated, match=fragment):
            g.admit(header, lambda: "ipv4:1.2.3.4:5", "server")
    assert g.admit(None, lambda: "x", "health") is None      # exempt
    with pytest.raises(Unauthenticated):
        g.admit(None, lambda: "x", "reflection")             # not exempt
    caller = g.admit(f"Bearer {ALICE}", lambda: "x", "server")
    assert caller is not None and caller.client == "alice"
    caller.check_model("identity")
    with pytest.raises(PermissionDenied, match="token 'alice' may not use model 'add_sub'"):
        caller.check_model("add_sub")
    with pytest.raises(PermissionDenied, match=r"may not run admin operation 'load'.*none"):
        caller.check_admin("load")
    g.admit(f"Bearer {OPS}", lambda: "x", "server").check_admin("unload")  # type: ignore[union-attr]


def test_guard_rate_limits_per_client_with_a_hint(tmp_path):
    g = guard(tmp_path, rps=1000, burst=1000)
    bob = [g.admit("Bearer bob-token-0123456789ab", lambda: "x", "server") for _ in range(2)]
    assert all(bob)
    with pytest.raises(Overloaded, match="client 'bob' is over its rate limit \\(2 requests/s\\)") as err:
        g.admit("Bearer bob-token-0123456789ab", lambda: "x", "server")
    assert 1 <= err.value.retry_after_ms <= 500 and err.value.code.name == "RESOURCE_EXHAUSTED"
    for _ in range(50):  # alice uses the default (1000/s): not limited
        g.admit(f"Bearer {ALICE}", lambda: "x", "server")
    # health checks never take a token
    for _ in range(5):
        g.admit("Bearer bob-token-0123456789ab", lambda: "x", "health")
    anon = Guard(AuthConfig(), RateLimitConfig(rps=1, burst=1))
    anon.admit(None, lambda: "ipv4:10.1.1.1:4000", "server")
    anon.admit(None, lambda: "ipv4:10.1.1.2:4000", "server")
    with pytest.raises(Overloaded, match=r"client '10\.1\.1\.1'"):
        anon.admit(None, lambda: "ipv4:10.1.1.1:4001", "server")  # another connection, same address


def test_guard_reloads_the_tokens_file(tmp_path, caplog):
    g = guard(tmp_path)
    path = tmp_path / "tokens.yaml"
    assert g.file is not None
    new = "zed-token-0123456789abcd"
    path.write_text(f'"{new}": {{name: zed, models: ["*"]}}\n')
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert g.file.check()
    assert g.tokens.lookup(new) is not None and g.tokens.lookup(ALICE) is None
    with caplog.at_level(logging.ERROR, "modelyard.security"):
        path.write_text("{not: [yaml")
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
        assert not g.file.check() and not g.file.check()
    assert g.tokens.lookup(new) is not None, "a bad file keeps the last good tokens"
    assert sum("do not load" in r.message for r in caplog.records) == 1, "logged once per bad version"


@pytest.mark.parametrize(("peer", "host"), [("ipv4:10.0.0.7:51234", "10.0.0.7"), ("ipv6:[::1]:80", "::1"),
                                            ("unix:/tmp/s", "/tmp/s"), ("10.0.0.8:443", "10.0.0.8"),
                                            ("10.0.0.9", "10.0.0.9")])
def test_peer_host(peer, host):
    assert peer_host(peer) == host


# ---------------------------------------------------------------------- admission (overload)


def test_admission_inflight_bound_and_queue_bound():
    a = Admission(limit=2, max_queue_ms=50, retry_after_ms=70)
    a.enter()
    a.enter()
    with pytest.raises(Overloaded, match="2 requests in flight") as err:
        a.enter()
    assert err.value.retry_after_ms == 70
    a.exit()
    a.enter()
    req = InferRequest(model="m", inputs={})
    own = a.bound(req)
    assert own == float("inf") and req.deadline is not None
    shed = a.queue_shed(req, own)
    assert isinstance(shed, Overloaded) and req.deadline is None and "max_queue_ms (50 ms)" in shed.message
    early = InferRequest(model="m", inputs={}, deadline=time.monotonic() + 0.001)
    assert a.bound(early) is None, "an earlier client deadline wins; DEADLINE_EXCEEDED stays its answer"
    assert Admission(limit=0).bound(req) is None


async def test_a_model_whose_queue_bound_fires_answers_resource_exhausted():
    from modelyard.server.model import ModelVersion

    class Slow:
        async def __call__(self, request: InferRequest):  # type: ignore[no-untyped-def]
            raise DeadlineExceeded("request timed out in the queue before it was computed")

    from modelyard.server.metrics import ServerMetrics
    from modelyard.server.model_config import parse_config

    cfg = parse_config({"name": "m", "backend": "python"}, "m")
    metrics = ServerMetrics()
    mv = ModelVersion(cfg, "1", Path("."), metrics, Admission(limit=4, max_queue_ms=10, metrics=metrics))
    mv.state, mv._compute = "READY", Slow()
    with pytest.raises(Overloaded, match="max_queue_ms"):
        await mv.infer(InferRequest(model="m", inputs={}))
    assert mv.admission is not None and mv.admission.inflight == 0
    assert b'modelyard_refused_total{reason="shed_queue"} 1.0' in metrics.render()


# ---------------------------------------------------------------------- shapes


@pytest.mark.parametrize(("shape", "fragment"), [
    ([-1, 2], "negative dimension"), ([2**32, 2**32], "more than"), ([0, 2**62], "dimension larger"),
    ([1] * 33, "at most 32"), ([2**31, 2**31, 4], "more than 9223372036854775807 (int64)"),
])
def test_check_shape_refuses_before_allocating(shape, fragment):
    with pytest.raises(TensorError, match=fragment.replace("(", "\\(").replace(")", "\\)")):
        check_shape(shape, "x", None if "int64" in fragment else 2**26 if fragment != "more than" else 2**40)
    assert check_shape([3, 0, 5], "x", 10) == 0 and check_shape([], "x", 1) == 1


# ---------------------------------------------------------------------- config


def test_security_settings_are_checked_with_their_paths(tmp_path):
    with pytest.raises(ConfigError) as err:
        load(ServerConfig, {"tls": {"cert": str(tmp_path / "nope.pem"), "client_ca": "ca.pem", "reload_interval": -1},
                            "auth": {"exempt": ["health", "everything"]}, "rate_limit": {"rps": -1},
                            "overload": {"max_inflight": -5}})
    text = str(err.value)
    for fragment in ("tls.key: cert and key go together", "tls.cert: ", "no such file", "tls.reload_interval",
                     "auth.exempt[1]: must be one of health, reflection, metrics", "rate_limit.rps: must be >= 0",
                     "overload.max_inflight: must be >= 0"):
        assert fragment in text, text
    cfg = load(ServerConfig, {})
    assert not cfg.tls.enabled and not cfg.auth.enabled and not cfg.rate_limit.enabled
    assert cfg.overload.max_inflight == 1024 and cfg.overload.max_queue_ms == 0


# ---------------------------------------------------------------------- TLS files


def _handshake(port: int, ca: Path, cert: Path | None = None, key: Path | None = None) -> tuple[str, str | None]:
    """SHA-256 of the certificate the server presented, and the ALPN protocol it chose."""
    ctx = client_ssl_context(str(ca), str(cert) if cert else None, str(key) if key else None, alpn=["http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest(), s.selected_alpn_protocol()


async def test_ssl_context_follows_reloaded_files_for_new_connections_only(tmp_path, cert_factory):
    first = cert_factory(tmp_path / "a")
    files = TlsFiles(TlsConfig(cert=str(first.server_cert), key=str(first.server_key), client_ca=str(first.ca),
                               reload_interval=0))
    served: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.readline():
            served.append(data)
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=files.ssl_context())
    port = server.sockets[0].getsockname()[1]
    try:
        fp1, alpn = await asyncio.to_thread(_handshake, port, first.ca, first.client_cert, first.client_key)
        assert fp1 == files.current.fingerprint and alpn == "http/1.1"
        # an old connection, open across the reload
        ctx = client_ssl_context(str(first.ca), str(first.client_cert), str(first.client_key))
        old = await asyncio.to_thread(
            lambda: ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                                    server_hostname="127.0.0.1"))
        await asyncio.to_thread(old.sendall, b"before\n")
        assert await asyncio.to_thread(old.recv, 100) == b"before\n"
        # new files: same CA, a new server certificate (the trustme CA signs both)
        second = cert_factory(tmp_path / "b", organization="second")
        await asyncio.to_thread(_copy_over, second, first)
        assert await asyncio.to_thread(files.files.check)
        fp2, _ = await asyncio.to_thread(_handshake, port, second.ca, second.client_cert, second.client_key)
        assert fp2 == files.current.fingerprint != fp1
        await asyncio.to_thread(old.sendall, b"after\n")
        assert await asyncio.to_thread(old.recv, 100) == b"after\n"
        assert hashlib.sha256(old.getpeercert(binary_form=True)).hexdigest() == fp1  # type: ignore[arg-type]
        old.close()
        # mTLS: a client without a certificate, or with one of another CA, is refused in the handshake
        for cert, key in ((None, None), (second.rogue_cert, second.rogue_key)):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await asyncio.to_thread(_handshake_and_read, port, second.ca, cert, key)
    finally:
        server.close()
        await server.wait_closed()


def _copy_over(src, dst) -> None:  # type: ignore[no-untyped-def]
    for name in ("server_cert", "server_key", "ca"):
        Path(getattr(dst, name)).write_bytes(Path(getattr(src, name)).read_bytes())


def _handshake_and_read(port: int, ca: Path, cert: Path | None, key: Path | None) -> None:
    # TLS 1.3: the server's refusal of the client certificate arrives after the client's handshake ends
    ctx = client_ssl_context(str(ca), str(cert) if cert else None, str(key) if key else None)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(b"hello\n")
        if not s.recv(100):
            raise ConnectionError("closed")


def test_bad_or_half_written_certificates_keep_the_last_good_ones(tmp_path, cert_factory, caplog):
    c = cert_factory(tmp_path)
    other = cert_factory(tmp_path / "other")
    files = TlsFiles(TlsConfig(cert=str(c.server_cert), key=str(c.server_key), reload_interval=0))
    good = files.current.fingerprint
    with caplog.at_level(logging.ERROR, "modelyard.security"):
        c.server_cert.write_bytes(other.server_cert.read_bytes())  # the new certificate, the old key: mismatch
        assert not files.files.check()
    assert files.current.fingerprint == good
    assert any("not a certificate chain and its private key" in r.message for r in caplog.records)
    c.server_key.write_bytes(other.server_key.read_bytes())        # the writer finishes: now it loads
    assert files.files.check() and files.current.fingerprint != good
    with pytest.raises(LoadError, match="no PEM certificate"):
        (tmp_path / "junk.pem").write_text("junk")
        TlsFiles(TlsConfig(cert=str(tmp_path / "junk.pem"), key=str(c.server_key)))


def test_reloadable_watcher_thread_picks_up_changes(tmp_path):
    path = tmp_path / "value.txt"
    path.write_text("1")
    seen = threading.Event()
    r: Reloadable[int] = Reloadable([str(path)], lambda f: int(f[str(path)]), what="value", interval=0.02,
                                    on_change=lambda v: seen.set())
    r.start()
    try:
        path.write_text("22")
        assert seen.wait(5) and r.value == 22 and r.generation == 1
    finally:
        r.close()
