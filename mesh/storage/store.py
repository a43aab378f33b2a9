"""The node's local blob store: verified blobs under a byte budget, LRU eviction, RAM-pressure eviction.

Blobs are kept as the chunks they arrived in (compressed where that paid), so a Get streams them out with no
recompression, and the budget counts what is really held. Besides the budget, the store keeps at least
`min_free_ram` of the machine's memory available (as ComfyUI's RAM_PRESSURE cache does): the node shares the
host with ComfyUI, whose models matter more than our cache.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psutil

from mesh.storage.disk import DiskStore
from mesh.transport.wire import Header, StoredChunk, meta_size

ENTRY_OVERHEAD = 512  # bytes of bookkeeping charged per blob, so many tiny blobs cannot exceed the budget
CHUNK_OVERHEAD = 64
TOMBSTONE_TTL = 120.0  # seconds a deleted key refuses copies made before the delete (> any write deadline)
MAX_TOMBSTONES = 100_000


def precedes(a: Header, b: Header) -> bool:
    """The conflict rule: of two values stored under one key, the first written wins.

    "First" is the earlier `created_unix` (set by the node that first stored the value), ties broken by the
    lower checksum, so every replica picks the same value whatever order the copies arrive in.
    """
    return (a.created_unix, a.checksum) < (b.created_unix, b.checksum)


class StoreFull(Exception):
    """A blob that can never fit (larger than the whole budget); refused rather than half-stored."""


@dataclass(frozen=True, slots=True)
class Entry:
    header: Header
    chunks: tuple[StoredChunk, ...]
    stored_at: float = field(default_factory=time.time)

    @property
    def size(self) -> int:
        h = self.header
        return (ENTRY_OVERHEAD + len(h.key) + meta_size(h.meta)
                + sum(len(c.data) + CHUNK_OVERHEAD for c in self.chunks))


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    puts: int = 0
    duplicate_puts: int = 0
    evictions: int = 0
    pressure_evictions: int = 0
    deletes: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    refused: int = 0
    conflicts_resolved: int = 0
    tombstoned: int = 0


def available_ram() -> int:
    return psutil.virtual_memory().available


class BlobStore:
    """Thread-safe LRU of verified blobs. All bookkeeping happens under one lock; data is never copied."""

    def __init__(self, max_memory: int, min_free_ram: int = 0,
                 ram_probe: Callable[[], int] = available_ram, disk: DiskStore | None = None) -> None:
        if max_memory <= 0:
            raise ValueError("max_memory must be positive")
        self.max_memory = max_memory
        self.disk = disk  # with one, every put is on disk before it returns, and a RAM miss reads it back
        self._key_locks = [threading.Lock() for _ in range(64)]  # one put of a key at a time (RAM and disk agree)
        self.min_free_ram = min_free_ram
        self._probe = ram_probe
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[Entry, int]] = OrderedDict()
        self._tombstones: OrderedDict[str, float] = OrderedDict()  # key -> unix time of the delete
        self._used = 0
        self.counters = Counters()

    def __len__(self) -> int:
        """Keys held: on disk (every put is written through), plus any whose disk write failed."""
        if self.disk is None:
            return len(self._entries)
        disk = self.disk
        return len(disk) + sum(1 for k in list(self._entries) if k not in disk)

    @property
    def used(self) -> int:
        return self._used

    def __contains__(self, key: str) -> bool:
        return key in self._entries or (self.disk is not None and key in self.disk)

    def get(self, key: str) -> Entry | None:
        with self._lock:
            item = self._entries.get(key)
            if item is not None:
                self._entries.move_to_end(key)
                self.counters.hits += 1
                self.counters.bytes_out += item[1]
        if item is not None:
            if self.disk is not None:
                self.disk.touch(key)  # the disk's LRU follows use, not only RAM misses
            return item[0]
        entry = self._from_disk(key)
        with self._lock:
            if entry is None:
                self.counters.misses += 1
            else:
                self.counters.hits += 1
                self.counters.bytes_out += entry.size
        return entry

    def _from_disk(self, key: str) -> Entry | None:
        """A blob only the disk tier holds, read back (verified) and kept in RAM as the hot set."""
        if self.disk is None or key not in self.disk:
            return None
        with self._key_locks[hash(key) % len(self._key_locks)]:  # no put or delete of the key meanwhile
            found = self.disk.get(key)
            if found is None or self.disk.header(key) != found[0]:
                return None
            entry = Entry(*found)
            with self._lock:
                if self._deleted_after(entry.header):
                    return None
                if entry.size <= self.max_memory and key not in self._entries:
                    self._insert(entry, entry.size)
        return entry

    def peek(self, key: str) -> Entry | None:
        """Read without counting a hit (hand-off, repair); reads the disk tier if RAM does not hold it."""
        item = self._entries.get(key)
        return item[0] if item else self._from_disk(key)

    def header(self, key: str) -> Header | None:
        """The stored version of `key` (cheap: never reads a blob)."""
        item = self._entries.get(key)
        if item is not None:
            return item[0].header
        return self.disk.header(key) if self.disk is not None else None

    def catalog(self) -> list[tuple[Header, float]]:
        """(header, stored_at) of every key held, in RAM or on disk, least recently used first."""
        with self._lock:
            ram = {k: (e.header, e.stored_at) for k, (e, _) in self._entries.items()}
        if self.disk is None:
            return list(ram.values())
        out = [(i.header, i.stored_at) for i in self.disk.catalog() if i.header.key not in ram]
        return out + list(ram.values())

    def would_take(self, header: Header) -> bool:
        """Whether a put of this header could change the store (a cheap check before receiving the chunks)."""
        with self._lock:
            if self._deleted_after(header):
                return False
        held = self.header(header.key)
        return held is None or (held.checksum != header.checksum and precedes(header, held))

    def deleted_at(self, key: str) -> float:
        """When `key` was deleted here, if its tombstone is still alive; else 0."""
        with self._lock:
            at = self._tombstones.get(key, 0.0)
        return at if at and time.time() - at <= TOMBSTONE_TTL else 0.0

    def deleted_since(self, header: Header) -> bool:
        """Whether this copy was made before a delete of its key that this node still remembers."""
        with self._lock:
            return self._deleted_after(header)

    def _deleted_after(self, header: Header) -> bool:
        deleted_at = self._tombstones.get(header.key)
        if deleted_at is None:
            return False
        if time.time() - deleted_at > TOMBSTONE_TTL:
            del self._tombstones[header.key]
            return False
        return bool(header.created_unix) and header.created_unix <= deleted_at

    def put(self, entry: Entry) -> bool:
        """Store a verified blob; False if nothing changed.

        A key holds one value: a second put of it is a no-op unless it carries a different value that wins by
        `precedes` (concurrent puts of one key converge on every replica). A copy made before the key was
        deleted is refused for TOMBSTONE_TTL, so an in-flight replica write cannot undo a delete.
        """
        size = entry.size
        if size > self.max_memory:
            with self._lock:
                self.counters.refused += 1
            raise StoreFull(f"blob of {size} bytes exceeds the store budget of {self.max_memory} bytes")
        key = entry.header.key
        with self._key_locks[hash(key) % len(self._key_locks)]:
            with self._lock:
                if self._deleted_after(entry.header):
                    self.counters.tombstoned += 1
                    return False
            held = self.header(key)
            if held is not None and (held.checksum == entry.header.checksum or not precedes(entry.header, held)):
                with self._lock:
                    if key in self._entries:
                        self._entries.move_to_end(key)
                    self.counters.duplicate_puts += 1
                return False
            if self.disk is not None:
                self.disk.put(entry.header, entry.chunks)  # on disk before the put returns
            with self._lock:
                old = self._entries.pop(key, None)
                if old is not None:
                    self._used -= old[1]
                if held is not None:
                    self.counters.conflicts_resolved += 1
                self._insert(entry, size)
                self.counters.puts += 1
                self.counters.bytes_in += size
        self.relieve_pressure()
        return True

    def _insert(self, entry: Entry, size: int) -> None:
        """Under the lock: make room (LRU) and keep the entry in RAM."""
        while self._used + size > self.max_memory and self._entries:
            self._evict_oldest()
        self._entries[entry.header.key] = (entry, size)
        self._used += size

    def delete(self, keys: list[str], tombstone: bool = False) -> int:
        """Drop keys; with `tombstone`, also refuse copies of them made before now, for TOMBSTONE_TTL."""
        now = time.time()
        on_disk: set[str] = set()
        locks = sorted({hash(k) % len(self._key_locks) for k in keys})
        for i in locks:  # in order, so two deletes never deadlock; a put of a key in flight finishes first
            self._key_locks[i].acquire()
        try:
            return self._delete(keys, tombstone, now, on_disk)
        finally:
            for i in locks:
                self._key_locks[i].release()

    def _delete(self, keys: list[str], tombstone: bool, now: float, on_disk: set[str]) -> int:
        deleted = 0
        on_disk |= {k for k in keys if self.disk is not None and self.disk.delete(k)}
        with self._lock:
            for key in keys:
                item = self._entries.pop(key, None)
                if item is not None:
                    self._used -= item[1]
                if item is not None or key in on_disk:
                    deleted += 1
                    on_disk.discard(key)
                if tombstone:
                    self._tombstones.pop(key, None)
                    self._tombstones[key] = now
            while len(self._tombstones) > MAX_TOMBSTONES or (
                    self._tombstones and now - next(iter(self._tombstones.values())) > TOMBSTONE_TTL):
                self._tombstones.popitem(last=False)
            self.counters.deletes += deleted
        return deleted

    def relieve_pressure(self) -> int:
        """Evict LRU blobs until the bytes freed cover the shortfall of available RAM. Returns evictions.

        The shortfall is measured once rather than re-probed per eviction: a blob still being streamed to a
        reader is not freed at once, and re-probing would then empty the whole store.
        """
        if self.min_free_ram <= 0:
            return 0
        deficit = self.min_free_ram - self._probe()
        evicted = 0
        with self._lock:
            while deficit > 0 and self._entries:
                deficit -= self._evict_oldest()
                self.counters.pressure_evictions += 1
                evicted += 1
        return evicted

    def _evict_oldest(self) -> int:
        _, (_, size) = self._entries.popitem(last=False)
        self._used -= size
        self.counters.evictions += 1
        return size

    def items(self, prefix: str = "", limit: int = 0) -> Iterator[Entry]:
        """A snapshot of entries, least recently used first."""
        with self._lock:
            entries = [e for e, _ in self._entries.values() if e.header.key.startswith(prefix)]
        return iter(entries[:limit] if limit else entries)

    def stats(self) -> dict[str, float]:
        with self._lock:
            out: dict[str, float] = dict(vars(self.counters))
            out.update(entries=len(self._entries), bytes_used=self._used, max_memory=self.max_memory,
                       min_free_ram=self.min_free_ram)
        if self.disk is not None:
            out.update(self.disk.stats())
        return out
