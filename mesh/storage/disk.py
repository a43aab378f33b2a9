"""The disk tier: blobs written crash-safely under a byte budget, so a restarted node serves what it had.

Why write-through and synchronous: with a data directory, a put that a node acknowledged is on its disk (the
file was fsynced and renamed into place before the node answered), so `--write-acks 1` survives a kill -9 of
that node. RAM (mesh/storage/store.py) keeps the hot set; a RAM miss reads the file back.

Why one file per blob, named by the SHA-256 of the key: keys are anyone's text and never touch the file
system; a file is written to a temporary name, fsynced, renamed over, and the directory fsynced, so a crash
leaves either the old file, the new one or a stray temporary (removed at start), never a torn blob under a
real name. A file is still verified when it is read (lz4 framing and the xxh3 checksum of the raw bytes, as
on the wire): a torn or corrupt file is a miss, and is removed, never wrong bytes.

File layout: b"CMB-DISK1", the length (u32) and bytes of the BlobHeader protobuf, then per chunk its codec
(u8), raw size (u32), stored size (u32) and the stored bytes (lz4 or raw, as received). The header is the
protobuf, so a field added to BlobHeader (compute_seconds) is kept on disk with no new format, and a file written
before it reads back with the field unset (a value of unknown cost: mesh/storage/eviction.py).

Which file goes when the budget is short is the node's eviction policy (`--eviction`), as in RAM.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mesh.pb import mesh_pb2 as pb
from mesh.storage.eviction import DEFAULT_POLICY, make_policy
from mesh.transport.wire import Header, Limits, Receiver, StoredChunk, TransferError, WireChunk

log = logging.getLogger(__name__)

MAGIC = b"CMB-DISK1"
_LEN = struct.Struct("<I")
_CHUNK = struct.Struct("<BII")
SUFFIX = ".blob"
TMP_SUFFIX = ".tmp"
WARN_FOR = 600.0  # seconds a failed disk write shows in `mesh status`
_OURS = re.compile(r"^[0-9a-f]{64}\.blob(\.\d+\.tmp)?$")


@dataclass(frozen=True)
class DiskItem:
    header: Header
    path: Path
    size: int           # bytes of the file: what the disk budget counts
    stored_at: float    # unix time the file was written


def file_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest() + SUFFIX


class DiskCorrupt(Exception):
    """A file that is not a whole, valid blob: removed and treated as a miss."""


def encode_file(header: Header, chunks: tuple[StoredChunk, ...]) -> list[bytes | memoryview]:
    head = header.to_pb().SerializeToString()
    parts: list[bytes | memoryview] = [MAGIC, _LEN.pack(len(head)), head]
    for c in chunks:
        parts.append(_CHUNK.pack(c.codec, c.raw_size, len(c.data)))
        parts.append(c.data)
    return parts


def read_header(data: bytes | memoryview) -> tuple[Header, int]:
    """The header of a blob file, and the offset where its chunks start."""
    if len(data) < len(MAGIC) + _LEN.size or bytes(data[:len(MAGIC)]) != MAGIC:
        raise DiskCorrupt("not a blob file")
    (n,) = _LEN.unpack_from(data, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if start + n > len(data):
        raise DiskCorrupt("truncated header")
    try:
        header = Header.from_pb(pb.BlobHeader.FromString(bytes(data[start:start + n])))
    except Exception as e:  # protobuf's DecodeError and friends
        raise DiskCorrupt(f"unreadable header: {e}") from None
    return header, start + n


def decode_file(data: bytes, limits: Limits) -> tuple[Header, tuple[StoredChunk, ...]]:
    """Header and verified chunks of a whole file; DiskCorrupt if anything does not add up."""
    header, pos = read_header(data)
    view = memoryview(data)
    try:
        receiver = Receiver(header, limits)
        for index in range(header.chunk_count):
            if pos + _CHUNK.size > len(data):
                raise DiskCorrupt(f"truncated at chunk {index}")
            codec, raw_size, size = _CHUNK.unpack_from(data, pos)
            pos += _CHUNK.size
            if pos + size > len(data):
                raise DiskCorrupt(f"truncated in chunk {index}")
            receiver.add(WireChunk(index, codec, raw_size, view[pos:pos + size]))
            pos += size
        if pos != len(data):
            raise DiskCorrupt("trailing bytes")
        receiver.finish()
    except TransferError as e:
        raise DiskCorrupt(str(e)) from None
    return header, tuple(receiver.chunks)


def probe_directory(directory: Path, create: bool = True) -> None:
    """Create `directory` if needed and write, fsync and remove a file in it: OSError (Permission denied, a
    read-only file system, not a directory) if blobs could not be kept there. A directory that exists is not
    enough: one owned by another user would take no file, and every put would fall back to RAM.
    `create=False` (`mesh config`, which changes nothing): a missing directory is probed in its nearest existing
    parent, where the node would create it."""
    if not create and not directory.exists():
        parent = next(p for p in directory.parents if p.exists())
        if not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(parent))
        directory = parent
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".probe.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}"
    try:
        with open(probe, "wb") as f:
            f.write(b"comfy-mesh")
            f.flush()
            os.fsync(f.fileno())
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


class DiskStore:
    """Blob files under `directory` within `max_disk` bytes, evicted by `eviction` (mesh/storage/eviction.py).
    Thread-safe; file IO happens outside the lock."""

    def __init__(self, directory: Path, max_disk: int, limits: Limits | None = None,
                 eviction: str = DEFAULT_POLICY) -> None:
        if max_disk <= 0:
            raise ValueError("max_disk must be positive")
        self.directory = Path(directory)
        self.max_disk = max_disk
        self.limits = limits or Limits()
        self._lock = threading.Lock()
        self._index: OrderedDict[str, DiskItem] = OrderedDict()  # least recently used first
        self._policy = make_policy(eviction)
        self._used = 0
        self.errors = 0
        self._last_error: tuple[float, str] | None = None  # (monotonic time, what failed): for `mesh status`
        self.corrupt = 0
        self.evictions = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        self._scan()

    # -- start-up ------------------------------------------------------------------------------------------

    def _scan(self) -> None:
        """Index what a previous life left: every whole blob file, oldest first; strays are removed."""
        found: list[DiskItem] = []
        for path in self.directory.iterdir():
            if _OURS.match(path.name) and path.name.endswith(TMP_SUFFIX):
                path.unlink(missing_ok=True)  # a write a crash interrupted
                continue
            if not _OURS.match(path.name) or not path.name.endswith(SUFFIX):
                continue  # not a file of ours: left alone
            try:
                with open(path, "rb") as f:
                    head = f.read(64 * 1024)
                header, _ = read_header(head)
                if path.name != file_name(header.key):
                    raise DiskCorrupt("file name does not match its key")
                st = path.stat()
            except (OSError, DiskCorrupt) as e:
                log.warning("removing unreadable blob file %s: %s", path.name, e)
                self.corrupt += 1
                path.unlink(missing_ok=True)
                continue
            found.append(DiskItem(header, path, st.st_size, st.st_mtime))
        for item in sorted(found, key=lambda i: i.stored_at):
            self._index[item.header.key] = item
            self._policy.add(item.header.key, item.size, item.header.compute_seconds)
            self._used += item.size
        self._evict()
        if found:
            log.info("disk tier: %d blobs (%d bytes) from %s", len(self._index), self._used, self.directory)

    # -- reads ---------------------------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def used(self) -> int:
        return self._used

    def keys(self) -> set[str]:
        """A snapshot of the keys on disk."""
        with self._lock:
            return set(self._index)

    def header(self, key: str) -> Header | None:
        item = self._index.get(key)
        return item.header if item else None

    def catalog(self) -> list[DiskItem]:
        with self._lock:
            return list(self._index.values())

    def get(self, key: str) -> tuple[Header, tuple[StoredChunk, ...]] | None:
        """The verified blob, or None: absent, or torn or corrupt (then the file is removed)."""
        with self._lock:
            item = self._index.get(key)
            if item is None:
                return None
            self._index.move_to_end(key)
            self._policy.touch(key)
        try:
            data = item.path.read_bytes()
            header, chunks = decode_file(data, self.limits)
            if header.key != key:
                raise DiskCorrupt("the file holds another key")
        except (OSError, DiskCorrupt) as e:
            log.warning("disk tier: dropping %s: %s", item.path.name, e)
            self.corrupt += 1
            self._remove(key, item)
            return None
        return header, chunks

    # -- writes --------------------------------------------------------------------------------------------

    def put(self, header: Header, chunks: tuple[StoredChunk, ...]) -> bool:
        """Write a blob crash-safely; False if it could not be written (counted, logged: RAM still has it)."""
        size = sum(len(c.data) + _CHUNK.size for c in chunks) + 1024
        if size > self.max_disk:  # it would evict everything, then itself
            self._failed(f"a value of {size} bytes does not fit --max-disk ({self.max_disk} bytes)")
            log.warning("disk tier: %s does not fit the disk budget of %d bytes; kept in RAM only",
                        file_name(header.key), self.max_disk)
            return False
        path = self.directory / file_name(header.key)
        tmp = path.with_name(f"{path.name}.{threading.get_ident()}{TMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                for part in encode_file(header, chunks):
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            with self._lock:
                os.replace(tmp, path)
                old = self._index.pop(header.key, None)
                if old is not None:
                    self._used -= old.size
                    self._policy.remove(header.key)
                self._index[header.key] = DiskItem(header, path, size, time.time())
                self._policy.add(header.key, size, header.compute_seconds)
                self._used += size
                self._evict()
            _fsync_dir(self.directory)
            return True
        except OSError as e:
            self._failed(f"cannot write in {self.directory}: {e.strerror or e}")
            log.warning("disk tier: cannot write %s: %s", path.name, e)
            tmp.unlink(missing_ok=True)
            return False

    def _failed(self, why: str) -> None:
        self.errors += 1
        self._last_error = (time.monotonic(), why)

    def warnings(self) -> list[str]:
        """A write that failed lately, for `mesh status`: the value lives in RAM only, and a restart loses it."""
        if self._last_error is None or time.monotonic() - self._last_error[0] > WARN_FOR:
            return []
        n = self.errors
        return [f"disk tier: {n} value{'s' if n != 1 else ''} not written to disk since start (the last "
                f"{time.monotonic() - self._last_error[0]:.0f} s ago: {self._last_error[1]}); such values are "
                f"in RAM only and a restart loses them"]

    def touch(self, key: str) -> None:
        """`key` was just used: the last to be evicted."""
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
                self._policy.touch(key)

    def delete(self, key: str) -> bool:
        with self._lock:
            item = self._index.get(key)
        if item is None:
            return False
        self._remove(key, item)
        return True

    def _remove(self, key: str, item: DiskItem) -> None:
        with self._lock:
            if self._index.get(key) is item:
                del self._index[key]
                self._policy.remove(key)
                self._used -= item.size
                item.path.unlink(missing_ok=True)

    def _evict(self) -> None:
        """Under the lock: drop files in the policy's order until the budget holds."""
        while self._used > self.max_disk and self._index:
            key = self._policy.victim()
            if key is None or key not in self._index:  # cannot happen: both always hold the same keys
                key = next(iter(self._index))
                self._policy.remove(key)
            item = self._index.pop(key)
            self._used -= item.size
            self.evictions += 1
            item.path.unlink(missing_ok=True)

    def stats(self) -> dict[str, float]:
        return {"disk_entries": len(self._index), "disk_bytes_used": self._used, "max_disk": self.max_disk,
                "disk_errors": self.errors, "disk_corrupt": self.corrupt, "disk_evictions": self.evictions}

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._index))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
