"""The disk tier (mesh/storage/disk.py): crash-safe files, verified reads, LRU within the disk budget, and a `mesh serve`
that comes back from kill -9 with what it had."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from mesh.storage.disk import TMP_SUFFIX, DiskStore, file_name
from mesh.transport.peer import PeerClient
from mesh.storage.store import BlobStore, Entry
from mesh.transport.wire import KiB, Limits, iter_chunks, make_header
from tests.conftest import SECRET, free_port
from tests.support.serve import ServeProcess


def entry(key: str, data: bytes, created: float = 1.0) -> Entry:
    header = make_header(key, data, 64 * KiB)
    chunks = tuple(iter_chunks(data, 64 * KiB))

    return Entry(replace(header, created_unix=created, stored_size=sum(len(c.data) for c in chunks)), chunks)


def value(n: int, seed: int = 0) -> bytes:
    return os.urandom(n // 2) + bytes([seed % 251]) * (n - n // 2)


def test_a_blob_survives_a_new_process(tmp_path: Path) -> None:
    data = value(300 * KiB)
    DiskStore(tmp_path, 10 << 20).put(entry("k", data).header, entry("k", data).chunks)
    again = DiskStore(tmp_path, 10 << 20)  # what a restarted node does at start
    assert "k" in again and len(again) == 1
    header, chunks = again.get("k")  # type: ignore[misc]
    assert header.key == "k" and b"".join(_raw(c) for c in chunks) == data


def _raw(chunk: object) -> bytes:
    import lz4.block

    from mesh.transport.wire import LZ4

    data = bytes(chunk.data)  # type: ignore[attr-defined]
    return lz4.block.decompress(data, uncompressed_size=chunk.raw_size) if chunk.codec == LZ4 else data  # type: ignore[attr-defined]


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_a_torn_or_corrupt_file_is_a_miss_and_is_removed(tmp_path: Path, damage: str) -> None:
    data = value(200 * KiB)
    store = DiskStore(tmp_path, 10 << 20)
    e = entry("k", data)
    store.put(e.header, e.chunks)
    path = tmp_path / file_name("k")
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[:len(blob) - 1000]
    elif damage == "flip":
        blob[len(blob) - 5000] ^= 0xFF
    elif damage == "garbage":
        blob = bytearray(os.urandom(len(blob)))
    else:
        blob = bytearray()
    path.write_bytes(bytes(blob))
    fresh = DiskStore(tmp_path, 10 << 20)
    assert fresh.get("k") is None  # never wrong bytes
    assert not path.exists() and "k" not in fresh


def test_strays_are_removed_and_names_are_checked(tmp_path: Path) -> None:
    data = value(10 * KiB)
    store = DiskStore(tmp_path, 10 << 20)
    e = entry("real", data)
    store.put(e.header, e.chunks)
    (tmp_path / (file_name("x") + ".1234" + TMP_SUFFIX)).write_bytes(b"half a write")
    (tmp_path / file_name("real")).rename(tmp_path / file_name("other"))  # a file under another key's name
    (tmp_path / "notes.txt").write_text("not ours")
    (tmp_path / ("x" + TMP_SUFFIX)).write_text("not ours either")
    fresh = DiskStore(tmp_path, 10 << 20)
    assert len(fresh) == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "x" + TMP_SUFFIX]


def test_a_blob_larger_than_the_disk_budget_is_refused_and_wipes_nothing(tmp_path: Path) -> None:
    """Found in review: one oversized blob evicted every file, then itself, and the put still said stored."""
    store = BlobStore(8 << 20, disk=DiskStore(tmp_path, 1 << 20))
    for i in range(5):
        assert store.put(entry(f"k{i}", os.urandom(100 * KiB)))
    assert store.put(entry("big", os.urandom(2 << 20)))  # kept in RAM, refused by the disk
    assert len(store.disk) == 5 and store.disk.errors == 1  # type: ignore[arg-type,union-attr]


def test_a_read_or_a_put_in_flight_cannot_undo_a_delete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: a disk read, or a put's disk write, running across a delete brought the key back."""
    import threading

    store = BlobStore(2 << 20, disk=DiskStore(tmp_path, 10 << 20))
    e = entry("k", os.urandom(50 * KiB), created=1.0)
    store.put(e)
    for i in range(40):  # push k out of RAM: the next read comes from disk
        store.put(entry(f"f{i}", os.urandom(100 * KiB)))
    assert "k" in store.disk and store.peek("f39") is not None  # type: ignore[operator]
    assert "k" not in store._entries
    reading, go_on = threading.Event(), threading.Event()
    real_get = store.disk.get  # type: ignore[union-attr]

    def slow_get(key: str):  # type: ignore[no-untyped-def]
        found = real_get(key)
        reading.set()
        go_on.wait(5)
        return found

    monkeypatch.setattr(store.disk, "get", slow_get)
    reader = threading.Thread(target=store.get, args=("k",))
    reader.start()
    assert reading.wait(5)
    deleter = threading.Thread(target=store.delete, args=(["k"], True))
    deleter.start()
    go_on.set()
    reader.join(5)
    deleter.join(5)
    assert "k" not in store and store.get("k") is None
    assert not store.put(e)  # a replica copy made before the delete is refused (the tombstone)


def test_disk_budget_is_lru(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 700 * KiB)
    for i in range(5):
        e = entry(f"k{i}", os.urandom(200 * KiB))
        store.put(e.header, e.chunks)
        if i == 2:
            assert store.get("k0") is not None  # touched: k1 is now the oldest
    assert store.used <= 700 * KiB
    assert "k0" in store and "k1" not in store and "k4" in store
    assert len(list(tmp_path.iterdir())) == len(store)


def test_the_store_reads_back_what_ram_evicted_and_deletes_files(tmp_path: Path) -> None:
    store = BlobStore(400 * KiB, disk=DiskStore(tmp_path, 10 << 20))
    values = {f"k{i}": value(150 * KiB, i) for i in range(6)}
    for key, data in values.items():
        assert store.put(entry(key, data))
    assert store.used <= 400 * KiB and len(store) == 6  # RAM holds two; the disk all six
    for key, data in values.items():
        got = store.get(key)
        assert got is not None and b"".join(_raw(c) for c in got.chunks) == data
    assert {h.key for h, _ in store.catalog()} == set(values)
    assert store.delete(["k0", "k5", "nope"]) == 2
    assert not (tmp_path / file_name("k0")).exists() and "k0" not in store and len(store) == 4


def test_conflict_rule_holds_across_ram_and_disk(tmp_path: Path) -> None:
    """A held value is never replaced, and a delete refuses copies of its write, wherever the copy lives."""
    store = BlobStore(200 * KiB, disk=DiskStore(tmp_path, 10 << 20))
    first = replace_id(entry("k", b"first" * 1000, created=20.0), 7)
    early = replace_id(entry("k", b"early" * 1000, created=10.0), 8)
    assert store.put(first)
    for i in range(3):  # push k out of RAM: only the disk holds it
        store.put(entry(f"filler{i}", os.urandom(90 * KiB)))
    assert not store.put(early)  # an earlier claim does not win, on disk either
    fresh = BlobStore(200 * KiB, disk=DiskStore(tmp_path, 10 << 20))
    assert fresh.header("k") == first.header  # write id and provenance survive a restart
    store.delete(["k"], tombstone=True)
    for i in range(3, 6):
        store.put(entry(f"filler{i}", os.urandom(90 * KiB)))
    assert not store.put(first) and store.put(early)


def replace_id(e: Entry, write_id: int) -> Entry:
    return Entry(replace(e.header, write_id=write_id, writers=("n1", "cn-a")), e.chunks)


# -- a real `mesh serve` ----------------------------------------------------------------------------------------

def test_a_killed_node_with_a_data_dir_serves_what_it_had_at_once(serve: Callable[..., ServeProcess],
                                                                 tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir), "--node-id", "solo"]
    node = serve(*args)
    values = {f"d/{i}": value(100 * KiB, i) for i in range(20)}
    with PeerClient(node.address, SECRET) as c:
        for key, data in values.items():
            assert c.put(key, data).stored  # acknowledged: on disk, fsynced
    node.stop(signal.SIGKILL)
    again = serve(*args)
    with PeerClient(again.address, SECRET) as c:
        assert c.stats().counters["disk_entries"] == 20
        for key, data in values.items():
            got = c.get(key)
            assert got is not None and bytes(got.data) == data
        assert sorted(k.key for k in c.list_keys()) == sorted(values)


def test_a_node_without_a_data_dir_comes_back_empty(serve: Callable[..., ServeProcess]) -> None:
    """The default (RAM only), stated as a test: the README says so."""
    port = free_port()
    node = serve("--listen", f"127.0.0.1:{port}")
    with PeerClient(node.address, SECRET) as c:
        c.put("k", b"v")
    node.stop(signal.SIGKILL)
    again = serve("--listen", f"127.0.0.1:{port}")
    with PeerClient(again.address, SECRET) as c:
        assert c.get("k") is None and "disk_entries" not in c.stats().counters


def test_limits_are_used_to_verify(tmp_path: Path) -> None:
    """A file claiming a value larger than the node accepts is refused at read, like on the wire."""
    store = DiskStore(tmp_path, 10 << 20)
    e = entry("big", os.urandom(300 * KiB))
    store.put(e.header, e.chunks)
    small = DiskStore(tmp_path, 10 << 20, Limits(max_blob_size=100 * KiB))
    assert small.get("big") is None


def test_the_disk_lru_follows_reads_served_from_ram(tmp_path: Path) -> None:
    """Found in review: RAM hits never touched the disk's order, so the hottest key was evicted first."""
    store = BlobStore(8 << 20, disk=DiskStore(tmp_path, 700 * KiB))
    for key in ("a", "b", "c"):
        store.put(entry(key, os.urandom(200 * KiB)))
    assert store.get("a") is not None  # a RAM hit
    store.put(entry("d", os.urandom(200 * KiB)))
    assert "a" in store.disk and "b" not in store.disk  # type: ignore[operator]


# -- crash safety of a put, observed ------------------------------------------------------------------------------

def _what_fd_is(fd: int, directory: Path) -> str:
    """Name an fsynced descriptor: the data directory itself, or a regular file (by inode, to match the rename)."""
    import stat

    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        return "dir" if os.path.samestat(st, os.stat(directory)) else f"other dir {st.st_ino}"
    return f"file {st.st_ino}"


def test_a_put_fsyncs_the_file_before_the_rename_and_the_directory_after(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The order is the whole of crash safety, and nothing else observes it: without the file's fsync a crash
    right after the rename can leave the real name on a file whose blocks never reached the disk (a torn or
    empty blob); without the directory's fsync the rename itself may be lost. So the calls are recorded."""
    from mesh.storage import disk

    store = DiskStore(tmp_path, 10 << 20)
    calls: list[str] = []
    real_fsync, real_replace = disk.os.fsync, disk.os.replace

    def fsync(fd: int) -> None:
        calls.append("fsync " + _what_fd_is(fd, tmp_path))
        real_fsync(fd)

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str], **_: object) -> None:
        calls.append(f"rename {os.stat(src).st_ino} -> {Path(dst).name}")
        real_replace(src, dst)  # os.rename and os.replace are the same rename(2) here

    monkeypatch.setattr(disk.os, "fsync", fsync)
    monkeypatch.setattr(disk.os, "replace", rename)
    monkeypatch.setattr(disk.os, "rename", rename)
    e = entry("k", value(200 * KiB))
    assert store.put(e.header, e.chunks)
    monkeypatch.undo()
    inode = (tmp_path / file_name("k")).stat().st_ino  # the file now under the real name
    assert calls == [f"fsync file {inode}", f"rename {inode} -> {file_name('k')}", "fsync dir"], calls
    assert DiskStore(tmp_path, 10 << 20).get("k") is not None


@pytest.mark.parametrize("fails", ["write", "fsync"])
def test_a_failed_put_over_a_key_leaves_the_stored_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                fails: str) -> None:
    """A disk that fills up (or fails to sync) while a key is written again must not cost the copy already on
    disk: written in place, the failed write truncated the good file and its clean-up then unlinked it."""
    import errno

    from mesh.storage import disk

    store = DiskStore(tmp_path, 10 << 20)
    old, new = entry("k", value(300 * KiB, 1), created=1.0), entry("k", value(300 * KiB, 2), created=2.0)
    assert store.put(old.header, old.chunks)
    path = tmp_path / file_name("k")
    good = path.read_bytes()
    real_open = open

    class FullDisk:
        """A file whose writes fail with ENOSPC once 64 KiB went in: a disk that filled up mid-blob."""

        def __init__(self, f: object) -> None:
            self._f, self._written = f, 0

        def write(self, data: bytes | memoryview) -> int:
            if self._written + len(data) > 64 * KiB:
                raise OSError(errno.ENOSPC, "No space left on device")
            self._written += len(data)
            return self._f.write(data)  # type: ignore[attr-defined,no-any-return]

        def __getattr__(self, name: str) -> object:
            return getattr(self._f, name)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self._f.close()  # type: ignore[attr-defined]

    def failing_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        f = real_open(file, mode, *args, **kwargs)  # type: ignore[call-overload]
        return FullDisk(f) if "w" in mode else f

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    if fails == "write":
        monkeypatch.setattr(disk, "open", failing_open, raising=False)
    else:
        monkeypatch.setattr(disk.os, "fsync", failing_fsync)
    assert not store.put(new.header, new.chunks)
    monkeypatch.undo()
    assert store.errors == 1
    assert path.read_bytes() == good  # the old file, whole, under its name
    assert [p.name for p in tmp_path.iterdir()] == [file_name("k")]  # and no temporary left behind
    for reader in (store, DiskStore(tmp_path, 10 << 20)):  # this process, and a restarted node
        got = reader.get("k")
        assert got is not None and got[0] == old.header
        assert b"".join(_raw(c) for c in got[1]) == b"".join(_raw(c) for c in old.chunks)
