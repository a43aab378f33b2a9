"""A value's compute cost with real parts: it travels with the value through a put, its replica, repair and a
restart from disk (`mesh serve` processes); `mesh stats`, `mesh top` and /metrics show the seconds its hits saved;
the provider does not store what is cheaper to compute again than to fetch."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from mesh.transport.peer import PeerClient
from tests.conftest import SECRET
from tests.support.cli import run_cli
from tests.support.localmesh import LocalMesh, LocalNode
from tests.support.poll import poll
from tests.support.serve import ServeProcess

FAST = ["--heartbeat", "0.2", "--suspect-after", "1.0", "--dead-after", "2.5", "--repair-interval", "1",
        "--replicas", "2"]


def held_costs(mesh: LocalMesh, node: LocalNode) -> dict[str, float]:
    """key -> compute_seconds of what this node holds itself (its ListKeys is its own store, RAM and disk)."""
    with mesh.client(node, timeout=10) as c:
        return {k.key: k.compute_seconds for k in c.list_keys()}


def test_the_cost_travels_through_put_replica_repair_and_a_disk_restart(tmp_path: Path) -> None:
    with LocalMesh(tmp_path / "mesh", extra_args=FAST) as mesh:
        first = mesh.start_node(args=["--data-dir", str(tmp_path / "d0")])
        with mesh.client(first) as c:
            c.put("alone", os.urandom(20_000), meta={"class_type": "KSampler"}, compute_seconds=2.5)
        second = mesh.start_node(args=["--data-dir", str(tmp_path / "d1")])
        mesh.wait_members(2)
        # repair: the second node is an owner of every key now and gets "alone" from the first
        poll(lambda: held_costs(mesh, second).get("alone") == 2.5, "repair copies the value with its cost",
             timeout=30, interval=0.2)
        with mesh.client(second) as c:  # a put through the second node: stored there and replicated
            assert c.put("both", os.urandom(30_000), meta={"class_type": "VAEDecode"}, compute_seconds=7.0).stored
        assert held_costs(mesh, second)["both"] == 7.0
        poll(lambda: held_costs(mesh, first).get("both") == 7.0, "the replica write carries the cost", timeout=30,
             interval=0.1)
        mesh.kill(second)
        second = mesh.restart(second)
        assert held_costs(mesh, second) == {"alone": 2.5, "both": 7.0}  # from its disk, at once


def _samples(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_stats_top_and_metrics_show_the_compute_seconds_saved(serve: Callable[..., ServeProcess],
                                                              secret_file: Path) -> None:
    node = serve("--metrics-listen", "127.0.0.1:0")
    with PeerClient(node.address, SECRET) as c:
        c.put("s/1", os.urandom(5000), meta={"class_type": "KSampler"}, compute_seconds=1.5)
        c.put("s/2", os.urandom(5000), meta={"class_type": "ImageBlur"}, compute_seconds=0.25)
        c.put("s/3", os.urandom(5000))  # `mesh put`-like: no cost, no class
        for key in ("s/1", "s/1", "s/2", "s/3"):
            assert c.get(key) is not None
    r = run_cli("stats", "--json", node=node.address, secret_file=secret_file)
    assert r.returncode == 0, r.stderr
    counters = json.loads(r.stdout)["counters"]
    assert counters["compute_seconds_saved"] == 3.25
    assert counters["class.KSampler.seconds_saved"] == 3.0 and counters["class.KSampler.hits"] == 2
    assert counters["class.ImageBlur.seconds_saved"] == 0.25 and counters["class.ImageBlur.bytes_out"] > 5000
    samples = _samples(node.metrics)
    assert samples[("comfy_mesh_compute_seconds_saved_total", ())] == 3.25
    assert samples[("comfy_mesh_class_seconds_saved_total", (("class_type", "KSampler"),))] == 3.0
    assert samples[("comfy_mesh_class_hits_total", (("class_type", "KSampler"),))] == 2
    assert samples[("comfy_mesh_class_bytes_out_total", (("class_type", "ImageBlur"),))] > 5000
    r = run_cli("top", "--iterations", "1", "--interval", "0.1", node=node.address, secret_file=secret_file)
    assert r.returncode == 0, r.stderr
    assert "compute saved" in r.stdout and "KSampler" in r.stdout and "3.0 s" in r.stdout


def test_the_provider_stores_what_is_dear_and_not_what_is_cheaper_to_compute_than_to_fetch() -> None:
    """With fetches that cost 250 ms (a far mesh), a 64x64 MakeImage (a few ms) is cheaper to compute again and
    the 0.6 s blur is dear. Both are measured by the provider (its lookups); another instance is served the blur and
    counts its cost as saved."""
    from provider.bridge import FetchCost
    from tests.support.comfy_harness import Engine, MakeImage, parser, start_runtime

    prompt = {"image": {"class_type": "MakeImage", "inputs": {"seed": 5, "batch": 1, "height": 64, "width": 64}},
              "blur": {"class_type": "SlowBlur", "inputs": {"image": ["image", 0], "seed": 6, "delay": 0.6}}}
    rt = start_runtime(parser().parse_args(["--secret", "s", "--no-store-cheap"]))
    try:
        MakeImage().run(seed=1)  # torch's first call in a process is slow: not what the node costs
        rt.bridge.fetch_cost = FetchCost(fixed=0.25)
        first = Engine(rt.provider).run(prompt)
        assert first.executed == ["image", "blur"] and not first.errors
        assert rt.bridge.flush(30)
        stats = rt.provider.stats()
        assert stats["provider_bridge_stores_cheap"] == 1 and stats["provider_bridge_stores"] == 1
        held = {e.header.meta["class_type"]: e.header.compute_seconds for e in rt.node.store.items()}
        assert set(held) == {"SlowBlur"} and 0.6 <= held["SlowBlur"] < 1.5
        second = Engine(rt.provider).run(prompt)  # another "instance": an empty local cache
        assert second.provider_hits == ["blur"] and second.executed == ["image"]
        assert 0.6 <= rt.provider.prompt.compute_seconds_saved < 1.5
        assert f"{rt.provider.prompt.compute_seconds_saved:.2f} s of compute saved" in rt.provider.prompt.line()
        assert rt.provider.class_stats()["SlowBlur"]["compute_seconds_saved"] == rt.provider.prompt.compute_seconds_saved
    finally:
        rt.close()


def test_the_fetch_cost_is_learnt_from_hits() -> None:
    from provider.bridge import FetchCost

    cost = FetchCost()
    for _ in range(50):
        cost.measured(0.004, 1000)                 # small hits: all round trip
        cost.measured(0.004 + 0.010, 10 << 20)     # 10 MiB in 10 ms more: 1 GiB/s
    assert abs(cost.fixed - 0.004) < 1e-4 and abs(cost.seconds(10 << 20) - 0.014) < 1e-3


def test_a_value_too_cheap_to_keep_is_not_put_and_says_so_to_its_lease() -> None:
    """The store's callback (dedupe releases its compute lease there) hears "not in the mesh", so waiters compute
    at once; a dear value is put with its cost, a value of unknown cost with none."""
    from mesh import codec
    from mesh.client import LocalClient
    from provider.bridge import Bridge, FetchCost
    from tests.support.comfy_harness import parser, start_runtime

    rt = start_runtime(parser().parse_args(["--secret", "s"]))
    told: dict[str, tuple[bool, bool]] = {}
    bridge = Bridge(LocalClient(rt.node), encode=lambda tree, meta: codec.encode(tree),
                    decoder=codec.StreamDecoder, lookup_timeout=1, store_timeout=5, store_queue=16)
    try:
        bridge.fetch_cost = FetchCost(fixed=0.01)
        for key, seconds in (("cheap", 0.002), ("dear", 0.5), ("unknown", None)):
            assert bridge.store(key, [key], {"class_type": "X"}, seconds,
                                done=lambda ok, never, k=key: told.__setitem__(k, (ok, never)))
        assert bridge.flush(10)
        # the cheap value is not stored, and never will be: its lease is released as such (waiters compute now)
        assert told == {"cheap": (False, True), "dear": (True, False), "unknown": (True, False)}
        assert bridge.counters.stores_cheap == 1 and bridge.counters.stores == 2
        assert rt.node.store.header("cheap") is None
        assert rt.node.store.header("dear").compute_seconds == 0.5  # type: ignore[union-attr]
        assert rt.node.store.header("unknown").compute_seconds == 0.0  # type: ignore[union-attr]
    finally:
        bridge.close()
        rt.close()
