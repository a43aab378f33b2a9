"""The provider's own threads: every network call and every encode/decode happens here, off ComfyUI's loop.

ComfyUI runs each prompt on a fresh event loop that it closes at the end, cancelling whatever still awaits.
So nothing here is bound to an event loop: callers get `concurrent.futures.Future`s, and stores are handed
over through a bounded queue before the caller's first `await`.

Lookups are batched: at prompt start ComfyUI looks up every node of the prompt at once; the provider hands
them over as one unit (see MeshCacheProvider._submit), the lookup thread adds whatever else arrives within a
fraction of a millisecond, and asks the mesh about all of it in one batched Has; only keys that are present
are fetched. An unreachable mesh trips a breaker for a few seconds, during which every lookup is an
immediate miss: a dead mesh must not cost each node a deadline. A mesh that answered "no" (busy, refused) is
alive and trips nothing; a key it refused is just a miss. An embedded node that stopped (drained) turns the
provider off with one warning.

A value goes to the mesh with what computing it cost (BlobHeader.compute_seconds: nodes keep what saves the most
compute per byte), unless it is cheaper to compute again than to fetch: the bridge measures what its hits cost
(a fixed part per fetch and a part per byte, both exponentially weighted means, FetchCost) and drops a store
whose compute seconds do not exceed what fetching its encoded bytes would take (counted as stores_cheap).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from typing import Protocol

from mesh.client import MeshClient, NodeStopped, Sink
from mesh.transport.peer import MeshError, Unreachable

log = logging.getLogger(__name__)

MAX_BATCH = 1024
BREAKER_OPEN = 3.0     # seconds the provider stops asking a mesh that just failed
STORE_SETTLE = 0.005   # a burst of stores is pushed once no hand-off came for this long...
STORE_SETTLE_MAX = 0.05  # ...or after this long at most
RECENT_STORES = 4096     # keys remembered as just stored, so the same value is not sent twice...
RECENT_STORE_SECONDS = 60.0  # ...within this long


@dataclass
class BridgeCounters:
    lookups: int = 0
    batches: int = 0
    hits: int = 0
    misses: int = 0
    errors: int = 0
    stores: int = 0
    stores_dropped: int = 0
    stores_refused: int = 0        # values the encoder would not take (not representable, too large)
    store_errors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    breaker_trips: int = 0
    stores_cheap: int = 0          # values cheaper to compute again than to fetch: not stored


class Decoder(Sink, Protocol):
    def finish(self) -> object: ...


@dataclass(frozen=True)
class Found:
    """A lookup's answer when the key was there: the decoded value, the size of the blob it came from, and what
    its header says about it (writers, oldest first; the compute time it cost its writer), so the web page can
    say where a served node came from and what it saved."""

    value: object
    size: int
    writers: tuple[str, ...] = ()
    compute_seconds: float = 0.0  # what computing it cost its writer (0: unknown): the compute this hit saved


@dataclass
class _Store:
    key: str
    tree: object
    meta: Mapping[str, str]
    compute_seconds: float | None = None  # measured (provider/costs.py), or None: unknown
    queued_at: float = field(default_factory=time.monotonic)
    done: Callable[[bool, bool], None] | None = None  # (stored, never: it will not be) once the push ended
    never: bool = False                               # the value is not for the mesh at all (refused, cheap)


FETCH_WEIGHT = 0.2           # of a new measurement in FetchCost's means
SMALL_FETCH = 64 * 1024      # fetches below this many bytes measure the fixed part; larger ones the part per byte


@dataclass
class FetchCost:
    """What a hit costs this process: a fixed part per fetch and a part per byte (round trips, transfer, decode).

    Until measured, 1 ms and 1 GiB/s. Two figures rather than seconds per byte: a 4 KiB hit is all round trip,
    and its seconds per byte would make every large value look too dear to fetch."""

    fixed: float = 0.001
    per_byte: float = 1.0 / (1 << 30)

    def seconds(self, size: int) -> float:
        return self.fixed + self.per_byte * size

    def measured(self, seconds: float, size: int) -> None:
        if size < SMALL_FETCH:
            self.fixed += FETCH_WEIGHT * (seconds - self.fixed)
        else:
            rate = max(0.0, seconds - self.fixed) / size
            self.per_byte += FETCH_WEIGHT * (rate - self.per_byte)


class Bridge:
    def __init__(self, client: MeshClient, *, encode: Callable[[object, Mapping[str, str]], bytes | bytearray | None],
                 decoder: Callable[[], Decoder], lookup_timeout: float, store_timeout: float,
                 store_queue: int, thread_init: Callable[[], None] = lambda: None, skip_cheap: bool = True) -> None:
        """`encode(tree, meta)` returns the bytes to store, or None for a value not to be cached (counted as
        refused); it runs on the store thread, never on ComfyUI's. `decoder()` makes what a hit's bytes are fed
        to as they arrive (mesh.codec.StreamDecoder); its `finish()` is the value. `thread_init` runs first on
        each of the bridge's own threads (they encode and decode values). `skip_cheap`: drop stores cheaper to
        compute than to fetch (off with MESH_STORE_CHEAP=1)."""
        self.client = client
        self.encode = encode
        self.decoder = decoder
        self.lookup_timeout = lookup_timeout
        self.store_timeout = store_timeout
        self.counters = BridgeCounters()
        self._lock = threading.Lock()
        # Units of lookups submitted together (a prompt's opening gather is one), or None to stop the thread.
        self._lookups: queue.SimpleQueue[list[tuple[str, futures.Future[Found | None]]] | None] = \
            queue.SimpleQueue()
        self._stores: queue.Queue[_Store | None] = queue.Queue(maxsize=store_queue)
        self._thread_init = thread_init
        self._pool = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="mesh-provider-get",
                                                initializer=thread_init)
        self._down_until = 0.0
        self.fetch_cost = FetchCost()
        self.skip_cheap = skip_cheap
        # key -> when it was last pushed, oldest first: a bounded "already there" hint, never a correctness need
        self._recent_stores: OrderedDict[str, float] = OrderedDict()
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._lookup_loop, name="mesh-provider-lookup", daemon=True),
                         threading.Thread(target=self._store_loop, name="mesh-provider-store", daemon=True)]
        for t in self._threads:
            t.start()

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self.counters, name, getattr(self.counters, name) + n)

    # -- lookups -----------------------------------------------------------------------------------------------

    def submit(self, batch: list[tuple[str, futures.Future[Found | None]]]) -> None:
        """Resolve each future of `batch` (key, future) pairs to what is stored under its key, decoded, or None.

        The whole batch is asked about at once. Never raises; every future resolves within lookup_timeout.
        """
        if not batch:
            return
        self._count("lookups", len(batch))
        if self._closed.is_set() or time.monotonic() < self._down_until:
            self._finish([f for _, f in batch], None, "misses")
        else:
            self._lookups.put(batch)

    def available(self) -> bool:
        """False while closed or while the breaker is open (the mesh just failed to answer)."""
        return not self._closed.is_set() and time.monotonic() >= self._down_until

    def _trip(self, error: Exception) -> None:
        """Open the breaker if the mesh itself did not answer; an answer (busy, refused) is not a dead mesh."""
        if isinstance(error, NodeStopped):
            if self._down_until != float("inf"):
                log.warning("%s: comfy-mesh is off until ComfyUI restarts", error)
                self._count("breaker_trips")
            self._down_until = float("inf")
            return
        if not isinstance(error, Unreachable):
            return
        if time.monotonic() >= self._down_until:
            log.warning("mesh unavailable, lookups are misses for %.0f s: %s", BREAKER_OPEN, error)
            self._count("breaker_trips")
        self._down_until = time.monotonic() + BREAKER_OPEN

    def _lookup_loop(self) -> None:
        stop = False
        while not stop and not self._closed.is_set():
            unit = self._lookups.get()
            if unit is None:
                break
            # A unit is already a batch: every lookup of one turn of ComfyUI's loop (MeshCacheProvider._submit).
            # What else is queued rides along; waiting for more would only delay this one.
            batch = list(unit)
            while len(batch) < MAX_BATCH:
                try:
                    more = self._lookups.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.extend(more)
            try:
                self._resolve(batch)
            except Exception as e:  # pragma: no cover - nothing may kill this thread
                log.exception("lookup batch failed")
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)

    def _resolve(self, batch: list[tuple[str, futures.Future[Found | None]]]) -> None:
        self._count("batches")
        waiting: dict[str, list[futures.Future[Found | None]]] = {}
        for key, future in batch:
            waiting.setdefault(key, []).append(future)
        if self._closed.is_set() or time.monotonic() < self._down_until:
            # Queued while an earlier batch was failing: the breaker is open now, so do not pay a deadline again.
            for fs in waiting.values():
                self._finish(fs, None, "misses")
            return
        keys = list(waiting)
        started = time.monotonic()
        if len(keys) == 1:
            present = keys  # one key: a Get answers NOT_FOUND as fast as a Has would
        else:
            try:
                flags = self.client.has(keys, timeout=self.lookup_timeout)
            except MeshError as e:
                self._trip(e)
                flags = [False] * len(keys)
            present = [k for k, yes in zip(keys, flags) if yes]
        for key in keys:
            if key not in present:
                self._finish(waiting[key], None, "misses")
        for key in present:
            self._pool.submit(self._fetch, key, waiting[key], started + self.lookup_timeout)

    def _fetch(self, key: str, waiting: list[futures.Future[Found | None]], deadline: float) -> None:
        try:
            started = time.monotonic()
            sink = self.decoder()
            if not self.client.get_into(key, max(0.01, deadline - time.monotonic()), sink):
                self._finish(waiting, None, "misses")
                return
            size = sink.received
            header = sink.header
            value = sink.finish()  # the chunks went once, as they arrived, straight into the value's tensors
        except MeshError as e:
            self._trip(e)
            self._finish(waiting, None, "errors")
            return
        except Exception as e:  # a corrupt or foreign blob is a miss, never an exception in ComfyUI
            log.warning("cannot decode %s from the mesh: %s", key, e)
            self._finish(waiting, None, "errors")
            return
        self.fetch_cost.measured(time.monotonic() - started, size)
        self._count("bytes_in", size)
        writers = tuple(getattr(header, "writers", None) or ())
        compute = float(getattr(header, "compute_seconds", 0.0) or 0.0)
        self._finish(waiting, Found(value, size, writers, compute), "hits")

    def _finish(self, waiting: list[futures.Future[Found | None]], value: Found | None, counter: str) -> None:
        self._count(counter, len(waiting))
        for f in waiting:
            try:
                f.set_result(value)
            except futures.InvalidStateError:
                pass  # the prompt gave up waiting (deadline) and cancelled it

    # -- stores ------------------------------------------------------------------------------------------------

    def store(self, key: str, tree: object, meta: Mapping[str, str], compute_seconds: float | None = None,
              done: Callable[[bool, bool], None] | None = None) -> bool:
        """Queue a value for the mesh and return at once; False (counted) if the queue is full. `compute_seconds`:
        what computing it cost here (None: not measured, stored with no cost). `done(stored, never)` is called on
        the store thread once the push ended (a compute lease is released then: provider/dedupe.py; `never`: the
        value is not for the mesh at all, refused or too cheap to keep), unless this returns False."""
        if self._closed.is_set():
            return False
        try:
            self._stores.put_nowait(_Store(key, tree, meta, compute_seconds, done=done))
        except queue.Full:
            self._count("stores_dropped")
            return False
        return True

    def _store_loop(self) -> None:
        self._thread_init()
        while True:
            try:
                item = self._stores.get_nowait()
            except queue.Empty:
                item = self._stores.get()
                if item is not None:
                    self._settle()
            try:
                if item is None:
                    break
                self._push(item)
            finally:
                self._stores.task_done()

    def _settle(self) -> None:
        """Let a burst of hand-offs end before pushing: ComfyUI hands over a prompt's stores together as the prompt
        finishes, and encoding and sending hold the GIL, which the prompt's own tail would otherwise wait for."""
        size, deadline = self._stores.qsize(), time.monotonic() + STORE_SETTLE_MAX
        while time.monotonic() < deadline and not self._closed.is_set():
            time.sleep(STORE_SETTLE)
            now = self._stores.qsize()
            if now == size:
                return
            size = now

    def _push(self, item: _Store) -> None:
        ok = False
        try:
            ok = self._push_one(item)
        finally:
            if item.done is not None:
                try:
                    item.done(ok, item.never)
                except Exception:
                    log.debug("store callback failed", exc_info=True)

    def _push_one(self, item: _Store) -> bool:
        """Encode and put one value: True when it is in the mesh (or was put there within the last minute)."""
        if self._closed.is_set() or self._down_until == float("inf"):
            return False  # closed, or the embedded node stopped: what is still queued is dropped
        now = time.monotonic()
        if self._recent_stores.get(item.key, -1e9) > now - RECENT_STORE_SECONDS:
            return True  # the same value twice in a minute (another prompt, same inputs): already there
        try:
            data = self.encode(item.tree, item.meta)
            if data is None:
                self._count("stores_refused")
                item.never = True
                return False
            if self.skip_cheap and item.compute_seconds is not None \
                    and item.compute_seconds <= self.fetch_cost.seconds(len(data)):
                self._count("stores_cheap")  # a hit would cost more than computing it again
                item.never = True
                return False  # not in the mesh: a waiter (dedupe) computes it itself
            # A measured 0 s is not "unknown" (0 on the wire): the smallest positive cost says "cheap".
            cost = 0.0 if item.compute_seconds is None else max(item.compute_seconds, 1e-6)
            self.client.put(item.key, data, item.meta, timeout=self.store_timeout, compute_seconds=cost)
        except MeshError as e:
            if isinstance(e, NodeStopped):
                self._trip(e)  # one warning, then stores are dropped like lookups are misses
            elif time.monotonic() >= self._down_until:
                log.warning("store of %s failed: %s", item.key, e)
            self._count("store_errors")
            return False
        except Exception:
            log.exception("store of %s failed", item.key)
            self._count("store_errors")
            return False
        self._remember_store(item.key, now)
        self._count("stores")
        self._count("bytes_out", len(data))
        return True

    def _remember_store(self, key: str, now: float) -> None:
        """O(1) per store: expire from the old end only (a rebuild per store was quadratic in a busy minute)."""
        recent = self._recent_stores
        recent[key] = now
        recent.move_to_end(key)
        while recent and (len(recent) > RECENT_STORES or next(iter(recent.values())) <= now - RECENT_STORE_SECONDS):
            recent.popitem(last=False)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until queued stores are pushed (tests, shutdown); False if they did not finish in time."""
        deadline = time.monotonic() + timeout
        while self._stores.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._stores.unfinished_tasks

    def close(self) -> None:
        self._closed.set()
        self._lookups.put(None)
        try:
            self._stores.put_nowait(None)
        except queue.Full:
            pass
        self._pool.shutdown(wait=False, cancel_futures=True)
