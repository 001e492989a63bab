"""The gRPC contract: health, reflection, and generated code that matches proto/."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def test_health_reports_serving(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "embedpool.v1.Embedder"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"embedpool.v1.Embedder", "grpc.health.v1.Health"} <= names


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    """`make proto` output is committed; this fails when proto/ changed without regenerating."""
    bindir = Path(sys.executable).parent
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}", f"--mypy_grpc_out={tmp_path}",
            *map(str, (ROOT / "proto/embedpool/v1").glob("*.proto")),
        ],
        check=True,
        env={"PATH": f"{bindir}"},
    )  # fmt: skip
    generated = tmp_path / "embedpool/v1"
    committed = ROOT / "python/embedpool/v1"
    names = sorted(p.name for p in generated.iterdir())
    _, mismatch, errors = filecmp.cmpfiles(generated, committed, names, shallow=False)
    assert not mismatch and not errors, f"run `make proto`: {mismatch + errors} differ from proto/"
