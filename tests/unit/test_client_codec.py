"""Pure client-side conversions: command-line JSON -> tensors, responses -> results."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from modelyard.clients.channel import make_settings
from modelyard.clients.errors import InferenceServerError
from modelyard.clients.inputs import InputError, TensorSpec, fit_shape, normalize_datatype, parse_input
from modelyard.clients.requests import build_infer_request
from modelyard.clients.results import InferResult, decode_stream_response
from modelyard.launcher import parse_ready_line
from modelyard.percentiles import percentile
from modelyard.protos import grpc_service_pb2 as pb
from modelyard.protos.tensors import as_bytes_array, datatype_of


def test_declared_datatype_wins_over_json_ints() -> None:
    name, arr = parse_input("INPUT0=[1,2,3,4]", TensorSpec("INPUT0", "FP32", (4,)))
    assert name == "INPUT0"
    assert arr.dtype == np.float32
    np.testing.assert_array_equal(arr, [1, 2, 3, 4])


def test_scalar_string_fills_batch_and_fixed_dims() -> None:
    _, arr = parse_input('TEXT="hello"', TensorSpec("TEXT", "BYTES", (-1, 1)))
    assert arr.shape == (1, 1)
    assert arr[0, 0] == b"hello"


def test_list_of_strings_becomes_a_batch() -> None:
    _, arr = parse_input('TEXT=["a", "b", "c"]', TensorSpec("TEXT", "BYTES", (-1, 1)))
    assert arr.shape == (3, 1)
    assert arr.reshape(-1).tolist() == [b"a", b"b", b"c"]


def test_bare_text_is_accepted_for_bytes_inputs() -> None:
    _, arr = parse_input("TEXT=hello world", TensorSpec("TEXT", "BYTES", (1,)))
    assert arr.tolist() == [b"hello world"]


def test_bare_text_is_refused_for_numeric_inputs() -> None:
    with pytest.raises(InputError, match="not JSON"):
        parse_input("X=hello", TensorSpec("X", "FP32", (1,)))


@pytest.mark.parametrize(
    ("json_value", "datatype", "shape"),
    [("[1, 2]", "INT64", (2,)), ("[1.5, 2]", "FP32", (2,)), ("[true, false]", "BOOL", (2,)),
     ('[["x"], ["y"]]', "BYTES", (2, 1)), ("7", "INT64", ())],
)
def test_datatype_is_guessed_from_json_when_undeclared(json_value: str, datatype: str, shape: tuple[int, ...]) -> None:
    _, arr = parse_input(f"X={json_value}", TensorSpec("X"))
    assert datatype_of(arr) == datatype
    assert arr.shape == shape


def test_explicit_datatype_overrides_the_guess() -> None:
    _, arr = parse_input("X=[1, 2]", TensorSpec("X"), datatype="fp16")
    assert arr.dtype == np.float16


@pytest.mark.parametrize(
    ("text", "spec", "message"),
    [
        ("X=[[1, 2], [3]]", TensorSpec("X"), "ragged"),
        ("X=[1, 2, 3]", TensorSpec("X", "FP32", (4,)), "do not fit the declared shape"),
        ('X=[1, "a"]', TensorSpec("X", "INT32", (2,)), "give numbers"),
        ("X=[1, 2]", TensorSpec("X", "BYTES", (2,)), "give strings"),
        ("X=[1.5]", TensorSpec("X", "INT32", (1,)), "not an integer"),
        ("X=[300]", TensorSpec("X", "UINT8", (1,)), "out of range"),
        ("X=[1, \"a\"]", TensorSpec("X"), "mix"),
        ("X=[]", TensorSpec("X"), "needs --datatype"),
        ("X", TensorSpec("X"), "NAME=VALUE"),
        ("X=@/nonexistent/file.npy", TensorSpec("X"), "cannot load"),
    ],
)
def test_bad_inputs_raise_input_error_naming_the_problem(text: str, spec: TensorSpec, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_input(text, spec)


def test_unknown_datatype_is_refused() -> None:
    with pytest.raises(InputError, match="unknown datatype"):
        normalize_datatype("FLOAT7")
    assert normalize_datatype("TYPE_STRING") == "BYTES"


def test_npy_file_is_cast_to_the_declared_datatype(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.arange(4, dtype=np.float64))
    _, arr = parse_input(f"X=@{path}", TensorSpec("X", "FP32", (4,)))
    assert arr.dtype == np.float32
    np.save(path, np.arange(4, dtype=np.float64))
    with pytest.raises(InputError, match="holds float64"):
        parse_input(f"X=@{path}", TensorSpec("X", "INT32", (4,)))


def test_fit_shape_keeps_matching_arrays_and_fills_variable_dims() -> None:
    arr = np.zeros((2, 3))
    assert fit_shape("X", arr, (-1, 3)) is arr
    assert fit_shape("X", np.zeros(6), (-1, 3)).shape == (2, 3)
    assert fit_shape("X", np.zeros(6), None).shape == (6,)
    assert fit_shape("X", np.zeros(()), (-1,)).shape == (1,)
    # an all-variable shape may mean "undeclared": never flattened
    assert fit_shape("X", np.zeros((2, 2)), (-1,)).shape == (2, 2)


def test_bearer_token_headers_and_message_limits_go_into_channel_settings() -> None:
    settings = make_settings("grpc://127.0.0.1:1/", token="s3cret", headers={"X-Tenant": "a"})
    assert settings.target == "127.0.0.1:1"
    assert ("authorization", "Bearer s3cret") in settings.metadata()
    assert ("x-tenant", "a") in settings.metadata()
    assert ("grpc.max_receive_message_length", 64 * 1024 * 1024) in settings.channel_options()
    assert ("grpc.max_send_message_length", 64 * 1024 * 1024) in settings.channel_options()


def test_request_uses_raw_contents_and_result_decodes_them() -> None:
    inputs = {"A": np.array([1.0, 2.0], dtype=np.float16), "B": as_bytes_array(["x", "yz"])}
    request = build_infer_request("m", inputs, outputs=["OUT"], parameters={"priority": 1, "flag": True})
    assert [t.datatype for t in request.inputs] == ["FP16", "BYTES"]
    assert len(request.raw_input_contents) == 2
    assert request.parameters["flag"].bool_param is True
    assert request.parameters["priority"].int64_param == 1
    response = pb.ModelInferResponse(model_name="m", model_version="1")
    for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(raw)
    result = InferResult.from_proto(response)
    np.testing.assert_array_equal(result["A"], inputs["A"])
    assert result["B"].tolist() == [b"x", b"yz"]
    assert result.final


def test_in_band_stream_error_keeps_its_status_code() -> None:
    message = pb.ModelStreamInferResponse(error_message="NOT_FOUND: unknown model 'x'")
    with pytest.raises(InferenceServerError) as info:
        decode_stream_response(message)
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.message == "unknown model 'x'"
    assert InferenceServerError.from_stream_message("boom").code == grpc.StatusCode.UNKNOWN


def test_empty_final_marker_is_not_a_result() -> None:
    message = pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(model_name="m"))
    message.infer_response.parameters["triton_final_response"].bool_param = True
    assert decode_stream_response(message) is None


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([], 50) == 0.0


def test_ready_line_is_parsed_and_other_lines_ignored() -> None:
    endpoints = parse_ready_line("modelyard ready grpc=127.0.0.1:1234 http=127.0.0.1:5678")
    assert endpoints is not None and endpoints.grpc == "127.0.0.1:1234" and endpoints.http == "127.0.0.1:5678"
    assert parse_ready_line("INFO starting") is None
