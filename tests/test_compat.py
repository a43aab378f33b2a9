"""Mixed versions during a rolling upgrade, against the real older code: the last commit before
CHUNK_LZ4_PLANES4, checked out of this repository's history and run as its own `mesh serve` and client.

That version knows raw and lz4 chunks only: it refuses a 4-byte-plane chunk ("unknown chunk codec 2") and its
readers never say `planes4`. Writers learn the refusal once per peer and send lz4 or raw instead; nodes send older
readers no plane chunks at all.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SECRET
from tests.support.poll import poll
from tests.support.serve import ServeProcess, start_serve
from mesh.transport.link import Links
from mesh.transport.peer import PeerClient, Refused
from mesh.pb import mesh_pb2 as pb
from mesh.transport.wire import LZ4, LZ4_PLANES4, RAW, KiB, MiB, iter_chunks, make_header

ROOT = Path(__file__).resolve().parent.parent
BEFORE_PLANES = "4a5c9bf^"  # the commit that added CHUNK_LZ4_PLANES4, minus one


@pytest.fixture(scope="module")
def older_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mesh/ and proto/ of the older version, its gRPC code generated as its Makefile did."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("needs this repository's git history")
    archive = subprocess.run([git, "-C", str(ROOT), "archive", BEFORE_PLANES, "mesh", "proto"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"the older version is not in this clone's history: {archive.stderr.decode().strip()}")
    tree = tmp_path_factory.mktemp("older")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Imesh/pb=proto", "--python_out=.",
                    "--grpc_python_out=.", "proto/mesh.proto"], cwd=tree, check=True)
    return tree


def older_env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}  # ahead of the installed (current) package


@pytest.fixture
def older_node(older_tree: Path, tmp_path: Path) -> Iterator[ServeProcess]:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    node = start_serve(tmp_path, "older", "--max-memory", "256MiB", secret_file=secret,
                       command=[sys.executable, "-m", "mesh.cli"], cwd=older_tree, env=older_env(older_tree))
    yield node
    node.kill()


def smooth_floats(nbytes: int) -> bytes:
    """float32 whose chunks compress best as 4-byte planes (what the planes codec is for)."""
    x = np.sin(np.arange(nbytes // 4) / 5000.0) * 0.5 + 0.5
    return x.astype(np.float32).tobytes()


def codecs_held(address: str, key: str) -> set[int]:
    with PeerClient(address, SECRET) as reader:
        got = reader.get_chunks(key, local_only=True)
    assert got is not None
    return {c.codec for c in got[1]}


def test_the_older_version_is_what_it_claims(older_tree: Path) -> None:
    assert "CHUNK_LZ4_PLANES4" not in (older_tree / "proto" / "mesh.proto").read_text()


def test_a_writer_learns_that_an_older_node_refuses_plane_chunks(older_node: ServeProcess) -> None:
    data = smooth_floats(4 * MiB)
    assert {c.codec for c in iter_chunks(data, MiB, True)} == {LZ4_PLANES4}  # what a new writer would send
    with PeerClient(older_node.address, SECRET, links=Links("lz4")) as writer:  # compressing, as on a slow link
        writer.put("a", data)  # refused once, then sent again without planes
        assert not writer.links.planes4(older_node.address)
        writer.put("b", data)  # sent without planes at once: the peer is known
        assert bytes(writer.get("a").data) == data == bytes(writer.get("b").data)
        writer.put("tiny", data[:1000])  # PutSmall is unknown there: sent as a Put stream instead, from then on
        assert not writer._put_small and bytes(writer.get("tiny").data) == data[:1000]
    assert codecs_held(older_node.address, "a") | codecs_held(older_node.address, "b") <= {LZ4, RAW}
    assert older_node.log().count("unknown chunk codec 2") <= 1  # the one refusal that taught the writer


def test_stored_plane_chunks_reach_an_older_node_unpacked(older_node: ServeProcess) -> None:
    """A node's copy of a stored entry (replication, repair) to an older owner: the same chunks, without planes."""
    data = smooth_floats(3 * MiB + 12 * KiB)
    chunks = tuple(iter_chunks(data, MiB, True))  # stored as a writer compressed them
    assert LZ4_PLANES4 in {c.codec for c in chunks}
    with PeerClient(older_node.address, SECRET) as peer:
        peer.put_chunks(make_header("copied", data, MiB), chunks)
        assert not peer.links.planes4(older_node.address)
        assert peer.links.rate(older_node.address) == 0.0  # lz4 went: not a measure of the link's raw speed
        assert bytes(peer.get("copied").data) == data
    assert codecs_held(older_node.address, "copied") <= {LZ4, RAW}


def test_a_file_put_to_an_older_node_learns_too(older_node: ServeProcess, tmp_path: Path) -> None:
    """A one-shot stream (a file read as it is sent) is made again without planes after the refusal."""
    path = tmp_path / "floats.bin"
    data = smooth_floats(4 * MiB)
    path.write_bytes(data)
    with PeerClient(older_node.address, SECRET, links=Links("lz4")) as writer:
        writer.put_file("file", path)
        assert not writer.links.planes4(older_node.address)
        writer.put_file("file2", path)
        assert bytes(writer.get("file").data) == data == bytes(writer.get("file2").data)
    assert codecs_held(older_node.address, "file") | codecs_held(older_node.address, "file2") <= {LZ4, RAW}


# Run in the older tree, so with its module paths (mesh/ was one flat package then).
OLDER_READER = """
import hashlib, json, sys
from mesh.peer import PeerClient
with PeerClient(sys.argv[1], sys.argv[2].encode()) as reader:
    header, chunks = reader.get_chunks("k", local_only=False)
    blob = reader.get("k")
print(json.dumps({"codecs": sorted({c.codec for c in chunks}), "sha256": hashlib.sha256(blob.data).hexdigest()}))
"""


def test_an_older_reader_is_sent_no_plane_chunks(older_tree: Path, serve: Callable[..., ServeProcess]) -> None:
    import hashlib

    node = serve()
    data = smooth_floats(4 * MiB)
    with PeerClient(node.address, SECRET, links=Links("lz4")) as writer:
        writer.put("k", data)  # stored as sent: 4-byte planes
    assert codecs_held(node.address, "k") == {LZ4_PLANES4}
    read = subprocess.run([sys.executable, "-c", OLDER_READER, node.address, SECRET.decode()], cwd=older_tree,
                          env=older_env(older_tree), capture_output=True, text=True, timeout=60)
    assert read.returncode == 0, read.stderr
    got = json.loads(read.stdout)
    assert set(got["codecs"]) <= {LZ4, RAW} and got["sha256"] == hashlib.sha256(data).hexdigest()


def test_other_refusals_are_not_taken_for_an_older_version(serve: Callable[..., ServeProcess]) -> None:
    node = serve("--max-blob-size", "1MiB")
    with PeerClient(node.address, SECRET, links=Links("lz4")) as writer:
        with pytest.raises(Refused):
            writer.put("big", smooth_floats(2 * MiB))
        assert writer.links.planes4(node.address)


def test_a_mixed_mesh_replicates_to_the_older_member(older_node: ServeProcess,
                                                     serve: Callable[..., ServeProcess]) -> None:
    """The rolling-upgrade case end to end: a new member that stores values compressed (--compress lz4) forms a
    mesh with an older one; its replica writes reach the older member as lz4 or raw chunks, bit-exact."""
    new = serve("--seeds", older_node.address, "--compress", "lz4", "--replicas", "2")

    def members(address: str) -> int:
        with PeerClient(address, SECRET) as c:
            return len([m for m in c.stats(timeout=5).members if m.state == pb.ALIVE])

    poll(lambda: members(new.address) == 2 and members(older_node.address) == 2, "the two versions see each other")
    data = smooth_floats(4 * MiB)
    with PeerClient(new.address, SECRET, links=Links("lz4")) as client:  # a writer behind a slow link
        client.put("replicated", data)
    assert codecs_held(new.address, "replicated") == {LZ4_PLANES4}  # stored as this version packs

    def held_by_older() -> bool:
        with PeerClient(older_node.address, SECRET) as c:
            return c.get_chunks("replicated", local_only=True) is not None

    poll(held_by_older, "the replica on the older member")
    assert codecs_held(older_node.address, "replicated") <= {LZ4, RAW}
    with PeerClient(older_node.address, SECRET) as reader:
        assert bytes(reader.get("replicated", local_only=True).data) == data


def test_repair_asks_an_older_member_what_it_holds(older_node: ServeProcess) -> None:
    """A node from before write ids answers Has versions with checksums only: repair reads that as "holds the
    key" or "lacks it" (so it fills what the older member lacks), not as a refusal that stops repair with it."""
    with PeerClient(older_node.address, SECRET) as c:
        c.put("held", b"v" * 100)
        assert c.versions(["held", "absent"], [7, 8]) == [(1, False), (0, False)]
