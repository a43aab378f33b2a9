"""Memory for received values: huge pages, and a small reserve of them touched before they are needed.

A value read from the mesh lands in memory of its own (it becomes a tensor ComfyUI keeps). Memory nobody
touched before is slow to write the first time:
- With 4 KiB pages, 48 MiB is 12,288 page faults, about as long as the copy itself. Anonymous mappings advised
  with MADV_HUGEPAGE (transparent huge pages in "madvise" mode, the common default) take 24 faults instead: a
  fresh 48 MiB write went from 29 to 14 ms here (median of 8).
- On a virtual machine whose balloon reports free memory to the host (virtio-balloon free page reporting, as
  in Firecracker and cloud sandboxes), a freed 2 MiB block goes back to the host about two seconds later, and
  the next first touch of it makes the host fault it in again: the same write then took 44 to 83 ms. That is
  what made one hit in three take 100-150 ms when hits came seconds apart, as they do in a real ComfyUI.

So `fresh()` serves large requests from a `Reserve`: mappings of the sizes recently asked for, touched ahead by
a background thread (the kernel zero-fills them from /dev/zero with the GIL released). A hit then writes into
memory the process already holds, at memcpy speed. The reserve refills only once no request came for QUIET
seconds, while ComfyUI computes: touching memory competes with the hits themselves, and refilling during a
burst of back-to-back hits slowed them (a 48 MiB remote hit went from 29 to 35 ms median here). It holds at
most its budget (MESH_WARM_MEMORY, 256 MiB by default in the provider; 0 turns it off), only sizes that were
asked for, and drops sizes no longer asked for. A mapping is handed out once and freed when the last buffer,
view, tensor or array made from it goes away.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

HUGE = 2 * 1024**2         # one huge page: below it, ordinary memory; above, sizes are rounded up to a multiple
RECENT = 8                 # requests remembered: a size asked for k times among them gets up to k mappings ready
PAGE = mmap.PAGESIZE
TAIL_KEEP = 64 * 1024      # a handed-out warm mapping's unused tail under this stays; over it goes back at once
QUIET = 0.25               # seconds without a request before the reserve refills: never during a burst of hits


@dataclass
class ReserveStats:
    warm: int = 0          # requests served from the reserve
    cold: int = 0          # large requests mapped fresh (reserve off, empty, or the size not yet ready)
    held: int = 0          # bytes of touched mappings waiting to be handed out


def _map(size: int) -> mmap.mmap:
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # a kernel without transparent huge pages: ordinary pages, still fine
    return m


def _touch(m: mmap.mmap, zero: int) -> None:
    """Fault every page of `m` in, off the GIL: a read from /dev/zero is the kernel writing zeros into it."""
    view = memoryview(m)
    try:
        got = 0
        while got < len(view):
            n = os.readv(zero, [view[got:]])
            if n <= 0:
                raise OSError("/dev/zero returned nothing")
            got += n
    finally:
        view.release()


class Reserve:
    """Touched huge-page mappings of recently requested sizes, refilled by one background thread."""

    def __init__(self, budget: int = 0) -> None:
        self._lock = threading.Condition()
        self._budget = budget
        self._recent: deque[int] = deque(maxlen=RECENT)
        self._ready: dict[int, list[mmap.mmap]] = {}
        self._stats = ReserveStats()
        self._thread: threading.Thread | None = None
        self._zero = -1
        self._last_take = 0.0

    def configure(self, budget: int) -> None:
        """Hold at most `budget` bytes from now on (0: none); what is held over it is dropped at once."""
        dropped = []
        with self._lock:
            self._budget = max(0, budget)
            for size, stack in self._ready.items():
                while stack and self._stats.held > self._budget:
                    dropped.append(stack.pop())
                    self._stats.held -= size
            self._lock.notify()
        for m in dropped:
            m.close()
        if budget > 0:
            self._start()

    def stats(self) -> ReserveStats:
        with self._lock:
            return ReserveStats(self._stats.warm, self._stats.cold, self._stats.held)

    def take(self, nbytes: int) -> memoryview:
        """`nbytes` of writable zeroed memory that no one else holds, as a memoryview of exactly that length."""
        if nbytes < HUGE:
            return memoryview(bytearray(nbytes))
        size = -(-nbytes // HUGE) * HUGE
        with self._lock:
            stack = self._ready.get(size)
            m = stack.pop() if stack else None
            if m is not None:
                self._stats.warm += 1
                self._stats.held -= size
            else:
                self._stats.cold += 1
            if self._budget > 0:
                self._recent.append(size)
                self._last_take = time.monotonic()
                self._lock.notify()
        if m is None:
            m = _map(size)
        else:
            tail = -(-nbytes // PAGE) * PAGE
            if size - tail >= TAIL_KEEP:
                m.madvise(mmap.MADV_DONTNEED, tail, size - tail)  # not needed: give the pages back now
        return memoryview(m)[:nbytes]

    # ---------------------------------------------------------------------------------------- the refill thread

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            try:
                self._zero = os.open("/dev/zero", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as e:
                log.warning("comfy-mesh: no /dev/zero (%s): received values go into fresh memory", e)
                self._budget = 0
                return
            self._thread = threading.Thread(target=self._run, name="mesh-memory-reserve", daemon=True)
            self._thread.start()

    def _targets(self) -> Counter[int]:
        return Counter(self._recent) if self._budget > 0 else Counter()

    def _drop(self, excess: Callable[[int, int], int]) -> None:
        """Close, of each size's ready mappings, as many as `excess(size, count ready)` says."""
        dropped = []
        with self._lock:
            for size, stack in self._ready.items():
                for _ in range(min(len(stack), excess(size, len(stack)))):
                    dropped.append(stack.pop())
                    self._stats.held -= size
        for m in dropped:
            m.close()

    def _next_size(self) -> int | None:
        """The newest requested size with fewer mappings ready than requests, that fits the budget (lock held)."""
        targets = self._targets()
        seen: set[int] = set()
        for size in reversed(self._recent):
            if size in seen:
                continue
            seen.add(size)
            if len(self._ready.get(size, ())) < targets[size] and self._stats.held + size <= self._budget:
                return size
        return None

    def _run(self) -> None:
        # At ComfyUI's own priority, on purpose: a thread that takes the GIL must not be niced. At nice 19 on a
        # busy host it was not scheduled for hundreds of ms while holding the GIL hand-off, and ComfyUI's loop
        # waited for it (stalls of 0.2-0.76 s). QUIET keeps it away from the hits instead.
        while True:
            # sizes no longer among the recent requests (or over a lowered budget) make room for those that are
            self._drop(lambda size, count: max(0, count - self._targets()[size]))
            with self._lock:
                size = self._next_size()
                if size is None:
                    self._lock.wait()  # a request, or a new budget
                    continue
                quiet = self._last_take + QUIET - time.monotonic()
                if quiet > 0:  # touching competes with the hits themselves for CPU (and, on a VM, the host)
                    self._lock.wait(quiet)
                    continue
            m = _map(size)
            try:
                _touch(m, self._zero)
            except OSError as e:
                log.warning("comfy-mesh: cannot touch reserve memory (%s): the reserve is off", e)
                m.close()
                with self._lock:
                    self._budget = 0
                return
            with self._lock:
                if len(self._ready.get(size, ())) < self._targets()[size] and self._stats.held + size <= self._budget:
                    self._ready.setdefault(size, []).append(m)
                    self._stats.held += size
                    m = None
            if m is not None:
                m.close()


RESERVE = Reserve()


def fresh(nbytes: int) -> memoryview:
    """`nbytes` of writable memory, zero-filled and held by no one else, for a buffer protocol consumer
    (memoryview, torch, numpy): huge pages from the reserve where one of that size is ready."""
    return RESERVE.take(nbytes)
