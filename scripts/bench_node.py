#!/usr/bin/env python
"""Benchmark one mesh node on loopback (not a test): `make bench`, or `scripts/bench_node.py --json out.json`.

The node is a separate `mesh serve` process, as in production; the client is this process. Measured in one run:

- put and get throughput of 1 MiB, 64 MiB and 512 MiB float32 image-like tensors, unquantised (like a VAE
  decode: random mantissas, incompressible) and quantised to 8-bit levels (/255.0, like a loaded image), beside
  raw TCP (sendall / recv_into between two processes) of the same bytes. Raw TCP is shown twice: into a fresh
  `bytearray(n)`, which is what a get delivers (a new buffer whose pages the kernel must fault in and zero) and
  what the speed target compares with, and into one reused, already-touched buffer: the bound of the wire alone;
- miss and small-hit (4 KiB) latency, p50 and p99;
- lz4 ratio and speed, with and without byte shuffle, for float32 images and latents, fp16 and bf16;
- the receiver's peak memory for a 512 MiB get, as RSS growth of a fresh client process;
- a chunk-size sweep (256 KiB, 1 MiB, 4 MiB) for the 512 MiB get;
- with --tls, the cost of TLS: a second `mesh serve` with mutual TLS (certificates from `init_tls`) runs beside
  the plaintext one, and gets alternate between the two (plaintext, TLS, plaintext, TLS, ...): the 512 MiB
  unquantised float32 get, and a 48 MiB IMAGE hit, a (1, 2048, 2048, 3) float32 synthetic picture on 8-bit
  levels encoded with `mesh.codec.encode` and fetched end to end (get + `mesh.codec.decode`). Median, min and
  max of each, and TLS time / plaintext time. `--tls-only` runs just this part.

GB/s are decimal (1e9 bytes/s). Timings are medians of a few runs; a busy machine makes every number worse,
raw TCP included, so compare numbers of one run with each other. The load average at start and end is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lz4.block
import numpy as np

import mesh
import mesh.codec
from mesh.transport.peer import PeerClient
from mesh.transport.tls import TlsConfig, init_tls, load_tls
from mesh.units import parse_size
from mesh.transport.wire import KiB, MiB, Limits

SECRET = b"bench-secret"
TARGET_GET_VS_TCP = 0.9  # the fast-path issue: a 512 MiB get at least 0.9x raw TCP into a fresh buffer
TARGET_MISS_P50_US = 500.0
TARGET_PEAK_RATIO = 1.5
TARGET_TLS_COST_PCT = 25.0  # TLS get time at most this much above plaintext
SWEEP = (256 * KiB, 1 * MiB, 4 * MiB)


# -- data --------------------------------------------------------------------------------------------------------

def image_like(nbytes: int, quantised: bool, seed: int = 0) -> np.ndarray:
    """Flat float32 pixels in [0, 1] that vary smoothly (a random walk, folded into range) plus a little noise.

    Quantised: rounded to 8-bit levels and divided by 255.0, like a loaded image. Unquantised: full float
    mantissas, like a VAE decode.
    """
    rng = np.random.default_rng(seed)
    n = nbytes // 4
    img = rng.standard_normal(n, dtype=np.float32)
    img *= np.float32(0.01)
    np.cumsum(img, out=img)
    np.abs(np.mod(img, np.float32(2.0), out=img) - np.float32(1.0), out=img)  # fold into [0, 1]
    img += rng.standard_normal(n, dtype=np.float32) * np.float32(0.003)
    np.clip(img, 0.0, 1.0, out=img)
    if quantised:
        np.multiply(img, 255.0, out=img)
        np.round(img, out=img)
        np.divide(img, 255.0, out=img)
    return img


def synthetic_image(height: int, width: int, seed: int = 6) -> Any:
    """A ComfyUI IMAGE, float32 (1, height, width, 3) in [0, 1], that looks like a decoded 8-bit picture.

    Smooth colour gradients, a few flat-coloured discs and rectangles with one-pixel soft edges, mild noise
    (sigma ~2.5 levels), then quantised to round(x * 255) / 255, as a loaded PNG or JPEG is. Not uniform noise:
    uniform random levels would be far less compressible than any real image.
    """
    import torch

    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    img = np.empty((height, width, 3), dtype=np.float32)
    img[..., 0] = 0.15 + 0.6 * x + 0.1 * np.sin(5.0 * y)
    img[..., 1] = 0.25 + 0.45 * y + 0.08 * np.cos(4.0 * x + 2.0 * y)
    img[..., 2] = 0.7 - 0.35 * x * y
    px = np.float32(max(height, width))  # soft edges one pixel wide
    for i in range(8):
        colour = rng.uniform(0.05, 0.95, 3).astype(np.float32)
        cy, cx = rng.uniform(0.1, 0.9, 2)
        if i % 2:
            r = rng.uniform(0.05, 0.2)
            inside = np.float32(r) - np.sqrt((y - np.float32(cy)) ** 2 + (x - np.float32(cx)) ** 2)
        else:
            hy, hx = rng.uniform(0.04, 0.2, 2)
            inside = np.minimum(np.float32(hy) - np.abs(y - np.float32(cy)),
                                np.float32(hx) - np.abs(x - np.float32(cx)))
        alpha = np.clip(inside * px, 0.0, 1.0)[..., None]
        shade = colour * (0.85 + 0.15 * (1.0 - y[..., None]))  # lit from above
        img += alpha * (shade - img)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(0.01)
    np.clip(img, 0.0, 1.0, out=img)
    np.multiply(img, 255.0, out=img)
    np.round(img, out=img)
    np.divide(img, 255.0, out=img)
    return torch.from_numpy(img).unsqueeze(0)


def latent_like(nbytes: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(nbytes // 4, dtype=np.float32)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (as uint16) of float32 values, rounded to nearest even."""
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def byte_shuffle(raw: memoryview | bytes, itemsize: int) -> bytes:
    """All first bytes of every element, then all second bytes, ... (what blosc calls shuffle)."""
    a = np.frombuffer(raw, dtype=np.uint8)
    return a.reshape(-1, itemsize).T.copy().tobytes()


def as_bytes(a: np.ndarray) -> memoryview:
    return memoryview(a).cast("B")


# -- raw TCP -----------------------------------------------------------------------------------------------------

def _recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


def _raw_tcp_sender(port_queue: Any) -> None:
    """Another process: holds a payload it was sent ('P'), sends it back on every 'G', stops on 'Q'."""
    server = socket.create_server(("127.0.0.1", 0))
    port_queue.put(server.getsockname()[1])
    conn, _ = server.accept()
    payload = bytearray()
    cmd = bytearray(1)
    while True:
        _recv_exact_into(conn, memoryview(cmd))
        if cmd == b"P":
            size = bytearray(8)
            _recv_exact_into(conn, memoryview(size))
            payload = bytearray(int.from_bytes(size, "big"))
            _recv_exact_into(conn, memoryview(payload))
        elif cmd == b"G":
            conn.sendall(payload)
        else:
            break
    conn.close()
    server.close()


class RawTcp:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        ports = ctx.Queue()
        self.process = ctx.Process(target=_raw_tcp_sender, args=(ports,), daemon=True)
        self.process.start()
        self.sock = socket.create_connection(("127.0.0.1", ports.get(timeout=30)))

    def load(self, data: memoryview) -> None:
        self.sock.sendall(b"P" + len(data).to_bytes(8, "big"))
        self.sock.sendall(data)

    def get(self, into: memoryview) -> None:
        self.sock.sendall(b"G")
        _recv_exact_into(self.sock, into)

    def close(self) -> None:
        try:
            self.sock.sendall(b"Q")
            self.sock.close()
        except OSError:
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()


# -- the node ----------------------------------------------------------------------------------------------------

class NodeProcess:
    def __init__(self, workdir: Path, max_memory: str, name: str = "bench", tls_dir: Path | None = None) -> None:
        """`mesh serve` on a free loopback port; with tls_dir (from init_tls, holding NAME.pem), TLS only."""
        self.secret_file = workdir / "secret"
        self.secret_file.write_bytes(SECRET)
        ready = workdir / f"ready-{name}.json"
        log = workdir / f"node-{name}.log"
        self.log = open(log, "wb")
        script = Path(sys.executable).with_name("mesh")  # the installed `mesh` command of this interpreter
        command = [str(script)] if script.exists() else [sys.executable, "-m", "mesh.cli"]
        tls = [] if tls_dir is None else ["--tls-cert", str(tls_dir / f"{name}.pem"), "--tls-key",
                                          str(tls_dir / f"{name}-key.pem"), "--tls-ca", str(tls_dir / "ca.pem")]
        argv = command + ["--secret-file", str(self.secret_file), *tls, "serve",
                "--listen", "127.0.0.1:0", "--ready-file", str(ready), "--node-id", name,
                "--max-memory", max_memory, "--min-free-ram", "0", "--max-blob-size", "1GiB"]
        # TLS only where asked: MESH_TLS_* in our environment would otherwise turn the plaintext node into TLS.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_TLS_")}
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while not ready.exists() or not ready.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"mesh serve did not start; see {log}")
            time.sleep(0.05)
        self.address = json.loads(ready.read_text())["address"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


# -- measurements ------------------------------------------------------------------------------------------------

def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def gbps(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e9


def throughput(client_for: Callable[[int], PeerClient], raw: RawTcp, kind: str, data: memoryview, repeat: int,
               chunk_size: int = 1 * MiB, key: str = "bench/blob") -> dict[str, Any]:
    n = len(data)
    client = client_for(chunk_size)
    puts = []
    for i in range(repeat):
        k = f"{key}/put{i}"
        t = time.perf_counter()
        reply = client.put(k, data)
        puts.append(time.perf_counter() - t)
        assert reply.stored, f"put of {k} did not store"
        if i < repeat - 1:
            client.delete([k])
    stored = f"{key}/put{repeat - 1}"
    first = client.get(stored)
    assert first is not None and first.data == data, "get returned other bytes than were put"
    del first
    gets = timed(lambda: client.get(stored), repeat)
    client.delete([stored])
    reused = bytearray(n)
    raw.load(data)
    raw.get(memoryview(reused))
    assert reused == data
    tcp = timed(lambda: raw.get(memoryview(reused)), repeat)
    reused = bytearray()  # free it before the fresh-buffer runs
    tcp_fresh = timed(lambda: raw.get(memoryview(bytearray(n))), repeat)
    raw.load(memoryview(b""))
    return {"kind": kind, "bytes": n, "chunk_size": chunk_size, "put_gbps": gbps(n, puts), "get_gbps": gbps(n, gets),
            "raw_tcp_gbps": gbps(n, tcp), "raw_tcp_fresh_gbps": gbps(n, tcp_fresh),
            "get_vs_raw_tcp_fresh": gbps(n, gets) / gbps(n, tcp_fresh), "get_vs_raw_tcp": gbps(n, gets) / gbps(n, tcp),
            "get_seconds": gets, "put_seconds": puts, "raw_tcp_seconds": tcp, "raw_tcp_fresh_seconds": tcp_fresh}


def latency(client: PeerClient, count: int) -> dict[str, Any]:
    def percentiles(samples: list[float]) -> dict[str, float]:
        us = sorted(s * 1e6 for s in samples)
        return {"p50_us": us[len(us) // 2], "p99_us": us[min(len(us) - 1, int(len(us) * 0.99))], "n": len(us)}

    small = os.urandom(4 * KiB)
    client.put("bench/small", small)
    for i in range(50):  # warm the channel and both sides' code paths
        client.get("bench/small")
        client.get(f"bench/warm-miss-{i}")
    misses = [0.0] * count
    for i in range(count):
        t = time.perf_counter()
        assert client.get(f"bench/missing-{i}") is None
        misses[i] = time.perf_counter() - t
    hits = [0.0] * count
    for i in range(count):
        t = time.perf_counter()
        client.get("bench/small")
        hits[i] = time.perf_counter() - t
    has = timed(lambda: client.has(["bench/small"]), count)
    return {"miss": percentiles(misses), "hit_4KiB": percentiles(hits), "has": percentiles(has)}


def lz4_table(sample_bytes: int) -> list[dict[str, Any]]:
    img = image_like(sample_bytes, quantised=True, seed=3)
    img_raw = image_like(sample_bytes, quantised=False, seed=4)
    lat = latent_like(sample_bytes, seed=5)
    cases = [
        ("image f32 (8-bit levels)", img), ("image f32 (unquantised)", img_raw), ("latent f32", lat),
        ("image fp16", img.astype(np.float16)), ("latent fp16", lat.astype(np.float16)),
        ("image bf16", to_bf16(img)), ("latent bf16", to_bf16(lat)),
    ]
    rows = []
    for name, arr in cases:
        raw = as_bytes(arr)
        for shuffled in (False, True):
            t = time.perf_counter()
            data = byte_shuffle(raw, arr.itemsize) if shuffled else bytes(raw)
            shuffle_s = time.perf_counter() - t
            chunks = [memoryview(data)[o:o + MiB] for o in range(0, len(data), MiB)]
            t = time.perf_counter()
            packed = [lz4.block.compress(c, store_size=False) for c in chunks]
            compress_s = time.perf_counter() - t
            t = time.perf_counter()
            for c, p in zip(chunks, packed):
                lz4.block.decompress(p, uncompressed_size=len(c))
            decompress_s = time.perf_counter() - t
            rows.append({"data": name, "itemsize": arr.itemsize, "shuffle": shuffled, "bytes": len(data),
                         "ratio": sum(map(len, packed)) / len(data),
                         "compress_gbps": len(data) / compress_s / 1e9,
                         "decompress_gbps": len(data) / decompress_s / 1e9,
                         "shuffle_gbps": len(data) / shuffle_s / 1e9 if shuffled else None})
    return rows


_PEAK_PROBE = r"""
import json, resource, sys
from mesh.transport.peer import PeerClient


def peak_rss() -> int:
    # VmHWM, the high-water mark of this process image. Not ru_maxrss: Linux carries that across exec, so a child
    # of a big parent would report the parent's peak.
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


address, secret, key = sys.argv[1], sys.argv[2].encode(), sys.argv[3]
client = PeerClient(address, secret)
client.get("bench/small")  # warm: channel up, code paths loaded
before = peak_rss()
blob = client.get(key)
after = peak_rss()
print(json.dumps({"bytes": len(blob.data), "rss_growth": after - before}))
"""


def peak_memory(address: str, key: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _PEAK_PROBE, address, SECRET.decode(), key], capture_output=True,
                         text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {"bytes": got["bytes"], "rss_growth": got["rss_growth"], "ratio": got["rss_growth"] / got["bytes"]}


def spread(nbytes: int, seconds: list[float]) -> dict[str, Any]:
    """Median, min and max of a case's runs, in seconds and in GB/s (min_gbps is the slowest run)."""
    med, lo, hi = statistics.median(seconds), min(seconds), max(seconds)
    return {"median_s": med, "min_s": lo, "max_s": hi, "median_gbps": nbytes / med / 1e9,
            "min_gbps": nbytes / hi / 1e9, "max_gbps": nbytes / lo / 1e9, "seconds": seconds}


def tls_comparison(plain: PeerClient, tls: PeerClient, big: int, image_side: int, repeat: int) -> dict[str, Any]:
    """Gets of the same blobs from the plaintext node and from the TLS node, alternating (A B A B ...).

    Case 1: `big` bytes of unquantised float32 (image_like, as in the throughput table), the bytes only.
    Case 2: an IMAGE hit: a (1, side, side, 3) float32 picture encoded with mesh.codec.encode; each run is
    PeerClient.get plus mesh.codec.decode, i.e. what a cache hit costs the provider before ComfyUI sees the tensor.
    The first get of each case on each node is checked and not timed (it also warms the channel and handshake).
    """
    import torch

    load_start = os.getloadavg()
    clients = {"plaintext": plain, "tls": tls}

    def compare(name: str, key: str, payload: memoryview, fetch: Callable[[PeerClient], object],
                check: Callable[[object], bool], nbytes: int, runs: int) -> dict[str, Any]:
        for c in clients.values():
            assert c.put(key, payload).stored, f"put of {key} did not store"
            assert check(fetch(c)), f"{name}: get returned other data than was put"
        # What a get sends: chunks as stored, lz4-compressed where that paid off, so TLS encrypts these bytes.
        stored = sum(k.stored_size for k in plain.list_keys(prefix=key) if k.key == key)
        seconds: dict[str, list[float]] = {t: [] for t in clients}
        for _ in range(runs):
            for transport, c in clients.items():  # A B A B: both see the same machine, run by run
                t = time.perf_counter()
                got = fetch(c)
                seconds[transport].append(time.perf_counter() - t)
                del got
        for c in clients.values():
            c.delete([key])
        row: dict[str, Any] = {"case": name, "bytes": nbytes, "blob_bytes": len(payload), "stored_bytes": stored,
                               "repeat": runs}
        row.update({t: spread(nbytes, v) for t, v in seconds.items()})
        ratio = row["tls"]["median_s"] / row["plaintext"]["median_s"]
        row.update({"tls_over_plaintext": ratio, "tls_cost_pct": 100 * (ratio - 1)})
        return row

    def get_bytes(c: PeerClient) -> object:
        return c.get("bench/tls/big")

    data = image_like(big, quantised=False)
    raw = as_bytes(data)
    cases = [compare(f"get {fmt_size(big)} f32 unquantised", "bench/tls/big", raw, get_bytes,
                     lambda b: b is not None and b.data == raw, big, repeat)]  # type: ignore[attr-defined]
    raw, data = memoryview(b""), None  # free them before the image case

    image = synthetic_image(image_side, image_side)
    encoded = mesh.codec.encode(image)

    def get_image(c: PeerClient) -> object:
        blob = c.get("bench/tls/image")
        assert blob is not None, "IMAGE miss"
        return mesh.codec.decode(blob.data)

    cases.append(compare(f"IMAGE {'x'.join(map(str, image.shape))} hit, get+decode", "bench/tls/image",
                         memoryview(encoded), get_image, lambda v: torch.equal(v, image),  # type: ignore[arg-type]
                         image.numel() * image.element_size(), max(repeat, 11)))
    return {"order": "interleaved per run: plaintext, TLS, plaintext, TLS, ...", "mutual_tls": True,
            "target_cost_pct": TARGET_TLS_COST_PCT, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
            "cases": cases}


# -- output ------------------------------------------------------------------------------------------------------

def fmt_size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def print_report(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    if r.get("throughput"):
        t = Table(title="put / get through one node vs raw TCP (GB/s, median)", title_justify="left")
        for col in ("data", "size", "put", "get", "raw TCP fresh buf", "raw TCP reused buf", "get / fresh",
                    "get / reused"):
            t.add_column(col, justify="right" if col not in ("data",) else "left")
        for row in r["throughput"]:
            t.add_row(row["kind"], fmt_size(row["bytes"]), f"{row['put_gbps']:.2f}", f"{row['get_gbps']:.2f}",
                      f"{row['raw_tcp_fresh_gbps']:.2f}", f"{row['raw_tcp_gbps']:.2f}",
                      f"{100 * row['get_vs_raw_tcp_fresh']:.0f} %", f"{100 * row['get_vs_raw_tcp']:.0f} %")
        console.print(t)

    if r.get("latency"):
        t = Table(title="latency (µs)", title_justify="left")
        for col in ("call", "p50", "p99", "n"):
            t.add_column(col, justify="right" if col != "call" else "left")
        for name, v in r["latency"].items():
            t.add_row(name, f"{v['p50_us']:.0f}", f"{v['p99_us']:.0f}", str(v["n"]))
        console.print(t)

    if r.get("chunk_sweep"):
        t = Table(title="chunk-size sweep, 512 MiB unquantised float32", title_justify="left")
        for col in ("chunk", "put GB/s", "get GB/s", "get / raw TCP fresh", "receiver peak / blob"):
            t.add_column(col, justify="right")
        for row in r["chunk_sweep"]:
            t.add_row(fmt_size(row["chunk_size"]), f"{row['put_gbps']:.2f}", f"{row['get_gbps']:.2f}",
                      f"{100 * row['get_vs_raw_tcp_fresh']:.0f} %", f"{row['peak_ratio']:.2f}x")
        console.print(t)

    if r.get("peak_memory"):
        t = Table(title="receiver peak memory of a get (RSS growth of a fresh client)", title_justify="left")
        for col in ("blob", "size", "RSS growth", "growth / size"):
            t.add_column(col, justify="right" if col != "blob" else "left")
        for name, v in r["peak_memory"].items():
            t.add_row(name, fmt_size(v["bytes"]), fmt_size(v["rss_growth"]), f"{v['ratio']:.2f}x")
        console.print(t)

    if r.get("lz4"):
        t = Table(title="lz4 per 1 MiB chunk (ratio = compressed / raw)", title_justify="left")
        for col in ("data", "shuffle", "ratio", "compress GB/s", "decompress GB/s", "shuffle GB/s"):
            t.add_column(col, justify="right" if col != "data" else "left")
        for row in r["lz4"]:
            t.add_row(row["data"], "yes" if row["shuffle"] else "no", f"{row['ratio']:.3f}",
                      f"{row['compress_gbps']:.2f}", f"{row['decompress_gbps']:.2f}",
                      f"{row['shuffle_gbps']:.2f}" if row["shuffle_gbps"] else "")
        console.print(t)

    if r.get("tls"):
        tls = r["tls"]
        t = Table(title="TLS (mutual) vs plaintext, same run, runs interleaved plaintext / TLS "
                        "(seconds and GB/s: median, min - max)", title_justify="left")
        for col in ("case", "stored (lz4)", "runs", "transport", "seconds", "GB/s", "TLS cost"):
            t.add_column(col, justify="right" if col not in ("case", "transport") else "left")
        for row in tls["cases"]:
            for transport in ("plaintext", "tls"):
                v = row[transport]
                first = transport == "plaintext"
                t.add_row(row["case"] if first else "", f"{row['stored_bytes'] / MiB:.1f} MiB" if first else "",
                          str(row["repeat"]),
                          "TLS" if transport == "tls" else transport,
                          f"{v['median_s']:.3f}, {v['min_s']:.3f} - {v['max_s']:.3f}",
                          f"{v['median_gbps']:.2f}, {v['min_gbps']:.2f} - {v['max_gbps']:.2f}",
                          f"{row['tls_cost_pct']:+.1f} % ({row['tls_over_plaintext']:.2f}x)" if transport == "tls"
                          else "")
        console.print(t)
        console.print("load average (1, 5, 15 min) during the TLS comparison: "
                      f"start {' '.join(f'{x:.2f}' for x in tls['loadavg_start'])}, "
                      f"end {' '.join(f'{x:.2f}' for x in tls['loadavg_end'])}")

    for name, target in r["targets"].items():
        mark = "[green]met[/green]" if target["met"] else "[red]MISSED[/red]"
        console.print(f"target {name}: {target['value']:.3g} (wanted {target['wanted']}) {mark}")
    console.print(f"load average (1, 5, 15 min): start {' '.join(f'{x:.2f}' for x in r['loadavg_start'])}, "
                  f"end {' '.join(f'{x:.2f}' for x in r['loadavg_end'])}")


# -- main --------------------------------------------------------------------------------------------------------

def measure_plaintext(args: argparse.Namespace, results: dict[str, Any], node: NodeProcess,
                      client_for: Callable[[int], PeerClient], stack: contextlib.ExitStack, sizes: list[int],
                      big: int) -> None:
    """Everything but the TLS comparison: throughput vs raw TCP, latency, peak memory, chunk sweep, lz4."""
    raw = RawTcp()
    stack.callback(raw.close)
    results["latency"] = latency(client_for(MiB), count=300 if args.quick else 1000)
    for quantised in (False, True):
        kind = "f32 image, 8-bit levels" if quantised else "f32 unquantised"
        for size in sizes:
            data = image_like(size, quantised)
            repeat = max(args.repeat, 20) if size <= MiB else args.repeat
            row = throughput(client_for, raw, kind, as_bytes(data), repeat, key=f"bench/{kind}/{size}")
            results["throughput"].append(row)
            if size == big:
                key = f"bench/peak/{kind}"
                client_for(MiB).put(key, as_bytes(data))
                results["peak_memory"][kind] = peak_memory(node.address, key)
                client_for(MiB).delete([key])
            del data
    if not args.quick:
        data = image_like(big, quantised=False)
        for cs in SWEEP:
            row = throughput(client_for, raw, "f32 unquantised", as_bytes(data), args.repeat, chunk_size=cs,
                             key=f"bench/sweep/{cs}")
            key = f"bench/sweep-peak/{cs}"
            client_for(cs).put(key, as_bytes(data))
            row["peak_ratio"] = peak_memory(node.address, key)["ratio"]
            client_for(cs).delete([key])
            results["chunk_sweep"].append(row)
        del data
    results["lz4"] = lz4_table(8 * MiB if args.quick else 32 * MiB)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the results as JSON here")
    p.add_argument("--quick", action="store_true", help="1 MiB and 64 MiB only, no sweep (a smoke run)")
    p.add_argument("--repeat", type=int, default=5, help="runs per measurement of big blobs (default 5)")
    p.add_argument("--tls", action="store_true",
                   help="also measure TLS: a second node with mutual TLS beside the plaintext one, gets interleaved")
    p.add_argument("--tls-only", action="store_true", help="only the TLS vs plaintext comparison (implies --tls)")
    p.add_argument("--tls-size", type=parse_size, default=None,
                   help="bytes of the unquantised get compared over TLS (default 512MiB, 64MiB with --quick)")
    p.add_argument("--image-side", type=int, default=2048,
                   help="the TLS IMAGE hit is (1, N, N, 3) float32 (default 2048: 48 MiB)")
    args = p.parse_args(argv)
    args.tls = args.tls or args.tls_only

    started = time.monotonic()
    big = 512 * MiB
    sizes = [1 * MiB, 64 * MiB] + ([] if args.quick else [big])
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "mesh": mesh.__version__, "grpcio": __import__("grpc").__version__},
        "loadavg_start": os.getloadavg(),
        "throughput": [], "chunk_sweep": [], "peak_memory": {},
    }
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="mesh-bench-"))
        node = NodeProcess(Path(tmp), max_memory="3GiB")
        stack.callback(node.close)
        tls_node: NodeProcess | None = None
        client_tls: TlsConfig | None = None
        if args.tls:  # started now, beside the plaintext node, so both live through the whole run
            tls_dir = Path(tmp) / "tls"
            init_tls(tls_dir, ["bench-tls"])
            client_tls = load_tls(cert=str(tls_dir / "client.pem"), key=str(tls_dir / "client-key.pem"),
                                  ca=str(tls_dir / "ca.pem"), env={})
            tls_node = NodeProcess(Path(tmp), max_memory="2GiB", name="bench-tls", tls_dir=tls_dir)
            stack.callback(tls_node.close)
        clients: dict[int, PeerClient] = {}

        def client_for(chunk_size: int) -> PeerClient:
            if chunk_size not in clients:
                clients[chunk_size] = PeerClient(node.address, SECRET, Limits(chunk_size=chunk_size), timeout=120)
                stack.callback(clients[chunk_size].close)
            return clients[chunk_size]

        if not args.tls_only:
            measure_plaintext(args, results, node, client_for, stack, sizes, big)
        if tls_node is not None:
            tls_client = PeerClient(tls_node.address, SECRET, Limits(chunk_size=MiB), timeout=120, tls=client_tls)
            stack.callback(tls_client.close)
            tls_size = args.tls_size or max(sizes)
            results["tls"] = tls_comparison(client_for(MiB), tls_client, tls_size, args.image_side, args.repeat)

    results["targets"] = {}
    if not args.tls_only:
        big_row = next(r for r in results["throughput"]
                       if r["kind"] == "f32 unquantised" and r["bytes"] == max(sizes))
        ratio = big_row["get_vs_raw_tcp_fresh"]
        results["targets"] = {
            f"get {fmt_size(max(sizes))} unquantised / raw TCP into a fresh buffer": {
                "value": ratio, "wanted": f">= {TARGET_GET_VS_TCP}", "met": ratio >= TARGET_GET_VS_TCP},
            "miss p50 (µs)": {"value": results["latency"]["miss"]["p50_us"], "wanted": f"< {TARGET_MISS_P50_US:.0f}",
                              "met": results["latency"]["miss"]["p50_us"] < TARGET_MISS_P50_US},
        }
    if results["peak_memory"]:
        peak = max(v["ratio"] for v in results["peak_memory"].values())
        results["targets"]["receiver peak / blob"] = {"value": peak, "wanted": f"< {TARGET_PEAK_RATIO}",
                                                      "met": peak < TARGET_PEAK_RATIO}
    for row in results.get("tls", {}).get("cases", []):
        results["targets"][f"TLS cost, {row['case']} (%)"] = {
            "value": row["tls_cost_pct"], "wanted": f"<= {TARGET_TLS_COST_PCT:.0f}",
            "met": row["tls_cost_pct"] <= TARGET_TLS_COST_PCT}
    results["loadavg_end"] = os.getloadavg()
    results["seconds"] = time.monotonic() - started
    print_report(results)
    print(f"benchmark took {results['seconds']:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
