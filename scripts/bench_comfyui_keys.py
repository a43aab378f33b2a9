"""What a cache provider costs ComfyUI itself, measured against real ComfyUI processes on the CPU.

Run by hand (CI has no ComfyUI): COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/python] \
    .venv/bin/python scripts/bench_comfyui_keys.py [--json PATH] [--check-sharing]

It needs a ComfyUI with the CacheProvider API (0.21+) whose Python can import the `mesh` package (as for
scripts/comfyui_e2e.py). It installs nothing. The ComfyUI processes inherit this environment except its MESH_*
variables (set PYTHONPATH there if that ComfyUI needs a stand-in module, e.g. for torchaudio).

Benchmark (default). Four ComfyUI instances run side by side, each in its own base directory:
  none       no provider;
  null       a provider that does nothing (on_lookup returns None, on_store returns at once), registered with
             comfy_execution.cache_provider.register_cache_provider: what ComfyUI spends on having any provider;
  null-fast  the same with comfy-mesh's fast keys installed (provider/fastkeys.py, imported as
             comfy_mesh_provider): the baseline of comfy-mesh's own cost, mesh-fast minus null-fast;
  mesh       the comfy-mesh provider (provider/ linked into custom_nodes), MESH_FAST_KEYS=0;
  mesh-fast  the same with MESH_FAST_KEYS=1 (a provider without that switch runs the same as "mesh").
  mesh-names mesh-fast with MESH_IDENTITY=0: keys by names alone, without the identity of the model files and
             node packs behind them (provider/identity.py); mesh-fast vs mesh-names is what the identity costs.
  mesh-before  mesh-fast with another provider folder linked (--before DIR, e.g. a checkout of an earlier
             commit's provider/): mesh-fast vs mesh-before is what a change costs, measured in the same run.
Every prompt is a chain of N cheap image nodes that need no model (EmptyImage, then ImageInvert and ImageBlur
in turn) ending in a no-op output node (BenchSink, in every instance, so that no PNG is written). Each prompt
gets a colour never used before, so every node misses every cache (checked: `execution_cached` must be empty).
After the warm-up prompts, the instances take turns, one prompt at a time (never two at once), in an order
that rotates every round. The figure is ComfyUI's own: execution_success minus execution_start in the
prompt's history `status.messages` (ComfyUI stamps them in whole milliseconds, hence the mean too); "wall" is
this client's POST-to-execution_success time. Completion is awaited on ComfyUI's websocket, not by polling,
so the client adds no work to the server while a prompt runs. Stores that a provider hands off to run after
execution_success are not inside the figure.

--check-sharing: instance A (mesh-fast) and B (mesh, MESH_FAST_KEYS=0) on fixed mesh ports, B seeded with A.
The same prompt runs on A and then on B; PASS when B executes none of the cacheable nodes (all of them are in
B's `execution_cached`), then the same the other way round with a new prompt. Exit status 1 on FAIL.

Everything is bounded in time (--budget seconds for the whole run; per-prompt and start-up limits); the
instances are stopped at the end whatever happens.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.comfyui_e2e import comfyui_argv, stop_process  # noqa: E402

CASES = ("none", "null", "null-fast", "mesh", "mesh-fast", "mesh-names")
ALL_CASES = CASES + ("mesh-before",)  # mesh-before only when asked for, with --before
BEFORE: Path | None = None  # --before: the provider folder mesh-before links
DEFAULT_SIZES = (5, 30)
PROMPT_TIMEOUT = 60.0     # seconds one prompt may take, all of it
START_TIMEOUT = 300.0     # seconds an instance may take to answer /system_stats (several start at once)
SECRET = "x"

SINK_NODE = '''
class BenchSink:
    """An output node that does nothing: a prompt needs one, and PreviewImage would write a PNG."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, image):
        return {}

NODE_CLASS_MAPPINGS = {"BenchSink": BenchSink}
'''

NULL_PROVIDER = '''
"""A cache provider that does nothing: what remains is what ComfyUI spends on having a provider."""
import logging
from comfy_execution.cache_provider import CacheProvider, register_cache_provider

class BenchNullProvider(CacheProvider):
    async def on_lookup(self, context):
        return None

    async def on_store(self, context, value):
        return None

register_cache_provider(BenchNullProvider())
logging.getLogger(__name__).info("bench-null-provider: registered")
NODE_CLASS_MAPPINGS = {}
'''

NULL_FAST_PROVIDER = '''
"""A cache provider that does nothing, with comfy-mesh's fast keys: ComfyUI's cost of a provider once keys are cheap."""
import logging
import comfy_execution.cache_provider as api
from comfy_execution.cache_provider import CacheProvider, register_cache_provider
from comfy_mesh_provider.fastkeys import FastKeys

FAST = FastKeys(api)
FAST.install()

class BenchNullFastProvider(CacheProvider):
    async def on_lookup(self, context):
        return None

    async def on_store(self, context, value):
        return None

    def on_prompt_end(self, prompt_id):
        FAST.on_prompt_end()

register_cache_provider(BenchNullFastProvider())
logging.getLogger(__name__).info("bench-null-fast-provider: registered, fast keys installed: %s", FAST.installed)
NODE_CLASS_MAPPINGS = {}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, body: object | None = None, timeout: float = 10.0) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        result: dict[str, Any] = json.loads(r.read() or b"{}")
        return result


class WebSocket:
    """Just enough of a websocket client (RFC 6455) to read ComfyUI's text messages; the stdlib has none."""

    def __init__(self, host: str, port: int, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket refused: {head[:200]!r}")

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("websocket closed")
        self.buf += chunk

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)  # a client masks every frame
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)  # control frames: < 126

    def recv_text(self, timeout: float) -> str:
        """The next text message; binary messages (previews) are skipped, pings answered."""
        self.sock.settimeout(max(timeout, 0.001))
        message = b""
        while True:
            b0, b1 = self._take(2)
            opcode, length = b0 & 0x0F, b1 & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._take(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._take(8))[0]
            mask = self._take(4) if b1 & 0x80 else b""
            payload = self._take(length)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x8:
                raise ConnectionError("websocket closed by ComfyUI")
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode in (0x1, 0x2, 0x0):
                message += payload
                if b0 & 0x80:
                    if opcode == 0x2:  # a whole binary message (or, loosely, its last fragment): skip
                        message = b""
                        continue
                    return message.decode("utf-8", errors="replace")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@dataclass
class PromptResult:
    exec_ms: float             # ComfyUI's execution_success - execution_start
    wall_ms: float             # this client's POST to execution_success
    cached: list[str]          # node ids in execution_cached
    status: str


class Instance:
    """One ComfyUI process in its own base directory, with the custom nodes of its case."""

    def __init__(self, name: str, case: str, comfy: Path, python: str, work: Path,
                 mesh_env: dict[str, str] | None = None) -> None:
        self.name = name
        self.case = case
        self.port = free_port()
        self.base = work / name
        nodes = self.base / "custom_nodes"
        (nodes / "bench_sink").mkdir(parents=True)
        (nodes / "bench_sink" / "__init__.py").write_text(SINK_NODE)
        if case in ("null", "null-fast"):
            (nodes / "bench_null_provider").mkdir()
            (nodes / "bench_null_provider" / "__init__.py").write_text(
                NULL_PROVIDER if case == "null" else NULL_FAST_PROVIDER)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        if case in ("mesh", "mesh-fast", "mesh-names", "mesh-before"):
            provider = BEFORE if case == "mesh-before" and BEFORE is not None else ROOT / "provider"
            (nodes / "comfy_mesh").symlink_to(provider, target_is_directory=True)
            env.update({"MESH_SECRET": SECRET, "MESH_LISTEN": "127.0.0.1:0", "MESH_MIN_FREE_RAM": "0",
                        "MESH_NODE_ID": f"bench-{name}", "MESH_CLUSTER": f"bench-{name}",
                        "MESH_FAST_KEYS": "0" if case == "mesh" else "1",
                        "MESH_IDENTITY": "0" if case == "mesh-names" else "1",
                        "MESH_IDENTITY_CACHE": str(self.base / "identities.json")})
            env.update(mesh_env or {})
        self.env = {k: v for k, v in env.items() if k.startswith("MESH_")}
        self.log_path = self.base / "comfy.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.client_id = str(uuid.uuid4())
        self.ws: WebSocket | None = None
        self.process = subprocess.Popen(comfyui_argv(python, self.port, self.base), cwd=comfy, env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, deadline: float) -> dict[str, Any]:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log_path}")
            try:
                stats = http(self.url + "/system_stats", timeout=2)
                self.ws = WebSocket("127.0.0.1", self.port, f"/ws?clientId={self.client_id}")
                return stats
            except OSError:
                time.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready in time; see {self.log_path}")

    def run(self, prompt: dict[str, Any], timeout: float = PROMPT_TIMEOUT) -> PromptResult:
        assert self.ws is not None, "wait_ready first"
        started = time.monotonic()
        deadline = started + timeout
        prompt_id = http(self.url + "/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]
        wall_ms = float("nan")
        while True:  # "executing" with node None comes after ComfyUI has written the history
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: prompt did not finish in {timeout} s")
            try:
                msg = json.loads(self.ws.recv_text(left))
            except TimeoutError:
                continue
            data = msg.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            if msg.get("type") in ("execution_success", "execution_error", "execution_interrupted"):
                wall_ms = (time.monotonic() - started) * 1000.0
            if msg.get("type") == "executing" and data.get("node") is None:
                break
        for _ in range(50):
            entry = http(f"{self.url}/history/{prompt_id}").get(prompt_id)
            if entry is not None:
                break
            time.sleep(0.02)
        else:
            raise RuntimeError(f"{self.name}: no history for {prompt_id}")
        status = entry.get("status", {})
        stamps: dict[str, int] = {}
        cached: list[str] = []
        for event, info in status.get("messages", []):
            if "timestamp" in info:
                stamps.setdefault(event, int(info["timestamp"]))
            if event == "execution_cached":
                cached = [str(n) for n in info.get("nodes", [])]
        if status.get("status_str") != "success" or "execution_success" not in stamps:
            raise RuntimeError(f"{self.name}: prompt failed: {json.dumps(status)[:2000]}")
        return PromptResult(exec_ms=float(stamps["execution_success"] - stamps["execution_start"]),
                            wall_ms=wall_ms, cached=cached, status=str(status.get("status_str")))

    def mesh_lines(self) -> list[str]:
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if "comfy-mesh" in line or "comfy_mesh" in line]

    def stop(self) -> None:
        if self.ws is not None:
            self.ws.close()
        stop_process(self.process)
        self.log.close()


def chain(n: int, color: int, px: int) -> dict[str, Any]:
    """EmptyImage then n-1 cheap image nodes (ImageInvert, ImageBlur in turn), then the no-op output node."""
    prompt: dict[str, Any] = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": px, "height": px, "batch_size": 1, "color": color}}}
    for i in range(2, n + 1):
        prev = [str(i - 1), 0]
        prompt[str(i)] = ({"class_type": "ImageInvert", "inputs": {"image": prev}} if i % 2 == 0 else
                          {"class_type": "ImageBlur", "inputs": {"image": prev, "blur_radius": 1, "sigma": 1.0}})
    prompt[str(n + 1)] = {"class_type": "BenchSink", "inputs": {"image": [str(n), 0]}}
    return prompt


def quantile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "median": quantile(xs, 0.5), "p90": quantile(xs, 0.9),
            "min": min(xs) if xs else float("nan"), "max": max(xs) if xs else float("nan"),
            "mean": sum(xs) / len(xs) if xs else float("nan")}


def fast_keys_in_source() -> bool:
    """Whether this checkout's provider reads MESH_FAST_KEYS at all (else mesh and mesh-fast are the same)."""
    config = ROOT / "provider" / "config.py"
    return config.exists() and "fast_keys" in config.read_text().lower()


class Colors:
    """Colours (EmptyImage's one free integer) never handed out twice in a run: each prompt misses everything."""

    def __init__(self) -> None:
        self.rng = random.Random(time.time_ns())
        self.used: set[int] = set()

    def next(self) -> int:
        while True:
            c = self.rng.randrange(0x1000000)
            if c not in self.used:
                self.used.add(c)
                return c


def start_all(instances: list[Instance], deadline: float) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for inst in instances:
        stats = inst.wait_ready(deadline)
        print(f"  {inst.name} ({inst.case}) ready on port {inst.port}", flush=True)
    for inst in instances:
        if inst.case.startswith("mesh") and not any("comfy-mesh: embedded" in line or "comfy-mesh: sidecar" in line
                                                    for line in inst.mesh_lines()):
            raise RuntimeError(f"{inst.name}: comfy-mesh did not start; see {inst.log_path}")
    return stats


def benchmark(args: argparse.Namespace, comfy: Path, python: str, work: Path, deadline: float) -> dict[str, Any]:
    load_start = os.getloadavg()
    instances = [Instance(case, case, comfy, python, work) for case in args.cases]
    colors = Colors()
    samples: dict[str, dict[int, list[PromptResult]]] = {c: {n: [] for n in args.sizes} for c in args.cases}
    hits: list[str] = []
    truncated = False
    try:
        print(f"starting {len(instances)} ComfyUI instances ...", flush=True)
        stats = start_all(instances, min(deadline, time.monotonic() + START_TIMEOUT))
        print(f"warm-up: {args.warmup} prompt(s) per case and size", flush=True)
        for n in args.sizes:
            for inst in instances:
                for _ in range(args.warmup):
                    inst.run(chain(n, colors.next(), args.px))
        print(f"measuring: {args.prompts} rounds, cases in turn", flush=True)
        for r in range(args.prompts):
            if time.monotonic() > deadline:
                truncated = True
                print(f"budget spent after {r} rounds: partial results", flush=True)
                break
            order = instances[r % len(instances):] + instances[:r % len(instances)]
            for n in (args.sizes if r % 2 == 0 else list(reversed(args.sizes))):
                for inst in order:
                    res = inst.run(chain(n, colors.next(), args.px))
                    if res.cached:
                        hits.append(f"{inst.case} N={n}: {res.cached}")
                    samples[inst.case][n].append(res)
        mesh_log = {inst.case: [line for line in inst.mesh_lines() if "comfy-mesh:" in line] + inst.mesh_lines()[-2:]
                    for inst in instances if inst.case.startswith("mesh")}
    finally:
        for inst in instances:
            inst.stop()
    load_end = os.getloadavg()
    results: dict[str, Any] = {}
    for case in args.cases:
        results[case] = {}
        for n in args.sizes:
            xs = samples[case][n]
            results[case][str(n)] = {"exec_ms": summary([x.exec_ms for x in xs]),
                                     "wall_ms": summary([x.wall_ms for x in xs]),
                                     "exec_ms_samples": [x.exec_ms for x in xs]}
    return {
        "what": "ComfyUI's own execution time per all-miss prompt (history status: execution_success - "
                "execution_start, ms), per case, instances side by side, prompts in turn",
        "comfyui": stats.get("system", {}).get("comfyui_version"),
        "pytorch": stats.get("system", {}).get("pytorch_version"),
        "python": stats.get("system", {}).get("python_version"),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "loadavg_start": list(load_start), "loadavg_end": list(load_end),
        "provider_reads_mesh_fast_keys": fast_keys_in_source(),
        "chain": {"sizes": args.sizes, "image_px": args.px, "warmup": args.warmup, "prompts": args.prompts,
                  "nodes": "EmptyImage, then ImageInvert/ImageBlur in turn, then BenchSink (no-op output)"},
        "fast_keys_installed": {case: any("fast cache keys installed" in line for line in lines)
                                for case, lines in mesh_log.items()},
        "unexpected_hits": hits,
        "truncated": truncated,
        "mesh_log": mesh_log,
        "results": results,
    }


def report(out: dict[str, Any], cases: list[str], sizes: list[int]) -> None:
    res = out["results"]
    print()
    print(f"ComfyUI {out['comfyui']}, torch {out['pytorch']}; loadavg {out['loadavg_start'][0]:.2f} at start, "
          f"{out['loadavg_end'][0]:.2f} at end; provider reads MESH_FAST_KEYS: "
          f"{'yes' if out['provider_reads_mesh_fast_keys'] else 'NO (mesh-fast = mesh)'}; fast keys installed: "
          f"{', '.join(f'{c} {v}' for c, v in out['fast_keys_installed'].items()) or 'no mesh case'}")
    print("ComfyUI's execution time per prompt, ms (execution_start -> execution_success, 1 ms resolution)")
    print(f"{'case':<10} {'N':>3} {'n':>3} {'median':>7} {'p90':>7} {'min':>6} {'max':>7} {'mean':>7} "
          f"{'x none':>7} {'+ms/node':>9} {'wall med':>9}")
    for n in sizes:
        base = res.get("none", {}).get(str(n), {}).get("exec_ms")
        for case in cases:
            e = res[case][str(n)]["exec_ms"]
            w = res[case][str(n)]["wall_ms"]
            ratio = e["median"] / base["median"] if base and base["median"] > 0 else float("nan")
            per_node = (e["mean"] - base["mean"]) / n if base else float("nan")
            print(f"{case:<10} {n:>3} {e['n']:>3} {e['median']:>7.1f} {e['p90']:>7.1f} {e['min']:>6.0f} "
                  f"{e['max']:>7.0f} {e['mean']:>7.2f} {ratio:>7.2f} {per_node:>9.3f} {w['median']:>9.1f}")
    print("x none: median / none's median; +ms/node: (mean - none's mean) / N; wall: client POST to success")
    if "mesh-fast" in cases and "null-fast" in cases:
        for n in sizes:
            m, z = res["mesh-fast"][str(n)]["exec_ms"], res["null-fast"][str(n)]["exec_ms"]
            print(f"comfy-mesh's own cost, N={n}: mesh-fast - null-fast = {(m['median'] - z['median']) / n * 1000:.0f} "
                  f"us/node by medians, {(m['mean'] - z['mean']) / n * 1000:.0f} us/node by means")
    if "mesh-fast" in cases and "mesh-before" in cases:
        for n in sizes:
            m, z = res["mesh-fast"][str(n)]["exec_ms"], res["mesh-before"][str(n)]["exec_ms"]
            print(f"the change's cost, N={n}: mesh-fast / mesh-before = {m['median'] / z['median']:.3f} by medians, "
                  f"{m['mean'] / z['mean']:.3f} by means ({(m['mean'] - z['mean']) / n * 1000:+.0f} us/node)")
    if "mesh-fast" in cases and "mesh-names" in cases:
        for n in sizes:
            m, z = res["mesh-fast"][str(n)]["exec_ms"], res["mesh-names"][str(n)]["exec_ms"]
            print(f"the identity's cost, N={n}: mesh-fast / mesh-names = {m['median'] / z['median']:.3f} by medians, "
                  f"{m['mean'] / z['mean']:.3f} by means ({(m['mean'] - z['mean']) / n * 1000:+.0f} us/node)")
    if out["unexpected_hits"]:
        print(f"WARNING: {len(out['unexpected_hits'])} prompt(s) had cached nodes: {out['unexpected_hits'][:3]}")
    if out["truncated"]:
        print("WARNING: the time budget ran out; fewer prompts than asked")
    for case, lines in out.get("mesh_log", {}).items():
        for line in lines:
            print(f"   {case} log: {line[:200]}")


def check_sharing(args: argparse.Namespace, comfy: Path, python: str, work: Path, deadline: float) -> bool:
    port_a, port_b = free_port(), free_port()
    common = {"MESH_CLUSTER": "bench-sharing"}
    a = Instance("A", "mesh-fast", comfy, python, work,
                 {**common, "MESH_LISTEN": f"127.0.0.1:{port_a}", "MESH_NODE_ID": "bench-a"})
    b = Instance("B", "mesh", comfy, python, work,
                 {**common, "MESH_LISTEN": f"127.0.0.1:{port_b}", "MESH_NODE_ID": "bench-b",
                  "MESH_SEEDS": f"127.0.0.1:{port_a}"})
    colors = Colors()
    ok = True
    try:
        print("starting A (mesh-fast) and B (mesh, MESH_FAST_KEYS=0, seeded with A) ...", flush=True)
        start_all([a, b], min(deadline, time.monotonic() + START_TIMEOUT))
        time.sleep(args.settle)  # let B's node join A's
        n = max(args.sizes)
        for first, second in ((a, b), (b, a)):
            prompt = chain(n, colors.next(), args.px)
            cacheable = sorted(k for k, v in prompt.items() if v["class_type"] != "BenchSink")
            r1 = first.run(prompt)
            time.sleep(args.settle)  # stores are pushed after the prompt, then cross the mesh
            r2 = second.run(prompt)
            served = sorted(set(r2.cached) & set(cacheable), key=int)
            passed = not r1.cached and len(served) == len(cacheable)
            ok = ok and passed
            print(f"{first.name}->{second.name}: N={n}: {first.name} cached {len(r1.cached)} node(s), "
                  f"{r1.exec_ms:.0f} ms; {second.name} got {len(served)}/{len(cacheable)} cacheable node(s) "
                  f"from the mesh, executed {len(cacheable) - len(served)}, {r2.exec_ms:.0f} ms: "
                  f"{'PASS' if passed else 'FAIL'}")
        for inst in (a, b):
            lines = inst.mesh_lines()
            fast = any("fast cache keys installed" in line for line in lines)
            print(f"{inst.name}: fast cache keys {'installed' if fast else 'not installed'}")
            for line in [line for line in lines if "comfy-mesh:" in line] + lines[-2:]:
                print(f"   {inst.name} log: {line[:200]}")
        if not any("fast cache keys installed" in line for line in a.mesh_lines()):
            print("WARNING: A runs without fast keys: this compared original keys with original keys")
    finally:
        a.stop()
        b.stop()
    print("PASS: B and A serve each other's nodes (fast and original keys agree)" if ok else "FAIL")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--check-sharing", action="store_true", help="only check that mesh-fast and mesh share")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(ALL_CASES)}")
    p.add_argument("--before", type=Path, help="mesh-before: the provider folder to link (an earlier provider/)")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="chain lengths N")
    p.add_argument("--prompts", type=int, default=30, help="measured prompts per case and size")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured prompts per case and size first")
    p.add_argument("--px", type=int, default=64, help="image width and height")
    p.add_argument("--settle", type=float, default=2.0, help="--check-sharing: seconds between A and B")
    p.add_argument("--budget", type=float, default=1200.0, help="seconds for the whole run, at most")
    p.add_argument("--work-dir", type=Path, help="keep the instances' base directories and logs here")
    args = p.parse_args()
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if unknown := set(args.cases) - set(ALL_CASES):
        p.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    if "mesh-before" in args.cases:
        if args.before is None or not (args.before / "__init__.py").is_file():
            p.error("mesh-before needs --before DIR, a provider folder (with __init__.py)")
        global BEFORE
        BEFORE = args.before.resolve()
    if any(n < 1 for n in args.sizes):
        p.error("chain lengths must be >= 1")

    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        print("skipped: set COMFYUI_DIR to a ComfyUI checkout with the CacheProvider API")
        return 0
    comfy = Path(comfy_dir).resolve()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    deadline = time.monotonic() + args.budget
    with tempfile.TemporaryDirectory(prefix="comfy-mesh-bench-keys-") as tmp:
        work = Path(tmp)
        if args.work_dir:
            work = args.work_dir.resolve() / time.strftime("%Y%m%d-%H%M%S")
            work.mkdir(parents=True)
            print(f"logs and base directories in {work}")
        if args.check_sharing:
            return 0 if check_sharing(args, comfy, python, work, deadline) else 1
        out = benchmark(args, comfy, python, work, deadline)
    report(out, args.cases, args.sizes)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
