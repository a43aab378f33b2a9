#!/usr/bin/env python3
"""SWIM at 8, 64 and 1,000 members, in simulated time: the real member table and protocol (mesh/membership/members.py,
mesh/membership/swim.py) over an in-process network with loss and latency. No sleeps, no threads: an event queue.

What it measures, per member count N (all members start knowing each other, probes staggered at random):

- cost: messages and bytes (ByteSize of the real protobuf messages) sent per node per second, over a quiet
  window with the configured loss (so it includes the gossip that false suspicions cause);
- detection: one member is killed (it stops answering anything); for every other member, the time from the
  kill until that member marks it SUSPECT, and until it marks it DEAD (out of the ring); p50 and p99;
- false suspicions and false DEAD declarations: SUSPECT / DEAD about a member that is alive, over the run;
- join: a new member starts with one seed; for every member, the time until it has admitted the newcomer
  (probed it and heard it answer as itself); p99, and how many members the newcomer knows at the end.

    .venv/bin/python scripts/sim_membership.py                 # N = 8, 64, 1000 with 5% loss
    .venv/bin/python scripts/sim_membership.py --sizes 64 --loss 0.05 --json out.json

Partitions (issue 20; simulate_partition): the first M members cut from the rest, both ways, while every member
reads from random ring members (failed reads open breakers, which the driver answers with probe_soon), then
healed. Per side: the time until every member marks every member of the other side DEAD, the fewest it held
DEAD at the heal; after the heal: DEAD marks (all false) and the time until every table is all ALIVE.
`--flap S` makes the link go down and up every S seconds instead; `--timing driver` uses mesh serve's timing.
Runs differ between processes with the same seed (string hashing): set PYTHONHASHSEED to repeat one.

    PYTHONHASHSEED=0 .venv/bin/python scripts/sim_membership.py --sizes 5,1000 --partition 2,10 --seeds 3
    PYTHONHASHSEED=0 .venv/bin/python scripts/sim_membership.py --sizes 5 --partition 2 --seeds 80 --flap 2 \
        --timing driver --cut-for 40 --heal-for 20
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.membership.members import (ALIVE, DEAD, IN_RING, SUSPECT, Change, Joined, Limits, Member,  # noqa: E402
                                     MemberTable, StateChanged)
from mesh.pb import mesh_pb2 as pb  # noqa: E402
from mesh.membership.swim import Config, Swim  # noqa: E402

EPOCH_MS = 1_750_000_000_000.0   # wall clock at simulated time 0 (incarnations are start times in ms)


@dataclass
class Result:
    n: int
    loss: float
    msgs_per_node_s: float = 0.0
    bytes_per_node_s: float = 0.0
    suspect_p50: float = 0.0
    suspect_p99: float = 0.0
    dead_p50: float = 0.0
    dead_p99: float = 0.0
    undetected: int = 0
    false_suspicions: int = 0       # distinct (member, incarnation) suspected while alive
    false_suspicion_marks: int = 0  # how many times a member marked an alive member SUSPECT
    false_dead: int = 0
    join_p50: float = 0.0
    join_p99: float = 0.0
    join_missing: int = 0
    joiner_knows: int = 0
    wall_seconds: float = 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class SimNode:
    node_id: str
    address: str
    swim: Swim = field(init=False)
    up: bool = True
    wake_at: float = float("inf")
    broken: set[str] = field(default_factory=set)   # members whose breaker a failed read opened (reads model)


class Network:
    def __init__(self, rng: random.Random, loss: float, latency: tuple[float, float]) -> None:
        self.rng = rng
        self.loss = loss
        self.latency = latency
        self.now = 0.0
        self.nodes: dict[str, SimNode] = {}
        self._events: list[tuple[float, int, object, tuple]] = []
        self._n = 0
        self.counting = False
        self.msgs = 0
        self.bytes = 0
        self.on_changes: list = []
        # A partition: address -> side; messages between sides are dropped (both ways, also in flight).
        self.side: dict[str, int] = {}

    def cut(self, src: str, dst: str) -> bool:
        return bool(self.side) and self.side.get(src) != self.side.get(dst)

    def at(self, t: float, fn: object, *args: object) -> None:
        self._n += 1
        heapq.heappush(self._events, (t, self._n, fn, args))

    def _leg(self) -> float | None:
        """Delay of one message, or None if it is lost."""
        if self.rng.random() < self.loss:
            return None
        return self.rng.uniform(*self.latency)

    def count(self, message: pb.PingRequest | pb.PingReply) -> None:
        if self.counting:
            self.msgs += 1
            self.bytes += message.ByteSize()

    def send(self, src: SimNode, address: str, request: pb.PingRequest, seq: int) -> None:
        self.count(request)
        delay = self._leg()
        dst = self.nodes.get(address)
        if delay is not None and dst is not None and not self.cut(src.address, address):
            self.at(self.now + delay, self._deliver_request, dst, request, (src, seq))

    def reply(self, src: SimNode, token: tuple[SimNode, int], reply: pb.PingReply) -> None:
        self.count(reply)
        delay = self._leg()
        if delay is not None and not self.cut(src.address, token[0].address):
            self.at(self.now + delay, self._deliver_reply, token[0], token[1], reply)

    def _deliver_request(self, dst: SimNode, request: pb.PingRequest, token: tuple[SimNode, int]) -> None:
        if dst.up and not self.cut(token[0].address, dst.address):
            dst.broken.discard(request.sender.node_id)
            self.changed(dst, dst.swim.handle_request(request, token, self.now))

    def _deliver_reply(self, dst: SimNode, seq: int, reply: pb.PingReply) -> None:
        if dst.up and not self.cut(reply.responder.address, dst.address):
            dst.broken.discard(reply.responder.node_id)
            self.changed(dst, dst.swim.handle_reply(seq, reply, self.now))

    def _tick(self, node: SimNode) -> None:
        if not node.up or self.now != node.wake_at:
            return  # superseded by an earlier wake-up
        node.wake_at = float("inf")
        self.changed(node, node.swim.tick(self.now))

    def changed(self, node: SimNode, changes: list[Change]) -> None:
        for fn in self.on_changes:
            fn(node, changes, self.now)
        wake = max(node.swim.next_wakeup(), self.now + 0.001)
        if wake < node.wake_at:
            node.wake_at = wake
            self.at(wake, self._tick, node)

    def run_until(self, t_end: float) -> None:
        events = self._events
        while events and events[0][0] <= t_end:
            t, _, fn, args = heapq.heappop(events)
            self.now = t
            fn(*args)  # type: ignore[operator]
        self.now = t_end


class SimTransport:
    def __init__(self, net: Network, node: SimNode) -> None:
        self.net = net
        self.node = node

    def send(self, address: str, request: pb.PingRequest, seq: int, timeout: float, bulk: bool = False) -> None:
        self.net.send(self.node, address, request, seq)

    def reply(self, token: object, reply: pb.PingReply) -> None:
        self.net.reply(self.node, token, reply)  # type: ignore[arg-type]


def make_node(net: Network, i: int, config: Config, limits: Limits, rng: random.Random) -> SimNode:
    # Names of one length at every N: the cost comparison is about the protocol, not about longer names.
    node = SimNode(f"node-{i:05d}", f"10.{i // 65536:03d}.{i // 256 % 256:03d}.{i % 256:03d}:7000")
    me = Member(node.node_id, node.address, capacity=1 << 30, incarnation=int(EPOCH_MS + net.now * 1000) + i)
    table = MemberTable(me, limits, wall_offset_ms=EPOCH_MS)
    node.swim = Swim(table, SimTransport(net, node), config, random.Random(rng.random()))
    net.nodes[node.address] = node
    return node


def converged_mesh(n: int, rng: random.Random, loss: float, latency: tuple[float, float], config: Config,
                   limits: Limits) -> tuple[Network, list[SimNode]]:
    """n nodes on one simulated network, each having admitted every other (a mesh that has converged)."""
    net = Network(rng, loss, latency)
    nodes = [make_node(net, i, config, limits, rng) for i in range(n)]
    records = [nd.swim.table.me for nd in nodes]
    for nd in nodes:
        table = nd.swim.table
        for r in records:
            if r.node_id != nd.node_id:
                table.members[r.node_id] = Member(r.node_id, r.address, r.capacity, r.incarnation)
        nd.swim._next_probe = rng.uniform(0.0, config.period)
        net.changed(nd, [])
    return net, nodes


def simulate(n: int, loss: float, seed: int = 1, latency: tuple[float, float] = (0.0005, 0.005),
             warmup: float = 3.0, window: float = 10.0, detect_for: float = 12.0, join_for: float = 12.0,
             config: Config | None = None) -> Result:
    started = time.perf_counter()
    rng = random.Random(seed)
    config = config or Config()
    limits = Limits(period=config.period)
    net, nodes = converged_mesh(n, rng, loss, latency, config, limits)
    res = Result(n=n, loss=loss)
    killed: set[str] = set()
    suspect_at: dict[str, float] = {}
    dead_at: dict[str, float] = {}
    joined_at: dict[str, float] = {}
    false_suspected: set[tuple[str, int]] = set()
    victim = nodes[rng.randrange(n)]
    joiner_id = f"node-{n:05d}"
    t_kill = warmup + window
    t_join = t_kill + detect_for

    def watch(node: SimNode, changes: list[Change], now: float) -> None:
        for c in changes:
            if isinstance(c, StateChanged):
                if c.node_id in killed:
                    if c.node_id == victim.node_id and c.new == SUSPECT:
                        suspect_at.setdefault(node.node_id, now - t_kill)
                    if c.node_id == victim.node_id and c.new == DEAD:
                        dead_at.setdefault(node.node_id, now - t_kill)
                        suspect_at.setdefault(node.node_id, now - t_kill)
                elif c.new == SUSPECT:
                    false_suspected.add((c.node_id, c.incarnation))
                    res.false_suspicion_marks += 1
                elif c.new == DEAD:
                    res.false_dead += 1
            elif isinstance(c, Joined) and c.node_id == joiner_id:
                joined_at.setdefault(node.node_id, now - t_join)

    net.on_changes.append(watch)
    net.run_until(warmup)
    net.counting = True
    net.run_until(warmup + window)
    net.counting = False
    res.msgs_per_node_s = net.msgs / n / window
    res.bytes_per_node_s = net.bytes / n / window

    victim.up = False
    killed.add(victim.node_id)
    net.run_until(t_join)
    observers = [nd.node_id for nd in nodes if nd is not victim]
    res.undetected = sum(1 for o in observers if o not in dead_at)
    res.suspect_p50, res.suspect_p99 = pct(list(suspect_at.values()), 0.5), pct(list(suspect_at.values()), 0.99)
    res.dead_p50, res.dead_p99 = pct(list(dead_at.values()), 0.5), pct(list(dead_at.values()), 0.99)

    joiner = make_node(net, n, config, limits, rng)
    seed_node = nodes[0] if nodes[0] is not victim else nodes[1]
    joiner.swim.table.add_candidate(seed_node.address, net.now)
    net.changed(joiner, [])
    net.run_until(t_join + join_for)
    waited = [joined_at.get(o, float("inf")) for o in observers]
    res.join_missing = sum(1 for w in waited if w == float("inf"))
    res.join_p50, res.join_p99 = pct(waited, 0.5), pct(waited, 0.99)
    res.false_suspicions = len(false_suspected)
    res.joiner_knows = sum(1 for m in joiner.swim.table.members.values() if m.state in (0, 1))
    res.wall_seconds = time.perf_counter() - started
    return res


@dataclass
class PartitionResult:
    """One partition run: the minority side (the first `minority` members) cut from the rest, then healed."""
    n: int
    minority: int
    seed: int
    reads: bool
    minority_all_dead: float = float("nan")   # s from the cut until every minority member had every majority one DEAD
    majority_all_dead: float = float("nan")   # the same for the majority side (nan: not within the cut)
    minority_dead_p50: float = float("nan")   # median over minority members of their own time to mark all DEAD
    majority_dead_p50: float = float("nan")   # the same over majority members
    minority_least: int = 0                   # fewest majority members a minority member held DEAD at the heal
    majority_least: int = 0                   # fewest minority members a majority member held DEAD at the heal
    dead_across: int = 0                      # DEAD marks of other-side members during the cut (flapping: all false)
    false_dead_within: int = 0                # DEAD marks of a member on one's own side, during the cut
    false_dead_after_heal: int = 0            # DEAD marks of anyone after the heal (everyone is alive)
    all_alive_after: float = float("nan")     # s from the heal until every table had every member ALIVE
    not_alive_at_end: int = 0                 # (observer, member) pairs still not ALIVE when the run ended
    cut_off: tuple[int, int] = (0, 0)         # members per side (minority, majority) that found themselves cut off
    sweeps: int = 0                           # sweep Pings sent, all members (swim.Swim.cut_off)
    wall_seconds: float = 0.0


def simulate_partition(n: int, minority: int, seed: int = 1, loss: float = 0.0,
                       latency: tuple[float, float] = (0.0005, 0.005), warmup: float = 3.0, cut_for: float = 60.0,
                       heal_for: float = 60.0, reads: bool = True, config: Config | None = None,
                       limits: Limits | None = None, flap: float = 0.0) -> PartitionResult:
    """A converged mesh of n is cut into `minority` | n - minority (no message crosses, in either direction),
    then healed. `reads`: every member also reads one random ring member per period, and a read at an
    unreachable one opens its breaker, which the driver (mesh/membership/driver.py) answers with probe_soon for
    as long as the member stays ALIVE: what a node serving gets does, and what the chaos test had. `flap`: the
    link goes down and up every `flap` seconds during the cut instead (a flapping link: DEAD across is false)."""
    started = time.perf_counter()
    rng = random.Random(seed)
    config = config or Config()
    limits = limits or Limits(period=config.period)
    net, nodes = converged_mesh(n, rng, loss, latency, config, limits)
    side = {nd.node_id: (0 if i < minority else 1) for i, nd in enumerate(nodes)}
    size = {0: minority, 1: n - minority}
    res = PartitionResult(n=n, minority=minority, seed=seed, reads=reads)
    t_cut, t_heal = warmup, warmup + cut_for
    phase = {"now": "before"}
    dead_other: dict[str, int] = {nd.node_id: 0 for nd in nodes}     # other-side members it holds DEAD
    all_dead_at: dict[str, float] = {}
    not_alive = {"pairs": 0}

    def watch(node: SimNode, changes: list[Change], now: float) -> None:
        for c in changes:
            if not isinstance(c, StateChanged):
                continue
            if (c.old == ALIVE) != (c.new == ALIVE):
                not_alive["pairs"] += 1 if c.old == ALIVE else -1
            other = side[c.node_id] != side[node.node_id]
            if c.new == DEAD:
                if phase["now"] == "cut" and not other:
                    res.false_dead_within += 1
                elif phase["now"] == "healed":
                    res.false_dead_after_heal += 1
            if other and c.new == DEAD and phase["now"] == "cut":
                res.dead_across += 1
            if other and (c.new == DEAD) != (c.old == DEAD):
                dead_other[node.node_id] += 1 if c.new == DEAD else -1
                if phase["now"] == "cut" and dead_other[node.node_id] == size[1 - side[node.node_id]]:
                    all_dead_at.setdefault(node.node_id, now - t_cut)

    def read(node: SimNode) -> None:
        """One read at a random ring member; the driver's breaker scan: probe_soon every ALIVE broken one."""
        if net.now >= t_heal + heal_for:
            return
        ring = [m for m in node.swim.table.members.values() if m.state in IN_RING]
        if ring:
            m = rng.choice(ring)
            if net.cut(node.address, m.address):
                node.broken.add(m.node_id)
        for node_id in list(node.broken):
            known = node.swim.table.get(node_id)
            if known is not None and known.state == ALIVE:
                node.swim.probe_soon(node_id)
        net.changed(node, [])
        net.at(net.now + config.period, read, node)

    net.on_changes.append(watch)
    if reads:
        for nd in nodes:
            net.at(rng.uniform(0.0, config.period), read, nd)
    net.run_until(t_cut)
    phase["now"] = "cut"
    cut_sides = {nd.address: side[nd.node_id] for nd in nodes}
    net.side = cut_sides
    if flap:
        def toggle() -> None:
            if phase["now"] == "cut":
                net.side = {} if net.side else cut_sides
                net.at(net.now + flap, toggle)
        net.at(t_cut + flap, toggle)
    net.run_until(t_heal)
    for s in (0, 1):
        times = [all_dead_at.get(nd.node_id, float("inf")) for nd in nodes if side[nd.node_id] == s]
        worst = max(times)
        if s == 0:
            res.minority_all_dead = worst if worst != float("inf") else float("nan")
            res.minority_dead_p50 = pct(times, 0.5) if pct(times, 0.5) != float("inf") else float("nan")
        else:
            res.majority_all_dead = worst if worst != float("inf") else float("nan")
            res.majority_dead_p50 = pct(times, 0.5) if pct(times, 0.5) != float("inf") else float("nan")
    res.minority_least = min(dead_other[nd.node_id] for nd in nodes if side[nd.node_id] == 0)
    res.majority_least = min(dead_other[nd.node_id] for nd in nodes if side[nd.node_id] == 1)
    phase["now"] = "healed"
    net.side = {}
    step = config.period
    t = t_heal
    while t < t_heal + heal_for:
        t += step
        net.run_until(t)
        if not_alive["pairs"] == 0 and res.all_alive_after != res.all_alive_after:
            res.all_alive_after = t - t_heal
    res.not_alive_at_end = not_alive["pairs"]
    res.cut_off = tuple(sum(1 for nd in nodes if side[nd.node_id] == s and nd.swim.counters.cut_off)  # type: ignore
                        for s in (0, 1))
    res.sweeps = sum(nd.swim.counters.sweeps for nd in nodes)
    res.wall_seconds = time.perf_counter() - started
    return res


def partition_main(args: argparse.Namespace) -> int:
    lo, hi = (float(x) / 1000 for x in args.latency_ms.split(","))
    minority = [int(x) for x in args.partition.split(",")]
    sizes = [int(x) for x in args.sizes.split(",")]
    out = []
    print(f"partition: loss {args.loss:.0%}, cut {args.cut_for:g} s then healed {args.heal_for:g} s, "
          f"reads {'on' if not args.no_reads else 'off'}, timing {args.timing}"
          + (f", flapping every {args.flap:g} s" if args.flap else ""))
    print(f"{'split':>9} {'seed':>4} {'minority->all DEAD s':>20} {'majority->all DEAD s':>20} "
          f"{'least':>5} {'least':>5} {'D acr':>6} {'false D in':>10} {'false D heal':>12} {'all ALIVE s':>11} {'left':>5} "
          f"{'cut off':>7} {'sweeps':>6} {'wall s':>6}")
    for n, m in zip(sizes, minority):
        for seed in range(args.seed, args.seed + args.seeds):
            config, limits = None, None
            if args.timing == "driver":  # mesh serve's defaults (driver.Timing): 0.5 s period, DEAD after >= 3 s
                config = Config(period=0.5, probe_timeout=0.25)
                limits = Limits(period=0.5, min_suspicion=3.0)
            r = simulate_partition(n, m, seed, args.loss, (lo, hi), cut_for=args.cut_for, heal_for=args.heal_for,
                                   reads=not args.no_reads, config=config, limits=limits, flap=args.flap)
            out.append(r)
            print(f"{f'{m}|{n - m}':>9} {seed:>4} {r.minority_all_dead:>20.2f} {r.majority_all_dead:>20.2f} "
                  f"{r.minority_least:>5} {r.majority_least:>5} {r.dead_across:>6} {r.false_dead_within:>10} {r.false_dead_after_heal:>12} {r.all_alive_after:>11.2f} "
                  f"{r.not_alive_at_end:>5} {f'{r.cut_off[0]}|{r.cut_off[1]}':>7} {r.sweeps:>6} {r.wall_seconds:>6.1f}",
                  flush=True)
        runs = [r for r in out if r.n == n and r.minority == m]
        for name in ("minority_all_dead", "majority_all_dead", "all_alive_after"):
            v = sorted(getattr(r, name) for r in runs)
            print(f"  {m}|{n - m} {name}: median {pct(v, 0.5):.2f} min {v[0]:.2f} max {v[-1]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in out], indent=2))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8,64,1000")
    ap.add_argument("--loss", type=float, default=0.05, help="probability that one message is lost (0.05)")
    ap.add_argument("--latency-ms", default="0.5,5", help="one-way latency, uniform between these (ms)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--window", type=float, default=10.0, help="simulated seconds over which cost is measured")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--partition", help="minority sizes, one per --sizes entry (e.g. --sizes 5,1000 "
                    "--partition 2,10): run the partition and heal scenario instead")
    ap.add_argument("--seeds", type=int, default=1, help="partition runs per size, seeds from --seed on")
    ap.add_argument("--cut-for", type=float, default=60.0, help="simulated seconds the partition lasts")
    ap.add_argument("--heal-for", type=float, default=60.0, help="simulated seconds after the heal")
    ap.add_argument("--no-reads", action="store_true", help="partition: no reads (no breakers, no probe_soon)")
    ap.add_argument("--flap", type=float, default=0.0, help="partition: the link flaps, down/up every FLAP s")
    ap.add_argument("--timing", choices=("sim", "driver"), default="sim",
                    help="partition: the simulator's 0.4 s period, or mesh serve's defaults (0.5 s, DEAD >= 3 s)")
    args = ap.parse_args()
    if args.partition:
        return partition_main(args)
    lo, hi = (float(x) / 1000 for x in args.latency_ms.split(","))
    results = []
    print(f"loss {args.loss:.0%}, latency {lo * 1000:g}-{hi * 1000:g} ms one way, seed {args.seed}")
    print(f"{'N':>5} {'msg/node/s':>10} {'B/node/s':>9} {'suspect p50/p99 s':>18} {'DEAD p50/p99 s':>15} "
          f"{'undet':>5} {'false S':>7} {'false D':>7} {'join p50/p99 s':>15} {'miss':>4} {'wall s':>6}")
    for n in (int(x) for x in args.sizes.split(",")):
        # Small meshes get a longer window: the same number of node-seconds keeps their figures as steady.
        r = simulate(n, args.loss, args.seed, (lo, hi), window=max(args.window, 1000.0 / n))
        results.append(r)
        print(f"{r.n:>5} {r.msgs_per_node_s:>10.2f} {r.bytes_per_node_s:>9.0f} "
              f"{r.suspect_p50:>8.2f} / {r.suspect_p99:<7.2f} {r.dead_p50:>6.2f} / {r.dead_p99:<6.2f} "
              f"{r.undetected:>5} {r.false_suspicions:>7} {r.false_dead:>7} "
              f"{r.join_p50:>6.2f} / {r.join_p99:<6.2f} {r.join_missing:>4} {r.wall_seconds:>6.1f}", flush=True)
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            print(f"N={r.n} vs N={base.n}: messages x{r.msgs_per_node_s / base.msgs_per_node_s:.2f}, "
                  f"bytes x{r.bytes_per_node_s / base.bytes_per_node_s:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
