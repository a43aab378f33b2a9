"""Cloned hosts and a loopback node among hosts (issue 22, items 4 and 5), on network namespaces with their own
addresses and, where it matters, one hostname for all (`unshare --uts`, as cloned VMs and containers have):

- two hosts with the same hostname and default ids form a 2-member mesh under distinct ids;
- two nodes forced under one id are refused by each other, and both logs and both `mesh status` name the clash;
- a node on loopback that reaches a seed on its own host is refused by that seed (both logs say so), so every
  member holds the same ring (it took 54 % of one ring before, and none of the others).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import poll
from tests.netns import Host, NetLab, netlab_or_skip
from tests.support.cli import run_cli
from tests.support.serve import ServeProcess, start_serve

PORT = 7441
LOOPBACK_PORT = 7442
REPO = Path(__file__).resolve().parent.parent
FAST = ["--heartbeat", "0.2", "--suspect-after", "1.0", "--dead-after", "2.0"]
HOSTNAME = "vm-clone"


def _cloned(lab: NetLab, host: Host) -> list[str]:
    """Run in host's namespace under the hostname every clone has."""
    return lab.argv(host, ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', HOSTNAME])


def _serve(lab: NetLab, tmp: Path, name: str, host: Host, secret: Path, *args: str,
           listen: str = f"0.0.0.0:{PORT}") -> ServeProcess:
    node = start_serve(tmp, name, *args, *FAST, secret_file=secret, listen=listen, wrap=_cloned(lab, host), cwd=REPO)
    lab.adopt(node.process)
    return node


def _cli(lab: NetLab, host: Host, secret: Path, *args: str, node: str = f"127.0.0.1:{PORT}") -> dict | list:
    out = run_cli(*args, "--json", node=node, secret_file=secret, rpc_timeout=5, wrap=lab.argv(host, []), check=True)
    return json.loads(out.stdout)


def _secret(tmp: Path) -> Path:
    secret = tmp / "secret"
    secret.write_text("node-ids-secret\n")
    return secret


def test_two_hosts_with_one_hostname_form_a_mesh_under_distinct_ids(tmp_path: Path) -> None:
    secret = _secret(tmp_path)
    with netlab_or_skip(2) as lab:
        a, b = lab.hosts
        nodes = [_serve(lab, tmp_path, "a", a, secret, "--seeds", f"{b.addr}:{PORT}", "--data-dir",
                        str(tmp_path / "a-data")),
                 _serve(lab, tmp_path, "b", b, secret, "--seeds", f"{a.addr}:{PORT}", "--data-dir",
                        str(tmp_path / "b-data"))]
        ids = [n.node_id for n in nodes]
        assert ids[0] != ids[1] and all(i.startswith(f"{HOSTNAME}-") for i in ids), ids
        poll(lambda: all(_cli(lab, h, secret, "status")["members"]["ALIVE"] == 2 for h in (a, b)),
             "both hosts see 2 alive members", interval=0.3)
        for h in (a, b):
            assert sorted(r["node_id"] for r in _cli(lab, h, secret, "peers")) == sorted(ids)  # type: ignore[union-attr]
        # A restart keeps the id (and so the ring position): it is kept in the data dir.
        nodes[0].stop()
        again = _serve(lab, tmp_path, "a", a, secret, "--seeds", f"{b.addr}:{PORT}", "--data-dir",
                       str(tmp_path / "a-data"))
        assert again.node_id == ids[0]


def test_two_nodes_under_one_id_are_refused_and_named_on_both_sides(tmp_path: Path) -> None:
    """gpu on host a and c on host c form a mesh; then a clone comes up on host b as gpu too (a cloned data dir
    holds the same node-id file). Neither a nor c lets it replace a's gpu, and all three name the clash."""
    secret = _secret(tmp_path)
    with netlab_or_skip(3) as lab:
        a, b, c = lab.hosts
        _serve(lab, tmp_path, "a", a, secret, "--node-id", "gpu", "--seeds", f"{c.addr}:{PORT}")
        _serve(lab, tmp_path, "c", c, secret, "--node-id", "c", "--seeds", f"{a.addr}:{PORT}")
        poll(lambda: _cli(lab, c, secret, "status")["members"]["ALIVE"] == 2, "a and c form a mesh",  # type: ignore[index]
             interval=0.3)
        _serve(lab, tmp_path, "b", b, secret, "--node-id", "gpu", "--seeds", f"{a.addr}:{PORT},{c.addr}:{PORT}")
        clash = "node id 'gpu' is claimed by two nodes, at {} and at {}"
        named = [clash.format(f"{a.addr}:{PORT}", f"{b.addr}:{PORT}"),
                 clash.format(f"{b.addr}:{PORT}", f"{a.addr}:{PORT}")]

        def in_status(h: Host) -> bool:
            status = _cli(lab, h, secret, "status")
            return any(n in w for w in status["warnings"] for n in named)  # type: ignore[index]

        poll(lambda: all(in_status(h) for h in (a, b, c)), "every node's mesh status names the clash", timeout=30,
             interval=0.3)
        for name in ("a", "b", "c"):
            log = (tmp_path / f"{name}.log").read_text()
            assert any(n in log for n in named) and "--node-id" in log, log[-3000:]
        assert f"{a.addr}:{PORT} refused this node (gpu at {b.addr}:{PORT})" in (tmp_path / "b.log").read_text()
        # Refused: the clone is nobody's member, and gpu is where it was for c.
        assert _cli(lab, b, secret, "status")["members"]["ALIVE"] == 1  # type: ignore[index]
        for h in (a, c):
            assert {(r["node_id"], r["address"]) for r in _cli(lab, h, secret, "peers")} == {  # type: ignore[union-attr]
                ("gpu", f"{a.addr}:{PORT}"), ("c", f"{c.addr}:{PORT}")}


def test_a_seed_refuses_a_loopback_joiner_and_every_ring_agrees(tmp_path: Path) -> None:
    """The embedded default (MESH_LISTEN=127.0.0.1:...) on host a, whose seed is the sidecar on its own host: it
    passes the start check (its seed is loopback too), and the seed must refuse it."""
    secret = _secret(tmp_path)
    with netlab_or_skip(2) as lab:
        a, b = lab.hosts
        _serve(lab, tmp_path, "s0", a, secret, "--node-id", "s0")
        _serve(lab, tmp_path, "s1", b, secret, "--node-id", "s1", "--seeds", f"{a.addr}:{PORT}")
        _serve(lab, tmp_path, "lo", a, secret, "--node-id", "lo", "--seeds", f"127.0.0.1:{PORT}",
               listen=f"127.0.0.1:{LOOPBACK_PORT}")
        refused = f"the node at 127.0.0.1:{LOOPBACK_PORT} advertises a loopback address"

        def rings() -> list[list[str]]:
            return [sorted(m["node_id"] for m in _cli(lab, h, secret, "ring")["members"])  # type: ignore[index]
                    for h in (a, b)]

        def refused_both_sides() -> bool:
            lo = _cli(lab, a, secret, "status", node=f"127.0.0.1:{LOOPBACK_PORT}")
            return refused in (tmp_path / "s0.log").read_text() and any(
                refused in w for w in lo["warnings"])  # type: ignore[index]

        poll(refused_both_sides, "the seed refuses the loopback node, and the loopback node's status says so",
             timeout=30, interval=0.3)
        assert "MESH_LISTEN 0.0.0.0:PORT" in (tmp_path / "lo.log").read_text()
        poll(lambda: rings() == [["s0", "s1"], ["s0", "s1"]], "both members hold the same ring", interval=0.3)
        # Still so once the loopback node had time to get in by gossip: a few of s1's push-pull periods later.
        s1_pings = _cli(lab, b, secret, "stats")["counters"]["membership_pings_out"]  # type: ignore[index]
        poll(lambda: _cli(lab, b, secret, "stats")["counters"]["membership_pings_out"] > s1_pings + 50,  # type: ignore[index]
             "s1 pinged 50 more times", interval=0.3)
        assert rings() == [["s0", "s1"], ["s0", "s1"]]
        assert "lo" not in {r["node_id"] for h in (a, b) for r in _cli(lab, h, secret, "peers")}  # type: ignore[union-attr]
