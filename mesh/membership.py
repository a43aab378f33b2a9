"""Who is in the mesh: seeds, discovered peers, heartbeats, suspicion, join and leave.

A simplified SWIM. Every `interval` a node pings each member it knows (and each candidate address from seeds
or zeroconf); the Ping RPC carries the sender's member list, so one seed is enough to learn the whole mesh.
Liveness is decided from a node's own direct contact only: a member not heard from for `suspect_after` is
SUSPECT (still an owner in the ring, so a busy host does not reshuffle placement), after `dead_after` it is
DEAD and leaves the ring; any answer makes it ALIVE again. Gossip only introduces addresses and spreads
graceful leaves: a member is admitted only after it proved the cluster secret to us in the Hello handshake
(mesh/auth.py) and then answered our Ping under the node id it proved, so neither a zeroconf advert nor a
peer's hearsay lets a node without the secret in.

Incarnations start at the node's start time in milliseconds, so a node restarted with the same id always
supersedes what the mesh remembers of its previous life.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field

import mesh
from mesh.address import join_hostport
from mesh.peer import MeshError, Unauthenticated
from mesh.peers import PeerPool
from mesh.pb import mesh_pb2 as pb

log = logging.getLogger(__name__)

ALIVE, SUSPECT, DEAD, LEFT = pb.ALIVE, pb.SUSPECT, pb.DEAD, pb.LEFT
IN_RING = (ALIVE, SUSPECT)


class ClusterMismatch(ValueError):
    """A ping from another cluster or protocol version."""


@dataclass(frozen=True)
class Timing:
    """Defaults detect a killed node in about 5 s on a LAN without flapping under a busy ComfyUI host."""

    interval: float = 0.5
    ping_timeout: float = 1.0
    suspect_after: float = 2.0
    dead_after: float = 5.0
    retry_dead_every: float = 5.0
    forget_after: float = 600.0
    seed_refresh: float = 5.0


@dataclass
class Member:
    node_id: str
    address: str
    capacity: int
    incarnation: int
    state: int = ALIVE
    last_heard: float = field(default_factory=time.monotonic)
    keys: int = 0
    bytes: int = 0

    def to_pb(self, now: float) -> pb.Member:
        return pb.Member(node_id=self.node_id, address=self.address, state=self.state,
                         incarnation=self.incarnation, capacity=self.capacity,
                         last_heard_age=max(0.0, now - self.last_heard), keys=self.keys, bytes=self.bytes)


def ring_weights(members: Iterable[pb.Member]) -> dict[str, float]:
    """node id -> ring weight of the members that own keys, from a member list as Stats reports it."""
    return {m.node_id: float(m.capacity or 1) for m in members if m.state in IN_RING}


def resolve_seeds(seeds: list[str], unresolved: dict[str, str] | None = None) -> dict[str, str]:
    """address -> the seed it came from; `dns:NAME:PORT` expands to every A/AAAA record (a Kubernetes
    headless service). Seeds that do not resolve go into `unresolved` (seed -> why)."""
    out: dict[str, str] = {}
    for seed in seeds:
        seed = seed.strip()
        if not seed:
            continue
        if not seed.startswith("dns:"):
            out[seed] = seed
            continue
        name, _, port = seed[4:].rpartition(":")
        try:
            infos = socket.getaddrinfo(name, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as e:
            if unresolved is not None:
                unresolved[seed] = str(e)
            continue
        for _, _, _, _, sockaddr in infos:
            out[join_hostport(sockaddr[0], port)] = seed
    return out


def plausible(incarnation: int) -> bool:
    """Incarnations start at a node's start time in ms and grow by one per refutation: one more than a day
    ahead of our clock is a forgery (and near 2**64 it would not even encode)."""
    return 0 <= incarnation <= int(time.time() * 1000) + 86_400_000


@dataclass
class _Backoff:
    """When to try a candidate that did not answer again: 1 s, doubling, at most 30 s."""

    failures: int = 0
    next_try: float = 0.0

    def failed(self, now: float) -> None:
        self.failures += 1
        self.next_try = now + min(30.0, 2.0 ** (self.failures - 1))


class Membership:
    def __init__(self, *, me: Member, cluster: str, peers: PeerPool, seeds: list[str] | None = None,
                 timing: Timing | None = None, on_change: Callable[[], None] = lambda: None,
                 on_restart: Callable[[str], None] = lambda node_id: None,
                 local_stats: Callable[[], tuple[int, int]] = lambda: (0, 0)) -> None:
        self.me = me
        self.cluster = cluster
        self.timing = timing or Timing()
        self._peers = peers
        self._seeds = list(seeds or [])
        self._on_change = on_change
        self._on_restart = on_restart
        self._local_stats = local_stats
        self._lock = threading.RLock()
        self._members: dict[str, Member] = {}
        self._candidates: set[str] = set()
        self._self_addresses: set[str] = {me.address}
        self._refused: set[str] = set()
        self._backoff: dict[str, _Backoff] = {}        # candidate address -> when to try it again
        self._seed_of: dict[str, str] = {}             # candidate address -> the seed it came from
        self._seed_problems: dict[str, str] = {}       # seed -> why it gave no member (for status and the log)
        self._warned: dict[str, float] = {}            # seed -> when its problem was last logged
        self._last_dead_retry = 0.0
        self._last_seed_refresh = -1e9
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="mesh-ping")

    # -- views -------------------------------------------------------------------------------------------------

    def ring_members(self) -> dict[str, int]:
        """node id -> capacity of every member that owns keys: ALIVE or SUSPECT, ourselves unless leaving."""
        with self._lock:
            out = {m.node_id: m.capacity for m in self._members.values() if m.state in IN_RING}
            if self.me.state in IN_RING:
                out[self.me.node_id] = self.me.capacity
            return out

    def address_of(self, node_id: str) -> str | None:
        if node_id == self.me.node_id:
            return self.me.address
        with self._lock:
            m = self._members.get(node_id)
            return m.address if m else None

    def members(self) -> list[Member]:
        with self._lock:
            return [Member(**vars(m)) for m in self._members.values()]

    def members_pb(self) -> list[pb.Member]:
        now = time.monotonic()
        self._refresh_me(now)
        with self._lock:
            return [self.me.to_pb(now)] + [m.to_pb(now) for m in self._members.values()]

    def add_candidate(self, address: str) -> None:
        """An address worth pinging (zeroconf, gossip); admitted only if it answers our authenticated ping."""
        with self._lock:
            if address not in self._self_addresses and not any(
                    m.address == address and m.state in IN_RING for m in self._members.values()):
                self._candidates.add(address)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self, join_timeout: float = 3.0) -> None:
        if self._seeds or self._candidates:
            self.join(join_timeout)
        self._thread = threading.Thread(target=self._run, name="mesh-membership", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timing.ping_timeout + 2)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def leave(self) -> None:
        """Announce a graceful leave: peers drop us from their rings at once instead of after dead_after."""
        with self._lock:
            self.me.state = LEFT
            self.me.incarnation += 1
            targets = [m.address for m in self._members.values() if m.state in IN_RING]
        list(self._pool.map(self._ping, targets))

    # -- the protocol ------------------------------------------------------------------------------------------

    def handle_ping(self, request: pb.PingRequest) -> pb.PingReply:
        if request.cluster != self.cluster:
            raise ClusterMismatch(f"ping from cluster {request.cluster!r}, this node is in {self.cluster!r}")
        if request.protocol != mesh.PROTOCOL_VERSION:
            raise ClusterMismatch(f"protocol {request.protocol} unsupported (this node speaks {mesh.PROTOCOL_VERSION})")
        sender = request.sender
        with self._lock:
            known = self._members.get(sender.node_id)
        if known is not None and known.address == sender.address:
            self._observe(sender)
        elif sender.node_id and sender.node_id != self.me.node_id and sender.state in IN_RING:
            # A member we have not proven ourselves (new, or claiming a new address): only a candidate, admitted
            # once it proves the secret, its id and that address to our own Hello.
            self.add_candidate(sender.address)
        self._merge(request.members)
        return pb.PingReply(responder=self._me_pb(), members=self.members_pb())

    def _request(self) -> pb.PingRequest:
        return pb.PingRequest(cluster=self.cluster, protocol=mesh.PROTOCOL_VERSION, sender=self._me_pb(),
                              members=self.members_pb())

    def _me_pb(self) -> pb.Member:
        now = time.monotonic()
        self._refresh_me(now)
        return self.me.to_pb(now)

    def _refresh_me(self, now: float) -> None:
        self.me.keys, self.me.bytes = self._local_stats()
        self.me.last_heard = now

    def _ping(self, address: str) -> bool:
        try:
            reply = self._peers.client(address).ping(self._request(), timeout=self.timing.ping_timeout)
        except Unauthenticated as e:
            if address not in self._refused:
                log.warning("not admitting %s: %s", address, e)
                self._refused.add(address)
            with self._lock:
                self._candidates.discard(address)
                seed = self._seed_of.get(address)
                if seed is not None:
                    self._seed_problems[seed] = f"{address} is not a member: {e}"  # logged just above
            self._peers.failed(address)
            return False
        except MeshError as e:
            log.debug("ping %s failed: %s", address, e)
            self._peers.failed(address)
            with self._lock:
                if address in self._candidates:
                    self._backoff.setdefault(address, _Backoff()).failed(time.monotonic())
                seed = self._seed_of.get(address)
            if seed is not None:
                self._seed_problem(seed, f"{address} does not answer: {e}")
            return False
        with self._lock:
            self._backoff.pop(address, None)
            seed = self._seed_of.get(address)
            if seed is not None:
                self._seed_problems.pop(seed, None)
        client = self._peers.client(address)
        proven = client.proven_node_id
        if proven is not None and (reply.responder.node_id != proven
                                   or reply.responder.address != client.proven_address):
            log.warning("not admitting %s: it proved the secret as %r at %s but answers as %r at %s", address,
                        proven, client.proven_address, reply.responder.node_id, reply.responder.address)
            self._peers.failed(address)
            return False
        if reply.responder.node_id == self.me.node_id:
            with self._lock:
                self._self_addresses.add(address)
                self._candidates.discard(address)
            return True
        with self._lock:
            self._candidates.discard(address)
        self._observe(reply.responder)
        self._merge(reply.members)
        return True

    def _observe(self, m: pb.Member) -> None:
        """Direct, authenticated contact with `m`: the one source of liveness."""
        if m.node_id == self.me.node_id or not m.node_id or m.capacity < 1 or not plausible(m.incarnation):
            return
        now = time.monotonic()
        with self._lock:
            known = self._members.get(m.node_id)
            new_state = LEFT if m.state == LEFT else ALIVE
            if known is None:
                self._members[m.node_id] = Member(m.node_id, m.address, m.capacity, m.incarnation, new_state,
                                                  now, m.keys, m.bytes)
                changed = new_state in IN_RING
                restarted = False
                log.info("member %s joined at %s", m.node_id, m.address)
            else:
                if m.incarnation < known.incarnation:
                    return  # a message from the member's previous life
                # A new life (it restarted, possibly empty) or back from DEAD: its copies need repair.
                restarted = new_state != LEFT and (m.incarnation > known.incarnation or known.state == DEAD)
                changed = (known.state in IN_RING) != (new_state in IN_RING) or known.capacity != m.capacity
                if known.state != new_state:
                    log.info("member %s is %s", m.node_id, pb.MemberState.Name(new_state))
                if known.address != m.address:
                    self._peers.forget(known.address)
                    changed = True
                known.address, known.capacity, known.incarnation = m.address, m.capacity, m.incarnation
                known.state, known.last_heard, known.keys, known.bytes = new_state, now, m.keys, m.bytes
            self._candidates.discard(m.address)
        self._peers.heard(m.address)
        if changed:
            self._on_change()
        if restarted:
            self._on_restart(m.node_id)

    def _merge(self, members: list[pb.Member]) -> None:
        """Hearsay: learn addresses and graceful leaves, never liveness."""
        changed = False
        with self._lock:
            for m in members:
                if not plausible(m.incarnation):
                    continue  # an incarnation from the far future is a forgery: it would pin a member forever
                if m.node_id == self.me.node_id:
                    if m.state == LEFT and m.incarnation >= self.me.incarnation and self.me.state != LEFT:
                        self.me.incarnation = m.incarnation + 1  # refute a stale leave from our previous life
                    continue
                known = self._members.get(m.node_id)
                if known is None or (m.incarnation > known.incarnation and known.state not in IN_RING):
                    if m.state in IN_RING and m.address not in self._self_addresses:
                        self._candidates.add(m.address)
                elif m.state == LEFT and m.incarnation >= known.incarnation and known.state != LEFT:
                    known.state, known.incarnation = LEFT, m.incarnation
                    changed = True
                    log.info("member %s left (heard by gossip)", m.node_id)
        if changed:
            self._on_change()

    def _reap(self) -> None:
        t = self.timing
        now = time.monotonic()
        changed = False
        with self._lock:
            for node_id, m in list(self._members.items()):
                age = now - m.last_heard
                if m.state in IN_RING:
                    state = ALIVE if age < t.suspect_after else SUSPECT if age < t.dead_after else DEAD
                    if state != m.state:
                        log.info("member %s is %s (silent %.1f s)", node_id, pb.MemberState.Name(state), age)
                        changed |= state == DEAD
                        m.state = state
                elif age > t.forget_after:
                    del self._members[node_id]
                    self._peers.forget(m.address)
        if changed:
            self._on_change()

    def _seed_problem(self, seed: str, why: str) -> None:
        """A seed that gives no member is a warning naming it (once a minute), not silence: a fleet that quietly
        splits into one-node meshes is worse than a noisy log."""
        now = time.monotonic()
        with self._lock:
            self._seed_problems[seed] = why
            if now - self._warned.get(seed, -1e9) < 60.0:
                return
            self._warned[seed] = now
        log.warning("seed %s: %s", seed, why)

    @property
    def has_seeds(self) -> bool:
        return any(s.strip() for s in self._seeds)

    def seed_problems(self) -> dict[str, str]:
        with self._lock:
            return dict(self._seed_problems)

    def _targets(self, now: float) -> set[str]:
        t = self.timing
        if now - self._last_seed_refresh >= t.seed_refresh:
            self._last_seed_refresh = now
            unresolved: dict[str, str] = {}
            resolved = resolve_seeds(self._seeds, unresolved)
            for seed, why in unresolved.items():
                self._seed_problem(seed, f"does not resolve: {why}")
            with self._lock:
                self._seed_of.update(resolved)
                for seed in list(self._seed_problems):
                    if seed.startswith("dns:") and seed not in unresolved and seed in resolved.values():
                        self._seed_problems.pop(seed, None)
            for address in resolved:
                self.add_candidate(address)
        retry_dead = now - self._last_dead_retry >= t.retry_dead_every
        if retry_dead:
            self._last_dead_retry = now
        with self._lock:
            targets = {m.address for m in self._members.values()
                       if m.state in IN_RING or (retry_dead and m.state == DEAD)}
            targets |= {a for a in self._candidates if a not in self._backoff or self._backoff[a].next_try <= now}
            return targets - self._self_addresses

    def _round(self) -> None:
        pending = [self._pool.submit(self._ping, a) for a in self._targets(time.monotonic())]
        futures.wait(pending, timeout=self.timing.ping_timeout + 0.5)
        self._reap()

    def join(self, timeout: float = 3.0) -> None:
        """Contact seeds and the members they name before serving, so a new node starts with a full ring."""
        deadline = time.monotonic() + timeout
        for _ in range(4):
            self._round()
            with self._lock:
                if not self._candidates or time.monotonic() >= deadline:
                    return

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            if self.me.state != LEFT:
                try:
                    self._round()
                except RuntimeError:
                    break  # pool shut down while stopping
                except Exception:  # pragma: no cover - the loop must survive anything
                    log.exception("membership round failed")
            self._stop.wait(max(0.0, self.timing.interval - (time.monotonic() - started)))
