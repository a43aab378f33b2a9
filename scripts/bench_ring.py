"""Ring quality at 8, 64 and 1000 simulated members: balance, movement on join/leave, lookup and build cost.

    .venv/bin/python scripts/bench_ring.py [--keys 200000] [--json bench-results/ring.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

from mesh.ring import Ring


def measure(n: int, keys: list[str], vnodes: int) -> dict[str, float]:
    members = {f"node-{i}": 1.0 for i in range(n)}
    t = time.perf_counter()
    ring = Ring(members, vnodes=vnodes)
    build_ms = (time.perf_counter() - t) * 1e3
    primary = [ring.owners(k, 1)[0] for k in keys]
    load = Counter(primary)
    mean = len(keys) / n
    shares = ring.shares()
    joined = ring.with_member("newcomer")
    moved_join = sum(1 for k, p in zip(keys, primary) if joined.owners(k, 1)[0] != p) / len(keys)
    left = ring.without_member("node-0")
    moved_leave = sum(1 for k, p in zip(keys, primary) if left.owners(k, 1)[0] != p) / len(keys)
    sample = keys[:20000]
    t = time.perf_counter()
    for k in sample:
        ring.owners(k, 2)
    lookup_us = (time.perf_counter() - t) / len(sample) * 1e6
    return {
        "members": n,
        "max_over_mean_keys": max(load.get(m, 0) for m in members) / mean,
        "min_over_mean_keys": min(load.get(m, 0) for m in members) / mean,
        "max_over_mean_share": max(shares.values()) * n,
        "stdev_share_pct_of_mean": statistics.pstdev(shares.values()) * n * 100,
        "moved_on_join": moved_join,
        "ideal_join": 1 / (n + 1),
        "moved_on_leave": moved_leave,
        "ideal_leave": 1 / n,
        "owners_us": lookup_us,
        "build_ms": build_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=200_000)
    ap.add_argument("--vnodes", type=int, default=160)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    keys = [f"cm1/comfyui-0.21.0/{i:064x}" for i in range(args.keys)]
    rows = [measure(n, keys, args.vnodes) for n in (8, 64, 1000)]
    head = f"{'members':>7} {'max/mean keys':>13} {'min/mean':>8} {'max/mean share':>14} {'join moved':>10} " \
           f"{'ideal':>6} {'leave moved':>11} {'ideal':>6} {'owners µs':>9} {'build ms':>8}"
    print(head)
    for r in rows:
        print(f"{r['members']:>7} {r['max_over_mean_keys']:>13.2f} {r['min_over_mean_keys']:>8.2f} "
              f"{r['max_over_mean_share']:>14.2f} {r['moved_on_join']:>10.4f} {r['ideal_join']:>6.4f} "
              f"{r['moved_on_leave']:>11.4f} {r['ideal_leave']:>6.4f} {r['owners_us']:>9.2f} {r['build_ms']:>8.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"vnodes": args.vnodes, "keys": args.keys, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
