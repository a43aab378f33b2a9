"""SWIM failure detection and gossip with the Lifeguard refinements, as a pure state machine.

Why pure: the protocol's cost and correctness at a thousand members can only be shown by running it at a
thousand members, which no test machine can do with processes. This object does no I/O, starts no thread and
reads no clock: the driver (mesh/membership/driver.py over gRPC, or scripts/sim_membership.py over a simulated
network) calls `tick(now)` when `next_wakeup()` comes, hands it requests and replies, and sends what it asks
through a `Transport`. Every entry point returns the member-table changes it made (mesh/membership/members.py).

Per period, one probe (a Ping) to one member, in a shuffled round-robin order (every member is probed once per
pass; new members go in at a random place). No ack within the probe timeout: k other members are asked to
probe it for us (Ping with `probe`); they answer ack, or nack when it stays silent. No ack by the end of the
period: we suspect it, and the suspicion spreads by gossip until it is refuted by the member itself or its
timeout (members.py) declares it DEAD. Members we hear are suspected are probed by us next, so a live member's
own answer clears the suspicion where it was heard, and a dead one's silence confirms it quickly.

Gossip rides on every message: at most `max_piggyback` recent changes, the least-sent first, each sent about
retransmit_mult * log10(n) times. A push-pull exchange of whole member tables with one random member repairs
what gossip missed; its period grows with n so that its cost per node stays flat. A partition's heal is where
stale news is most dangerous (each side holds the other DEAD at the incarnation the other holds ALIVE, and DEAD
wins a tie): a member back from DEAD is told so and refutes, and its news and ours from the cut are not
applied (Swim._revived).

Cut off from most of the ring (Swim.cut_off): one probe a period is how SWIM finds one failure, not a
partition's other side. A node whose random probes fail while the helpers that answer it nack sweeps the ring
with direct Pings, suspects what stays silent to two of them, and, once a member it held DEAD answers (a
heal), asks every member it holds DEAD in the same batches (_sweep_back).

Lifeguard: a local health score (0..max_awareness) stretches our probe timeouts while we miss acks and nacks
(a slow node must not accuse others of its own slowness), and helpers nack so we can tell the two apart. Only
the silence of helpers we heard from lately counts (Swim._health): members across a partition are silent to
everyone on our side, and blaming ourselves for that slowed the minority's detection of the cut eightfold.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from mesh.membership.members import (ALIVE, DEAD, IN_RING, LEFT, SUSPECT, AddressChanged, Change, Contested, Joined,
                          MemberTable, Refuted, Restarted, StateChanged)
from mesh.pb import mesh_pb2 as pb


class JoinRefused(ValueError):
    """A Ping we do not answer, and why, in words for both logs: the caller's (it is told) and ours."""


ID_FIX = ("give one of them another --node-id (MESH_NODE_ID), or delete its <data-dir>/node-id and restart it "
          "(a new id is drawn)")
LOOPBACK_FIX = ("it must listen on the LAN (--listen / MESH_LISTEN 0.0.0.0:PORT) or set the address peers dial "
                "(--advertise / MESH_ADVERTISE HOST:PORT)")


def clash_message(node_id: str, holder: str, claimant: str, holder_is_me: bool = False) -> str:
    moved = "" if holder_is_me else f" (if the one at {holder} restarted at {claimant}, this clears once it is DEAD)"
    return (f"node id {node_id!r} is claimed by two nodes, at {holder} and at {claimant}: refused, a member never "
            f"replaces another{moved}; " + ID_FIX)


def loopback_message(address: str, me: str) -> str:
    return (f"the node at {address} advertises a loopback address, which no other host can reach: refused by "
            f"{me}; " + LOOPBACK_FIX)


class Transport(Protocol):
    """Sends Pings. A reply comes back through Swim.handle_reply(seq, ...), and only if the transport checked
    that it was sent by the member it names as responder; a lost or refused call simply never comes back."""

    def send(self, address: str, request: pb.PingRequest, seq: int, timeout: float, bulk: bool = False) -> None:
        """`bulk`: a sweep Ping (Swim._sweep), many at once to members likely silent: the driver runs them apart
        from probes, so they can never delay a probe's own Ping, and drops what it cannot run in time."""

    def reply(self, token: object, reply: pb.PingReply) -> None: ...


@dataclass(frozen=True)
class Config:
    cluster: str = "default"
    protocol: int = 2
    period: float = 0.4             # one probe per period
    probe_timeout: float = 0.2      # direct ack deadline, then indirect probes until the period ends
    indirect_k: int = 3
    retransmit_mult: int = 4        # lambda: each change is piggybacked about lambda * log10(n) times
    max_piggyback: int = 6
    sync_every: float = 30.0        # push-pull period up to sync_scale members, then growing linearly with n
    sync_scale: int = 8
    max_awareness: int = 8
    dials_per_period: int = 4       # candidate dials: bounds what a flood of gossiped addresses can cost
    dial_timeout: float = 1.0
    # Heal. A DEAD member is asked again now and then: that heals a partition without gossip. In a fleet of
    # more than retry_dead_rate * retry_dead_every members, one probe turn every retry_dead_every s goes to
    # a random DEAD member (a side of hundreds crosses within a fraction of a second of the heal). A smaller
    # fleet sends an extra Ping to one every ALIVE / retry_dead_rate s, at least retry_dead_min (taking probe
    # turns that often slowed a 2|3 minority's detection from 13 to 19 s): about retry_dead_rate crossings a
    # second whatever the side's size, so every table is whole again about 2 s after the heal, not 9 s. (The
    # extra Ping at 1,000 members left more false DEADs after a 10|990 heal in the simulator: 16 in 6 runs,
    # against 6 with the probe turn.)
    retry_dead_every: float = 10.0
    retry_dead_min: float = 2.0
    retry_dead_rate: float = 2.5
    fresh_periods: int = 3          # a helper heard from directly within this many periods is "fresh"
    soon_full_after: int = 10       # probe_soon probes fully a member not heard from for this many periods
    rr_every: int = 4               # the round robin has at least every rr_every-th probe (_pick_target)
    queue_rr_after: int = 8         # ... even before new suspects, when more than this many wait to be probed
    # Cut off (see Swim._cut_off): of the last cut_window round-robin probes, cut_failed failed although a
    # helper answered (nacked) in time; evidence older than cut_horizon periods does not count.
    cut_window: int = 3
    cut_failed: int = 3
    cut_horizon: int = 40
    # The sweep while cut off: a direct Ping to every ALIVE member not heard from lately, the whole ring in
    # about sweep_periods periods, at most max_sweep a period; a member silent to sweep_strikes of them, at
    # least a period apart, is suspected.
    sweep_periods: int = 8
    max_sweep: int = 128
    sweep_strikes: int = 2
    sweep_quiet: int = 10           # "not heard from lately": for this many periods (a flapping link's phase)


@dataclass
class _Probe:
    target: str
    address: str
    deadline: float                 # direct ack expected by then
    end: float                      # indirect acks expected by then, else suspicion
    indirect: bool = True
    acked: bool = False
    helpers_asked: int = 0
    nacks: int = 0
    fresh: set[int] | None = None   # seqs of the helpers we had just heard from (their silence is ours)
    fresh_nacks: int = 0
    helpers: dict[int, str] | None = None   # seq -> helper node id, until it answers
    sample: bool = False            # the round robin's pick: a uniform sample of the ring (Swim._cut_off)


@dataclass
class _Relay:
    token: object
    nack_at: float


@dataclass
class _Broadcast:
    record: pb.Member
    transmits: int = 0


@dataclass
class _Pending:
    kind: str                       # probe | helper | relay | dial | sync | leave
    deadline: float
    key: object = None


@dataclass
class Counters:
    probes: int = 0
    indirect: int = 0
    suspicions: int = 0
    refutations: int = 0
    dials: int = 0
    syncs: int = 0
    dead_retries: int = 0
    cut_off: int = 0                # times this node found itself cut off from most of the ring
    sweeps: int = 0                 # sweep Pings sent
    sweep_suspicions: int = 0


class Swim:
    def __init__(self, table: MemberTable, transport: Transport, config: Config | None = None,
                 rng: random.Random | None = None) -> None:
        self.table = table
        self.transport = transport
        self.config = config or Config()
        self.rng = rng or random.Random()
        self.awareness = 0
        self.counters = Counters()
        self._seq = 0
        self._pending: dict[int, _Pending] = {}
        self._probe: _Probe | None = None
        self._probe_seq = -1
        self._relays: dict[int, _Relay] = {}
        self._order: list[str] = []
        self._next_probe = 0.0
        self._next_dial = 0.0
        self._next_sync: float | None = None
        self._next_dead_retry = 0.0
        self._next_small_retry = 0.0
        self._jitter = random.Random(table.me.node_id)  # its own stream: the probe order's draws stay as they were
        # Suspects and hinted members; the flag: indirect probes too (the first probe of a suspect can confirm
        # it, and goes before everything; later ones only wait for its own answer: see _pick_target).
        self._to_probe: dict[str, bool] = {}
        # probe_soon's members: a direct probe each, taking every other turn from the round robin.
        self._soon: dict[str, None] = {}
        # Hinted members (a refutation or a new life heard of): a direct probe each, before the round robin.
        self._check: dict[str, None] = {}
        self._turn = 0                  # counts picks: every rr_every-th turn is the round robin's
        self._queue: dict[tuple[str, str], _Broadcast] = {}
        # Members we brought back from DEAD at the incarnation they died at: told so in what we send them
        # until they refute (see _revived).
        self._tell_dead: dict[str, int] = {}
        self._silent: dict[str, float] = {}   # node id -> when it last failed to answer us (probe or helper)
        # Told of every member we refuse (address, why): the driver logs it and shows it in `mesh status`.
        self.on_refused: Callable[[str, str], None] = lambda address, why: None
        # Cut-off detection and the sweep (see _cut_off).
        self._samples: deque[tuple[float, bool]] = deque(maxlen=self.config.cut_window)
        self._was_cut_off = False
        self._next_sweep = 0.0
        self._sweep_order: list[str] = []
        self._sweeping: dict[str, float] = {}     # node id -> when its sweep Ping went out (one at a time)
        self._strikes: dict[str, tuple[int, float]] = {}   # node id -> silent sweep Pings, when the last was
        # After a heal (_revived), the members we hold DEAD, to be asked in sweep batches (_sweep_back).
        self._back_order: list[str] = []
        self._back_budget = 0
        self._next_back = 0.0
        self._next_back_round = 0.0

    # -- helpers -----------------------------------------------------------------------------------------------

    def _me(self, now: float) -> pb.Member:
        return self.table.me.record()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _scaled(self, seconds: float) -> float:
        return seconds * (1 + self.awareness)

    def _awareness(self, delta: int) -> None:
        self.awareness = min(self.config.max_awareness - 1, max(0, self.awareness + delta))

    def retransmit_limit(self) -> int:
        return self.config.retransmit_mult * max(1, math.ceil(math.log10(self.table.alive_count() + 1)))

    def _request(self, now: float, to: str | None, gossip: bool = True, **fields: object) -> pb.PingRequest:
        return pb.PingRequest(cluster=self.config.cluster, protocol=self.config.protocol, sender=self._me(now),
                              updates=self._piggyback(now, to, gossip), **fields)  # type: ignore[arg-type]

    def _send(self, address: str, request: pb.PingRequest, kind: str, timeout: float, now: float,
              key: object = None) -> int:
        seq = self._next_seq()
        self._pending[seq] = _Pending(kind, now + timeout, key)
        if kind == "sweep":
            self.transport.send(address, request, seq, timeout, bulk=True)
        else:
            self.transport.send(address, request, seq, timeout)
        return seq

    # -- dissemination -----------------------------------------------------------------------------------------

    def broadcast(self, record: pb.Member) -> None:
        """Queue a record for piggybacking; it supersedes what is queued about the same member (a SUSPECT
        from another suspecter is a confirmation and travels too)."""
        node_id = record.node_id
        if record.state != SUSPECT:
            for key in [k for k in self._queue if k[0] == node_id]:
                del self._queue[key]
            self._queue[(node_id, "")] = _Broadcast(record)
        else:
            self._queue.pop((node_id, ""), None)
            self._queue[(node_id, record.suspecter)] = _Broadcast(record)

    def _piggyback(self, now: float, to: str | None, gossip: bool = True) -> list[pb.Member]:
        """What rides on a message to `to`: what it must hear from us (its suspicion, its death), then, if
        `gossip`, the least-sent recent changes (not on sweep Pings: sent by the hundred to members that are
        mostly silent, they would only cost the choosing)."""
        out: list[pb.Member] = []
        limit = self.config.max_piggyback
        known = None
        if to is not None:
            # Lifeguard's buddy system: a member we suspect hears it from us first, so it can refute.
            known = self.table.get(to)
            if known is not None and known.state == SUSPECT:
                rec = known.record()
                rec.suspecter = self.table.me.node_id
                out.append(rec)
            dead_at = self._tell_dead.get(to)
            if dead_at is not None:
                if known is None or known.state != ALIVE or known.incarnation > dead_at:
                    del self._tell_dead[to]  # it refuted (or is gone again): nothing left to tell
                else:
                    out.append(pb.Member(node_id=to, address=known.address, state=DEAD, incarnation=dead_at,
                                         capacity=known.capacity))
        if not self._queue or not gossip:
            return out
        chosen = sorted(self._queue.items(), key=lambda kv: kv[1].transmits)[:limit - len(out)]
        most = self.retransmit_limit()
        # To a member that went silent on us since we last heard from it, gossip rides along but does not
        # count as sent: after a cut most of our messages go across it and are lost, and counting them used
        # up a suspicion's transmits before it reached the members on our side (who must confirm it).
        counts = known is None or self._answers(known) if to is not None else True
        for key, b in chosen:
            out.append(b.record)
            if counts:
                b.transmits += 1
            if b.transmits >= most:
                del self._queue[key]
        return out

    def _react(self, changes: list[Change], now: float, about: pb.Member | None = None) -> list[Change]:
        """What each change makes us gossip and probe."""
        for c in changes:
            if isinstance(c, Refuted):
                self.counters.refutations += 1
                self._awareness(+1)  # Lifeguard: being suspected hints that we are the slow one
                self.broadcast(self._me(now))
                continue
            known = self.table.get(c.node_id)
            if known is None:
                continue
            if isinstance(c, Contested):
                self.on_refused(c.claimed, clash_message(c.node_id, c.address, c.claimed))
                self._to_probe.setdefault(c.node_id, True)  # is the holder still there? A restart elsewhere if not
                continue
            if isinstance(c, Joined):
                if self._order:
                    self._order.insert(self.rng.randint(0, len(self._order)), c.node_id)
                self.broadcast(known.record())
            elif isinstance(c, StateChanged):
                if c.new == SUSPECT:
                    by = about.suspecter if about is not None and about.state == SUSPECT else ""
                    self.broadcast(pb.Member(node_id=known.node_id, address=known.address, state=SUSPECT,
                                             incarnation=known.incarnation, capacity=known.capacity,
                                             suspecter=by or self.table.me.node_id))
                    self._to_probe.setdefault(c.node_id, True)
                elif c.old == SUSPECT and c.new == ALIVE:
                    # Cleared by its own answer: stop spreading the suspicion. Its refutation is its own to
                    # spread; others cannot take it from us anyway, and they ask it themselves.
                    for key in [k for k in self._queue if k[0] == c.node_id]:
                        del self._queue[key]
                else:
                    self.broadcast(known.record())
            elif isinstance(c, (AddressChanged, Restarted)):
                self.broadcast(known.record())
        return changes

    def _merge(self, sender: pb.Member, sender_authentic: bool, updates: list[pb.Member], now: float
               ) -> list[Change]:
        changes: list[Change] = []
        for u in updates[: 2 * self.config.max_piggyback]:
            authentic = sender_authentic and u.node_id == sender.node_id
            if u.state == SUSPECT and not authentic:
                before = self.table.confirmations(u.node_id)
                got = self.table.apply(u, now, authentic=False, source=u.suspecter or sender.node_id)
                after = self.table.confirmations(u.node_id)
                if not got and after > before and after <= self.table.limits.expected_confirmations:
                    self.broadcast(u)  # a new independent confirmation: others should count it too
                changes += self._react(got, now, u)
            else:
                got = self.table.apply(u, now, authentic=authentic, source=sender.node_id)
                changes += self._react(got, now, u)
                if u.state == DEAD and any(isinstance(c, Refuted) for c in got):
                    changes += self._healed(now)  # declared DEAD while alive: someone was cut off from us
        self._take_hints()
        return changes

    def _apply_own(self, record: pb.Member, now: float) -> tuple[list[Change], bool]:
        """A member's own record, from itself. Also says whether the rest of what it brings is stale (see
        _revived) and is not to be applied: we held it DEAD, or brought it back and it has not yet refuted."""
        known = self.table.get(record.node_id)
        dead_at = known.incarnation if known is not None and known.state == DEAD else None
        told = self._tell_dead.get(record.node_id)
        changes = self._react(self.table.apply(record, now, authentic=True), now)
        if dead_at is None:
            return changes, told is not None and record.incarnation <= told
        known = self.table.get(record.node_id)
        if known is not None and known.state == ALIVE:
            changes += self._revived(known.node_id, dead_at if known.incarnation == dead_at else None, now)
        return changes, True

    def _revived(self, node_id: str, dead_at: int | None, now: float) -> list[Change]:
        """A member we held DEAD answered: a partition between us healed (or it restarted).

        Why the care: DEAD beats ALIVE at equal incarnation, and after a partition each side holds the other
        DEAD at the incarnation everyone else still holds ALIVE. So (1) what a member we held DEAD tells us
        about others is not applied (it was cut off from us: its SUSPECT and DEAD records are news from the
        other side of the cut, about members we can reach), only its own record, until it refutes; (2) a
        member brought back at the incarnation it died at is told so in what we send it next, so that it
        refutes with a higher incarnation that outbids every stale DEAD still held or in flight elsewhere (the
        buddy system, for DEAD), and its refutation is also how it learns that the cut healed; (3) on either
        side of the heal (here, and where a DEAD of us is refuted) we drop our queued SUSPECT and DEAD records
        and withdraw our running suspicions (_healed). A member whose stale DEAD or SUSPECT still reaches us
        by a push-pull is probed, not marked (_merge_table)."""
        if dead_at is None:
            return []  # a new life: a restart, which says nothing about the others
        self._tell_dead[node_id] = dead_at
        c = self.config
        if not self._back_order and now >= self._next_back_round:
            # The cut that made us hold them DEAD has healed, for this one at least: ask every member we hold
            # DEAD, in sweep batches, instead of one every retry_dead_every s (a side that swept 990 members
            # DEAD would otherwise take minutes to see them back). One round per retry_dead_every at most.
            self._next_back_round = now + c.retry_dead_every
            self._back_order = [m.node_id for m in self.table.members.values()
                                if m.state == DEAD and m.node_id != node_id]
            self.rng.shuffle(self._back_order)
            self._back_budget = min(c.max_sweep, math.ceil(len(self._back_order) / c.sweep_periods))
            self._next_back = now
        return self._healed(now)

    def _healed(self, now: float) -> list[Change]:
        """Our view was cut off from part of the mesh and is whole again: a member answered at the incarnation
        we held it DEAD at, or we had to refute our own DEAD. The SUSPECT and DEAD records we queued, and the
        suspicions we hold, come from silence that the cut explains: dropped and withdrawn (back to ALIVE, and
        re-probed), or they would reach, and expire into DEADs of, members that are back in reach, spreading
        at equal incarnation. The cost, where this happens without a partition (a node paused past its
        suspicion timeout), is that a failure under suspicion at that moment is detected one probe later."""
        for key in [k for k, b in self._queue.items() if b.record.state in (SUSPECT, DEAD)]:
            del self._queue[key]
        self._strikes.clear()
        self._samples.clear()  # the cut's evidence: not about the mesh we see now
        withdrawn = self.table.withdraw_suspicions()
        for c in withdrawn:
            self._to_probe.setdefault(c.node_id, False)
        return self._react(withdrawn, now)

    def _about(self, updates: list[pb.Member], node_ids: tuple[str, ...]) -> list[pb.Member]:
        return [u for u in updates if u.node_id in node_ids]

    def _take_hints(self) -> None:
        """Members whose newer life hearsay announced: probed next, where their own answer can prove it."""
        for node_id in self.table.hints:
            self._check.setdefault(node_id, None)
        self.table.hints.clear()

    # -- refusals ------------------------------------------------------------------------------------------------

    def refusal(self, record: pb.Member) -> str | None:
        """Why a node's own record (a Ping's sender, a reply's responder) is not taken, or None: it claims our id
        or that of a member in the ring at another address (cloned hosts), or it advertises a loopback address
        where we are reachable from other hosts."""
        me = self.table.me
        if not record.node_id or record.state not in IN_RING:
            return None
        if record.node_id == me.node_id:
            if record.address and record.address != me.address:
                return clash_message(me.node_id, me.address, record.address, holder_is_me=True)
            return None
        known = self.table.get(record.node_id)
        if known is not None and known.state in IN_RING and known.address != record.address:
            self._to_probe.setdefault(known.node_id, True)  # the holder's own answer, or its silence, decides
            return clash_message(known.node_id, known.address, record.address)
        if self.table.unreachable(record.address):
            return loopback_message(record.address, me.address)
        return None

    # -- inbound -------------------------------------------------------------------------------------------------

    def handle_request(self, request: pb.PingRequest, token: object, now: float) -> list[Change]:
        """A Ping from someone. The reply goes out through transport.reply(token, ...): at once, or, for an
        indirect probe, once the member answered us or stayed silent past the nack time."""
        sender = request.sender
        why = self.refusal(sender)
        if why is not None:
            self.on_refused(sender.address, why)
            raise JoinRefused(why)
        changes: list[Change] = []
        authentic = stale = False
        if sender.node_id and sender.node_id != self.table.me.node_id:
            authentic = self.table.authentic_sender(sender)
            if authentic:
                got, stale = self._apply_own(sender, now)
                changes += got
            elif sender.state in IN_RING:
                self.table.add_candidate(sender.address, now)  # admitted once it answers our own probe
        updates = list(request.updates)
        if stale:
            updates = self._about(updates, (sender.node_id, self.table.me.node_id))
        changes += self._merge(sender, authentic, updates, now)
        if request.sync and not stale:
            changes += self._merge_table(sender, list(request.members), now)
        if request.HasField("probe"):
            # Only members we know, where we know them: nobody can make us dial an address of their choice.
            target = self.table.get(request.probe.node_id)
            if target is None or target.address != request.probe.address or target.state == LEFT:
                self.transport.reply(token, pb.PingReply(responder=self._me(now), nack=True))
                return changes
            c = self.config
            nack_after = 0.8 * max(c.probe_timeout, c.period - c.probe_timeout)
            seq = self._send(request.probe.address, self._request(now, request.probe.node_id), "relay",
                             nack_after, now)
            self._relays[seq] = _Relay(token, now + nack_after)
            return changes
        reply = pb.PingReply(responder=self._me(now), updates=self._piggyback(now, sender.node_id or None))
        if request.sync:
            reply.members.extend(self.full_table(now))
        self.transport.reply(token, reply)
        return changes

    def _merge_table(self, sender: pb.Member, members: list[pb.Member], now: float) -> list[Change]:
        """Push-pull: a whole table is hearsay, but for the sender's own record; SUSPECT and DEAD in it only make
        us probe (below)."""
        self.counters.syncs += 1
        changes: list[Change] = []
        for m in members[: self.table.limits.max_members]:
            if m.node_id == sender.node_id:
                continue
            known = self.table.get(m.node_id)
            if m.state in (SUSPECT, DEAD) and known is not None and known.state in IN_RING:
                # A whole table is old news: its SUSPECT or DEAD of a member we still hold in the ring may
                # be from a partition that since healed (and DEAD would win at equal incarnation). Our own
                # probe of it decides, and counts as a confirmation if it is silent.
                if len(self._to_probe) < self.table.limits.max_hints:
                    self._to_probe.setdefault(m.node_id, True)
                continue
            changes += self._react(self.table.apply(m, now, authentic=False, source=sender.node_id), now, m)
        self._take_hints()
        return changes

    def full_table(self, now: float) -> list[pb.Member]:
        return [self._me(now)] + [m.record() for m in self.table.members.values()]

    def handle_reply(self, seq: int, reply: pb.PingReply, now: float) -> list[Change]:
        """The answer to one of our Pings; its responder was checked by the transport."""
        p = self._pending.pop(seq, None)
        if p is None:
            return []
        changes: list[Change] = []
        r = reply.responder
        if p.kind == "dial":
            self.table.candidates.pop(str(p.key), None)
        why = self.refusal(r)
        if why is not None:
            self.on_refused(r.address or str(p.key), why)
            return []
        if p.kind == "dial" and r.node_id == self.table.me.node_id:
            self.table.is_me(str(p.key))
            return []
        stale = False
        if r.node_id and r.node_id != self.table.me.node_id:
            got, stale = self._apply_own(r, now)
            changes += got
        updates = list(reply.updates)
        if stale:
            updates = self._about(updates, (r.node_id, self.table.me.node_id))
        changes += self._merge(r, True, updates, now)
        if reply.members and not stale:
            changes += self._merge_table(r, list(reply.members), now)
        probe = self._probe
        if p.kind == "probe" and probe is not None and p.key == self._probe_seq:
            if r.node_id == probe.target and not probe.acked:
                probe.acked = True
                self._awareness(-1)
        elif p.kind == "helper" and probe is not None and p.key == self._probe_seq:
            if probe.helpers is not None:
                probe.helpers.pop(seq, None)
            if reply.nack:
                probe.nacks += 1
                if probe.fresh is not None and seq in probe.fresh:
                    probe.fresh_nacks += 1
            elif not probe.acked:
                probe.acked = True
                self._awareness(-1)
        elif p.kind == "sweep":
            self._sweeping.pop(str(p.key), None)
            self._strikes.pop(str(p.key), None)
        elif p.kind == "relay":
            relay = self._relays.pop(seq, None)
            if relay is not None:
                self.transport.reply(relay.token, pb.PingReply(responder=self._me(now),
                                                               updates=self._piggyback(now, None)))
        return changes

    # -- the clock ---------------------------------------------------------------------------------------------

    def next_wakeup(self) -> float:
        times = [self._next_probe]
        if self._probe is not None and not self._probe.acked:
            times.append(self._probe.deadline if not self._probe.helpers_asked and self._probe.indirect
                         else self._probe.end)
        times += [r.nack_at for r in self._relays.values()]
        if self.table.candidates:
            times.append(self._next_dial)
        for node_id in self.table.suspicions:
            d = self.table.suspicion_deadline(node_id)
            if d is not None:
                times.append(d)
        if self._next_sync is not None:
            times.append(self._next_sync)
        if self._was_cut_off:
            times.append(self._next_sweep)  # (unanswered sweep Pings are seen to at the tick after their deadline)
        if self._back_order:
            times.append(self._next_back)
        return min(times)

    def sync_period(self) -> float:
        c = self.config
        return c.sync_every * max(1.0, self.table.alive_count() / c.sync_scale)

    def tick(self, now: float) -> list[Change]:
        if self.table.me.state == LEFT:
            return []
        changes: list[Change] = []
        changes += self._react(self.table.expire(now), now)
        for seq, relay in list(self._relays.items()):
            if now >= relay.nack_at:
                del self._relays[seq]
                self._pending.pop(seq, None)
                self.transport.reply(relay.token, pb.PingReply(responder=self._me(now), nack=True))
        for seq, p in list(self._pending.items()):
            if now >= p.deadline + 0.001:
                del self._pending[seq]
                if p.kind == "dial":
                    self.table.candidate_failed(str(p.key), now)
                elif p.kind == "sweep":
                    changes += self._sweep_silent(str(p.key), now)
        changes += self._advance_probe(now)
        changes += self._sweep(now)
        self._sweep_back(now)
        if self.table.candidates and now >= self._next_dial:
            self._next_dial = now + self.config.period
            joining = self.table.alive_count() <= 1
            for address in self.table.due_candidates(now, self.config.dials_per_period):
                self.counters.dials += 1
                self._send(address, self._request(now, None, sync=joining,
                                                  members=self.full_table(now) if joining else []),
                           "dial", self.config.dial_timeout, now, key=address)
        every = self.config.retry_dead_every
        if now >= self._next_small_retry and self.table.alive_count() < self.config.retry_dead_rate * every:
            c = self.config
            every = max(c.retry_dead_min, self.table.alive_count() / c.retry_dead_rate)
            self._next_small_retry = now + self._jitter.uniform(0.5, 1.5) * every  # spread: a side does not beat
            dead = [m for m in self.table.members.values() if m.state == DEAD]
            if dead:
                m = self._jitter.choice(dead)
                self.counters.dead_retries += 1
                self._send(m.address, self._request(now, m.node_id), "retry", self.config.dial_timeout, now)
        if self._next_sync is None:
            self._next_sync = now + self.rng.uniform(0.0, self.sync_period())
        elif now >= self._next_sync:
            self._next_sync = now + self.sync_period()
            alive = [m for m in self.table.members.values() if m.state == ALIVE]
            if alive:
                m = self.rng.choice(alive)
                self._send(m.address, self._request(now, m.node_id, sync=True, members=self.full_table(now)),
                           "sync", self.config.dial_timeout, now)
        return changes

    def _advance_probe(self, now: float) -> list[Change]:
        changes: list[Change] = []
        probe = self._probe
        c = self.config
        if probe is not None and not probe.acked:
            if probe.indirect and not probe.helpers_asked and now >= probe.deadline:
                helpers = [m for m in self.table.members.values()
                           if m.state == ALIVE and m.node_id != probe.target]
                # Members we heard from lately: they are the ones that can relay for us, and only their
                # silence says something about our own health (see _health below).
                fresh_after = now - c.fresh_periods * c.period
                fresh = [m for m in helpers if m.last_heard >= fresh_after and self._answers(m)]
                stale = [m for m in helpers if not (m.last_heard >= fresh_after and self._answers(m))]
                chosen = self.rng.sample(fresh, min(c.indirect_k, len(fresh)))
                # Short of fresh ones, those that answered us last: after a cut, the members on our side
                # (whoever answers is), which keeps them fresh; random ones would mostly be across the cut.
                chosen += heapq.nlargest(c.indirect_k - len(chosen), stale,
                                         key=lambda m: (self._answers(m), m.last_heard))
                fresh_ids = {m.node_id for m in fresh}
                probe.fresh, probe.helpers = set(), {}
                target = self.table.get(probe.target)
                if target is not None:
                    # A second direct try alongside the helpers (memberlist's TCP fallback): one lost
                    # datagram should not be all it takes to need three others.
                    self._send(probe.address, self._request(now, probe.target), "probe", probe.end - now, now,
                               key=self._probe_seq)
                for h in chosen if target else []:
                    self.counters.indirect += 1
                    seq = self._send(h.address, self._request(now, h.node_id, probe=target.record()), "helper",
                                     probe.end - now, now, key=self._probe_seq)
                    probe.helpers_asked += 1
                    probe.helpers[seq] = h.node_id
                    if h.node_id in fresh_ids:
                        probe.fresh.add(seq)
                if not probe.helpers_asked:
                    probe.helpers_asked = -1  # nobody to ask: wait for the end
            if now >= probe.end:
                self._probe = None
                self._went_silent([probe.target, *(probe.helpers or {}).values()], now)
                known = self.table.get(probe.target)
                if known is not None and known.state == SUSPECT:
                    self._to_probe[probe.target] = False  # only its own answer clears it here: ask again
                if probe.indirect and known is not None and known.state in IN_RING:
                    self.counters.suspicions += 1
                    before = self.table.confirmations(probe.target)
                    got = self.table.suspect(probe.target, now, by=self.table.me.node_id)
                    if not got and self.table.confirmations(probe.target) > before:
                        rec = known.record()
                        rec.state, rec.suspecter = SUSPECT, self.table.me.node_id
                        self.broadcast(rec)
                    changes += self._react(got, now)
                    self._to_probe[probe.target] = False
                    self._turn = 0  # its first re-probe next: it hears the suspicion from us first
                if probe.indirect:  # retries of suspects and DEAD members say nothing about our own health
                    self._awareness(self._health(probe))
                if probe.sample and probe.nacks:
                    self._samples.append((now, True))  # silent to us and to a helper that answered us
        elif probe is not None and now >= probe.end:
            self._probe = None
            if probe.sample:
                self._samples.append((now, False))
            known = self.table.get(probe.target)
            if known is not None and known.state == SUSPECT:
                self._to_probe[probe.target] = False  # acked through a helper only: ask it directly again
        if self._probe is None and now >= self._next_probe:
            target, indirect, sample = self._pick_target(now)
            self._next_probe = now + c.period
            if target is not None:
                known = self.table.get(target)
                assert known is not None
                self.counters.probes += 1
                self._probe_seq = self._next_seq()
                self._send(known.address, self._request(now, target), "probe", self._scaled(c.period), now,
                           key=self._probe_seq)
                self._probe = _Probe(target, known.address, now + self._scaled(c.probe_timeout),
                                     now + self._scaled(c.period), indirect, sample=sample)
                self._next_probe = self._probe.end
        return changes

    # -- cut off from most of the ring -------------------------------------------------------------------------

    def cut_off(self, now: float) -> bool:
        """Whether we are cut off from most of the ring: of our last `cut_window` round-robin probes (a uniform
        sample of the ring), at least `cut_failed` failed although a helper nacked in time, all within the last
        `cut_horizon` periods.

        Why: SWIM finds failures one probe per period per member, and suspicions spread a few per message. A
        side of 10 cut from 990 has 10 probers for 990 silent members and every gossip message carries 6 of
        its suspicions: it had 40 to 95 of the 990 DEAD after two minutes (issue 20), and meanwhile routed
        keys to owners it cannot reach. What a node sees of such a cut is that nearly every member it picks
        at random is silent, to it and to the helpers that answer it. Then it sweeps (_sweep): a direct Ping
        to every ALIVE member it has not heard from lately, the ring in about `sweep_periods` periods, and
        suspects those silent to `sweep_strikes` of them; the usual suspicion (timeout, confirmations,
        refutation) takes it from there.

        Why this cannot make a node declare the world dead when the fault is its own:
        - A slow or overloaded node misses the nacks too: a failed probe counts only if a helper's nack came
          back in time, which proves our own path works and says the target is silent to the helper as well.
          Local health (Lifeguard's awareness) is about being slow, and it is what a node that misses nacks
          gets; this is about being cut off, and needs that proof. (Awareness itself is not required to be
          0: right after a cut it rises while the helpers picked are still across the cut.)
        - A lossy link of our own (one-way loss included) fails a probe only if the direct Ping, its second
          try and every helper's relay all fail, and counts only if a helper then nacks, i.e. the target is
          silent to that helper too: a fault of ours makes helpers go quiet, not nack.
        - The evidence is a sample, the verdict is not: the sweep suspects only members that stayed silent to
          our own Pings, twice, a period apart; a member that answers any of them is never suspected, so a
          falsely triggered sweep costs Pings, not members. That is also why the sample needs no estimate of
          the sides' sizes: at 500|500 either side may sweep, and finds what it can reach.
        - Only round-robin picks count: the probes of suspects that gossip names (the other side's members, a
          long row of failures on the majority side too) are not a sample of the ring.
        - A flapping link: only members not heard from for `sweep_quiet` periods are swept, so a link that
          comes back every few seconds is left to the usual probes (simulated 2|3, link down and up every
          2 s, 160 runs: a DEAD across it in the same 10 runs as without the sweep, none of them swept).
        The evidence ages out (`cut_horizon`) and a heal (_healed) clears it, so the sweep stops once the
        ring holds only what answers: round-robin probes then succeed.

        Not finished: the evidence needs a helper on our side. Right after a 10|990 cut the helpers a node
        picks are mostly across the cut (it has heard from few of its 9 fellows lately), so in the simulator
        only about half of the minority gathered it within a minute; those held most of the 990 DEAD, the
        others no more than before (see the README's Partitions)."""
        c = self.config
        recent = [failed for t, failed in self._samples if t >= now - c.cut_horizon * c.period]
        return len(recent) >= c.cut_window and sum(recent) >= c.cut_failed

    def _sweep(self, now: float) -> list[Change]:
        """While cut off: one period's share of the sweep (see cut_off). A sweep that started finishes its
        round (its strikes included) even if the evidence turns: once most of the ring is suspected, the
        round robin's picks are mostly members that answer, and the members not yet swept would otherwise be
        left to one probe a period."""
        evidence = self.cut_off(now)
        cut = evidence or self._was_cut_off and bool(self._sweep_order or self._strikes or self._sweeping)
        if cut != self._was_cut_off:
            self._was_cut_off = cut
            self._sweep_order = []
            if cut:
                self.counters.cut_off += 1
            else:
                self._strikes.clear()
        if not cut or now < self._next_sweep:
            return []
        c = self.config
        self._next_sweep = now + c.period
        quiet_since = now - c.sweep_quiet * c.period
        members = self.table.members

        def due(node_id: str) -> bool:
            m = members.get(node_id)
            return (m is not None and m.state == ALIVE and m.last_heard < quiet_since
                    and node_id not in self._sweeping)

        for node_id in [n for n in self._strikes if n not in self._sweeping and not due(n)]:
            del self._strikes[node_id]  # it answered since, or is suspected already
        budget = min(c.max_sweep, math.ceil(self.table.alive_count() / c.sweep_periods))
        # Members silent once go first (a period later): loss is independent from one Ping to the next.
        targets = [n for n, (_, last) in self._strikes.items() if last <= now - c.period and due(n)][:budget]
        refilled = False
        while len(targets) < budget:
            if not self._sweep_order:
                if not evidence or refilled:
                    break  # (once a period: fewer due than the budget must not loop)
                refilled = True
                self._sweep_order = [n for n in members if due(n) and n not in self._strikes]
                self.rng.shuffle(self._sweep_order)
                if not self._sweep_order:
                    break
            node_id = self._sweep_order.pop()
            if due(node_id) and node_id not in targets:
                targets.append(node_id)
        for node_id in targets:
            m = members[node_id]
            self.counters.sweeps += 1
            self._sweeping[node_id] = now
            self._send(m.address, self._request(now, node_id, gossip=False), "sweep", 0.9 * c.period, now,
                       key=node_id)
        return []

    def _sweep_back(self, now: float) -> None:
        """One period's share of the Pings to the members we hold DEAD after a heal (_revived): those that
        answer are back at once (their answer is authentic, as any probe's)."""
        if not self._back_order or now < self._next_back:
            return
        c = self.config
        self._next_back = now + c.period
        sent = 0
        while self._back_order and sent < self._back_budget:
            m = self.table.get(self._back_order.pop())
            if m is None or m.state != DEAD or m.node_id in self._sweeping:
                continue
            sent += 1
            self.counters.sweeps += 1
            self._sweeping[m.node_id] = now
            self._send(m.address, self._request(now, m.node_id, gossip=False), "sweep", 0.9 * c.period, now,
                       key=m.node_id)

    def _sweep_silent(self, node_id: str, now: float) -> list[Change]:
        """A sweep Ping went unanswered: a strike; `sweep_strikes` of them make a suspicion, ours."""
        sent = self._sweeping.pop(node_id, None)
        m = self.table.get(node_id)
        if sent is None or m is None or m.state != ALIVE or m.last_heard >= sent or not self._was_cut_off:
            self._strikes.pop(node_id, None)
            return []
        self._went_silent([node_id], now)
        strikes = self._strikes.get(node_id, (0, 0.0))[0] + 1
        if strikes < self.config.sweep_strikes:
            self._strikes[node_id] = (strikes, now)
            return []
        self._strikes.pop(node_id, None)
        self.counters.sweep_suspicions += 1
        changes = self._react(self.table.suspect(node_id, now, by=self.table.me.node_id), now)
        if node_id in self._to_probe:
            # A direct re-probe (its answer clears it), not a full one: full probes go before the round robin,
            # and a thousand of them would stop the sample that tells us when we are no longer cut off.
            self._to_probe[node_id] = False
        return changes

    def _answers(self, m: object) -> bool:
        """Whether it answered us since it last failed to: a helper that went silent (likely across a cut
        from us) is a poor one until we hear from it again."""
        return self._silent.get(m.node_id, -1.0) <= m.last_heard  # type: ignore[attr-defined]

    def _went_silent(self, node_ids: list[str], now: float) -> None:
        for node_id in node_ids:
            self._silent[node_id] = now
        if len(self._silent) > 2 * self.table.limits.max_members:
            self._silent = {k: v for k, v in self._silent.items() if k in self.table.members}

    @staticmethod
    def _health(probe: _Probe) -> int:
        """What a failed probe says about our own health: Lifeguard's local health multiplier counts the
        helpers that did not even nack (a slow node misses those answers too); with no helper, the failure
        itself counts.

        Once some helper did nack in time (so we can send and hear within the deadline), only the silent
        helpers we heard from directly in the last `fresh_periods` periods count. Why: in a partition every
        member across the cut is silent to us, as helper as well as target, so counting them saturated the
        minority's awareness within a few probes and stretched its probe period by max_awareness (8x): a
        2|3 minority took twice the majority's time to detect the cut, a 10|990 one minutes (issue 20).
        What stays: a slow or overloaded node (Lifeguard's case: it misses the acks and nacks of members that
        are fine) misses the nacks of all its helpers, or of helpers it just heard from, and slows down as
        before; a node that hears from nobody counts every silent helper as before. Only a silence we already
        had reason to expect (nothing heard from that member lately), beside a helper that proved our own
        path works, is not blamed on us; and such a round counts as healthy, like an ack (in a partition
        acks are rare: most targets are across the cut)."""
        asked = max(0, probe.helpers_asked)
        if not asked:
            return 1
        if not probe.nacks:
            return asked
        silent = len(probe.fresh or ()) - probe.fresh_nacks
        return silent if silent else -1  # a timely nack and no fresh silence: as healthy as an ack shows

    def _pick_target(self, now: float) -> tuple[str | None, bool, bool]:
        """New suspects first (our full probe confirms or clears them), then hinted members (a refutation heard
        of: their answer clears a suspicion); then the re-probes of suspects waiting for their own answer and
        probe_soon's members, except that every `rr_every`-th turn is the round robin's.

        Why the round robin's turn: a suspect is re-probed until it answers or turns DEAD, and the driver
        asks probe_soon every interval while a member's breaker is open, so while any member was suspected, or
        reads failed anywhere, the round robin had no turn, and nothing else probes a member fully (helpers,
        then suspicion on silence). After a cut, a side whose clients read across it never suspected the
        members they read from (the chaos test's minority, issue 20), and each node probed one suspect over
        and over for a whole suspicion timeout before finding the next.
        Why only every 4th turn: each round-robin turn more is one more chance to catch a flapping link in a
        down phase, and those suspicions need re-probes in the up phase to be cleared. In the simulator
        (5 members, mesh serve's timing, `--flap 2`), runs with a DEAD across a link flapping every 2 s:
        every 2nd turn 25 of 80, every 3rd 18, every 4th 4 (as many as before), never 1; the 2|3 minority's
        time to mark the other side DEAD: 8.4, 9.6, 11.6 and 22.5 s (medians)."""
        members = self.table.members
        self._turn += 1
        soon_turn = self._turn % self.config.rr_every != 0
        while True:
            # New suspects (full probes) go before the round robin's turn too, unless more than queue_rr_after
            # wait: then many members went silent at once, the round robin's sample of the ring is what tells
            # a cut-off node so (cut_off), and one turn in rr_every hardly delays so long a queue. (Keeping the
            # turn whenever the last pick failed instead: a DEAD across a link flapping every 2 s in 13 of 160
            # simulated runs, against 10.)
            crowded = len(self._to_probe) > self.config.queue_rr_after
            node_id = next((n for n, full in self._to_probe.items() if soon_turn or full and not crowded), None)
            if node_id is None:
                break
            indirect = self._to_probe.pop(node_id)
            m = members.get(node_id)
            if m is not None and m.state != LEFT:
                self._soon.pop(node_id, None)
                self._check.pop(node_id, None)
                return node_id, indirect and m.state in IN_RING, False
        while self._check:
            node_id = next(iter(self._check))
            del self._check[node_id]
            m = members.get(node_id)
            if m is not None and m.state != LEFT:
                self._to_probe.pop(node_id, None)
                return node_id, False, False
        if now >= self._next_dead_retry and self.table.alive_count() >= self.config.retry_dead_rate * \
                self.config.retry_dead_every:  # a large fleet (see Config): a probe turn, as SWIM has it
            self._next_dead_retry = now + self.config.retry_dead_every
            dead = [m.node_id for m in members.values() if m.state == DEAD]
            if dead:
                self.counters.dead_retries += 1
                return self.rng.choice(dead), False, False
        while soon_turn and self._soon:
            node_id = next(iter(self._soon))
            del self._soon[node_id]
            m = members.get(node_id)
            if m is not None and m.state in IN_RING:
                return node_id, now - m.last_heard > self.config.soon_full_after * self.config.period, False
        for _ in range(2):
            while self._order:
                node_id = self._order.pop()
                m = members.get(node_id)
                if m is not None and m.state in IN_RING:
                    return node_id, True, True
            self._order = [n for n, m in members.items() if m.state in IN_RING]
            self.rng.shuffle(self._order)
        return None, True, False

    # -- leaving -------------------------------------------------------------------------------------------------

    def probe_soon(self, node_id: str) -> None:
        """Probe this member soon (in place of a round-robin turn: no extra message), e.g. because a read
        just failed at it and only its answer will let readers use it again. A direct probe, as its answer is
        all the breaker needs, unless we have not heard from it for `soon_full_after` periods: then a full one
        (helpers, then suspicion on silence), so that reads failing at a member gone silent speed up its
        detection instead of holding it back.

        It leaves the round robin its turns (_pick_target). It took every turn before, direct probes that
        could never suspect: the driver asks again every interval while a member's breaker is open, so where
        reads failed at every unreachable member (a partition's side whose clients read across the cut)
        nothing probed them fully again, and the unreachable owners stayed ALIVE in that side's ring until
        the heal (issue 20). Why not always full probes instead: every node whose reads failed would then
        suspect at once, so a flapping link's suspicions got more confirmations and shorter timeouts, and
        turned DEAD in a down phase (the simulator's --flap 2: 16 of 80 runs with a DEAD, against 4 before)."""
        if node_id in self.table.members:
            self._soon.setdefault(node_id, None)

    def add_candidate(self, address: str, now: float, trusted: bool = True) -> bool:
        """A seed or a zeroconf advert: worth a dial (which is what admits it, or not)."""
        return self.table.add_candidate(address, now, trusted=trusted)

    def leave(self, now: float) -> list[Change]:
        """Graceful leave: our LEFT goes to every member directly (only we can say it; gossip could not)."""
        changes = self.table.leave()
        me = self._me(now)
        for m in list(self.table.members.values()):
            if m.state in IN_RING:
                self._send(m.address, pb.PingRequest(cluster=self.config.cluster, protocol=self.config.protocol,
                                                     sender=me, updates=[me]),
                           "leave", self.config.dial_timeout, now)
        return changes
