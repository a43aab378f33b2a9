"""Zeroconf discovery end to end: `mesh serve --zeroconf` nodes in separate network namespaces, no seeds.

They find each other by mDNS and admit each other once each proved the secret; a node with the wrong secret
and a rogue that knows none (it answers every RPC and advertises a huge capacity) advertise on the same LAN
but are never admitted, and the rogue never receives a put.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import poll
from tests.support.cli import run_cli
from tests.support.serve import ServeProcess, start_serve
from tests.netns import Host, NetLab, netlab_or_skip

PORT = 7411
FAST = ["--heartbeat", "0.2", "--suspect-after", "1.0", "--dead-after", "2.0"]


def _serve(lab: NetLab, host: Host, secret_file: Path, node_id: str, tmp: Path) -> ServeProcess:
    node = start_serve(tmp, node_id, "--node-id", node_id, "--zeroconf", "--zeroconf-interfaces", host.addr, *FAST,
                       secret_file=secret_file, listen=f"{host.addr}:{PORT}", wrap=lab.argv(host, []))
    lab.adopt(node.process)
    return node


def _peers(lab: NetLab, host: Host, secret_file: Path) -> dict[str, str]:
    out = run_cli("peers", "--json", node=f"{host.addr}:{PORT}", secret_file=secret_file, rpc_timeout=5,
                  wrap=lab.argv(host, []), check=True)
    return {r["node_id"]: r["state"] for r in json.loads(out.stdout)}


def _rogue_status(path: Path) -> dict[str, int]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def test_zeroconf_nodes_find_each_other_and_refuse_strangers(tmp_path: Path) -> None:
    good_secret = tmp_path / "good"
    good_secret.write_text("the-cluster-secret")
    bad_secret = tmp_path / "bad"
    bad_secret.write_text("not-the-secret")
    with netlab_or_skip(5) as lab:
        for i, host in enumerate(lab.hosts[:3]):
            _serve(lab, host, good_secret, f"zc{i}", tmp_path)
        _serve(lab, lab.hosts[3], bad_secret, "intruder", tmp_path)
        rogue_status = tmp_path / "rogue.json"
        repo = str(Path(__file__).resolve().parent.parent)
        lab.popen(lab.hosts[4], [sys.executable, "-m", "tests.rogue", "--listen", f"{lab.hosts[4].addr}:{PORT}",
                                 "--status", str(rogue_status)], cwd=repo,
                  env={**os.environ, "PYTHONPATH": repo}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        want = {"zc0": "ALIVE", "zc1": "ALIVE", "zc2": "ALIVE"}
        views: dict[str, dict[str, str]] = {}

        def converged() -> bool:
            views.update({h.name: _peers(lab, h, good_secret) for h in lab.hosts[:3]})
            return all(v == want for v in views.values())

        poll(converged, "the three good nodes see exactly each other ALIVE", timeout=20, interval=0.3)
        # The adverts reached everyone (same LAN): every good node tried both strangers and refused them.
        logs = [tmp_path / f"zc{i}.log" for i in range(3)]
        poll(lambda: all(f"not admitting {lab.hosts[3].addr}" in p.read_text()
                         and f"not admitting {lab.hosts[4].addr}" in p.read_text() for p in logs)
             and _rogue_status(rogue_status).get("hellos", 0) >= 3, "every good node refused both strangers",
             timeout=20, interval=0.2)
        value = tmp_path / "value"
        value.write_bytes(os.urandom(50_000))
        for i in range(6):
            host = lab.hosts[i % 3]
            run_cli("put", f"k{i}", str(value), node=f"{host.addr}:{PORT}", secret_file=good_secret,
                    wrap=lab.argv(host, []), check=True, capture=False)
        for h in lab.hosts[:3]:
            assert set(_peers(lab, h, good_secret)) == {"zc0", "zc1", "zc2"}
        assert _peers(lab, lab.hosts[3], bad_secret) == {"intruder": "ALIVE"}
        status = _rogue_status(rogue_status)
        assert status["puts"] == 0 and status["gets"] == 0 and status["proofs"] == 0, status
