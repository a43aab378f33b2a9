"""Mesh-wide in-flight dedupe (provider/dedupe.py) with real processes: ComfyUI-like harness processes, each with
the real provider and an embedded node, joined into one mesh, running the same prompt at the same moment.

The harness runs store tasks as ComfyUI 0.21's code does (`--store-tasks immediate`: created as each node
finishes, run when the prompt's loop next yields). Every wait is bounded; every process is killed in a finally.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest

from mesh.pb import mesh_pb2 as pb
from mesh.transport.peer import PeerClient
from provider import dedupe
from tests.support.cli import run_cli
from tests.support.comfy_harness import HarnessProcess
from tests.support.poll import poll

SECRET = "dedupe-test-secret"
DELAY = 1.5  # seconds the slow node takes


def fleet(tmp_path: Path, n: int, *args: str) -> list[HarnessProcess]:
    procs: list[HarnessProcess] = []
    try:
        for i in range(n):
            seeds = ["--seeds", procs[0].address] if procs else []
            procs.append(HarnessProcess(["--secret", SECRET, "--node-id", f"c{i}", "--store-tasks", "immediate",
                                         *seeds, *args], log_path=tmp_path / f"c{i}.log"))  # later args win
        for p in procs:
            p.wait_members(n)
        return procs
    except BaseException:
        for p in procs:
            p.kill()
        raise


@pytest.fixture
def cleanup() -> Iterator[list[HarnessProcess]]:
    procs: list[HarnessProcess] = []
    yield procs
    for p in procs:
        if p.alive:
            try:
                p.process.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
        p.kill()


def slow_prompt(seed: int, delay: float = DELAY, node: str = "SlowBlur", **extra: Any) -> dict[str, Any]:
    inputs: dict[str, Any] = {"seed": seed + 1, "delay": delay, **extra}
    prompt: dict[str, Any] = {"image": {"class_type": "MakeImage", "inputs": {"seed": seed, "batch": 1,
                                                                               "height": 32, "width": 32}}}
    if node == "SlowBlur":
        inputs["image"] = ["image", 0]
    prompt["slow"] = {"class_type": node, "inputs": inputs}
    return prompt


def at_once(procs: list[HarnessProcess], prompts: list[dict[str, Any]], timeout: float = 60.0) -> list[dict]:
    """Each process runs its prompt, all started together; their results in order."""
    barrier = threading.Barrier(len(procs))

    def run(p: HarnessProcess, prompt: dict[str, Any]) -> dict:
        barrier.wait(timeout=10)
        return p.run(timeout=timeout, prompt=prompt)

    with futures.ThreadPoolExecutor(len(procs)) as pool:
        jobs = [pool.submit(run, p, prompt) for p, prompt in zip(procs, prompts)]
        return [j.result(timeout=timeout + 15) for j in jobs]


def provider_stats(p: HarnessProcess) -> dict[str, float]:
    return p.stats()["provider"]


def lease_holder(node_address: str, key: str) -> str:
    """Who holds the compute lease on `key` now ("" when nobody does): asked with a probe, released at once."""
    with PeerClient(node_address, SECRET.encode(), timeout=5.0) as c:
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        reply = c.lease(pb.LeaseRequest(key=key, holder=probe, ttl=1.0), timeout=5.0)
        if reply.state == pb.LEASE_GRANTED:
            c.lease(pb.LeaseRequest(key=key, holder=probe, op=pb.LEASE_RELEASE), timeout=5.0)
            return ""
        return reply.holder if reply.state == pb.LEASE_HELD else ""


def lease_owner(node_address: str, key: str) -> str:
    """The node id whose table keeps the lease on `key` (its primary owner): asked with a probe, released."""
    with PeerClient(node_address, SECRET.encode(), timeout=5.0) as c:
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        reply = c.lease(pb.LeaseRequest(key=key, holder=probe, ttl=1.0), timeout=5.0)
        c.lease(pb.LeaseRequest(key=key, holder=probe, op=pb.LEASE_RELEASE), timeout=5.0)
        return reply.owner


def held_answers(procs: list[HarnessProcess]) -> float:
    """How many times the owners told an asker that someone else holds a lease (`lease_held`, all nodes)."""
    total = 0.0
    for p in procs:
        with PeerClient(p.address, SECRET.encode(), timeout=5.0) as c:
            total += c.stats(timeout=5.0).counters.get("lease_held", 0.0)
    return total


def slow_key(p: HarnessProcess, prompt: dict[str, Any]) -> str:
    return p.call({"cmd": "contexts", "prompt": prompt})["contexts"]["slow"]["key"]


@pytest.mark.parametrize("n", [2, 4])
def test_the_same_prompt_at_once_computes_the_slow_node_once(tmp_path: Path, cleanup: list, n: int) -> None:
    procs = fleet(tmp_path, n)
    cleanup.extend(procs)
    prompt = slow_prompt(1000 + n)
    results = at_once(procs, [prompt] * n)
    assert all(r["errors"] == [] and r["failed"] == [] for r in results)
    ran = [i for i, r in enumerate(results) if "slow" in r["executed"]]
    assert len(ran) == 1, f"the slow node ran on {ran}"
    assert len({str(r["outputs"]["slow"]) for r in results}) == 1  # bit-identical everywhere
    assert len({str(r["outputs"]["image"]) for r in results}) == 1
    waiters = [r for i, r in enumerate(results) if i not in ran]
    assert all("slow" in r["provider_hits"] for r in waiters)
    stats = [provider_stats(p) for p in procs]
    assert sum(s["provider_dedupe_wait_hits"] for s in stats) >= n - 1
    assert sum(s["provider_dedupe_saved_seconds"] for s in stats) >= (n - 1) * DELAY * 0.5
    for r in waiters:  # a waiter is served as the value lands, not after a poll's worth of extra time
        assert r["wall_s"] <= results[ran[0]]["wall_s"] + 1.0, (r["wall_s"], results[ran[0]]["wall_s"])
    # `mesh stats` of a waiter's node shows its provider's dedupe counters; the owners counted the grants.
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o600)
    waiter = procs[next(i for i in range(n) if i not in ran)]
    done = run_cli("stats", "--json", node=waiter.address, secret_file=secret_file)
    assert done.returncode == 0, done.stderr
    counters = json.loads(done.stdout)["counters"]
    assert counters["provider_dedupe_waits"] >= 1 and counters["provider_dedupe_wait_seconds"] > 0
    assert counters["provider_dedupe_saved_seconds"] >= DELAY * 0.5
    assert sum(p.stats()["node"]["lease_granted"] for p in procs) >= 1


def test_store_tasks_run_after_the_prompt_still_compute_a_node_once(tmp_path: Path, cleanup: list) -> None:
    """A ComfyUI whose store tasks run only after the prompt (`deferred`): the holder runs a node after the slow
    one before the slow node's store claims its lease. ComfyUI said a store is coming (should_cache with the
    value), so the lease is kept through that node, not given up as "no value coming" (the waiter then computed)."""
    procs = fleet(tmp_path, 2, "--store-tasks", "deferred")
    cleanup.extend(procs)
    prompt = slow_prompt(1500)
    prompt["after"] = {"class_type": "SlowBlur", "inputs": {"image": ["slow", 0], "seed": 3, "delay": 0.0}}
    results = at_once(procs, [prompt] * 2)
    assert all(r["errors"] == [] and r["failed"] == [] for r in results)
    ran = [i for i, r in enumerate(results) if "slow" in r["executed"]]
    assert len(ran) == 1, f"the slow node ran on {ran}"
    assert len({str(r["outputs"]["after"]) for r in results}) == 1
    assert sum(provider_stats(p)["provider_dedupe_takeovers"] for p in procs) == 0


def holder_then_waiter(tmp_path: Path, cleanup: list, prompt: Any, *args: str, owner: str = ""
                       ) -> tuple[HarnessProcess, HarnessProcess, futures.Future, futures.Future, float, futures.Executor]:
    """A starts the prompt and takes the lease on its slow node; then B starts it and waits for A. `prompt`: a
    prompt, or a function of a seed whose prompt is tried with seeds until the slow node's lease is kept by
    `owner` (c0: A's node, c1: B's node)."""
    a, b = fleet(tmp_path, 2, *args)
    cleanup.extend([a, b])
    if callable(prompt):
        make = prompt
        for seed in range(64):
            prompt = make(seed)
            if lease_owner(b.address, slow_key(a, prompt)) == owner:
                break
        else:
            raise AssertionError(f"no seed of 64 gives a key whose lease {owner} keeps")
    key = slow_key(a, prompt)
    pool = futures.ThreadPoolExecutor(2)
    ra = pool.submit(a.run, 120, prompt=prompt)
    poll(lambda: lease_holder(b.address, key).startswith("c0:"), "A holds the lease on the slow node", timeout=20)
    asked = held_answers([a, b])
    b_started = time.monotonic()
    rb = pool.submit(b.run, 120, prompt=prompt)
    poll(lambda: held_answers([a, b]) > asked, "B was told A holds the lease (it waits)", timeout=20)
    return a, b, ra, rb, b_started, pool


def waited_after(b_result: dict, b_started: float, event_at: float) -> float:
    """Seconds from `event_at` until B started its own computation of the slow node."""
    before_compute = b_result["wall_s"] - b_result["nodes"]["slow"]["exec_s"]
    return b_started + before_compute - event_at


@pytest.mark.parametrize("owner", ["waiter", "holder"])
@pytest.mark.parametrize("how", ["kill", "freeze"])
def test_a_holder_killed_or_frozen_frees_its_waiter_within_a_few_seconds(tmp_path: Path, cleanup: list,
                                                                         how: str, owner: str) -> None:
    """The lease is kept by B's node (A stops renewing: it lapses) or by A's own (the owner is gone: B's lease
    call goes to the key's next owner). A's slow node takes 8 s; B, knowing no compute time for it, would
    otherwise wait up to DEFAULT_WAIT (10 s)."""
    base = 2000 + 100 * (how == "freeze") + 200 * (owner == "holder")
    a, b, ra, rb, b_started, pool = holder_then_waiter(
        tmp_path, cleanup, lambda s: slow_prompt(base + 2 * s, delay=8.0), "--dedupe-max-wait", "30",
        owner="c1" if owner == "waiter" else "c0")
    event = time.monotonic()
    a.process.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    result = rb.result(timeout=60)
    assert result["errors"] == [] and "slow" in result["executed"]
    freed = waited_after(result, b_started, event)
    assert freed < dedupe.TTL + 2.0, f"B computed {freed:.1f} s after A was {how}ed"
    stats = provider_stats(b)
    assert stats["provider_dedupe_waits"] == 1
    assert stats["provider_dedupe_takeovers"] + stats["provider_dedupe_lease_errors"] == 1
    if owner == "waiter":
        assert b.stats()["node"]["lease_expired"] >= 1  # A's lease lapsed at B's node
    pool.shutdown(wait=False, cancel_futures=True)


def test_an_interrupted_holder_frees_its_waiter_at_once(tmp_path: Path, cleanup: list) -> None:
    stop = tmp_path / "interrupt"
    prompt = slow_prompt(3000, delay=6.0, node="SlowInterruptible", stop_file=str(stop))
    a, b, ra, rb, b_started, pool = holder_then_waiter(tmp_path, cleanup, prompt)
    event = time.monotonic()
    stop.touch()  # A's node sees it, deletes it and raises, as ComfyUI's interrupt does
    got_a = ra.result(timeout=30)
    assert got_a["failed"] == ["slow"]
    result = rb.result(timeout=60)
    assert result["errors"] == [] and "slow" in result["executed"]
    freed = waited_after(result, b_started, event)
    assert freed < dedupe.GRACE + 2.0, f"B computed {freed:.1f} s after A was interrupted"
    assert provider_stats(b)["provider_dedupe_takeovers"] == 1
    pool.shutdown(wait=False, cancel_futures=True)


def test_an_uncacheable_value_frees_the_waiter_when_the_holder_is_done(tmp_path: Path, cleanup: list) -> None:
    prompt = slow_prompt(4000, delay=3.0, node="SlowOpaque")
    a, b, ra, rb, b_started, pool = holder_then_waiter(tmp_path, cleanup, prompt)
    got_a = ra.result(timeout=30)
    a_done = time.monotonic()
    assert got_a["errors"] == [] and "slow" in got_a["executed"]
    result = rb.result(timeout=60)
    assert result["errors"] == [] and "slow" in result["executed"]  # nothing to share: B computes it
    freed = waited_after(result, b_started, a_done)
    assert freed < 2.0, f"B computed {freed:.1f} s after A finished with a value that is not cached"
    pool.shutdown(wait=False, cancel_futures=True)


def test_a_slow_store_is_waited_for_and_served(tmp_path: Path, cleanup: list) -> None:
    """A's value takes 2 s more to reach the mesh after it is computed: B, waiting, is served it all the same (its
    wait is bounded by what computing takes plus the hand-over, and A renews its lease while it stores)."""
    prompt = slow_prompt(5000, delay=3.0)
    a, b, ra, rb, b_started, pool = holder_then_waiter(tmp_path, cleanup, prompt, "--store-delay", "2.0")
    result = rb.result(timeout=60)
    assert ra.result(timeout=30)["errors"] == []
    assert result["errors"] == [] and "slow" in result["provider_hits"] and "slow" not in result["executed"]
    assert str(result["outputs"]["slow"]) == str(ra.result()["outputs"]["slow"])
    pool.shutdown(wait=False, cancel_futures=True)


def test_a_waiter_whose_class_history_underestimates_the_key_waits_for_a_live_holder(tmp_path: Path,
                                                                                    cleanup: list) -> None:
    """B has run this class type only fast (0.2 s), so its guess for a never-seen key of it is 0.2 s plus the
    hand-over; A computes that key for 4 s and renews its lease. B must not give up on A and compute too (it
    would finish after A): it waits for the live holder and is served A's value."""
    a, b = fleet(tmp_path, 2)
    cleanup.extend([a, b])
    warm = b.run(60, prompt=slow_prompt(7000, delay=0.2))
    assert warm["errors"] == [] and "slow" in warm["executed"]
    prompt = slow_prompt(7100, delay=4.0)
    key = slow_key(a, prompt)
    with futures.ThreadPoolExecutor(2) as pool:
        ra = pool.submit(a.run, 120, prompt=prompt)
        poll(lambda: lease_holder(b.address, key).startswith("c0:"), "A holds the lease on the slow node",
             timeout=20)
        rb = pool.submit(b.run, 120, prompt=prompt)
        result, got_a = rb.result(timeout=60), ra.result(timeout=60)
    assert got_a["errors"] == [] and "slow" in got_a["executed"]
    assert result["errors"] == [] and "slow" not in result["executed"], "B gave up on a live holder and computed"
    assert "slow" in result["provider_hits"] and result["outputs"]["slow"] == got_a["outputs"]["slow"]
    stats = provider_stats(b)
    assert stats["provider_dedupe_waits"] == 1 and stats["provider_dedupe_wait_timeouts"] == 0


@pytest.mark.parametrize("store_tasks", ["immediate", "deferred"])
def test_no_deadlock_with_independent_branches_in_opposite_orders(tmp_path: Path, cleanup: list,
                                                                  store_tasks: str) -> None:
    """A runs X then Y; B runs Y then X (two independent slow nodes). Each computes its first node, then finds
    the other's in flight and waits for it: both finish in about two node times, each node computed once.

    With store tasks that run only after the prompt (`deferred`), a finished node's value is not coming until
    then, so its lease is released at the next node's lookup: both may compute both nodes, but neither waits
    for the other to the bound (a lease held while waiting would make each wait for the other's)."""
    a, b = fleet(tmp_path, 2, "--store-tasks", store_tasks)
    cleanup.extend([a, b])

    def branch(name: str, seed: int) -> dict[str, Any]:
        return {f"{name}_image": {"class_type": "MakeImage", "inputs": {"seed": seed, "batch": 1, "height": 16,
                                                                        "width": 16}},
                name: {"class_type": "SlowBlur", "inputs": {"image": [f"{name}_image", 0], "seed": seed,
                                                            "delay": 2.0}}}

    seed = 6001 if store_tasks == "immediate" else 6101
    x, y = branch("x", seed), branch("y", seed + 1)
    results = at_once([a, b], [{**x, **y}, {**y, **x}])
    assert all(r["errors"] == [] for r in results)
    assert results[0]["outputs"]["x"] == results[1]["outputs"]["x"]
    assert results[0]["outputs"]["y"] == results[1]["outputs"]["y"]
    # Not a wait to the bound (10 s for a node never timed) on either side: at most two node times and change.
    assert max(r["wall_s"] for r in results) < 2 * 2.0 + 2.5, [r["wall_s"] for r in results]
    if store_tasks == "immediate":
        executed = [n for r in results for n in r["executed"] if n in ("x", "y")]
        assert sorted(executed) == ["x", "y"], executed


def test_dedupe_off_computes_everywhere(tmp_path: Path, cleanup: list) -> None:
    procs = fleet(tmp_path, 2, "--no-dedupe")
    cleanup.extend(procs)
    results = at_once(procs, [slow_prompt(7000, delay=1.0)] * 2)
    assert [("slow" in r["executed"]) for r in results] == [True, True]


class FailingLeases:
    """A mesh whose lease calls fail (a node from before the Lease RPC answers UNIMPLEMENTED): counted calls."""

    def __init__(self) -> None:
        self.calls = 0

    def lease(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        from mesh.transport.peer import Refused
        raise Refused("Lease: UNIMPLEMENTED")


def test_failing_lease_calls_cost_one_call_then_none_for_a_while() -> None:
    import asyncio

    from provider.costs import ComputeCosts

    client = FailingLeases()
    d = dedupe.Dedupe(client, ComputeCosts(), max_wait=60.0)  # type: ignore[arg-type]

    async def fetch() -> Any:
        raise AssertionError("nothing to fetch")

    async def prompt() -> list[Any]:
        return [await d.before_compute(f"k{i}", "K", "p", fetch) for i in range(20)]

    try:
        assert asyncio.run(prompt()) == [None] * 20  # every node computes here, none fails
        assert client.calls == 1
        assert d.stats()["provider_dedupe_lease_errors"] == 1 and d.stats()["provider_dedupe_skipped"] == 19
    finally:
        d.close()


def test_a_wait_is_bounded_by_what_computing_takes_here() -> None:
    from mesh.cluster.leases import HELD, Answer
    from provider.costs import ComputeCosts

    costs = ComputeCosts()
    d = dedupe.Dedupe(FailingLeases(), costs, max_wait=20.0)  # type: ignore[arg-type]
    try:
        held = Answer(HELD, "other")
        assert d.wait_bound("K", "k", held) == dedupe.DEFAULT_WAIT  # never timed, holder knows nothing
        assert d.wait_bound("K", "k", Answer(HELD, "other", expected_seconds=4.0)) == 4.0 + dedupe.HANDOVER
        costs.start("j", "K")
        costs._pending["j"].at -= 30.0  # a node of this class took 30 s here
        costs.finish("j")
        assert d.wait_bound("K", "k", held) == 20.0  # capped by MESH_DEDUPE_MAX_WAIT
        costs.start("k", "K")
        costs._pending["k"].at -= 2.0
        costs.finish("k")
        assert d.wait_bound("K", "k", held) == pytest.approx(2.0 + dedupe.HANDOVER, abs=0.05)  # the key's own
    finally:
        d.close()


def test_a_node_known_to_be_cheap_is_computed_without_a_lease() -> None:
    import asyncio

    from provider.costs import ComputeCosts

    costs = ComputeCosts()
    costs.start("k0", "Cheap")
    costs.finish("k0")  # microseconds
    client = FailingLeases()
    d = dedupe.Dedupe(client, costs, max_wait=60.0)  # type: ignore[arg-type]

    async def fetch() -> Any:
        raise AssertionError("nothing to fetch")

    try:
        assert asyncio.run(d.before_compute("k1", "Cheap", "p", fetch)) is None
        assert client.calls == 0 and d.stats()["provider_dedupe_cheap"] == 1
        assert asyncio.run(d.before_compute("k2", "Unknown", "p", fetch)) is None
        assert client.calls == 1  # a class never timed here is asked about
    finally:
        d.close()


def test_sidecar_mode_dedupes_through_the_sidecar(tmp_path: Path, cleanup: list) -> None:
    """B has no node of its own: its lease calls go to its sidecar (A's node), routed to the key's owner."""
    a = HarnessProcess(["--secret", SECRET, "--node-id", "c0", "--store-tasks", "immediate"],
                       log_path=tmp_path / "c0.log")
    cleanup.append(a)
    b = HarnessProcess(["--secret", SECRET, "--mode", "sidecar", "--node", a.address, "--store-tasks", "immediate"],
                       log_path=tmp_path / "b.log")
    cleanup.append(b)
    results = at_once([a, b], [slow_prompt(8000)] * 2)
    assert all(r["errors"] == [] for r in results)
    assert sum("slow" in r["executed"] for r in results) == 1
    assert results[0]["outputs"]["slow"] == results[1]["outputs"]["slow"]


def test_dedupe_and_lease_counters_are_prometheus_counters() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from mesh.metrics import _NodeCollector

    registry = CollectorRegistry()
    registry.register(_NodeCollector(lambda: {"provider_dedupe_waits": 2.0, "provider_dedupe_wait_seconds": 3.5,
                                              "provider_dedupe_saved_seconds": 6.0, "lease_granted": 4.0,
                                              "lease_expired": 1.0}, list))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    for line in ("comfy_mesh_provider_dedupe_waits_total 2.0", "comfy_mesh_provider_dedupe_wait_seconds_total 3.5",
                 "comfy_mesh_provider_dedupe_saved_seconds_total 6.0", "comfy_mesh_lease_granted_total 4.0",
                 "comfy_mesh_lease_expired_total 1.0"):
        assert line in text, line


def test_an_owner_that_changes_mid_computation_costs_at_most_a_duplicate(tmp_path: Path, cleanup: list) -> None:
    """A holds the lease on the slow node at its primary owner; then C joins and becomes that key's primary. B's
    lease call goes to C, which never heard of A's lease (unless A's renewal re-took it there first): B either
    waits for A's value or computes it too, but never stalls, and every result is the same."""
    from mesh.cluster.ring import Ring

    a, b = fleet(tmp_path, 2)
    cleanup.extend([a, b])
    for seed in range(64):
        prompt = slow_prompt(9000 + 2 * seed, delay=5.0)
        key = slow_key(a, prompt)
        if Ring({"c0": 1.0, "c1": 1.0, "c2": 1.0}).owners(key, 2)[0] == "c2" \
                and Ring({"c0": 1.0, "c1": 1.0}).owners(key, 2)[0] == "c1":
            break
    else:
        raise AssertionError("no seed of 64 moves the key's primary from c1 to c2")
    pool = futures.ThreadPoolExecutor(2)
    started = time.monotonic()
    ra = pool.submit(a.run, 120, prompt=prompt)
    poll(lambda: lease_holder(b.address, key).startswith("c0:"), "A holds the lease at c1", timeout=20)
    c = HarnessProcess(["--secret", SECRET, "--node-id", "c2", "--store-tasks", "immediate", "--seeds", a.address],
                       log_path=tmp_path / "c2.log")
    cleanup.append(c)
    for p in (b, c):
        p.wait_members(3)
    rb = pool.submit(b.run, 120, prompt=prompt)
    got_a, got_b = ra.result(timeout=60), rb.result(timeout=60)
    assert got_a["errors"] == [] and got_b["errors"] == []
    assert got_a["outputs"]["slow"] == got_b["outputs"]["slow"]
    assert "slow" in got_a["executed"]
    # B waited for A's value or computed it itself, but never to its bound (10 s): done within two node times.
    assert time.monotonic() - started < 2 * 5.0 + 5.0
    pool.shutdown(wait=False, cancel_futures=True)
