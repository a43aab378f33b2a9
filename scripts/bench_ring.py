"""Ring quality at 8, 64 and 1000 simulated members: balance, keys moved on join and leave, lookup and build cost.

    .venv/bin/python scripts/bench_ring.py [--keys 200000] [--vnodes 160] [--json bench-results/ring.json]

Balance is reported two ways: over the primary owners of random "ns/<sha256>" keys (what a cache actually sees)
and over the exact hash-space shares (what it converges to). At 1000 members 200k keys are only 200 per member, so
the key columns there carry about 7% of sampling noise on top of the ring's own spread.

"stray" is the fraction of keys that moved between members that stayed: 0 with equal weights. With unequal weights
a join or leave shifts the mean weight and with it every member's virtual-node count, so some extra churn shows.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from mesh.cluster.ring import Ring

SIZES = (8, 64, 1000)
WEIGHTINGS: dict[str, Callable[[int], float]] = {"equal": lambda i: 1.0, "1|2": lambda i: 1.0 + i % 2}


def best_of(runs: int, fn: Callable[[], object]) -> float:
    """Seconds of the fastest run: the least disturbed by whatever else the machine was doing."""
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def moved(keys: list[str], before: list[str], after: Ring, joined: str = "", left: str = "") -> tuple[float, float]:
    """Fraction of keys whose primary changed, and of those that changed needlessly: neither taken by the member
    that joined nor given up by the one that left."""
    changed = stray = 0
    for key, old in zip(keys, before):
        new = after.owners(key, 1)[0]
        if new != old:
            changed += 1
            stray += new != joined and old != left
    return changed / len(keys), stray / len(keys)


def measure(n: int, weighting: str, keys: list[str], vnodes: int) -> dict[str, float | int | str]:
    weight = WEIGHTINGS[weighting]
    members = {f"node-{i}": weight(i) for i in range(n)}
    total = sum(members.values())
    build_s = best_of(3, lambda: Ring(members, vnodes=vnodes))
    ring = Ring(members, vnodes=vnodes)

    primary = [ring.owners(k, 1)[0] for k in keys]
    load = Counter(primary)
    key_ratio = [load.get(m, 0) / (len(keys) * w / total) for m, w in members.items()]
    share_ratio = [s / (members[m] / total) for m, s in ring.shares().items()]

    join_weight = weight(n)
    join, join_stray = moved(keys, primary, ring.with_member("newcomer", join_weight), joined="newcomer")
    leave, leave_stray = moved(keys, primary, ring.without_member("node-0"), left="node-0")

    sample = keys[:20_000]
    lookup_s = best_of(3, lambda: [ring.owners(k, 2) for k in sample]) / len(sample)
    return {
        "members": n, "weights": weighting,
        "max_over_mean_keys": max(key_ratio), "min_over_mean_keys": min(key_ratio),
        "max_over_mean_share": max(share_ratio), "min_over_mean_share": min(share_ratio),
        "moved_on_join": join, "ideal_join": join_weight / (total + join_weight), "stray_on_join": join_stray,
        "moved_on_leave": leave, "ideal_leave": members["node-0"] / total, "stray_on_leave": leave_stray,
        "owners_n2_us": lookup_s * 1e6, "build_ms": build_s * 1e3,
    }


COLUMNS = [  # (header, row key, format)
    ("members", "members", "{:>7}"),
    ("weights", "weights", "{:>7}"),
    ("max/mean keys", "max_over_mean_keys", "{:>13.3f}"),
    ("min/mean keys", "min_over_mean_keys", "{:>13.3f}"),
    ("max/mean share", "max_over_mean_share", "{:>14.3f}"),
    ("min/mean share", "min_over_mean_share", "{:>14.3f}"),
    ("join moved", "moved_on_join", "{:>10.4f}"),
    ("ideal", "ideal_join", "{:>6.4f}"),
    ("stray", "stray_on_join", "{:>6.4f}"),
    ("leave moved", "moved_on_leave", "{:>11.4f}"),
    ("ideal", "ideal_leave", "{:>6.4f}"),
    ("stray", "stray_on_leave", "{:>6.4f}"),
    ("owners µs", "owners_n2_us", "{:>9.2f}"),
    ("build ms", "build_ms", "{:>8.1f}"),
]


def print_table(rows: list[dict[str, float | int | str]]) -> None:
    print(" ".join(f"{h:>{len(fmt.format(rows[0][k]))}}" for h, k, fmt in COLUMNS))
    for row in rows:
        print(" ".join(fmt.format(row[k]) for _, k, fmt in COLUMNS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=200_000, help="random keys to place (default 200000)")
    ap.add_argument("--vnodes", type=int, default=160, help="virtual nodes per member of mean weight")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random keys, for repeatable runs")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    keys = [f"cm1/{rng.getrandbits(256):064x}" for _ in range(args.keys)]
    rows = [measure(n, w, keys, args.vnodes) for w in WEIGHTINGS for n in SIZES]
    print(f"{args.keys} keys, vnodes={args.vnodes}; ratios are relative to each member's weight")
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"vnodes": args.vnodes, "keys": args.keys, "seed": args.seed, "rows": rows},
                                        indent=2))


if __name__ == "__main__":
    main()
