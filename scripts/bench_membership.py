#!/usr/bin/env python3
"""Idle cost of membership with real `mesh serve` processes: CPU and Pings per node, 8 vs 24 members.

For each size, starts that many nodes on 127.0.0.1, 127.0.0.2, ... (each seeded with the first), waits until
every node sees every member ALIVE, lets it settle, then measures over a window: each process's CPU time
(utime + stime from /proc) and its membership counters from Stats (Pings served and sent, and their bytes).
Nothing else runs against the mesh, so this is the idle cost: what membership alone costs a node.

    .venv/bin/python scripts/bench_membership.py [--sizes 8,24] [--window 30] [--settle 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mesh.transport.peer import MeshError  # noqa: E402
from tests.support.localmesh import LocalMesh  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15 of stat)


def counters(mesh: LocalMesh) -> list[dict[str, float]]:
    out = []
    for node in mesh.nodes:
        try:
            with mesh.client(node, timeout=5.0) as c:
                out.append(dict(c.stats(timeout=5.0).counters))
        except MeshError:
            out.append({})
    return out


def measure(n: int, window: float, settle: float, heartbeat: float | None) -> dict[str, float]:
    extra = ["--max-memory", "64MiB"] + (["--heartbeat", str(heartbeat)] if heartbeat else [])
    with LocalMesh(extra_args=extra) as mesh:
        first = mesh.start_node(listen="127.0.0.1:0")
        for i in range(1, n):
            mesh.start_node(seeds=[first.address], listen=f"127.0.0.{i + 1}:0")
        mesh.wait_members(n, timeout=60.0 + 2 * n)
        time.sleep(settle)  # the measurement itself: a fixed window of idle time, not a wait for an event
        before_cpu = [cpu_seconds(nd.process.pid) for nd in mesh.nodes]
        before = counters(mesh)
        t0 = time.monotonic()
        time.sleep(window)
        elapsed = time.monotonic() - t0
        after_cpu = [cpu_seconds(nd.process.pid) for nd in mesh.nodes]
        after = counters(mesh)
        mesh.wait_members(n, timeout=30.0)  # still a whole mesh: nothing was declared dead while idle

    def rate(key: str) -> list[float]:
        return [(a.get(key, 0.0) - b.get(key, 0.0)) / elapsed for a, b in zip(after, before)]

    cpu = [(a - b) / elapsed * 100 for a, b in zip(after_cpu, before_cpu)]
    pings = [i + o for i, o in zip(rate("membership_pings_in"), rate("membership_pings_out"))]
    ping_bytes = [i + o for i, o in zip(rate("membership_ping_bytes_in"), rate("membership_ping_bytes_out"))]
    return {"n": n, "cpu_percent_median": statistics.median(cpu), "cpu_percent_mean": statistics.fmean(cpu),
            "pings_per_s_median": statistics.median(pings), "ping_bytes_per_s_median": statistics.median(ping_bytes),
            "window_s": elapsed, "load1": os.getloadavg()[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8,24")
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--settle", type=float, default=10.0)
    ap.add_argument("--heartbeat", type=float, default=None, help="--heartbeat for every node (default: its own)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    for n in (int(x) for x in args.sizes.split(",")):
        r = measure(n, args.window, args.settle, args.heartbeat)
        results.append(r)
        print(f"{n:>3} members: CPU per node {r['cpu_percent_median']:.2f}% median "
              f"({r['cpu_percent_mean']:.2f}% mean), Pings in+out {r['pings_per_s_median']:.1f}/s, "
              f"{r['ping_bytes_per_s_median']:.0f} B/s of Ping payload; load {r['load1']:.1f}", flush=True)
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"{b['n']} vs {a['n']}: CPU x{b['cpu_percent_median'] / max(a['cpu_percent_median'], 1e-9):.2f}, "
              f"Pings x{b['pings_per_s_median'] / max(a['pings_per_s_median'], 1e-9):.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
