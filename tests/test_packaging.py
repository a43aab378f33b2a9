"""The wheel, as an operator installs it: built from this checkout without the Makefile, installed into a fresh
venv without torch and with protobuf 5.x (what ComfyUI environments often carry), then used for real."""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from tests.support.serve import start_serve
from tests.support.shell import sh

REPO = Path(__file__).resolve().parent.parent
OLD_PROTOBUF = "protobuf==5.29.6"


@pytest.mark.slow
def test_the_wheel_installs_and_works_without_the_makefile_or_torch(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(REPO))
    wheel = next(dist.glob("comfy_mesh-*.whl"))
    with zipfile.ZipFile(wheel) as z:  # the web page's extension ships with the provider (its WEB_DIRECTORY)
        assert "comfy_mesh_provider/web/comfy_mesh.js" in z.namelist()
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", str(venv))
    py, mesh = venv / "bin" / "python", venv / "bin" / "mesh"
    sh(str(py), "-m", "pip", "install", "-q", str(wheel), OLD_PROTOBUF)
    listed = sh(str(py), "-m", "pip", "list", "--format", "json").stdout
    names = {p["name"].lower(): p["version"] for p in json.loads(listed)}
    assert "torch" not in names and names["protobuf"] == OLD_PROTOBUF.split("==")[1]
    assert sh(str(mesh), "--version").stdout.startswith("comfy-mesh ")

    secret = tmp_path / "secret"
    secret.write_text("wheel-test-secret\n")
    # The installed script, not this checkout's: the launcher and the CLI runner take it as their command.
    node = start_serve(tmp_path, "serve", secret_file=secret, command=[str(mesh)], timeout=30)
    try:
        value = tmp_path / "value.bin"
        value.write_bytes(os.urandom(3 << 20))
        for args in (["put", "wheel/k", str(value)], ["get", "wheel/k", "-o", str(tmp_path / "back.bin")]):
            r = run_cli(*args, node=node.address, secret_file=secret, command=[str(mesh)],
                        drop_env=("MESH_", "PYTHON"))
            assert r.returncode == 0, f"{args}: {r.stdout[-2000:]} {r.stderr[-2000:]}"
        assert (tmp_path / "back.bin").read_bytes() == value.read_bytes()
    finally:
        node.close(timeout=15)

    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "main.py").write_text("# a fake ComfyUI\n")
    sh(str(mesh), "install-comfyui", str(comfy))
    linked = comfy / "custom_nodes" / "comfy_mesh"
    assert linked.is_symlink() and (linked / "__init__.py").exists() and (linked / "bridge.py").exists()
    # Imported outside ComfyUI the provider does nothing, and needs no torch to be imported.
    sh(str(py), "-c", "import comfy_mesh_provider, sys; assert 'torch' not in sys.modules")
