"""Pure pieces of the interop work: datatype declarations, binary header and encoding parsing, proto JSON."""

from __future__ import annotations

import gzip
import zlib

import pytest

from modelyard.config import ConfigError
from modelyard.protos import grpc_service_pb2 as pb
from modelyard.server.errors import InvalidInput, PayloadTooLarge
from modelyard.server.frontends.openai_api import chat_prompt
from modelyard.server.frontends.rest_api import accepted_encoding, decompress, header_length, proto_json
from modelyard.server.model_config import parse_config
from modelyard.server.shared_memory import key_path


def test_any_is_not_a_datatype_and_accept_datatypes_is_the_way():
    with pytest.raises(ConfigError, match="ANY is not a protocol datatype"):
        parse_config({"input": [{"name": "X", "data_type": "ANY"}]}, "m")
    cfg = parse_config({"input": [{"name": "X", "data_type": "TYPE_FP32", "accept_datatypes": ["TYPE_INT8", "BYTES"]}],
                        "output": [{"name": "Y", "data_type": "FP32", "dims": [-1]}]}, "m")
    assert cfg.inputs[0].accepts("INT8") and cfg.inputs[0].accepts("BYTES") and not cfg.inputs[0].accepts("FP64")
    with pytest.raises(ConfigError, match="accept_datatypes: unknown datatype"):
        parse_config({"input": [{"name": "X", "data_type": "FP32", "dims": [1], "accept_datatypes": ["FP8"]}]}, "m")


@pytest.mark.parametrize("value,size,expected", [("0", 5, 0), ("5", 5, 5), (" 3 ", 5, 3), (None, 5, None)])
def test_header_length_accepts(value, size, expected):
    assert header_length(value, size) == expected


@pytest.mark.parametrize("value", ["-1", "abc", "", "1_0", "+3", "3.0", "٣", "6"])
def test_header_length_refuses(value):
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length"):
        header_length(value, 5)


@pytest.mark.parametrize("header,expected", [
    (None, None), ("", None), ("gzip", "gzip"), ("deflate", "deflate"), ("br", None), ("gzip;q=0, deflate", "deflate"),
    ("deflate, gzip", "gzip"), ("*", "gzip"), ("identity", None), ("gzip;q=0.5", "gzip"),
])
def test_accepted_encoding(header, expected):
    assert accepted_encoding(header) == expected


def test_decompress_limits_and_formats():
    data = b"x" * 1000
    assert decompress(gzip.compress(data), "gzip", 1000) == data
    assert decompress(zlib.compress(data), "deflate", 1000) == data
    raw = zlib.compressobj(wbits=-15)
    assert decompress(raw.compress(data) + raw.flush(), "deflate", 1000) == data
    with pytest.raises(PayloadTooLarge):
        decompress(gzip.compress(data), "gzip", 999)
    with pytest.raises(InvalidInput, match="truncated"):
        decompress(gzip.compress(data)[:-10], "gzip", 1000)


def test_proto_json_writes_64_bit_integers_as_numbers_and_enums_by_name():
    msg = pb.ModelStatisticsResponse()
    s = msg.model_stats.add(name="m", version="1", inference_count=2**40)
    s.inference_stats.success.count = 3
    doc = proto_json(msg)
    assert doc["model_stats"][0]["inference_count"] == 2**40
    assert doc["model_stats"][0]["inference_stats"]["success"] == {"count": 3, "ns": 0}
    assert "fail" not in doc["model_stats"][0]["inference_stats"]  # unset sub-messages are left out


@pytest.mark.parametrize("key", ["", "/", "//", "a/b", "/../x", "..", "/x\x00y", "x" * 300])
def test_shared_memory_keys_stay_in_dev_shm(key):
    with pytest.raises(InvalidInput):
        key_path(key)


def test_shared_memory_key_forms():
    assert str(key_path("/region")) == "/dev/shm/region" == str(key_path("region"))


def test_chat_prompt():
    assert chat_prompt([{"role": "system", "content": "be brief"}, {"role": "user", "content": [
        {"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}]) == \
        "system: be brief\nuser: hi there\nassistant:"
    with pytest.raises(InvalidInput):
        chat_prompt([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_gpu_memory_above_the_threshold_degrades_health(tmp_path):
    """No GPU here: assess() is given the GPU reading a CUDA machine would produce."""
    from modelyard.server.health import assess
    from modelyard.server.repository import ModelRepository

    repo = ModelRepository(tmp_path)
    repo.failed["m"] = "boom"
    full = [{"device": "cuda:0", "used_bytes": 95, "total_bytes": 100, "used_fraction": 0.95}]
    report = assess(repo, started=True, shutting_down=False, queue_depth_limit=10, gpu_memory_limit=0.9, gpus=full)
    assert report.status == "unhealthy"  # nothing is READY
    assert "cuda:0 memory 95% used > 90%" in report.reasons and "no model is available" in report.reasons
    report = assess(repo, started=False, shutting_down=False, queue_depth_limit=10, gpu_memory_limit=0.9, gpus=[])
    assert "the server is starting" in report.reasons
