"""Model control's pure parts: start-up selection, the config override, file paths, version strings,
the server settings, and the poll's change detection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelyard.config import ConfigError, load
from modelyard.server.config import ServerConfig
from modelyard.server.errors import InvalidInput, model_version
from modelyard.server.frontends.rest_api import proto_json
from modelyard.server.model_config import to_proto
from modelyard.server.model_control import check_file_path, fingerprint, parse_override, startup_models


@pytest.mark.parametrize(("mode", "load_models", "expected"), [
    (None, None, None),  # unset: every model, as before model control modes
    (None, ["a"], ["a"]),
    ("none", None, None),
    ("poll", None, None),
    ("explicit", None, []),  # explicit without --load-model: nothing
    ("explicit", ["a", "b"], ["a", "b"]),
    ("explicit", ["*"], None),
])
def test_startup_models_follow_the_mode(mode, load_models, expected) -> None:  # type: ignore[no-untyped-def]
    assert startup_models(mode, load_models) == expected


def test_config_override_reads_tritons_json() -> None:
    text = json.dumps({
        "name": "m", "backend": "python", "max_batch_size": "16",
        "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": ["3", "-1"]}],
        "output": [{"name": "Y", "data_type": "TYPE_STRING", "dims": [1]}],
        "instance_group": [{"name": "m_0", "kind": "KIND_CPU", "count": 2}],
        "version_policy": {"specific": {"versions": ["2"]}},
        "dynamic_batching": {"max_queue_delay_microseconds": "100"},
        "parameters": {"k": {"string_value": "v"}},
    })
    cfg = parse_override("m", text)
    assert cfg.max_batch_size == 16 and cfg.inputs[0].dims == [3, -1] and cfg.inputs[0].datatype == "FP32"
    assert cfg.outputs[0].datatype == "BYTES"
    assert cfg.instance_group[0].count == 2 and cfg.instance_group[0].kind == "CPU"
    assert cfg.version_policy.kind == "specific" and cfg.version_policy.versions == [2]
    assert cfg.dynamic_batching is not None and cfg.dynamic_batching.max_queue_delay_microseconds == 100
    assert cfg.parameters == {"k": "v"}


def test_a_models_own_config_json_round_trips() -> None:
    cfg = parse_override("m", json.dumps({"backend": "python", "max_batch_size": 4,
                                          "input": [{"name": "X", "data_type": "TYPE_INT64", "dims": [2]}]}))
    again = parse_override("m", json.dumps(proto_json(to_proto(cfg))))
    assert to_proto(again) == to_proto(cfg)


@pytest.mark.parametrize(("text", "fragment"), [
    ('"parameters": {"config": {{"max_batch_size": "16"}}}', "Invalid config override"),
    ('{"max_batch_size": "sixteen"}', "max_batch_size"),
    ('{"no_such_field": 1}', "no_such_field"),
    ('{"name": "other"}', "must match"),
    ('{"max_batch_size": -1}', "max_batch_size"),
])
def test_a_bad_config_override_is_failed_to_load(text: str, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_override("m", text)
    assert info.value.message.startswith("failed to load 'm', failed to poll from model repository: ")
    assert fragment in info.value.message


@pytest.mark.parametrize("key", ["file:1/model.py", "file:labels.txt", "file:1/sub/dir/w.bin"])
def test_file_paths_inside_the_directory_are_accepted(key: str) -> None:
    assert check_file_path(key) == key.removeprefix("file:")


@pytest.mark.parametrize("key", ["file:", "file:/etc/passwd", "file:../x", "file:1/../../x", "file:1//x",
                                 "file:./x", "file:" + "A" * 256, "file:1\\x", "file:a\x00b"])
def test_file_paths_that_could_leave_the_directory_are_refused(key: str) -> None:
    with pytest.raises(InvalidInput) as info:
        check_file_path(key)
    assert info.value.message.startswith("Invalid file path")


def test_version_strings_as_triton_reads_them() -> None:
    assert model_version("") is None
    assert model_version("3") == 3 and model_version("03") == 3 and model_version("0") == 0
    with pytest.raises(InvalidInput, match="failed to get model version from specified version string 'x1'"):
        model_version("x1")
    with pytest.raises(InvalidInput, match="invalid model version specified '-1' , version should be"):
        model_version("-1")


def test_server_settings_take_tritons_names(tmp_path: Path) -> None:
    cfg = load(ServerConfig, {"model_repository": str(tmp_path), "model_control_mode": "explicit",
                              "load_model": ["a"], "repository_poll_secs": 2})
    assert cfg.models == ["a"] and cfg.model_control_mode == "explicit" and cfg.repository_poll_secs == 2
    assert load(ServerConfig, {}).repository_poll_secs == 15


@pytest.mark.parametrize(("data", "fragment"), [
    ({"model_control_mode": "sometimes"}, "model_control_mode: must be none, poll or explicit"),
    ({"models": ["*", "a"]}, "Wildcard model name '*' must be the ONLY startup model"),
    ({"model_control_mode": "none", "models": ["a"]}, "models: load_model is for model_control_mode explicit"),
    ({"model_control_mode": "poll", "repository_poll_secs": 0}, "repository_poll_secs: must be > 0"),
    ({"model_repository": "/no/such/dir"}, "model_repository: /no/such/dir does not exist"),
])
def test_bad_server_settings_name_the_field(data: dict, fragment: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as info:
        load(ServerConfig, data)
    assert fragment in info.value.message


def test_fingerprint_changes_with_config_versions_and_files(tmp_path: Path) -> None:
    model = tmp_path / "m"
    (model / "1").mkdir(parents=True)
    (model / "config.yaml").write_text("backend: python\n")
    (model / "1" / "model.py").write_text("x = 1\n")
    before = fingerprint(model)
    assert fingerprint(model) == before
    (model / "2").mkdir()
    with_version = fingerprint(model)
    assert with_version != before
    (model / "1" / "model.py").write_text("x = 22\n")
    assert fingerprint(model) != with_version
