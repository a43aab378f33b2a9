"""`mesh serve` on N hosts of a NetLab (tests/netns.py), plus one client host that reaches every node, with the
verifying load (tests/support/verifying_load.py) run from it. For partitions: the test or chaos script cuts and
heals links between mesh hosts, while the client keeps talking to both sides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.netns import Host, NetLab
from tests.support.cli import run_cli
from tests.support.serve import start_serve

REPO = Path(__file__).resolve().parent.parent.parent


class NetFleet:
    def __init__(self, lab: NetLab, n: int, port: int, secret_file: Path, workdir: Path, args: list[str]) -> None:
        if len(lab.hosts) < n + 1:
            raise ValueError(f"a fleet of {n} needs a lab of {n + 1} hosts (one client)")
        self.lab, self.n, self.port, self.secret_file, self.workdir = lab, n, port, secret_file, workdir
        self.addresses = [f"{h.addr}:{port}" for h in lab.hosts[:n]]
        self.client_host: Host = lab.hosts[n]
        for i in range(n):
            seeds = ",".join(a for j, a in enumerate(self.addresses) if j != i)
            node = start_serve(workdir, f"n{i}", "--node-id", f"n{i}", "--seeds", seeds, *args,
                               secret_file=secret_file, listen=f"0.0.0.0:{port}", wrap=lab.argv(lab.hosts[i], []),
                               cwd=REPO)
            lab.adopt(node.process)
        self._stop = workdir / "load.stop"
        self.load_out = workdir / "load.json"
        self._load: subprocess.Popen[bytes] | None = None

    @property
    def hosts(self) -> list[Host]:
        return self.lab.hosts[:self.n]

    def status(self, i: int) -> dict:
        """`mesh status --json` of node i, asked from the client host."""
        out = run_cli("status", "--json", node=self.addresses[i], secret_file=self.secret_file, rpc_timeout=5,
                      wrap=self.lab.argv(self.client_host, []), check=True)
        return json.loads(out.stdout)

    def stats(self, i: int) -> dict[str, float]:
        """`mesh stats --json` counters of node i (membership_* among them)."""
        out = run_cli("stats", "--json", node=self.addresses[i], secret_file=self.secret_file, rpc_timeout=5,
                      wrap=self.lab.argv(self.client_host, []), check=True)
        return json.loads(out.stdout)["counters"]

    def states(self, i: int) -> dict[str, int]:
        """ALIVE/SUSPECT/DEAD/LEFT counts in node i's view, or {} where it does not answer in time."""
        try:
            return self.status(i)["members"]
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
            return {}

    def agreed(self) -> bool:
        return all(self.states(i).get("ALIVE") == self.n for i in range(self.n))

    def start_load(self, limit: float = 600.0, *extra: str) -> None:
        self._stop.unlink(missing_ok=True)
        self._load = self.lab.popen(self.client_host, [
            sys.executable, "-m", "tests.support.verifying_load", "load", "--nodes", ",".join(self.addresses),
            "--secret-file", str(self.secret_file), "--stop-file", str(self._stop), "--out", str(self.load_out),
            "--limit", str(limit), *extra], cwd=REPO)

    def stop_load(self) -> dict:
        assert self._load is not None
        self._stop.touch()
        if self._load.wait(timeout=60) != 0:
            raise RuntimeError("the verifying load failed")
        return json.loads(self.load_out.read_text())

    def verify(self, replicas: int) -> dict:
        """Every acknowledged key of the load, on the owners the ring names now (verifying_load verify)."""
        out = self.workdir / "verify.json"
        self.lab.run(self.client_host, [
            sys.executable, "-m", "tests.support.verifying_load", "verify", "--nodes", ",".join(self.addresses),
            "--secret-file", str(self.secret_file), "--keys", str(self.load_out), "--out", str(out),
            "--replicas", str(replicas)], cwd=REPO, timeout=600)
        return json.loads(out.read_text())
