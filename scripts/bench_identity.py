"""What a model file's identity costs (provider/filehash.py): the first hash of a large file, from the page cache
and from disk, and the remembered identity after a restart (no read at all).

    .venv/bin/python scripts/bench_identity.py [--size 2GiB] [--dir /var/tmp] [--runs 3] [--json FILE]

The file is written with random bytes (models do not compress either) in `--dir` and removed at the end. "From
disk" drops the page cache first (root only: /proc/sys/vm/drop_caches); without root that case is skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mesh.units import format_size, parse_size  # noqa: E402
from provider.filehash import FileHashes  # noqa: E402


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def first_identity(path: Path, table: Path) -> float:
    """Seconds from asking to knowing, in a process that never saw the file (a fresh table)."""
    table.unlink(missing_ok=True)
    files = FileHashes(table)
    try:
        started = time.perf_counter()
        assert files.wait(str(path), 600) is not None
        return time.perf_counter() - started
    finally:
        files.close()


def remembered_identity(path: Path, table: Path, calls: int = 1000) -> tuple[float, float]:
    """A restart: loading the table and the first answer; then the per-call cost of an answer (one stat)."""
    started = time.perf_counter()
    files = FileHashes(table)
    try:
        assert files.identity(str(path)) is not None and files.counters.hashed == 0
        first = time.perf_counter() - started
        t0 = time.perf_counter()
        for _ in range(calls):
            files.identity(str(path))
        return first, (time.perf_counter() - t0) / calls
    finally:
        files.close()


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("2GiB"))
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="mesh-identity-", dir=args.dir) as tmp:
        path, table = Path(tmp) / "model.safetensors", Path(tmp) / "identities.json"
        block = os.urandom(16 << 20)
        with open(path, "wb") as f:
            for _ in range(args.size // len(block)):
                f.write(block)
            f.write(block[: args.size % len(block)])
        cached, cold, restart, per_call = [], [], [], []
        for _ in range(args.runs):
            cached.append(first_identity(path, table))           # page cache warm: the hash itself
            if drop_page_cache():
                cold.append(first_identity(path, table))          # from disk
            first, call = remembered_identity(path, table)
            restart.append(first)
            per_call.append(call)
        load = os.getloadavg()
    gb = args.size / 1e9
    result = {
        "size": args.size,
        "first_identity_page_cache_s": summary(cached),
        "first_identity_from_disk_s": summary(cold) if cold else None,
        "after_restart_first_answer_s": summary(restart),
        "remembered_answer_us": summary([c * 1e6 for c in per_call]),
        "loadavg": load,
    }
    print(f"identity of a {format_size(args.size)} file, {args.runs} runs (median, min-max), load {load[0]:.2f}")
    print(f"  first, from the page cache: {result['first_identity_page_cache_s']['median']:.2f} s "
          f"({min(cached):.2f}-{max(cached):.2f}), {gb / statistics.median(cached):.1f} GB/s")
    if cold:
        print(f"  first, from disk:           {statistics.median(cold):.2f} s ({min(cold):.2f}-{max(cold):.2f}), "
              f"{gb / statistics.median(cold):.1f} GB/s")
    else:
        print("  first, from disk:           skipped (dropping the page cache needs root)")
    print(f"  after a restart:            {statistics.median(restart) * 1e3:.2f} ms to the first answer "
          f"(the table, one stat; the file is not read)")
    print(f"  each later answer:          {statistics.median(per_call) * 1e6:.1f} us (one stat)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
