#!/usr/bin/env python3
"""Chaos run (not a test): N `mesh serve` processes on loopback, a verifying load, and a schedule of faults.

    .venv/bin/python scripts/chaos.py --scenario rolling-restart
    .venv/bin/python scripts/chaos.py --scenario kill9 --duration 60
    .venv/bin/python scripts/chaos.py --scenario freeze
    .venv/bin/python scripts/chaos.py --scenario partition --partition-seconds 30
    .venv/bin/python scripts/chaos.py --scenario skew
    .venv/bin/python scripts/chaos.py --scenario oneway --partition-seconds 30
    .venv/bin/python scripts/chaos.py --scenario all --json bench-results/chaos.json

Every value is derived from its key (a seeded PRNG), so every get is checked byte for byte (sha256) against
what was put: a wrong byte is counted, never hidden. Scenarios:

- rolling-restart: each node in turn is killed (-9), stays down 3 s, restarts with the same id and port; 10 s
  between nodes. Then: keys lost, and how long until every key had R copies again.
- kill9: a verifying load (writers and readers) while a random node is killed -9 and restarted every 20 s.
  Keys lost among those put at least 10 s before the last fault.
- freeze: one node SIGSTOPped (its port still accepts) for 6 s; gets of keys whose first owner it is, through
  another node, against the same gets before the freeze: added latency and hits turned into misses.
- partition: five hosts in network namespaces (root), a verifying load from a sixth host that reaches both
  sides, packets between {n0,n1} and {n2,n3,n4} dropped silently for --partition-seconds, then healed. Keys lost
  (on the owners the ring names after the heal), wrong bytes, misses during the cut, seconds for each side to
  hold the other DEAD, seconds to agreement after the heal. With --flap 2 the link goes down and up every 2 s
  instead: `most_dead_in_a_view` counts the false DEADs (target 0).
- oneway: five hosts as in partition; for --partition-seconds the frames n0 sends to n1 and n2, and n3 to n4,
  are dropped one way. Everyone still reaches everyone through a third: SUSPECT and DEAD seen in any view
  (target 0), nodes that took themselves for cut off and their sweep Pings (target 0), keys lost, wrong bytes;
  `--control`: the same run without the fault, for what the machine's load alone costs.
- skew: three owners of every key, one 10 minutes fast and one 10 minutes slow (libfaketime): conflicts written
  0.3 s apart through differently skewed nodes (copies the later write won: target 0), and deletes through a
  skewed node followed at once by re-puts (re-puts lost: target 0).

Everything is bounded in time; every process started is stopped at the end. Each node's peak RSS is sampled
against its budget.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.membership.driver import ring_weights  # noqa: E402
from mesh.transport.peer import MeshError, PeerClient  # noqa: E402
from mesh.pb import mesh_pb2 as pb  # noqa: E402
from mesh.cluster.ring import Ring  # noqa: E402
from mesh.units import parse_size  # noqa: E402
from tests.support.localmesh import LocalMesh, LocalNode  # noqa: E402

FAST = ["--heartbeat", "0.3", "--suspect-after", "1.5", "--dead-after", "4"]


def value_for(key: str, size: int) -> bytes:
    """The bytes stored under `key`: reproducible, so any reader can verify a get."""
    return random.Random(key).randbytes(size)


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Tally:
    puts: int = 0
    put_errors: int = 0
    gets: int = 0
    hits: int = 0
    misses: int = 0
    wrong_bytes: int = 0
    get_errors: int = 0
    put_at: dict[str, float] = field(default_factory=dict)  # key -> when its put was acknowledged
    lock: threading.Lock = field(default_factory=threading.Lock)


class Fleet:
    """The mesh under test: fixed ports and ids, so a restarted node is the same member."""

    def __init__(self, n: int, args: list[str], workdir: Path | None, data_dir: bool = False) -> None:
        self.mesh = LocalMesh(workdir)
        self.args = args
        self.slots: list[LocalNode] = []
        self.peak_rss: dict[str, int] = {}
        self._stop = threading.Event()
        seeds: list[str] = []
        for i in range(n):
            own = ["--data-dir", str(self.mesh.workdir / f"data-n{i}")] if data_dir else []
            node = self.mesh.start_node(node_id=f"n{i}", seeds=list(seeds), args=args + own)
            seeds.append(node.address)
            self.slots.append(node)
        self.mesh.wait_members(n, timeout=30)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for node in list(self.slots):
                try:
                    rss = psutil.Process(node.process.pid).memory_info().rss
                except psutil.Error:
                    continue
                self.peak_rss[node.node_id] = max(self.peak_rss.get(node.node_id, 0), rss)

    def alive(self) -> list[LocalNode]:
        return [n for n in self.slots if n.alive]

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        self.mesh.kill(self.slots[i], sig)

    def restart(self, i: int) -> None:
        self.slots[i] = self.mesh.restart(self.slots[i])

    def client(self, node: LocalNode, timeout: float = 10.0) -> PeerClient:
        return self.mesh.client(node, timeout=timeout)

    def stats(self, node: LocalNode) -> pb.StatsReply | None:
        try:
            with self.client(node, 5) as c:
                return c.stats()
        except MeshError:
            return None

    def close(self) -> None:
        self._stop.set()
        self.mesh.close()


def load(fleet: Fleet, tally: Tally, stop: threading.Event, keys: list[str], size: int, writers: int,
         readers: int, timeout: float, spread: float) -> list[threading.Thread]:
    """Writers put each key once, spread evenly over `spread` seconds; readers get keys already put and verify
    their bytes."""
    queue = list(keys)
    qlock = threading.Lock()
    started = time.monotonic()
    pace = spread / max(1, len(keys))

    def writer() -> None:
        while not stop.is_set():
            with qlock:
                if not queue:
                    return
                key = queue.pop(0)
                due = started + pace * (len(keys) - len(queue) - 1)
            if stop.wait(max(0.0, due - time.monotonic())):
                return
            nodes = fleet.alive()
            if not nodes:
                time.sleep(0.1)
                continue
            node = random.choice(nodes)
            try:
                with fleet.client(node, timeout) as c:
                    c.put(key, value_for(key, size))
                with tally.lock:
                    tally.puts += 1
                    tally.put_at[key] = time.monotonic()
            except MeshError:
                with tally.lock:
                    tally.put_errors += 1
                    queue.append(key)  # try again later, through another node

    def reader() -> None:
        while not stop.is_set():
            with tally.lock:
                done = list(tally.put_at)
            nodes = fleet.alive()
            if not done or not nodes:
                time.sleep(0.05)
                continue
            key = random.choice(done)
            try:
                with fleet.client(random.choice(nodes), timeout) as c:
                    blob = c.get(key)
            except MeshError:
                with tally.lock:
                    tally.get_errors += 1
                continue
            with tally.lock:
                tally.gets += 1
                if blob is None:
                    tally.misses += 1
                elif digest(blob.data) != digest(value_for(key, size)):
                    tally.wrong_bytes += 1
                else:
                    tally.hits += 1

    threads = [threading.Thread(target=writer, daemon=True) for _ in range(writers)]
    threads += [threading.Thread(target=reader, daemon=True) for _ in range(readers)]
    for t in threads:
        t.start()
    return threads


def survey(fleet: Fleet, keys: list[str], size: int, replicas: int) -> dict[str, int]:
    """Copies of each key on the live nodes (local_only Has), and whether a get returns the right bytes."""
    copies = {k: 0 for k in keys}
    for node in fleet.alive():
        with fleet.client(node) as c:
            for i in range(0, len(keys), 500):
                batch = keys[i:i + 500]
                for key, yes in zip(batch, c.has(batch, local_only=True)):
                    copies[key] += yes
    lost = [k for k, n in copies.items() if n == 0]
    wrong = 0
    node = fleet.alive()[0]
    with fleet.client(node) as c:
        for key in keys:
            if copies[key]:
                blob = c.get(key)
                if blob is None or digest(blob.data) != digest(value_for(key, size)):
                    wrong += 1
    return {"keys": len(keys), "lost": len(lost), "under_replicated": sum(1 for n in copies.values() if n < replicas),
            "wrong_bytes": wrong}


def wait_repaired(fleet: Fleet, keys: list[str], size: int, replicas: int, limit: float) -> tuple[float | None, dict]:
    """Seconds until every surviving key has R copies (None if not within `limit`), and the last survey."""
    started = time.monotonic()
    while True:
        s = survey(fleet, keys, size, replicas)
        if s["under_replicated"] == s["lost"]:
            return time.monotonic() - started, s
        if time.monotonic() - started > limit:
            return None, s
        time.sleep(0.5)


def rolling_restart(fleet: Fleet, a: argparse.Namespace) -> dict:
    keys = [f"rr/{i}" for i in range(a.keys)]
    with fleet.client(fleet.slots[0], 30) as c:
        for key in keys:
            c.put(key, value_for(key, a.value_size))
    _, before = wait_repaired(fleet, keys, a.value_size, a.replicas, 30)
    fault_times = []
    for i in range(len(fleet.slots)):
        fleet.kill(i)
        fault_times.append(time.monotonic())
        time.sleep(3.0)
        fleet.restart(i)
        if i < len(fleet.slots) - 1:
            time.sleep(10.0)
    repaired_after, after = wait_repaired(fleet, keys, a.value_size, a.replicas, 60)
    return {"scenario": "rolling-restart", "before": before, "after": after,
            "repair_seconds_after_last_restart": None if repaired_after is None else round(repaired_after, 2)}


def kill9(fleet: Fleet, a: argparse.Namespace) -> dict:
    keys = [f"k9/{i}" for i in range(a.keys)]
    tally = Tally()
    stop = threading.Event()
    threads = load(fleet, tally, stop, keys, a.value_size, writers=2, readers=6, timeout=5.0,
                   spread=a.duration * 0.8)
    end = time.monotonic() + a.duration
    last_fault = time.monotonic()
    rng = random.Random(7)
    while time.monotonic() + a.fault_every < end:
        time.sleep(a.fault_every)
        i = rng.randrange(len(fleet.slots))
        fleet.kill(i)
        last_fault = time.monotonic()
        time.sleep(3.0)
        fleet.restart(i)
    time.sleep(max(0.0, end - time.monotonic()))
    stop.set()
    for t in threads:
        t.join(timeout=15)
    settled = [k for k, at in tally.put_at.items() if at <= last_fault - 10.0]
    seconds, after = wait_repaired(fleet, settled, a.value_size, a.replicas, 60)
    return {"scenario": "kill9", "duration_s": a.duration, "fault_every_s": a.fault_every, "puts": tally.puts,
            "put_errors": tally.put_errors, "gets": tally.gets, "hits": tally.hits, "misses": tally.misses,
            "wrong_bytes": tally.wrong_bytes, "get_errors": tally.get_errors,
            "settled_keys": len(settled), "after": after,
            "repair_seconds": None if seconds is None else round(seconds, 2)}


def _timed_gets(c: PeerClient, keys: list[str], timeout: float) -> tuple[list[float], int]:
    times, misses = [], 0
    for key in keys:
        t0 = time.perf_counter()
        try:
            blob = c.get(key, timeout=timeout)
        except MeshError:
            blob = None
        times.append(time.perf_counter() - t0)
        misses += blob is None
    return times, misses


def freeze(fleet: Fleet, a: argparse.Namespace) -> dict:
    keys = [f"fz/{i}" for i in range(a.keys)]
    with fleet.client(fleet.slots[0], 30) as c:
        for key in keys:
            c.put(key, value_for(key, a.value_size))
    wait_repaired(fleet, keys, a.value_size, a.replicas, 30)
    frozen, reader = fleet.slots[0], fleet.slots[-1]
    stats = fleet.stats(reader)
    assert stats is not None
    ring = Ring(ring_weights(stats.members))
    # Keys whose first owner is the frozen node and which the reader does not own; half are read before the
    # freeze (the baseline), the other half during it (a key read once stays in the reader's near cache).
    theirs = [k for k in keys if ring.owners(k, a.replicas)[0] == frozen.node_id
              and reader.node_id not in ring.owners(k, a.replicas)]
    with fleet.client(reader) as c:
        base, base_misses = _timed_gets(c, theirs[::2], a.lookup_timeout)
    os.kill(frozen.process.pid, signal.SIGSTOP)
    try:
        with fleet.client(reader) as c:
            during, during_misses = _timed_gets(c, theirs[1::2], a.lookup_timeout)
    finally:
        os.kill(frozen.process.pid, signal.SIGCONT)

    def ms(xs: list[float]) -> dict:
        return {"median_ms": round(statistics.median(xs) * 1000, 1), "min_ms": round(min(xs) * 1000, 1),
                "max_ms": round(max(xs) * 1000, 1)} if xs else {}

    return {"scenario": "freeze", "keys_read_before": len(base), "keys_read_frozen": len(during),
            "before": ms(base), "during": ms(during),
            "added_median_ms": round((statistics.median(during) - statistics.median(base)) * 1000, 1),
            "added_max_ms": round((max(during) - statistics.median(base)) * 1000, 1),
            "misses_before": base_misses, "misses_during": during_misses}


def partition(a: argparse.Namespace) -> dict:
    """Five hosts in network namespaces (production timings), a verifying load from a sixth host that reaches
    both sides, a 2|3 cut for `--partition-seconds`, then a heal."""
    from tests.netns import NetLab, netns_available
    from tests.support.netfleet import NetFleet

    if (why := netns_available()) is not None:
        return {"scenario": "partition", "skipped": why}
    n, side = 5, 2
    with tempfile.TemporaryDirectory(prefix="chaos-partition-") as tmp, NetLab(n + 1) as lab:
        work = Path(tmp)
        secret = work / "secret"
        secret.write_bytes(os.urandom(32).hex().encode())
        args = ["--replicas", str(a.replicas), "--max-memory", a.max_memory,
                *(["--data-dir", str(work / "data")] if a.data_dir else [])]
        fleet = NetFleet(lab, n, 7441, secret, work, args)
        poll_until(fleet.agreed, 60)
        fleet.start_load(a.partition_seconds + 300, "--size", str(a.value_size))
        time.sleep(5.0)  # load before the cut
        views: dict[int, list[tuple[float, dict[str, int]]]] = {i: [] for i in range(n)}
        stop = threading.Event()

        def watch(i: int) -> None:
            while not stop.is_set():
                states = fleet.states(i)
                views[i].append((time.time(), states))  # when the answer came: the view is at least that old
                stop.wait(0.1)

        watchers = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(n)]
        for t in watchers:
            t.start()
        lab.cut(fleet.hosts[:side], fleet.hosts[side:])
        cut_at = time.time()
        if a.flap:  # the link goes down and up every `flap` seconds: no side should declare the other DEAD
            down = True
            while time.time() - cut_at < a.partition_seconds:
                time.sleep(a.flap)
                if down:
                    lab.heal()
                else:
                    lab.cut(fleet.hosts[:side], fleet.hosts[side:])
                down = not down
            lab.heal()
        else:
            time.sleep(a.partition_seconds)
            lab.heal()
        healed_at = time.time()
        poll_until(fleet.agreed, 120)
        time.sleep(5.0)  # load after the heal
        record = fleet.stop_load()
        stop.set()
        for t in watchers:
            t.join(timeout=30)
        settled = poll_until(lambda: all(fleet.status(i)["repair"]["hints"] == 0 for i in range(n)), 180)
        result = fleet.verify(a.replicas)

    def detected(i: int) -> float | None:
        """Seconds from the cut until node i held every member of the other side DEAD."""
        other = n - side if i < side else side
        for at, states in views[i]:
            if cut_at <= at <= healed_at and states.get("DEAD", 0) >= other:
                return round(at - cut_at, 1)
        return None

    def agreed_at(i: int) -> float | None:
        """Seconds from the heal until node i's view held all n ALIVE (each node is asked in parallel, every
        0.1 s plus the CLI's own start-up, about 0.5 s: the figure is an upper bound by that much)."""
        for at, states in views[i]:
            if at >= healed_at and states.get("ALIVE") == n:
                return at - healed_at
        return None

    agreements = [agreed_at(i) for i in range(n)]
    agreed_after = None if None in agreements else max(a for a in agreements if a is not None)
    reads = [r for at, r in record["reads"] if cut_at <= at <= healed_at]
    acked = record["acked"]
    most_dead = max((st.get("DEAD", 0) for i in range(n) for at, st in views[i] if cut_at <= at), default=0)
    return {"scenario": "partition", "partition_s": a.partition_seconds, "flap_s": a.flap,
            "most_dead_in_a_view": most_dead, "acked": len(acked),
            "acked_during": sum(1 for v in acked.values() if cut_at <= v["at"] <= healed_at),
            "hinted": sum(1 for v in acked.values() if v["hinted"]), "put_errors": record["put_errors"],
            "keys_lost": len(result["lost"]), "under_replicated": len(result["under_replicated"]),
            "wrong_bytes": len(result["wrong"]) + sum(1 for _, r in record["reads"] if r == "wrong"),
            "reads_during": len(reads), "misses_during": sum(1 for r in reads if r == "miss"),
            "errors_during": sum(1 for r in reads if r == "error"),
            "minority_detected_s": [detected(i) for i in range(side)],
            "majority_detected_s": [detected(i) for i in range(side, n)],
            "agreement_after_heal_s": round(agreed_after, 1) if agreed_after is not None else None,
            "hints_settled": settled}


def skew(a: argparse.Namespace) -> dict:
    """Three owners of every key, one 10 minutes fast and one 10 minutes slow (libfaketime): conflicts written
    0.3 s apart through differently skewed nodes, and deletes through a skewed node followed at once by re-puts."""
    from tests.support.clock import skewed_env

    mesh = LocalMesh()
    try:
        names = {"normal": None, "fast": "+10m", "slow": "-10m"}
        nodes = {name: mesh.start_node(node_id=name, args=["--replicas", "3", "--repair-interval", "2", *FAST],
                                       env=skewed_env(offset) if offset else None) for name, offset in names.items()}
        mesh.wait_members(3, timeout=30)

        def held(key: str) -> list[bytes | None]:
            out = []
            for node in nodes.values():
                with mesh.client(node) as c:
                    blob = c.get(key, local_only=True)
                    out.append(bytes(blob.data) if blob is not None else None)
            return out

        def put(name: str, key: str, value: bytes) -> None:
            with mesh.client(nodes[name]) as c:
                c.put(key, value)

        rng = random.Random(7)
        later_won = wrong = 0
        pairs = [(x, y) for x in names for y in names if x != y]
        for i in range(a.keys // 4):
            first, second = pairs[i % len(pairs)]
            key = f"skew/conflict/{i}"
            put(first, key, b"first" + value_for(key, 2000))
            poll_until(lambda key=key: set(held(key)) == {b"first" + value_for(key, 2000)}, 10)
            time.sleep(0.3)
            put(second, key, b"second" + value_for(key, 2000))
            values = held(key)
            later_won += sum(1 for v in values if v is not None and v.startswith(b"second"))
            wrong += sum(1 for v in values if v is not None and not v.endswith(value_for(key, 2000)))
        reput = [f"skew/delete/{i}" for i in range(a.keys // 4)]
        for key in reput:
            put("normal", key, b"old" + value_for(key, 2000))
        poll_until(lambda: all(set(held(k)) == {b"old" + value_for(k, 2000)} for k in reput), 30)
        for key in reput:
            with mesh.client(nodes[rng.choice(["fast", "slow"])]) as c:
                c.delete([key])
            put("normal", key, b"new" + value_for(key, 2000))
        poll_until(lambda: all(set(held(k)) == {b"new" + value_for(k, 2000)} for k in reput), 30)
        final = {k: held(k) for k in reput}
        lost = sum(1 for v in final.values() if all(x is None for x in v))
        not_everywhere = sum(1 for k, v in final.items() if set(v) != {b"new" + value_for(k, 2000)})
        wrong += sum(1 for k, v in final.items() for x in v if x is not None and not x.endswith(value_for(k, 2000)))
        return {"scenario": "skew", "conflicts": a.keys // 4, "copies_won_by_the_later_write": later_won,
                "reputs_after_delete": len(reput), "reputs_lost": lost, "reputs_missing_on_an_owner": not_everywhere,
                "wrong_bytes": wrong}
    finally:
        mesh.close()


def oneway(a: argparse.Namespace) -> dict:
    """Five hosts in network namespaces (production timings), a verifying load from a sixth; for
    `--partition-seconds`, the frames n0 sends to n1 and n2, and those n3 sends to n4, are dropped, one way (the
    other direction is untouched; TCP, and so gRPC, then fails both ways between them). Every member still
    reaches every other through a third, so indirect probes must keep everyone ALIVE: SUSPECT and DEAD in any
    view (target 0), and no node may take itself for cut off (sweeps, target 0)."""
    from tests.netns import NetLab, netns_available
    from tests.support.netfleet import NetFleet

    if (why := netns_available()) is not None:
        return {"scenario": "oneway", "skipped": why}
    n = 5
    with tempfile.TemporaryDirectory(prefix="chaos-oneway-") as tmp, NetLab(n + 1) as lab:
        work = Path(tmp)
        secret = work / "secret"
        secret.write_bytes(os.urandom(32).hex().encode())
        args = ["--replicas", str(a.replicas), "--max-memory", a.max_memory]
        fleet = NetFleet(lab, n, 7441, secret, work, args)
        poll_until(fleet.agreed, 60)
        fleet.start_load(a.partition_seconds + 300, "--size", str(a.value_size))
        time.sleep(5.0)  # load before the fault
        views: dict[int, list[dict[str, int]]] = {i: [] for i in range(n)}
        stop = threading.Event()

        def watch(i: int) -> None:
            while not stop.is_set():
                views[i].append(fleet.states(i))
                stop.wait(0.1)

        watchers = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(n)]
        for t in watchers:
            t.start()
        logs = [work / f"n{i}.log" for i in range(n)]
        offsets = [p.stat().st_size for p in logs]  # each node logs every state change it makes
        h = fleet.hosts
        if not a.control:
            lab.cut([h[0]], [h[1], h[2]], both_ways=False)
            lab.cut([h[3]], [h[4]], both_ways=False)
        time.sleep(a.partition_seconds)
        lab.heal()
        time.sleep(5.0)  # load after the heal
        record = fleet.stop_load()
        stop.set()
        for t in watchers:
            t.join(timeout=30)
        stats = [fleet.stats(i) for i in range(n)]
        result = fleet.verify(a.replicas)
        logged = "".join(f"[n{i}] " + line for i, (p, o) in enumerate(zip(logs, offsets))
                         for line in p.read_bytes()[o:].decode(errors="replace").splitlines(keepends=True))
    reads = record["reads"]
    return {"scenario": "oneway", "fault_s": a.partition_seconds, "control": a.control, "views": sum(len(v) for v in views.values()),
            "views_unanswered": sum(1 for v in views.values() for st in v if not st),
            "suspect_marks": logged.count(" is SUSPECT "), "dead_marks": logged.count(" is DEAD "),
            "refutations": logged.count("refuted a suspicion"),
            "marks": [line.strip() for line in logged.splitlines() if " is SUSPECT " in line or " is DEAD " in line
                      or "refuted" in line][:40],
            "most_suspect_in_a_view": max(st.get("SUSPECT", 0) for v in views.values() for st in v),
            "most_dead_in_a_view": max(st.get("DEAD", 0) for v in views.values() for st in v),
            "cut_off": sum(int(s.get("membership_cut_off", 0)) for s in stats),
            "sweeps": sum(int(s.get("membership_sweeps", 0)) for s in stats),
            "acked": len(record["acked"]), "put_errors": record["put_errors"], "keys_lost": len(result["lost"]),
            "wrong_bytes": len(result["wrong"]) + sum(1 for _, r in reads if r == "wrong"),
            "reads": len(reads), "misses": sum(1 for _, r in reads if r == "miss"),
            "read_errors": sum(1 for _, r in reads if r == "error"), "loadavg": os.getloadavg()}


def poll_until(check: Callable[[], bool], limit: float) -> bool:
    """Whether `check` held within `limit` seconds (polled; a scenario reports a miss rather than failing)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


SCENARIOS: dict[str, Callable[[Fleet, argparse.Namespace], dict]] = {
    "rolling-restart": rolling_restart, "kill9": kill9, "freeze": freeze}
STANDALONE: dict[str, Callable[[argparse.Namespace], dict]] = {"partition": partition, "skew": skew,
                                                              "oneway": oneway}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=[*SCENARIOS, *STANDALONE, "all"], default="all")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--keys", type=int, default=200)
    p.add_argument("--value-size", default="64KiB")
    p.add_argument("--max-memory", default="256MiB")
    p.add_argument("--duration", type=float, default=120.0, help="kill9: seconds of load")
    p.add_argument("--fault-every", type=float, default=20.0, help="kill9: seconds between faults")
    p.add_argument("--lookup-timeout", type=float, default=3.0, help="freeze: deadline of each get")
    p.add_argument("--data-dir", action="store_true", help="give every node a --data-dir (the disk tier)")
    p.add_argument("--partition-seconds", type=float, default=30.0,
                   help="partition, oneway: how long the cut (the one-way fault) lasts")
    p.add_argument("--flap", type=float, default=0.0,
                   help="partition: instead of one cut, the link goes down and up every FLAP seconds")
    p.add_argument("--control", action="store_true",
                   help="oneway: the same run without the fault (what the machine's load alone costs)")
    p.add_argument("--json", help="write the results here too")
    a = p.parse_args()
    a.value_size = parse_size(a.value_size)
    results = {"loadavg_start": os.getloadavg(), "data_dir": a.data_dir, "nodes": a.nodes, "replicas": a.replicas, "keys": a.keys,
               "value_size": a.value_size, "max_memory": a.max_memory, "runs": []}
    for name in ([*SCENARIOS, *STANDALONE] if a.scenario == "all" else [a.scenario]):
        if name in STANDALONE:
            run = STANDALONE[name](a)
            print(json.dumps(run, indent=2))
            results["runs"].append(run)
            continue
        args = ["--replicas", str(a.replicas), "--max-memory", a.max_memory, *FAST]
        fleet = Fleet(a.nodes, args, None, data_dir=a.data_dir)
        try:
            run = SCENARIOS[name](fleet, a)
        finally:
            budget = parse_size(a.max_memory)
            run_rss = {k: round(v / 2**20, 1) for k, v in fleet.peak_rss.items()}
            fleet.close()
        run["data_dir"] = a.data_dir
        run["peak_rss_mib"] = run_rss
        run["budget_mib"] = round(budget / 2**20, 1)
        print(json.dumps(run, indent=2))
        results["runs"].append(run)
    results["loadavg_end"] = os.getloadavg()
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
