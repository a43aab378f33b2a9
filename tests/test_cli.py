"""The `mesh` command end to end: `mesh serve` and the client commands as real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.support.cli import run_cli
from tests.support.poll import poll
from tests.support.serve import ServeProcess, serve_argv


def run_mesh(node: str, *args: str, secret_file: Path | None = None, timeout: float = 10
             ) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, node=node, rpc_timeout=timeout, secret_file=secret_file)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mesh: ")
    return lines[0]


@pytest.fixture
def served(serve: Callable[..., ServeProcess]) -> ServeProcess:
    return serve()


@pytest.fixture
def mesh(served: ServeProcess, secret_file: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """mesh(*args): run a `mesh` command against the served node with the right secret."""
    return lambda *args: run_mesh(served.address, *args, secret_file=secret_file)


def test_put_get_keys_stats_status_delete(mesh: Callable[..., subprocess.CompletedProcess[str]],
                                          served: ServeProcess, tmp_path: Path) -> None:
    value = os.urandom(300_000) + bytes(700_000)
    src = tmp_path / "value.bin"
    src.write_bytes(value)

    r = mesh("put", "img/1", str(src), "--meta", "class_type=LoadImage")
    assert r.returncode == 0, r.stderr
    assert "stored img/1" in r.stdout
    r = mesh("put", "img/1", str(src))
    assert r.returncode == 0 and "already stored img/1" in r.stdout

    out = tmp_path / "out.bin"
    r = mesh("get", "img/1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == value
    assert "wrote" in r.stdout

    r = mesh("keys")
    assert r.returncode == 0 and "img/1" in r.stdout and "LoadImage" in r.stdout
    r = mesh("keys", "--class-type", "LoadImage", "--json")
    assert [k["key"] for k in json.loads(r.stdout)] == ["img/1"]
    assert json.loads(mesh("keys", "--class-type", "VAEDecode", "--json").stdout) == []
    r = mesh("stats")
    assert r.returncode == 0 and "puts" in r.stdout and served.node_id in r.stdout
    r = mesh("status")
    assert r.returncode == 0 and "SERVING" in r.stdout and served.address in r.stdout

    r = mesh("delete", "img/1")
    assert r.returncode == 0 and "deleted 1 of 1" in r.stdout
    r = mesh("delete", "img/1")
    assert r.returncode == 3 and "deleted 0 of 1" in r.stdout


def test_json_output(mesh: Callable[..., subprocess.CompletedProcess[str]], served: ServeProcess,
                     tmp_path: Path) -> None:
    value = bytes(range(256)) * 4000
    src = tmp_path / "v"
    src.write_bytes(value)

    put = json.loads(mesh("put", "k/1", str(src), "--json").stdout)
    assert put["key"] == "k/1" and put["bytes"] == len(value) and put["stored"] and not put["existed"]
    assert put["replicas"] == 1
    again = json.loads(mesh("put", "k/1", str(src), "--json").stdout)
    assert again["existed"] and not again["stored"]

    out = tmp_path / "o"
    got = json.loads(mesh("get", "k/1", "-o", str(out), "--json").stdout)
    assert got == {"key": "k/1", "bytes": len(value), "file": str(out), "seconds": got["seconds"]}
    assert out.read_bytes() == value

    keys = json.loads(mesh("keys", "--json").stdout)
    assert [k["key"] for k in keys] == ["k/1"]
    assert keys[0]["raw_size"] == len(value) and keys[0]["meta"] == {"content": "bytes"}
    assert keys[0]["stored_size"] == len(value)  # over loopback raw beats lz4: sent raw (mesh/transport/link.py)

    stats = json.loads(mesh("stats", "--json").stdout)
    assert stats["node_id"] == served.node_id and stats["address"] == served.address
    assert stats["counters"]["entries"] == 1 and stats["counters"]["puts"] == 1
    assert stats["counters"]["duplicate_puts"] == 1 and stats["counters"]["hits"] == 1

    status = json.loads(mesh("status", "--json").stdout)
    assert status["health"] == "SERVING" and status["entries"] == 1 and status["node_id"] == served.node_id
    assert status["members"]["ALIVE"] == 1 and status["bytes_used"] > 0

    deleted = mesh("delete", "k/1", "nope", "k/1", "--json")
    assert json.loads(deleted.stdout) == {"deleted": 1, "missing": ["nope"]}
    assert deleted.returncode == 3  # a named key did not exist
    assert json.loads(mesh("keys", "--json").stdout) == []


def test_get_to_stdout(mesh: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    src = tmp_path / "v"
    src.write_bytes(b"hello mesh\n")
    assert mesh("put", "greeting", str(src)).returncode == 0
    r = mesh("get", "greeting", "-o", "-")
    assert r.returncode == 0 and r.stdout == "hello mesh\n"


def test_missing_key_exits_3(mesh: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    out = tmp_path / "never"
    r = mesh("get", "no/such/key", "-o", str(out))
    assert r.returncode == 3
    assert "key not found: no/such/key" in one_line_error(r)
    assert not out.exists() and r.stdout == ""


def test_usage_errors_exit_2(mesh: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    r = mesh("get", "k")  # neither -o nor --describe
    assert r.returncode == 2 and "-o FILE" in one_line_error(r)
    r = mesh("put", "k", str(tmp_path / "does-not-exist"))
    assert r.returncode == 1 and "cannot read" in one_line_error(r)


def test_wrong_secret_is_one_line_and_non_zero(served: ServeProcess, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-secret"
    wrong.write_bytes(b"not the cluster secret")
    for args in (["stats"], ["keys", "--json"], ["get", "k", "-o", str(tmp_path / "o")]):
        r = run_mesh(served.address, *args, secret_file=wrong)
        assert r.returncode == 1
        line = one_line_error(r)  # says it is the wrong secret, and what to give instead
        assert "a wrong secret" in line and "--secret-file FILE (MESH_SECRET_FILE" in line, line
    r = run_mesh(served.address, "stats")  # no secret at all: names the option and the variable
    line = one_line_error(r)
    assert r.returncode == 1 and "this client has none" in line and "--secret-file FILE (MESH_SECRET_FILE" in line


def test_unreachable_node_is_one_line_and_non_zero(secret_file: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    for args in (["stats"], ["status", "--json"], ["get", "k", "-o", "/dev/null"]):
        r = run_mesh(address, *args, secret_file=secret_file, timeout=3)
        assert r.returncode == 1
        assert f"node {address} unreachable" in one_line_error(r)


def test_sigterm_stops_serve_cleanly(served: ServeProcess, secret_file: Path) -> None:
    assert run_mesh(served.address, "stats", secret_file=secret_file).returncode == 0
    assert served.stop(signal.SIGTERM) == 0
    assert "stopped" in served.log()
    r = run_mesh(served.address, "stats", secret_file=secret_file, timeout=2)
    assert r.returncode == 1 and "unreachable" in one_line_error(r)


def test_sigterm_while_the_node_starts_still_stops_it_cleanly(tmp_path: Path, secret_file: Path) -> None:
    """The node answers peers before start() returns; a SIGTERM the moment its port accepts (a service manager
    stopping a unit that just started) must stop it like any other, exit 0, not kill it mid-start."""
    port = free_port()
    argv = serve_argv("--drain-on-term", ready_file=tmp_path / "n.ready", secret_file=secret_file,
                      listen=f"127.0.0.1:{port}")
    log_path = tmp_path / "n.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        def accepts() -> bool:
            with socket.socket() as s:
                s.settimeout(0.2)
                return s.connect_ex(("127.0.0.1", port)) == 0
        poll(lambda: accepts() or process.poll() is not None, "the port to accept", timeout=30, interval=0.001)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log_path.read_text()
        assert "stopped" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigint_stops_serve_cleanly(served: ServeProcess) -> None:
    assert served.stop(signal.SIGINT) == 0


def test_serve_refuses_a_busy_port(serve: Callable[..., ServeProcess], served: ServeProcess) -> None:
    with pytest.raises(RuntimeError, match="exited"):
        serve("--listen", served.address)


def test_get_describe_shows_a_comfyui_value(mesh: Callable[..., subprocess.CompletedProcess[str]],
                                            tmp_path: Path) -> None:
    import torch

    from mesh import codec

    value = {"outputs": [[{"samples": torch.zeros(1, 4, 8, 8)}], [torch.ones(2, 3, dtype=torch.bfloat16)], ["txt"]],
             "ui": None}
    path = tmp_path / "value.bin"
    path.write_bytes(codec.encode(value))
    assert mesh("put", "cm1/v", str(path), "--meta", "class_type=KSampler").returncode == 0
    human = mesh("get", "cm1/v", "--describe")
    assert human.returncode == 0, human.stderr
    assert "float32[1, 4, 8, 8]" in human.stdout and "bfloat16[2, 3]" in human.stdout
    assert "class_type=KSampler" in human.stdout
    rows = json.loads(mesh("get", "cm1/v", "--describe", "--json").stdout)["leaves"]
    assert {"dtype": "float32", "shape": [1, 4, 8, 8]}.items() <= rows[0].items()
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"not a tensor blob")
    mesh("put", "plain", str(raw))
    plain = mesh("get", "plain", "--describe")  # described by its metadata (content=bytes), not "bad magic"
    assert plain.returncode == 0 and "raw bytes, as its metadata says (content=bytes)" in plain.stdout, plain
    assert "magic" not in plain.stdout + plain.stderr
    mesh("put", "damaged", str(raw), "--meta", "content=comfy-value/1")  # claims to be a ComfyUI value
    bad = mesh("get", "damaged", "--describe")
    assert bad.returncode == 1 and "not a tensor-tree blob" in one_line_error(bad)


def test_install_comfyui_links_the_provider(tmp_path: Path) -> None:
    comfy = tmp_path / "ComfyUI"
    (comfy / "custom_nodes").mkdir(parents=True)
    (comfy / "main.py").write_text("")
    first = run_cli("install-comfyui", str(comfy))
    assert first.returncode == 0, first.stderr
    link = comfy / "custom_nodes" / "comfy_mesh"
    assert link.is_symlink() and (link / "__init__.py").exists()
    again = run_cli("install-comfyui", str(comfy))
    assert again.returncode == 0 and "already links" in again.stdout
    not_comfy = run_cli("install-comfyui", str(tmp_path / "nothing"))
    assert not_comfy.returncode == 1 and "does not look like a ComfyUI folder" in one_line_error(not_comfy)


def test_timeout_bounds_the_whole_command(mesh: Callable[..., subprocess.CompletedProcess[str]],
                                          served: ServeProcess, tmp_path: Path, secret_file: Path) -> None:
    """`mesh --timeout T` is a deadline for the command, not only for each call: reading a large file to put it
    counts too (before: `mesh --timeout 5 put KEY /dev/zero` ran past 30 s)."""
    r = mesh("put", "z", "/dev/zero")
    assert one_line_error(r) == "mesh: /dev/zero is not a regular file: save what you want to store to a file first"
    assert r.returncode == 2
    huge = tmp_path / "huge.bin"
    with open(huge, "wb") as f:
        f.truncate(3 << 30)  # sparse: costs no disk
    assert "more than the largest value" in one_line_error(mesh("put", "h", str(huge)))
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate((2 << 30) - (64 << 20))  # under the limit: read in full for its checksum first
    started = time.monotonic()
    slow = run_cli("put", "b", str(big), node=served.address, rpc_timeout=0.05, secret_file=secret_file)
    assert one_line_error(slow) == "mesh: the command ran past --timeout 0.05 s"
    assert time.monotonic() - started < 10
    assert mesh("status").returncode == 0  # the node is none the worse


def test_put_is_refused_at_the_node_s_own_size_limit_before_anything_is_sent(
        serve: Callable[..., ServeProcess], secret_file: Path, tmp_path: Path) -> None:
    """`mesh put` knew only this client's limit (2 GiB): a node started with a smaller --max-blob-size was sent
    the file anyway (after a whole read for its checksum) and refused it mid-transfer. The node says its limit
    (StatsReply.max_blob_size) and the command refuses with it, in one line, before a byte of the value moves."""
    small = serve("--max-blob-size", "1MiB")
    src = tmp_path / "two-mib.bin"
    src.write_bytes(os.urandom(2 << 20))
    r = run_mesh(small.address, "put", "too/big", str(src), secret_file=secret_file)
    assert r.returncode == 1
    line = one_line_error(r)
    assert "more than the largest value" in line and small.address in line and "1.0 MiB" in line, line
    fits = tmp_path / "half-mib.bin"
    fits.write_bytes(os.urandom(512 << 10))
    assert run_mesh(small.address, "put", "fits", str(fits), secret_file=secret_file).returncode == 0
    stats = json.loads(run_mesh(small.address, "stats", "--json", secret_file=secret_file).stdout)
    assert stats["counters"]["puts"] == 1  # the one that fits, and nothing of the other reached the node:
    assert stats["counters"]["transfer_errors"] == 0 and stats["counters"]["bytes_in"] < (512 + 64) << 10


@pytest.mark.parametrize("change", ["grows", "shrinks"])
def test_a_file_that_changes_while_it_is_put_is_a_clear_client_error(
        served: ServeProcess, secret_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], change: str) -> None:
    """A put reads the file twice (checksum, then sending): a file written to meanwhile read as the node's
    DATA_LOSS, as if the network or the node had broken bytes. It is the file: said so, nonzero, nothing stored.
    The CLI runs in this process so the file can be changed exactly between the two reads (the node is real)."""
    from mesh import cli
    from mesh.transport import peer
    from mesh.transport.peer import PeerClient
    from tests.conftest import SECRET

    src = tmp_path / "moving.bin"
    src.write_bytes(os.urandom(3 << 20))
    real_file_header = peer.file_header

    def then_change(*args: object, **kwargs: object) -> object:
        header = real_file_header(*args, **kwargs)  # type: ignore[arg-type]
        with open(src, "r+b") as f:  # another program writes the file after the checksum was taken
            if change == "grows":
                f.seek(0, os.SEEK_END)
                f.write(os.urandom(100_000))
            else:
                f.truncate(1 << 20)
        return header

    monkeypatch.setattr(peer, "file_header", then_change)
    code = cli.main(["--node", served.address, "--secret-file", str(secret_file), "put", "moving", str(src),
                     "--json"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err == [f"mesh: {src} changed while it was read: nothing was stored; put it again once it is written"], \
        err
    with PeerClient(served.address, SECRET) as c:
        assert c.get("moving") is None
