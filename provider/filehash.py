"""The content identity of a file: xxh3-128 of its bytes, computed once and remembered across restarts.

Why the bytes and not the name: two hosts with `model.safetensors` of different weights compute different
images, and a cache key that names the file would hand one host's image to the other. Why xxh3-128: it hashes
faster than any disk reads (about 20 GB/s per core), so the first identity of a file costs one read of it, and
128 bits make an accidental collision between model files out of reach; it is not a defence against someone who
crafts a file to collide (a host's own model folders are the operator's to trust).

Why remembered by device, inode, size, mtime and ctime: a multi-GB checkpoint must not be read again on every
prompt or every restart. A file whose stamp still matches the remembered one has that identity; any write moves
its ctime (which, unlike mtime, no writer can set back), so the next use hashes it again. The table lives in one small
JSON file (`MESH_IDENTITY_CACHE`), rewritten atomically after each new hash.

Hashing never runs on ComfyUI's prompt thread: `identity()` answers from the table or queues the file for the
one hashing thread and answers None ("not known yet"); a value that depends on a file whose identity is not
known is not shared (see identity.py).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import stat
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash

from mesh.files import write_atomic

log = logging.getLogger("comfy_mesh")

READ_SIZE = 8 << 20   # bytes per read: large enough for disk speed, small enough to stay out of the way
FORMAT = 2            # of the remembered table (2: stamps carry ctime)


@dataclass(frozen=True)
class Stamp:
    """What says a file is still the one that was hashed. ctime is in it because a writer can set mtime back
    (`touch -d`, `cp -p`, `rsync -a`) but not ctime: any write, utime or new inode moves it."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str) -> Stamp:
        st = os.stat(path)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def slot(self) -> str:
        return f"{self.dev}:{self.ino}"


@dataclass
class HashCounters:
    hashed: int = 0           # files read and hashed
    hashed_bytes: int = 0
    hash_seconds: float = 0.0
    remembered: int = 0       # answers from the table (a stamp that still matched)
    failed: int = 0           # files that could not be read
    save_errors: int = 0


def hash_file(path: str) -> str:
    """xxh3-128 of the whole file, read in large blocks into one reused buffer."""
    h = xxhash.xxh3_128()
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


class FileHashes:
    """Identities of files by their bytes: from the remembered table, or hashed on a thread of its own."""

    def __init__(self, table_path: Path | None) -> None:
        self.table_path = table_path
        self.counters = HashCounters()
        self._lock = threading.Lock()
        self._table: dict[str, dict[str, object]] = self._load()   # "dev:ino" -> stamp fields + "xxh3_128"
        self._queued: set[str] = set()
        self._done = threading.Condition(self._lock)
        self._work: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mesh-file-identity", daemon=True)
        self._thread.start()

    # -- asking ------------------------------------------------------------------------------------------------

    def identity(self, path: str, stamp: Stamp | None = None) -> str | None:
        """The file's identity if it is known for its bytes as they are now; None (and hashing queued) if not.

        Raises OSError for a file that cannot be stat'ed (gone, no permission): the caller decides what a
        missing file means."""
        stamp = stamp or Stamp.of(path)
        with self._lock:
            known = self._lookup(stamp)
            if known is not None:
                self.counters.remembered += 1
                return known
            if path not in self._queued:
                self._queued.add(path)
                self._work.put(path)
        return None

    def wait(self, path: str, timeout: float) -> str | None:
        """The identity, hashing it first if needed (for tools and tests; never on ComfyUI's prompt thread)."""
        deadline = time.monotonic() + timeout
        found = self.identity(path)
        with self._lock:
            while found is None:
                known = self._lookup(Stamp.of(path))
                if known is not None:
                    return known
                if path not in self._queued:
                    return None  # hashed and failed, or changed while it was read
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._done.wait(left)
        return found

    def _lookup(self, stamp: Stamp) -> str | None:
        row = self._table.get(stamp.slot())
        if row is None or any(row.get(k) != v for k, v in vars(stamp).items()):
            return None
        value = row.get("xxh3_128")
        return value if isinstance(value, str) else None

    # -- hashing -------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            path = self._work.get()
            if path is None:
                return
            try:
                self._hash_one(path)
            except Exception:  # never let one file stop the thread
                log.exception("comfy-mesh: hashing %s failed", path)
            finally:
                with self._lock:
                    self._queued.discard(path)
                    self._done.notify_all()

    def _hash_one(self, path: str) -> None:
        try:
            before = Stamp.of(path)
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block or never end
                raise OSError(f"{path} is not a regular file")
            with self._lock:
                if self._lookup(before) is not None:
                    return  # hashed meanwhile by an earlier request
            started = time.perf_counter()
            digest = hash_file(path)
            seconds = time.perf_counter() - started
            after = Stamp.of(path)
        except OSError as e:
            self.counters.failed += 1
            log.warning("comfy-mesh: cannot read %s to identify it (%s): values that depend on it are not shared",
                        path, e.strerror or e)
            return
        if after != before:
            log.info("comfy-mesh: %s changed while it was hashed; it is hashed again when next used", path)
            return
        with self._lock:
            self._table[before.slot()] = {**asdict(before), "xxh3_128": digest, "path": path}
            self.counters.hashed += 1
            self.counters.hashed_bytes += before.size
            self.counters.hash_seconds += seconds
            snapshot = dict(self._table)
        log.info("comfy-mesh: identified %s (%.1f MB in %.2f s)", path, before.size / 1e6, seconds)
        self._save(snapshot)

    # -- the remembered table ------------------------------------------------------------------------------------

    def _load(self, quiet: bool = False) -> dict[str, dict[str, object]]:
        if self.table_path is None:
            return {}
        try:
            data = json.loads(self.table_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            if not quiet:
                log.warning("comfy-mesh: cannot read the file identities in %s (%s): files are hashed again",
                            self.table_path, e)
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
            return {}
        return {k: v for k, v in data["files"].items() if isinstance(v, dict)}

    def _save(self, table: dict[str, dict[str, object]]) -> None:
        """Merged with what is on disk under a lock: two ComfyUIs of one user (one per GPU) share the table, and
        neither may drop the other's rows."""
        if self.table_path is None:
            return
        try:
            self.table_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.table_path.with_name(self.table_path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                table = {**self._load(quiet=True), **table}
                write_atomic(self.table_path, json.dumps({"format": FORMAT, "files": table}).encode(), 0o600)
        except OSError as e:
            self.counters.save_errors += 1
            log.warning("comfy-mesh: cannot remember file identities in %s (%s): they are hashed again after a "
                        "restart", self.table_path, e.strerror or e)

    def close(self) -> None:
        self._work.put(None)

    def stats(self) -> dict[str, float]:
        with self._lock:
            out = {f"provider_identity_files_{k}": float(v) for k, v in asdict(self.counters).items()}
            out["provider_identity_files_queued"] = float(len(self._queued))
        return out
