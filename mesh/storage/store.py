"""The node's local blob store: verified blobs under a byte budget, cost-aware eviction, RAM-pressure eviction.

What a full store drops is decided by mesh/storage/eviction.py: by default the value that saves the fewest
compute seconds per byte (`--eviction cost`), or the least recently used (`--eviction lru`). Every hit adds the
value's compute seconds (BlobHeader.compute_seconds, measured by its writer) to `compute_seconds_saved`, in
total and per ComfyUI class type (`class.<type>.seconds_saved` beside `class.<type>.hits` and `.bytes_out`).

The conflict rule, one for puts and deletes, with no clock in it (a skewed node, or a member that claims any
time it likes, must not be able to win a conflict or undo a delete):

- A stored value is never replaced. A put of a key held here is a no-op, whoever sends it and whatever it claims.
  Values of one key are interchangeable for a cache (the key names the computation), so two owners that took
  different values in a race may keep them; repair copies a key only to an owner that lacks it.
- Every value carries a `write_id`, random, given once by the node that took the write. A delete tombstones the
  write ids it removed here (for TOMBSTONE_TTL on this host's monotonic clock), so a copy of a deleted value (an
  in-flight replica write, a co-owner that missed the delete) is refused and dropped, while a new put of the
  key (a new write id) is taken at once. A node that held nothing when the delete came keeps no tombstone; a
  late copy it takes is dropped by its next repair pass with an owner that did (repair asks by write id).

Blobs are kept as the chunks they arrived in (compressed where that paid), so a Get streams them out with no
recompression, and the budget counts what is really held. Besides the budget, the store keeps at least
`min_free_ram` of the machine's memory available (as ComfyUI's RAM_PRESSURE cache does): the node shares the
host with ComfyUI, whose models matter more than our cache.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psutil

from mesh.storage.disk import DiskStore
from mesh.storage.eviction import DEFAULT_POLICY, make_policy
from mesh.transport.wire import Header, StoredChunk, meta_size

ENTRY_OVERHEAD = 512  # bytes of bookkeeping charged per blob, so many tiny blobs cannot exceed the budget
CHUNK_OVERHEAD = 64
TOMBSTONE_TTL = 600.0  # seconds (this host's monotonic clock) a delete refuses copies of what it removed
MAX_TOMBSTONES = 100_000
MAX_CLASS_TYPES = 256  # class types counted apart in the stats; the rest are summed under "(other)"


def fresh_write_id() -> int:
    """A write id: random, so no writer can pick one that wins or that collides with a tombstone on purpose."""
    return int.from_bytes(os.urandom(8), "little") or 1


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
        return (ENTRY_OVERHEAD + len(h.key) + meta_size(h.meta) + sum(len(w) for w in h.writers)
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
    conflicts_kept: int = 0    # puts of a different value for a key held here: the held one stays
    tombstoned: int = 0       # copies refused because their write was deleted here
    compute_seconds_saved: float = 0.0  # sum of the compute seconds of the values served (hits)


def available_ram() -> int:
    return psutil.virtual_memory().available


class BlobStore:
    """Thread-safe store of verified blobs. All bookkeeping happens under one lock; data is never copied."""

    def __init__(self, max_memory: int, min_free_ram: int = 0,
                 ram_probe: Callable[[], int] = available_ram, disk: DiskStore | None = None,
                 eviction: str = DEFAULT_POLICY) -> None:
        if max_memory <= 0:
            raise ValueError("max_memory must be positive")
        self.max_memory = max_memory
        self.disk = disk  # with one, every put is on disk before it returns, and a RAM miss reads it back
        self._key_locks = [threading.Lock() for _ in range(64)]  # one put of a key at a time (RAM and disk agree)
        self.min_free_ram = min_free_ram
        self._probe = ram_probe
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[Entry, int]] = OrderedDict()
        # key -> (write ids deleted, monotonic time of the last delete), oldest first
        self._tombstones: OrderedDict[str, tuple[frozenset[int], float]] = OrderedDict()
        self._used = 0
        self.eviction = eviction
        self._policy = make_policy(eviction)  # which RAM entry goes first when the budget is short
        self._by_class: dict[str, list[float]] = {}  # class type -> [hits, bytes out, compute seconds saved]
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
                self._policy.touch(key)
                self._count_hit(item[0].header, item[1])
        if item is not None:
            if self.disk is not None:
                self.disk.touch(key)  # the disk's LRU follows use, not only RAM misses
            return item[0]
        entry = self._from_disk(key)
        with self._lock:
            if entry is None:
                self.counters.misses += 1
            else:
                self._count_hit(entry.header, entry.size)
        return entry

    def _count_hit(self, header: Header, size: int) -> None:
        """Under the lock: a value served, and the compute it saved the reader."""
        self.counters.hits += 1
        self.counters.bytes_out += size
        self.counters.compute_seconds_saved += header.compute_seconds
        class_type = header.meta.get("class_type", "")
        if not class_type:
            return
        row = self._by_class.get(class_type)
        if row is None:
            if len(self._by_class) >= MAX_CLASS_TYPES:
                class_type = "(other)"
                row = self._by_class.get(class_type)
            if row is None:
                row = self._by_class[class_type] = [0.0, 0.0, 0.0]
        row[0] += 1
        row[1] += size
        row[2] += header.compute_seconds

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
                if self._deleted(entry.header):
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
            if self._deleted(header):
                return False
        return self.header(header.key) is None

    def deleted(self, header: Header) -> bool:
        """Whether this copy's write was deleted here (within TOMBSTONE_TTL): it must be neither kept nor served."""
        with self._lock:
            return self._deleted(header)

    def _deleted(self, header: Header) -> bool:
        held = self._tombstones.get(header.key)
        if held is None:
            return False
        if time.monotonic() - held[1] > TOMBSTONE_TTL:
            del self._tombstones[header.key]
            return False
        return header.write_id in held[0]

    def put(self, entry: Entry) -> bool:
        """Store a verified blob; False if nothing changed (the key is held, or this write was deleted here)."""
        size = entry.size
        if size > self.max_memory:
            with self._lock:
                self.counters.refused += 1
            raise StoreFull(f"blob of {size} bytes exceeds the store budget of {self.max_memory} bytes")
        key = entry.header.key
        with self._key_locks[hash(key) % len(self._key_locks)]:
            with self._lock:
                if self._deleted(entry.header):
                    self.counters.tombstoned += 1
                    return False
            held = self.header(key)
            if held is not None:
                with self._lock:
                    if key in self._entries:
                        self._entries.move_to_end(key)
                        self._policy.touch(key)  # computed again elsewhere: asked for
                    if held.write_id == entry.header.write_id:
                        self.counters.duplicate_puts += 1
                    else:
                        self.counters.conflicts_kept += 1
                return False
            if self.disk is not None:
                self.disk.put(entry.header, entry.chunks)  # on disk before the put returns
            with self._lock:
                old = self._entries.pop(key, None)
                if old is not None:
                    self._used -= old[1]
                    self._policy.remove(key)
                self._insert(entry, size)
                self.counters.puts += 1
                self.counters.bytes_in += size
        self.relieve_pressure()
        return True

    def _insert(self, entry: Entry, size: int) -> None:
        """Under the lock: make room (the eviction policy) and keep the entry in RAM."""
        while self._used + size > self.max_memory and self._entries:
            self._evict_one()
        self._entries[entry.header.key] = (entry, size)
        self._policy.add(entry.header.key, size, entry.header.compute_seconds)
        self._used += size

    def delete(self, keys: list[str], tombstone: bool = False) -> int:
        """Drop keys; with `tombstone`, also refuse copies of the values dropped, for TOMBSTONE_TTL."""
        locks = sorted({hash(k) % len(self._key_locks) for k in keys})
        for i in locks:  # in order, so two deletes never deadlock; a put of a key in flight finishes first
            self._key_locks[i].acquire()
        try:
            return self._delete(keys, tombstone)
        finally:
            for i in locks:
                self._key_locks[i].release()

    def delete_copy(self, header: Header) -> bool:
        """Drop this very copy, with a tombstone for its write, if it is still the one held (repair applies a
        co-owner's delete so: a put of a new value meanwhile must not be the one deleted)."""
        with self._key_locks[hash(header.key) % len(self._key_locks)]:
            if self.header(header.key) != header:
                return False
            return self._delete([header.key], True) > 0

    def _delete(self, keys: list[str], tombstone: bool) -> int:
        deleted = 0
        held = {k: h for k in keys if (h := self.header(k)) is not None}
        on_disk = {k for k in keys if self.disk is not None and self.disk.delete(k)}
        now = time.monotonic()
        with self._lock:
            for key in keys:
                item = self._entries.pop(key, None)
                if item is not None:
                    self._used -= item[1]
                    self._policy.remove(key)
                if item is not None or key in on_disk:
                    deleted += 1
                    on_disk.discard(key)
                if tombstone and key in held:
                    ids, _ = self._tombstones.pop(key, (frozenset(), 0.0))
                    self._tombstones[key] = (ids | {held[key].write_id}, now)
            while len(self._tombstones) > MAX_TOMBSTONES or (
                    self._tombstones and now - next(iter(self._tombstones.values()))[1] > TOMBSTONE_TTL):
                self._tombstones.popitem(last=False)
            self.counters.deletes += deleted
        return deleted

    def written_by(self, writer: str) -> list[str]:
        """Keys whose value names `writer` in its provenance (what `mesh purge --writer` removes)."""
        return [h.key for h, _ in self.catalog() if writer in h.writers]

    def relieve_pressure(self) -> int:
        """Evict blobs (the eviction policy's order) until the bytes freed cover the shortfall of available RAM. Returns evictions.

        The shortfall is measured once rather than re-probed per eviction: a blob still being streamed to a
        reader is not freed at once, and re-probing would then empty the whole store.
        """
        if self.min_free_ram <= 0:
            return 0
        deficit = self.min_free_ram - self._probe()
        evicted = 0
        with self._lock:
            while deficit > 0 and self._entries:
                deficit -= self._evict_one()
                self.counters.pressure_evictions += 1
                evicted += 1
        return evicted

    def _evict_one(self) -> int:
        key = self._policy.victim()
        if key is None or key not in self._entries:  # cannot happen: both always hold the same keys
            key = next(iter(self._entries))
            self._policy.remove(key)
        _, size = self._entries.pop(key)
        self._used -= size
        self.counters.evictions += 1
        return size

    def items(self, prefix: str = "", limit: int = 0) -> Iterator[Entry]:
        """A snapshot of entries, least recently used first."""
        with self._lock:
            entries = [e for e, _ in self._entries.values() if e.header.key.startswith(prefix)]
        return iter(entries[:limit] if limit else entries)

    def warnings(self) -> list[str]:
        """What an operator should know about this store (a disk tier that fails to take values)."""
        return self.disk.warnings() if self.disk is not None else []

    def held(self) -> tuple[int, int]:
        """(keys, bytes) this node holds in any tier, each key counted once: what `mesh peers` shows. With a
        disk tier every value is on disk (written through), so its files' bytes, plus values whose disk write
        failed (RAM only); without one, RAM."""
        if self.disk is None:
            return len(self._entries), self._used
        on_disk = self.disk.keys()  # set operations, not a Python test per key: this runs every membership tick
        with self._lock:  # usually everything is on disk (written through): one C-level pass says so
            ram_only = [] if on_disk.issuperset(self._entries) else [
                self._entries[k][1] for k in self._entries.keys() - on_disk]
        return len(on_disk) + len(ram_only), self.disk.used + sum(ram_only)

    def stats(self) -> dict[str, float]:
        with self._lock:
            out: dict[str, float] = dict(vars(self.counters))
            out.update(entries=len(self._entries), bytes_used=self._used, max_memory=self.max_memory,
                       min_free_ram=self.min_free_ram)
            for class_type, (hits, size, seconds) in self._by_class.items():
                out[f"class.{class_type}.hits"] = hits
                out[f"class.{class_type}.bytes_out"] = size
                out[f"class.{class_type}.seconds_saved"] = seconds
        if self.disk is not None:
            out.update(self.disk.stats())
        return out
