#!/usr/bin/env python
"""What compression does on a fast link and on a slow one: values end to end, raw against what comfy-mesh sends.

    .venv/bin/python scripts/bench_link.py [--link loopback|1gbit|both] [--repeat 5] [--json out.json]

Two values, encoded as the provider encodes them:
- image: a (1, 2048, 2048, 3) float32 synthetic picture on 8-bit levels (smooth gradients, shapes with soft
  edges, mild noise, then round(x * 255) / 255: a decoded PNG), 48 MiB as float32;
- float: the same picture plus gaussian noise of sigma 1e-3, clamped to [0, 1]: off the 8-bit levels, with full
  float32 mantissas, like a VAE decode, 48 MiB.
Three ways to send each, through a real `mesh serve`:
- raw:  codec.encode(value), chunks sent raw (`--compress off`): what a cache without these features moves;
- lz4:  codec.encode(value), every chunk lz4 or lz4 of its byte planes where that shrinks it (`--compress lz4`);
- auto: codec.encode(value, levels=True) and `--compress auto`, the provider's default: levels to uint8, and lz4
        only where the link measured slower than lz4 (mesh/transport/link.py).
"stored" is what the node holds, which is what the put sent. A put, then a get, the get end to end: the chunks
from the node, then decoding into tensors; the cases take turns (raw, lz4, auto, raw, ...). Median, min and max
per case, and raw / case (the speed-up; > 1 is faster).

--link loopback: node and client on 127.0.0.1 (the compression target: never more than 5 % slower than raw).
--link 1gbit: node and client in two network namespaces joined by a veth shaped with tc tbf to 1 Gbit/s both
ways (needs root and iproute2; mesh/transport/link.py must find the link slow by itself). The load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECRET = "bench-link-secret"
PORT = 7461
CASES = ("raw", "lz4", "auto")

# Runs in the client's namespace (or here, for loopback): prints one JSON object.
CLIENT = r'''
import json, os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, torch
from mesh import codec as blob  # the tensor-tree codec, mesh/codec/
from mesh.transport.link import Links
from mesh.transport.peer import PeerClient
from scripts.bench_node import synthetic_image

torch.set_num_threads(1)
address, secret, repeat = sys.argv[2], sys.argv[3].encode(), int(sys.argv[4])
image = synthetic_image(2048, 2048)
rng = np.random.default_rng(8)
floats = (image + torch.from_numpy(rng.standard_normal(image.shape, dtype=np.float32)) * 1e-3).clamp_(0, 1)
values = {"image": image, "float": floats}
clients = {mode: PeerClient(address, secret, timeout=300, links=Links("off" if mode == "raw" else mode))
           for mode in ("raw", "lz4", "auto")}
# auto measures the link on its first big raw transfer, as a node does on its first copy to a peer
clients["auto"].put("bench/measure", os.urandom(16 << 20))
out = {"rate_measured": clients["auto"].links.rate(address), "values": {}}
for name, value in values.items():
    want = value.numpy().tobytes()
    rows = {mode: {"put": [], "get": [], "stored": 0, "encoded": 0} for mode in clients}
    for r in range(repeat):
        for mode, client in clients.items():
            key = f"bench/{name}/{mode}/{r}"
            t0 = time.perf_counter()
            data = blob.encode([value], levels=(mode == "auto"))
            client.put(key, data)
            rows[mode]["put"].append(time.perf_counter() - t0)
            rows[mode]["encoded"] = len(data)
            del data
            t0 = time.perf_counter()
            sink = blob.StreamDecoder()  # what the provider does: decoded while the chunks arrive
            assert client.get_into(key, sink) is not None
            got = sink.finish()[0]
            rows[mode]["get"].append(time.perf_counter() - t0)
            assert got.numpy().tobytes() == want, f"{name}/{mode}: not bit-exact"
            rows[mode]["stored"] = {k.key: k.stored_size for k in client.list_keys(key)}.get(key, 0)
            del got, sink
            client.delete([key])
    out["values"][name] = rows
print(json.dumps(out))
'''


def summary(xs: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(xs) * 1e3, "min_ms": min(xs) * 1e3, "max_ms": max(xs) * 1e3}


def serve_argv(listen: str, ready: Path) -> list[str]:
    return [sys.executable, "-m", "mesh.cli", "--secret-file", str(ready.parent / "secret"), "serve", "--listen",
            listen, "--min-free-ram", "0", "--max-memory", "2GiB", "--ready-file", str(ready)]


def wait_ready(p: subprocess.Popen[bytes], ready: Path, log: Path) -> None:
    deadline = time.monotonic() + 30
    while not ready.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mesh serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)


def measure(work: Path, repeat: int, listen: str, popen: Callable[..., subprocess.Popen[bytes]],
            run: Callable[..., subprocess.CompletedProcess[str]]) -> dict[str, Any]:
    """Start a node with `popen`, run the client with `run` (here, or inside network namespaces), stop it."""
    ready, log = work / f"{listen.replace(':', '_')}.ready", work / f"{listen.replace(':', '_')}.log"
    with open(log, "wb") as f:
        p = popen(serve_argv(listen, ready), stdout=f, stderr=f, cwd=ROOT)
    try:
        wait_ready(p, ready, log)
        address = json.loads(ready.read_text())["address"]
        done = run([sys.executable, "-c", CLIENT, str(ROOT), address, SECRET, str(repeat)],
                   capture_output=True, text=True, timeout=1800, cwd=ROOT)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        return json.loads(done.stdout)
    finally:
        p.terminate()
        p.wait(15)


def run_loopback(work: Path, repeat: int) -> dict[str, Any]:
    return measure(work, repeat, "127.0.0.1:0", subprocess.Popen, subprocess.run)


def run_shaped(work: Path, repeat: int, rate: str) -> dict[str, Any]:
    from tests.netns import NetLab, netns_available

    why = netns_available()
    if why:
        raise RuntimeError(f"network namespaces unavailable: {why}")
    with NetLab(2) as lab:
        node, client = lab.hosts
        lab.shape(client, rate)
        return measure(work, repeat, f"{node.addr}:{PORT}", lambda argv, **kw: lab.popen(node, argv, **kw),
                       lambda argv, **kw: lab.run(client, argv, check=False, **kw))


def report(link: str, result: dict[str, Any]) -> dict[str, Any]:
    print(f"\n{link}: link measured by mesh/transport/link.py at {result['rate_measured'] / 1e6:.0f} MB/s "
          f"({'compress' if 0 < result['rate_measured'] < 300e6 else 'raw'} in auto)")
    print(f"{'value':<6} {'case':<5} {'encoded':>9} {'stored':>9} {'put ms':>8} {'get ms (min-max)':>22} "
          f"{'raw/get':>8} {'raw/put':>8}")
    rows: dict[str, Any] = {}
    for name, cases in result["values"].items():
        base_get = statistics.median(cases["raw"]["get"])
        base_put = statistics.median(cases["raw"]["put"])
        for case in CASES:
            c = cases[case]
            g, pu = summary(c["get"]), summary(c["put"])
            speed_get = base_get / statistics.median(c["get"])
            speed_put = base_put / statistics.median(c["put"])
            rows[f"{name}/{case}"] = {"get": g, "put": pu, "encoded": c["encoded"], "stored": c["stored"],
                                      "get_speedup_vs_raw": speed_get, "put_speedup_vs_raw": speed_put,
                                      "get_s": c["get"], "put_s": c["put"]}
            print(f"{name:<6} {case:<5} {c['encoded'] / 2**20:>7.1f}Mi {c['stored'] / 2**20:>7.1f}Mi "
                  f"{pu['median_ms']:>8.1f} {g['median_ms']:>8.1f} ({g['min_ms']:>5.1f}-{g['max_ms']:>6.1f}) "
                  f"{speed_get:>8.2f} {speed_put:>8.2f}")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--link", choices=("loopback", "1gbit", "both"), default="both")
    p.add_argument("--rate", default="1gbit", help="tc tbf rate of the shaped link (default 1gbit)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    out: dict[str, Any] = {"loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-link-") as d:
        work = Path(d)
        (work / "secret").write_text(SECRET + "\n")
        if args.link in ("loopback", "both"):
            out["loopback"] = report("loopback", run_loopback(work, args.repeat))
        if args.link in ("1gbit", "both"):
            out["shaped"] = report(f"shaped {args.rate}", run_shaped(work, args.repeat, args.rate))
    out["loadavg_end"] = os.getloadavg()
    print(f"\nload average (1 min): {out['loadavg_start'][0]:.2f} at start, {out['loadavg_end'][0]:.2f} at end")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
