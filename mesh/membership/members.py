"""The member table: what this node believes about every other member, and the rules that change it.

Pure: no threads, no I/O, no clock of its own (every call gets `now`, seconds on a monotonic scale), so every
rule is a unit test (tests/test_members.py) and the simulator (scripts/sim_membership.py) runs this very code
for a thousand members. Every call returns the changes it made, so callers are told what changed instead of
re-reading the table.

The rules (SWIM's, with one restriction of our own):

- Records are ordered by incarnation: a higher one wins; at equal incarnation SUSPECT overrides ALIVE, and
  DEAD and LEFT override both.
- Only a member itself changes its own address, raises its own incarnation, refutes a suspicion or says it
  LEFT. The caller says whether a record is *authentic* (it came from the member it describes, over a session
  that member proved; see mesh/membership/driver.py); hearsay from others may only mark a member SUSPECT or DEAD at
  the incarnation we already know, or name an address worth probing (a candidate). A member we have not heard
  from ourselves is never admitted: hearsay of a newer life or a new address only asks us to probe (`hints`).
- Incarnations start at the member's start time in milliseconds and grow by one per refutation: one more than
  a day ahead of our clock is a forgery, and our own refutation stops short of what uint64 can carry.
- Everything is bounded: members, candidates (dropped after a few dials that were not answered), hints.
- One id, one member: a record from itself at another address than the member in the ring (ALIVE or SUSPECT)
  is refused (`Contested`), never taken as a move. Two live nodes under one id (cloned hosts) would otherwise
  replace each other in turn; a node restarted at a new address is taken once its old address is DEAD.
- A node that peers on other hosts reach (not on loopback) admits no member that advertises a loopback
  address, nor dials one it hears of: such a member is reachable from one host only, and rings would disagree.

Suspicion follows Lifeguard: a suspicion raised by one member waits `max` before it declares DEAD; each
independent confirmation (another member that suspects at the same incarnation) shrinks it towards `min`,
which grows with log10 of the member count so that gossip has time to reach the suspect and be refuted.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

from mesh.address import is_loopback, split_hostport
from mesh.pb import mesh_pb2 as pb

ALIVE, SUSPECT, DEAD, LEFT = pb.ALIVE, pb.SUSPECT, pb.DEAD, pb.LEFT
IN_RING = (ALIVE, SUSPECT)
UINT64_MAX = 2**64 - 1
DAY_MS = 86_400_000
# Incarnations start at a start time in ms and refutations add one: a jump of more than this is a new life
# (a restart, possibly empty), a smaller one is a refutation of the same life.
NEW_LIFE_GAP = 1000


def loopback_address(address: str) -> bool:
    """Whether HOST:PORT is reachable from its own host only."""
    try:
        return is_loopback(split_hostport(address)[0])
    except ValueError:
        return False


def plausible(incarnation: int, wall_ms: float) -> bool:
    """One more than a day ahead of our clock is a forgery (and near 2**64 it would not even encode)."""
    return 0 <= incarnation <= min(UINT64_MAX - 1, wall_ms + DAY_MS)


@dataclass(slots=True)
class Member:
    node_id: str
    address: str
    capacity: int
    incarnation: int
    state: int = ALIVE
    last_heard: float = 0.0   # when we last heard from it directly (authentic)
    keys: int = 0
    bytes: int = 0

    def record(self) -> pb.Member:
        """As gossip carries it: no age (it would mean nothing to the receiver, and costs bytes)."""
        return pb.Member(node_id=self.node_id, address=self.address, state=self.state,
                         incarnation=self.incarnation, capacity=self.capacity, keys=self.keys, bytes=self.bytes)

    def to_pb(self, now: float) -> pb.Member:
        return pb.Member(node_id=self.node_id, address=self.address, state=self.state,
                         incarnation=self.incarnation, capacity=self.capacity,
                         last_heard_age=max(0.0, now - self.last_heard), keys=self.keys, bytes=self.bytes)


# -- what a call changed ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Joined:
    node_id: str
    address: str
    capacity: int


@dataclass(frozen=True, slots=True)
class StateChanged:
    node_id: str
    old: int
    new: int
    incarnation: int


@dataclass(frozen=True, slots=True)
class AddressChanged:
    node_id: str
    old: str
    new: str


@dataclass(frozen=True, slots=True)
class CapacityChanged:
    node_id: str
    old: int
    new: int


@dataclass(frozen=True, slots=True)
class Restarted:
    """A new life (or back from DEAD): its copies may be gone, repair should look."""
    node_id: str


@dataclass(frozen=True, slots=True)
class Forgotten:
    """DEAD or LEFT long enough to drop from the table."""
    node_id: str
    address: str


@dataclass(frozen=True, slots=True)
class Refuted:
    """We heard that we are suspected, dead or gone, and raised our own incarnation to deny it."""
    node_id: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class Contested:
    """A node at `claimed` answered under the id of the member we hold in the ring at `address`: refused."""
    node_id: str
    address: str
    claimed: str


Change = Joined | StateChanged | AddressChanged | CapacityChanged | Restarted | Forgotten | Refuted | Contested


def ring_changed(changes: list[Change]) -> bool:
    """Whether these changes alter who owns keys (membership of ALIVE|SUSPECT, addresses or weights)."""
    for c in changes:
        if isinstance(c, (Joined, AddressChanged, CapacityChanged)):
            return True
        if isinstance(c, StateChanged) and (c.old in IN_RING) != (c.new in IN_RING):
            return True
    return False


# -- limits -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    max_members: int = 4096
    max_candidates: int = 64
    candidate_tries: int = 4          # dials a candidate gets before it is dropped
    candidate_backoff: float = 1.0    # seconds before the second try, doubling
    max_hints: int = 64
    give_up_for: float = 300.0        # seconds hearsay cannot bring back a dropped candidate
    max_given_up: int = 4096
    forget_after: float = 600.0       # seconds a DEAD or LEFT member stays in the table
    # Lifeguard suspicion: min = alpha * max(1, log10 n) * period; max = beta * min; `expected` confirmations
    # bring a suspicion down to min.
    period: float = 0.4
    suspicion_alpha: float = 1.0
    suspicion_beta: float = 3.0
    expected_confirmations: int = 2
    min_suspicion: float = 1.0


@dataclass
class Suspicion:
    incarnation: int
    started: float
    confirmations: set[str] = field(default_factory=set)


@dataclass
class Candidate:
    tries: int = 0
    next_try: float = 0.0


class MemberTable:
    def __init__(self, me: Member, limits: Limits | None = None, wall_offset_ms: float = 0.0) -> None:
        """`wall_offset_ms`: wall-clock ms at now == 0, for the plausibility bound only."""
        self.me = me
        self.limits = limits or Limits()
        self.wall_offset_ms = wall_offset_ms
        self.members: dict[str, Member] = {}
        self.suspicions: dict[str, Suspicion] = {}
        self.candidates: OrderedDict[str, Candidate] = OrderedDict()
        self.self_addresses: set[str] = {me.address}
        self.on_lan = not loopback_address(me.address)  # then loopback addresses are other hosts' (unreachable)
        self.hints: OrderedDict[str, None] = OrderedDict()   # node ids whose newer life we should verify
        self._dead_since: dict[str, float] = {}
        self.given_up: OrderedDict[str, float] = OrderedDict()   # dropped candidate -> until when

    # -- views ---------------------------------------------------------------------------------------------------

    def get(self, node_id: str) -> Member | None:
        return self.members.get(node_id)

    def alive_count(self) -> int:
        """Members in the ring, ourselves included: the n of every log(n)."""
        return 1 + sum(1 for m in self.members.values() if m.state in IN_RING)

    def ring(self) -> dict[str, int]:
        out = {m.node_id: m.capacity for m in self.members.values() if m.state in IN_RING}
        if self.me.state in IN_RING:
            out[self.me.node_id] = self.me.capacity
        return out

    def authentic_sender(self, sender: pb.Member) -> bool:
        """Whether a request's sender is a member we proved ourselves at that very address."""
        known = self.members.get(sender.node_id)
        return known is not None and known.address == sender.address

    def unreachable(self, address: str) -> bool:
        """An address our peers cannot dial: loopback, where we are not (it would be each dialler's own host)."""
        return self.on_lan and loopback_address(address)

    def _wall_ms(self, now: float) -> float:
        return self.wall_offset_ms + now * 1000.0

    # -- suspicion timing --------------------------------------------------------------------------------------

    def suspicion_timeout(self, confirmations: int) -> float:
        """Lifeguard: from max with no confirmation down to min with `expected_confirmations` of them."""
        lim = self.limits
        lo = max(lim.min_suspicion, lim.suspicion_alpha * max(1.0, math.log10(self.alive_count())) * lim.period)
        hi = lim.suspicion_beta * lo
        # As memberlist: no more confirmations are expected than there are other members to send them.
        k = min(lim.expected_confirmations, self.alive_count() - 2)
        if k < 1 or confirmations >= k:
            return lo
        return max(lo, hi - (hi - lo) * math.log(confirmations + 1) / math.log(k + 1))

    def suspicion_deadline(self, node_id: str) -> float | None:
        s = self.suspicions.get(node_id)
        if s is None:
            return None
        return s.started + self.suspicion_timeout(max(0, len(s.confirmations) - 1))

    # -- the rules ---------------------------------------------------------------------------------------------

    def apply(self, m: pb.Member, now: float, *, authentic: bool, source: str = "") -> list[Change]:
        """Merge one record. `authentic`: it came from m.node_id itself. `source`: who told us (for SUSPECT
        records, the suspecter: independent confirmations shrink the suspicion timeout)."""
        if not m.node_id or not plausible(m.incarnation, self._wall_ms(now)):
            return []
        if m.node_id == self.me.node_id:
            return self._about_me(m, now)
        known = self.members.get(m.node_id)
        if authentic:
            return self._from_itself(m, known, now)
        return self._hearsay(m, known, now, source or m.suspecter)

    def _about_me(self, m: pb.Member, now: float) -> list[Change]:
        me = self.me
        if me.state == LEFT or m.state == ALIVE or m.incarnation < me.incarnation:
            return []
        refute = max(me.incarnation, m.incarnation) + 1
        if not plausible(refute, self._wall_ms(now)):
            return []  # cannot outbid it without an implausible incarnation: a forgery; ignore it
        me.incarnation = refute
        return [Refuted(me.node_id, refute)]

    def _from_itself(self, m: pb.Member, known: Member | None, now: float) -> list[Change]:
        if m.capacity < 1 or self.unreachable(m.address):
            return []  # a weightless member would break the ring's weights; a loopback one, the rings' agreement
        new_state = LEFT if m.state == LEFT else ALIVE
        if known is None:
            if new_state == LEFT or len(self.members) >= self.limits.max_members:
                return []
            self.members[m.node_id] = Member(m.node_id, m.address, m.capacity, m.incarnation, ALIVE, now,
                                             m.keys, m.bytes)
            self._forget_candidate(m.address)
            self.hints.pop(m.node_id, None)
            return [Joined(m.node_id, m.address, m.capacity)]
        if m.incarnation < known.incarnation:
            return []  # a message from its previous life
        if known.address != m.address and known.state in IN_RING:
            return [Contested(m.node_id, known.address, m.address)]  # one id, two nodes: never a silent swap
        changes: list[Change] = []
        new_life = m.incarnation > known.incarnation + NEW_LIFE_GAP or (known.state == DEAD and new_state == ALIVE)
        if known.address != m.address:
            changes.append(AddressChanged(m.node_id, known.address, m.address))
            known.address = m.address
        if known.capacity != m.capacity:
            changes.append(CapacityChanged(m.node_id, known.capacity, m.capacity))
            known.capacity = m.capacity
        if known.state != new_state:
            changes.append(StateChanged(m.node_id, known.state, new_state, m.incarnation))
            known.state = new_state
        known.incarnation = m.incarnation
        known.last_heard, known.keys, known.bytes = now, m.keys, m.bytes
        self.suspicions.pop(m.node_id, None)
        self.hints.pop(m.node_id, None)
        self._forget_candidate(m.address)
        if new_life and new_state == ALIVE:
            changes.append(Restarted(m.node_id))
        return changes

    def _hearsay(self, m: pb.Member, known: Member | None, now: float, source: str) -> list[Change]:
        if known is None:
            if m.state in IN_RING:
                self.add_candidate(m.address, now)
            return []
        newer_life = m.incarnation > known.incarnation
        if m.state == ALIVE:
            # A newer life (a refutation of what we believe, a restart) or another address can only be
            # checked by probing the member itself.
            restart = m.incarnation > known.incarnation + NEW_LIFE_GAP
            # A member we hold DEAD that others hold ALIVE (at the incarnation it died at: a healed partition,
            # the other side never saw it die) is worth a probe too: its answer brings it back.
            back = known.state == DEAD and m.incarnation == known.incarnation
            if back or newer_life and (known.state != ALIVE or restart or m.address != known.address):
                self._hint(m.node_id)
                if m.address != known.address:
                    self.add_candidate(m.address, now)
            return []
        if m.incarnation < known.incarnation or known.state in (DEAD, LEFT):
            return []
        # SUSPECT, DEAD or LEFT at the incarnation we know (or a newer one we cannot verify): applied at ours.
        if m.state == SUSPECT:
            return self.suspect(m.node_id, now, by=source)
        return self._set_state(known, DEAD, now)

    def suspect(self, node_id: str, now: float, by: str) -> list[Change]:
        """`by` (possibly us) suspects the member at the incarnation we know. Returns the change, if any; a
        confirmation of an existing suspicion changes no state but shortens its timeout."""
        known = self.members.get(node_id)
        if known is None or known.state not in IN_RING:
            return []
        s = self.suspicions.get(node_id)
        if s is None or s.incarnation != known.incarnation:
            s = self.suspicions[node_id] = Suspicion(known.incarnation, now)
        s.confirmations.add(by or "?")
        if known.state == SUSPECT:
            return []
        return self._set_state(known, SUSPECT, now)

    def confirmations(self, node_id: str) -> int:
        s = self.suspicions.get(node_id)
        return len(s.confirmations) if s else 0

    def _set_state(self, known: Member, state: int, now: float) -> list[Change]:
        if known.state == state:
            return []
        old, known.state = known.state, state
        if state != SUSPECT:
            self.suspicions.pop(known.node_id, None)
        if state in (DEAD, LEFT):
            self._dead_since[known.node_id] = now  # forget_after counts from here
        return [StateChanged(known.node_id, old, state, known.incarnation)]

    def withdraw_suspicions(self) -> list[Change]:
        """Our own view was cut off and has just healed (a member we held DEAD answered at the incarnation it
        died at): every suspicion we hold was raised by silence that the cut explains, so back to ALIVE. Only
        our own belief changes; a member that is really gone is suspected again by the next probe of it."""
        changes: list[Change] = []
        for node_id in list(self.suspicions):
            known = self.members.get(node_id)
            if known is not None and known.state == SUSPECT:
                changes += self._set_state(known, ALIVE, 0.0)
            self.suspicions.pop(node_id, None)
        return changes

    def expire(self, now: float) -> list[Change]:
        """Suspicions past their timeout become DEAD; long-DEAD members are forgotten."""
        changes: list[Change] = []
        for node_id in list(self.suspicions):
            deadline = self.suspicion_deadline(node_id)
            known = self.members.get(node_id)
            if known is None or known.state != SUSPECT:
                self.suspicions.pop(node_id, None)
            elif deadline is not None and now >= deadline:
                changes += self._set_state(known, DEAD, now)
        for node_id, since in list(self._dead_since.items()):
            known = self.members.get(node_id)
            if known is None or known.state not in (DEAD, LEFT):
                del self._dead_since[node_id]
            elif now - since >= self.limits.forget_after:
                del self._dead_since[node_id]
                del self.members[node_id]
                changes.append(Forgotten(node_id, known.address))
        return changes

    def leave(self) -> list[Change]:
        """We leave: our own record says LEFT at a higher incarnation, so it overrides every ALIVE of us."""
        if self.me.state == LEFT:
            return []
        old = self.me.state
        self.me.state = LEFT
        self.me.incarnation += 1
        return [StateChanged(self.me.node_id, old, LEFT, self.me.incarnation)]

    # -- hints and candidates ----------------------------------------------------------------------------------

    def _hint(self, node_id: str) -> None:
        self.hints[node_id] = None
        self.hints.move_to_end(node_id)
        while len(self.hints) > self.limits.max_hints:
            self.hints.popitem(last=False)

    def pop_hint(self) -> str | None:
        while self.hints:
            node_id, _ = self.hints.popitem(last=False)
            if node_id in self.members:
                return node_id
        return None

    def add_candidate(self, address: str, now: float, trusted: bool = False) -> bool:
        """An address worth probing (a seed, zeroconf, gossip). Admitted only once it answers as a member
        itself. False if it is us, a member we already reach there, known, or the candidate set is full.
        Hearsay (`trusted` False) cannot bring back a candidate we gave up on: a peer that keeps gossiping
        dead addresses must not make us dial them forever."""
        if not address or address in self.self_addresses or address in self.candidates:
            return False
        if not trusted and self.unreachable(address):
            return False  # a loopback address heard of is the dialler's own host, not the member's
        until = self.given_up.get(address)
        if until is not None:
            if now < until and not trusted:
                return False
            del self.given_up[address]
        if any(m.address == address and m.state in IN_RING for m in self.members.values()):
            return False
        if len(self.candidates) >= self.limits.max_candidates:
            return False
        self.candidates[address] = Candidate(next_try=now)
        return True

    def due_candidates(self, now: float, limit: int) -> list[str]:
        """Up to `limit` candidates whose turn it is; each counts as one dial."""
        out: list[str] = []
        for address, c in self.candidates.items():
            if len(out) >= limit:
                break
            if c.next_try <= now:
                c.tries += 1
                c.next_try = now + self.limits.candidate_backoff * 2.0 ** (c.tries - 1)
                out.append(address)
        return out

    def candidate_failed(self, address: str, now: float) -> bool:
        """A dial that was not answered. True when the candidate was dropped for good."""
        c = self.candidates.get(address)
        if c is None or c.tries < self.limits.candidate_tries:
            return False
        self.give_up(address, now)
        return True

    def give_up(self, address: str, now: float) -> None:
        """No more dials of this address on hearsay for a while (it never answered, or not as a member)."""
        self.candidates.pop(address, None)
        self.given_up[address] = now + self.limits.give_up_for
        while len(self.given_up) > self.limits.max_given_up:
            self.given_up.popitem(last=False)

    def _forget_candidate(self, address: str) -> None:
        self.candidates.pop(address, None)

    def is_me(self, address: str) -> None:
        """A candidate answered as ourselves (we are reachable there too): never dial it again."""
        self.self_addresses.add(address)
        self.candidates.pop(address, None)
