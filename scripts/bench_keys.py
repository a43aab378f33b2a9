#!/usr/bin/env python3
"""ComfyUI's cache-key digest vs provider/fastkeys.py, per call and per node per prompt (not a test).

    .venv/bin/python scripts/bench_keys.py [--json bench-results/keys.json]

Keys are the signatures ComfyUI builds for an N-node chain (tests/support/comfy_harness.py builds them as ComfyUI
does); the digest of the chain's last node (the largest key) is timed both ways, interleaved, and checked equal.
"Per node per prompt" is what ComfyUI pays with a provider: three digests of the same key (lookup at prompt
start, lookup before the node runs, store) for ComfyUI's function, one for the remembered fast one.
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

from provider.fastkeys import digest  # noqa: E402
from tests.support import comfy_harness as harness  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=60)
    p.add_argument("--json")
    a = p.parse_args()
    out: dict[str, object] = {"loadavg_start": os.getloadavg(), "chains": []}
    engine = harness.Engine(None)
    print(f"{'chain':>6} {'ComfyUI µs (min-max)':>24} {'fast µs (min-max)':>22} {'per call':>9} {'per node/prompt':>16}")
    for n in (5, 30):
        key = list(engine.signatures(harness.chain_prompt(n, seed=3, width=1)).values())[-1]
        assert digest(key) == harness.serialize_cache_key(key)
        times: dict[str, list[float]] = {"comfyui": [], "fast": []}
        for _ in range(a.repeat):  # interleaved
            for name, fn in (("comfyui", harness.serialize_cache_key), ("fast", digest)):
                t0 = time.perf_counter()
                fn(key)
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"nodes": n, **{f"{k}_us": {"median": round(med[k] * 1e6, 1), "min": round(min(v) * 1e6, 1),
                                          "max": round(max(v) * 1e6, 1)} for k, v in times.items()},
               "speedup_per_call": round(med["comfyui"] / med["fast"], 2),
               "speedup_per_node_per_prompt": round(3 * med["comfyui"] / med["fast"], 2)}
        out["chains"].append(row)  # type: ignore[union-attr]
        c, f = row["comfyui_us"], row["fast_us"]
        print(f"{n:>6} {c['median']:>8.0f} ({c['min']:.0f}-{c['max']:.0f}) {f['median']:>10.0f} ({f['min']:.0f}-{f['max']:.0f})"  # type: ignore[index]
              f" {row['speedup_per_call']:>8.1f}x {row['speedup_per_node_per_prompt']:>15.1f}x")
    out["loadavg_end"] = os.getloadavg()
    print(f"load average: start {out['loadavg_start']}, end {out['loadavg_end']}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
