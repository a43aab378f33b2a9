"""What the ComfyUI provider costs and what a hit saves, measured through the ComfyUI stand-in (tests/support/comfy_harness).

(a) All-miss overhead: prompts of cheap nodes run through the harness three ways: with the mesh provider
    (embedded in this process, in a 2-node mesh on loopback whose other node is a ComfyUI-like harness process,
    so each prompt-start Has also asks the peer), with a null provider (every lookup an immediate miss), and
    with no provider. mesh - null is what the provider costs (the target); null - none is what ComfyUI itself
    spends on having any provider (it canonicalises and hashes each node's key again for every provider call),
    which a Redis provider would pay as well. Per node, both lookups and the store hand-off included, median
    over prompts. Stores are pushed off the prompt's critical path; after each prompt they are flushed and
    replicated before the next one starts, and the CPU they took (this process and the peer) is reported apart
    (--no-settle: prompts start while the previous one's replica writes may still run).
(b) Hit of a 4x1024x1024x3 float32 IMAGE (48 MiB): process A computes and stores it; this process (B) times
    `await provider.on_lookup(context)`, for a value B holds a replica of (replicas=2), a value only A owns
    (replicas=1: one gRPC stream over loopback), and in sidecar mode (attached to A's node); each image is looked
    up --lookups times, B's near copy dropped in between. Compared with recomputing the image with a
    representative CPU op, and with a real redis-server (GET of the same 48 MiB into a fresh buffer, then
    torch.frombuffer), when one is on PATH: one GET beside every hit, in turn before and after it, so the
    baseline meets the machine in the same state as the hits; each case is judged against its own GETs.

    .venv/bin/python scripts/bench_provider.py [--json bench-results/provider.json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.support.comfy_harness import (CacheContext, Engine, HarnessProcess, big_image_prompt, chain_prompt,  # noqa: E402
                                 parser as harness_parser, start_runtime)

SECRET = "bench-provider-secret"
OVERHEAD_TARGET_US = 100.0  # the fast-path issue: all-miss provider overhead per node over a null provider
HIT_SPEEDUP_TARGET = 2.0    # ... and a 48 MiB IMAGE hit at least 2x faster than Redis GET + torch.frombuffer
IMAGE_SHAPE = (4, 1024, 1024, 3)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def runtime(*extra: str) -> Any:
    return start_runtime(harness_parser().parse_args(["--secret", SECRET, *extra]))


def wait_members(rt: Any, count: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while len(rt.node.cluster.ring) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"ring has {len(rt.node.cluster.ring)} members, wanted {count}")
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------ (a) overhead


class NullProvider:
    """A provider that answers every lookup with a miss at once and drops every store: what ComfyUI itself spends
    on any provider (hashing each key again per call, the self-unequal checks, the calls), with no cache behind."""

    def should_cache(self, context: Any, value: Any = None) -> bool:
        return True

    async def on_lookup(self, context: Any) -> None:
        return None

    async def on_store(self, context: Any, value: Any) -> None:
        return None

    def on_prompt_start(self, prompt_id: str) -> None:
        pass

    def on_prompt_end(self, prompt_id: str) -> None:
        pass


def bench_overhead(peer: HarnessProcess, sizes: list[int], reps: int, depth: int,
                   settle: bool = True) -> list[dict[str, Any]]:
    """Per node: what a prompt costs with the provider over a null provider (the target), and, counted apart,
    the CPU its stores cost afterwards (here and in the peer that takes the replicas).

    `settle`: after each prompt, wait until its stores are pushed *and* replicated before the next prompt
    starts, so that no prompt is measured while the previous one's replica writes still run (they would be
    counted twice: as store CPU and in the next prompt). Without it, back-to-back prompts overlap them."""
    import psutil

    peer_proc = psutil.Process(peer.process.pid)
    rt = runtime("--seeds", peer.address)
    rows = []
    try:
        wait_members(rt, 2)
        peer.wait_members(2)
        engines = {"mesh": Engine(rt.provider), "null": Engine(NullProvider()), "none": Engine(None)}
        seed = 1_000_000
        for n in sizes:
            width = max(1, n // depth)
            total, ours, comfy, batches, errors, store_cpu = [], [], [], [], 0, []
            for rep in range(reps + 3):  # the first 3 are warm-up
                seed += 1
                prompt = chain_prompt(n, seed, width=width)
                b0 = rt.bridge.counters.batches
                names = list(engines)
                names = names[rep % 3:] + names[:rep % 3]  # rotate the order: no engine always runs first
                results = {}
                for name in names:
                    results[name] = engines[name].run(prompt)
                    cpu = time.process_time(), sum(peer_proc.cpu_times()[:2])
                    rt.bridge.flush(30.0)  # stores are pushed off the prompt's critical path: keep them off it here
                    if settle:
                        rt.node.cluster.flush(30.0)  # ... and their replica writes to the peer
                    if name == "mesh" and settle:
                        store_cpu.append((time.process_time() - cpu[0] + sum(peer_proc.cpu_times()[:2]) - cpu[1])
                                         / n * 1e6)
                if rep < 3:
                    continue
                mesh, null, none = results["mesh"], results["null"], results["none"]
                errors += len(mesh.errors)
                assert len(mesh.executed) == n and not mesh.provider_hits, "an all-miss prompt hit"
                total.append((mesh.wall_s - none.wall_s) / n * 1e6)
                comfy.append((null.wall_s - none.wall_s) / n * 1e6)
                ours.append((mesh.wall_s - null.wall_s) / n * 1e6)
                batches.append(rt.bridge.counters.batches - b0)
            row = {"nodes": n, "depth": depth, "prompts": reps,
                   "provider_us_per_node_median": median(ours), "provider_us_per_node_p90": pct(ours, 0.9),
                   "comfyui_us_per_node_median": median(comfy),
                   "added_us_per_node_median": median(total), "added_us_per_node_p90": pct(total, 0.9),
                   "lookup_batches_per_prompt": {str(k): batches.count(k) for k in sorted(set(batches))},
                   "harness_errors": errors, "settled": settle,
                   "store_cpu_us_per_node_median": median(store_cpu) if store_cpu else None}
            rows.append(row)
            print(f"  {n} nodes: provider {row['provider_us_per_node_median']:.0f} us/node "
                  f"(p90 {row['provider_us_per_node_p90']:.0f}); ComfyUI's own cost of any provider "
                  f"{row['comfyui_us_per_node_median']:.0f}; total +{row['added_us_per_node_median']:.0f}; "
                  f"lookup batches per prompt {row['lookup_batches_per_prompt']}"
                  + (f"; stores afterwards: {row['store_cpu_us_per_node_median']:.0f} us of CPU per node (both processes)"
                     if settle else "; prompts overlap the previous prompt's replica writes"), flush=True)
    finally:
        rt.close()
    return rows


# ------------------------------------------------------------------------------------------------ (b) hits


def timed_lookup(provider: Any, context: CacheContext) -> tuple[float, Any]:
    async def go() -> tuple[float, Any]:
        provider.on_prompt_start("bench")
        t0 = time.perf_counter()
        value = await provider.on_lookup(context)
        return time.perf_counter() - t0, value

    return asyncio.run(go())


def bench_hits(workdir: Path, reps: int, lookups: int, warm: str, redis: RedisBaseline | None) -> list[dict[str, Any]]:
    """`reps` images computed by A, each looked up `lookups` times by B (whose near copy is dropped in between),
    each lookup next to one Redis GET of the same size (in turn first and second)."""
    rows = []
    engine = Engine(None)
    for label, replicas, mode in (("embedded, B holds a replica", 2, "embedded"),
                                  ("embedded, only A owns it (gRPC)", 1, "embedded"),
                                  ("sidecar (B attached to A's node)", 1, "sidecar")):
        peer = HarnessProcess(["--secret", SECRET, "--replicas", str(replicas)], log_path=workdir / "hit-peer.log")
        rt = None
        try:
            if mode == "embedded":
                rt = runtime("--seeds", peer.address, "--replicas", str(replicas), "--warm-memory", warm)
                wait_members(rt, 2)
                peer.wait_members(2)
            else:
                rt = runtime("--mode", "sidecar", "--node", peer.address, "--warm-memory", warm)
            times: list[float] = []
            redis_times: list[float] = []
            seed = 0
            while len(times) < reps * lookups and seed < 200:
                seed += 1
                prompt = big_image_prompt(seed)
                context = engine.contexts(prompt)["big"]
                assert context is not None
                key = f"{rt.provider.namespace}/{context.cache_key_hash}"
                if mode == "embedded" and replicas == 1 and rt.node.cluster.owners(key) != [peer.node_id]:
                    continue  # only keys A owns cross the network
                result = peer.run(prompt=prompt, timeout=120)
                assert result["executed"] == ["big"] and not result["errors"], result
                if not peer.flush(60):
                    raise RuntimeError("A did not store the image")
                if mode == "embedded" and replicas == 2:  # the replica reaches B in the background
                    deadline = time.monotonic() + 30
                    while key not in rt.node.store and time.monotonic() < deadline:
                        time.sleep(0.01)
                want = result["outputs"]["big"]["dict"][0][1]["list"][0]["list"][0]["sha256"]
                for _ in range(lookups):
                    if redis is not None and len(times) % 2 == 0:
                        redis_times.append(redis.get())
                    seconds, value = timed_lookup(rt.provider, context)
                    if value is None:
                        raise RuntimeError(f"no hit for {key}: {rt.provider.stats()}")
                    image = value.outputs[0][0]
                    assert tuple(image.shape) == IMAGE_SHAPE and image.dtype == torch.float32
                    got = hashlib.sha256(image.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
                    assert got == want, "the hit is not bit-exact"
                    times.append(seconds * 1e3)
                    if redis is not None and len(redis_times) < len(times):
                        redis_times.append(redis.get())
                    if rt.node is not None:
                        rt.node.near.delete([key])  # the next read of an A-owned key crosses the network again
                    del value, image
            row = {"case": label, "replicas": replicas, "mode": mode, "hits": len(times),
                   "ms_median": median(times), "ms_p90": pct(times, 0.9), "ms_min": min(times), "ms_max": max(times),
                   "ms_all": times, "redis_ms_median": median(redis_times), "redis_ms_all": redis_times}
            rows.append(row)
            print(f"  {label}: {row['ms_median']:.1f} ms median (p90 {row['ms_p90']:.1f}, min {row['ms_min']:.1f}, "
                  f"max {row['ms_max']:.1f}; {len(times)} hits); Redis beside it {row['redis_ms_median']:.1f} ms",
                  flush=True)
        finally:
            if rt is not None:
                rt.close()
            peer.quit()
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _read_line(sock: Any) -> bytes:
    line = b""
    while not line.endswith(b"\r\n"):
        piece = sock.recv(1)
        if not piece:
            raise ConnectionError("redis closed the connection")
        line += piece
    return line[:-2]


class RedisBaseline:
    """The baseline, measured here and now and interleaved with the hits: a real redis-server on loopback holding
    the same 48 MiB image, read with GET into a fresh buffer and `torch.frombuffer` (what a Redis-backed provider
    would do). Each hit of the mesh is followed by one such GET, so both see the same state of this machine."""

    def __init__(self, server: str) -> None:
        import socket
        import subprocess

        port = _free_port()
        self.proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        # the same kind of value the harness's MakeImage makes (8-bit levels), as float32 bytes: what a
        # Redis-backed provider stores
        pixels = torch.randint(0, 256, IMAGE_SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
        self.image = pixels.to(torch.float32) / 255.0
        payload = self.image.numpy().tobytes()
        self.sock.sendall(b"*3\r\n$3\r\nSET\r\n$5\r\nimage\r\n$%d\r\n" % len(payload) + payload + b"\r\n")
        assert _read_line(self.sock) == b"+OK"
        self.times: list[float] = []

    @classmethod
    def start(cls) -> RedisBaseline | None:
        import shutil

        server = shutil.which("redis-server")
        return None if server is None else cls(server)

    def get(self) -> float:
        """One GET + torch.frombuffer, checked; its milliseconds (also kept in `times`)."""
        t0 = time.perf_counter()
        self.sock.sendall(b"*2\r\n$3\r\nGET\r\n$5\r\nimage\r\n")
        size = int(_read_line(self.sock)[1:])
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            n = self.sock.recv_into(view[got:])
            if not n:
                raise ConnectionError("redis closed the connection")
            got += n
        assert _read_line(self.sock) == b""
        tensor = torch.frombuffer(buf, dtype=torch.float32).view(IMAGE_SHAPE)
        ms = (time.perf_counter() - t0) * 1e3
        assert torch.equal(tensor, self.image)
        self.times.append(ms)
        return ms

    def close(self) -> None:
        if getattr(self, "sock", None) is not None:
            self.sock.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)


def bench_recompute(reps: int) -> list[dict[str, Any]]:
    """Representative CPU ops on the image: ComfyUI ImageBlur-style gaussian blur, ImageScale-style bicubic 2x."""
    import torch.nn.functional as F

    image = torch.rand(IMAGE_SHAPE, generator=torch.Generator().manual_seed(1))

    def blur(radius: int = 10, sigma: float = 5.0) -> torch.Tensor:  # as comfy_extras/nodes_post_processing.Blur
        size = radius * 2 + 1
        x = torch.linspace(-radius, radius, size)
        g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
        kernel = (g[:, None] * g[None, :])
        kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)
        t = image.permute(0, 3, 1, 2)
        t = F.pad(t, (radius, radius, radius, radius), "reflect")
        return F.conv2d(t, kernel, groups=3).permute(0, 2, 3, 1)

    def upscale() -> torch.Tensor:
        t = image.movedim(-1, 1)
        return F.interpolate(t, size=(2048, 2048), mode="bicubic", antialias=False).movedim(1, -1)

    def invert() -> torch.Tensor:
        return 1.0 - image

    rows = []
    for name, fn in (("gaussian blur r=10 s=5 (ImageBlur)", blur), ("bicubic upscale 2x (ImageScale)", upscale),
                     ("invert (ImageInvert), for scale", invert)):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append({"op": name, "ms_median": median(times)})
        print(f"  recompute, {name}: {median(times):.1f} ms", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--sizes", default="50,200")
    p.add_argument("--reps", type=int, default=25, help="prompts per size for (a)")
    p.add_argument("--depth", type=int, default=10, help="chain depth of the cheap-node prompts")
    p.add_argument("--hit-reps", type=int, default=7, help="images A computes per hit case")
    p.add_argument("--lookups", type=int, default=3, help="hits timed per image")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--warm-memory", default="256MiB", help="the reader's MESH_WARM_MEMORY (0: no reserve)")
    p.add_argument("--no-settle", action="store_true",
                   help="(a): start each prompt while the previous one's replica writes may still run")
    args = p.parse_args()
    if args.quick:
        args.reps, args.hit_reps = 8, 3
    sizes = [int(s) for s in args.sizes.split(",") if s]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-provider-") as tmp:
        workdir = Path(tmp)
        print("(a) all-miss overhead per node, embedded, 2-node mesh on loopback", flush=True)
        peer = HarnessProcess(["--secret", SECRET], log_path=workdir / "peer.log")
        try:
            overhead = bench_overhead(peer, sizes, args.reps, args.depth, settle=not args.no_settle)
        finally:
            peer.quit()
        print("(b) 48 MiB IMAGE hit through the mesh vs recomputing it", flush=True)
        baseline = RedisBaseline.start()
        try:
            hits = bench_hits(workdir, args.hit_reps, args.lookups, args.warm_memory, baseline)
        finally:
            if baseline is not None:
                baseline.close()
        redis = None if baseline is None else {"ms_median": median(baseline.times), "ms_min": min(baseline.times),
                                                "ms_max": max(baseline.times), "ms_all": baseline.times}
        recompute = bench_recompute(5)

    size_mib = 4 * 1024 * 1024 * 3 * 4 / 2**20
    redis_ms = redis["ms_median"] if redis else float("nan")
    target_ms = redis_ms / HIT_SPEEDUP_TARGET
    print()
    print(f"{'measure':<58} {'value':>12}  {'target':>12}  verdict")
    for row in overhead:
        v = row["provider_us_per_node_median"]
        print(f"{'all-miss overhead, ' + str(row['nodes']) + ' nodes (us/node, median)':<58} {v:>12.0f}  "
              f"{'<= ' + str(int(OVERHEAD_TARGET_US)):>12}  {'ok' if v <= OVERHEAD_TARGET_US else 'MISSED'}")
        print(f"{'  + ComfyUI hashing keys for any provider (us/node)':<58} {row['comfyui_us_per_node_median']:>12.0f}")
        print(f"{'  = added to the prompt vs no provider (us/node)':<58} {row['added_us_per_node_median']:>12.0f}")
        if row["store_cpu_us_per_node_median"] is not None:
            print(f"{'  stores, after the prompt: CPU of both processes (us/node)':<58} "
                  f"{row['store_cpu_us_per_node_median']:>12.0f}")
    for row in hits:  # each against the Redis GETs made beside its own hits
        v, beside = row["ms_median"], row["redis_ms_median"]
        verdict = "no Redis baseline" if redis is None else "ok" if v <= beside / HIT_SPEEDUP_TARGET else "MISSED"
        print(f"{'48 MiB hit, ' + row['case'] + ' (ms)':<58} {v:>12.1f}  "
              f"{'<= ' + format(beside / HIT_SPEEDUP_TARGET, '.0f'):>12}  {verdict} ({beside / v:.2f}x Redis)")
    for row in recompute:
        print(f"{'recompute: ' + row['op'] + ' (ms)':<58} {row['ms_median']:>12.1f}")
    if redis is None:
        print("(no redis-server on PATH: the Redis baseline was not measured)")
    else:
        print(f"(Redis GET + torch.frombuffer of the same {size_mib:.0f} MiB, beside every hit of this run: "
              f"{redis['ms_median']:.1f} ms median, min {redis['ms_min']:.1f}, max {redis['ms_max']:.1f}; "
              f"each case is compared with the GETs beside its own hits)")
    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
           "seconds": round(time.time() - started, 1), "overhead": overhead, "hits": hits, "recompute": recompute,
           "redis": redis, "hit_target_ms": target_ms, "overhead_target_us": OVERHEAD_TARGET_US}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
