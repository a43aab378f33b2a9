"""Node ids unique by default and kept across restarts; a loopback node with seeds on other hosts refused at start
(issue 22, items 4 and 5). The multi-host halves (equal hostnames, a clash, a seed refusing a loopback joiner)
are in tests/test_node_ids_hosts.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from mesh.node import ConfigError, Node, NodeConfig
from mesh.node_id import ID_FILE, default_node_id, host_part
from mesh.transport.wire import MiB
from tests.support.comfy_harness import HarnessProcess
from tests.support.serve import mesh_command


def test_without_a_data_dir_each_start_draws_a_new_id_after_the_hostname() -> None:
    a, where = default_node_id("", hostname="vm-8288")
    b, _ = default_node_id("", hostname="vm-8288")
    assert a != b and a.startswith("vm-8288-") and b.startswith("vm-8288-") and "no --data-dir" in where
    assert host_part("bad host/name\n") == "bad-host-name" and host_part("") == "node"


def test_with_a_data_dir_the_id_is_kept_there(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first, where = default_node_id(str(data), hostname="vm")
    assert (data / ID_FILE).read_text() == first + "\n" and "new, kept in" in where
    assert default_node_id(str(data), hostname="other")[0] == first  # the file, not today's hostname
    other, _ = default_node_id(str(tmp_path / "clone"), hostname="vm")  # a cloned host with an empty data dir
    assert other != first


@pytest.mark.parametrize("content", ["", "   \n", "two words\n", "x" * 300])
def test_a_node_id_file_without_an_id_is_an_error_naming_it(tmp_path: Path, content: str) -> None:
    (tmp_path / ID_FILE).write_text(content)
    with pytest.raises(ValueError, match=f"{tmp_path / ID_FILE}.*--node-id"):
        default_node_id(str(tmp_path))


def test_a_data_dir_that_cannot_hold_the_id_is_an_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="node id .*file/data/node-id: Not a directory.*--node-id"):
        default_node_id(str(blocker / "data"))


def test_a_node_restarted_with_its_data_dir_is_the_same_member(tmp_path: Path) -> None:
    config = NodeConfig(listen="127.0.0.1:0", secret=b"s", data_dir=str(tmp_path / "d"), max_memory=64 * MiB,
                        min_free_ram=0)
    first = Node(config).start()
    try:
        node_id = first.node_id
    finally:
        first.stop(grace=0)
    again = Node(config).start()
    try:
        assert again.node_id == node_id and (tmp_path / "d" / ID_FILE).read_text().strip() == node_id
    finally:
        again.stop(grace=0)
    explicit = Node(NodeConfig(listen="127.0.0.1:0", secret=b"s", node_id="gpu1", data_dir=str(tmp_path / "d"),
                               max_memory=64 * MiB, min_free_ram=0)).start()
    try:
        assert explicit.node_id == "gpu1"  # --node-id stays as given
    finally:
        explicit.stop(grace=0)


@pytest.mark.parametrize("args", [
    ["--listen", "127.0.0.1:0", "--seeds", "10.1.2.3:8288"],
    ["--listen", "127.0.0.1:0", "--seeds", "127.0.0.1:9,dns:mesh.default.svc:8288,10.1.2.4:8288"],
    ["--listen", "0.0.0.0:0", "--advertise", "127.0.0.1:8288", "--seeds", "[2001:db8::5]:8288"],
])
def test_a_loopback_node_with_seeds_on_other_hosts_refuses_to_start(tmp_path: Path, args: list[str]) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    done = subprocess.run([*mesh_command(), "--secret-file", str(secret), "serve", "--min-free-ram", "0", *args],
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if not k.startswith("MESH_")})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "a loopback address" in lines[0] and "MESH_LISTEN 0.0.0.0:PORT" in lines[0] and \
        "--advertise" in lines[0], lines[0]


def test_which_seeds_are_on_other_hosts() -> None:
    """Names are resolved: one that resolves to loopback only is this host; one that does not resolve is not
    counted at start (the membership rule still refuses a loopback member on the LAN)."""
    from mesh.node import _seed_is_remote

    assert _seed_is_remote("10.0.0.5:8288") and _seed_is_remote("[2001:db8::1]:8288")
    assert not _seed_is_remote("127.0.0.1:8288") and not _seed_is_remote("[::1]:8288")
    assert not _seed_is_remote("localhost:8288") and not _seed_is_remote("dns:localhost:8288")
    assert not _seed_is_remote("dns:nohost.invalid:8288") and not _seed_is_remote("nohost.invalid:8288")


def test_loopback_seeds_on_loopback_are_fine() -> None:
    node = Node(NodeConfig(listen="127.0.0.1:0", secret=b"s", seeds=["127.0.0.1:9", "localhost:9", "dns:localhost:9"],
                           max_memory=64 * MiB, min_free_ram=0)).start()
    node.stop(grace=0)
    with pytest.raises(ConfigError, match="10.0.0.5:8288"):
        Node(NodeConfig(listen="127.0.0.1:0", secret=b"s", seeds=["127.0.0.1:9", "10.0.0.5:8288"],
                        max_memory=64 * MiB, min_free_ram=0)).start()


def test_the_embedded_default_with_lan_seeds_is_one_line_in_comfyuis_log_and_prompts_run(tmp_path: Path) -> None:
    """MESH_LISTEN left at its loopback default with MESH_SEEDS of LAN hosts: the provider does not start, says
    what to set, and the prompt runs without the mesh."""
    p = HarnessProcess(["--secret", "s", "--listen", "127.0.0.1:0", "--seeds", "10.9.9.9:8288"],
                       log_path=tmp_path / "p.log")
    try:
        assert p.address is None
        done = p.run(workflow="standard", seed=3)
        assert done["errors"] == [] and done["failed"] == []
        log = (tmp_path / "p.log").read_text()
        assert "comfy-mesh: not started: this node would advertise 127.0.0.1:" in log and "MESH_LISTEN" in log, log
    finally:
        p.kill()
