"""MeshCacheProvider: ComfyUI's CacheProvider contract on top of the mesh.

Every method is safe to call on ComfyUI's per-prompt event loop: lookups await a future that the provider's
own threads resolve, under a deadline; stores are handed off before the first `await` (ComfyUI runs store tasks
only as the prompt's loop shuts down, and cancels any that await); should_cache is a cached class check. No
exception ever leaves a method: errors are counted and logged at debug level.

ComfyUI looks each uncached node up twice per prompt (all at prompt start, then again right before it runs).
The first answer is remembered for the rest of the prompt, so a miss costs one batched round trip, not two.

What a value cost to compute is measured from its last lookup miss (the node runs next) to the next lookup
of this prompt or its end, whichever comes first: ComfyUI runs one node at a time and looks the next one up
right before running it, so that is the node's own time, where its store (handed over only as the prompt
ends) would count the rest of the prompt in. Nodes that are never looked up (output nodes) count into the
node before them: an upper bound. The figure goes to ComputeCosts (provider/costs.py) and travels with the
value: nodes evict by compute seconds saved per byte, and the bridge does not
store a value cheaper to compute than to fetch. A hit adds its value's compute seconds to the seconds saved, per
prompt (the log line), in total and per class type (`mesh stats`, /metrics).

The second lookup of a miss is where the node is about to run: there, with MESH_DEDUPE, the provider takes a
compute lease on the key or waits for the instance that holds one (provider/dedupe.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import asdict, dataclass, field
from typing import Any

from mesh.buffers import RESERVE
from mesh.units import format_size

from .bridge import Bridge
from .events import Served
from .costs import ComputeCosts
from .dedupe import Dedupe
from .identity import Identity, KeyIdentities
from .policy import Policy, value_tree

MAX_CLASS_TYPES = 512
log = logging.getLogger("comfy_mesh")

CONTENT = "comfy-value/1"


@dataclass
class PromptStats:
    prompt_id: str = ""
    lookups: int = 0
    hits: int = 0
    misses: int = 0
    repeats: int = 0                  # of the misses, second lookups of a key already missed in this prompt
    errors: int = 0
    unshared: int = 0                 # of the misses, keys not shared at all (identity unknown or pending)
    bytes: int = 0                    # blob bytes of the hits, as they came from the mesh
    compute_seconds_saved: float = 0.0  # what computing the hits cost their writers
    lookup_seconds: float = 0.0
    waits: int = 0                    # pre-execution misses that waited for another instance's computation
    wait_hits: int = 0                # ... and were served its value
    wait_seconds: float = 0.0
    wait_saved_seconds: float = 0.0   # compute seconds those values would have cost here
    started: float = field(default_factory=time.monotonic)
    known_misses: set[str] = field(default_factory=set)

    def line(self) -> str:
        line = (f"comfy-mesh prompt {self.prompt_id}: {self.lookups} lookups, {self.hits} hits, {self.misses} misses, "
                f"{self.errors} errors, {format_size(self.bytes)} from the mesh, "
                f"{self.compute_seconds_saved:.2f} s of compute saved, "
                f"{self.lookup_seconds * 1000:.1f} ms in lookups")
        if self.waits:
            line += (f", {self.waits} waits for other instances ({self.wait_seconds:.1f} s, {self.wait_hits} served, "
                     f"{self.wait_saved_seconds:.1f} compute s saved)")
        return line


class _Inbox:
    """Answers from the bridge's threads, handed to one event loop in as few wake-ups as possible.

    Each wake-up of a loop from another thread (call_soon_threadsafe) costs a self-pipe write, a GIL hand-over
    and a pass of the loop: ~4 µs of CPU, but on a busy host tens to hundreds of µs of waiting, per key, when
    every answer woke the loop on its own. The first answer schedules a drain; answers arriving before it runs
    ride along."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Future[Any], futures.Future[Any]]] = []

    def put(self, answer: asyncio.Future[Any], done: futures.Future[Any]) -> None:
        with self._lock:
            self._items.append((answer, done))
            if len(self._items) > 1:
                return  # a drain is already on its way
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            pass  # the loop is closed: nobody awaits these answers any more

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for answer, done in items:
            if answer.done():
                continue  # the lookup gave up (its deadline)
            error = done.exception()
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(done.result())


def _expire(answers: list[asyncio.Future[Any]]) -> None:
    """The deadline of a batch of lookups: those still unanswered fail (a miss for the prompt, counted)."""
    for answer in answers:
        if not answer.done():
            answer.set_exception(TimeoutError("no answer from the mesh within the lookup deadline"))


class MeshCacheProvider:
    """Implements ComfyUI's CacheProvider methods; `comfy.py` mixes in ComfyUI's own base class."""

    def __init__(self, bridge: Bridge, policy: Policy, *, namespace: str, cache_value: Callable[..., Any],
                 lookup_timeout: float) -> None:
        self.bridge = bridge
        self.policy = policy
        self.namespace = namespace
        self.cache_value = cache_value
        self.lookup_timeout = lookup_timeout
        self.prompt = PromptStats()
        self.dedupe: Dedupe | None = None  # mesh-wide in-flight dedupe (MESH_DEDUPE), set by runtime.start
        self.totals: dict[str, float] = {"prompts": 0, "lookups": 0, "hits": 0, "misses": 0, "errors": 0,
                                         "bytes": 0, "stores": 0, "stores_dropped": 0, "lookup_seconds": 0.0,
                                         "lookups_unshared": 0, "stores_unshared": 0, "repeats": 0,
                                         "compute_seconds_saved": 0.0}
        # Called with each node served from the mesh, on ComfyUI's prompt thread: it must only hand off
        # (provider/routes.py sends it to the page with PromptServer.send_sync). None: nobody listens.
        self.on_served: Callable[[Served], None] | None = None
        self._lock = threading.Lock()
        self.fast_keys: Any = None  # provider/fastkeys.py, when installed into ComfyUI
        # provider/identity.py: what each key depends on beyond its names; None only with MESH_IDENTITY=0
        self.identities: KeyIdentities | None = None
        self.costs = ComputeCosts()  # what each key took to compute here (see the module docstring)
        self._running: str | None = None  # the key whose node runs now: its last lookup missed
        # class type -> [lookups, hits, misses, errors, lookup seconds, bytes of hits, compute seconds saved],
        # for per-class metrics (bounded)
        self.by_class: dict[str, list[float]] = {}
        # Lookups made in one turn of each event loop, sent to the bridge as one batch when that turn ends (a
        # flush is scheduled on a loop when its list gets its first lookup).
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[str, futures.Future[Any], asyncio.Future[Any]]]] = {}
        self._inbox: _Inbox | None = None  # answers on their way to the current loop

    def key(self, context: Any) -> str | None:
        """The mesh key: namespace, ComfyUI's digest and the identity of the files and code behind it; None when
        the value must not be shared (its identity was not seen, or a file it depends on is still being hashed)."""
        return self._keyed(context)[0]

    def _keyed(self, context: Any) -> tuple[str | None, Identity | None]:
        digest = context.cache_key_hash
        if self.identities is None:
            return f"{self.namespace}/{digest}", None
        identity = self.identities.of(digest)
        if identity is None or not identity.shareable:
            return None, identity
        suffix = f".{identity.suffix}" if identity.suffix else ""
        return f"{self.namespace}/{digest}{suffix}", identity

    # -- ComfyUI's CacheProvider methods -------------------------------------------------------------------------

    def should_cache(self, context: Any, value: Any = None) -> bool:
        """The class rules only, for a lookup and for a store alike: one dictionary lookup. Whether a value can
        be stored (representable, not too large) is decided by walking it, on the store thread (Policy).

        Asked with the value, right after the node ran, a yes means ComfyUI creates a store task for it: the
        lease of the node that just ran (`_running`) is promised to that store (Dedupe.promise), so it is not
        given up at the next node's lookup when the task runs only after the prompt."""
        try:
            allowed = self.policy.allows_class(context.class_type)
            if allowed and value is not None and self.dedupe is not None and self._running is not None:
                self.dedupe.promise(self._running)
            return allowed
        except Exception:
            log.debug("should_cache failed", exc_info=True)
            return False

    def _ran(self) -> None:
        """The node that was running has finished (the next lookup came, or the prompt ended): its seconds."""
        key, self._running = self._running, None
        if key is None:
            return
        self.costs.finish(key)  # learnt there, per key: what its store sends with the value

    async def on_lookup(self, context: Any) -> Any:
        started = time.perf_counter()
        prompt = self.prompt
        prompt.lookups += 1
        key = None
        outcome = 3  # index into by_class: 1 hit, 2 miss, 3 error
        found = None
        try:
            self._ran()  # a lookup: the node that ran before it has finished
            key, identity = self._keyed(context)
            if self.identities is not None:
                self.identities.running(identity, context.class_type)  # the last lookup: this node runs next
            log.debug("lookup of node %s (%s): %s", getattr(context, "node_id", "?"), context.class_type, key)
            if key is None:  # not shared: answered as a miss, and the node runs here
                prompt.misses += 1
                prompt.unshared += 1
                outcome = 2
                return None
            if key in prompt.known_misses:  # the lookup right before the node runs
                if self.dedupe is not None:
                    found = await self._before_compute(key, str(context.class_type), prompt)
                    if found is not None:
                        value = self._to_cache_value(found.value)
                        prompt.hits += 1
                        prompt.repeats += 1  # its first lookup's miss is superseded: one node, served
                        prompt.bytes += found.size
                        prompt.compute_seconds_saved += found.compute_seconds
                        outcome = 1
                        if self.on_served is not None:  # served after a wait: marked on the page like any hit
                            self._served(context, found, time.perf_counter() - started, found.compute_seconds or None)
                        return value
                prompt.misses += 1
                prompt.repeats += 1
                outcome = 2
                self.costs.start(key, str(context.class_type))  # the last miss: the node runs from now on
                self._running = key
                return None
            found = await self._submit(key)  # answered, or failed with TimeoutError, within lookup_timeout
            if found is None:
                prompt.known_misses.add(key)
                prompt.misses += 1
                outcome = 2
                return None
            value = self._to_cache_value(found.value)
            prompt.hits += 1
            prompt.bytes += found.size
            prompt.compute_seconds_saved += found.compute_seconds
            outcome = 1
            if self.on_served is not None:
                self._served(context, found, time.perf_counter() - started, found.compute_seconds or None)
            return value
        except Exception as e:  # timeouts included: a miss, never an error in the prompt
            prompt.errors += 1
            if key is not None:
                prompt.known_misses.add(key)  # a timed-out or failed lookup is not paid for twice in a prompt
            log.debug("lookup of %s failed: %r", getattr(context, "class_type", "?"), e)
            return None
        finally:
            seconds = time.perf_counter() - started
            prompt.lookup_seconds += seconds
            self._count_class(str(getattr(context, "class_type", "?")), outcome, seconds, found)

    def _served(self, context: Any, found: Any, seconds: float, saved: float | None) -> None:
        """Tell whoever listens (the web page) which node the mesh served; never fails the lookup."""
        try:
            self.on_served(Served(  # type: ignore[misc]
                node_id=str(getattr(context, "node_id", "")), class_type=str(context.class_type),
                member=found.writers[0] if found.writers else "", bytes=found.size, seconds=seconds,
                saved_seconds=saved, prompt_id=self.prompt.prompt_id))
        except Exception:
            log.debug("served event failed", exc_info=True)

    async def _before_compute(self, key: str, class_type: str, prompt: PromptStats) -> Any:
        """Dedupe at a pre-execution miss: the value another instance computed meanwhile, or None (compute)."""
        assert self.dedupe is not None

        async def fetch() -> Any:
            try:
                return await self._submit(key)
            except Exception:  # a lookup that timed out: compute
                return None

        dedupe = self.dedupe
        counters = dedupe.counters
        waits, hits, waited, saved = counters.waits, counters.wait_hits, counters.wait_seconds, counters.saved_seconds
        found = await dedupe.before_compute(key, class_type, prompt.prompt_id or str(id(prompt)), fetch)
        prompt.waits += counters.waits - waits
        prompt.wait_hits += counters.wait_hits - hits
        prompt.wait_seconds += counters.wait_seconds - waited
        prompt.wait_saved_seconds += counters.saved_seconds - saved
        return found

    def _count_class(self, class_type: str, outcome: int, seconds: float, found: Any = None) -> None:
        row = self.by_class.get(class_type)
        if row is None:
            if len(self.by_class) >= MAX_CLASS_TYPES:
                class_type = "(other)"  # a workflow with thousands of custom classes must not grow this forever
                row = self.by_class.get(class_type)
            if row is None:
                row = self.by_class[class_type] = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        row[0] += 1
        row[outcome] += 1
        row[4] += seconds
        if outcome == 1 and found is not None:
            row[5] += found.size
            row[6] += found.compute_seconds

    def class_stats(self) -> dict[str, dict[str, float]]:
        """Per ComfyUI class type: lookups, hits, misses, errors, lookup seconds, bytes of the hits and the
        compute seconds they saved (for Prometheus labels)."""
        return {c: dict(zip(("lookups", "hits", "misses", "errors", "lookup_seconds", "bytes",
                             "compute_seconds_saved"), row))
                for c, row in list(self.by_class.items())}

    def _submit(self, key: str) -> asyncio.Future[Any]:
        """Queue a lookup until the current turn of the event loop ends.

        ComfyUI's prompt-start gather runs every node's lookup up to its first await within one turn of the loop,
        hashing each node's key in between; collected here and flushed by a callback at the end of that turn,
        they reach the mesh as one batch however long that hashing takes (a time-based linger would split it).
        The answers come back through one inbox per loop: a batch of misses wakes the loop once, not per key.
        One timer per batch fails what is still unanswered after lookup_timeout (asyncio.wait_for made a timer,
        a future and callbacks for every lookup).
        """
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        future: futures.Future[Any] = futures.Future()
        inbox = self._inbox
        if inbox is None or inbox.loop is not loop:
            inbox = self._inbox = _Inbox(loop)
        future.add_done_callback(lambda f: inbox.put(answer, f))
        with self._lock:
            batch = self._pending.setdefault(loop, [])
            batch.append((key, future, answer))
            schedule = len(batch) == 1
        if schedule:
            loop.call_soon(self._flush, loop)
        return answer

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            batch = self._pending.pop(loop, [])
        loop.call_later(self.lookup_timeout, _expire, [answer for _, _, answer in batch])
        self.bridge.submit([(key, future) for key, future, _ in batch])

    def _to_cache_value(self, tree: Any) -> Any:
        if not isinstance(tree, dict) or not isinstance(tree.get("outputs"), (list, tuple)):
            raise ValueError("blob is not a ComfyUI value")
        return self.cache_value(outputs=list(tree["outputs"]), ui=tree.get("ui"))

    async def on_store(self, context: Any, value: Any) -> None:
        # No await anywhere: ComfyUI cancels store tasks that await, so the hand-off happens at once. These tasks
        # run as the prompt's loop shuts down, after on_prompt_end, so they count in the totals, not the prompt.
        try:
            key, identity = self._keyed(context)
            if key is not None and identity is not None and self.identities is not None \
                    and not self.identities.unchanged(identity):
                key = None  # a file it names was replaced, or a node opened one its key does not name
            if key is None:
                with self._lock:
                    self.totals["stores_unshared"] += 1
                return
            meta = {"class_type": str(context.class_type), "content": CONTENT}
            if identity is not None:
                meta["identity"] = identity.describe()  # what `mesh keys` and `mesh get --describe` show
            seconds = self.costs.finish(key)  # still running by our count: the store came before the next lookup
            if seconds is None:
                seconds = self.costs.measured(key)  # None: not computed here (then stored with no cost)
            dedupe = self.dedupe
            claimed = dedupe is not None and dedupe.claim(key)  # its lease is released once the value is stored
            done = (lambda ok, never, k=key: dedupe.stored(k, ok, never)) if claimed and dedupe is not None else None
            queued = self.bridge.store(key, value_tree(value.outputs, value.ui), meta, seconds, done=done)
            if not queued and done is not None:
                done(False, False)
            with self._lock:
                self.totals["stores" if queued else "stores_dropped"] += 1
        except Exception:
            log.debug("store hand-off failed", exc_info=True)

    def on_prompt_start(self, prompt_id: str) -> None:
        self.prompt = PromptStats(prompt_id=str(prompt_id))
        if self.identities is not None:
            try:
                self.identities.on_prompt_start()  # model files may have changed since the last prompt
            except Exception:
                log.debug("identity refresh failed", exc_info=True)

    def on_prompt_end(self, prompt_id: str) -> None:
        try:
            self._ran()  # the prompt's last node ran to its end
        except Exception:
            log.debug("compute timing failed", exc_info=True)
        if self.fast_keys is not None:
            self.fast_keys.on_prompt_end()  # remembered digests live for one prompt
        try:
            prompt = self.prompt
            if self.dedupe is not None:
                self.dedupe.prompt_end(prompt.prompt_id or str(id(prompt)))
            if prompt.lookups:
                log.info(prompt.line())
            with self._lock:
                self.totals["prompts"] += 1
                for name in ("lookups", "hits", "misses", "errors", "bytes", "lookup_seconds", "repeats",
                             "compute_seconds_saved"):
                    self.totals[name] += getattr(prompt, name)
                self.totals["lookups_unshared"] += prompt.unshared
        except Exception:
            log.debug("prompt accounting failed", exc_info=True)

    def totals_copy(self) -> dict[str, float]:
        """The running totals, copied under the lock (for the web page's status)."""
        with self._lock:
            return dict(self.totals)

    # -- for `mesh stats` --------------------------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        with self._lock:
            out = {f"provider_{k}": float(v) for k, v in self.totals.items()}
        out.update({f"provider_bridge_{k}": float(v) for k, v in asdict(self.bridge.counters).items()})
        out.update({f"provider_memory_{k}": float(v) for k, v in asdict(RESERVE.stats()).items()})
        if self.fast_keys is not None:
            out.update(self.fast_keys.stats())
        if self.identities is not None:
            out.update(self.identities.stats())
        if self.dedupe is not None:
            out.update(self.dedupe.stats())
        return out
