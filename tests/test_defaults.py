"""Safe by default: without a cluster secret a node serves its own host alone, and the embedded node inside
ComfyUI serves its own process alone. Each case is the attack that was tried (issue: trust bounded per member):
an anonymous local process listed, replaced and drained the default embedded node; `mesh serve` without a secret
started on a routable address and took anonymous puts."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import mesh
from mesh.codec import encode
from mesh.pb import mesh_pb2 as pb
from mesh.transport.peer import MeshError, PeerClient, Unauthenticated
from tests.support.cli import run_cli
from tests.support.comfy_harness import HarnessProcess
from tests.support.serve import ServeProcess, mesh_command

SETUP_HINT = "mesh secret"


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    return lines[0]


@pytest.mark.parametrize("args", [
    ["--listen", "0.0.0.0:0"],                     # a routable address: every host on the LAN could write
    ["--listen", "127.0.0.1:0", "--advertise", "10.1.2.3:8288"],
    ["--listen", "127.0.0.1:0", "--seeds", "127.0.0.1:9"],
    ["--listen", "127.0.0.1:0", "--zeroconf"],
    ["--listen", "127.0.0.1:0", "--metrics-listen", "0.0.0.0:0"],  # counters and class names to the LAN
])
def test_a_node_without_a_secret_refuses_anything_beyond_loopback(args: list[str]) -> None:
    done = subprocess.run([*mesh_command(), "serve", "--min-free-ram", "0", *args], capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith("MESH_")})
    line = one_line_error(done)
    assert "without a cluster secret" in line and SETUP_HINT in line


def test_mesh_secret_writes_a_private_secret_in_one_step(tmp_path: Path, serve: Callable[..., ServeProcess]) -> None:
    path = tmp_path / "etc" / "secret"
    done = run_cli("secret", str(path))
    assert done.returncode == 0 and str(path) in done.stdout, done.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text().strip()) == 44  # 32 bytes, base64
    first = path.read_text()
    assert one_line_error(run_cli("secret", str(path))).startswith(f"mesh: {path} exists")
    assert path.read_text() == first  # never overwritten by accident
    node = serve("--seeds", "127.0.0.1:9", secret=path)  # with the secret, seeds are fine
    assert run_cli("status", node=node.address, secret_file=path).returncode == 0
    assert run_cli("keys", node=node.address).returncode != 0  # and without it, nothing but health


def test_the_default_embedded_node_serves_its_own_process_alone(tmp_path: Path) -> None:
    """No MESH_SECRET: an anonymous process and one with a guessed secret can neither read, write nor drain the
    embedded node; what the next prompt looks up stays what this ComfyUI computed."""
    a = HarnessProcess(["--node-id", "lonely"], log_path=tmp_path / "a.log")  # no --secret: ComfyUI's default
    try:
        assert a.address and a.address.startswith("127.0.0.1:")
        first = a.run(workflow="standard", seed=7)
        assert first["errors"] == [] and a.flush(30)
        keys = a.call({"cmd": "contexts", "workflow": "standard", "seed": 8})["contexts"]
        evil = bytes(encode({"outputs": [[b"injected"]], "ui": None}))
        for secret in (None, b"guess"):
            with PeerClient(a.address, secret, timeout=5) as attacker:
                for attempt in (lambda: attacker.list_keys(), lambda: attacker.put(keys["blur"]["key"], evil),
                                lambda: attacker.drain(timeout=5)):
                    with pytest.raises(MeshError) as e:
                        attempt()
                    assert isinstance(e.value, Unauthenticated) or "unauthenticated" in str(e.value).lower()
        assert a.alive
        second = a.run(workflow="standard", seed=8)
        assert second["errors"] == [] and "blur" in second["executed"]  # computed here, not injected
    finally:
        a.kill()


def test_an_embedded_node_without_a_secret_joins_no_fleet_and_comfyui_runs_on(tmp_path: Path) -> None:
    b = HarnessProcess(["--node-id", "b", "--seeds", "127.0.0.1:9"], log_path=tmp_path / "b.log")
    try:
        assert b.address is None  # the provider did not start; the ComfyUI-like process did
        done = b.run(workflow="standard", seed=9)
        assert done["errors"] == [] and done["failed"] == []
        assert "without a cluster secret a node joins no mesh" in (tmp_path / "b.log").read_text()
    finally:
        b.kill()


def test_a_node_without_a_secret_takes_no_member_by_gossip(serve: Callable[..., ServeProcess]) -> None:
    """A local process named another secret-less node as the sender of a Ping, and the first one took it as a
    member: 'joins no mesh' must hold for gossip too."""
    a, b = serve(secret=None), serve(secret=None)
    with PeerClient(b.address, None, timeout=5) as cb:
        b_id = cb.stats().node_id
    with PeerClient(a.address, None, timeout=5) as ca:
        sender = pb.Member(node_id=b_id, address=b.address, state=pb.ALIVE, incarnation=1)
        with pytest.raises(MeshError, match="joins no mesh"):
            ca.ping(pb.PingRequest(cluster="default", protocol=mesh.PROTOCOL_VERSION, sender=sender, sync=True))
        assert [m.node_id for m in ca.stats().members] == [ca.stats().node_id]


def test_a_sidecar_elsewhere_needs_a_secret(tmp_path: Path) -> None:
    c = HarnessProcess(["--mode", "sidecar", "--node", "10.9.9.9:8288"], log_path=tmp_path / "c.log")
    try:
        assert c.info.get("namespace") is None  # the provider did not start: no unauthenticated link to a stranger
        assert c.run(workflow="standard", seed=3)["errors"] == []
    finally:
        c.kill()
    assert "the sidecar must be on this host" in (tmp_path / "c.log").read_text()


def test_a_blank_secret_is_refused_not_taken_as_one() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")} | {"MESH_SECRET": "  "}
    done = subprocess.run([*mesh_command(), "serve", "--listen", "0.0.0.0:0"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert one_line_error(done).startswith("mesh: MESH_SECRET is blank")


def test_mesh_secret_never_replaces_what_is_not_a_secret_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "is not a regular file: not replaced" in one_line_error(run_cli("secret", "--force", str(fifo)))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    (tmp_path / "file").write_text("")
    assert "is not a folder" in run_cli("secret", str(tmp_path / "file" / "secret")).stderr
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path).rglob(".secret.*"))
    private = subprocess.run(["sh", "-c", f"umask 0777 && exec {' '.join(mesh_command())} secret {tmp_path / 's'}"],
                             capture_output=True, text=True, timeout=60)
    assert private.returncode == 0 and stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o600


@pytest.mark.parametrize("value", ["inf", "nan", "-5", "0", "1e300"])
def test_timeout_must_be_a_number_of_seconds(value: str) -> None:
    done = subprocess.run(
        [*mesh_command(), "--timeout", value, "keys"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "argument --timeout: must be above 0" in done.stderr
