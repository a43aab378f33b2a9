"""Two-hop vs direct reads of a 64 MiB value on a loopback mesh of three `mesh serve` processes.

Two-hop: the client asks a node that does not own the key; that node fetches from an owner and streams it on.
Direct: the client learns the ring from a node (RemoteClient) and reads from an owner itself.
Each measured read is of a key the front node has never read, so its near cache does not flatter two-hop.

    .venv/bin/python scripts/bench_cluster.py [--size 64MiB] [--rounds 5] [--json bench-results/cluster.json]
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

from mesh.client import RemoteClient  # noqa: E402
from mesh.cluster.ring import Ring  # noqa: E402
from mesh.units import parse_size  # noqa: E402
from tests.support.localmesh import LocalMesh  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="64MiB")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    size = parse_size(args.size)
    with LocalMesh(extra_args=["--max-memory", "8GiB"]) as mesh:
        mesh.start(3)
        mesh.wait_members(3)
        front = mesh.nodes[0]
        ring = Ring({n.node_id: float(8 << 30) for n in mesh.nodes})
        keys: list[str] = []
        i = 0
        while len(keys) < 2 * args.rounds:  # keys the front node does not own
            key = f"bench/{i}"
            i += 1
            if front.node_id not in ring.owners(key, 2):
                keys.append(key)
        value = os.urandom(size)
        with mesh.client(mesh.nodes[1], timeout=120) as c:
            for key in keys:
                c.put(key, value)
        time.sleep(1.0)
        two_hop, direct = [], []
        with mesh.client(front, timeout=120) as c:
            for key in keys[: args.rounds]:
                t = time.perf_counter()
                blob = c.get(key)
                two_hop.append(time.perf_counter() - t)
                assert blob is not None and len(blob.data) == size
        remote = RemoteClient(front.address, mesh.secret, direct=True)
        try:
            for key in keys[args.rounds:]:
                t = time.perf_counter()
                data = remote.get(key, timeout=120)
                direct.append(time.perf_counter() - t)
                assert data is not None and len(data) == size
        finally:
            remote.close()
    result = {
        "size_bytes": size,
        "two_hop_ms_median": statistics.median(two_hop) * 1e3,
        "direct_ms_median": statistics.median(direct) * 1e3,
        "two_hop_gbps": size / statistics.median(two_hop) / 1e9,
        "direct_gbps": size / statistics.median(direct) / 1e9,
    }
    print(f"{'route':10} {'median ms':>10} {'GB/s':>7}")
    print(f"{'two-hop':10} {result['two_hop_ms_median']:10.1f} {result['two_hop_gbps']:7.2f}")
    print(f"{'direct':10} {result['direct_ms_median']:10.1f} {result['direct_gbps']:7.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
