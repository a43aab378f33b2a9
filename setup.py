"""Build hook: the gRPC code is generated from proto/ into the wheel, so `pip install .` needs no Makefile.

grpcio-tools is pinned in pyproject.toml's build requirements: the protobuf and grpcio versions its code needs
at run time are the floors declared in `dependencies` (check them together when changing either).
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProto(build_py):
    def run(self) -> None:
        super().run()
        from grpc_tools import protoc

        out = Path(self.build_lib)
        (out / "mesh" / "pb").mkdir(parents=True, exist_ok=True)
        args = ["grpc_tools.protoc", "-Imesh/pb=proto", f"--python_out={out}", f"--grpc_python_out={out}",
                "proto/mesh.proto"]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on proto/mesh.proto")


setup(cmdclass={"build_py": BuildPyWithProto})
