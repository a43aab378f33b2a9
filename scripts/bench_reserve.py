"""What the warm-memory reserve (mesh/buffers.py, MESH_WARM_MEMORY) does for hits that come seconds apart.

A 48 MiB decoded-image hit is decoded by the same StreamDecoder a hit uses (1 MiB pieces of the levels blob
widened into the tensor's memory), then dropped, as ComfyUI drops an output it no longer needs; the next hit
comes --gap seconds later. Each budget runs in its own process, in turn (A B A B), so every case meets the
machine in the same state. On a VM whose balloon reports freed memory to the host, memory freed a few seconds
ago is slow to touch again; the reserve touches it between hits instead of during them. The first hit of each
process is left out: the reserve learns sizes from requests, so a size's first hit is always cold.

    .venv/bin/python scripts/bench_reserve.py [--gap 3] [--hits 8] [--rounds 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IMAGE_SHAPE = (4, 1024, 1024, 3)
PIECE = 1 << 20


def run_case(budget_mib: int, gap: float, hits: int) -> dict[str, Any]:
    """In this process: `hits` + 1 hits spaced `gap` s apart with a reserve of `budget_mib`; the first left out."""
    import torch

    import mesh.codec as codec
    from mesh.buffers import RESERVE
    from provider.runtime import torch_on_one_core

    torch_on_one_core()  # as on the provider's threads
    RESERVE.configure(budget_mib * 2**20)
    pixels = torch.randint(0, 256, IMAGE_SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    image = pixels.float() / 255
    blob = bytes(codec.encode(image, levels=True))
    pieces = [blob[i:i + PIECE] for i in range(0, len(blob), PIECE)]
    times = []
    for i in range(hits + 1):
        time.sleep(gap)  # the time between two hits: ComfyUI computing something else
        started = time.perf_counter()
        decoder = codec.StreamDecoder()
        decoder.start(len(blob))
        for piece in pieces:
            decoder.feed(piece)
        value = decoder.finish()
        ms = (time.perf_counter() - started) * 1e3
        assert torch.equal(value, image), "not bit-exact"
        del value, decoder  # the output is dropped now: the gap starts with its memory freed
        if i:
            times.append(ms)
    stats = RESERVE.stats()
    return {"budget_mib": budget_mib, "ms_all": times, "warm": stats.warm, "cold": stats.cold}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gap", type=float, default=3.0, help="seconds between two hits")
    p.add_argument("--hits", type=int, default=8, help="hits timed per process")
    p.add_argument("--rounds", type=int, default=2, help="processes per budget, in turn")
    p.add_argument("--budgets", default="256,0", help="MESH_WARM_MEMORY values in MiB (0: no reserve)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--case", type=int, help=argparse.SUPPRESS)  # one budget, in a child process
    args = p.parse_args()
    if args.case is not None:
        print(json.dumps(run_case(args.case, args.gap, args.hits)))
        return 0
    budgets = [int(b) for b in args.budgets.split(",")]
    load = [os.getloadavg()[0]]
    runs: dict[int, list[float]] = {b: [] for b in budgets}
    counts: dict[int, list[int]] = {b: [0, 0] for b in budgets}
    for _ in range(args.rounds):
        for budget in budgets:
            out = subprocess.run([sys.executable, __file__, "--case", str(budget), "--gap", str(args.gap),
                                  "--hits", str(args.hits)], capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            runs[budget] += row["ms_all"]
            counts[budget][0] += row["warm"]
            counts[budget][1] += row["cold"]
    load.append(os.getloadavg()[0])
    print(f"48 MiB decoded-image hits {args.gap:g} s apart, {args.hits} per process x {args.rounds} processes per "
          f"budget, in turn; load average {load[0]:.2f} at start, {load[1]:.2f} at end")
    print(f"{'MESH_WARM_MEMORY':>18} {'median ms':>10} {'min':>7} {'max':>7}  hits served warm")
    result = []
    for budget in budgets:
        xs = sorted(runs[budget])
        warm, cold = counts[budget]
        print(f"{str(budget) + ' MiB':>18} {statistics.median(xs):>10.1f} {xs[0]:>7.1f} {xs[-1]:>7.1f}  "
              f"{warm} of {warm + cold} (the first of each process included)")
        result.append({"budget_mib": budget, "ms_median": statistics.median(xs), "ms_min": xs[0], "ms_max": xs[-1],
                       "ms_all": runs[budget], "warm": warm, "cold": cold})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"gap_s": args.gap, "load": load, "cases": result}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
