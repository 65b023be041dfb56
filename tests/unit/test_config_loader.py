"""The one config loader (modelyard.config) that the server, the balancer and the autoscaler share."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest

from modelyard.config import Check, ConfigError, default, load, override
from modelyard.server.config import ServerConfig
from modelyard.server.model_config import parse_config


@dataclass
class Inner:
    count: int = 1

    def validate(self, check: Check) -> None:
        check(self.count >= 1, "count", "must be >= 1")


@dataclass
class Outer:
    name: str = "x"
    items: list[Inner] = field(default_factory=list, metadata={"key": "item", "aliases": ("items",)})
    by_name: dict[str, Inner] = field(default_factory=dict)
    ratio: float = 0.5
    maybe: str | None = "on"


def test_every_error_is_reported_at_once_with_its_path() -> None:
    with pytest.raises(ConfigError) as info:
        load(Outer, {"item": [{"count": 0}, {"count": "two"}], "by_name": {"a": {"count": -1}}, "ratio": "x",
                     "bogus": 1}, source="test config")
    errors = info.value.errors
    assert "item[0].count: must be >= 1" in errors
    assert "item[1].count: expected an integer, got 'two'" in errors
    assert "by_name.a.count: must be >= 1" in errors
    assert "ratio: expected a number, got 'x'" in errors
    assert any(e.startswith("bogus: unknown field") for e in errors)
    assert len(errors) == 5  # a value that did not load is not checked again
    assert info.value.report().startswith("invalid test config:\n  ")


def test_a_field_is_read_from_its_file_word_or_an_alias_but_not_both() -> None:
    assert load(Outer, {"items": [{"count": 3}]}).items[0].count == 3
    with pytest.raises(ConfigError, match="item: given twice"):
        load(Outer, {"item": [], "items": []})


def test_null_means_the_default_unless_the_field_is_optional() -> None:
    cfg = load(Outer, {"ratio": None, "maybe": None})
    assert cfg.ratio == 0.5 and cfg.maybe is None


def test_override_sets_only_the_flags_that_were_given() -> None:
    doc = {"drain": {"grace": 5}, "workers": 2}
    out = override(doc, {"drain.grace": None, "drain.delay": 1.0, "workers": None, "admin.address": "a:1"})
    assert out == {"drain": {"grace": 5, "delay": 1.0}, "workers": 2, "admin": {"address": "a:1"}}
    assert doc == {"drain": {"grace": 5}, "workers": 2}  # the input is not changed


def test_defaults_are_read_from_the_config_class() -> None:
    assert default(ServerConfig, "grpc_port") == 8001
    assert default(Outer, "items") == []


def test_model_config_paths_use_tritons_words() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"input": [{"name": "a", "data_type": "TYPE_NOPE", "dims": [1]}], "max_batch_size": 0,
                      "dynamic_batching": True}, "m")
    errors: list[Any] = info.value.errors
    assert any(e.startswith("input[0].data_type: unknown datatype 'TYPE_NOPE'") for e in errors)
    assert any(e.startswith("dynamic_batching: needs max_batch_size > 0") for e in errors)


def test_serve_refuses_a_bad_config_with_every_error_and_exit_2(tmp_path: Any) -> None:
    cfg = tmp_path / "server.yaml"
    cfg.write_text("grpc_port: 70000\ngrace: -1\nbogus: true\n")
    out = subprocess.run([sys.executable, "-m", "modelyard.clients.cli", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2
    for needle in ("grpc_port: must be a port number", "grace: must be >= 0", "bogus: unknown field"):
        assert needle in out.stderr


def test_serve_flags_override_the_file(tmp_path: Any) -> None:
    from modelyard.clients.cli import build_parser
    from modelyard.server.main import build_config

    cfg = tmp_path / "server.yaml"
    cfg.write_text("grpc_port: 9100\nhttp_port: 9101\n")
    args = build_parser("serve").parse_args(["serve", "--config", str(cfg), "--http-port", "0"])
    settings = build_config(args)
    assert (settings.grpc_port, settings.http_port, settings.grace) == (9100, 0, default(ServerConfig, "grace"))
