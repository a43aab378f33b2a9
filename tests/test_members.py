"""The member table and the SWIM protocol as specifications: pure code, simulated time, no processes."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from mesh.membership.members import (ALIVE, DAY_MS, DEAD, LEFT, SUSPECT, AddressChanged, CapacityChanged, Contested,
                          Forgotten, Joined, Limits, Member, MemberTable, Refuted, Restarted, StateChanged, plausible,
                          ring_changed)
from mesh.pb import mesh_pb2 as pb
from mesh.membership.swim import Config, JoinRefused, Swim

WALL = 1_750_000_000_000.0   # wall clock (ms) at now == 0
INC = int(WALL)              # a member that started at that moment


def rec(node_id: str, state: int = ALIVE, inc: int = INC, address: str | None = None, capacity: int = 100,
        suspecter: str = "") -> pb.Member:
    return pb.Member(node_id=node_id, address=address or f"{node_id}:1", state=state, incarnation=inc,
                     capacity=capacity, suspecter=suspecter)


def table(limits: Limits | None = None, members: tuple[str, ...] = ()) -> MemberTable:
    t = MemberTable(Member("me", "me:1", 100, INC), limits or Limits(), wall_offset_ms=WALL)
    for m in members:
        t.apply(rec(m), 0.0, authentic=True)
    return t


# -- the table: admission and ordering ------------------------------------------------------------------------

def test_a_member_is_admitted_only_from_its_own_record() -> None:
    t = table()
    assert t.apply(rec("a"), 0.0, authentic=False) == []
    assert t.get("a") is None and "a:1" in t.candidates
    assert t.apply(rec("a"), 0.0, authentic=True) == [Joined("a", "a:1", 100)]
    assert t.get("a").state == ALIVE and "a:1" not in t.candidates  # type: ignore[union-attr]


def test_a_record_from_a_previous_life_changes_nothing() -> None:
    t = table(members=("a",))
    assert t.apply(rec("a", inc=INC - 1, address="old:1"), 1.0, authentic=True) == []
    assert t.get("a").address == "a:1"  # type: ignore[union-attr]


@pytest.mark.parametrize("state", [SUSPECT, DEAD])
def test_hearsay_suspects_or_declares_dead_at_the_incarnation_we_know(state: int) -> None:
    t = table(members=("a",))
    assert t.apply(rec("a", state, inc=INC - 1), 1.0, authentic=False) == []  # stale
    assert t.apply(rec("a", state, inc=INC + 5), 1.0, authentic=False) == [StateChanged("a", ALIVE, state, INC)]
    assert t.get("a").incarnation == INC  # type: ignore[union-attr]  # never raised by hearsay


def test_at_equal_incarnation_suspect_beats_alive_and_dead_beats_both() -> None:
    t = table(members=("a",))
    t.apply(rec("a", SUSPECT), 1.0, authentic=False)
    assert t.apply(rec("a", ALIVE), 1.0, authentic=False) == []
    assert t.get("a").state == SUSPECT  # type: ignore[union-attr]
    assert t.apply(rec("a", DEAD), 1.0, authentic=False) == [StateChanged("a", SUSPECT, DEAD, INC)]
    assert t.apply(rec("a", SUSPECT), 1.0, authentic=False) == []
    assert t.get("a").state == DEAD  # type: ignore[union-attr]


def test_hearsay_of_leaving_is_only_dead_only_the_member_says_left() -> None:
    t = table(members=("a", "b"))
    assert t.apply(rec("a", LEFT), 1.0, authentic=False) == [StateChanged("a", ALIVE, DEAD, INC)]
    assert t.apply(rec("b", LEFT, inc=INC + 1), 1.0, authentic=True) == [StateChanged("b", ALIVE, LEFT, INC + 1)]
    assert t.ring() == {"me": 100}


def test_hearsay_of_a_newer_life_only_asks_us_to_probe() -> None:
    t = table(members=("a",))
    t.apply(rec("a", SUSPECT), 1.0, authentic=False)
    assert t.apply(rec("a", ALIVE, inc=INC + 1), 1.0, authentic=False) == []
    assert t.get("a").state == SUSPECT and t.pop_hint() == "a"  # type: ignore[union-attr]


def test_hearsay_that_a_member_we_hold_dead_is_alive_asks_us_to_probe_it() -> None:
    # After a partition heals, the other side holds ALIVE, at the incarnation it died at, a member we hold DEAD.
    t = table(members=("a",))
    t.apply(rec("a", DEAD), 1.0, authentic=False)
    assert t.apply(rec("a"), 2.0, authentic=False) == []
    assert t.get("a").state == DEAD and t.pop_hint() == "a"  # type: ignore[union-attr]


def test_hearsay_of_a_restart_asks_us_to_probe_a_refutation_of_nothing_does_not() -> None:
    t = table(members=("a",))
    assert t.apply(rec("a", inc=INC + 2), 1.0, authentic=False) == [] and t.pop_hint() is None
    assert t.apply(rec("a", inc=INC + 60_000), 1.0, authentic=False) == [] and t.pop_hint() == "a"


def test_its_own_answer_refutes_a_suspicion_and_a_return_from_dead_is_a_restart() -> None:
    t = table(members=("a", "b"))
    t.apply(rec("a", SUSPECT), 1.0, authentic=False)
    assert t.apply(rec("a", inc=INC + 1), 2.0, authentic=True) == [StateChanged("a", SUSPECT, ALIVE, INC + 1)]
    assert "a" not in t.suspicions
    t.apply(rec("b", DEAD), 1.0, authentic=False)
    assert t.apply(rec("b", inc=INC + 1), 2.0, authentic=True) == [StateChanged("b", DEAD, ALIVE, INC + 1),
                                                                   Restarted("b")]


def test_a_new_life_is_a_restart_a_refutation_is_not() -> None:
    t = table(members=("a",))
    assert t.apply(rec("a", inc=INC + 3), 1.0, authentic=True) == []
    assert t.apply(rec("a", inc=INC + 60_000), 2.0, authentic=True) == [Restarted("a")]


def test_only_the_member_itself_changes_its_address() -> None:
    t = table(members=("a",))
    assert t.apply(rec("a", inc=INC + 1, address="evil:1"), 1.0, authentic=False) == []
    assert t.get("a").address == "a:1" and "evil:1" in t.candidates  # type: ignore[union-attr]
    # From itself at another address while the member is in the ring: two nodes under one id (cloned hosts),
    # refused, never a swap (issue 22); once the member there is DEAD, a restart at the new address is taken.
    assert t.apply(rec("a", inc=INC + 1, address="new:1"), 1.0, authentic=True) == [Contested("a", "a:1", "new:1")]
    assert t.get("a").address == "a:1"  # type: ignore[union-attr]
    t.apply(rec("a", DEAD), 2.0, authentic=False)
    assert t.apply(rec("a", inc=INC + 60_000, address="new:1"), 3.0, authentic=True) == [
        AddressChanged("a", "a:1", "new:1"), StateChanged("a", DEAD, ALIVE, INC + 60_000), Restarted("a")]


def test_capacity_changes_are_reported_and_zero_capacity_is_refused() -> None:
    t = table(members=("a",))
    assert t.apply(rec("a", capacity=0, inc=INC + 1), 1.0, authentic=True) == []
    assert t.get("a").incarnation == INC  # type: ignore[union-attr]
    assert t.apply(rec("a", capacity=7), 1.0, authentic=True) == [CapacityChanged("a", 100, 7)]


# -- the table: refutation and bounds ---------------------------------------------------------------------------

@pytest.mark.parametrize("state", [SUSPECT, DEAD, LEFT])
def test_we_refute_what_is_said_about_us_with_one_more(state: int) -> None:
    t = table()
    assert t.apply(rec("me", state, inc=INC + 4), 1.0, authentic=False) == [Refuted("me", INC + 5)]
    assert t.me.incarnation == INC + 5 and t.me.state == ALIVE
    assert t.apply(rec("me", SUSPECT, inc=INC + 4), 1.0, authentic=False) == []  # already refuted


def test_forged_incarnations_are_ignored_and_never_overflow() -> None:
    t = table(members=("a",))
    for inc in (2**64 - 1, 2**63, int(WALL + DAY_MS) + 5):
        assert t.apply(rec("me", LEFT, inc=inc), 0.0, authentic=False) == []
        assert t.apply(rec("a", inc=inc), 0.0, authentic=True) == []
    edge = int(WALL + DAY_MS)  # plausible, but one more would not be: no refutation past the bound
    assert plausible(edge, WALL) and not plausible(edge + 1, WALL)
    assert t.apply(rec("me", SUSPECT, inc=edge), 0.0, authentic=False) == []
    assert t.me.incarnation == INC


def test_after_leaving_we_refute_nothing() -> None:
    t = table()
    assert t.leave() == [StateChanged("me", ALIVE, LEFT, INC + 1)]
    assert t.apply(rec("me", DEAD, inc=INC + 1), 1.0, authentic=False) == []
    assert t.ring() == {}


def test_members_candidates_and_hints_are_bounded() -> None:
    t = table(Limits(max_members=3, max_candidates=2, max_hints=2))
    for i in range(5):
        t.apply(rec(f"m{i}"), 0.0, authentic=True)
        t.apply(rec(f"x{i}"), 0.0, authentic=False)
    assert len(t.members) == 3 and len(t.candidates) == 2


def test_candidates_that_never_answer_are_dropped_and_gossip_cannot_revive_them() -> None:
    t = table(Limits(candidate_tries=3, candidate_backoff=1.0, give_up_for=300.0))
    t.add_candidate("ghost:1", 0.0)
    now, dials = 0.0, 0
    while "ghost:1" in t.candidates:
        for address in t.due_candidates(now, 4):
            dials += 1
            t.candidate_failed(address, now)
        now += 0.5
    assert dials == 3 and now < 10
    assert not t.add_candidate("ghost:1", now)                 # hearsay
    assert t.add_candidate("ghost:1", now, trusted=True)       # a seed or zeroconf: one more chance
    t.candidates.clear()
    assert t.add_candidate("ghost:2", 0.0) and t.due_candidates(0.0, 4) == ["ghost:2"]
    assert t.due_candidates(0.5, 4) == []  # backoff: the second dial waits a second


# -- the table: suspicion -----------------------------------------------------------------------------------------

def test_suspicion_shrinks_with_independent_confirmations_and_grows_with_log_n() -> None:
    lim = Limits(period=0.5, suspicion_alpha=1.0, suspicion_beta=3.0, expected_confirmations=2, min_suspicion=1.0)
    small = table(lim, members=("a", "b"))
    assert small.suspicion_timeout(0) == pytest.approx(3.0)
    assert small.suspicion_timeout(1) < small.suspicion_timeout(0)
    assert small.suspicion_timeout(2) == small.suspicion_timeout(9) == pytest.approx(1.0)
    pair = table(lim, members=("a",))  # nobody else could confirm: the shortest wait at once
    assert pair.suspicion_timeout(0) == pytest.approx(1.0)
    big = table(lim, members=tuple(f"m{i}" for i in range(999)))
    assert big.suspicion_timeout(2) == pytest.approx(1.5)  # alpha * log10(1000) * period


def test_an_unrefuted_suspicion_becomes_dead_at_its_deadline_not_before() -> None:
    t = table(Limits(min_suspicion=1.0, suspicion_beta=3.0, expected_confirmations=2), members=("a", "b", "c"))
    t.suspect("a", 10.0, by="b")
    assert t.expire(12.9) == []
    t.suspect("a", 11.0, by="c")   # a second suspecter: the deadline moves closer
    t.suspect("a", 11.0, by="c")   # the same one again counts once
    assert t.confirmations("a") == 2
    deadline = t.suspicion_deadline("a")
    assert deadline is not None and 11.0 < deadline < 13.0
    assert t.expire(deadline - 0.01) == []
    assert t.expire(deadline) == [StateChanged("a", SUSPECT, DEAD, INC)]


def test_dead_members_are_forgotten_after_a_while() -> None:
    t = table(Limits(forget_after=60.0), members=("a",))
    t.apply(rec("a", DEAD), 5.0, authentic=False)
    assert t.expire(64.0) == []
    assert t.expire(65.0) == [Forgotten("a", "a:1")]
    assert t.get("a") is None


def test_ring_changed_only_for_ring_changes() -> None:
    assert not ring_changed([StateChanged("a", ALIVE, SUSPECT, 1), Restarted("a"), Refuted("me", 2)])
    assert ring_changed([StateChanged("a", SUSPECT, DEAD, 1)])
    assert ring_changed([Joined("a", "a:1", 1)]) and ring_changed([AddressChanged("a", "x", "y")])


# -- the protocol over a fake transport ---------------------------------------------------------------------------

class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[str, pb.PingRequest, int]] = []
        self.replies: list[tuple[object, pb.PingReply]] = []
        self.bulk: set[int] = set()   # seqs of sweep Pings

    def send(self, address: str, request: pb.PingRequest, seq: int, timeout: float, bulk: bool = False) -> None:
        self.sent.append((address, request, seq))
        if bulk:
            self.bulk.add(seq)

    def reply(self, token: object, reply: pb.PingReply) -> None:
        self.replies.append((token, reply))

    def take(self) -> list[tuple[str, pb.PingRequest, int]]:
        out, self.sent = self.sent, []
        return out


CFG = Config(period=1.0, probe_timeout=0.3, indirect_k=2, retransmit_mult=2, max_piggyback=3, sync_every=30.0,
             sync_scale=8)


def node(members: tuple[str, ...] = ("a", "b", "c", "d"), config: Config = CFG) -> tuple[Swim, FakeTransport]:
    t = table(Limits(period=config.period), members=members)
    fake = FakeTransport()
    swim = Swim(t, fake, config, random.Random(7))
    swim._next_sync = 1e9  # no push-pull unless a test asks for it
    return swim, fake


def ack(swim: Swim, address: str, seq: int, now: float) -> list:
    node_id = address.split(":")[0]
    return swim.handle_reply(seq, pb.PingReply(responder=rec(node_id)), now)


def test_each_period_probes_one_member_and_every_member_once_per_round() -> None:
    swim, fake = node()
    probed = []
    for period in range(8):
        now = float(period)
        swim.tick(now)
        sent = fake.take()
        assert len(sent) == 1 and not sent[0][1].HasField("probe")
        ack(swim, sent[0][0], sent[0][2], now + 0.01)
        probed.append(sent[0][0])
    assert sorted(probed[:4]) == sorted(probed[4:]) == ["a:1", "b:1", "c:1", "d:1"]
    assert swim.awareness == 0 and swim.table.suspicions == {}


def test_a_member_can_be_probed_out_of_turn_at_no_extra_cost() -> None:
    swim, fake = node()
    swim.probe_soon("c")
    swim.tick(0.0)
    (address, _, seq), = fake.take()
    assert address == "c:1"
    ack(swim, address, seq, 0.1)
    swim.tick(1.0)
    assert len(fake.take()) == 1


def test_a_member_probed_out_of_turn_again_and_again_is_still_suspected_when_silent() -> None:
    # The driver calls probe_soon every interval while a member's breaker is open: those probes must be full
    # ones, or a member that reads fail at is never suspected (issue 20: a partition's minority kept the
    # unreachable owners ALIVE until the heal).
    swim, fake = node()
    changes = []
    for step in range(200):
        now = step / 10
        swim.probe_soon("c")
        changes += swim.tick(now)
        for address, request, seq in fake.take():
            if request.HasField("probe"):  # helpers are reachable and nack: c is silent, we are fine
                swim.handle_reply(seq, pb.PingReply(responder=rec(address.split(":")[0]), nack=True), now)
            elif address != "c:1":
                ack(swim, address, seq, now)
    assert StateChanged("c", ALIVE, SUSPECT, INC) in changes


def test_while_a_member_is_suspected_the_round_robin_still_gets_turns() -> None:
    # A suspect is re-probed until it answers or turns DEAD; it used to take every turn meanwhile, so after a
    # cut nothing but the current suspects was probed (issue 20).
    fake = FakeTransport()
    swim = Swim(table(Limits(period=CFG.period, min_suspicion=8.0), ("a", "b", "c", "d")), fake, CFG,
                random.Random(7))
    swim._next_sync = 1e9
    swim.handle_request(pb.PingRequest(sender=rec("b"), updates=[rec("a", SUSPECT, suspecter="b")]), "tok", 0.0)
    targets: list[str] = []
    now = 0.0
    while swim.table.get("a").state == SUSPECT:  # type: ignore[union-attr]
        swim.tick(now)
        for address, request, seq in fake.take():
            if not request.HasField("probe"):
                targets.append(address)
                if address != "a:1":  # everyone but a answers
                    ack(swim, address, seq, now + 0.01)
        now = swim.next_wakeup()
    assert targets.count("a:1") >= 2 and {"b:1", "c:1", "d:1"} & set(targets)


def test_no_ack_asks_helpers_and_a_helper_ack_prevents_suspicion() -> None:
    swim, fake = node()
    swim.tick(0.0)
    (target, _, _), = fake.take()
    swim.tick(0.3)
    sent = fake.take()
    direct = [s for s in sent if not s[1].HasField("probe")]
    helpers = [s for s in sent if s[1].HasField("probe")]
    assert [s[0] for s in direct] == [target] and len(helpers) == CFG.indirect_k
    assert all(s[1].probe.address == target and s[0] != target for s in helpers)
    ack(swim, helpers[0][0], helpers[0][2], 0.5)
    assert swim.tick(1.0) == [] and all(m.state == ALIVE for m in swim.table.members.values())


def test_silence_through_the_period_is_suspicion_and_it_is_gossiped() -> None:
    swim, fake = node()
    swim.tick(0.0)
    (target, _, _), = fake.take()
    swim.tick(0.3)
    helpers = [s for s in fake.take() if s[1].HasField("probe")]
    for address, _, seq in helpers:  # the helpers nack: the target is silent, we are fine
        swim.handle_reply(seq, pb.PingReply(responder=rec(address.split(":")[0]), nack=True), 0.8)
    changes = swim.tick(1.0)
    node_id = target.split(":")[0]
    assert changes == [StateChanged(node_id, ALIVE, SUSPECT, INC)] and swim.awareness == 0
    sent = fake.take()
    assert sent and sent[0][0] == target  # a suspect is probed first, with the suspicion for it to refute
    assert any(u.node_id == node_id and u.state == SUSPECT and u.suspecter == "me" for u in sent[0][1].updates)


def test_helpers_that_do_not_even_nack_lower_our_health() -> None:
    swim, fake = node()
    swim.tick(0.0)
    fake.take()
    swim.tick(0.3)
    fake.take()
    swim.tick(1.0)
    assert swim.awareness == CFG.indirect_k
    p = swim._probe  # the next probe started at once, with stretched timeouts
    assert p is not None and p.deadline - 1.0 == pytest.approx(CFG.probe_timeout * (1 + CFG.indirect_k))
    assert p.end - 1.0 == pytest.approx(CFG.period * (1 + CFG.indirect_k))


@pytest.mark.parametrize("fresh_nacks", [True, False])
def test_only_helpers_we_heard_from_lately_count_against_our_health(fresh_nacks: bool) -> None:
    # A partition: c and d went silent long ago (across the cut), b still answers. A failed probe of a, with b
    # and a silent stale helper asked, is no sign that we are slow when b nacks; b's silence too still is.
    swim, fake = node()
    swim.handle_request(pb.PingRequest(sender=rec("b")), "tok", 9.9)
    swim._to_probe["a"] = True  # a full probe of a next
    swim.tick(10.0)
    fake.take()
    swim.tick(10.3)
    helpers = [(address, seq) for address, request, seq in fake.take() if request.HasField("probe")]
    assert sorted(a for a, _ in helpers)[0] == "b:1" and len(helpers) == CFG.indirect_k  # fresh ones first
    for address, seq in helpers:
        if address == "b:1" and fresh_nacks:
            swim.handle_reply(seq, pb.PingReply(responder=rec("b"), nack=True), 10.5)
    swim.tick(11.0)
    assert swim.table.get("a").state == SUSPECT
    assert swim.awareness == (0 if fresh_nacks else CFG.indirect_k)  # no nack at all: every silence counts


def test_a_helper_that_went_silent_is_not_asked_while_others_answer() -> None:
    # After a cut, members across it fail us as targets and as helpers; asking them again only adds silences.
    swim, fake = node(config=Config(**{**CFG.__dict__, "indirect_k": 1}))

    def helpers_asked(target: str, now: float) -> list[str]:
        swim._to_probe[target] = True  # a full probe of it next
        swim.tick(now)
        fake.take()
        probe = swim._probe
        assert probe is not None and probe.target == target
        swim.tick(probe.deadline)  # past the direct deadline: one helper is asked
        asked = [a for a, r, _ in fake.take() if r.HasField("probe")]
        swim.tick(probe.end)  # nobody answers: the probe fails
        return asked

    swim.handle_request(pb.PingRequest(sender=rec("d")), "tok", 9.5)  # d was heard from last...
    assert helpers_asked("b", 10.0) == ["d:1"]                           # ...then stayed silent as a helper
    assert helpers_asked("c", 20.0) == ["a:1"]  # heard from longer ago than d, but it never failed us


def _cut_run(answering: set[str], silent: set[str], *, nack: bool = True, heard: set[str] | None = None,
             until: float = 40.0) -> tuple[Swim, list, list[str]]:
    """Drive one node over a network where only `answering` members answer (helpers nack a silent target when
    `nack`). Everyone was heard from at 0.0 and, at 5.0 when the run starts, `heard` (default: every answering
    member) just now. Returns the node, its changes, and where its sweep Pings went."""
    fake = FakeTransport()
    swim = Swim(table(Limits(period=CFG.period), tuple(sorted(answering | silent))), fake, CFG, random.Random(3))
    swim._next_sync = 1e9
    changes: list = []
    swept: list[str] = []
    now = 5.0
    for node_id in answering if heard is None else heard:
        swim.handle_request(pb.PingRequest(sender=rec(node_id)), "tok", now)
    while now < until:
        changes += swim.tick(now)
        for address, request, seq in fake.take():
            node_id = address.split(":")[0]
            if seq in fake.bulk:
                swept.append(node_id)
            if node_id in answering:
                if not request.HasField("probe"):
                    changes += ack(swim, address, seq, now + 0.01)
                elif request.probe.node_id in answering:
                    changes += ack(swim, address, seq, now + 0.05)
                elif nack:
                    changes += swim.handle_reply(seq, pb.PingReply(responder=rec(node_id), nack=True), now + 0.2)
        now = max(now + 0.01, min(swim.next_wakeup(), now + CFG.period))
    return swim, changes, swept


def _marked(changes: list, *states: int) -> set[str]:
    return {c.node_id for c in changes if isinstance(c, StateChanged) and c.new in states}


def test_cut_off_from_most_of_the_ring_the_node_sweeps_it_and_suspects_only_the_silent() -> None:
    # A 3|21 cut seen from the minority (issue 20: at 10|990 one probe a period found 40 to 95 of 990 DEAD in
    # two minutes). Round-robin probes fail while the helpers on our side nack: we are cut off, so we Ping every
    # member we have not heard from lately; those silent to two Pings are suspected, all within a few periods.
    answering, silent = {"f1", "f2", "f3"}, {f"s{i:02d}" for i in range(21)}
    swim, changes, swept = _cut_run(answering, silent, heard={"f1", "f2"}, until=40.0)
    assert swim.counters.cut_off == 1
    assert _marked(changes, SUSPECT) == silent                  # all of them, and only them
    assert "f3" in swept and not {"f1", "f2"} & set(swept)     # f3 answered the sweep; f1, f2 were heard lately
    assert all(swept.count(n) <= 3 for n in silent)             # bounded: about two Pings each
    # Probes alone (one a period, most of them re-probes of suspects) suspected only a few in these 35 periods.
    assert swim.counters.suspicions < 10 and swim.counters.sweep_suspicions >= 11


@pytest.mark.parametrize("case", ["slow", "healthy"])
def test_neither_a_slow_node_nor_a_ring_with_a_few_dead_sweeps(case: str) -> None:
    # Slow (or behind a lossy link of its own): no helper nacks in time, so its failed probes are its own
    # health's business (Lifeguard), never evidence that the ring is gone. Healthy: 3 dead of 24 fail a few
    # round-robin probes, not most of them.
    if case == "slow":
        answering, silent, nack = {"f1", "f2"}, {f"s{i:02d}" for i in range(21)}, False
    else:
        answering, silent, nack = {f"f{i:02d}" for i in range(21)}, {"s1", "s2", "s3"}, True
    swim, changes, swept = _cut_run(answering, silent, nack=nack, until=60.0)
    assert swim.counters.cut_off == 0 and swept == []
    assert not answering & _marked(changes, SUSPECT, DEAD)


def test_after_a_heal_every_member_held_dead_is_asked_in_a_few_periods() -> None:
    # A side that swept 990 members DEAD would otherwise see them back one every retry_dead_every (10 s).
    others = tuple(f"m{i:02d}" for i in range(20))
    swim, fake = node(members=others)
    for m in others:
        swim.table.apply(rec(m, DEAD), 0.0, authentic=False)
    swim.handle_request(pb.PingRequest(sender=rec("m00")), "tok", 1.0)  # answers at the incarnation it died at
    assert swim.table.get("m00").state == ALIVE  # type: ignore[union-attr]
    asked: list[str] = []
    for period in range(CFG.sweep_periods):
        swim.tick(1.0 + period)
        asked += [a.split(":")[0] for a, _, seq in fake.take() if seq in fake.bulk]
    assert sorted(asked) == sorted(others[1:])  # each once, in batches of ceil(19 / sweep_periods)
    swim.handle_request(pb.PingRequest(sender=rec("m05")), "tok", 9.5)  # another one back: no second round yet
    swim.tick(9.5)
    assert not [seq for _, _, seq in fake.take() if seq in fake.bulk]


def test_a_suspicion_of_us_is_refuted_by_our_next_message() -> None:
    swim, fake = node()
    changes = swim.handle_request(pb.PingRequest(sender=rec("a"), updates=[rec("me", SUSPECT, suspecter="b")]),
                                  "tok", 0.0)
    assert changes == [Refuted("me", INC + 1)]
    (_, reply), = fake.replies
    assert reply.responder.incarnation == INC + 1
    assert any(u.node_id == "me" and u.incarnation == INC + 1 for u in reply.updates)


def test_an_inbound_ping_speaks_for_its_sender_only_at_the_address_we_proved() -> None:
    swim, fake = node()
    forged = rec("a", inc=INC + 9, address="evil:1")
    with pytest.raises(JoinRefused):  # a's id at another address while a is in the ring: refused (issue 22)
        swim.handle_request(pb.PingRequest(sender=forged), "tok", 0.0)
    assert swim.table.get("a").address == "a:1" and swim.table.get("a").incarnation == INC  # type: ignore[union-attr]
    assert "evil:1" not in swim.table.candidates
    swim.handle_request(pb.PingRequest(sender=rec("b", LEFT, inc=INC + 1)), "tok", 0.0)
    assert swim.table.get("b").state == LEFT  # type: ignore[union-attr]


def test_gossip_to_a_member_that_went_silent_on_us_does_not_count_as_sent() -> None:
    # After a cut most messages go across it and are lost; counting them used up a suspicion's transmits
    # before it reached the members on our side, who must confirm it.
    swim, fake = node()
    swim._silent["d"] = 5.0  # d failed to answer us at 5.0 and has not been heard from since
    swim.broadcast(rec("x", SUSPECT, suspecter="me"))
    for _ in range(10):
        assert any(u.node_id == "x" for u in swim._piggyback(6.0, "d"))
    assert swim._queue[("x", "me")].transmits == 0
    for _ in range(swim.retransmit_limit()):
        assert any(u.node_id == "x" for u in swim._piggyback(6.0, "a"))
    assert ("x", "me") not in swim._queue


def test_each_change_is_piggybacked_a_bounded_number_of_times() -> None:
    swim, fake = node()
    for i in range(5):
        swim.broadcast(rec(f"x{i}", DEAD))
    limit = swim.retransmit_limit()
    carried: dict[str, int] = {}
    for _ in range(20):
        swim.handle_request(pb.PingRequest(sender=rec("a")), "tok", 0.0)
        _, reply = fake.replies.pop()
        assert len(reply.updates) <= CFG.max_piggyback
        for u in reply.updates:
            carried[u.node_id] = carried.get(u.node_id, 0) + 1
    assert carried == {f"x{i}": limit for i in range(5)}


def test_an_indirect_probe_is_answered_ack_or_nack() -> None:
    swim, fake = node()
    swim.handle_request(pb.PingRequest(sender=rec("a"), probe=rec("b")), "tok1", 0.0)
    (address, _, seq), = fake.take()
    assert address == "b:1" and fake.replies == []
    ack(swim, address, seq, 0.05)
    (token, reply), = fake.replies
    assert token == "tok1" and not reply.nack
    fake.replies.clear()
    swim.handle_request(pb.PingRequest(sender=rec("a"), probe=rec("c")), "tok2", 1.0)
    fake.take()
    swim.tick(1.5)
    assert fake.replies == []
    swim.tick(2.0)
    assert [(t, r.nack) for t, r in fake.replies] == [("tok2", True)]


def test_an_indirect_probe_only_dials_a_member_where_we_know_it() -> None:
    swim, fake = node()
    for probe in (rec("stranger"), rec("b", address="evil:1")):
        swim.handle_request(pb.PingRequest(sender=rec("a"), probe=probe), "tok", 0.0)
        assert fake.take() == [] and fake.replies.pop()[1].nack


def test_push_pull_sends_the_whole_table_and_learns_only_candidates() -> None:
    swim, fake = node()
    swim._next_sync = 5.0
    swim._next_probe = 100.0
    swim.tick(5.0)
    (address, request, seq), = [s for s in fake.take() if s[1].sync]
    assert {m.node_id for m in request.members} == {"me", "a", "b", "c", "d"}
    peer = address.split(":")[0]
    swim.handle_reply(seq, pb.PingReply(responder=rec(peer), members=[rec(peer), rec("new")]), 5.1)
    assert swim.table.get("new") is None and "new:1" in swim.table.candidates
    assert swim.sync_period() == pytest.approx(30.0)


def test_push_pull_suspicion_or_death_of_a_member_we_hold_alive_is_probed_not_applied() -> None:
    # A table from across a healed partition holds DEAD, at the incarnation we hold ALIVE, members we reach.
    swim, fake = node()
    swim.handle_request(pb.PingRequest(sender=rec("a"), sync=True,
                                       members=[rec("a"), rec("b", DEAD), rec("c", SUSPECT)]), "tok", 1.0)
    assert swim.table.get("b").state == ALIVE and swim.table.get("c").state == ALIVE  # type: ignore[union-attr]
    swim.tick(1.0)
    assert [address for address, _, _ in fake.take() if address in ("b:1", "c:1")] == ["b:1"]  # probed first


def test_a_member_back_from_dead_is_told_so_and_its_news_is_not_applied() -> None:
    swim, fake = node()
    swim.handle_request(pb.PingRequest(sender=rec("a"), updates=[rec("b", DEAD)]), "tok", 1.0)
    assert swim.table.get("b").state == DEAD  # type: ignore[union-attr]
    swim.handle_request(pb.PingRequest(sender=rec("c"), updates=[rec("d", DEAD)]), "tok", 1.1)
    # b comes back (the partition healed) with what it believed while cut off: that a, c and d are DEAD.
    changes = swim.handle_request(pb.PingRequest(sender=rec("b"), updates=[rec("a", DEAD), rec("c", SUSPECT)]),
                                  "tok", 20.0)
    assert StateChanged("b", DEAD, ALIVE, INC) in changes
    assert swim.table.get("a").state == ALIVE and swim.table.get("c").state == ALIVE  # type: ignore[union-attr]
    _, reply = fake.replies[-1]
    told = [u for u in reply.updates if u.node_id == "b"]
    assert (DEAD, INC) in [(u.state, u.incarnation) for u in told]  # so it refutes and outbids stale DEADs
    assert all(u.node_id != "d" for u in reply.updates)  # our own DEAD of d, built while cut off, is dropped
    swim.handle_reply(*_sent_to(swim, fake, "b"), pb.PingReply(responder=rec("b", inc=INC + 1)), 20.5)
    assert swim.table.get("b").incarnation == INC + 1  # type: ignore[union-attr]
    swim.probe_soon("b")
    swim.tick(21.0)
    assert all(u.node_id != "b" or u.state == ALIVE for _, r, _ in fake.take() for u in r.updates)


def test_a_healed_cut_withdraws_our_suspicions_and_a_revived_members_news_waits_for_its_refutation() -> None:
    swim, fake = node()
    swim.handle_request(pb.PingRequest(sender=rec("a"), updates=[rec("b", DEAD), rec("c", SUSPECT, suspecter="a")]),
                        "tok", 1.0)
    assert swim.table.get("c").state == SUSPECT  # type: ignore[union-attr]
    # b answers at the incarnation we held it DEAD at: we were cut off from it, c's suspicion is as stale.
    changes = swim.handle_request(pb.PingRequest(sender=rec("b")), "tok", 2.0)
    assert StateChanged("c", SUSPECT, ALIVE, INC) in changes and "c" not in swim.table.suspicions
    # Until b refutes (it is told it was DEAD), what it says about others is news from the other side.
    swim.handle_request(pb.PingRequest(sender=rec("b"), updates=[rec("d", DEAD)]), "tok", 2.1)
    assert swim.table.get("d").state == ALIVE  # type: ignore[union-attr]
    swim.handle_request(pb.PingRequest(sender=rec("b", inc=INC + 1), updates=[rec("d", DEAD)]), "tok", 2.2)
    assert swim.table.get("d").state == DEAD  # type: ignore[union-attr]


def test_refuting_our_own_death_withdraws_our_suspicions() -> None:
    swim, fake = node()
    swim.handle_request(pb.PingRequest(sender=rec("a"), updates=[rec("c", SUSPECT, suspecter="a")]), "tok", 1.0)
    changes = swim.handle_request(pb.PingRequest(sender=rec("a"), updates=[rec("me", DEAD)]), "tok", 2.0)
    assert Refuted("me", INC + 1) in changes and StateChanged("c", SUSPECT, ALIVE, INC) in changes


def _sent_to(swim: Swim, fake: FakeTransport, node_id: str) -> tuple[int]:
    swim._to_probe[node_id] = True
    swim.tick(swim._next_probe)
    (seq,) = [seq for address, _, seq in fake.take() if address == f"{node_id}:1"]
    return (seq,)


def test_a_graceful_leave_goes_to_every_member_directly() -> None:
    swim, fake = node()
    swim.leave(0.0)
    sent = fake.take()
    assert sorted(a for a, _, _ in sent) == ["a:1", "b:1", "c:1", "d:1"]
    assert all(r.sender.state == LEFT for _, r, _ in sent)
    assert swim.tick(1.0) == [] and fake.take() == []


def test_a_candidate_is_dialled_admitted_and_gossiped() -> None:
    swim, fake = node(members=())
    swim.add_candidate("seed:1", 0.0)
    swim.tick(0.0)
    (address, request, seq), = fake.take()
    assert address == "seed:1" and request.sync  # alone: the first contact fetches the whole table
    changes = swim.handle_reply(seq, pb.PingReply(responder=rec("s", address="seed:1"),
                                                  members=[rec("s", address="seed:1"), rec("t")]), 0.1)
    assert changes == [Joined("s", "seed:1", 100)] and "t:1" in swim.table.candidates


# -- the simulator: the same code at 64 members -------------------------------------------------------------------

def test_simulated_mesh_of_64_detects_a_death_without_false_dead() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from sim_membership import simulate

    r = simulate(64, loss=0.05, seed=3, window=5.0, detect_for=10.0, join_for=10.0)
    assert r.undetected == 0 and r.dead_p99 <= 6.0
    assert r.false_dead == 0
    assert r.join_missing == 0 and r.join_p99 <= 10.0
    assert 4.0 < r.msgs_per_node_s < 12.0


@pytest.mark.parametrize("seed", [3, 5, 9])  # seeds where, without Swim._revived, the heal made false DEADs
def test_simulated_partition_2_3_is_detected_on_both_sides_and_heals_without_false_dead(seed: int) -> None:
    # Issue 20: 5 members cut 2|3 while every member reads across the cut (breakers open, probe_soon), then
    # healed. Both sides mark every member of the other DEAD within a bound of the same order (the majority
    # took about 5 s here, the minority 4-10 s; before the fix the minority never did), nobody on either side
    # is falsely DEAD, and after the heal every member is ALIVE in every table, with no DEAD declared.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from sim_membership import simulate_partition

    r = simulate_partition(5, 2, seed, cut_for=40.0, heal_for=30.0)
    assert r.majority_all_dead <= 12.0, r
    assert r.minority_all_dead <= 15.0, r
    assert r.false_dead_within == 0 and r.false_dead_after_heal == 0, r
    # Each node pings a DEAD member every couple of seconds, an extra message (not a probe turn): every
    # table has all five ALIVE within a few seconds of the heal (9-10 s when a DEAD member took a probe turn
    # every 10 s).
    assert r.all_alive_after <= 4.0 and r.not_alive_at_end == 0, r


def test_dials_are_rate_limited_whatever_gossip_names() -> None:
    swim, fake = node()
    swim.handle_request(pb.PingRequest(sender=rec("a"), updates=[rec(f"x{i}") for i in range(40)]), "tok", 0.0)
    assert len(swim.table.candidates) == 2 * CFG.max_piggyback  # only so many updates are read per message
    for i in range(100):
        swim.table.add_candidate(f"y{i}:1", 0.0)
    assert len(swim.table.candidates) == Limits().max_candidates
    dials = []
    for step in range(10):  # one simulated second in ten ticks
        swim.tick(step / 10)
        dials += [a for a, r, _ in fake.take() if a.startswith(("x", "y"))]
    assert len(dials) == CFG.dials_per_period


# -- refusals: one id per node, no loopback member among hosts (issue 22) -----------------------------------------

def refusing_node(me: str = "me:1") -> tuple[Swim, FakeTransport, list[tuple[str, str]]]:
    t = MemberTable(Member("me", me, 100, INC), Limits(period=CFG.period), wall_offset_ms=WALL)
    t.apply(rec("a"), 0.0, authentic=True)
    fake = FakeTransport()
    swim = Swim(t, fake, CFG, random.Random(7))
    swim._next_sync = 1e9
    refused: list[tuple[str, str]] = []
    swim.on_refused = lambda address, why: refused.append((address, why))
    return swim, fake, refused


def ping_from(sender: pb.Member) -> pb.PingRequest:
    return pb.PingRequest(cluster=CFG.cluster, protocol=CFG.protocol, sender=sender, updates=[sender])


def test_a_second_node_under_a_members_id_is_refused_and_named() -> None:
    swim, fake, refused = refusing_node()
    with pytest.raises(JoinRefused, match=r"node id 'a' is claimed by two nodes, at a:1 and at clone:1"):
        swim.handle_request(ping_from(rec("a", inc=INC + 60_000, address="clone:1")), object(), 1.0)
    assert refused and refused[0][0] == "clone:1" and "--node-id" in refused[0][1]
    assert swim.table.get("a").address == "a:1" and "clone:1" not in swim.table.candidates  # type: ignore[union-attr]
    # Dialled (a gossiped address), it answers under the member's id: refused too, the member stays where it is.
    swim.table.add_candidate("clone:1", 2.0, trusted=True)
    swim.tick(2.0)
    (address, _, seq), = [s for s in fake.take() if s[0] == "clone:1"]
    assert swim.handle_reply(seq, pb.PingReply(responder=rec("a", inc=INC + 60_000, address="clone:1")), 2.1) == []
    assert swim.table.get("a").address == "a:1" and len(refused) == 2  # type: ignore[union-attr]


def test_a_node_under_our_own_id_is_refused_and_not_taken_for_ourselves() -> None:
    swim, fake, refused = refusing_node()
    with pytest.raises(JoinRefused, match=r"node id 'me' is claimed by two nodes, at me:1 and at clone:1"):
        swim.handle_request(ping_from(rec("me", inc=INC + 5, address="clone:1")), object(), 1.0)
    swim.table.add_candidate("clone:1", 2.0, trusted=True)
    swim.tick(2.0)
    (address, _, seq), = [s for s in fake.take() if s[0] == "clone:1"]
    swim.handle_reply(seq, pb.PingReply(responder=rec("me", inc=INC + 5, address="clone:1")), 2.1)
    assert "clone:1" not in swim.table.self_addresses and len(refused) == 2  # a clone is not us at another address
    # Ourselves under another address (a seed that is this very node) is still just that.
    swim.table.add_candidate("alias:1", 3.0, trusted=True)
    swim.tick(3.0)
    (address, _, seq), = [s for s in fake.take() if s[0] == "alias:1"]
    swim.handle_reply(seq, pb.PingReply(responder=rec("me")), 3.1)
    assert "alias:1" in swim.table.self_addresses and len(refused) == 2


def test_a_member_on_the_lan_refuses_and_never_dials_a_loopback_member() -> None:
    swim, fake, refused = refusing_node(me="10.0.0.1:8288")
    with pytest.raises(JoinRefused, match=r"the node at 127.0.0.1:8290 advertises a loopback address.*MESH_LISTEN"):
        swim.handle_request(ping_from(rec("l", address="127.0.0.1:8290")), object(), 1.0)
    assert swim.table.get("l") is None and refused[0][0] == "127.0.0.1:8290"
    # Gossip of it names the dialler's own host: not a candidate; nor is it admitted from its own answer.
    swim.handle_request(pb.PingRequest(cluster=CFG.cluster, protocol=CFG.protocol, sender=rec("a"),
                                       updates=[rec("l", address="127.0.0.1:8290")]), object(), 1.5)
    assert "127.0.0.1:8290" not in swim.table.candidates
    assert swim.table.apply(rec("l", address="127.0.0.1:8290"), 2.0, authentic=True) == []
    # A seed on loopback (this host) may still be dialled: it answers with the address it advertises.
    assert swim.table.add_candidate("127.0.0.1:8288", 2.0, trusted=True)


def test_members_all_on_loopback_admit_each_other() -> None:
    swim, fake, refused = refusing_node(me="127.0.0.1:7000")
    swim.handle_request(ping_from(rec("l", address="127.0.0.1:8290")), object(), 1.0)
    assert "127.0.0.1:8290" in swim.table.candidates and not refused
