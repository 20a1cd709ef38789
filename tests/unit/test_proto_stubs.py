"""The committed gRPC stubs are exactly what grpc_tools makes from the committed .proto files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = (
    "router_pb2.py",
    "router_pb2.pyi",
    "router_pb2_grpc.py",
    "admin_pb2.py",
    "admin_pb2.pyi",
    "admin_pb2_grpc.py",
)


def test_stubs_match_proto_files(tmp_path: Path) -> None:
    proto_dir = tmp_path / "protocol" / "proto"
    proto_dir.mkdir(parents=True)
    for name in ("router.proto", "admin.proto"):
        shutil.copy(ROOT / "protocol" / "proto" / name, proto_dir / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            "--python_out=.",
            "--pyi_out=.",
            "--grpc_python_out=.",
            "protocol/proto/router.proto",
            "protocol/proto/admin.proto",
        ],
        cwd=tmp_path,
        check=True,
    )
    stale = [
        n for n in GENERATED if (proto_dir / n).read_text() != (ROOT / "protocol" / "proto" / n).read_text()
    ]
    assert not stale, f"stubs out of date, run `make protos`: {stale}"


def test_services_have_the_documented_methods() -> None:
    from protocol.proto import admin_pb2, router_pb2

    router = router_pb2.DESCRIPTOR.services_by_name["Router"]
    assert router.full_name == "pdflow.v1.Router"
    assert {m.name for m in router.methods} == {"Generate", "Abort"}
    assert router.methods_by_name["Generate"].server_streaming
    admin = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    assert {m.name for m in admin.methods} == {
        "GetClusterStatus",
        "ListInstances",
        "ListRequests",
        "Migrate",
        "Cordon",
        "Uncordon",
        "Drain",
        "ListMigrations",
        "GetAutoscalerStatus",
        "ExplainAutoscaler",
        "PauseAutoscaler",
        "ResumeAutoscaler",
        "Scale",
        "SetRole",
    }
