"""The committed generated modules are exactly what ``make protos`` produces."""

from __future__ import annotations

from pathlib import Path

from modelyard.protos import generate


def test_protos_regenerate_without_diff(tmp_path: Path):
    written = generate.generate(tmp_path)
    assert {p.name for p in written} == {
        "grpc_service_pb2.py", "grpc_service_pb2.pyi", "grpc_service_pb2_grpc.py",
        "model_config_pb2.py", "model_config_pb2.pyi",
        "modelyard_health_pb2.py", "modelyard_health_pb2.pyi", "modelyard_health_pb2_grpc.py",
    }
    for fresh in written:
        committed = generate.PROTO_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), f"{fresh.name} is stale: run `make protos`"


def test_generated_modules_import_through_the_package():
    for name in ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py"):
        text = (generate.PROTO_DIR / name).read_text()
        assert "\nimport grpc_service_pb2" not in text and "\nimport model_config_pb2" not in text
        assert "from modelyard.protos import" in text


def test_field_numbers_match_tritonclient():
    """Every field modelyard declares has the name, number and type Triton's descriptor has."""
    from tritonclient.grpc import model_config_pb2 as tmc
    from tritonclient.grpc import service_pb2 as tsvc

    from modelyard.protos import grpc_service_pb2, model_config_pb2

    def check(ours, theirs, path):
        for f in ours.fields:
            t = theirs.fields_by_name.get(f.name)
            assert t is not None, f"{path}.{f.name} not in Triton's proto"
            assert (f.number, f.type) == (t.number, t.type), f"{path}.{f.name}"
            if f.message_type is not None and not f.message_type.GetOptions().map_entry:
                check(f.message_type, t.message_type, f"{path}.{f.name}")

    for ours_mod, theirs_mod in ((grpc_service_pb2, tsvc), (model_config_pb2, tmc)):
        for name, desc in ours_mod.DESCRIPTOR.message_types_by_name.items():
            check(desc, theirs_mod.DESCRIPTOR.message_types_by_name[name], name)
    ours_svc = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs_svc = tsvc.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for m in ours_svc.methods:
        t = theirs_svc.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (t.input_type.full_name, t.output_type.full_name)
