"""Mesh-wide in-flight dedupe: a node another instance is computing right now is waited for, not run again.

At a node's pre-execution lookup miss (ComfyUI runs the node next), the provider asks the key's primary owner
for a compute lease (mesh/cluster/leases.py, the Lease RPC):
- granted: this instance computes; the lease is renewed every TTL/3 while it does and released when the value
  was stored (with `done`, so waiters read it at once) or will not be (the node failed, the value is not
  cacheable, the store was dropped);
- held by another instance: this one waits for the value, then takes it like a hit; a wait that runs out, or a
  lease that comes free (its holder crashed, froze, was interrupted or failed), and this instance computes;
- done: the value is in the mesh already: read it.

**Waiting: polls, not a long-poll.** A waiter asks the owner again every 20 ms at first, backing off to 100 ms.
A long-poll would hold one of the owner's server threads per waiting instance for seconds (the synchronous gRPC
server's threads are a fixed budget shared out by gates: mesh/server.py), and a waiter would still need a
deadline and a retry for owners that change or die; polling holds nothing between asks, costs one small unary
call per interval (at most 50 a second per waiter, about 20 asks per expected compute time), and adds at most
one interval to a wait: 100 ms, or POLL_SHARE (5 %) of the expected compute time where that is shorter. The
wait is awaited on ComfyUI's event loop (asyncio.sleep between asks; each ask runs on a provider thread and is
awaited under a deadline), so the loop is never blocked.

**Bounded.** Issue 23's rule: a wait is never longer than computing would take (learned per class type, and
per key where seen), capped by a setting; a waiter whose wait runs out computes itself. Here:
- a key this instance computed before: its own figure plus HANDOVER (the value's way to the mesh and back),
  capped by MESH_DEDUPE_MAX_WAIT. That figure is a measurement: past it, computing here would have been done;
- any other key: the same bound from the best guess (the longest recent figure of its class type here, or the
  holder's own figure, the larger; DEFAULT_WAIT if neither) and, past it, the wait goes on while the holder
  stays alive (answered HELD: it renewed within TTL), up to MESH_DEDUPE_MAX_WAIT. A class figure is about
  other keys (a sampler of 4 steps or 40, a blur of 0.3 s or 1.2 s), not a bound on this one. A live holder
  started before this waiter; at a like speed it finishes first, so a waiter that gives up and starts from
  nothing can only finish later, i.e. the wait is still "never longer than computing would take". What
  remains, a holder much slower than this instance or stuck while its renewals go on, is what the setting
  caps. A holder that stops renewing (killed, frozen, cut off) frees its waiters within TTL, as before;
Every lease call has a deadline (CALL_TIMEOUT);
one that fails or times out means "compute now, without a lease": a possible duplicate computation, never a
stall. A holder's lease lapses TTL seconds after its last renewal, so a holder killed (-9) or frozen (SIGSTOP)
frees its waiters within TTL plus one poll; one that fails or is interrupted releases at the prompt's end
(after GRACE, which lets the value of the prompt's last node be handed over first).

**No deadlock.** An instance holds a lease only while it computes that node, while the value is on its way
to the mesh on the provider's store thread (which waits on no lease), or while ComfyUI promised a store of it
(should_cache asked with the value said yes: the store task may run only after the prompt) and this instance
goes on computing. It cannot hold one while it waits: at every pre-execution lookup, after yielding once to the
event loop (ComfyUI's store task for the node that just ran is then handed over, and claims its lease), any
lease of an earlier node that no store claimed and none was promised is released (its value is not coming), and
when the answer says another instance holds this node, the promised ones are released too before the wait
(their values would come only after the prompt, i.e. after this wait: holding them would make waits chain).
Promised leases no store claims are released GRACE after the prompt's end. So a waiter
always waits on a holder that computes or stores (or computes later nodes of its prompt, its promised store to
come at the end: a waiter then waits for the rest of that prompt, still within the bounds above), and no holder
waits on anyone: the "waits for" graph has no
cycle, and each wait is bounded anyway. Two instances running independent branches in opposite orders each
wait at most for the other's node to finish (tests/test_dedupe.py).

**Owners down or changing.** The lease lives at the key's primary owner, where the value is written; an owner
that does not answer is skipped for the next in ring order (mesh/cluster/routing.py). A lease lost with its
owner, or a ring change that moves the key, lets a second instance compute the key too: wasted work, never a
wrong value (a lease decides who computes, never what a value is).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

from mesh.client import MeshClient
from mesh.cluster.leases import COMPUTE, DONE, GRANTED, HELD, Answer

from .costs import ComputeCosts

log = logging.getLogger("comfy_mesh")

TTL = 3.0             # seconds a lease lives unless renewed
RENEW_EVERY = 1.0     # seconds between renewals of a held lease (TTL / 3)
CALL_TIMEOUT = 1.0    # seconds one lease call may take
GRACE = 0.5           # seconds after the prompt's end a lease waits for its store to claim it
DEFAULT_WAIT = 10.0   # seconds to wait on a node whose compute time nobody knows
HANDOVER = 1.0        # seconds added to an expected compute time: the value's way to the mesh and back
CHEAP = 0.1           # seconds: a node known to compute faster than this here is not worth a lease (a round trip
                      # per node, and waiting for a value's hand-over would take longer than computing it)
BREAKER_OPEN = 3.0    # seconds no lease is asked for after a lease call failed (a dead mesh costs one deadline)
FIRST_POLL = 0.02
MAX_POLL = 0.1
BACKOFF = 1.5
POLL_SHARE = 0.05     # of the expected compute time: the longest poll interval (a wait adds at most 5 % of it)


@dataclass
class _Held:
    class_type: str
    prompt: str
    expected: float
    renewed_at: float = field(default_factory=time.monotonic)
    claimed: bool = False             # a store took it over: released once the value is in the mesh
    promised: bool = False            # ComfyUI said a store task for it is coming (should_cache with the value)
    ending_at: float | None = None    # the prompt ended unclaimed: released after GRACE


@dataclass
class DedupeCounters:
    leases: int = 0            # leases granted to this instance (it computed the key)
    waits: int = 0             # pre-execution misses that waited for another instance
    wait_hits: int = 0         # ... and got the value
    wait_timeouts: int = 0     # ... and ran out of time (then computed)
    takeovers: int = 0         # ... and were granted the lease after all (the holder stopped, failed, released)
    lease_errors: int = 0      # lease calls that failed or timed out (then computed without a lease)
    skipped: int = 0           # pre-execution misses computed without asking: the mesh was just unreachable
    cheap: int = 0             # pre-execution misses of nodes known to be cheap here: computed without a lease
    uncached: int = 0          # ... of nodes whose holder said its value is not stored: computed at once
    wait_seconds: float = 0.0
    saved_seconds: float = 0.0  # compute seconds this instance did not spend, thanks to the waits that hit


class Dedupe:
    def __init__(self, client: MeshClient, costs: ComputeCosts, *, max_wait: float, holder: str | None = None,
                 call_timeout: float = CALL_TIMEOUT, available: Callable[[], bool] = lambda: True) -> None:
        """`call_timeout`: the deadline of one lease call (at most the lookup deadline: a prompt pays no more
        for a lease than for a lookup); `available()`: False while the lookups' breaker is open (bridge.py)."""
        self.client = client
        self.costs = costs
        self.max_wait = max_wait
        self.call_timeout = call_timeout
        self.available = available
        self._down_until = 0.0
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.counters = DedupeCounters()
        self.prompt_waits = 0
        self.prompt_wait_seconds = 0.0
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}
        self._pool = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="mesh-provider-lease")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keeper, name="mesh-provider-leases", daemon=True)
        self._thread.start()

    # -- on ComfyUI's event loop -----------------------------------------------------------------------------

    async def before_compute(self, key: str, class_type: str, prompt: str,
                             fetch: Callable[[], Awaitable[Any]]) -> Any:
        """The pre-execution miss of `key`: a value (from another instance's computation, via `fetch`) or None
        when this instance computes the node now (holding the lease, or without one). Never raises."""
        known = self.costs.ceiling(class_type, key)
        if known is not None and known < CHEAP:
            # No lease and no wait: an earlier node's unclaimed lease may stay until the next lease asked for
            # (its store task may not have run yet), as this instance waits on nobody here.
            self._count("cheap")
            return None
        if time.monotonic() < self._down_until or not self.available():
            self._count("skipped")
            self._release_unclaimed(prompt, key)
            return None
        try:
            answer = await self._ask(key, class_type)
        except Exception as e:
            self._failed(key, e)
            return None
        finally:
            self._release_unclaimed(prompt, key)  # earlier nodes of this prompt whose values are not coming
        if answer.state == HELD:
            self._release_unclaimed(prompt, key, waiting=True)  # no lease is held while this instance waits
        if answer.state == GRANTED:
            self._hold(key, class_type, prompt)
            return None
        if answer.state == DONE:
            return await self._take(key, class_type, fetch, 0.0, answer)
        if answer.state == COMPUTE:  # its holder will not store it: nobody's value to wait for
            self._count("uncached")
            return None
        return await self._wait(key, class_type, prompt, fetch, answer)

    async def _wait(self, key: str, class_type: str, prompt: str, fetch: Callable[[], Awaitable[Any]],
                    answer: Answer) -> Any:
        bound = self.wait_bound(class_type, key, answer)
        # Past the bound, a holder still answered HELD (it renewed within TTL: alive) is waited for up to
        # MESH_DEDUPE_MAX_WAIT, unless this instance measured this very key: see "Bounded" above.
        live_bound = bound if self.costs.measured(key) is not None else max(bound, self.max_wait)
        started = time.monotonic()
        interval = FIRST_POLL
        longest = min(MAX_POLL, max(FIRST_POLL, POLL_SHARE * max(0.0, bound - HANDOVER)))
        self._count("waits")
        self.prompt_waits += 1
        log.debug("waiting up to %.1f s for %s (%s), computed by %s", bound, key, class_type, answer.holder)
        try:
            while True:
                remaining = started + (live_bound if answer.state == HELD else bound) - time.monotonic()
                if remaining <= 0:
                    self._count("wait_timeouts")
                    return None
                await asyncio.sleep(min(interval, remaining))
                interval = min(longest, interval * BACKOFF)
                try:
                    answer = await self._ask(key, class_type)
                except Exception as e:
                    self._failed(key, e)
                    return None
                if answer.state == GRANTED:  # the holder stopped renewing, failed or gave up: compute here
                    self._count("takeovers")
                    self._hold(key, class_type, prompt)
                    return None
                if answer.state == DONE:
                    return await self._take(key, class_type, fetch, time.monotonic() - started, answer)
                if answer.state == COMPUTE:  # the holder computed it and will not store it: compute here, now
                    self._count("uncached")
                    return None
        finally:
            waited = time.monotonic() - started
            self.prompt_wait_seconds += waited
            with self._lock:
                self.counters.wait_seconds += waited

    async def _take(self, key: str, class_type: str, fetch: Callable[[], Awaitable[Any]], waited: float,
                    answer: Answer) -> Any:
        found = await fetch()
        if found is None:
            return None  # said done, yet not readable (evicted, its owner just went): compute
        # What the wait saved: the value's cost as its writer measured it (the figure hits count too), else ours.
        saved = getattr(found, "compute_seconds", 0.0) or self.costs.expected(class_type, key) \
            or answer.expected_seconds or waited
        with self._lock:
            self.counters.wait_hits += 1
            self.counters.saved_seconds += saved
        return found

    def _failed(self, key: str, error: BaseException) -> None:
        """A lease call failed: compute without one, and ask for no lease for a while (one deadline, not one per
        node, while the mesh does not answer)."""
        self._count("lease_errors")
        self._down_until = time.monotonic() + BREAKER_OPEN
        log.debug("lease on %s failed: %r", key, error)

    def wait_bound(self, class_type: str, key: str, answer: Answer) -> float:
        """What computing would take by the best figure known (this key's own here; else the longest of this
        class type's recent figures here and the holder's own figure), plus the hand-over, capped by
        MESH_DEDUPE_MAX_WAIT. A key measured here is bounded by that alone; for any other, the wait goes on past
        this while the holder stays alive (see the module docstring, "Bounded")."""
        measured = self.costs.measured(key)
        if measured is not None:
            expected: float | None = measured
        else:
            expected = max(self.costs.ceiling(class_type) or 0.0, answer.expected_seconds or 0.0)
        bound = expected + HANDOVER if expected else DEFAULT_WAIT
        return max(0.0, min(self.max_wait, bound))

    async def _ask(self, key: str, class_type: str) -> Answer:
        expected = self.costs.ceiling(class_type, key) or 0.0
        job = self._pool.submit(self.client.lease, key, self.holder, self.call_timeout, ttl=TTL, expected=expected)
        return await asyncio.wait_for(asyncio.wrap_future(job), self.call_timeout + 0.25)

    # -- holding ----------------------------------------------------------------------------------------------

    def _hold(self, key: str, class_type: str, prompt: str) -> None:
        with self._lock:
            self.counters.leases += 1
            self._held[key] = _Held(class_type, prompt, self.costs.ceiling(class_type, key) or 0.0)

    def holds(self, key: str) -> bool:
        with self._lock:
            return key in self._held

    def promise(self, key: str) -> None:
        """ComfyUI will hand the value of `key` (the node that just ran) to a store task: keep its lease past
        this prompt's next lookups (a ComfyUI may run store tasks only after the prompt), until the store claims
        it, this instance is about to wait for another's lease, or GRACE after the prompt's end."""
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                held.promised = True

    def claim(self, key: str) -> bool:
        """A store of `key` takes its lease over (on_store): True if this instance holds it. The store then
        calls stored(key, ...) once the value is in the mesh, or will not be."""
        with self._lock:
            held = self._held.get(key)
            if held is None:
                return False
            held.claimed = True
            return True

    def stored(self, key: str, ok: bool, uncached: bool = False) -> None:
        """The claimed store of `key` finished: release the lease, as done when the value is in the mesh, as
        `uncached` when it never will be (too cheap to keep, not cacheable): then waiters compute at once."""
        self._release(key, ok, uncached)

    def _release_unclaimed(self, prompt: str, current: str, waiting: bool = False) -> None:
        """Release the prompt's earlier leases no store claimed: those whose value is not coming, and, when
        this instance is about to wait (`waiting`), the promised ones too (a lease is never held while waiting)."""
        with self._lock:
            gone = [k for k, h in self._held.items()
                    if h.prompt == prompt and not h.claimed and k != current and (waiting or not h.promised)]
        for key in gone:
            self._release(key, False)

    def prompt_end(self, prompt: str) -> None:
        """Leases of the prompt not claimed by a store within GRACE are released (the node failed or was
        interrupted; or the value is not cacheable)."""
        now = time.monotonic()
        with self._lock:
            for held in self._held.values():
                if held.prompt == prompt and not held.claimed and held.ending_at is None:
                    held.ending_at = now
        self.prompt_waits = 0
        self.prompt_wait_seconds = 0.0

    def _release(self, key: str, done: bool, uncached: bool = False) -> None:
        with self._lock:
            if self._held.pop(key, None) is None:
                return
        try:
            self._pool.submit(self._call_release, key, done, uncached)
        except RuntimeError:
            pass  # closed: the lease lapses on its own within TTL

    def _call_release(self, key: str, done: bool, uncached: bool = False) -> None:
        try:
            self.client.lease(key, self.holder, self.call_timeout, release=True, done=done, uncached=uncached)
        except Exception as e:  # the lease lapses on its own within TTL
            log.debug("release of lease on %s failed: %r", key, e)

    def _keeper(self) -> None:
        """Renews held leases every RENEW_EVERY; releases those whose prompt ended unclaimed after GRACE."""
        while not self._stop.wait(0.1):
            now = time.monotonic()
            with self._lock:
                ended = [k for k, h in self._held.items()
                         if not h.claimed and h.ending_at is not None and now - h.ending_at > GRACE]
                due = [(k, h) for k, h in self._held.items() if now - h.renewed_at >= RENEW_EVERY and k not in ended]
            for key in ended:
                self._release(key, False)
            for key, held in due:
                held.renewed_at = now
                try:
                    answer = self.client.lease(key, self.holder, self.call_timeout, ttl=TTL, expected=held.expected)
                except Exception as e:
                    log.debug("renewal of lease on %s failed: %r", key, e)
                    continue  # the next renewal may get through; the lease lapses otherwise
                if answer.state != GRANTED:  # lost (lapsed and taken) or done: nothing left to hold
                    with self._lock:
                        self._held.pop(key, None)

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.counters, name, getattr(self.counters, name) + 1)

    def stats(self) -> dict[str, float]:
        with self._lock:
            out = {f"provider_dedupe_{k}": float(v) for k, v in self.counters.__dict__.items()}
            out["provider_dedupe_held"] = float(len(self._held))
        return out

    def close(self) -> None:
        """Release every held lease now, while the client still answers (best effort, each call under its
        deadline: a lease not released lapses within TTL), and stop."""
        self._stop.set()
        with self._lock:
            keys = list(self._held)
            self._held.clear()
        for key in keys:
            self._call_release(key, False)
        self._pool.shutdown(wait=False)
