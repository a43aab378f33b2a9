"""A 2|3 partition of five `mesh serve` hosts (network namespaces, packets dropped silently both ways) with writes
on both sides, then a heal: no acknowledged put is lost, no wrong byte is read, and the views agree again.

Found by a chaos run before this: a put that reached a node cut off from both owners answered replicas=0 and
parked the value where repair never looked; after a 90 s partition 38 acknowledged keys were gone."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.conftest import poll
from tests.netns import netlab_or_skip
from tests.support.netfleet import NetFleet

PORT = 7431
FAST = ["--heartbeat", "0.2", "--suspect-after", "1.0", "--dead-after", "2.0", "--replicas", "2",
        "--repair-interval", "1"]


def test_a_partition_with_writes_on_both_sides_loses_no_acknowledged_put(tmp_path: Path, secret_file: Path) -> None:
    with netlab_or_skip(6) as lab:  # five mesh hosts, and a client host that reaches both sides
        fleet = NetFleet(lab, 5, PORT, secret_file, tmp_path, FAST)

        def stored() -> int:
            """Copies held on the five nodes (hints included), or 0 while one does not answer."""
            try:
                return sum(fleet.status(i)["entries"] for i in range(5))
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):  # a slow answer: ask again
                return 0
        poll(fleet.agreed, "the five hosts formed one mesh", timeout=30)
        fleet.start_load(limit=120)
        minority, majority = fleet.hosts[:2], fleet.hosts[2:]
        poll(lambda: stored() >= 40, "the load stored 20 keys before the cut")
        lab.cut(minority, majority)
        cut_at = time.time()
        before = stored()
        # The cut lasts until each side holds the other DEAD (each node's own view) and writes went on meanwhile.
        poll(lambda: all(fleet.states(i).get("DEAD") == (3 if i < 2 else 2) for i in range(5)),
             "each side holds the other DEAD", timeout=30)
        poll(lambda: stored() >= before + 60, "writes on both sides during the cut")
        lab.heal()
        healed_at = time.time()
        poll(fleet.agreed, "every node sees all five ALIVE again", timeout=30)
        agreed_after = time.time() - healed_at
        record = fleet.stop_load()
        acked = record["acked"]
        during = [k for k, v in acked.items() if cut_at <= v["at"] <= healed_at]
        assert len(during) > 20, f"too few puts during the partition to judge ({len(during)})"
        poll(lambda: all(fleet.status(i)["repair"]["hints"] == 0 for i in range(5)),
             "every hint handed to its owners", timeout=60)
        result = fleet.verify(replicas=2)
        wrong_reads = sum(1 for _, r in record["reads"] if r == "wrong")
        hinted = sum(1 for v in acked.values() if v["hinted"])
        print(f"acked {len(acked)} ({len(during)} during the partition, {hinted} as hints), lost "
              f"{len(result['lost'])}, wrong {len(result['wrong'])} + {wrong_reads} reads, under-replicated "
              f"{len(result['under_replicated'])}, agreed {agreed_after:.1f} s after the heal")
        assert result["lost"] == [] and result["wrong"] == [] and wrong_reads == 0
        assert result["under_replicated"] == []
