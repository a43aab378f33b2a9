"""A 2|3 partition of five `mesh serve` hosts (network namespaces, packets dropped silently both ways) with writes
on both sides, then a heal: no acknowledged put is lost, no wrong byte is read, and the views agree again.

Found by a chaos run before this: a put that reached a node cut off from both owners answered replicas=0 and
parked the value where repair never looked; after a 90 s partition 38 acknowledged keys were gone."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.conftest import poll
from tests.netns import NetLab, netlab_or_skip
from tests.support.cli import run_cli
from tests.support.serve import start_serve

PORT = 7431
REPO = Path(__file__).resolve().parent.parent
FAST = ["--heartbeat", "0.2", "--suspect-after", "1.0", "--dead-after", "2.0", "--replicas", "2",
        "--repair-interval", "1"]
NODES = 5
PARTITION_SECONDS = 12.0


def status(lab: NetLab, node: int, secret: Path) -> dict:
    out = run_cli("status", "--json", node=f"{lab.hosts[node].addr}:{PORT}", secret_file=secret, rpc_timeout=5,
                  wrap=lab.argv(lab.hosts[NODES], []), check=True)
    return json.loads(out.stdout)


def test_a_partition_with_writes_on_both_sides_loses_no_acknowledged_put(tmp_path: Path, secret_file: Path) -> None:
    with netlab_or_skip(NODES + 1) as lab:  # five mesh hosts, and a client host that reaches both sides
        addresses = [f"{h.addr}:{PORT}" for h in lab.hosts[:NODES]]
        for i in range(NODES):
            seeds = ",".join(a for j, a in enumerate(addresses) if j != i)
            node = start_serve(tmp_path, f"n{i}", "--node-id", f"n{i}", "--seeds", seeds, *FAST,
                               secret_file=secret_file, listen=f"0.0.0.0:{PORT}", wrap=lab.argv(lab.hosts[i], []),
                               cwd=REPO)
            lab.adopt(node.process)
        poll(lambda: all(status(lab, i, secret_file)["members"]["ALIVE"] == NODES for i in range(NODES)),
             "the five hosts formed one mesh", timeout=30)
        stop, out = tmp_path / "stop", tmp_path / "load.json"
        load = lab.popen(lab.hosts[NODES], [sys.executable, "-m", "tests.support.verifying_load", "load",
                                            "--nodes", ",".join(addresses), "--secret-file", str(secret_file),
                                            "--stop-file", str(stop), "--out", str(out), "--limit", "120"],
                         cwd=REPO)
        minority, majority = lab.hosts[:2], lab.hosts[2:NODES]
        time.sleep(2.0)  # load before the cut (a duration of the scenario, not a wait for a condition)
        lab.cut(minority, majority)
        cut_at = time.time()
        time.sleep(PARTITION_SECONDS)  # the partition lasts this long, with writes on both sides
        lab.heal()
        healed_at = time.time()
        poll(lambda: all(status(lab, i, secret_file)["members"]["ALIVE"] == NODES for i in range(NODES)),
             "every node sees all five ALIVE again", timeout=30)
        agreed_after = time.time() - healed_at
        stop.touch()
        assert load.wait(timeout=60) == 0
        record = json.loads(out.read_text())
        acked = record["acked"]
        during = [k for k, v in acked.items() if cut_at <= v["at"] <= healed_at]
        assert len(during) > 20, f"too few puts during the partition to judge ({len(during)})"
        assert any(v["hinted"] or v["replicas"] < 2 for k, v in acked.items() if k in during)

        def settled() -> bool:
            return all(status(lab, i, secret_file)["repair"]["hints"] == 0 for i in range(NODES))

        poll(settled, "every hint handed to its owners", timeout=60)
        verified = tmp_path / "verify.json"
        run_cli_python = lab.run(lab.hosts[NODES], [sys.executable, "-m", "tests.support.verifying_load", "verify",
                                                    "--nodes", ",".join(addresses), "--secret-file",
                                                    str(secret_file), "--keys", str(out), "--out", str(verified)],
                                 cwd=REPO, timeout=300)
        assert run_cli_python.returncode == 0
        result = json.loads(verified.read_text())
        wrong_reads = sum(1 for _, r in record["reads"] if r == "wrong")
        hinted = sum(1 for v in acked.values() if v["hinted"])
        print(f"acked {len(acked)} ({len(during)} during the partition, {hinted} as hints), lost "
              f"{len(result['lost'])}, wrong {len(result['wrong'])} + {wrong_reads} reads, under-replicated "
              f"{len(result['under_replicated'])}, agreed {agreed_after:.1f} s after the heal")
        assert result["lost"] == [] and result["wrong"] == [] and wrong_reads == 0
        assert result["under_replicated"] == []
