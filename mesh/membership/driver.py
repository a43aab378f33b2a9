"""Who is in the mesh: the threaded gRPC driver around the pure SWIM protocol (swim.py, members.py beside it).

The protocol decides; this module only carries its Pings over gRPC, runs its clock on one thread, resolves
seeds, and tells the node what changed. Why the split: the protocol's behaviour at a thousand members is
shown by scripts/sim_membership.py running the very same code, and every rule is a unit test.

Trust is where it was: a member is admitted only after it proved the cluster secret to us in the Hello
handshake (mesh/transport/auth.py) and then answered our own Ping under the node id and address it proved; that
answer is the only *authentic* record of a member (and an inbound Ping counts as one only from a member we
already proved at that very address). Gossip from others can suspect a member or declare it DEAD at the
incarnation we know, or name an address worth a dial, never more (mesh/membership/members.py).

A join the protocol refuses (two nodes under one id, a member that advertises loopback among hosts: see
Swim.refusal) is a warning in the log of both nodes, the refused one being told why (FAILED_PRECONDITION), and a
line of `mesh status` on both while it goes on: a fleet that quietly fails to form is the failure to avoid.

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
from dataclasses import dataclass

import grpc

import mesh
from mesh.address import join_hostport
from mesh.membership.members import (ALIVE, DEAD, IN_RING, LEFT, SUSPECT, AddressChanged, Change, Contested, Forgotten,
                                     Joined, Limits, Member, MemberTable, Refuted, Restarted, StateChanged, plausible)
from mesh.transport.peer import MeshError, Refused, Unauthenticated
from mesh.transport.peers import PeerPool
from mesh.pb import mesh_pb2 as pb
from mesh.membership.swim import Config, JoinRefused, Swim

log = logging.getLogger(__name__)

__all__ = ["ALIVE", "SUSPECT", "DEAD", "LEFT", "IN_RING", "ClusterMismatch", "Timing", "Member", "Membership",
           "ring_weights", "resolve_seeds", "plausible"]


REFUSAL_WINDOW = 60.0   # s a refusal (ours or a peer's) stays in `mesh status` after it was last seen
REFUSAL_LOG_EVERY = 60.0  # s between log lines about one refusal
MAX_REFUSALS = 64


class ClusterMismatch(ValueError):
    """A ping from another cluster or protocol version."""


# A sweep (Swim.cut_off) sends up to this many Pings a period, each on its own thread of a pool of this size
# (a blocked gRPC call holds one until its deadline, under a period): a sweep never waits for a thread, and
# never takes one from a probe.
SWEEP_WORKERS = 32


@dataclass(frozen=True)
class Timing:
    """`interval` is SWIM's probe period; a member that misses a probe is SUSPECT, and DEAD once the
    suspicion window (at least dead_after - suspect_after, Lifeguard-scaled by log n and confirmations) passes
    unrefuted. Defaults detect a killed node in a few seconds on a LAN without flapping on a busy host."""

    interval: float = 0.5
    ping_timeout: float = 1.0
    suspect_after: float = 2.0
    dead_after: float = 5.0
    forget_after: float = 600.0
    seed_refresh: float = 5.0

    def swim(self, cluster: str) -> Config:
        return Config(cluster=cluster, protocol=mesh.PROTOCOL_VERSION, period=self.interval,
                      probe_timeout=min(self.ping_timeout, max(0.05, self.interval / 2)),
                      dial_timeout=self.ping_timeout, max_sweep=SWEEP_WORKERS)

    def limits(self) -> Limits:
        return Limits(period=self.interval, forget_after=self.forget_after,
                      min_suspicion=max(self.interval, self.dead_after - self.suspect_after))


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


def _detail(e: MeshError) -> str:
    """What the other node said, without translate()'s `node ADDRESS: CODE:` prefix."""
    return str(e).split("FAILED_PRECONDITION: ", 1)[-1]


class _Slot:
    """Where the protocol puts its answer to one inbound Ping (at once, or after an indirect probe)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: pb.PingReply | None = None


class Membership:
    def __init__(self, *, me: Member, cluster: str, peers: PeerPool, seeds: list[str] | None = None,
                 timing: Timing | None = None, on_change: Callable[[list[Change]], None] = lambda changes: None,
                 on_restart: Callable[[str], None] = lambda node_id: None,
                 local_stats: Callable[[], tuple[int, int]] = lambda: (0, 0)) -> None:
        self.cluster = cluster
        self.timing = timing or Timing()
        self._peers = peers
        self._seeds = list(seeds or [])
        self._on_change = on_change
        self._on_restart = on_restart
        self._local_stats = local_stats
        self._lock = threading.RLock()
        self.revoked: frozenset[str] = frozenset()  # member ids kept out of the ring (certificate names)
        # With revocations: address -> certificate name (mesh/transport/revocation.py), and who passed.
        self.certificate_name: Callable[[str], str | None] | None = None
        self._verified: dict[str, str] = {}            # node id -> the address its certificate was seen at
        self._verifying: set[tuple[str, str]] = set()
        self._epoch = time.monotonic()
        self.table = MemberTable(me, self.timing.limits(), wall_offset_ms=time.time() * 1000.0)
        self.swim = Swim(self.table, self, self.timing.swim(cluster))
        self.swim.on_refused = lambda address, why: self._note_refusal(why)
        self._refused: set[str] = set()
        self._seed_of: dict[str, str] = {}             # candidate address -> the seed it came from
        self._seed_problems: dict[str, str] = {}       # seed -> why it gave no member (for status and the log)
        self._warned: dict[str, float] = {}            # seed -> when its problem was last logged
        # Refused joins, ours of others and others' of us (an id clash, a loopback address): message -> when
        # last seen, last logged. Named in the log on both sides and in `mesh status` while they go on.
        self._refusals: dict[str, tuple[float, float]] = {}
        self._last_seed_refresh = -1e9
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="mesh-ping")
        self._sweep_pool = futures.ThreadPoolExecutor(max_workers=SWEEP_WORKERS, thread_name_prefix="mesh-sweep")
        # One thread tells the node, in order: a later change must never be overtaken by an earlier one.
        self._notifier = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-members")
        self._leaving: list[futures.Future[None]] = []
        self.counters: dict[str, int] = {"pings_in": 0, "pings_out": 0, "ping_bytes_in": 0, "ping_bytes_out": 0,
                                         "pings_refused": 0}

    @property
    def me(self) -> Member:
        return self.table.me

    def _now(self) -> float:
        """Seconds on the protocol's clock: monotonic, starting near 0 (the table's wall offset is at 0)."""
        return time.monotonic() - self._epoch

    # -- views -------------------------------------------------------------------------------------------------

    def ring_members(self) -> dict[str, int]:
        """node id -> capacity of every member that owns keys: ALIVE or SUSPECT, ourselves unless leaving, and
        never a revoked one (mesh/transport/revocation.py): no key is routed to it. With revocations, only
        members whose certificate was seen to carry their node id (`_verify`)."""
        with self._lock:
            ring = self.table.ring()
            if not self.revoked:
                return ring
            me = self.table.me.node_id
            addresses = {k: (self.table.me.address if k == me else self.table.get(k).address)  # type: ignore[union-attr]
                         for k in ring}
        out: dict[str, int] = {}
        for node_id, weight in ring.items():
            if node_id in self.revoked:
                continue
            if node_id == me or self._verified.get(node_id) == addresses[node_id]:
                out[node_id] = weight
            else:
                self._verify(node_id, addresses[node_id])
        return out

    def _verify(self, node_id: str, address: str) -> None:
        """Check, once per member and address and in the background, that the certificate at `address` names
        `node_id`; once it does, the ring is rebuilt with the member in it."""
        if self.certificate_name is None or (node_id, address) in self._verifying:
            return
        self._verifying.add((node_id, address))

        def check() -> None:
            assert self.certificate_name is not None
            name = self.certificate_name(address)
            if name == node_id and name not in self.revoked:
                self._verified[node_id] = address
                self._pool_notify([Joined(node_id, address, 0)])  # the ring is rebuilt with it
            else:
                log.warning("not routing to member %s at %s: its certificate names %s", node_id, address,
                            name or "nothing we trust")
                self._verifying.discard((node_id, address))  # asked again on the next ring change

        try:
            self._pool.submit(check)
        except RuntimeError:
            pass  # stopping

    def address_of(self, node_id: str) -> str | None:
        if node_id in self.revoked:
            return None  # nothing is fetched from, nor written to, a revoked member
        with self._lock:
            if node_id == self.table.me.node_id:
                return self.table.me.address
            m = self.table.get(node_id)
            return m.address if m else None

    def known_members(self) -> list[str]:
        with self._lock:
            ids = [self.table.me.node_id] + [m.node_id for m in self.table.members.values() if m.state != LEFT]
        return [i for i in ids if i not in self.revoked]

    def members(self) -> list[Member]:
        with self._lock:
            return [Member(**{f: getattr(m, f) for f in Member.__slots__}) for m in self.table.members.values()]

    def members_pb(self) -> list[pb.Member]:
        now = self._now()
        self._refresh_me(now)
        with self._lock:
            return [self.table.me.to_pb(now)] + [m.to_pb(now) for m in self.table.members.values()]

    def add_candidate(self, address: str) -> None:
        """An address worth pinging (zeroconf); admitted only if it answers our authenticated ping."""
        with self._lock:
            self.swim.add_candidate(address, self._now())
        self._wake.set()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def start(self, join_timeout: float = 3.0) -> None:
        self._refresh_seeds(self._now())
        self._thread = threading.Thread(target=self._run, name="mesh-membership", daemon=True)
        self._thread.start()
        self.join(join_timeout)

    def join(self, timeout: float = 3.0) -> None:
        """Wait (bounded) until the seeds and the members they name were dialled, so that a new node starts
        with a ring that has its peers in it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            with self._lock:
                if not self.table.candidates:
                    return
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timing.ping_timeout + 2)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sweep_pool.shutdown(wait=False, cancel_futures=True)
        self._notifier.shutdown(wait=False, cancel_futures=True)

    def leave(self) -> None:
        """Announce a graceful leave to every member: they drop us from their rings at once."""
        with self._lock:
            self._leaving = []
            self._dispatch(self.swim.leave(self._now()))
            pending = list(self._leaving)
        futures.wait(pending, timeout=self.timing.ping_timeout + 0.5)

    # -- the transport the protocol sends through ------------------------------------------------------------------

    def send(self, address: str, request: pb.PingRequest, seq: int, timeout: float, bulk: bool = False) -> None:
        """Called by the protocol under our lock: the call itself runs on a pool (a sweep's on its own)."""
        try:
            f = (self._sweep_pool if bulk else self._pool).submit(self._call, address, request, seq, timeout)
        except RuntimeError:
            return  # stopping
        if request.sender.state == LEFT:
            self._leaving.append(f)

    def reply(self, token: object, reply: pb.PingReply) -> None:
        assert isinstance(token, _Slot)
        token.reply = reply
        token.done.set()

    def _call(self, address: str, request: pb.PingRequest, seq: int, timeout: float) -> None:
        client = self._peers.client(address)
        with self._lock:
            self.counters["pings_out"] += 1
            self.counters["ping_bytes_out"] += request.ByteSize()
        try:
            reply = client.ping(request, timeout=timeout)
        except Unauthenticated as e:
            if address not in self._refused:
                log.warning("not admitting %s: %s", address, e)
                self._refused.add(address)
            with self._lock:
                self.table.give_up(address, self._now())
                seed = self._seed_of.get(address)
                if seed is not None:
                    self._seed_problems[seed] = f"{address} is not a member: {e}"  # logged just above
            self._peers.failed(address)
            return
        except Refused as e:
            if e.code == grpc.StatusCode.FAILED_PRECONDITION:  # it will not have us: say why, do not retry in silence
                self._note_refusal(f"{address} refused this node ({self.table.me.node_id} at "
                                   f"{self.table.me.address}): {_detail(e)}")
            else:
                log.debug("ping %s failed: %s", address, e)
            return
        except MeshError as e:
            log.debug("ping %s failed: %s", address, e)
            with self._lock:
                seed = self._seed_of.get(address) if address in self.table.candidates else None
            if seed is not None:
                self._seed_problem(seed, f"{address} does not answer: {e}")
            return
        proven = client.proven_node_id
        if proven is not None and (reply.responder.node_id != proven
                                   or reply.responder.address != client.proven_address):
            log.warning("not admitting %s: it proved the secret as %r at %s but answers as %r at %s", address,
                        proven, client.proven_address, reply.responder.node_id, reply.responder.address)
            self._peers.failed(address)
            return
        self._peers.heard(address)
        with self._lock:
            seed = self._seed_of.get(address)
            if seed is not None:
                self._seed_problems.pop(seed, None)
            changes = self.swim.handle_reply(seq, reply, self._now())
            self._dispatch(changes)
        self._wake.set()

    # -- inbound -----------------------------------------------------------------------------------------------

    def handle_ping(self, request: pb.PingRequest) -> pb.PingReply:
        if request.cluster != self.cluster:
            raise ClusterMismatch(f"ping from cluster {request.cluster!r}, this node is in {self.cluster!r}")
        if request.protocol != mesh.PROTOCOL_VERSION:
            raise ClusterMismatch(f"protocol {request.protocol} unsupported (this node speaks {mesh.PROTOCOL_VERSION})")
        slot = _Slot()
        now = self._now()
        with self._lock:
            self.counters["pings_in"] += 1
            self.counters["ping_bytes_in"] += request.ByteSize()
            if self.table.authentic_sender(request.sender):
                self._peers.heard(request.sender.address)
            try:
                self._dispatch(self.swim.handle_request(request, slot, now))
            except JoinRefused:
                self.counters["pings_refused"] += 1
                raise  # the caller is told why (FAILED_PRECONDITION); ours is logged (on_refused)
        self._wake.set()  # an indirect probe has a nack deadline for the loop to keep
        slot.done.wait(self.timing.interval * 2 + self.timing.ping_timeout)
        if slot.reply is None:
            with self._lock:
                return pb.PingReply(responder=self.table.me.record(), nack=True)
        return slot.reply

    # -- telling the node ----------------------------------------------------------------------------------------

    def _dispatch(self, changes: list[Change]) -> None:
        """Log and hand on what changed (called under our lock; the callbacks must not call back into us
        from another thread while waiting for it)."""
        if not changes:
            return
        for c in changes:
            if isinstance(c, StateChanged):
                log.info("member %s is %s (incarnation %d)", c.node_id, pb.MemberState.Name(c.new), c.incarnation)
            elif isinstance(c, AddressChanged):
                log.info("member %s moved from %s to %s", c.node_id, c.old, c.new)
                self._peers.forget(c.old)
            elif isinstance(c, Forgotten):
                self._peers.forget(c.address)
            elif isinstance(c, Restarted):
                log.info("member %s restarted or came back", c.node_id)
            elif isinstance(c, Joined):
                log.info("member %s joined at %s", c.node_id, c.address)
            elif isinstance(c, Refuted):
                log.info("refuted a suspicion of this node (incarnation now %d)", c.incarnation)
            elif isinstance(c, Contested):
                continue  # logged by on_refused
            else:
                log.info("%s", c)
        self._pool_notify(changes)

    def _pool_notify(self, changes: list[Change]) -> None:
        try:
            self._notifier.submit(self._notify, changes)
        except RuntimeError:
            pass  # stopping

    def _notify(self, changes: list[Change]) -> None:
        self._on_change(changes)
        for c in changes:
            if isinstance(c, Restarted):
                self._on_restart(c.node_id)

    # -- seeds -------------------------------------------------------------------------------------------------

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

    def _note_refusal(self, why: str) -> None:
        """A join refused, by us or of us: a warning (once a minute each), and in `mesh status` for a while."""
        now = time.monotonic()
        with self._lock:
            _, logged = self._refusals.get(why, (now, -1e9))
            self._refusals[why] = (now, logged if now - logged < REFUSAL_LOG_EVERY else now)
            if len(self._refusals) > MAX_REFUSALS:
                oldest = min(self._refusals, key=lambda k: self._refusals[k][0])
                del self._refusals[oldest]
        if now - logged >= REFUSAL_LOG_EVERY:
            log.warning("%s", why)

    def refusals(self) -> list[str]:
        """The refusals seen within REFUSAL_WINDOW seconds."""
        now = time.monotonic()
        with self._lock:
            return sorted(why for why, (seen, _) in self._refusals.items() if now - seen <= REFUSAL_WINDOW)

    @property
    def has_seeds(self) -> bool:
        return any(s.strip() for s in self._seeds)

    def seed_problems(self) -> dict[str, str]:
        with self._lock:
            return dict(self._seed_problems)

    def warnings(self) -> list[str]:
        """What an operator should fix, for `mesh stats`: seeds that are not members, a mesh of one by mistake."""
        out = [f"seed {seed}: {why}" for seed, why in sorted(self.seed_problems().items())]
        out += self.refusals()
        if self.has_seeds and len(self.ring_members()) <= 1:
            out.append("this node has seeds but no peers: it is a mesh of one")
        return out

    def stats(self) -> dict[str, float]:
        """The gossip counters, named for `mesh stats` and /metrics."""
        with self._lock:
            out = {f"membership_{k}": float(v) for k, v in self.counters.items()}
            c = self.swim.counters  # a partition seen from here (Swim.cut_off): how often, what it cost
            out.update(membership_cut_off=float(c.cut_off), membership_sweeps=float(c.sweeps),
                       membership_sweep_suspicions=float(c.sweep_suspicions))
            return out

    def _refresh_seeds(self, now: float) -> None:
        """Seeds (re-resolved: a DNS name may have new records) are candidates until they answer as members."""
        self._last_seed_refresh = now
        if not self.has_seeds:
            return
        unresolved: dict[str, str] = {}
        resolved = resolve_seeds(self._seeds, unresolved)
        for seed, why in unresolved.items():
            self._seed_problem(seed, f"does not resolve: {why}")
        with self._lock:
            self._seed_of.update(resolved)
            for seed in list(self._seed_problems):
                if seed.startswith("dns:") and seed not in unresolved and seed in resolved.values():
                    self._seed_problems.pop(seed, None)
            known = {m.address for m in self.table.members.values() if m.state in IN_RING}
            for address in resolved:
                if address not in known and address not in self._refused:
                    self.swim.add_candidate(address, now)

    def _refresh_me(self, now: float) -> None:
        keys, used = self._local_stats()
        with self._lock:
            self.table.me.keys, self.table.me.bytes = keys, used
            self.table.me.last_heard = now

    # -- the clock -----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        last_scan = -1e9
        while not self._stop.is_set():
            self._wake.clear()
            now = self._now()
            try:
                if now - self._last_seed_refresh >= self.timing.seed_refresh:
                    self._refresh_seeds(now)
                self._refresh_me(now)
                with self._lock:
                    if now - last_scan >= self.timing.interval:
                        last_scan = now
                        for m in self.table.members.values():
                            if m.state == ALIVE and not self._peers.usable(m.address):
                                # The data path failed there; its breaker closes on its next answer: ask soon.
                                self.swim.probe_soon(m.node_id)
                    self._dispatch(self.swim.tick(now))
                    wake = self.swim.next_wakeup()
            except Exception:  # pragma: no cover - the loop must survive anything
                log.exception("membership tick failed")
                wake = now + self.timing.interval
            self._wake.wait(min(1.0, max(0.005, wake - self._now())))
