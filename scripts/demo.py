"""`make demo`: a local mesh on 127.0.0.1, a real tensor blob through it, and two ComfyUI-like processes
sharing a slow node's output. Everything started here is stopped before it exits.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mesh import codec  # noqa: E402
from mesh.cluster.ring import Ring  # noqa: E402
from mesh.units import format_size  # noqa: E402
from tests.support.comfy_harness import HarnessProcess  # noqa: E402
from tests.support.cli import run_cli  # noqa: E402
from tests.support.localmesh import LocalMesh, LocalNode  # noqa: E402

SLOW_NODE_SECONDS = 2.0


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show_cli(mesh: LocalMesh, node: LocalNode, *args: str) -> None:
    """Run `mesh --node NODE ARGS` as an operator would, its output straight to the terminal."""
    run_cli(*args, node=node.address, secret_file=mesh.secret_file, capture=False, check=True, drop_env=())


def mesh_demo(mesh: LocalMesh) -> None:
    say("starting a mesh of 3 `mesh serve` processes on 127.0.0.1 (node0 is the others' seed)")
    mesh.start(3)
    mesh.wait_members(3)
    for node in mesh.nodes:
        print(f"   {node.node_id} on {node.address} (pid {node.process.pid})")
    show_cli(mesh, mesh.nodes[0], "ring")

    say("encoding a ComfyUI LATENT and an IMAGE with the tensor codec, putting them through node0")
    gen = torch.Generator().manual_seed(42)
    value = {"outputs": [[{"samples": torch.randn(1, 4, 128, 128, generator=gen)}],
                         [torch.rand(1, 512, 512, 3, generator=gen)]], "ui": None}
    data = codec.encode(value)
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
    back = codec.decode(got.data)
    same = all(torch.equal(a, b) for a, b in (
        (value["outputs"][0][0]["samples"], back["outputs"][0][0]["samples"]),  # type: ignore[index]
        (value["outputs"][1][0], back["outputs"][1][0]),  # type: ignore[index]
    ))
    print(f"   got it back through {reader.node_id} in {ms:.1f} ms: bit-exact = {same}")
    show_cli(mesh, reader, "get", key, "--describe")
    time.sleep(1.2)  # key counts of other members travel with heartbeats (every 0.5 s): let them catch up
    show_cli(mesh, reader, "peers")
    if not same:
        raise SystemExit("demo failed: the value did not come back bit-exactly")


def comfyui_demo(workdir: Path) -> None:
    say("two ComfyUI-like processes (tests/support/comfy_harness.py drives the provider as ComfyUI does), "
        "each with an embedded mesh node; B's seed is A")
    secret = hashlib.sha256(str(time.time_ns()).encode()).hexdigest()
    a = HarnessProcess(["--secret", secret, "--node-id", "comfyui-a"], log_path=workdir / "comfyui-a.log")
    b = None
    try:
        b = HarnessProcess(["--secret", secret, "--node-id", "comfyui-b", "--seeds", a.address or ""],
                           log_path=workdir / "comfyui-b.log")
        a.wait_members(2)
        b.wait_members(2)
        print(f"   A: node {a.node_id} on {a.address}; B: node {b.node_id} on {b.address}; "
              f"namespace {a.namespace}")
        spec = {"workflow": "standard", "seed": 2026, "args": {"delay": SLOW_NODE_SECONDS, "size": 512}}
        for name, proc in (("A", a), ("B", b)):
            if name == "B":
                proc_a_flushed = a.flush(60)
                print(f"   (A's stores reached the mesh: {proc_a_flushed})")
            result = proc.run(timeout=120, **spec)
            slow = result["nodes"]["blur"]
            print(f"   {name} ran the prompt in {result['wall_s']:.2f} s: executed {len(result['executed'])} nodes, "
                  f"{len(result['provider_hits'])} from the mesh; the slow node (SlowBlur, {SLOW_NODE_SECONDS:g} s) "
                  f"was {'executed' if slow['status'] == 'executed' else 'served from the mesh'}")
            if name == "A":
                outputs_a = result["outputs"]
            else:
                shared = list(result["provider_hits"])
                same = all(result["outputs"][n] == outputs_a[n] for n in shared)
                print(f"   B's values from the mesh ({', '.join(shared)}) are bit-exact copies of A's: {same}")
                print(f"   not shared, by design: {', '.join(result['executed'])} "
                      "(a MODEL, an output node, a non-idempotent node, a node whose IS_CHANGED is NaN)")
                if not same or slow["status"] == "executed":
                    raise SystemExit("demo failed: B did not get A's outputs from the mesh")
        stats = b.stats()["provider"]
        print(f"   B's provider: {stats['provider_hits']:.0f} hits, {stats['provider_misses']:.0f} misses, "
              f"{stats['provider_bridge_bytes_in'] / 2**20:.1f} MiB in (also in `mesh stats` on B's node)")
    finally:
        if b is not None:
            b.quit()
        a.quit()


def main() -> None:
    with LocalMesh() as mesh:
        mesh_demo(mesh)
        say("stopping the mesh")
    with tempfile.TemporaryDirectory(prefix="mesh-demo-") as tmp:
        comfyui_demo(Path(tmp))
    print("done: everything the demo started has stopped")


if __name__ == "__main__":
    main()
