"""The committed gRPC code in mesh/pb/ says what proto/mesh.proto says, and was made by the pinned generator.

Why committed at all: ComfyUI-Manager and `pip install -e .` use a plain clone, with no build step to generate it.
Why these checks and not a byte comparison: the test venv's grpcio-tools is newer than the pinned one (1.66.2,
whose code runs on the protobuf and grpcio floors ComfyUI environments carry), and different generators print
different Python for the same contract. The contract itself, the serialized file descriptor and the service's
method paths and message types, is the same from every generator, so that is what is compared.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

from mesh.pb import mesh_pb2, mesh_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
PINNED_PROTOBUF = "5.27.2"
PINNED_GRPC = "1.66.2"
HINT = "proto/mesh.proto and mesh/pb/ disagree: run `make proto` and commit mesh/pb/"


def compiled_from_proto(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "mesh.desc"
    r = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Imesh/pb=proto", f"--descriptor_set_out={out}",
                        "proto/mesh.proto"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    assert len(files) == 1
    for message in files[0].message_type:  # the descriptor set adds json names; generated code omits them
        _drop_json_names(message)
    return files[0]


def _drop_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _drop_json_names(nested)


def committed() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    mesh_pb2.DESCRIPTOR.CopyToProto(proto)
    return proto


def test_the_committed_messages_are_the_proto_files_messages(tmp_path: Path) -> None:
    assert committed() == compiled_from_proto(tmp_path), HINT


STUB_METHOD = re.compile(r"self\.(\w+) = channel\.(\w+)\(\s*'([^']+)',\s*"
                         r"request_serializer=\w+\.(\w+)\.SerializeToString,\s*"
                         r"response_deserializer=\w+\.(\w+)\.FromString")


def test_the_committed_stub_calls_every_method_of_the_proto_service(tmp_path: Path) -> None:
    stub = inspect.getsource(mesh_pb2_grpc.MeshStub)
    have = {path: (kind, request, reply) for _, kind, path, request, reply in STUB_METHOD.findall(stub)}
    proto = compiled_from_proto(tmp_path)
    want = {}
    for service in proto.service:
        for m in service.method:
            kind = f"{'stream' if m.client_streaming else 'unary'}_{'stream' if m.server_streaming else 'unary'}"
            want[f"/{proto.package}.{service.name}/{m.name}"] = (kind, m.input_type.rsplit(".", 1)[-1],
                                                               m.output_type.rsplit(".", 1)[-1])
    assert have == want, HINT


def test_the_committed_code_comes_from_the_pinned_generator() -> None:
    """Code from a newer generator refuses to import on older protobuf/grpcio, such as ComfyUI's."""
    pb = (REPO / "mesh/pb/mesh_pb2.py").read_text()
    grpc_code = (REPO / "mesh/pb/mesh_pb2_grpc.py").read_text()
    assert f"# Protobuf Python Version: {PINNED_PROTOBUF}\n" in pb, "regenerate with `make proto` (pinned tools)"
    assert f"GRPC_GENERATED_VERSION = '{PINNED_GRPC}'" in grpc_code, "regenerate with `make proto` (pinned tools)"
    assert (REPO / "mesh/pb/mesh_pb2.pyi").exists()
