"""Zeroconf discovery end to end: `mesh serve --zeroconf` nodes in separate network namespaces, no seeds.

They find each other by mDNS and admit each other after an authenticated ping; a node with the wrong secret
advertises on the same LAN but is never admitted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.netns import Host, NetLab, netlab_or_skip

PORT = 7411
FAST = ["--heartbeat", "0.2", "--suspect-after", "1.0", "--dead-after", "2.0"]


def _serve(lab: NetLab, host: Host, secret_file: Path, node_id: str, tmp: Path) -> subprocess.Popen[bytes]:
    ready = tmp / f"{node_id}.ready"
    log = open(tmp / f"{node_id}.log", "wb")
    argv = [sys.executable, "-m", "mesh.cli", "--secret-file", str(secret_file), "serve",
            "--listen", f"{host.addr}:{PORT}", "--node-id", node_id, "--zeroconf",
            "--zeroconf-interfaces", host.addr, "--min-free-ram", "0", "--ready-file", str(ready), *FAST]
    p = lab.popen(host, argv, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert p.poll() is None and time.monotonic() < deadline, (tmp / f"{node_id}.log").read_text()
        time.sleep(0.05)
    return p


def _peers(lab: NetLab, host: Host, secret_file: Path) -> dict[str, str]:
    out = lab.run(host, [sys.executable, "-m", "mesh.cli", "--node", f"{host.addr}:{PORT}", "--secret-file",
                         str(secret_file), "--timeout", "5", "peers", "--json"], capture_output=True, text=True)
    return {r["node_id"]: r["state"] for r in json.loads(out.stdout)}


def test_zeroconf_nodes_find_each_other_and_refuse_a_wrong_secret(tmp_path: Path) -> None:
    good_secret = tmp_path / "good"
    good_secret.write_text("the-cluster-secret")
    bad_secret = tmp_path / "bad"
    bad_secret.write_text("not-the-secret")
    with netlab_or_skip(4) as lab:
        for i, host in enumerate(lab.hosts[:3]):
            _serve(lab, host, good_secret, f"zc{i}", tmp_path)
        _serve(lab, lab.hosts[3], bad_secret, "intruder", tmp_path)
        want = {"zc0": "ALIVE", "zc1": "ALIVE", "zc2": "ALIVE"}
        deadline = time.monotonic() + 20
        views: dict[str, dict[str, str]] = {}
        while time.monotonic() < deadline:
            views = {h.name: _peers(lab, h, good_secret) for h in lab.hosts[:3]}
            if all(v == want for v in views.values()):
                break
            time.sleep(0.3)
        assert all(v == want for v in views.values()), views
        # The intruder's adverts reached everyone (it is on the same LAN) but it was never admitted.
        time.sleep(1.0)
        for h in lab.hosts[:3]:
            assert "intruder" not in _peers(lab, h, good_secret)
        assert _peers(lab, lab.hosts[3], bad_secret) == {"intruder": "ALIVE"}
