"""A fleet on three hosts (network namespaces with their own addresses and name resolution): nodes listening on
the wildcard address with DNS-name seeds, two ComfyUI-like processes sharing through them, and a dead seed
that an operator sees as a warning and in `mesh status`."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.comfy_harness import HarnessProcess, b_is_served_what_a_computed
from tests.conftest import poll
from tests.support.cli import run_cli
from tests.support.serve import start_serve
from tests.netns import NetLab, netlab_or_skip

PORT = 7421
REPO = Path(__file__).resolve().parent.parent
FAST = ["--heartbeat", "0.2", "--suspect-after", "1.0", "--dead-after", "2.0"]


def _serve(lab: NetLab, i: int, secret: Path, tmp: Path) -> None:
    seeds = ",".join(f"dns:gpu{j}:{PORT}" for j in range(3) if j != i) + f",dns:gone:{PORT}"
    node = start_serve(tmp, f"gpu{i}", "--node-id", f"gpu{i}", "--seeds", seeds, *FAST, secret_file=secret,
                       listen=f"0.0.0.0:{PORT}", wrap=lab.argv(lab.hosts[i], []), cwd=REPO)
    lab.adopt(node.process)
    assert node.address == f"{lab.hosts[i].addr}:{PORT}"  # never loopback


def _status(lab: NetLab, i: int, secret: Path) -> dict:
    out = run_cli("status", "--json", node=f"gpu{i}:{PORT}", secret_file=secret, rpc_timeout=5,
                  wrap=lab.argv(lab.hosts[i], []), check=True)
    return json.loads(out.stdout)


def test_three_hosts_with_dns_seeds_and_wildcard_listen_share_outputs(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("three-hosts-secret\n")
    with netlab_or_skip(3) as lab:
        names = {f"gpu{i}": h.addr for i, h in enumerate(lab.hosts)}
        names["gone"] = lab.subnet.replace("0/24", "200")  # resolves, but no host answers there
        lab.hosts_file(names)
        for i in range(3):
            _serve(lab, i, secret, tmp_path)
        poll(lambda: all(_status(lab, i, secret)["members"]["ALIVE"] == 3 for i in range(3)),
             "every host sees 3 alive members", interval=0.3)
        # The dead seed is a warning in the log and in `mesh status`, naming it.
        poll(lambda: all(any("dns:gone" in w for w in _status(lab, i, secret)["warnings"]) for i in range(3)),
             "every host warns about the dead seed", timeout=20, interval=0.3)
        assert f"seed dns:gone:{PORT}" in (tmp_path / "gpu0.log").read_text()

        args = ["--secret", "three-hosts-secret", "--mode", "sidecar"]
        a = HarnessProcess([*args, "--node", f"gpu0:{PORT}", "--node-id", "comfy-a"], log_path=tmp_path / "a.log",
                           wrap=lab.argv(lab.hosts[0], []))
        b = None
        try:
            b = HarnessProcess([*args, "--node", f"gpu2:{PORT}", "--node-id", "comfy-b"],
                               log_path=tmp_path / "b.log", wrap=lab.argv(lab.hosts[2], []))
            b_is_served_what_a_computed(a, b, seed=33)
        finally:
            if b is not None:
                b.quit()
            a.quit()
