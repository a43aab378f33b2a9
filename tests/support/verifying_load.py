"""A verifying load that runs as its own process, so it can run inside a network namespace (tests/netns.py) while
the test or chaos script that started it cuts and heals links from outside.

    python -m tests.support.verifying_load load --nodes A,B --secret-file F --stop-file S --out load.json
    python -m tests.support.verifying_load verify --nodes A,B --secret-file F --keys load.json --out verify.json

`load` puts keys through random nodes (each key once, its bytes derived from the key) and reads back keys it put,
checking every byte, until the stop file exists; it records every acknowledged put (with the replicas and hint
the node answered) and every read as (time, result). `verify` reads every acknowledged key from the owners the ring
names (local_only): a key no owner holds is lost; a key held with other bytes is a wrong value.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mesh.cluster.ring import Ring
from mesh.membership.driver import ring_weights
from mesh.transport.auth import load_keyring
from mesh.transport.peer import MeshError, PeerClient
from tests.support.poll import poll


def value_for(key: str, size: int) -> bytes:
    """The bytes stored under `key`: reproducible, so any reader can verify a get."""
    return random.Random(key).randbytes(size)


@dataclass
class Record:
    acked: dict[str, dict] = field(default_factory=dict)   # key -> {at, node, replicas, hinted}
    put_errors: int = 0
    reads: list[tuple[float, str]] = field(default_factory=list)  # (unix time, hit|miss|wrong|error)


def run_load(nodes: list[str], secret: object, stop_file: Path, prefix: str, size: int, writers: int,
             readers: int, pace: float, timeout: float, limit: float) -> Record:
    record = Record()
    lock = threading.Lock()
    stop = threading.Event()
    counter = iter(range(10**9))

    def writer(w: int) -> None:
        while not stop.is_set():
            with lock:
                key = f"{prefix}/{w}/{next(counter)}"
            node = random.choice(nodes)
            try:
                with PeerClient(node, secret, timeout=timeout) as c:  # type: ignore[arg-type]
                    reply = c.put(key, value_for(key, size))
                with lock:
                    record.acked[key] = {"at": time.time(), "node": node, "replicas": reply.replicas,
                                         "hinted": reply.hinted}
            except MeshError:
                with lock:
                    record.put_errors += 1
            stop.wait(pace)

    def reader() -> None:
        while not stop.is_set():
            with lock:
                done = list(record.acked)
            if not done:
                stop.wait(0.05)
                continue
            key = random.choice(done)
            try:
                with PeerClient(random.choice(nodes), secret, timeout=timeout) as c:  # type: ignore[arg-type]
                    blob = c.get(key)
                result = "miss" if blob is None else (
                    "hit" if hashlib.sha256(blob.data).digest() == hashlib.sha256(value_for(key, size)).digest()
                    else "wrong")
            except MeshError:
                result = "error"
            with lock:
                record.reads.append((time.time(), result))
            stop.wait(pace)

    threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(writers)]
    threads += [threading.Thread(target=reader, daemon=True) for _ in range(readers)]
    for t in threads:
        t.start()
    try:
        poll(stop_file.exists, "the stop file", timeout=limit)  # bounded whatever happens to the stop file
    except TimeoutError:
        pass
    stop.set()
    for t in threads:
        t.join(timeout=timeout + 5)
    return record


def run_verify(nodes: list[str], secret: object, keys: list[str], size: int, timeout: float, replicas: int
               ) -> dict:
    """Per acknowledged key, its copies on the owners the ring names now, read with local_only (a copy elsewhere,
    say in a near cache, is not durable: repair never brings it home): lost where no owner holds it, wrong where
    an owner holds other bytes, under-replicated where fewer than `replicas` do."""
    with PeerClient(nodes[0], secret, timeout=timeout) as c:  # type: ignore[arg-type]
        members = c.stats().members
    ring = Ring(ring_weights(members))
    address = {m.node_id: m.address for m in members}
    lost: list[str] = []
    wrong: list[str] = []
    under: list[str] = []
    for key in keys:
        held = 0
        for owner in ring.owners(key, replicas):
            try:
                with PeerClient(address[owner], secret, timeout=timeout) as c:  # type: ignore[arg-type]
                    blob = c.get(key, local_only=True)
            except MeshError:
                continue
            if blob is None:
                continue
            if bytes(blob.data) != value_for(key, size):
                wrong.append(key)
            held += 1
        if held == 0:
            lost.append(key)
        elif held < replicas:
            under.append(key)
    return {"keys": len(keys), "lost": lost, "wrong": wrong, "under_replicated": under}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["load", "verify"])
    p.add_argument("--nodes", required=True, help="comma-separated HOST:PORT")
    p.add_argument("--secret-file", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--stop-file", default="")
    p.add_argument("--keys", default="", help="verify: the load's output file")
    p.add_argument("--prefix", default="load")
    p.add_argument("--size", type=int, default=20_000, help="load: bytes per value (verify reads it from --keys)")
    p.add_argument("--writers", type=int, default=2)
    p.add_argument("--readers", type=int, default=2)
    p.add_argument("--pace", type=float, default=0.05, help="seconds each worker waits between calls")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per call")
    p.add_argument("--limit", type=float, default=600.0, help="seconds the load runs at most")
    p.add_argument("--replicas", type=int, default=2, help="verify: owners per key")
    a = p.parse_args(argv)
    nodes = a.nodes.split(",")
    secret = load_keyring(a.secret_file)
    if a.mode == "load":
        record = run_load(nodes, secret, Path(a.stop_file), a.prefix, a.size, a.writers, a.readers, a.pace,
                          a.timeout, a.limit)
        Path(a.out).write_text(json.dumps({**asdict(record), "size": a.size}))
    else:
        loaded = json.loads(Path(a.keys).read_text())
        Path(a.out).write_text(json.dumps(run_verify(nodes, secret, list(loaded["acked"]), loaded["size"], a.timeout,
                                                     a.replicas)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
