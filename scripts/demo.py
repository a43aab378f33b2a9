"""`make demo`: a local mesh on 127.0.0.1, a real tensor blob through it, and two ComfyUI-like processes
sharing a slow node's output. Everything started here is stopped before it exits.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import torch

from mesh import blob
from mesh.localmesh import LocalMesh
from mesh.ring import Ring
from mesh.units import format_size

ROOT = Path(__file__).resolve().parent.parent


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def mesh_demo(mesh: LocalMesh) -> None:
    say("starting a mesh of 3 `mesh serve` processes on 127.0.0.1 (node0 is the others' seed)")
    mesh.start(3)
    mesh.wait_members(3)
    for node in mesh.nodes:
        print(f"   {node.node_id} on {node.address} (pid {node.process.pid})")
    subprocess.run([sys.executable, "-m", "mesh.cli", "--node", mesh.nodes[0].address, "--secret-file",
                    str(mesh.secret_file), "ring"], check=True)

    say("encoding a ComfyUI LATENT and an IMAGE with the tensor codec, putting them through node0")
    gen = torch.Generator().manual_seed(42)
    value = {"outputs": [[{"samples": torch.randn(1, 4, 128, 128, generator=gen)}],
                         [torch.rand(1, 512, 512, 3, generator=gen)]], "ui": None}
    data = blob.encode(value)
    key = "demo/" + hashlib.sha256(b"demo workflow inputs").hexdigest()
    owners = Ring({n.node_id: float(4 << 30) for n in mesh.nodes}).owners(key, 2)
    with mesh.client(mesh.nodes[0]) as c:
        t = time.perf_counter()
        reply = c.put(key, data, {"class_type": "DemoNode", "content": "comfy-value/1"})
        print(f"   put {format_size(len(data))} in {(time.perf_counter() - t) * 1e3:.1f} ms, "
              f"{reply.replicas} owner(s) acknowledged; owners by the ring: {', '.join(owners)}")
    reader = mesh.nodes[2]
    with mesh.client(reader) as c:
        t = time.perf_counter()
        got = c.get(key)
        ms = (time.perf_counter() - t) * 1e3
    assert got is not None
    back = blob.decode(got.data)
    same = all(torch.equal(a, b) for a, b in (
        (value["outputs"][0][0]["samples"], back["outputs"][0][0]["samples"]),  # type: ignore[index]
        (value["outputs"][1][0], back["outputs"][1][0]),  # type: ignore[index]
    ))
    print(f"   got it back through {reader.node_id} in {ms:.1f} ms: bit-exact = {same}")
    subprocess.run([sys.executable, "-m", "mesh.cli", "--node", reader.address, "--secret-file",
                    str(mesh.secret_file), "get", key, "--describe"], check=True)
    subprocess.run([sys.executable, "-m", "mesh.cli", "--node", reader.address, "--secret-file",
                    str(mesh.secret_file), "peers"], check=True)
    if not same:
        raise SystemExit("demo failed: the value did not come back bit-exactly")


def main() -> None:
    with LocalMesh() as mesh:
        mesh_demo(mesh)
        say("stopping the mesh")
    print("done: everything the demo started has stopped")


if __name__ == "__main__":
    main()
