"""A fleet replays a trace of prompts that share sub-graphs: how much compute does it execute, against the minimum?

    .venv/bin/python scripts/bench_fleet.py                  # the default: a few minutes on 2 cores
    .venv/bin/python scripts/bench_fleet.py --instances 4 --prompts 40 --trials 5 --json out.json

N ComfyUI-like processes (tests/support/comfy_harness.py, each with its embedded mesh node, one mesh) replay a
trace at the same time: each instance draws `--prompts` prompts by Zipf popularity over `--workflows` workflows.
A workflow is an image, a slow node of 0.3, 0.6 or 1.2 s (cycling) on it, then one of `--variants` cheap blurs
(10 ms) of the slow node's output: the blurs' outputs are as large as the slow node's (sizes differ by
workflow), so they compete with the slow outputs for room. Instances start a fraction of a second apart and
do not wait for each other, so arrivals overlap.

The minimum is every distinct node computed once (per node, the least time it took in any run of the trial). Each mode runs
on a fresh fleet with an empty mesh, interleaved within each trial so load drift hits all alike:
- none: no provider;
- lru: comfy-mesh, `--eviction lru`, no dedupe;
- cost: comfy-mesh, `--eviction cost` (mesh/storage/eviction.py), no dedupe;
- cost+dedupe: as cost, MESH_DEDUPE=1 ("n/a" while the provider has no dedupe, provider/dedupe.py).
at a mesh budget of `--budget` of the working set (default 0.25) and, for cost and cost+dedupe, at one that
holds it (`--full-budget`, default 1.5). The mesh budget is the nodes' --max-memory together over the
replication factor (a quarter of each node's budget is its near cache of keys it reads but does not own),
ComfyUI's own caches aside.

Then 4 instances (`--same-instances`) run the same new prompt at the same moment: how often its slow node ran
in the fleet, and each instance's wall time against the slow node's compute time.

Real ComfyUI instances (COMFYUI_DIR, as scripts/comfyui_e2e.py starts them) are not driven yet: with COMFYUI_DIR
set this says so and runs the harness.

Targets (issue 23): at 25 % of the working set, cost-aware saves >= 1.5x the compute seconds LRU saves; with
dedupe, <= 1.1x the minimum at a budget that holds the working set; 4 instances and the same new prompt: the
slow node runs once, walls <= compute + 10 %. Every prompt's outputs are checked against the no-provider run
(bit-identical) and no prompt may fail.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.comfy_harness import HarnessProcess  # noqa: E402

SECRET = "bench-fleet-secret"
SLOW_SECONDS = (0.3, 0.6, 1.2)
SIZES = (192, 256, 320)      # image side per workflow (cycles more slowly than the costs)
CHEAP_SECONDS = 0.01
RUN_TIMEOUT = 120.0


def has_dedupe() -> bool:
    return importlib.util.find_spec("provider.dedupe") is not None


# -- the trace -----------------------------------------------------------------------------------------------

def workflow(w: int) -> tuple[float, int]:
    """(slow node seconds, image side) of workflow w."""
    return SLOW_SECONDS[w % len(SLOW_SECONDS)], SIZES[(w // len(SLOW_SECONDS)) % len(SIZES)]


def prompt(w: int, v: int, salt: int) -> dict[str, Any]:
    """Workflow w, variant v. `salt` makes every run's nodes new to a fresh fleet's caches (and to none else)."""
    slow, side = workflow(w)
    return {
        "image": {"class_type": "MakeImage", "inputs": {"seed": salt * 1_000_003 + w, "batch": 1, "height": side,
                                                        "width": side}},
        "slow": {"class_type": "SlowBlur", "inputs": {"image": ["image", 0], "seed": 7 + w, "delay": slow}},
        "cheap": {"class_type": "SlowBlur", "inputs": {"image": ["slow", 0], "seed": 1000 + 10 * w + v,
                                                       "delay": CHEAP_SECONDS}},
    }


def zipf_trace(rng: random.Random, n: int, workflows: int, variants: int, s: float) -> list[tuple[int, int]]:
    """Workflow k is the (k+1)-th most popular (its cost cycles 0.3, 0.6, 1.2 s with k, as in issue 23's trace)."""
    weights = [1.0 / (k + 1) ** s for k in range(workflows)]
    return [(rng.choices(range(workflows), weights)[0], rng.randrange(variants)) for _ in range(n)]


def working_set_bytes(traces: list[list[tuple[int, int]]]) -> int:
    """Encoded bytes of every distinct value the trace produces: the image on 8-bit levels (1 byte a value),
    the two blurs as float32."""
    total = 0
    seen_w: set[int] = set()
    for w, v in {p for t in traces for p in t}:
        side = workflow(w)[1]
        total += side * side * 3 * 4  # the cheap blur (w, v)
        if w not in seen_w:
            seen_w.add(w)
            total += side * side * 3 * (1 + 4)  # the image and the slow node
    return total


# -- one fleet -------------------------------------------------------------------------------------------------

@dataclass
class RunResult:
    mode: str
    budget: float
    executed_seconds: float = 0.0
    by_node: dict[str, list[float]] = field(default_factory=dict)  # distinct node -> exec seconds seen
    prompts: int = 0
    failed: int = 0
    errors: int = 0
    wrong: int = 0
    wall: float = 0.0
    saved_by_provider: float = 0.0   # what the providers counted as compute seconds saved (their hits)
    stores_cheap: float = 0.0


def start_fleet(n: int, workdir: Path, args: list[str]) -> list[HarnessProcess]:
    fleet: list[HarnessProcess] = []
    try:
        first = HarnessProcess(["--secret", SECRET, *args], log_path=workdir / "i0.log", ready_timeout=60)
        fleet.append(first)
        for i in range(1, n):
            fleet.append(HarnessProcess(["--secret", SECRET, "--seeds", str(first.address), *args],
                                        log_path=workdir / f"i{i}.log", ready_timeout=60))
        for p in fleet:
            if first.address:
                p.wait_members(n, timeout=60)
    except BaseException:
        for p in fleet:
            p.kill()
        raise
    return fleet


def mode_args(mode: str, max_memory: int) -> list[str]:
    if mode == "none":
        return ["--no-provider"]
    if mode == "lru":  # comfy-mesh before costs: every value stored, least recently used evicted
        return ["--max-memory", str(max_memory), "--eviction", "lru", "--store-cheap", "--no-dedupe"]
    return ["--max-memory", str(max_memory), "--eviction", "cost", "--no-store-cheap"] \
        + ([] if mode == "cost+dedupe" else ["--no-dedupe"])


def node_key(name: str, w: int, v: int) -> str:
    return f"{name}/w{w}" + (f"/v{v}" if name == "cheap" else "")


def run_trace(mode: str, budget: float, traces: list[list[tuple[int, int]]], max_memory: int, salt: int,
              workdir: Path, reference: dict[str, Any]) -> RunResult:
    result = RunResult(mode, budget)
    fleet = start_fleet(len(traces), workdir, mode_args(mode, max_memory))
    lock = threading.Lock()
    try:
        def replay(i: int) -> None:
            time.sleep(0.15 * i)  # arrivals overlap, not in lockstep
            for w, v in traces[i]:
                r = fleet[i].run(timeout=RUN_TIMEOUT, prompt=prompt(w, v, salt))
                with lock:
                    result.prompts += 1
                    result.failed += bool(r["failed"])
                    result.errors += len(r["errors"])
                    for name in r["executed"]:
                        seconds = r["nodes"][name]["exec_s"]
                        result.executed_seconds += seconds
                        result.by_node.setdefault(node_key(name, w, v), []).append(seconds)
                    for name, tree in r["outputs"].items():  # bit-identical to what the no-provider run computed
                        known = reference.setdefault(node_key(name, w, v), tree)
                        result.wrong += known != tree

        started = time.monotonic()
        threads = [threading.Thread(target=replay, args=(i,), daemon=True) for i in range(len(fleet))]
        errors: list[BaseException] = []
        for t in threads:
            t.start()
        for t in threads:
            t.join(RUN_TIMEOUT * len(traces[0]))
            if t.is_alive():
                errors.append(TimeoutError("an instance did not finish its trace"))
        result.wall = time.monotonic() - started
        if errors:
            raise errors[0]
        if mode != "none":
            for p in fleet:
                provider = p.stats().get("provider", {})
                result.saved_by_provider += provider.get("provider_compute_seconds_saved", 0.0)
                result.stores_cheap += provider.get("provider_bridge_stores_cheap", 0.0)
    finally:
        for p in fleet:
            p.kill()
    return result


def same_prompt(mode: str, n: int, salt: int, workdir: Path) -> dict[str, Any]:
    """n instances, the same new prompt at the same moment."""
    fleet = start_fleet(n, workdir, mode_args(mode, 1 << 30))
    try:
        p = prompt(len(SLOW_SECONDS) - 1, 0, salt)  # the 1.2 s workflow
        barrier = threading.Barrier(n)
        results: list[dict[str, Any]] = [{} for _ in range(n)]

        def one(i: int) -> None:
            barrier.wait(timeout=30)
            results[i] = fleet[i].run(timeout=RUN_TIMEOUT, prompt=p)

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(RUN_TIMEOUT)
        runs = sum("slow" in r.get("executed", []) for r in results)
        compute = max((r["nodes"]["slow"]["exec_s"] for r in results if "slow" in r.get("executed", [])),
                      default=float("nan"))
        outputs = {json.dumps(r.get("outputs"), sort_keys=True) for r in results}
        return {"slow_runs": runs, "walls": [r.get("wall_s", float("nan")) for r in results],
                "compute_s": compute, "identical": len(outputs) == 1,
                "failed": sum(bool(r.get("failed")) or not r for r in results)}
    finally:
        for q in fleet:
            q.kill()


# -- report --------------------------------------------------------------------------------------------------

def med(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    return f"{statistics.median(xs):.2f} (min {min(xs):.2f}, max {max(xs):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=24, help="prompts each instance replays")
    ap.add_argument("--workflows", type=int, default=12)
    ap.add_argument("--variants", type=int, default=4, help="cheap blurs per workflow")
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--budget", type=float, default=0.25, help="mesh budget, a fraction of the working set")
    ap.add_argument("--full-budget", type=float, default=1.5, help="a budget that holds the working set")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--same-instances", type=int, default=4, help="0: skip the same-prompt scenario")
    ap.add_argument("--replicas", type=int, default=2, help="the harness's replication factor (its default)")
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()

    dedupe = has_dedupe()
    if os.environ.get("COMFYUI_DIR"):
        print("COMFYUI_DIR is set, but this benchmark drives the ComfyUI harness only (real ComfyUI: not yet)")
    load_before = os.getloadavg()
    modes: list[tuple[str, float]] = [("none", 0.0), ("lru", args.budget), ("cost", args.budget)]
    if dedupe:
        modes.append(("cost+dedupe", args.budget))
    modes += [("cost", args.full_budget)] + ([("cost+dedupe", args.full_budget)] if dedupe else [])
    runs: dict[tuple[str, float], list[RunResult]] = {m: [] for m in modes}
    minimum: list[float] = []
    same: dict[str, list[dict[str, Any]]] = {}
    print(f"fleet of {args.instances}, {args.prompts} prompts each, {args.workflows} workflows x {args.variants} "
          f"variants, Zipf {args.zipf}; dedupe {'available' if dedupe else 'n/a (no provider/dedupe.py)'}; "
          f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        workdir = Path(tmp)
        for trial in range(args.trials):
            rng = random.Random(args.seed * 1000 + trial)
            traces = [zipf_trace(rng, args.prompts, args.workflows, args.variants, args.zipf)
                      for _ in range(args.instances)]
            ws = working_set_bytes(traces)
            reference: dict[str, Any] = {}
            trial_runs: dict[tuple[str, float], RunResult] = {}
            for k, (mode, budget) in enumerate(modes):
                salt = trial * 100 + k + 1  # every run computes anew: nothing of an earlier run in any cache
                max_memory = max(1 << 20, int(budget * ws * args.replicas / args.instances))
                r = run_trace(mode, budget, traces, max_memory, salt, workdir, reference.setdefault(str(salt), {}))
                runs[(mode, budget)].append(r)
                trial_runs[(mode, budget)] = r
                print(f"  trial {trial + 1} {mode:<12} budget {budget:>4.2f} of {ws / 2**20:.1f} MiB: executed "
                      f"{r.executed_seconds:6.2f} s, wall {r.wall:5.1f} s, failed {r.failed}, errors {r.errors}, "
                      f"wrong {r.wrong}, values not stored as too cheap {r.stores_cheap:.0f}", flush=True)
            # The minimum: each distinct node once, at the least time it took in any run of this trial (every run
            # computes every distinct node at least once, so none can execute less than this).
            fastest: dict[str, float] = {}
            for r in trial_runs.values():
                for name, seconds in r.by_node.items():
                    fastest[name] = min(fastest.get(name, float("inf")), *seconds)
            minimum.append(sum(fastest.values()))
            if args.same_instances:
                for mode in ["cost"] + (["cost+dedupe"] if dedupe else []):
                    same.setdefault(mode, []).append(
                        same_prompt(mode, args.same_instances, 10_000 + trial * 10 + len(same), workdir))
    load_after = os.getloadavg()

    print(f"\nminimum (each distinct node computed once): {med(minimum)} s")
    report: dict[str, Any] = {"args": vars(args), "dedupe": dedupe, "load_before": load_before,
                              "load_after": load_after, "minimum_s": minimum, "modes": {}, "same_prompt": same}
    saved: dict[tuple[str, float], list[float]] = {}
    for (mode, budget), rs in runs.items():
        ratio = [r.executed_seconds / m for r, m in zip(rs, minimum)]
        nones = [r.executed_seconds for r in runs[("none", 0.0)]]
        saved[(mode, budget)] = [n - r.executed_seconds for r, n in zip(rs, nones)]
        label = f"{mode} @ {budget:.2f}" if mode != "none" else "none"
        print(f"{label:<20} executed {med([r.executed_seconds for r in rs])} s = {med(ratio)} x minimum; "
              f"saved {med(saved[(mode, budget)])} s; wrong {sum(r.wrong for r in rs)}, failed "
              f"{sum(r.failed for r in rs)}, errors {sum(r.errors for r in rs)}")
        report["modes"][label] = {"executed_s": [r.executed_seconds for r in rs], "x_minimum": ratio,
                                  "saved_s": saved[(mode, budget)], "wall_s": [r.wall for r in rs],
                                  "provider_saved_s": [r.saved_by_provider for r in rs],
                                  "wrong": sum(r.wrong for r in rs), "failed": sum(r.failed for r in rs),
                                  "errors": sum(r.errors for r in rs)}
    lru, cost = saved[("lru", args.budget)], saved[("cost", args.budget)]
    gain = [c / l if l > 0 else float("inf") for c, l in zip(cost, lru)]
    print(f"\ntarget: at {args.budget:.0%} of the working set cost-aware saves >= 1.5x what LRU saves: "
          f"{med(gain)} x -> {'met' if gain and statistics.median(gain) >= 1.5 else 'NOT met'}")
    report["cost_over_lru_saved"] = gain
    if dedupe:
        full = report["modes"][f"cost+dedupe @ {args.full_budget:.2f}"]["x_minimum"]
        print(f"target: with dedupe at {args.full_budget:.0%}, <= 1.1x the minimum: {med(full)} x -> "
              f"{'met' if statistics.median(full) <= 1.1 else 'NOT met'}")
    else:
        print(f"target: with dedupe at {args.full_budget:.0%}, <= 1.1x the minimum: n/a (no dedupe in this provider)")
    for mode, rows in same.items():
        walls = [w for r in rows for w in r["walls"]]
        over = [w / r["compute_s"] for r in rows for w in r["walls"]]
        print(f"same new prompt on {args.same_instances} instances at once, {mode}: slow node ran "
              f"{[r['slow_runs'] for r in rows]} times, walls {med(walls)} s = {med(over)} x its compute, "
              f"identical {all(r['identical'] for r in rows)}"
              + ("" if mode == "cost+dedupe" else " (the target needs dedupe)"))
    if not dedupe:
        print("same new prompt, cost+dedupe: n/a (no dedupe in this provider)")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, after "
          f"{load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    bad = sum(r.wrong + r.failed + r.errors for rs in runs.values() for r in rs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
